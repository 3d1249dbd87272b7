//! [`LogStore`]: plans every change in memory (so it is readable at once)
//! and queues it for the writer thread; [`LogReader`]: reads entries from
//! the cache or, at the offsets the index keeps, from the segments.

use super::{
    frame::{encode_frame_into, encode_meta},
    read::read_entries,
    scan::open_dir,
    state::{Encoded, Shared},
    writer::{Append, Cmd, Done, Op, Writer},
    LogStoreConfig, LogStoreError,
};
use openraft::{LogId, LogState, RaftLogId, RaftTypeConfig, Vote};
use serde::{de::DeserializeOwned, Serialize};
use std::{
    io,
    ops::RangeBounds,
    path::Path,
    sync::{atomic::Ordering, Arc},
    thread::JoinHandle,
};
use tokio::sync::{oneshot, Semaphore};

/// Most commands queued for the writer; callers wait past it.
const QUEUE_COMMANDS_MAX: usize = 4096;

type NodeIdOf<C> = <C as RaftTypeConfig>::NodeId;

/// The Raft log of one replica (see the module documentation for the
/// files and their format).
pub struct LogStore<C: RaftTypeConfig> {
    shared: Arc<Shared<C>>,
    /// `None` once closed.
    tx: Option<flume::Sender<Cmd>>,
    permits: Arc<Semaphore>,
    writer: Option<JoinHandle<()>>,
    torn_tails: u64,
}

/// A cheap, clone-able reader of a [`LogStore`]'s entries.
pub struct LogReader<C: RaftTypeConfig> {
    shared: Arc<Shared<C>>,
}

impl<C: RaftTypeConfig> Clone for LogReader<C> {
    fn clone(&self) -> Self {
        Self {
            shared: Arc::clone(&self.shared),
        }
    }
}

