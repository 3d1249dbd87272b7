//! The cluster map (which gateways, presence, profile and shards exist, with
//! an epoch) and the placement of users on shards by consistent hashing.
//!
//! Placement must agree forever between every gateway, shard and tool, on
//! every platform and Rust version, so the ring never hashes through
//! `std::hash::Hash`'s default behaviour: users are hashed as their id's 8
//! little-endian bytes and virtual nodes as the bytes of `"<shard>-<i>"`,
//! each through BLAKE2s-256 truncated to its first 8 bytes (little-endian).
//! The ring itself is the `consistent_hash` crate's `StaticHashRing`.

use blake2::{Blake2s256, Digest};
use consistent_hash::{Node, RingHash, StaticHashRing};
use serde::{Deserialize, Serialize};
use std::hash::{Hash, Hasher};

/// Virtual nodes per unit of shard weight. 1000 keeps every shard's share
/// within a few percent of its weight's (100 left 8% errors: measured in
/// `adding_a_shard_moves_its_fair_share_and_only_to_it`).
pub const VNODES_PER_WEIGHT: u32 = 1000;
/// Sum of all shards' weights at most: bounds the ring's size (one entry
/// per virtual node) to a million.
pub const MAP_WEIGHT_MAX: u32 = 1000;
/// Largest shard weight.
pub const SHARD_WEIGHT_MAX: u32 = 100;
/// Shards in one map at most.
pub const SHARDS_MAX: usize = 1024;
/// Gateways in one map at most.
pub const GATEWAYS_MAX: usize = 1024;
/// Longest shard id.
pub const SHARD_ID_BYTES_MAX: usize = 64;

