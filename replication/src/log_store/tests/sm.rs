//! A small in-memory state machine for openraft's suite: a map from index
//! to the entry's string, snapshots of it as postcard bytes.

use super::TestConfig;
use openraft::{
    storage::RaftStateMachine, AnyError, BasicNode, Entry, EntryPayload, LogId,
    RaftSnapshotBuilder, Snapshot, SnapshotMeta, StorageError, StorageIOError, StoredMembership,
};
use std::{
    collections::BTreeMap,
    io::Cursor,
    sync::{Arc, Mutex},
};

#[derive(Default)]
struct Inner {
    last_applied: Option<LogId<u64>>,
    membership: StoredMembership<u64, BasicNode>,
    data: BTreeMap<u64, String>,
    snapshot: Option<(SnapshotMeta<u64, BasicNode>, Vec<u8>)>,
    snapshots_built: u64,
}

/// The state machine (and its own snapshot builder: clones share it).
#[derive(Default, Clone)]
pub struct MemStateMachine {
    inner: Arc<Mutex<Inner>>,
}

impl MemStateMachine {
    fn inner(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap()
    }
}

fn snapshot_of(meta: &SnapshotMeta<u64, BasicNode>, bytes: &[u8]) -> Snapshot<TestConfig> {
    Snapshot {
        meta: meta.clone(),
        snapshot: Box::new(Cursor::new(bytes.to_vec())),
    }
}

impl RaftSnapshotBuilder<TestConfig> for MemStateMachine {
    async fn build_snapshot(&mut self) -> Result<Snapshot<TestConfig>, StorageError<u64>> {
        let mut inner = self.inner();
        let bytes = postcard::to_allocvec(&inner.data)
            .map_err(|e| StorageIOError::write_snapshot(None, AnyError::new(&e)))?;
        inner.snapshots_built += 1;
        let meta = SnapshotMeta {
            last_log_id: inner.last_applied,
            last_membership: inner.membership.clone(),
            snapshot_id: format!("snapshot-{}", inner.snapshots_built),
        };
        inner.snapshot = Some((meta.clone(), bytes.clone()));
        Ok(snapshot_of(&meta, &bytes))
    }
}

impl RaftStateMachine<TestConfig> for MemStateMachine {
    type SnapshotBuilder = Self;

    async fn applied_state(
        &mut self,
    ) -> Result<(Option<LogId<u64>>, StoredMembership<u64, BasicNode>), StorageError<u64>> {
        let inner = self.inner();
        Ok((inner.last_applied, inner.membership.clone()))
    }

    async fn apply<I>(&mut self, entries: I) -> Result<Vec<String>, StorageError<u64>>
    where
        I: IntoIterator<Item = Entry<TestConfig>> + Send,
    {
        let mut inner = self.inner();
        let mut out = Vec::new();
        for entry in entries {
            inner.last_applied = Some(entry.log_id);
            match entry.payload {
                EntryPayload::Blank => {}
                EntryPayload::Normal(s) => {
                    inner.data.insert(entry.log_id.index, s);
                }
                EntryPayload::Membership(m) => {
                    inner.membership = StoredMembership::new(Some(entry.log_id), m);
                }
            }
            out.push(entry.log_id.to_string());
        }
        Ok(out)
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        self.clone()
    }

    async fn begin_receiving_snapshot(
        &mut self,
    ) -> Result<Box<Cursor<Vec<u8>>>, StorageError<u64>> {
        Ok(Box::new(Cursor::new(Vec::new())))
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta<u64, BasicNode>,
        snapshot: Box<Cursor<Vec<u8>>>,
    ) -> Result<(), StorageError<u64>> {
        let bytes = snapshot.into_inner();
        let data = postcard::from_bytes(&bytes).map_err(|e| {
            StorageIOError::read_snapshot(Some(meta.signature()), AnyError::new(&e))
        })?;
        let mut inner = self.inner();
        inner.data = data;
        inner.last_applied = meta.last_log_id;
        inner.membership = meta.last_membership.clone();
        inner.snapshot = Some((meta.clone(), bytes));
        Ok(())
    }

    async fn get_current_snapshot(
        &mut self,
    ) -> Result<Option<Snapshot<TestConfig>>, StorageError<u64>> {
        let inner = self.inner();
        Ok(inner
            .snapshot
            .as_ref()
            .map(|(meta, bytes)| snapshot_of(meta, bytes)))
    }
}