impl<C> LogStore<C>
where
    C: RaftTypeConfig,
    C::Entry: Serialize + DeserializeOwned + Clone,
{
    /// Open (or create) the log in `dir`: check every segment, cut a torn
    /// tail, and start the writer thread. Blocking I/O: from async code,
    /// call it on a blocking thread.
    pub fn open(dir: &Path, config: LogStoreConfig) -> Result<Self, LogStoreError> {
        config.validate()?;
        let opened = open_dir::<C>(dir, &config)?;
        let shared = Arc::new(Shared::new(opened.state, config));
        let (tx, rx) = flume::unbounded();
        let writer = Writer::new(dir.to_path_buf(), Arc::clone(&shared), rx);
        let handle = std::thread::Builder::new()
            .name("raft-log-writer".into())
            .spawn(move || writer.run())
            .map_err(|e| LogStoreError::io("spawn writer for", dir, e))?;
        Ok(Self {
            shared,
            tx: Some(tx),
            permits: Arc::new(Semaphore::new(QUEUE_COMMANDS_MAX)),
            writer: Some(handle),
            torn_tails: opened.torn_tails,
        })
    }

    /// Append entries (each must follow the last; those at or below the
    /// last purged index are dropped): readable when this
    /// returns; `done` is called once they were written (and synced,
    /// under `FsyncPolicy::Always`), or with the error that poisoned
    /// the store.
    pub async fn append_with<I>(
        &mut self,
        entries: I,
        done: impl FnOnce(io::Result<()>) + Send + 'static,
    ) -> Result<(), LogStoreError>
    where
        I: IntoIterator<Item = C::Entry>,
    {
        let next = self.writable()?;
        let (buf, entries) = encode::<C, I>(entries, next, self.shared.config.entry_bytes_max)?;
        let permit = self.permit().await?;
        let (seq, chunks) = self.shared.lock().plan_append(entries);
        let done: Done = Box::new(done);
        let append = Append {
            seq,
            buf,
            chunks,
            done,
        };
        self.send(Op::Append(append), permit)
    }

    /// Remove the entries from `index` on (those still queued are written
    /// first, then cut); they are unreadable when this is called.
    pub async fn truncate_from(&mut self, index: u64) -> Result<(), LogStoreError> {
        self.writable()?;
        let permit = self.permit().await?;
        let Some(plan) = self.shared.lock().plan_truncate(index) else {
            return Ok(());
        };
        let (reply, rx) = oneshot::channel();
        self.send(Op::Truncate(plan, reply), permit)?;
        wait(rx).await
    }

    /// Purge the entries up to `id`: `purged` is written first, then the
    /// segments wholly at or below it are removed. Reads below it find
    /// nothing from the moment this is called.
    pub async fn purge_upto(&mut self, id: LogId<NodeIdOf<C>>) -> Result<(), LogStoreError> {
        self.writable()?;
        let bytes = encode_meta(&id).map_err(|source| LogStoreError::Encode {
            index: id.index,
            source,
        })?;
        let permit = self.permit().await?;
        let Some(remove) = self.shared.lock().plan_purge(id) else {
            return Ok(());
        };
        let (reply, rx) = oneshot::channel();
        self.send(Op::Purge(bytes, remove, reply), permit)?;
        wait(rx).await
    }

    /// Save the vote durably (after every write queued before it).
    pub async fn write_vote(&mut self, vote: &Vote<NodeIdOf<C>>) -> Result<(), LogStoreError> {
        self.save_meta("vote", vote).await?;
        self.shared.lock().vote = Some(vote.clone());
        Ok(())
    }

    /// Save the committed id as a hint: queued after every write queued
    /// before it, written unsynced, and not waited for. openraft awaits
    /// this inside its core loop on every commit; waiting here for the
    /// writer (busy with the next group's fsync) stalled the whole
    /// pipeline once per commit. A committed id lost or torn in a crash
    /// only means the leader commits those entries again; one above the
    /// log's end is lowered at open.
    pub async fn write_committed(
        &mut self,
        committed: Option<LogId<NodeIdOf<C>>>,
    ) -> Result<(), LogStoreError> {
        let _unawaited = self.queue_meta("committed", &committed).await?;
        self.shared.lock().committed = committed;
        Ok(())
    }

    /// Queue `value` to replace the file `name` and wait until it has.
    async fn save_meta<T: Serialize>(
        &mut self,
        name: &'static str,
        value: &T,
    ) -> Result<(), LogStoreError> {
        wait(self.queue_meta(name, value).await?).await
    }

    /// Queue `value` to replace the file `name`; the writer's answer.
    async fn queue_meta<T: Serialize>(
        &mut self,
        name: &'static str,
        value: &T,
    ) -> Result<oneshot::Receiver<io::Result<()>>, LogStoreError> {
        self.writable()?;
        let bytes =
            encode_meta(value).map_err(|source| LogStoreError::Encode { index: 0, source })?;
        let permit = self.permit().await?;
        let (reply, rx) = oneshot::channel();
        self.send(Op::SaveMeta(name, bytes, reply), permit)?;
        Ok(rx)
    }

    /// The saved vote.
    pub fn vote(&self) -> Option<Vote<NodeIdOf<C>>> {
        self.shared.lock().vote.clone()
    }

    /// The saved committed id.
    pub fn committed(&self) -> Option<LogId<NodeIdOf<C>>> {
        self.shared.lock().committed.clone()
    }

    /// The last purged id and the last id.
    pub fn log_state(&self) -> LogState<C> {
        self.shared.lock().log_state()
    }

    /// A reader sharing this store's state.
    pub fn reader(&self) -> LogReader<C> {
        LogReader {
            shared: Arc::clone(&self.shared),
        }
    }

    /// `fdatasync`s of segment files since this store was opened.
    pub fn syncs_total(&self) -> u64 {
        self.shared.syncs_total.load(Ordering::Relaxed)
    }

    /// Torn tails cut off when this store was opened (0 or 1).
    pub fn torn_tails_total(&self) -> u64 {
        self.torn_tails
    }

    /// Stop the writer once it has done everything queued, and wait for
    /// it (under `IntervalMs` it syncs before it stops).
    pub async fn close(mut self) {
        self.tx = None;
        let Some(handle) = self.writer.take() else {
            return;
        };
        let (tx, rx) = oneshot::channel();
        std::thread::spawn(move || {
            let _ = handle.join();
            let _ = tx.send(());
        });
        let _ = rx.await;
    }

    /// Where appends stand; Err if writes are refused.
    fn writable(&self) -> Result<Next, LogStoreError> {
        let state = self.shared.lock();
        match &state.poisoned {
            Some(why) => Err(LogStoreError::Poisoned(why.clone())),
            None => Ok(Next {
                expected: state.expected_index(),
                purged: state.purged.as_ref().map(|p| p.index),
            }),
        }
    }

    async fn permit(&self) -> Result<tokio::sync::OwnedSemaphorePermit, LogStoreError> {
        let permits = Arc::clone(&self.permits);
        permits
            .acquire_owned()
            .await
            .map_err(|_| LogStoreError::Closed)
    }

    fn send(&self, op: Op, permit: tokio::sync::OwnedSemaphorePermit) -> Result<(), LogStoreError> {
        let tx = self.tx.as_ref().ok_or(LogStoreError::Closed)?;
        let cmd = Cmd {
            op,
            _permit: permit,
        };
        tx.send(cmd).map_err(|_| LogStoreError::Closed)
    }

    /// Read entries of `range` (those that exist).
    pub fn read(&self, range: impl RangeBounds<u64>) -> Result<Vec<C::Entry>, LogStoreError> {
        read_entries(&self.shared, range)
    }

    /// The shared state (tests hold the writer's gate).
    #[cfg(test)]
    pub(super) fn shared(&self) -> Arc<Shared<C>> {
        Arc::clone(&self.shared)
    }
}

