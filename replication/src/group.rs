//! Running a replica of a group, whatever the service: the `[raft]`
//! config table, the replication port (peer RPCs and the operator's group
//! commands), status and the Raft metrics. The service brings its state
//! machine and its client port.

use crate::rebuild::Gate;
use crate::{
    log_store::{LogStore, LogStoreError},
    metrics::metric_name,
    peer::{
        read_frame_or_end, AdminRequest, AdminResponse, GroupStatus, LinkPool, PeerRequest,
        PeerResponse, PEER_FRAME_BODY_BYTES_MAX,
    },
    GroupTypes, Replica, ReplicaId,
};
use bytes::BytesMut;
use daemon::secure::{GateLimits, Link, SecureListener};
use openraft::{
    error::{CheckIsLeaderError, ClientWriteError, RaftError},
    raft::VoteResponse,
    Raft, ServerState, SnapshotPolicy,
};
use proto::shard::{RaftStats, ReplicaProgress, ShardRole};
use serde::{Deserialize, Serialize};
use std::{
    collections::{BTreeMap, BTreeSet},
    net::SocketAddr,
    time::Duration,
};
use tokio::net::TcpListener;

/// The `[raft]` table of a daemon's config: present, the daemon runs as
/// a replica of a group (a shard group, the profile group).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RaftConfig {
    /// This replica's id in its group (from 1; unique in the group).
    pub id: ReplicaId,
    /// Address of the replication port (peer RPCs, `imctl shard group`).
    pub listen: SocketAddr,
    /// How often the leader sends heartbeats.
    pub heartbeat_ms: u64,
    /// A follower that hears no leader for a random time between these
    /// two starts an election. openraft 0.9 draws the time once per
    /// process and adds a lease of the maximum after a leader was heard,
    /// and twice the maximum for a candidate whose log is behind another's
    /// (its vote refused): a failover takes about max + [min, max], plus
    /// 2 x max for each such round.
    pub election_timeout_min_ms: u64,
    pub election_timeout_max_ms: u64,
    /// A snapshot is built after this many log
    /// entries since the last; the log before it is then purged.
    pub snapshot_every_entries: u64,
    /// Entries kept in the log below the newest snapshot (so a follower
    /// a little behind catches up from the log, not by a snapshot).
    pub log_kept_after_snapshot_entries: u64,
    /// A write or read not committed / confirmed within this is answered
    /// `Unavailable` (a leader cut off from its majority).
    pub write_timeout_ms: u64,
    /// Largest log segment file before a new one starts.
    pub log_segment_bytes: u64,
}

impl Default for RaftConfig {
    fn default() -> Self {
        Self {
            id: 1,
            listen: "127.0.0.1:7500".parse().expect("valid address"),
            heartbeat_ms: 50,
            election_timeout_min_ms: 200,
            election_timeout_max_ms: 400,
            snapshot_every_entries: 50_000,
            log_kept_after_snapshot_entries: 1_000,
            write_timeout_ms: 2_000,
            log_segment_bytes: 64 * 1024 * 1024,
        }
    }
}

impl RaftConfig {
    pub fn validate(&self) -> Result<(), String> {
        if self.id == 0 {
            return Err("raft.id must be at least 1".into());
        }
        if self.heartbeat_ms == 0 || self.heartbeat_ms * 2 >= self.election_timeout_min_ms {
            return Err(
                "raft.heartbeat_ms must be above 0 and under half of raft.election_timeout_min_ms"
                    .into(),
            );
        }
        if self.election_timeout_max_ms <= self.election_timeout_min_ms {
            return Err(
                "raft.election_timeout_max_ms must exceed raft.election_timeout_min_ms".into(),
            );
        }
        if self.snapshot_every_entries == 0 || self.write_timeout_ms == 0 {
            return Err(
                "raft.snapshot_every_entries and raft.write_timeout_ms must be above 0".into(),
            );
        }
        Ok(())
    }

    /// openraft's settings for a group named `cluster_name`.
    pub fn openraft(&self, cluster_name: &str) -> Result<openraft::Config, String> {
        openraft::Config {
            cluster_name: cluster_name.into(),
            heartbeat_interval: self.heartbeat_ms,
            election_timeout_min: self.election_timeout_min_ms,
            election_timeout_max: self.election_timeout_max_ms,
            max_payload_entries: 32,
            snapshot_policy: SnapshotPolicy::LogsSinceLast(self.snapshot_every_entries),
            max_in_snapshot_log_to_keep: self.log_kept_after_snapshot_entries,
            ..Default::default()
        }
        .validate()
        .map_err(|e| e.to_string())
    }
}

