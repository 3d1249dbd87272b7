//! The profile service as a replica of a Raft group (openraft 0.9,
//! storage-v2, never consensus of our own), with the pieces every group
//! shares from the `replication` crate.
//!
//! * [`TypeConfig`]: one entry is a [`Batch`] of write ops with the
//!   leader's clock, applied in order, in one LMDB write transaction, on
//!   every replica.
//! * [`state_machine`]: the LMDB store as the state machine; the last
//!   applied entry and the membership are kept in the store's `meta`
//!   database, in the same transaction as the ops they cover. A snapshot
//!   is a compacted copy of the LMDB environment (LMDB writes it
//!   consistently while serving).

pub mod node;
pub mod state_machine;

use crate::store::ops::{Outcome, WriteOp};
use proto::profile::ProfileError;
use serde::{Deserialize, Serialize};

pub use replication::{Replica, ReplicaId};

/// The write ops of one Raft entry, with the leader's wall clock when it
/// proposed them (so a creation time is the same on every replica).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Batch {
    pub now_ms: u64,
    pub ops: Vec<WriteOp>,
}

/// The result of each op of a [`Batch`], in order: what it returned, or
/// why it was refused (the same on every replica).
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Outcomes(pub Vec<Result<Outcome, ProfileError>>);

openraft::declare_raft_types!(
    /// The Raft types of the profile group.
    pub TypeConfig:
        D = Batch,
        R = Outcomes,
        NodeId = ReplicaId,
        Node = Replica,
        Entry = openraft::Entry<TypeConfig>,
        SnapshotData = tokio::fs::File,
        AsyncRuntime = openraft::TokioRuntime,
);
