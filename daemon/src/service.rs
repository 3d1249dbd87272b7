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

/// Implement [`Service`] for a daemon type whose inherent `local_addr()`,
/// `async fn stopped(&mut self) -> Result<(), E>` and
/// `async fn shutdown(self) -> Result<(), E>` already have that shape
/// (`E` convertible into `anyhow::Error`).
#[macro_export]
macro_rules! impl_service {
    ($t:ty) => {
        impl $crate::Service for $t {
            fn local_addr(&self) -> ::std::net::SocketAddr {
                <$t>::local_addr(self)
            }
            async fn stopped(&mut self) -> ::anyhow::Result<()> {
                Ok(<$t>::stopped(self).await?)
            }
            async fn shutdown(self) -> ::anyhow::Result<()> {
                Ok(<$t>::shutdown(self).await?)
            }
        }
    };
}
