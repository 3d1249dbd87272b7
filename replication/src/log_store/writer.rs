//! The writer thread: carries out the store's plans in order. Every append
//! pending when it wakes is written with one write per segment and synced
//! with one `fdatasync` per segment (group commit), then their callbacks
//! are called in order. A failed write or sync poisons the store.

use super::{
    frame::{sync_dir, write_atomic},
    metric,
    scan::segment_name,
    state::{Chunk, SegId, Shared, TruncatePlan},
    METRIC_APPENDS, METRIC_BYTES, METRIC_SYNCS,
};
use crate::FsyncPolicy;
use openraft::RaftTypeConfig;
use std::{
    collections::{BTreeSet, HashMap},
    fs::{self, File},
    io,
    os::unix::fs::FileExt,
    path::PathBuf,
    sync::{atomic::Ordering, Arc},
    time::{Duration, Instant},
};
use tokio::sync::{oneshot, OwnedSemaphorePermit};

/// Most commands the writer takes from its queue at once.
const DRAIN_COMMANDS_MAX: usize = 1024;

/// Called once an append was written (and synced, under `Always`).
pub(super) type Done = Box<dyn FnOnce(io::Result<()>) + Send>;

/// An append as planned: its frames, the chunks they go to, its callback.
pub(super) struct Append {
    pub seq: u64,
    pub buf: Vec<u8>,
    pub chunks: Vec<Chunk>,
    pub done: Done,
}

/// What the writer is asked to do; each holds a queue permit.
pub(super) struct Cmd {
    pub op: Op,
    pub _permit: OwnedSemaphorePermit,
}

/// The operations, in the order the store planned them.
pub(super) enum Op {
    Append(Append),
    Truncate(TruncatePlan, oneshot::Sender<io::Result<()>>),
    /// The `purged` file's new content, the segments to remove.
    Purge(Vec<u8>, Vec<(SegId, u64)>, oneshot::Sender<io::Result<()>>),
    /// Replace a small file (`vote`, `committed`).
    SaveMeta(&'static str, Vec<u8>, oneshot::Sender<io::Result<()>>),
}

/// The writer thread's state.
pub(super) struct Writer<C: RaftTypeConfig> {
    dir: PathBuf,
    shared: Arc<Shared<C>>,
    rx: flume::Receiver<Cmd>,
    /// Bytes on disk of every segment file.
    sizes: HashMap<SegId, u64>,
    /// Segments written and not synced (`IntervalMs`).
    dirty: BTreeSet<SegId>,
    dir_dirty: bool,
    last_sync: Instant,
}

/// Bytes of segment data written to one segment in one group.
struct Run {
    seg: SegId,
    first: u64,
    create: bool,
    offset: u64,
    bytes: Vec<u8>,
}

impl<C: RaftTypeConfig> Writer<C> {
    pub fn new(dir: PathBuf, shared: Arc<Shared<C>>, rx: flume::Receiver<Cmd>) -> Self {
        let sizes = {
            let state = shared.lock();
            let files = state.files.iter();
            files
                .map(|(&id, f)| (id, f.metadata().map_or(0, |m| m.len())))
                .collect()
        };
        let writer = Self {
            dir,
            shared,
            rx,
            sizes,
            dirty: BTreeSet::new(),
            dir_dirty: false,
            last_sync: Instant::now(),
        };
        writer.publish_bytes();
        writer
    }

    fn policy(&self) -> FsyncPolicy {
        self.shared.config.fsync
    }

    /// Serve the queue until the store is dropped.
    pub fn run(mut self) {
        while let Some(first) = self.next_command() {
            #[cfg(test)]
            let gate = self.shared.gate.lock();
            let mut cmds = vec![first];
            cmds.extend(self.rx.try_iter().take(DRAIN_COMMANDS_MAX));
            #[cfg(test)]
            drop(gate);
            self.process(cmds);
            self.sync_if_due();
        }
        if let FsyncPolicy::IntervalMs(_) = self.policy() {
            self.sync_dirty();
        }
    }

    /// Wait for a command (or the next interval sync); `None` once the
    /// store is gone.
    fn next_command(&mut self) -> Option<Cmd> {
        loop {
            let FsyncPolicy::IntervalMs(ms) = self.policy() else {
                return self.rx.recv().ok();
            };
            if self.dirty.is_empty() && !self.dir_dirty {
                return self.rx.recv().ok();
            }
            let due = self.last_sync + Duration::from_millis(ms);
            match self.rx.recv_deadline(due) {
                Ok(cmd) => return Some(cmd),
                Err(flume::RecvTimeoutError::Timeout) => self.sync_dirty(),
                Err(flume::RecvTimeoutError::Disconnected) => return None,
            }
        }
    }

