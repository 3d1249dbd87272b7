//! `imbench storage`: the mailbox workload against our shard and Redis,
//! the engine in-process, and the raw disk ceiling, all in one run.

use crate::{
    disk,
    inproc::{self, EngineSpec},
    load::{run_load, Codec, Drain, LoadOutcome, LoadSpec, Prefill, RandomAppends},
    procs,
    redis::{self, RedisAof, RedisServer, RespBatchCodec, RespCodec},
    report::{self, Backlog, PhaseResult, Ratios, ServerResult, StorageReport},
    shard_driver::{self, ShardCodec, ShardServer},
    storage_replicated,
};
use anyhow::{Context, Result};
use msgstore::FsyncPolicy;
use std::{
    path::{Path, PathBuf},
    time::Duration,
};

/// Messages per drain page (LRANGE 0 99 / Fetch max_count 100).
const DRAIN_PAGE_COUNT: u32 = 100;
/// Pipeline depths of the append phases.
const APPEND_PIPELINES: [usize; 2] = [1, 16];
/// Pipeline depth of the drain prefill.
const PREFILL_PIPELINE: usize = 16;
/// How long a shard may take to answer `Stats` after a phase (a shard busy
/// with a checkpoint may take long; `--quick` does not wait as long).
const STATS_TIMEOUT: Duration = Duration::from_secs(15);
const STATS_TIMEOUT_QUICK: Duration = Duration::from_secs(4);
const SEED: u64 = 0x5EED_1B0B;
/// Longest wait for a server to become idle between prefill and drain.
const SETTLE_MAX: Duration = Duration::from_secs(60);
const SETTLE_MAX_QUICK: Duration = Duration::from_secs(5);
/// Longest wait for a server to exit after SIGTERM before its restart.
const STOP_TIMEOUT: Duration = Duration::from_secs(120);

#[derive(clap::Args, Debug, Clone)]
pub struct StorageArgs {
    /// Short phases and fewer users: the whole run takes under a minute.
    #[arg(long)]
    pub quick: bool,
    /// Also write the results as JSON to this file.
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// TCP connections per target (the same on both sides).
    #[arg(long, default_value_t = 50)]
    pub connections: usize,
    /// Users the append phases pick from at random [default: 1,000,000;
    /// quick: 2,000, so that the checkpoints an idle shard runs between
    /// quick phases create at most as many bucket files: creating and
    /// removing tens of thousands takes tens of seconds here].
    #[arg(long)]
    pub users: Option<u64>,
    #[arg(long, default_value_t = 200)]
    pub payload_bytes: usize,
    /// Length of each timed phase [default: 30; quick: 1.5]. Long enough by
    /// default that our append phases pay for several checkpoints (one per
    /// 256 MiB of log), not just fill the memtable.
    #[arg(long)]
    pub duration_secs: Option<f64>,
    /// Mailboxes prefilled and drained [default: 5,000; quick: 2,000].
    #[arg(long)]
    pub drain_users: Option<u64>,
    /// Messages prefilled into each drained mailbox.
    #[arg(long, default_value_t = 120)]
    pub drain_messages_per_user: u64,
    /// Requests in flight per connection while draining.
    #[arg(long, default_value_t = 16)]
    pub drain_pipeline: usize,
    /// Connections of the gateway-shaped append phase: a gateway keeps one
    /// pipelined connection per shard, so one per gateway.
    #[arg(long, default_value_t = 2)]
    pub gateway_connections: usize,
    /// Messages per request of the gateway-shaped phase: one `AppendBatch`
    /// of this many items to one mailbox (a conversation's queue; the
    /// gateway's stores averaged 16 items in `imbench e2e --quick`'s
    /// offline phase), against as many pipelined RPUSH to one key.
    #[arg(long, default_value_t = 16)]
    pub gateway_batch_items: u32,
    /// Requests (batches) in flight per connection in the gateway-shaped
    /// phase: a gateway has one store in flight per conversation, and
    /// `imbench e2e --quick`'s offline phase has 64 conversations over 2
    /// shards, 32 per shard: 16 from each of two gateways.
    #[arg(long, default_value_t = 16)]
    pub gateway_batches_inflight: usize,
    /// Concurrent appenders of the in-process engine phase.
    #[arg(long, default_value_t = 50)]
    pub appenders: usize,
    /// Bytes added to the payload per record in the disk ceiling (the
    /// engine's record header).
    #[arg(long, default_value_t = 60)]
    pub record_header_bytes: usize,
    /// Where the temporary data directories go (the disk under test).
    #[arg(long)]
    pub work_dir: Option<PathBuf>,
    /// Do not create the shards' bucket files before measuring: the first
    /// checkpoints then create them under traffic (a new shard's one-time
    /// cost) instead of at start (reported as the start time). Implied by
    /// --quick.
    #[arg(long)]
    pub fresh_buckets: bool,
    #[arg(long, default_value = "redis-server")]
    pub redis_bin: PathBuf,
    /// The msgstore daemon [default: `msgstore` next to this executable].
    #[arg(long)]
    pub msgstore_bin: Option<PathBuf>,
    /// A config file for every msgstore daemon started (`msgstore --config`),
    /// e.g. to compare `[server]` settings; flags still set data, listen
    /// address and fsync.
    #[arg(long)]
    pub msgstore_config: Option<PathBuf>,
    /// Run only these phases (comma-separated), e.g. to profile one; the
    /// ratios of phases not run are absent. The disk ceiling runs with
    /// `engine` (it needs the engine's batch size).
    #[arg(long, value_enum, value_delimiter = ',', default_values_t = Phase::all())]
    pub phases: Vec<Phase>,
    /// 3: also run the replicated phase (a 3-replica msgstore group vs a
    /// Redis primary with one replica and `WAIT 1 0`); 1 (default): not.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u8).range(1..=3))]
    pub replicas: u8,
}

