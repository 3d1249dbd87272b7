//! `imbench presence`: our presence server against a private redis-server
//! holding the same data the way a user would store it (one string key per
//! online user, `SET u:<user> "<gateway>:<session>:<since>:<status>"`).
//!
//! Per target, one after the other (only one large server in memory at a
//! time): start it, read its RSS, load N users with pipelined
//! `Online` / `SET`, read its RSS again (memory per user = the growth / N,
//! the same measure on both sides), then batched lookups (`Lookup` of B
//! users / `MGET` of B keys) and online/offline updates (`Online`/`Offline`
//! / `SET`/`DEL`, toggling random users), each with the same connections,
//! pipeline depth and load generator on both sides.

use crate::{
    load::{run_load, Codec, LoadOp, LoadSpec, Reply, Rng, Workload},
    procs::{self, ChildProc},
    redis::{self, RedisAof},
    report::{self, PhaseResult},
    storage::{phase, users_of, with_cpu, Measured},
};
use anyhow::{bail, Context, Result};
use bytes::BytesMut;
use proto::{
    frame::{self, Decoded, FRAME_BODY_BYTES_MAX_DEFAULT},
    presence::{Request, RequestBody, ResponseBody, ServerFrame, Status, BATCH_USERS_MAX},
};
use serde::Serialize;
use std::{
    fmt::Write as _,
    io::Write as _,
    net::SocketAddr,
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

const SEED: u64 = 0x9E5E_11CE;
/// Seconds-since-epoch stored with every entry (any fixed value: both
/// sides store the same).
const SINCE_S: u32 = 1_764_450_000;

#[derive(clap::Args, Debug, Clone)]
pub struct PresenceArgs {
    /// 1,000,000 users and short phases: the whole run takes under a minute.
    #[arg(long)]
    pub quick: bool,
    /// Also write the results as JSON to this file.
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// Users loaded (online) [default: 10,000,000; quick: 1,000,000].
    #[arg(long)]
    pub users: Option<u64>,
    /// TCP connections per target (the same on both sides); each of ours
    /// registers as one gateway.
    #[arg(long, default_value_t = 4)]
    pub connections: usize,
    /// Users per lookup request (Lookup / MGET).
    #[arg(long, default_value_t = 1000)]
    pub lookup_batch: usize,
    /// Lookup requests in flight per connection.
    #[arg(long, default_value_t = 4)]
    pub lookup_pipeline: usize,
    /// Update (and load) requests in flight per connection.
    #[arg(long, default_value_t = 64)]
    pub update_pipeline: usize,
    /// Length of each timed phase [default: 10; quick: 2].
    #[arg(long)]
    pub duration_secs: Option<f64>,
    #[arg(long, default_value = "redis-server")]
    pub redis_bin: PathBuf,
    /// The presence daemon [default: `presence` next to this executable].
    #[arg(long)]
    pub presence_bin: Option<PathBuf>,
}

/// One presence operation, independent of the target.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PresenceOp {
    Online {
        user: u64,
    },
    Offline {
        user: u64,
    },
    /// `count` users drawn from 1..=users_max by a generator seeded with
    /// `seed` (both codecs draw the same users).
    Lookup {
        seed: u64,
        count: u32,
        users_max: u64,
    },
}

impl LoadOp for PresenceOp {}

/// The session a user's entry carries (a gateway's session counter).
fn session_of(user: u64) -> u64 {
    user + 1
}

fn lookup_users(seed: u64, count: u32, users_max: u64, out: &mut Vec<u64>) {
    let mut rng = Rng::new(seed);
    out.clear();
    out.extend((0..count).map(|_| 1 + rng.below(users_max)));
}

/// Our protocol: registers as gateway `gateway` before its first request.
struct OurCodec {
    register: Option<u32>,
    next_id: u64,
    users: Vec<u64>,
}

impl OurCodec {
    fn new(gateway: u32) -> Self {
        Self {
            register: Some(gateway),
            next_id: 1,
            users: Vec::new(),
        }
    }

    fn push(&mut self, id: u64, body: RequestBody, out: &mut Vec<u8>) -> Result<()> {
        frame::encode(&Request { id, body }, FRAME_BODY_BYTES_MAX_DEFAULT, out)
            .map_err(|e| anyhow::anyhow!("encode request: {e}"))
    }
}

impl Codec<PresenceOp> for OurCodec {
    const SECURE_LINK: bool = true;

