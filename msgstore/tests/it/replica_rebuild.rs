//! Replacing a replica of a shard group: one replica's disk is lost, the
//! leader compacts its log meanwhile, and the operator's steps (remove the
//! replica, start it on an empty disk, add it back) bring it back by
//! snapshot, then log; it ends holding what the others hold.

use msgstore::client::ShardClient;
use msgstore::raft::testing::{
    engine_config, engine_dir, offline_view, Group, GroupClient, Outcome, CONFIG,
};
use proto::shard::ShardRole;
use replication::peer::{admin, AdminRequest, AdminResponse};
use std::time::Duration;

const USERS: u64 = 50;

async fn append_many(client: &mut GroupClient, from: u64, n: u64) {
    for i in from..from + n {
        let user = 1 + i % USERS;
        let outcome = client
            .call(false, |c| async move {
                c.append(user, u128::from(i), i.to_le_bytes().to_vec())
                    .await
            })
            .await;
        assert!(
            matches!(outcome, Outcome::Done(_)),
            "append {i}: {outcome:?}"
        );
    }
}

/// Every replica's `Stats` names its role; the one leader is the replica
/// every follower names.
async fn roles_agree(group: &Group) {
    let leader = group.wait_for_leader(Duration::from_secs(10)).await;
    for (i, r) in group.replicas.iter().enumerate() {
        let stats = ShardClient::connect(r.client)
            .await
            .unwrap()
            .stats()
            .await
            .unwrap();
        if i == leader {
            assert_eq!(stats.role, ShardRole::Leader);
        } else {
            assert_eq!(stats.role, ShardRole::Follower);
        }
        assert_eq!(stats.leader, Some(group.replicas[leader].id), "{stats:?}");
    }
}

async fn command(addr: &str, request: AdminRequest) {
    let answer = admin(addr, request, Duration::from_secs(60)).await.unwrap();
    assert!(matches!(answer, AdminResponse::Done), "{answer:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_whose_disk_was_lost_comes_back_by_snapshot() {
    let dir = tempfile::tempdir().unwrap();
    let bin = std::path::Path::new(env!("CARGO_BIN_EXE_msgstore"));
    let config = format!(
        "{CONFIG}[raft]\nsnapshot_every_entries = 100\nlog_kept_after_snapshot_entries = 0\n"
    );
    let mut group = Group::start(bin, dir.path(), 3, &config).await;
    let mut client = GroupClient::new(group.client_addrs());
    append_many(&mut client, 0, 500).await;
    roles_agree(&group).await;

    // Replica 3 (made a follower: the leader is moved off it) loses its disk.
    let mut leader = group.wait_for_leader(Duration::from_secs(10)).await;
    if leader == 2 {
        group.replicas[2].kill();
        leader = group.wait_for_leader(Duration::from_secs(10)).await;
    }
    group.replicas[2].kill();
    std::fs::remove_dir_all(&group.replicas[2].data).unwrap();
    let leader_raft = group.replicas[leader].raft.to_string();
    command(
        &leader_raft,
        AdminRequest::ChangeMembership { voters: vec![1, 2] },
    )
    .await;
    append_many(&mut client, 500, 500).await;
    let status = group.status(leader).await.unwrap();
    let purged_past = status.snapshot_index.unwrap_or(0);
    assert!(purged_past >= 500, "the leader snapshotted: {status:?}");

    group.replicas[2].start();
    let replica = group.replicas[2].replica();
    command(&leader_raft, AdminRequest::AddLearner { id: 3, replica }).await;
    command(
        &leader_raft,
        AdminRequest::ChangeMembership {
            voters: vec![1, 2, 3],
        },
    )
    .await;
    append_many(&mut client, 1000, 100).await;
    group.wait_converged(Duration::from_secs(30)).await;
    let rebuilt = group.status(2).await.unwrap();
    assert!(
        rebuilt.snapshot_index.is_some(),
        "it came back by a snapshot: {rebuilt:?}"
    );
    assert_eq!(rebuilt.voters, vec![1, 2, 3]);

    let mut served = Vec::new();
    for user in 1..=USERS {
        served.push(client.fetch_all(user).await);
    }
    assert_eq!(served.iter().map(Vec::len).sum::<usize>(), 1100);
    for r in &mut group.replicas {
        assert!(r.terminate(), "replica {} stops cleanly", r.id);
    }
    for r in &group.replicas {
        let (dir, engine) = (engine_dir(&r.data), engine_config(&config));
        let view = tokio::task::spawn_blocking(move || offline_view(&dir, engine, 1..=USERS))
            .await
            .unwrap();
        assert!(
            view == served,
            "replica {} holds what the leader served",
            r.id
        );
    }
}
