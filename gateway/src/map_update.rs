//! Which cluster map the gateway routes by. At start: the newest epoch of
//! the `--cluster` file, the map saved in the data directory, and the
//! `current` map of every shard's routing it reaches in time (so a gateway
//! that was down during a rebalance picks up the map it missed). At run
//! time: a newer map pushed over the peer link (`imctl rebalance`, see
//! [`crate::map_push`]), saved before it is used.

use crate::shards::Shards;
use msgstore::client::ShardClient;
use proto::{
    cluster::{ClusterMap, ClusterMapError},
    peer::MapAnswer,
};
use std::{
    fs,
    path::{Path, PathBuf},
    time::Duration,
};

/// The accepted map, in the gateway's data directory.
pub const MAP_FILE: &str = "cluster-map.toml";

#[derive(Debug, thiserror::Error)]
pub enum MapFileError {
    #[error("cannot read the saved cluster map {path}: {error}")]
    Read {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("the saved cluster map {path} is bad: {error}")]
    Bad {
        path: PathBuf,
        error: ClusterMapError,
    },
}

/// The map saved in `dir`, if any.
pub fn load_saved(dir: &Path) -> Result<Option<ClusterMap>, MapFileError> {
    let path = dir.join(MAP_FILE);
    match fs::read_to_string(&path) {
        Ok(text) => ClusterMap::from_toml(&text)
            .map(Some)
            .map_err(|error| MapFileError::Bad { path, error }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(error) => Err(MapFileError::Read { path, error }),
    }
}

/// Save `map` in `dir` atomically and durably: temp file, fsync, rename,
/// fsync of the directory.
pub fn save(dir: &Path, map: &ClusterMap) -> std::io::Result<()> {
    daemon::files::write_atomic(&dir.join(MAP_FILE), map.to_toml().as_bytes())
}

/// The newest valid `current` map among the routings of `map`'s shards
/// that answer within `timeout` (shards without a routing, or unreachable,
/// add nothing).
pub async fn newest_from_shards(map: &ClusterMap, timeout: Duration) -> Option<ClusterMap> {
    let mut asks = tokio::task::JoinSet::new();
    for shard in &map.shards {
        let addr = shard.addr.clone();
        asks.spawn(tokio::time::timeout(timeout, async move {
            ShardClient::connect(addr.as_str())
                .await
                .ok()?
                .get_routing()
                .await
                .ok()?
        }));
    }
    let mut newest: Option<ClusterMap> = None;
    while let Some(answer) = asks.join_next().await {
        let Ok(Ok(Some(routing))) = answer else {
            continue;
        };
        let current = routing.current;
        if current.validate().is_ok() && newest.as_ref().is_none_or(|n| current.epoch > n.epoch) {
            newest = Some(current);
        }
    }
    newest
}

/// The map to start with (see the module doc); saved in `dir` if it is
/// newer than the saved one.
pub async fn choose_at_start(
    file: ClusterMap,
    dir: &Path,
    discovery_timeout: Duration,
) -> Result<ClusterMap, MapFileError> {
    let saved = load_saved(dir)?;
    let saved_epoch = saved.as_ref().map(|m| m.epoch);
    let mut best = newer(file, saved);
    if !discovery_timeout.is_zero() {
        if let Some(found) = newest_from_shards(&best, discovery_timeout).await {
            best = newer(best, Some(found));
        }
    }
    if saved_epoch.is_none_or(|e| best.epoch > e) {
        if let Err(error) = save(dir, &best) {
            // Not fatal: the map is still in use, and the sources it came
            // from still hold it.
            tracing::warn!(%error, "cannot save the cluster map in the data directory");
        }
    }
    tracing::info!(epoch = best.epoch, "routing by cluster map");
    Ok(best)
}

/// `a`, unless `b` has a newer epoch.
fn newer(a: ClusterMap, b: Option<ClusterMap>) -> ClusterMap {
    match b {
        Some(b) if b.epoch > a.epoch => b,
        _ => a,
    }
}

/// Takes maps pushed at run time, one at a time, so the saved map and the
/// map in use only ever move forward together.
pub struct MapKeeper {
    dir: PathBuf,
    busy: tokio::sync::Mutex<()>,
}

impl MapKeeper {
    /// Save accepted maps in `dir`.
    pub fn new(dir: PathBuf) -> MapKeeper {
        MapKeeper {
            dir,
            busy: tokio::sync::Mutex::new(()),
        }
    }

    /// Route by `map` if it is newer than the one in use: save it, then
    /// use it. The same map again is accepted (a tool may retry).
    pub async fn offer(&self, shards: &Shards, map: ClusterMap) -> MapAnswer {
        let _one_at_a_time = self.busy.lock().await;
        let in_use = shards.map();
        let answer = if map.validate().is_err() {
            MapAnswer::Invalid {
                epoch: in_use.epoch,
            }
        } else if map == *in_use {
            MapAnswer::Accepted {
                epoch: in_use.epoch,
            }
        } else if map.epoch <= in_use.epoch {
            MapAnswer::Older {
                epoch: in_use.epoch,
            }
        } else {
            self.save_and_adopt(shards, map).await
        };
        let outcome = match answer {
            MapAnswer::Accepted { .. } => "accepted",
            MapAnswer::Older { .. } => "older",
            MapAnswer::Invalid { .. } => "invalid",
            MapAnswer::Storage { .. } => "storage",
        };
        metrics::counter!("gateway_map_updates_total", "outcome" => outcome).increment(1);
        answer
    }

    async fn save_and_adopt(&self, shards: &Shards, map: ClusterMap) -> MapAnswer {
        let dir = self.dir.clone();
        let saved = tokio::task::spawn_blocking(move || save(&dir, &map).map(|()| map))
            .await
            .unwrap_or_else(|e| Err(std::io::Error::other(e)));
        match saved {
            Ok(map) => MapAnswer::Accepted {
                epoch: shards.adopt(map),
            },
            Err(error) => {
                tracing::warn!(%error, "cannot save a pushed cluster map; keeping the old one");
                MapAnswer::Storage {
                    epoch: shards.map().epoch,
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proto::cluster::ShardEntry;

    fn map(epoch: u64, shards: &[&str]) -> ClusterMap {
        ClusterMap {
            epoch,
            presence: "127.0.0.1:1".into(),
            profile: "127.0.0.1:2".into(),
            gateways: vec![],
            shards: shards
                .iter()
                .map(|id| ShardEntry {
                    id: id.to_string(),
                    addr: format!("127.0.0.1:{}", 10 + id.len()),
                    weight: 1,
                    replicas: Vec::new(),
                })
                .collect(),
        }
    }

    #[tokio::test]
    async fn only_newer_valid_maps_are_adopted_and_saved() {
        let dir = tempfile::tempdir().unwrap();
        let shards = Shards::new(map(2, &["s1"]), 0);
        let keeper = MapKeeper::new(dir.path().to_path_buf());
        let older = keeper.offer(&shards, map(1, &["s1", "s2"])).await;
        assert_eq!(older, MapAnswer::Older { epoch: 2 });
        let same_epoch = keeper.offer(&shards, map(2, &["s1", "s2"])).await;
        assert_eq!(same_epoch, MapAnswer::Older { epoch: 2 });
        assert_eq!(load_saved(dir.path()).unwrap(), None, "nothing saved");
        let invalid = keeper.offer(&shards, map(9, &[])).await;
        assert_eq!(invalid, MapAnswer::Invalid { epoch: 2 });
        let newer = keeper.offer(&shards, map(3, &["s1", "s2"])).await;
        assert_eq!(newer, MapAnswer::Accepted { epoch: 3 });
        assert_eq!(shards.map().epoch, 3);
        assert_eq!(load_saved(dir.path()).unwrap(), Some(map(3, &["s1", "s2"])));
        let again = keeper.offer(&shards, map(3, &["s1", "s2"])).await;
        assert_eq!(again, MapAnswer::Accepted { epoch: 3 });
    }

    #[tokio::test]
    async fn a_map_that_cannot_be_saved_is_not_used() {
        let dir = tempfile::tempdir().unwrap();
        let shards = Shards::new(map(1, &["s1"]), 0);
        let keeper = MapKeeper::new(dir.path().join("missing"));
        let answer = keeper.offer(&shards, map(2, &["s1", "s2"])).await;
        assert_eq!(answer, MapAnswer::Storage { epoch: 1 });
        assert_eq!(shards.map().epoch, 1);
    }

    #[tokio::test]
    async fn silent_or_missing_shards_add_nothing_within_the_deadline() {
        let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let closed = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mut m = map(1, &["s1", "s2"]);
        m.shards[0].addr = silent.local_addr().unwrap().to_string();
        m.shards[1].addr = closed.local_addr().unwrap().to_string();
        drop(closed);
        let held = tokio::spawn(async move { silent.accept().await });
        let found = newest_from_shards(&m, Duration::from_millis(100)).await;
        assert_eq!(found, None);
        held.abort();
    }

    #[tokio::test]
    async fn the_start_takes_the_newest_of_the_file_and_the_saved_map() {
        let dir = tempfile::tempdir().unwrap();
        let none = Duration::ZERO;
        let chosen = choose_at_start(map(4, &["s1"]), dir.path(), none).await;
        assert_eq!(chosen.unwrap().epoch, 4);
        assert_eq!(load_saved(dir.path()).unwrap().unwrap().epoch, 4, "saved");
        let chosen = choose_at_start(map(3, &["s9"]), dir.path(), none).await;
        assert_eq!(chosen.unwrap(), map(4, &["s1"]), "the saved one is newer");
        fs::write(dir.path().join(MAP_FILE), "epoch = [").unwrap();
        let bad = choose_at_start(map(3, &["s9"]), dir.path(), none).await;
        assert!(matches!(bad, Err(MapFileError::Bad { .. })));
    }
}
