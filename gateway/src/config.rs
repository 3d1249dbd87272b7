//! The gateway's configuration: TOML (every field documented in
//! `gateway.example.toml`), overridden by flags.

use serde::{Deserialize, Serialize};
use std::{net::SocketAddr, path::PathBuf};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GatewayConfig {
    /// This gateway's id in the cluster map and at presence.
    pub id: u32,
    /// UDP address clients reach.
    pub listen: SocketAddr,
    /// TCP address other gateways forward messages to (registered with
    /// presence, so port 0 works).
    pub peer_listen: SocketAddr,
    /// The cluster map file (TOML, `docs/PROTOCOL.md` section 4).
    pub cluster: PathBuf,
    /// Directory of the gateway's key files (created if missing):
    /// `gateway.key` (static X25519 private key), `gateway.pub` (its public
    /// key, hex, for clients) and `token.key` (resume-token key; copy the
    /// same file to every gateway of a cluster); also `cluster-map.toml`,
    /// the newest cluster map this gateway accepted.
    pub data: PathBuf,
    /// Prometheus `/metrics` listener.
    pub metrics_addr: Option<SocketAddr>,
    pub limits: Limits,
    pub timers: Timers,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    /// Sessions at most; further logins are dropped and counted.
    pub sessions_max: usize,
    /// Logins being checked at once at most (password checks included).
    pub pending_logins_max: usize,
    /// Handshake initiations per second (and burst) from one IP address,
    /// counted only once mac1 verified (a forged flood costs nobody else):
    /// beyond it an initiation without a cookie is answered with a COOKIE,
    /// and one with a valid cookie is dropped and counted
    /// (`gateway_datagrams_dropped_total{reason="limited"}`). At least 1.
    /// docs/PROTOCOL.md §2.2.
    pub handshakes_per_ip_per_s: u32,
    /// Messages a user may send per second (token bucket) ...
    pub messages_per_user_per_s: u32,
    /// ... with bursts of up to this many.
    pub messages_burst: u32,
    /// Recently seen (sender, message id) pairs remembered to drop
    /// duplicates, at most.
    pub dedupe_entries_max: usize,
    /// Requests of one session being worked on at once at most; beyond it
    /// the request is answered `RateLimited`.
    pub requests_in_flight_per_session_max: usize,
    /// Profiles cached by the gateway at most (dropped when the profile
    /// service pushes a newer version).
    pub profile_cache_entries: usize,
    /// Bytes of users' relations (friends, blocks) cached at most, to
    /// decide who may write to whom without a round trip per message.
    pub relations_cache_bytes_max: usize,
    /// Bytes of chat groups' member lists cached at most, to check a group
    /// send and fan it out without a round trip per message.
    pub group_cache_bytes_max: usize,
    /// Days a group message is kept at most, read or not: older ones are
    /// deleted from the group's mailbox (a member who had not read them is
    /// told how many it missed). 0 keeps them until every member read them.
    pub group_retention_days: u32,
    /// Whether users may write to users who are not their friends (blocks
    /// still apply). Off: a send to a non-friend is answered `NotAllowed`.
    pub allow_strangers: bool,
    /// When a handshake must prove its source address with a cookie first
    /// (docs/PROTOCOL.md §2.4): `never`, `always`, or `under-load` (more
    /// than `cookie_inits_per_s_max` mac1-valid initiations this second).
    pub cookie_mode: CookieModeSetting,
    pub cookie_inits_per_s_max: u32,
    /// Connections to the peer port (other gateways' links, `imctl
    /// rebalance`) open at once at most; further ones are accepted and
    /// closed at once, and counted.
    pub peer_connections_max: usize,
}

