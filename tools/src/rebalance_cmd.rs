//! `imctl rebalance`: add or remove a shard while traffic flows, show an
//! interrupted rebalance, resume it (design brief section 2, "Rebalance";
//! the moving itself is `msgstore::rebalance`).

use crate::output::Output;
use anyhow::{bail, Context};
use clap::{Args, Subcommand};
use gateway::map_push::MapPushError;
use indicatif::{ProgressBar, ProgressStyle};
use msgstore::rebalance::{
    Flow, Moved, Mover, Phase, Plan, Progress, State, MOVES_INFLIGHT_DEFAULT, MOVES_INFLIGHT_MAX,
};
use proto::{
    cluster::ClusterMap,
    presence::{RequestBody as PresenceRequest, ResponseBody as PresenceResponse},
};
use serde::Serialize;
use std::{
    collections::BTreeSet,
    fmt::Write as _,
    path::{Path, PathBuf},
    sync::atomic::{AtomicU64, Ordering},
    time::Instant,
};

#[derive(Debug, Args)]
pub struct RebalanceArgs {
    /// The cluster map file [default: DATA/cluster.toml, as `imctl up`
    /// writes it]. It is rewritten with the new map when a rebalance ends.
    #[arg(long, value_name = "FILE")]
    cluster: Option<PathBuf>,
    /// Where `imctl up` keeps its data.
    #[arg(long, value_name = "DIR", default_value = "data")]
    data: PathBuf,
    /// The rebalance state file [default: rebalance.toml beside the
    /// cluster map]; it exists while a rebalance is unfinished.
    #[arg(long, value_name = "FILE")]
    state: Option<PathBuf>,
    /// Users copied at once (1..=64): more is faster and slows the
    /// traffic more.
    #[arg(long, value_name = "N", default_value_t = MOVES_INFLIGHT_DEFAULT as u64,
          value_parser = clap::value_parser!(u64).range(1..=MOVES_INFLIGHT_MAX as u64))]
    moves_inflight: u64,
    #[command(subcommand)]
    command: RebalanceCommand,
}

#[derive(Debug, Subcommand)]
enum RebalanceCommand {
    /// Add shard ID (a running msgstore at ADDR) and move its users to it.
    AddShard {
        id: String,
        addr: String,
        /// Relative share of users (1..=100).
        #[arg(long, default_value_t = 1)]
        weight: u32,
        /// Only print how many users and bytes would move where.
        #[arg(long)]
        dry_run: bool,
    },
    /// Move every user off shard ID and drop it from the map (keep it
    /// running until every gateway has the new map).
    RemoveShard {
        id: String,
        /// Only print how many users and bytes would move where.
        #[arg(long)]
        dry_run: bool,
    },
    /// Show the rebalance in progress, if any, and what is left to move.
    Status,
    /// Finish an interrupted rebalance.
    Resume,
}

/// Where the map and the state file are, and how many users move at once.
struct Options {
    cluster: PathBuf,
    state: PathBuf,
    moves_inflight: usize,
}

impl RebalanceArgs {
    fn options(&self) -> Options {
        let cluster = self
            .cluster
            .clone()
            .unwrap_or_else(|| self.data.join("cluster.toml"));
        let state = self.state.clone().unwrap_or_else(|| {
            cluster
                .parent()
                .unwrap_or(Path::new("."))
                .join("rebalance.toml")
        });
        Options {
            cluster,
            state,
            moves_inflight: self.moves_inflight as usize,
        }
    }
}

pub async fn run(args: RebalanceArgs, out: &Output) -> anyhow::Result<()> {
    let opts = args.options();
    match args.command {
        RebalanceCommand::AddShard {
            id,
            addr,
            weight,
            dry_run,
        } => {
            let from = read_map(&opts.cluster)?;
            start(
                Plan::add_shard(&from, &id, &addr, weight)?,
                dry_run,
                &opts,
                out,
            )
            .await
        }
        RebalanceCommand::RemoveShard { id, dry_run } => {
            let from = read_map(&opts.cluster)?;
            start(Plan::remove_shard(&from, &id)?, dry_run, &opts, out).await
        }
        RebalanceCommand::Status => status(&opts, out).await,
        RebalanceCommand::Resume => match State::load(&opts.state)? {
            Some(state) => execute(state, &opts, out).await,
            None => bail!("no rebalance in progress ({} absent)", opts.state.display()),
        },
    }
}

fn read_map(path: &Path) -> anyhow::Result<ClusterMap> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read the cluster map {}", path.display()))?;
    ClusterMap::from_toml(&text).with_context(|| format!("cluster map {}", path.display()))
}

