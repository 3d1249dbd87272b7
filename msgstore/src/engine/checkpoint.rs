//! Checkpoints: move logged records into their bucket files, compact buckets
//! whose dead share is over the threshold, record everything in the index
//! in one transaction, then trim the log.
//!
//! A checkpoint is a job that runs alongside the traffic: the writer thread
//! does its steps between batches (a bounded slice of work each time), and
//! the slow, blocking part (the file-system sync and the index commit) runs
//! on a helper thread while the writer keeps answering requests.
//!
//! Order (docs/STORAGE.md explains why each crash point is safe):
//! 1. note the log position P and take a snapshot of the state as of P: the
//!    changed user states, the memtable ("frozen"), the totals;
//! 2. write the frozen records into bucket maps past each bucket's `len`;
//! 3. write compacted copies of candidate buckets to `compact/`, synced;
//! 4. (helper thread) `syncfs`: every bucket byte written so far is durable;
//! 5. (helper thread) one LMDB transaction: the snapshot's user states,
//!    bucket states, `wal_start = P`, the compacted files to swap in; commit;
//! 6. rename compacted files over their buckets, sync;
//! 7. delete log segments wholly before P.

use super::{
    buckets::{compacted_path, header_gen},
    codec::{encode_record, read_record, record_stored_bytes, MessageHeader, NO_PREV},
    index::{CheckpointMeta, Index},
    state::{BucketMeta, UserState, BUCKET_HEADER_BYTES},
    wal::Position,
    Engine, Pending, Totals,
};
use crate::{Error, Result};
use std::{
    collections::{HashMap, VecDeque},
    os::fd::AsRawFd,
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, Instant},
};

/// Most writer time one checkpoint step takes before it returns to serve
/// requests.
const STEP_BUDGET: Duration = Duration::from_millis(2);

/// A compacted copy of one bucket, waiting for the index commit.
struct Compaction {
    bucket: u32,
    meta: BucketMeta,
    states: Vec<(u64, UserState)>,
}

enum Phase {
    /// Writing frozen records to buckets, user by user.
    Flushing,
    /// Writing compacted copies of these buckets.
    Compacting { candidates: Vec<u32> },
    /// The helper thread syncs and commits.
    Committing(flume::Receiver<Result<()>>),
}

/// One checkpoint in progress.
pub(super) struct Job {
    position: Position,
    /// User states as of `position`, with bucket tails updated as flushed.
    snapshot: HashMap<u64, UserState>,
    /// The memtable as of `position`; users leave it as they are flushed.
    pub(super) frozen: HashMap<u64, VecDeque<Pending>>,
    /// The frozen users by bucket; `cursor` is the next to flush.
    order: Vec<(u32, u64)>,
    cursor: usize,
    totals: Totals,
    log_bytes: u64,
    touched: Vec<u32>,
    compactions: Vec<Compaction>,
    phase: Phase,
    started: Instant,
}

/// Make every written byte of the file system holding `dir` durable with one
/// call, instead of one fsync per touched bucket file.
fn syncfs(dir: &Path) -> Result<()> {
    let f = std::fs::File::open(dir)?;
    // SAFETY: plain syscall on a descriptor we own.
    if unsafe { libc::syncfs(f.as_raw_fd()) } != 0 {
        return Err(std::io::Error::last_os_error().into());
    }
    Ok(())
}

impl Engine {
    /// Whether a checkpoint has steps for the writer to run now.
    pub(super) fn checkpoint_has_work(&self) -> bool {
        matches!(
            self.job.as_ref().map(|j| &j.phase),
            Some(Phase::Flushing | Phase::Compacting { .. })
        )
    }

    pub(super) fn checkpoint_running(&self) -> bool {
        self.job.is_some()
    }

