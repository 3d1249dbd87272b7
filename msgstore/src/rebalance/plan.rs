//! What a rebalance changes: the map before and after, and the persisted
//! state that lets `imctl rebalance resume` finish an interrupted one.

use proto::cluster::{ClusterMap, ShardEntry, ShardRing};
use serde::{Deserialize, Serialize};
use std::{fs, path::Path};

/// Why a rebalance cannot be planned or run.
#[derive(Debug, thiserror::Error)]
pub enum RebalanceError {
    #[error("invalid plan: {0}")]
    Plan(String),
    #[error("shard {shard}: {message}")]
    Shard { shard: String, message: String },
    #[error("rebalance state file {path}: {message}")]
    State { path: String, message: String },
}

/// Move from one cluster map to the next (its epoch is one higher).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Plan {
    pub from: ClusterMap,
    pub to: ClusterMap,
}

impl Plan {
    /// Add shard `id` at `addr` with `weight`.
    pub fn add_shard(
        from: &ClusterMap,
        id: &str,
        addr: &str,
        weight: u32,
    ) -> Result<Plan, RebalanceError> {
        if from.shard(id).is_some() {
            return Err(RebalanceError::Plan(format!(
                "shard {id:?} is already in the map"
            )));
        }
        let mut to = from.clone();
        to.shards.push(ShardEntry {
            id: id.to_owned(),
            addr: addr.to_owned(),
            weight,
            replicas: Vec::new(),
        });
        Plan::new(from, to)
    }

    /// Remove shard `id`; its users go to the others.
    pub fn remove_shard(from: &ClusterMap, id: &str) -> Result<Plan, RebalanceError> {
        if from.shard(id).is_none() {
            return Err(RebalanceError::Plan(format!(
                "shard {id:?} is not in the map"
            )));
        }
        let mut to = from.clone();
        to.shards.retain(|s| s.id != id);
        Plan::new(from, to)
    }

    fn new(from: &ClusterMap, mut to: ClusterMap) -> Result<Plan, RebalanceError> {
        to.epoch = from.epoch + 1;
        to.validate()
            .map_err(|e| RebalanceError::Plan(format!("the new map would be invalid: {e}")))?;
        Ok(Plan {
            from: from.clone(),
            to,
        })
    }

    /// Every shard either map names, once: added shards, kept shards,
    /// removed shards. Routing is installed in this order, so no shard
    /// redirects a user to a shard that does not know the new map yet.
    pub fn shards(&self) -> Vec<ShardEntry> {
        let (kept, added): (Vec<ShardEntry>, Vec<ShardEntry>) = self
            .to
            .shards
            .iter()
            .cloned()
            .partition(|s| self.from.shard(&s.id).is_some());
        let removed = self
            .from
            .shards
            .iter()
            .filter(|s| self.to.shard(&s.id).is_none())
            .cloned();
        added.into_iter().chain(kept).chain(removed).collect()
    }

    /// The ring of the new map.
    pub fn target_ring(&self) -> ShardRing {
        ShardRing::new(&self.to.shards)
    }
}

/// Where an interrupted rebalance stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Phase {
    /// Shards route by both maps; users are being moved.
    Moving,
    /// Every user is moved; the new map is being installed on shards and
    /// pushed to gateways.
    Finishing,
}

/// The rebalance state file (TOML), written before each phase begins.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct State {
    pub phase: Phase,
    pub plan: Plan,
}

impl State {
    /// The state saved at `path`, if a rebalance is in progress.
    pub fn load(path: &Path) -> Result<Option<State>, RebalanceError> {
        let failed = |message: String| RebalanceError::State {
            path: path.display().to_string(),
            message,
        };
        match fs::read_to_string(path) {
            Ok(text) => toml::from_str(&text)
                .map(Some)
                .map_err(|e| failed(e.to_string())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(failed(e.to_string())),
        }
    }

    /// Save atomically and durably (temp file, fsync, rename, fsync dir).
    pub fn save(&self, path: &Path) -> Result<(), RebalanceError> {
        let failed = |e: std::io::Error| RebalanceError::State {
            path: path.display().to_string(),
            message: e.to_string(),
        };
        let text = toml::to_string_pretty(self).expect("a rebalance state always serializes");
        daemon::files::write_atomic(path, text.as_bytes()).map_err(failed)
    }

    /// The rebalance is over: forget it.
    pub fn remove(path: &Path) -> Result<(), RebalanceError> {
        match fs::remove_file(path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(RebalanceError::State {
                path: path.display().to_string(),
                message: e.to_string(),
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn map(ids: &[&str]) -> ClusterMap {
        ClusterMap {
            epoch: 3,
            presence: "127.0.0.1:7300".into(),
            profile: "127.0.0.1:7500".into(),
            gateways: vec![],
            shards: ids
                .iter()
                .map(|id| ShardEntry {
                    id: id.to_string(),
                    addr: format!("127.0.0.1:74{}", id.len()),
                    weight: 1,
                    replicas: Vec::new(),
                })
                .collect(),
        }
    }

    #[test]
    fn plans_bump_the_epoch_and_refuse_nonsense() {
        let from = map(&["s1", "s2"]);
        let add = Plan::add_shard(&from, "s3", "127.0.0.1:7403", 2).unwrap();
        assert_eq!(add.to.epoch, 4);
        assert_eq!(add.shards().len(), 3);
        assert!(Plan::add_shard(&from, "s1", "x:1", 1).is_err());
        assert!(Plan::add_shard(&from, "s3", "x:1", 0).is_err());
        let ids = |p: &Plan| p.shards().into_iter().map(|s| s.id).collect::<Vec<_>>();
        assert_eq!(ids(&add), ["s3", "s1", "s2"]);
        let remove = Plan::remove_shard(&from, "s1").unwrap();
        assert_eq!(remove.to.shards.len(), 1);
        assert_eq!(ids(&remove), ["s2", "s1"]);
        assert!(Plan::remove_shard(&from, "s9").is_err());
        assert!(Plan::remove_shard(&map(&["s1"]), "s1").is_err());
    }

    #[test]
    fn state_round_trips_through_its_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("rebalance.toml");
        assert_eq!(State::load(&path).unwrap(), None);
        let state = State {
            phase: Phase::Moving,
            plan: Plan::add_shard(&map(&["a"]), "b", "127.0.0.1:1", 1).unwrap(),
        };
        state.save(&path).unwrap();
        assert_eq!(State::load(&path).unwrap(), Some(state));
        State::remove(&path).unwrap();
        assert_eq!(State::load(&path).unwrap(), None);
        fs::write(&path, "phase = 7").unwrap();
        assert!(State::load(&path).is_err());
    }
}
