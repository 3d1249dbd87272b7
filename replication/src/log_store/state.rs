//! The in-memory view of a log, shared by the store, its readers and the
//! writer thread: where each entry is (index -> segment, offset, length),
//! the segments as planned, the cache of recent entries, vote and
//! committed.
//!
//! The store plans every change here at once (so reads see it
//! immediately); the writer thread carries the plans out in order.

use super::LogStoreConfig;
use openraft::{CommittedLeaderId, LogId, LogState, RaftTypeConfig, Vote};
use std::{
    collections::{BTreeMap, HashMap, VecDeque},
    fs::File,
    ops::Range,
    sync::{atomic::AtomicU64, Arc, Mutex, MutexGuard, PoisonError},
};

/// Names a segment file for as long as it exists: a segment removed and
/// created again under the same name gets a new id.
pub(super) type SegId = u64;

type NodeIdOf<C> = <C as RaftTypeConfig>::NodeId;

/// An entry to append: the entry, its id, its frame's range in the
/// append's buffer.
pub(super) type Encoded<C> = (
    <C as RaftTypeConfig>::Entry,
    LogId<NodeIdOf<C>>,
    Range<usize>,
);

/// Where an entry's frame is.
#[derive(Debug, Clone, Copy)]
pub(super) struct Loc {
    pub seg: SegId,
    pub offset: u64,
    pub frame_bytes: u32,
}

/// A segment as planned: its id and its length once every queued write
/// is done.
#[derive(Debug)]
pub(super) struct SegPlan {
    pub id: SegId,
    pub bytes: u64,
}

/// A decoded entry kept in memory; `seq` is its append's sequence number
/// (it may be evicted once that append was written).
struct Cached<E> {
    entry: E,
    frame_bytes: u64,
    seq: u64,
}

/// The frames of one append that go to one segment: `range` of the
/// append's buffer, written at `offset`; `create`: the segment is new.
#[derive(Debug, Clone)]
pub(super) struct Chunk {
    pub seg: SegId,
    pub first: u64,
    pub create: bool,
    pub offset: u64,
    pub range: Range<usize>,
}

/// A truncation: segments to remove (id, first index; last first), then
/// the segment to cut and where.
#[derive(Debug, Default)]
pub(super) struct TruncatePlan {
    pub remove: Vec<(SegId, u64)>,
    pub cut: Option<(SegId, u64)>,
}

/// An entry to be read: decoded already, or a frame on disk.
pub(super) enum Slot<E> {
    Ready(E),
    Disk {
        index: u64,
        file: Arc<File>,
        offset: u64,
        frame_bytes: u32,
    },
}

/// What `LogStore`, its readers and its writer share.
pub(super) struct Shared<C: RaftTypeConfig> {
    state: Mutex<State<C>>,
    /// `fdatasync`s of segment files since the store was opened.
    pub syncs_total: AtomicU64,
    pub config: LogStoreConfig,
    /// Held by a test to stop the writer before it drains its queue.
    #[cfg(test)]
    pub gate: Mutex<()>,
    /// Set by a test to make every segment sync fail.
    #[cfg(test)]
    pub fail_syncs: std::sync::atomic::AtomicBool,
}

impl<C: RaftTypeConfig> Shared<C> {
    pub fn new(state: State<C>, config: LogStoreConfig) -> Self {
        Self {
            state: Mutex::new(state),
            syncs_total: AtomicU64::new(0),
            config,
            #[cfg(test)]
            gate: Mutex::new(()),
            #[cfg(test)]
            fail_syncs: std::sync::atomic::AtomicBool::new(false),
        }
    }

