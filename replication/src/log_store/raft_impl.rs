//! openraft's storage-v2 traits over [`LogStore`] and [`LogReader`].

use super::{LogReader, LogStore, LogStoreError};
use openraft::{
    storage::{LogFlushed, RaftLogStorage},
    AnyError, LogId, LogState, OptionalSend, RaftLogReader, RaftTypeConfig, StorageError,
    StorageIOError, Vote,
};
use serde::{de::DeserializeOwned, Serialize};
use std::{fmt::Debug, ops::RangeBounds};

type NodeIdOf<C> = <C as RaftTypeConfig>::NodeId;

/// A log store error as openraft's, made by `make` (which says what failed).
fn storage_error<NID: openraft::NodeId>(
    e: LogStoreError,
    make: fn(AnyError) -> StorageIOError<NID>,
) -> StorageError<NID> {
    make(AnyError::new(&e)).into()
}

fn read_error<NID: openraft::NodeId>(e: LogStoreError) -> StorageError<NID> {
    storage_error(e, StorageIOError::read_logs)
}

fn write_error<NID: openraft::NodeId>(e: LogStoreError) -> StorageError<NID> {
    storage_error(e, StorageIOError::write_logs)
}

impl<C> RaftLogReader<C> for LogReader<C>
where
    C: RaftTypeConfig,
    C::Entry: DeserializeOwned + Clone,
{
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> Result<Vec<C::Entry>, StorageError<NodeIdOf<C>>> {
        self.read(range).map_err(read_error)
    }
}

impl<C> RaftLogReader<C> for LogStore<C>
where
    C: RaftTypeConfig,
    C::Entry: Serialize + DeserializeOwned + Clone,
{
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> Result<Vec<C::Entry>, StorageError<NodeIdOf<C>>> {
        self.read(range).map_err(read_error)
    }
}

impl<C> RaftLogStorage<C> for LogStore<C>
where
    C: RaftTypeConfig,
    C::Entry: Serialize + DeserializeOwned + Clone,
{
    type LogReader = LogReader<C>;

    async fn get_log_state(&mut self) -> Result<LogState<C>, StorageError<NodeIdOf<C>>> {
        Ok(self.log_state())
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.reader()
    }

    async fn save_vote(
        &mut self,
        vote: &Vote<NodeIdOf<C>>,
    ) -> Result<(), StorageError<NodeIdOf<C>>> {
        let result = self.write_vote(vote).await;
        result.map_err(|e| storage_error(e, StorageIOError::write_vote))
    }

    async fn read_vote(&mut self) -> Result<Option<Vote<NodeIdOf<C>>>, StorageError<NodeIdOf<C>>> {
        Ok(self.vote())
    }

    async fn save_committed(
        &mut self,
        committed: Option<LogId<NodeIdOf<C>>>,
    ) -> Result<(), StorageError<NodeIdOf<C>>> {
        self.write_committed(committed).await.map_err(write_error)
    }

    async fn read_committed(
        &mut self,
    ) -> Result<Option<LogId<NodeIdOf<C>>>, StorageError<NodeIdOf<C>>> {
        Ok(self.committed())
    }

    async fn append<I>(
        &mut self,
        entries: I,
        callback: LogFlushed<C>,
    ) -> Result<(), StorageError<NodeIdOf<C>>>
    where
        I: IntoIterator<Item = C::Entry> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let done = move |result| callback.log_io_completed(result);
        self.append_with(entries, done).await.map_err(write_error)
    }

    async fn truncate(
        &mut self,
        log_id: LogId<NodeIdOf<C>>,
    ) -> Result<(), StorageError<NodeIdOf<C>>> {
        self.truncate_from(log_id.index).await.map_err(write_error)
    }

    async fn purge(&mut self, log_id: LogId<NodeIdOf<C>>) -> Result<(), StorageError<NodeIdOf<C>>> {
        self.purge_upto(log_id).await.map_err(write_error)
    }
}
