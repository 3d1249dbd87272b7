//! A whole cluster in one process: presence, profile, msgstore shards and
//! (optionally) a gateway, with their data under one directory and a
//! cluster map written for them. `imctl up` runs it; benchmarks and tests
//! use it too. A crate of its own so that the gateway library does not
//! carry every other component for them.

use gateway::{config::GatewayConfig, daemon as gateway_daemon};
use proto::cluster::{ClusterMap, GatewayEntry, ShardEntry};
use std::{net::SocketAddr, path::PathBuf};

pub struct EmbeddedConfig {
    /// Everything lives below this directory.
    pub data: PathBuf,
    pub presence: SocketAddr,
    pub profile: SocketAddr,
    /// One shard per address.
    pub shards: Vec<SocketAddr>,
    /// UDP address of the gateway; `None`: start no gateway (run it as a
    /// process yourself with `cluster_path()`).
    pub gateway: Option<SocketAddr>,
    /// Bucket fan-out of the shards (256 x 256 in production; tests use 4).
    pub bucket_fanout: u16,
    /// Grace period of presence before a lost gateway's users go offline.
    pub presence_grace_ms: u32,
}

impl EmbeddedConfig {
    /// The defaults `imctl up` uses: the daemons' usual ports, two shards.
    pub fn standard(data: PathBuf) -> Self {
        let addr = |s: &str| s.parse().expect("valid address");
        EmbeddedConfig {
            data,
            presence: addr("127.0.0.1:7300"),
            profile: addr("127.0.0.1:7500"),
            shards: vec![addr("127.0.0.1:7401"), addr("127.0.0.1:7402")],
            gateway: Some(addr("127.0.0.1:7100")),
            bucket_fanout: 256,
            presence_grace_ms: 10_000,
        }
    }

    /// Any free ports, small shards: for tests.
    pub fn ephemeral(data: PathBuf, shards: usize) -> Self {
        let any: SocketAddr = "127.0.0.1:0".parse().expect("valid address");
        EmbeddedConfig {
            data,
            presence: any,
            profile: any,
            shards: vec![any; shards],
            gateway: None,
            bucket_fanout: 4,
            presence_grace_ms: 1_000,
        }
    }
}

#[derive(Debug, thiserror::Error)]
#[error("cannot start {what}: {message}")]
pub struct EmbeddedError {
    pub what: String,
    pub message: String,
}

fn failed(what: impl Into<String>, e: impl std::fmt::Display) -> EmbeddedError {
    EmbeddedError {
        what: what.into(),
        message: e.to_string(),
    }
}

pub struct Embedded {
    pub presence: presence::daemon::Daemon,
    pub profile: profile::daemon::Daemon,
    pub shards: Vec<msgstore::daemon::Daemon>,
    pub gateway: Option<gateway_daemon::Running>,
    pub map: ClusterMap,
    data: PathBuf,
}

impl Embedded {
    pub async fn start(config: EmbeddedConfig) -> Result<Embedded, EmbeddedError> {
        std::fs::create_dir_all(&config.data)
            .map_err(|e| failed(config.data.display().to_string(), e))?;
        let mut presence_config = presence::daemon::DaemonConfig {
            listen: config.presence,
            ..Default::default()
        };
        presence_config.server.grace_ms = config.presence_grace_ms;
        let presence =
            presence::daemon::start(presence_config).map_err(|e| failed("presence", e))?;
        let profile_config = profile::Config {
            listen: config.profile,
            data: config.data.join("profile"),
            ..Default::default()
        };
        let profile = profile::daemon::start(profile_config)
            .await
            .map_err(|e| failed("profile", e))?;
        let mut shards = Vec::new();
        for (i, listen) in config.shards.iter().enumerate() {
            let mut c = msgstore::daemon::DaemonConfig {
                listen: *listen,
                data: Some(config.data.join(format!("shard{}", i + 1))),
                ..Default::default()
            };
            c.engine.bucket_dirs = config.bucket_fanout;
            c.engine.bucket_files = config.bucket_fanout;
            // The shards share this process's map-count limit.
            c.engine.open_maps_max = Some(c.engine.shared_open_maps_max(config.shards.len()));
            shards.push(
                msgstore::daemon::start(c)
                    .await
                    .map_err(|e| failed(format!("shard {}", i + 1), e))?,
            );
        }
        // The gateway started below listens for peers on the default port;
        // without one, the map names no reachable peer port.
        let peer = match config.gateway {
            Some(_) => GatewayConfig::default().peer_listen.to_string(),
            None => "127.0.0.1:0".to_string(),
        };
        let fresh = ClusterMap {
            epoch: 1,
            presence: presence.local_addr().to_string(),
            profile: profile.local_addr().to_string(),
            gateways: vec![GatewayEntry {
                id: 1,
                udp: config
                    .gateway
                    .map_or_else(|| "127.0.0.1:0".into(), |a| a.to_string()),
                peer,
            }],
            shards: shards
                .iter()
                .enumerate()
                .map(|(i, s)| ShardEntry {
                    id: format!("s{}", i + 1),
                    addr: s.local_addr().to_string(),
                    weight: 1,
                })
                .collect(),
        };
        let cluster_path = config.data.join("cluster.toml");
        let map = match rebalanced_map(&cluster_path, &fresh) {
            Some(map) => map,
            None => {
                std::fs::write(&cluster_path, fresh.to_toml())
                    .map_err(|e| failed("the cluster map", e))?;
                fresh
            }
        };
        let mut embedded = Embedded {
            presence,
            profile,
            shards,
            gateway: None,
            map,
            data: config.data,
        };
        if let Some(listen) = config.gateway {
            let gateway_config = GatewayConfig {
                listen,
                cluster: cluster_path,
                data: embedded.data.join("gateway"),
                ..GatewayConfig::default()
            };
            embedded.gateway = Some(
                gateway_daemon::start(gateway_config)
                    .await
                    .map_err(|e| failed("the gateway", e))?,
            );
        }
        Ok(embedded)
    }

    /// Where the cluster map is (rewritten by `imctl rebalance`).
    pub fn cluster_path(&self) -> PathBuf {
        self.data.join("cluster.toml")
    }

    /// Stop everything, the gateway first (it tells presence its users are
    /// gone), the stores last.
    pub async fn shutdown(self) {
        if let Some(g) = self.gateway {
            let _ = g.shutdown().await;
        }
        for s in self.shards {
            if let Err(e) = s.shutdown().await {
                tracing::warn!(error = %e, "a shard did not close cleanly");
            }
        }
        self.profile.shutdown().await;
        let _ = self.presence.shutdown().await;
    }
}

/// The map already in `path` if a rebalance moved it past the map this
/// start would write (a higher epoch, same presence and profile): shards
/// added by `imctl rebalance` run outside this process and must stay in it.
fn rebalanced_map(path: &std::path::Path, fresh: &ClusterMap) -> Option<ClusterMap> {
    let text = std::fs::read_to_string(path).ok()?;
    let map = ClusterMap::from_toml(&text).ok()?;
    (map.epoch > fresh.epoch && map.presence == fresh.presence && map.profile == fresh.profile)
        .then_some(map)
}
