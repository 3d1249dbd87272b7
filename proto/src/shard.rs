//! The msgstore shard protocol: requests from gateways and tools to one
//! storage shard, and its responses.
//!
//! Every request carries a caller-chosen `id` that the response echoes, so one
//! connection pipelines many requests. Callers must match answers by `id`:
//! a fetch of durable records may be answered before earlier requests.
//! Byte layout: see `docs/PROTOCOL.md`.

use serde::{Deserialize, Serialize};

/// Version of these types, bumped on any incompatible change. It is not
/// sent on the wire yet: shards and their callers are deployed together.
pub const SHARD_PROTOCOL_VERSION: u32 = 2;

/// Most records of a mailbox one item of a
/// [`RequestBody::AppendBatchOnce`] looks back at for its `msg_id`.
pub const APPEND_ONCE_SCAN_MAX: u64 = 20_000;

/// Most items in one [`RequestBody::AppendBatch`].
pub const APPEND_BATCH_ITEMS_MAX: usize = 1024;

/// Most records one [`RequestBody::Fetch`] returns, whatever it asks for.
pub const FETCH_COUNT_MAX: u32 = 1000;

/// Most payload bytes one [`RequestBody::Fetch`] returns (beyond its first
/// record, which is always returned so a large message cannot block a mailbox).
pub const FETCH_BYTES_MAX: u32 = 1024 * 1024;

/// Most users one [`RequestBody::ListUsers`] returns.
pub const LIST_USERS_MAX: u32 = 10_000;

/// Most records in one [`RequestBody::Import`].
pub const IMPORT_RECORDS_MAX: usize = 1000;

/// How long a [`RequestBody::Freeze`] holds a user before the shard lets
/// writes in again by itself (a migration tool that died must not block a
/// user for ever).
pub const FREEZE_HOLD_MS: u64 = 10_000;

/// Most users one shard holds frozen at once.
pub const FROZEN_USERS_MAX: usize = 64;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Request {
    pub id: u64,
    pub body: RequestBody,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AppendItem {
    pub user: u64,
    pub msg_id: u128,
    #[serde(with = "serde_bytes")]
    pub payload: Vec<u8>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum RequestBody {
    /// Store one message in `user`'s mailbox.
    Append {
        user: u64,
        msg_id: u128,
        #[serde(with = "serde_bytes")]
        payload: Vec<u8>,
    },
    /// Store several messages; each item succeeds or fails on its own.
    AppendBatch {
        items: Vec<AppendItem>,
    },
    /// Read live records of `user` with `seq > after_seq`, oldest first.
    Fetch {
        user: u64,
        after_seq: u64,
        max_count: u32,
        max_bytes: u32,
    },
    /// Delete every record of `user` with `seq <= up_to_seq`.
    Ack {
        user: u64,
        up_to_seq: u64,
    },
    /// Mailbox statistics of one user.
    UserStats {
        user: u64,
    },
    /// Statistics of the whole shard.
    Stats,
    Ping,
    /// Install the cluster maps this shard routes by (from the rebalance
    /// tool). Refused if its newest epoch is older than the installed one.
    SetRouting(Routing),
    /// The installed routing, if any.
    GetRouting,
    /// Users with a mailbox here (moved-out users excluded), ascending by
    /// id, from `start` on: how the rebalance tool finds who moves.
    ListUsers {
        start: u64,
        limit: u32,
    },
    /// Refuse writes (`Busy`) to `user` until [`RequestBody::Release`] with
    /// the same token, or for [`FREEZE_HOLD_MS`]. Answers the mailbox state
    /// the copy must reach. Freezing again with a new token re-arms it.
    Freeze {
        user: u64,
        token: u64,
    },
    /// Bring `user`'s mailbox here up to a copy from its old shard: ack up
    /// to `acked_seq`, then append `records` (their own seqs, timestamps and
    /// ids) that are newer than what is here. Idempotent: importing the same
    /// or an older page again changes nothing.
    Import {
        user: u64,
        acked_seq: u64,
        records: Vec<StoredRecord>,
    },
    /// End a freeze. With `moved`, first delete the mailbox and answer
    /// `Moved` for this user from now on. Refused (`Conflict`) unless the
    /// user is still frozen under `token`.
    Release {
        user: u64,
        token: u64,
        moved: bool,
    },
    /// Delete `user`'s oldest records stored (by their `timestamp_ms`)
    /// before `before_ms` and with a seq up to `up_to_seq`, as an `Ack` up
    /// to the newest of them would: how a group's mailbox keeps no message
    /// past its retention, and none every member read once it is old
    /// enough that no retry can still come for it. Looks at the first
    /// `FETCH_COUNT_MAX` live records at most. Answered `Acked`.
    Expire {
        user: u64,
        before_ms: u64,
        up_to_seq: u64,
    },
    /// `AppendBatch`, except that an item whose mailbox already holds a
    /// live record with the same `msg_id` stored at or after `since_ms` is
    /// not stored again: its result is that record's seq. Looks back at
    /// most [`APPEND_ONCE_SCAN_MAX`] records per item. How a retried group
    /// message is stored once. Answered `AppendedBatch`.
    AppendBatchOnce {
        items: Vec<AppendItem>,
        since_ms: u64,
    },
}

impl RequestBody {
    /// The request's name in metrics (`msgstore_requests_total{op}`).
    pub fn op_name(&self) -> &'static str {
        match self {
            RequestBody::Append { .. } => "append",
            RequestBody::AppendBatch { .. } => "append_batch",
            RequestBody::AppendBatchOnce { .. } => "append_batch_once",
            RequestBody::Fetch { .. } => "fetch",
            RequestBody::Ack { .. } => "ack",
            RequestBody::Expire { .. } => "expire",
            RequestBody::SetRouting(_) => "set_routing",
            RequestBody::GetRouting => "get_routing",
            RequestBody::ListUsers { .. } => "list_users",
            RequestBody::Freeze { .. } => "freeze",
            RequestBody::Import { .. } => "import",
            RequestBody::Release { .. } => "release",
            RequestBody::UserStats { .. } => "user_stats",
            RequestBody::Stats => "stats",
            RequestBody::Ping => "ping",
        }
    }
}

/// What a shard needs to know to refuse users it does not own.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Routing {
    /// This shard's id in the maps.
    pub me: String,
    /// The map gateways route by.
    pub current: crate::cluster::ClusterMap,
    /// During a rebalance, the map being moved to (a higher epoch).
    pub target: Option<crate::cluster::ClusterMap>,
}

