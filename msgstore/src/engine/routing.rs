//! Which users this shard serves: the cluster maps installed by the
//! rebalance tool, persisted in `<dir>/routing.toml`, and the admission
//! rule every user request passes (`docs/STORAGE.md`, "Routing").
//!
//! A shard without a routing file serves every user (a standalone shard).

use super::state::UserState;
use crate::{Error, Result};
use proto::{cluster::ShardRing, shard::Routing};
use std::{
    fs,
    path::{Path, PathBuf},
};

/// The routing file's name in the shard directory.
pub(super) const ROUTING_FILE: &str = "routing.toml";

/// An installed routing with its rings built.
pub(super) struct RoutingTable {
    routing: Routing,
    current: ShardRing,
    target: Option<ShardRing>,
}

/// Where a request for a user goes.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Verdict {
    Serve,
    /// Answer `Moved` to this shard id.
    MovedTo(String),
}

impl RoutingTable {
    pub(super) fn new(routing: Routing) -> Result<RoutingTable> {
        let check = |m: &proto::cluster::ClusterMap| {
            m.validate()
                .map_err(|e| Error::Conflict(format!("routing map: {e}")))
        };
        check(&routing.current)?;
        if let Some(t) = &routing.target {
            check(t)?;
            if t.epoch <= routing.current.epoch {
                return Err(Error::Conflict(format!(
                    "target epoch {} is not newer than current epoch {}",
                    t.epoch, routing.current.epoch
                )));
            }
        }
        let known = |m: &proto::cluster::ClusterMap| m.shard(&routing.me).is_some();
        if !known(&routing.current) && !routing.target.as_ref().is_some_and(known) {
            return Err(Error::Conflict(format!(
                "shard {:?} is in neither map",
                routing.me
            )));
        }
        Ok(RoutingTable {
            current: ShardRing::new(&routing.current.shards),
            target: routing.target.as_ref().map(|t| ShardRing::new(&t.shards)),
            routing,
        })
    }

    pub(super) fn routing(&self) -> &Routing {
        &self.routing
    }

    /// The owner of `user` under the newest map.
    fn newest_owner(&self, user: u64) -> &str {
        self.target.as_ref().unwrap_or(&self.current).owner(user)
    }

    /// A user with a (not moved) mailbox here is served: the data is here,
    /// so this shard is its authority until the user is moved. A user
    /// without one is served only by its owner under the newest map (a
    /// shard being moved away from creates no new mailboxes).
    pub(super) fn verdict(&self, user: u64, state: Option<&UserState>) -> Verdict {
        match state {
            Some(s) if s.moved => Verdict::MovedTo(self.newest_owner(user).to_owned()),
            Some(_) => Verdict::Serve,
            None => {
                let owner = self.newest_owner(user);
                if owner == self.routing.me {
                    Verdict::Serve
                } else {
                    Verdict::MovedTo(owner.to_owned())
                }
            }
        }
    }

    /// The `Moved` error pointing at `shard`.
    pub(super) fn moved_error(&self, shard: &str) -> Error {
        let newest = self
            .routing
            .target
            .as_ref()
            .unwrap_or(&self.routing.current);
        let addr = newest
            .shard(shard)
            .or_else(|| self.routing.current.shard(shard))
            .map_or_else(String::new, |s| s.addr.clone());
        Error::Moved {
            shard: shard.to_owned(),
            addr,
            epoch: self.routing.newest_epoch(),
        }
    }

    /// Whether `next` may replace this routing: no epoch goes backwards.
    pub(super) fn check_successor(&self, next: &Routing) -> Result<()> {
        let (old, new) = (&self.routing, next);
        if new.current.epoch < old.current.epoch || new.newest_epoch() < old.newest_epoch() {
            return Err(Error::Conflict(format!(
                "routing epochs {}/{} are older than the installed {}/{}",
                new.current.epoch,
                new.newest_epoch(),
                old.current.epoch,
                old.newest_epoch()
            )));
        }
        Ok(())
    }
}

fn routing_path(dir: &Path) -> PathBuf {
    dir.join(ROUTING_FILE)
}

/// The routing persisted in `dir`'s `routing.toml`, if any.
pub(super) fn load(dir: &Path) -> Result<Option<RoutingTable>> {
    let text = match fs::read_to_string(routing_path(dir)) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e.into()),
    };
    from_text(&text, &routing_path(dir).display().to_string()).map(Some)
}

