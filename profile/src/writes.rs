//! Where the service's writes go: the writer thread of a single profile
//! process, or the Raft group of a replica. Reads on a replica first wait
//! for its read index.

use crate::{
    raft::node::Replicated,
    store::{
        ops::{Outcome, WriteOp},
        writer::Writer,
    },
    Error, Result,
};
use std::sync::Arc;

pub enum Writes {
    /// A single process: its own writer thread.
    Local(Writer),
    /// A replica of a profile group.
    Replicated(Arc<Replicated>),
}

impl Writes {
    /// Apply `ops`, each on its own (one failing leaves the others), in one
    /// commit; one result per op, in order.
    pub async fn write_many(&self, ops: Vec<WriteOp>) -> Result<Vec<Result<Outcome>>> {
        match self {
            Writes::Local(writer) => writer.write_many(ops).await,
            Writes::Replicated(replica) => replica.write_many(ops).await,
        }
    }

    pub async fn write(&self, op: WriteOp) -> Result<Outcome> {
        self.write_many(vec![op])
            .await?
            .pop()
            .unwrap_or(Err(Error::Closed))
    }

    /// Whether reads must wait for [`Writes::before_read`] first.
    pub fn is_replicated(&self) -> bool {
        matches!(self, Writes::Replicated(_))
    }

    /// On a replica, wait until a read here sees everything committed
    /// before the call; a single process answers at once.
    pub async fn before_read(&self) -> Result<()> {
        match self {
            Writes::Local(_) => Ok(()),
            Writes::Replicated(replica) => replica.before_read().await,
        }
    }
}
