//! The operations, as the writer thread applies them. `append` and `ack`
//! check limits and log; `apply_*` change state and are shared with log
//! replay, which must reach exactly the state the original run reached.

use super::{
    checkpoint::lock,
    codec::{parse_record, read_record, record_stored_bytes, MessageHeader, NO_PREV},
    migrate::mailbox_stats,
    state::{bucket_for_user, UserState},
    wal, Dirty, Engine, Pending,
};
use crate::{handle::AppendRequest, Error, Result};
use proto::shard::{
    MailboxStats, ShardStats, APPEND_ONCE_SCAN_MAX, FETCH_BYTES_MAX, FETCH_COUNT_MAX,
};
use std::{
    collections::{hash_map::Entry, VecDeque},
    sync::atomic::{AtomicU64, Ordering},
    time::{SystemTime, UNIX_EPOCH},
};

/// One record found walking a user's chain in its bucket.
#[derive(Debug, Clone, Copy)]
pub(super) struct ChainLink {
    pub offset: u64,
    pub seq: u64,
    pub stored_bytes: u64,
    pub payload_bytes: u64,
}

/// The system wall clock in milliseconds since the Unix epoch.
pub(super) fn system_now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Run `log` at most once a second across the process, passing how many
/// calls were suppressed since the last one that ran.
pub(super) fn rate_limited(log: impl FnOnce(u64)) {
    static LAST_SECOND: AtomicU64 = AtomicU64::new(u64::MAX);
    static SUPPRESSED: AtomicU64 = AtomicU64::new(0);
    let second = system_now_ms() / 1000;
    let last = LAST_SECOND.load(Ordering::Relaxed);
    if last != second
        && LAST_SECOND
            .compare_exchange(last, second, Ordering::Relaxed, Ordering::Relaxed)
            .is_ok()
    {
        log(SUPPRESSED.swap(0, Ordering::Relaxed));
    } else {
        SUPPRESSED.fetch_add(1, Ordering::Relaxed);
    }
}

/// Records a user's memtable queue has room for when it is made.
const PENDING_QUEUE_FIRST_CAPACITY: usize = 4;

impl Engine {
    /// A user's current state: changed since the running checkpoint began,
    /// or changed before it (in its snapshot), or as the index has it (the
    /// clean cache holds some of those).
    pub(super) fn load_user(&self, user: u64) -> Result<Option<UserState>> {
        if let Some(d) = self.dirty.get(&user) {
            return Ok(Some(d.state));
        }
        if let Some(d) = self.job.as_ref().and_then(|j| j.snapshot.get(&user)) {
            return Ok(Some(d.state));
        }
        if let Some(s) = self.clean.get(&user) {
            return Ok(Some(s));
        }
        // A new user, or one whose clean state was evicted: sizes
        // `clean_states_max`.
        metrics::counter!("msgstore_index_reads_total").increment(1);
        let indexed = self.index.user(user)?;
        // A running job that compacts may have committed already: the index
        // then has the user's offsets in a compacted file not yet in place.
        // The job publishes the states it replaces before committing, and
        // they are looked at after the index read: if the read saw the
        // commit, they are there.
        let superseded = self
            .job
            .as_ref()
            .and_then(|j| j.superseded.get())
            .and_then(|s| s.get(&user));
        Ok(superseded.copied().or(indexed))
    }

    /// Make `state` the user's current state (its memtable records, if
    /// any, stay).
    pub(super) fn set_dirty_state(&mut self, user: u64, state: UserState) {
        Dirty::entry(&mut self.dirty, user, state).state = state;
    }

    /// Refuse new log entries while the log is at its limit. A replicated
    /// shard refuses nothing here: whether its checkpoints keep up is its
    /// own affair, and a refusal would make replicas differ (the Raft glue
    /// holds proposals back instead: [`Engine::over_wal_bytes_max`]).
    pub(super) fn check_wal_room(&self) -> Result<()> {
        self.check_usable()?;
        if !self.replicated && self.over_wal_bytes_max() {
            return Err(Error::Overloaded(
                "the log is at wal_bytes_max: checkpoints are failing or behind",
            ));
        }
        Ok(())
    }