/// Write the map file atomically and durably.
fn write_map(path: &Path, map: &ClusterMap) -> anyhow::Result<()> {
    daemon::files::write_atomic(path, map.to_toml().as_bytes())
        .with_context(|| format!("cannot replace the cluster map {}", path.display()))
}

async fn start(plan: Plan, dry_run: bool, opts: &Options, out: &Output) -> anyhow::Result<()> {
    if let Some(state) = State::load(&opts.state)? {
        bail!(
            "a rebalance to epoch {} is in progress ({}): run `imctl rebalance resume` first",
            state.plan.to.epoch,
            opts.state.display()
        );
    }
    if dry_run {
        let flows = Mover::connect_sources(plan.clone()).await?.survey().await?;
        return print_flows(&plan, &flows, "would move", out);
    }
    let state = State {
        phase: Phase::Moving,
        plan,
    };
    state.save(&opts.state)?;
    execute(state, opts, out).await
}

#[derive(Serialize)]
struct Summary {
    epoch: u64,
    users: u64,
    bytes: u64,
    records: u64,
    seconds: f64,
    users_per_s: f64,
    gateways: Vec<GatewayPush>,
}

/// How pushing the new map to one gateway went.
#[derive(Serialize)]
struct GatewayPush {
    /// Its peer address.
    peer: String,
    /// The epoch it uses now, if it answered.
    epoch: Option<u64>,
    error: Option<String>,
}

/// Push `map` to every gateway: those the map lists and those registered
/// with presence. One that cannot be reached picks the map up from the
/// shards when it starts (and follows `Moved` until then).
async fn push_to_gateways(map: &ClusterMap) -> Vec<GatewayPush> {
    let mut peers: BTreeSet<String> = map.gateways.iter().map(|g| g.peer.clone()).collect();
    // Every replica: a gateway registered with one that another missed.
    for replica in map.presence_replicas() {
        match presence::client::request_once(&replica, PresenceRequest::Gateways).await {
            Ok(PresenceResponse::Gateways { gateways }) => {
                peers.extend(gateways.into_iter().map(|g| g.peer_addr))
            }
            Ok(other) => eprintln!("imctl: presence answered {other:?} to a gateway listing"),
            Err(e) => eprintln!(
                "imctl: cannot list the gateways registered with presence at {replica}: {e}"
            ),
        }
    }
    // A map may name a gateway without a reachable peer port (port 0).
    peers.retain(|p| !p.ends_with(":0"));
    let mut pushes = Vec::new();
    for peer in peers {
        let (epoch, error) = match gateway::map_push::push_map(&peer, map).await {
            Ok(epoch) => (Some(epoch), None),
            Err(MapPushError::Older { in_use }) if in_use >= map.epoch => (Some(in_use), None),
            Err(e) => (None, Some(e.to_string())),
        };
        pushes.push(GatewayPush { peer, epoch, error });
    }
    pushes
}

/// Run (or resume) the rebalance `state` describes to its end.
async fn execute(mut state: State, opts: &Options, out: &Output) -> anyhow::Result<()> {
    let started = Instant::now();
    let mut moved = Moved::default();
    if state.phase == Phase::Moving {
        let mut mover = Mover::connect(state.plan.clone()).await?;
        mover.set_moves_inflight(opts.moves_inflight);
        mover.install_moving_routing().await?;
        let bar = Bar::new();
        moved = mover.move_all(&bar).await?;
        bar.0.finish_and_clear();
        state.phase = Phase::Finishing;
        state.save(&opts.state)?;
    }
    // A removed shard may be gone by now: only the new map's are needed.
    Mover::connect_targets(state.plan.clone())
        .await?
        .install_final_routing()
        .await?;
    write_map(&opts.cluster, &state.plan.to)?;
    let gateways = push_to_gateways(&state.plan.to).await;
    State::remove(&opts.state)?;
    let seconds = started.elapsed().as_secs_f64();
    let summary = Summary {
        epoch: state.plan.to.epoch,
        users: moved.users,
        bytes: moved.bytes,
        records: moved.records,
        seconds,
        users_per_s: moved.users as f64 / seconds.max(1e-9),
        gateways,
    };
    out.emit(&summary, || {
        let mut text = format!(
            "rebalanced to epoch {}: {} users ({} records, {:.1} MB) moved in {:.1} s \
             ({:.0} users/s); map written to {}",
            summary.epoch,
            summary.users,
            summary.records,
            summary.bytes as f64 / 1e6,
            summary.seconds,
            summary.users_per_s,
            opts.cluster.display()
        );
        for g in &summary.gateways {
            let _ = match (&g.epoch, &g.error) {
                (Some(epoch), _) => write!(text, "\n  gateway {}: on epoch {epoch}", g.peer),
                (None, Some(e)) => write!(
                    text,
                    "\n  gateway {}: not reached ({e}); it takes the map from the shards \
                     when it starts",
                    g.peer
                ),
                (None, None) => Ok(()),
            };
        }
        text
    })
}