    /// Carry out commands in order, appends in groups.
    fn process(&mut self, cmds: Vec<Cmd>) {
        let mut group = Vec::new();
        for cmd in cmds {
            let op = match cmd.op {
                Op::Append(append) => {
                    group.push(append);
                    continue;
                }
                op => op,
            };
            self.write_group(std::mem::take(&mut group));
            match op {
                Op::Append(_) => {}
                Op::Truncate(plan, reply) => self.reply(reply, |w| w.truncate(plan)),
                Op::Purge(bytes, remove, reply) => self.reply(reply, |w| w.purge(&bytes, remove)),
                // The committed id is a hint (openraft re-applies up to it
                // at start; a lower one only means the leader commits the
                // rest again): written, not synced, so a commit costs no
                // fsync. Anything else is replaced durably.
                Op::SaveMeta(name @ "committed", bytes, reply) => {
                    self.reply(reply, |w| std::fs::write(w.dir.join(name), &bytes))
                }
                Op::SaveMeta(name, bytes, reply) => {
                    self.reply(reply, |w| write_atomic(&w.dir, name, &bytes))
                }
            }
        }
        self.write_group(group);
    }

    /// Run `f` unless poisoned; a failure poisons; answer `reply`.
    fn reply(
        &mut self,
        reply: oneshot::Sender<io::Result<()>>,
        f: impl FnOnce(&mut Self) -> io::Result<()>,
    ) {
        let result = self.unless_poisoned(f);
        let _ = reply.send(result);
    }

    fn unless_poisoned(&mut self, f: impl FnOnce(&mut Self) -> io::Result<()>) -> io::Result<()> {
        if let Some(why) = self.shared.lock().poisoned.clone() {
            return Err(io::Error::other(format!("Raft log poisoned: {why}")));
        }
        let result = f(self);
        if let Err(e) = &result {
            self.poison(e);
        }
        self.publish_bytes();
        result
    }

    fn poison(&self, e: &io::Error) {
        tracing::error!(error = %e, "Raft log: a write or sync failed; refusing every later write");
        let mut state = self.shared.lock();
        state.poisoned.get_or_insert_with(|| e.to_string());
    }

    /// Write a group of appends (one write and one sync per segment), then
    /// call their callbacks in order.
    fn write_group(&mut self, group: Vec<Append>) {
        let Some(seq) = group.iter().map(|a| a.seq).max() else {
            return;
        };
        let result = self.unless_poisoned(|w| w.write_runs(runs(&group)));
        if result.is_ok() {
            self.shared.lock().mark_written(seq);
            metrics::counter!(metric(&self.shared.config, METRIC_APPENDS))
                .increment(group.len() as u64);
        }
        for append in group {
            let copy = match &result {
                Ok(()) => Ok(()),
                Err(e) => Err(io::Error::new(e.kind(), e.to_string())),
            };
            (append.done)(copy);
        }
    }

    /// Write the runs; under `Always` sync each segment written (a segment
    /// before the next one is created, so a crash tears only the last).
    fn write_runs(&mut self, runs: Vec<Run>) -> io::Result<()> {
        let always = self.policy() == FsyncPolicy::Always;
        let mut unsynced = BTreeSet::new();
        let mut created = false;
        for run in runs {
            if run.create {
                if always {
                    self.sync_segments(&std::mem::take(&mut unsynced))?;
                }
                self.create(run.seg, run.first)?;
                created = true;
            }
            let file = self.file(run.seg)?;
            file.write_all_at(&run.bytes, run.offset)?;
            let size = self.sizes.entry(run.seg).or_default();
            *size = (*size).max(run.offset + run.bytes.len() as u64);
            unsynced.insert(run.seg);
        }
        if always {
            self.sync_segments(&unsynced)?;
            if created {
                sync_dir(&self.dir)?;
            }
        } else {
            self.dirty.extend(unsynced);
            self.dir_dirty |= created;
        }
        Ok(())
    }

    /// Create a segment file and publish it to readers.
    fn create(&mut self, seg: SegId, first: u64) -> io::Result<()> {
        let path = self.dir.join(segment_name(first));
        let file = File::options()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&path)
            .map_err(|e| io::Error::new(e.kind(), format!("create {}: {e}", path.display())))?;
        self.shared.lock().files.insert(seg, Arc::new(file));
        self.sizes.insert(seg, 0);
        Ok(())
    }

