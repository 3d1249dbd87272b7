//! A whole cluster in one process: presence, profile, msgstore shards and
//! (optionally) a gateway, with their data under one directory and a
//! cluster map written for them. `imctl up` runs it; benchmarks and tests
//! use it too. A crate of its own so that the gateway library does not
//! carry every other component for them.
//!
//! * [`EmbeddedConfig`]: addresses and sizes (`config.rs`).
//! * [`EmbeddedError`]: which [`Component`] failed, and the address it
//!   could not have if another process holds it (`error.rs`).
//! * `parts.rs`: starting each component; `map.rs`: the cluster map.

mod config;
mod error;
mod map;
mod parts;

pub use config::{
    EmbeddedConfig, GATEWAY_ADDR_DEFAULT, GATEWAY_PEER_ADDR_DEFAULT, PRESENCE_ADDR_DEFAULT,
    PROFILE_ADDR_DEFAULT, SHARD_ADDRS_DEFAULT,
};
pub use error::{Component, EmbeddedError};

use proto::cluster::ClusterMap;

/// The cluster key file's name in the data directory.
pub const CLUSTER_KEY_FILE: &str = "cluster.key";
use std::path::PathBuf;

pub struct Embedded {
    pub presence: presence::daemon::Daemon,
    /// The profile service, or its replicas.
    pub profile: Vec<profile::daemon::Daemon>,
    pub shards: Vec<msgstore::daemon::Daemon>,
    pub gateway: Option<gateway::daemon::Running>,
    pub map: ClusterMap,
    data: PathBuf,
}

impl Embedded {
    /// Start every component, in dependency order. If one fails, those
    /// already running are stopped cleanly before the error is returned
    /// (the shards checkpoint, the data directories are unlocked).
    pub async fn start(config: EmbeddedConfig) -> Result<Embedded, EmbeddedError> {
        let mut started = Started::default();
        match start_all(&config, &mut started).await {
            Ok(map) => Ok(Embedded {
                presence: started.presence.expect("start_all started presence"),
                profile: started.profile,
                shards: started.shards,
                gateway: started.gateway,
                map,
                data: config.data,
            }),
            Err(e) => {
                started.stop().await;
                Err(e)
            }
        }
    }

    /// Where the cluster map is (rewritten by `imctl rebalance`).
    pub fn cluster_path(&self) -> PathBuf {
        map::path(&self.data)
    }

    /// Stop everything, the gateway first (it tells presence its users are
    /// gone), the stores last.
    pub async fn shutdown(self) {
        Started {
            presence: Some(self.presence),
            profile: self.profile,
            shards: self.shards,
            gateway: self.gateway,
        }
        .stop()
        .await;
    }
}

/// The components running so far.
#[derive(Default)]
struct Started {
    presence: Option<presence::daemon::Daemon>,
    profile: Vec<profile::daemon::Daemon>,
    shards: Vec<msgstore::daemon::Daemon>,
    gateway: Option<gateway::daemon::Running>,
}

impl Started {
    /// The reverse of the start order: the gateway, the shards, profile,
    /// presence.
    async fn stop(self) {
        if let Some(g) = self.gateway {
            let _ = g.shutdown().await;
        }
        for s in self.shards {
            if let Err(e) = s.shutdown().await {
                tracing::warn!(error = %e, "a shard did not close cleanly");
            }
        }
        for p in self.profile {
            p.shutdown().await;
        }
        if let Some(p) = self.presence {
            let _ = p.shutdown().await;
        }
    }
}

/// Start the components one by one into `started`; the map in use.
/// The cluster's key file in the data directory: this process's key is
/// written there if there is none (so that `imctl` commands and separate
/// daemons can join), or the one there is installed.
fn cluster_key(config: &EmbeddedConfig) -> Result<(), EmbeddedError> {
    use daemon::secure::{install_key, key, load_key_file, write_key_file};
    let path = config.data.join(CLUSTER_KEY_FILE);
    let failed = |e: daemon::secure::KeyError| EmbeddedError::new(Component::ClusterKey, e);
    if path.exists() {
        install_key(load_key_file(&path).map_err(failed)?).map_err(failed)
    } else {
        write_key_file(&path, key()).map_err(failed)
    }
}

async fn start_all(
    config: &EmbeddedConfig,
    started: &mut Started,
) -> Result<ClusterMap, EmbeddedError> {
    std::fs::create_dir_all(&config.data).map_err(|e| {
        EmbeddedError::new(
            Component::DataDir,
            format_args!("{}: {e}", config.data.display()),
        )
    })?;
    cluster_key(config)?;
    let presence = started.presence.insert(parts::presence(config)?);
    let presence = presence.local_addr();
    if config.replicas > 1 {
        parts::profile_group(config, &mut started.profile).await?;
    } else {
        started.profile.push(parts::profile(config).await?);
    }
    let profile: Vec<String> = started
        .profile
        .iter()
        .map(|p| p.local_addr().to_string())
        .collect();
    let mut shards = Vec::new();
    for (i, listen) in config.shards.iter().enumerate() {
        let first = started.shards.len();
        if config.replicas > 1 {
            parts::shard_group(config, i + 1, *listen, &mut started.shards).await?;
        } else {
            started
                .shards
                .push(parts::shard(config, i + 1, *listen).await?);
        }
        shards.push(
            started.shards[first..]
                .iter()
                .map(|s| s.local_addr())
                .collect(),
        );
    }
    let map = map::write_or_keep(config, presence, &profile.join(","), &shards)?;
    if let Some(listen) = config.gateway {
        started.gateway = Some(parts::gateway(config, listen).await?);
    }
    Ok(map)
}