/// A daemon's flags that make it a replica (they set the `[raft]` table's
/// `id` and `listen`, adding the table if the config file has none).
#[derive(Debug, Clone, Default, clap::Args)]
pub struct RaftArgs {
    /// Run as replica ID of a group (sets raft.id; the group is formed
    /// with `imctl shard --addr RAFT_ADDR group init`).
    #[arg(long, value_name = "ID")]
    pub raft_id: Option<u64>,
    /// Address of the replica's replication port (sets raft.listen).
    #[arg(long, value_name = "ADDR")]
    pub raft_listen: Option<SocketAddr>,
}

impl RaftArgs {
    /// Apply the flags to a config's `[raft]` table.
    pub fn apply(&self, raft: &mut Option<RaftConfig>) {
        if self.raft_id.is_none() && self.raft_listen.is_none() {
            return;
        }
        let raft = raft.get_or_insert_with(Default::default);
        if let Some(id) = self.raft_id {
            raft.id = id;
        }
        if let Some(listen) = self.raft_listen {
            raft.listen = listen;
        }
    }
}

/// What a replica reports of its Raft state to a service's stats request
/// (`docs/PROTOCOL.md` §1.3 `RaftStats`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RaftReport {
    pub role: ShardRole,
    /// The leader's id, if known.
    pub leader: Option<ReplicaId>,
    /// The leader's client address, if known.
    pub leader_addr: Option<String>,
    pub raft: RaftStats,
}

/// How long a report waits for the Raft core to tell the committed index.
const COMMITTED_ASK_TIMEOUT: Duration = Duration::from_millis(100);

/// This replica's Raft state. The newest committed index is not in
/// openraft 0.9's metrics: it is asked of the Raft core, which may be busy
/// (a sync), and is `None` if it does not tell within
/// [`COMMITTED_ASK_TIMEOUT`].
pub async fn report<C: GroupTypes>(raft: &Raft<C>) -> RaftReport {
    let m = raft.metrics().borrow().clone();
    let ask = raft.with_raft_state(|st| st.committed.map(|c| c.index));
    let committed = tokio::time::timeout(COMMITTED_ASK_TIMEOUT, ask)
        .await
        .ok()
        .and_then(Result::ok)
        .flatten();
    let leader_addr = m
        .current_leader
        .and_then(|id| m.membership_config.membership().get_node(&id).cloned())
        .map(|n| n.client_addr);
    RaftReport {
        role: match m.state {
            ServerState::Leader => ShardRole::Leader,
            ServerState::Follower | ServerState::Shutdown => ShardRole::Follower,
            ServerState::Candidate => ShardRole::Candidate,
            ServerState::Learner => ShardRole::Learner,
        },
        leader: m.current_leader,
        leader_addr,
        raft: RaftStats {
            id: m.id,
            term: m.current_term,
            last_log_index: m.last_log_index,
            committed_index: committed,
            applied_index: m.last_applied.map(|l| l.index),
            matched: m
                .replication
                .iter()
                .flat_map(|r| r.iter())
                .map(|(id, l)| ReplicaProgress {
                    replica: *id,
                    matched: l.map(|l| l.index),
                })
                .collect(),
        },
    }
}

/// A replica's view of its group (from openraft's metrics).
pub fn status<C: GroupTypes>(raft: &Raft<C>) -> GroupStatus {
    let m = raft.metrics().borrow().clone();
    let membership = m.membership_config.membership();
    let voters: BTreeSet<ReplicaId> = membership.voter_ids().collect();
    GroupStatus {
        id: m.id,
        role: role_name(m.state).into(),
        term: m.current_term,
        leader: m.current_leader,
        last_log_index: m.last_log_index,
        committed_index: m.last_applied.map(|l| l.index),
        applied_index: m.last_applied.map(|l| l.index),
        snapshot_index: m.snapshot.map(|l| l.index),
        voters: voters.iter().copied().collect(),
        learners: membership.learner_ids().collect(),
        members: membership.nodes().map(|(id, n)| (*id, n.clone())).collect(),
        matched: m
            .replication
            .as_ref()
            .map(|r| r.iter().map(|(id, l)| (*id, l.map(|l| l.index))).collect())
            .unwrap_or_default(),
    }
}

