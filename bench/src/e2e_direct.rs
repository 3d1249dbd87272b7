//! The other side of `offline_store_vs_shard`: the same shards as the
//! offline phase, driven directly in the same run as the gateway drives
//! them. The gateway's own shard router (`gateway::shards::Shards`: one
//! multiplexed connection per shard) sends `AppendBatch`es of the size the
//! gateway's stores had in the offline phase (from its `/metrics`), one
//! batch in flight per conversation, as many conversations as the phase
//! had senders, each to a mailbox of its own; the payloads are the stored
//! envelopes the gateway writes.

use crate::e2e_fleet::BODY_BYTES;
use anyhow::{ensure, Context, Result};
use proto::{app::StoredEnvelope, cluster::ClusterMap};
use serde::Serialize;
use std::{sync::Arc, time::Instant};

/// The first mailbox id of the direct phase: far above every account the
/// run makes, so no mailbox is shared with the gateway's phases.
const FIRST_MAILBOX: u64 = 1 << 40;
/// How long a `Busy` mailbox is waited for (none is moved in this run).
const BUSY_WAIT_MS_MAX: u64 = 1_000;

#[derive(Debug, Clone, Serialize)]
pub struct DirectResult {
    pub conversations: usize,
    pub items_per_store: usize,
    pub stored: u64,
    pub secs: f64,
    pub stored_per_sec: f64,
    /// CPU of imbench's process (the driver and the shards) per message.
    pub imbench_cpu_us_per_message: Option<f64>,
}

/// What to drive: the gateway's shape in the offline phase.
pub struct Shape {
    pub conversations: usize,
    pub items_per_store: usize,
    /// Messages in all (the offline phase's).
    pub messages: u64,
}

pub async fn drive(map: ClusterMap, shape: Shape) -> Result<DirectResult> {
    ensure!(
        shape.conversations > 0 && shape.items_per_store > 0,
        "an empty shape"
    );
    let shards = Arc::new(gateway::shards::Shards::new(map, BUSY_WAIT_MS_MAX));
    let per_conversation = shape.messages.div_ceil(shape.conversations as u64);
    let t0 = Instant::now();
    let cpu0 = crate::procs::cpu_time(std::process::id()).ok();
    let tasks: Vec<_> = (0..shape.conversations as u64)
        .map(|i| {
            let shards = shards.clone();
            let batch = shape.items_per_store;
            tokio::spawn(async move {
                conversation(&shards, FIRST_MAILBOX + i, batch, per_conversation).await
            })
        })
        .collect();
    let mut stored = 0;
    for t in tasks {
        stored += t.await.context("a direct conversation panicked")??;
    }
    let secs = t0.elapsed().as_secs_f64();
    let cpu = crate::procs::cpu_time(std::process::id()).ok();
    Ok(DirectResult {
        conversations: shape.conversations,
        items_per_store: shape.items_per_store,
        stored,
        secs,
        stored_per_sec: stored as f64 / secs,
        imbench_cpu_us_per_message: crate::e2e_report::cpu_us_per(cpu, cpu0, stored),
    })
}

/// Store `count` messages in `mailbox`, `batch` per store; how many.
async fn conversation(
    shards: &gateway::shards::Shards,
    mailbox: u64,
    batch: usize,
    count: u64,
) -> Result<u64> {
    let payload = proto::app::encode(&StoredEnvelope {
        from: mailbox + 1,
        sent_at_ms: 1,
        body: vec![b'x'; BODY_BYTES],
    });
    let mut stored = 0u64;
    let mut next_id = u128::from(mailbox) << 64;
    while stored < count {
        let n = batch.min((count - stored) as usize);
        let items: Vec<(u128, Vec<u8>)> = (0..n)
            .map(|k| (next_id + k as u128, payload.clone()))
            .collect();
        next_id += n as u128;
        let results = shards
            .append_batch(mailbox, items, None)
            .await
            .map_err(|e| anyhow::anyhow!("direct store to {mailbox}: {e:?}"))?;
        for r in results {
            r.map_err(|e| anyhow::anyhow!("direct store item to {mailbox}: {e:?}"))?;
        }
        stored += n as u64;
    }
    Ok(stored)
}