/// A selectable part of the storage benchmark.
#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Appends: Redis `always` vs our `always`; then both servers' footprint
    /// at rest and their restart.
    Always,
    /// Appends in the gateway's shape (few connections, batches of
    /// messages to one mailbox): Redis `always` vs our `always`.
    Gateway,
    /// Appends: Redis `everysec` vs our `interval:1000`.
    Interval,
    /// Appends: Redis AOF off vs our `never`.
    Never,
    /// Prefill and drain.
    Drain,
    /// The engine in-process, then the disk ceiling.
    Engine,
}

impl Phase {
    fn all() -> Vec<Phase> {
        vec![
            Phase::Always,
            Phase::Gateway,
            Phase::Interval,
            Phase::Never,
            Phase::Drain,
            Phase::Engine,
        ]
    }
}

/// Arguments with the quick/default choices resolved.
struct Settings {
    args: StorageArgs,
    users: u64,
    duration: Duration,
    drain_users: u64,
}

impl Settings {
    /// Shards start with all their bucket files created, except with
    /// `--fresh-buckets` or `--quick` (creating 65,536 files takes longer
    /// than a quick run may).
    fn precreate_buckets(&self) -> bool {
        !(self.args.fresh_buckets || self.args.quick)
    }

    fn new(args: StorageArgs) -> Result<Self> {
        let users = args
            .users
            .unwrap_or(if args.quick { 2_000 } else { 1_000_000 })
            .max(1);
        let duration_secs = args
            .duration_secs
            .unwrap_or(if args.quick { 1.5 } else { 30.0 });
        let duration =
            Duration::try_from_secs_f64(duration_secs).context("--duration-secs is not valid")?;
        let drain_users = args
            .drain_users
            .unwrap_or(if args.quick { 2_000 } else { 5_000 })
            .max(1);
        anyhow::ensure!(args.connections > 0, "--connections must be at least 1");
        anyhow::ensure!(
            args.gateway_connections > 0 && args.gateway_batches_inflight > 0,
            "--gateway-connections and --gateway-batches-inflight must be at least 1"
        );
        anyhow::ensure!(
            (1..=proto::shard::APPEND_BATCH_ITEMS_MAX as u32).contains(&args.gateway_batch_items),
            "--gateway-batch-items must be 1 to {}",
            proto::shard::APPEND_BATCH_ITEMS_MAX
        );
        Ok(Self {
            args,
            users,
            duration,
            drain_users,
        })
    }

    fn wanted(&self, p: Phase) -> bool {
        self.args.phases.contains(&p)
    }

    /// The append phases run against the pair of `pair` (its phase).
    fn shapes(&self, pair: Phase) -> Vec<Shape> {
        let mut shapes = Vec::new();
        if self.wanted(pair) {
            shapes.extend(APPEND_PIPELINES.map(|pipeline| Shape {
                phase: "append",
                connections: self.args.connections,
                pipeline,
                batch_items: 1,
            }));
        }
        if pair == Phase::Always && self.wanted(Phase::Gateway) {
            shapes.push(Shape {
                phase: GATEWAY_PHASE,
                connections: self.args.gateway_connections,
                pipeline: self.args.gateway_batches_inflight,
                batch_items: self.args.gateway_batch_items,
            });
        }
        shapes
    }

    fn spec(&self, addr: std::net::SocketAddr, pipeline: usize, timed: bool) -> LoadSpec {
        LoadSpec {
            addr,
            connections: self.args.connections,
            pipeline,
            duration: timed.then_some(self.duration),
            payload_bytes: self.args.payload_bytes,
        }
    }
}

/// The row name of the gateway-shaped append phase.
const GATEWAY_PHASE: &str = "append_gateway";

/// How an append phase drives its target: `connections`, each with
/// `pipeline` requests in flight, each request `batch_items` messages to
/// one mailbox.
#[derive(Debug, Clone, Copy)]
struct Shape {
    phase: &'static str,
    connections: usize,
    pipeline: usize,
    batch_items: u32,
}

pub(crate) fn phase(
    phase: &str,
    target: &str,
    setting: &str,
    spec: &LoadSpec,
    (out, cpu): (&LoadOutcome, PhaseCpu),
) -> PhaseResult {
    let (server_cpu_us_per_op, client_cpu_us_per_op) = cpu.us_per_op(out.ops);
    let r = PhaseResult {
        phase: phase.into(),
        target: target.into(),
        setting: setting.into(),
        connections: spec.connections,
        pipeline: spec.pipeline,
        ops: out.ops,
        ops_in_window: out.ops_in_window,
        abandoned: out.abandoned,
        errors: out.errors,
        first_error: out.first_error.clone(),
        elapsed_secs: out.elapsed.as_secs_f64(),
        ops_per_sec: out.ops_per_sec(),
        latency: out.hist.summary(),
        server_cpu_us_per_op,
        client_cpu_us_per_op,
        rate_samples: out.rate_samples.clone(),
    };
    eprintln!(
        "  {:<8} {:<9} {:<13} pipeline {:>2}: {:>10.0} ops/s  p50 {} us  p99 {} us  errors {}",
        r.phase,
        r.target,
        r.setting,
        r.pipeline,
        r.ops_per_sec,
        r.latency.p50_us,
        r.latency.p99_us,
        r.errors
    );
    r
}

