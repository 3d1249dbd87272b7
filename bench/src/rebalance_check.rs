//! The cheap correctness check after `imbench rebalance`: every user's
//! mailbox is at its owner under the new map, no shard holds a user it does
//! not own, and every append acknowledged as stored is either still there
//! (exactly once, in gap-free sequence order) or was drained.

use crate::rebalance_load::{msg_user, Ledger, Router};
use anyhow::{Context, Result};
use msgstore::client::ShardClient;
use proto::{
    cluster::{ClusterMap, ShardRing},
    shard::{FETCH_BYTES_MAX, FETCH_COUNT_MAX, LIST_USERS_MAX},
};
use serde::Serialize;
use std::{collections::HashSet, net::SocketAddr, sync::Arc};
use tokio::task::JoinSet;

/// Users read back at once.
const CHECK_TASKS: u64 = 32;

/// What the check found; every count but the totals must be 0.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Check {
    pub users_checked: u64,
    /// Users the shards list (each shard only its own).
    pub users_listed: u64,
    pub messages_present: u64,
    /// Appends the load and the prefill saw acknowledged as stored.
    pub acknowledged_appends: u64,
    /// Of those, drained (fetched and acknowledged) by the load.
    pub drained: u64,
    /// Acknowledged as stored, neither present nor drained.
    pub lost: u64,
    /// Present more than once.
    pub duplicated: u64,
    /// Present in another user's mailbox, or with a payload that is not
    /// its own.
    pub misplaced: u64,
    /// Sequence numbers of a mailbox that skip.
    pub seq_gaps: u64,
    /// Present but never sent (neither stored nor of unknown fate).
    pub phantom: u64,
    /// Drained (acknowledged by the reader) yet present again.
    pub resurrected: u64,
    /// Users listed by a shard that does not own them under the new map.
    pub users_at_wrong_shard: u64,
}

impl Check {
    pub fn failures(&self) -> u64 {
        self.lost
            + self.duplicated
            + self.misplaced
            + self.seq_gaps
            + self.phantom
            + self.resurrected
            + self.users_at_wrong_shard
    }
}

/// One user's mailbox as its owner under `map` holds it.
struct Mailbox {
    ids: Vec<u128>,
    misplaced: u64,
    seq_gaps: u64,
}

async fn read_mailbox(router: &Router, user: u64, payload_bytes: usize) -> Result<Mailbox> {
    let client = router.client(&router.owner_addr(user)).await?;
    let mut mailbox = Mailbox {
        ids: Vec::new(),
        misplaced: 0,
        seq_gaps: 0,
    };
    let (mut after, mut prev) = (0, None);
    loop {
        let (records, more) = client
            .fetch(user, after, FETCH_COUNT_MAX, FETCH_BYTES_MAX)
            .await
            .with_context(|| format!("fetch user {user} at its new owner"))?;
        for r in &records {
            if prev.is_some_and(|p: u64| r.seq != p + 1) {
                mailbox.seq_gaps += 1;
            }
            prev = Some(r.seq);
            let own = r.payload.len() == payload_bytes.max(16)
                && r.payload[..16] == r.msg_id.to_le_bytes()
                && msg_user(r.msg_id) == user;
            mailbox.misplaced += u64::from(!own);
            mailbox.ids.push(r.msg_id);
        }
        match (more, records.last()) {
            (true, Some(last)) => after = last.seq,
            _ => return Ok(mailbox),
        }
    }
}

/// Every user the shard at `addr` lists (holds a mailbox for).
pub async fn list_users(addr: SocketAddr) -> Result<Vec<u64>> {
    let client = ShardClient::connect(addr).await?;
    let (mut start, mut all) = (0, Vec::new());
    loop {
        let (users, next) = client.list_users(start, LIST_USERS_MAX).await?;
        all.extend(users.iter().map(|u| u.user));
        match next {
            Some(n) => start = n,
            None => return Ok(all),
        }
    }
}

