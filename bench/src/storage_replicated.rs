//! `imbench storage --replicas 3`: appends acknowledged only once a
//! second machine has them. Our shard as a group of three replicas (an
//! append is answered once a majority holds it, each replica syncing
//! always) against a real Redis primary with one real replica (both
//! `appendfsync always`), each connection keeping 16 appends in flight:
//! 16 pipelined appends to the group's leader, and on Redis 16 pipelined
//! RPUSH followed by `WAIT 1 0` (answered once the replica has them), one
//! round after another. Both sides' server CPU is the sum over their
//! processes.

use crate::{
    load::{run_load, Codec, LoadSpec, Op, RandomAppends, Reply, Workload},
    redis::{self, put_command, RedisAof, RespCodec},
    report::StorageReport,
    shard_driver::ShardCodec,
    storage::{phase, with_cpu_of},
};
use anyhow::{bail, Context, Result};
use bytes::BytesMut;
use msgstore::raft::testing::Group;
use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpStream},
    path::Path,
    time::{Duration, Instant},
};

/// Appends per connection per round (the pipeline depth of both sides).
pub const REPLICATED_PIPELINE: usize = 16;

/// The group's replicas: the defaults, except a smaller fan-out when
/// the run does not create the default's 65,536 bucket files per shard up
/// front (a quick run). Either way every replica's bucket files exist
/// before the phase: the measure is of appends, not of creating files
/// (which a running shard did long ago), as the standalone shard's
/// measures are when not quick.
fn group_config(precreate: bool) -> String {
    if precreate {
        "[engine]\nprecreate_buckets = true\n".into()
    } else {
        "[engine]\nbucket_dirs = 64\nbucket_files = 64\nprecreate_buckets = true\n".into()
    }
}

/// What the phase needs from the storage run's settings.
pub struct ReplicatedSpec<'a> {
    pub spec: LoadSpec,
    pub users: u64,
    pub seed: u64,
    pub redis_bin: &'a Path,
    pub msgstore_bin: &'a Path,
    pub precreate_buckets: bool,
}

/// Run both sides and add their phases (phase `replicated`) to `report`.
pub async fn run(r: &ReplicatedSpec<'_>, root: &Path, report: &mut StorageReport) -> Result<()> {
    eprintln!("replicated: redis primary + 1 replica (WAIT 1 0) vs msgstore group of 3");
    redis_side(r, root, report).await?;
    msgstore_side(r, root, report).await
}

async fn redis_side(r: &ReplicatedSpec<'_>, root: &Path, report: &mut StorageReport) -> Result<()> {
    let primary = redis::start(r.redis_bin, &root.join("redis-primary"), RedisAof::Always)
        .context("start the redis primary")?;
    let replicaof = vec![
        "--replicaof".to_string(),
        primary.addr.ip().to_string(),
        primary.addr.port().to_string(),
    ];
    let replica = redis::start_with(
        r.redis_bin,
        &root.join("redis-replica"),
        RedisAof::Always,
        &replicaof,
    )
    .context("start the redis replica")?;
    wait_for_replica(primary.addr)?;
    let spec = LoadSpec {
        addr: primary.addr,
        pipeline: 1,
        ..r.spec.clone()
    };
    let pids = [primary.proc.pid(), replica.proc.pid()];
    let (out, cpu) = with_cpu_of(
        &pids,
        run_load(&spec, |i| {
            (
                WaitCodec::new(r.users),
                Rounds(RandomAppends::new(i, r.seed, 0, r.users)),
            )
        }),
    )
    .await;
    let out = out.context("append to redis with WAIT")?;
    let shown = LoadSpec {
        pipeline: REPLICATED_PIPELINE,
        ..spec
    };
    let setting = "aof_always+replica_wait";
    report
        .append
        .push(phase("replicated", "redis", setting, &shown, (&out, cpu)));
    primary.proc.kill()?;
    replica.proc.kill()?;
    Ok(())
}

