//! Latency histograms, result records, the printed table and the JSON file.

use anyhow::{Context, Result};
use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};
use std::{fmt::Write as _, path::Path, time::Duration};

/// Latencies in microseconds, 1 us .. 60 s, 3 significant digits.
#[derive(Debug, Clone)]
pub struct LatencyHist(Histogram<u64>);

const LATENCY_US_MAX: u64 = 60_000_000;

impl LatencyHist {
    pub fn new() -> Self {
        Self(Histogram::new_with_bounds(1, LATENCY_US_MAX, 3).expect("valid histogram bounds"))
    }

    pub fn record(&mut self, d: Duration) {
        let us = u64::try_from(d.as_micros()).unwrap_or(u64::MAX);
        self.0.saturating_record(us.max(1));
    }

    pub fn merge(&mut self, other: &LatencyHist) -> Result<()> {
        self.0
            .add(&other.0)
            .map_err(|e| anyhow::anyhow!("merge histograms: {e:?}"))
    }

    pub fn summary(&self) -> LatencySummary {
        if self.0.is_empty() {
            return LatencySummary::default();
        }
        LatencySummary {
            p50_us: self.0.value_at_quantile(0.50),
            p99_us: self.0.value_at_quantile(0.99),
            max_us: self.0.max(),
            samples: self.0.len(),
        }
    }
}

impl Default for LatencyHist {
    fn default() -> Self {
        Self::new()
    }
}

#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct LatencySummary {
    pub p50_us: u64,
    pub p99_us: u64,
    pub max_us: u64,
    pub samples: u64,
}

/// One measured phase against one target.
#[derive(Debug, Clone, Serialize)]
pub struct PhaseResult {
    /// `append`, `drain`, `prefill`, `engine_append`, `disk_ceiling`.
    pub phase: String,
    /// `redis`, `msgstore`, `engine`, `disk`.
    pub target: String,
    /// Durability setting, e.g. `aof_always`, `always`, `interval:1000`.
    pub setting: String,
    pub connections: usize,
    pub pipeline: usize,
    /// Messages (or records) completed, including after the deadline.
    pub ops: u64,
    /// Messages completed within the timed window (the rate's numerator).
    pub ops_in_window: u64,
    /// Requests still unanswered when the post-deadline grace ran out.
    pub abandoned: u64,
    pub errors: u64,
    pub first_error: Option<String>,
    pub elapsed_secs: f64,
    pub ops_per_sec: f64,
    pub latency: LatencySummary,
    /// CPU time the server process (all its threads) used per completed
    /// operation during the phase, in microseconds; what bounds a rate on a
    /// machine whose cores the load generator shares.
    pub server_cpu_us_per_op: Option<f64>,
    /// CPU time this benchmark process (the load generator, all its
    /// threads) used per completed operation during the phase, in
    /// microseconds: with the server's figure, what the phase asked of the
    /// machine's cores.
    pub client_cpu_us_per_op: Option<f64>,
    /// Throughput per interval of the phase, as `load::run_load` sampled
    /// it (empty for phases not run through it). Not written as is: a
    /// benchmark that wants it in its JSON gathers it in a [`Timeline`].
    #[serde(skip)]
    pub rate_samples: Vec<RateSample>,
}

/// Completions per second over one sampling interval of a load run.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct RateSample {
    /// Seconds from the start of the run to the end of the interval.
    pub t_secs: f64,
    pub ops_per_s: f64,
}

/// One interval of one phase of one target, as the JSON's top-level
/// `timeline` array holds it (`imbench report` draws a line per `series`
/// in a chart per `phase`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TimelineSample {
    /// e.g. `append p16`, `drain`.
    pub phase: String,
    /// e.g. `msgstore always`, `redis aof_always`.
    pub series: String,
    pub t_secs: f64,
    pub ops_per_s: f64,
}