/// The cluster map file (TOML). Every field is documented in
/// `docs/PROTOCOL.md` section 4.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterMap {
    /// Increases with every change; the newest map wins everywhere.
    pub epoch: u64,
    /// Address (host:port) of the presence service; several separated by
    /// commas are its replicas (see [`ClusterMap::presence_replicas`]).
    pub presence: String,
    /// Address (host:port) of the profile service; several separated by
    /// commas are the client addresses of a profile group's replicas.
    pub profile: String,
    #[serde(default)]
    pub gateways: Vec<GatewayEntry>,
    pub shards: Vec<ShardEntry>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GatewayEntry {
    /// Unique gateway id (as registered with presence).
    pub id: u32,
    /// Address clients reach over UDP.
    pub udp: String,
    /// Address other gateways forward messages to over TCP.
    pub peer: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ShardEntry {
    /// Unique, stable shard id: it names the shard's virtual nodes, so
    /// renaming a shard moves its users.
    pub id: String,
    /// Address (host:port) of the shard daemon.
    pub addr: String,
    /// Relative share of users (1 ..= SHARD_WEIGHT_MAX).
    #[serde(default = "default_weight")]
    pub weight: u32,
    /// A replicated shard group: the shard-protocol address of every
    /// replica (at most [`SHARD_REPLICAS_MAX`]); `addr` is then one of
    /// them, tried first. Empty: the shard is the one daemon at `addr`.
    #[serde(default)]
    pub replicas: Vec<String>,
}

/// Most replicas of one shard group.
pub const SHARD_REPLICAS_MAX: usize = 7;

impl ShardEntry {
    /// Every address the shard is served at: `addr`, then the other
    /// replicas in map order.
    pub fn addrs(&self) -> Vec<String> {
        let mut out = vec![self.addr.clone()];
        out.extend(self.replicas.iter().filter(|r| **r != self.addr).cloned());
        out
    }
}

fn default_weight() -> u32 {
    1
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ClusterMapError {
    #[error("cluster map is not valid TOML for this format: {0}")]
    Parse(String),
    #[error("cluster map has no shards")]
    NoShards,
    #[error("cluster map has {count} {what}; at most {max}")]
    TooMany {
        what: &'static str,
        count: usize,
        max: usize,
    },
    #[error("shard id {0:?} is empty, too long or not [A-Za-z0-9_.-]")]
    BadShardId(String),
    #[error("shard id {0:?} appears twice")]
    DuplicateShard(String),
    #[error("gateway id {0} appears twice")]
    DuplicateGateway(u32),
    #[error("shard {id:?} has weight {weight}; must be 1 ..= {SHARD_WEIGHT_MAX}")]
    BadWeight { id: String, weight: u32 },
}

/// The addresses of a comma-separated list, trimmed, empty ones left out.
fn split_addrs(list: &str) -> Vec<String> {
    list.split(',')
        .map(str::trim)
        .filter(|a| !a.is_empty())
        .map(str::to_owned)
        .collect()
}

impl ClusterMap {
    /// The presence replicas' addresses, in order (the `presence` field
    /// split at commas; a single address is one replica).
    pub fn presence_replicas(&self) -> Vec<String> {
        split_addrs(&self.presence)
    }

    /// The client addresses of the profile service's replicas (one for a
    /// single process), in map order.
    pub fn profile_replicas(&self) -> Vec<String> {
        split_addrs(&self.profile)
    }

    pub fn from_toml(text: &str) -> Result<ClusterMap, ClusterMapError> {
        let map: ClusterMap =
            toml::from_str(text).map_err(|e| ClusterMapError::Parse(e.to_string()))?;
        map.validate()?;
        Ok(map)
    }

    pub fn to_toml(&self) -> String {
        toml::to_string_pretty(self).expect("a cluster map always serializes")
    }

    pub fn validate(&self) -> Result<(), ClusterMapError> {
        if self.shards.is_empty() {
            return Err(ClusterMapError::NoShards);
        }
        let too_many = |what, count, max| ClusterMapError::TooMany { what, count, max };
        if self.shards.len() > SHARDS_MAX {
            return Err(too_many("shards", self.shards.len(), SHARDS_MAX));
        }
        if self.gateways.len() > GATEWAYS_MAX {
            return Err(too_many("gateways", self.gateways.len(), GATEWAYS_MAX));
        }
        let mut ids = std::collections::HashSet::new();
        for s in &self.shards {
            if !valid_shard_id(&s.id) {
                return Err(ClusterMapError::BadShardId(s.id.clone()));
            }
            if !ids.insert(s.id.as_str()) {
                return Err(ClusterMapError::DuplicateShard(s.id.clone()));
            }
            if s.replicas.len() > SHARD_REPLICAS_MAX {
                return Err(too_many(
                    "replicas of one shard",
                    s.replicas.len(),
                    SHARD_REPLICAS_MAX,
                ));
            }
            if s.weight == 0 || s.weight > SHARD_WEIGHT_MAX {
                return Err(ClusterMapError::BadWeight {
                    id: s.id.clone(),
                    weight: s.weight,
                });
            }
        }
        let weight: u32 = self.shards.iter().map(|s| s.weight).sum();
        if weight > MAP_WEIGHT_MAX {
            return Err(too_many(
                "units of shard weight",
                weight as usize,
                MAP_WEIGHT_MAX as usize,
            ));
        }
        let mut gateways = std::collections::HashSet::new();
        for g in &self.gateways {
            if !gateways.insert(g.id) {
                return Err(ClusterMapError::DuplicateGateway(g.id));
            }
        }
        Ok(())
    }

    pub fn shard(&self, id: &str) -> Option<&ShardEntry> {
        self.shards.iter().find(|s| s.id == id)
    }
}

fn valid_shard_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= SHARD_ID_BYTES_MAX
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"_.-".contains(&b))
}

/// Collects the exact bytes it is fed; `finish` is BLAKE2s-256's first 8
/// bytes, little-endian.
#[derive(Default)]
struct StableHasher(Vec<u8>);

impl Hasher for StableHasher {
    fn write(&mut self, bytes: &[u8]) {
        self.0.extend_from_slice(bytes);
    }
    fn finish(&self) -> u64 {
        let digest = Blake2s256::digest(&self.0);
        u64::from_le_bytes(digest[..8].try_into().expect("8 bytes"))
    }
}

/// A user as the ring hashes it: the id's 8 little-endian bytes.
struct UserKey(u64);