/// Check `users` users against `map` (the final one); `shards` are every
/// shard that ran, with their ids.
pub async fn check(
    map: &ClusterMap,
    shards: &[(String, SocketAddr)],
    users: u64,
    payload_bytes: usize,
    ledger: &Ledger,
) -> Result<Check> {
    let router = Arc::new(Router::new(map));
    let mut tasks = JoinSet::new();
    for t in 0..CHECK_TASKS {
        let router = router.clone();
        tasks.spawn(async move {
            let mut boxes = Vec::new();
            for user in (t..users).step_by(CHECK_TASKS as usize) {
                boxes.push(read_mailbox(&router, user, payload_bytes).await?);
            }
            anyhow::Ok(boxes)
        });
    }
    let mut c = Check {
        users_checked: users,
        acknowledged_appends: ledger.stored.len() as u64,
        ..Check::default()
    };
    let mut present = HashSet::new();
    while let Some(done) = tasks.join_next().await {
        for b in done?? {
            c.misplaced += b.misplaced;
            c.seq_gaps += b.seq_gaps;
            c.messages_present += b.ids.len() as u64;
            for id in b.ids {
                c.duplicated += u64::from(!present.insert(id));
            }
        }
    }
    let drained: HashSet<u128> = ledger.drained.iter().copied().collect();
    let stored: HashSet<u128> = ledger.stored.iter().copied().collect();
    let unknown: HashSet<u128> = ledger.unknown.iter().copied().collect();
    for id in &stored {
        if drained.contains(id) {
            c.drained += 1;
        } else if !present.contains(id) {
            c.lost += 1;
        }
    }
    c.resurrected = drained.iter().filter(|id| present.contains(id)).count() as u64;
    c.phantom = present
        .iter()
        .filter(|id| !stored.contains(id) && !unknown.contains(id))
        .count() as u64;
    let ring = ShardRing::new(&map.shards);
    for (id, addr) in shards {
        let listed = list_users(*addr).await?;
        c.users_at_wrong_shard += listed.iter().filter(|&&u| ring.owner(u) != id).count() as u64;
        c.users_listed += listed.len() as u64;
    }
    Ok(c)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rebalance_load::{msg_id, payload};
    use proto::cluster::ShardEntry;

    /// One in-process shard (small bucket fan-out) and a map naming it.
    async fn shard(dir: &std::path::Path) -> (msgstore::daemon::Daemon, ClusterMap) {
        let mut c = msgstore::daemon::DaemonConfig {
            listen: "127.0.0.1:0".parse().unwrap(),
            data: Some(dir.to_path_buf()),
            ..Default::default()
        };
        c.engine.bucket_dirs = 4;
        c.engine.bucket_files = 4;
        let daemon = msgstore::daemon::start(c).await.unwrap();
        let map = ClusterMap {
            epoch: 1,
            presence: "127.0.0.1:1".into(),
            profile: "127.0.0.1:1".into(),
            gateways: vec![],
            shards: vec![ShardEntry {
                id: "s0".into(),
                addr: daemon.local_addr().to_string(),
                weight: 1,
                replicas: Vec::new(),
            }],
        };
        (daemon, map)
    }

    #[tokio::test]
    async fn the_check_finds_lost_resurrected_phantom_and_misplaced_messages() {
        let dir = tempfile::tempdir().unwrap();
        let (daemon, map) = shard(dir.path()).await;
        let client = ShardClient::connect(daemon.local_addr()).await.unwrap();
        let mut ledger = Ledger::default();
        let store = async |user: u64, id: u128| {
            client.append(user, id, payload(id, 16)).await.unwrap();
        };
        for n in 1..=3 {
            store(0, msg_id(0, 1, n)).await;
            ledger.stored.push(msg_id(0, 1, n));
        }
        store(1, msg_id(1, 1, 1)).await;
        store(0, msg_id(0, 2, 1)).await; // never in the ledger: phantom
        store(2, msg_id(5, 1, 1)).await; // another user's message: misplaced
        ledger.stored.extend([msg_id(1, 1, 1), msg_id(5, 1, 1)]);
        ledger.stored.push(msg_id(0, 1, 99)); // acknowledged, never stored: lost
        client.ack(1, 1).await.unwrap();
        ledger.drained.push(msg_id(1, 1, 1)); // drained for real
        ledger.drained.push(msg_id(0, 1, 1)); // "drained" yet present: resurrected
        let shards = [("s0".to_owned(), daemon.local_addr())];
        let c = check(&map, &shards, 3, 16, &ledger).await.unwrap();
        assert_eq!(c.messages_present, 5);
        assert_eq!(c.acknowledged_appends, 6);
        assert_eq!(c.drained, 2);
        assert_eq!(
            (c.lost, c.resurrected, c.phantom, c.misplaced),
            (1, 1, 1, 1)
        );
        assert_eq!(
            (c.duplicated, c.seq_gaps, c.users_at_wrong_shard),
            (0, 0, 0)
        );
        assert_eq!(c.users_listed, 3);
        assert_eq!(c.failures(), 4);
        // A shard not in the map that lists users holds them wrongly.
        let stray = [("s9".to_owned(), daemon.local_addr())];
        let c = check(&map, &stray, 3, 16, &ledger).await.unwrap();
        assert_eq!(c.users_at_wrong_shard, 3);
        daemon.shutdown().await.unwrap();
    }
}
