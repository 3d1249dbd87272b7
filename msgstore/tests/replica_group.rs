//! A replicated shard group of three real `msgstore` processes under
//! concurrent appends, fetches and acks from several clients, while
//! replicas are killed (SIGKILL, the leader half the time) and restarted.
//! After the run: every acknowledged append is present once at its seq,
//! seqs are gap-free, no acknowledged ack is undone, and every replica
//! holds the same mailboxes.

use msgstore::raft::testing::{
    engine_config, engine_dir, offline_view, Group, GroupClient, Model, Outcome, CONFIG,
};
use rand::{rngs::StdRng, Rng, SeedableRng};
use std::{
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Mutex,
    },
    time::Duration,
};

const USERS: u64 = 40;

fn seed() -> u64 {
    std::env::var("GROUP_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(rand::random)
}

async fn appender(
    addrs: Vec<std::net::SocketAddr>,
    model: Arc<Mutex<Model>>,
    stop: Arc<AtomicBool>,
    mut rng: StdRng,
) {
    let mut client = GroupClient::new(addrs);
    while !stop.load(Ordering::Relaxed) {
        let user = rng.gen_range(1..=USERS);
        let msg_id: u128 = rng.gen();
        let payload = msg_id.to_le_bytes().to_vec();
        let outcome = client
            .call(false, |c| {
                let payload = payload.clone();
                async move { c.append(user, msg_id, payload).await }
            })
            .await;
        let mut m = model.lock().unwrap();
        match outcome {
            Outcome::Done(seq) => {
                m.acked.entry(user).or_default().insert(msg_id, seq);
            }
            Outcome::Unknown => m.maybe.entry(user).or_default().push(msg_id),
            Outcome::Refused(code) => panic!("append refused: {code:?}"),
        }
    }
}

/// Fetch a user's records and ack up to the one before the newest.
async fn acker(
    addrs: Vec<std::net::SocketAddr>,
    model: Arc<Mutex<Model>>,
    stop: Arc<AtomicBool>,
    mut rng: StdRng,
) {
    let mut client = GroupClient::new(addrs);
    while !stop.load(Ordering::Relaxed) {
        let user = rng.gen_range(1..=USERS);
        let acked_before = model.lock().unwrap().acked_up_to.get(&user).copied();
        let records = client.fetch_all(user).await;
        if let Err(e) = Model::check_live(user, &records, acked_before.unwrap_or(0)) {
            panic!("{e} (served by {})", client.current());
        }
        if records.len() < 2 {
            tokio::time::sleep(Duration::from_millis(20)).await;
            continue;
        }
        let up_to = records[records.len() - 2].seq;
        let outcome = client
            .call(true, |c| async move { c.ack(user, up_to).await })
            .await;
        if let Outcome::Done(_) = outcome {
            let mut m = model.lock().unwrap();
            let at = m.acked_up_to.entry(user).or_default();
            *at = (*at).max(up_to);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_group_of_three_keeps_every_acknowledged_write_through_kills() {
    let seed = seed();
    eprintln!("GROUP_SEED={seed}");
    let mut rng = StdRng::seed_from_u64(seed);
    // Kept on failure (the replicas' logs are in it), removed on success.
    let dir = tempfile::tempdir().unwrap().keep();
    eprintln!("replica data and logs in {}", dir.display());
    let bin = std::path::Path::new(env!("CARGO_BIN_EXE_msgstore"));
    let mut group = Group::start(bin, &dir, 3, CONFIG).await;
    let model = Arc::new(Mutex::new(Model::default()));
    let stop = Arc::new(AtomicBool::new(false));
    let mut tasks = Vec::new();
    for i in 0..3 {
        let r = StdRng::seed_from_u64(seed ^ (i + 1));
        tasks.push(tokio::spawn(appender(
            group.client_addrs(),
            model.clone(),
            stop.clone(),
            r,
        )));
    }
    tasks.push(tokio::spawn(acker(
        group.client_addrs(),
        model.clone(),
        stop.clone(),
        StdRng::seed_from_u64(seed ^ 99),
    )));
    let rounds = std::env::var("GROUP_ROUNDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(20);
    for round in 0..rounds {
        tokio::time::sleep(Duration::from_millis(rng.gen_range(100..600))).await;
        let leader = group.wait_for_leader(Duration::from_secs(10)).await;
        let victim = if rng.gen_bool(0.5) {
            leader
        } else {
            (leader + rng.gen_range(1..3)) % 3
        };
        eprintln!(
            "round {round}: kill replica {} (leader {})",
            victim + 1,
            leader + 1
        );
        group.replicas[victim].kill();
        tokio::time::sleep(Duration::from_millis(rng.gen_range(100..800))).await;
        group.replicas[victim].start();
    }
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        t.await.expect("a client task panicked");
    }
    group.wait_converged(Duration::from_secs(30)).await;

    let m = std::mem::take(&mut *model.lock().unwrap());
    let acked: usize = m.acked.values().map(|v| v.len()).sum();
    assert!(acked > 100, "too few appends were acknowledged: {acked}");
    let mut client = GroupClient::new(group.client_addrs());
    let mut digests = Vec::new();
    let mut leader_view = Vec::new();
    for user in 1..=USERS {
        let records = client.fetch_all(user).await;
        m.check_user(user, &records).unwrap();
        leader_view.push(records);
    }
    // Every replica's own state, read offline after a clean stop.
    for r in &mut group.replicas {
        assert!(r.terminate(), "replica {} did not stop cleanly", r.id);
    }
    for r in &group.replicas {
        let dir = engine_dir(&r.data);
        let view = move || offline_view(&dir, engine_config(CONFIG), 1..=USERS);
        digests.push(tokio::task::spawn_blocking(view).await.unwrap());
    }
    for (i, d) in digests.iter().enumerate() {
        assert!(
            d == &leader_view,
            "replica {} differs from what the leader served",
            i + 1
        );
    }
    eprintln!("acknowledged appends: {acked}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// A leader killed and started again at once must not serve a read from
/// the state its last checkpoint and saved commit point give it. openraft
/// 0.9 restores such a node as leader of the same term with that commit
/// point as its read index; the commit point is a hint written without a
/// sync, so it may lag (here: it is lost). The node now starts as a
/// follower. Elections are slow here, so no other replica takes over
/// before the restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_restarted_at_once_never_serves_an_older_state() {
    let dir = tempfile::tempdir().unwrap();
    let bin = std::path::Path::new(env!("CARGO_BIN_EXE_msgstore"));
    let config =
        format!("{CONFIG}[raft]\nelection_timeout_min_ms = 3000\nelection_timeout_max_ms = 4000\n");
    let mut group = Group::start(bin, dir.path(), 3, &config).await;
    let user = 7;
    for round in 0..2u64 {
        let mut client = GroupClient::new(group.client_addrs());
        let mut last = 0;
        for i in 0..300u64 {
            let id = u128::from(round * 1000 + i);
            let outcome = client
                .call(false, |c| async move { c.append(user, id, vec![1]).await })
                .await;
            let Outcome::Done(seq) = outcome else {
                panic!("append: {outcome:?}");
            };
            last = seq;
        }
        let acked = client
            .call(true, |c| async move { c.ack(user, last - 1).await })
            .await;
        assert!(matches!(acked, Outcome::Done(_)), "{acked:?}");
        let leader = group.wait_for_leader(Duration::from_secs(30)).await;
        group.replicas[leader].kill();
        let _ = std::fs::remove_file(group.replicas[leader].data.join("raft/committed"));
        group.replicas[leader].start();
        let mut addrs = group.client_addrs();
        addrs.rotate_left(leader);
        let mut reader = GroupClient::new(addrs);
        let records = reader.fetch_all(user).await;
        let seqs: Vec<u64> = records.iter().map(|r| r.seq).collect();
        assert_eq!(
            seqs,
            vec![last],
            "round {round}: read after the ack of {}",
            last - 1
        );
    }
}