impl<C> LogReader<C>
where
    C: RaftTypeConfig,
    C::Entry: DeserializeOwned + Clone,
{
    /// Read entries of `range` (those that exist).
    pub fn read(&self, range: impl RangeBounds<u64>) -> Result<Vec<C::Entry>, LogStoreError> {
        read_entries(&self.shared, range)
    }
}

/// Wait for the writer's answer.
async fn wait(rx: oneshot::Receiver<io::Result<()>>) -> Result<(), LogStoreError> {
    match rx.await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(LogStoreError::Poisoned(e.to_string())),
        Err(_) => Err(LogStoreError::Closed),
    }
}

/// Where appends stand: the index the next entry must have (if any must),
/// the last purged index.
#[derive(Debug, Clone, Copy)]
struct Next {
    expected: Option<u64>,
    purged: Option<u64>,
}

/// Encode entries into one buffer of frames, checking each follows the
/// one before (the first: `next.expected`, if given) and fits. Entries at
/// or below the last purged index are dropped: they are purged already
/// (openraft's suite appends such entries after purging past them).
fn encode<C, I>(
    entries: I,
    next: Next,
    entry_bytes_max: u32,
) -> Result<(Vec<u8>, Vec<Encoded<C>>), LogStoreError>
where
    C: RaftTypeConfig,
    C::Entry: Serialize,
    I: IntoIterator<Item = C::Entry>,
{
    let mut buf = Vec::new();
    let mut out = Vec::new();
    let mut expected = next.expected;
    for entry in entries {
        let id = entry.get_log_id().clone();
        if next.purged.is_some_and(|p| id.index <= p) {
            continue;
        }
        if let Some(want) = expected.filter(|&w| w != id.index) {
            return Err(LogStoreError::NotConsecutive {
                expected: want,
                got: id.index,
            });
        }
        expected = Some(id.index.saturating_add(1));
        let start = buf.len();
        let (b, len) = encode_frame_into(&entry, buf).map_err(|source| LogStoreError::Encode {
            index: id.index,
            source,
        })?;
        buf = b;
        if len > entry_bytes_max as usize {
            return Err(LogStoreError::EntryTooLarge {
                index: id.index,
                len,
                max: entry_bytes_max,
            });
        }
        out.push((entry, id, start..buf.len()));
    }
    Ok((buf, out))
}
