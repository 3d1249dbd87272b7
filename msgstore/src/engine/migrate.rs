//! Rebalance support: the routing check every user request passes, and the
//! freeze / import / release steps that move one user's mailbox to another
//! shard with its sequence numbers (`docs/STORAGE.md`, "Moving a user").

use super::{
    codec::MessageHeader,
    routing::{self, RoutingTable, Verdict},
    state::{bucket_for_user, UserState},
    wal, Engine,
};
use crate::{Error, Result};
// Keys are user ids: a seeded fast hash, not SipHash.
use foldhash::HashMap;
use proto::shard::{
    MailboxStats, Routing, StoredRecord, UserEntry, FREEZE_HOLD_MS, FROZEN_USERS_MAX,
    LIST_USERS_MAX,
};

/// A user whose writes are refused while a tool copies the mailbox.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Freeze {
    /// The token the freeze was taken under; `Release` must name it.
    pub(super) token: u64,
    /// The freeze lapses at this engine-clock time (ms since the epoch).
    pub(super) until_ms: u64,
}

impl Engine {
    /// Whether a request for `user` (whose state is `state`) is served
    /// here: not moved away, owned or held here, and, for a write, not
    /// frozen.
    pub(super) fn admit(
        &mut self,
        user: u64,
        state: Option<&UserState>,
        write: bool,
    ) -> Result<()> {
        match &self.routing {
            Some(table) => {
                if let Verdict::MovedTo(shard) = table.verdict(user, state) {
                    metrics::counter!("msgstore_moved_answers_total").increment(1);
                    return Err(table.moved_error(&shard));
                }
            }
            None if state.is_some_and(|s| s.moved) => {
                return Err(Error::Conflict(format!(
                    "user {user} was moved away and this shard has no routing to say where"
                )))
            }
            None => {}
        }
        if write && self.is_frozen(user) {
            metrics::counter!("msgstore_busy_answers_total").increment(1);
            return Err(Error::Busy("the user is being moved to another shard"));
        }
        Ok(())
    }

    fn is_frozen(&mut self, user: u64) -> bool {
        if self.frozen.is_empty() {
            return false;
        }
        match self.frozen.get(&user) {
            Some(f) if f.until_ms > self.now_ms() => true,
            Some(_) => {
                self.frozen.remove(&user);
                false
            }
            None => false,
        }
    }

    /// Install `routing`. A standalone shard persists it in
    /// `routing.toml` before answering; a replicated one in its next
    /// checkpoint (a file written now would run ahead of the checkpointed
    /// state the Raft log is applied to again after a restart).
    pub(super) fn set_routing(&mut self, routing: Routing) -> Result<()> {
        let table = RoutingTable::new(routing)?;
        if let Some(old) = &self.routing {
            old.check_successor(table.routing())?;
        }
        if self.replicated {
            self.meta_dirty = true;
        } else {
            routing::store(&self.dir, table.routing())?;
        }
        tracing::info!(
            me = %table.routing().me,
            current = table.routing().current.epoch,
            target = ?table.routing().target.as_ref().map(|t| t.epoch),
            "routing installed"
        );
        self.routing = Some(table);
        Ok(())
    }

    pub(super) fn routing(&self) -> Option<Routing> {
        self.routing.as_ref().map(|t| t.routing().clone())
    }

