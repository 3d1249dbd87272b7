//! What every daemon of the system (msgstore, presence, profile, gateway)
//! does the same way, in one place:
//!
//! * [`config`]: reading the TOML config file.
//! * [`run_main`]: the body of every daemon's `main`.
//! * [`init_tracing`]: structured logs to stderr, filtered by `RUST_LOG`.
//! * [`install_metrics`]: the Prometheus `/metrics` HTTP listener;
//!   [`catalog`]: a daemon's metrics described and at zero from the start.
//! * [`accept`]: the accept step of every listener ([`Acceptor`]): backs
//!   off instead of spinning when descriptors run out.
//! * [`Signals`]: SIGTERM/SIGINT, the start of every graceful shutdown.
//! * [`run_until_signal`] and [`Service`]: the main loop of every daemon.
//! * [`DirLock`]: one process per data directory.
//! * [`testing`]: run a daemon binary as a real process in a test.
//! * [`heap`]: the process's heap size, from jemalloc.
//! * [`secure`]: every link between processes, authenticated and
//!   encrypted with the cluster key.
//! * [`link`]: the gathering frame writer of client links.
//! * [`exit_code`]: a binary's fatal error printed, as an exit code.
//!
//! The shutdown pattern itself (stop accepting, drain, flush, exit 0) lives
//! in each daemon's `serve` function, which selects on [`Signals::wait`].

pub mod accept;
pub mod catalog;
pub mod config;
pub mod files;
pub mod heap;
pub mod link;
mod lock;
mod metrics_http;
pub mod netns;
pub mod secure;
mod service;
mod signals;
pub mod testing;

pub use accept::{Acceptor, LogLimiter, SharedLogLimiter};
pub use lock::{DirLock, LockError, LOCK_WAIT_MS};
pub use service::{run_until_signal, Service};
pub use signals::Signals;

use std::{future::Future, net::SocketAddr, process::ExitCode};
use tracing_subscriber::EnvFilter;

/// Logs to stderr at `info` unless `RUST_LOG` says otherwise; colours only
/// on a terminal.
pub fn init_tracing() {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
}

/// The Prometheus exporter could not start.
#[derive(Debug, thiserror::Error)]
#[error("cannot start the metrics listener on {addr}: {message}")]
pub struct MetricsError {
    pub addr: SocketAddr,
    /// The kind of the listen failure, if binding `addr` was what failed
    /// (`AddrInUse`: another process has the port).
    pub listen_error: Option<std::io::ErrorKind>,
    pub message: String,
}

impl MetricsError {
    pub fn is_addr_in_use(&self) -> bool {
        self.listen_error == Some(std::io::ErrorKind::AddrInUse)
    }
}

/// Serve every `metrics` counter, gauge and histogram of this process at
/// `http://ADDR/metrics`; the address it listens on (port 0 in `addr`: one
/// the kernel chose). Must be called inside a tokio runtime.
///
/// The endpoint is served by our own small HTTP server on an [`Acceptor`]
/// (see `metrics_http`; accept errors are counted in
/// `metrics_http_accept_errors_total`).
pub fn install_metrics(addr: SocketAddr) -> Result<SocketAddr, MetricsError> {
    let listen_failed = |e: std::io::Error| MetricsError {
        addr,
        listen_error: Some(e.kind()),
        message: e.to_string(),
    };
    let listener = std::net::TcpListener::bind(addr).map_err(listen_failed)?;
    let bound = listener.local_addr().map_err(listen_failed)?;
    listener.set_nonblocking(true).map_err(listen_failed)?;
    let listener = tokio::net::TcpListener::from_std(listener).map_err(listen_failed)?;
    let handle = metrics_exporter_prometheus::PrometheusBuilder::new()
        .install_recorder()
        .map_err(|e| MetricsError {
            addr,
            listen_error: None,
            message: e.to_string(),
        })?;
    heap::describe();
    let acceptor = Acceptor::new(listener, "metrics_http");
    tokio::spawn(metrics_http::serve(acceptor, handle));
    tracing::info!(addr = %bound, "metrics exporter listening");
    Ok(bound)
}

/// The body of a daemon's `main`: logs, a current-thread runtime for
/// `serve` (which waits for signals and serves metrics; a daemon's real work
/// runs on threads of its own), and the exit code: success, or failure
/// after printing `"<name>: error: ..."` on stderr.
pub fn run_main<F>(name: &str, serve: impl FnOnce() -> anyhow::Result<F>) -> ExitCode
where
    F: Future<Output = anyhow::Result<()>>,
{
    init_tracing();
    let result = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| anyhow::anyhow!("cannot start the async runtime: {e}"))
        .and_then(|runtime| runtime.block_on(serve()?));
    exit_code(name, result)
}

/// Print a binary's fatal error as `"<name>: error: ..."` (with its whole
/// cause chain) and turn the result into the process's exit code.
pub fn exit_code(name: &str, result: anyhow::Result<()>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("{name}: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_metrics_address_in_use_is_told_apart() {
        let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = taken.local_addr().unwrap();
        let e = super::install_metrics(addr).unwrap_err();
        assert!(e.is_addr_in_use(), "{e}");
        assert_eq!(e.addr, addr);
    }
}
