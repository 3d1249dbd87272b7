//! A replicated shard group of three real `msgstore` processes, each in
//! its own network namespace, under concurrent appends, fetches and acks,
//! while the leader is cut off from the other two replicas (not from the
//! test's clients) for about 3 s, three times. It proves that:
//!
//! * the isolated leader commits nothing: a write sent to it while it is
//!   cut off is answered `Unavailable` (or `NotLeader`) or not at all;
//! * the majority side elects a new leader during each partition and
//!   acknowledges appends before the partition heals;
//! * there is never more than one leader per term (checked at every look
//!   for the leader, during the partitions too);
//! * after healing, every acknowledged append is present exactly once at
//!   its seq, seqs are gap-free, no acknowledged ack is undone (also
//!   checked by every fetch during the run), every replica converges and
//!   every replica's own engine holds the same mailboxes.
//!
//! The network is a `daemon::netns::Net`: a bridge in the root namespace
//! (the clients' side) and one namespace per replica, the replica's
//! client and raft ports bound to its address. A partition is
//! `Net::isolate_from`: an nftables table in the isolated replica's
//! namespace dropping its traffic to and from the other two replicas'
//! addresses both ways; where `nft` is missing (or
//! `PARTITION_WITH=routes`), blackhole routes do it instead.
//!
//! Needs root and `ip netns` (iproute2): without them the test prints why
//! and passes without running.

use daemon::netns::Net;
use msgstore::{
    client::{ClientError, ShardClient},
    raft::testing::{seed_from_env, Group, Load, CONFIG},
};
use proto::shard::ShardErrorCode;
use rand::{rngs::StdRng, Rng, SeedableRng};
use std::{
    net::SocketAddr,
    sync::atomic::{AtomicU64, Ordering},
    time::{Duration, Instant},
};

const USERS: u64 = 40;
const REPLICAS: usize = 3;
const ROUNDS: usize = 3;
/// How long a partition lasts at least.
const PARTITION: Duration = Duration::from_secs(3);
/// Generous limits for the majority side's liveness during a partition.
const ELECTION_LIMIT: Duration = Duration::from_secs(20);
const PROGRESS_LIMIT: Duration = Duration::from_secs(20);
const CLIENT_PORT: u16 = 7100;
const RAFT_PORT: u16 = 7200;
/// Names the run's namespaces and interfaces (`daemon::netns`).
const NET_TAG: &str = "sp";

/// Appends acknowledged per replica (by the one the client talked to).
/// Send one append straight to the isolated leader: it must not be
/// acknowledged. Returns the append (user, msg_id) for the model's maybe
/// list (an unanswered write may be committed later).
async fn probe_isolated(addr: SocketAddr, user: u64, msg_id: u128) -> (u64, u128) {
    let answer = tokio::time::timeout(Duration::from_secs(10), async {
        let c = ShardClient::connect(addr).await?;
        c.append(user, msg_id, vec![0xee]).await
    })
    .await;
    match answer {
        Err(_) => eprintln!("  the isolated leader did not answer the probe"),
        Ok(Err(ClientError::Shard(e)))
            if matches!(
                e.code,
                ShardErrorCode::Unavailable | ShardErrorCode::NotLeader { .. }
            ) =>
        {
            eprintln!("  the isolated leader answered the probe {:?}", e.code)
        }
        Ok(answer) => panic!("the isolated leader {addr} answered an append with {answer:?}"),
    }
    (user, msg_id)
}

