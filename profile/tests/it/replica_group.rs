//! A profile group of three replicas as real processes: accounts written
//! through whichever replica leads survive the leader's SIGKILL, every
//! replica checks passwords and serves reads (never older than a write
//! answered before), a replica that was down while the others compacted
//! their logs comes back by snapshot and holds the same, a paused
//! (SIGSTOP) leader holds up neither reads nor new writes, and a leader
//! cut off from the other two (as root, in network namespaces) makes the
//! client look for the new one.

use daemon::{
    netns::Net,
    testing::{free_addr, metric, DaemonProcess},
};
use profile::{client::LoginClaim, ClientConfig, ProfileClient};
use proto::profile::ErrorCode;
use replication::{
    peer::{admin, AdminRequest, AdminResponse, GroupStatus},
    Replica,
};
use std::{collections::BTreeMap, net::SocketAddr, path::Path, process::Command, time::Duration};

const DEADLINE: Duration = Duration::from_secs(20);

/// Small snapshots, so a replica down for a few writes misses purged log.
const CONFIG: &str = "[raft]\nsnapshot_every_entries = 8\nlog_kept_after_snapshot_entries = 0\n";

struct Member {
    id: u64,
    client: SocketAddr,
    raft: SocketAddr,
    metrics: SocketAddr,
    /// The network namespace it runs in (partition tests), if any.
    netns: Option<String>,
    process: Option<DaemonProcess>,
}

impl Member {
    fn start(&mut self, dir: &Path) {
        self.start_with(dir, |_| {});
    }

    /// Start it with `adjust` applied to its command first.
    fn start_with(&mut self, dir: &Path, adjust: impl FnOnce(&mut Command)) {
        let data = dir.join(format!("replica{}", self.id));
        let config = dir.join("profile.toml");
        let bin = std::path::Path::new(env!("CARGO_BIN_EXE_profile"));
        let mut cmd = match &self.netns {
            Some(ns) => daemon::netns::command_in(ns, bin),
            None => Command::new(bin),
        };
        cmd.arg("--config").arg(&config);
        cmd.arg("--data").arg(&data);
        cmd.args(["--listen", &self.client.to_string()]);
        cmd.args(["--metrics-addr", &self.metrics.to_string()]);
        cmd.args(["--raft-id", &self.id.to_string()]);
        cmd.args(["--raft-listen", &self.raft.to_string()]);
        adjust(&mut cmd);
        self.process = Some(DaemonProcess::start(cmd, "profile", DEADLINE));
    }

    fn signal(&self, sig: libc::c_int) {
        self.process.as_ref().expect("running").signal(sig);
    }

    /// SIGTERM it and check that it stopped cleanly.
    fn stop(&mut self) {
        let status = self.process.take().expect("running").terminate();
        assert!(
            status.success(),
            "replica {} stopped with {status}",
            self.id
        );
    }

    fn kill(&mut self) {
        if let Some(p) = self.process.take() {
            p.kill();
        }
    }

    async fn status(&self) -> Option<GroupStatus> {
        let addr = self.raft.to_string();
        match admin(&addr, AdminRequest::Status, Duration::from_secs(2)).await {
            Ok(AdminResponse::Status(s)) => Some(s),
            _ => None,
        }
    }
}

struct Group {
    members: Vec<Member>,
    dir: tempfile::TempDir,
}

impl Group {
    async fn start() -> Group {
        Group::start_in(None).await
    }