    /// Users with a mailbox here (not moved away) with ids from `start`
    /// on, ascending: those the index has merged with those changed since.
    pub(super) fn list_users(
        &mut self,
        start: u64,
        limit: u32,
    ) -> Result<(Vec<UserEntry>, Option<u64>)> {
        self.check_usable()?;
        let limit = limit.clamp(1, LIST_USERS_MAX) as usize;
        let indexed = self.index.users_from(start, limit)?;
        let bound = if indexed.len() == limit {
            *indexed.last().expect("limit >= 1")
        } else {
            u64::MAX
        };
        let snapshot = self.job.as_ref().map(|j| &j.snapshot);
        let recent = self
            .dirty
            .keys()
            .chain(snapshot.into_iter().flat_map(|s| s.keys()))
            .copied()
            .filter(|&u| u >= start && u <= bound);
        let mut ids: Vec<u64> = indexed.iter().copied().chain(recent).collect();
        ids.sort_unstable();
        ids.dedup();
        let more = indexed.len() == limit || ids.len() > limit;
        ids.truncate(limit);
        let next = ids
            .last()
            .filter(|_| more)
            .and_then(|last| last.checked_add(1));
        let mut users = Vec::with_capacity(ids.len());
        for user in ids {
            if let Some(s) = self.load_user(user)?.filter(|s| !s.moved) {
                users.push(UserEntry {
                    user,
                    live_count: s.live_count(),
                    live_bytes: s.live_bytes,
                });
            }
        }
        Ok((users, next))
    }

    pub(super) fn freeze(&mut self, user: u64, token: u64) -> Result<MailboxStats> {
        self.check_usable()?;
        let state = self.load_user(user)?;
        self.admit(user, state.as_ref(), false)?;
        let now_ms = self.now_ms();
        self.frozen.retain(|_, f| f.until_ms > now_ms);
        if !self.frozen.contains_key(&user) && self.frozen.len() >= FROZEN_USERS_MAX {
            return Err(Error::Busy("too many users are frozen on this shard"));
        }
        let until_ms = now_ms.saturating_add(FREEZE_HOLD_MS);
        self.frozen.insert(user, Freeze { token, until_ms });
        self.frozen_changed();
        Ok(mailbox_stats(state.as_ref()))
    }

    /// Bring `user` up to a copy from its old shard (see
    /// `proto::shard::RequestBody::Import`).
    pub(super) fn import(
        &mut self,
        user: u64,
        acked_seq: u64,
        records: &[StoredRecord],
    ) -> Result<MailboxStats> {
        self.check_wal_room()?;
        // Sequence numbers end below u64::MAX (a next seq must exist).
        if acked_seq == u64::MAX || records.iter().any(|r| r.seq == u64::MAX) {
            return Err(Error::Conflict(format!(
                "import of user {user} names sequence number {}, past the last one",
                u64::MAX
            )));
        }
        let existing = self.load_user(user)?;
        let mut state = existing.unwrap_or_else(|| self.new_user(user));
        let ack_to = acked_seq.min(state.last_seq());
        if ack_to > state.acked_seq {
            wal::encode_ack(user, ack_to, &mut self.wal_buf);
            self.apply_ack(user, state, ack_to)?;
            state = self.dirty[&user].state;
        }
        let next_seq = state.next_seq.max(acked_seq + 1);
        if state.live_count() == 0 && (next_seq != state.next_seq || state.moved) {
            wal::encode_reseq(user, next_seq, &mut self.wal_buf);
            self.apply_reseq(user, existing.is_some(), state, next_seq)?;
            state = self.dirty[&user].state;
        }
        for rec in records {
            if rec.seq < state.next_seq {
                continue; // already here
            }
            if rec.seq != state.next_seq {
                return Err(Error::Conflict(format!(
                    "import of user {user} skips from seq {} to {}",
                    state.next_seq, rec.seq
                )));
            }
            let header = MessageHeader {
                user,
                seq: rec.seq,
                timestamp_ms: rec.timestamp_ms,
                msg_id: rec.msg_id,
            };
            wal::encode_append(&header, &rec.payload, &mut self.wal_buf);
            self.apply_append(state, header, rec.payload.clone());
            state = self.dirty[&user].state;
        }
        self.batch_counts.imported_records += records.len() as u64;
        Ok(mailbox_stats(Some(&state)))
    }