/// The data directory of the shard of `fsync` under the run's root.
fn shard_dir_name(fsync: FsyncPolicy) -> String {
    format!("msgstore-{}", fsync.to_string().replace(':', "_"))
}

pub async fn run(args: StorageArgs) -> Result<()> {
    let s = Settings::new(args)?;
    let work_dir = s.args.work_dir.clone().unwrap_or_else(std::env::temp_dir);
    let root = tempfile::Builder::new()
        .prefix("imbench-storage-")
        .tempdir_in(&work_dir)
        .with_context(|| format!("create a temp dir in {}", work_dir.display()))?;
    let mut report = StorageReport::new(serde_json::json!({
            "quick": s.args.quick,
            "connections": s.args.connections,
            "users": s.users,
            "payload_bytes": s.args.payload_bytes,
            "duration_secs": s.duration.as_secs_f64(),
            "append_pipelines": APPEND_PIPELINES,
            "gateway_shape": {
                "connections": s.args.gateway_connections,
                "batches_inflight_per_connection": s.args.gateway_batches_inflight,
                "batch_items": s.args.gateway_batch_items,
                "msgstore": "AppendBatch of batch_items messages to one user per request",
                "redis": "batch_items pipelined RPUSH to one key per request",
                "setting": "redis aof_always vs msgstore always",
            },
            "drain_users": s.drain_users,
            "drain_messages_per_user": s.args.drain_messages_per_user,
            "drain_pipeline": s.args.drain_pipeline,
            "drain_page_count": DRAIN_PAGE_COUNT,
            "drain_setting": "redis aof_always vs msgstore always",
            "replicas": s.args.replicas,
            "replicated_pipeline": storage_replicated::REPLICATED_PIPELINE,
            "engine_appenders": s.args.appenders,
            "record_header_bytes": s.args.record_header_bytes,
            "work_dir": work_dir,
            "vm_max_map_count": msgstore::max_map_count(),
    }));
    // A shard keeps fewer than its 65,536 buckets mapped below 67,584.
    match msgstore::max_map_count() {
        Some(limit) => eprintln!("host: vm.max_map_count = {limit}"),
        None => eprintln!("host: vm.max_map_count unknown"),
    }
    let msgstore_bin = match shard_driver::locate_msgstore(s.args.msgstore_bin.as_deref()) {
        Ok(b) => Some(b),
        Err(e) => {
            report.problems.push(format!("{e:#}"));
            None
        }
    };

    let pairs = [
        (Phase::Always, RedisAof::Always, FsyncPolicy::Always),
        (
            Phase::Interval,
            RedisAof::EverySec,
            FsyncPolicy::IntervalMs(1000),
        ),
        (Phase::Never, RedisAof::Off, FsyncPolicy::Never),
    ];
    let wanted = |p: Phase| s.wanted(p);
    for (pair, aof, fsync) in pairs {
        let shapes = s.shapes(pair);
        if shapes.is_empty() {
            continue;
        }
        eprintln!("append: redis {aof} vs msgstore {fsync}");
        append_pair(
            &s,
            (root.path(), &shapes),
            aof,
            fsync,
            msgstore_bin.as_deref(),
            &mut report,
        )
        .await?;
    }

    if wanted(Phase::Drain) {
        eprintln!(
            "drain: redis {} vs msgstore {}",
            RedisAof::Always,
            FsyncPolicy::Always
        );
        drain_pair(&s, root.path(), msgstore_bin.as_deref(), &mut report).await?;
    }
    if wanted(Phase::Engine) {
        engine_and_disk(&s, root.path(), &mut report).await?;
    }
    if s.args.replicas == 3 {
        match &msgstore_bin {
            Some(bin) => {
                let r = storage_replicated::ReplicatedSpec {
                    // Each side sets its own address.
                    spec: s.spec(std::net::SocketAddr::from(([127, 0, 0, 1], 0)), 1, true),
                    users: s.users,
                    seed: SEED,
                    redis_bin: &s.args.redis_bin,
                    msgstore_bin: bin,
                    precreate_buckets: s.precreate_buckets(),
                };
                storage_replicated::run(&r, root.path(), &mut report).await?;
            }
            None => report
                .problems
                .push("replicated phase: no msgstore binary".into()),
        }
    }
    finish(s, root, report)
}

/// The engine in-process, then the raw disk ceiling at its batch size.
async fn engine_and_disk(s: &Settings, root: &Path, report: &mut StorageReport) -> Result<()> {
    eprintln!(
        "engine in-process: {} appenders, fsync always",
        s.args.appenders
    );
    let engine = inproc::engine_append(EngineSpec {
        data_dir: root.join("engine"),
        fsync: FsyncPolicy::Always,
        appenders: s.args.appenders,
        users: s.users,
        payload_bytes: s.args.payload_bytes,
        duration: s.duration,
        precreate: s.precreate_buckets(),
    })
    .await;
    match engine {
        Ok(e) => {
            eprintln!(
                "  engine: {:.0} appends/s, mean batch {:.1}",
                e.phase.ops_per_sec, e.mean_batch_appends
            );
            report.engine = Some(e);
        }
        Err(e) => report.problems.push(format!("engine in-process: {e:#}")),
    }

    let records_per_sync = match &report.engine {
        Some(e) if e.mean_batch_appends >= 1.0 => e.mean_batch_appends.round() as usize,
        _ => {
            report.problems.push(
                "no engine batch size measured: disk ceiling uses 1 record per fdatasync".into(),
            );
            1
        }
    };
    let record_bytes = s.args.payload_bytes + s.args.record_header_bytes;
    eprintln!("disk ceiling: {record_bytes}-byte records, fdatasync per {records_per_sync}");
    let disk_dir = root.to_path_buf();
    let duration = s.duration;
    let ceiling = tokio::task::spawn_blocking(move || {
        disk::ceiling(&disk_dir, record_bytes, records_per_sync, duration)
    })
    .await
    .context("disk ceiling task panicked")??;
    eprintln!("  disk: {:.0} records/s", ceiling.phase.ops_per_sec);
    report.disk_ceiling = Some(ceiling);

    remove_dir(&root.join("engine")).ok();
    Ok(())
}