    fn encode(&mut self, op: &PresenceOp, _payload: &[u8], out: &mut Vec<u8>) -> Result<()> {
        if let Some(gateway) = self.register.take() {
            let peer_addr = String::new();
            self.push(0, RequestBody::Register { gateway, peer_addr }, out)?;
        }
        let body = match *op {
            PresenceOp::Online { user } => RequestBody::Online {
                user,
                session: session_of(user),
                status: Status::Online,
            },
            PresenceOp::Offline { user } => RequestBody::Offline {
                user,
                session: session_of(user),
            },
            PresenceOp::Lookup {
                seed,
                count,
                users_max,
            } => {
                lookup_users(seed, count, users_max, &mut self.users);
                RequestBody::Lookup {
                    users: std::mem::take(&mut self.users),
                }
            }
        };
        self.next_id += 1;
        self.push(self.next_id, body, out)
    }

    fn decode(&mut self, buf: &mut BytesMut) -> Result<Option<Reply>> {
        loop {
            let frame = match frame::decode::<ServerFrame>(buf, 4 * FRAME_BODY_BYTES_MAX_DEFAULT) {
                Ok(Decoded::Frame(f)) => f,
                Ok(Decoded::Incomplete) => return Ok(None),
                Err(e) => bail!("bad frame from presence: {e}"),
            };
            let response = match frame {
                ServerFrame::Response(r) => r,
                ServerFrame::Event(_) => continue,
            };
            return Ok(Some(match response.body {
                ResponseBody::Registered { .. } if response.id == 0 => continue,
                ResponseBody::Error(e) => Reply::Error(format!("{:?}: {}", e.code, e.message)),
                ResponseBody::Entries { entries } => Reply::Page {
                    count: entries.len() as u64,
                    last_seq: None,
                    more: None,
                },
                _ => Reply::Appended,
            }));
        }
    }
}

/// Redis: `SET u:<user> "<gateway>:<session>:<since>:<status>"`, `DEL`,
/// `MGET`.
struct RedisCodec {
    gateway: u32,
    users: Vec<u64>,
    scratch: Vec<u8>,
}

impl RedisCodec {
    fn new(gateway: u32) -> Self {
        Self {
            gateway,
            users: Vec::new(),
            scratch: Vec::new(),
        }
    }

    fn put_key(&mut self, user: u64, out: &mut Vec<u8>) {
        self.scratch.clear();
        let _ = write!(self.scratch, "u:{user}");
        redis::put_bulk(out, &self.scratch);
    }
}

impl Codec<PresenceOp> for RedisCodec {
    fn encode(&mut self, op: &PresenceOp, _payload: &[u8], out: &mut Vec<u8>) -> Result<()> {
        match *op {
            PresenceOp::Online { user } => {
                out.extend_from_slice(b"*3\r\n$3\r\nSET\r\n");
                self.put_key(user, out);
                self.scratch.clear();
                let _ = write!(
                    self.scratch,
                    "{}:{}:{SINCE_S}:0",
                    self.gateway,
                    session_of(user)
                );
                redis::put_bulk(out, &self.scratch);
            }
            PresenceOp::Offline { user } => {
                out.extend_from_slice(b"*2\r\n$3\r\nDEL\r\n");
                self.put_key(user, out);
            }
            PresenceOp::Lookup {
                seed,
                count,
                users_max,
            } => {
                let mut users = std::mem::take(&mut self.users);
                lookup_users(seed, count, users_max, &mut users);
                let _ = write!(out, "*{}\r\n$4\r\nMGET\r\n", users.len() + 1);
                for &user in &users {
                    self.put_key(user, out);
                }
                self.users = users;
            }
        }
        Ok(())
    }

    fn decode(&mut self, buf: &mut BytesMut) -> Result<Option<Reply>> {
        redis::decode_reply(buf)
    }
}

/// Online every user of the slice once, then stop.
struct Fill {
    users: Vec<u64>,
    next: usize,
}

impl Workload<PresenceOp> for Fill {
    fn next_op(&mut self) -> Option<PresenceOp> {
        let user = *self.users.get(self.next)?;
        self.next += 1;
        Some(PresenceOp::Online { user })
    }

    fn on_reply(&mut self, _op: &PresenceOp, _reply: Reply) -> Result<u64> {
        Ok(1)
    }
}

/// Batched lookups of random loaded users, for as long as the run lasts.
struct Lookups {
    rng: Rng,
    count: u32,
    users_max: u64,
}

impl Workload<PresenceOp> for Lookups {
    fn next_op(&mut self) -> Option<PresenceOp> {
        Some(PresenceOp::Lookup {
            seed: self.rng.next_u64(),
            count: self.count,
            users_max: self.users_max,
        })
    }