    /// Append `req` in the open batch: its seq, or why it was refused
    /// (counted in `msgstore_appends_failed_total{reason}`). It counts in
    /// `msgstore_appends_total` once its batch is stored.
    pub(super) fn append(&mut self, req: AppendRequest) -> Result<u64> {
        let result = self.stage_append(req);
        match &result {
            Ok(_) => self.batch_counts.appends += 1,
            Err(e) => crate::metrics::count_refused_append(e),
        }
        result
    }

    fn stage_append(&mut self, req: AppendRequest) -> Result<u64> {
        self.check_wal_room()?;
        let len = req.payload.len();
        if len > self.config.message_bytes_max as usize {
            return Err(Error::MessageTooLarge {
                len,
                max: self.config.message_bytes_max,
            });
        }
        let state = self.load_user(req.user)?;
        self.admit(req.user, state.as_ref(), true)?;
        let home = bucket_for_user(req.user, self.config.buckets());
        if let Some(s) = state.filter(|s| s.bucket != home) {
            // A damaged index entry: a record appended now would go into
            // another user's bucket, or a file outside the fan-out.
            metrics::counter!("msgstore_appends_refused_damaged_total").increment(1);
            return Err(Error::Corrupt(format!(
                "the index entry of user {} names bucket {} (its bucket is {home}): \
                 appends are refused until it is repaired",
                req.user, s.bucket
            )));
        }
        let state = state.unwrap_or_else(|| UserState::new(home));
        if state.next_seq == u64::MAX {
            // Only an import can bring a user here; the next seq must exist.
            return Err(Error::MailboxFull {
                user: req.user,
                reason: "sequence numbers exhausted",
            });
        }
        if state.live_count() >= self.config.mailbox_messages_max {
            return Err(Error::MailboxFull {
                user: req.user,
                reason: "message count limit",
            });
        }
        if state.live_bytes + len as u64 > self.config.mailbox_bytes_max {
            return Err(Error::MailboxFull {
                user: req.user,
                reason: "byte limit",
            });
        }
        let header = MessageHeader {
            user: req.user,
            seq: state.next_seq,
            timestamp_ms: self.now_ms(),
            msg_id: req.msg_id,
        };
        wal::encode_append(&header, &req.payload, &mut self.wal_buf);
        self.apply_append(state, header, req.payload);
        Ok(header.seq)
    }

    /// Record `header` as the next message of its user.
    pub(super) fn apply_append(
        &mut self,
        mut state: UserState,
        header: MessageHeader,
        payload: Vec<u8>,
    ) {
        debug_assert_eq!(header.seq, state.next_seq);
        let first_ever = state.next_seq == 1;
        state.next_seq = header.seq + 1;
        state.live_bytes += payload.len() as u64;
        self.totals.live_messages += 1;
        self.totals.live_bytes += payload.len() as u64;
        let pending = Pending {
            batch: self.batch,
            seq: header.seq,
            timestamp_ms: header.timestamp_ms,
            msg_id: header.msg_id,
            payload,
        };
        // One lookup, which also hands back what the undo log needs.
        let (before, queued_before) = match self.dirty.entry(header.user) {
            Entry::Occupied(o) => {
                let d = o.into_mut();
                let before = (Some(d.state), d.pending.len());
                d.state = state;
                d.pending.push_back(pending);
                before
            }
            Entry::Vacant(v) => {
                // Room for a few (as a queue grown from empty gets): one
                // exactly the size of its first record regrows at once.
                let mut queue = VecDeque::with_capacity(PENDING_QUEUE_FIRST_CAPACITY);
                queue.push_back(pending);
                v.insert(Dirty {
                    state,
                    pending: queue,
                });
                (None, 0)
            }
        };
        if first_ever && before.is_none() {
            // A user's first append ever: it cannot be in the index.
            self.totals.users += 1;
        }
        if self.undo.active {
            self.undo.users.push((header.user, before, queued_before));
        }
    }

