//! Shared by the replicated-shard tests and `imbench failover`: a group
//! of real `msgstore` processes on fixed ports, a client that finds the
//! leader, and a model of what was acknowledged to check the group
//! against.

use crate::{
    client::{ClientError, ShardClient},
    StoredRecord,
};
use daemon::testing::{free_addr, sigkill, wait_for_listening};
use proto::shard::ShardErrorCode;
use replication::{
    peer::{admin, AdminRequest, AdminResponse, GroupStatus},
    Replica,
};
use std::{
    collections::{BTreeMap, HashMap},
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Child, Command},
    time::{Duration, Instant},
};

/// Engine settings small enough for tests (the fan-out cannot change
/// between runs of one directory).
pub const CONFIG: &str =
    "[engine]\nbucket_dirs = 2\nbucket_files = 4\nwal_segment_bytes = 1048576\n\
index_map_bytes = 16777216\ncheckpoint_wal_bytes = 262144\ncheckpoint_stall_wal_bytes = 524288\n\
wal_bytes_max = 1048576\n";

/// One replica: a `msgstore` process on fixed ports (kept across
/// restarts, so the group's membership stays true).
pub struct ReplicaProcess {
    bin: PathBuf,
    pub id: u64,
    pub client: SocketAddr,
    pub raft: SocketAddr,
    pub data: PathBuf,
    config: PathBuf,
    pub child: Option<Child>,
    /// The network namespace the process runs in (`ip netns exec NS`), if
    /// any; its addresses must be that namespace's.
    pub netns: Option<String>,
}

impl ReplicaProcess {
    pub fn start(&mut self) {
        self.start_with(|_| {});
    }

    /// Start it with `adjust` applied to its command first (a resource
    /// limit, say).
    pub fn start_with(&mut self, adjust: impl FnOnce(&mut Command)) {
        // `ip netns exec` execs the command in its own process (no fork),
        // so the child's pid is msgstore's and signals reach it (checked
        // below).
        let mut cmd = match &self.netns {
            Some(ns) => daemon::netns::command_in(ns, &self.bin),
            None => Command::new(&self.bin),
        };
        cmd.arg("--data")
            .arg(&self.data)
            .arg("--config")
            .arg(&self.config)
            .args(["--listen", &self.client.to_string()])
            .args(["--raft-id", &self.id.to_string()])
            .args(["--raft-listen", &self.raft.to_string()])
            .env(
                "RUST_LOG",
                std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".into()),
            )
            .stdout(std::process::Stdio::piped())
            .stderr(self.log_file());
        // The replicas and this process's clients share this process's key.
        daemon::testing::with_cluster_key(&mut cmd);
        adjust(&mut cmd);
        let mut child = cmd.spawn().expect("spawn msgstore");
        wait_for_listening(&mut child, "msgstore", Duration::from_secs(60));
        if self.netns.is_some() {
            daemon::netns::check_in_place(child.id(), &self.bin);
        }
        self.child = Some(child);
    }

    /// Where the replica's logs go (appended across restarts): beside its
    /// data directory, `<data>.log`, so a failed run can be read.
    fn log_file(&self) -> std::process::Stdio {
        let path = self.data.with_extension("log");
        match std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
        {
            Ok(f) => f.into(),
            Err(_) => std::process::Stdio::null(),
        }
    }

    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            sigkill(&mut child);
        }
    }

    /// Send `sig` (SIGSTOP, SIGCONT) to the running replica.
    pub fn signal(&self, sig: libc::c_int) {
        if let Some(child) = &self.child {
            daemon::testing::signal(child, sig);
        }
    }

    pub fn terminate(&mut self) -> bool {
        match self.child.take() {
            Some(mut child) => {
                daemon::testing::signal(&child, libc::SIGTERM);
                child.wait().expect("wait").success()
            }
            None => true,
        }
    }

    /// Wait up to `limit` for the replica to exit by itself: its status,
    /// or `None` if it still runs.
    pub fn wait_exit(&mut self, limit: Duration) -> Option<std::process::ExitStatus> {
        let status = daemon::testing::wait_exit(self.child.as_mut()?, limit)?;
        self.child = None;
        Some(status)
    }

    pub fn replica(&self) -> Replica {
        Replica {
            raft_addr: self.raft.to_string(),
            client_addr: self.client.to_string(),
        }
    }

    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }
}

