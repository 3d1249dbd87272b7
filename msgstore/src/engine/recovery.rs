//! Opening a shard: lock, index, unfinished compaction swaps, log replay.

use super::{
    buckets::{parse_compacted_name, Buckets},
    checkpoint,
    codec::MESSAGE_HEADER_BYTES,
    index::Index,
    state::{bucket_for_user, UserState},
    wal::{self, Entry, Position, SegmentEnd, Wal},
    Engine, Totals, Undo,
};
use crate::{EngineConfig, FsyncPolicy, Result};
use proto::shard::ShardStats;
// Keys are user ids and bucket numbers: a seeded fast hash, not SipHash.
use foldhash::{HashMap, HashMapExt, HashSet, HashSetExt};
use std::{path::Path, time::Instant};

/// Largest log entry replay accepts, whatever the configured message limit
/// (it may have been lowered since the entry was written).
const REPLAY_ENTRY_BYTES_MAX: usize = 1 + MESSAGE_HEADER_BYTES + 16 * 1024 * 1024;

impl Engine {
    pub(crate) fn open(dir: &Path, config: EngineConfig) -> Result<Engine> {
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
        let next_segment = segments
            .last()
            .map_or(1, |s| s + 1)
            .max(meta.wal_start.segment);
        let dsync = config.fsync == FsyncPolicy::Always;
        let mut engine = Engine {
            dir: dir.to_path_buf(),
            _lock: lock,
            bucket_meta: index.buckets()?.into_iter().collect(),
            index: std::sync::Arc::new(index),
            buckets: std::sync::Arc::new(std::sync::Mutex::new(buckets)),
            dirty: HashMap::new(),
            clean: std::sync::Arc::new(super::CleanStates::new(config.clean_states_max)),
            spare_dirty: None,
            wal: Wal::create(&wal_dir, next_segment, config.wal_segment_bytes, dsync)?,
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
            wal_buf: Vec::new(),
            undo: Undo::default(),
            acked_in_batch: Vec::new(),
            compact_candidates: HashSet::new(),
            job: None,
            checkpoint_retry_at: Instant::now(),
            log_inflight: 0,
            log_durability: Default::default(),
            log_buffers: Default::default(),
            routing: super::routing::load(dir)?,
            frozen: HashMap::new(),
            batch: 0,
            acked_during_job: Vec::new(),
            config,
        };
        engine.wal.remove_before(meta.wal_start)?;
        engine.replay(&wal_dir, meta.wal_start, &segments)?;
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
        Ok(engine)
    }

    /// Apply every valid entry of the segments, oldest first. The first torn
    /// or corrupt entry ends the replay: the segment is cut there and later
    /// segments (which cannot be trusted to follow it) are removed.
    fn replay(&mut self, wal_dir: &Path, start: Position, segments: &[u64]) -> Result<()> {
        let mut ended = false;
        let mut replayed = 0u64;
        for &seg in segments.iter().filter(|s| **s >= start.segment) {
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
            let end = wal::replay_segment(wal_dir, seg, from, REPLAY_ENTRY_BYTES_MAX, |e| {
                replayed += 1;
                self.replay_entry(e)
            })?;
            if let SegmentEnd::Torn { valid_bytes, fault } = end {
                tracing::warn!(
                    segment = seg,
                    valid_bytes,
                    ?fault,
                    "log tail was torn or corrupt; dropped it"
                );
                metrics::counter!("msgstore_wal_torn_tails_total").increment(1);
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
