//! The leader's proposer: the writes of every connection become Raft
//! entries together.
//!
//! openraft 0.9 appends each entry to the log, and waits for its sync,
//! inside its core loop before it looks at the next: one entry costs one
//! `fdatasync` and a pass of the pipeline, whatever it carries. One entry
//! per connection read held a group of three to about 4,700 entries a
//! second whatever the load (measured with `imbench storage --replicas 3`).
//! So connections hand their writes to this one task, which keeps at most
//! [`PROPOSALS_INFLIGHT_MAX`] entries in flight and packs everything queued
//! meanwhile into the next (up to [`BATCH_BYTES_MAX`]): the busier the
//! shard, the more each sync carries (group commit, as the standalone
//! shard's log does).
//!
//! Order: proposals are submitted to openraft in the order they were
//! queued, and entries are applied in log order, so one connection's
//! writes are applied in the order it sent them.
//!
//! Limits: [`PROPOSALS_QUEUED_MAX`] proposals waiting (a connection waits
//! past it), [`PROPOSALS_INFLIGHT_MAX`] entries proposed and unanswered,
//! [`BATCH_BYTES_MAX`] of payload per entry (a single larger write is an
//! entry of its own), `write_timeout_ms` from queueing to answer.

use super::{
    service::{error, not_leader, unavailable},
    Batch, TypeConfig, BATCH_BYTES_MAX,
};
use openraft::{
    error::{ClientWriteError, Fatal},
    raft::ClientWriteResponse,
    Raft,
};
use proto::shard::{RequestBody, ResponseBody, ShardErrorCode};
use std::{sync::Arc, time::Duration};
use tokio::{
    sync::{mpsc, oneshot, OwnedSemaphorePermit, Semaphore},
    time::Instant,
};

/// Most proposals queued and not yet proposed; connections wait past it.
pub const PROPOSALS_QUEUED_MAX: usize = 1024;

/// Most entries proposed and not yet answered. One entry is synced while
/// the next fills; more would only make entries smaller.
pub const PROPOSALS_INFLIGHT_MAX: usize = 2;

/// Writes from one connection read, to be applied together and in order.
struct Proposal {
    requests: Vec<RequestBody>,
    /// How many requests it carries (they move into the entry).
    count: usize,
    bytes: usize,
    queued_at: Instant,
    reply: oneshot::Sender<Vec<ResponseBody>>,
}

/// A handle to queue writes for the proposer task.
#[derive(Clone)]
pub struct Proposer {
    tx: mpsc::Sender<Proposal>,
}

impl Proposer {
    /// Start the proposer task of `raft`, answering `Unavailable` for
    /// what is not answered within `write_timeout`.
    pub fn start(raft: Raft<TypeConfig>, write_timeout: Duration) -> Self {
        let (tx, rx) = mpsc::channel(PROPOSALS_QUEUED_MAX);
        tokio::spawn(run(raft, rx, write_timeout));
        Self { tx }
    }

    /// Queue `writes` (in order) and return where their answers will
    /// come, one per write, in order: a receiver per entry they need.
    pub async fn queue(
        &self,
        writes: Vec<RequestBody>,
    ) -> Vec<oneshot::Receiver<Vec<ResponseBody>>> {
        let mut answers = Vec::new();
        for requests in split_by_bytes(writes) {
            let (reply, rx) = oneshot::channel();
            let proposal = Proposal {
                count: requests.len(),
                bytes: requests.iter().map(payload_bytes).sum(),
                requests,
                queued_at: Instant::now(),
                reply,
            };
            // A send fails only once the task is gone (the runtime stops):
            // the dropped reply then answers `Unavailable`.
            let _ = self.tx.send(proposal).await;
            answers.push(rx);
        }
        answers
    }
}

/// The answers to `count` writes whose answers come on `answers`.
pub async fn answers_of(
    answers: Vec<oneshot::Receiver<Vec<ResponseBody>>>,
    count: usize,
) -> Vec<ResponseBody> {
    let mut out = Vec::with_capacity(count);
    for rx in answers {
        match rx.await {
            Ok(bodies) => out.extend(bodies),
            Err(_) => break,
        }
    }
    let stopped = error(
        ShardErrorCode::Unavailable,
        "the replica is stopping; the write may still commit".into(),
    );
    out.resize(count, stopped);
    out
}