    /// Start a checkpoint job if there is anything to checkpoint.
    pub(super) fn start_checkpoint(&mut self) {
        self.last_checkpoint = Instant::now();
        if self.job.is_some()
            || (self.dirty.is_empty()
                && self.memtable.is_empty()
                && self.compact_candidates.is_empty())
        {
            return;
        }
        let frozen = std::mem::take(&mut self.memtable);
        let mut order: Vec<(u32, u64)> =
            frozen.keys().map(|u| (self.dirty[u].bucket, *u)).collect();
        order.sort_unstable();
        self.job = Some(Job {
            position: self.wal.position(),
            snapshot: self.dirty.clone(),
            frozen,
            order,
            cursor: 0,
            totals: self.totals,
            log_bytes: self.wal.bytes_since_checkpoint,
            touched: Vec::new(),
            compactions: Vec::new(),
            phase: Phase::Flushing,
            started: Instant::now(),
        });
    }

    /// Run checkpoint work for at most [`STEP_BUDGET`] (or to the end with
    /// `to_completion`). Returns the result once the job has finished.
    pub(super) fn checkpoint_step(&mut self, to_completion: bool) -> Option<Result<()>> {
        let deadline = (!to_completion).then(|| Instant::now() + STEP_BUDGET);
        self.checkpoint_step_until(deadline)
    }

    fn checkpoint_step_until(&mut self, deadline: Option<Instant>) -> Option<Result<()>> {
        let mut job = self.job.take()?;
        let outcome = self.advance(&mut job, deadline);
        match outcome {
            Ok(false) => {
                self.job = Some(job);
                None
            }
            Ok(true) => Some(self.finish(job)),
            Err(e) => {
                self.abandon(job);
                Some(Err(e))
            }
        }
    }

    /// Move the job forward; `Ok(true)` once the index commit succeeded.
    fn advance(&mut self, job: &mut Job, deadline: Option<Instant>) -> Result<bool> {
        let over = |d: Option<Instant>| d.is_some_and(|d| Instant::now() >= d);
        loop {
            match &mut job.phase {
                Phase::Flushing => {
                    while job.cursor < job.order.len() {
                        let (bucket, user) = job.order[job.cursor];
                        job.cursor += 1;
                        self.flush_user(job, bucket, user)?;
                        if over(deadline) {
                            return Ok(false);
                        }
                    }
                    let candidates = self.compact_candidates.iter().copied().collect();
                    job.phase = Phase::Compacting { candidates };
                }
                Phase::Compacting { candidates } => {
                    while let Some(bucket) = candidates.pop() {
                        match self.compact_bucket(&job.snapshot, bucket)? {
                            Some(c) => job.compactions.push(c),
                            None => {
                                self.compact_candidates.remove(&bucket);
                            }
                        }
                        if over(deadline) {
                            return Ok(false);
                        }
                    }
                    job.phase = Phase::Committing(self.spawn_commit(job)?);
                }
                Phase::Committing(done) => {
                    let result = match deadline {
                        Some(_) => match done.try_recv() {
                            Ok(r) => r,
                            Err(flume::TryRecvError::Empty) => return Ok(false),
                            Err(flume::TryRecvError::Disconnected) => {
                                Err(Error::Storage("checkpoint thread died".into()))
                            }
                        },
                        None => done.recv().unwrap_or_else(|_| {
                            Err(Error::Storage("checkpoint thread died".into()))
                        }),
                    };
                    return result.map(|()| true);
                }
            }
        }
    }

