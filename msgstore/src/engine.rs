//! The storage engine: one writer thread owns every piece of shard state.
//!
//! Commands from all callers queue to it; it drains a batch, applies every
//! command to the in-memory state while encoding the log entries, writes the
//! batch's entries with one `write`, makes them durable with one `fdatasync`
//! (policy `always`), and only then answers the batch (group commit). If the
//! write or sync fails, the batch's in-memory changes are rolled back and
//! every command of the batch gets the error. Checkpoints move logged
//! records into the bucket files and the index, then trim the log.

pub(crate) mod buckets;
mod checkpoint;
mod codec;
mod durability;
mod fetch;
mod index;
mod log_buffers;
mod migrate;
mod ops;
mod recovery;
mod replicated;
mod routing;
mod snapshot;
mod state;
mod wal;
mod wire;
#[allow(unused_imports, reason = "the Raft glue in crate::raft names it")]
pub(crate) use snapshot::SnapshotSummary;
pub(crate) use wire::failed as failed_answer;

use crate::{
    handle::{AppendRequest, Fetched, Reply},
    EngineConfig, Error, FsyncPolicy, Result,
};
use buckets::Buckets;
use daemon::DirLock;
use index::Index;
use proto::shard::{MailboxStats, ShardStats};
use state::{BucketMeta, UserState};
// Keys are user ids and bucket numbers: a seeded fast hash, not SipHash.
use foldhash::{HashMap, HashSet};
use std::{
    collections::{BTreeMap, VecDeque},
    path::PathBuf,
    time::{Duration, Instant},
};
use wal::Wal;

pub(crate) enum Command {
    Append {
        req: AppendRequest,
        reply: Reply<u64>,
    },
    AppendBatch {
        items: Vec<AppendRequest>,
        reply: Reply<Vec<Result<u64>>>,
    },
    Fetch {
        user: u64,
        after_seq: u64,
        max_count: u32,
        max_bytes: u32,
        reply: Reply<Fetched>,
    },
    Ack {
        user: u64,
        up_to_seq: u64,
        reply: Reply<u64>,
    },
    UserStats {
        user: u64,
        reply: Reply<MailboxStats>,
    },
    Stats {
        reply: Reply<ShardStats>,
    },
    Checkpoint {
        reply: Reply<()>,
    },
    Close {
        reply: Reply<()>,
    },
}

/// A user changed since the last checkpoint: its state, and its logged
/// records not yet in its bucket (the memtable), oldest first. One entry
/// holds both, so an append finds them with one lookup.
#[derive(Clone)]
struct Dirty {
    state: UserState,
    pending: VecDeque<Pending>,
}

/// Every user changed since the last checkpoint.
type DirtyUsers = HashMap<u64, Dirty>;

impl Dirty {
    /// `user`'s entry in `dirty`; one made from `state` (with no memtable
    /// records) if it has none.
    fn entry(dirty: &mut DirtyUsers, user: u64, state: UserState) -> &mut Dirty {
        dirty.entry(user).or_insert_with(|| Dirty {
            state,
            pending: VecDeque::new(),
        })
    }
}

/// The cache of user states as the index has them.
type CleanStates = quick_cache::sync::Cache<u64, UserState>;

/// A logged record not yet checkpointed into its bucket.
#[derive(Clone)]
struct Pending {
    /// The batch that logged it (see [`Engine::current_batch`]).
    batch: u64,
    seq: u64,
    timestamp_ms: u64,
    msg_id: u128,
    payload: Vec<u8>,
}

/// Shard-wide totals, persisted in every checkpoint.
#[derive(Debug, Clone, Copy, Default)]
struct Totals {
    users: u64,
    live_messages: u64,
    live_bytes: u64,
}

/// What a batch changed, to put back if its log write fails: append-only
/// logs of prior values, undone newest first.
#[derive(Default)]
struct Undo {
    active: bool,
    /// (user, its dirty state, its memtable length) before a change.
    users: Vec<(u64, Option<UserState>, usize)>,
    buckets: Vec<(u32, Option<BucketMeta>)>,
    totals: Totals,
}

/// What a batch stored, counted (in [`ShardStats`] and the metrics) only
/// once the batch is: `msgstore_appends_total` never counts an append
/// whose log write failed (those are in
/// `msgstore_appends_failed_total{reason="log_write"}`).
#[derive(Debug, Default, Clone, Copy)]
struct BatchCounts {
    appends: u64,
    acks: u64,
    expired_records: u64,
    imported_records: u64,
}

/// An answer computed in a batch, sent once the batch is durable.
enum Done {
    Seq(Reply<u64>, Result<u64>),
    Seqs(Reply<Vec<Result<u64>>>, Vec<Result<u64>>),
    Fetched(Reply<Fetched>, Result<Fetched>),
    Mailbox(Reply<MailboxStats>, Result<MailboxStats>),
    Stats(Reply<ShardStats>, ShardStats),
}