impl Routing {
    /// The highest epoch this routing knows.
    pub fn newest_epoch(&self) -> u64 {
        self.target
            .as_ref()
            .map_or(self.current.epoch, |t| t.epoch.max(self.current.epoch))
    }
}

/// One user as [`RequestBody::ListUsers`] reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct UserEntry {
    pub user: u64,
    pub live_count: u64,
    pub live_bytes: u64,
}

/// One stored message as the shard returns it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredRecord {
    pub seq: u64,
    pub msg_id: u128,
    /// Milliseconds since the Unix epoch when the shard stored it.
    pub timestamp_ms: u64,
    #[serde(with = "serde_bytes")]
    pub payload: Vec<u8>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct MailboxStats {
    /// Messages stored and not yet acknowledged.
    pub live_count: u64,
    /// Payload bytes of those messages.
    pub live_bytes: u64,
    /// Highest sequence number ever assigned (0 if none).
    pub last_seq: u64,
    /// Every seq up to this one has been acknowledged.
    pub acked_seq: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct ShardStats {
    pub users: u64,
    pub live_messages: u64,
    pub live_bytes: u64,
    pub appends_total: u64,
    pub acks_total: u64,
    pub batches_total: u64,
    pub syncs_total: u64,
    pub checkpoints_total: u64,
    pub compactions_total: u64,
    pub wal_bytes: u64,
    pub bucket_bytes: u64,
    pub dead_bytes: u64,
    pub open_maps: u64,
    pub corrupt_records_total: u64,
    /// What this shard process is in its group.
    pub role: ShardRole,
    /// Of a replica: the replica id of the group's leader, if known.
    pub leader: Option<u64>,
    /// Of a replica: its Raft state, from openraft's metrics (on the
    /// leader with every member's replication progress). `None` of a
    /// standalone shard.
    pub raft: Option<RaftStats>,
}

/// A replica's Raft state, as [`ShardStats::raft`] reports it.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct RaftStats {
    /// This replica's id in its group.
    pub id: u64,
    pub term: u64,
    /// Index of the newest entry in this replica's log (`None`: empty).
    pub last_log_index: Option<u64>,
    /// Index of the newest entry this replica knows is committed (`None`:
    /// none yet, or its Raft core did not tell in time).
    pub committed_index: Option<u64>,
    /// Index of the newest entry applied to this replica's engine.
    pub applied_index: Option<u64>,
    /// On the leader: every member of the group (itself included), by
    /// replica id, with the index of the newest entry known to be in its
    /// log (`None`: nothing yet). Empty on the other replicas.
    pub matched: Vec<ReplicaProgress>,
}

impl RaftStats {
    /// On the leader: how many entries replica `id` lacks of the
    /// leader's log (`None` if it is not a member the leader tracks).
    pub fn lag_of(&self, id: u64) -> Option<u64> {
        let p = self.matched.iter().find(|p| p.replica == id)?;
        let last = self.last_log_index.unwrap_or(0);
        Some(last.saturating_sub(p.matched.unwrap_or(0)))
    }
}

