//! `imbench profile`: what a user reads after login — own profile, friend
//! list, every friend's profile — from our profile service over TCP and
//! from a real redis-server holding the same data, with the same client
//! concurrency; and password checks/s with the service's argon2id
//! parameters.
//!
//! Data (both sides): `users` accounts, each with `friends` friends (user i
//! is friends with i±1 .. i±friends/2, wrapping), in one group "Friends",
//! with a nickname and a signature. Redis holds each profile as a hash
//! `profile:<id>` (username, nickname, signature, avatar, version) and each
//! group as a set `friends:<id>:Friends` of friend ids; one user's read is
//! `HGETALL profile:<id>` + `SMEMBERS friends:<id>:Friends` (one round
//! trip, pipelined), then `HGETALL` of every friend (one pipelined round
//! trip). Ours is one `LoginView` request through `profile::ProfileClient`.

use crate::{
    load::Rng,
    procs::{self, ChildProc},
    redis::{self, RedisAof, RespValue},
    report::{self, LatencyHist, PhaseResult},
    storage::{self, PhaseCpu},
};
use anyhow::{bail, ensure, Context, Result};
use profile::{passwords::Hasher, ProfileClient};
use proto::profile::{ImportUser, UserId, IMPORT_FRIENDSHIPS_MAX, IMPORT_USERS_MAX};
use serde::Serialize;
use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};

const GROUP: &str = "Friends";
const PASSWORD: &[u8] = b"bench-password";
const SEED: u64 = 0x9E0F_11E5;
/// Profile writes in flight while loading.
const LOAD_CONCURRENCY: usize = 256;

#[derive(clap::Args, Debug, Clone)]
pub struct ProfileArgs {
    /// Fewer users and short phases: the whole run takes under a minute.
    #[arg(long)]
    pub quick: bool,
    /// Also write the results as JSON to this file.
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// Accounts created on both sides [default: 10,000; quick: 1,000].
    #[arg(long)]
    pub users: Option<usize>,
    /// Friends of every user (even, below the user count).
    #[arg(long, default_value_t = 200)]
    pub friends: usize,
    /// Concurrent clients (one connection each) on both sides.
    #[arg(long, default_value_t = 16)]
    pub connections: usize,
    /// Length of each timed read phase [default: 10; quick: 3].
    #[arg(long)]
    pub duration_secs: Option<f64>,
    /// Length of the password-check phase [default: 5; quick: 2].
    #[arg(long)]
    pub password_secs: Option<f64>,
    /// Where the temporary data directories go.
    #[arg(long)]
    pub work_dir: Option<PathBuf>,
    #[arg(long, default_value = "redis-server")]
    pub redis_bin: PathBuf,
    /// The profile daemon [default: `profile` next to this executable].
    #[arg(long)]
    pub profile_bin: Option<PathBuf>,
}

struct Settings {
    args: ProfileArgs,
    users: usize,
    read: Duration,
    password: Duration,
}

impl Settings {
    fn new(args: ProfileArgs) -> Result<Self> {
        let users = args
            .users
            .unwrap_or(if args.quick { 1_000 } else { 10_000 });
        ensure!(args.friends.is_multiple_of(2), "--friends must be even");
        ensure!(args.friends < users, "--friends must be below --users");
        ensure!(args.connections > 0, "--connections must be at least 1");
        let secs = |v: Option<f64>, full, quick| {
            Duration::try_from_secs_f64(v.unwrap_or(if args.quick { quick } else { full }))
                .context("a duration is not valid")
        };
        Ok(Self {
            read: secs(args.duration_secs, 10.0, 3.0)?,
            password: secs(args.password_secs, 5.0, 2.0)?,
            users,
            args,
        })
    }
}

#[derive(Debug, Default, Serialize)]
pub struct Ratios {
    /// Login views (own profile + friend list + friends' profiles) per
    /// second: ours / redis.
    pub friend_list_read_vs_redis: Option<f64>,
}

#[derive(Debug, Default, Serialize)]
pub struct Setup {
    pub import_users_secs: f64,
    pub set_profiles_secs: f64,
    pub import_friendships_secs: f64,
    pub redis_load_secs: f64,
}

