//! The history file: one JSON line per run a report was made of
//! (`{commit, time, bench, ratios}`), appended by every `imbench report`,
//! read back to draw each ratio across commits.

use super::input::{plottable, VALUE_ABS_MAX};
use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::{
    collections::{BTreeMap, VecDeque},
    io::{BufRead, BufReader, Read as _, Seek, SeekFrom, Write as _},
    path::Path,
};

/// Records read back at most: the newest are kept, older ones are left
/// out (the page says how many).
pub const HISTORY_RECORDS_MAX: usize = 10_000;
/// A longer line is skipped and reported (a record is well under 4 KiB).
pub const HISTORY_LINE_BYTES_MAX: usize = 256 * 1024;
/// A longer `--commit` is refused.
pub const COMMIT_CHARS_MAX: usize = 64;

/// One run as the history keeps it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Record {
    pub commit: String,
    /// UTC, `YYYY-MM-DDTHH:MM:SSZ`.
    pub time: String,
    pub bench: String,
    pub ratios: BTreeMap<String, Option<f64>>,
}

/// What was read back.
#[derive(Debug, Default)]
pub struct History {
    /// Oldest first.
    pub records: Vec<Record>,
    /// Lines skipped (truncated, too long, not a record), one message each.
    pub skipped: Vec<String>,
    /// Older records left out past [`HISTORY_RECORDS_MAX`].
    pub left_out: usize,
}

/// Append `records` to `path` (created if missing) in one write. A last
/// line left without its newline (a run cut off while writing) is ended
/// first, so it stays a line of its own, skipped when read.
pub fn append(path: &Path, records: &[Record]) -> Result<()> {
    let mut f = std::fs::OpenOptions::new()
        .read(true)
        .append(true)
        .create(true)
        .open(path)
        .with_context(|| format!("open the history file {}", path.display()))?;
    let mut text = String::new();
    if f.metadata()?.len() > 0 {
        let mut last = [0u8; 1];
        f.seek(SeekFrom::End(-1))?;
        f.read_exact(&mut last)?;
        if last[0] != b'\n' {
            text.push('\n');
        }
    }
    for r in records {
        text.push_str(&serde_json::to_string(r).context("serialize a history record")?);
        text.push('\n');
    }
    f.write_all(text.as_bytes())
        .with_context(|| format!("append to the history file {}", path.display()))
}

/// Read `path` (none yet: an empty history). Lines that are not records
/// are skipped and listed in [`History::skipped`], never an error.
pub fn read(path: &Path) -> Result<History> {
    let f = match std::fs::File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(History::default()),
        Err(e) => {
            return Err(e).with_context(|| format!("open the history file {}", path.display()))
        }
    };
    let mut reader = BufReader::new(f);
    let mut records = VecDeque::new();
    let mut h = History::default();
    let mut line = Vec::new();
    for n in 1.. {
        line.clear();
        let read = (&mut reader)
            .take(HISTORY_LINE_BYTES_MAX as u64 + 1)
            .read_until(b'\n', &mut line)
            .with_context(|| format!("read the history file {}", path.display()))?;
        if read == 0 {
            break;
        }
        let ended = line.last() == Some(&b'\n');
        if !ended && line.len() > HISTORY_LINE_BYTES_MAX {
            let mut rest = Vec::new();
            reader.read_until(b'\n', &mut rest)?;
            h.skipped.push(format!(
                "line {n}: longer than {HISTORY_LINE_BYTES_MAX} bytes, skipped"
            ));
            continue;
        }
        let text = String::from_utf8_lossy(&line);
        if text.trim().is_empty() {
            continue;
        }
        match serde_json::from_str::<Record>(text.trim()) {
            Ok(r) if !r.ratios.values().flatten().all(|v| plottable(*v)) => h.skipped.push(
                format!("line {n}: a ratio beyond the {VALUE_ABS_MAX:e} a chart takes, skipped"),
            ),
            Ok(r) => {
                records.push_back(r);
                if records.len() > HISTORY_RECORDS_MAX {
                    records.pop_front();
                    h.left_out += 1;
                }
            }
            // Cut short: the file ends inside it, or the next report ended
            // it with a newline before appending.
            Err(e) if !ended || e.is_eof() => h.skipped.push(format!(
                "line {n}: truncated (a report cut off while writing it?), skipped"
            )),
            Err(e) => h
                .skipped
                .push(format!("line {n}: not a history record ({e}), skipped")),
        }
    }
    h.records = records.into();
    Ok(h)
}

/// The commit to file runs under: `--commit`, else `git rev-parse --short
/// HEAD` run here, else `unknown`.
pub fn commit_label(given: Option<&str>) -> Result<String> {
    if let Some(c) = given {
        let c = c.trim();
        if c.is_empty() || c.chars().count() > COMMIT_CHARS_MAX || c.chars().any(char::is_control) {
            bail!("--commit must be 1 to {COMMIT_CHARS_MAX} printable characters");
        }
        return Ok(c.to_owned());
    }
    let out = std::process::Command::new("git")
        .args(["rev-parse", "--short", "HEAD"])
        .stderr(std::process::Stdio::null())
        .output();
    Ok(match out {
        Ok(o) if o.status.success() => {
            let c = String::from_utf8_lossy(&o.stdout).trim().to_owned();
            if c.is_empty() || c.len() > COMMIT_CHARS_MAX {
                "unknown".to_owned()
            } else {
                c
            }
        }
        _ => "unknown".to_owned(),
    })
}

