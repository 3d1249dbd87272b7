//! Everything behind the gateway that its tasks call: presence, profile,
//! the shards, the resume-token keys, and the configuration.

use crate::{config::GatewayConfig, peers::PeerLinks, resume::TokenKeys, shards::Shards};
use presence::client::PresenceClient;
use profile::client::ProfileClient;

pub struct Services {
    pub config: GatewayConfig,
    pub gateway_id: u32,
    pub presence: PresenceClient,
    pub profile: ProfileClient,
    pub shards: Shards,
    pub tokens: TokenKeys,
    pub peers: PeerLinks,
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}