impl Done {
    fn send(self) {
        // A caller that stopped waiting is not an error.
        match self {
            Done::Seq(r, v) => drop(r.send(v)),
            Done::Seqs(r, v) => drop(r.send(Ok(v))),
            Done::Fetched(r, v) => drop(r.send(v)),
            Done::Mailbox(r, v) => drop(r.send(v)),
            Done::Stats(r, v) => drop(r.send(Ok(v))),
        }
    }

    fn fail(self, e: &Error) {
        match self {
            Done::Seq(r, _) => drop(r.send(Err(e.duplicate()))),
            Done::Seqs(r, _) => drop(r.send(Err(e.duplicate()))),
            Done::Fetched(r, _) => drop(r.send(Err(e.duplicate()))),
            Done::Mailbox(r, _) => drop(r.send(Err(e.duplicate()))),
            Done::Stats(r, v) => drop(r.send(Ok(v))),
        }
    }
}

pub(crate) struct Engine {
    dir: PathBuf,
    config: EngineConfig,
    _lock: DirLock,
    index: std::sync::Arc<Index>,
    /// Shared with a running checkpoint's helper thread.
    buckets: std::sync::Arc<std::sync::Mutex<Buckets>>,
    /// Buckets that have a file; absent ones are `BucketMeta::default()`.
    bucket_meta: HashMap<u32, BucketMeta>,
    /// Users changed since the last checkpoint, with their memtable
    /// records (the index has the rest).
    dirty: DirtyUsers,
    /// Recently checkpointed user states, exactly as the index has them
    /// (filled by checkpoint helper threads).
    clean: std::sync::Arc<CleanStates>,
    /// The last merged checkpoint's map, emptied, to become the next
    /// `dirty` (see [`Engine::start_checkpoint`]).
    spare_dirty: Option<DirtyUsers>,
    wal: Wal,
    totals: Totals,
    counters: ShardStats,
    poisoned: Option<String>,
    unsynced: bool,
    last_sync: Instant,
    last_checkpoint: Instant,
    /// The log's length since the last checkpoint when it was last seen
    /// to change, and when: the shard is idle once it has not for
    /// `checkpoint_idle_ms`.
    log_grew: (u64, Instant),
    /// The memory kept for the next load was given back since the log
    /// last grew (see [`Engine::release_idle_memory`]).
    idle_released: bool,
    wal_buf: Vec<u8>,
    undo: Undo,
    /// What the open batch stored so far (see [`BatchCounts`]).
    batch_counts: BatchCounts,
    /// The same of each batch whose deferred log write is in flight.
    deferred_counts: BTreeMap<u64, BatchCounts>,
    /// The first batch whose deferred log write failed: it and every
    /// later one are answered with the error.
    failed_batch: Option<u64>,
    acked_in_batch: Vec<u64>,
    compact_candidates: HashSet<u32>,
    /// The checkpoint in progress, if any.
    job: Option<checkpoint::Job>,
    /// After a failed checkpoint, the next is not started before this.
    checkpoint_retry_at: Instant,
    /// Deferred log writes handed out and not reported back yet.
    log_inflight: usize,
    /// The same writes as their writers report them: what a checkpoint
    /// started with writes in flight waits for.
    log_durability: std::sync::Arc<durability::LogDurability>,
    /// Buffers the log writers give back, for the next batches' bytes.
    log_buffers: std::sync::Arc<log_buffers::LogBuffers>,
    /// The cluster maps this shard routes by, if installed.
    routing: Option<routing::RoutingTable>,
    /// Users whose writes are refused while they are being moved.
    frozen: HashMap<u64, migrate::Freeze>,
    /// Number of the open batch (0 before the first: recovery).
    batch: u64,
    /// Users whose acknowledged seq moved while a checkpoint ran (with
    /// repeats): the merge counts their flushed-but-acknowledged records.
    acked_during_job: Vec<u64>,
    /// The clock set by [`Engine::set_clock_ms`] (ms since the epoch);
    /// `None`: the system wall clock.
    clock_ms: Option<u64>,
    /// The state machine of a Raft group ([`Engine::open_replicated`]):
    /// batches write no log.
    replicated: bool,
    /// Checkpoint meta other than the log position changed since the last
    /// checkpoint started (the applied marker; a replicated shard's frozen
    /// users or routing; its first checkpoint's new log start): the next
    /// checkpoint runs even if no user changed.
    meta_dirty: bool,
    /// The marker of the last applied Raft entry ([`Engine::set_applied`]).
    applied: Option<Vec<u8>>,
}