    /// Append a user's frozen records to its bucket. Records the snapshot
    /// already counts as acknowledged are never in the frozen memtable
    /// (batches prune them); records acknowledged since are written and
    /// counted dead, so the snapshot stays exactly the state as of P.
    fn flush_user(&mut self, job: &mut Job, bucket: u32, user: u64) -> Result<()> {
        let queue = job.frozen.remove(&user).unwrap_or_default();
        let mut live = self.dirty[&user];
        let mut meta = self.bucket(bucket);
        let mut buf = Vec::new();
        let mut dead = 0;
        for p in &queue {
            let offset = meta.len + buf.len() as u64;
            let header = MessageHeader {
                user,
                seq: p.seq,
                timestamp_ms: p.timestamp_ms,
                msg_id: p.msg_id,
            };
            encode_record(&header, live.tail_offset, &p.payload, &mut buf);
            live.tail_offset = offset;
            live.tail_seq = live.tail_seq.max(p.seq);
            if p.seq <= live.acked_seq {
                dead += record_stored_bytes(p.payload.len());
            }
        }
        if buf.is_empty() {
            return Ok(());
        }
        self.buckets.write(bucket, meta.gen, meta.len, &buf)?;
        meta.len += buf.len() as u64;
        meta.dead_bytes += dead;
        self.bucket_meta.insert(bucket, meta);
        if job.touched.last() != Some(&bucket) {
            job.touched.push(bucket);
        }
        let snap = job
            .snapshot
            .get_mut(&user)
            .expect("frozen users are in the snapshot");
        snap.tail_offset = live.tail_offset;
        snap.tail_seq = live.tail_seq;
        self.dirty.insert(user, live);
        Ok(())
    }

    /// Copy the records of `bucket` live as of the snapshot into a new file,
    /// rebuilding each user's chain. `None` if the bucket cannot be read
    /// cleanly (it is then left as it is).
    fn compact_bucket(
        &mut self,
        snapshot: &HashMap<u64, UserState>,
        bucket: u32,
    ) -> Result<Option<Compaction>> {
        let meta = self.bucket(bucket);
        let Some(view) = self.buckets.view(bucket)? else {
            return Ok(None);
        };
        if header_gen(view, bucket) != Some(meta.gen) {
            tracing::error!(
                bucket,
                "bucket header does not match the index; not compacting"
            );
            return Ok(None);
        }
        let view = view[..meta.len as usize].to_vec();
        let mut states: HashMap<u64, UserState> = HashMap::new();
        let mut buf = Vec::new();
        let mut at = BUCKET_HEADER_BYTES;
        while at < meta.len {
            let rec = match read_record(&view, at, usize::MAX >> 1) {
                Ok(rec) => rec,
                Err(fault) => {
                    tracing::error!(
                        bucket,
                        offset = at,
                        ?fault,
                        "corrupt record; not compacting this bucket"
                    );
                    return Ok(None);
                }
            };
            at += rec.stored_bytes();
            let user = rec.header.user;
            if let std::collections::hash_map::Entry::Vacant(slot) = states.entry(user) {
                let known = match snapshot.get(&user) {
                    Some(s) => Some(*s),
                    None => self.index.user(user)?,
                };
                let Some(mut s) = known else {
                    tracing::error!(
                        bucket,
                        user,
                        "record of a user the index does not know; not compacting"
                    );
                    return Ok(None);
                };
                s.tail_offset = NO_PREV;
                slot.insert(s);
            }
            let state = states.get_mut(&user).expect("inserted above");
            if rec.header.seq <= state.acked_seq {
                continue;
            }
            let offset = BUCKET_HEADER_BYTES + buf.len() as u64;
            encode_record(&rec.header, state.tail_offset, rec.payload, &mut buf);
            state.tail_offset = offset;
        }
        let new_meta = BucketMeta {
            gen: meta.gen + 1,
            len: BUCKET_HEADER_BYTES + buf.len() as u64,
            dead_bytes: 0,
        };
        self.buckets
            .write_compacted(&self.dir.join("compact"), bucket, new_meta.gen, &buf)?;
        Ok(Some(Compaction {
            bucket,
            meta: new_meta,
            states: states.into_iter().collect(),
        }))
    }

