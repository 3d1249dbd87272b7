//! One imbench JSON file read for the report: its benchmark, its ratios,
//! its timeline and every latency summary in it.

use super::targets::BENCHES;
use crate::report::{Timeline, TimelineSample};
use anyhow::{anyhow, bail, Context, Result};
use serde_json::{Map, Value};
use std::{io::Read as _, path::Path};

/// A larger file is refused (imbench's largest, chaos with details, is
/// tens of KiB).
pub const INPUT_BYTES_MAX: u64 = 32 * 1024 * 1024;
/// A run with more ratio keys is refused: no imbench JSON has that many.
pub const RATIOS_PER_RUN_MAX: usize = 64;
/// Timeline phases drawn per run (a chart each); further phases are left
/// out and the page says so.
pub const TIMELINE_PHASES_MAX: usize = 24;
/// Series (lines) drawn per timeline phase; further ones are left out and
/// the page says so.
pub const TIMELINE_SERIES_MAX: usize = 8;
/// Latency summaries drawn per run; further ones are left out and the page
/// says so.
pub const LATENCIES_PER_RUN_MAX: usize = 40;
/// Latency summaries are looked for this deep in the JSON, no deeper.
const SCAN_DEPTH_MAX: usize = 16;
/// Values a chart can scale to: a ratio, a rate, a time or a latency
/// beyond this is refused (ratios, timeline) or left out (latency
/// summaries, history records).
pub const VALUE_ABS_MAX: f64 = 1e15;

/// Whether a chart can draw `v`.
pub fn plottable(v: f64) -> bool {
    v.is_finite() && v.abs() <= VALUE_ABS_MAX
}

/// Series or latency names with one of these words are the peer's (what
/// ours is measured against); everything else is ours.
const PEER_WORDS: &[&str] = &["redis", "raw_udp", "disk", "peer"];

/// Whether a series or latency label names the peer.
pub fn is_peer(label: &str) -> bool {
    label
        .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .any(|w| PEER_WORDS.contains(&w))
}

/// One imbench run, as read from its JSON file.
#[derive(Debug, Clone)]
pub struct Run {
    /// The file as named on the command line.
    pub file: String,
    pub bench: String,
    /// Ratio keys in the file's order (sorted), `None` for JSON `null`.
    pub ratios: Vec<(String, Option<f64>)>,
    pub timeline: Vec<TimelinePhase>,
    pub latencies: Vec<Latency>,
    /// What was left out or inferred, for the page.
    pub notes: Vec<String>,
}

/// The samples of one timeline phase: a line per series.
#[derive(Debug, Clone, PartialEq)]
pub struct TimelinePhase {
    pub phase: String,
    /// (series, [(t_secs, ops_per_s)]), in the order they first appear.
    pub series: Vec<(String, Vec<(f64, f64)>)>,
}

/// A latency summary found in the JSON (an object with `p50_us`, `p99_us`
/// and `max_us`, as `report::LatencySummary` and `e2e_report::Latency`
/// write them; `p999_us` where there is one).
#[derive(Debug, Clone, PartialEq)]
pub struct Latency {
    pub label: String,
    pub peer: bool,
    pub p50_us: f64,
    pub p99_us: f64,
    pub p999_us: Option<f64>,
    pub max_us: f64,
    pub samples: Option<u64>,
}

impl Run {
    /// Read and check `path`. Every error names the file.
    pub fn load(path: &Path) -> Result<Run> {
        let file = path.display().to_string();
        let text = read_bounded(path).with_context(|| format!("{file}: cannot read it"))?;
        let value: Value = serde_json::from_str(&text)
            .map_err(|e| anyhow!("{file}: not valid JSON ({e}); give the report the file an imbench `--json FILE` wrote"))?;
        Run::from_value(&file, &value)
    }

    /// Check the JSON of a run named `file`.
    pub fn from_value(file: &str, value: &Value) -> Result<Run> {
        let Some(top) = value.as_object() else {
            bail!(
                "{file}: not an imbench JSON output (expected a JSON object, found {})",
                kind(value)
            );
        };
        let (bench, from_name) = bench_of(file, top)?;
        let mut notes = Vec::new();
        if from_name {
            notes.push(format!(
                "{file}: no \"bench\" field (written before imbench named its benchmark); taken as {bench} from the file name"
            ));
        }
        let ratios = ratios_of(file, top)?;
        let timeline = timeline_of(file, top, &mut notes)?;
        let mut latencies = Vec::new();
        scan_latencies(value, &mut Vec::new(), 0, &mut latencies);
        if latencies.len() > LATENCIES_PER_RUN_MAX {
            notes.push(format!(
                "{file}: {} latency summaries; the first {LATENCIES_PER_RUN_MAX} are drawn",
                latencies.len()
            ));
            latencies.truncate(LATENCIES_PER_RUN_MAX);
        }
        Ok(Run {
            file: file.to_owned(),
            bench,
            ratios,
            timeline,
            latencies,
            notes,
        })
    }
}

