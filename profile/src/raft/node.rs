//! One replica of the profile group, running: the Raft node (`openraft`)
//! over the store, its replication port (peer RPCs and the operator's
//! group commands, `replication::group`), and the metrics. The service
//! sends its writes here ([`Replicated::write_many`]) and asks before each
//! read whether this replica may serve it ([`Replicated::before_read`]).

use super::{
    state_machine::{Shared, StateMachine},
    Batch, TypeConfig,
};
use crate::{
    error::Error,
    notify::Hub,
    store::{
        ops::{now_ms, Outcome, WriteOp},
        Store,
    },
    Result,
};
use openraft::{error::ClientWriteError, error::RaftError, Raft};
use replication::{
    group::{self, RaftConfig},
    log_store::LogStoreConfig,
    peer::{LinkPool, Network},
    rebuild, FsyncPolicy,
};
use std::{path::Path, sync::Arc, time::Duration};
use tokio::{net::TcpListener, task::JoinHandle};

/// The metric prefix of a profile replica (`profile_raft_term`, ...).
const PREFIX: &str = "profile";

/// What the service needs of its replica.
pub struct Replicated {
    pub raft: Raft<TypeConfig>,
    /// Links to the leader for read indexes asked as a follower.
    pool: Arc<LinkPool>,
    write_timeout: Duration,
}

impl Replicated {
    /// Commit `ops` as one entry through the leader; one result per op
    /// (an op's refusal is the same on every replica). `NotLeader` on a
    /// follower, `Unavailable` if not committed within `write_timeout_ms`
    /// (it may still be).
    pub async fn write_many(&self, ops: Vec<WriteOp>) -> Result<Vec<Result<Outcome>>> {
        let batch = Batch {
            now_ms: now_ms(),
            ops,
        };
        let written = tokio::time::timeout(self.write_timeout, self.raft.client_write(batch)).await;
        match written {
            Ok(Ok(response)) => Ok(response
                .data
                .0
                .into_iter()
                .map(|r| r.map_err(Error::Refused))
                .collect()),
            Ok(Err(RaftError::APIError(ClientWriteError::ForwardToLeader(f)))) => {
                Err(Error::NotLeader {
                    leader: f.leader_node.map(|n| n.client_addr),
                })
            }
            Ok(Err(e)) => Err(Error::Unavailable(e.to_string())),
            Err(_) => Err(Error::Unavailable(format!(
                "not committed within {} ms; it may still be",
                self.write_timeout.as_millis()
            ))),
        }
    }

    /// Wait until this replica has applied everything committed before the
    /// call (a read index from the leader), so a read here is never older
    /// than one answered anywhere before it.
    pub async fn before_read(&self) -> Result<()> {
        group::linearizable(&self.raft, &self.pool, PREFIX, self.write_timeout)
            .await
            .map_err(|e| Error::Unavailable(e.to_string()))
    }
}

/// A running replica: the service's handle and the background tasks.
pub struct Replica {
    pub replicated: Arc<Replicated>,
    /// Where the replication port is bound (`config.listen` may ask for
    /// port 0).
    pub raft_addr: std::net::SocketAddr,
    tasks: Vec<JoinHandle<()>>,
}

impl Replica {
    /// Start the replica of the store in `data`: the Raft log in
    /// `data/raft`, snapshots in `data/snapshots`, the replication port on
    /// `config.listen`.
    pub async fn start(
        data: &Path,
        (store, hub): (Arc<Store>, Arc<Hub>),
        config: &RaftConfig,
        map_bytes: u64,
    ) -> Result<Replica> {
        config.validate().map_err(Error::Config)?;
        let mut openraft_config = config.openraft("imserver-profile").map_err(Error::Config)?;
        let listener = TcpListener::bind(config.listen).await?;
        let raft_addr = listener.local_addr()?;
        let log_config = LogStoreConfig {
            fsync: FsyncPolicy::Always,
            segment_bytes_max: config.log_segment_bytes,
            metric_prefix: PREFIX,
            ..LogStoreConfig::default()
        };
        let storage = |e: replication::log_store::LogStoreError| Error::WriteFailed(e.to_string());
        let shared = Shared::new(store, hub, data.join("snapshots"), map_bytes)?;
        // A damaged log is set aside (the store is kept: what it applied
        // is a committed prefix, and openraft starts the new log after it).
        let service = rebuild::Service {
            data,
            state_dirs: &[],
            me: config.id,
            prefix: PREFIX,
        };
        let known = || match shared.applied() {
            Ok(applied) => rebuild::KnownGroup::of(&applied.membership),
            Err(_) => Default::default(),
        };
        let (mut log, marker) = rebuild::open_log::<TypeConfig>(&service, log_config, known)
            .await
            .map_err(storage)?;
        openraft_config.enable_elect = marker.is_none();
        group::step_down_at_start(&mut log, config.id)
            .await
            .map_err(storage)?;
        let raft = Raft::new(
            config.id,
            Arc::new(openraft_config),
            Network::new(PREFIX),
            log,
            StateMachine { shared },
        )
        .await
        .map_err(|e| Error::WriteFailed(format!("raft did not start: {e}")))?;
        let gate = rebuild::Gate::new(marker.as_ref().map(|m| m.phase));
        let mut tasks = vec![
            tokio::spawn(group::accept_peers(
                raft.clone(),
                listener,
                gate.clone(),
                (PREFIX, "profile_raft"),
            )),
            tokio::spawn(group::export_metrics(raft.clone(), PREFIX)),
        ];
        if let Some(marker) = marker {
            let (raft, data) = (raft.clone(), data.to_owned());
            tasks.push(tokio::spawn(rebuild::run(
                raft,
                gate,
                data,
                (config.id, marker),
                PREFIX,
            )));
        }
        let replicated = Arc::new(Replicated {
            raft,
            pool: Arc::default(),
            write_timeout: Duration::from_millis(config.write_timeout_ms),
        });
        Ok(Replica {
            replicated,
            raft_addr,
            tasks,
        })
    }

    /// Stop serving peers and shut Raft down.
    pub async fn shutdown(self) {
        for task in &self.tasks {
            task.abort();
        }
        let _ = self.replicated.raft.shutdown().await;
    }
}