    fn file(&self, seg: SegId) -> io::Result<Arc<File>> {
        let state = self.shared.lock();
        let file = state.files.get(&seg).cloned();
        file.ok_or_else(|| io::Error::other(format!("segment {seg} is not open")))
    }

    /// `fdatasync` these segments.
    fn sync_segments(&self, segs: &BTreeSet<SegId>) -> io::Result<()> {
        for &seg in segs {
            #[cfg(test)]
            if self.shared.fail_syncs.load(Ordering::Relaxed) {
                return Err(io::Error::other("injected sync failure"));
            }
            self.file(seg)?.sync_data()?;
            self.shared.syncs_total.fetch_add(1, Ordering::Relaxed);
            metrics::counter!(metric(&self.shared.config, METRIC_SYNCS)).increment(1);
        }
        Ok(())
    }

    /// Remove segments (last first), then cut one. Under `Always` the
    /// removals are made durable before the cut, so a crash never leaves
    /// a cut segment followed by one that should be gone (a gap).
    fn truncate(&mut self, plan: TruncatePlan) -> io::Result<()> {
        let always = self.policy() == FsyncPolicy::Always;
        let removed = !plan.remove.is_empty();
        for (seg, first) in plan.remove {
            self.remove(seg, first)?;
        }
        if removed && always {
            sync_dir(&self.dir)?;
        }
        self.dir_dirty |= removed && !always;
        let Some((seg, offset)) = plan.cut else {
            return Ok(());
        };
        self.file(seg)?.set_len(offset)?;
        self.sizes.insert(seg, offset);
        if always {
            self.sync_segments(&BTreeSet::from([seg]))?;
        } else {
            self.dirty.insert(seg);
        }
        Ok(())
    }

    /// Record the last purged id, then remove the segments below it (a
    /// crash before they are gone leaves them to the next open).
    fn purge(&mut self, purged: &[u8], remove: Vec<(SegId, u64)>) -> io::Result<()> {
        write_atomic(&self.dir, "purged", purged)?;
        for (seg, first) in remove {
            self.remove(seg, first)?;
        }
        Ok(())
    }

    fn remove(&mut self, seg: SegId, first: u64) -> io::Result<()> {
        let path = self.dir.join(segment_name(first));
        fs::remove_file(&path)
            .map_err(|e| io::Error::new(e.kind(), format!("remove {}: {e}", path.display())))?;
        self.shared.lock().files.remove(&seg);
        self.sizes.remove(&seg);
        self.dirty.remove(&seg);
        Ok(())
    }

    /// Under `IntervalMs`, sync what was written once the interval passed.
    fn sync_if_due(&mut self) {
        if let FsyncPolicy::IntervalMs(ms) = self.policy() {
            if self.last_sync.elapsed() >= Duration::from_millis(ms) {
                self.sync_dirty();
            }
        }
    }

    /// Sync every segment written since the last sync, and the directory.
    fn sync_dirty(&mut self) {
        let dirty = std::mem::take(&mut self.dirty);
        let dir_dirty = std::mem::take(&mut self.dir_dirty);
        self.last_sync = Instant::now();
        let result = self.unless_poisoned(|w| {
            w.sync_segments(&dirty)?;
            if dir_dirty {
                sync_dir(&w.dir)?;
            }
            Ok(())
        });
        if let Err(e) = result {
            tracing::error!(error = %e, "Raft log: interval sync failed");
        }
    }

    fn publish_bytes(&self) {
        let bytes: u64 = self.sizes.values().sum();
        metrics::gauge!(metric(&self.shared.config, METRIC_BYTES)).set(bytes as f64);
    }
}

/// The group's chunks as runs: chunks of one segment that follow each
/// other are joined, so each segment gets one write.
fn runs(group: &[Append]) -> Vec<Run> {
    let mut runs: Vec<Run> = Vec::new();
    for append in group {
        for chunk in &append.chunks {
            let bytes = &append.buf[chunk.range.clone()];
            match runs.last_mut() {
                Some(run)
                    if run.seg == chunk.seg
                        && !chunk.create
                        && run.offset + run.bytes.len() as u64 == chunk.offset =>
                {
                    run.bytes.extend_from_slice(bytes)
                }
                _ => runs.push(Run {
                    seg: chunk.seg,
                    first: chunk.first,
                    create: chunk.create,
                    offset: chunk.offset,
                    bytes: bytes.to_vec(),
                }),
            }
        }
    }
    runs
}