/// A batch's log bytes and where they go; see [`Engine::end_batch_deferred`].
pub(crate) struct DeferredWrite {
    /// The batch it logs.
    #[cfg(test)]
    batch: u64,
    write: wal::LogWrite,
    bytes: Vec<u8>,
    /// Reports the outcome to a checkpoint that waits for this write.
    ticket: durability::WriteTicket,
    /// Where `bytes` go back once written.
    buffers: std::sync::Arc<log_buffers::LogBuffers>,
}

impl DeferredWrite {
    #[cfg(test)]
    pub(crate) fn batch(&self) -> u64 {
        self.batch
    }

    /// Write and (the log being `O_DSYNC`) make durable. (Dropping the
    /// write unperformed counts as a failure.)
    pub(crate) fn perform(self) -> Result<(), String> {
        let result = self
            .write
            .perform(&self.bytes)
            .map_err(|f| f.error.to_string());
        self.ticket
            .finish(result.as_ref().map(|_| ()).map_err(|e| e.as_str()));
        self.buffers.give_back(self.bytes);
        result
    }
}

/// Pause between a failed checkpoint and the next attempt.
const CHECKPOINT_RETRY_DELAY: Duration = Duration::from_secs(1);

/// How often a running checkpoint is looked at when nothing else happens.
const CHECKPOINT_POLL: Duration = Duration::from_millis(5);
/// Bucket files an idle shard trims per tick at most (each an `ftruncate`
/// under the bucket maps' lock), with a tick every [`CHECKPOINT_POLL`]
/// until all are.
const TRIM_FILES_PER_TICK_MAX: usize = 256;

impl Engine {
    pub(crate) fn run(mut self, rx: flume::Receiver<Command>) {
        let mut batch = Vec::with_capacity(self.config.batch_requests_max);
        loop {
            if self.checkpoint_stalled() {
                // Back-pressure, as in the daemon: callers wait (their queue
                // is bounded) while the checkpoint catches up.
                self.merge_checkpoint(true);
            }
            match rx.recv_timeout(self.next_wakeup()) {
                Ok(cmd) => batch.push(cmd),
                Err(flume::RecvTimeoutError::Timeout) => {
                    self.tick();
                    continue;
                }
                Err(flume::RecvTimeoutError::Disconnected) => break,
            }
            while batch.len() < self.config.batch_requests_max {
                match rx.try_recv() {
                    Ok(cmd) => batch.push(cmd),
                    Err(_) => break,
                }
            }
            let close = self.process_batch(&mut batch);
            self.tick();
            if let Some(reply) = close {
                drop(rx);
                let _ = reply.send(self.shutdown());
                return;
            }
        }
        if let Err(e) = self.shutdown() {
            tracing::error!(error = %e, "msgstore shutdown failed");
        }
    }

    fn process_batch(&mut self, batch: &mut Vec<Command>) -> Option<Reply<()>> {
        self.begin_batch();
        let mut done = Vec::with_capacity(batch.len());
        let mut checkpoints = Vec::new();
        let mut close = None;
        metrics::histogram!("msgstore_batch_requests").record(batch.len() as f64);
        for cmd in batch.drain(..) {
            match cmd {
                Command::Append { req, reply } => done.push(Done::Seq(reply, self.append(req))),
                Command::AppendBatch { items, reply } => {
                    let results = items.into_iter().map(|r| self.append(r)).collect();
                    done.push(Done::Seqs(reply, results));
                }
                Command::Fetch {
                    user,
                    after_seq,
                    max_count,
                    max_bytes,
                    reply,
                } => done.push(Done::Fetched(
                    reply,
                    self.fetch(user, after_seq, max_count, max_bytes),
                )),
                Command::Ack {
                    user,
                    up_to_seq,
                    reply,
                } => done.push(Done::Seq(reply, self.ack(user, up_to_seq))),
                Command::UserStats { user, reply } => {
                    done.push(Done::Mailbox(reply, self.user_stats(user)))
                }
                Command::Stats { reply } => done.push(Done::Stats(reply, self.stats())),
                Command::Checkpoint { reply } => checkpoints.push(reply),
                Command::Close { reply } => close = Some(reply),
            }
        }
        match self.end_batch() {
            Ok(()) => done.into_iter().for_each(Done::send),
            Err(e) => done.into_iter().for_each(|d| d.fail(&e)),
        }
        for reply in checkpoints {
            let _ = reply.send(self.checkpoint_now());
        }
        close
    }

    /// Open a batch: what the requests until [`Engine::end_batch`] change
    /// is logged together and undone together if the log write fails.
    pub(crate) fn begin_batch(&mut self) {
        self.batch += 1;
        self.wal_buf.clear();
        self.acked_in_batch.clear();
        self.undo.users.clear();
        self.undo.buckets.clear();
        self.undo.totals = self.totals;
        self.undo.active = true;
        self.batch_counts = BatchCounts::default();
    }