/// Note abandoned requests, remove the temp dir, print and save the report.
fn finish(s: Settings, root: tempfile::TempDir, mut report: StorageReport) -> Result<()> {
    let engine_phase = report.engine.as_ref().map(|e| &e.phase);
    for r in report
        .append
        .iter()
        .chain(&report.drain)
        .chain(engine_phase)
    {
        if r.abandoned > 0 {
            report.problems.push(format!(
                "{} {} {} pipeline {}: {} requests still unanswered {:?} after the deadline were abandoned",
                r.phase,
                r.target,
                r.setting,
                r.pipeline,
                r.abandoned,
                crate::load::tail_grace(s.duration)
            ));
        }
    }
    let t0 = std::time::Instant::now();
    root.close().context("remove the temp dir")?;
    if t0.elapsed() > Duration::from_secs(1) {
        eprintln!("  (cleanup took {:.1?})", t0.elapsed());
    }
    report.ratios = compute_ratios(&report);
    // The throughput over time of every TCP phase, ours and Redis's.
    let (timeline, left_out) =
        report::Timeline::of_phases(report.append.iter().chain(&report.drain));
    report.timeline = timeline;
    if left_out > 0 {
        report.problems.push(format!(
            "timeline: {left_out} samples past {} left out",
            report::Timeline::SAMPLES_MAX
        ));
    }
    println!("{}", report::render_table(&report));
    if let Some(path) = &s.args.json {
        report::write_json(path, "storage", &report)?;
        eprintln!("wrote {}", path.display());
    }
    Ok(())
}

fn start_shard(
    s: &Settings,
    (bin, root): (Option<&Path>, &Path),
    fsync: FsyncPolicy,
    report: &mut StorageReport,
) -> Option<ShardServer> {
    let bin = bin?;
    let dir = root.join(shard_dir_name(fsync));
    let precreate = s.precreate_buckets();
    match shard_driver::start(
        bin,
        &dir,
        fsync,
        precreate,
        s.args.msgstore_config.as_deref(),
    ) {
        Ok(s) => {
            eprintln!(
                "  msgstore --fsync {fsync} serving after {:.1} s{}",
                s.start_secs,
                if precreate {
                    " (bucket files created first)"
                } else {
                    ""
                }
            );
            Some(s)
        }
        Err(e) => {
            report
                .problems
                .push(format!("msgstore --fsync {fsync}: {e:#}"));
            None
        }
    }
}

fn start_redis(s: &Settings, root: &Path, aof: RedisAof, tag: &str) -> Result<RedisServer> {
    redis::start(
        &s.args.redis_bin,
        &root.join(format!("redis-{aof}{tag}")),
        aof,
    )
    .with_context(|| format!("start redis-server ({aof})"))
}

async fn append_pair(
    s: &Settings,
    (root, shapes): (&Path, &[Shape]),
    aof: RedisAof,
    fsync: FsyncPolicy,
    msgstore_bin: Option<&Path>,
    report: &mut StorageReport,
) -> Result<()> {
    let redis = start_redis(s, root, aof, "")?;
    let mut shard = start_shard(s, (msgstore_bin, root), fsync, report);
    let mut redis_acked = 0;
    // Every phase starts with both servers idle: neither's background work
    // (our checkpoints, Redis's AOF rewrite) spills into the other's phase.
    let pids: Vec<u32> = [Some(redis.proc.pid()), shard.as_ref().map(|s| s.proc.pid())]
        .into_iter()
        .flatten()
        .collect();
    let shard_addr = shard.as_ref().map(|s| s.addr);
    for shape in shapes {
        settle(s, &pids, shard_addr, "the last phase").await?;
        let target = (redis.addr, redis.proc.pid());
        let (spec, (out, cpu)) = run_shape(s, target, shape, RespBatchCodec::new).await;
        let out = out.with_context(|| format!("{} to redis ({aof}, {shape:?})", shape.phase))?;
        redis_acked += out.ops;
        let row = phase(shape.phase, "redis", &aof.to_string(), &spec, (&out, cpu));
        report.append.push(row);
        if let Some(server) = &shard {
            settle(s, &pids, shard_addr, "the last phase").await?;
            if let Err(e) = shard_shape(s, (server, fsync), shape, report).await {
                let what = format!("{} to msgstore ({fsync}, {shape:?})", shape.phase);
                report.problems.push(format!("{what}: {e:#}"));
                shard = None;
            }
        }
    }
    // The always pair's servers are measured at rest and restarted.
    let restart = (aof == RedisAof::Always).then_some(msgstore_bin).flatten();
    if restart.is_some() {
        // At rest: idle, the shard's log checkpointed.
        settle(s, &pids, shard.as_ref().map(|s| s.addr), "the last phase").await?;
    }
    let redis_row = redis_footprint(&redis, &aof.to_string(), redis_acked)?;
    let shard_row = match &shard {
        Some(server) => match shard_footprint(server, &fsync.to_string(), s.args.quick).await {
            Ok(r) => Some(r),
            Err(e) => {
                let e = format!("msgstore ({fsync}) footprint: {e:#}");
                report.problems.push(e);
                None
            }
        },
        None => None,
    };
    let rows = (redis_row, shard_row);
    stop_pair(s, (redis, shard), rows, (aof, fsync, restart), report)?;
    // Absent if the shard never started.
    remove_dir(&root.join(shard_dir_name(fsync))).ok();
    Ok(())
}

