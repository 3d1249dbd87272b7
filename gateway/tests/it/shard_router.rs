//! The gateway's shard router (`gateway::shards`) against a real shard
//! group of three `msgstore` processes.

use crate::support::start_group;
use gateway::shards::Shards;
use proto::cluster::{ClusterMap, ShardEntry};
use std::time::Duration;

/// A read (the figures a login shows) asked of a shard group whose leader
/// is paused (SIGSTOP, as a machine that stalls) is answered by the leader
/// the other two elect. It used to wait on the paused one until it woke.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_is_answered_by_a_new_leader_while_the_old_one_is_paused() {
    let dir = tempfile::tempdir().unwrap();
    let group = start_group(dir.path()).await;
    let leader = group.wait_for_leader(Duration::from_secs(10)).await;
    let replicas: Vec<String> = group.client_addrs().iter().map(|a| a.to_string()).collect();
    let map = ClusterMap {
        epoch: 1,
        presence: "127.0.0.1:1".into(),
        profile: "127.0.0.1:1".into(),
        gateways: Vec::new(),
        shards: vec![ShardEntry {
            id: "g1".into(),
            // The leader first: the router's first try goes to it.
            addr: replicas[leader].clone(),
            weight: 1,
            replicas,
        }],
    };
    let shards = Shards::new(map, 5_000);
    for msg_id in 0..3u128 {
        shards.append(7, msg_id, b"hello".to_vec()).await.unwrap();
    }

    group.replicas[leader].signal(libc::SIGSTOP);
    // Bounded only so that the old behaviour fails rather than hangs.
    let stats = tokio::time::timeout(Duration::from_secs(30), shards.user_stats(7)).await;
    group.replicas[leader].signal(libc::SIGCONT);
    let stats = stats.expect("answered while the old leader is paused");
    assert_eq!(stats.unwrap().last_seq, 3);
}