    /// A client's Ack. It deletes only records a fetch could have returned:
    /// it is capped at the seq before the first live record up to
    /// `up_to_seq` that the shard cannot read (cut off from its chain, or
    /// failing its checksum), so damaged records stay on disk for a repair
    /// (docs/STORAGE.md, "Reading past damage"). Returns how many records
    /// it deleted.
    pub(super) fn ack(&mut self, user: u64, up_to_seq: u64) -> Result<u64> {
        self.check_usable()?;
        let state = self.load_user(user)?;
        self.admit(user, state.as_ref(), true)?;
        let Some(state) = state else {
            return Ok(0);
        };
        let mut up_to = up_to_seq.min(state.last_seq());
        if up_to <= state.acked_seq {
            return Ok(0);
        }
        let mut bytes = None;
        if state.acked_seq < state.tail_seq {
            // Live records in the bucket: find any damage among them.
            let (links, lost) = self.walk(user, &state, state.acked_seq + 1)?;
            let first_bad = self.first_unreadable(&state, &links, up_to, lost)?;
            if let Some(bad) = first_bad.filter(|b| *b <= up_to) {
                metrics::counter!("msgstore_acks_capped_total").increment(1);
                rate_limited(|suppressed| {
                    tracing::warn!(
                        user,
                        up_to_seq,
                        capped_to = bad - 1,
                        suppressed,
                        "ack capped before a record the shard cannot read; it stays for a repair"
                    );
                });
                up_to = bad - 1;
                if up_to <= state.acked_seq {
                    return Ok(0);
                }
            }
            bytes = Some(self.freed_by(user, &state, &links, up_to));
        }
        wal::encode_ack(user, up_to, &mut self.wal_buf);
        let removed = self.apply_ack_counted(user, state, up_to, bytes)?;
        self.batch_counts.acks += 1;
        Ok(removed)
    }

    /// An `Expire`: ack the user's oldest live records stored before
    /// `before_ms` with a seq up to `up_to_seq` (the leading run of such
    /// records among the first `FETCH_COUNT_MAX`). Every replica reads the
    /// same records, so the same records go.
    pub(super) fn expire(&mut self, user: u64, before_ms: u64, up_to_seq: u64) -> Result<u64> {
        let limits = (FETCH_COUNT_MAX, FETCH_BYTES_MAX);
        let newest_expired = self.fetch_with(user, 0, limits, |page| {
            page.records
                .iter()
                .take_while(|r| r.timestamp_ms < before_ms && r.seq <= up_to_seq)
                .last()
                .map(|r| r.seq)
        })?;
        match newest_expired {
            Some(seq) => {
                let removed = self.ack(user, seq)?;
                self.batch_counts.expired_records += removed;
                Ok(removed)
            }
            None => Ok(0),
        }
    }

    /// An item of an `AppendBatchOnce`: the seq of a live record of its
    /// user with its `msg_id` stored at or after `since_ms` (among the
    /// newest `APPEND_ONCE_SCAN_MAX`), else a new append.
    pub(super) fn append_once(&mut self, req: AppendRequest, since_ms: u64) -> Result<u64> {
        if let Some(seq) = self.find_recent(req.user, req.msg_id, since_ms)? {
            metrics::counter!("msgstore_appends_deduplicated_total").increment(1);
            return Ok(seq);
        }
        self.append(req)
    }

    /// The seq of a live record of `user` with `msg_id` stored at or after
    /// `since_ms`, among its newest `APPEND_ONCE_SCAN_MAX` live records
    /// (read a page at a time, oldest first: only retries pay for this).
    fn find_recent(&mut self, user: u64, msg_id: u128, since_ms: u64) -> Result<Option<u64>> {
        let Some(state) = self.load_user(user)? else {
            return Ok(None);
        };
        let last = state.last_seq();
        let mut after = state
            .acked_seq
            .max(last.saturating_sub(APPEND_ONCE_SCAN_MAX));
        while after < last {
            let limits = (FETCH_COUNT_MAX, FETCH_BYTES_MAX);
            let (found, page_last, more) = self.fetch_with(user, after, limits, |page| {
                let found = page
                    .records
                    .iter()
                    .find(|r| r.msg_id == msg_id && r.timestamp_ms >= since_ms)
                    .map(|r| r.seq);
                (found, page.records.last().map(|r| r.seq), page.more)
            })?;
            if found.is_some() {
                return Ok(found);
            }
            match page_last {
                Some(seq) if more && seq > after => after = seq,
                _ => break,
            }
        }
        Ok(None)
    }

