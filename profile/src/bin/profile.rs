//! `profile`: the profile service daemon.

use anyhow::Context;
use clap::Parser;
use daemon::Signals;
use profile::Config;
use std::{net::SocketAddr, path::PathBuf, process::ExitCode};

/// jemalloc, as in every daemon: memory freed when connections close goes
/// back to the system (glibc's heap kept growing as idle connections came
/// and went), and `process_heap_*_bytes` are read from its statistics.
#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// Accounts, profiles, friends and avatars, served over TCP.
#[derive(Debug, Parser)]
#[command(name = "profile", version, about)]
struct Args {
    /// Data directory (created if missing; locked while running)
    /// [default: data/profile]
    #[arg(long, value_name = "DIR")]
    data: Option<PathBuf>,
    /// Address of the profile protocol listener (port 0: any free port)
    /// [default: 127.0.0.1:7500]
    #[arg(long, value_name = "ADDR")]
    listen: Option<SocketAddr>,
    /// Address of the Prometheus /metrics HTTP listener.
    #[arg(long, value_name = "ADDR")]
    metrics_addr: Option<SocketAddr>,
    /// TOML config file (see profile.example.toml); flags override it.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    #[command(flatten)]
    raft: replication::group::RaftArgs,
    #[command(flatten)]
    key: daemon::secure::KeyArgs,
}

fn main() -> ExitCode {
    let args = Args::parse();
    if let Err(e) = args.key.install() {
        return daemon::exit_code("profile", Err(e));
    }
    daemon::init_tracing();
    daemon::exit_code("profile", run(args))
}

fn load_config(args: &Args) -> anyhow::Result<Config> {
    let mut config = match &args.config {
        Some(path) => Config::load(path).map_err(anyhow::Error::msg)?,
        None => Config::default(),
    };
    if let Some(data) = &args.data {
        config.data = data.clone();
    }
    if let Some(listen) = args.listen {
        config.listen = listen;
    }
    if let Some(addr) = args.metrics_addr {
        config.metrics_addr = Some(addr);
    }
    args.raft.apply(&mut config.raft);
    Ok(config)
}

fn run(args: Args) -> anyhow::Result<()> {
    let config = load_config(&args)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(profile::config::resolve_threads(
            config.server.worker_threads,
        ))
        .thread_name("profile-io")
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    runtime.block_on(serve(config))
}

async fn serve(config: Config) -> anyhow::Result<()> {
    let signals = Signals::install()?;
    if let Some(addr) = config.metrics_addr {
        daemon::install_metrics(addr)?;
    }
    let running = match profile::daemon::start(config).await {
        Ok(running) => running,
        Err(e @ profile::Error::Locked { .. }) => {
            anyhow::bail!("{e} (is another profile daemon running on this data directory?)")
        }
        Err(e) => return Err(e.into()),
    };
    daemon::run_until_signal("profile", signals, running).await
}
