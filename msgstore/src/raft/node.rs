//! One replica of a shard group, running: the Raft node (`openraft`), its
//! replication port (peer RPCs and the operator's group commands), the
//! shard protocol port, the engine's time-driven work and the metrics.

use super::{
    log_store::{LogStore, LogStoreConfig},
    network::{
        read_frame_or_end, AdminRequest, AdminResponse, GroupStatus, Network, PeerRequest,
        PeerResponse, PEER_FRAME_BODY_BYTES_MAX,
    },
    proposer::Proposer,
    service,
    state_machine::{Shared, StateMachine},
    Replica, ReplicaId, TypeConfig,
};
use crate::{server::ServerConfig, EngineConfig, Error};
use bytes::BytesMut;
use daemon::secure::{GateLimits, Link, SecureListener};
use openraft::{
    error::ClientWriteError, error::RaftError, Raft, RaftMetrics, ServerState, SnapshotPolicy,
};
use proto::shard::{
    RaftStats, ReplicaProgress, RequestBody, ResponseBody, ShardErrorCode, ShardRole,
};
use serde::{Deserialize, Serialize};
use std::{
    collections::{BTreeMap, BTreeSet},
    net::SocketAddr,
    path::Path,
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc,
    },
    time::Duration,
};
use tokio::{net::TcpListener, sync::watch};

