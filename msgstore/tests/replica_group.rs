//! A replicated shard group of three real `msgstore` processes under
//! concurrent appends, fetches and acks from several clients, while
//! replicas are killed (SIGKILL, the leader half the time) and restarted.
//! After the run: every acknowledged append is present once at its seq,
//! seqs are gap-free, no acknowledged ack is undone, and every replica
//! holds the same mailboxes.

use msgstore::raft::testing::{engine_dir, Group, GroupClient, Model, Outcome, CONFIG};
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
            panic!("{e}");
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
    let dir = tempfile::tempdir().unwrap();
    let bin = std::path::Path::new(env!("CARGO_BIN_EXE_msgstore"));
    let mut group = Group::start(bin, dir.path(), 3, CONFIG).await;
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

    let m = model.lock().unwrap();
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
        digests.push(
            tokio::task::spawn_blocking(move || offline_view(&dir))
                .await
                .unwrap(),
        );
    }
    for (i, d) in digests.iter().enumerate() {
        assert!(
            d == &leader_view,
            "replica {} differs from what the leader served",
            i + 1
        );
    }
    eprintln!("acknowledged appends: {acked}");
}

/// Every user's live records as the engine in `dir` holds them, read
/// with the daemon stopped.
fn offline_view(dir: &std::path::Path) -> Vec<Vec<msgstore::StoredRecord>> {
    let shard = msgstore::Shard::open(dir, test_engine_config()).unwrap();
    let mut users = Vec::new();
    for user in 1..=USERS {
        let mut records: Vec<msgstore::StoredRecord> = Vec::new();
        loop {
            let after = records.last().map_or(0, |r| r.seq);
            let page = shard.fetch(user, after, 1000, 1 << 20).wait().unwrap();
            records.extend(page.records);
            if !page.more {
                break;
            }
        }
        users.push(records);
    }
    shard.close().unwrap();
    users
}

fn test_engine_config() -> msgstore::EngineConfig {
    msgstore::daemon::DaemonConfig::parse(CONFIG)
        .unwrap()
        .engine
}