/// Now, UTC, as `YYYY-MM-DDTHH:MM:SSZ`.
pub fn now_utc() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    utc(secs)
}

/// `secs` since the Unix epoch as `YYYY-MM-DDTHH:MM:SSZ` (proleptic
/// Gregorian calendar; days to civil date after H. Hinnant).
fn utc(secs: u64) -> String {
    let (days, rem) = (secs / 86_400, secs % 86_400);
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(commit: &str, v: f64) -> Record {
        Record {
            commit: commit.into(),
            time: "2026-01-02T03:04:05Z".into(),
            bench: "chaos".into(),
            ratios: [
                ("acked_lost".to_owned(), Some(v)),
                ("faults".to_owned(), None),
            ]
            .into(),
        }
    }

    #[test]
    fn appended_records_read_back_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("history.jsonl");
        assert!(
            read(&path).unwrap().records.is_empty(),
            "no file: no history"
        );
        append(&path, &[record("a1", 0.0)]).unwrap();
        append(&path, &[record("b2", 1.0), record("b2", 2.0)]).unwrap();
        let h = read(&path).unwrap();
        assert_eq!(
            h.records,
            [record("a1", 0.0), record("b2", 1.0), record("b2", 2.0)]
        );
        assert!(h.skipped.is_empty() && h.left_out == 0);
    }

    #[test]
    fn a_truncated_last_line_is_skipped_and_reported() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("history.jsonl");
        append(&path, &[record("a1", 0.0)]).unwrap();
        let mut text = std::fs::read_to_string(&path).unwrap();
        let whole = serde_json::to_string(&record("cut", 3.0)).unwrap();
        text.push_str(&whole[..whole.len() / 2]);
        std::fs::write(&path, &text).unwrap();
        let h = read(&path).unwrap();
        assert_eq!(h.records, [record("a1", 0.0)]);
        assert_eq!(h.skipped.len(), 1);
        assert!(
            h.skipped[0].starts_with("line 2: truncated"),
            "{:?}",
            h.skipped
        );
        // The next report's records start on a line of their own.
        append(&path, &[record("c3", 0.0)]).unwrap();
        let h = read(&path).unwrap();
        assert_eq!(h.records, [record("a1", 0.0), record("c3", 0.0)]);
        assert_eq!(h.skipped.len(), 1);
        assert!(
            h.skipped[0].starts_with("line 2: truncated"),
            "{:?}",
            h.skipped
        );
        // Any other line that is not a record is skipped too, and said so.
        let mut text = std::fs::read_to_string(&path).unwrap();
        text.push_str("{\"commit\": 7}\n");
        let mut huge = serde_json::to_string(&record("h", 1.0)).unwrap();
        huge = huge.replace("1.0", "1e300");
        text.push_str(&huge);
        text.push('\n');
        std::fs::write(&path, &text).unwrap();
        let h = read(&path).unwrap();
        assert_eq!(h.records.len(), 2);
        assert!(
            h.skipped[1].starts_with("line 4: not a history record"),
            "{:?}",
            h.skipped
        );
        assert!(
            h.skipped[2].starts_with("line 5: a ratio beyond"),
            "{:?}",
            h.skipped
        );
    }

    #[test]
    fn overlong_lines_are_skipped_and_old_records_bounded() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("history.jsonl");
        let mut text = "x".repeat(HISTORY_LINE_BYTES_MAX + 10);
        text.push('\n');
        text.push_str(&serde_json::to_string(&record("a1", 0.0)).unwrap());
        text.push('\n');
        std::fs::write(&path, &text).unwrap();
        let h = read(&path).unwrap();
        assert_eq!(h.records.len(), 1);
        assert!(h.skipped[0].contains("longer than"), "{:?}", h.skipped);

        let many: Vec<Record> = (0..HISTORY_RECORDS_MAX + 3)
            .map(|i| record(&i.to_string(), 0.0))
            .collect();
        append(&path, &many).unwrap();
        let h = read(&path).unwrap();
        assert_eq!(h.records.len(), HISTORY_RECORDS_MAX);
        assert_eq!(h.left_out, 4);
        assert_eq!(
            h.records.last().unwrap().commit,
            (HISTORY_RECORDS_MAX + 2).to_string()
        );
    }

    #[test]
    fn commits_are_checked_and_times_are_utc() {
        assert_eq!(commit_label(Some(" abc123 ")).unwrap(), "abc123");
        assert!(commit_label(Some("")).is_err());
        assert!(commit_label(Some(&"a".repeat(COMMIT_CHARS_MAX + 1))).is_err());
        assert!(commit_label(Some("a\nb")).is_err());
        assert!(!commit_label(None).unwrap().is_empty());
        assert_eq!(utc(0), "1970-01-01T00:00:00Z");
        assert_eq!(utc(951_782_400 + 3_723), "2000-02-29T01:02:03Z");
        assert_eq!(utc(1_767_225_599), "2025-12-31T23:59:59Z");
    }
}
