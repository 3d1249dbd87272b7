//! The engine as the Raft state machine of a shard group.
//!
//! Every committed entry is applied to the engine in log order on every
//! replica: a [`Batch`]'s requests through `Engine::respond`, with the
//! leader's clock, in one engine batch. The engine writes no log of its own
//! in this use (the Raft log is the durability point); its checkpoints
//! record the last applied entry and membership (the *marker*), so after a
//! restart openraft re-applies the committed entries after the last
//! checkpoint. A snapshot is a checkpoint exported as one archive file
//! (`docs/STORAGE.md`, "Replicated shards").
//!
//! An answer that depends on this replica's own condition (an I/O error, a
//! full disk) cannot be an outcome every replica agrees on: it stops the
//! replica (openraft treats a state-machine error as fatal), which restarts
//! from its checkpoint and log or rebuilds from a peer's snapshot.

// openraft's traits fix the error type (`StorageError`, 224 bytes).
#![allow(clippy::result_large_err)]

use super::{Batch, Outcomes, Replica, ReplicaId, TypeConfig};
use crate::{engine::Engine, EngineConfig};
use openraft::{
    storage::{RaftStateMachine, Snapshot},
    Entry, EntryPayload, LogId, OptionalSend, RaftSnapshotBuilder, SnapshotMeta, StorageIOError,
    StoredMembership,
};
use proto::shard::{ResponseBody, ShardErrorCode};
use serde::{Deserialize, Serialize};
use std::{
    path::{Path, PathBuf},
    sync::{Arc, Mutex, MutexGuard},
};

use replication::sm::{blocking, in_place, sm_error, snap_error, SmError};

/// What the engine's checkpoints record: the last applied entry and the
/// membership as of it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Applied {
    pub log_id: Option<LogId<ReplicaId>>,
    pub membership: StoredMembership<ReplicaId, Replica>,
}

/// The engine and what the state machine, the snapshot builder and the
/// request server share.
pub struct Shared {
    /// `None` only while a snapshot is being installed.
    engine: Mutex<Option<Engine>>,
    /// The engine held more than `wal_bytes_max` not yet checkpointed when
    /// last looked at (after applying, after each tick): read by every
    /// connection's reader without taking the engine's lock.
    overloaded: std::sync::atomic::AtomicBool,
    applied: Mutex<Applied>,
    engine_dir: PathBuf,
    snapshot_dir: PathBuf,
    config: EngineConfig,
}

impl Shared {
    /// Open the engine in `data/engine` (replicated mode); snapshots live
    /// in `data/snapshots`.
    pub fn open(data: &Path, config: EngineConfig) -> crate::Result<Arc<Shared>> {
        let engine_dir = data.join("engine");
        let snapshot_dir = data.join("snapshots");
        std::fs::create_dir_all(&snapshot_dir)?;
        let engine = Engine::open_replicated(&engine_dir, config.clone())?;
        let applied = decode_marker(engine.applied())?;
        Ok(Arc::new(Shared {
            engine: Mutex::new(Some(engine)),
            overloaded: std::sync::atomic::AtomicBool::new(false),
            applied: Mutex::new(applied),
            engine_dir,
            snapshot_dir,
            config,
        }))
    }