    /// Close the batch: write its log entries and reach the policy's
    /// durability point; answers may be sent once this returns `Ok`. On
    /// error the batch's changes are undone and every answer of the batch
    /// must become that error.
    pub(crate) fn end_batch(&mut self) -> Result<()> {
        match self.commit_batch() {
            Ok(()) => {
                self.batch_committed();
                let counts = std::mem::take(&mut self.batch_counts);
                self.count_stored(counts);
                Ok(())
            }
            Err(e) => {
                self.rollback();
                Err(e)
            }
        }
    }

    /// Close the batch like [`Engine::end_batch`], but under `always` hand
    /// the durable write to the caller instead of waiting for it: the
    /// returned [`DeferredWrite`] must be performed (on another thread, in
    /// the order batches were closed) and reported back with
    /// [`Engine::log_write_done`] before the batch's answers are sent. The
    /// owner meanwhile answers the next batch (pipelined group commit). A
    /// batch with nothing to log, or under another policy, is committed
    /// here and `None` returned.
    pub(crate) fn end_batch_deferred(&mut self) -> Result<Option<DeferredWrite>> {
        if self.replicated || self.config.fsync != FsyncPolicy::Always || self.wal_buf.is_empty() {
            return self.end_batch().map(|()| None);
        }
        let reserved = self
            .settle_before_rotation(self.wal_buf.len() as u64)
            .and_then(|()| self.wal.reserve(self.wal_buf.len() as u64));
        let write = match reserved {
            Ok(write) => write,
            Err(e) => {
                self.rollback();
                return Err(e);
            }
        };
        let bytes = std::mem::replace(&mut self.wal_buf, self.log_buffers.take());
        self.batch_logged();
        self.batch_committed();
        let counts = std::mem::take(&mut self.batch_counts);
        self.deferred_counts.insert(self.batch, counts);
        self.log_inflight += 1;
        let ticket = self.log_durability.issue();
        Ok(Some(DeferredWrite {
            #[cfg(test)]
            batch: self.batch,
            write,
            bytes,
            ticket,
            buffers: self.log_buffers.clone(),
        }))
    }

    /// The batch's changes stand: stop recording undo, drop what it acked
    /// from the memtable.
    fn batch_committed(&mut self) {
        self.undo.active = false;
        self.prune_acked();
    }

    fn batch_logged(&mut self) {
        self.counters.batches_total += 1;
        metrics::counter!("msgstore_batches_total").increment(1);
    }

    /// The deferred write of `batch` finished. A failure poisons the
    /// engine: batches closed after it were applied on top of it and cannot
    /// be taken back, so the owner must answer them with the error and
    /// reopen the shard.
    pub(crate) fn log_write_done(&mut self, batch: u64, result: &Result<(), String>) {
        self.log_inflight -= 1;
        match result {
            Ok(()) => {
                self.counters.syncs_total += 1;
                metrics::counter!("msgstore_syncs_total").increment(1);
            }
            Err(e) => {
                self.poison(e);
                let first = self.failed_batch.map_or(batch, |f| f.min(batch));
                self.failed_batch = Some(first);
                // This batch and every later one are answered with the error.
                for (_, counts) in self.deferred_counts.split_off(&first) {
                    Self::count_lost(counts);
                }
            }
        }
        if let Some(counts) = self.deferred_counts.remove(&batch) {
            self.count_stored(counts);
        }
    }

    /// A batch's changes are stored: count them.
    fn count_stored(&mut self, c: BatchCounts) {
        self.counters.appends_total += c.appends;
        self.counters.acks_total += c.acks;
        for (name, n) in [
            ("msgstore_appends_total", c.appends),
            ("msgstore_acks_total", c.acks),
            ("msgstore_expired_records_total", c.expired_records),
            ("msgstore_imported_records_total", c.imported_records),
        ] {
            if n > 0 {
                metrics::counter!(name).increment(n);
            }
        }
    }

    /// A batch's log write failed: its appends were not stored.
    fn count_lost(c: BatchCounts) {
        if c.appends > 0 {
            metrics::counter!(
                "msgstore_appends_failed_total",
                "reason" => crate::metrics::APPEND_FAILED_LOG_WRITE
            )
            .increment(c.appends);
        }
    }

