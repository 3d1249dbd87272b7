//! `imbench failover`: a replicated shard group of three real `msgstore`
//! processes under steady appends; the leader is SIGKILLed again and again
//! (and restarted). Measures how long appends stop after each kill (from
//! the kill to the first append acknowledged after it) and checks that no
//! acknowledged append was lost or stored twice.

use crate::report::write_json;
use anyhow::{Context, Result};
use clap::Args;
use msgstore::raft::testing::{Group, GroupClient, Outcome};
use rand::{rngs::StdRng, Rng, SeedableRng};
use serde::Serialize;
use std::{
    collections::{BTreeMap, HashMap},
    net::SocketAddr,
    path::PathBuf,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Mutex,
    },
    time::{Duration, Instant},
};

#[derive(Args, Debug)]
pub struct FailoverArgs {
    /// Five kills, a short run: under a minute.
    #[arg(long)]
    pub quick: bool,
    /// Also write the results as JSON to this file.
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// Leader kills [default: 20; quick: 5].
    #[arg(long)]
    pub kills: Option<usize>,
    /// Concurrent appenders (one request in flight each).
    #[arg(long, default_value_t = 16)]
    pub writers: usize,
    /// Users the appends go to.
    #[arg(long, default_value_t = 10_000)]
    pub users: u64,
    #[arg(long, default_value_t = 200)]
    pub payload_bytes: usize,
    /// Steady load between a restart and the next kill, in ms.
    #[arg(long, default_value_t = 1_500)]
    pub interval_ms: u64,
}

/// Engine settings of the group (the defaults, with a smaller fan-out so a
/// run starts in seconds).
const CONFIG: &str = "[engine]\nbucket_dirs = 16\nbucket_files = 16\n";

#[derive(Debug, Serialize, Default)]
struct Ratios {
    acked_lost: u64,
    duplicated: u64,
    kills: u64,
    failover_ms_p50: f64,
    failover_ms_max: f64,
}

#[derive(Debug, Serialize)]
struct Report {
    ratios: Ratios,
    failovers_ms: Vec<f64>,
    appends_acked: u64,
    appends_unknown: u64,
    appends_per_s: f64,
    config: serde_json::Value,
}

/// What the writers were told.
#[derive(Default)]
struct Told {
    acked: HashMap<u64, BTreeMap<u128, u64>>,
    unknown: u64,
    /// Nanoseconds since `start` of the newest append each replica (by
    /// client address) acknowledged.
    newest_ack_ns: HashMap<std::net::SocketAddr, u64>,
}

struct Shared {
    told: Mutex<Told>,
    stop: AtomicBool,
    start: Instant,
}

pub async fn run(args: FailoverArgs) -> Result<()> {
    let kills = args.kills.unwrap_or(if args.quick { 5 } else { 20 });
    let dir = tempfile::tempdir()?;
    let exe = std::env::current_exe()?;
    let bin = daemon::testing::workspace_binary(&exe, "msgstore");
    let mut group = Group::start(&bin, dir.path(), 3, CONFIG).await;
    let shared = Arc::new(Shared {
        told: Mutex::default(),
        stop: AtomicBool::new(false),
        start: Instant::now(),
    });
    let writers: Vec<_> = (0..args.writers)
        .map(|i| {
            let (shared, addrs) = (shared.clone(), group.client_addrs());
            let (users, bytes) = (args.users, args.payload_bytes);
            tokio::spawn(writer(shared, addrs, users, bytes, i as u64))
        })
        .collect();
    let mut failovers = Vec::new();
    for kill in 0..kills {
        tokio::time::sleep(Duration::from_millis(args.interval_ms)).await;
        let leader = group.wait_for_leader(Duration::from_secs(30)).await;
        let old_term = group.status(leader).await.map_or(0, |s| s.term);
        let killed_ns = shared.start.elapsed().as_nanos() as u64;
        group.replicas[leader].kill();
        let killed = group.replicas[leader].client;
        // What bounds a failover: the election (timeouts, and a round
        // more whenever a candidate's log is behind), then the clients
        // finding the new leader.
        let elected = async {
            let new = group.wait_for_leader(Duration::from_secs(60)).await;
            let ms = (shared.start.elapsed().as_nanos() as u64 - killed_ns) as f64 / 1e6;
            let term = group.status(new).await.map_or(0, |s| s.term);
            (ms, term.saturating_sub(old_term))
        };
        let (ms, (elected_ms, terms)) =
            tokio::join!(wait_for_ack_after(&shared, killed_ns, killed), elected);
        let ms = ms?;
        println!(
            "kill {}: replica {} (leader); a new leader after {elected_ms:.1} ms \
             ({terms} term(s) on), appends again after {ms:.1} ms",
            kill + 1,
            leader + 1
        );
        failovers.push(ms);
        group.replicas[leader].start();
    }
    tokio::time::sleep(Duration::from_millis(args.interval_ms)).await;
    shared.stop.store(true, Ordering::Relaxed);
    for w in writers {
        w.await.context("a writer failed")?;
    }
    let elapsed = shared.start.elapsed().as_secs_f64();
    group.wait_converged(Duration::from_secs(60)).await;
    let (lost, duplicated) = check(&group, &shared).await;
    for r in &mut group.replicas {
        r.terminate();
    }
    let told = shared.told.lock().unwrap_or_else(|p| p.into_inner());
    let acked: u64 = told.acked.values().map(|m| m.len() as u64).sum();
    let report = Report {
        ratios: Ratios {
            acked_lost: lost,
            duplicated,
            kills: failovers.len() as u64,
            failover_ms_p50: percentile(&failovers, 0.5),
            failover_ms_max: failovers.iter().copied().fold(0.0, f64::max),
        },
        failovers_ms: failovers,
        appends_acked: acked,
        appends_unknown: told.unknown,
        appends_per_s: acked as f64 / elapsed,
        config: serde_json::json!({
            "replicas": 3, "writers": args.writers, "users": args.users,
            "payload_bytes": args.payload_bytes, "interval_ms": args.interval_ms,
            "engine": CONFIG, "heartbeat_ms": 50, "election_timeout_ms": "200-400",
        }),
    };
    print(&report);
    if let Some(path) = &args.json {
        write_json(path, "failover", &report)?;
    }
    Ok(())
}