    /// Hand the sync and the index commit to a helper thread.
    fn spawn_commit(&mut self, job: &mut Job) -> Result<flume::Receiver<Result<()>>> {
        let meta = CheckpointMeta {
            wal_start: job.position,
            pending_swaps: job
                .compactions
                .iter()
                .map(|c| (c.bucket, c.meta.gen))
                .collect(),
            users_total: job.totals.users,
            live_messages: job.totals.live_messages,
            live_bytes: job.totals.live_bytes,
        };
        let mut users = job.snapshot.clone();
        let mut buckets: HashMap<u32, BucketMeta> =
            job.touched.iter().map(|b| (*b, self.bucket(*b))).collect();
        for s in job.snapshot.values() {
            if let Some(m) = self.bucket_meta.get(&s.bucket) {
                buckets.insert(s.bucket, *m);
            }
        }
        for c in &job.compactions {
            users.extend(c.states.iter().copied());
            buckets.insert(c.bucket, c.meta);
        }
        let (tx, rx) = flume::bounded(1);
        let index: Arc<Index> = Arc::clone(&self.index);
        let dir: PathBuf = self.dir.clone();
        std::thread::Builder::new()
            .name("msgstore-checkpoint".into())
            .spawn(move || {
                let result = syncfs(&dir).and_then(|()| {
                    index.commit_checkpoint(
                        users.iter().map(|(u, s)| (*u, s)),
                        buckets.into_iter(),
                        &meta,
                    )
                });
                // Release the index before answering: the shard may close and
                // reopen the environment as soon as the answer arrives.
                drop(index);
                let _ = tx.send(result);
            })?;
        Ok(rx)
    }

    /// The index has the checkpoint: swap compacted files in, forget states
    /// the index now holds, trim the log.
    fn finish(&mut self, job: Job) -> Result<()> {
        let compact_dir = self.dir.join("compact");
        for c in &job.compactions {
            self.buckets
                .install_compacted(&compact_dir, c.bucket, c.meta.gen)?;
            self.bucket_meta.insert(c.bucket, c.meta);
            self.compact_candidates.remove(&c.bucket);
            for (user, s) in &c.states {
                if let Some(live) = self.dirty.get_mut(user) {
                    live.tail_offset = s.tail_offset;
                }
            }
        }
        if !job.compactions.is_empty() {
            syncfs(&self.dir)?;
        }
        let compacted: HashMap<u64, UserState> = job
            .compactions
            .iter()
            .flat_map(|c| c.states.iter().copied())
            .collect();
        for (user, snap) in &job.snapshot {
            let committed = compacted.get(user).unwrap_or(snap);
            if self.dirty.get(user) == Some(committed) {
                self.dirty.remove(user);
            }
        }
        self.wal.remove_before(job.position)?;
        self.wal.bytes_since_checkpoint = self
            .wal
            .bytes_since_checkpoint
            .saturating_sub(job.log_bytes);
        self.counters.checkpoints_total += 1;
        self.counters.compactions_total += job.compactions.len() as u64;
        metrics::counter!("msgstore_checkpoints_total").increment(1);
        metrics::counter!("msgstore_compactions_total").increment(job.compactions.len() as u64);
        tracing::debug!(
            elapsed_ms = job.started.elapsed().as_millis() as u64,
            "checkpoint done"
        );
        Ok(())
    }

    /// A failed job: drop its compacted files and put the records it did
    /// not flush back in front of the memtable. Every state stays in `dirty`
    /// and the log is kept, so the next checkpoint covers it all.
    fn abandon(&mut self, job: Job) {
        let compact_dir = self.dir.join("compact");
        for c in &job.compactions {
            let _ = std::fs::remove_file(compacted_path(&compact_dir, c.bucket, c.meta.gen));
        }
        for (user, mut older) in job.frozen {
            let acked = self.dirty.get(&user).map_or(0, |s| s.acked_seq);
            older.retain(|p| p.seq > acked);
            let newer = self.memtable.remove(&user).unwrap_or_default();
            older.extend(newer);
            if !older.is_empty() {
                self.memtable.insert(user, older);
            }
        }
        metrics::counter!("msgstore_checkpoint_failures_total").increment(1);
    }