    /// The lowest seq up to `up_to` among the user's live bucket records
    /// that cannot be read: `lost` (the lowest a walk could not reach) or
    /// the lowest of `links` failing its checksum.
    fn first_unreadable(
        &mut self,
        state: &UserState,
        links: &[ChainLink],
        up_to: u64,
        lost: Option<u64>,
    ) -> Result<Option<u64>> {
        let mut first = lost;
        let committed = self.committed_len(state.bucket);
        let mut bad = None;
        {
            let mut buckets = lock(&self.buckets);
            let view = buckets.view(state.bucket)?.unwrap_or(&[]);
            let view = &view[..committed.min(view.len())];
            // Newest first: the last failure found is the lowest.
            for link in links.iter().filter(|l| l.seq <= up_to) {
                if read_record(view, link.offset, usize::MAX >> 1).is_err() {
                    bad = Some((link.seq, link.offset));
                }
            }
        }
        if let Some((seq, offset)) = bad {
            self.count_unreachable(state.bucket, offset, 1, "checksum");
            first = Some(first.map_or(seq, |f| f.min(seq)));
        }
        Ok(first)
    }

    /// Mark `acked_seq + 1 ..= up_to` dead; returns how many that is.
    pub(super) fn apply_ack(&mut self, user: u64, state: UserState, up_to: u64) -> Result<u64> {
        self.apply_ack_counted(user, state, up_to, None)
    }

    /// [`Engine::apply_ack`] with the (payload bytes freed, bucket bytes
    /// made dead) if the caller counted them already.
    fn apply_ack_counted(
        &mut self,
        user: u64,
        mut state: UserState,
        up_to: u64,
        bytes: Option<(u64, u64)>,
    ) -> Result<u64> {
        let (freed_payload, dead_stored) = match bytes {
            Some(b) => b,
            None if up_to == state.last_seq() => self.all_acked_bytes(user, &state),
            None => self.acked_bytes(user, &state, up_to)?,
        };
        self.save_for_undo(user);
        if dead_stored > 0 {
            self.add_dead_bytes(state.bucket, dead_stored);
        }
        let removed = up_to - state.acked_seq;
        state.acked_seq = up_to;
        state.live_bytes = state.live_bytes.saturating_sub(freed_payload);
        self.totals.live_messages = self.totals.live_messages.saturating_sub(removed);
        self.totals.live_bytes = self.totals.live_bytes.saturating_sub(freed_payload);
        self.set_dirty_state(user, state);
        self.acked_in_batch.push(user);
        Ok(removed)
    }

    /// (payload bytes freed, bucket bytes made dead) by acknowledging
    /// `acked_seq + 1 ..= up_to`: walks the bucket chain.
    fn acked_bytes(&mut self, user: u64, state: &UserState, up_to: u64) -> Result<(u64, u64)> {
        let links = self.chain(user, state, state.acked_seq + 1)?;
        Ok(self.freed_by(user, state, &links, up_to))
    }

    /// (payload bytes freed, bucket bytes made dead) by acknowledging
    /// `acked_seq + 1 ..= up_to`, given the user's walked bucket `links`.
    fn freed_by(
        &self,
        user: u64,
        state: &UserState,
        links: &[ChainLink],
        up_to: u64,
    ) -> (u64, u64) {
        let (mut freed_payload, mut dead_stored) = (0u64, 0u64);
        for link in links.iter().filter(|l| l.seq <= up_to) {
            freed_payload += link.payload_bytes;
            dead_stored += link.stored_bytes;
        }
        freed_payload += self
            .unflushed(user)
            .filter(|p| p.seq > state.acked_seq && p.seq <= up_to)
            .map(|p| p.payload.len() as u64)
            .sum::<u64>();
        (freed_payload, dead_stored)
    }

    /// Like [`Engine::acked_bytes`] for an ack of everything live, without
    /// a walk: the live records in the bucket are the live ones not
    /// unflushed, each `record_stored_bytes(payload)` long. (Exact even if
    /// a corrupt record would cut a walk short.)
    fn all_acked_bytes(&self, user: u64, state: &UserState) -> (u64, u64) {
        let (mut unflushed_count, mut unflushed_payload) = (0u64, 0u64);
        for p in self.unflushed(user).filter(|p| p.seq > state.acked_seq) {
            unflushed_count += 1;
            unflushed_payload += p.payload.len() as u64;
        }
        let in_bucket = state.live_count().saturating_sub(unflushed_count);
        let bucket_payload = state.live_bytes.saturating_sub(unflushed_payload);
        let dead_stored = in_bucket * record_stored_bytes(0) + bucket_payload;
        (state.live_bytes, dead_stored)
    }