#[derive(Debug, Serialize)]
pub struct ProfileReport {
    pub ratios: Ratios,
    pub config: serde_json::Value,
    pub setup: Setup,
    pub reads: Vec<PhaseResult>,
    /// argon2id checks per second with the service's parameters.
    pub password_checks_per_sec: Option<f64>,
    pub password_checks: Option<PhaseResult>,
    pub argon2: Option<String>,
    /// Peak resident set of each server after the run, bytes.
    pub peak_rss_bytes: serde_json::Value,
    pub problems: Vec<String>,
}

/// One client of a timed phase.
enum Worker {
    Ours(ProfileClient),
    Redis(RespConn),
    Password(ProfileClient),
}

impl Worker {
    /// One unit of work for `user`; returns the friends seen (reads).
    async fn run_one(&mut self, user: UserId, username: &str) -> Result<usize> {
        match self {
            Worker::Ours(c) => {
                let view = c.friends(user).await?;
                Ok(view.groups.iter().map(|g| g.friends.len()).sum())
            }
            Worker::Redis(c) => c.login_view(user).await,
            Worker::Password(c) => {
                c.check_password(username, PASSWORD).await?;
                Ok(0)
            }
        }
    }
}

/// Run `workers` for `duration`, each on a random user after the other.
async fn timed(
    workers: Vec<Worker>,
    ids: &[UserId],
    duration: Duration,
    friends: usize,
) -> Result<(u64, u64, Option<String>, LatencyHist, Duration)> {
    let start = Instant::now();
    let deadline = start + duration;
    let mut tasks = Vec::new();
    for (i, mut w) in workers.into_iter().enumerate() {
        let ids = ids.to_vec();
        tasks.push(tokio::spawn(async move {
            let mut rng = Rng::new(SEED ^ i as u64);
            let (mut ops, mut errors, mut first_error) = (0u64, 0u64, None);
            let mut hist = LatencyHist::new();
            while Instant::now() < deadline {
                let i = rng.below(ids.len() as u64) as usize;
                let t0 = Instant::now();
                let expect = if matches!(w, Worker::Password(_)) {
                    0
                } else {
                    friends
                };
                match w.run_one(ids[i], &username(i)).await {
                    Ok(n) if n == expect => ops += 1,
                    Ok(n) => {
                        errors += 1;
                        first_error.get_or_insert(format!("{n} friends, expected {expect}"));
                    }
                    Err(e) => {
                        errors += 1;
                        first_error.get_or_insert(e.to_string());
                    }
                }
                hist.record(t0.elapsed());
            }
            (ops, errors, first_error, hist)
        }));
    }
    let (mut ops, mut errors, mut first, mut hist) = (0, 0, None, LatencyHist::new());
    for t in tasks {
        let (o, e, f, h) = t.await.context("worker panicked")?;
        ops += o;
        errors += e;
        first = first.or(f);
        hist.merge(&h)?;
    }
    Ok((ops, errors, first, hist, start.elapsed()))
}

fn username(i: usize) -> String {
    format!("user{i}")
}

/// A phase's figures as the report records them.
fn phase(
    name: &str,
    target: &str,
    setting: &str,
    s: &Settings,
    window: Duration,
    out: (u64, u64, Option<String>, LatencyHist, Duration),
    cpu: PhaseCpu,
) -> PhaseResult {
    let (ops, errors, first_error, hist, elapsed) = out;
    let (server_cpu_us_per_op, client_cpu_us_per_op) = cpu.us_per_op(ops);
    let r = PhaseResult {
        phase: name.into(),
        target: target.into(),
        setting: setting.into(),
        connections: s.args.connections,
        pipeline: 1,
        ops,
        ops_in_window: ops,
        abandoned: 0,
        errors,
        first_error,
        elapsed_secs: elapsed.as_secs_f64(),
        ops_per_sec: ops as f64 / window.as_secs_f64().max(1e-9),
        latency: hist.summary(),
        server_cpu_us_per_op,
        client_cpu_us_per_op,
        rate_samples: Vec::new(),
    };
    eprintln!(
        "  {:<15} {:<8} {:>10.0} /s  p50 {} us  p99 {} us  errors {}{}",
        r.phase,
        r.target,
        r.ops_per_sec,
        r.latency.p50_us,
        r.latency.p99_us,
        r.errors,
        r.first_error
            .as_deref()
            .map(|e| format!(" (first: {e})"))
            .unwrap_or_default()
    );
    r
}