    fn on_reply(&mut self, op: &PresenceOp, reply: Reply) -> Result<u64> {
        match (op, reply) {
            (PresenceOp::Lookup { count, .. }, Reply::Page { count: got, .. })
                if got == u64::from(*count) =>
            {
                Ok(got)
            }
            (op, reply) => bail!("unexpected reply {reply:?} to {op:?}"),
        }
    }
}

/// Toggle random users of the slice: offline if online, else online.
struct Toggles {
    rng: Rng,
    users: Vec<u64>,
    online: Vec<bool>,
}

impl Workload<PresenceOp> for Toggles {
    fn next_op(&mut self) -> Option<PresenceOp> {
        let i = self.rng.below(self.users.len() as u64) as usize;
        let user = self.users[i];
        self.online[i] = !self.online[i];
        Some(if self.online[i] {
            PresenceOp::Online { user }
        } else {
            PresenceOp::Offline { user }
        })
    }

    fn on_reply(&mut self, _op: &PresenceOp, _reply: Reply) -> Result<u64> {
        Ok(1)
    }
}

/// Memory of one target before and after loading the users.
#[derive(Debug, Clone, Serialize)]
pub struct MemoryResult {
    pub target: String,
    pub users: u64,
    /// VmRSS of the server process before and after the load.
    pub rss_before_bytes: u64,
    pub rss_after_bytes: u64,
    /// (after - before) / users.
    pub bytes_per_user: f64,
    /// Ours only: the table's slot bytes / users (from `Stats`).
    pub table_bytes_per_user: Option<f64>,
}

/// Our figure divided by Redis's; `bytes_per_user` is ours alone.
#[derive(Debug, Clone, Default, Serialize)]
pub struct PresenceRatios {
    pub memory_per_user_vs_redis: Option<f64>,
    pub lookup_vs_redis: Option<f64>,
    pub update_vs_redis: Option<f64>,
    pub bytes_per_user: Option<f64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct PresenceReport {
    pub ratios: PresenceRatios,
    pub config: serde_json::Value,
    pub phases: Vec<PhaseResult>,
    pub memory: Vec<MemoryResult>,
    pub problems: Vec<String>,
}

struct Settings {
    args: PresenceArgs,
    users: u64,
    duration: Duration,
}

impl Settings {
    fn new(args: PresenceArgs) -> Result<Self> {
        let users = args
            .users
            .unwrap_or(if args.quick { 1_000_000 } else { 10_000_000 });
        let secs = args
            .duration_secs
            .unwrap_or(if args.quick { 2.0 } else { 10.0 });
        let duration = Duration::try_from_secs_f64(secs).context("--duration-secs is not valid")?;
        anyhow::ensure!(args.connections > 0, "--connections must be at least 1");
        anyhow::ensure!(
            users >= args.connections as u64,
            "--users must be at least --connections"
        );
        anyhow::ensure!(
            (1..=BATCH_USERS_MAX).contains(&args.lookup_batch),
            "--lookup-batch must be in 1..={BATCH_USERS_MAX}"
        );
        Ok(Self {
            args,
            users,
            duration,
        })
    }

    fn spec(&self, addr: SocketAddr, pipeline: usize, timed: bool) -> LoadSpec {
        LoadSpec {
            addr,
            connections: self.args.connections,
            pipeline,
            duration: timed.then_some(self.duration),
            payload_bytes: 0,
        }
    }