/// Carry out an operator's group command.
pub async fn admin<C: GroupTypes>(raft: &Raft<C>, request: AdminRequest) -> AdminResponse {
    let result = match request {
        AdminRequest::Status => return AdminResponse::Status(status(raft)),
        AdminRequest::ReadIndex => {
            return match read_index(raft, "").await {
                Ok(index) => AdminResponse::ReadIndex(index),
                Err(RaftError::APIError(CheckIsLeaderError::ForwardToLeader(f))) => {
                    AdminResponse::NotLeader {
                        leader: f.leader_node.map(|n| n.raft_addr),
                    }
                }
                Err(e) => AdminResponse::Failed(e.to_string()),
            }
        }
        AdminRequest::Init { members } => raft
            .initialize(members)
            .await
            .map(|_| ())
            .map_err(|e| e.to_string()),
        AdminRequest::AddLearner { id, replica } => match raft.add_learner(id, replica, true).await
        {
            Ok(_) => Ok(()),
            Err(e) => return write_error(e),
        },
        AdminRequest::Leave { id } => return crate::rebuild::leave(raft, id).await,
        AdminRequest::Rejoin { id, replica } => {
            return crate::rebuild::rejoin(raft, id, replica, true).await
        }
        AdminRequest::RejoinAsLearner { id, replica } => {
            return crate::rebuild::rejoin(raft, id, replica, false).await
        }
        AdminRequest::ChangeMembership { voters } => {
            let voters: BTreeSet<ReplicaId> = voters.into_iter().collect();
            match raft.change_membership(voters, false).await {
                Ok(_) => Ok(()),
                Err(e) => return write_error(e),
            }
        }
    };
    match result {
        Ok(()) => AdminResponse::Done,
        Err(e) => AdminResponse::Failed(e),
    }
}

/// Pause between two leadership checks of one read.
const READ_INDEX_RETRY_MS: u64 = 20;

/// A leadership check's failure.
pub type ReadIndexError = RaftError<ReplicaId, CheckIsLeaderError<ReplicaId, Replica>>;

/// Confirm this replica still leads (a read index) and return the index a
/// read must see, trying again while a check only missed its quorum: each
/// check gives the followers one heartbeat interval, which a follower busy
/// syncing a large entry, or a link being dialed again, can miss. The
/// caller bounds the whole wait. `prefix` names the retry counter (none
/// when empty: a check asked by a follower is counted there).
pub async fn read_index<C: GroupTypes>(
    raft: &Raft<C>,
    prefix: &str,
) -> Result<Option<u64>, ReadIndexError> {
    loop {
        match raft.ensure_linearizable().await {
            Ok(index) => return Ok(index.map(|l| l.index)),
            Err(RaftError::APIError(CheckIsLeaderError::QuorumNotEnough(q))) => {
                if !prefix.is_empty() {
                    metrics::counter!(metric_name(prefix, "raft_read_index_retries_total"))
                        .increment(1);
                }
                tracing::debug!(error = %q, "a read index missed its quorum; trying again");
                tokio::time::sleep(Duration::from_millis(READ_INDEX_RETRY_MS)).await;
            }
            Err(e) => return Err(e),
        }
    }
}

/// Why a replica may not serve a read now.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReadRefused {
    /// No leader confirmed a read index within the deadline.
    #[error("no leader confirmed a read index within {ms} ms: {why}")]
    Unavailable { ms: u64, why: String },
}

/// Wait until this replica may serve a linearizable read: it has applied
/// everything committed when the call began, as the leader confirms (on
/// the leader, a read index; on a follower, the leader's read index asked
/// over the replication port, then waiting to apply up to it). Within
/// `deadline`; leadership changes on the way are followed.
pub async fn linearizable<C: GroupTypes>(
    raft: &Raft<C>,
    pool: &std::sync::Arc<LinkPool>,
    prefix: &str,
    deadline: Duration,
) -> Result<(), ReadRefused> {
    let started = tokio::time::Instant::now();
    let mut why = String::from("no leader known");
    while let Some(left) = deadline.checked_sub(started.elapsed()) {
        let m = raft.metrics().borrow().clone();
        let index = if m.state == ServerState::Leader {
            match tokio::time::timeout(left, read_index(raft, prefix)).await {
                Ok(answer) => answer.map_err(|e| e.to_string()),
                Err(_) => break,
            }
        } else {
            let leader = m
                .current_leader
                .and_then(|id| m.membership_config.membership().get_node(&id).cloned());
            match leader {
                Some(node) => ask_read_index(pool, &node.raft_addr, left).await,
                None => Err("no leader known".into()),
            }
        };
        if let Err(e) = &index {
            why.clone_from(e);
        }
        if let Ok(index) = index {
            let Some(left) = deadline.checked_sub(started.elapsed()) else {
                break;
            };
            let applied = raft
                .wait(Some(left))
                .applied_index_at_least(index, "a read index")
                .await;
            if m.state != ServerState::Leader && !prefix.is_empty() {
                let outcome = if applied.is_ok() { "ok" } else { "unavailable" };
                metrics::counter!(metric_name(prefix, "raft_follower_reads_total"), "outcome" => outcome)
                    .increment(1);
            }
            return applied.map(|_| ()).map_err(|e| ReadRefused::Unavailable {
                ms: deadline.as_millis() as u64,
                why: e.to_string(),
            });
        }
        tokio::time::sleep(Duration::from_millis(READ_INDEX_RETRY_MS)).await;
    }
    Err(ReadRefused::Unavailable {
        ms: deadline.as_millis() as u64,
        why,
    })
}

