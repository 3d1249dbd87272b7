//! Tests of the Raft log store: openraft's own suite, a model test, torn
//! tails and damage, group commit, and decoders fed arbitrary bytes.

mod damage;
mod group_commit;
mod model;
mod sm;
mod suite;
mod writer;

use super::{LogStore, LogStoreConfig};
use crate::FsyncPolicy;
use openraft::{CommittedLeaderId, Entry, EntryPayload, LogId};
use std::{io, path::Path};
use tokio::sync::oneshot;

openraft::declare_raft_types!(
    /// A small type config for tests: string entries.
    pub TestConfig:
        D = String,
        R = String,
        NodeId = u64,
        Node = openraft::BasicNode,
        Entry = openraft::Entry<TestConfig>,
        SnapshotData = std::io::Cursor<Vec<u8>>,
        AsyncRuntime = openraft::TokioRuntime,
);

type Store = LogStore<TestConfig>;

/// The crate's own type config is served by the store.
#[test]
fn the_shard_type_config_is_a_log_storage() {
    fn is_storage<S: openraft::storage::RaftLogStorage<TestConfig>>() {}
    is_storage::<LogStore<TestConfig>>();
}

fn log_id(term: u64, index: u64) -> LogId<u64> {
    LogId::new(CommittedLeaderId::new(term, 1), index)
}

/// A normal entry whose payload names it, `pad` bytes longer.
fn entry(term: u64, index: u64, pad: usize) -> Entry<TestConfig> {
    Entry {
        log_id: log_id(term, index),
        payload: EntryPayload::Normal(format!("{term}/{index}/{}", "x".repeat(pad))),
    }
}

fn config(fsync: FsyncPolicy, segment_bytes_max: u64, cache_bytes_max: u64) -> LogStoreConfig {
    LogStoreConfig {
        fsync,
        segment_bytes_max,
        entry_bytes_max: 64 * 1024,
        cache_bytes_max,
        metric_prefix: "test",
    }
}

fn open(dir: &Path, config: &LogStoreConfig) -> Store {
    Store::open(dir, config.clone()).unwrap()
}

/// Append and return a receiver of the callback's result.
async fn append(
    store: &mut Store,
    entries: Vec<Entry<TestConfig>>,
) -> oneshot::Receiver<io::Result<()>> {
    let (tx, rx) = oneshot::channel();
    store
        .append_with(entries, move |r| {
            let _ = tx.send(r);
        })
        .await
        .unwrap();
    rx
}

/// Append and wait until written.
async fn append_flushed(store: &mut Store, entries: Vec<Entry<TestConfig>>) {
    append(store, entries).await.await.unwrap().unwrap();
}

/// A current-thread runtime for a test.
fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}
