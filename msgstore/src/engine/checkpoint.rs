//! Checkpoints: move logged records into their bucket files, compact buckets
//! whose dead share is over the threshold, record everything in the index
//! in one transaction, then trim the log.
//!
//! The work runs on a helper thread while the owner of the engine keeps
//! answering requests. At the start the engine hands the job its state as
//! of the log position P, by moving it out: the changed users, each with
//! its state and memtable records (`snapshot`). Until the job is merged
//! back, lookups fall through `dirty` -> `snapshot` -> index, and a user's
//! unflushed records are its snapshot's then its `dirty` entry's. The
//! helper appends the snapshot's records past each bucket's committed
//! length, which nothing reads until the merge, so readers never see a
//! half-written chain.
//!
//! Order (docs/STORAGE.md explains why each crash point is safe):
//! 1. (owner) note P; move `dirty` (states and memtable) into the job;
//! 2. (helper) write the snapshot's records into bucket maps past each bucket's
//!    `len`, chained from the snapshot's tails;
//! 3. (helper) write compacted copies of candidate buckets to `compact/`,
//!    synced;
//! 4. (helper) `syncfs`: every bucket byte written so far is durable; then
//!    wait until every log write issued before P is durable (under
//!    `always` the job may start while some are in flight: see
//!    `durability`); if one failed, the job fails here;
//! 5. (helper) one LMDB transaction: the snapshot's user states with their
//!    new tails, bucket states, `wal_start = P`, the compacted files to swap
//!    in; commit; then the committed states (but those of compacted
//!    buckets) into the clean-state cache;
//! 6. (owner) merge: new tails and lengths into the live state, rename
//!    compacted files over their buckets (and cache their users' states),
//!    count what was acknowledged meanwhile as dead, delete log segments
//!    wholly before P.

use super::{
    buckets::{compacted_path, header_gen, Buckets},
    codec::{encode_record, read_record, record_stored_bytes, MessageHeader, NO_PREV},
    durability::LogDurability,
    index::{CheckpointMeta, ExtraMeta, Index},
    state::{BucketMeta, UserState, BUCKET_HEADER_BYTES},
    wal::Position,
    CleanStates, Dirty, DirtyUsers, Engine, Pending, Totals,
};
use crate::{Error, Result};
// Keys are user ids and bucket numbers: a seeded fast hash, not SipHash.
use foldhash::{HashMap, HashMapExt, HashSet};
use std::{
    collections::VecDeque,
    os::fd::AsRawFd,
    path::{Path, PathBuf},
    sync::{Arc, Mutex, OnceLock},
    time::Instant,
};

/// What the helper thread works from: the engine's state as of `position`.
struct JobInput {
    position: Position,
    snapshot: Arc<DirtyUsers>,
    /// Every bucket's state as of `position`.
    metas: HashMap<u32, BucketMeta>,
    candidates: Vec<u32>,
    /// Flush buckets in descending order (every other checkpoint): the
    /// maps the last sweep used most recently are the first this one
    /// needs, instead of the first the map set evicts.
    descending: bool,
    totals: Totals,
    dir: PathBuf,
    buckets: Arc<Mutex<Buckets>>,
    index: Arc<Index>,
    clean: Arc<CleanStates>,
    /// Log writes issued before `position` (up to this number) that may
    /// still be in flight: the index is committed only once they are
    /// durable.
    log: Arc<LogDurability>,
    log_written_through: u64,
    /// Filled just before the commit: see [`Job::superseded`].
    superseded: Arc<OnceLock<Superseded>>,
    /// Meta entries as of `position` (the applied marker; a replicated
    /// shard's frozen users and routing), committed with the rest.
    extra_meta: ExtraMeta,
}

/// Index states a job's commit replaces although the engine does not hold
/// them in the job's snapshot: those of users in compacted buckets who did
/// not change before the job started. Keyed by user.
pub(super) type Superseded = HashMap<u64, UserState>;

/// A compacted copy of one bucket, in place once the job is merged.
struct Compaction {
    bucket: u32,
    meta: BucketMeta,
    states: Vec<(u64, UserState)>,
    /// The index states that `states` replace, of users not in the
    /// snapshot (the snapshot holds the others' current states).
    superseded: Vec<(u64, UserState)>,
}