    /// The engine, locked; `None` while a snapshot is being installed.
    pub(crate) fn engine(&self) -> MutexGuard<'_, Option<Engine>> {
        self.engine.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether the engine holds more than `wal_bytes_max` not yet
    /// checkpointed (as of the last apply or tick).
    pub(crate) fn overloaded(&self) -> bool {
        self.overloaded.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Note the engine's load; call with the engine in hand.
    pub(crate) fn note_load(&self, engine: &Engine) {
        self.overloaded.store(
            engine.over_wal_bytes_max(),
            std::sync::atomic::Ordering::Relaxed,
        );
    }

    pub fn applied(&self) -> Applied {
        self.applied
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    fn set_applied(&self, applied: Applied) {
        *self.applied.lock().unwrap_or_else(|p| p.into_inner()) = applied;
    }

    /// Checkpoint and close the engine (shutdown).
    pub fn close(&self) -> crate::Result<()> {
        match self.engine().as_mut() {
            Some(engine) => engine.shutdown(),
            None => Ok(()),
        }
    }

    fn current_paths(&self) -> (PathBuf, PathBuf) {
        (
            self.snapshot_dir.join("current.snap"),
            self.snapshot_dir.join("current.meta"),
        )
    }

    /// Export the engine's state as of the last applied entry.
    fn build(&self) -> Result<SnapshotMeta<ReplicaId, Replica>, SmError> {
        let mut guard = self.engine();
        let engine = guard
            .as_mut()
            .ok_or_else(|| sm_error("no engine to snapshot"))?;
        let applied = self.applied();
        let (snap, meta_path) = self.current_paths();
        let tmp = self.snapshot_dir.join("build.tmp");
        let mut file = std::fs::File::create(&tmp).map_err(|e| snap_error(&e))?;
        let summary = engine
            .write_snapshot(&mut file)
            .map_err(|e| snap_error(&e))?;
        drop(guard);
        file.sync_all().map_err(|e| snap_error(&e))?;
        let meta = SnapshotMeta {
            last_log_id: applied.log_id,
            last_membership: applied.membership,
            snapshot_id: format!(
                "{}-{}",
                applied.log_id.map_or(0, |l| l.index),
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_millis())
            ),
        };
        write_meta(&meta_path, &meta).map_err(|e| snap_error(&e))?;
        std::fs::rename(&tmp, &snap).map_err(|e| snap_error(&e))?;
        tracing::info!(
            index = ?meta.last_log_id.map(|l| l.index),
            files = summary.files,
            bytes = summary.bytes,
            "built a snapshot"
        );
        Ok(meta)
    }

    /// Replace the engine's state with the snapshot in `incoming`.
    fn install(
        &self,
        meta: &SnapshotMeta<ReplicaId, Replica>,
        incoming: &Path,
    ) -> Result<(), SmError> {
        let mut guard = self.engine();
        if let Some(engine) = guard.take() {
            // Its state is being replaced: nothing of it need be kept.
            drop(engine);
        }
        let mut file = std::fs::File::open(incoming).map_err(|e| snap_error(&e))?;
        Engine::install_snapshot(&self.engine_dir, &mut file).map_err(|e| snap_error(&e))?;
        let engine = Engine::open_replicated(&self.engine_dir, self.config.clone())
            .map_err(|e| snap_error(&e))?;
        let applied = decode_marker(engine.applied()).map_err(|e| snap_error(&e))?;
        if applied.log_id != meta.last_log_id {
            return Err(snap_error(format!(
                "the snapshot's engine state is at {:?}, its meta says {:?}",
                applied.log_id, meta.last_log_id
            )));
        }
        *guard = Some(engine);
        self.set_applied(applied);
        drop(guard);
        let (snap, meta_path) = self.current_paths();
        write_meta(&meta_path, meta).map_err(|e| snap_error(&e))?;
        std::fs::rename(incoming, snap).map_err(|e| snap_error(&e))?;
        Ok(())
    }

    fn current(&self) -> Result<Option<Snapshot<TypeConfig>>, SmError> {
        let (snap, meta_path) = self.current_paths();
        if !snap.exists() || !meta_path.exists() {
            return Ok(None);
        }
        let bytes = std::fs::read(&meta_path).map_err(|e| snap_error(&e))?;
        let meta: SnapshotMeta<ReplicaId, Replica> =
            postcard::from_bytes(&bytes).map_err(|e| snap_error(&e))?;
        let file = std::fs::File::open(&snap).map_err(|e| snap_error(&e))?;
        Ok(Some(Snapshot {
            meta,
            snapshot: Box::new(tokio::fs::File::from_std(file)),
        }))
    }

    /// Apply committed entries in order; one [`Outcomes`] per entry.
    fn apply_entries(&self, entries: Vec<Entry<TypeConfig>>) -> Result<Vec<Outcomes>, SmError> {
        let mut guard = self.engine();
        let engine = guard
            .as_mut()
            .ok_or_else(|| sm_error("no engine to apply to"))?;
        let mut applied = self.applied();
        let mut out = Vec::with_capacity(entries.len());
        for entry in entries {
            let outcomes = match entry.payload {
                EntryPayload::Blank => Outcomes::default(),
                EntryPayload::Normal(batch) => apply_batch(engine, batch, entry.log_id)?,
                EntryPayload::Membership(m) => {
                    applied.membership = StoredMembership::new(Some(entry.log_id), m);
                    Outcomes::default()
                }
            };
            applied.log_id = Some(entry.log_id);
            out.push(outcomes);
        }
        engine.set_applied(postcard::to_allocvec(&applied).map_err(|e| sm_error(&e))?);
        self.note_load(engine);
        drop(guard);
        self.set_applied(applied);
        Ok(out)
    }
}

/// Apply one batch in one engine batch. A refusal every replica makes the
/// same way is an outcome; one that depends on this replica is fatal.
fn apply_batch(
    engine: &mut Engine,
    batch: Batch,
    log_id: LogId<ReplicaId>,
) -> Result<Outcomes, SmError> {
    engine.set_clock_ms(batch.now_ms);
    engine.begin_batch();
    // The log's cache usually shares the list: copied then.
    let requests = std::sync::Arc::unwrap_or_clone(batch.requests);
    let answers: Vec<ResponseBody> = requests.into_iter().map(|r| engine.respond(r)).collect();
    engine
        .end_batch()
        .map_err(|e| StorageIOError::apply(log_id, &e).into())
        .map_err(|e: SmError| e)?;
    if let Some(local) = answers.iter().find_map(local_failure) {
        return Err(StorageIOError::apply(log_id, &crate::Error::Storage(local)).into());
    }
    Ok(Outcomes(answers))
}

/// The message of an answer that reflects this replica's own condition
/// rather than the requests, if `answer` is one.
fn local_failure(answer: &ResponseBody) -> Option<String> {
    let local = |code: &ShardErrorCode| {
        matches!(code, ShardErrorCode::Storage | ShardErrorCode::Unavailable)
    };
    match answer {
        ResponseBody::Error(e) if local(&e.code) => Some(e.message.clone()),
        ResponseBody::AppendedBatch { results } => results.iter().find_map(|r| match r {
            Err(e) if local(&e.code) => Some(e.message.clone()),
            _ => None,
        }),
        _ => None,
    }
}

fn decode_marker(bytes: Option<&[u8]>) -> crate::Result<Applied> {
    match bytes {
        None => Ok(Applied::default()),
        Some(b) => postcard::from_bytes(b)
            .map_err(|e| crate::Error::Corrupt(format!("the applied marker does not decode: {e}"))),
    }
}

fn write_meta(path: &Path, meta: &SnapshotMeta<ReplicaId, Replica>) -> std::io::Result<()> {
    let bytes = postcard::to_allocvec(meta).map_err(std::io::Error::other)?;
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, bytes)?;
    std::fs::File::open(&tmp)?.sync_all()?;
    std::fs::rename(&tmp, path)
}

