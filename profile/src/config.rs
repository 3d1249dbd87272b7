//! Configuration of the profile daemon: every limit it enforces, with its
//! default. See `profile/profile.example.toml` for the documented TOML form.

use serde::{Deserialize, Serialize};
use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
};

/// Address the daemon listens on when neither file nor flag names one.
pub const LISTEN_ADDR_DEFAULT: &str = "127.0.0.1:7500";
/// Data directory when neither the config file nor `--data` names one.
pub const DATA_DIR_DEFAULT: &str = "data/profile";

/// The daemon's TOML configuration file.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    pub listen: SocketAddr,
    pub data: PathBuf,
    pub metrics_addr: Option<SocketAddr>,
    pub server: ServerConfig,
    pub store: StoreConfig,
    pub passwords: PasswordConfig,
    pub limits: Limits,
    /// Present: the daemon is one replica of a profile group (the `[raft]`
    /// table, as a shard replica's).
    pub raft: Option<replication::group::RaftConfig>,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            listen: LISTEN_ADDR_DEFAULT.parse().expect("valid default address"),
            data: PathBuf::from(DATA_DIR_DEFAULT),
            metrics_addr: None,
            server: ServerConfig::default(),
            store: StoreConfig::default(),
            passwords: PasswordConfig::default(),
            limits: Limits::default(),
            raft: None,
        }
    }
}

/// Connection limits: the `[server]` table.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ServerConfig {
    /// Largest request frame body; a bigger (or malformed) frame closes the
    /// connection.
    pub frame_body_bytes_max: usize,
    /// Most unanswered requests of one connection; past it the server stops
    /// reading that connection until answers drain.
    pub inflight_requests_max: usize,
    /// Most open connections; further ones are accepted and closed at once.
    pub connections_max: usize,
    /// Most events queued for one subscribed connection; past it the queue
    /// is replaced by one `CacheReset`.
    pub subscriber_events_max: usize,
    /// On shutdown, how long connections get to answer what they read.
    pub shutdown_drain_ms: u64,
    /// Threads of the async runtime serving connections (0: one per core).
    pub worker_threads: usize,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            frame_body_bytes_max: proto::frame::FRAME_BODY_BYTES_MAX_DEFAULT,
            inflight_requests_max: 1024,
            connections_max: 1024,
            subscriber_events_max: 65_536,
            shutdown_drain_ms: 10_000,
            worker_threads: 0,
        }
    }
}

/// LMDB and its writer thread: the `[store]` table.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct StoreConfig {
    /// Size of the LMDB map; the database can never grow past it.
    pub map_bytes: u64,
    /// Most write requests waiting for the writer thread; past it writes are
    /// refused with `Busy`.
    pub write_queue_max: usize,
    /// Most write requests committed in one transaction.
    pub write_batch_max: usize,
}

impl Default for StoreConfig {
    fn default() -> Self {
        Self {
            map_bytes: 8 << 30,
            write_queue_max: 4096,
            write_batch_max: 256,
        }
    }
}

/// argon2id and its thread pool: the `[passwords]` table.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PasswordConfig {
    /// Threads hashing and checking passwords (0: one per core).
    pub threads: usize,
    /// Most password jobs waiting for a thread; past it `Busy`.
    pub queue_max: usize,
    /// argon2id memory cost in KiB (at least the argon2 crate's default).
    pub argon2_m_kib: u32,
    /// argon2id iterations (at least the default).
    pub argon2_t: u32,
    /// argon2id lanes (at least the default).
    pub argon2_p: u32,
}

impl Default for PasswordConfig {
    fn default() -> Self {
        Self {
            threads: 0,
            queue_max: 256,
            argon2_m_kib: argon2::Params::DEFAULT_M_COST,
            argon2_t: argon2::Params::DEFAULT_T_COST,
            argon2_p: argon2::Params::DEFAULT_P_COST,
        }
    }
}