/// What the helper thread did, once the index has it.
struct JobDone {
    /// New state of every flushed user (only its tail moved).
    flushed: Vec<(u64, UserState)>,
    /// New lengths of the buckets written.
    lens: HashMap<u32, u64>,
    compactions: Vec<Compaction>,
    /// Committed states of users in compacted buckets: they go into the
    /// clean cache only once the compacted files are in place.
    clean_after_swap: Vec<(u64, UserState)>,
    /// Milliseconds spent in each step, for the log.
    steps: StepTimes,
}

/// Where a checkpoint's time went (milliseconds).
#[derive(Debug, Default)]
struct StepTimes {
    flush: u64,
    compact: u64,
    sync: u64,
    log_wait: u64,
    commit: u64,
}

/// Milliseconds since `*at`; moves `*at` to now.
fn lap(at: &mut Instant) -> u64 {
    let ms = at.elapsed().as_millis() as u64;
    *at = Instant::now();
    ms
}

/// A checkpoint in progress.
pub(super) struct Job {
    position: Position,
    pub(super) snapshot: Arc<DirtyUsers>,
    /// Published by the helper before it commits the index; until the
    /// merge these are the states that match the bucket files in place.
    /// Once the commit is visible the index already holds the compacted
    /// files' offsets for these users, but those files are renamed into
    /// place only by the merge: a user read from the index meanwhile must
    /// be read as it was (see [`Engine::load_user`]).
    pub(super) superseded: Arc<OnceLock<Superseded>>,
    candidates: Vec<u32>,
    log_bytes: u64,
    /// The job carries changed checkpoint meta (see [`Engine::meta_dirty`]).
    meta_dirty: bool,
    started: Instant,
    done: flume::Receiver<Result<JobDone>>,
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

pub(super) fn lock(buckets: &Mutex<Buckets>) -> std::sync::MutexGuard<'_, Buckets> {
    // A panic while holding the lock cannot leave a map half-updated in a
    // way later readers trust: records are checked by checksum.
    buckets.lock().unwrap_or_else(|p| p.into_inner())
}

impl Engine {
    pub(super) fn checkpoint_running(&self) -> bool {
        self.job.is_some()
    }

    /// Start a checkpoint job on a helper thread if there is anything to
    /// checkpoint and none is running.
    pub(super) fn start_checkpoint(&mut self) -> Result<()> {
        self.last_checkpoint = Instant::now();
        if self.job.is_some() || !self.has_changes() {
            return Ok(());
        }
        // First: it may fail, and nothing has moved yet.
        let extra_meta = self.extra_meta()?;
        let meta_dirty = std::mem::take(&mut self.meta_dirty);
        // The next map starts from the last job's (cleared, its memory
        // kept): a map regrown from empty rehashes on the server thread and
        // faults in fresh pages at every doubling.
        let spare = self.spare_dirty.take().unwrap_or_default();
        let snapshot = Arc::new(std::mem::replace(&mut self.dirty, spare));
        let candidates: Vec<u32> = self.compact_candidates.drain().collect();
        let superseded = Arc::new(OnceLock::new());
        let input = JobInput {
            position: self.wal.position(),
            snapshot: snapshot.clone(),
            // The whole map (a quick copy); the helper picks what it touches.
            metas: self.bucket_meta.clone(),
            candidates: candidates.clone(),
            descending: self.counters.checkpoints_total % 2 == 1,
            totals: self.totals,
            dir: self.dir.clone(),
            buckets: self.buckets.clone(),
            index: self.index.clone(),
            clean: self.clean.clone(),
            log: self.log_durability.clone(),
            log_written_through: self.log_durability.issued(),
            superseded: superseded.clone(),
            extra_meta,
        };
        let (tx, rx) = flume::bounded(1);
        let spawned = std::thread::Builder::new()
            .name("msgstore-checkpoint".into())
            .spawn(move || {
                let result = run_job(&input);
                if result.is_err() {
                    remove_compacted(&input);
                }
                // Release the index before answering: the engine may close
                // and reopen the environment as soon as the answer arrives.
                drop(input);
                let _ = tx.send(result);
            });
        self.job = Some(Job {
            position: self.wal.position(),
            snapshot,
            superseded,
            candidates,
            log_bytes: self.wal.bytes_since_checkpoint,
            meta_dirty,
            started: Instant::now(),
            done: rx,
        });
        if let Err(e) = spawned {
            let job = self.job.take().expect("just set");
            self.abandon(job);
            return Err(e.into());
        }
        Ok(())
    }

