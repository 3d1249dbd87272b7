//! The engine in-process: concurrent appenders on one `msgstore::Shard`.

use crate::load::ConnOutcome;
use crate::{
    load::{tail_grace, Rng},
    report::{EngineResult, LatencyHist, PhaseResult},
};
use anyhow::{Context, Result};
use msgstore::{EngineConfig, FsyncPolicy, Shard};
use std::{
    path::PathBuf,
    time::{Duration, Instant},
};

pub struct EngineSpec {
    pub data_dir: PathBuf,
    pub fsync: FsyncPolicy,
    pub appenders: usize,
    pub users: u64,
    pub payload_bytes: usize,
    pub duration: Duration,
    /// Create every bucket file when the shard opens (before the window).
    pub precreate: bool,
}

/// Run `appenders` tasks, each appending one message at a time (awaiting
/// its ticket) to random users; read `stats()` before and after to get the
/// mean group-commit batch size. The rate counts appends answered within
/// the window; answers still missing a grace period after it are abandoned.
pub async fn engine_append(spec: EngineSpec) -> Result<EngineResult> {
    let config = EngineConfig {
        fsync: spec.fsync,
        precreate_buckets: spec.precreate,
        ..EngineConfig::default()
    };
    let dir = spec.data_dir.clone();
    let shard = tokio::task::spawn_blocking(move || Shard::open(&dir, config))
        .await
        .context("open task panicked")?
        .with_context(|| format!("open shard in {}", spec.data_dir.display()))?;
    let result = run(&shard, &spec).await;
    let closed = tokio::task::spawn_blocking(move || shard.close())
        .await
        .context("close task panicked")?;
    let result = result?;
    closed.context("close shard")?;
    Ok(result)
}

async fn run(shard: &Shard, spec: &EngineSpec) -> Result<EngineResult> {
    let before = shard.stats().await.context("stats before")?;
    let start = Instant::now();
    let deadline = start + spec.duration;
    let give_up = deadline + tail_grace(spec.duration);
    let mut tasks = Vec::with_capacity(spec.appenders);
    for i in 0..spec.appenders {
        let shard = shard.clone();
        let payload_bytes = spec.payload_bytes;
        let users = spec.users;
        tasks.push(tokio::spawn(async move {
            let mut rng = Rng::new(0xE9 ^ i as u64);
            let mut out = ConnOutcome::default();
            let mut counter = 0u64;
            while Instant::now() < deadline {
                counter += 1;
                let msg_id = (u128::from(i as u64) << 64) | u128::from(counter);
                let mut payload = vec![0u8; payload_bytes];
                rng.fill(&mut payload);
                let user = rng.below(users);
                let t0 = Instant::now();
                let ticket = shard.append(user, msg_id, payload);
                let Ok(result) = tokio::time::timeout_at(give_up.into(), ticket).await else {
                    out.abandoned += 1;
                    break;
                };
                let now = Instant::now();
                out.hist.record(now - t0);
                match result {
                    Ok(_) => {
                        out.ops += 1;
                        if now <= deadline {
                            out.ops_in_window += 1;
                        }
                    }
                    Err(e) => {
                        out.errors += 1;
                        if out.first_error.is_none() {
                            out.first_error = Some(e.to_string());
                        }
                    }
                }
            }
            out
        }));
    }
    let mut hist = LatencyHist::new();
    let (mut ops, mut ops_in_window, mut abandoned) = (0, 0, 0);
    let (mut errors, mut first_error) = (0, None);
    for task in tasks {
        let out = task.await.context("appender panicked")?;
        ops += out.ops;
        ops_in_window += out.ops_in_window;
        abandoned += out.abandoned;
        errors += out.errors;
        first_error = first_error.or(out.first_error);
        hist.merge(&out.hist)?;
    }
    let elapsed = start.elapsed();
    let after = shard.stats().await.context("stats after")?;
    let appends = after.appends_total.saturating_sub(before.appends_total);
    let batches = after.batches_total.saturating_sub(before.batches_total);
    let syncs = after.syncs_total.saturating_sub(before.syncs_total);
    Ok(EngineResult {
        phase: PhaseResult {
            phase: "engine_append".into(),
            target: "engine".into(),
            setting: spec.fsync.to_string(),
            connections: spec.appenders,
            pipeline: 1,
            ops,
            ops_in_window,
            abandoned,
            errors,
            first_error,
            elapsed_secs: elapsed.as_secs_f64(),
            // Like the TCP phases: completions within the window / window.
            ops_per_sec: ops_in_window as f64 / spec.duration.as_secs_f64().max(1e-9),
            latency: hist.summary(),
            server_cpu_us_per_op: None,
            client_cpu_us_per_op: None,
            rate_samples: Vec::new(),
        },
        appends,
        batches,
        syncs,
        mean_batch_appends: if batches == 0 {
            0.0
        } else {
            appends as f64 / batches as f64
        },
    })
}