/// Per-field and per-user limits: the `[limits]` table.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Limits {
    pub username_bytes_max: usize,
    pub nickname_bytes_max: usize,
    pub signature_bytes_max: usize,
    pub group_name_bytes_max: usize,
    /// Most friends of one user (all groups together).
    pub friends_max: usize,
    /// Most friend groups of one user.
    pub groups_max: usize,
    /// Most friend requests waiting for one user's answer.
    pub requests_pending_max: usize,
    /// Most users one user blocks.
    pub blocks_max: usize,
    /// Largest avatar image (at most 256 KiB).
    pub avatar_bytes_max: usize,
    /// Largest avatar width and height in pixels.
    pub avatar_dimension_max: u32,
    /// Most members of one chat group (`LimitReached` when a join or an
    /// accepted invitation would pass it).
    pub group_members_max: usize,
    /// Most chat groups one user is a member of (created or joined).
    pub user_groups_max: usize,
    /// Longest chat group name in bytes (`group_name_bytes_max` is the
    /// friend groups' limit).
    pub chat_group_name_bytes_max: usize,
    /// Longest chat group topic in bytes (0: topics must be empty).
    pub group_topic_bytes_max: usize,
    /// Most chat group invitations waiting for one user's answer.
    pub group_invites_pending_max: usize,
    /// Most join requests waiting in one chat group.
    pub group_joins_pending_max: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            username_bytes_max: 32,
            nickname_bytes_max: 64,
            signature_bytes_max: 256,
            group_name_bytes_max: 32,
            friends_max: 1000,
            groups_max: 32,
            requests_pending_max: 100,
            blocks_max: 1000,
            avatar_bytes_max: proto::profile::AVATAR_BYTES_MAX,
            avatar_dimension_max: 1024,
            group_members_max: 2000,
            user_groups_max: 500,
            chat_group_name_bytes_max: 64,
            group_topic_bytes_max: 512,
            group_invites_pending_max: 100,
            group_joins_pending_max: 500,
        }
    }
}

/// Room for the rest of a `SetAvatar` request around its image bytes.
const AVATAR_FRAME_OVERHEAD_BYTES: u64 = 64;

fn range(name: &str, v: u64, lo: u64, hi: u64) -> Result<(), String> {
    if v < lo || v > hi {
        Err(format!("{name} = {v} is outside {lo}..={hi}"))
    } else {
        Ok(())
    }
}

impl Config {
    pub fn load(path: &Path) -> Result<Self, String> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("cannot read config file {}: {e}", path.display()))?;
        Self::parse(&text).map_err(|e| format!("invalid config file {}: {e}", path.display()))
    }

    pub fn parse(text: &str) -> Result<Self, String> {
        toml::from_str(text).map_err(|e| e.to_string())
    }

    /// Check ranges; the message names the bad field.
    pub fn validate(&self) -> Result<(), String> {
        let s = &self.server;
        range(
            "server.frame_body_bytes_max",
            s.frame_body_bytes_max as u64,
            1024,
            u32::MAX.into(),
        )?;
        range(
            "server.inflight_requests_max",
            s.inflight_requests_max as u64,
            1,
            1 << 20,
        )?;
        range(
            "server.connections_max",
            s.connections_max as u64,
            1,
            1 << 20,
        )?;
        range(
            "server.subscriber_events_max",
            s.subscriber_events_max as u64,
            1,
            1 << 24,
        )?;
        range("server.worker_threads", s.worker_threads as u64, 0, 1024)?;
        let st = &self.store;
        range("store.map_bytes", st.map_bytes, 1 << 20, 1 << 44)?;
        range(
            "store.write_queue_max",
            st.write_queue_max as u64,
            1,
            1 << 24,
        )?;
        range(
            "store.write_batch_max",
            st.write_batch_max as u64,
            1,
            1 << 16,
        )?;
        let p = &self.passwords;
        range("passwords.threads", p.threads as u64, 0, 1024)?;
        range("passwords.queue_max", p.queue_max as u64, 1, 1 << 20)?;
        let d = PasswordConfig::default();
        range(
            "passwords.argon2_m_kib",
            p.argon2_m_kib.into(),
            d.argon2_m_kib.into(),
            4 << 20,
        )?;
        range(
            "passwords.argon2_t",
            p.argon2_t.into(),
            d.argon2_t.into(),
            64,
        )?;
        range(
            "passwords.argon2_p",
            p.argon2_p.into(),
            d.argon2_p.into(),
            64,
        )?;
        let l = &self.limits;
        range(
            "limits.username_bytes_max",
            l.username_bytes_max as u64,
            1,
            255,
        )?;
        range(
            "limits.nickname_bytes_max",
            l.nickname_bytes_max as u64,
            1,
            4096,
        )?;
        range(
            "limits.signature_bytes_max",
            l.signature_bytes_max as u64,
            1,
            16384,
        )?;
        range(
            "limits.group_name_bytes_max",
            l.group_name_bytes_max as u64,
            1,
            255,
        )?;
        range("limits.friends_max", l.friends_max as u64, 1, 100_000)?;
        range("limits.groups_max", l.groups_max as u64, 1, 1024)?;
        range(
            "limits.requests_pending_max",
            l.requests_pending_max as u64,
            1,
            100_000,
        )?;
        range("limits.blocks_max", l.blocks_max as u64, 1, 100_000)?;
        let avatar_max = proto::profile::AVATAR_BYTES_MAX as u64;
        range(
            "limits.avatar_bytes_max",
            l.avatar_bytes_max as u64,
            64,
            avatar_max,
        )?;
        range(
            "limits.avatar_dimension_max",
            l.avatar_dimension_max.into(),
            1,
            16384,
        )?;
        self.validate_group_limits()?;
        // A SetAvatar request carries the whole image plus a few header bytes.
        let avatar_frame = l.avatar_bytes_max as u64 + AVATAR_FRAME_OVERHEAD_BYTES;
        if (s.frame_body_bytes_max as u64) < avatar_frame {
            return Err(format!(
                "server.frame_body_bytes_max = {} cannot carry an avatar of \
                 limits.avatar_bytes_max = {} bytes (needs at least {avatar_frame})",
                s.frame_body_bytes_max, l.avatar_bytes_max
            ));
        }
        Ok(())
    }

    /// Chat group limits. The upper bounds keep a group's `GetGroup` and
    /// a user's `GetUserGroups` answer within `RESPONSE_BODY_BYTES_MAX`,
    /// and a dissolve (one transaction over every member) reasonable.
    fn validate_group_limits(&self) -> Result<(), String> {
        let l = &self.limits;
        for (name, v, lo, hi) in [
            ("group_members_max", l.group_members_max, 1, 100_000),
            ("user_groups_max", l.user_groups_max, 1, 10_000),
            (
                "chat_group_name_bytes_max",
                l.chat_group_name_bytes_max,
                1,
                255,
            ),
            ("group_topic_bytes_max", l.group_topic_bytes_max, 0, 16_384),
            (
                "group_invites_pending_max",
                l.group_invites_pending_max,
                1,
                10_000,
            ),
            (
                "group_joins_pending_max",
                l.group_joins_pending_max,
                1,
                100_000,
            ),
        ] {
            range(&format!("limits.{name}"), v as u64, lo, hi)?;
        }
        Ok(())
    }

    /// The password pool's thread count with 0 resolved.
    pub fn password_threads(&self) -> usize {
        resolve_threads(self.passwords.threads)
    }
}