/// The read index of the leader at `addr`, or why it gave none.
async fn ask_read_index(
    pool: &std::sync::Arc<LinkPool>,
    addr: &str,
    left: Duration,
) -> Result<Option<u64>, String> {
    match crate::peer::admin_pooled(pool, addr, AdminRequest::ReadIndex, left).await {
        Ok(AdminResponse::ReadIndex(index)) => Ok(index),
        Ok(other) => Err(format!("the leader at {addr} answered {other:?}")),
        Err(e) => Err(e.to_string()),
    }
}

/// `Done` if this replica leads its group, else `NotLeader` (naming the
/// leader it knows): for a command with nothing left to do.
pub(crate) fn done_if_leader<C: GroupTypes>(raft: &Raft<C>) -> AdminResponse {
    let m = raft.metrics().borrow().clone();
    if m.state == ServerState::Leader {
        return AdminResponse::Done;
    }
    let leader = m
        .current_leader
        .and_then(|id| m.membership_config.membership().get_node(&id).cloned());
    AdminResponse::NotLeader {
        leader: leader.map(|n| n.raft_addr),
    }
}

/// The answer to a command whose membership change or learner failed.
pub(crate) fn write_error(
    e: RaftError<ReplicaId, ClientWriteError<ReplicaId, Replica>>,
) -> AdminResponse {
    match e {
        RaftError::APIError(ClientWriteError::ForwardToLeader(f)) => AdminResponse::NotLeader {
            leader: f.leader_node.map(|n| n.raft_addr),
        },
        other => AdminResponse::Failed(other.to_string()),
    }
}

pub fn role_name(state: ServerState) -> &'static str {
    match state {
        ServerState::Leader => "leader",
        ServerState::Follower => "follower",
        ServerState::Candidate => "candidate",
        ServerState::Learner => "learner",
        ServerState::Shutdown => "shutdown",
    }
}

/// Resolves once the Raft node stopped by itself: a storage error (a log
/// write or sync that failed, a damaged read, a state machine that could
/// not apply) is fatal to it. Such a replica serves nothing: its daemon
/// exits with a failure so that its supervisor starts it again (a log found
/// damaged then is rebuilt, [`crate::rebuild`]). Returns why.
pub async fn stopped_by_itself<C: GroupTypes>(raft: &Raft<C>) -> String {
    let mut metrics = raft.metrics();
    loop {
        if let Err(fatal) = &metrics.borrow_and_update().running_state {
            return fatal.to_string();
        }
        if metrics.changed().await.is_err() {
            return "the Raft node is gone".into();
        }
    }
}

/// A replica that led when it stopped starts as a follower of no one.
///
/// openraft 0.9 restores a leader whose vote was committed as leader at
/// once, in the same term, without a new entry of that term; its read
/// index is then the committed id it saved, which may be older than what
/// it answered before it stopped, and a read would show an older state
/// (found by `msgstore/tests/it/replica_group.rs`). Turning the saved vote for itself
/// back into a candidate's vote (still for itself, in the same term: no
/// promise it made is taken back) makes it a follower; leadership comes
/// back only through an election of a later term, whose leader commits a
/// blank entry before it serves a read.
pub async fn step_down_at_start<C>(
    log: &mut LogStore<C>,
    me: ReplicaId,
) -> Result<(), LogStoreError>
where
    C: GroupTypes,
    C::Entry: serde::Serialize + serde::de::DeserializeOwned + Clone,
{
    let Some(vote) = log.vote() else {
        return Ok(());
    };
    if !vote.committed || vote.leader_id.node_id != me {
        return Ok(());
    }
    let candidate = openraft::Vote::new(vote.leader_id.term, me);
    log.write_vote(&candidate).await?;
    tracing::info!(
        term = vote.leader_id.term,
        "led when it stopped: starts as a follower"
    );
    Ok(())
}