/// One append phase of `shape` against our shard: its row and backlog.
async fn shard_shape(
    s: &Settings,
    (server, fsync): (&ShardServer, FsyncPolicy),
    shape: &Shape,
    report: &mut StorageReport,
) -> Result<()> {
    let target = (server.addr, server.proc.pid());
    let (spec, (result, cpu)) = run_shape(s, target, shape, ShardCodec::new).await;
    let out = result?;
    let setting = fsync.to_string();
    let row = phase(shape.phase, "msgstore", &setting, &spec, (&out, cpu));
    report.append.push(row);
    note_backlog(server.addr, (&setting, spec.pipeline, out.ops), report).await;
    Ok(())
}

/// Stop the pair's servers (with `restart`, the msgstore binary: restart
/// each once on its data and note how long that took), record their
/// footprint rows and remove Redis's data.
fn stop_pair(
    s: &Settings,
    (redis, shard): (RedisServer, Option<ShardServer>),
    (mut redis_row, mut shard_row): (ServerResult, Option<ServerResult>),
    (aof, fsync, restart): (RedisAof, FsyncPolicy, Option<&Path>),
    report: &mut StorageReport,
) -> Result<()> {
    let redis_dir = redis.data_dir.clone();
    match restart {
        Some(bin) => {
            redis_row.restart_secs = Some(restart_redis(s, redis, aof)?);
            if let (Some(server), Some(row)) = (shard, shard_row.as_mut()) {
                match restart_shard(s, server, (bin, fsync)) {
                    Ok(secs) => row.restart_secs = Some(secs),
                    Err(e) => report.problems.push(format!("msgstore restart: {e:#}")),
                }
            }
        }
        None => {
            redis.proc.kill()?;
            if let Some(server) = shard {
                server.proc.kill()?;
            }
        }
    }
    remove_dir(&redis_dir)?;
    if let Some(row) = &shard_row {
        eprintln!(
            "  at rest: redis {} B/msg, msgstore {} B/msg",
            fmt_opt(redis_row.disk_bytes_per_message),
            fmt_opt(row.disk_bytes_per_message)
        );
    }
    report.servers.push(redis_row);
    report.servers.extend(shard_row);
    Ok(())
}

fn fmt_opt(v: Option<f64>) -> String {
    v.map(|v| format!("{v:.1}")).unwrap_or_else(|| "-".into())
}

/// One timed append phase of `shape` against the server at `addr`
/// (process `pid`) through codec `C`: its spec, outcome and CPU times.
async fn run_shape<C: Codec>(
    s: &Settings,
    (addr, pid): (std::net::SocketAddr, u32),
    shape: &Shape,
    codec: fn() -> C,
) -> (LoadSpec, (Result<LoadOutcome>, PhaseCpu)) {
    let spec = LoadSpec {
        connections: shape.connections,
        ..s.spec(addr, shape.pipeline, true)
    };
    let measured = with_cpu(
        pid,
        run_load(&spec, |i| {
            let w = RandomAppends::batched(i, SEED, s.users, shape.batch_items);
            (codec(), w)
        }),
    )
    .await;
    (spec, measured)
}

/// Wait until the shard at `addr` has checkpointed all its log (an idle
/// shard does so by itself, `checkpoint_idle_ms`); true if it had not yet.
/// At most `SETTLE_MAX` (5 s with `--quick`).
async fn wait_checkpointed(s: &Settings, addr: std::net::SocketAddr) -> bool {
    let max = settle_max(s);
    let (t0, mut waited) = (std::time::Instant::now(), false);
    loop {
        let stats = tokio::time::timeout(max, shard_driver::fetch_stats(addr)).await;
        match stats {
            Ok(Ok(st)) if st.wal_bytes == 0 => return waited,
            _ if t0.elapsed() >= max => {
                eprintln!("  (msgstore log still not checkpointed {max:?} after the load)");
                return true;
            }
            _ => {
                waited = true;
                tokio::time::sleep(Duration::from_millis(50)).await
            }
        }
    }
}

/// Stop Redis (SIGTERM) and start it again on its data: seconds from the
/// spawn until it answers PING (it answers only once its AOF is loaded).
fn restart_redis(s: &Settings, redis: RedisServer, aof: RedisAof) -> Result<f64> {
    let root = redis
        .data_dir
        .parent()
        .context("redis data dir has no parent")?
        .to_path_buf();
    redis.proc.stop(STOP_TIMEOUT)?;
    let t0 = std::time::Instant::now();
    let again = redis::start(&s.args.redis_bin, &root, aof).context("restart redis")?;
    let secs = t0.elapsed().as_secs_f64();
    eprintln!("  redis restarted (AOF loaded) in {secs:.2} s");
    again.proc.kill()?;
    Ok(secs)
}