impl Drop for ReplicaProcess {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A group of replicas, each with its data directory under `dir`.
pub struct Group {
    pub replicas: Vec<ReplicaProcess>,
}

impl Group {
    /// Start `n` replicas of the `msgstore` binary `bin` with the config
    /// `config_text`, data under `dir`, and form a group of them.
    pub async fn start(bin: &Path, dir: &Path, n: u64, config_text: &str) -> Group {
        let places = (1..=n).map(|_| (free_addr(), free_addr(), None)).collect();
        Group::start_with(bin, dir, config_text, places).await
    }

    /// [`Group::start`] with one replica per entry of `places`, numbered
    /// from 1: its client address, raft address and network namespace.
    pub async fn start_with(
        bin: &Path,
        dir: &Path,
        config_text: &str,
        places: Vec<(SocketAddr, SocketAddr, Option<String>)>,
    ) -> Group {
        let config = dir.join("msgstore.toml");
        std::fs::write(&config, config_text).expect("write the config");
        let mut replicas: Vec<ReplicaProcess> = (1..)
            .zip(places)
            .map(|(id, (client, raft, netns))| ReplicaProcess {
                bin: bin.to_owned(),
                id,
                client,
                raft,
                data: dir.join(format!("r{id}")),
                config: config.clone(),
                child: None,
                netns,
            })
            .collect();
        for r in &mut replicas {
            r.start();
        }
        let members: BTreeMap<u64, Replica> =
            replicas.iter().map(|r| (r.id, r.replica())).collect();
        let answer = admin(
            &replicas[0].raft.to_string(),
            AdminRequest::Init { members },
            Duration::from_secs(10),
        )
        .await
        .expect("init");
        assert!(matches!(answer, AdminResponse::Done), "{answer:?}");
        let group = Group { replicas };
        group.wait_for_leader(Duration::from_secs(10)).await;
        group
    }

    pub fn client_addrs(&self) -> Vec<SocketAddr> {
        self.replicas.iter().map(|r| r.client).collect()
    }

    pub async fn status(&self, i: usize) -> Option<GroupStatus> {
        let addr = self.replicas[i].raft.to_string();
        match admin(&addr, AdminRequest::Status, Duration::from_secs(2)).await {
            Ok(AdminResponse::Status(s)) => Some(s),
            _ => None,
        }
    }

