//! Starting each component of the embedded cluster as its own daemon
//! would, with its failure told apart: a listen address already in use
//! is recorded as such (see [`EmbeddedError::listen`]), from the error's
//! kind, never from its text.

use crate::{map, Component, EmbeddedConfig, EmbeddedError};
use gateway::{config::GatewayConfig, daemon::StartError};
use std::net::SocketAddr;

pub(crate) fn presence(config: &EmbeddedConfig) -> Result<presence::daemon::Daemon, EmbeddedError> {
    let mut c = presence::daemon::DaemonConfig {
        listen: config.presence,
        ..Default::default()
    };
    c.server.grace_ms = config.presence_grace_ms;
    presence::daemon::start(c).map_err(|e| match &e {
        presence::daemon::DaemonError::Listen { addr, error } => {
            EmbeddedError::listen(Component::Presence, *addr, error, &e)
        }
        _ => EmbeddedError::new(Component::Presence, &e),
    })
}

pub(crate) async fn profile(
    config: &EmbeddedConfig,
) -> Result<profile::daemon::Daemon, EmbeddedError> {
    let c = profile::Config {
        listen: config.profile,
        data: config.data.join("profile"),
        ..Default::default()
    };
    profile::daemon::start(c).await.map_err(|e| match &e {
        // The profile service reports a failed bind as plain I/O; only a
        // bind fails with `AddrInUse`.
        profile::Error::Io(error) => {
            EmbeddedError::listen(Component::Profile, config.profile, error, &e)
        }
        _ => EmbeddedError::new(Component::Profile, &e),
    })
}

/// Shard `n` (from 1), its data in `shardN`.
pub(crate) async fn shard(
    config: &EmbeddedConfig,
    n: usize,
    listen: SocketAddr,
) -> Result<msgstore::daemon::Daemon, EmbeddedError> {
    let mut c = msgstore::daemon::DaemonConfig {
        listen,
        data: Some(config.data.join(format!("shard{n}"))),
        ..Default::default()
    };
    c.engine.bucket_dirs = config.bucket_fanout;
    c.engine.bucket_files = config.bucket_fanout;
    // The shards share this process's map-count limit.
    c.engine.open_maps_max = Some(c.engine.shared_open_maps_max(config.shards.len()));
    msgstore::daemon::start(c).await.map_err(|e| match &e {
        msgstore::daemon::DaemonError::Listen { addr, error } => {
            EmbeddedError::listen(Component::Shard(n), *addr, error, &e)
        }
        _ => EmbeddedError::new(Component::Shard(n), &e),
    })
}

/// The gateway on UDP `listen`, routing by the map written for it.
pub(crate) async fn gateway(
    config: &EmbeddedConfig,
    listen: SocketAddr,
) -> Result<gateway::daemon::Running, EmbeddedError> {
    let c = GatewayConfig {
        listen,
        peer_listen: config.gateway_peer,
        cluster: map::path(&config.data),
        data: config.data.join("gateway"),
        ..GatewayConfig::default()
    };
    gateway::daemon::start(c).await.map_err(|e| match &e {
        StartError::Listen { addr, error } => {
            EmbeddedError::listen(Component::Gateway, *addr, error, &e)
        }
        StartError::PeerListen { addr, error } => {
            EmbeddedError::listen(Component::GatewayPeer, *addr, error, &e)
        }
        _ => EmbeddedError::new(Component::Gateway, &e),
    })
}