async fn writer(
    shared: Arc<Shared>,
    addrs: Vec<std::net::SocketAddr>,
    users: u64,
    payload_bytes: usize,
    seed: u64,
) {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut client = GroupClient::new(addrs);
    while !shared.stop.load(Ordering::Relaxed) {
        let user = rng.gen_range(1..=users);
        let msg_id: u128 = rng.gen();
        let payload = vec![b'x'; payload_bytes];
        let outcome = client
            .call(false, |c| {
                let payload = payload.clone();
                async move { c.append(user, msg_id, payload).await }
            })
            .await;
        let now = shared.start.elapsed().as_nanos() as u64;
        let mut told = shared.told.lock().unwrap_or_else(|p| p.into_inner());
        match outcome {
            Outcome::Done(seq) => {
                told.acked.entry(user).or_default().insert(msg_id, seq);
                let newest = told.newest_ack_ns.entry(client.current()).or_default();
                *newest = (*newest).max(now);
            }
            Outcome::Unknown | Outcome::Refused(_) => told.unknown += 1,
        }
    }
}

/// Milliseconds from `killed_ns` to the first append acknowledged after it.
async fn wait_for_ack_after(shared: &Shared, killed_ns: u64, killed: SocketAddr) -> Result<f64> {
    let limit = Instant::now() + Duration::from_secs(60);
    loop {
        let newest = {
            let told = shared.told.lock().unwrap_or_else(|p| p.into_inner());
            told.newest_ack_ns
                .iter()
                .filter(|(addr, _)| **addr != killed)
                .map(|(_, ns)| *ns)
                .max()
        };
        if let Some(ns) = newest.filter(|&ns| ns > killed_ns) {
            return Ok((ns - killed_ns) as f64 / 1e6);
        }
        anyhow::ensure!(
            Instant::now() < limit,
            "no append acknowledged within 60 s of a kill"
        );
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

/// Acknowledged appends missing, and records stored more than once.
async fn check(group: &Group, shared: &Shared) -> (u64, u64) {
    let users: Vec<(u64, BTreeMap<u128, u64>)> = {
        let told = shared.told.lock().unwrap_or_else(|p| p.into_inner());
        told.acked.iter().map(|(u, m)| (*u, m.clone())).collect()
    };
    let mut client = GroupClient::new(group.client_addrs());
    let (mut lost, mut duplicated) = (0, 0);
    for (user, acked) in users {
        let records = client.fetch_all(user).await;
        let mut count: HashMap<u128, u64> = HashMap::new();
        for r in &records {
            *count.entry(r.msg_id).or_default() += 1;
        }
        duplicated += count.values().map(|c| c - 1).sum::<u64>();
        lost += acked
            .iter()
            .filter(|(id, seq)| !records.iter().any(|r| r.msg_id == **id && r.seq == **seq))
            .count() as u64;
    }
    (lost, duplicated)
}

fn percentile(values: &[f64], q: f64) -> f64 {
    if values.is_empty() {
        return 0.0;
    }
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    v[((v.len() - 1) as f64 * q).round() as usize]
}

fn print(r: &Report) {
    println!(
        "\nappends acknowledged: {} ({:.0}/s), outcome unknown: {}",
        r.appends_acked, r.appends_per_s, r.appends_unknown
    );
    println!("ratios:");
    println!("  acked_lost       {} (must be 0)", r.ratios.acked_lost);
    println!("  duplicated       {} (must be 0)", r.ratios.duplicated);
    println!("  kills            {}", r.ratios.kills);
    println!("  failover_ms_p50  {:.1}", r.ratios.failover_ms_p50);
    println!(
        "  failover_ms_max  {:.1} (target < 3000)",
        r.ratios.failover_ms_max
    );
}
