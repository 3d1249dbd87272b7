//! Checkpoints: move logged records into their bucket files, compact buckets
//! whose dead share is over the threshold, record everything in the index
//! in one transaction, then trim the log.
//!
//! Order (docs/STORAGE.md explains why each crash point is safe):
//! 1. note the log position P; everything logged before it is to move;
//! 2. write memtable records into bucket maps past each bucket's `len`;
//! 3. write compacted copies of candidate buckets to `compact/`, synced;
//! 4. `syncfs`: every bucket byte written so far is durable;
//! 5. one LMDB transaction: user states, bucket states, `wal_start = P`,
//!    the compacted files to swap in; commit (durable);
//! 6. rename compacted files over their buckets, sync;
//! 7. delete log segments wholly before P.

use super::{
    buckets::{compacted_path, header_gen},
    codec::{encode_record, read_record, MessageHeader, NO_PREV},
    index::CheckpointMeta,
    state::{BucketMeta, UserState, BUCKET_HEADER_BYTES},
    wal::Position,
    Engine,
};
use crate::Result;
use std::{collections::HashMap, os::fd::AsRawFd, path::Path, time::Instant};

/// A compacted copy of one bucket, waiting for the index commit.
struct Compaction {
    bucket: u32,
    meta: BucketMeta,
    states: Vec<(u64, UserState)>,
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
    pub(super) fn checkpoint_now(&mut self) -> Result<()> {
        self.check_usable()?;
        let started = Instant::now();
        self.last_checkpoint = started;
        if self.dirty.is_empty() && self.memtable.is_empty() && self.compact_candidates.is_empty() {
            return Ok(());
        }
        let wal_start = self.wal.position();
        let mut touched = self.flush_memtable()?;
        let compactions = self.prepare_compactions()?;
        let compact_dir = self.dir.join("compact");
        let commit = syncfs(&self.dir)
            .and_then(|()| self.commit_index(wal_start, &mut touched, &compactions));
        if let Err(e) = commit {
            for c in &compactions {
                let _ = std::fs::remove_file(compacted_path(&compact_dir, c.bucket, c.meta.gen));
            }
            return Err(e);
        }
        for c in &compactions {
            self.buckets
                .install_compacted(&compact_dir, c.bucket, c.meta.gen)?;
            self.bucket_meta.insert(c.bucket, c.meta);
            self.compact_candidates.remove(&c.bucket);
        }
        if !compactions.is_empty() {
            syncfs(&self.dir)?;
        }
        self.counters.compactions_total += compactions.len() as u64;
        metrics::counter!("msgstore_compactions_total").increment(compactions.len() as u64);
        self.dirty.clear();
        self.wal.remove_before(wal_start)?;
        self.wal.bytes_since_checkpoint = 0;
        self.counters.checkpoints_total += 1;
        metrics::counter!("msgstore_checkpoints_total").increment(1);
        tracing::debug!(
            elapsed_ms = started.elapsed().as_millis() as u64,
            "checkpoint done"
        );
        Ok(())
    }

    /// Append every live memtable record to its bucket; returns the buckets
    /// written. Records acknowledged before they were checkpointed are never
    /// written at all.
    fn flush_memtable(&mut self) -> Result<Vec<u32>> {
        let mut by_bucket: Vec<(u32, u64)> = self
            .memtable
            .keys()
            .map(|u| (self.dirty[u].bucket, *u))
            .collect();
        by_bucket.sort_unstable();
        let mut touched = Vec::new();
        let mut buf = Vec::new();
        for (bucket, user) in by_bucket {
            let queue = self.memtable.remove(&user).unwrap_or_default();
            let mut state = self.dirty[&user];
            let mut meta = self.bucket(bucket);
            buf.clear();
            for p in queue {
                state.tail_seq = state.tail_seq.max(p.seq);
                if p.seq <= state.acked_seq {
                    continue;
                }
                let offset = meta.len + buf.len() as u64;
                let header = MessageHeader {
                    user,
                    seq: p.seq,
                    timestamp_ms: p.timestamp_ms,
                    msg_id: p.msg_id,
                };
                encode_record(&header, state.tail_offset, &p.payload, &mut buf);
                state.tail_offset = offset;
            }
            if !buf.is_empty() {
                self.buckets.write(bucket, meta.gen, meta.len, &buf)?;
                meta.len += buf.len() as u64;
                self.bucket_meta.insert(bucket, meta);
                if touched.last() != Some(&bucket) {
                    touched.push(bucket);
                }
            }
            self.dirty.insert(user, state);
        }
        Ok(touched)
    }

    /// Write compacted copies of the buckets over the dead-share threshold.
    fn prepare_compactions(&mut self) -> Result<Vec<Compaction>> {
        let mut out = Vec::new();
        let candidates: Vec<u32> = self.compact_candidates.iter().copied().collect();
        for bucket in candidates {
            match self.compact_bucket(bucket)? {
                Some(c) => out.push(c),
                None => {
                    self.compact_candidates.remove(&bucket);
                }
            }
        }
        Ok(out)
    }

    /// Copy the live records of `bucket` into a new file, rebuilding each
    /// user's chain. `None` if the bucket cannot be read cleanly (it is then
    /// left as it is).
    fn compact_bucket(&mut self, bucket: u32) -> Result<Option<Compaction>> {
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
                let Some(mut s) = self.load_user(user)? else {
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

    fn commit_index(
        &mut self,
        wal_start: Position,
        touched: &mut Vec<u32>,
        compactions: &[Compaction],
    ) -> Result<()> {
        let totals = self.totals_snapshot();
        let meta = CheckpointMeta {
            wal_start,
            pending_swaps: compactions.iter().map(|c| (c.bucket, c.meta.gen)).collect(),
            users_total: totals.users,
            live_messages: totals.live_messages,
            live_bytes: totals.live_bytes,
        };
        let mut users: HashMap<u64, &UserState> = self.dirty.iter().map(|(u, s)| (*u, s)).collect();
        for c in compactions {
            users.extend(c.states.iter().map(|(u, s)| (*u, s)));
        }
        touched.extend(self.dirty_bucket_metas());
        touched.sort_unstable();
        touched.dedup();
        let compacted: HashMap<u32, BucketMeta> =
            compactions.iter().map(|c| (c.bucket, c.meta)).collect();
        let buckets = touched
            .iter()
            .map(|b| {
                (
                    *b,
                    compacted.get(b).copied().unwrap_or_else(|| self.bucket(*b)),
                )
            })
            .chain(compacted.iter().map(|(b, m)| (*b, *m)));
        self.index
            .commit_checkpoint(users.into_iter(), buckets, &meta)
    }

    /// Buckets whose dead-byte count changed since the last checkpoint.
    fn dirty_bucket_metas(&self) -> Vec<u32> {
        let mut out: Vec<u32> = self.dirty.values().map(|s| s.bucket).collect();
        out.sort_unstable();
        out.dedup();
        out.retain(|b| self.bucket_meta.contains_key(b));
        out
    }
}