fn served_by(served: &[AtomicU64], replicas: impl Iterator<Item = usize>) -> u64 {
    replicas.map(|i| served[i].load(Ordering::Relaxed)).sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_group_of_three_keeps_every_acknowledged_write_through_partitions() {
    let net = match Net::setup(NET_TAG, REPLICAS) {
        Ok(net) => net,
        Err(why) => {
            eprintln!(
                "SKIPPED replica_partition: cannot make network namespaces here ({why}); \
                 the test needs root and `ip netns`"
            );
            return;
        }
    };
    eprintln!(
        "network 10.77.{}.0/24, namespaces {:?}, partitions by {:?}",
        net.subnet(),
        (0..REPLICAS).map(|i| net.namespace(i)).collect::<Vec<_>>(),
        net.cut()
    );
    let seed = seed_from_env();
    let mut rng = StdRng::seed_from_u64(seed);
    // Kept on failure (the replicas' logs are in it), removed on success.
    let dir = tempfile::tempdir().unwrap().keep();
    eprintln!("replica data and logs in {}", dir.display());
    let bin = std::path::Path::new(env!("CARGO_BIN_EXE_msgstore"));
    let places = (0..REPLICAS)
        .map(|i| {
            (
                net.socket_addr(i, CLIENT_PORT),
                net.socket_addr(i, RAFT_PORT),
                Some(net.namespace(i).to_string()),
            )
        })
        .collect();
    // Declared after `net`: dropped (replicas killed) before it.
    let mut group = Group::start_with(bin, &dir, CONFIG, places).await;
    let addrs = group.client_addrs();

    let load = Load::new(addrs.clone(), USERS);
    let served = load.served.clone();
    let tasks = load.start(seed);

    for round in 0..ROUNDS {
        tokio::time::sleep(Duration::from_millis(rng.gen_range(500..1000))).await;
        let old = group.wait_for_leader(Duration::from_secs(10)).await;
        let majority = move || (0..REPLICAS).filter(move |j| *j != old);
        let before = served_by(&served, majority());
        let others: Vec<usize> = majority().collect();
        net.isolate_from(old, &others).expect("cut the leader off");
        let cut_at = Instant::now();
        eprintln!("round {round}: replica {} (leader) isolated", old + 1);
        let probe = tokio::spawn(probe_isolated(
            addrs[old],
            rng.gen_range(1..=USERS),
            rng.gen(),
        ));

        // A new leader on the majority side (one leader per term is
        // checked at every look).
        let new = loop {
            let leader = group.wait_for_leader(ELECTION_LIMIT).await;
            if leader != old {
                break leader;
            }
            assert!(
                cut_at.elapsed() < ELECTION_LIMIT,
                "round {round}: no new leader within {ELECTION_LIMIT:?} of isolating replica {}",
                old + 1
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        let elected = cut_at.elapsed();
        // ... which acknowledges appends while the partition lasts.
        while served_by(&served, majority()) == before {
            assert!(
                cut_at.elapsed() < PROGRESS_LIMIT,
                "round {round}: the majority side acknowledged no append within \
                 {PROGRESS_LIMIT:?} of the partition"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let progressed = cut_at.elapsed();
        while cut_at.elapsed() < PARTITION {
            tokio::time::sleep(Duration::from_millis(250)).await;
            group.wait_for_leader(ELECTION_LIMIT).await;
        }
        let (user, msg_id) = probe.await.expect("the probe panicked");
        load.model
            .lock()
            .unwrap()
            .maybe
            .entry(user)
            .or_default()
            .push(msg_id);
        let during = served_by(&served, majority()) - before;
        net.heal_from(old, &others).expect("heal the partition");
        eprintln!(
            "round {round}: replica {} elected after {elected:?}, first append acknowledged \
             by the majority after {progressed:?}, {during} during the partition; healed \
             after {:?}",
            new + 1,
            cut_at.elapsed()
        );
        let healed_at = Instant::now();
        let leader = group.wait_for_leader(Duration::from_secs(10)).await;
        eprintln!(
            "round {round}: leader after healing: replica {} ({:?})",
            leader + 1,
            healed_at.elapsed()
        );
    }
    load.stop.store(true, Ordering::Relaxed);
    for t in tasks {
        t.await.expect("a client task panicked");
    }
    let converge_at = Instant::now();
    let applied = group.wait_converged(Duration::from_secs(30)).await;
    eprintln!(
        "converged at index {applied} in {:?}",
        converge_at.elapsed()
    );

    let m = std::mem::take(&mut *load.model.lock().unwrap());
    let acked: usize = m.acked.values().map(|v| v.len()).sum();
    let unknown: usize = m.maybe.values().map(|v| v.len()).sum();
    assert!(acked > 50, "too few appends were acknowledged: {acked}");
    group.check_against(&m, USERS, CONFIG).await;
    let served: Vec<u64> = served.iter().map(|s| s.load(Ordering::Relaxed)).collect();
    eprintln!(
        "acknowledged appends: {acked} (per replica {served:?}), unknown outcomes: {unknown}"
    );
    drop(group);
    drop(net);
    let _ = std::fs::remove_dir_all(&dir);
}