/// Serve the replication port: every authenticated peer on a task of its
/// own. `prefix` is the daemon's metric prefix (`msgstore`), `port_prefix`
/// names the port's link metrics (`msgstore_raft`). `gate` says which
/// Raft RPCs are answered (all but while the replica rebuilds: see
/// [`crate::rebuild`]); the operator's commands always are.
pub async fn accept_peers<C: GroupTypes>(
    raft: Raft<C>,
    listener: TcpListener,
    gate: std::sync::Arc<Gate>,
    (prefix, port_prefix): (&'static str, &'static str),
) {
    let mut listener = SecureListener::new(listener, port_prefix, GateLimits::default());
    loop {
        let link = listener.accept().await;
        tokio::spawn(serve_peer(raft.clone(), link, gate.clone(), prefix));
    }
}

/// "bad replication frame" warnings: at most one per interval (a broken or
/// hostile peer reconnecting would otherwise fill the log).
static BAD_PEER_FRAME_WARNINGS: daemon::SharedLogLimiter =
    daemon::SharedLogLimiter::new(daemon::accept::WARN_INTERVAL);

/// Answer one peer's RPCs, one at a time, until it hangs up.
async fn serve_peer<C: GroupTypes>(
    raft: Raft<C>,
    link: Link,
    gate: std::sync::Arc<Gate>,
    prefix: &'static str,
) {
    let (mut stream, mut wr) = link.into_split();
    let mut buf = BytesMut::new();
    loop {
        let request = match read_frame_or_end::<PeerRequest<C>>(&mut stream, &mut buf).await {
            Ok(Some(r)) => r,
            Ok(None) => return,
            Err(e) => {
                metrics::counter!(metric_name(prefix, "raft_bad_frames_total")).increment(1);
                if let Some(held_back) = BAD_PEER_FRAME_WARNINGS.check() {
                    tracing::warn!(error = %e, held_back, "bad replication frame; closing the link");
                }
                return;
            }
        };
        let replicates = gate.replicates();
        let response = match request {
            PeerRequest::AppendEntries(_) | PeerRequest::InstallSnapshot(_) if !replicates => {
                // Answered as an unreachable replica would be: not at all.
                return;
            }
            PeerRequest::Vote(r) if !gate.votes() => PeerResponse::Vote(Ok(VoteResponse {
                vote: r.vote,
                vote_granted: false,
                last_log_id: None,
            })),
            PeerRequest::AppendEntries(r) => {
                PeerResponse::AppendEntries(raft.append_entries(r).await)
            }
            PeerRequest::Vote(r) => PeerResponse::Vote(raft.vote(r).await),
            PeerRequest::InstallSnapshot(r) => {
                PeerResponse::InstallSnapshot(raft.install_snapshot(r).await)
            }
            PeerRequest::Admin(r) => PeerResponse::Admin(admin(&raft, r).await),
        };
        let mut out = Vec::new();
        if let Err(e) = proto::frame::encode(&response, PEER_FRAME_BODY_BYTES_MAX, &mut out) {
            tracing::error!(error = %e, "replication answer not encodable");
            return;
        }
        if wr.send(&out).await.is_err() {
            return;
        }
    }
}

/// Keep the Raft gauges current.
/// `prefix` is the daemon's (`msgstore`): `msgstore_raft_term` and so on.
pub async fn export_metrics<C: GroupTypes>(raft: Raft<C>, prefix: &'static str) {
    let name = |n: &str| metric_name(prefix, n);
    let mut rx = raft.metrics();
    let mut was_candidate = false;
    loop {
        let m = rx.borrow_and_update().clone();
        metrics::gauge!(name("raft_term")).set(m.current_term as f64);
        let leader = m.state == ServerState::Leader;
        metrics::gauge!(name("raft_is_leader")).set(if leader { 1.0 } else { 0.0 });
        let applied = m.last_applied.map_or(0, |l| l.index);
        metrics::gauge!(name("raft_commit_index")).set(applied as f64);
        let last = m.last_log_index.unwrap_or(0);
        metrics::gauge!(name("raft_last_log_index")).set(last as f64);
        let candidate = m.state == ServerState::Candidate;
        if candidate && !was_candidate {
            metrics::counter!(name("raft_elections_total")).increment(1);
        }
        was_candidate = candidate;
        let lags: BTreeMap<ReplicaId, u64> = m
            .replication
            .iter()
            .flat_map(|r| r.iter())
            .map(|(id, l)| (*id, last.saturating_sub(l.map_or(0, |l| l.index))))
            .collect();
        for (id, lag) in lags {
            metrics::gauge!(name("raft_follower_lag_entries"), "replica" => id.to_string())
                .set(lag as f64);
        }
        if rx.changed().await.is_err() {
            return;
        }
    }
}