fn read_bounded(path: &Path) -> Result<String> {
    let f = std::fs::File::open(path)?;
    let mut text = String::new();
    f.take(INPUT_BYTES_MAX + 1).read_to_string(&mut text)?;
    if text.len() as u64 > INPUT_BYTES_MAX {
        bail!("larger than {INPUT_BYTES_MAX} bytes, more than any imbench run writes");
    }
    Ok(text)
}

fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// The run's benchmark: its `"bench"` field, else the first word of the
/// file name that names one (`e2e-edge.json` -> e2e). `true` if taken from
/// the name.
fn bench_of(file: &str, top: &Map<String, Value>) -> Result<(String, bool)> {
    let known = || BENCHES.join(", ");
    match top.get("bench") {
        Some(Value::String(b)) if BENCHES.contains(&b.as_str()) => Ok((b.clone(), false)),
        Some(Value::String(b)) => bail!(
            "{file}: unknown benchmark {b:?} in its \"bench\" field (known: {})",
            known()
        ),
        Some(other) => bail!(
            "{file}: its \"bench\" field is {}, expected a benchmark name",
            kind(other)
        ),
        None => {
            let name = Path::new(file)
                .file_stem()
                .map(|s| s.to_string_lossy().to_lowercase())
                .unwrap_or_default();
            name.split(|c: char| !c.is_ascii_alphanumeric())
                .find(|w| BENCHES.contains(w))
                .map(|w| (w.to_owned(), true))
                .ok_or_else(|| {
                    anyhow!(
                        "{file}: no \"bench\" field and no benchmark in the file name: name it after its benchmark ({}) or write it with a newer imbench",
                        known()
                    )
                })
        }
    }
}

fn ratios_of(file: &str, top: &Map<String, Value>) -> Result<Vec<(String, Option<f64>)>> {
    let ratios = match top.get("ratios") {
        Some(Value::Object(r)) => r,
        Some(other) => bail!(
            "{file}: its \"ratios\" is {}, expected an object of numbers",
            kind(other)
        ),
        None => bail!("{file}: no \"ratios\" object: not the JSON of an imbench run"),
    };
    if ratios.len() > RATIOS_PER_RUN_MAX {
        bail!(
            "{file}: {} ratios, more than the {RATIOS_PER_RUN_MAX} a report takes per run",
            ratios.len()
        );
    }
    ratios
        .iter()
        .map(|(k, v)| match v {
            Value::Null => Ok((k.clone(), None)),
            Value::Number(n) => match n.as_f64() {
                Some(v) if plottable(v) => Ok((k.clone(), Some(v))),
                _ => bail!("{file}: ratios.{k} is {n}, beyond the {VALUE_ABS_MAX:e} a chart takes"),
            },
            other => bail!(
                "{file}: ratios.{k} is {}, expected a number or null",
                kind(other)
            ),
        })
        .collect()
}

fn timeline_of(
    file: &str,
    top: &Map<String, Value>,
    notes: &mut Vec<String>,
) -> Result<Vec<TimelinePhase>> {
    let samples = match top.get("timeline") {
        None | Some(Value::Null) => return Ok(Vec::new()),
        Some(Value::Array(a)) => a,
        Some(other) => bail!(
            "{file}: its \"timeline\" is {}, expected an array",
            kind(other)
        ),
    };
    if samples.len() > Timeline::SAMPLES_MAX {
        bail!(
            "{file}: {} timeline samples, more than the {} imbench writes",
            samples.len(),
            Timeline::SAMPLES_MAX
        );
    }
    let mut phases: Vec<TimelinePhase> = Vec::new();
    let (mut phases_left_out, mut series_left_out) = (0usize, 0usize);
    for (i, v) in samples.iter().enumerate() {
        let s: TimelineSample = serde_json::from_value(v.clone())
            .map_err(|e| anyhow!("{file}: timeline[{i}] is not a sample ({e})"))?;
        if !(plottable(s.t_secs) && plottable(s.ops_per_s)) {
            bail!("{file}: timeline[{i}] has a value beyond the {VALUE_ABS_MAX:e} a chart takes");
        }
        let at = match phases.iter().position(|p| p.phase == s.phase) {
            Some(at) => at,
            None if phases.len() < TIMELINE_PHASES_MAX => {
                phases.push(TimelinePhase {
                    phase: s.phase.clone(),
                    series: Vec::new(),
                });
                phases.len() - 1
            }
            None => {
                phases_left_out += 1;
                continue;
            }
        };
        let series = &mut phases[at].series;
        match series.iter().position(|(name, _)| *name == s.series) {
            Some(i) => series[i].1.push((s.t_secs, s.ops_per_s)),
            None if series.len() < TIMELINE_SERIES_MAX => {
                series.push((s.series, vec![(s.t_secs, s.ops_per_s)]));
            }
            None => series_left_out += 1,
        }
    }
    if phases_left_out > 0 {
        notes.push(format!(
            "{file}: timeline phases past the first {TIMELINE_PHASES_MAX} left out ({phases_left_out} samples)"
        ));
    }
    if series_left_out > 0 {
        notes.push(format!(
            "{file}: timeline series past {TIMELINE_SERIES_MAX} per phase left out ({series_left_out} samples)"
        ));
    }
    Ok(phases)
}