/// Stop our shard (SIGTERM) and start it again on its data: seconds from
/// the spawn until it listens.
fn restart_shard(
    s: &Settings,
    server: ShardServer,
    (bin, fsync): (&Path, FsyncPolicy),
) -> Result<f64> {
    let dir = server.data_dir.clone();
    server.proc.stop(STOP_TIMEOUT)?;
    let again = shard_driver::start(
        bin,
        &dir,
        fsync,
        s.precreate_buckets(),
        s.args.msgstore_config.as_deref(),
    )
    .context("restart msgstore")?;
    eprintln!("  msgstore restarted in {:.2} s", again.start_secs);
    let secs = again.start_secs;
    again.proc.kill()?;
    Ok(secs)
}

/// Record how much log the shard at `addr` has not checkpointed yet.
async fn note_backlog(
    addr: std::net::SocketAddr,
    (setting, pipeline, phase_ops): (&str, usize, u64),
    report: &mut StorageReport,
) {
    // A stalled shard answers once its checkpoint is done.
    let stats = tokio::time::timeout(SETTLE_MAX, shard_driver::fetch_stats(addr)).await;
    match stats {
        Ok(Ok(stats)) => report.backlogs.push(Backlog {
            setting: setting.into(),
            pipeline,
            log_bytes: stats.wal_bytes,
            phase_ops,
        }),
        Ok(Err(e)) => report.problems.push(format!("msgstore stats: {e:#}")),
        Err(_) => report.problems.push("msgstore stats: no answer".into()),
    }
}

fn settle_max(s: &Settings) -> Duration {
    if s.args.quick {
        SETTLE_MAX_QUICK
    } else {
        SETTLE_MAX
    }
}

/// Wait until the servers `pids` are idle and the shard at `shard` (if
/// any) has checkpointed what the last phase logged (at most `SETTLE_MAX`
/// each; 5 s with `--quick`), so the next phase measures only itself;
/// says so if it took a while or they stayed busy.
async fn settle(
    s: &Settings,
    pids: &[u32],
    shard: Option<std::net::SocketAddr>,
    after: &str,
) -> Result<()> {
    settle_cpu(s, pids, after).await?;
    if let Some(addr) = shard {
        if wait_checkpointed(s, addr).await {
            settle_cpu(s, pids, "the shard's checkpoint").await?;
        }
    }
    Ok(())
}

async fn settle_cpu(s: &Settings, pids: &[u32], after: &str) -> Result<()> {
    let max = settle_max(s);
    match crate::procs::settle(pids, max).await? {
        Some(t) if t > Duration::from_secs(1) => {
            eprintln!("  (servers idle {:.1} s after {after})", t.as_secs_f64())
        }
        Some(_) => {}
        None => eprintln!("  (servers still busy {max:?} after {after}; measuring anyway)"),
    }
    Ok(())
}

/// Remove a finished server's data now, so the next phase's disk is not
/// busy writing back or deleting it.
fn remove_dir(dir: &Path) -> Result<()> {
    let t0 = std::time::Instant::now();
    std::fs::remove_dir_all(dir).with_context(|| format!("remove {}", dir.display()))?;
    let took = t0.elapsed();
    if took > Duration::from_secs(1) {
        eprintln!("  (removing {} took {took:.1?})", dir.display());
    }
    Ok(())
}

fn per_message(disk_bytes: u64, messages: u64) -> Option<f64> {
    (messages > 0).then(|| disk_bytes as f64 / messages as f64)
}

fn redis_footprint(redis: &RedisServer, setting: &str, messages: u64) -> Result<ServerResult> {
    let pid = redis.proc.pid();
    let disk_bytes = disk::dir_allocated_bytes(&redis.data_dir)?;
    Ok(ServerResult {
        target: "redis".into(),
        setting: setting.into(),
        peak_rss_bytes: procs::peak_rss_bytes(pid).ok(),
        anon_rss_bytes: procs::anon_rss_bytes(pid).ok(),
        disk_bytes,
        messages_stored: messages,
        disk_bytes_per_message: per_message(disk_bytes, messages),
        shard_stats: None,
        start_secs: None,
        restart_secs: None,
    })
}

async fn shard_footprint(server: &ShardServer, setting: &str, quick: bool) -> Result<ServerResult> {
    let wait = if quick {
        STATS_TIMEOUT_QUICK
    } else {
        STATS_TIMEOUT
    };
    let stats = tokio::time::timeout(wait, shard_driver::fetch_stats(server.addr))
        .await
        .with_context(|| format!("no answer to Stats within {wait:?}"))??;
    let disk_bytes = disk::dir_allocated_bytes(&server.data_dir)?;
    let pid = server.proc.pid();
    Ok(ServerResult {
        target: "msgstore".into(),
        setting: setting.into(),
        peak_rss_bytes: procs::peak_rss_bytes(pid).ok(),
        anon_rss_bytes: procs::anon_rss_bytes(pid).ok(),
        disk_bytes,
        messages_stored: stats.live_messages,
        disk_bytes_per_message: per_message(disk_bytes, stats.live_messages),
        shard_stats: Some(stats),
        start_secs: Some(server.start_secs),
        restart_secs: None,
    })
}

/// The drained mailboxes of connection `conn`: users `conn, conn + n, ...`.
pub(crate) fn users_of(conn: usize, connections: usize, users: u64) -> Vec<u64> {
    (conn as u64..users).step_by(connections).collect()
}

