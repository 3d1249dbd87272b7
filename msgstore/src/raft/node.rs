//! One replica of a shard group, running: the Raft node (`openraft`), its
//! replication port (peer RPCs and the operator's group commands), the
//! shard protocol port, the engine's time-driven work and the metrics.

use super::{
    proposer::Proposer,
    service,
    state_machine::{Shared, StateMachine},
    ReplicaId, TypeConfig,
};
use crate::{server::ServerConfig, EngineConfig, Error};
use daemon::secure::{GateLimits, Link, SecureListener};
use openraft::Raft;
use proto::shard::{RequestBody, ResponseBody, ShardErrorCode};
pub use replication::group::RaftConfig;
use replication::{group, log_store::LogStoreConfig, peer::Network, rebuild};
use std::{
    path::Path,
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc,
    },
    time::Duration,
};
use tokio::{net::TcpListener, sync::watch};

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
                let report = replication::group::report(&self.raft).await;
                stats.role = report.role;
                stats.leader = report.leader;
                stats.raft = Some(report.raft);
                ResponseBody::Stats(stats)
            }
            other => other,
        }
    }
}

/// Start a replica: open the log and the engine in `data` (`data/raft`,
/// `data/engine`, `data/snapshots`), start Raft, serve both listeners
/// (the shard protocol's, the replication port's). The
/// node serves until `stop` turns true; then it shuts Raft down and
/// checkpoints the engine.
pub async fn run(
    data: &Path,
    (engine, server, raft): (EngineConfig, ServerConfig, RaftConfig),
    (client_listener, raft_listener): (TcpListener, TcpListener),
    mut stop: watch::Receiver<bool>,
    opened: tokio::sync::oneshot::Sender<Result<(), String>>,
) -> Result<(), Error> {
    let started = start(data, (engine, server, raft), stop.clone()).await;
    let (node, rebuilding) = match started {
        Ok(x) => {
            let _ = opened.send(Ok(()));
            x
        }
        Err(e) => {
            let _ = opened.send(Err(e.to_string()));
            return Err(e);
        }
    };
    let metrics = tokio::spawn(group::export_metrics(node.raft.clone(), "msgstore"));
    // The ticker stops with the node, whether asked to or not.
    let (stop_ticking, ticking_stopped) = watch::channel(false);
    let ticker = std::thread::spawn({
        let shared = node.shared.clone();
        move || tick_engine(&shared, &ticking_stopped)
    });
    let gate = rebuild::Gate::new(rebuilding.as_ref().map(|m| m.phase));
    let peers = tokio::spawn(group::accept_peers(
        node.raft.clone(),
        raft_listener,
        gate.clone(),
        ("msgstore", "msgstore_raft"),
    ));
    let rebuilder = rebuilding.map(|marker| {
        let (raft, data) = (node.raft.clone(), data.to_owned());
        tokio::spawn(rebuild::run(
            raft,
            gate,
            data,
            (node.id, marker),
            "msgstore",
        ))
    });
    let connections = Arc::new(AtomicUsize::new(0));
    let mut acceptor = SecureListener::new(client_listener, "msgstore", GateLimits::default());
    let mut fatal = None;
    loop {
        tokio::select! {
            link = acceptor.accept() => admit(&node, link, &connections),
            _ = stop.wait_for(|s| *s) => break,
            why = group::stopped_by_itself(&node.raft) => {
                tracing::error!(error = %why, "the Raft node stopped by itself; the replica exits");
                fatal = Some(why);
                break;
            }
        }
    }
    tracing::info!("replica stopping");
    peers.abort();
    if let Some(rebuilder) = rebuilder {
        rebuilder.abort();
    }
    metrics.abort();
    let _ = node.raft.shutdown().await;
    let _ = stop_ticking.send(true);
    let _ = tokio::task::spawn_blocking(move || ticker.join()).await;
    let closed = node.shared.close();
    match fatal {
        Some(why) => Err(Error::Storage(format!("the Raft node stopped: {why}"))),
        None => closed,
    }
}

async fn start(
    data: &Path,
    (engine, server, raft): (EngineConfig, ServerConfig, RaftConfig),
    stop: watch::Receiver<bool>,
) -> Result<(Arc<Node>, Rebuild), Error> {
    raft.validate().map_err(Error::Config)?;
    let mut openraft_config = raft.openraft("imserver-shard").map_err(Error::Config)?;
    let storage = |e: replication::log_store::LogStoreError| Error::Storage(e.to_string());
    let log_config = LogStoreConfig {
        fsync: engine.fsync,
        segment_bytes_max: raft.log_segment_bytes,
        ..LogStoreConfig::default()
    };
    let service = rebuild::Service {
        data,
        state_dirs: &["engine", "snapshots"],
        me: raft.id,
        prefix: "msgstore",
    };
    let known = || applied_group(data, &engine);
    let (mut log, marker) = rebuild::open_log::<TypeConfig>(&service, log_config, known)
        .await
        .map_err(storage)?;
    // A rebuilding replica stands for no election until it is a voter again.
    openraft_config.enable_elect = marker.is_none();
    group::step_down_at_start(&mut log, raft.id)
        .await
        .map_err(storage)?;
    let data = data.to_owned();
    let shared = tokio::task::spawn_blocking(move || Shared::open(&data, engine))
        .await
        .map_err(|e| Error::Storage(e.to_string()))??;
    let sm = StateMachine {
        shared: shared.clone(),
    };
    let handle = Raft::new(
        raft.id,
        Arc::new(openraft_config),
        Network::new("msgstore"),
        log,
        sm,
    )
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
    Ok((node, marker))
}

/// A rebuild to carry on, if the log was found damaged (now or before).
type Rebuild = Option<rebuild::Marker>;

/// The group as the engine in `data` last applied it (where a replica
/// whose log is damaged looks for its peers); empty if the engine does not
/// open.
fn applied_group(data: &Path, engine: &EngineConfig) -> rebuild::KnownGroup {
    match Shared::open(data, engine.clone()) {
        Ok(shared) => {
            let known = rebuild::KnownGroup::of(&shared.applied().membership);
            let _ = shared.close();
            known
        }
        Err(e) => {
            tracing::error!(error = %e, "the engine does not open either: no peers known");
            rebuild::KnownGroup::default()
        }
    }
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