    /// Before `len` log bytes start a new segment, wait until every
    /// deferred write handed out so far (each into the old segment) is
    /// durable. Replay reads a segment's zeros as its clean end and goes on
    /// with the next segment: had a write into the new segment become
    /// durable before one still in flight into the old, a kill between the
    /// two would replay the later batch without the earlier one, a gap in
    /// its users' seqs. (Within a segment replay stops at such a gap.) Once
    /// per segment, for the few writes the server keeps in flight.
    fn settle_before_rotation(&self, len: u64) -> Result<()> {
        if !self.wal.rotates_for(len) {
            return Ok(());
        }
        self.log_durability
            .wait_durable(self.log_durability.issued())
            .map_err(|e| {
                Error::Storage(format!(
                    "a log write into the segment being closed failed: {e}"
                ))
            })
    }

    /// Write the batch's log entries and reach the policy's durability point.
    fn commit_batch(&mut self) -> Result<()> {
        if self.wal_buf.is_empty() {
            return Ok(());
        }
        if self.replicated {
            self.count_unlogged();
            return Ok(());
        }
        self.settle_before_rotation(self.wal_buf.len() as u64)?;
        if let Err(failed) = self.wal.write(&self.wal_buf) {
            if !failed.log_intact {
                self.poison(&failed.error);
            }
            return Err(failed.error.into());
        }
        self.batch_logged();
        match self.config.fsync {
            FsyncPolicy::Always => self.sync_wal(),
            FsyncPolicy::IntervalMs(_) | FsyncPolicy::Never => {
                self.unsynced = true;
                Ok(())
            }
        }
    }

    fn sync_wal(&mut self) -> Result<()> {
        if let Err(e) = self.wal.sync() {
            // After a failed fsync the page cache can no longer be trusted
            // (the kernel may have dropped the dirty pages): stop writing.
            self.poison(&e);
            return Err(e.into());
        }
        self.unsynced = false;
        self.last_sync = Instant::now();
        self.counters.syncs_total += 1;
        metrics::counter!("msgstore_syncs_total").increment(1);
        Ok(())
    }

    fn poison(&mut self, e: &dyn std::fmt::Display) {
        tracing::error!(error = %e, "msgstore log write failed; refusing further writes until restart");
        self.poisoned = Some(e.to_string());
    }

    fn rollback(&mut self) {
        Self::count_lost(std::mem::take(&mut self.batch_counts));
        self.undo.active = false;
        // Newest first: a user saved twice ends at its first saved value.
        for (user, prev, len) in self.undo.users.drain(..).rev() {
            match prev {
                Some(state) => {
                    let d = Dirty::entry(&mut self.dirty, user, state);
                    d.state = state;
                    d.pending.truncate(len);
                }
                None => {
                    // Not dirty before: it had no memtable records either.
                    debug_assert_eq!(len, 0);
                    self.dirty.remove(&user);
                }
            }
        }
        for (bucket, prev) in self.undo.buckets.drain(..).rev() {
            match prev {
                Some(m) => self.bucket_meta.insert(bucket, m),
                None => self.bucket_meta.remove(&bucket),
            };
        }
        self.totals = self.undo.totals;
    }

    /// Drop memtable records acknowledged in the batch just committed.
    fn prune_acked(&mut self) {
        if self.job.is_some() {
            self.acked_during_job
                .extend_from_slice(&self.acked_in_batch);
        }
        for user in std::mem::take(&mut self.acked_in_batch) {
            let Some(d) = self.dirty.get_mut(&user) else {
                continue;
            };
            let acked = d.state.acked_seq;
            while d.pending.front().is_some_and(|p| p.seq <= acked) {
                d.pending.pop_front();
            }
        }
    }

    /// How long the owner may wait before calling [`Engine::tick`].
    pub(crate) fn next_wakeup(&self) -> Duration {
        let mut wake = Duration::from_secs(1);
        if self.checkpoint_running() || self.idle_and_checkpointed() {
            wake = CHECKPOINT_POLL;
        } else if self.has_changes() {
            let idle_due = self
                .config
                .checkpoint_idle()
                .saturating_sub(self.log_grew.1.elapsed());
            wake = wake.min(idle_due.max(Duration::from_millis(1)));
        }
        if let (true, FsyncPolicy::IntervalMs(ms)) = (self.unsynced, self.config.fsync) {
            let due = Duration::from_millis(ms).saturating_sub(self.last_sync.elapsed());
            wake = wake.min(due.max(Duration::from_millis(1)));
        }
        wake
    }

    /// Time-driven work: interval syncs and due checkpoint steps. Only
    /// between batches.
    pub(crate) fn tick(&mut self) {
        if let (true, FsyncPolicy::IntervalMs(ms)) = (self.unsynced, self.config.fsync) {
            if self.last_sync.elapsed() >= Duration::from_millis(ms) && self.poisoned.is_none() {
                let _ = self.sync_wal();
            }
        }
        if self.poisoned.is_some() {
            return;
        }
        self.note_log_growth();
        if self.checkpoint_running() {
            self.merge_checkpoint(false);
            // At once: an idle checkpoint just merged frees the memory it
            // leaves unused before anything can look at the shard.
            self.release_idle_memory();
            return;
        }
        // A checkpoint covers the log up to its start (the open batch is
        // empty here); before it commits the index it waits for the log
        // writes still in flight (see `durability`).
        if self.checkpoint_due() {
            if let Err(e) = self.start_checkpoint() {
                tracing::error!(error = %e, "msgstore checkpoint could not start; will retry");
            }
        }
        self.release_idle_memory();
    }

