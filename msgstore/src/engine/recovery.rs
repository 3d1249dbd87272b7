//! Opening a shard: lock, index, unfinished compaction swaps, log replay.

use super::{
    buckets::{parse_compacted_name, Buckets},
    checkpoint,
    codec::MESSAGE_HEADER_BYTES,
    index::{Index, META_APPLIED, META_FROZEN, META_ROUTING},
    migrate::{decode_frozen, Freeze},
    routing::{self, RoutingTable},
    state::{bucket_for_user, UserState},
    wal::{self, Entry, LogScan, Position, SegmentEnd, Wal},
    Engine, Totals, Undo,
};
use crate::{
    error::{LogDamage, RepairReport},
    EngineConfig, Error, FsyncPolicy, Result,
};
use proto::shard::ShardStats;
// Keys are user ids and bucket numbers: a seeded fast hash, not SipHash.
use foldhash::{HashMap, HashMapExt, HashSet, HashSetExt};
use std::{path::Path, time::Instant};

/// Largest log entry replay accepts, whatever the configured message limit
/// (it may have been lowered since the entry was written).
const REPLAY_ENTRY_BYTES_MAX: usize = 1 + MESSAGE_HEADER_BYTES + 16 * 1024 * 1024;

/// How a shard is opened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum OpenMode {
    /// Serve with its own write-ahead log.
    Standalone,
    /// `msgstore --repair`: replay a damaged log up to the damage.
    Repair,
    /// As the state machine of a Raft group: no log of its own.
    Replicated,
}

impl Engine {
    pub(crate) fn open(dir: &Path, config: EngineConfig) -> Result<Engine> {
        Ok(Engine::open_inner(dir, config, OpenMode::Standalone)?.0)
    }

    /// Open for `msgstore --repair`: a log damaged with valid entries after
    /// the damage is replayed up to the damage (nothing on disk changed
    /// yet) and every seq the dropped part may have given is put out of
    /// reach; [`Engine::finish_repair`] then makes that durable and cuts
    /// the log.
    pub(crate) fn open_for_repair(
        dir: &Path,
        config: EngineConfig,
    ) -> Result<(Engine, RepairReport)> {
        let (mut engine, damage) = Engine::open_inner(dir, config, OpenMode::Repair)?;
        let mut report = RepairReport::default();
        if let Some(damage) = damage {
            report.raised = engine.raise_seqs_past(&damage)?;
            report.damage = Some(damage);
        }
        Ok((engine, report))
    }