/// The routing `text` (TOML, as `routing.toml` holds it) describes;
/// `origin` names where it was read, for the error.
pub(super) fn from_text(text: &str, origin: &str) -> Result<RoutingTable> {
    let routing: Routing =
        toml::from_str(text).map_err(|e| Error::Corrupt(format!("{origin}: {e}")))?;
    RoutingTable::new(routing)
}

/// `routing` as `routing.toml` holds it.
pub(super) fn to_text(routing: &Routing) -> Result<String> {
    toml::to_string_pretty(routing)
        .map_err(|e| Error::Storage(format!("routing does not serialize: {e}")))
}

/// Persist `routing` in `dir` atomically and durably (temp file, fsync,
/// rename, fsync of the directory).
pub(super) fn store(dir: &Path, routing: &Routing) -> Result<()> {
    daemon::files::write_atomic(&routing_path(dir), to_text(routing)?.as_bytes())?;
    Ok(())
}

/// Delete `dir`'s `routing.toml` (a replicated shard keeps its routing in
/// the index), durably.
pub(super) fn remove_file(dir: &Path) -> Result<()> {
    match fs::remove_file(routing_path(dir)) {
        Ok(()) => Ok(fs::File::open(dir)?.sync_all()?),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e.into()),
    }
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;
    use proto::cluster::{ClusterMap, ShardEntry};

    /// A map of shards `ids` at `epoch` (addresses made up).
    pub(in crate::engine) fn map(epoch: u64, ids: &[&str]) -> ClusterMap {
        ClusterMap {
            epoch,
            presence: "127.0.0.1:1".into(),
            profile: "127.0.0.1:2".into(),
            gateways: vec![],
            shards: ids
                .iter()
                .map(|id| ShardEntry {
                    id: id.to_string(),
                    addr: format!("127.0.0.1:9{}", id.len()),
                    weight: 1,
                    replicas: Vec::new(),
                })
                .collect(),
        }
    }

    fn table(me: &str, current: ClusterMap, target: Option<ClusterMap>) -> RoutingTable {
        RoutingTable::new(Routing {
            me: me.into(),
            current,
            target,
        })
        .unwrap()
    }

    #[test]
    fn users_without_a_mailbox_go_to_their_newest_owner() {
        let t = table(
            "s1",
            map(1, &["s1", "s2"]),
            Some(map(2, &["s1", "s2", "s3"])),
        );
        let ring = ShardRing::new(&map(2, &["s1", "s2", "s3"]).shards);
        for user in 0..200 {
            let want = match ring.owner(user) {
                "s1" => Verdict::Serve,
                other => Verdict::MovedTo(other.to_owned()),
            };
            assert_eq!(t.verdict(user, None), want, "user {user}");
            let here = UserState::new(0);
            assert_eq!(t.verdict(user, Some(&here)), Verdict::Serve);
            let moved = UserState {
                moved: true,
                ..here
            };
            assert!(matches!(t.verdict(user, Some(&moved)), Verdict::MovedTo(_)));
        }
    }

    #[test]
    fn bad_routings_are_refused_and_epochs_never_go_back() {
        let bad = Routing {
            me: "s9".into(),
            current: map(1, &["s1"]),
            target: None,
        };
        assert!(matches!(RoutingTable::new(bad), Err(Error::Conflict(_))));
        let same_epoch = Routing {
            me: "s1".into(),
            current: map(3, &["s1"]),
            target: Some(map(3, &["s1", "s2"])),
        };
        assert!(matches!(
            RoutingTable::new(same_epoch),
            Err(Error::Conflict(_))
        ));
        let t = table("s1", map(2, &["s1"]), Some(map(3, &["s1", "s2"])));
        let older = Routing {
            me: "s1".into(),
            current: map(2, &["s1"]),
            target: None,
        };
        assert!(t.check_successor(&older).is_err());
        let finished = Routing {
            me: "s1".into(),
            current: map(3, &["s1", "s2"]),
            target: None,
        };
        assert!(t.check_successor(&finished).is_ok());
    }

    #[test]
    fn routing_persists_across_a_reload() {
        let dir = tempfile::tempdir().unwrap();
        assert!(load(dir.path()).unwrap().is_none());
        let r = Routing {
            me: "s2".into(),
            current: map(4, &["s1", "s2"]),
            target: Some(map(5, &["s2"])),
        };
        store(dir.path(), &r).unwrap();
        assert_eq!(load(dir.path()).unwrap().unwrap().routing(), &r);
        fs::write(routing_path(dir.path()), "epoch = [").unwrap();
        assert!(matches!(load(dir.path()), Err(Error::Corrupt(_))));
    }
}
