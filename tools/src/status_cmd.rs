//! `imctl status`: the whole cluster on one screen. Every process of the
//! cluster map is asked at once, each with a short deadline (`gather`),
//! what is wrong is said in plain words (`problems`), and the result is
//! printed as text (`render`) or one JSON document (`--json`) per refresh
//! (`--watch`). Exit code 1 if anything is wrong, so scripts can use it.

mod gather;
mod problems;
mod render;

use crate::output::Output;
use clap::Args;
use proto::{
    presence::{GatewayInfo, PresenceStats},
    shard::ShardStats,
};
use serde::Serialize;
use std::{
    io::{IsTerminal, Write},
    path::PathBuf,
    time::Duration,
};

#[derive(Debug, Args)]
pub struct StatusArgs {
    /// The cluster map file [default: DATA/cluster.toml, as `imctl up`
    /// writes it].
    #[arg(long, value_name = "FILE")]
    cluster: Option<PathBuf>,
    /// Where `imctl up` keeps its data.
    #[arg(long, value_name = "DIR", default_value = "data")]
    data: PathBuf,
    /// Refresh every SECONDS (default 2) until Ctrl-C, which exits 0.
    #[arg(long, value_name = "SECONDS", num_args = 0..=1, default_missing_value = "2",
          value_parser = clap::value_parser!(u64).range(1..=3600))]
    watch: Option<u64>,
    /// How long each process may take to answer, in milliseconds.
    #[arg(long, value_name = "MS", default_value_t = 1000,
          value_parser = clap::value_parser!(u64).range(1..=60_000))]
    timeout_ms: u64,
}

/// What `imctl status` found: one refresh.
#[derive(Debug, Serialize)]
pub struct Snapshot {
    /// The cluster map file read, and its epoch.
    pub map_file: String,
    pub map_epoch: u64,
    /// How long asking everything took.
    pub took_ms: u64,
    /// Every replica of the map's `presence` field, in map order.
    pub presence: Vec<PresenceReplica>,
    /// Every replica of the map's `profile` field, in map order.
    pub profile: Vec<ProfileStatus>,
    /// The map's gateways and those registered with presence (their map
    /// epochs are not known: the peer port has no read-only request).
    pub gateways: Vec<GatewayStatus>,
    pub shards: Vec<ShardStatus>,
    pub totals: Totals,
    /// What is wrong, in plain words; empty when all is good.
    pub problems: Vec<String>,
    pub all_good: bool,
}

#[derive(Debug, Serialize)]
pub struct PresenceReplica {
    pub addr: String,
    /// It answered `Stats`.
    pub up: bool,
    pub error: Option<String>,
    pub stats: Option<PresenceStats>,
    /// Its `Gateways` answer, sorted by id.
    pub gateways: Option<Vec<GatewayInfo>>,
}

#[derive(Debug, Serialize)]
pub struct ProfileStatus {
    pub addr: String,
    /// It answered `Stats`.
    pub up: bool,
    pub error: Option<String>,
    /// Connect and `Stats`, in milliseconds.
    pub ping_ms: Option<f64>,
    /// Its role and Raft state.
    pub stats: Option<proto::profile::ProfileStats>,
}

#[derive(Debug, Serialize)]
pub struct GatewayStatus {
    pub id: u32,
    /// Named in the cluster map (else only registered with presence).
    pub in_map: bool,
    /// Its UDP address in the map.
    pub udp: Option<String>,
    /// Its peer address: as registered with presence, else the map's.
    pub peer: String,
    /// The first presence replica that listed it.
    pub seen_by: Option<String>,
    /// Its connection to that replica is live (`false`: in grace).
    pub connected: Option<bool>,
    /// Users online on it (sessions), as that replica counts them.
    pub users: Option<u64>,
}

#[derive(Debug, Serialize)]
pub struct ShardStatus {
    pub id: String,
    pub weight: u32,
    /// A replicated group (the map lists its replicas).
    pub replicated: bool,
    /// `addr`, then the other replicas, in map order.
    pub replicas: Vec<ReplicaStatus>,
    /// The address of the replica that says it leads (of a group).
    pub leader: Option<String>,
    /// Of the leader (or the standalone shard): the map it routes by.
    pub routing: RoutingStatus,
    /// Of the leader (or the standalone shard; else any replica up):
    /// mailboxes (users' and groups'; `ShardStats::users`) and live
    /// messages.
    pub mailboxes: Option<u64>,
    pub messages: Option<u64>,
    /// Of the leader: the group mailboxes among them.
    pub groups: Option<GroupCount>,
    /// Of the leader: how far each other member's log is behind its own.
    pub replication: Vec<FollowerLag>,
}

