//! `presence`: the online-status server daemon.

use clap::Parser;
use daemon::Signals;
use presence::daemon::{self as presence_daemon, DaemonConfig};
use std::{net::SocketAddr, path::PathBuf, process::ExitCode};

/// jemalloc, as in every daemon: memory freed when connections close goes
/// back to the system (glibc's heap kept growing as idle connections came
/// and went), and `process_heap_*_bytes` are read from its statistics.
#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// The in-memory online-status server, served over TCP.
#[derive(Debug, Parser)]
#[command(name = "presence", version, about)]
struct Args {
    /// Address of the presence protocol listener (port 0: any free port)
    /// [default: 127.0.0.1:7300]
    #[arg(long, value_name = "ADDR")]
    listen: Option<SocketAddr>,
    /// Address of the Prometheus /metrics HTTP listener.
    #[arg(long, value_name = "ADDR")]
    metrics_addr: Option<SocketAddr>,
    /// Grace period in ms before a lost gateway's users go offline (sets
    /// server.grace_ms).
    #[arg(long, value_name = "MS")]
    grace_ms: Option<u32>,
    /// TOML config file (see presence.example.toml); flags override it.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    #[command(flatten)]
    key: daemon::secure::KeyArgs,
}

fn main() -> ExitCode {
    let args = Args::parse();
    if let Err(e) = args.key.install() {
        return daemon::exit_code("presence", Err(e));
    }
    daemon::run_main("presence", || Ok(serve(load_config(&args)?)))
}

fn load_config(args: &Args) -> anyhow::Result<DaemonConfig> {
    let mut config = match &args.config {
        Some(path) => DaemonConfig::load(path)?,
        None => DaemonConfig::default(),
    };
    if let Some(listen) = args.listen {
        config.listen = listen;
    }
    if let Some(addr) = args.metrics_addr {
        config.metrics_addr = Some(addr);
    }
    if let Some(ms) = args.grace_ms {
        config.server.grace_ms = ms;
    }
    Ok(config)
}

async fn serve(config: DaemonConfig) -> anyhow::Result<()> {
    // Handlers first: a SIGTERM right after the listening line must shut
    // down gracefully.
    let signals = Signals::install()?;
    if let Some(addr) = config.metrics_addr {
        daemon::install_metrics(addr)?;
    }
    let running = presence_daemon::start(config)?;
    daemon::run_until_signal("presence", signals, running).await
}
