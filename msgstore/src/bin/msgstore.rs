//! `msgstore`: the storage shard daemon.

use clap::Parser;
use daemon::Signals;
use msgstore::{
    daemon::{self as shard_daemon, DaemonConfig},
    FsyncPolicy,
};
use std::{net::SocketAddr, path::PathBuf, process::ExitCode};

/// jemalloc, as Redis uses: unflushed records are one allocation each, and
/// glibc's free (chunk coalescing) of acknowledged ones cost a fifth of the
/// server thread while mailboxes drained.
#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// One offline-message storage shard, served over TCP.
#[derive(Debug, Parser)]
#[command(name = "msgstore", version, about)]
struct Args {
    /// Shard data directory (created if missing; locked while running)
    /// [default: data/msgstore]
    #[arg(long, value_name = "DIR")]
    data: Option<PathBuf>,
    /// Address of the shard protocol listener (port 0: any free port)
    /// [default: 127.0.0.1:7400]
    #[arg(long, value_name = "ADDR")]
    listen: Option<SocketAddr>,
    /// Durability policy: always, interval:<ms> or never.
    #[arg(long, value_name = "POLICY")]
    fsync: Option<FsyncPolicy>,
    /// Create every missing bucket file before serving (sets
    /// engine.precreate_buckets).
    #[arg(long)]
    precreate_buckets: bool,
    /// Address of the Prometheus /metrics HTTP listener.
    #[arg(long, value_name = "ADDR")]
    metrics_addr: Option<SocketAddr>,
    #[command(flatten)]
    raft: replication::group::RaftArgs,
    /// TOML config file (see msgstore.example.toml); flags override it.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Do not serve: if the log is corrupt (damage with valid entries
    /// after it), cut it at the damage, print exactly what was dropped and
    /// exit. The shard must not be running.
    #[arg(long)]
    repair: bool,
    #[command(flatten)]
    key: daemon::secure::KeyArgs,
}

fn main() -> ExitCode {
    let args = Args::parse();
    if args.repair {
        return repair(&args);
    }
    // The async runtime only waits for signals and serves metrics; the
    // shard runs on its own thread (see `msgstore::server`).
    if let Err(e) = args.key.install() {
        return daemon::exit_code("msgstore", Err(e));
    }
    daemon::run_main("msgstore", || Ok(serve(load_config(&args)?)))
}

fn load_config(args: &Args) -> anyhow::Result<DaemonConfig> {
    let mut config = match &args.config {
        Some(path) => DaemonConfig::load(path)?,
        None => DaemonConfig::default(),
    };
    if let Some(data) = &args.data {
        config.data = Some(data.clone());
    }
    if let Some(listen) = args.listen {
        config.listen = listen;
    }
    if let Some(fsync) = args.fsync {
        config.engine.fsync = fsync;
    }
    if args.precreate_buckets {
        config.engine.precreate_buckets = true;
    }
    if let Some(addr) = args.metrics_addr {
        config.metrics_addr = Some(addr);
    }
    args.raft.apply(&mut config.raft);
    Ok(config)
}

async fn serve(config: DaemonConfig) -> anyhow::Result<()> {
    // Handlers go in before anything else: a SIGTERM right after the
    // listening line must shut down gracefully, not kill the process.
    let signals = Signals::install()?;
    if let Some(addr) = config.metrics_addr {
        daemon::install_metrics(addr)?;
    }
    let running = match shard_daemon::start(config).await {
        Ok(running) => running,
        Err(e) if e.is_locked() => {
            anyhow::bail!("{e} (is another msgstore running on this data directory?)")
        }
        Err(e) => return Err(e.into()),
    };
    daemon::run_until_signal("msgstore", signals, running).await
}

fn repair(args: &Args) -> ExitCode {
    let result = load_config(args).and_then(|config| Ok(shard_daemon::repair_shard(config)?));
    match result {
        Ok(lines) => {
            for line in lines {
                println!("{line}");
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("msgstore --repair: {e:#}");
            ExitCode::FAILURE
        }
    }
}