/// CPU time of `pid` and of this process spent while `f` runs.
async fn with_cpu<T>(
    pid: u32,
    f: impl std::future::Future<Output = Result<T>>,
) -> Result<(T, PhaseCpu)> {
    let (out, cpu) = storage::with_cpu(pid, f).await;
    Ok((out?, cpu))
}

pub async fn run(args: ProfileArgs) -> Result<()> {
    let s = Settings::new(args)?;
    let work_dir = s.args.work_dir.clone().unwrap_or_else(std::env::temp_dir);
    let root = tempfile::Builder::new()
        .prefix("imbench-profile-")
        .tempdir_in(&work_dir)
        .with_context(|| format!("create a temp dir in {}", work_dir.display()))?;
    let bin = procs::locate_sibling("profile", "profile", s.args.profile_bin.as_deref())?;
    let mut report = ProfileReport {
        ratios: Ratios::default(),
        config: serde_json::json!({
            "quick": s.args.quick,
            "users": s.users,
            "friends": s.args.friends,
            "connections": s.args.connections,
            "read_secs": s.read.as_secs_f64(),
            "password_secs": s.password.as_secs_f64(),
            "redis_read": "HGETALL own + SMEMBERS (one round trip), then pipelined HGETALL of each friend",
            "profile_read": "one LoginView request via profile::ProfileClient",
        }),
        setup: Setup::default(),
        reads: Vec::new(),
        password_checks_per_sec: None,
        password_checks: None,
        argon2: None,
        peak_rss_bytes: serde_json::Value::Null,
        problems: Vec::new(),
    };
    eprintln!(
        "imbench profile: {} users x {} friends, {} connections",
        s.users, s.args.friends, s.args.connections
    );
    let ours = start_profile(&bin, &root.path().join("profile"))?;
    let client = ProfileClient::connect(ours.1.to_string()).await?;
    let ids = load_ours(&client, &s, &mut report.setup).await?;
    let redis = redis::start(&s.args.redis_bin, &root.path().join("redis"), RedisAof::Off);
    let redis = match redis {
        Ok(r) => Some(r),
        Err(e) => {
            report
                .problems
                .push(format!("redis-server did not start: {e:#}"));
            None
        }
    };
    if let Some(r) = &redis {
        let t = Instant::now();
        load_redis(r.addr, &client, &ids).await?;
        report.setup.redis_load_secs = t.elapsed().as_secs_f64();
    }
    eprintln!("  loaded: {:?}", report.setup);

    let setting = format!("{} friends", s.args.friends);
    let mut workers = Vec::new();
    for _ in 0..s.args.connections {
        workers.push(Worker::Ours(
            ProfileClient::connect(ours.1.to_string()).await?,
        ));
    }
    let (out, cpu) = with_cpu(ours.0.pid(), timed(workers, &ids, s.read, s.args.friends)).await?;
    report.reads.push(phase(
        "login_view",
        "profile",
        &setting,
        &s,
        s.read,
        out,
        cpu,
    ));
    if let Some(r) = &redis {
        let mut workers = Vec::new();
        for _ in 0..s.args.connections {
            workers.push(Worker::Redis(RespConn::connect(r.addr).await?));
        }
        let (out, cpu) =
            with_cpu(r.proc.pid(), timed(workers, &ids, s.read, s.args.friends)).await?;
        report
            .reads
            .push(phase("login_view", "redis", &setting, &s, s.read, out, cpu));
    }
    let rate = |t: &str| {
        report
            .reads
            .iter()
            .find(|r| r.target == t && r.errors == 0)
            .map(|r| r.ops_per_sec)
    };
    report.ratios.friend_list_read_vs_redis = report::ratio(rate("profile"), rate("redis"));

    let info = client.info().await?;
    let argon2 = format!(
        "argon2id m={},t={},p={}",
        info.argon2_m_kib, info.argon2_t, info.argon2_p
    );
    let mut workers = Vec::new();
    for _ in 0..s.args.connections {
        workers.push(Worker::Password(client.clone()));
    }
    let (out, cpu) = with_cpu(ours.0.pid(), timed(workers, &ids, s.password, 0)).await?;
    let pw = phase(
        "password_check",
        "profile",
        &argon2,
        &s,
        s.password,
        out,
        cpu,
    );
    report.password_checks_per_sec = Some(pw.ops_per_sec);
    report.password_checks = Some(pw);
    report.argon2 = Some(argon2);
    report.peak_rss_bytes = serde_json::json!({
        "profile": ours.0.peak_rss_bytes().ok(),
        "redis": redis.as_ref().and_then(|r| r.proc.peak_rss_bytes().ok()),
    });
    print!("{}", render(&report));
    if let Some(path) = &s.args.json {
        report::write_json(path, "profile", &report)?;
    }
    Ok(())
}

