//! Starting each component of the embedded cluster as its own daemon
//! would, with its failure told apart: a listen address already in use
//! is recorded as such (see [`EmbeddedError::listen`]), from the error's
//! kind, never from its text.

use crate::{map, Component, EmbeddedConfig, EmbeddedError};
use gateway::{config::GatewayConfig, daemon::StartError};
use replication::{group::RaftConfig, Replica};
use std::{collections::BTreeMap, net::SocketAddr};

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
    start_profile(c).await
}

/// The profile service as a group of `config.replicas` replicas pushed
/// onto `started` (data in `profile/rR`), formed on its first start.
pub(crate) async fn profile_group(
    config: &EmbeddedConfig,
    started: &mut Vec<profile::daemon::Daemon>,
) -> Result<(), EmbeddedError> {
    let failed = |e: &dyn std::fmt::Display| EmbeddedError::new(Component::Profile, e);
    let mut members = BTreeMap::new();
    for r in 1..=config.replicas {
        let (client, raft) = replica_addrs(config.profile, r).map_err(|e| failed(&e))?;
        let c = profile::Config {
            listen: client,
            data: config.data.join(format!("profile/r{r}")),
            raft: Some(raft_config(r, raft)),
            ..Default::default()
        };
        let daemon = start_profile(c).await?;
        let raft = daemon.raft_addr().unwrap_or(raft);
        members.insert(r as u64, member(daemon.local_addr(), raft));
        started.push(daemon);
    }
    form_group(members).await.map_err(|e| failed(&e))
}

async fn start_profile(c: profile::Config) -> Result<profile::daemon::Daemon, EmbeddedError> {
    let listen = c.listen;
    profile::daemon::start(c).await.map_err(|e| match &e {
        // The profile service reports a failed bind as plain I/O; only a
        // bind fails with `AddrInUse`.
        profile::Error::Io(error) => EmbeddedError::listen(Component::Profile, listen, error, &e),
        _ => EmbeddedError::new(Component::Profile, &e),
    })
}

/// Replica `r`'s Raft settings: the defaults, on `listen`.
fn raft_config(r: usize, listen: SocketAddr) -> RaftConfig {
    RaftConfig {
        id: r as u64,
        listen,
        ..RaftConfig::default()
    }
}

/// A group member as the group's membership names it.
fn member(client: SocketAddr, raft: SocketAddr) -> Replica {
    Replica {
        raft_addr: raft.to_string(),
        client_addr: client.to_string(),
    }
}

/// Shard `n` (from 1), its data in `shardN`.
pub(crate) async fn shard(
    config: &EmbeddedConfig,
    n: usize,
    listen: SocketAddr,
) -> Result<msgstore::daemon::Daemon, EmbeddedError> {
    let data = config.data.join(format!("shard{n}"));
    start_shard(n, shard_config(config, listen, data)).await
}

/// Shard `n` as a group of `config.replicas` replicas pushed onto
/// `started` (data in `shardN/rR`), formed into a group on its first
/// start.
pub(crate) async fn shard_group(
    config: &EmbeddedConfig,
    n: usize,
    listen: SocketAddr,
    started: &mut Vec<msgstore::daemon::Daemon>,
) -> Result<(), EmbeddedError> {
    let failed = |e: &dyn std::fmt::Display| EmbeddedError::new(Component::Shard(n), e);
    let mut members = BTreeMap::new();
    for r in 1..=config.replicas {
        let (client, raft) = replica_addrs(listen, r).map_err(|e| failed(&e))?;
        let data = config.data.join(format!("shard{n}/r{r}"));
        let mut c = shard_config(config, client, data);
        c.raft = Some(raft_config(r, raft));
        let daemon = start_shard(n, c).await?;
        let raft = daemon.raft_addr().unwrap_or(raft);
        members.insert(r as u64, member(daemon.local_addr(), raft));
        started.push(daemon);
    }
    form_group(members).await.map_err(|e| failed(&e))
}

/// Replica `r`'s client and replication addresses: port 0 for
/// both when `first` asks for any free port (each daemon binds its own
/// and says which it got).
fn replica_addrs(first: SocketAddr, r: usize) -> std::io::Result<(SocketAddr, SocketAddr)> {
    if first.port() == 0 {
        return Ok((first, first));
    }
    let port = |offset: usize| {
        u16::try_from(usize::from(first.port()) + offset)
            .map(|p| SocketAddr::new(first.ip(), p))
            .map_err(|_| std::io::Error::other("replica ports run past 65535"))
    };
    Ok((port(10 * (r - 1))?, port(10 * (r - 1) + 1000)?))
}

/// Form the group unless it was formed on an earlier start.
async fn form_group(members: BTreeMap<u64, Replica>) -> Result<(), replication::peer::LinkError> {
    use replication::peer::{admin, AdminRequest, AdminResponse};
    let first = members
        .values()
        .next()
        .map(|r| r.raft_addr.clone())
        .unwrap_or_default();
    let deadline = std::time::Duration::from_secs(10);
    if let AdminResponse::Status(s) = admin(&first, AdminRequest::Status, deadline).await? {
        if !s.voters.is_empty() {
            return Ok(());
        }
    }
    match admin(&first, AdminRequest::Init { members }, deadline).await? {
        AdminResponse::Done => Ok(()),
        other => {
            tracing::warn!(answer = ?other, "forming a replica group");
            Ok(())
        }
    }
}

fn shard_config(
    config: &EmbeddedConfig,
    listen: SocketAddr,
    data: std::path::PathBuf,
) -> msgstore::daemon::DaemonConfig {
    let mut c = msgstore::daemon::DaemonConfig {
        listen,
        data: Some(data),
        ..Default::default()
    };
    c.engine.bucket_dirs = config.bucket_fanout;
    c.engine.bucket_files = config.bucket_fanout;
    // The shards share this process's map-count limit.
    let processes = config.shards.len() * config.replicas.max(1);
    c.engine.open_maps_max = Some(c.engine.shared_open_maps_max(processes));
    c
}

async fn start_shard(
    n: usize,
    c: msgstore::daemon::DaemonConfig,
) -> Result<msgstore::daemon::Daemon, EmbeddedError> {
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
