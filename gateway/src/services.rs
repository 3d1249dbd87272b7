//! Everything behind the gateway that its tasks call: presence, profile,
//! the shards, the resume-token keys, and the configuration.

use crate::{
    config::GatewayConfig, map_update::MapKeeper, peers::PeerLinks, resume::TokenKeys,
    shards::Shards,
};
use presence::PresenceReplicas;
use profile::client::ProfileClient;

pub struct Services {
    pub config: GatewayConfig,
    pub gateway_id: u32,
    pub presence: PresenceReplicas,
    pub profile: ProfileClient,
    pub shards: Shards,
    /// Takes cluster maps pushed over the peer link.
    pub maps: MapKeeper,
    pub tokens: TokenKeys,
    pub peers: PeerLinks,
    /// Profiles read through this gateway, at most `limits.profile_cache_entries`;
    /// an entry goes when the profile service pushes a newer version.
    pub profiles: quick_cache::sync::Cache<u64, proto::profile::Profile>,
    /// Per group, the highest lowest-cursor this gateway heard of (every
    /// member had read that far), at most `GROUP_TRIMS_REMEMBERED`.
    pub group_trims: quick_cache::sync::Cache<u64, u64>,
    /// Per group, when (ms since the Unix epoch) this gateway last tidied
    /// its mailbox (`group_calls::tidy_due`).
    pub group_expiries: quick_cache::sync::Cache<u64, u64>,
}

/// Groups whose last trim a gateway remembers (a forgotten one costs one
/// redundant, harmless trim).
pub const GROUP_TRIMS_REMEMBERED: usize = 100_000;
/// A group's mailbox is asked to expire old messages at most this often
/// by one gateway.
pub const GROUP_EXPIRY_INTERVAL_MS: u64 = 60_000;
/// How long a group message stays in its mailbox after every member read
/// it, and how far back a re-sent group message looks for its first copy:
/// a re-send within this of the first attempt is never stored twice.
pub const GROUP_RESEND_WINDOW_MS: u64 = 10 * 60_000;

impl Services {
    /// Profiles of those of `users` that exist (in order), from the cache
    /// where fresh.
    pub async fn profiles(
        &self,
        users: &[u64],
    ) -> Result<Vec<proto::profile::Profile>, profile::ClientError> {
        let mut found: std::collections::HashMap<u64, proto::profile::Profile> = users
            .iter()
            .filter_map(|u| self.profiles.get(u).map(|p| (*u, p)))
            .collect();
        let missing: Vec<u64> = users
            .iter()
            .copied()
            .filter(|u| !found.contains_key(u))
            .collect();
        if !missing.is_empty() {
            for p in self.profile.get_profiles(missing).await? {
                self.profiles.insert(p.user, p.clone());
                found.insert(p.user, p);
            }
        }
        Ok(users.iter().filter_map(|u| found.remove(u)).collect())
    }

    /// The profile service says `user` changed (or, with `None`, that
    /// anything may have): drop what is cached.
    pub fn invalidate(&self, user: Option<u64>) {
        match user {
            Some(u) => {
                self.profiles.remove(&u);
            }
            None => self.profiles.clear(),
        }
    }
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}