/// 0 means one per core.
pub fn resolve_threads(n: usize) -> usize {
    if n > 0 {
        n
    } else {
        std::thread::available_parallelism().map_or(2, |n| n.get())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn example_config_parses_and_is_valid() {
        let config = Config::parse(include_str!("../profile.example.toml")).unwrap();
        config.validate().unwrap();
        let d = Config::default();
        assert_eq!(config.listen, d.listen);
        assert_eq!(config.limits, d.limits);
        assert_eq!(config.passwords, d.passwords);
        assert_eq!(config.store, d.store);
        assert_eq!(config.server, d.server);
    }

    #[test]
    fn unknown_fields_are_refused_and_weak_argon2_is_named() {
        let err = Config::parse("bogus = 1\n").unwrap_err();
        assert!(err.contains("bogus"), "{err}");
        let err = Config::parse("[limits]\nfriends = 1\n").unwrap_err();
        assert!(err.contains("friends"), "{err}");
        let mut weak = Config::default();
        weak.passwords.argon2_m_kib = 1024;
        assert!(weak.validate().unwrap_err().contains("argon2_m_kib"));
        let mut small = Config::default();
        small.server.frame_body_bytes_max = 4096;
        assert!(small
            .validate()
            .unwrap_err()
            .contains("frame_body_bytes_max"));
    }

    #[test]
    fn blocks_max_outside_its_range_is_refused_by_name() {
        for bad in [0, 100_001] {
            let config = Config::parse(&format!("[limits]\nblocks_max = {bad}\n")).unwrap();
            let err = config.validate().unwrap_err();
            assert!(err.contains("limits.blocks_max"), "{err}");
        }
        for good in [1, 100_000] {
            let config = Config::parse(&format!("[limits]\nblocks_max = {good}\n")).unwrap();
            config.validate().unwrap();
        }
    }

    #[test]
    fn group_limits_outside_their_ranges_are_refused_by_name() {
        for (field, bad, good) in [
            ("group_members_max", 0, 100_000),
            ("group_members_max", 100_001, 1),
            ("user_groups_max", 10_001, 10_000),
            ("chat_group_name_bytes_max", 0, 255),
            ("group_topic_bytes_max", 16_385, 0),
            ("group_invites_pending_max", 0, 10_000),
            ("group_joins_pending_max", 0, 100_000),
        ] {
            let config = Config::parse(&format!("[limits]\n{field} = {bad}\n")).unwrap();
            let err = config.validate().unwrap_err();
            assert!(err.contains(&format!("limits.{field}")), "{err}");
            let config = Config::parse(&format!("[limits]\n{field} = {good}\n")).unwrap();
            config.validate().unwrap();
        }
    }
}