    /// The state; a panic elsewhere while holding it does not make it
    /// unusable (every change is planned before it is made).
    pub fn lock(&self) -> MutexGuard<'_, State<C>> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// The in-memory view of the log.
pub(super) struct State<C: RaftTypeConfig> {
    pub purged: Option<LogId<NodeIdOf<C>>>,
    pub vote: Option<Vote<NodeIdOf<C>>>,
    pub committed: Option<LogId<NodeIdOf<C>>>,
    /// Index of `locs[0]`.
    first_index: u64,
    locs: VecDeque<Loc>,
    /// The leader of every run of entries, by the run's first index.
    leaders: BTreeMap<u64, CommittedLeaderId<NodeIdOf<C>>>,
    /// Segments by first index.
    segments: BTreeMap<u64, SegPlan>,
    next_seg_id: SegId,
    /// Open segment files, published by the writer once created.
    pub files: HashMap<SegId, Arc<File>>,
    cache: BTreeMap<u64, Cached<C::Entry>>,
    cache_bytes: u64,
    next_seq: u64,
    written_seq: u64,
    /// Bumped by every truncation and purge (a reader that read from disk
    /// meanwhile reads again).
    pub generation: u64,
    /// Why writes are refused, after a failed write or sync.
    pub poisoned: Option<String>,
    segment_bytes_max: u64,
    cache_bytes_max: u64,
}

impl<C: RaftTypeConfig> State<C> {
    /// An empty log with these saved values.
    pub fn new(
        purged: Option<LogId<NodeIdOf<C>>>,
        vote: Option<Vote<NodeIdOf<C>>>,
        committed: Option<LogId<NodeIdOf<C>>>,
        config: &LogStoreConfig,
    ) -> Self {
        Self {
            purged: purged.clone(),
            vote,
            committed,
            first_index: purged.as_ref().map_or(0, |p| p.index.saturating_add(1)),
            locs: VecDeque::new(),
            leaders: BTreeMap::new(),
            segments: BTreeMap::new(),
            next_seg_id: 0,
            files: HashMap::new(),
            cache: BTreeMap::new(),
            cache_bytes: 0,
            next_seq: 1,
            written_seq: 0,
            generation: 0,
            poisoned: None,
            segment_bytes_max: config.segment_bytes_max,
            cache_bytes_max: config.cache_bytes_max,
        }
    }

    /// Add an existing segment (when opening), with its open file.
    pub fn add_segment(&mut self, first: u64, bytes: u64, file: Arc<File>) -> SegId {
        let id = self.next_seg_id;
        self.next_seg_id += 1;
        self.segments.insert(first, SegPlan { id, bytes });
        self.files.insert(id, file);
        id
    }

    /// Add an entry at `loc` that follows the last.
    pub fn push_loc(&mut self, id: LogId<NodeIdOf<C>>, loc: Loc) {
        if self.locs.is_empty() {
            self.first_index = id.index;
        }
        self.locs.push_back(loc);
        if self.leader_at(id.index) != Some(&id.leader_id) {
            self.leaders.insert(id.index, id.leader_id);
        }
    }

    fn leader_at(&self, index: u64) -> Option<&CommittedLeaderId<NodeIdOf<C>>> {
        self.leaders.range(..=index).next_back().map(|(_, l)| l)
    }

    /// Index of the last entry present.
    fn last_index(&self) -> Option<u64> {
        let len = self.locs.len() as u64;
        (len > 0).then(|| self.first_index + len - 1)
    }

    /// Id of the last entry present, or else the last purged id.
    pub fn last_log_id(&self) -> Option<LogId<NodeIdOf<C>>> {
        let Some(index) = self.last_index() else {
            return self.purged.clone();
        };
        self.leader_at(index)
            .map(|leader| LogId::new(leader.clone(), index))
    }

    pub fn log_state(&self) -> LogState<C> {
        LogState {
            last_purged_log_id: self.purged.clone(),
            last_log_id: self.last_log_id(),
        }
    }

    /// The index the next appended entry must have, if any is required.
    pub fn expected_index(&self) -> Option<u64> {
        self.last_log_id().map(|id| id.index.saturating_add(1))
    }

    /// Plan an append of entries encoded in one buffer (`log id`, range
    /// of their frame); they are readable from now on (cached until
    /// written). Returns the append's sequence number and its chunks.
    pub fn plan_append(&mut self, entries: Vec<Encoded<C>>) -> (u64, Vec<Chunk>) {
        let seq = self.next_seq;
        self.next_seq += 1;
        let mut chunks: Vec<Chunk> = Vec::new();
        for (entry, id, range) in entries {
            let frame_bytes = range.len() as u64;
            let (first, create) = self.segment_for(id.index);
            let Some(seg) = self.segments.get_mut(&first) else {
                continue; // segment_for just found or made it
            };
            let loc = Loc {
                seg: seg.id,
                offset: seg.bytes,
                frame_bytes: range.len() as u32,
            };
            seg.bytes += frame_bytes;
            match chunks.last_mut() {
                Some(chunk) if chunk.seg == loc.seg && !create => chunk.range.end = range.end,
                _ => chunks.push(Chunk {
                    seg: loc.seg,
                    first,
                    create,
                    offset: loc.offset,
                    range,
                }),
            }
            let index = id.index;
            self.push_loc(id, loc);
            self.cache.insert(
                index,
                Cached {
                    entry,
                    frame_bytes,
                    seq,
                },
            );
            self.cache_bytes += frame_bytes;
        }
        self.evict();
        (seq, chunks)
    }

    /// The segment (first index) an entry of `index` goes to, and whether
    /// it is new: the last one, unless there is none or it is full.
    fn segment_for(&mut self, index: u64) -> (u64, bool) {
        let max = self.segment_bytes_max;
        match self.segments.last_key_value() {
            Some((&first, seg)) if seg.bytes < max => (first, false),
            _ => {
                let id = self.next_seg_id;
                self.next_seg_id += 1;
                self.segments.insert(index, SegPlan { id, bytes: 0 });
                (index, true)
            }
        }
    }

