//! `imbench rebalance`: live shard rebalancing (`msgstore::rebalance`)
//! between real `msgstore` processes while a background load runs: users
//! and megabytes moved per second, the load's throughput during the move as
//! a ratio of before, and the fraction of users moved vs the ideal. There
//! is no peer to compare with: the ratios are internal.

use crate::{
    rebalance_check,
    rebalance_load::{msg_id, payload, Ledger, Load, LoadSpec, Router, WindowStats},
    rebalance_report::{Migration, Prefilled, RebalanceReport},
    report::{ratio, write_json},
    shard_driver::{self, ShardServer},
};
use anyhow::{bail, ensure, Context, Result};
use msgstore::{
    client::ShardClient,
    rebalance::{Mover, Plan, Progress, MOVES_INFLIGHT_MAX},
    FsyncPolicy,
};
use proto::{
    cluster::{ClusterMap, ShardEntry},
    shard::{AppendItem, RequestBody, ResponseBody, Routing, APPEND_BATCH_ITEMS_MAX},
};
use std::{
    net::SocketAddr,
    path::PathBuf,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

/// Appends per prefill request.
const PREFILL_BATCH_ITEMS: usize = 256;
/// Payload bytes per prefill request at most (a frame holds 1 MiB).
const PREFILL_BATCH_BYTES_MAX: usize = 256 * 1024;
/// Prefill requests in flight per shard.
const PREFILL_PIPELINE: usize = 16;
/// Every this many users has its first message acknowledged before the
/// run, so moved mailboxes start above sequence number 1.
const ACKED_USER_STRIDE: u64 = 3;
/// How often the shards' checkpoint counts are polled.
const CHECKPOINT_POLL: Duration = Duration::from_millis(250);
/// The warm-up lasts until every old shard finished a checkpoint after the
/// prefill (the first creates most bucket files: a one-time cost that
/// would otherwise land in the "before" window), or this long at most.
const CHECKPOINT_WAIT: Duration = Duration::from_secs(90);
const CHECKPOINT_WAIT_QUICK: Duration = Duration::from_secs(20);
const SEED: u64 = 0x0BA1_A7CE;

#[derive(clap::Args, Debug, Clone)]
pub struct RebalanceArgs {
    /// Fewer users and short windows: the whole run takes under a minute.
    #[arg(long)]
    pub quick: bool,
    /// Also write the results as JSON to this file.
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// Users prefilled (and picked by the load) [default: 200,000; quick: 20,000].
    #[arg(long)]
    pub users: Option<u64>,
    /// Messages prefilled per user.
    #[arg(long, default_value_t = 3)]
    pub messages_per_user: u64,
    #[arg(long, default_value_t = 200)]
    pub payload_bytes: usize,
    /// Shards before the new one is added.
    #[arg(long, default_value_t = 3)]
    pub shards: usize,
    /// Concurrent appenders of the background load (one request each).
    #[arg(long, default_value_t = 32)]
    pub writers: usize,
    /// Concurrent fetch+ack drainers of the background load.
    #[arg(long, default_value_t = 2)]
    pub drainers: usize,
    /// Length of the load windows before and after a migration [default:
    /// 10; quick: 3]. The window during one lasts as long as it does.
    #[arg(long)]
    pub window_secs: Option<f64>,
    /// Move users N at once (`Mover::set_moves_inflight`; default
    /// `MOVES_INFLIGHT_DEFAULT`, 16; at most `MOVES_INFLIGHT_MAX`, 64): to
    /// measure what the default costs.
    #[arg(long, value_name = "N")]
    pub move_inflight: Option<usize>,
    /// Afterwards also remove a shard (a second migration, measured alike).
    #[arg(long)]
    pub remove_shard: bool,
    /// Where the shards' data directories go (the disk under test).
    #[arg(long)]
    pub work_dir: Option<PathBuf>,
    /// The msgstore daemon [default: `msgstore` next to this executable].
    #[arg(long)]
    pub msgstore_bin: Option<PathBuf>,
}

/// Arguments with the quick/default choices resolved.
struct Settings {
    args: RebalanceArgs,
    users: u64,
    window: Duration,
    warmup: Duration,
    /// How long the warm-up waits for every old shard's first checkpoint.
    checkpoint_wait: Duration,
}

impl Settings {
    fn new(args: RebalanceArgs) -> Result<Settings> {
        let users = args
            .users
            .unwrap_or(if args.quick { 20_000 } else { 200_000 });
        let secs = args
            .window_secs
            .unwrap_or(if args.quick { 3.0 } else { 10.0 });
        let window = Duration::try_from_secs_f64(secs).context("--window-secs is not valid")?;
        ensure!(users > 0, "--users must be at least 1");
        ensure!(
            args.messages_per_user > 0,
            "--messages-per-user must be >= 1"
        );
        ensure!(args.shards > 0, "--shards must be at least 1");
        ensure!(args.writers > 0, "--writers must be at least 1");
        ensure!(
            args.move_inflight
                .is_none_or(|n| (1..=MOVES_INFLIGHT_MAX).contains(&n)),
            "--move-inflight must be 1..={MOVES_INFLIGHT_MAX} (a shard freezes no more users)"
        );
        ensure!(
            !args.remove_shard || args.shards > 1,
            "--remove-shard needs --shards 2 or more"
        );
        Ok(Settings {
            users,
            window,
            warmup: window / 4,
            checkpoint_wait: if args.quick {
                CHECKPOINT_WAIT_QUICK
            } else {
                CHECKPOINT_WAIT
            },
            args,
        })
    }
}

/// The shards of the run: ids `s0`.. and their processes.
struct Shards {
    servers: Vec<(String, ShardServer)>,
}

impl Shards {
    fn start(s: &Settings, root: &std::path::Path) -> Result<Shards> {
        let bin = shard_driver::locate_msgstore(s.args.msgstore_bin.as_deref())?;
        let mut servers = Vec::new();
        for i in 0..=s.args.shards {
            let id = format!("s{i}");
            let server =
                shard_driver::start(&bin, &root.join(&id), FsyncPolicy::Always, false, None)?;
            servers.push((id, server));
        }
        Ok(Shards { servers })
    }

    fn entry(&self, i: usize) -> ShardEntry {
        let (id, server) = &self.servers[i];
        ShardEntry {
            id: id.clone(),
            addr: server.addr.to_string(),
            weight: 1,
            replicas: Vec::new(),
        }
    }

    /// All but the last shard, at epoch 1.
    fn first_map(&self) -> ClusterMap {
        ClusterMap {
            epoch: 1,
            presence: "127.0.0.1:1".into(),
            profile: "127.0.0.1:1".into(),
            gateways: vec![],
            shards: (0..self.servers.len() - 1).map(|i| self.entry(i)).collect(),
        }
    }

    fn addrs(&self) -> Vec<(String, SocketAddr)> {
        self.servers
            .iter()
            .map(|(id, s)| (id.clone(), s.addr))
            .collect()
    }

    fn check_running(&mut self) -> Result<()> {
        self.servers
            .iter_mut()
            .try_for_each(|(_, s)| s.proc.check_running())
    }
}

/// Install `map` alone on each of its shards (a cluster at rest).
async fn install_routing(map: &ClusterMap) -> Result<()> {
    for s in &map.shards {
        let client = msgstore::client::ShardClient::connect(s.addr.as_str()).await?;
        client
            .set_routing(Routing {
                me: s.id.clone(),
                current: map.clone(),
                target: None,
            })
            .await?;
    }
    Ok(())
}

/// Store `per_user` messages for each of `users` users at their owners,
/// then acknowledge the first message of every [`ACKED_USER_STRIDE`]th
/// user. Prefill message ids use writer index 0.
async fn prefill(router: &Router, s: &Settings) -> Result<(Ledger, Prefilled)> {
    let started = Instant::now();
    let mut ledger = Ledger::default();
    let mut bodies: Vec<(String, RequestBody)> = Vec::new();
    let mut batches: std::collections::HashMap<String, Vec<AppendItem>> = Default::default();
    let batch_items = (PREFILL_BATCH_BYTES_MAX / (s.args.payload_bytes + 64))
        .clamp(1, PREFILL_BATCH_ITEMS.min(APPEND_BATCH_ITEMS_MAX));
    for user in 0..s.users {
        let addr = router.owner_addr(user);
        let batch = batches.entry(addr.clone()).or_default();
        for n in 1..=s.args.messages_per_user {
            let id = msg_id(user, 0, n);
            batch.push(AppendItem {
                user,
                msg_id: id,
                payload: payload(id, s.args.payload_bytes),
            });
            ledger.stored.push(id);
            if batch.len() >= batch_items {
                let items = std::mem::take(batch);
                bodies.push((addr.clone(), RequestBody::AppendBatch { items }));
            }
        }
    }
    for (addr, items) in batches.into_iter().filter(|(_, b)| !b.is_empty()) {
        bodies.push((addr, RequestBody::AppendBatch { items }));
    }
    send_all(router, bodies, |b| match b {
        ResponseBody::AppendedBatch { results } => results.iter().all(|r| r.is_ok()),
        _ => false,
    })
    .await
    .context("prefill appends")?;
    let acks: Vec<(String, RequestBody)> = (0..s.users)
        .step_by(ACKED_USER_STRIDE as usize)
        .map(|user| {
            ledger.drained.push(msg_id(user, 0, 1));
            let ack = RequestBody::Ack { user, up_to_seq: 1 };
            (router.owner_addr(user), ack)
        })
        .collect();
    let acked = acks.len() as u64;
    send_all(router, acks, |b| {
        matches!(b, ResponseBody::Acked { removed: 1 })
    })
    .await
    .context("prefill acks")?;
    let done = Prefilled {
        users: s.users,
        messages: ledger.stored.len() as u64,
        acked,
        seconds: started.elapsed().as_secs_f64(),
    };
    Ok((ledger, done))
}

/// Send each `(addr, body)`, [`PREFILL_PIPELINE`] at a time per shard;
/// every answer must pass `ok`.
async fn send_all(
    router: &Router,
    bodies: Vec<(String, RequestBody)>,
    ok: fn(&ResponseBody) -> bool,
) -> Result<()> {
    let mut by_addr: std::collections::BTreeMap<String, Vec<RequestBody>> = Default::default();
    for (addr, body) in bodies {
        by_addr.entry(addr).or_default().push(body);
    }
    let mut tasks = tokio::task::JoinSet::new();
    for (addr, bodies) in by_addr {
        let client = router.client(&addr).await?;
        tasks.spawn(async move {
            let mut bodies = bodies.into_iter().peekable();
            while bodies.peek().is_some() {
                let chunk: Vec<RequestBody> = bodies.by_ref().take(PREFILL_PIPELINE).collect();
                for answer in client.send_many(chunk).await {
                    let answer = answer?;
                    ensure!(ok(&answer), "{addr} answered {answer:?}");
                }
            }
            anyhow::Ok(())
        });
    }
    while let Some(done) = tasks.join_next().await {
        done??;
    }
    Ok(())
}

/// The move's progress is not shown: the figures come from its result.
struct Quiet;

impl Progress for Quiet {
    fn planned(&self, _users: u64, _bytes: u64) {}
    fn moved(&self, _bytes: u64) {}
}

/// Every shard's `checkpoints_total`, polled in the background (a shard
/// busy with a checkpoint may answer `Stats` late; the windows must not
/// wait for it).
struct CheckpointWatch {
    latest: Arc<Mutex<Vec<u64>>>,
    task: tokio::task::JoinHandle<()>,
}

impl CheckpointWatch {
    async fn start(addrs: &[(String, SocketAddr)]) -> Result<CheckpointWatch> {
        let mut clients = Vec::new();
        let mut latest = Vec::new();
        for (_, addr) in addrs {
            let client = ShardClient::connect(addr).await?;
            latest.push(client.stats().await?.checkpoints_total);
            clients.push(client);
        }
        let latest = Arc::new(Mutex::new(latest));
        let shared = latest.clone();
        let task = tokio::spawn(async move {
            loop {
                tokio::time::sleep(CHECKPOINT_POLL).await;
                for (i, c) in clients.iter().enumerate() {
                    if let Ok(stats) = c.stats().await {
                        shared.lock().expect("watch lock")[i] = stats.checkpoints_total;
                    }
                }
            }
        });
        Ok(CheckpointWatch { latest, task })
    }

    fn per_shard(&self) -> Vec<u64> {
        self.latest.lock().expect("watch lock").clone()
    }

    fn total(&self) -> u64 {
        self.per_shard().iter().sum()
    }

    /// Wait until each of the first `shards` shards has checkpointed since
    /// `since` (its counts), for at most `limit`; whether they all did.
    async fn wait_first(&self, since: &[u64], shards: usize, limit: Duration) -> bool {
        let deadline = Instant::now() + limit;
        loop {
            let now = self.per_shard();
            if (0..shards).all(|i| now[i] > since[i]) {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(CHECKPOINT_POLL).await;
        }
    }
}

impl Drop for CheckpointWatch {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// One load window: its name, how long it ran, the checkpoints the shards
/// finished meanwhile.
struct Window {
    name: String,
    secs: f64,
    checkpoints: u64,
}

/// The load windows, in the order the load enters them.
struct Windows {
    list: Vec<Window>,
    /// The window running: its index, since when, checkpoints at its start.
    current: Option<(usize, Instant, u64)>,
    watch: CheckpointWatch,
}

impl Windows {
    fn new(watch: CheckpointWatch) -> Windows {
        Windows {
            list: Vec::new(),
            current: None,
            watch,
        }
    }

    /// Declare a window; its index.
    fn declare(&mut self, name: impl Into<String>) -> usize {
        self.list.push(Window {
            name: name.into(),
            secs: 0.0,
            checkpoints: 0,
        });
        self.list.len() - 1
    }

    /// End the running window and count from now on in window `i`.
    fn enter(&mut self, load: &Load, i: usize) {
        self.close();
        load.enter(i);
        self.current = Some((i, Instant::now(), self.watch.total()));
    }

    fn close(&mut self) {
        if let Some((i, since, checkpoints)) = self.current.take() {
            self.list[i].secs = since.elapsed().as_secs_f64();
            self.list[i].checkpoints = self.watch.total() - checkpoints;
        }
    }

    /// Run window `i` for `length`.
    async fn measure(&mut self, load: &Load, i: usize, length: Duration) {
        self.enter(load, i);
        tokio::time::sleep(length).await;
    }

    /// Stop the load at the end of the last window; the windows' stats.
    async fn stop(mut self, load: Load) -> Result<(Vec<WindowStats>, Ledger)> {
        self.close();
        let times: Vec<(String, f64)> =
            self.list.iter().map(|w| (w.name.clone(), w.secs)).collect();
        let (mut stats, ledger) = load.stop(&times).await?;
        for (st, w) in stats.iter_mut().zip(&self.list) {
            st.checkpoints = Some(w.checkpoints);
        }
        Ok((stats, ledger))
    }
}

/// Users the shards of `map` hold.
async fn users_held(map: &ClusterMap) -> Result<u64> {
    let mut total = 0;
    for s in &map.shards {
        let addr = s.addr.parse().context("shard address")?;
        total += rebalance_check::list_users(addr).await?.len() as u64;
    }
    Ok(total)
}

/// Measure the load for a window, then run `plan` with the library in the
/// next window (both declared by the caller as `windows`).
async fn migrate(
    plan: Plan,
    kind: String,
    load: &Load,
    windows: &mut Windows,
    (before, during): (usize, usize),
    (window, move_inflight): (Duration, Option<usize>),
) -> Result<Migration> {
    let mut mover = Mover::connect(plan.clone()).await?;
    if let Some(n) = move_inflight {
        mover.set_moves_inflight(n);
    }
    let users_total = users_held(&plan.from).await?;
    let flows = mover.survey().await?;
    let kept = |id: &str| plan.from.shard(id).is_some() && plan.to.shard(id).is_some();
    windows.measure(load, before, window).await;
    windows.enter(load, during);
    let started = Instant::now();
    mover.install_moving_routing().await?;
    let move_started = Instant::now();
    let moved = mover.move_all(&Quiet).await?;
    let move_secs = move_started.elapsed().as_secs_f64();
    mover.install_final_routing().await?;
    let total_secs = started.elapsed().as_secs_f64();
    let ideal_fraction = 1.0 / plan.from.shards.len().max(plan.to.shards.len()) as f64;
    let moved_fraction = moved.users as f64 / users_total.max(1) as f64;
    Ok(Migration {
        kind,
        shards_before: plan.from.shards.len(),
        shards_after: plan.to.shards.len(),
        users_total,
        planned_users: flows.iter().map(|f| f.users).sum(),
        moved_between_kept_shards: flows
            .iter()
            .filter(|f| kept(&f.from) && kept(&f.to))
            .map(|f| f.users)
            .sum(),
        users_moved: moved.users,
        bytes_moved: moved.bytes,
        records_moved: moved.records,
        move_secs,
        total_secs,
        users_per_s: moved.users as f64 / move_secs.max(1e-9),
        mb_per_s: moved.bytes as f64 / 1e6 / move_secs.max(1e-9),
        moved_fraction,
        ideal_fraction,
        moved_vs_ideal: moved_fraction / ideal_fraction,
        load_before: WindowStats::default(),
        load_during: WindowStats::default(),
        load_during_vs_before: None,
        windows: (before, during),
    })
}

pub async fn run(args: RebalanceArgs) -> Result<()> {
    let s = Settings::new(args)?;
    let work_dir = s.args.work_dir.clone().unwrap_or_else(std::env::temp_dir);
    let root = tempfile::Builder::new()
        .prefix("imbench-rebalance-")
        .tempdir_in(&work_dir)
        .with_context(|| format!("create a temp dir in {}", work_dir.display()))?;
    let mut shards = Shards::start(&s, root.path())?;
    let first = shards.first_map();
    install_routing(&first).await?;
    let router = Arc::new(Router::new(&first));
    eprintln!(
        "prefilling {} users x {} messages of {} B over {} shards (fsync always)...",
        s.users, s.args.messages_per_user, s.args.payload_bytes, s.args.shards
    );
    let (mut ledger, prefilled) = prefill(&router, &s).await?;
    let watch = CheckpointWatch::start(&shards.addrs()).await?;
    let prefilled_checkpoints = watch.per_shard();
    let mut windows = Windows::new(watch);
    let warmup = windows.declare("warm-up");
    let added = shards.entry(s.args.shards);
    let add = Plan::add_shard(&first, &added.id, &added.addr, 1)?;
    let mut plans = vec![(
        add.clone(),
        format!("add-shard {}", added.id),
        windows.declare("before add-shard"),
        windows.declare("during add-shard"),
    )];
    if s.args.remove_shard {
        let plan = Plan::remove_shard(&add.to, "s1")?;
        let (b, d) = (
            windows.declare("before remove-shard"),
            windows.declare("during remove-shard"),
        );
        plans.push((plan, "remove-shard s1".into(), b, d));
    }
    let after_old = windows.declare("after (old map)");
    let after_new = windows.declare("after (new map)");
    let final_map = plans.last().expect("one plan at least").0.to.clone();
    let spec = LoadSpec {
        users: s.users,
        writers: s.args.writers,
        drainers: s.args.drainers,
        payload_bytes: s.args.payload_bytes,
        windows: windows.list.len(),
        seed: SEED,
    };
    let load = Load::start(router.clone(), &spec);
    windows.measure(&load, warmup, s.warmup).await;
    let steady = windows
        .watch
        .wait_first(&prefilled_checkpoints, s.args.shards, s.checkpoint_wait)
        .await;
    if !steady {
        eprintln!(
            "warm-up: not every shard checkpointed within {:?}",
            s.checkpoint_wait
        );
    }
    let mut migrations = Vec::new();
    for (plan, kind, before, during) in plans {
        eprintln!(
            "{kind}: load for {:.1} s, then the migration...",
            s.window.as_secs_f64()
        );
        let timing = (s.window, s.args.move_inflight);
        let m = migrate(plan, kind, &load, &mut windows, (before, during), timing).await;
        migrations.push(m?);
    }
    windows.measure(&load, after_old, s.window).await;
    router.set_map(&final_map);
    windows.measure(&load, after_new, s.window).await;
    let (stats, load_ledger) = windows.stop(load).await?;
    ledger.merge(load_ledger);
    shards.check_running()?;
    eprintln!("checking every mailbox at its new owner...");
    let check = rebalance_check::check(
        &final_map,
        &shards.addrs(),
        s.users,
        s.args.payload_bytes,
        &ledger,
    )
    .await?;
    for m in &mut migrations {
        m.load_before = stats[m.windows.0].clone();
        m.load_during = stats[m.windows.1].clone();
        m.load_during_vs_before = ratio(
            Some(m.load_during.appends_per_s),
            Some(m.load_before.appends_per_s),
        );
    }
    let report = RebalanceReport::new(config(&s), prefilled, migrations, stats, check);
    print!("{}", report.render());
    if let Some(path) = &s.args.json {
        write_json(path, "rebalance", &report)?;
    }
    if report.check.failures() > 0 {
        bail!("the check failed: {:?}", report.check);
    }
    Ok(())
}

/// The settings, as the JSON report records them.
fn config(s: &Settings) -> serde_json::Value {
    serde_json::json!({
        "quick": s.args.quick,
        "users": s.users,
        "messages_per_user": s.args.messages_per_user,
        "payload_bytes": s.args.payload_bytes,
        "shards": s.args.shards,
        "fsync": "always",
        "writers": s.args.writers,
        "drainers": s.args.drainers,
        "window_secs": s.window.as_secs_f64(),
        "moves_inflight_default": msgstore::rebalance::MOVES_INFLIGHT_DEFAULT,
        "move_inflight": s.args.move_inflight,
        "remove_shard": s.args.remove_shard,
    })
}
