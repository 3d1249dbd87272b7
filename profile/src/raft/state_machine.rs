//! The LMDB store as the state machine of the profile group.
//!
//! Every committed entry is applied in log order on every replica: a
//! [`Batch`]'s ops through the same code the single writer thread uses
//! (`Store::apply_ops`), at the leader's clock, and the id of the last
//! applied entry and the membership ([`Applied`]) are written to the
//! store's `meta` database in the same write transaction: after a crash
//! the store and its applied id agree, and openraft re-applies only the
//! committed entries after it.
//!
//! A snapshot is a compacted copy of the whole environment (`mdb_env_copy2`,
//! consistent while the store serves), kept as `snapshots/current.mdb` with
//! its metadata in `snapshots/current.meta`. Installing one copies every
//! database of the received copy into the live store in one write
//! transaction, so readers see the old state or the new, never a mix, and
//! subscribers are told `CacheReset`.
//!
//! A storage failure while applying (a full disk, an I/O error) is not an
//! outcome every replica agrees on: it stops the replica (openraft treats
//! a state-machine error as fatal); it restarts from its store and log or
//! is rebuilt from a peer's snapshot.

// openraft's traits fix the error type (`StorageError`, 224 bytes).
#![allow(clippy::result_large_err)]

use super::{Batch, Outcomes, Replica, ReplicaId, TypeConfig};
use crate::{
    config::Limits,
    notify::Hub,
    store::{ops::Changes, Store},
};
use heed::CompactionOption;
use openraft::{
    storage::{RaftStateMachine, Snapshot},
    Entry, EntryPayload, LogId, OptionalSend, RaftSnapshotBuilder, SnapshotMeta, StoredMembership,
};
use proto::profile::Event;
use replication::sm::{blocking, in_place, sm_error, snap_error, SmError};
use serde::{Deserialize, Serialize};
use std::{
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
};

/// `meta` key of the [`Applied`] record (postcard).
const META_APPLIED: &[u8] = b"raft_applied";

/// The last applied entry and the membership as of it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Applied {
    pub log_id: Option<LogId<ReplicaId>>,
    pub membership: StoredMembership<ReplicaId, Replica>,
}

/// The store and what the state machine and the snapshot builder share.
pub struct Shared {
    store: Arc<Store>,
    hub: Arc<Hub>,
    snapshot_dir: PathBuf,
    /// How a received snapshot's copy is opened (as the live store is).
    map_bytes: u64,
    limits: Limits,
    /// Held while `current.*` are replaced (a build and an install may
    /// finish at the same time).
    current: Mutex<()>,
}

impl Shared {
    /// The state machine over `store`; snapshots live in `snapshot_dir`.
    pub fn new(
        store: Arc<Store>,
        hub: Arc<Hub>,
        snapshot_dir: PathBuf,
        map_bytes: u64,
    ) -> std::io::Result<Arc<Shared>> {
        std::fs::create_dir_all(&snapshot_dir)?;
        let limits = store.limits.clone();
        Ok(Arc::new(Shared {
            store,
            hub,
            snapshot_dir,
            map_bytes,
            limits,
            current: Mutex::new(()),
        }))
    }

    /// What was applied last (nothing, for a new store).
    pub fn applied(&self) -> Result<Applied, SmError> {
        let rtxn = self.store.env.read_txn().map_err(sm_error)?;
        read_applied(&self.store, &rtxn)
    }

    /// Apply `entries` in one write transaction; one [`Outcomes`] per entry.
    fn apply_entries(&self, entries: Vec<Entry<TypeConfig>>) -> Result<Vec<Outcomes>, SmError> {
        let store = &self.store;
        let mut wtxn = store.env.write_txn().map_err(sm_error)?;
        let mut applied = read_applied(store, &wtxn)?;
        let mut changes = Changes::new();
        let mut answers = Vec::with_capacity(entries.len());
        for entry in entries {
            applied.log_id = Some(entry.log_id);
            answers.push(match entry.payload {
                EntryPayload::Blank => Outcomes::default(),
                EntryPayload::Normal(Batch { now_ms, ops }) => {
                    let results = store
                        .apply_ops(&mut wtxn, ops, now_ms, &mut changes)
                        .map_err(sm_error)?;
                    Outcomes(
                        results
                            .into_iter()
                            .map(|r| r.map_err(|e| e.to_wire()))
                            .collect(),
                    )
                }
                EntryPayload::Membership(m) => {
                    applied.membership = StoredMembership::new(Some(entry.log_id), m);
                    Outcomes::default()
                }
            });
        }
        write_applied(store, &mut wtxn, &applied)?;
        wtxn.commit().map_err(sm_error)?;
        self.hub.publish(&changes);
        Ok(answers)
    }