    /// Checkpoint (the raised seqs and the replayed prefix become durable in
    /// the index), then cut the log at the damage: only then is anything
    /// dropped, so a crash in between leaves the log to be repaired again.
    pub(crate) fn finish_repair(mut self, report: &RepairReport) -> Result<()> {
        self.shutdown()?;
        if let Some(damage) = &report.damage {
            let wal_dir = self.dir.join("wal");
            let current = self.wal.position().segment;
            let bad = std::path::PathBuf::from(&damage.file);
            for seg in wal::list_segments(&wal_dir)? {
                let path = wal_dir.join(format!("{seg:016x}.log"));
                if seg >= current || path < bad {
                    continue;
                }
                if path == bad && damage.offset > 0 {
                    let f = match std::fs::OpenOptions::new().write(true).open(&path) {
                        Ok(f) => f,
                        // The checkpoint's trim got there first.
                        Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                        Err(e) => return Err(e.into()),
                    };
                    let len = f.metadata()?.len();
                    if len > damage.offset {
                        use std::os::unix::fs::FileExt;
                        f.write_all_at(&vec![0u8; (len - damage.offset) as usize], damage.offset)?;
                    }
                    f.sync_all()?;
                } else {
                    match std::fs::remove_file(&path) {
                        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e.into()),
                        _ => {}
                    }
                }
            }
            wal::sync_dir(&wal_dir)?;
        }
        Ok(())
    }

    /// Raise each user's next seq above every seq the dropped part of the
    /// log may have given it: users with valid dropped appends go past the
    /// highest of them; then every user goes up by the most appends the
    /// unreadable bytes can have held (their user is unknown).
    fn raise_seqs_past(&mut self, damage: &LogDamage) -> Result<Vec<(u64, u64)>> {
        let unknown = damage
            .unreadable_bytes
            .div_ceil(wal::APPEND_FRAME_BYTES_MIN);
        let mut users: std::collections::BTreeSet<u64> =
            damage.dropped_seqs.iter().map(|d| d.0).collect();
        if unknown > 0 {
            users.extend(self.dirty.keys().copied());
            let mut from = 0u64;
            loop {
                let page = self.index.users_from(from, 4096)?;
                let Some(&last) = page.last() else { break };
                users.extend(page.iter().copied());
                match last.checked_add(1) {
                    Some(n) => from = n,
                    None => break,
                }
            }
        }
        let mut raised = Vec::new();
        for user in users {
            let known = damage
                .dropped_seqs
                .iter()
                .find(|d| d.0 == user)
                .map_or(0, |d| d.2);
            let state = match self.load_user(user)? {
                Some(s) => s,
                None => UserState::new(bucket_for_user(user, self.config.buckets())),
            };
            if state.moved {
                continue;
            }
            let next = state
                .next_seq
                .max(known.saturating_add(1))
                .saturating_add(unknown);
            if next <= state.next_seq {
                continue;
            }
            let mut state = state;
            let fresh = state.next_seq == 1 && state.acked_seq == 0;
            if state.live_count() == 0 {
                // Nothing live: the skipped seqs are simply acknowledged.
                state.acked_seq = next - 1;
            } else {
                // Live records then a gap: the skipped seqs count as live
                // but unreadable (like a damaged bucket record) until acked.
                self.totals.live_messages += next - state.next_seq;
            }
            if fresh && self.load_user(user)?.is_none() {
                self.totals.users += 1;
            }
            state.next_seq = next;
            self.set_dirty_state(user, state);
            raised.push((user, next));
        }
        Ok(raised)
    }

    pub(super) fn open_inner(
        dir: &Path,
        config: EngineConfig,
        mode: OpenMode,
    ) -> Result<(Engine, Option<LogDamage>)> {
        let lock = daemon::DirLock::acquire(dir)?;
        let index = Index::open(&dir.join("index"), config.index_map_bytes)?;
        index.check_fanout(config.bucket_dirs, config.bucket_files)?;
        let meta = index.checkpoint_meta()?;
        let mut buckets = Buckets::new(
            &dir.join("buckets"),
            config.bucket_files,
            config.resolved_open_maps_max(),
        )?;
        finish_swaps(&dir.join("compact"), &meta.pending_swaps, &mut buckets)?;
        let wal_dir = dir.join("wal");
        std::fs::create_dir_all(&wal_dir)?;
        let segments: Vec<u64> = wal::list_segments(&wal_dir)?;
        // Decide torn tail or corruption before anything on disk changes.
        let damage =
            match wal::scan_log(&wal_dir, meta.wal_start, &segments, REPLAY_ENTRY_BYTES_MAX)? {
                LogScan::Corrupt(damage) => {
                    metrics::counter!("msgstore_wal_corrupt_total").increment(1);
                    metrics::counter!("msgstore_corrupt_records_total").increment(1);
                    tracing::error!(
                        file = %damage.file,
                        offset = damage.offset,
                        fault = %damage.fault,
                        valid_after = damage.valid_after,
                        appends_after = damage.appends_after,
                        unreadable_bytes = damage.unreadable_bytes,
                        "the log is corrupt: valid entries follow damaged bytes"
                    );
                    if mode != OpenMode::Repair {
                        return Err(Error::LogDamaged(Box::new(damage)));
                    }
                    Some(damage)
                }
                LogScan::TornTail { .. } | LogScan::Clean => None,
            };
        let next_segment = segments
            .last()
            .map_or(1, |s| s + 1)
            .max(meta.wal_start.segment);
        let dsync = config.fsync == FsyncPolicy::Always;
        let wal = match mode {
            OpenMode::Replicated => {
                Wal::detached(&wal_dir, next_segment, config.wal_segment_bytes)?
            }
            OpenMode::Standalone | OpenMode::Repair => {
                Wal::create(&wal_dir, next_segment, config.wal_segment_bytes, dsync)?
            }
        };
        let frozen = match mode {
            OpenMode::Replicated => load_frozen(&index)?,
            OpenMode::Standalone | OpenMode::Repair => HashMap::new(),
        };
        let mut engine = Engine {
            dir: dir.to_path_buf(),
            routing: load_routing(dir, &index)?,
            applied: index.meta_value(META_APPLIED)?,
            _lock: lock,
            bucket_meta: index.buckets()?.into_iter().collect(),
            index: std::sync::Arc::new(index),
            buckets: std::sync::Arc::new(std::sync::Mutex::new(buckets)),
            dirty: HashMap::new(),
            clean: std::sync::Arc::new(super::CleanStates::new(config.clean_states_max)),
            spare_dirty: None,
            wal,
            totals: Totals {
                users: meta.users_total,
                live_messages: meta.live_messages,
                live_bytes: meta.live_bytes,
            },
            counters: ShardStats::default(),
            poisoned: None,
            unsynced: false,
            last_sync: Instant::now(),
            last_checkpoint: Instant::now(),
            log_grew: (0, Instant::now()),
            idle_released: false,
            wal_buf: Vec::new(),
            undo: Undo::default(),
            batch_counts: Default::default(),
            deferred_counts: Default::default(),
            failed_batch: None,
            acked_in_batch: Vec::new(),
            compact_candidates: HashSet::new(),
            job: None,
            checkpoint_retry_at: Instant::now(),
            log_inflight: 0,
            log_durability: Default::default(),
            log_buffers: Default::default(),
            frozen,
            batch: 0,
            acked_during_job: Vec::new(),
            clock_ms: None,
            replicated: mode == OpenMode::Replicated,
            meta_dirty: false,
            config,
        };
        engine.wal.remove_before(meta.wal_start)?;
        engine.replay(&wal_dir, meta.wal_start, &segments, damage.is_none())?;
        if damage.is_some() {
            engine.counters.corrupt_records_total += 1;
        }
        engine.prune_acked();
        if engine.config.precreate_buckets {
            let started = Instant::now();
            let created =
                checkpoint::lock(&engine.buckets).create_missing(engine.config.buckets())?;
            tracing::info!(
                created,
                elapsed_ms = started.elapsed().as_millis() as u64,
                "created missing bucket files"
            );
        }
        Ok((engine, damage))
    }

    /// Apply every valid entry of the segments, oldest first. The first torn
    /// or corrupt entry ends the replay: the segment is cut there and later
    /// segments (which cannot be trusted to follow it) are removed.
    ///
    /// With `cut` false (a repair of corruption), nothing on disk changes:
    /// the damage is cut by [`Engine::finish_repair`] after a checkpoint.
    fn replay(
        &mut self,
        wal_dir: &Path,
        start: Position,
        segments: &[u64],
        cut: bool,
    ) -> Result<()> {
        let mut ended = false;
        let mut replayed = 0u64;
        for &seg in segments.iter().filter(|s| **s >= start.segment) {
            if ended && !cut {
                continue;
            }
            if ended {
                tracing::warn!(segment = seg, "removing log segment after a torn one");
                std::fs::remove_file(wal_dir.join(format!("{seg:016x}.log")))?;
                continue;
            }
            let from = if seg == start.segment {
                start.offset
            } else {
                0
            };
            let end = wal::replay_segment(wal_dir, seg, from, REPLAY_ENTRY_BYTES_MAX, cut, |e| {
                replayed += 1;
                self.replay_entry(e)
            })?;
            if let (SegmentEnd::Torn { .. }, false) = (end, cut) {
                ended = true;
            } else if let SegmentEnd::Torn { valid_bytes, fault } = end {
                tracing::warn!(
                    segment = seg,
                    valid_bytes,
                    ?fault,
                    "log tail was torn (nothing valid after it); dropped it"
                );
                metrics::counter!("msgstore_wal_torn_tails_total").increment(1);
                metrics::counter!("msgstore_corrupt_records_total").increment(1);
                self.counters.corrupt_records_total += 1;
                ended = true;
            }
        }
        // What was replayed must reach a checkpoint soon.
        self.wal.bytes_since_checkpoint = if replayed > 0 {
            self.config.checkpoint_wal_bytes
        } else {
            0
        };
        if replayed > 0 {
            tracing::info!(entries = replayed, "replayed the log");
        }
        Ok(())
    }

    fn replay_entry(&mut self, entry: Entry<'_>) -> Result<()> {
        match entry {
            Entry::Append { header, payload } => {
                let state = match self.load_user(header.user)? {
                    Some(s) => s,
                    None => UserState::new(bucket_for_user(header.user, self.config.buckets())),
                };
                if header.seq < state.next_seq {
                    return Ok(()); // already in the index
                }
                let mut state = state;
                if header.seq > state.next_seq {
                    tracing::error!(
                        user = header.user,
                        seq = header.seq,
                        expected = state.next_seq,
                        "gap in the log"
                    );
                    state.next_seq = header.seq;
                }
                self.apply_append(state, header, payload.to_vec());
            }
            Entry::Ack { user, up_to_seq } => {
                if let Some(state) = self.load_user(user)? {
                    let up_to = up_to_seq.min(state.last_seq());
                    if up_to > state.acked_seq {
                        self.apply_ack(user, state, up_to)?;
                    }
                }
            }
            Entry::Reseq { user, next_seq } => {
                let state = self.load_user(user)?;
                let existed = state.is_some();
                let state = state.unwrap_or_else(|| {
                    UserState::new(bucket_for_user(user, self.config.buckets()))
                });
                self.apply_reseq(user, existed, state, next_seq)?;
            }
            Entry::Moved { user } => {
                if let Some(mut state) = self.load_user(user)? {
                    if state.live_count() > 0 {
                        self.apply_ack(user, state, state.last_seq())?;
                        state = self.dirty[&user].state;
                    }
                    self.apply_moved(user, state);
                }
            }
        }
        Ok(())
    }
}