    /// Merge the running checkpoint if it is done (or, with `wait`, once it
    /// is); a failure is logged and the checkpoint retried later.
    fn merge_checkpoint(&mut self, wait: bool) {
        if let Some(Err(e)) = self.poll_checkpoint(wait) {
            tracing::error!(error = %e, "msgstore checkpoint failed; will retry");
        }
    }

    /// Checkpoints are behind: one is running and the log not yet
    /// checkpointed (with the open batch's entries) exceeds
    /// `checkpoint_stall_wal_bytes`. The server then reads no new requests
    /// until this turns false.
    pub(crate) fn checkpoint_stalled(&self) -> bool {
        let behind = self.wal.bytes_since_checkpoint + self.wal_buf.len() as u64;
        self.checkpoint_running() && behind > self.config.checkpoint_stall_wal_bytes
    }

    /// A checkpoint should start: `checkpoint_wal_bytes` of log since the
    /// last, or its interval passed with something changed (and none runs,
    /// and no failed one waits for its retry time).
    fn checkpoint_due(&self) -> bool {
        if self.poisoned.is_some()
            || self.checkpoint_running()
            || Instant::now() < self.checkpoint_retry_at
        {
            return false;
        }
        let bytes_due = self.wal.bytes_since_checkpoint >= self.config.checkpoint_wal_bytes;
        let time_due = self.last_checkpoint.elapsed() >= self.config.checkpoint_interval()
            || self.log_grew.1.elapsed() >= self.config.checkpoint_idle();
        bytes_due || (time_due && self.has_changes())
    }

    /// Something changed since the last checkpoint started.
    fn has_changes(&self) -> bool {
        !self.dirty.is_empty() || !self.compact_candidates.is_empty() || self.meta_dirty
    }

    /// Note whether the log grew since the last look (see `log_grew`).
    fn note_log_growth(&mut self) {
        let len = self.wal.bytes_since_checkpoint;
        if len != self.log_grew.0 {
            self.log_grew = (len, Instant::now());
            self.idle_released = false;
        }
    }

    /// Once the shard is idle and wholly checkpointed, give back the
    /// memory kept to make the next load's first batches cheap (the
    /// emptied memtable maps, sized for the last load's users, and the
    /// spare log buffers) and the pages of what was freed, so an idle
    /// shard holds little but its cache of clean states. Only between
    /// batches.
    fn release_idle_memory(&mut self) {
        if !self.idle_and_checkpointed() || !self.trim_bucket_room() {
            return;
        }
        self.dirty = DirtyUsers::default();
        self.spare_dirty = None;
        self.wal_buf = Vec::new();
        self.log_buffers.release();
        // The memtable the checkpoint freed, too.
        daemon::heap::release_freed_pages();
        self.idle_released = true;
    }

    /// Idle for `checkpoint_idle_ms`, wholly checkpointed, and not yet
    /// tidied since the log last grew.
    fn idle_and_checkpointed(&self) -> bool {
        let idle = self.log_grew.1.elapsed() >= self.config.checkpoint_idle();
        !self.idle_released && idle && !self.checkpoint_running() && !self.has_changes()
    }

    /// Cut the room grown bucket files keep past their records, at most
    /// [`TRIM_FILES_PER_TICK_MAX`] files a call so fetches (which wait for
    /// the bucket maps) and a new load (which waits for the next tick)
    /// are not held up; true once none is left. A failure is logged and
    /// the rest left for the next idle spell.
    fn trim_bucket_room(&mut self) -> bool {
        let meta = &self.bucket_meta;
        let committed = |b: u32| meta.get(&b).map(|m| (m.gen, m.len));
        let trimmed = self
            .buckets
            .lock()
            .expect("bucket maps")
            .trim(TRIM_FILES_PER_TICK_MAX, committed);
        match trimmed {
            Ok(t) => {
                metrics::counter!("msgstore_bucket_bytes_trimmed_total").increment(t.bytes);
                !t.more
            }
            Err(e) => {
                tracing::warn!(error = %e, "msgstore could not trim a bucket file; left as it is");
                true
            }
        }
    }

    /// Number of the open batch; batches are numbered in the order they
    /// are opened, and a record remembers the batch that logged it.
    pub(crate) fn current_batch(&self) -> u64 {
        self.batch
    }