/// Fields of an array element that name it better than its index (a
/// `PhaseResult`'s phase, pipeline, target and setting; a login's method).
const NAMING_FIELDS: &[&str] = &[
    "phase", "pipeline", "target", "setting", "method", "kind", "name",
];

/// What the naming fields of `v` say, if it has any.
fn named(v: &Value) -> Option<String> {
    let o = v.as_object()?;
    let words: Vec<String> = NAMING_FIELDS
        .iter()
        .filter_map(|f| match (f, o.get(*f)) {
            (&"pipeline", Some(Value::Number(n))) => Some(format!("p{n}")),
            (_, Some(Value::String(s))) => Some(s.clone()),
            _ => None,
        })
        .collect();
    (!words.is_empty()).then(|| words.join(" "))
}

fn scan_latencies(v: &Value, path: &mut Vec<String>, depth: usize, out: &mut Vec<Latency>) {
    if depth > SCAN_DEPTH_MAX {
        return;
    }
    match v {
        Value::Object(o) => {
            if let Some(l) = latency_of(o, path) {
                out.push(l);
                return;
            }
            for (k, child) in o {
                // A named record stands for its key (`phase`), and for
                // its parent where it repeats it (`disk_ceiling`).
                let (word, saved) = match named(child) {
                    Some(name) => {
                        let repeats = path.last().is_some_and(|p| name.starts_with(p.as_str()));
                        (name, repeats.then(|| path.pop()).flatten())
                    }
                    None => (k.clone(), None),
                };
                path.push(word);
                scan_latencies(child, path, depth + 1, out);
                path.pop();
                path.extend(saved);
            }
        }
        Value::Array(a) => {
            for (i, child) in a.iter().enumerate() {
                // `append: [...]` -> `append p16 redis aof_always`: a named
                // element stands for the array's key.
                let (word, saved) = match named(child) {
                    Some(name) => (name, path.pop()),
                    None => (format!("[{i}]"), None),
                };
                path.push(word);
                scan_latencies(child, path, depth + 1, out);
                path.pop();
                path.extend(saved);
            }
        }
        _ => {}
    }
}