async fn drain_pair(
    s: &Settings,
    root: &Path,
    msgstore_bin: Option<&Path>,
    report: &mut StorageReport,
) -> Result<()> {
    let redis = start_redis(s, root, RedisAof::Always, "-drain")?;
    let shard_root = root.join("drain");
    let shard = start_shard(s, (msgstore_bin, &shard_root), FsyncPolicy::Always, report);
    let users = s.drain_users;
    let expected = users * s.args.drain_messages_per_user;
    // Not more connections than mailboxes, so every connection has work.
    let connections = s.args.connections.min(users as usize);

    let mut targets: Vec<(&str, String, std::net::SocketAddr, u32)> = vec![(
        "redis",
        RedisAof::Always.to_string(),
        redis.addr,
        redis.proc.pid(),
    )];
    if let Some(server) = &shard {
        targets.push((
            "msgstore",
            FsyncPolicy::Always.to_string(),
            server.addr,
            server.proc.pid(),
        ));
    }
    for (target, setting, addr, pid) in targets {
        let is_redis = target == "redis";
        let spec = s.spec(addr, PREFILL_PIPELINE, false);
        let spec = LoadSpec {
            connections,
            ..spec
        };
        let result = if is_redis {
            prefill_then_drain(s, &spec, (pid, None), RespCodec::new).await
        } else {
            prefill_then_drain(s, &spec, (pid, Some(addr)), ShardCodec::new).await
        };
        let (prefill_spec, (prefill, prefill_cpu), drain_spec, (drained, drain_cpu)) = match result
        {
            Ok(r) => r,
            Err(e) if !is_redis => {
                report.problems.push(format!("drain msgstore: {e:#}"));
                continue;
            }
            Err(e) => return Err(e.context("drain redis")),
        };
        report.drain.push(phase(
            "prefill",
            target,
            &setting,
            &prefill_spec,
            (&prefill, prefill_cpu),
        ));
        if prefill.ops != expected {
            report.problems.push(format!(
                "prefill {target}: {} of {expected} appends succeeded (first error: {:?})",
                prefill.ops, prefill.first_error
            ));
        }
        report.drain.push(phase(
            "drain",
            target,
            &setting,
            &drain_spec,
            (&drained, drain_cpu),
        ));
        if drained.ops != prefill.ops {
            report.problems.push(format!(
                "drain {target}: drained {} messages of {} stored",
                drained.ops, prefill.ops
            ));
        }
    }
    redis.proc.kill()?;
    if let Some(server) = shard {
        server.proc.kill()?;
    }
    Ok(())
}

/// Prefill the drained mailboxes (pipeline `spec.pipeline`), then drain
/// them (pipeline `--drain-pipeline`), both through codec `C`.
async fn prefill_then_drain<C: Codec>(
    s: &Settings,
    spec: &LoadSpec,
    (server_pid, shard): (u32, Option<std::net::SocketAddr>),
    codec: fn() -> C,
) -> Result<(LoadSpec, Measured, LoadSpec, Measured)> {
    let (connections, users) = (spec.connections, s.drain_users);
    let per_user = s.args.drain_messages_per_user;
    let (prefill, prefill_cpu) = with_cpu(
        server_pid,
        run_load(spec, |i| {
            (
                codec(),
                Prefill::new(i, users_of(i, connections, users), per_user),
            )
        }),
    )
    .await;
    let prefill = prefill.context("prefill")?;
    // Drain once the server has finished what the prefill left behind
    // (our checkpoints; Redis's AOF rewrite), so the drain measures draining.
    settle(s, &[server_pid], shard, "the prefill").await?;
    let drain_spec = LoadSpec {
        pipeline: s.args.drain_pipeline,
        ..spec.clone()
    };
    let (drained, drain_cpu) = with_cpu(
        server_pid,
        run_load(&drain_spec, |i| {
            (
                codec(),
                Drain::new(&users_of(i, connections, users), DRAIN_PAGE_COUNT),
            )
        }),
    )
    .await;
    let drained = drained.context("drain")?;
    Ok((
        spec.clone(),
        (prefill, prefill_cpu),
        drain_spec,
        (drained, drain_cpu),
    ))
}

/// A phase's outcome and the CPU time used during it.
pub(crate) type Measured = (LoadOutcome, PhaseCpu);

/// CPU time used during a phase (`None` where it could not be read).
#[derive(Debug, Clone, Copy)]
pub(crate) struct PhaseCpu {
    /// By the server process, all its threads.
    pub server: Option<Duration>,
    /// By this process: the load generator.
    pub client: Option<Duration>,
}

impl PhaseCpu {
    /// Server and client CPU time per operation, in microseconds (none
    /// for a phase that completed no operation).
    pub fn us_per_op(&self, ops: u64) -> (Option<f64>, Option<f64>) {
        let per_op = |used: Option<Duration>| {
            used.filter(|_| ops > 0)
                .map(|cpu| cpu.as_secs_f64() * 1e6 / ops as f64)
        };
        (per_op(self.server), per_op(self.client))
    }
}

/// Run `load`, measuring the CPU time server process `pid` and this
/// process used meanwhile.
pub(crate) async fn with_cpu<T>(
    pid: u32,
    load: impl std::future::Future<Output = T>,
) -> (T, PhaseCpu) {
    with_cpu_of(&[pid], load).await
}

/// Run `load`, measuring the CPU the processes `servers` (together) and
/// this process used meanwhile.
pub(crate) async fn with_cpu_of<T>(
    servers: &[u32],
    load: impl std::future::Future<Output = T>,
) -> (T, PhaseCpu) {
    let sample = || {
        let server: Option<Duration> = servers
            .iter()
            .map(|p| crate::procs::cpu_time(*p).ok())
            .sum();
        [server, crate::procs::cpu_time(std::process::id()).ok()]
    };
    let before = sample();
    let out = load.await;
    let after = sample();
    let used = |i: usize| before[i].zip(after[i]).map(|(b, a)| a.saturating_sub(b));
    let cpu = PhaseCpu {
        server: used(0),
        client: used(1),
    };
    (out, cpu)
}