#[derive(Debug, Serialize)]
pub struct ReplicaStatus {
    pub addr: String,
    /// It answered `Stats`.
    pub up: bool,
    pub error: Option<String>,
    pub stats: Option<ShardStats>,
    pub routing: RoutingStatus,
    pub groups: Option<GroupCount>,
}

/// A shard's answer to `GetRouting`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum RoutingStatus {
    /// It routes by map `epoch` (moving to `target` during a rebalance).
    Installed { epoch: u64, target: Option<u64> },
    /// No routing installed: it serves every user it is asked about.
    NotInstalled,
    /// A follower: only the leader answers.
    NotLeader,
    /// No answer (down, timed out, an error).
    Unknown { error: String },
}

/// Group mailboxes counted with `ListUsers` from `GROUP_ID_BASE`, one page.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct GroupCount {
    pub mailboxes: u64,
    pub messages: u64,
    /// All were counted (else there are more than one page holds).
    pub complete: bool,
}

#[derive(Debug, Serialize)]
pub struct FollowerLag {
    pub replica: u64,
    /// Its address, if it answered `Stats` (which names its id).
    pub addr: Option<String>,
    pub matched: Option<u64>,
    /// Entries of the leader's log it lacks.
    pub lag: u64,
}

/// Summed over the shards that told.
#[derive(Debug, Default, Serialize)]
pub struct Totals {
    /// Mailboxes, users' and groups'.
    pub mailboxes: u64,
    pub messages: u64,
    pub group_mailboxes: u64,
    pub group_messages: u64,
    /// Every shard told its mailboxes and its groups were counted whole.
    pub complete: bool,
}

/// An error's text cut to one line's worth (openraft's name the whole
/// membership); the JSON fields keep it whole.
fn brief(text: &str) -> String {
    const CHARS_MAX: usize = 120;
    match text.char_indices().nth(CHARS_MAX) {
        Some((cut, _)) => format!("{}...", &text[..cut]),
        None => text.to_string(),
    }
}

/// `imctl status` found problems: exit code 1, nothing more to print.
#[derive(Debug)]
pub struct ProblemsFound(pub usize);

impl std::fmt::Display for ProblemsFound {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} problem(s) found", self.0)
    }
}

impl std::error::Error for ProblemsFound {}

pub async fn run(args: StatusArgs, out: &Output) -> anyhow::Result<()> {
    let path = args
        .cluster
        .clone()
        .unwrap_or_else(|| args.data.join("cluster.toml"));
    let timeout = Duration::from_millis(args.timeout_ms);
    match args.watch {
        None => {
            let snapshot = gather::snapshot(&path, timeout).await?;
            print(&snapshot, out.json, None)?;
            verdict(&snapshot)
        }
        Some(every) => watch(&path, timeout, Duration::from_secs(every), out.json).await,
    }
}

/// Refresh every `every` until SIGINT/SIGTERM (exit 0) or until stdout
/// is closed (the last refresh's verdict).
async fn watch(
    path: &std::path::Path,
    timeout: Duration,
    every: Duration,
    json: bool,
) -> anyhow::Result<()> {
    let stop = daemon::Signals::install()?.wait();
    tokio::pin!(stop);
    loop {
        let snapshot = tokio::select! {
            s = gather::snapshot(path, timeout) => s?,
            _ = &mut stop => return Ok(()),
        };
        if !print(&snapshot, json, Some(every))? {
            return verdict(&snapshot);
        }
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = &mut stop => return Ok(()),
        }
    }
}

fn verdict(snapshot: &Snapshot) -> anyhow::Result<()> {
    match snapshot.problems.len() {
        0 => Ok(()),
        n => Err(ProblemsFound(n).into()),
    }
}

/// Print one refresh (clearing a terminal first under `--watch`); false
/// if stdout is closed.
fn print(snapshot: &Snapshot, json: bool, watching: Option<Duration>) -> anyhow::Result<bool> {
    let stdout = std::io::stdout();
    let mut text = String::new();
    if json {
        text = serde_json::to_string(snapshot)?;
        text.push('\n');
    } else {
        if watching.is_some() && stdout.is_terminal() {
            text.push_str("\x1b[2J\x1b[H");
        }
        text.push_str(&render::human(snapshot, watching));
    }
    let mut lock = stdout.lock();
    match lock.write_all(text.as_bytes()).and_then(|()| lock.flush()) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(false),
        Err(e) => Err(e.into()),
    }
}
