//! `gateway`: the login gateway daemon.

use anyhow::Context;
use clap::Parser;
use daemon::Signals;
use gateway::{config::GatewayConfig, daemon as gateway_daemon, keys};
use std::{net::SocketAddr, path::PathBuf, process::ExitCode};

/// jemalloc, as in every daemon: memory freed when connections close goes
/// back to the system (glibc's heap kept growing as idle connections came
/// and went), and `process_heap_*_bytes` are read from its statistics.
#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// The login gateway: the only process clients reach, over UDP.
#[derive(Debug, Parser)]
#[command(name = "gateway", version, about)]
struct Args {
    /// UDP address clients reach (port 0: any free port) [default: 127.0.0.1:7100]
    #[arg(long, value_name = "ADDR")]
    listen: Option<SocketAddr>,
    /// TCP address other gateways forward to (port 0: any free port)
    /// [default: 127.0.0.1:7101]
    #[arg(long, value_name = "ADDR")]
    peer_listen: Option<SocketAddr>,
    /// The cluster map file (TOML) [default: data/cluster.toml]
    #[arg(long, value_name = "FILE")]
    cluster: Option<PathBuf>,
    /// This gateway's id in the cluster map [default: 1]
    #[arg(long, value_name = "ID")]
    id: Option<u32>,
    /// Directory of the key files (created if missing) [default: data/gateway]
    #[arg(long, value_name = "DIR")]
    data: Option<PathBuf>,
    /// Address of the Prometheus /metrics HTTP listener.
    #[arg(long, value_name = "ADDR")]
    metrics_addr: Option<SocketAddr>,
    /// TOML config file (see gateway.example.toml); flags override it.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    #[command(flatten)]
    key: daemon::secure::KeyArgs,
}

fn main() -> ExitCode {
    let args = Args::parse();
    if let Err(e) = args.key.install() {
        return daemon::exit_code("gateway", Err(e));
    }
    daemon::init_tracing();
    // One thread: the event loop does the gateway's work (crypto, routing)
    // and everything else only waits for services. Tasks on other threads
    // cost cross-thread wakeups per message: `imbench e2e --quick` measured
    // 47k chat msgs/s on one thread against 33k on the multi-thread runtime.
    let result = load_config(&args).and_then(|config| {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .context("cannot start the async runtime")?
            .block_on(serve(config))
    });
    daemon::exit_code("gateway", result)
}

fn load_config(args: &Args) -> anyhow::Result<GatewayConfig> {
    let mut config = match &args.config {
        Some(path) => GatewayConfig::load(path)?,
        None => GatewayConfig::default(),
    };
    if let Some(listen) = args.listen {
        config.listen = listen;
    }
    if let Some(peer) = args.peer_listen {
        config.peer_listen = peer;
    }
    if let Some(cluster) = &args.cluster {
        config.cluster = cluster.clone();
    }
    if let Some(id) = args.id {
        config.id = id;
    }
    if let Some(data) = &args.data {
        config.data = data.clone();
    }
    if let Some(addr) = args.metrics_addr {
        config.metrics_addr = Some(addr);
    }
    config.validate()?;
    Ok(config)
}

async fn serve(config: GatewayConfig) -> anyhow::Result<()> {
    let signals = Signals::install()?;
    if let Some(addr) = config.metrics_addr {
        daemon::install_metrics(addr)?;
    }
    let running = gateway_daemon::start(config).await?;
    println!("gateway public key {}", keys::to_hex(&running.public_key()));
    daemon::run_until_signal("gateway", signals, running).await
}