/// openraft's handle on the state machine.
#[derive(Clone)]
pub struct StateMachine {
    pub shared: Arc<Shared>,
}

impl RaftSnapshotBuilder<TypeConfig> for StateMachine {
    async fn build_snapshot(&mut self) -> Result<Snapshot<TypeConfig>, SmError> {
        let shared = self.shared.clone();
        blocking(move || {
            shared.build()?;
            shared
                .current()?
                .ok_or_else(|| snap_error("the snapshot just built is missing"))
        })
        .await
    }
}

impl RaftStateMachine<TypeConfig> for StateMachine {
    type SnapshotBuilder = StateMachine;

    async fn applied_state(
        &mut self,
    ) -> Result<
        (
            Option<LogId<ReplicaId>>,
            StoredMembership<ReplicaId, Replica>,
        ),
        SmError,
    > {
        let a = self.shared.applied();
        Ok((a.log_id, a.membership))
    }

    async fn apply<I>(&mut self, entries: I) -> Result<Vec<Outcomes>, SmError>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let entries: Vec<_> = entries.into_iter().collect();
        let shared = self.shared.clone();
        in_place(move || shared.apply_entries(entries))
    }

    async fn get_snapshot_builder(&mut self) -> StateMachine {
        self.clone()
    }

    async fn begin_receiving_snapshot(&mut self) -> Result<Box<tokio::fs::File>, SmError> {
        let path = self.shared.snapshot_dir.join("incoming.tmp");
        let file = tokio::fs::File::create(&path)
            .await
            .map_err(|e| snap_error(&e))?;
        Ok(Box::new(file))
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta<ReplicaId, Replica>,
        snapshot: Box<tokio::fs::File>,
    ) -> Result<(), SmError> {
        use tokio::io::AsyncWriteExt;
        let mut file = snapshot;
        file.flush().await.map_err(|e| snap_error(&e))?;
        file.sync_all().await.map_err(|e| snap_error(&e))?;
        drop(file);
        metrics::counter!("msgstore_raft_snapshots_installed_total").increment(1);
        let shared = self.shared.clone();
        let meta = meta.clone();
        let incoming = shared.snapshot_dir.join("incoming.tmp");
        let bytes = std::fs::metadata(&incoming).map_or(0, |m| m.len());
        metrics::counter!("msgstore_raft_snapshot_bytes_total", "direction" => "received")
            .increment(bytes);
        blocking(move || shared.install(&meta, &incoming)).await
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot<TypeConfig>>, SmError> {
        let shared = self.shared.clone();
        blocking(move || shared.current()).await
    }
}