/// `limits.cookie_mode`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum CookieModeSetting {
    Never,
    UnderLoad,
    Always,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Timers {
    /// Clients send a heartbeat at least this often (told at login).
    pub heartbeat_s: u32,
    /// A session silent for this long expires.
    pub idle_timeout_s: u32,
    /// Resume tokens are valid this long.
    pub resume_token_ttl_s: u64,
    /// A request for a user being moved between shards (answered `Busy`)
    /// is retried for this long in all, then fails `Unavailable`.
    pub shard_busy_wait_ms_max: u64,
    /// At start, how long to wait for the shards' routings (the newest
    /// cluster map they know); 0: do not ask.
    pub map_discovery_timeout_ms: u64,
    /// Every send is answered within this long while the services are up:
    /// `Sent` once stored, else `Unavailable` (the store goes on; a retry
    /// of the same message waits for it instead of storing it again).
    pub send_answer_ms_max: u64,
    /// After a send failed with a retryable error, later sends of the same
    /// conversation are refused until it is sent again, for at most this
    /// long (so a retry never lands behind a message sent after it).
    pub retry_hold_ms: u64,
    /// A call to a service behind the gateway (a shard, profile, presence)
    /// is given up after this long and counts as failed (`Unavailable`).
    pub service_timeout_ms: u64,
    /// A link on the peer port that brings no complete frame for this long
    /// is closed (the other gateway opens a new one on its next forward).
    pub peer_idle_timeout_s: u32,
}

impl Default for GatewayConfig {
    fn default() -> Self {
        GatewayConfig {
            id: 1,
            listen: "127.0.0.1:7100".parse().expect("valid address"),
            peer_listen: "127.0.0.1:7101".parse().expect("valid address"),
            cluster: PathBuf::from("data/cluster.toml"),
            data: PathBuf::from("data/gateway"),
            metrics_addr: None,
            limits: Limits::default(),
            timers: Timers::default(),
        }
    }
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            sessions_max: 1_000_000,
            pending_logins_max: 4096,
            handshakes_per_ip_per_s: 20,
            messages_per_user_per_s: 20,
            messages_burst: 100,
            dedupe_entries_max: 1_000_000,
            requests_in_flight_per_session_max: 64,
            profile_cache_entries: 100_000,
            relations_cache_bytes_max: 64 * 1024 * 1024,
            group_cache_bytes_max: 64 * 1024 * 1024,
            group_retention_days: 30,
            allow_strangers: false,
            cookie_mode: CookieModeSetting::UnderLoad,
            cookie_inits_per_s_max: 2000,
            peer_connections_max: 256,
        }
    }
}