    /// The index of the replica that leads, as the running replicas see it
    /// (of two that both believe they lead, the one of the newer term).
    /// Panics if two replicas lead in the same term: Raft's election
    /// safety, checked every time a test looks for the leader.
    pub async fn wait_for_leader(&self, limit: Duration) -> usize {
        let start = Instant::now();
        loop {
            let mut leaders: Vec<(u64, usize)> = Vec::new();
            for i in 0..self.replicas.len() {
                if !self.replicas[i].is_running() {
                    continue;
                }
                if let Some(s) = self.status(i).await.filter(|s| s.role == "leader") {
                    leaders.push((s.term, i));
                }
            }
            leaders.sort_unstable();
            for w in leaders.windows(2) {
                assert!(
                    w[0].0 != w[1].0,
                    "two leaders in term {}: {leaders:?}",
                    w[0].0
                );
            }
            if let Some((_, i)) = leaders.last() {
                return *i;
            }
            assert!(start.elapsed() < limit, "no leader within {limit:?}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Wait until every running replica applied the same index.
    pub async fn wait_converged(&self, limit: Duration) -> u64 {
        let start = Instant::now();
        loop {
            let mut applied = Vec::new();
            for i in 0..self.replicas.len() {
                if let Some(s) = self.status(i).await {
                    applied.push(s.applied_index.unwrap_or(0));
                }
            }
            if applied.len() == self.replicas.len() && applied.iter().all(|a| *a == applied[0]) {
                return applied[0];
            }
            assert!(
                start.elapsed() < limit,
                "replicas did not converge within {limit:?}: applied {applied:?}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

impl Group {
    /// The end of a fault test, with every write answered: each of users
    /// `1..=users` as the leader serves it passes `model`'s checks; then
    /// every replica stops cleanly and its own engine (read offline, with
    /// the settings of `config_text`) holds exactly what the leader served.
    pub async fn check_against(&mut self, model: &Model, users: u64, config_text: &str) {
        let mut client = GroupClient::new(self.client_addrs());
        let mut served = Vec::new();
        for user in 1..=users {
            let records = client.fetch_all(user).await;
            if let Err(e) = model.check_user(user, &records) {
                panic!("{e}");
            }
            served.push(records);
        }
        for r in &mut self.replicas {
            assert!(r.terminate(), "replica {} did not stop cleanly", r.id);
        }
        for r in &self.replicas {
            let (dir, config) = (engine_dir(&r.data), engine_config(config_text));
            let view = move || offline_view(&dir, config, 1..=users);
            let view = tokio::task::spawn_blocking(view)
                .await
                .expect("read offline");
            assert!(
                view == served,
                "replica {} differs from what the leader served",
                r.id
            );
        }
    }
}

/// Talks to whichever replica leads, following `NotLeader` and trying the
/// next replica when one cannot be reached.
pub struct GroupClient {
    addrs: Vec<SocketAddr>,
    at: usize,
    client: Option<ShardClient>,
}

/// What a call to the group came to.
#[derive(Debug)]
pub enum Outcome<T> {
    Done(T),
    /// Refused for a reason every replica agrees on.
    Refused(ShardErrorCode),
    /// Unknown: the connection broke or the group did not answer in time;
    /// a write may or may not have happened.
    Unknown,
}

impl GroupClient {
    pub fn new(addrs: Vec<SocketAddr>) -> GroupClient {
        GroupClient {
            addrs,
            at: 0,
            client: None,
        }
    }

    async fn connected(&mut self) -> Option<&ShardClient> {
        if self.client.is_none() {
            let addr = self.addrs[self.at];
            let dial = tokio::time::timeout(Duration::from_millis(500), ShardClient::connect(addr));
            match dial.await {
                Ok(Ok(c)) => self.client = Some(c),
                _ => {
                    self.at = (self.at + 1) % self.addrs.len();
                    return None;
                }
            }
        }
        self.client.as_ref()
    }

    /// The replica the client talks to now (for failure messages).
    pub fn current(&self) -> SocketAddr {
        self.addrs[self.at]
    }

    fn follow(&mut self, leader: Option<String>) {
        self.client = None;
        match leader.and_then(|l| self.addrs.iter().position(|a| a.to_string() == l)) {
            Some(i) => self.at = i,
            None => self.at = (self.at + 1) % self.addrs.len(),
        }
    }

    /// Run `op` at the leader. `idempotent` ops are retried after an
    /// unknown outcome; others are reported `Unknown`.
    pub async fn call<T, F, Fut>(&mut self, idempotent: bool, op: F) -> Outcome<T>
    where
        F: Fn(ShardClient) -> Fut,
        Fut: std::future::Future<Output = Result<T, ClientError>>,
    {
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            let Some(client) = self.connected().await.cloned() else {
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            };
            let answer = tokio::time::timeout(Duration::from_secs(5), op(client)).await;
            match answer {
                Ok(Ok(v)) => return Outcome::Done(v),
                Ok(Err(ClientError::Shard(e))) => match e.code {
                    ShardErrorCode::NotLeader { leader } => {
                        self.follow(leader);
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                    ShardErrorCode::Unavailable if !idempotent => {
                        self.follow(None);
                        return Outcome::Unknown;
                    }
                    ShardErrorCode::Unavailable => {
                        self.follow(None);
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                    code => return Outcome::Refused(code),
                },
                Ok(Err(_)) | Err(_) => {
                    self.follow(None);
                    if !idempotent {
                        return Outcome::Unknown;
                    }
                }
            }
        }
        Outcome::Unknown
    }

    /// Every live record of `user`, oldest first.
    pub async fn fetch_all(&mut self, user: u64) -> Vec<StoredRecord> {
        let mut out: Vec<StoredRecord> = Vec::new();
        loop {
            let after = out.last().map_or(0, |r| r.seq);
            let page = self
                .call(true, |c| async move {
                    c.fetch(user, after, 1000, 1 << 20).await
                })
                .await;
            let Outcome::Done((records, more)) = page else {
                panic!("fetch of user {user} failed: {page:?}");
            };
            assert!(
                !more || !records.is_empty(),
                "a page says more with no records"
            );
            out.extend(records);
            if !more {
                return out;
            }
        }
    }
}

/// What the clients were told, per user.
#[derive(Default, Debug)]
pub struct Model {
    /// msg_id -> seq of every acknowledged append.
    pub acked: HashMap<u64, BTreeMap<u128, u64>>,
    /// Appends whose outcome is unknown: present at most once.
    pub maybe: HashMap<u64, Vec<u128>>,
    /// The highest acknowledged ack per user.
    pub acked_up_to: HashMap<u64, u64>,
}

impl Model {
    /// What a fetch served while writes run can promise: seqs without
    /// gaps, and nothing at or below an ack answered before it was sent.
    pub fn check_live(
        user: u64,
        records: &[StoredRecord],
        acked_before: u64,
    ) -> Result<(), String> {
        for w in records.windows(2) {
            if w[1].seq != w[0].seq + 1 {
                return Err(format!("user {user}: seq gap {} -> {}", w[0].seq, w[1].seq));
            }
        }
        match records.first() {
            Some(r) if r.seq <= acked_before => Err(format!(
                "user {user}: seq {} came back after ack {acked_before}",
                r.seq
            )),
            _ => Ok(()),
        }
    }

    /// Check `records` (a user's live records, all writes answered)
    /// against what was answered.
    pub fn check_user(&self, user: u64, records: &[StoredRecord]) -> Result<(), String> {
        let up_to = self.acked_up_to.get(&user).copied().unwrap_or(0);
        let acked = self.acked.get(&user).cloned().unwrap_or_default();
        let maybe = self.maybe.get(&user).cloned().unwrap_or_default();
        let mut seen = HashMap::new();
        Self::check_live(user, records, up_to)?;
        for r in records {
            if seen.insert(r.msg_id, r.seq).is_some() {
                return Err(format!("user {user}: msg {:x} stored twice", r.msg_id));
            }
            match acked.get(&r.msg_id) {
                Some(seq) if *seq != r.seq => {
                    return Err(format!(
                        "user {user}: msg acked at seq {seq} found at {}",
                        r.seq
                    ))
                }
                Some(_) => {}
                None if maybe.contains(&r.msg_id) => {}
                None => return Err(format!("user {user}: unknown msg {:x}", r.msg_id)),
            }
        }
        for (id, seq) in &acked {
            if *seq > up_to && !seen.contains_key(id) {
                return Err(format!("user {user}: acknowledged msg at seq {seq} lost"));
            }
        }
        Ok(())
    }
}

/// Load on a group for the fault tests: appenders and an acker recording
/// every answer in a shared [`Model`], until `stop`.
#[derive(Clone)]
pub struct Load {
    pub addrs: Vec<SocketAddr>,
    pub model: std::sync::Arc<std::sync::Mutex<Model>>,
    pub stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    /// Per replica (in `addrs` order): appends it acknowledged.
    pub served: std::sync::Arc<Vec<std::sync::atomic::AtomicU64>>,
    /// Users 1..=users are written to.
    pub users: u64,
}

impl Load {
    pub fn new(addrs: Vec<SocketAddr>, users: u64) -> Load {
        let served = addrs.iter().map(|_| Default::default()).collect();
        Load {
            addrs,
            model: Default::default(),
            stop: Default::default(),
            served: std::sync::Arc::new(served),
            users,
        }
    }

    /// Start three appenders and an acker, seeded from `seed`.
    pub fn start(&self, seed: u64) -> Vec<tokio::task::JoinHandle<()>> {
        use rand::SeedableRng;
        let rng = |salt: u64| rand::rngs::StdRng::seed_from_u64(seed ^ salt);
        let mut tasks: Vec<_> = (1..=3)
            .map(|i| tokio::spawn(self.clone().append(rng(i))))
            .collect();
        tasks.push(tokio::spawn(self.clone().ack(rng(99))));
        tasks
    }

    fn stopped(&self) -> bool {
        self.stop.load(std::sync::atomic::Ordering::Relaxed)
    }

    fn model(&self) -> std::sync::MutexGuard<'_, Model> {
        self.model.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Append to random users until stopped; panics on a refusal.
    pub async fn append(self, mut rng: rand::rngs::StdRng) {
        use rand::Rng;
        let mut client = GroupClient::new(self.addrs.clone());
        while !self.stopped() {
            let user = rng.gen_range(1..=self.users);
            let msg_id: u128 = rng.gen();
            let payload = msg_id.to_le_bytes().to_vec();
            let outcome = client
                .call(false, |c| {
                    let payload = payload.clone();
                    async move { c.append(user, msg_id, payload).await }
                })
                .await;
            let mut m = self.model();
            match outcome {
                Outcome::Done(seq) => {
                    m.acked.entry(user).or_default().insert(msg_id, seq);
                    if let Some(i) = self.addrs.iter().position(|a| *a == client.current()) {
                        self.served[i].fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    }
                }
                Outcome::Unknown => m.maybe.entry(user).or_default().push(msg_id),
                Outcome::Refused(code) => panic!("append refused: {code:?}"),
            }
        }
    }

    /// Fetch random users' records (checking what a fetch can promise
    /// while writes run) and ack up to the one before the newest, until
    /// stopped.
    pub async fn ack(self, mut rng: rand::rngs::StdRng) {
        use rand::Rng;
        let mut client = GroupClient::new(self.addrs.clone());
        while !self.stopped() {
            let user = rng.gen_range(1..=self.users);
            let acked_before = self.model().acked_up_to.get(&user).copied();
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
                let mut m = self.model();
                let at = m.acked_up_to.entry(user).or_default();
                *at = (*at).max(up_to);
            }
        }
    }
}

/// The fault tests' seed: `GROUP_SEED` if set (to replay a failure), else
/// a random one; printed either way.
pub fn seed_from_env() -> u64 {
    let seed = std::env::var("GROUP_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(rand::random);
    eprintln!("GROUP_SEED={seed}");
    seed
}

/// The engine settings of a daemon config file's text.
pub fn engine_config(text: &str) -> crate::EngineConfig {
    crate::daemon::DaemonConfig::parse(text)
        .expect("a valid daemon config")
        .engine
}

/// Every user's live records as the engine in `dir` holds them, read with
/// its daemon stopped (blocking).
pub fn offline_view(
    dir: &Path,
    config: crate::EngineConfig,
    users: std::ops::RangeInclusive<u64>,
) -> Vec<Vec<StoredRecord>> {
    let shard = crate::Shard::open(dir, config).expect("open the engine");
    let view = users
        .map(|user| {
            let mut records: Vec<StoredRecord> = Vec::new();
            loop {
                let after = records.last().map_or(0, |r| r.seq);
                let page = shard
                    .fetch(user, after, 1000, 1 << 20)
                    .wait()
                    .expect("fetch");
                records.extend(page.records);
                if !page.more {
                    return records;
                }
            }
        })
        .collect();
    shard.close().expect("close the engine");
    view
}

/// The engine directory of a replica's data directory.
pub fn engine_dir(data: &Path) -> PathBuf {
    data.join("engine")
}