    /// Run a whole checkpoint now, covering everything logged so far (waits
    /// for one in progress first).
    pub(super) fn checkpoint_now(&mut self) -> Result<()> {
        self.check_usable()?;
        if let Some(r) = self.checkpoint_step(true) {
            r?;
        }
        self.start_checkpoint();
        match self.checkpoint_step(true) {
            Some(r) => r,
            None => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{handle::AppendRequest, EngineConfig, FsyncPolicy};

    fn append(e: &mut Engine, user: u64, n: u8) -> u64 {
        e.begin_batch();
        let seq = e
            .append(&AppendRequest {
                user,
                msg_id: u128::from(n),
                payload: vec![n; 40],
            })
            .unwrap();
        e.commit_batch().unwrap();
        e.undo.active = false;
        e.prune_acked();
        seq
    }

    fn ack(e: &mut Engine, user: u64, up_to: u64) -> u64 {
        e.begin_batch();
        let removed = e.ack(user, up_to).unwrap();
        e.commit_batch().unwrap();
        e.undo.active = false;
        e.prune_acked();
        removed
    }

    fn seqs(e: &mut Engine, user: u64) -> Vec<(u64, u8)> {
        let page = e.fetch(user, 0, 1000, 1 << 20).unwrap();
        page.records.iter().map(|r| (r.seq, r.payload[0])).collect()
    }

    /// Every request answered between two steps of a running checkpoint
    /// sees the same mailbox as without one, and what the checkpoint
    /// commits comes back after a restart.
    #[test]
    fn requests_interleaved_with_checkpoint_steps_see_consistent_mailboxes() {
        let dir = tempfile::tempdir().unwrap();
        let config = EngineConfig {
            fsync: FsyncPolicy::Never,
            bucket_dirs: 2,
            bucket_files: 2,
            wal_segment_bytes: 256 * 1024,
            compact_min_bytes: 64,
            compact_dead_ratio: 0.2,
            ..EngineConfig::default()
        };
        let mut e = Engine::open(dir.path(), config.clone()).unwrap();
        let mut model: HashMap<u64, Vec<(u64, u8)>> = HashMap::new();
        let mut n = 0u8;
        for round in 0..6u64 {
            for user in 0..8u64 {
                for _ in 0..3 {
                    n = n.wrapping_add(1);
                    let seq = append(&mut e, user, n);
                    model.entry(user).or_default().push((seq, n));
                }
            }
            e.start_checkpoint();
            assert!(e.checkpoint_running());
            let mut steps = 0;
            // A deadline already past: one user (or bucket) per step.
            while e.checkpoint_step_until(Some(Instant::now())).is_none() {
                steps += 1;
                let user = (steps + round) % 8;
                n = n.wrapping_add(1);
                let seq = append(&mut e, user, n);
                model.entry(user).or_default().push((seq, n));
                if steps % 3 == 0 {
                    let q = model.get_mut(&user).unwrap();
                    let up_to = q[q.len() / 2].0;
                    let removed = ack(&mut e, user, up_to);
                    let before = q.len();
                    q.retain(|(s, _)| *s > up_to);
                    assert_eq!(removed as usize, before - q.len());
                }
                for u in 0..8u64 {
                    assert_eq!(
                        seqs(&mut e, u),
                        model[&u],
                        "round {round} step {steps} user {u}"
                    );
                }
            }
            assert!(steps > 8, "the checkpoint ran in steps ({steps})");
        }
        assert!(e.counters.compactions_total > 0);
        e.checkpoint_now().unwrap();
        drop(e);
        let mut e = Engine::open(dir.path(), config).unwrap();
        for u in 0..8u64 {
            assert_eq!(seqs(&mut e, u), model[&u], "after restart, user {u}");
            let stats = e.user_stats(u).unwrap();
            assert_eq!(stats.live_count as usize, model[&u].len());
            assert_eq!(stats.live_bytes as usize, model[&u].len() * 40);
        }
    }
}