    pub(super) fn add_dead_bytes(&mut self, bucket: u32, bytes: u64) {
        self.save_bucket_for_undo(bucket);
        let meta = self.bucket_meta.entry(bucket).or_default();
        meta.dead_bytes += bytes;
        let ratio = meta.dead_bytes as f64 / meta.record_bytes().max(1) as f64;
        if ratio > self.config.compact_dead_ratio && meta.len >= self.config.compact_min_bytes {
            self.compact_candidates.insert(bucket);
        }
    }

    /// The user's records not yet in its bucket, oldest first: those a
    /// running checkpoint has yet to flush, then the memtable's.
    pub(super) fn unflushed(&self, user: u64) -> impl Iterator<Item = &Pending> {
        let frozen = self.job.as_ref().and_then(|j| j.snapshot.get(&user));
        frozen
            .into_iter()
            .chain(self.dirty.get(&user))
            .flat_map(|d| &d.pending)
    }

    /// The user's records in its bucket with `seq >= min_seq`, newest first
    /// (see [`Engine::walk`]).
    pub(super) fn chain(
        &mut self,
        user: u64,
        state: &UserState,
        min_seq: u64,
    ) -> Result<Vec<ChainLink>> {
        Ok(self.walk(user, state, min_seq)?.0)
    }

    /// The user's records in its bucket with `seq >= min_seq`, newest
    /// first, and the lowest such seq the walk could not reach, if any.
    /// The walk checks structure only (frame bounds, the record is the
    /// user's, seqs fall and offsets go back): checksums are checked where
    /// a record is shown ([`Engine::fetch_with`]) or deleted
    /// ([`Engine::ack`]), not where it is only counted. Live records in the
    /// bucket have no gaps (seqs `acked_seq + 1 ..= tail_seq`), so every
    /// one of them the walk does not reach is unreachable: a record that
    /// breaks the structure ends the walk (older records are cut off), a
    /// link that skips seqs loses those, a bucket id past the fan-out or a
    /// missing file loses them all. Each is counted and logged.
    pub(super) fn walk(
        &mut self,
        user: u64,
        state: &UserState,
        min_seq: u64,
    ) -> Result<(Vec<ChainLink>, Option<u64>)> {
        let mut links = Vec::new();
        if state.tail_offset == NO_PREV || min_seq > state.tail_seq {
            return Ok((links, None));
        }
        let lost_all = (state.tail_seq - min_seq + 1, Some(min_seq));
        if state.bucket >= self.config.buckets() {
            let (n, lost) = lost_all;
            self.count_unreachable(state.bucket, state.tail_offset, n, "bad_bucket_id");
            return Ok((links, lost));
        }
        let committed = self.committed_len(state.bucket);
        let mut buckets = lock(&self.buckets);
        let Some(view) = buckets.view(state.bucket)? else {
            drop(buckets);
            let (n, lost) = lost_all;
            self.count_unreachable(state.bucket, state.tail_offset, n, "no_bucket_file");
            return Ok((links, lost));
        };
        let view = &view[..committed.min(view.len())];
        let mut offset = state.tail_offset;
        let mut expect_seq = state.tail_seq;
        // (lowest seq lost, records lost, where) of a skip in the chain.
        let mut skipped: Option<(u64, u64, u64)> = None;
        let mut broken = None;
        while offset != NO_PREV && expect_seq >= min_seq {
            let rec = match parse_record(view, offset) {
                Some(rec)
                    if rec.header.user == user
                        && rec.header.seq <= expect_seq
                        && (rec.prev_offset == NO_PREV || rec.prev_offset < offset) =>
                {
                    rec
                }
                _ => {
                    broken = Some((offset, expect_seq - min_seq + 1));
                    break;
                }
            };
            if rec.header.seq < expect_seq {
                // The link skipped live seqs (a bad tail offset or
                // prev-offset pointing at an older record).
                let lowest = (rec.header.seq + 1).max(min_seq);
                let n = expect_seq - lowest + 1;
                skipped = Some(match skipped {
                    Some((_, m, at)) => (lowest, m + n, at),
                    None => (lowest, n, offset),
                });
            }
            if rec.header.seq < min_seq {
                break;
            }
            links.push(ChainLink {
                offset,
                seq: rec.header.seq,
                stored_bytes: rec.stored_bytes(),
                payload_bytes: rec.payload.len() as u64,
            });
            expect_seq = rec.header.seq.saturating_sub(1);
            offset = rec.prev_offset;
        }
        if offset == NO_PREV && expect_seq >= min_seq && broken.is_none() {
            // The chain ended before the oldest live record.
            broken = Some((offset, expect_seq - min_seq + 1));
        }
        drop(buckets);
        let mut lost = None;
        if let Some((lowest, n, at)) = skipped {
            self.count_unreachable(state.bucket, at, n, "chain_skips_seqs");
            lost = Some(lowest);
        }
        if let Some((at, n)) = broken {
            self.count_unreachable(state.bucket, at, n, "chain_broken");
            lost = Some(min_seq);
        }
        Ok((links, lost))
    }