    fn slice(&self, conn: usize) -> Vec<u64> {
        let users = users_of(conn, self.args.connections, self.users);
        users.into_iter().map(|u| u + 1).collect()
    }
}

/// One target: its server process and how to make a codec per connection.
struct Target<C> {
    name: &'static str,
    proc: ChildProc,
    addr: SocketAddr,
    codec: fn(u32) -> C,
}

pub async fn run(args: PresenceArgs) -> Result<()> {
    let s = Settings::new(args)?;
    let mut report = PresenceReport {
        ratios: PresenceRatios::default(),
        config: serde_json::json!({
            "quick": s.args.quick,
            "users": s.users,
            "connections": s.args.connections,
            "lookup_batch": s.args.lookup_batch,
            "lookup_pipeline": s.args.lookup_pipeline,
            "update_pipeline": s.args.update_pipeline,
            "duration_secs": s.duration.as_secs_f64(),
            "memory_measure": "VmRSS growth of the server process while loading / users",
            "redis_layout": "SET u:<user> \"<gateway>:<session>:<since>:<status>\"; MGET; DEL",
        }),
        phases: Vec::new(),
        memory: Vec::new(),
        problems: Vec::new(),
    };
    let root = tempfile::Builder::new()
        .prefix("imbench-presence-")
        .tempdir()
        .context("create a temp dir")?;
    match start_presence(s.args.presence_bin.as_deref()) {
        Ok((proc, addr)) => {
            let target = Target {
                name: "presence",
                proc,
                addr,
                codec: OurCodec::new,
            };
            measure(&s, target, &mut report).await?;
        }
        Err(e) => report.problems.push(format!("presence: {e:#}")),
    }
    match redis::start(&s.args.redis_bin, root.path(), RedisAof::Off) {
        Ok(server) => {
            let target = Target {
                name: "redis",
                proc: server.proc,
                addr: server.addr,
                codec: RedisCodec::new,
            };
            measure(&s, target, &mut report).await?;
        }
        Err(e) => report.problems.push(format!("redis: {e:#}")),
    }
    report.ratios = ratios(&report);
    println!("{}", render(&report));
    if let Some(path) = &s.args.json {
        report::write_json(path, "presence", &report)?;
        eprintln!("wrote {}", path.display());
    }
    Ok(())
}

fn start_presence(explicit: Option<&Path>) -> Result<(ChildProc, SocketAddr)> {
    let bin = procs::locate_sibling("presence", "presence", explicit)?;
    let mut cmd = Command::new(bin);
    // Connections of one phase end before the next phase's register again:
    // the gateways' users must outlive the gap.
    cmd.args(["--listen", "127.0.0.1:0", "--grace-ms", "3600000"])
        .env("NO_COLOR", "1");
    if std::env::var_os("RUST_LOG").is_none() {
        cmd.env("RUST_LOG", "warn");
    }
    procs::start_daemon("presence", &mut cmd, Duration::from_secs(60))
}

/// Load, measure memory, look up, update; then stop the server.
async fn measure<C: Codec<PresenceOp>>(
    s: &Settings,
    t: Target<C>,
    report: &mut PresenceReport,
) -> Result<()> {
    let pid = t.proc.pid();
    let codec = t.codec;
    let gateway = |i: usize| i as u32 + 1;
    eprintln!("{}: loading {} users", t.name, s.users);
    let rss_before = procs::rss_bytes(pid)?;
    let spec = s.spec(t.addr, s.args.update_pipeline, false);
    let fill = with_cpu(
        pid,
        run_load(&spec, |i| {
            let users = s.slice(i);
            (codec(gateway(i)), Fill { users, next: 0 })
        }),
    )
    .await;
    let fill: Measured = (fill.0.context("load the users")?, fill.1);
    report
        .phases
        .push(phase("load", t.name, "online", &spec, (&fill.0, fill.1)));
    let rss_after = procs::rss_bytes(pid)?;
    let table_bytes = match t.name {
        "presence" => table_bytes(t.addr).await.ok(),
        _ => None,
    };
    let users = s.users;
    report.memory.push(MemoryResult {
        target: t.name.into(),
        users,
        rss_before_bytes: rss_before,
        rss_after_bytes: rss_after,
        bytes_per_user: rss_after.saturating_sub(rss_before) as f64 / users as f64,
        table_bytes_per_user: table_bytes.map(|b| b as f64 / users as f64),
    });

    let spec = s.spec(t.addr, s.args.lookup_pipeline, true);
    let (count, users_max) = (s.args.lookup_batch as u32, s.users);
    let (out, cpu) = with_cpu(
        pid,
        run_load(&spec, |i| {
            let rng = Rng::new(SEED ^ i as u64);
            (
                codec(gateway(i)),
                Lookups {
                    rng,
                    count,
                    users_max,
                },
            )
        }),
    )
    .await;
    let setting = format!("batch {count}");
    report
        .phases
        .push(phase("lookup", t.name, &setting, &spec, (&out?, cpu)));

    let spec = s.spec(t.addr, s.args.update_pipeline, true);
    let (out, cpu) = with_cpu(
        pid,
        run_load(&spec, |i| {
            let users = s.slice(i);
            let online = vec![true; users.len()];
            let rng = Rng::new(SEED.rotate_left(7) ^ i as u64);
            (codec(gateway(i)), Toggles { rng, users, online })
        }),
    )
    .await;
    report.phases.push(phase(
        "update",
        t.name,
        "online/offline",
        &spec,
        (&out?, cpu),
    ));
    t.proc.kill()
}

/// The table's slot bytes, from the server's own `Stats`.
async fn table_bytes(addr: SocketAddr) -> Result<u64> {
    match presence::client::request_once(&addr.to_string(), RequestBody::Stats).await? {
        ResponseBody::Stats(stats) => Ok(stats.table_bytes),
        other => bail!("unexpected answer to Stats: {other:?}"),
    }
}

fn rate(report: &PresenceReport, phase: &str, target: &str) -> Option<f64> {
    report
        .phases
        .iter()
        .find(|r| r.phase == phase && r.target == target && r.errors == 0)
        .map(|r| r.ops_per_sec)
}

fn ratios(report: &PresenceReport) -> PresenceRatios {
    let memory = |target: &str| {
        report
            .memory
            .iter()
            .find(|m| m.target == target)
            .map(|m| m.bytes_per_user)
    };
    PresenceRatios {
        memory_per_user_vs_redis: report::ratio(memory("presence"), memory("redis")),
        lookup_vs_redis: report::ratio(
            rate(report, "lookup", "presence"),
            rate(report, "lookup", "redis"),
        ),
        update_vs_redis: report::ratio(
            rate(report, "update", "presence"),
            rate(report, "update", "redis"),
        ),
        bytes_per_user: memory("presence"),
    }
}

fn render(report: &PresenceReport) -> String {
    let mut out = String::new();
    report::phase_table(&mut out, &report.phases.iter().collect::<Vec<_>>());
    let _ = writeln!(
        out,
        "\n{:<9} {:>12} {:>14} {:>14} {:>12} {:>12}",
        "server", "users", "RSS before", "RSS after", "B/user", "table B/user"
    );
    const MIB: f64 = 1024.0 * 1024.0;
    for m in &report.memory {
        let _ = writeln!(
            out,
            "{:<9} {:>12} {:>10.1} MiB {:>10.1} MiB {:>12.1} {:>12}",
            m.target,
            m.users,
            m.rss_before_bytes as f64 / MIB,
            m.rss_after_bytes as f64 / MIB,
            m.bytes_per_user,
            m.table_bytes_per_user
                .map(|v| format!("{v:.1}"))
                .unwrap_or_else(|| "-".into()),
        );
    }
    let r = &report.ratios;
    let show = |v: Option<f64>| v.map(|v| format!("{v:.3}")).unwrap_or_else(|| "n/a".into());
    let _ = writeln!(out, "\nratios (ours / redis):");
    for (name, v) in [
        ("memory_per_user_vs_redis", r.memory_per_user_vs_redis),
        ("lookup_vs_redis", r.lookup_vs_redis),
        ("update_vs_redis", r.update_vs_redis),
        ("bytes_per_user (ours)", r.bytes_per_user),
    ] {
        let _ = writeln!(out, "  {name:<28} {}", show(v));
    }
    if !report.problems.is_empty() {
        let _ = writeln!(out, "\nproblems:");
        for p in &report.problems {
            let _ = writeln!(out, "  - {p}");
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_codecs_look_up_the_same_users() {
        let op = PresenceOp::Lookup {
            seed: 5,
            count: 3,
            users_max: 100,
        };
        let mut ours = Vec::new();
        OurCodec::new(1).encode(&op, &[], &mut ours).unwrap();
        let mut buf = BytesMut::from(&ours[..]);
        let Decoded::Frame(register) = frame::decode::<Request>(&mut buf, 1 << 20).unwrap() else {
            panic!("a Register frame comes first")
        };
        assert!(matches!(
            register.body,
            RequestBody::Register { gateway: 1, .. }
        ));
        let Decoded::Frame(lookup) = frame::decode::<Request>(&mut buf, 1 << 20).unwrap() else {
            panic!("then the Lookup")
        };
        let RequestBody::Lookup { users } = lookup.body else {
            panic!("{lookup:?}")
        };
        let mut theirs = Vec::new();
        RedisCodec::new(1).encode(&op, &[], &mut theirs).unwrap();
        let mut expected = b"*4\r\n$4\r\nMGET\r\n".to_vec();
        for u in &users {
            let key = format!("u:{u}");
            let _ = write!(expected, "${}\r\n{key}\r\n", key.len());
        }
        assert_eq!(
            String::from_utf8(theirs).unwrap(),
            String::from_utf8(expected).unwrap()
        );
        assert!(users.iter().all(|u| (1..=100).contains(u)));
    }

    #[test]
    fn ratio_keys_are_the_issue_s() {
        let v = serde_json::to_value(PresenceRatios::default()).unwrap();
        let mut keys: Vec<_> = v.as_object().unwrap().keys().cloned().collect();
        keys.sort();
        assert_eq!(
            keys,
            [
                "bytes_per_user",
                "lookup_vs_redis",
                "memory_per_user_vs_redis",
                "update_vs_redis"
            ]
        );
    }
}
