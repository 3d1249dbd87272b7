//! `imbench report --out DIR [--history FILE] [--commit SHA] JSON...`: the
//! JSON of any imbench runs as one HTML page, `DIR/index.html`, with SVG
//! charts (plotters): each ratio against its target, throughput over time
//! per phase, latency percentiles (ours beside the peer), and every ratio
//! across the history of reports (one record per run appended to the
//! history file each time).

mod charts;
mod history;
mod input;
mod page;
pub(crate) mod targets;

use anyhow::{bail, Context, Result};
use std::path::PathBuf;

/// JSON files one report takes at most; more is refused.
pub const RUNS_MAX: usize = 64;

#[derive(clap::Args, Debug)]
pub struct ReportArgs {
    /// Directory to write `index.html` into (created if missing).
    #[arg(long, value_name = "DIR")]
    pub out: PathBuf,
    /// History file: one record per run is appended, then every record is
    /// drawn [default: DIR/history.jsonl].
    #[arg(long, value_name = "FILE")]
    pub history: Option<PathBuf>,
    /// Commit the runs are filed under in the history [default: `git
    /// rev-parse --short HEAD` here, else "unknown"].
    #[arg(long, value_name = "SHA")]
    pub commit: Option<String>,
    /// JSON files written by `imbench <benchmark> --json FILE`.
    #[arg(required = true, value_name = "JSON")]
    pub json: Vec<PathBuf>,
}

pub fn run(args: ReportArgs) -> Result<()> {
    if args.json.len() > RUNS_MAX {
        bail!(
            "{} JSON files given; a report takes at most {RUNS_MAX}",
            args.json.len()
        );
    }
    // Every input is checked before anything is written.
    let runs = args
        .json
        .iter()
        .map(|p| input::Run::load(p))
        .collect::<Result<Vec<_>>>()?;
    let commit = history::commit_label(args.commit.as_deref())?;
    let time = history::now_utc();
    std::fs::create_dir_all(&args.out).with_context(|| format!("create {}", args.out.display()))?;
    let history_file = args
        .history
        .unwrap_or_else(|| args.out.join("history.jsonl"));
    let records: Vec<history::Record> = runs
        .iter()
        .map(|r| history::Record {
            commit: commit.clone(),
            time: time.clone(),
            bench: r.bench.clone(),
            ratios: r.ratios.iter().cloned().collect(),
        })
        .collect();
    history::append(&history_file, &records)?;
    let history = history::read(&history_file)?;
    for s in &history.skipped {
        eprintln!("{}: {s}", history_file.display());
    }
    for r in &runs {
        for n in &r.notes {
            eprintln!("note: {n}");
        }
    }
    let page = page::render(&page::PageInput {
        commit: &commit,
        time: &time,
        runs: &runs,
        history: &history,
        history_file: &history_file,
    })?;
    let index = args.out.join("index.html");
    let tmp = args.out.join(".index.html.tmp");
    std::fs::write(&tmp, &page.html).with_context(|| format!("write {}", tmp.display()))?;
    std::fs::rename(&tmp, &index).with_context(|| format!("write {}", index.display()))?;
    let c = page.charts;
    println!(
        "wrote {}: {} charts ({} ratios, {} timeline, {} latency, {} history); {} runs appended to {} ({} records)",
        index.display(),
        c.total(),
        c.ratios,
        c.timeline,
        c.latency,
        c.history,
        runs.len(),
        history_file.display(),
        history.records.len()
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::targets::BENCHES;
    use clap::CommandFactory;

    #[test]
    fn every_benchmark_subcommand_is_a_known_bench() {
        let mut subcommands: Vec<String> = crate::Cli::command()
            .get_subcommands()
            .map(|c| c.get_name().to_owned())
            .filter(|n| n != "report")
            .collect();
        subcommands.sort();
        let mut benches: Vec<&str> = BENCHES.to_vec();
        benches.sort();
        assert_eq!(subcommands, benches);
    }
}