fn render(r: &ProfileReport) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    let rows: Vec<&PhaseResult> = r.reads.iter().chain(&r.password_checks).collect();
    report::phase_table(&mut out, &rows);
    let show = |v: Option<f64>| v.map(|v| format!("{v:.3}")).unwrap_or_else(|| "n/a".into());
    let _ = writeln!(
        out,
        "\npassword checks/s ({}): {}",
        r.argon2.as_deref().unwrap_or("?"),
        show(r.password_checks_per_sec)
    );
    let _ = writeln!(
        out,
        "\nratios (ours / peer):\n  friend_list_read_vs_redis  {}",
        show(r.ratios.friend_list_read_vs_redis)
    );
    for p in &r.problems {
        let _ = writeln!(out, "problem: {p}");
    }
    out
}

fn start_profile(bin: &Path, data: &Path) -> Result<(ChildProc, SocketAddr)> {
    let mut cmd = Command::new(bin);
    cmd.arg("--data")
        .arg(data)
        .args(["--listen", "127.0.0.1:0"])
        .env("NO_COLOR", "1");
    if std::env::var_os("RUST_LOG").is_none() {
        cmd.env("RUST_LOG", "warn");
    }
    procs::start_daemon("profile", &mut cmd, Duration::from_secs(60))
}

/// Friends of user index `i`: i±1 .. i±friends/2, wrapping.
fn ring_pairs(users: usize, friends: usize) -> impl Iterator<Item = (usize, usize)> {
    (0..users).flat_map(move |i| (1..=friends / 2).map(move |d| (i, (i + d) % users)))
}

fn nickname(i: usize) -> String {
    format!("Nick {i}")
}

fn signature(i: usize) -> String {
    format!("signature of user {i}: a line of text people write about themselves")
}

/// Accounts (one PHC hash shared by all: test data), profiles, friends.
async fn load_ours(client: &ProfileClient, s: &Settings, setup: &mut Setup) -> Result<Vec<UserId>> {
    let info = client.info().await?;
    let hasher = Hasher::for_service(&info)?;
    let phc = hasher.hash(PASSWORD)?;
    let t = Instant::now();
    let mut ids = Vec::with_capacity(s.users);
    for start in (0..s.users).step_by(IMPORT_USERS_MAX) {
        let batch = (start..(start + IMPORT_USERS_MAX).min(s.users))
            .map(|i| ImportUser {
                username: username(i).into_bytes(),
                phc: phc.clone(),
            })
            .collect();
        for r in client.import_users(batch).await? {
            ids.push(r.map_err(|e| anyhow::anyhow!("import: {}", e.message))?);
        }
    }
    setup.import_users_secs = t.elapsed().as_secs_f64();
    let t = Instant::now();
    for chunk in ids.chunks(LOAD_CONCURRENCY).enumerate().collect::<Vec<_>>() {
        let (n, part) = chunk;
        let mut tasks = Vec::new();
        for (j, &id) in part.iter().enumerate() {
            let (c, i) = (client.clone(), n * LOAD_CONCURRENCY + j);
            tasks.push(tokio::spawn(async move {
                c.set_profile(id, Some(&nickname(i)), Some(&signature(i)))
                    .await
            }));
        }
        for task in tasks {
            task.await??;
        }
    }
    setup.set_profiles_secs = t.elapsed().as_secs_f64();
    let t = Instant::now();
    let pairs: Vec<(UserId, UserId)> = ring_pairs(s.users, s.args.friends)
        .map(|(a, b)| (ids[a], ids[b]))
        .collect();
    for part in pairs.chunks(IMPORT_FRIENDSHIPS_MAX) {
        client.import_friendships(GROUP, part.to_vec()).await?;
    }
    setup.import_friendships_secs = t.elapsed().as_secs_f64();
    Ok(ids)
}