/// The `[raft]` table of the daemon's config: present, the shard runs as
/// a replica of a group.
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
    /// A snapshot (a checkpoint exported) is built after this many log
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

    fn openraft(&self) -> Result<openraft::Config, String> {
        openraft::Config {
            cluster_name: "imserver-shard".into(),
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

/// A running replica, shared by its tasks.
pub struct Node {
    pub raft: Raft<TypeConfig>,
    /// Packs the connections' writes into entries (leader only).
    pub(crate) proposer: Proposer,
    pub shared: Arc<Shared>,
    pub id: ReplicaId,
    config: RaftConfig,
    server: ServerConfig,
    stop: watch::Receiver<bool>,
}

impl Node {
    pub(crate) fn frame_body_bytes_max(&self) -> usize {
        self.server.frame_body_bytes_max
    }

    pub(crate) fn write_timeout(&self) -> Duration {
        Duration::from_millis(self.config.write_timeout_ms)
    }

    /// Resolves once the node is stopping.
    pub(crate) async fn stopping(&self) {
        let mut stop = self.stop.clone();
        let _ = stop.wait_for(|s| *s).await;
    }

    /// The engine holds more than `wal_bytes_max` not yet checkpointed:
    /// the leader proposes no more writes until checkpoints catch up.
    pub(crate) fn overloaded(&self) -> bool {
        self.shared.overloaded()
    }

    /// `Ping` and `Stats`: this replica's own state (`Stats` with its role,
    /// the leader it knows and its Raft state).
    pub(crate) async fn answer_locally(&self, body: RequestBody) -> ResponseBody {
        let answer = match self.shared.engine().as_mut() {
            Some(engine) => engine.respond(body),
            None => service::error(
                ShardErrorCode::Unavailable,
                "the replica is installing a snapshot".into(),
            ),
        };
        match answer {
            ResponseBody::Stats(mut stats) => {
                let m = self.raft.metrics().borrow().clone();
                stats.role = shard_role(m.state);
                stats.leader = m.current_leader;
                stats.raft = Some(raft_stats(&m, self.committed_index().await));
                ResponseBody::Stats(stats)
            }
            other => other,
        }
    }

    /// The newest committed index this replica knows: openraft 0.9's
    /// metrics do not carry it, so it is asked of the Raft core, which
    /// may be busy (a sync): `None` if it does not tell within
    /// [`COMMITTED_ASK_TIMEOUT`].
    async fn committed_index(&self) -> Option<u64> {
        let ask = self
            .raft
            .with_raft_state(|st| st.committed.map(|c| c.index));
        tokio::time::timeout(COMMITTED_ASK_TIMEOUT, ask)
            .await
            .ok()?
            .ok()?
    }

    /// This replica's view of the group.
    pub fn status(&self) -> GroupStatus {
        let m = self.raft.metrics().borrow().clone();
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

    async fn admin(&self, request: AdminRequest) -> AdminResponse {
        let result = match request {
            AdminRequest::Status => return AdminResponse::Status(self.status()),
            AdminRequest::Init { members } => self
                .raft
                .initialize(members)
                .await
                .map(|_| ())
                .map_err(|e| e.to_string()),
            AdminRequest::AddLearner { id, replica } => {
                match self.raft.add_learner(id, replica, true).await {
                    Ok(_) => Ok(()),
                    Err(e) => return self.write_error(e),
                }
            }
            AdminRequest::ChangeMembership { voters } => {
                let voters: BTreeSet<ReplicaId> = voters.into_iter().collect();
                match self.raft.change_membership(voters, false).await {
                    Ok(_) => Ok(()),
                    Err(e) => return self.write_error(e),
                }
            }
        };
        match result {
            Ok(()) => AdminResponse::Done,
            Err(e) => AdminResponse::Failed(e),
        }
    }

    fn write_error(
        &self,
        e: RaftError<ReplicaId, ClientWriteError<ReplicaId, Replica>>,
    ) -> AdminResponse {
        match e {
            RaftError::APIError(ClientWriteError::ForwardToLeader(f)) => AdminResponse::NotLeader {
                leader: f.leader_node.map(|n| n.raft_addr),
            },
            other => AdminResponse::Failed(other.to_string()),
        }
    }
}

/// How long a `Stats` answer waits for the Raft core to tell the
/// committed index.
const COMMITTED_ASK_TIMEOUT: Duration = Duration::from_millis(100);

/// What `Stats` reports of Raft (`docs/PROTOCOL.md` §1.3, `RaftStats`).
fn raft_stats(m: &RaftMetrics<ReplicaId, Replica>, committed: Option<u64>) -> RaftStats {
    RaftStats {
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
    }
}

fn shard_role(state: ServerState) -> ShardRole {
    match state {
        ServerState::Leader => ShardRole::Leader,
        ServerState::Follower | ServerState::Shutdown => ShardRole::Follower,
        ServerState::Candidate => ShardRole::Candidate,
        ServerState::Learner => ShardRole::Learner,
    }
}

fn role_name(state: ServerState) -> &'static str {
    match state {
        ServerState::Leader => "leader",
        ServerState::Follower => "follower",
        ServerState::Candidate => "candidate",
        ServerState::Learner => "learner",
        ServerState::Shutdown => "shutdown",
    }
}

/// Start a replica: open the log and the engine in `data` (`data/raft`,
/// `data/engine`, `data/snapshots`), start Raft and both listeners. The
/// node serves until `stop` turns true; then it shuts Raft down and
/// checkpoints the engine.
pub async fn run(
    data: &Path,
    (engine, server, raft): (EngineConfig, ServerConfig, RaftConfig),
    client_listener: TcpListener,
    mut stop: watch::Receiver<bool>,
    opened: tokio::sync::oneshot::Sender<Result<(), String>>,
) -> Result<(), Error> {
    let started = start(data, (engine, server, raft), stop.clone()).await;
    let (node, raft_listener) = match started {
        Ok(x) => {
            let _ = opened.send(Ok(()));
            x
        }
        Err(e) => {
            let _ = opened.send(Err(e.to_string()));
            return Err(e);
        }
    };
    let metrics = tokio::spawn(export_metrics(node.clone()));
    let ticker = std::thread::spawn({
        let (shared, stop) = (node.shared.clone(), stop.clone());
        move || tick_engine(&shared, &stop)
    });
    let peers = tokio::spawn(accept_peers(node.clone(), raft_listener));
    let connections = Arc::new(AtomicUsize::new(0));
    let mut acceptor = SecureListener::new(client_listener, "msgstore", GateLimits::default());
    loop {
        tokio::select! {
            link = acceptor.accept() => admit(&node, link, &connections),
            _ = stop.wait_for(|s| *s) => break,
        }
    }
    tracing::info!("replica stopping");
    peers.abort();
    metrics.abort();
    let _ = node.raft.shutdown().await;
    let _ = tokio::task::spawn_blocking(move || ticker.join()).await;
    node.shared.close()
}

async fn start(
    data: &Path,
    (engine, server, raft): (EngineConfig, ServerConfig, RaftConfig),
    stop: watch::Receiver<bool>,
) -> Result<(Arc<Node>, TcpListener), Error> {
    raft.validate().map_err(Error::Config)?;
    let openraft_config = Arc::new(raft.openraft().map_err(Error::Config)?);
    let raft_listener = TcpListener::bind(raft.listen).await?;
    let log = LogStore::<TypeConfig>::open(
        &data.join("raft"),
        LogStoreConfig {
            fsync: engine.fsync,
            segment_bytes_max: raft.log_segment_bytes,
            ..LogStoreConfig::default()
        },
    )
    .map_err(|e| Error::Storage(e.to_string()))?;
    let mut log = log;
    step_down_at_start(&mut log, raft.id).await?;
    let data = data.to_owned();
    let shared = tokio::task::spawn_blocking(move || Shared::open(&data, engine))
        .await
        .map_err(|e| Error::Storage(e.to_string()))??;
    let sm = StateMachine {
        shared: shared.clone(),
    };
    let handle = Raft::new(raft.id, openraft_config, Network::default(), log, sm)
        .await
        .map_err(|e| Error::Storage(format!("raft did not start: {e}")))?;
    let proposer = Proposer::start(handle.clone(), Duration::from_millis(raft.write_timeout_ms));
    let node = Arc::new(Node {
        raft: handle,
        proposer,
        shared,
        id: raft.id,
        config: raft,
        server,
        stop,
    });
    Ok((node, raft_listener))
}

/// A replica that led when it stopped starts as a follower of no one.
///
/// openraft 0.9 restores a leader whose vote was committed as leader at
/// once, in the same term, without a new entry of that term; its read
/// index is then the committed id it saved, which may be older than what
/// it answered before it stopped, and a read would show an older state
/// (found by `tests/replica_group.rs`). Turning the saved vote for itself
/// back into a candidate's vote (still for itself, in the same term: no
/// promise it made is taken back) makes it a follower; leadership comes
/// back only through an election of a later term, whose leader commits a
/// blank entry before it serves a read.
async fn step_down_at_start(log: &mut LogStore<TypeConfig>, me: ReplicaId) -> Result<(), Error> {
    let Some(vote) = log.vote() else {
        return Ok(());
    };
    if !vote.committed || vote.leader_id.node_id != me {
        return Ok(());
    }
    let candidate = openraft::Vote::new(vote.leader_id.term, me);
    log.write_vote(&candidate)
        .await
        .map_err(|e| Error::Storage(e.to_string()))?;
    tracing::info!(
        term = vote.leader_id.term,
        "led when it stopped: starts as a follower"
    );
    Ok(())
}

fn admit(node: &Arc<Node>, link: Link, connections: &Arc<AtomicUsize>) {
    if connections.load(Ordering::Relaxed) >= node.server.connections_max {
        metrics::counter!("msgstore_connections_rejected_total").increment(1);
        return;
    }
    connections.fetch_add(1, Ordering::Relaxed);
    let (node, connections) = (node.clone(), connections.clone());
    tokio::spawn(async move {
        service::serve(node, link).await;
        connections.fetch_sub(1, Ordering::Relaxed);
    });
}

/// The engine's time-driven work (checkpoints), on its own thread: a
/// checkpoint merge may wait on disk.
fn tick_engine(shared: &Shared, stop: &watch::Receiver<bool>) {
    while !*stop.borrow() {
        let wake = match shared.engine().as_mut() {
            Some(engine) => {
                engine.tick();
                shared.note_load(engine);
                engine.next_wakeup()
            }
            None => Duration::from_millis(10),
        };
        std::thread::sleep(wake.min(Duration::from_millis(50)));
    }
}

async fn accept_peers(node: Arc<Node>, listener: TcpListener) {
    let mut listener = SecureListener::new(listener, "msgstore_raft", GateLimits::default());
    loop {
        let link = listener.accept().await;
        tokio::spawn(serve_peer(node.clone(), link));
    }
}

/// "bad replication frame" warnings: at most one per interval (a broken or
/// hostile peer reconnecting would otherwise fill the log).
static BAD_PEER_FRAME_WARNINGS: daemon::SharedLogLimiter =
    daemon::SharedLogLimiter::new(daemon::accept::WARN_INTERVAL);

/// Answer one peer's RPCs, one at a time, until it hangs up.
async fn serve_peer(node: Arc<Node>, link: Link) {
    let (mut stream, mut wr) = link.into_split();
    let mut buf = BytesMut::new();
    loop {
        let request = match read_frame_or_end::<PeerRequest>(&mut stream, &mut buf).await {
            Ok(Some(r)) => r,
            Ok(None) => return,
            Err(e) => {
                if let Some(held_back) = BAD_PEER_FRAME_WARNINGS.check() {
                    tracing::warn!(error = %e, held_back, "bad replication frame; closing the link");
                }
                return;
            }
        };
        let response = match request {
            PeerRequest::AppendEntries(r) => {
                PeerResponse::AppendEntries(node.raft.append_entries(r).await)
            }
            PeerRequest::Vote(r) => PeerResponse::Vote(node.raft.vote(r).await),
            PeerRequest::InstallSnapshot(r) => {
                PeerResponse::InstallSnapshot(node.raft.install_snapshot(r).await)
            }
            PeerRequest::Admin(r) => PeerResponse::Admin(node.admin(r).await),
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
async fn export_metrics(node: Arc<Node>) {
    let mut rx = node.raft.metrics();
    let mut was_candidate = false;
    loop {
        let m = rx.borrow_and_update().clone();
        metrics::gauge!("msgstore_raft_term").set(m.current_term as f64);
        let leader = m.state == ServerState::Leader;
        metrics::gauge!("msgstore_raft_is_leader").set(if leader { 1.0 } else { 0.0 });
        let applied = m.last_applied.map_or(0, |l| l.index);
        metrics::gauge!("msgstore_raft_commit_index").set(applied as f64);
        let last = m.last_log_index.unwrap_or(0);
        metrics::gauge!("msgstore_raft_last_log_index").set(last as f64);
        let candidate = m.state == ServerState::Candidate;
        if candidate && !was_candidate {
            metrics::counter!("msgstore_raft_elections_total").increment(1);
        }
        was_candidate = candidate;
        let lags: BTreeMap<ReplicaId, u64> = m
            .replication
            .iter()
            .flat_map(|r| r.iter())
            .map(|(id, l)| (*id, last.saturating_sub(l.map_or(0, |l| l.index))))
            .collect();
        for (id, lag) in lags {
            metrics::gauge!("msgstore_raft_follower_lag_entries", "replica" => id.to_string())
                .set(lag as f64);
        }
        if rx.changed().await.is_err() {
            return;
        }
    }
}