fn latency_of(o: &Map<String, Value>, path: &[String]) -> Option<Latency> {
    let num = |k: &str| o.get(k).and_then(Value::as_f64);
    let (p50_us, p99_us, max_us) = (num("p50_us")?, num("p99_us")?, num("max_us")?);
    let samples = o.get("samples").and_then(Value::as_u64);
    // An empty histogram (a phase that did not run) has nothing to draw.
    if samples == Some(0) || max_us <= 0.0 {
        return None;
    }
    let p999_us = num("p999_us").filter(|v| plottable(*v));
    if ![p50_us, p99_us, max_us].into_iter().all(plottable) {
        return None;
    }
    let mut words: Vec<&str> = path.iter().map(String::as_str).collect();
    if words.len() > 1 && words.last() == Some(&"latency") {
        words.pop();
    }
    let label = if words.is_empty() {
        "latency".to_owned()
    } else {
        words.join(" ")
    };
    Some(Latency {
        peer: is_peer(&label),
        label,
        p50_us,
        p99_us,
        p999_us,
        max_us,
        samples,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn an_input_without_ratios_is_refused_by_name() {
        let e = Run::from_value("x/storage.json", &json!({"bench": "storage", "append": []}))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("x/storage.json") && e.contains("no \"ratios\""),
            "{e}"
        );
        let e = Run::from_value("a.json", &json!([1, 2]))
            .unwrap_err()
            .to_string();
        assert!(e.contains("a.json") && e.contains("JSON object"), "{e}");
        let e = Run::from_value("e2e.json", &json!({"ratios": {"x": "high"}}))
            .unwrap_err()
            .to_string();
        assert!(e.contains("ratios.x is a string"), "{e}");
        let e = Run::from_value("e2e.json", &json!({"ratios": {"x": 1e300}}))
            .unwrap_err()
            .to_string();
        assert!(e.contains("e2e.json: ratios.x is 1e+300, beyond"), "{e}");
    }

    #[test]
    fn bad_json_and_unknown_benchmarks_are_refused_by_name() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("storage.json");
        std::fs::write(&p, "{\"ratios\": {").unwrap();
        let e = Run::load(&p).unwrap_err().to_string();
        assert!(
            e.contains("storage.json") && e.contains("not valid JSON"),
            "{e}"
        );
        let e = Run::load(&dir.path().join("missing.json")).unwrap_err();
        assert!(format!("{e:#}").contains("missing.json"), "{e:#}");
        let e = Run::from_value("r.json", &json!({"bench": "nosuch", "ratios": {}}))
            .unwrap_err()
            .to_string();
        assert!(e.contains("unknown benchmark \"nosuch\""), "{e}");
        let e = Run::from_value("run1.json", &json!({"ratios": {}}))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("run1.json") && e.contains("no \"bench\" field"),
            "{e}"
        );
    }

    #[test]
    fn the_benchmark_comes_from_the_field_else_the_file_name() {
        let r =
            Run::from_value("t/e2e-edge.json", &json!({"ratios": {"a": 1, "b": null}})).unwrap();
        assert_eq!(r.bench, "e2e");
        assert_eq!(r.ratios, vec![("a".into(), Some(1.0)), ("b".into(), None)]);
        assert_eq!(r.notes.len(), 1);
        let r = Run::from_value(
            "t/chaos-quick.json",
            &json!({"bench": "group", "ratios": {}}),
        )
        .unwrap();
        assert_eq!(r.bench, "group");
        assert!(r.notes.is_empty());
    }

    #[test]
    fn latency_summaries_are_found_and_named() {
        let lat =
            |p50: u64| json!({"p50_us": p50, "p99_us": p50 * 2, "max_us": p50 * 3, "samples": 10});
        let v = json!({
            "bench": "storage",
            "ratios": {},
            "append": [
                {"phase": "append", "target": "redis", "setting": "aof_always", "pipeline": 1, "latency": lat(5)},
                {"phase": "append", "target": "msgstore", "setting": "always", "pipeline": 1, "latency": lat(7)},
                {"phase": "append", "target": "msgstore", "setting": "never", "pipeline": 1,
                 "latency": {"p50_us": 0, "p99_us": 0, "max_us": 0, "samples": 0}},
            ],
            "chat": {"answer": {"p50_us": 1, "p99_us": 2, "p999_us": 3, "max_us": 4, "samples": 5}},
            "disk_ceiling": {"phase": {"phase": "disk_ceiling", "target": "disk", "pipeline": 28, "latency": lat(3)}},
            "drain": [{"phase": "prefill", "target": "redis", "pipeline": 16, "latency": lat(4)}],
        });
        let r = Run::from_value("s.json", &v).unwrap();
        let labels: Vec<_> = r
            .latencies
            .iter()
            .map(|l| (l.label.as_str(), l.peer))
            .collect();
        assert_eq!(
            labels,
            [
                ("append p1 redis aof_always", true),
                ("append p1 msgstore always", false),
                ("chat answer", false),
                ("disk_ceiling p28 disk", true),
                ("prefill p16 redis", true),
            ]
        );
        assert_eq!(r.latencies[2].p999_us, Some(3.0));
        assert_eq!(r.latencies[0].p999_us, None);
    }

    #[test]
    fn a_timeline_groups_phases_and_series() {
        let s = |phase: &str, series: &str, t: f64| json!({"phase": phase, "series": series, "t_secs": t, "ops_per_s": 100.0});
        let v = json!({"bench": "storage", "ratios": {}, "timeline": [
            s("append p1", "redis off", 0.25), s("append p1", "msgstore never", 0.25),
            s("append p1", "redis off", 0.5), s("drain p4", "redis aof_always", 0.25),
        ]});
        let r = Run::from_value("s.json", &v).unwrap();
        assert_eq!(r.timeline.len(), 2);
        assert_eq!(r.timeline[0].series[0].1, vec![(0.25, 100.0), (0.5, 100.0)]);
        assert_eq!(r.timeline[0].series[1].0, "msgstore never");
        let bad = json!({"bench": "storage", "ratios": {}, "timeline": [{"phase": "x"}]});
        let e = Run::from_value("s.json", &bad).unwrap_err().to_string();
        assert!(e.contains("s.json: timeline[0]"), "{e}");
    }

    #[test]
    fn peers_are_told_by_name() {
        assert!(is_peer("append p1 redis aof_always"));
        assert!(is_peer("raw_udp"));
        assert!(!is_peer("append p1 msgstore always"));
        assert!(!is_peer("redistribute"));
    }
}