/// The routing `routing.toml` holds, else the one a replicated past left
/// in the index (a replicated shard moves the file into the index at open,
/// so a file is always at least as new as the index's).
fn load_routing(dir: &Path, index: &Index) -> Result<Option<RoutingTable>> {
    if let Some(table) = routing::load(dir)? {
        return Ok(Some(table));
    }
    let Some(bytes) = index.meta_value(META_ROUTING)? else {
        return Ok(None);
    };
    let text = String::from_utf8(bytes)
        .map_err(|_| Error::Corrupt("the index's routing is not UTF-8".into()))?;
    routing::from_text(&text, "the index's routing").map(Some)
}

/// The frozen users a replicated shard's last checkpoint recorded.
fn load_frozen(index: &Index) -> Result<HashMap<u64, Freeze>> {
    match index.meta_value(META_FROZEN)? {
        None => Ok(HashMap::new()),
        Some(b) => decode_frozen(&b)
            .ok_or_else(|| Error::Corrupt("the index's frozen users record".into())),
    }
}

/// Move compacted files the index already refers to into place; delete any
/// other compacted file (its checkpoint never committed).
fn finish_swaps(compact_dir: &Path, pending: &[(u32, u64)], buckets: &mut Buckets) -> Result<()> {
    let entries = match std::fs::read_dir(compact_dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e.into()),
    };
    for entry in entries {
        let entry = entry?;
        let name = entry.file_name().to_string_lossy().into_owned();
        match parse_compacted_name(&name) {
            Some((bucket, gen)) if pending.contains(&(bucket, gen)) => {
                tracing::info!(bucket, gen, "finishing an interrupted compaction swap");
                buckets.install_compacted(compact_dir, bucket, gen)?;
            }
            _ => std::fs::remove_file(entry.path())?,
        }
    }
    wal::sync_dir(compact_dir)?;
    Ok(())
}