async fn run(raft: Raft<TypeConfig>, mut rx: mpsc::Receiver<Proposal>, write_timeout: Duration) {
    let slots = Arc::new(Semaphore::new(PROPOSALS_INFLIGHT_MAX));
    let mut carried: Option<Proposal> = None;
    loop {
        let first = match carried.take() {
            Some(p) => p,
            None => match rx.recv().await {
                Some(p) => p,
                None => return,
            },
        };
        // Wait for a slot before packing: what queues meanwhile joins.
        let Ok(slot) = Arc::clone(&slots).acquire_owned().await else {
            return;
        };
        let mut group = vec![first];
        let mut bytes = group[0].bytes;
        while let Ok(next) = rx.try_recv() {
            if bytes + next.bytes > BATCH_BYTES_MAX {
                carried = Some(next);
                break;
            }
            bytes += next.bytes;
            group.push(next);
        }
        propose(&raft, group, write_timeout, slot).await;
    }
}

/// Submit `group` as one entry (in queue order: awaited here) and answer
/// it from a task of its own.
async fn propose(
    raft: &Raft<TypeConfig>,
    mut group: Vec<Proposal>,
    write_timeout: Duration,
    slot: OwnedSemaphorePermit,
) {
    let deadline = group[0].queued_at + write_timeout;
    let requests: Vec<RequestBody> = group
        .iter_mut()
        .flat_map(|p| std::mem::take(&mut p.requests))
        .collect();
    let batch = Batch {
        now_ms: now_ms(),
        requests: Arc::new(requests),
    };
    metrics::counter!("msgstore_raft_proposals_total").increment(1);
    let submitted = raft.client_write_ff(batch).await;
    tokio::spawn(async move {
        let result = match submitted {
            Err(fatal) => Err(fatal_refusal(&fatal)),
            Ok(rx) => match tokio::time::timeout_at(deadline, rx).await {
                Ok(Ok(Ok(response))) => Ok(response),
                Ok(Ok(Err(refusal))) => Err(write_refusal(&refusal)),
                Ok(Err(_dropped)) => Err(error(
                    ShardErrorCode::Unavailable,
                    "the replica stopped before the write was answered; it may still commit".into(),
                )),
                Err(_elapsed) => Err(unavailable(write_timeout)),
            },
        };
        answer(group, result);
        drop(slot);
    });
}

/// Hand each proposal its share of the entry's outcomes (or the refusal).
fn answer(group: Vec<Proposal>, result: Result<ClientWriteResponse<TypeConfig>, ResponseBody>) {
    let total: usize = group.iter().map(|p| p.count).sum();
    let mut outcomes = match result {
        Ok(response) if response.data.0.len() == total => response.data.0.into_iter(),
        Ok(response) => {
            let wrong = error(
                ShardErrorCode::Storage,
                format!("{} outcomes for {total} requests", response.data.0.len()),
            );
            vec![wrong; total].into_iter()
        }
        Err(refusal) => vec![refusal; total].into_iter(),
    };
    for proposal in group {
        let _ = proposal
            .reply
            .send(outcomes.by_ref().take(proposal.count).collect());
    }
}

fn write_refusal(e: &ClientWriteError<u64, super::Replica>) -> ResponseBody {
    match e {
        ClientWriteError::ForwardToLeader(f) => not_leader(f),
        other => error(ShardErrorCode::Unavailable, other.to_string()),
    }
}

fn fatal_refusal(e: &Fatal<u64>) -> ResponseBody {
    error(
        ShardErrorCode::Unavailable,
        format!("the replica's Raft node stopped: {e}"),
    )
}

/// Split writes so that no proposal carries much more than
/// [`BATCH_BYTES_MAX`] of payload.
fn split_by_bytes(writes: Vec<RequestBody>) -> Vec<Vec<RequestBody>> {
    let mut groups = vec![Vec::new()];
    let mut bytes = 0usize;
    for body in writes {
        let size = payload_bytes(&body);
        if bytes > 0 && bytes + size > BATCH_BYTES_MAX {
            groups.push(Vec::new());
            bytes = 0;
        }
        bytes += size;
        groups.last_mut().expect("one group").push(body);
    }
    groups.retain(|g| !g.is_empty());
    groups
}

fn payload_bytes(body: &RequestBody) -> usize {
    match body {
        RequestBody::Append { payload, .. } => payload.len() + 64,
        RequestBody::AppendBatch { items } | RequestBody::AppendBatchOnce { items, .. } => {
            items.iter().map(|i| i.payload.len() + 64).sum()
        }
        RequestBody::Import { records, .. } => records.iter().map(|r| r.payload.len() + 64).sum(),
        _ => 64,
    }
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}