    /// End the freeze of `user` under `token`; with `moved`, delete its
    /// mailbox and mark it moved. Returns how many records were deleted.
    pub(super) fn release(&mut self, user: u64, token: u64, moved: bool) -> Result<u64> {
        self.check_usable()?;
        let now_ms = self.now_ms();
        let held = self
            .frozen
            .get(&user)
            .is_some_and(|f| f.token == token && f.until_ms > now_ms);
        if !held {
            return Err(Error::Conflict(format!(
                "user {user} is not frozen under this token (the freeze expired or was replaced)"
            )));
        }
        if moved && self.routing.is_none() {
            return Err(Error::Conflict(
                "no routing is installed: a moved user would have nowhere to point".into(),
            ));
        }
        let mut removed = 0;
        if let (true, Some(mut state)) = (moved, self.load_user(user)?) {
            if state.live_count() > 0 {
                let last = state.last_seq();
                wal::encode_ack(user, last, &mut self.wal_buf);
                removed = self.apply_ack(user, state, last)?;
                state = self.dirty[&user].state;
            }
            wal::encode_moved(user, &mut self.wal_buf);
            self.apply_moved(user, state);
        }
        self.frozen.remove(&user);
        self.frozen_changed();
        Ok(removed)
    }

    /// A replicated shard's frozen users are part of its checkpointed
    /// state (a replica restarted, or installed from a snapshot, must
    /// refuse the same writes as the others); a standalone shard's are not.
    fn frozen_changed(&mut self) {
        if self.replicated {
            self.meta_dirty = true;
        }
    }

    fn new_user(&self, user: u64) -> UserState {
        UserState::new(bucket_for_user(user, self.config.buckets()))
    }

    /// `user` (with no live records once this returns) continues at
    /// `next_seq` and is no longer moved. Shared with log replay.
    pub(super) fn apply_reseq(
        &mut self,
        user: u64,
        existed: bool,
        mut state: UserState,
        next_seq: u64,
    ) -> Result<()> {
        if state.live_count() > 0 {
            let last = state.last_seq();
            self.apply_ack(user, state, last)?;
            state = self.dirty[&user].state;
        }
        self.save_for_undo(user);
        if !existed && !self.dirty.contains_key(&user) {
            self.totals.users += 1;
        }
        state.next_seq = next_seq.max(state.next_seq);
        state.acked_seq = state.next_seq - 1;
        state.live_bytes = 0;
        state.moved = false;
        self.set_dirty_state(user, state);
        self.acked_in_batch.push(user);
        Ok(())
    }

    /// Mark `user` (with no live records) moved away. Shared with replay.
    pub(super) fn apply_moved(&mut self, user: u64, mut state: UserState) {
        debug_assert_eq!(state.live_count(), 0, "only an empty mailbox is moved");
        self.save_for_undo(user);
        state.moved = true;
        self.set_dirty_state(user, state);
    }
}

/// Bytes of one frozen user in [`encode_frozen`].
const FROZEN_ENTRY_BYTES: usize = 24;

/// The `frozen` meta entry: `n` u64, then `n` times (`user`, `token`,
/// `until_ms`), each u64, ascending by user; little-endian.
pub(super) fn encode_frozen(frozen: &HashMap<u64, Freeze>) -> Vec<u8> {
    let mut users: Vec<(&u64, &Freeze)> = frozen.iter().collect();
    users.sort_unstable_by_key(|(u, _)| **u);
    let mut b = Vec::with_capacity(8 + users.len() * FROZEN_ENTRY_BYTES);
    b.extend_from_slice(&(users.len() as u64).to_le_bytes());
    for (user, f) in users {
        for v in [*user, f.token, f.until_ms] {
            b.extend_from_slice(&v.to_le_bytes());
        }
    }
    b
}

/// Decode [`encode_frozen`]'s bytes; `None` if they are malformed.
pub(super) fn decode_frozen(b: &[u8]) -> Option<HashMap<u64, Freeze>> {
    use super::codec::le_u64;
    let n = usize::try_from(le_u64(b.get(..8)?)).ok()?;
    let rest = &b[8..];
    if n > FROZEN_USERS_MAX || rest.len() != n * FROZEN_ENTRY_BYTES {
        return None;
    }
    let entries = rest.chunks_exact(FROZEN_ENTRY_BYTES).map(|c| {
        let (token, until_ms) = (le_u64(&c[8..16]), le_u64(&c[16..24]));
        (le_u64(&c[..8]), Freeze { token, until_ms })
    });
    Some(entries.collect())
}