    /// A group whose member `i` runs in host `i` of `net`, if given.
    async fn start_in(net: Option<&Net>) -> Group {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("profile.toml"), CONFIG).unwrap();
        let at = |i: usize| {
            let free = free_addr();
            net.map_or(free, |net| net.socket_addr(i, free.port()))
        };
        let mut members: Vec<Member> = (1..=3)
            .map(|id| Member {
                id,
                client: at(id as usize - 1),
                raft: at(id as usize - 1),
                metrics: at(id as usize - 1),
                netns: net.map(|net| net.namespace(id as usize - 1).to_string()),
                process: None,
            })
            .collect();
        for m in &mut members {
            m.start(dir.path());
        }
        let replicas: BTreeMap<u64, Replica> = members
            .iter()
            .map(|m| {
                let replica = Replica {
                    raft_addr: m.raft.to_string(),
                    client_addr: m.client.to_string(),
                };
                (m.id, replica)
            })
            .collect();
        let init = AdminRequest::Init { members: replicas };
        let answer = admin(&members[0].raft.to_string(), init, DEADLINE)
            .await
            .unwrap();
        assert!(matches!(answer, AdminResponse::Done), "{answer:?}");
        Group { members, dir }
    }

    /// The index of the member that leads, once one does.
    async fn leader(&self) -> usize {
        let started = std::time::Instant::now();
        while started.elapsed() < DEADLINE {
            for (i, m) in self.members.iter().enumerate() {
                if m.process.is_none() {
                    continue;
                }
                if let Some(s) = m.status().await.filter(|s| s.role == "leader") {
                    assert_eq!(s.id, m.id);
                    return i;
                }
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("no leader within {DEADLINE:?}");
    }

    fn addrs(&self) -> String {
        let addrs: Vec<String> = self.members.iter().map(|m| m.client.to_string()).collect();
        addrs.join(",")
    }
}

fn config() -> ClientConfig {
    ClientConfig {
        request_timeout_ms: 10_000,
        reconnect_min_ms: 20,
        reconnect_max_ms: 200,
        ..ClientConfig::default()
    }
}

/// A client of the whole group that tries the next replica after
/// `replica_attempt_ms` without an answer.
async fn group_client(group: &Group, replica_attempt_ms: u64) -> ProfileClient {
    let config = ClientConfig {
        replica_attempt_ms,
        ..config()
    };
    ProfileClient::connect_with(group.addrs(), config)
        .await
        .unwrap()
}

/// A client of the one replica `m` (reads and password checks there).
async fn one(m: &Member) -> ProfileClient {
    ProfileClient::connect_with(m.client.to_string(), config())
        .await
        .unwrap()
}

/// Create `user{from}`..`user{to}`, as an application does: a create cut
/// off by a replica's death (disconnected, timed out, unavailable: it may
/// or may not have been done) is sent again, and `UsernameTaken` then
/// means the first one was.
async fn create(client: &ProfileClient, from: u32, to: u32) -> Vec<(String, u64)> {
    let mut made = Vec::new();
    for i in from..to {
        let name = format!("user{i}");
        let password = format!("password-{i}");
        let mut retried = false;
        let id = loop {
            match client.create_user(&name, password.as_bytes()).await {
                Ok(id) => break id,
                Err(e) if retried && e.code() == Some(ErrorCode::UsernameTaken) => {
                    break client.lookup(&name).await.unwrap();
                }
                Err(e) if e.code().is_none_or(|c| c == ErrorCode::Unavailable) => {
                    retried = true;
                }
                Err(e) => panic!("create {name}: {e}"),
            }
        };
        made.push((name, id));
    }
    made
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_profile_group_keeps_every_account_through_a_leader_kill_and_rebuilds_by_snapshot() {
    let mut group = Group::start().await;
    let client = ProfileClient::connect_with(group.addrs(), config())
        .await
        .unwrap();
    let mut made = create(&client, 0, 6).await;
    // A follower refuses a write and names the leader; the client follows.
    let leader = group.leader().await;
    let follower = (leader + 1) % 3;
    let lone = one(&group.members[follower]).await;
    let refused = lone.create_user("nobody", b"password-x").await.unwrap_err();
    assert_eq!(refused.code(), Some(ErrorCode::Unavailable), "{refused}");

    // The leader dies; writes go on through the new one.
    group.members[leader].kill();
    made.extend(create(&client, 6, 24).await);
    let new_leader = group.leader().await;
    assert_ne!(new_leader, leader);
    let user = made[3].1;
    client
        .set_profile(user, Some("renamed"), None)
        .await
        .unwrap();

    // The killed replica comes back after the log it missed was purged.
    let dir = group.dir.path().to_owned();
    group.members[leader].start(&dir);
    let back = &group.members[leader];
    let started = std::time::Instant::now();
    while metric(back.metrics, "profile_raft_snapshots_installed_total").await < 1.0 {
        assert!(
            started.elapsed() < DEADLINE,
            "the restarted replica installed no snapshot"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // Every replica holds every account, checks its password and shows
    // the write answered last.
    for m in &group.members {
        let at = one(m).await;
        for (name, id) in &made {
            assert_eq!(at.lookup(name).await.unwrap(), *id, "{name} at {}", m.id);
        }
        let (name, id) = &made[made.len() - 1];
        let i = &name["user".len()..];
        let checked = at
            .check_password(name, format!("password-{i}").as_bytes())
            .await
            .unwrap();
        assert_eq!(checked, *id);
        let wrong = at
            .check_password(name, b"not-the-password")
            .await
            .unwrap_err();
        assert_eq!(wrong.code(), Some(ErrorCode::WrongCredentials));
        let profile = at.get_profile(user).await.unwrap();
        assert_eq!(profile.nickname, "renamed", "at replica {}", m.id);
    }
    for m in &mut group.members {
        m.kill();
    }
}

/// The leader is paused (SIGSTOP): reads go on at the others (one that
/// hits the paused replica is tried at the next within
/// `replica_attempt_ms`), and once a new leader is elected new writes go
/// there; after SIGCONT the old leader follows and holds every write.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_leader_holds_up_neither_reads_nor_new_writes() {
    let mut group = Group::start().await;
    let client = group_client(&group, 500).await;
    let mut made = create(&client, 0, 4).await;
    let leader = group.leader().await;
    group.members[leader].signal(libc::SIGSTOP);
    // Every read is answered, by the two replicas that run.
    for _ in 0..2 {
        for (name, id) in &made {
            assert_eq!(client.lookup(name).await.unwrap(), *id, "{name}");
        }
    }
    // A new leader among the others; writes reach it.
    let paused = group.members[leader].process.take();
    let new_leader = group.leader().await;
    assert_ne!(new_leader, leader);
    made.extend(create(&client, 4, 8).await);
    group.members[leader].process = paused;
    group.members[leader].signal(libc::SIGCONT);
    let back = one(&group.members[leader]).await;
    for (name, id) in &made {
        assert_eq!(
            back.lookup(name).await.unwrap(),
            *id,
            "{name} at the old leader"
        );
    }
    for m in &mut group.members {
        m.kill();
    }
}

/// The leader is paused (SIGSTOP) with a write in flight and no read to
/// notice: that write is awaited (it may be done), but once it is not
/// answered within `replica_attempt_ms` the writes after it look for the
/// new leader and are done while the old one is still paused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_unanswered_at_a_paused_leader_sends_the_next_writes_elsewhere() {
    let mut group = Group::start().await;
    let client = group_client(&group, 300).await;
    let mut made = create(&client, 0, 2).await;
    let leader = group.leader().await;
    group.members[leader].signal(libc::SIGSTOP);
    let in_flight = tokio::spawn({
        let client = client.clone();
        async move { client.create_user("held", b"password-held").await }
    });
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert!(!in_flight.is_finished(), "a paused leader answered");
    // Were the next writes queued at the paused leader, they would wait
    // for the client's whole request timeout and fail, again and again.
    let next = tokio::time::timeout(DEADLINE, create(&client, 2, 4)).await;
    made.extend(next.expect("the writes after a stuck one found the new leader"));
    group.members[leader].signal(libc::SIGCONT);
    if let Ok(id) = in_flight.await.unwrap() {
        made.push(("held".into(), id));
    }
    let new_leader = group.leader().await;
    let check = one(&group.members[new_leader]).await;
    for (name, id) in &made {
        assert_eq!(check.lookup(name).await.unwrap(), *id, "{name}");
    }
    for m in &mut group.members {
        m.kill();
    }
}

/// The leader is paused (SIGSTOP) as a login is claimed: the claim
/// carries its own number, so it is not awaited at the paused leader (as
/// a write that may have been done is) but sent to the next replica once
/// `replica_attempt_ms` passes, and is claimed at the leader the other two
/// elect while the old one is still paused. A replay of that login (the
/// same `login_ns`, another claim) is stale.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_login_claimed_as_its_leader_is_paused_is_claimed_at_the_next_one() {
    let mut group = Group::start().await;
    let client = group_client(&group, 300).await;
    let user = create(&client, 0, 1).await[0].1;
    let leader = group.leader().await;
    group.members[leader].signal(libc::SIGSTOP);
    // Awaited at the paused leader, it would end with the client's
    // request timeout (10 s) as `Timeout`, or not before DEADLINE.
    let claim = tokio::time::timeout(DEADLINE, client.claim_login(user, 1_000))
        .await
        .expect("the claim ended");
    assert!(
        matches!(&claim, Ok(LoginClaim::Fresh(r)) if r.user == user),
        "{claim:?}"
    );
    let replay = client.claim_login(user, 1_000).await.unwrap();
    assert_eq!(replay, LoginClaim::Stale { last_ns: 1_000 });
    group.members[leader].signal(libc::SIGCONT);
    group.leader().await;
    assert_eq!(
        client.claim_login(user, 1_000).await.unwrap(),
        LoginClaim::Stale { last_ns: 1_000 },
        "the group holds the claim with the old leader back"
    );
    for m in &mut group.members {
        m.kill();
    }
}

/// The leader is cut off from the other two replicas (not from the
/// client): a write it takes is answered `Unavailable` once it cannot
/// commit it, and the writes after that find the leader the other two
/// elect, while the partition lasts. Needs root and `ip netns`; skipped
/// with a message without them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_a_cut_off_leader_cannot_commit_sends_the_next_ones_to_the_new_leader() {
    let net = match Net::setup("pp", 3) {
        Ok(net) => net,
        Err(why) => {
            eprintln!("SKIPPED: cannot make network namespaces here ({why})");
            return;
        }
    };
    let mut group = Group::start_in(Some(&net)).await;
    let client = ProfileClient::connect_with(group.addrs(), config())
        .await
        .unwrap();
    let mut made = create(&client, 0, 2).await;
    let old = group.leader().await;
    let others: Vec<usize> = (0..3).filter(|i| *i != old).collect();
    net.isolate_from(old, &others).unwrap();
    // The first write after the cut goes to the old leader, which cannot
    // commit it: answered Unavailable (it may still be done), or done if
    // it raced the cut.
    match client.create_user("cut", b"password-cut").await {
        Ok(id) => made.push(("cut".into(), id)),
        Err(e) => assert_eq!(e.code(), Some(ErrorCode::Unavailable), "{e}"),
    }
    // Were the next writes sent to the old leader again, each would be
    // answered Unavailable while the partition lasts.
    let next = tokio::time::timeout(DEADLINE, create(&client, 2, 4)).await;
    made.extend(next.expect("the writes after an unavailable one found the new leader"));
    net.heal_from(old, &others).unwrap();
    let leader = group.leader().await;
    let check = one(&group.members[leader]).await;
    for (name, id) in &made {
        assert_eq!(check.lookup(name).await.unwrap(), *id, "{name}");
    }
    for m in &mut group.members {
        m.kill();
    }
    drop(group);
    drop(net);
}

