//! A daemon's metrics in one table: each one's name, type, HELP text and
//! known label values, so that a scrape shows every metric, described and
//! at zero, from the start (`promtool check metrics` passes on it, and an
//! alert on a counter's rate works before its first event).
//!
//! Each daemon crate lists its metrics in its `metrics` module and calls
//! [`register`] on them when it starts, before anything it does can count.
//! Registering is idempotent: a series already there keeps its value (an
//! embedded cluster starts several shards in one process), so it is done
//! with `increment(0)`, never `absolute(0)` or `set(0.0)`.
//!
//! [`source_names`] and [`quoted_arms`] let a crate's unit test check its
//! table against its source: every metric the code emits is in the table.

use metrics::Unit;
use std::path::Path;

/// A metric's type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Counter,
    Gauge,
    /// Rendered as a summary; no series until its first sample.
    Histogram,
}

/// A metric's labels.
#[derive(Debug, Clone, Copy)]
pub enum Labels {
    None,
    /// One label with a known set of values: each is registered at zero.
    Known(&'static str, &'static [&'static str]),
    /// One label whose values are not known in advance (a replica id):
    /// described only; a series appears with its first value.
    Open(&'static str),
}

/// One metric of a daemon.
#[derive(Debug, Clone, Copy)]
pub struct Metric {
    pub name: &'static str,
    pub kind: Kind,
    pub unit: Option<Unit>,
    pub help: &'static str,
    pub labels: Labels,
}

impl Metric {
    pub const fn counter(name: &'static str, help: &'static str) -> Metric {
        Metric::new(name, Kind::Counter, help)
    }

    pub const fn gauge(name: &'static str, help: &'static str) -> Metric {
        Metric::new(name, Kind::Gauge, help)
    }

    pub const fn histogram(name: &'static str, help: &'static str) -> Metric {
        Metric::new(name, Kind::Histogram, help)
    }

    const fn new(name: &'static str, kind: Kind, help: &'static str) -> Metric {
        Metric {
            name,
            kind,
            unit: None,
            help,
            labels: Labels::None,
        }
    }

    /// With label `key`, whose values are `values`.
    pub const fn by(mut self, key: &'static str, values: &'static [&'static str]) -> Metric {
        self.labels = Labels::Known(key, values);
        self
    }

    /// With label `key`, whose values are open-ended.
    pub const fn by_open(mut self, key: &'static str) -> Metric {
        self.labels = Labels::Open(key);
        self
    }

    pub const fn unit(mut self, unit: Unit) -> Metric {
        self.unit = Some(unit);
        self
    }

    /// Give the metric its HELP text (and unit) in the installed recorder.
    pub fn describe(&self) {
        let (name, help) = (self.name, self.help);
        match (self.kind, self.unit) {
            (Kind::Counter, Some(u)) => metrics::describe_counter!(name, u, help),
            (Kind::Counter, None) => metrics::describe_counter!(name, help),
            (Kind::Gauge, Some(u)) => metrics::describe_gauge!(name, u, help),
            (Kind::Gauge, None) => metrics::describe_gauge!(name, help),
            (Kind::Histogram, Some(u)) => metrics::describe_histogram!(name, u, help),
            (Kind::Histogram, None) => metrics::describe_histogram!(name, help),
        }
    }

    /// Make every known series of the metric exist (at zero, if it did
    /// not already). Histograms and open-ended labels are left alone.
    pub fn touch(&self) {
        let name = self.name;
        match (self.kind, self.labels) {
            (Kind::Histogram, _) | (_, Labels::Open(_)) => {}
            (Kind::Counter, Labels::None) => metrics::counter!(name).increment(0),
            (Kind::Gauge, Labels::None) => metrics::gauge!(name).increment(0.0),
            (Kind::Counter, Labels::Known(key, values)) => {
                for &value in values {
                    metrics::counter!(name, key => value).increment(0);
                }
            }
            (Kind::Gauge, Labels::Known(key, values)) => {
                for &value in values {
                    metrics::gauge!(name, key => value).increment(0.0);
                }
            }
        }
    }
}

/// Describe every metric of `table` and make its known series exist.
/// Call it after the metrics recorder is installed (`install_metrics`)
/// and before the daemon's work starts.
pub fn register(table: &[Metric]) {
    for m in table {
        m.describe();
        m.touch();
    }
}

/// Describe every metric of `table` only (metrics this daemon does not
/// emit in its present mode, but a process may).
pub fn describe(table: &[Metric]) {
    for m in table {
        m.describe();
    }
}

/// Check a crate's `table` against the `.rs` files under its `src` (a unit
/// test of every daemon crate): every metric the code emits is in the table
/// with its type, every metric of the table is emitted somewhere but in
/// `metrics.rs`, has HELP text and is listed once, and counters end in
/// `_total`. Panics naming the first mismatch.
pub fn assert_table_matches_sources(table: &[Metric], src: &Path, owner: &str) {
    for (kind, name) in source_names(src) {
        let entry = table.iter().find(|m| m.name == name);
        let entry = entry.unwrap_or_else(|| panic!("{name} is not in {owner}"));
        assert_eq!(entry.kind, kind, "{name}: its type");
    }
    for m in table {
        assert!(
            quoted_in_sources(src, m.name, "metrics.rs"),
            "{} is in the table but the code never emits it",
            m.name
        );
    }
    assert_table_is_well_formed(table, owner);
}

/// Every metric of `table` has HELP text and is listed once, and counters
/// end in `_total`. Panics naming the first mismatch.
pub fn assert_table_is_well_formed(table: &[Metric], owner: &str) {
    for m in table {
        assert!(!m.help.is_empty(), "{}: no HELP text", m.name);
        if m.kind == Kind::Counter {
            assert!(m.name.ends_with("_total"), "{}", m.name);
        }
    }
    let mut names: Vec<_> = table.iter().map(|m| m.name).collect();
    names.sort_unstable();
    let before = names.len();
    names.dedup();
    assert_eq!(names.len(), before, "a metric is listed twice in {owner}");
}

/// Check that `listed` holds exactly the labels the arms of `fn fn_name`
/// in `file` give (the `op` label's values and the function naming them).
pub fn assert_arms_are(file: &Path, fn_name: &str, listed: &[&str]) {
    let source =
        std::fs::read_to_string(file).unwrap_or_else(|e| panic!("read {}: {e}", file.display()));
    let mut arms = quoted_arms(&source, fn_name);
    let mut listed: Vec<String> = listed.iter().map(|l| l.to_string()).collect();
    arms.sort_unstable();
    listed.sort_unstable();
    assert_eq!(
        arms,
        listed,
        "the labels of {fn_name} in {}",
        file.display()
    );
}

/// Every metric named by a string literal in a `counter!`, `gauge!` or
/// `histogram!` call in the `.rs` files under `dir`, with its kind (for a
/// unit test comparing a crate's table with its code).
pub fn source_names(dir: &Path) -> Vec<(Kind, String)> {
    let mut found = Vec::new();
    for text in rust_sources(dir) {
        for (kind, macro_name) in [
            (Kind::Counter, "counter!("),
            (Kind::Gauge, "gauge!("),
            (Kind::Histogram, "histogram!("),
        ] {
            let mut rest = text.as_str();
            while let Some(at) = rest.find(macro_name) {
                rest = &rest[at + macro_name.len()..];
                // `describe_counter!(` and friends name no series.
                let before = &text[..text.len() - rest.len() - macro_name.len()];
                if before.ends_with('_') {
                    continue;
                }
                let args = rest.trim_start();
                if let Some(quoted) = args.strip_prefix('"') {
                    if let Some(end) = quoted.find('"') {
                        found.push((kind, quoted[..end].to_string()));
                    }
                }
            }
        }
    }
    found.sort_by(|a, b| a.1.cmp(&b.1));
    found.dedup_by(|a, b| a.1 == b.1 && a.0 == b.0);
    found
}

/// Whether `"name"` appears as a string literal in the `.rs` files under
/// `dir` other than those named `except`.
pub fn quoted_in_sources(dir: &Path, name: &str, except: &str) -> bool {
    let quoted = format!("\"{name}\"");
    rust_files(dir)
        .into_iter()
        .filter(|p| p.file_name().and_then(|f| f.to_str()) != Some(except))
        .any(|p| std::fs::read_to_string(p).is_ok_and(|t| t.contains(&quoted)))
}

/// The string literals a function's match arms give (`=> "name"`), in the
/// body of `fn <name>` in `source` (for a unit test comparing a label's
/// known values with the function that makes them).
pub fn quoted_arms(source: &str, fn_name: &str) -> Vec<String> {
    let Some(start) = source.find(&format!("fn {fn_name}(")) else {
        return Vec::new();
    };
    let line_start = source[..start].rfind('\n').map_or(0, |i| i + 1);
    let indent = &source[line_start..start];
    let indent = &indent[..indent.len() - indent.trim_start().len()];
    let body = &source[start..];
    let end = body.find(&format!("\n{indent}}}\n")).unwrap_or(body.len());
    let mut out = Vec::new();
    let mut rest = &body[..end];
    while let Some(at) = rest.find("=> \"") {
        rest = &rest[at + 4..];
        if let Some(close) = rest.find('"') {
            out.push(rest[..close].to_string());
        }
    }
    out
}

fn rust_files(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut files = Vec::new();
    let mut dirs = vec![dir.to_path_buf()];
    while let Some(d) = dirs.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            if path.is_dir() {
                dirs.push(path);
            } else if path.extension().is_some_and(|e| e == "rs") {
                files.push(path);
            }
        }
    }
    files
}

fn rust_sources(dir: &Path) -> Vec<String> {
    rust_files(dir)
        .into_iter()
        .filter_map(|p| std::fs::read_to_string(p).ok())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn source_names_finds_literal_names_only() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("a.rs"),
            r#"
            metrics::counter!("a_total").increment(1);
            metrics::counter!(
                "b_total", "why" => why
            ).increment(1);
            metrics::gauge!("c").set(1.0);
            metrics::histogram!("d_seconds").record(1.0);
            metrics::describe_counter!("e_total", "not a series");
            metrics::counter!(name).increment(1);
            "#,
        )
        .unwrap();
        let names = source_names(dir.path());
        let names: Vec<_> = names.iter().map(|(k, n)| (*k, n.as_str())).collect();
        assert_eq!(
            names,
            [
                (Kind::Counter, "a_total"),
                (Kind::Counter, "b_total"),
                (Kind::Gauge, "c"),
                (Kind::Histogram, "d_seconds"),
            ]
        );
    }

    #[test]
    fn quoted_arms_reads_one_function() {
        let source = "fn op_name(b: &B) -> &str {\n    match b {\n        B::X => \"x\",\n        B::Y { .. } => \"y\",\n    }\n}\n\nfn other() {\n    a => \"z\"\n}\n";
        assert_eq!(quoted_arms(source, "op_name"), ["x", "y"]);
        let method = format!(
            "impl B {{\n    {}\n    fn later() {{ a => \"w\" }}\n}}\n",
            source.replace('\n', "\n    ").trim_end()
        );
        assert_eq!(quoted_arms(&method, "op_name"), ["x", "y"]);
    }
}
