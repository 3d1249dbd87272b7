//! imbench: side-by-side benchmarks of this system against real peers.

mod alloc_count;
mod chaos;
mod disk;
mod e2e;
mod e2e_direct;
mod e2e_fleet;
mod e2e_report;
mod e2e_storm;
mod failover;
mod group;
mod group_cluster;
mod group_members;
mod group_report;
mod idle_sessions;
mod inproc;
mod load;
mod presence;
mod procs;
mod profile;
mod rebalance;
mod rebalance_check;
mod rebalance_load;
mod rebalance_report;
mod redis;
mod report;
mod report_html;
mod responder_crypto;
mod session;
mod shard_driver;
mod storage;
mod storage_replicated;
mod udp_load;

use anyhow::Result;
use clap::{Parser, Subcommand};

/// Counts live heap bytes (for the idle-session measure).
#[global_allocator]
static ALLOC: alloc_count::CountingAlloc = alloc_count::CountingAlloc;

#[derive(Parser, Debug)]
#[command(name = "imbench", about = "Side-by-side benchmarks against real peers")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Mailbox storage: our shard vs a private redis-server, the engine
    /// in-process, and the raw disk ceiling, measured in the same run.
    Storage(storage::StorageArgs),
    /// Presence: our presence server vs a private redis-server holding the
    /// same online users (memory per user, batched lookups, updates).
    Presence(presence::PresenceArgs),
    /// Login reads (own profile + friend list + friends' profiles) from our
    /// profile service vs a private redis-server; password checks/s.
    Profile(profile::ProfileArgs),
    /// The UDP session layer: encrypted reliable echo vs the raw UDP echo
    /// ceiling over loopback, handshakes/s, bytes per idle session.
    Session(session::SessionArgs),
    /// The whole system end to end: online messages, login storm, offline
    /// store + drain, lost/duplicated check, vs the raw UDP echo ceiling.
    E2e(e2e::E2eArgs),
    /// Live shard rebalancing: users and MB moved per second while a load
    /// runs, the load during vs before, the fraction moved vs the ideal.
    Rebalance(rebalance::RebalanceArgs),
    /// Chat groups end to end, every component a process (2 gateways):
    /// group deliveries/s and send -> every online member latency, shard
    /// appends, gateway forwards and shard bytes per group message, the
    /// offline drain, 1:1 messages/s on the same cluster, lost/duplicated.
    Group(group::GroupArgs),
    /// A 3-replica shard group under steady appends, its leader SIGKILLed
    /// again and again: time to the next acknowledged append, lost and
    /// duplicated appends.
    Failover(failover::FailoverArgs),
    /// The whole cluster as separate processes (2 presence, 3 profile, 2
    /// shard groups of 3 replicas, 2 gateways) under SDK clients while one
    /// process at a time is killed, paused or (as root) cut off: acknowledged
    /// messages lost, duplicated or out of order, and how long logins kept
    /// failing.
    Chaos(chaos::ChaosArgs),
    /// The JSON of any imbench runs as one HTML page with SVG charts: each
    /// ratio against its target, throughput over time, latency
    /// percentiles, every ratio across the history of reports.
    Report(report_html::ReportArgs),
}

#[tokio::main]
async fn main() -> Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Cmd::Storage(args) => storage::run(args).await,
        Cmd::Presence(args) => presence::run(args).await,
        Cmd::Profile(args) => profile::run(args).await,
        Cmd::Session(args) => session::run(args).await,
        Cmd::E2e(args) => e2e::run(args).await,
        Cmd::Group(args) => group::run(args).await,
        Cmd::Failover(args) => failover::run(args).await,
        Cmd::Rebalance(args) => rebalance::run(args).await,
        Cmd::Chaos(args) => chaos::run(args).await,
        Cmd::Report(args) => report_html::run(args),
    }
}
