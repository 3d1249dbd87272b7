//! `imctl rebalance` against real msgstore processes while writers keep
//! appending through the gateway's shard router still on the old map (it
//! follows `Moved` and waits out `Busy`). Afterwards every acknowledged
//! message is stored exactly once, sequence numbers run on without a gap,
//! and each shard holds only users it owns under the new map.

use crate::common;

use daemon::testing::DaemonProcess;
use gateway::shards::ShardCallError;
use msgstore::client::ShardClient;
use proto::cluster::{ClusterMap, ShardEntry, ShardRing};
use std::{
    collections::{HashMap, HashSet},
    path::{Path, PathBuf},
    process::Command,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Mutex,
    },
    time::Duration,
};

const WAIT: Duration = Duration::from_secs(30);

struct Shard {
    id: String,
    data: PathBuf,
    addr: std::net::SocketAddr,
    process: Option<DaemonProcess>,
}

impl Shard {
    fn start(dir: &Path, id: &str) -> Shard {
        let data = dir.join(id);
        let process = spawn_shard(&data, "127.0.0.1:0");
        Shard {
            id: id.to_owned(),
            addr: process.addr,
            data,
            process: Some(process),
        }
    }

    fn entry(&self) -> ShardEntry {
        ShardEntry {
            id: self.id.clone(),
            addr: self.addr.to_string(),
            weight: 1,
            replicas: Vec::new(),
        }
    }

    fn kill_and_restart(&mut self) {
        if let Some(p) = self.process.take() {
            p.kill();
        }
        self.process = Some(spawn_shard(&self.data, &self.addr.to_string()));
    }
}

fn spawn_shard(data: &Path, listen: &str) -> DaemonProcess {
    let bin = daemon::testing::workspace_binary(Path::new(env!("CARGO_BIN_EXE_imctl")), "msgstore");
    let mut cmd = Command::new(bin);
    cmd.arg("--data")
        .arg(data)
        .args(["--listen", listen, "--fsync", "always"])
        .env("RUST_LOG", "warn");
    DaemonProcess::start(cmd, "msgstore", WAIT)
}

fn map(shards: &[&Shard]) -> ClusterMap {
    ClusterMap {
        epoch: 1,
        presence: "127.0.0.1:1".into(),
        profile: "127.0.0.1:1".into(),
        gateways: vec![],
        shards: shards.iter().map(|s| s.entry()).collect(),
    }
}

/// How a writer reaches the shards: the gateway's shard router, on the
/// old map all along (it follows `Moved` and waits out `Busy`).
type Router = gateway::shards::Shards;

fn router(map: &ClusterMap) -> Router {
    Router::new(map.clone(), 15_000)
}

/// Append one message: `Some(true)` stored, `Some(false)` unknown (the
/// shard may or may not have it: a broken link, or given up).
async fn append(router: &Router, user: u64, msg_id: u128) -> bool {
    match router
        .append(user, msg_id, msg_id.to_le_bytes().to_vec())
        .await
    {
        Ok(_) => true,
        Err(ShardCallError::Unavailable { .. }) => false,
        Err(e) => panic!("append refused: {e}"),
    }
}

/// Message ids acknowledged as stored, and those whose fate is unknown.
#[derive(Default)]
struct Ledger {
    stored: HashMap<u64, Vec<u128>>,
    unknown: HashSet<u128>,
}

/// Writers appending to random users until `stop`.
fn start_writers(
    router: Arc<Router>,
    users: u64,
    stop: Arc<AtomicBool>,
    ledger: Arc<Mutex<Ledger>>,
) -> Vec<tokio::task::JoinHandle<()>> {
    (0..4u128)
        .map(|w| {
            let (router, stop, ledger) = (router.clone(), stop.clone(), ledger.clone());
            tokio::spawn(async move {
                let mut n = 0u128;
                while !stop.load(Ordering::Relaxed) {
                    n += 1;
                    let msg_id = (w << 64) | n;
                    let user = rand::random::<u64>() % users;
                    match append(&router, user, msg_id).await {
                        true => ledger
                            .lock()
                            .unwrap()
                            .stored
                            .entry(user)
                            .or_default()
                            .push(msg_id),
                        false => {
                            ledger.lock().unwrap().unknown.insert(msg_id);
                        }
                    }
                }
            })
        })
        .collect()
}