/// One member's replication progress, as the leader tracks it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct ReplicaProgress {
    pub replica: u64,
    /// Index of the newest entry known to be in its log.
    pub matched: Option<u64>,
}

/// What a shard process is: a shard of its own, or a replica of a
/// replicated shard group in one of Raft's roles.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ShardRole {
    #[default]
    Standalone,
    Leader,
    Follower,
    Candidate,
    Learner,
}

/// Typed failures a shard reports for one request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ShardErrorCode {
    /// The user's mailbox is at its message-count or byte limit.
    MailboxFull,
    /// The payload exceeds the shard's message size limit.
    MessageTooLarge,
    /// The request is outside the protocol's limits (batch too big, ...).
    BadRequest,
    /// The shard is shutting down or overloaded; retry later or elsewhere.
    Unavailable,
    /// Disk full, I/O error, index full: nothing of this request was stored.
    Storage,
    /// This shard does not hold the user (any more): retry at `shard`,
    /// reachable at `addr`, as of cluster-map `epoch`.
    Moved {
        shard: String,
        addr: String,
        epoch: u64,
    },
    /// The user is being moved between shards: retry a moment later.
    Busy,
    /// The request contradicts the shard's state (a freeze that expired,
    /// an import with a gap, a routing older than the installed one).
    Conflict,
    /// This replica of a shard group does not lead it: retry at `leader`
    /// (the leader's shard-protocol address), if known, else at another
    /// replica of the group a moment later.
    NotLeader { leader: Option<String> },
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShardError {
    pub code: ShardErrorCode,
    pub message: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Response {
    pub id: u64,
    pub body: ResponseBody,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ResponseBody {
    Appended {
        seq: u64,
    },
    AppendedBatch {
        results: Vec<Result<u64, ShardError>>,
    },
    Records {
        records: Vec<StoredRecord>,
        /// True if live records with a higher seq remain after this page.
        more: bool,
    },
    Acked {
        removed: u64,
    },
    UserStats(MailboxStats),
    Stats(ShardStats),
    Pong,
    Error(ShardError),
    RoutingSet,
    Routing(Option<Routing>),
    Users {
        users: Vec<UserEntry>,
        /// Where the next page starts, if users with higher ids may remain.
        next: Option<u64>,
    },
    /// The user's mailbox state when it was frozen.
    Frozen(MailboxStats),
    /// The user's mailbox state after the import.
    Imported(MailboxStats),
    Released {
        removed: u64,
    },
}

#[cfg(test)]
mod tests {
    use super::*;

    fn encoded(stats: ShardStats) -> Vec<u8> {
        let response = Response {
            id: 3,
            body: ResponseBody::Stats(stats),
        };
        let bytes = postcard::to_stdvec(&response).unwrap();
        assert_eq!(postcard::from_bytes::<Response>(&bytes).unwrap(), response);
        bytes
    }

    /// `docs/PROTOCOL.md` §1.3 "ShardStats": fields 1-14, `role`,
    /// `leader`, then `raft` (added at the end, protocol version 2).
    #[test]
    fn shard_stats_bytes_are_pinned() {
        let standalone = ShardStats {
            users: 1,
            live_messages: 300,
            corrupt_records_total: 14,
            ..ShardStats::default()
        };
        let mut expected = vec![3, 5, 1, 0xac, 0x02];
        expected.extend([0; 11]);
        expected.extend([14, 0, 0, 0]);
        assert_eq!(encoded(standalone), expected);

        let leader = ShardStats {
            role: ShardRole::Leader,
            leader: Some(2),
            raft: Some(RaftStats {
                id: 2,
                term: 5,
                last_log_index: Some(1500),
                committed_index: Some(1499),
                applied_index: None,
                matched: vec![
                    ReplicaProgress {
                        replica: 1,
                        matched: Some(400),
                    },
                    ReplicaProgress {
                        replica: 2,
                        matched: Some(1500),
                    },
                    ReplicaProgress {
                        replica: 3,
                        matched: None,
                    },
                ],
            }),
            ..ShardStats::default()
        };
        let mut expected = vec![3, 5];
        expected.extend([0; 14]);
        expected.extend([1, 1, 2]); // role Leader, leader Some(2)
        expected.extend([1, 2, 5]); // raft Some, id 2, term 5
        expected.extend([1, 0xdc, 0x0b, 1, 0xdb, 0x0b, 0]); // 1500, 1499, None
        expected.extend([3, 1, 1, 0x90, 0x03, 2, 1, 0xdc, 0x0b, 3, 0]);
        assert_eq!(encoded(leader.clone()), expected);
        let raft = leader.raft.unwrap();
        assert_eq!(raft.lag_of(1), Some(1100));
        assert_eq!(raft.lag_of(3), Some(1500));
        assert_eq!(raft.lag_of(9), None);
    }
}
