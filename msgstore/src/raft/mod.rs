//! Replicated shard groups: a shard as a Raft group of 1, 3, 5 or 7
//! replicas, with consensus from `openraft` (never our own).
//!
//! * [`TypeConfig`]: what the group agrees on. One Raft entry is a
//!   [`Batch`]: the write requests a connection's read brought, with the
//!   leader's clock, applied in order to the engine on every replica.
//! * `replication::log_store`: the Raft log on disk (segments of checked
//!   frames, group commit: many entries per sync), the vote and the
//!   committed id. `replication::peer`: the replication links.
//! * `state_machine`: the engine as the state machine; a checkpoint is the
//!   snapshot.
//!
//! See `docs/STORAGE.md` ("Replicated shards") for what is durable when.

pub mod node;
pub mod proposer;
pub mod service;
pub mod state_machine;
pub mod testing;

/// A Raft entry carries at most about this much payload: the writes of one
/// connection's read are split into several entries past it.
pub const BATCH_BYTES_MAX: usize = 1024 * 1024;

use proto::shard::{RequestBody, ResponseBody};
use serde::{Deserialize, Serialize};

pub use replication::{Replica, ReplicaId};

/// The write requests of one Raft entry, applied in order to the engine of
/// every replica, with the leader's wall clock when it proposed them (so an
/// append's timestamp and a freeze's deadline are the same everywhere).
///
/// The requests are shared: openraft clones an entry for every follower
/// it sends it to and for the state machine, and a shared list makes those
/// clones free (it is encoded exactly as the list itself).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Batch {
    pub now_ms: u64,
    pub requests: std::sync::Arc<Vec<RequestBody>>,
}

/// The answers to a [`Batch`]'s requests, in order.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Outcomes(pub Vec<ResponseBody>);

openraft::declare_raft_types!(
    /// The Raft types of a shard group.
    pub TypeConfig:
        D = Batch,
        R = Outcomes,
        NodeId = ReplicaId,
        Node = Replica,
        Entry = openraft::Entry<TypeConfig>,
        SnapshotData = tokio::fs::File,
        AsyncRuntime = openraft::TokioRuntime,
);