#[derive(Serialize)]
struct StatusReport {
    in_progress: bool,
    phase: Option<Phase>,
    from_epoch: u64,
    to_epoch: Option<u64>,
    /// Users (and bytes) still to move, per shard pair.
    remaining: Vec<FlowReport>,
}

async fn status(opts: &Options, out: &Output) -> anyhow::Result<()> {
    let Some(state) = State::load(&opts.state)? else {
        let map = read_map(&opts.cluster)?;
        let report = StatusReport {
            in_progress: false,
            phase: None,
            from_epoch: map.epoch,
            to_epoch: None,
            remaining: vec![],
        };
        return out.emit(&report, || {
            format!(
                "no rebalance in progress; the map is at epoch {} with {} shards",
                map.epoch,
                map.shards.len()
            )
        });
    };
    let flows = Mover::connect_sources(state.plan.clone())
        .await?
        .survey()
        .await?;
    let report = StatusReport {
        in_progress: true,
        phase: Some(state.phase),
        from_epoch: state.plan.from.epoch,
        to_epoch: Some(state.plan.to.epoch),
        remaining: flows.iter().map(FlowReport::from).collect(),
    };
    out.emit(&report, || {
        let mut text = format!(
            "rebalance from epoch {} to {} in progress ({:?}); `imctl rebalance resume` \
             finishes it\n",
            state.plan.from.epoch, state.plan.to.epoch, state.phase
        );
        text.push_str(&flow_table(&flows, "left to move"));
        text
    })
}

#[derive(Serialize)]
struct FlowReport {
    from: String,
    to: String,
    users: u64,
    bytes: u64,
}

impl From<&Flow> for FlowReport {
    fn from(f: &Flow) -> Self {
        FlowReport {
            from: f.from.clone(),
            to: f.to.clone(),
            users: f.users,
            bytes: f.bytes,
        }
    }
}

fn print_flows(plan: &Plan, flows: &[Flow], verb: &str, out: &Output) -> anyhow::Result<()> {
    let report: Vec<FlowReport> = flows.iter().map(FlowReport::from).collect();
    out.emit(&report, || {
        let mut text = format!(
            "epoch {} -> {} ({} -> {} shards)\n",
            plan.from.epoch,
            plan.to.epoch,
            plan.from.shards.len(),
            plan.to.shards.len()
        );
        text.push_str(&flow_table(flows, verb));
        text
    })
}

fn flow_table(flows: &[Flow], verb: &str) -> String {
    let mut text = String::new();
    for f in flows {
        let _ = writeln!(
            text,
            "  {:<12} -> {:<12} {:>10} users {:>12.3} MB",
            f.from,
            f.to,
            f.users,
            f.bytes as f64 / 1e6
        );
    }
    let users: u64 = flows.iter().map(|f| f.users).sum();
    let bytes: u64 = flows.iter().map(|f| f.bytes).sum();
    let _ = write!(
        text,
        "  {verb}: {users} users, {:.3} MB",
        bytes as f64 / 1e6
    );
    text
}

/// The progress bar: users moved of those planned, bytes, time left.
struct Bar(ProgressBar, AtomicU64);

impl Bar {
    fn new() -> Bar {
        let bar = ProgressBar::new(0);
        bar.set_style(
            ProgressStyle::with_template(
                "{bar:40} {pos}/{len} users, {msg} moved, {per_sec}, {eta} left",
            )
            .expect("a valid template"),
        );
        Bar(bar, AtomicU64::new(0))
    }
}

impl Progress for Bar {
    fn planned(&self, users: u64, _bytes: u64) {
        self.0.set_length(users);
        self.0.set_message("0 MB");
    }

    fn moved(&self, bytes: u64) {
        // The bar counts users; the bytes so far are in its message.
        self.0.inc(1);
        let so_far = self.1.fetch_add(bytes, Ordering::Relaxed) + bytes;
        self.0.set_message(format!("{:.1} MB", so_far as f64 / 1e6));
    }
}
