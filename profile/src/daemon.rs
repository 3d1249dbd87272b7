//! Startup of the profile daemon: lock the data directory, open the
//! service, bind the listener, serve until told to stop. The `profile`
//! binary is a thin shell around [`start`]; tests run it in-process too.

use crate::{config::Config, error::Error, server, service::Service};
use std::{net::SocketAddr, time::Duration};
use tokio::{net::TcpListener, sync::watch, task::JoinHandle};

/// How long shutdown waits for the writer thread to finish its queue.
const WRITER_JOIN_TIMEOUT: Duration = Duration::from_secs(30);

/// A running daemon.
pub struct Daemon {
    local_addr: SocketAddr,
    raft_addr: Option<SocketAddr>,
    shutdown: watch::Sender<bool>,
    task: JoinHandle<()>,
    /// A replica's Raft node (none standalone).
    raft: Option<openraft::Raft<crate::raft::TypeConfig>>,
}

impl Daemon {
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Where a replica's replication port is bound (none standalone).
    pub fn raft_addr(&self) -> Option<SocketAddr> {
        self.raft_addr
    }

    /// Stop accepting, drain connections, let the writer finish, return.
    pub async fn shutdown(self) {
        let _ = self.shutdown.send(true);
        let _ = self.task.await;
    }
}

/// Start serving; returns once the listener is bound. Must be called
/// inside a multi-threaded tokio runtime.
pub async fn start(config: Config) -> Result<Daemon, Error> {
    config.validate().map_err(Error::Config)?;
    crate::metrics::register(config.raft.is_some());
    let lock = daemon::DirLock::acquire(&config.data)?;
    let listener = TcpListener::bind(config.listen).await?;
    let local_addr = listener.local_addr()?;
    let (shutdown, shutdown_rx) = watch::channel(false);
    let (mut raft_addr, mut raft_node) = (None, None);
    let task = match config.raft.clone() {
        None => {
            let (service, writer_thread) = Service::open(&config.data, &config)?;
            tokio::spawn(async move {
                server::run(listener, service, config.server.clone(), shutdown_rx).await;
                // The last Service handle is gone: the writer drains its
                // queue and ends; every commit it made is durable.
                let joined = tokio::task::spawn_blocking(move || writer_thread.join());
                if tokio::time::timeout(WRITER_JOIN_TIMEOUT, joined)
                    .await
                    .is_err()
                {
                    tracing::warn!("the writer thread did not finish in time");
                }
                drop(lock);
            })
        }
        Some(raft) => {
            let (service, replica) = Service::open_replica(&config.data, &config, &raft).await?;
            raft_addr = Some(replica.raft_addr);
            raft_node = Some(replica.replicated.raft.clone());
            tracing::info!(id = raft.id, raft_listen = %replica.raft_addr, "profile replica started");
            tokio::spawn(async move {
                server::run(listener, service, config.server.clone(), shutdown_rx).await;
                // Every entry applied was committed in its own transaction.
                replica.shutdown().await;
                drop(lock);
            })
        }
    };
    tracing::info!(%local_addr, "profile service started");
    Ok(Daemon {
        local_addr,
        raft_addr,
        shutdown,
        task,
        raft: raft_node,
    })
}

impl daemon::Service for Daemon {
    fn local_addr(&self) -> SocketAddr {
        Daemon::local_addr(self)
    }
    /// A standalone profile service only stops when told to; a replica
    /// also when its Raft node stops by itself (a full disk): it serves
    /// nothing then, and exits with a failure.
    async fn stopped(&mut self) -> anyhow::Result<()> {
        match &self.raft {
            Some(raft) => {
                let why = replication::group::stopped_by_itself(raft).await;
                tracing::error!(error = %why, "the Raft node stopped by itself");
                anyhow::bail!("the Raft node stopped: {why}")
            }
            None => std::future::pending().await,
        }
    }
    async fn shutdown(self) -> anyhow::Result<()> {
        Daemon::shutdown(self).await;
        Ok(())
    }
}