/// Throughput over time of a benchmark's phases: the optional top-level
/// `timeline` array of its JSON. At most [`Timeline::SAMPLES_MAX`]
/// samples; further ones are left out and counted.
#[derive(Debug, Clone, Default, Serialize)]
#[serde(transparent)]
pub struct Timeline(Vec<TimelineSample>);

impl Timeline {
    /// Bounds the JSON: 16 phases of 30 s at 4 samples a second take 2,000.
    pub const SAMPLES_MAX: usize = 20_000;

    /// One sample series per phase row, named `<phase> p<pipeline>` and
    /// `<target> <setting>`. Returns how many samples were left out
    /// because the timeline was full.
    pub fn of_phases<'a>(rows: impl IntoIterator<Item = &'a PhaseResult>) -> (Self, usize) {
        let mut t = Timeline::default();
        let mut left_out = 0;
        for r in rows {
            let phase = format!("{} p{}", r.phase, r.pipeline);
            let series = format!("{} {}", r.target, r.setting);
            left_out += t.add(&phase, &series, &r.rate_samples);
        }
        (t, left_out)
    }

    /// Append `samples` as `phase` / `series`; returns how many did not fit.
    pub fn add(&mut self, phase: &str, series: &str, samples: &[RateSample]) -> usize {
        let room = Self::SAMPLES_MAX.saturating_sub(self.0.len());
        let taken = samples.len().min(room);
        self.0
            .extend(samples[..taken].iter().map(|s| TimelineSample {
                phase: phase.to_owned(),
                series: series.to_owned(),
                t_secs: s.t_secs,
                ops_per_s: s.ops_per_s,
            }));
        samples.len() - taken
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    #[cfg(test)]
    pub fn samples(&self) -> &[TimelineSample] {
        &self.0
    }
}