impl Hash for UserKey {
    fn hash<H: Hasher>(&self, state: &mut H) {
        state.write(&self.0.to_le_bytes());
    }
}

/// A shard as the ring names it: the id's UTF-8 bytes.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct ShardKey(String);

impl Hash for ShardKey {
    fn hash<H: Hasher>(&self, state: &mut H) {
        state.write(self.0.as_bytes());
    }
}

struct StableRingHash;

impl RingHash for StableRingHash {
    fn hash_item<T: Hash>(&self, item: &T) -> u64 {
        let mut h = StableHasher::default();
        item.hash(&mut h);
        h.finish()
    }

    /// Virtual node `i` of shard `s` is the bytes of `"s-i"` (decimal i).
    fn hash_vnode<K: Hash>(&self, node_key: &K, vnode_seq: usize) -> u64 {
        let mut h = StableHasher::default();
        node_key.hash(&mut h);
        h.write(format!("-{vnode_seq}").as_bytes());
        h.finish()
    }
}

/// Which shard owns which user, for one cluster map.
pub struct ShardRing {
    ring: StaticHashRing<'static, ShardKey, (), StableRingHash>,
}

impl ShardRing {
    pub fn new(shards: &[ShardEntry]) -> ShardRing {
        assert!(!shards.is_empty(), "a validated map has shards");
        let nodes = shards.iter().map(|s| {
            Node::new(ShardKey(s.id.clone())).quantity((s.weight * VNODES_PER_WEIGHT) as usize)
        });
        ShardRing {
            ring: StaticHashRing::new(StableRingHash, nodes),
        }
    }

