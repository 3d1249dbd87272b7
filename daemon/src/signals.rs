//! SIGTERM and SIGINT: the start of every graceful shutdown.

use anyhow::Context;

/// SIGTERM and SIGINT handlers. Install them before the daemon prints its
/// listening line, so a signal right after it shuts down gracefully instead
/// of killing the process.
pub struct Signals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
}

impl Signals {
    /// Must be called inside a tokio runtime.
    pub fn install() -> anyhow::Result<Self> {
        use tokio::signal::unix::{signal, SignalKind};
        Ok(Self {
            term: signal(SignalKind::terminate()).context("cannot install SIGTERM handler")?,
            int: signal(SignalKind::interrupt()).context("cannot install SIGINT handler")?,
        })
    }

    /// Wait for SIGTERM or SIGINT; returns the signal's name.
    pub async fn wait(mut self) -> &'static str {
        tokio::select! {
            _ = self.term.recv() => "SIGTERM",
            _ = self.int.recv() => "SIGINT",
        }
    }
}