fn imctl(cluster: &Path, args: &[&str]) {
    let mut all = vec!["rebalance", "--cluster", cluster.to_str().unwrap()];
    all.extend_from_slice(args);
    let (ok, out, err) = common::run(&all, None);
    assert!(ok, "imctl {all:?} failed:\n{out}\n{err}");
}

/// Every acknowledged message exactly once at its owner under `map`, seqs
/// gap-free; every shard holds only users it owns.
async fn check(map: &ClusterMap, shards: &[&Shard], ledger: &Ledger, users: u64) {
    let router = router(map);
    let ring = ShardRing::new(&map.shards);
    for user in 0..users {
        let (records, more) = router.fetch(user, 0, 1000, 1 << 20).await.unwrap();
        assert!(!more, "user {user} has more than one page");
        let stats = router.user_stats(user).await.unwrap();
        let seqs: Vec<u64> = records.iter().map(|r| r.seq).collect();
        let want: Vec<u64> = (stats.acked_seq + 1..=stats.last_seq).collect();
        assert_eq!(seqs, want, "user {user}: seqs are not gap-free");
        let mut seen = HashSet::new();
        for r in &records {
            let id = u128::from_le_bytes(r.payload[..16].try_into().unwrap());
            assert_eq!(id, r.msg_id);
            assert!(seen.insert(r.msg_id), "user {user}: msg {} twice", r.msg_id);
        }
        for id in ledger.stored.get(&user).into_iter().flatten() {
            assert!(seen.remove(id), "user {user}: stored msg {id} is missing");
        }
        for id in seen {
            assert!(
                ledger.unknown.contains(&id),
                "user {user}: msg {id} never sent"
            );
        }
    }
    for shard in shards {
        let client = ShardClient::connect(shard.addr).await.unwrap();
        let (listed, next) = client.list_users(0, 10_000).await.unwrap();
        assert_eq!(next, None);
        for u in listed {
            assert_eq!(
                ring.owner(u.user),
                shard.id,
                "{} holds user {}",
                shard.id,
                u.user
            );
        }
    }
}

async fn prefill(router: &Router, users: u64, per_user: u128, ledger: &Mutex<Ledger>) {
    for user in 0..users {
        for i in 0..per_user {
            let msg_id = (99 << 64) | (u128::from(user) << 16) | i;
            assert!(append(router, user, msg_id).await);
            ledger
                .lock()
                .unwrap()
                .stored
                .entry(user)
                .or_default()
                .push(msg_id);
        }
    }
}

/// Four shards, a map of the first three written to `cluster.toml`, and
/// `users` users with `per_user` messages each.
struct Setup {
    dir: tempfile::TempDir,
    shards: Vec<Shard>,
    cluster: PathBuf,
    router: Arc<Router>,
    ledger: Arc<Mutex<Ledger>>,
}

