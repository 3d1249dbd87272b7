//! The HTML page: sections of charts (inline SVG) and tables. Every text
//! that comes from the input goes through [`escape`].

use super::{
    charts::{self, HISTORY_KEYS_MAX, HISTORY_POINTS_MAX},
    history::{History, Record, HISTORY_RECORDS_MAX},
    input::Run,
    targets::{fmt_value, target_of, Verdict},
};
use anyhow::{Context, Result};
use std::{fmt::Write as _, path::Path};

/// What the page is made of.
pub struct PageInput<'a> {
    pub commit: &'a str,
    pub time: &'a str,
    pub runs: &'a [Run],
    pub history: &'a History,
    pub history_file: &'a Path,
}

/// Charts on the page, by kind.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct ChartCount {
    pub ratios: usize,
    pub timeline: usize,
    pub latency: usize,
    pub history: usize,
}

impl ChartCount {
    pub fn total(&self) -> usize {
        self.ratios + self.timeline + self.latency + self.history
    }
}

pub struct Rendered {
    pub html: String,
    pub charts: ChartCount,
}

/// `s` safe as HTML text and as a quoted attribute value.
pub fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

const STYLE: &str = "body{font-family:sans-serif;margin:0;background:#fafafa;color:#212121}\
main{max-width:1180px;margin:0 auto;padding:16px 24px 48px}\
h1{margin:8px 0 4px}h2{margin-top:36px;border-bottom:2px solid #e0e0e0;padding-bottom:4px}\
h3{margin:24px 0 8px;font-size:17px}.meta{color:#616161}\
figure{margin:8px 0 16px;background:#fff;border:1px solid #e0e0e0;padding:4px}\
figure svg{width:100%;height:auto;display:block}figcaption{color:#616161;font-size:13px;padding:4px}\
table{border-collapse:collapse;margin:8px 0 16px;background:#fff;font-size:14px}\
th,td{border:1px solid #e0e0e0;padding:4px 10px;text-align:left}th{background:#f5f5f5}\
td.num{text-align:right;font-variant-numeric:tabular-nums}\
.pass{color:#2e7d32;font-weight:bold}.fail{color:#c62828;font-weight:bold}.none{color:#546e7a}\
.notes li{color:#5d4037}";

fn verdict_class(v: Verdict) -> &'static str {
    match v {
        Verdict::Pass => "pass",
        Verdict::Fail => "fail",
        Verdict::NoTarget | Verdict::NoValue => "none",
    }
}

fn figure(out: &mut String, kind: &str, svg: &str, caption: &str) {
    let _ = writeln!(
        out,
        "<figure class=\"chart\" data-chart=\"{kind}\">{svg}<figcaption>{}</figcaption></figure>",
        escape(caption)
    );
}

fn run_title(run: &Run) -> String {
    format!("{} \u{2014} {}", run.bench, run.file)
}

