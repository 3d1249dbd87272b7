//! The presence daemon: configuration file and startup of the server
//! thread. The `presence` binary is a thin shell around [`start`]; tests can
//! run a daemon in-process the same way.
//!
//! Presence keeps nothing on disk (a restarted server is refilled by the
//! gateways' syncs), so it has no data directory and no directory lock.

use crate::{
    server::{self, ServerConfig},
    state::Limits,
};
use daemon::config::ConfigError;
use serde::{Deserialize, Serialize};
use std::{net::SocketAddr, path::Path};
use tokio::{net::TcpListener, sync::watch};

/// Address the daemon listens on when neither file nor flag names one.
pub const LISTEN_ADDR_DEFAULT: &str = "127.0.0.1:7300";

/// The daemon's TOML configuration file; see `presence/presence.example.toml`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DaemonConfig {
    /// Address of the presence protocol listener.
    pub listen: SocketAddr,
    /// Address of the Prometheus `/metrics` HTTP listener; none if absent.
    pub metrics_addr: Option<SocketAddr>,
    /// Connections, leases and grace period.
    pub server: ServerConfig,
    /// Table, watcher and batch limits.
    pub limits: Limits,
}

impl Default for DaemonConfig {
    fn default() -> Self {
        Self {
            listen: LISTEN_ADDR_DEFAULT
                .parse()
                .expect("LISTEN_ADDR_DEFAULT is a valid address"),
            metrics_addr: None,
            server: ServerConfig::default(),
            limits: Limits::default(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error(transparent)]
    ConfigFile(#[from] ConfigError),
    #[error("invalid configuration: {0}")]
    Config(String),
    #[error("cannot listen on {addr}: {error}")]
    Listen {
        addr: SocketAddr,
        error: std::io::Error,
    },
    #[error("cannot start the server thread: {0}")]
    Thread(std::io::Error),
    #[error("the server thread died")]
    Died,
}

impl DaemonConfig {
    pub fn load(path: &Path) -> Result<Self, DaemonError> {
        Ok(daemon::config::load_toml(path)?)
    }

    pub fn parse(text: &str) -> Result<Self, String> {
        daemon::config::parse_toml(text)
    }

    pub fn validate(&self) -> Result<(), String> {
        self.server.validate()?;
        self.limits.validate()
    }
}

/// A running daemon.
pub struct Daemon {
    local_addr: SocketAddr,
    shutdown: watch::Sender<bool>,
    done: tokio::sync::oneshot::Receiver<()>,
}

impl Daemon {
    /// The address the presence listener is bound to.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Stop accepting and reading, send what is buffered, stop.
    pub async fn shutdown(mut self) -> Result<(), DaemonError> {
        let _ = self.shutdown.send(true);
        self.stopped().await
    }

    /// Wait until the server thread ends (only [`Daemon::shutdown`] ends it
    /// normally); usable in `select!` next to a signal.
    pub async fn stopped(&mut self) -> Result<(), DaemonError> {
        (&mut self.done).await.map_err(|_| DaemonError::Died)
    }
}

/// Bind the listener and start serving on a thread of its own. Returns once
/// the listener is bound.
pub fn start(config: DaemonConfig) -> Result<Daemon, DaemonError> {
    config.validate().map_err(DaemonError::Config)?;
    crate::metrics::register();
    let listen_error = |error| DaemonError::Listen {
        addr: config.listen,
        error,
    };
    let listener = std::net::TcpListener::bind(config.listen)
        .and_then(|l| l.set_nonblocking(true).map(|()| l))
        .map_err(listen_error)?;
    let local_addr = listener.local_addr().map_err(listen_error)?;
    let (shutdown, shutdown_rx) = watch::channel(false);
    let (done_tx, done) = tokio::sync::oneshot::channel();
    let (server_config, limits) = (config.server, config.limits);
    std::thread::Builder::new()
        .name("presence-core".into())
        .spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build();
            let runtime = match runtime {
                Ok(r) => r,
                Err(e) => return tracing::error!(error = %e, "cannot start the server runtime"),
            };
            let local = tokio::task::LocalSet::new();
            local.block_on(&runtime, async move {
                match TcpListener::from_std(listener) {
                    Ok(listener) => server::run(listener, server_config, limits, shutdown_rx).await,
                    Err(e) => tracing::error!(error = %e, "cannot use the listener"),
                }
            });
            let _ = done_tx.send(());
        })
        .map_err(DaemonError::Thread)?;
    tracing::info!(%local_addr, "presence listening on {local_addr}");
    Ok(Daemon {
        local_addr,
        shutdown,
        done,
    })
}

daemon::impl_service!(Daemon);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn example_config_parses_and_is_valid() {
        let text = include_str!("../presence.example.toml");
        let config = DaemonConfig::parse(text).expect("example config parses");
        config.validate().expect("example config is valid");
        assert_eq!(config.listen, LISTEN_ADDR_DEFAULT.parse().unwrap());
    }

    #[test]
    fn unknown_fields_are_refused_and_bad_values_named() {
        let err = DaemonConfig::parse("bogus = 1\n").unwrap_err();
        assert!(err.contains("bogus"), "{err}");
        let err = DaemonConfig::parse("[limits]\nusers = 1\n").unwrap_err();
        assert!(err.contains("users"), "{err}");
        let mut config = DaemonConfig::default();
        config.limits.batch_users_max = 0;
        assert!(config.validate().unwrap_err().contains("batch_users_max"));
        let mut config = DaemonConfig::default();
        config.server.lease_ms = 1;
        assert!(config.validate().unwrap_err().contains("lease_ms"));
    }
}