    /// Count one damaged place in `bucket` that makes `records` live
    /// records unreadable (`why`: `checksum`, `chain_broken`,
    /// `chain_skips_seqs`, `bad_bucket_id`, `no_bucket_file`), and log it
    /// (at most once a second: a client may ask again and again).
    pub(super) fn count_unreachable(
        &mut self,
        bucket: u32,
        offset: u64,
        records: u64,
        why: &'static str,
    ) {
        self.counters.corrupt_records_total += 1;
        metrics::counter!("msgstore_corrupt_records_total").increment(1);
        metrics::counter!("msgstore_unreachable_records_total", "why" => why).increment(records);
        rate_limited(|suppressed| {
            tracing::error!(
                bucket,
                offset,
                records,
                why,
                suppressed,
                "damaged bucket: live records cannot be read"
            );
        });
    }

    pub(super) fn user_stats(&mut self, user: u64) -> Result<MailboxStats> {
        self.check_usable()?;
        let state = self.load_user(user)?;
        self.admit(user, state.as_ref(), false)?;
        Ok(mailbox_stats(state.as_ref()))
    }

    pub(super) fn stats(&self) -> ShardStats {
        let (bucket_bytes, dead_bytes) = self
            .bucket_meta
            .values()
            .fold((0, 0), |(b, d), m| (b + m.len, d + m.dead_bytes));
        ShardStats {
            users: self.totals.users,
            live_messages: self.totals.live_messages,
            live_bytes: self.totals.live_bytes,
            wal_bytes: self.wal.bytes_since_checkpoint,
            bucket_bytes,
            dead_bytes,
            open_maps: lock(&self.buckets).open_maps() as u64,
            ..self.counters.clone()
        }
    }

    /// Note what `user` looks like before the batch changes it. Saved on
    /// every change (no check whether the batch saved it already): rollback
    /// restores in reverse order, so the first save of the batch wins.
    /// (`apply_append` pushes the same entry from its own map operations.)
    pub(super) fn save_for_undo(&mut self, user: u64) {
        if self.undo.active {
            let before = self.dirty.get(&user).map(|d| (d.state, d.pending.len()));
            self.undo.users.push((
                user,
                before.map(|(s, _)| s),
                before.map_or(0, |(_, len)| len),
            ));
        }
    }