/// A follower whose disk fills (its files may not grow past 1 MiB) stops
/// its Raft node and exits with a failure, rather than staying up serving
/// nothing; the other two go on taking writes. Started again with room, it
/// catches up and serves what was written meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_whose_disk_fills_exits_and_catches_up_once_restarted() {
    let mut group = Group::start().await;
    let leader = group.leader().await;
    let client = one(&group.members[leader]).await;
    let made = create(&client, 0, 24).await;
    let full = (leader + 1) % 3;
    group.members[full].stop();
    let dir = group.dir.path().to_path_buf();
    group.members[full].start_with(&dir, |cmd| daemon::testing::limit_file_size(cmd, 1 << 20));

    // 24 users' avatars of 64 KiB: 1.5 MiB on every replica, in its log
    // and its store (and in a snapshot, for a replica sent one).
    let mut last = None;
    let image = |i: u32| profile::avatar::samples::png(64, 64 + i, 64 * 1024);
    for (i, (_, user)) in (0..).zip(&made) {
        last = Some(client.set_avatar(*user, image(i)).await.unwrap());
    }
    let process = group.members[full].process.as_mut().expect("running");
    let status =
        tokio::task::block_in_place(|| daemon::testing::wait_exit(&mut process.child, DEADLINE));
    let status = status.expect("the replica whose disk is full exits by itself");
    assert!(!status.success(), "{status}");

    group.members[full].process = None;
    group.members[full].start(&dir);
    let (hash, _) = last.expect("avatars were set");
    let caught_up = one(&group.members[full]).await;
    assert_eq!(caught_up.avatar(hash).await.unwrap(), image(23));
}

