//! What an embedded cluster listens on and how its shards are sized.

use std::{net::SocketAddr, path::PathBuf};

/// The addresses `imctl up` listens on unless told otherwise: each
/// daemon's usual port, so the operator commands' defaults reach them.
pub const GATEWAY_ADDR_DEFAULT: &str = "127.0.0.1:7100";
pub const GATEWAY_PEER_ADDR_DEFAULT: &str = "127.0.0.1:7101";
pub const PRESENCE_ADDR_DEFAULT: &str = presence::daemon::LISTEN_ADDR_DEFAULT;
pub const PROFILE_ADDR_DEFAULT: &str = profile::config::LISTEN_ADDR_DEFAULT;
pub const SHARD_ADDRS_DEFAULT: [&str; 2] = ["127.0.0.1:7401", "127.0.0.1:7402"];

pub struct EmbeddedConfig {
    /// Everything lives below this directory.
    pub data: PathBuf,
    pub presence: SocketAddr,
    pub profile: SocketAddr,
    /// One shard per address (with `replicas` > 1: its first replica's).
    pub shards: Vec<SocketAddr>,
    /// Replicas per shard and of the profile service: 1 (a process of
    /// its own) or 3, 5, 7 (a replicated group). Replica `r` (from 1) of a
    /// shard or profile at port `p` serves on `p + 10 (r - 1)` and
    /// replicates on that port + 1000 (any free ports for port 0).
    pub replicas: usize,
    /// UDP address of the gateway; `None`: start no gateway (run it as a
    /// process yourself with `cluster_path()`).
    pub gateway: Option<SocketAddr>,
    /// TCP address of the gateway's peer listener (other gateways'
    /// forwards, `imctl rebalance`'s map pushes), as the cluster map names
    /// it. Unused without a gateway.
    pub gateway_peer: SocketAddr,
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
            presence: addr(PRESENCE_ADDR_DEFAULT),
            profile: addr(PROFILE_ADDR_DEFAULT),
            shards: SHARD_ADDRS_DEFAULT.iter().map(|s| addr(s)).collect(),
            replicas: 1,
            gateway: Some(addr(GATEWAY_ADDR_DEFAULT)),
            gateway_peer: addr(GATEWAY_PEER_ADDR_DEFAULT),
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
            replicas: 1,
            gateway: None,
            gateway_peer: any,
            bucket_fanout: 4,
            presence_grace_ms: 1_000,
        }
    }
}