/// The same users, profiles and friend sets in Redis, read back from our
/// service so both hold exactly the same data.
async fn load_redis(addr: SocketAddr, client: &ProfileClient, ids: &[UserId]) -> Result<()> {
    let mut conn = RespConn::connect(addr).await?;
    for part in ids.chunks(100) {
        let mut buf = Vec::new();
        let mut replies = 0;
        for &id in part {
            let view = client.friends(id).await?;
            let p = &view.profile;
            let avatar = p
                .avatar
                .map(|h| profile::avatar::hex(&h))
                .unwrap_or_default();
            let version = p.version.to_string();
            let key = format!("profile:{id}");
            redis::put_command(
                &mut buf,
                &[
                    b"HSET",
                    key.as_bytes(),
                    b"username",
                    p.username.as_bytes(),
                    b"nickname",
                    p.nickname.as_bytes(),
                    b"signature",
                    p.signature.as_bytes(),
                    b"avatar",
                    avatar.as_bytes(),
                    b"version",
                    version.as_bytes(),
                ],
            );
            replies += 1;
            for g in &view.groups {
                let key = format!("friends:{id}:{}", g.name);
                let members: Vec<String> = g.friends.iter().map(|f| f.user.to_string()).collect();
                let mut args: Vec<&[u8]> = vec![b"SADD", key.as_bytes()];
                args.extend(members.iter().map(|m| m.as_bytes()));
                redis::put_command(&mut buf, &args);
                replies += 1;
            }
        }
        for v in conn.round_trip(&buf, replies).await? {
            if let RespValue::Error(e) = v {
                bail!("redis refused the data: {e}");
            }
        }
    }
    Ok(())
}

/// One pipelined RESP connection.
pub struct RespConn {
    stream: TcpStream,
    buf: bytes::BytesMut,
    out: Vec<u8>,
}

impl RespConn {
    pub async fn connect(addr: SocketAddr) -> Result<Self> {
        let stream = TcpStream::connect(addr)
            .await
            .with_context(|| format!("connect to redis at {addr}"))?;
        stream.set_nodelay(true)?;
        Ok(Self {
            stream,
            buf: bytes::BytesMut::with_capacity(64 * 1024),
            out: Vec::new(),
        })
    }

    /// Send `commands` (encoded) and read `replies` replies.
    async fn round_trip(&mut self, commands: &[u8], replies: usize) -> Result<Vec<RespValue>> {
        self.stream.write_all(commands).await?;
        let mut values = Vec::with_capacity(replies);
        while values.len() < replies {
            match redis::parse_value(&self.buf)? {
                Some((used, v)) => {
                    let _ = self.buf.split_to(used);
                    values.push(v);
                }
                None => {
                    self.buf.reserve(64 * 1024);
                    if self.stream.read_buf(&mut self.buf).await? == 0 {
                        bail!("redis closed the connection");
                    }
                }
            }
        }
        Ok(values)
    }

    /// What a user reads after login; the number of friends' profiles read.
    async fn login_view(&mut self, user: UserId) -> Result<usize> {
        let mut out = std::mem::take(&mut self.out);
        out.clear();
        let (pkey, fkey) = (format!("profile:{user}"), format!("friends:{user}:{GROUP}"));
        redis::put_command(&mut out, &[b"HGETALL", pkey.as_bytes()]);
        redis::put_command(&mut out, &[b"SMEMBERS", fkey.as_bytes()]);
        let first = self.round_trip(&out, 2).await?;
        let members = match &first[..] {
            [RespValue::Array(own), RespValue::Array(members)] if !own.is_empty() => members,
            other => bail!("unexpected redis replies {other:?}"),
        };
        out.clear();
        for m in members {
            let RespValue::Bulk(Some(id)) = m else {
                bail!("unexpected set member {m:?}")
            };
            let key = [b"profile:", &id[..]].concat();
            redis::put_command(&mut out, &[b"HGETALL", &key]);
        }
        let profiles = self.round_trip(&out, members.len()).await?;
        self.out = out;
        Ok(profiles
            .iter()
            .filter(|p| matches!(p, RespValue::Array(f) if !f.is_empty()))
            .count())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ring_gives_everyone_the_same_number_of_mutual_friends() {
        let mut count = vec![0; 10];
        let mut seen = std::collections::BTreeSet::new();
        for (a, b) in ring_pairs(10, 4) {
            assert!(seen.insert((a.min(b), a.max(b))), "pair twice");
            count[a] += 1;
            count[b] += 1;
        }
        assert_eq!(count, vec![4; 10]);
    }
}