    /// Merge a finished job; `None` while it is still running (or with
    /// `wait`, block until it finishes).
    pub(super) fn poll_checkpoint(&mut self, wait: bool) -> Option<Result<()>> {
        let job = self.job.as_ref()?;
        let result = if wait {
            job.done.recv().ok()
        } else {
            match job.done.try_recv() {
                Ok(r) => Some(r),
                Err(flume::TryRecvError::Empty) => return None,
                Err(flume::TryRecvError::Disconnected) => None,
            }
        };
        let job = self.job.take().expect("checked above");
        let result = result.unwrap_or_else(|| Err(Error::Storage("checkpoint thread died".into())));
        Some(match result {
            Ok(done) => self.merge(job, done),
            Err(e) => {
                self.abandon(job);
                Err(e)
            }
        })
    }

    /// The index has the checkpoint: take the new tails and lengths into the
    /// live state, swap compacted files in, trim the log.
    fn merge(&mut self, job: Job, done: JobDone) -> Result<()> {
        let merge_started = Instant::now();
        // (The helper put the other committed states in the clean cache.)
        for (user, flushed) in &done.flushed {
            if let Some(live) = self.dirty.get_mut(user) {
                live.state.tail_offset = flushed.tail_offset;
                live.state.tail_seq = flushed.tail_seq;
            }
        }
        for (bucket, len) in &done.lens {
            let meta = self.bucket_meta.entry(*bucket).or_default();
            meta.len = *len;
        }
        let compact_dir = self.dir.join("compact");
        for c in &done.compactions {
            lock(&self.buckets).install_compacted(&compact_dir, c.bucket, c.meta.gen)?;
            self.bucket_meta.insert(c.bucket, c.meta);
            self.compact_candidates.remove(&c.bucket);
            for (user, s) in &c.states {
                if let Some(live) = self.dirty.get_mut(user) {
                    live.state.tail_offset = s.tail_offset;
                }
            }
        }
        for (user, state) in &done.clean_after_swap {
            self.clean.insert(*user, *state);
        }
        self.count_acked_during_job(&job, &done)?;
        // The renames need no sync here: the index keeps listing them as
        // pending swaps (finished at open) until the next checkpoint, whose
        // own syncfs makes them durable before it replaces that list.
        if self.replicated {
            // Only the first checkpoint finds segments (of a standalone past).
            self.wal.remove_before(job.position)?;
        } else {
            self.wal.remove_before_in_background(job.position)?;
        }
        let done_compactions = done.compactions.len() as u64;
        let elapsed_ms = job.started.elapsed().as_millis() as u64;
        self.wal.bytes_since_checkpoint = self
            .wal
            .bytes_since_checkpoint
            .saturating_sub(job.log_bytes);
        // The same length again after this is no growth; growth during
        // the job was noted while it ran.
        self.log_grew.0 = self.wal.bytes_since_checkpoint;
        self.counters.checkpoints_total += 1;
        self.counters.compactions_total += done_compactions;
        metrics::counter!("msgstore_checkpoints_total").increment(1);
        metrics::counter!("msgstore_compactions_total").increment(done_compactions);
        let merge_secs = merge_started.elapsed().as_secs_f64();
        metrics::histogram!("msgstore_checkpoint_merge_seconds").record(merge_secs);
        metrics::histogram!("msgstore_checkpoint_seconds").record(elapsed_ms as f64 / 1e3);
        let StepTimes {
            flush,
            compact,
            sync,
            log_wait,
            commit,
        } = done.steps;
        tracing::debug!(
            elapsed_ms,
            users = job.snapshot.len(),
            flush_ms = flush,
            compact_ms = compact,
            sync_ms = sync,
            log_wait_ms = log_wait,
            commit_ms = commit,
            merge_ms = merge_secs * 1e3,
            "checkpoint done"
        );
        self.keep_spare_map(job.snapshot);
        Ok(())
    }