/// One byte flipped in the middle of a follower's Raft log (valid entries
/// after it: damage, not a torn tail). Restarted, the follower sets the
/// log aside, leaves the group, comes back as a learner and is a voter
/// again; it then serves every account, also those made while it was out.
/// (Before, it refused to start until an operator rebuilt it.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_whose_log_is_damaged_rebuilds_itself_from_its_peers() {
    let mut group = Group::start().await;
    let leader = group.leader().await;
    let client = one(&group.members[leader]).await;
    let mut made = create(&client, 0, 20).await;
    let damaged = (leader + 1) % 3;
    group.members[damaged].stop();
    let dir = group.dir.path().to_path_buf();
    let data = dir.join(format!("replica{}", group.members[damaged].id));
    replication::testing::flip_a_byte_mid_log(&data.join("raft"));

    made.extend(create(&client, 20, 30).await);
    group.members[damaged].start(&dir);
    let id = group.members[damaged].id;
    let marker = data.join(replication::rebuild::MARKER_FILE);
    let started = std::time::Instant::now();
    loop {
        let status = group.members[damaged].status().await;
        if status.as_ref().is_some_and(|s| s.voters.contains(&id)) && !marker.exists() {
            break;
        }
        assert!(
            started.elapsed() < DEADLINE,
            "not a voter again: {status:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let kept = data.join(replication::rebuild::DAMAGED_DIR);
    assert_eq!(
        std::fs::read_dir(&kept).unwrap().count(),
        1,
        "the damaged log is kept"
    );
    made.extend(create(&client, 30, 35).await);
    let at = one(&group.members[damaged]).await;
    for (name, user) in &made {
        assert_eq!(at.lookup(name).await.unwrap(), *user, "{name}");
    }
}