    /// Plan removing the entries from `index` on; `None` if there are none.
    pub fn plan_truncate(&mut self, index: u64) -> Option<TruncatePlan> {
        let last = self.last_index()?;
        let from = index.max(self.first_index);
        if from > last {
            return None;
        }
        let keep = (from - self.first_index) as usize;
        let loc = self.locs[keep];
        let removed = self.segments.split_off(&from);
        let mut plan = TruncatePlan {
            remove: removed.iter().rev().map(|(&f, s)| (s.id, f)).collect(),
            cut: None,
        };
        if let Some(seg) = self.segments.values_mut().find(|s| s.id == loc.seg) {
            seg.bytes = loc.offset;
            plan.cut = Some((loc.seg, loc.offset));
        }
        self.locs.truncate(keep);
        self.leaders.split_off(&from);
        for (_, c) in self.cache.split_off(&from) {
            self.cache_bytes -= c.frame_bytes;
        }
        self.generation += 1;
        Some(plan)
    }

    /// Plan purging the entries up to `id` (and recording it); returns
    /// the segments wholly at or below it (id, first index; first
    /// first), or `None` if `id` is not past the last purged id.
    pub fn plan_purge(&mut self, id: LogId<NodeIdOf<C>>) -> Option<Vec<(SegId, u64)>> {
        if self.purged.as_ref().is_some_and(|p| p.index >= id.index) {
            return None;
        }
        let upto = id.index;
        self.purged = Some(id);
        let next = upto.saturating_add(1);
        if next > self.first_index {
            let drop = ((next - self.first_index) as usize).min(self.locs.len());
            self.locs.drain(..drop);
            let carried = self.leader_at(upto).cloned();
            self.leaders = self.leaders.split_off(&next);
            if let (Some(leader), false) = (carried, self.locs.is_empty()) {
                self.leaders.entry(next).or_insert(leader);
            }
            self.first_index = next;
        }
        if self.locs.is_empty() {
            self.leaders.clear();
        }
        let kept = self.cache.split_off(&next);
        for (_, c) in std::mem::replace(&mut self.cache, kept) {
            self.cache_bytes -= c.frame_bytes;
        }
        self.generation += 1;
        Some(self.take_purged_segments(upto))
    }

    /// Remove (from the plan) the segments wholly at or below `upto`.
    fn take_purged_segments(&mut self, upto: u64) -> Vec<(SegId, u64)> {
        let mut removed = Vec::new();
        while let Some((&first, seg)) = self.segments.first_key_value() {
            let next_first = self.segments.range(first + 1..).next().map(|(&f, _)| f);
            let wholly = match next_first {
                Some(next) => next <= upto.saturating_add(1),
                None => self.locs.is_empty(),
            };
            if !wholly {
                break;
            }
            removed.push((seg.id, first));
            self.segments.remove(&first);
        }
        removed
    }

    /// An append up to `seq` was written: its entries may leave the cache.
    pub fn mark_written(&mut self, seq: u64) {
        self.written_seq = self.written_seq.max(seq);
        self.evict();
    }

    /// Drop the oldest written entries while the cache is over its budget.
    pub fn evict(&mut self) {
        while self.cache_bytes > self.cache_bytes_max {
            let Some(oldest) = self.cache.first_entry() else {
                break;
            };
            if oldest.get().seq > self.written_seq {
                break; // not written yet: must stay readable
            }
            self.cache_bytes -= oldest.remove().frame_bytes;
        }
    }

    /// The entries of `start..end` that exist: decoded, or where on disk.
    /// Err(index): an entry's segment file is not open (a bug).
    pub fn collect(&self, start: u64, end: u64) -> Result<Vec<Slot<C::Entry>>, u64>
    where
        C::Entry: Clone,
    {
        let Some(last) = self.last_index() else {
            return Ok(Vec::new());
        };
        let lo = start.max(self.first_index);
        let hi = end.min(last.saturating_add(1));
        let mut slots = Vec::with_capacity(hi.saturating_sub(lo) as usize);
        for index in lo..hi {
            if let Some(c) = self.cache.get(&index) {
                slots.push(Slot::Ready(c.entry.clone()));
                continue;
            }
            let loc = self.locs[(index - self.first_index) as usize];
            let file = self.files.get(&loc.seg).ok_or(index)?;
            slots.push(Slot::Disk {
                index,
                file: Arc::clone(file),
                offset: loc.offset,
                frame_bytes: loc.frame_bytes,
            });
        }
        Ok(slots)
    }
}
