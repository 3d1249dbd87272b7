//! openraft's storage test suite over the log store (in a temporary
//! directory) and the in-memory state machine.

use super::{config, sm::MemStateMachine, Store, TestConfig};
use crate::FsyncPolicy;
use openraft::{
    testing::{StoreBuilder, Suite},
    AnyError, StorageError, StorageIOError,
};
use tempfile::TempDir;

/// Builds a fresh store in a temporary directory with this config.
struct Builder(super::LogStoreConfig);

impl StoreBuilder<TestConfig, Store, MemStateMachine, TempDir> for Builder {
    async fn build(&self) -> Result<(TempDir, Store, MemStateMachine), StorageError<u64>> {
        let dir = tempfile::tempdir().map_err(|e| StorageIOError::write(AnyError::new(&e)))?;
        let store = Store::open(dir.path(), self.0.clone())
            .map_err(|e| StorageIOError::write(AnyError::new(&e)))?;
        Ok((dir, store, MemStateMachine::default()))
    }
}

#[test]
fn openraft_suite_with_defaults() {
    Suite::test_all(Builder(super::LogStoreConfig::default())).unwrap();
}

/// Tiny segments (a new one every few entries), no cache (every read
/// from disk), interval syncs.
#[test]
fn openraft_suite_with_tiny_segments_and_no_cache() {
    Suite::test_all(Builder(config(FsyncPolicy::IntervalMs(1), 60, 0))).unwrap();
}
