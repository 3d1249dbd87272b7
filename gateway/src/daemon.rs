//! Starting and stopping a gateway: keys, the cluster map (the newest of
//! the file, the saved one and the shards', see [`crate::map_update`]),
//! connections to presence, profile and the shards, the UDP socket, the
//! event loop and the peer listener.

use crate::{
    config::GatewayConfig,
    driver::Driver,
    keys::{self, KeyError},
    map_update::{self, MapKeeper},
    resume::TokenKeys,
    services::Services,
    shards::Shards,
};
use proto::{
    cluster::{ClusterMap, ClusterMapError},
    session::{crypto, ServerConfig, ServerEndpoint, SessionConfig},
};
use rand::RngCore;
use std::{net::SocketAddr, sync::Arc, time::Duration};
use tokio::sync::{mpsc, oneshot};

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("cannot read the cluster map {path}: {error}")]
    ClusterRead { path: String, error: std::io::Error },
    #[error("bad cluster map: {0}")]
    Cluster(#[from] ClusterMapError),
    #[error(transparent)]
    SavedMap(#[from] crate::map_update::MapFileError),
    #[error(transparent)]
    Keys(#[from] KeyError),
    #[error("cannot reach presence at {addr}: {error}")]
    Presence { addr: String, error: String },
    #[error("cannot reach the profile service at {addr}: {error}")]
    Profile { addr: String, error: String },
    #[error("cannot listen for peer gateways on {addr}: {error}")]
    PeerListen {
        addr: SocketAddr,
        error: std::io::Error,
    },
    #[error("cannot listen on {addr}: {error}")]
    Listen {
        addr: SocketAddr,
        error: std::io::Error,
    },
}

pub struct Running {
    local_addr: SocketAddr,
    peer_addr: SocketAddr,
    peers_task: tokio::task::JoinHandle<()>,
    public_key: [u8; 32],
    stop: Option<oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<std::io::Result<()>>,
}

impl Running {
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Where other gateways forward messages to.
    pub fn peer_addr(&self) -> SocketAddr {
        self.peer_addr
    }

    pub fn public_key(&self) -> [u8; 32] {
        self.public_key
    }

    /// Close every session, tell presence, and stop.
    pub async fn shutdown(mut self) -> std::io::Result<()> {
        self.peers_task.abort();
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        (&mut self.task)
            .await
            .unwrap_or_else(|e| Err(std::io::Error::other(e)))
    }

    /// Resolves if the loop ends by itself (a socket error).
    pub async fn stopped(&mut self) -> std::io::Result<()> {
        (&mut self.task)
            .await
            .unwrap_or_else(|e| Err(std::io::Error::other(e)))
    }
}

pub fn read_cluster_map(config: &GatewayConfig) -> Result<ClusterMap, StartError> {
    let text =
        std::fs::read_to_string(&config.cluster).map_err(|error| StartError::ClusterRead {
            path: config.cluster.display().to_string(),
            error,
        })?;
    Ok(ClusterMap::from_toml(&text)?)
}

/// The session endpoint's settings. `reset_key`: this gateway's RESET key
/// (`crypto::reset_key` of its `reset.key` secret and its UDP address).
fn endpoint_config(config: &GatewayConfig, reset_key: [u8; 32]) -> ServerConfig {
    ServerConfig {
        session: SessionConfig {
            idle_timeout: Duration::from_secs(config.timers.idle_timeout_s as u64),
            ..SessionConfig::default()
        },
        sessions_max: config.limits.sessions_max,
        cookie_mode: config.limits.cookie_mode(),
        handshakes_per_source_per_s: config.limits.handshakes_per_ip_per_s,
        reset_key: Some(reset_key),
        ..ServerConfig::default()
    }
}

pub async fn start(config: GatewayConfig) -> Result<Running, StartError> {
    crate::metrics::register();
    let keys::GatewayKeys {
        keypair,
        token: token_key,
        reset_secret,
    } = keys::load_dir(&config.data)?;
    let discovery = Duration::from_millis(config.timers.map_discovery_timeout_ms);
    let map =
        map_update::choose_at_start(read_cluster_map(&config)?, &config.data, discovery).await?;
    let peer_error = |error| StartError::PeerListen {
        addr: config.peer_listen,
        error,
    };
    let peer_listener = tokio::net::TcpListener::bind(config.peer_listen)
        .await
        .map_err(peer_error)?;
    let peer_addr = peer_listener.local_addr().map_err(peer_error)?;
    let presence_config = presence::ClientConfig {
        peer_addr: peer_addr.to_string(),
        ..presence::ClientConfig::default()
    };
    let (presence, presence_events) =
        presence::PresenceReplicas::connect(&map.presence_replicas(), config.id, presence_config)
            .await
            .map_err(|e| StartError::Presence {
                addr: map.presence.clone(),
                error: e.to_string(),
            })?;
    let (profile, profile_events) = profile::ProfileClient::connect_subscribed(
        map.profile.clone(),
        profile::ClientConfig::default(),
    )
    .await
    .map_err(|e| StartError::Profile {
        addr: map.profile.clone(),
        error: e.to_string(),
    })?;
    let socket = netio::udp::bind(config.listen).map_err(|error| StartError::Listen {
        addr: config.listen,
        error,
    })?;
    let local_addr = socket.local_addr().map_err(|error| StartError::Listen {
        addr: config.listen,
        error,
    })?;
    let mut seed = [0u8; 32];
    rand::rngs::OsRng.fill_bytes(&mut seed);
    let public_key = keypair.public;
    // The address as bound (a configured port 0 becomes the real one).
    let reset_key = crypto::reset_key(&reset_secret, &local_addr.to_string());
    let endpoint = ServerEndpoint::new(
        endpoint_config(&config, reset_key),
        keypair,
        seed,
        std::time::Instant::now(),
    );
    let services = Arc::new(Services {
        gateway_id: config.id,
        presence,
        profile,
        shards: Shards::new(map, config.timers.shard_busy_wait_ms_max),
        maps: MapKeeper::new(config.data.clone()),
        tokens: TokenKeys::cluster(token_key),
        peers: crate::peers::PeerLinks::default(),
        profiles: quick_cache::sync::Cache::new(config.limits.profile_cache_entries),
        group_trims: quick_cache::sync::Cache::new(crate::services::GROUP_TRIMS_REMEMBERED),
        group_expiries: quick_cache::sync::Cache::new(crate::services::GROUP_TRIMS_REMEMBERED),
        config,
    });
    let (cmds_tx, cmds_rx) = mpsc::unbounded_channel();
    let (stop_tx, stop_rx) = oneshot::channel();
    let peers_task = tokio::spawn(crate::peers::serve(
        peer_listener,
        cmds_tx.clone(),
        services.clone(),
    ));
    let event_loop = Driver::new(services, endpoint, cmds_tx);
    let task =
        tokio::spawn(event_loop.run(socket, cmds_rx, presence_events, profile_events, stop_rx));
    Ok(Running {
        local_addr,
        peer_addr,
        peers_task,
        public_key,
        stop: Some(stop_tx),
        task,
    })
}

daemon::impl_service!(Running);