impl Default for Timers {
    fn default() -> Self {
        Timers {
            heartbeat_s: 30,
            idle_timeout_s: 90,
            resume_token_ttl_s: 7 * 24 * 3600,
            shard_busy_wait_ms_max: 5000,
            map_discovery_timeout_ms: 2000,
            send_answer_ms_max: 5000,
            retry_hold_ms: 30_000,
            service_timeout_ms: 10_000,
            peer_idle_timeout_s: 300,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error(transparent)]
    Load(#[from] daemon::config::ConfigError),
    #[error("invalid configuration: {0}")]
    Invalid(String),
}

impl Limits {
    /// The session layer's cookie mode these settings ask for.
    pub fn cookie_mode(&self) -> proto::session::CookieMode {
        use proto::session::CookieMode;
        match self.cookie_mode {
            CookieModeSetting::Never => CookieMode::Never,
            CookieModeSetting::Always => CookieMode::Always,
            CookieModeSetting::UnderLoad => CookieMode::UnderLoad {
                inits_per_s_max: self.cookie_inits_per_s_max,
            },
        }
    }
}

impl GatewayConfig {
    pub fn load(path: &std::path::Path) -> Result<Self, ConfigError> {
        let config: GatewayConfig = daemon::config::load_toml(path)?;
        config.validate()?;
        Ok(config)
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        let l = &self.limits;
        let t = &self.timers;
        let checks = [
            (
                l.sessions_max >= 1,
                "limits.sessions_max must be at least 1",
            ),
            (
                l.pending_logins_max >= 1,
                "limits.pending_logins_max must be at least 1",
            ),
            (
                l.handshakes_per_ip_per_s >= 1,
                "limits.handshakes_per_ip_per_s must be at least 1",
            ),
            (
                l.messages_per_user_per_s >= 1,
                "limits.messages_per_user_per_s must be at least 1",
            ),
            (
                l.messages_burst >= 1,
                "limits.messages_burst must be at least 1",
            ),
            (
                l.dedupe_entries_max >= 1,
                "limits.dedupe_entries_max must be at least 1",
            ),
            (
                l.requests_in_flight_per_session_max >= 1,
                "limits.requests_in_flight_per_session_max must be at least 1",
            ),
            (
                l.profile_cache_entries >= 1,
                "limits.profile_cache_entries must be at least 1",
            ),
            (
                l.relations_cache_bytes_max >= 4096,
                "limits.relations_cache_bytes_max must be at least 4096",
            ),
            (
                l.group_cache_bytes_max >= 4096,
                "limits.group_cache_bytes_max must be at least 4096",
            ),
            (
                l.cookie_inits_per_s_max >= 1,
                "limits.cookie_inits_per_s_max must be at least 1",
            ),
            (
                (1..=65_536).contains(&l.peer_connections_max),
                "limits.peer_connections_max must be 1 to 65536",
            ),
            (t.heartbeat_s >= 1, "timers.heartbeat_s must be at least 1"),
            (
                t.idle_timeout_s > t.heartbeat_s,
                "timers.idle_timeout_s must exceed heartbeat_s",
            ),
            (
                t.resume_token_ttl_s >= 60,
                "timers.resume_token_ttl_s must be at least 60",
            ),
            (
                t.shard_busy_wait_ms_max <= 60_000,
                "timers.shard_busy_wait_ms_max must be at most 60000",
            ),
            (
                t.map_discovery_timeout_ms <= 60_000,
                "timers.map_discovery_timeout_ms must be at most 60000",
            ),
            (
                (100..=60_000).contains(&t.send_answer_ms_max),
                "timers.send_answer_ms_max must be 100 to 60000",
            ),
            (
                (t.send_answer_ms_max..=600_000).contains(&t.retry_hold_ms),
                "timers.retry_hold_ms must be send_answer_ms_max to 600000",
            ),
            (
                (100..=600_000).contains(&t.service_timeout_ms),
                "timers.service_timeout_ms must be 100 to 600000",
            ),
            (
                (1..=86_400).contains(&t.peer_idle_timeout_s),
                "timers.peer_idle_timeout_s must be 1 to 86400",
            ),
        ];
        match checks.iter().find(|(ok, _)| !ok) {
            Some((_, message)) => Err(ConfigError::Invalid((*message).into())),
            None => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn example_config_parses_and_is_valid() {
        let text = include_str!("../gateway.example.toml");
        let config: GatewayConfig = daemon::config::parse_toml(text).expect("example parses");
        config.validate().expect("example is valid");
        assert_eq!(
            config,
            GatewayConfig::default(),
            "the example shows the defaults"
        );
    }

    #[test]
    fn bad_values_and_unknown_fields_are_refused() {
        let mut c = GatewayConfig::default();
        c.timers.idle_timeout_s = 10;
        assert!(c.validate().is_err());
        let mut c = GatewayConfig::default();
        c.timers.shard_busy_wait_ms_max = 60_001;
        assert!(c.validate().is_err());
        let mut c = GatewayConfig::default();
        c.timers.map_discovery_timeout_ms = 60_001;
        assert!(c.validate().is_err());
        let mut c = GatewayConfig::default();
        c.timers.send_answer_ms_max = 99;
        assert!(c.validate().is_err());
        let mut c = GatewayConfig::default();
        c.timers.retry_hold_ms = c.timers.send_answer_ms_max - 1;
        assert!(c.validate().is_err());
        let mut c = GatewayConfig::default();
        c.limits.peer_connections_max = 0;
        assert!(c.validate().is_err());
        let mut c = GatewayConfig::default();
        c.timers.peer_idle_timeout_s = 0;
        assert!(c.validate().is_err());
        assert!(daemon::config::parse_toml::<GatewayConfig>("bogus = 1").is_err());
        let c: GatewayConfig =
            daemon::config::parse_toml("[limits]\ncookie_mode = \"always\"\n").unwrap();
        assert_eq!(c.limits.cookie_mode(), proto::session::CookieMode::Always);
        assert!(daemon::config::parse_toml::<GatewayConfig>(
            "[limits]\ncookie_mode = \"sometimes\"\n"
        )
        .is_err());
    }
}