    pub(crate) fn log_inflight(&self) -> usize {
        self.log_inflight
    }

    /// Sync and checkpoint everything; the engine can then be dropped.
    pub(crate) fn shutdown(&mut self) -> Result<()> {
        if self.poisoned.is_some() {
            return Ok(());
        }
        if self.unsynced {
            self.sync_wal()?;
        }
        self.checkpoint_now()
    }

    /// The engine's clock (ms since the Unix epoch): the last value given
    /// to [`Engine::set_clock_ms`], else the system wall clock.
    pub(super) fn now_ms(&self) -> u64 {
        self.clock_ms.unwrap_or_else(ops::system_now_ms)
    }

    fn check_usable(&self) -> Result<()> {
        match &self.poisoned {
            Some(m) => Err(Error::Poisoned(m.clone())),
            None => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    };

    /// Under `always`, appends one record of `payload_bytes` to `user` and
    /// closes the batch the way the server does: its write handed back.
    pub(crate) fn append_deferred(
        e: &mut Engine,
        user: u64,
        payload_bytes: usize,
    ) -> DeferredWrite {
        e.begin_batch();
        e.append(AppendRequest {
            user,
            msg_id: 1,
            payload: vec![7; payload_bytes],
        })
        .unwrap();
        e.end_batch_deferred().unwrap().expect("a log write")
    }

    /// A shard whose log stops growing checkpoints once
    /// `checkpoint_idle_ms` passed, and then lets go of the memory it kept
    /// for the next load; a new append makes it busy again.
    #[test]
    fn an_idle_shard_checkpoints_and_releases_its_spare_memory() {
        let dir = tempfile::tempdir().unwrap();
        let config = EngineConfig {
            fsync: FsyncPolicy::Always,
            bucket_dirs: 1,
            bucket_files: 1,
            checkpoint_idle_ms: 1,
            ..EngineConfig::default()
        };
        let mut e = Engine::open(dir.path(), config).unwrap();
        let write = append_deferred(&mut e, 1, 100);
        e.log_write_done(write.batch(), &write.perform());
        e.tick();
        assert!(e.wal.bytes_since_checkpoint > 0 && !e.idle_released);
        std::thread::sleep(Duration::from_millis(20));
        e.tick();
        while e.checkpoint_running() {
            std::thread::sleep(Duration::from_millis(1));
            e.tick();
        }
        assert_eq!(e.counters.checkpoints_total, 1, "the idle checkpoint ran");
        assert_eq!(e.wal.bytes_since_checkpoint, 0);
        assert!(e.idle_released && e.spare_dirty.is_none());
        assert_eq!(e.dirty.capacity(), 0);
        let write = append_deferred(&mut e, 1, 100);
        e.log_write_done(write.batch(), &write.perform());
        e.tick();
        assert!(!e.idle_released, "busy again");
    }

    /// Run ticks until the shard is idle, checkpointed and tidied.
    fn tick_until_tidied(e: &mut Engine) {
        for _ in 0..10_000 {
            if e.idle_released {
                return;
            }
            std::thread::sleep(Duration::from_millis(1));
            e.tick();
        }
        panic!("the shard did not tidy up");
    }

    /// The room a grown bucket file keeps past its records is cut once the
    /// shard is idle (every file, over several ticks), never below what
    /// the index committed: everything reads back, after a reopen too, and
    /// the files grow again for new records.
    #[test]
    fn an_idle_shard_trims_the_room_of_grown_bucket_files() {
        let dir = tempfile::tempdir().unwrap();
        let config = EngineConfig {
            fsync: FsyncPolicy::Always,
            bucket_dirs: 4,
            bucket_files: 128,
            checkpoint_idle_ms: 1,
            ..EngineConfig::default()
        };
        let users = 1024u64;
        let per_user = 12;
        let mut e = Engine::open(dir.path(), config.clone()).unwrap();
        for _ in 0..per_user {
            for user in 0..users {
                let write = append_deferred(&mut e, user, 150);
                e.log_write_done(write.batch(), &write.perform());
            }
        }
        // Files are created with one block and grow from there.
        let untrimmed = |e: &Engine| -> usize {
            let buckets = e.buckets.lock().unwrap();
            let grown = e.bucket_meta.iter().filter(|(b, m)| {
                let len = std::fs::metadata(buckets.path(**b)).unwrap().len();
                len != m.len.max(buckets::BUCKET_FILE_BYTES_MIN)
            });
            grown.count()
        };
        e.checkpoint_now().unwrap();
        assert!(untrimmed(&e) > 0, "the files have room to cut");
        tick_until_tidied(&mut e);
        assert!(
            e.bucket_meta.len() > TRIM_FILES_PER_TICK_MAX,
            "more than one tick's"
        );
        assert_eq!(untrimmed(&e), 0, "every grown file cut to its records");
        let read_all = |e: &mut Engine, n: usize| {
            for user in 0..users {
                let got = e.fetch(user, 0, 1000, 1 << 20).unwrap();
                assert_eq!(got.records.len(), n, "user {user}");
                assert!(got.records.iter().all(|r| r.payload == vec![7; 150]));
            }
        };
        read_all(&mut e, per_user);
        drop(e); // as a crash: no shutdown
        let mut e = Engine::open(dir.path(), config).unwrap();
        read_all(&mut e, per_user);
        for user in 0..users {
            let write = append_deferred(&mut e, user, 150);
            e.log_write_done(write.batch(), &write.perform());
        }
        tick_until_tidied(&mut e);
        read_all(&mut e, per_user + 1);
        assert_eq!(untrimmed(&e), 0);
    }

    /// An append counts (`appends_total`, `msgstore_appends_total`) once
    /// its batch is durable, never when its log write failed: neither the
    /// failed batch nor one closed after it (answered with the error too).
    #[test]
    fn appends_count_once_stored_and_never_when_their_log_write_failed() {
        let dir = tempfile::tempdir().unwrap();
        let config = EngineConfig {
            fsync: FsyncPolicy::Always,
            bucket_dirs: 1,
            bucket_files: 1,
            ..EngineConfig::default()
        };
        let mut e = Engine::open(dir.path(), config).unwrap();
        let first = append_deferred(&mut e, 1, 100);
        assert_eq!(e.counters.appends_total, 0, "not durable yet");
        e.log_write_done(first.batch(), &first.perform());
        assert_eq!(e.counters.appends_total, 1);
        let failed = append_deferred(&mut e, 1, 100);
        let later = append_deferred(&mut e, 2, 100);
        let (failed_batch, later_batch) = (failed.batch(), later.batch());
        drop(failed);
        e.log_write_done(failed_batch, &Err("No space left on device".into()));
        e.log_write_done(later_batch, &later.perform());
        assert_eq!(
            e.counters.appends_total, 1,
            "the failed batch and the one after it"
        );
        e.begin_batch();
        let refused = e.append(AppendRequest {
            user: 3,
            msg_id: 1,
            payload: vec![1],
        });
        assert!(matches!(refused, Err(Error::Poisoned(_))), "{refused:?}");
        e.end_batch().unwrap();
        assert_eq!(e.counters.appends_total, 1, "a refused append");
    }

    /// A batch that starts a new log segment is handed out only once every
    /// write into the old segment is durable: otherwise a kill could leave
    /// the later batch in the new segment and the earlier one missing from
    /// the old, and replay (which takes the old segment's zeros for its
    /// end) would bring back the later one after a gap.
    #[test]
    fn a_write_into_a_new_segment_waits_for_those_into_the_old() {
        let dir = tempfile::tempdir().unwrap();
        let segment_bytes = 64 * 1024;
        let config = EngineConfig {
            fsync: FsyncPolicy::Always,
            bucket_dirs: 1,
            bucket_files: 1,
            wal_segment_bytes: segment_bytes,
            ..EngineConfig::default()
        };
        let mut e = Engine::open(dir.path(), config.clone()).unwrap();
        let first = append_deferred(&mut e, 1, 40 * 1024);
        e.log_write_done(first.batch(), &first.perform());
        // Still fits in the first segment; left in flight.
        let in_flight = append_deferred(&mut e, 1, 100);
        let in_flight_batch = in_flight.batch();
        let segment = e.wal.position().segment;
        let performed = Arc::new(AtomicBool::new(false));
        let writer = {
            let performed = performed.clone();
            std::thread::spawn(move || {
                // Long enough for an engine that does not wait to hand the
                // next write out first; an engine that waits is correct
                // however long this takes.
                std::thread::sleep(std::time::Duration::from_millis(100));
                let result = in_flight.perform();
                performed.store(true, Ordering::SeqCst);
                result
            })
        };
        // Does not fit: goes to the next segment.
        let next = append_deferred(&mut e, 1, 40 * 1024);
        assert!(
            performed.load(Ordering::SeqCst),
            "a write into the next segment was handed out while one into the old was in flight"
        );
        assert_eq!(e.wal.position().segment, segment + 1);
        e.log_write_done(in_flight_batch, &writer.join().unwrap());
        e.log_write_done(next.batch(), &next.perform());
        drop(e); // a kill: no checkpoint
        let mut e = Engine::open(dir.path(), config).unwrap();
        let seqs: Vec<u64> = e
            .fetch(1, 0, 100, 1 << 20)
            .unwrap()
            .records
            .iter()
            .map(|r| r.seq)
            .collect();
        assert_eq!(seqs, [1, 2, 3]);
    }
}
