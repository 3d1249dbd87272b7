//! The main loop every daemon binary shares: announce the address, then run
//! until SIGTERM/SIGINT (graceful shutdown, exit 0) or until the service
//! stops by itself (a fatal error, exit non-zero).

use crate::Signals;
use std::{future::Future, net::SocketAddr};

/// A started daemon as its binary's main loop sees it.
pub trait Service: Sized {
    /// The address it serves on (printed as `"<name> listening on ADDR"`).
    fn local_addr(&self) -> SocketAddr;
    /// Resolves only if the service stops by itself.
    fn stopped(&mut self) -> impl Future<Output = anyhow::Result<()>> + Send;
    /// Stop accepting, drain, flush.
    fn shutdown(self) -> impl Future<Output = anyhow::Result<()>> + Send;
}

/// Print `"<name> listening on ADDR"` and serve until a signal (then shut
/// down gracefully) or until the service stops by itself (an error).
pub async fn run_until_signal<S: Service>(
    name: &str,
    signals: Signals,
    mut service: S,
) -> anyhow::Result<()> {
    println!("{name} listening on {}", service.local_addr());
    tokio::select! {
        signal = signals.wait() => {
            tracing::info!(signal, "shutting down");
            service.shutdown().await?;
            tracing::info!("{name} stopped cleanly; bye");
            Ok(())
        }
        stopped = service.stopped() => {
            stopped?;
            anyhow::bail!("{name} stopped unexpectedly")
        }
    }
}