/// The whole page.
pub fn render(input: &PageInput) -> Result<Rendered> {
    let mut count = ChartCount::default();
    let mut body = String::new();
    let mut notes: Vec<String> = input.runs.iter().flat_map(|r| r.notes.clone()).collect();

    summary(&mut body, input);

    body.push_str("<h2 id=\"ratios\">Ratios against their targets</h2>\n");
    body.push_str("<p class=\"meta\">A bar per ratio: green meets its target (the dashed line), red misses it, grey has no target or no value.</p>\n");
    for run in input.runs {
        let _ = writeln!(body, "<h3>{}</h3>", escape(&run_title(run)));
        if run.ratios.is_empty() {
            body.push_str("<p class=\"meta\">This run has no ratios.</p>\n");
            continue;
        }
        let svg =
            charts::ratios_chart(run).with_context(|| format!("{}: ratios chart", run.file))?;
        figure(
            &mut body,
            "ratios",
            &svg,
            &format!("{}: each ratio against its target", run_title(run)),
        );
        count.ratios += 1;
        ratio_table(&mut body, run);
    }

    body.push_str("<h2 id=\"timeline\">Throughput over time</h2>\n");
    let with_timeline: Vec<&Run> = input
        .runs
        .iter()
        .filter(|r| !r.timeline.is_empty())
        .collect();
    if with_timeline.is_empty() {
        body.push_str("<p class=\"meta\">No run recorded a timeline (<code>imbench storage</code> does).</p>\n");
    }
    for run in with_timeline {
        let _ = writeln!(body, "<h3>{}</h3>", escape(&run_title(run)));
        for phase in &run.timeline {
            let svg = charts::timeline_chart(phase)
                .with_context(|| format!("{}: timeline chart of {}", run.file, phase.phase))?;
            figure(
                &mut body,
                "timeline",
                &svg,
                &format!(
                    "{}: {} (ours in blues, the peer in oranges)",
                    run.bench, phase.phase
                ),
            );
            count.timeline += 1;
        }
    }

    body.push_str("<h2 id=\"latency\">Latency percentiles</h2>\n");
    let with_latency: Vec<&Run> = input
        .runs
        .iter()
        .filter(|r| !r.latencies.is_empty())
        .collect();
    if with_latency.is_empty() {
        body.push_str("<p class=\"meta\">No run has latency summaries.</p>\n");
    }
    for run in with_latency {
        let _ = writeln!(body, "<h3>{}</h3>", escape(&run_title(run)));
        let svg = charts::latency_chart(&run.latencies)
            .with_context(|| format!("{}: latency chart", run.file))?;
        figure(
            &mut body,
            "latency",
            &svg,
            &format!(
                "{}: latency percentiles, ours beside the peer",
                run_title(run)
            ),
        );
        count.latency += 1;
        latency_table(&mut body, run);
    }

    body.push_str("<h2 id=\"history\">History</h2>\n");
    let h = input.history;
    let _ = writeln!(
        body,
        "<p class=\"meta\">{} records in {} (each report adds one per run); each chart shows the newest {HISTORY_POINTS_MAX} of its benchmark, oldest left.</p>",
        h.records.len(),
        escape(&input.history_file.display().to_string())
    );
    if h.left_out > 0 {
        notes.push(format!(
            "history: {} older records left out (only the newest {HISTORY_RECORDS_MAX} are read)",
            h.left_out
        ));
    }
    for s in &h.skipped {
        notes.push(format!("history {}: {s}", input.history_file.display()));
    }
    for (bench, records) in by_bench(&h.records) {
        let newest = &records[records.len().saturating_sub(HISTORY_POINTS_MAX)..];
        let mut keys: Vec<String> = newest
            .iter()
            .flat_map(|r| r.ratios.keys().cloned())
            .collect();
        keys.sort();
        keys.dedup();
        if keys.len() > HISTORY_KEYS_MAX {
            notes.push(format!(
                "history of {bench}: {} ratio keys; the first {HISTORY_KEYS_MAX} are drawn",
                keys.len()
            ));
            keys.truncate(HISTORY_KEYS_MAX);
        }
        if keys.is_empty() {
            continue;
        }
        let _ = writeln!(body, "<h3>{}</h3>", escape(bench));
        let svg = charts::history_chart(bench, newest, &keys)
            .with_context(|| format!("history chart of {bench}"))?;
        let (first, last) = (&newest[0].commit, &newest[newest.len() - 1].commit);
        figure(
            &mut body,
            "history",
            &svg,
            &format!(
                "{bench}: {} records, commits {first} .. {last}",
                newest.len()
            ),
        );
        count.history += 1;
    }

    if !notes.is_empty() {
        body.push_str("<h2 id=\"notes\">Notes</h2>\n<ul class=\"notes\">\n");
        for n in &notes {
            let _ = writeln!(body, "<li>{}</li>", escape(n));
        }
        body.push_str("</ul>\n");
    }

    let mut html = String::new();
    let _ = write!(
        html,
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n\
         <meta name=\"imbench-charts\" content=\"{}\">\n<title>imbench report {}</title>\n\
         <style>{STYLE}</style>\n</head>\n<body>\n<main>\n<h1>imbench report</h1>\n\
         <p class=\"meta\">commit {} &middot; {} &middot; {} runs &middot; {} charts</p>\n{body}</main>\n</body>\n</html>\n",
        count.total(),
        escape(input.commit),
        escape(input.commit),
        escape(input.time),
        input.runs.len(),
        count.total(),
    );
    Ok(Rendered {
        html,
        charts: count,
    })
}

fn summary(out: &mut String, input: &PageInput) {
    out.push_str("<table id=\"summary\"><tr><th>benchmark</th><th>file</th><th>ratios</th><th>pass</th><th>fail</th><th>no target</th><th>no value</th></tr>\n");
    for run in input.runs {
        let mut n = [0usize; 4];
        for (key, value) in &run.ratios {
            n[match Verdict::of(target_of(&run.bench, key), *value) {
                Verdict::Pass => 0,
                Verdict::Fail => 1,
                Verdict::NoTarget => 2,
                Verdict::NoValue => 3,
            }] += 1;
        }
        let _ = writeln!(
            out,
            "<tr><td>{}</td><td>{}</td><td class=\"num\">{}</td><td class=\"num pass\">{}</td><td class=\"num{}\">{}</td><td class=\"num\">{}</td><td class=\"num\">{}</td></tr>",
            escape(&run.bench),
            escape(&run.file),
            run.ratios.len(),
            n[0],
            if n[1] > 0 { " fail" } else { "" },
            n[1],
            n[2],
            n[3]
        );
    }
    out.push_str("</table>\n");
}