    /// Copy the environment into a new current snapshot.
    fn build(&self) -> Result<Snapshot<TypeConfig>, SmError> {
        let building = self.snapshot_dir.join("building");
        remove_dir_if_there(&building)?;
        std::fs::create_dir_all(&building).map_err(snap_error)?;
        let copy = building.join("data.mdb");
        let file = self
            .store
            .env
            .copy_to_path(&copy, CompactionOption::Enabled)
            .map_err(snap_error)?;
        file.sync_all().map_err(snap_error)?;
        drop(file);
        // The copy's own record says what it holds (entries may have been
        // applied since).
        let applied = self.with_copy(&building, read_applied)?;
        let meta = SnapshotMeta {
            last_log_id: applied.log_id,
            last_membership: applied.membership,
            snapshot_id: snapshot_id(applied.log_id),
        };
        self.make_current(&copy, &meta)?;
        remove_dir_if_there(&building)?;
        self.current()?
            .ok_or_else(|| snap_error("the snapshot just built is missing"))
    }

    /// Replace the store's contents with those of the copy at `incoming`.
    fn install(
        &self,
        meta: &SnapshotMeta<ReplicaId, Replica>,
        incoming: &Path,
    ) -> Result<(), SmError> {
        let installing = self.snapshot_dir.join("installing");
        remove_dir_if_there(&installing)?;
        std::fs::create_dir_all(&installing).map_err(snap_error)?;
        let copy = installing.join("data.mdb");
        std::fs::rename(incoming, &copy).map_err(snap_error)?;
        self.with_copy(&installing, |snap, rtxn| {
            let store = &self.store;
            let mut wtxn = store.env.write_txn().map_err(snap_error)?;
            for ((name, from), (_, to)) in snap
                .every_database()
                .into_iter()
                .zip(store.every_database())
            {
                to.clear(&mut wtxn).map_err(snap_error)?;
                let pairs = from.iter(rtxn).map_err(snap_error)?;
                for pair in pairs {
                    let (k, v) = pair.map_err(|e| snap_error(format!("{name}: {e}")))?;
                    to.put(&mut wtxn, k, v).map_err(snap_error)?;
                }
            }
            let applied = Applied {
                log_id: meta.last_log_id,
                membership: meta.last_membership.clone(),
            };
            write_applied(store, &mut wtxn, &applied)?;
            wtxn.commit().map_err(snap_error)
        })?;
        self.make_current(&copy, meta)?;
        remove_dir_if_there(&installing)?;
        self.hub.publish(&[Event::CacheReset]);
        metrics::counter!("profile_raft_snapshots_installed_total").increment(1);
        Ok(())
    }

    /// Open the environment copy in `dir` as a store, run `f` on it in a
    /// read transaction, and close it again.
    fn with_copy<T>(
        &self,
        dir: &Path,
        f: impl FnOnce(&Store, &heed::RoTxn<heed::WithoutTls>) -> Result<T, SmError>,
    ) -> Result<T, SmError> {
        let copy = Store::open(dir, self.map_bytes, self.limits.clone()).map_err(snap_error)?;
        let result = {
            let rtxn = copy.env.read_txn().map_err(snap_error)?;
            f(&copy, &rtxn)
        };
        let closing = copy.env.clone().prepare_for_closing();
        drop(copy);
        closing.wait();
        result
    }