pub(super) fn mailbox_stats(state: Option<&UserState>) -> MailboxStats {
    state.map_or(
        MailboxStats {
            live_count: 0,
            live_bytes: 0,
            last_seq: 0,
            acked_seq: 0,
        },
        |s| MailboxStats {
            live_count: s.live_count(),
            live_bytes: s.live_bytes,
            last_seq: s.last_seq(),
            acked_seq: s.acked_seq,
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{engine::routing::tests::map, handle::AppendRequest, EngineConfig, FsyncPolicy};

    fn config() -> EngineConfig {
        EngineConfig {
            fsync: FsyncPolicy::Never,
            bucket_dirs: 2,
            bucket_files: 2,
            wal_segment_bytes: 256 * 1024,
            ..EngineConfig::default()
        }
    }

    /// Run `f` as one batch, committed.
    fn batch<T>(e: &mut Engine, f: impl FnOnce(&mut Engine) -> T) -> T {
        e.begin_batch();
        let out = f(e);
        e.end_batch().unwrap();
        out
    }

    fn append(e: &mut Engine, user: u64, n: u8) -> Result<u64> {
        batch(e, |e| {
            e.append(AppendRequest {
                user,
                msg_id: u128::from(n) + 1000,
                payload: vec![n; 30],
            })
        })
    }

    fn records(e: &mut Engine, user: u64) -> Vec<StoredRecord> {
        e.fetch(user, 0, 1000, 1 << 20).unwrap().records
    }

    /// The steps the rebalance tool takes: freeze at the source, copy,
    /// import at the destination, release as moved. Both shards keep what
    /// they were told across a restart (log replay, then a checkpoint).
    #[test]
    fn a_user_moves_with_its_sequence_numbers_and_both_sides_survive_restarts() {
        let (src_dir, dst_dir) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let mut src = Engine::open(src_dir.path(), config()).unwrap();
        let mut dst = Engine::open(dst_dir.path(), config()).unwrap();
        let user = 42;
        for n in 1..=6 {
            assert_eq!(append(&mut src, user, n).unwrap(), u64::from(n));
        }
        assert_eq!(batch(&mut src, |e| e.ack(user, 2)).unwrap(), 2);
        let (old, new) = (map(1, &["a"]), map(2, &["b"]));
        for (e, me) in [(&mut src, "a"), (&mut dst, "b")] {
            let routing = Routing {
                me: me.into(),
                current: old.clone(),
                target: Some(new.clone()),
            };
            batch(e, |e| e.set_routing(routing)).unwrap();
        }
        let frozen = batch(&mut src, |e| e.freeze(user, 7)).unwrap();
        assert_eq!((frozen.acked_seq, frozen.last_seq), (2, 6));
        assert!(matches!(append(&mut src, user, 9), Err(Error::Busy(_))));
        let copy = records(&mut src, user);
        // Imported in two pages, the second twice (a retried request).
        let imported = batch(&mut dst, |e| e.import(user, 2, &copy[..2])).unwrap();
        assert_eq!((imported.acked_seq, imported.last_seq), (2, 4));
        for _ in 0..2 {
            let imported = batch(&mut dst, |e| e.import(user, 2, &copy[2..])).unwrap();
            assert_eq!((imported.acked_seq, imported.last_seq), (2, 6));
        }
        assert!(matches!(
            batch(&mut src, |e| e.release(user, 8, true)),
            Err(Error::Conflict(_))
        ));
        assert_eq!(batch(&mut src, |e| e.release(user, 7, true)).unwrap(), 4);
        assert!(matches!(
            append(&mut src, user, 9),
            Err(Error::Moved { ref shard, epoch: 2, .. }) if shard == "b"
        ));
        assert_eq!(records(&mut dst, user), copy);
        assert_eq!(append(&mut dst, user, 7).unwrap(), 7);
        for round in 0..2 {
            drop(src);
            drop(dst);
            src = Engine::open(src_dir.path(), config()).unwrap();
            dst = Engine::open(dst_dir.path(), config()).unwrap();
            assert!(
                matches!(src.fetch(user, 0, 10, 1000), Err(Error::Moved { .. })),
                "round {round}"
            );
            assert_eq!(src.list_users(0, 100).unwrap().0, vec![]);
            let got = records(&mut dst, user);
            assert_eq!(got.len(), 5);
            assert_eq!(got[..4], copy[..]);
            assert_eq!(dst.stats().users, 1);
            src.checkpoint_now().unwrap();
            dst.checkpoint_now().unwrap();
        }
    }

    #[test]
    fn importing_a_gap_is_refused_and_a_user_moved_back_continues_its_seqs() {
        let dir = tempfile::tempdir().unwrap();
        let mut e = Engine::open(dir.path(), config()).unwrap();
        let rec = |seq: u64| StoredRecord {
            seq,
            msg_id: u128::from(seq),
            timestamp_ms: 5,
            payload: vec![1; 8],
        };
        // Everything up to 10 was acked at the old shard; 11 and 12 live.
        let s = batch(&mut e, |e| e.import(5, 10, &[rec(11), rec(12)])).unwrap();
        assert_eq!((s.acked_seq, s.last_seq, s.live_count), (10, 12, 2));
        assert!(matches!(
            batch(&mut e, |e| e.import(5, 10, &[rec(14)])),
            Err(Error::Conflict(_))
        ));
        // Numbers at the very end of the range are refused, not overflowed.
        for (acked, seq) in [(u64::MAX, 16), (10, u64::MAX)] {
            assert!(matches!(
                batch(&mut e, |e| e.import(6, acked, &[rec(seq)])),
                Err(Error::Conflict(_))
            ));
        }
        // Moved away (acks everything), then moved back with a later ack.
        let routing = Routing {
            me: "a".into(),
            current: map(1, &["a"]),
            target: Some(map(2, &["a", "b"])),
        };
        batch(&mut e, |e| e.set_routing(routing)).unwrap();
        batch(&mut e, |e| e.freeze(5, 1)).unwrap();
        batch(&mut e, |e| e.release(5, 1, true)).unwrap();
        let s = batch(&mut e, |e| e.import(5, 15, &[rec(16)])).unwrap();
        assert_eq!((s.acked_seq, s.last_seq, s.live_count), (15, 16, 1));
        assert_eq!(records(&mut e, 5), vec![rec(16)]);
        assert_eq!(e.list_users(0, 10).unwrap().0.len(), 1);
        assert_eq!(e.stats().users, 1);
    }

    #[test]
    fn a_shard_being_moved_from_creates_no_new_mailboxes_and_freezes_expire_by_token() {
        let dir = tempfile::tempdir().unwrap();
        let mut e = Engine::open(dir.path(), config()).unwrap();
        let target = map(2, &["b"]);
        let routing = Routing {
            me: "a".into(),
            current: map(1, &["a"]),
            target: Some(target),
        };
        append(&mut e, 1, 1).unwrap();
        batch(&mut e, |e| e.set_routing(routing.clone())).unwrap();
        // User 1 has a mailbox here: still served. User 2 has none: moved.
        append(&mut e, 1, 2).unwrap();
        assert!(matches!(append(&mut e, 2, 1), Err(Error::Moved { .. })));
        // An older routing is refused.
        let older = Routing {
            current: map(0, &["a"]),
            target: None,
            ..routing
        };
        assert!(matches!(
            batch(&mut e, |e| e.set_routing(older)),
            Err(Error::Conflict(_))
        ));
        // A re-freeze under a new token makes the old token useless.
        batch(&mut e, |e| e.freeze(1, 1)).unwrap();
        batch(&mut e, |e| e.freeze(1, 2)).unwrap();
        assert!(batch(&mut e, |e| e.release(1, 1, false)).is_err());
        assert_eq!(batch(&mut e, |e| e.release(1, 2, false)).unwrap(), 0);
        assert_eq!(append(&mut e, 1, 3).unwrap(), 3);
        // The frozen set has a limit (users without a mailbox here are
        // answered `Moved`, so this is on a shard without routing).
        drop(e);
        let dir = tempfile::tempdir().unwrap();
        let mut e = Engine::open(dir.path(), config()).unwrap();
        for user in 100..100 + FROZEN_USERS_MAX as u64 {
            batch(&mut e, |e| e.freeze(user, 1)).unwrap();
        }
        assert!(matches!(
            batch(&mut e, |e| e.freeze(1, 1)),
            Err(Error::Busy(_))
        ));
    }

    /// Any sequence of rebalance and mailbox requests, with arbitrary
    /// numbers (edges included), answers without panicking and leaves
    /// every mailbox gap-free, also after a restart.
    mod arbitrary {
        use super::*;
        use proptest::prelude::*;
        use proto::shard::{RequestBody, StoredRecord};

        fn number() -> impl Strategy<Value = u64> {
            prop_oneof![0u64..8, Just(u64::MAX), Just(u64::MAX - 1), any::<u64>()]
        }

        fn record() -> impl Strategy<Value = StoredRecord> {
            (number(), any::<u8>()).prop_map(|(seq, b)| StoredRecord {
                seq,
                msg_id: u128::from(b),
                timestamp_ms: 1,
                payload: vec![b; 3],
            })
        }

        fn request() -> impl Strategy<Value = RequestBody> {
            let user = 0u64..4;
            prop_oneof![
                (user.clone(), any::<u8>()).prop_map(|(user, b)| RequestBody::Append {
                    user,
                    msg_id: u128::from(b),
                    payload: vec![b; 5],
                }),
                (user.clone(), number())
                    .prop_map(|(user, up_to_seq)| RequestBody::Ack { user, up_to_seq }),
                (user.clone(), number()).prop_map(|(user, token)| RequestBody::Freeze {
                    user,
                    token: token % 3
                }),
                (
                    user.clone(),
                    number(),
                    proptest::collection::vec(record(), 0..4)
                )
                    .prop_map(|(user, acked_seq, records)| RequestBody::Import {
                        user,
                        acked_seq,
                        records
                    }),
                (user.clone(), number(), any::<bool>()).prop_map(|(user, token, moved)| {
                    RequestBody::Release {
                        user,
                        token: token % 3,
                        moved,
                    }
                }),
                (number(), number()).prop_map(|(start, limit)| RequestBody::ListUsers {
                    start,
                    limit: limit as u32
                }),
            ]
        }

        fn gap_free(e: &mut Engine) {
            for user in 0..4 {
                let Ok(page) = e.fetch(user, 0, 1000, 1 << 20) else {
                    continue; // moved away
                };
                let stats = e.user_stats(user).unwrap();
                let seqs: Vec<u64> = page.records.iter().map(|r| r.seq).collect();
                let want: Vec<u64> = (stats.acked_seq + 1..=stats.last_seq).collect();
                assert_eq!(seqs, want, "user {user}");
            }
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(64))]
            #[test]
            fn requests_never_panic_and_mailboxes_stay_gap_free(
                requests in proptest::collection::vec(request(), 1..40)
            ) {
                let dir = tempfile::tempdir().unwrap();
                let mut e = Engine::open(dir.path(), config()).unwrap();
                let routing = Routing {
                    me: "a".into(),
                    current: map(1, &["a"]),
                    target: Some(map(2, &["a", "b"])),
                };
                batch(&mut e, |e| e.set_routing(routing)).unwrap();
                for body in requests {
                    batch(&mut e, |e| e.respond(body));
                    gap_free(&mut e);
                }
                drop(e);
                let mut e = Engine::open(dir.path(), config()).unwrap();
                gap_free(&mut e);
            }
        }
    }
}