    /// Records acknowledged while the job ran and that it wrote (flushed,
    /// or copied into a compacted file, whose fresh state counted them live)
    /// are dead bytes now.
    fn count_acked_during_job(&mut self, job: &Job, done: &JobDone) -> Result<()> {
        let copied: HashMap<u64, UserState> = done
            .compactions
            .iter()
            .flat_map(|c| c.states.iter().copied())
            .collect();
        let compacted: HashSet<u32> = done.compactions.iter().map(|c| c.bucket).collect();
        let mut acked = std::mem::take(&mut self.acked_during_job);
        acked.sort_unstable();
        acked.dedup();
        for user in &acked {
            let Some(live) = self.load_user_after(user, job) else {
                continue;
            };
            let dead = if compacted.contains(&live.bucket) {
                // The new file holds the user's records live as of the job.
                let Some(then) = copied.get(user) else {
                    continue;
                };
                let links = self.chain(*user, then, then.acked_seq + 1)?;
                links
                    .iter()
                    .filter(|l| l.seq <= live.acked_seq)
                    .map(|l| l.stored_bytes)
                    .sum()
            } else {
                // Oldest first: stop at the first live record.
                job.snapshot.get(user).map_or(0, |then| {
                    then.pending
                        .iter()
                        .take_while(|p| p.seq <= live.acked_seq)
                        .map(|p| record_stored_bytes(p.payload.len()))
                        .sum()
                })
            };
            if dead > 0 {
                self.add_dead_bytes(live.bucket, dead);
            }
        }
        Ok(())
    }

    /// A user's live state while `job` is being merged (the job is no
    /// longer in `self.job`).
    fn load_user_after(&self, user: &u64, job: &Job) -> Option<UserState> {
        self.dirty
            .get(user)
            .or_else(|| job.snapshot.get(user))
            .map(|d| d.state)
    }

    /// A failed job: give the engine its state back. Records the helper
    /// wrote past a bucket's length are garbage the next job overwrites;
    /// the log is kept, so the next checkpoint covers everything.
    /// Keep a merged job's map, emptied, for the next job (if the helper
    /// thread has let go of it).
    fn keep_spare_map(&mut self, snapshot: Arc<DirtyUsers>) {
        drop(self.spare_dirty.take());
        if let Ok(mut snapshot) = Arc::try_unwrap(snapshot) {
            snapshot.clear();
            self.spare_dirty = Some(snapshot);
        }
    }

    fn abandon(&mut self, job: Job) {
        self.acked_during_job.clear();
        let snapshot = Arc::try_unwrap(job.snapshot).unwrap_or_else(|a| (*a).clone());
        for (user, mut older) in snapshot {
            // The live state stands; the older records go before the live
            // ones, but those acknowledged since.
            let live = Dirty::entry(&mut self.dirty, user, older.state);
            let acked = live.state.acked_seq;
            older.pending.retain(|p| p.seq > acked);
            older.pending.append(&mut live.pending);
            live.pending = older.pending;
        }
        self.compact_candidates.extend(job.candidates);
        self.meta_dirty |= job.meta_dirty;
        self.checkpoint_retry_at = Instant::now() + super::CHECKPOINT_RETRY_DELAY;
        metrics::counter!("msgstore_checkpoint_failures_total").increment(1);
    }

    /// Run a whole checkpoint now, covering everything applied so far:
    /// waits for one in progress first (whose failure is returned; the
    /// caller may call again), then runs one and waits for it to be merged.
    /// On `Ok` the index holds the engine's whole state, the applied marker
    /// included.
    pub(crate) fn checkpoint_now(&mut self) -> Result<()> {
        self.check_usable()?;
        if let Some(r) = self.poll_checkpoint(true) {
            r?;
        }
        self.start_checkpoint()?;
        self.poll_checkpoint(true).unwrap_or(Ok(()))
    }
}

