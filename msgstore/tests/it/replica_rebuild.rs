//! Replacing a replica of a shard group: one replica's disk is lost, the
//! leader compacts its log meanwhile, and the operator's steps (remove the
//! replica, start it on an empty disk, add it back) bring it back by
//! snapshot, then log; it ends holding what the others hold.

use msgstore::client::ShardClient;
use msgstore::raft::testing::{
    engine_config, engine_dir, offline_view, Group, GroupClient, Outcome, CONFIG,
};
use proto::shard::ShardRole;
use replication::peer::{admin, AdminRequest, AdminResponse, GroupStatus};
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

    replicas_hold_what_is_served(&mut group, &mut client, &config, 1100).await;
}

/// The end of a rebuild test: the leader serves `total` records in all,
/// and every replica, stopped cleanly and read offline, holds exactly
/// what the leader served.
async fn replicas_hold_what_is_served(
    group: &mut Group,
    client: &mut GroupClient,
    config: &str,
    total: usize,
) {
    let mut served = Vec::new();
    for user in 1..=USERS {
        served.push(client.fetch_all(user).await);
    }
    assert_eq!(served.iter().map(Vec::len).sum::<usize>(), total);
    for r in &mut group.replicas {
        assert!(r.terminate(), "replica {} stops cleanly", r.id);
    }
    for r in &group.replicas {
        let (dir, engine) = (engine_dir(&r.data), engine_config(config));
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

/// Wait (at most 60 s) until replica `i` has ended its rebuild (its
/// marker is gone) and its status shows it `back` in the group.
async fn wait_rebuilt(group: &Group, i: usize, back: impl Fn(&GroupStatus) -> bool) {
    let marker = group.replicas[i]
        .data
        .join(replication::rebuild::MARKER_FILE);
    let started = std::time::Instant::now();
    loop {
        let status = group.status(i).await;
        if status.as_ref().is_some_and(&back) && !marker.exists() {
            return;
        }
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "not back in the group: {status:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_follower_whose_log_is_damaged_rebuilds_itself_from_its_peers() {
    damaged_log_rebuilds(1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_whose_log_is_damaged_rebuilds_itself_from_its_peers() {
    damaged_log_rebuilds(0).await;
}

/// One byte flipped in the middle of a replica's Raft log (valid entries
/// after it: damage, not a torn tail), the replica `after_leader` places
/// after the leader (0: the leader). Restarted, it sets the damaged files
/// aside, leaves the group, comes back as a learner and is a voter again,
/// holding what the others hold; nothing acknowledged is lost. (Before,
/// it refused to start until an operator rebuilt it.)
async fn damaged_log_rebuilds(after_leader: usize) {
    let dir = tempfile::tempdir().unwrap();
    let bin = std::path::Path::new(env!("CARGO_BIN_EXE_msgstore"));
    let mut group = Group::start(bin, dir.path(), 3, CONFIG).await;
    let mut client = GroupClient::new(group.client_addrs());
    append_many(&mut client, 0, 400).await;
    group.wait_converged(Duration::from_secs(30)).await;
    let leader = group.wait_for_leader(Duration::from_secs(10)).await;
    let damaged = (leader + after_leader) % 3;
    let id = group.replicas[damaged].id;
    assert!(group.replicas[damaged].terminate(), "it stops cleanly");
    let raft_dir = group.replicas[damaged].data.join("raft");
    let segment = replication::testing::flip_a_byte_mid_log(&raft_dir);

    // A read (safe to retry) moves the client to the leader left.
    client.fetch_all(1).await;
    append_many(&mut client, 400, 100).await;
    group.replicas[damaged].start();
    let data = group.replicas[damaged].data.clone();
    wait_rebuilt(&group, damaged, |s| s.voters.contains(&id)).await;
    append_many(&mut client, 500, 100).await;
    group.wait_converged(Duration::from_secs(30)).await;
    let rebuilt = group.status(damaged).await.unwrap();
    assert_eq!(rebuilt.voters, vec![1, 2, 3], "{rebuilt:?}");
    let kept: Vec<_> = std::fs::read_dir(data.join(replication::rebuild::DAMAGED_DIR))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(kept.len(), 1, "the damaged files are kept once: {kept:?}");
    let kept_segment = kept[0].join("raft").join(segment.file_name().unwrap());
    assert!(
        kept_segment.is_file(),
        "{kept_segment:?} is kept for a look"
    );
    replicas_hold_what_is_served(&mut group, &mut client, CONFIG, 600).await;
}

/// A replica that was only a learner (an operator's `add-replica` under
/// way) when its log was damaged comes back as a learner, not a voter:
/// promoting it stays the operator's step. It still holds what the others
/// hold. (Before, every rebuilt replica came back a voter.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_learner_whose_log_is_damaged_comes_back_a_learner() {
    let dir = tempfile::tempdir().unwrap();
    let bin = std::path::Path::new(env!("CARGO_BIN_EXE_msgstore"));
    let mut group = Group::start(bin, dir.path(), 3, CONFIG).await;
    let mut client = GroupClient::new(group.client_addrs());
    append_many(&mut client, 0, 200).await;
    let leader = group.wait_for_leader(Duration::from_secs(10)).await;
    let learner = (leader + 1) % 3;
    let id = group.replicas[learner].id;
    let voters: Vec<u64> = group
        .replicas
        .iter()
        .map(|r| r.id)
        .filter(|v| *v != id)
        .collect();
    let leader_raft = group.replicas[leader].raft.to_string();
    let change = AdminRequest::ChangeMembership {
        voters: voters.clone(),
    };
    command(&leader_raft, change).await;
    let replica = group.replicas[learner].replica();
    command(&leader_raft, AdminRequest::AddLearner { id, replica }).await;
    append_many(&mut client, 200, 100).await;
    group.wait_converged(Duration::from_secs(30)).await;
    assert!(group.replicas[learner].terminate(), "it stops cleanly");
    replication::testing::flip_a_byte_mid_log(&group.replicas[learner].data.join("raft"));
    append_many(&mut client, 300, 100).await;

    group.replicas[learner].start();
    wait_rebuilt(&group, learner, |s| s.learners.contains(&id)).await;
    append_many(&mut client, 400, 100).await;
    group.wait_converged(Duration::from_secs(30)).await;
    let rebuilt = group.status(learner).await.unwrap();
    assert_eq!(rebuilt.voters, voters, "not promoted: {rebuilt:?}");
    assert_eq!(rebuilt.learners, vec![id], "{rebuilt:?}");
    let kept = group.replicas[learner]
        .data
        .join(replication::rebuild::DAMAGED_DIR);
    assert!(kept.is_dir(), "it rebuilt: the damaged log is kept");
    replicas_hold_what_is_served(&mut group, &mut client, CONFIG, 500).await;
}

/// A follower whose disk fills (its files may not grow past 1 MiB: a log
/// write fails with EFBIG) stops its Raft node and exits with a failure,
/// rather than staying up serving nothing; the other two go on answering
/// every write. Started again with room, it cuts its torn tail, catches
/// up and holds what the others hold.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_whose_disk_fills_exits_and_catches_up_once_restarted() {
    let dir = tempfile::tempdir().unwrap();
    let bin = std::path::Path::new(env!("CARGO_BIN_EXE_msgstore"));
    // Room for all of it before a checkpoint: the test's writes are not
    // held back by checkpoints (the full disk is what is tested).
    let config = CONFIG.replace("\nwal_bytes_max = 1048576", "\nwal_bytes_max = 8388608");
    assert_ne!(config, CONFIG);
    let mut group = Group::start(bin, dir.path(), 3, &config).await;
    let mut client = GroupClient::new(group.client_addrs());
    append_many(&mut client, 0, 100).await;
    let leader = group.wait_for_leader(Duration::from_secs(10)).await;
    let full = (leader + 1) % 3;
    assert!(group.replicas[full].terminate(), "it stops cleanly");
    group.replicas[full].start_with(|cmd| daemon::testing::limit_file_size(cmd, 1 << 20));

    // 1,500 messages of 1 KiB: past 1 MiB of Raft log on every replica.
    let mut total = 100;
    for round in 0..15u64 {
        let user = 1 + round % USERS;
        let outcome = client
            .call(false, |c| async move {
                let items = (0..100u64)
                    .map(|i| proto::shard::AppendItem {
                        user,
                        msg_id: u128::from(1_000_000 + round * 100 + i),
                        payload: vec![round as u8; 1024],
                    })
                    .collect();
                c.append_batch(items).await
            })
            .await;
        let stored = matches!(&outcome, Outcome::Done(r) if r.iter().all(Result::is_ok));
        assert!(stored, "round {round}: {outcome:?}");
        total += 100;
    }
    let status =
        tokio::task::block_in_place(|| group.replicas[full].wait_exit(Duration::from_secs(30)));
    let status = status.expect("the replica whose disk is full exits by itself");
    assert!(!status.success(), "{status}");

    group.replicas[full].start();
    group.wait_converged(Duration::from_secs(30)).await;
    replicas_hold_what_is_served(&mut group, &mut client, &config, total).await;
}

/// The leader's side of a rebuild refuses what it must not do: `Leave`
/// of the group's only voter fails and the group serves on; `Leave` of a
/// replica that is no member is done (nothing to do); a follower answers
/// both with `NotLeader`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leave_refuses_the_only_voter_and_a_follower_names_the_leader() {
    let dir = tempfile::tempdir().unwrap();
    let bin = std::path::Path::new(env!("CARGO_BIN_EXE_msgstore"));
    let (lone_dir, three_dir) = (dir.path().join("lone"), dir.path().join("three"));
    std::fs::create_dir_all(&lone_dir).unwrap();
    std::fs::create_dir_all(&three_dir).unwrap();
    let lone = Group::start(bin, &lone_dir, 1, CONFIG).await;
    let raft = lone.replicas[0].raft.to_string();
    let deadline = Duration::from_secs(10);
    let answer = admin(&raft, AdminRequest::Leave { id: 1 }, deadline).await;
    assert!(matches!(answer, Ok(AdminResponse::Failed(_))), "{answer:?}");
    let answer = admin(&raft, AdminRequest::Leave { id: 9 }, deadline).await;
    assert!(matches!(answer, Ok(AdminResponse::Done)), "{answer:?}");
    let mut client = GroupClient::new(lone.client_addrs());
    append_many(&mut client, 0, 10).await;

    let group = Group::start(bin, &three_dir, 3, CONFIG).await;
    let leader = group.wait_for_leader(deadline).await;
    let follower = group.replicas[(leader + 1) % 3].raft.to_string();
    let leader_raft = group.replicas[leader].raft.to_string();
    let replica = group.replicas[leader].replica();
    for request in [
        AdminRequest::Leave { id: 3 },
        AdminRequest::Rejoin { id: 3, replica },
    ] {
        let answer = admin(&follower, request, deadline).await;
        let named = matches!(&answer, Ok(AdminResponse::NotLeader { leader: Some(l) }) if *l == leader_raft);
        assert!(named, "{answer:?}");
    }
    assert_eq!(group.status(leader).await.unwrap().voters, vec![1, 2, 3]);
}