async fn setup(users: u64, per_user: u128) -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let shards: Vec<Shard> = (0..4)
        .map(|i| Shard::start(dir.path(), &format!("s{i}")))
        .collect();
    let old = map(&[&shards[0], &shards[1], &shards[2]]);
    let cluster = dir.path().join("cluster.toml");
    std::fs::write(&cluster, old.to_toml()).unwrap();
    let ledger = Arc::new(Mutex::new(Ledger::default()));
    let router = Arc::new(router(&old));
    prefill(&router, users, per_user, &ledger).await;
    Setup {
        dir,
        shards,
        cluster,
        router,
        ledger,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn add_then_remove_a_shard_under_live_writes() {
    let users = 300;
    let Setup {
        dir,
        shards,
        cluster,
        router,
        ledger,
    } = setup(users, 2).await;
    // Acknowledge some users' first message, so moved seqs start above 1.
    for user in (0..users).step_by(3) {
        router.ack(user, 1).await.unwrap();
        ledger
            .lock()
            .unwrap()
            .stored
            .get_mut(&user)
            .unwrap()
            .remove(0);
    }
    let stop = Arc::new(AtomicBool::new(false));
    // Writers also reach users that have no mailbox yet (ids >= users).
    let writers = start_writers(router.clone(), users + 50, stop.clone(), ledger.clone());
    let s3 = shards[3].addr.to_string();
    let cluster2 = cluster.clone();
    tokio::task::spawn_blocking(move || {
        imctl(&cluster2, &["add-shard", "--dry-run", "s3", &s3]);
        imctl(&cluster2, &["add-shard", "s3", &s3]);
        imctl(&cluster2, &["remove-shard", "s1"]);
    })
    .await
    .unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.store(true, Ordering::Relaxed);
    for w in writers {
        w.await.unwrap();
    }
    let new = ClusterMap::from_toml(&std::fs::read_to_string(&cluster).unwrap()).unwrap();
    assert_eq!(new.epoch, 3);
    let ids: Vec<&str> = new.shards.iter().map(|s| s.id.as_str()).collect();
    assert_eq!(ids, ["s0", "s2", "s3"]);
    assert!(!dir.path().join("rebalance.toml").exists());
    let ledger = std::mem::take(&mut *ledger.lock().unwrap());
    let all: Vec<&Shard> = shards.iter().filter(|s| s.id != "s1").collect();
    check(&new, &all, &ledger, users + 50).await;
    // The removed shard holds nobody any more.
    let s1 = ShardClient::connect(shards[1].addr).await.unwrap();
    assert_eq!(s1.list_users(0, 10_000).await.unwrap().0, vec![]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_tool_and_a_killed_source_shard_then_resume() {
    let users = 2000;
    let Setup {
        dir,
        mut shards,
        cluster,
        router,
        ledger,
    } = setup(users, 1).await;
    let stop = Arc::new(AtomicBool::new(false));
    let writers = start_writers(router.clone(), users, stop.clone(), ledger.clone());
    let mut tool = Command::new(env!("CARGO_BIN_EXE_imctl"));
    tool.args([
        "rebalance",
        "--cluster",
        cluster.to_str().unwrap(),
        "add-shard",
        "s3",
    ])
    .arg(shards[3].addr.to_string())
    .stdout(std::process::Stdio::null());
    // The shards run with this process's key.
    daemon::testing::with_cluster_key(&mut tool);
    let mut tool = tool.spawn().unwrap();
    // Kill the tool once some users have arrived at the new shard.
    let s3 = ShardClient::connect(shards[3].addr).await.unwrap();
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let arrived = s3.list_users(0, 10_000).await.unwrap().0.len();
        if arrived >= 20 {
            break;
        }
        assert!(
            tool.try_wait().unwrap().is_none(),
            "the tool finished too soon"
        );
        assert!(tokio::time::Instant::now() < deadline, "no user arrived");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    daemon::testing::sigkill(&mut tool);
    assert!(dir.path().join("rebalance.toml").exists());
    shards[0].kill_and_restart();
    let cluster2 = cluster.clone();
    tokio::task::spawn_blocking(move || {
        imctl(&cluster2, &["status"]);
        imctl(&cluster2, &["resume"]);
    })
    .await
    .unwrap();
    stop.store(true, Ordering::Relaxed);
    for w in writers {
        w.await.unwrap();
    }
    let new = ClusterMap::from_toml(&std::fs::read_to_string(&cluster).unwrap()).unwrap();
    assert_eq!(new.epoch, 2);
    let ledger = std::mem::take(&mut *ledger.lock().unwrap());
    let all: Vec<&Shard> = shards.iter().collect();
    check(&new, &all, &ledger, users).await;
}

/// A rebalance interrupted after every user moved finishes with `resume`
/// even when the removed shard is already shut down.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resume_finishes_without_the_removed_shard() {
    use msgstore::rebalance::{Phase, Plan, State};
    let dir = tempfile::tempdir().unwrap();
    let mut shards: Vec<Shard> = (0..2)
        .map(|i| Shard::start(dir.path(), &format!("s{i}")))
        .collect();
    let old = map(&[&shards[0], &shards[1]]);
    let cluster = dir.path().join("cluster.toml");
    std::fs::write(&cluster, old.to_toml()).unwrap();
    let state = State {
        phase: Phase::Finishing,
        plan: Plan::remove_shard(&old, "s1").unwrap(),
    };
    state.save(&dir.path().join("rebalance.toml")).unwrap();
    if let Some(p) = shards[1].process.take() {
        p.kill();
    }
    let cluster2 = cluster.clone();
    tokio::task::spawn_blocking(move || imctl(&cluster2, &["resume"]))
        .await
        .unwrap();
    let new = ClusterMap::from_toml(&std::fs::read_to_string(&cluster).unwrap()).unwrap();
    assert_eq!((new.epoch, new.shards.len()), (2, 1));
    assert!(!dir.path().join("rebalance.toml").exists());
    let s0 = ShardClient::connect(shards[0].addr).await.unwrap();
    let routing = s0.get_routing().await.unwrap().expect("routing installed");
    assert_eq!((routing.current.epoch, routing.target), (2, None));
}