async fn msgstore_side(
    r: &ReplicatedSpec<'_>,
    root: &Path,
    report: &mut StorageReport,
) -> Result<()> {
    let dir = root.join("msgstore-group");
    std::fs::create_dir_all(&dir)?;
    let config = group_config(r.precreate_buckets);
    let mut group = Group::start(r.msgstore_bin, &dir, 3, &config).await;
    let leader = group.wait_for_leader(Duration::from_secs(30)).await;
    let spec = LoadSpec {
        addr: group.replicas[leader].client,
        pipeline: REPLICATED_PIPELINE,
        ..r.spec.clone()
    };
    let pids: Vec<u32> = group
        .replicas
        .iter()
        .filter_map(|p| p.child.as_ref().map(|c| c.id()))
        .collect();
    let (out, cpu) = with_cpu_of(
        &pids,
        run_load(&spec, |i| {
            (ShardCodec::new(), RandomAppends::new(i, r.seed, 0, r.users))
        }),
    )
    .await;
    let out = out.context("append to the msgstore group")?;
    report.append.push(phase(
        "replicated",
        "msgstore",
        "always_3_replicas",
        &spec,
        (&out, cpu),
    ));
    for p in &mut group.replicas {
        p.terminate();
    }
    Ok(())
}

/// Wait until the primary's replica has caught up (`WAIT 1 100` answers 1).
fn wait_for_replica(primary: SocketAddr) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut s = TcpStream::connect(primary)?;
    s.set_read_timeout(Some(Duration::from_secs(2)))?;
    loop {
        let mut cmd = Vec::new();
        put_command(&mut cmd, &[b"WAIT", b"1", b"100"]);
        s.write_all(&cmd)?;
        let mut buf = [0u8; 64];
        let n = s.read(&mut buf)?;
        if buf[..n].starts_with(b":1\r\n") {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("the redis replica did not catch up within 20 s");
        }
    }
}

/// Each op of the inner workload stands for a round of
/// [`REPLICATED_PIPELINE`] appends (see [`WaitCodec`]).
struct Rounds(RandomAppends);

impl Workload for Rounds {
    fn next_op(&mut self) -> Option<Op> {
        self.0.next_op()
    }

    fn on_reply(&mut self, op: &Op, reply: Reply) -> Result<u64> {
        Ok(self.0.on_reply(op, reply)? * REPLICATED_PIPELINE as u64)
    }
}

/// Encodes one append op as a round: [`REPLICATED_PIPELINE`] RPUSH to
/// users spread from the op's, then `WAIT 1 0`; its reply is complete once
/// all of them are answered and `WAIT` says the replica has them.
struct WaitCodec {
    inner: RespCodec,
    users: u64,
    /// Replies of the current round decoded so far.
    decoded: usize,
}

impl WaitCodec {
    fn new(users: u64) -> Self {
        Self {
            inner: RespCodec::new(),
            users: users.max(1),
            decoded: 0,
        }
    }
}

impl Codec for WaitCodec {
    fn encode(&mut self, op: &Op, payload: &[u8], out: &mut Vec<u8>) -> Result<()> {
        let Op::Append { user, msg_id } = *op else {
            bail!("a replicated round carries appends only");
        };
        for k in 0..REPLICATED_PIPELINE as u64 {
            let user = (user + k * 7_919) % self.users;
            self.inner
                .encode(&Op::Append { user, msg_id }, payload, out)?;
        }
        put_command(out, &[b"WAIT", b"1", b"0"]);
        Ok(())
    }

    fn decode(&mut self, buf: &mut BytesMut) -> Result<Option<Reply>> {
        while self.decoded < REPLICATED_PIPELINE {
            match self.inner.decode(buf)? {
                Some(Reply::Appended) => self.decoded += 1,
                Some(other) => bail!("RPUSH answered {other:?}"),
                None => return Ok(None),
            }
        }
        match redis::parse_value(buf)? {
            None => Ok(None),
            Some((len, value)) => {
                let _ = buf.split_to(len);
                self.decoded = 0;
                match value {
                    redis::RespValue::Int(n) if n >= 1 => Ok(Some(Reply::Appended)),
                    other => bail!("WAIT 1 0 answered {other:?}"),
                }
            }
        }
    }
}