fn rate(
    rows: &[PhaseResult],
    phase: &str,
    target: &str,
    setting: &str,
    pipeline: Option<usize>,
) -> Option<f64> {
    rows.iter()
        .find(|r| {
            r.phase == phase
                && r.target == target
                && r.setting == setting
                && pipeline.is_none_or(|p| r.pipeline == p)
        })
        .map(|r| r.ops_per_sec)
}

/// Our `figure` over Redis's, of the always pair's servers (measured at
/// rest after the same appends, then restarted).
fn at_rest_ratio(
    report: &StorageReport,
    figure: impl Fn(&ServerResult) -> Option<f64>,
) -> Option<f64> {
    let of = |target: &str, setting: String| {
        report
            .servers
            .iter()
            .find(|s| s.target == target && s.setting == setting)
            .and_then(&figure)
    };
    report::ratio(
        of("msgstore", FsyncPolicy::Always.to_string()),
        of("redis", RedisAof::Always.to_string()),
    )
}

fn compute_ratios(report: &StorageReport) -> Ratios {
    let append =
        |target, setting: &str, p| rate(&report.append, "append", target, setting, Some(p));
    let ours_always = |p| append("msgstore", "always", p);
    let redis_always = |p| append("redis", &RedisAof::Always.to_string(), p);
    Ratios {
        append_always_vs_redis_always_p1: report::ratio(ours_always(1), redis_always(1)),
        append_always_vs_redis_always_p16: report::ratio(ours_always(16), redis_always(16)),
        append_always_vs_redis_off_p1: report::ratio(
            ours_always(1),
            append("redis", &RedisAof::Off.to_string(), 1),
        ),
        drain_vs_redis: report::ratio(
            rate(&report.drain, "drain", "msgstore", "always", None),
            rate(
                &report.drain,
                "drain",
                "redis",
                &RedisAof::Always.to_string(),
                None,
            ),
        ),
        engine_vs_disk_ceiling: report::ratio(
            report.engine.as_ref().map(|e| e.phase.ops_per_sec),
            report.disk_ceiling.as_ref().map(|d| d.phase.ops_per_sec),
        ),
        append_gateway_shape_vs_redis_always: report::ratio(
            rate(&report.append, GATEWAY_PHASE, "msgstore", "always", None),
            rate(
                &report.append,
                GATEWAY_PHASE,
                "redis",
                &RedisAof::Always.to_string(),
                None,
            ),
        ),
        disk_bytes_per_msg_vs_redis: at_rest_ratio(report, |s| s.disk_bytes_per_message),
        anon_rss_vs_redis: at_rest_ratio(report, |s| s.anon_rss_bytes.map(|b| b as f64)),
        restart_secs_vs_redis_load: at_rest_ratio(report, |s| s.restart_secs),
        replicated_vs_redis_wait_p16: report::ratio(
            rate(
                &report.append,
                "replicated",
                "msgstore",
                "always_3_replicas",
                None,
            ),
            rate(
                &report.append,
                "replicated",
                "redis",
                "aof_always+replica_wait",
                None,
            ),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn server(target: &str, setting: &str, figure: f64) -> ServerResult {
        ServerResult {
            target: target.into(),
            setting: setting.into(),
            peak_rss_bytes: None,
            anon_rss_bytes: Some(figure as u64),
            disk_bytes: 0,
            messages_stored: 1,
            disk_bytes_per_message: Some(figure),
            shard_stats: None,
            start_secs: None,
            restart_secs: Some(figure / 100.0),
        }
    }

    #[test]
    fn at_rest_ratios_hold_the_always_shard_against_the_always_redis() {
        let mut report = StorageReport::new(serde_json::json!({}));
        report.servers = vec![
            server("redis", "aof_off", 1.0),
            server("redis", "aof_always", 200.0),
            server("msgstore", "never", 1.0),
            server("msgstore", "always", 100.0),
        ];
        let r = compute_ratios(&report);
        assert_eq!(r.disk_bytes_per_msg_vs_redis, Some(0.5));
        assert_eq!(r.anon_rss_vs_redis, Some(0.5));
        assert_eq!(r.restart_secs_vs_redis_load, Some(0.5));
        assert_eq!(r.append_gateway_shape_vs_redis_always, None, "no phase ran");
        report.servers.pop();
        assert_eq!(compute_ratios(&report).disk_bytes_per_msg_vs_redis, None);
    }

    #[test]
    fn drained_users_are_split_without_overlap() {
        let mut all: Vec<u64> = (0..3).flat_map(|c| users_of(c, 3, 10)).collect();
        all.sort();
        assert_eq!(all, (0..10).collect::<Vec<_>>());
    }

    #[tokio::test]
    async fn a_phase_counts_the_cpu_time_of_the_server_and_of_this_process() {
        let me = std::process::id();
        let burn = Duration::from_millis(100);
        // The "server" is this process too, so both figures see the burn.
        let ((), cpu) = with_cpu(me, async {
            let start = crate::procs::cpu_time(me).unwrap();
            while crate::procs::cpu_time(me).unwrap() < start + burn {
                std::hint::spin_loop();
            }
        })
        .await;
        assert!(cpu.server.unwrap() >= burn, "{cpu:?}");
        assert!(cpu.client.unwrap() >= burn, "{cpu:?}");
        assert_eq!(cpu.us_per_op(0), (None, None), "no operations, no rate");
        let (server_us, client_us) = cpu.us_per_op(1000);
        assert!(server_us.unwrap() >= 100.0 && client_us.unwrap() >= 100.0);
    }
}
