//! The cluster map of an embedded cluster: `DATA/cluster.toml`, written at
//! each start unless a rebalance has moved it on.

use crate::{Component, EmbeddedConfig, EmbeddedError};
use proto::cluster::{ClusterMap, GatewayEntry, ShardEntry};
use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
};

pub(crate) fn path(data: &Path) -> PathBuf {
    data.join("cluster.toml")
}

/// The map of the components just started (epoch 1), written to the map
/// file, or the one already there if a rebalance moved it on.
pub(crate) fn write_or_keep(
    config: &EmbeddedConfig,
    presence: SocketAddr,
    profile: &str,
    shards: &[Vec<SocketAddr>],
) -> Result<ClusterMap, EmbeddedError> {
    // Without a gateway the map names no reachable gateway port; one
    // started as a process reads its own addresses from its flags.
    let (udp, peer) = match config.gateway {
        Some(udp) => (udp.to_string(), config.gateway_peer.to_string()),
        None => ("127.0.0.1:0".into(), "127.0.0.1:0".into()),
    };
    let fresh = ClusterMap {
        epoch: 1,
        presence: presence.to_string(),
        profile: profile.to_string(),
        gateways: vec![GatewayEntry { id: 1, udp, peer }],
        shards: shards
            .iter()
            .enumerate()
            .map(|(i, addrs)| ShardEntry {
                id: format!("s{}", i + 1),
                addr: addrs[0].to_string(),
                weight: 1,
                replicas: match addrs.len() {
                    1 => Vec::new(),
                    _ => addrs.iter().map(|a| a.to_string()).collect(),
                },
            })
            .collect(),
    };
    let path = path(&config.data);
    if let Some(map) = rebalanced_map(&path, &fresh) {
        return Ok(map);
    }
    std::fs::write(&path, fresh.to_toml()).map_err(|e| {
        EmbeddedError::new(
            Component::ClusterMap,
            format_args!("{}: {e}", path.display()),
        )
    })?;
    Ok(fresh)
}

/// The map already in `path` if a rebalance moved it past the map this
/// start would write (a higher epoch, same presence and profile): shards
/// added by `imctl rebalance` run outside this process and must stay in it.
fn rebalanced_map(path: &Path, fresh: &ClusterMap) -> Option<ClusterMap> {
    let text = std::fs::read_to_string(path).ok()?;
    let map = ClusterMap::from_toml(&text).ok()?;
    (map.epoch > fresh.epoch && map.presence == fresh.presence && map.profile == fresh.profile)
        .then_some(map)
}