    /// Make `copy` (a closed environment file) the current snapshot.
    fn make_current(
        &self,
        copy: &Path,
        meta: &SnapshotMeta<ReplicaId, Replica>,
    ) -> Result<(), SmError> {
        let _current = self.current.lock().unwrap_or_else(|p| p.into_inner());
        let bytes = postcard::to_allocvec(meta).map_err(snap_error)?;
        let tmp = self.snapshot_dir.join("current.meta.tmp");
        std::fs::write(&tmp, bytes).map_err(snap_error)?;
        std::fs::File::open(&tmp)
            .and_then(|f| f.sync_all())
            .map_err(snap_error)?;
        std::fs::rename(copy, self.snapshot_dir.join("current.mdb")).map_err(snap_error)?;
        std::fs::rename(&tmp, self.snapshot_dir.join("current.meta")).map_err(snap_error)?;
        std::fs::File::open(&self.snapshot_dir)
            .and_then(|d| d.sync_all())
            .map_err(snap_error)
    }

    /// The current snapshot, if one was built or installed.
    fn current(&self) -> Result<Option<Snapshot<TypeConfig>>, SmError> {
        let _current = self.current.lock().unwrap_or_else(|p| p.into_inner());
        let meta_path = self.snapshot_dir.join("current.meta");
        let bytes = match std::fs::read(&meta_path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(snap_error(e)),
        };
        let meta: SnapshotMeta<ReplicaId, Replica> = postcard::from_bytes(&bytes)
            .map_err(|e| snap_error(format!("{}: {e}", meta_path.display())))?;
        let file =
            std::fs::File::open(self.snapshot_dir.join("current.mdb")).map_err(snap_error)?;
        Ok(Some(Snapshot {
            meta,
            snapshot: Box::new(tokio::fs::File::from_std(file)),
        }))
    }
}

fn read_applied(store: &Store, rtxn: &heed::RoTxn<heed::WithoutTls>) -> Result<Applied, SmError> {
    match store.meta.get(rtxn, META_APPLIED).map_err(sm_error)? {
        None => Ok(Applied::default()),
        Some(b) => postcard::from_bytes(b).map_err(|e| sm_error(format!("raft_applied: {e}"))),
    }
}

fn write_applied(store: &Store, wtxn: &mut heed::RwTxn, applied: &Applied) -> Result<(), SmError> {
    let bytes = postcard::to_allocvec(applied).map_err(sm_error)?;
    store.meta.put(wtxn, META_APPLIED, &bytes).map_err(sm_error)
}

fn snapshot_id(last: Option<LogId<ReplicaId>>) -> String {
    let ms = crate::store::ops::now_ms();
    match last {
        Some(l) => format!("{}-{}-{ms}", l.leader_id.term, l.index),
        None => format!("none-{ms}"),
    }
}

fn remove_dir_if_there(dir: &Path) -> Result<(), SmError> {
    match std::fs::remove_dir_all(dir) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(snap_error(e)),
    }
}

/// openraft's handle on the state machine.
#[derive(Clone)]
pub struct StateMachine {
    pub shared: Arc<Shared>,
}

impl RaftSnapshotBuilder<TypeConfig> for StateMachine {
    async fn build_snapshot(&mut self) -> Result<Snapshot<TypeConfig>, SmError> {
        let shared = self.shared.clone();
        blocking(move || shared.build()).await
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
        let a = self.shared.applied()?;
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
        let file = tokio::fs::File::create(&path).await.map_err(snap_error)?;
        Ok(Box::new(file))
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta<ReplicaId, Replica>,
        snapshot: Box<tokio::fs::File>,
    ) -> Result<(), SmError> {
        use tokio::io::AsyncWriteExt;
        let mut file = snapshot;
        file.flush().await.map_err(snap_error)?;
        file.sync_all().await.map_err(snap_error)?;
        drop(file);
        let shared = self.shared.clone();
        let meta = meta.clone();
        let incoming = shared.snapshot_dir.join("incoming.tmp");
        let bytes = std::fs::metadata(&incoming).map_or(0, |m| m.len());
        metrics::counter!("profile_raft_snapshot_bytes_total", "direction" => "received")
            .increment(bytes);
        blocking(move || shared.install(&meta, &incoming)).await
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot<TypeConfig>>, SmError> {
        let shared = self.shared.clone();
        blocking(move || shared.current()).await
    }
}

#[cfg(test)]
mod tests;