/// A server process after its phases: footprint on disk and in memory.
#[derive(Debug, Clone, Serialize)]
pub struct ServerResult {
    pub target: String,
    pub setting: String,
    /// Peak resident set (VmHWM) just before it was stopped.
    pub peak_rss_bytes: Option<u64>,
    /// Anonymous resident memory (RssAnon) at rest after the load: heap,
    /// not the file pages it maps (those are the page cache's).
    pub anon_rss_bytes: Option<u64>,
    /// Allocated bytes of its data directory (like `du`).
    pub disk_bytes: u64,
    /// Messages it holds (our shard: `stats().live_messages`; Redis: the
    /// RPUSHes it acknowledged).
    pub messages_stored: u64,
    pub disk_bytes_per_message: Option<f64>,
    /// Our shard only: the shard's own counters after the run.
    pub shard_stats: Option<proto::shard::ShardStats>,
    /// Our shard only: seconds from spawning to serving (including creating
    /// every bucket file unless `--fresh-buckets`).
    pub start_secs: Option<f64>,
    /// The always pair: seconds from spawning it again on its data after a
    /// SIGTERM stop to serving (Redis: answering PING, its AOF loaded).
    pub restart_secs: Option<f64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct EngineResult {
    pub phase: PhaseResult,
    pub appends: u64,
    pub batches: u64,
    pub syncs: u64,
    /// appends / batches: the mean group-commit size.
    pub mean_batch_appends: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct DiskResult {
    pub phase: PhaseResult,
    pub record_bytes: usize,
    pub records_per_sync: usize,
}

/// Our figure divided by the peer's; `null` when either side is missing.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Ratios {
    pub append_always_vs_redis_always_p1: Option<f64>,
    pub append_always_vs_redis_always_p16: Option<f64>,
    pub append_always_vs_redis_off_p1: Option<f64>,
    pub drain_vs_redis: Option<f64>,
    pub engine_vs_disk_ceiling: Option<f64>,
    /// Appends/s in the gateway's shape (a few connections, batches to
    /// one mailbox in flight), both syncing every write.
    pub append_gateway_shape_vs_redis_always: Option<f64>,
    /// Disk bytes per stored message at rest (the always pair).
    pub disk_bytes_per_msg_vs_redis: Option<f64>,
    /// Anonymous resident memory at rest after the same data.
    pub anon_rss_vs_redis: Option<f64>,
    /// Restart to serving after a clean stop vs Redis loading its AOF.
    pub restart_secs_vs_redis_load: Option<f64>,
    /// With `--replicas 3`: a 3-replica group vs a Redis primary with one
    /// replica, 16 appends per connection then (Redis) `WAIT 1 0`.
    pub replicated_vs_redis_wait_p16: Option<f64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct StorageReport {
    pub ratios: Ratios,
    pub config: serde_json::Value,
    pub append: Vec<PhaseResult>,
    pub drain: Vec<PhaseResult>,
    pub engine: Option<EngineResult>,
    pub disk_ceiling: Option<DiskResult>,
    pub servers: Vec<ServerResult>,
    /// Our shard's log not yet checkpointed when each append phase ended:
    /// work the phase's rate did not pay for (at most the daemon's
    /// `checkpoint_stall_wal_bytes` plus a running checkpoint's share).
    pub backlogs: Vec<Backlog>,
    /// Failures that left a figure out (e.g. the daemon did not start).
    pub problems: Vec<String>,
    /// Appends/s (drained messages/s) per interval of every TCP phase.
    #[serde(skip_serializing_if = "Timeline::is_empty")]
    pub timeline: Timeline,
}

impl StorageReport {
    /// An empty report of a run configured as `config`.
    pub fn new(config: serde_json::Value) -> Self {
        Self {
            ratios: Ratios::default(),
            config,
            append: Vec::new(),
            drain: Vec::new(),
            engine: None,
            disk_ceiling: None,
            servers: Vec::new(),
            backlogs: Vec::new(),
            problems: Vec::new(),
            timeline: Timeline::default(),
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct Backlog {
    pub setting: String,
    pub pipeline: usize,
    /// Log bytes written since the last finished checkpoint.
    pub log_bytes: u64,
    /// Appends completed in the phase (for scale).
    pub phase_ops: u64,
}

pub fn ratio(ours: Option<f64>, peer: Option<f64>) -> Option<f64> {
    match (ours, peer) {
        (Some(a), Some(b)) if b > 0.0 => Some(a / b),
        _ => None,
    }
}

pub fn fmt_rate(v: f64) -> String {
    if v >= 1e6 {
        format!("{:.2}M", v / 1e6)
    } else if v >= 1e3 {
        format!("{:.1}k", v / 1e3)
    } else {
        format!("{v:.0}")
    }
}

fn fmt_bytes(v: u64) -> String {
    const MIB: f64 = 1024.0 * 1024.0;
    format!("{:.1} MiB", v as f64 / MIB)
}

/// The phases as a table: a header line, then a row each. The setting
/// column is as wide as the longest setting.
pub(crate) fn phase_table(out: &mut String, rows: &[&PhaseResult]) {
    let w = rows
        .iter()
        .map(|r| r.setting.len())
        .max()
        .unwrap_or(0)
        .max(14);
    let _ = writeln!(
        out,
        "{:<14} {:<9} {:<w$} {:>5} {:>4} {:>10} {:>9} {:>9} {:>7} {:>11} {:>11}",
        "phase",
        "target",
        "setting",
        "conns",
        "pipe",
        "ops/s",
        "p50 us",
        "p99 us",
        "errors",
        "srv cpu/op",
        "cli cpu/op"
    );
    for r in rows {
        let _ = writeln!(
            out,
            "{:<14} {:<9} {:<w$} {:>5} {:>4} {:>10} {:>9} {:>9} {:>7} {:>11} {:>11}{}",
            r.phase,
            r.target,
            r.setting,
            r.connections,
            r.pipeline,
            fmt_rate(r.ops_per_sec),
            r.latency.p50_us,
            r.latency.p99_us,
            r.errors,
            cpu_cell(r.server_cpu_us_per_op),
            cpu_cell(r.client_cpu_us_per_op),
            r.first_error
                .as_deref()
                .map(|e| format!("  first error: {e}"))
                .unwrap_or_default(),
        );
    }
}

fn cpu_cell(us_per_op: Option<f64>) -> String {
    us_per_op
        .map(|us| format!("{us:.2} us"))
        .unwrap_or_else(|| "-".into())
}

/// The human-readable table.
pub fn render_table(report: &StorageReport) -> String {
    let mut out = String::new();
    let rows: Vec<&PhaseResult> = (report.append.iter())
        .chain(&report.drain)
        .chain(report.engine.as_ref().map(|e| &e.phase))
        .chain(report.disk_ceiling.as_ref().map(|d| &d.phase))
        .collect();
    phase_table(&mut out, &rows);
    if let Some(e) = &report.engine {
        let _ = writeln!(
            out,
            "\nengine group commit: {} appends in {} batches ({} syncs): mean batch N = {:.1}",
            e.appends, e.batches, e.syncs, e.mean_batch_appends
        );
    }
    if let Some(d) = &report.disk_ceiling {
        let _ = writeln!(
            out,
            "disk ceiling: {}-byte records, one fdatasync per {} records",
            d.record_bytes, d.records_per_sync
        );
    }
    if !report.servers.is_empty() {
        let _ = writeln!(
            out,
            "\n{:<9} {:<14} {:>14} {:>14} {:>14} {:>12} {:>12} {:>9} {:>9}",
            "server",
            "setting",
            "peak RSS",
            "anon RSS",
            "disk",
            "messages",
            "disk B/msg",
            "start s",
            "restart s"
        );
        let bytes = |v: Option<u64>| v.map(fmt_bytes).unwrap_or_else(|| "?".into());
        let secs = |v: Option<f64>| v.map(|v| format!("{v:.2}")).unwrap_or_else(|| "-".into());
        for s in &report.servers {
            let _ = writeln!(
                out,
                "{:<9} {:<14} {:>14} {:>14} {:>14} {:>12} {:>12} {:>9} {:>9}",
                s.target,
                s.setting,
                bytes(s.peak_rss_bytes),
                bytes(s.anon_rss_bytes),
                fmt_bytes(s.disk_bytes),
                s.messages_stored,
                s.disk_bytes_per_message
                    .map(|v| format!("{v:.1}"))
                    .unwrap_or_else(|| "-".into()),
                secs(s.start_secs),
                secs(s.restart_secs),
            );
        }
    }
    if !report.backlogs.is_empty() {
        let _ = writeln!(
            out,
            "\nmsgstore log not yet checkpointed at the end of each append phase:"
        );
        for b in &report.backlogs {
            let _ = writeln!(
                out,
                "  {:<14} pipe {:>2}: {:>12} (the phase completed {} appends)",
                b.setting,
                b.pipeline,
                fmt_bytes(b.log_bytes),
                b.phase_ops
            );
        }
    }
    let r = &report.ratios;
    let show = |v: Option<f64>| v.map(|v| format!("{v:.3}")).unwrap_or_else(|| "n/a".into());
    let _ = writeln!(out, "\nratios (ours / peer):");
    for (name, v) in [
        (
            "append_always_vs_redis_always_p1",
            r.append_always_vs_redis_always_p1,
        ),
        (
            "append_always_vs_redis_always_p16",
            r.append_always_vs_redis_always_p16,
        ),
        (
            "append_always_vs_redis_off_p1",
            r.append_always_vs_redis_off_p1,
        ),
        ("drain_vs_redis", r.drain_vs_redis),
        ("engine_vs_disk_ceiling", r.engine_vs_disk_ceiling),
        (
            "append_gateway_shape_vs_redis_always",
            r.append_gateway_shape_vs_redis_always,
        ),
        ("disk_bytes_per_msg_vs_redis", r.disk_bytes_per_msg_vs_redis),
        ("anon_rss_vs_redis", r.anon_rss_vs_redis),
        ("restart_secs_vs_redis_load", r.restart_secs_vs_redis_load),
        (
            "replicated_vs_redis_wait_p16",
            r.replicated_vs_redis_wait_p16,
        ),
    ] {
        let _ = writeln!(out, "  {name:<36} {}", show(v));
    }
    if !report.problems.is_empty() {
        let _ = writeln!(out, "\nproblems:");
        for p in &report.problems {
            let _ = writeln!(out, "  - {p}");
        }
    }
    out
}

/// A benchmark's report as its JSON file holds it: `"bench": "<name>"`
/// first (which `imbench report` reads), then the report's own fields.
#[derive(Serialize)]
struct Tagged<'a, T> {
    bench: &'a str,
    #[serde(flatten)]
    report: &'a T,
}

/// Write `report` of benchmark `bench` (its subcommand's name) to `path`.
pub fn write_json<T: Serialize>(path: &Path, bench: &str, report: &T) -> Result<()> {
    let text =
        serde_json::to_string_pretty(&Tagged { bench, report }).context("serialize report")?;
    std::fs::write(path, text + "\n").with_context(|| format!("write {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ratios_serialize_with_exactly_the_ten_keys() {
        let v = serde_json::to_value(Ratios::default()).unwrap();
        let mut keys: Vec<_> = v.as_object().unwrap().keys().cloned().collect();
        keys.sort();
        assert_eq!(
            keys,
            [
                "anon_rss_vs_redis",
                "append_always_vs_redis_always_p1",
                "append_always_vs_redis_always_p16",
                "append_always_vs_redis_off_p1",
                "append_gateway_shape_vs_redis_always",
                "disk_bytes_per_msg_vs_redis",
                "drain_vs_redis",
                "engine_vs_disk_ceiling",
                "replicated_vs_redis_wait_p16",
                "restart_secs_vs_redis_load"
            ]
        );
    }

    #[test]
    fn the_json_names_its_benchmark_first() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("r.json");
        write_json(&path, "storage", &serde_json::json!({"ratios": {"a": 1.0}})).unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(text.starts_with("{\n  \"bench\": \"storage\","), "{text}");
        let v: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(v["ratios"]["a"], 1.0);
    }

    #[test]
    fn a_timeline_is_bounded_and_names_phase_and_series() {
        let row = |phase: &str, n: usize| PhaseResult {
            phase: phase.into(),
            target: "msgstore".into(),
            setting: "always".into(),
            connections: 1,
            pipeline: 16,
            ops: 0,
            ops_in_window: 0,
            abandoned: 0,
            errors: 0,
            first_error: None,
            elapsed_secs: 0.0,
            ops_per_sec: 0.0,
            latency: LatencySummary::default(),
            server_cpu_us_per_op: None,
            client_cpu_us_per_op: None,
            rate_samples: (0..n)
                .map(|i| RateSample {
                    t_secs: i as f64,
                    ops_per_s: 10.0,
                })
                .collect(),
        };
        let rows = [row("append", 3), row("drain", Timeline::SAMPLES_MAX)];
        let (t, left_out) = Timeline::of_phases(&rows);
        assert_eq!(t.samples().len(), Timeline::SAMPLES_MAX);
        assert_eq!(left_out, 3);
        assert_eq!(t.samples()[0].phase, "append p16");
        assert_eq!(t.samples()[0].series, "msgstore always");
        let v = serde_json::to_value(&t).unwrap();
        assert!(v.is_array());
        assert_eq!(v[0]["ops_per_s"], 10.0);
    }

    #[test]
    fn histogram_quantiles() {
        let mut h = LatencyHist::new();
        for us in 1..=100 {
            h.record(Duration::from_micros(us));
        }
        let s = h.summary();
        assert_eq!(s.samples, 100);
        assert!((49..=51).contains(&s.p50_us));
        assert!((98..=100).contains(&s.p99_us));
    }
}
