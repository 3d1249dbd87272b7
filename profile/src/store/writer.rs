//! The writer thread: the one place write transactions are opened and
//! committed (heed requires the committing thread to be the opening one).
//!
//! Jobs wait in a bounded queue (`store.write_queue_max`; a full queue is
//! refused with [`Error::Busy`]). The thread takes up to
//! `store.write_batch_max` jobs, applies each op in a nested transaction
//! (aborted if the op fails), commits the group with one sync, then answers
//! every job and publishes the version changes to subscribers.

use super::{
    ops::{Changes, Outcome, WriteOp},
    Store,
};
use crate::{error::Error, notify::Hub, Result};
use std::sync::Arc;
use tokio::sync::oneshot;

struct Job {
    ops: Vec<WriteOp>,
    reply: oneshot::Sender<Vec<Result<Outcome>>>,
}

/// Submits writes to the writer thread. Dropping every clone stops it
/// (after it finished what was queued).
#[derive(Clone)]
pub struct Writer {
    jobs: flume::Sender<Job>,
}

impl Writer {
    /// Start the writer thread for `store`; changes go to `hub`.
    pub fn start(
        store: Arc<Store>,
        hub: Arc<Hub>,
        queue_max: usize,
        batch_max: usize,
    ) -> Result<(Writer, std::thread::JoinHandle<()>)> {
        let (jobs, rx) = flume::bounded::<Job>(queue_max);
        let handle = std::thread::Builder::new()
            .name("profile-writer".into())
            .spawn(move || run(&store, &hub, &rx, batch_max))?;
        Ok((Writer { jobs }, handle))
    }

    /// Apply `ops` (each on its own: one failing leaves the others) in one
    /// commit; one result per op, in order.
    pub async fn write_many(&self, ops: Vec<WriteOp>) -> Result<Vec<Result<Outcome>>> {
        let (reply, rx) = oneshot::channel();
        crate::passwords::try_submit(
            &self.jobs,
            Job { ops, reply },
            "write queue full",
            "profile_write_queue_full_total",
        )?;
        rx.await.map_err(|_| Error::Closed)
    }
}

/// Failed write transactions logged at most once per interval (a full disk
/// fails every write; `profile_writes_failed_total` counts them all).
static WRITE_FAILURE_ERRORS: daemon::SharedLogLimiter =
    daemon::SharedLogLimiter::new(daemon::accept::WARN_INTERVAL);

fn run(store: &Store, hub: &Hub, rx: &flume::Receiver<Job>, batch_max: usize) {
    while let Ok(first) = rx.recv() {
        let mut batch = vec![first];
        while batch.len() < batch_max {
            match rx.try_recv() {
                Ok(job) => batch.push(job),
                Err(_) => break,
            }
        }
        let started = std::time::Instant::now();
        let counts: Vec<usize> = batch.iter().map(|j| j.ops.len()).collect();
        let (results, changes) = match commit_batch(store, &mut batch) {
            Ok(done) => done,
            Err(e) => {
                // Nothing of the batch was committed: every op fails, with
                // an error that says why (a full map or disk, or the I/O
                // error).
                let why = e.write_failure();
                metrics::counter!("profile_writes_failed_total", "reason" => why.label())
                    .increment(counts.iter().sum::<usize>() as u64);
                let answer = e.write_failed();
                if let Some(held_back) = WRITE_FAILURE_ERRORS.check() {
                    tracing::error!(error = %e, reason = why.label(), held_back, "profile write transaction failed: {answer}");
                }
                let failed = |n| (0..n).map(|_| Err(e.write_failed()));
                let results = counts.iter().map(|&n| failed(n).collect()).collect();
                (results, Vec::new())
            }
        };
        metrics::histogram!("profile_commit_seconds").record(started.elapsed().as_secs_f64());
        for (job, result) in batch.into_iter().zip(results) {
            let _ = job.reply.send(result);
        }
        hub.publish(&changes);
    }
}

/// Apply every op of every job in one write transaction and commit it.
fn commit_batch(store: &Store, batch: &mut [Job]) -> Result<(Vec<Vec<Result<Outcome>>>, Changes)> {
    let mut wtxn = store.env.write_txn()?;
    let mut changes = Changes::new();
    let now_ms = super::ops::now_ms();
    let mut results = Vec::with_capacity(batch.len());
    for job in batch.iter_mut() {
        let ops = std::mem::take(&mut job.ops);
        results.push(store.apply_ops(&mut wtxn, ops, now_ms, &mut changes)?);
    }
    wtxn.commit()?;
    Ok((results, changes))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Limits;

    /// A write that finds the LMDB map full is answered "storage full",
    /// saying so, never "corrupt profile data"; nothing of it is stored.
    #[tokio::test]
    async fn a_full_map_is_storage_full_not_corrupt() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(Store::open(dir.path(), 1 << 20, Limits::default()).unwrap());
        let (writer, thread) =
            Writer::start(store.clone(), Arc::new(Hub::default()), 16, 16).unwrap();
        let writes = crate::writes::Writes::Local(writer);
        let mut stored = 0;
        let failure = loop {
            let op = WriteOp::CreateUser {
                username: format!("user{stored}"),
                phc: "x".repeat(100 * 1024),
            };
            match writes.write(op).await {
                Ok(_) => stored += 1,
                Err(e) => break e,
            }
            assert!(stored < 100, "a 1 MiB map never filled");
        };
        assert!(matches!(failure, Error::StorageFull(_)), "{failure:?}");
        let text = failure.to_string();
        assert!(text.contains("LMDB map is full"), "{text}");
        assert!(!text.contains("corrupt"), "{text}");
        assert_eq!(failure.code(), proto::profile::ErrorCode::Storage);
        assert!(store
            .credentials(&format!("user{stored}"))
            .unwrap()
            .is_none());
        assert!(store.credentials("user0").unwrap().is_some());
        drop(writes);
        thread.join().unwrap();
    }
}
