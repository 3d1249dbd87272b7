//! What the replicated services (shard groups, the profile group) share,
//! so each piece exists once:
//!
//! * [`log_store`]: the Raft log on disk (openraft's storage-v2 traits,
//!   generic over the type config; segments of checked frames, group
//!   commit).
//! * [`peer`]: the replication port's protocol, authenticated links with a
//!   pool, and openraft's network over them.
//! * [`group`]: running a replica: the `[raft]` config table, serving the
//!   replication port, the operator's group commands, status and metrics.
//! * [`rebuild`]: a replica whose log is damaged sets it aside and
//!   rebuilds from its peers (out of the group, back as a learner).
//! * [`sm`]: helpers for a service's state machine.
//! * [`metrics`]: the metrics all of this emits, under a service's prefix.
//! * [`FsyncPolicy`]: when a write is synced relative to its answer.
//!
//! Consensus itself is `openraft`'s, never ours.

pub mod fsync;
pub mod group;
pub mod log_store;
pub mod metrics;
pub mod peer;
pub mod rebuild;
pub mod sm;
pub mod testing;

pub use fsync::FsyncPolicy;

use serde::{Deserialize, Serialize};

/// A replica's id within its group (from 1).
pub type ReplicaId = u64;

/// How a replica is reached: its replication address (Raft RPCs, group
/// commands) and its client address (the service's own protocol), which a
/// follower names when it redirects a client to the leader.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Replica {
    pub raft_addr: String,
    pub client_addr: String,
}

/// The Raft types a group of ours has: replicas named by [`ReplicaId`]
/// and reached at a [`Replica`], snapshots in a file, tokio underneath.
pub trait GroupTypes:
    openraft::RaftTypeConfig<
    NodeId = ReplicaId,
    Node = Replica,
    Entry = openraft::Entry<Self>,
    SnapshotData = tokio::fs::File,
    AsyncRuntime = openraft::TokioRuntime,
    Responder = openraft::impls::OneshotResponder<Self>,
>
{
}

impl<C> GroupTypes for C where
    C: openraft::RaftTypeConfig<
        NodeId = ReplicaId,
        Node = Replica,
        Entry = openraft::Entry<C>,
        SnapshotData = tokio::fs::File,
        AsyncRuntime = openraft::TokioRuntime,
        Responder = openraft::impls::OneshotResponder<C>,
    >
{
}

openraft::declare_raft_types!(
    /// A group of no particular service: for frames whose form is the same
    /// in every group (the operator's commands).
    pub AnyGroup:
        D = (),
        R = (),
        NodeId = ReplicaId,
        Node = Replica,
        Entry = openraft::Entry<AnyGroup>,
        SnapshotData = tokio::fs::File,
        AsyncRuntime = openraft::TokioRuntime,
);