/// The helper thread's part: steps 2 to 5.
fn run_job(input: &JobInput) -> Result<JobDone> {
    let (mut at, mut steps) = (Instant::now(), StepTimes::default());
    let mut metas = input.metas.clone();
    let flushed = flush(input, &mut metas)?;
    steps.flush = lap(&mut at);
    // Compaction looks tails up by user; most checkpoints compact nothing.
    let tails: HashMap<u64, (u64, u64)> = if input.candidates.is_empty() {
        HashMap::new()
    } else {
        flushed
            .iter()
            .map(|(u, s)| (*u, (s.tail_offset, s.tail_seq)))
            .collect()
    };
    let mut compactions = Vec::new();
    for &bucket in &input.candidates {
        if let Some(c) = compact(
            input,
            &tails,
            metas.get(&bucket).copied().unwrap_or_default(),
            bucket,
        )? {
            compactions.push(c);
        }
    }
    steps.compact = lap(&mut at);
    syncfs(&input.dir)?;
    steps.sync = lap(&mut at);
    input
        .log
        .wait_durable(input.log_written_through)
        .map_err(|e| Error::Storage(format!("a log write before the checkpoint failed: {e}")))?;
    steps.log_wait = lap(&mut at);
    let meta = CheckpointMeta {
        wal_start: input.position,
        pending_swaps: compactions.iter().map(|c| (c.bucket, c.meta.gen)).collect(),
        users_total: input.totals.users,
        live_messages: input.totals.live_messages,
        live_bytes: input.totals.live_bytes,
    };
    // The flushed users' new states, and the other changed ones as they are.
    let mut users: Vec<(u64, UserState)> = Vec::with_capacity(input.snapshot.len());
    users.extend_from_slice(&flushed);
    users.extend(
        input
            .snapshot
            .iter()
            .filter(|(_, d)| d.pending.is_empty())
            .map(|(u, d)| (*u, d.state)),
    );
    let touched: HashSet<u32> = input
        .snapshot
        .values()
        .map(|d| d.state.bucket)
        .chain(input.candidates.iter().copied())
        .collect();
    let mut bucket_states: HashMap<u32, BucketMeta> = touched
        .iter()
        .map(|b| (*b, metas.get(b).copied().unwrap_or_default()))
        .collect();
    if !compactions.is_empty() {
        // A compacted bucket's fresh states replace those of its users.
        let mut by_user: HashMap<u64, UserState> = users.into_iter().collect();
        for c in &compactions {
            by_user.extend(c.states.iter().copied());
            bucket_states.insert(c.bucket, c.meta);
        }
        users = by_user.into_iter().collect();
    }
    // In key order: LMDB takes sorted puts many times faster than random
    // ones (baselines.md: ~1.7 M/s vs ~88 k/s per transaction).
    users.sort_unstable_by_key(|(u, _)| *u);
    let mut bucket_states: Vec<(u32, BucketMeta)> = bucket_states.into_iter().collect();
    if !compactions.is_empty() {
        // Before the commit makes the new states visible: the engine reads
        // a user from the index first and from this second, so whichever
        // state it got, it ends with the one matching the files in place.
        let superseded: Superseded = compactions
            .iter()
            .flat_map(|c| c.superseded.iter().copied())
            .collect();
        // Only this job sets it, once.
        let _ = input.superseded.set(superseded);
    }
    bucket_states.sort_unstable_by_key(|(b, _)| *b);
    input.index.commit_checkpoint(
        users.iter().map(|(u, s)| (*u, s)),
        bucket_states.into_iter(),
        &meta,
        &input.extra_meta,
    )?;
    // The index has them: cache them here, off the engine's thread. Every
    // such user is in the snapshot, which the engine reads first until the
    // merge. Compacted buckets wait for their files to be swapped in.
    steps.commit = lap(&mut at);
    let compacted: HashSet<u32> = compactions.iter().map(|c| c.bucket).collect();
    let mut clean_after_swap = Vec::new();
    for (user, state) in users {
        if compacted.contains(&state.bucket) {
            clean_after_swap.push((user, state));
        } else {
            input.clean.insert(user, state);
        }
    }
    Ok(JobDone {
        clean_after_swap,
        flushed,
        lens: touched
            .iter()
            .filter_map(|b| metas.get(b).map(|m| (*b, m.len)))
            .collect(),
        compactions,
        steps,
    })
}

/// Append every snapshot record to its bucket, chained from the snapshot's
/// tails, bucket by bucket. Returns the flushed users' new states.
fn flush(input: &JobInput, metas: &mut HashMap<u32, BucketMeta>) -> Result<Vec<(u64, UserState)>> {
    // Each user's state and records in hand: no second lookup per user.
    let mut order: Vec<(u32, u64, &UserState, &VecDeque<Pending>)> = input
        .snapshot
        .iter()
        .filter(|(_, d)| !d.pending.is_empty())
        .map(|(u, d)| (d.state.bucket, *u, &d.state, &d.pending))
        .collect();
    order.sort_unstable_by_key(|&(bucket, user, _, _)| (bucket, user));
    if input.descending {
        order.reverse();
    }
    let mut flushed = Vec::with_capacity(order.len());
    let mut buf = Vec::new();
    for run in order.chunk_by(|a, b| a.0 == b.0) {
        let bucket = run[0].0;
        let meta = metas.entry(bucket).or_default();
        buf.clear();
        for &(_, user, state, queue) in run {
            let mut state = *state;
            for p in queue {
                let header = MessageHeader {
                    user,
                    seq: p.seq,
                    timestamp_ms: p.timestamp_ms,
                    msg_id: p.msg_id,
                };
                let offset = meta.len + buf.len() as u64;
                encode_record(&header, state.tail_offset, &p.payload, &mut buf);
                state.tail_offset = offset;
                state.tail_seq = state.tail_seq.max(p.seq);
            }
            flushed.push((user, state));
        }
        if !buf.is_empty() {
            let mut buckets = lock(&input.buckets);
            buckets.write(bucket, meta.gen, meta.len, &buf)?;
            meta.len += buf.len() as u64;
        }
    }
    Ok(flushed)
}