fn ratio_table(out: &mut String, run: &Run) {
    out.push_str("<table><tr><th>benchmark</th><th>key</th><th>value</th><th>target</th><th>verdict</th><th>what</th></tr>\n");
    for (key, value) in &run.ratios {
        let target = target_of(&run.bench, key);
        let verdict = Verdict::of(target, *value);
        let _ = writeln!(
            out,
            "<tr><td>{}</td><td>{}</td><td class=\"num\">{}</td><td>{}</td><td class=\"{}\">{}</td><td>{}</td></tr>",
            escape(&run.bench),
            escape(key),
            value.map(fmt_value).unwrap_or_else(|| "null".into()),
            target.map(|t| escape(&t.to_string())).unwrap_or_default(),
            verdict_class(verdict),
            verdict.label(),
            target.map(|t| escape(t.what)).unwrap_or_default()
        );
    }
    out.push_str("</table>\n");
}

fn latency_table(out: &mut String, run: &Run) {
    out.push_str("<table><tr><th>latency</th><th>side</th><th>p50 us</th><th>p99 us</th><th>p999 us</th><th>max us</th><th>samples</th></tr>\n");
    let num = |v: Option<f64>| v.map(|v| format!("{v:.0}")).unwrap_or_else(|| "-".into());
    for l in &run.latencies {
        let _ = writeln!(
            out,
            "<tr><td>{}</td><td>{}</td><td class=\"num\">{}</td><td class=\"num\">{}</td><td class=\"num\">{}</td><td class=\"num\">{}</td><td class=\"num\">{}</td></tr>",
            escape(&l.label),
            if l.peer { "peer" } else { "ours" },
            num(Some(l.p50_us)),
            num(Some(l.p99_us)),
            num(l.p999_us),
            num(Some(l.max_us)),
            l.samples.map(|s| s.to_string()).unwrap_or_else(|| "-".into())
        );
    }
    out.push_str("</table>\n");
}

/// Records grouped by benchmark, in the order benchmarks first appear.
fn by_bench(records: &[Record]) -> Vec<(&str, Vec<&Record>)> {
    let mut out: Vec<(&str, Vec<&Record>)> = Vec::new();
    for r in records {
        match out.iter_mut().find(|(b, _)| *b == r.bench) {
            Some((_, v)) => v.push(r),
            None => out.push((r.bench.as_str(), vec![r])),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escaping_covers_markup_and_quotes() {
        assert_eq!(
            escape("<script>alert('x') & \"y\"</script>"),
            "&lt;script&gt;alert(&#39;x&#39;) &amp; &quot;y&quot;&lt;/script&gt;"
        );
        assert_eq!(escape("plain é"), "plain é");
    }

    #[test]
    fn input_text_reaches_the_page_escaped() {
        let v = serde_json::json!({
            "bench": "e2e",
            "ratios": {"<b>bold</b>": 1.0, "datagrams_vs_raw_udp": 0.4},
            "online": {"answer": {"p50_us": 10, "p99_us": 20, "max_us": 30, "samples": 3}}
        });
        let runs = [Run::from_value("<img src=x onerror=alert(1)>e2e.json", &v).unwrap()];
        let history = History {
            records: vec![Record {
                commit: "<i>c1</i>".into(),
                time: "t".into(),
                bench: "e2e".into(),
                ratios: [("<b>bold</b>".to_owned(), Some(1.0))].into(),
            }],
            ..History::default()
        };
        let page = render(&PageInput {
            commit: "<c&>",
            time: "now",
            runs: &runs,
            history: &history,
            history_file: Path::new("h<.jsonl"),
        })
        .unwrap();
        let html = &page.html;
        for raw in ["<b>bold", "<img src=x", "<i>c1", "<c&>", "h<.jsonl"] {
            assert!(!html.contains(raw), "{raw} unescaped");
        }
        assert!(html.contains("&lt;b&gt;bold&lt;/b&gt;"));
        assert!(html.contains("&lt;img src=x onerror=alert(1)&gt;e2e.json"));
        assert_eq!(
            page.charts,
            ChartCount {
                ratios: 1,
                timeline: 0,
                latency: 1,
                history: 1
            }
        );
        assert_eq!(html.matches("<svg").count(), page.charts.total());
        assert!(
            html.contains("<td class=\"fail\">FAIL</td>"),
            "0.4 misses >= 0.5"
        );
    }
}