    /// The id of the shard that owns `user`.
    pub fn owner(&self, user: u64) -> &str {
        let node = self
            .ring
            .calc_candidates(&UserKey(user))
            .next()
            .expect("a ring with shards always has a candidate");
        &node.key.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shards(ids: &[&str]) -> Vec<ShardEntry> {
        ids.iter()
            .map(|id| ShardEntry {
                id: id.to_string(),
                addr: format!("127.0.0.1:1/{id}"),
                weight: 1,
                replicas: Vec::new(),
            })
            .collect()
    }

    /// Known placements, pinned: if this changes, every deployed cluster
    /// would look for its users on the wrong shards.
    #[test]
    fn placements_are_pinned_forever() {
        let ring = ShardRing::new(&shards(&["s1", "s2", "s3"]));
        let got: Vec<&str> = (0..12).map(|u| ring.owner(u)).collect();
        assert_eq!(got, PINNED);
        assert_eq!(ring.owner(u64::MAX), PINNED_MAX);
    }

    /// Adding the (n+1)th shard moves about 1/(n+1) of the users (within
    /// 5% of that share), all of them to the new shard: none between two
    /// old shards. Removing a shard moves exactly its own users.
    #[test]
    fn adding_a_shard_moves_its_fair_share_and_only_to_it() {
        let users = 200_000u64;
        let names: Vec<String> = (1..=9).map(|i| format!("s{i}")).collect();
        for n in 2..=8 {
            let old: Vec<&str> = names[..n].iter().map(String::as_str).collect();
            let new: Vec<&str> = names[..=n].iter().map(String::as_str).collect();
            let (before, after) = (ShardRing::new(&shards(&old)), ShardRing::new(&shards(&new)));
            let mut moved = 0u64;
            for user in 0..users {
                let (a, b) = (before.owner(user), after.owner(user));
                if a != b {
                    assert_eq!(b, names[n], "user {user} moved from {a} to {b}");
                    moved += 1;
                }
                // Removing the new shard again is the reverse move.
                if b != names[n] {
                    assert_eq!(a, b);
                }
            }
            let fraction = moved as f64 / users as f64;
            let ideal = 1.0 / (n as f64 + 1.0);
            assert!(
                (fraction - ideal).abs() <= 0.05 * ideal,
                "adding shard {} of {}: {fraction:.4} moved, ideal {ideal:.4}",
                n + 1,
                n + 1
            );
        }
    }

    const PINNED: [&str; 12] = [
        "s1", "s2", "s2", "s3", "s2", "s1", "s3", "s2", "s2", "s2", "s1", "s1",
    ];
    const PINNED_MAX: &str = "s2";

    fn blake8(bytes: &[u8]) -> u64 {
        u64::from_le_bytes(Blake2s256::digest(bytes)[..8].try_into().unwrap())
    }

    /// The documented rule, computed without the crate: the owner is the
    /// virtual node with the smallest hash >= the user's hash, wrapping.
    #[test]
    fn placement_follows_the_documented_rule() {
        let ids = ["s1", "s2", "s3"];
        let ring = ShardRing::new(&shards(&ids));
        let mut vnodes: Vec<(u64, &str)> = ids
            .iter()
            .flat_map(|id| {
                (0..VNODES_PER_WEIGHT).map(move |i| (blake8(format!("{id}-{i}").as_bytes()), *id))
            })
            .collect();
        vnodes.sort();
        for user in (0..200u64).chain([u64::MAX, 1 << 40]) {
            let h = blake8(&user.to_le_bytes());
            let owner = vnodes.iter().find(|(v, _)| *v >= h).unwrap_or(&vnodes[0]).1;
            assert_eq!(ring.owner(user), owner, "user {user}");
        }
    }

    #[test]
    fn adding_a_shard_moves_only_users_to_it_and_about_a_quarter() {
        let before = ShardRing::new(&shards(&["s1", "s2", "s3"]));
        let after = ShardRing::new(&shards(&["s1", "s2", "s3", "s4"]));
        let users = 20_000u64;
        let mut moved = 0;
        for u in 0..users {
            let (a, b) = (before.owner(u), after.owner(u));
            if a != b {
                assert_eq!(b, "s4", "user {u} moved between old shards");
                moved += 1;
            }
        }
        let share = moved as f64 / users as f64;
        assert!((0.18..0.32).contains(&share), "moved share {share}");
    }

    #[test]
    fn weights_skew_the_share() {
        let mut s = shards(&["a", "b"]);
        s[1].weight = 3;
        let ring = ShardRing::new(&s);
        let b = (0..20_000u64).filter(|&u| ring.owner(u) == "b").count();
        let share = b as f64 / 20_000.0;
        assert!((0.65..0.85).contains(&share), "share {share}");
    }

    #[test]
    fn maps_round_trip_through_toml_and_are_validated() {
        let map = ClusterMap {
            epoch: 3,
            presence: "127.0.0.1:7300".into(),
            profile: "127.0.0.1:7500".into(),
            gateways: vec![GatewayEntry {
                id: 1,
                udp: "127.0.0.1:7100".into(),
                peer: "127.0.0.1:7101".into(),
            }],
            shards: shards(&["s1", "s2"]),
        };
        assert_eq!(ClusterMap::from_toml(&map.to_toml()).unwrap(), map);
        let mut bad = map.clone();
        bad.shards[1].id = "s1".into();
        assert_eq!(
            bad.validate(),
            Err(ClusterMapError::DuplicateShard("s1".into()))
        );
        bad.shards[1].id = "no spaces".into();
        assert!(matches!(
            bad.validate(),
            Err(ClusterMapError::BadShardId(_))
        ));
        bad.shards = vec![];
        assert_eq!(bad.validate(), Err(ClusterMapError::NoShards));
        let mut heavy = map.clone();
        heavy.shards[0].weight = 0;
        assert!(matches!(
            heavy.validate(),
            Err(ClusterMapError::BadWeight { .. })
        ));
        heavy.shards = shards(
            &(0..11)
                .map(|i| format!("w{i}"))
                .collect::<Vec<_>>()
                .iter()
                .map(String::as_str)
                .collect::<Vec<_>>(),
        );
        heavy
            .shards
            .iter_mut()
            .for_each(|s| s.weight = SHARD_WEIGHT_MAX);
        assert!(matches!(
            heavy.validate(),
            Err(ClusterMapError::TooMany {
                what: "units of shard weight",
                ..
            })
        ));
        assert!(matches!(
            ClusterMap::from_toml("epoch = 1\nbogus = 2"),
            Err(ClusterMapError::Parse(_))
        ));
    }
}