    fn save_bucket_for_undo(&mut self, bucket: u32) {
        if self.undo.active {
            let prev = self.bucket_meta.get(&bucket).copied();
            self.undo.buckets.push((bucket, prev));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{EngineConfig, FsyncPolicy};

    fn append(e: &mut Engine, user: u64, len: usize) {
        e.begin_batch();
        let r = e.append(AppendRequest {
            user,
            msg_id: 0,
            payload: vec![7; len],
        });
        e.end_batch().unwrap();
        r.unwrap();
    }

    /// `Expire` deletes the leading run of records older than its cutoff,
    /// by their stored timestamps, in the bucket and unflushed alike, and
    /// never a newer record behind them.
    #[test]
    fn expire_deletes_only_the_leading_records_older_than_the_cutoff() {
        let dir = tempfile::tempdir().unwrap();
        let config = EngineConfig {
            fsync: FsyncPolicy::Never,
            ..EngineConfig::default()
        };
        let mut e = Engine::open(dir.path(), config).unwrap();
        let group = proto::groups::GROUP_ID_BASE | 9;
        for (i, at) in [1_000u64, 2_000, 3_000, 4_000, 5_000]
            .into_iter()
            .enumerate()
        {
            e.set_clock_ms(at);
            append(&mut e, group, 10);
            if i == 1 {
                e.checkpoint_now().unwrap();
            }
        }
        let expire = |e: &mut Engine, before_ms| {
            e.begin_batch();
            let r = e.expire(group, before_ms, u64::MAX);
            e.end_batch().unwrap();
            r.unwrap()
        };
        assert_eq!(expire(&mut e, 1_000), 0, "nothing stored before 1000");
        assert_eq!(expire(&mut e, 3_500), 3, "seqs 1..=3");
        assert_eq!(e.user_stats(group).unwrap().acked_seq, 3);
        assert_eq!(expire(&mut e, 3_500), 0, "gone already");
        assert_eq!(expire(&mut e, u64::MAX), 2);
        let stats = e.user_stats(group).unwrap();
        assert_eq!(
            (stats.live_count, stats.acked_seq, stats.last_seq),
            (0, 5, 5)
        );
    }

    /// `AppendBatchOnce` stores an item whose msg_id is among the live
    /// records stored since its cutoff once (in the bucket or unflushed),
    /// answering the first seq, and stores it again when the copy is older
    /// than the cutoff, acknowledged, or another msg_id.
    #[test]
    fn append_once_answers_the_seq_already_stored() {
        let dir = tempfile::tempdir().unwrap();
        let config = EngineConfig {
            fsync: FsyncPolicy::Never,
            ..EngineConfig::default()
        };
        let mut e = Engine::open(dir.path(), config).unwrap();
        let group = proto::groups::GROUP_ID_BASE | 3;
        let once = |e: &mut Engine, msg_id: u128, since_ms: u64| {
            e.begin_batch();
            let req = AppendRequest {
                user: group,
                msg_id,
                payload: b"body".to_vec(),
            };
            let r = e.append_once(req, since_ms);
            e.end_batch().unwrap();
            r.unwrap()
        };
        e.set_clock_ms(1_000);
        assert_eq!(once(&mut e, 77, 0), 1);
        for id in 100..2_500u128 {
            once(&mut e, id, 0); // more than a page of others after it
        }
        e.set_clock_ms(2_000);
        assert_eq!(once(&mut e, 77, 500), 1, "unflushed: the first seq");
        e.checkpoint_now().unwrap();
        assert_eq!(once(&mut e, 77, 500), 1, "in the bucket: the first seq");
        assert_eq!(once(&mut e, 2_499, 0), 2_401, "the newest one too");
        assert_eq!(
            once(&mut e, 77, 1_500),
            2_402,
            "older than the cutoff: stored"
        );
        e.begin_batch();
        e.ack(group, 2_402).unwrap();
        e.end_batch().unwrap();
        assert_eq!(once(&mut e, 77, 0), 2_403, "acknowledged: stored again");
        assert_eq!(once(&mut e, 78, 0), 2_404, "another id");
    }

    /// An ack of everything counts the same bytes without a walk as with
    /// one, whether the records are in the bucket, unflushed, or both.
    #[test]
    fn acking_everything_counts_the_bytes_a_walk_counts() {
        let dir = tempfile::tempdir().unwrap();
        let config = EngineConfig {
            fsync: FsyncPolicy::Never,
            bucket_dirs: 2,
            bucket_files: 2,
            ..EngineConfig::default()
        };
        let mut e = Engine::open(dir.path(), config).unwrap();
        let user = 5;
        for (i, len) in [0usize, 1, 200, 33, 4000].into_iter().enumerate() {
            append(&mut e, user, len);
            if i == 2 {
                e.checkpoint_now().unwrap();
            }
        }
        // Acknowledge the first record, so the rest starts mid-chain.
        e.begin_batch();
        e.ack(user, 1).unwrap();
        e.end_batch().unwrap();
        let state = e.load_user(user).unwrap().unwrap();
        assert!(
            state.tail_seq > state.acked_seq,
            "some live records are in the bucket"
        );
        assert!(state.last_seq() > state.tail_seq, "some are unflushed");
        let walked = e.acked_bytes(user, &state, state.last_seq()).unwrap();
        assert_eq!(e.all_acked_bytes(user, &state), walked);
        assert_eq!(walked.0, 1 + 200 + 33 + 4000);
        e.checkpoint_now().unwrap();
        let state = e.load_user(user).unwrap().unwrap();
        assert_eq!(
            state.tail_seq,
            state.last_seq(),
            "everything is in the bucket"
        );
        let walked = e.acked_bytes(user, &state, state.last_seq()).unwrap();
        assert_eq!(e.all_acked_bytes(user, &state), walked);
    }
}