/// Copy the records of `bucket` live as of the snapshot into a new file,
/// rebuilding each user's chain. `None` if the bucket cannot be read
/// cleanly (it is then left as it is).
fn compact(
    input: &JobInput,
    tails: &HashMap<u64, (u64, u64)>,
    meta: BucketMeta,
    bucket: u32,
) -> Result<Option<Compaction>> {
    let bytes = {
        let mut buckets = lock(&input.buckets);
        let Some(view) = buckets.view(bucket)? else {
            return Ok(None);
        };
        if header_gen(view, bucket) != Some(meta.gen) || (view.len() as u64) < meta.len {
            tracing::error!(
                bucket,
                "bucket header or size does not match the index; not compacting"
            );
            return Ok(None);
        }
        view[..meta.len as usize].to_vec()
    };
    let mut states: HashMap<u64, UserState> = HashMap::new();
    let mut superseded = Vec::new();
    let mut buf = Vec::new();
    let mut at = BUCKET_HEADER_BYTES;
    while at < meta.len {
        let rec = match read_record(&bytes, at, usize::MAX >> 1) {
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
            let known = match input.snapshot.get(&user) {
                Some(d) => Some(d.state),
                None => {
                    let indexed = input.index.user(user)?;
                    superseded.extend(indexed.map(|s| (user, s)));
                    indexed
                }
            };
            let Some(mut s) = known else {
                tracing::error!(
                    bucket,
                    user,
                    "record of a user the index does not know; not compacting"
                );
                return Ok(None);
            };
            if let Some((_, seq)) = tails.get(&user) {
                s.tail_seq = *seq;
            }
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
    lock(&input.buckets).write_compacted(&input.dir.join("compact"), bucket, new_meta.gen, &buf)?;
    Ok(Some(Compaction {
        bucket,
        meta: new_meta,
        states: states.into_iter().collect(),
        superseded,
    }))
}

/// Remove the compacted files a failed job may have left.
fn remove_compacted(input: &JobInput) {
    let compact_dir = input.dir.join("compact");
    for &bucket in &input.candidates {
        let gen = input.metas.get(&bucket).map_or(0, |m| m.gen) + 1;
        let _ = std::fs::remove_file(compacted_path(&compact_dir, bucket, gen));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{engine::DeferredWrite, handle::AppendRequest, EngineConfig, FsyncPolicy};

    fn append(e: &mut Engine, user: u64, n: u8) -> u64 {
        e.begin_batch();
        let seq = e.append(AppendRequest {
            user,
            msg_id: u128::from(n),
            payload: vec![n; 40],
        });
        e.end_batch().unwrap();
        seq.unwrap()
    }

    fn ack(e: &mut Engine, user: u64, up_to: u64) -> u64 {
        e.begin_batch();
        let removed = e.ack(user, up_to);
        e.end_batch().unwrap();
        removed.unwrap()
    }

    fn seqs(e: &mut Engine, user: u64) -> Vec<(u64, u8)> {
        let page = e.fetch(user, 0, 1000, 1 << 20).unwrap();
        page.records.iter().map(|r| (r.seq, r.payload[0])).collect()
    }

    /// Requests answered while a checkpoint runs on its helper thread, and
    /// after it is merged, see the same mailboxes as without one; what it
    /// commits (with compactions) comes back after a restart.
    #[test]
    fn requests_during_and_after_a_running_checkpoint_see_consistent_mailboxes() {
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
        let mut ran_during = 0;
        for round in 0..12u64 {
            for user in 0..8u64 {
                for _ in 0..3 {
                    n = n.wrapping_add(1);
                    let seq = append(&mut e, user, n);
                    model.entry(user).or_default().push((seq, n));
                }
            }
            e.start_checkpoint().unwrap();
            assert!(e.checkpoint_running());
            for step in 0..20u64 {
                if e.job.is_some() {
                    ran_during += 1;
                }
                let user = (step + round) % 8;
                n = n.wrapping_add(1);
                let seq = append(&mut e, user, n);
                model.entry(user).or_default().push((seq, n));
                if step % 3 == 0 {
                    let q = model.get_mut(&user).unwrap();
                    let up_to = q[q.len() / 2].0;
                    let before = q.len();
                    q.retain(|(s, _)| *s > up_to);
                    assert_eq!(ack(&mut e, user, up_to) as usize, before - q.len());
                }
                for u in 0..8u64 {
                    assert_eq!(
                        seqs(&mut e, u),
                        model[&u],
                        "round {round} step {step} user {u}"
                    );
                }
                if step == 10 {
                    e.poll_checkpoint(true).unwrap().unwrap();
                }
            }
        }
        assert!(ran_during > 0, "requests were answered while a job ran");
        assert!(e.counters.compactions_total > 0);
        assert!(e.counters.checkpoints_total >= 12);
        e.checkpoint_now().unwrap();
        // Every bucket byte is a live record or counted dead, including
        // records acknowledged while a job was writing them.
        let live_in_buckets: u64 = e
            .bucket_meta
            .values()
            .map(|m| m.record_bytes() - m.dead_bytes)
            .sum();
        let live: u64 = model
            .values()
            .map(|q| q.len() as u64 * record_stored_bytes(40))
            .sum();
        assert_eq!(live_in_buckets, live);
        drop(e);
        let mut e = Engine::open(dir.path(), config).unwrap();
        for u in 0..8u64 {
            assert_eq!(seqs(&mut e, u), model[&u], "after restart, user {u}");
            let stats = e.user_stats(u).unwrap();
            assert_eq!(stats.live_count as usize, model[&u].len());
            assert_eq!(stats.live_bytes as usize, model[&u].len() * 40);
        }
    }

    /// Wait (without merging) until the running job has committed the
    /// index and handed its result back.
    fn wait_until_committed(e: &Engine) {
        let job = e.job.as_ref().expect("a job runs");
        while job.done.is_empty() {
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
    }

    /// A user untouched since the last checkpoint and not in the clean
    /// cache (as every user is right after a restart) is read from the
    /// index. Once a job compacting its bucket has committed, the index
    /// holds the user's offsets in the compacted file, which is swapped in
    /// only at the merge: reads in between must still see the state that
    /// matches the file in place (they used to walk the old file with the
    /// new offsets: "chain broken", an empty page saying `more`, and an ack
    /// freeing too few bytes).
    #[test]
    fn a_user_read_from_the_index_before_a_compaction_is_merged_sees_its_records() {
        let dir = tempfile::tempdir().unwrap();
        let config = EngineConfig {
            fsync: FsyncPolicy::Never,
            bucket_dirs: 1,
            bucket_files: 1,
            compact_min_bytes: 64,
            compact_dead_ratio: 0.2,
            ..EngineConfig::default()
        };
        // One bucket: user 1's records first, then user 2's.
        let (gone, kept) = (1u64, 2u64);
        let mut e = Engine::open(dir.path(), config.clone()).unwrap();
        for n in 0..5 {
            append(&mut e, gone, n);
        }
        for n in 10..13 {
            append(&mut e, kept, n);
        }
        e.checkpoint_now().unwrap();
        drop(e);

        // Restarted: no state is cached. Acking all of user 1 makes the
        // bucket a compaction candidate; user 2's records move up in it.
        let mut e = Engine::open(dir.path(), config.clone()).unwrap();
        assert_eq!(ack(&mut e, gone, 5), 5);
        assert!(e.compact_candidates.contains(&0));
        e.start_checkpoint().unwrap();
        wait_until_committed(&e);
        assert!(e.checkpoint_running(), "committed, not merged");

        let page = e.fetch(kept, 0, 1000, 1 << 20).unwrap();
        let got: Vec<(u64, u8)> = page.records.iter().map(|r| (r.seq, r.payload[0])).collect();
        assert_eq!(got, vec![(1, 10), (2, 11), (3, 12)]);
        assert!(!page.more);
        assert_eq!(ack(&mut e, kept, 1), 1);
        assert_eq!(e.user_stats(kept).unwrap().live_bytes, 2 * 40);
        assert_eq!(e.counters.corrupt_records_total, 0, "no chain broke");

        e.poll_checkpoint(true).unwrap().unwrap();
        assert_eq!(e.counters.compactions_total, 1);
        assert_eq!(seqs(&mut e, kept), vec![(2, 11), (3, 12)]);
        e.checkpoint_now().unwrap();
        drop(e);
        let mut e = Engine::open(dir.path(), config).unwrap();
        assert_eq!(seqs(&mut e, kept), vec![(2, 11), (3, 12)]);
        assert_eq!(e.user_stats(kept).unwrap().live_bytes, 2 * 40);
        assert_eq!(e.counters.corrupt_records_total, 0);
    }

    fn always_config() -> EngineConfig {
        EngineConfig {
            fsync: FsyncPolicy::Always,
            bucket_dirs: 2,
            bucket_files: 2,
            wal_segment_bytes: 256 * 1024,
            checkpoint_wal_bytes: 4096,
            checkpoint_stall_wal_bytes: 8192,
            ..EngineConfig::default()
        }
    }

    /// Append under `always` the way the server does (the batch's log
    /// write is handed back, not performed), leaving the next batch open.
    fn append_deferred(e: &mut Engine, user: u64, payload_bytes: usize) -> DeferredWrite {
        let write = crate::engine::tests::append_deferred(e, user, payload_bytes);
        e.begin_batch();
        write
    }

    /// Under sustained load a log write is always in flight; a checkpoint
    /// starts anyway, and commits the index only once that write is durable.
    #[test]
    fn a_checkpoint_started_during_a_log_write_commits_once_it_is_durable() {
        let dir = tempfile::tempdir().unwrap();
        let mut e = Engine::open(dir.path(), always_config()).unwrap();
        let write = append_deferred(&mut e, 1, 100);
        e.start_checkpoint().unwrap();
        assert!(e.checkpoint_running());
        for _ in 0..10 {
            std::thread::sleep(std::time::Duration::from_millis(5));
            assert!(
                e.poll_checkpoint(false).is_none(),
                "the job must wait for the log write"
            );
        }
        e.log_write_done(write.batch(), &write.perform());
        e.poll_checkpoint(true).unwrap().unwrap();
        assert_eq!(e.counters.checkpoints_total, 1);
        drop(e);
        let mut e = Engine::open(dir.path(), always_config()).unwrap();
        let page = e.fetch(1, 0, 10, 1 << 20).unwrap();
        assert_eq!(page.records.len(), 1);
        assert_eq!(page.records[0].seq, 1);
    }

    /// If a log write issued before the checkpoint fails, the checkpoint
    /// fails too: the index never gets the state of an append that was
    /// never durable.
    #[test]
    fn a_checkpoint_whose_earlier_log_write_fails_commits_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let mut e = Engine::open(dir.path(), always_config()).unwrap();
        let write = append_deferred(&mut e, 1, 100);
        e.start_checkpoint().unwrap();
        let batch = write.batch();
        drop(write);
        e.log_write_done(batch, &Err("the disk is gone".into()));
        let failed = e.poll_checkpoint(true).unwrap().unwrap_err();
        assert!(failed.to_string().contains("log write"), "{failed}");
        assert_eq!(e.counters.checkpoints_total, 0);
        drop(e);
        let mut e = Engine::open(dir.path(), always_config()).unwrap();
        assert!(e.fetch(1, 0, 10, 1 << 20).unwrap().records.is_empty());
        assert_eq!(e.user_stats(1).unwrap().last_seq, 0);
    }

    #[test]
    fn checkpoints_are_behind_while_one_runs_past_the_stall_threshold() {
        let dir = tempfile::tempdir().unwrap();
        let mut e = Engine::open(dir.path(), always_config()).unwrap();
        let first = append_deferred(&mut e, 1, 5000);
        e.log_write_done(first.batch(), &first.perform());
        assert!(!e.checkpoint_stalled(), "no checkpoint runs");
        e.start_checkpoint().unwrap();
        assert!(
            !e.checkpoint_stalled(),
            "5 KB behind, the threshold is 8 KB"
        );
        let second = append_deferred(&mut e, 2, 5000);
        assert!(e.checkpoint_stalled(), "10 KB behind a running checkpoint");
        e.log_write_done(second.batch(), &second.perform());
        e.poll_checkpoint(true).unwrap().unwrap();
        assert!(!e.checkpoint_stalled(), "the checkpoint is done");
    }
}
