//! Accepting TCP connections without spinning: the one accept loop step
//! every daemon's listener uses (in the shape of mini-redis's
//! `Listener::accept`).
//!
//! `accept(2)` fails in two ways that matter:
//! * the process or the system is out of a resource (`EMFILE`, `ENFILE`,
//!   `ENOBUFS`, `ENOMEM`): the pending connection stays in the backlog, so
//!   the listener stays readable and a retry fails again at once. A loop
//!   that just retries spins a core and logs nothing useful. [`Acceptor`]
//!   backs off instead, [`BACKOFF_MIN`] doubling to [`BACKOFF_MAX`] (reset by
//!   the next success), and warns at most once per [`WARN_INTERVAL`];
//! * one connection went away before it was accepted (`ECONNABORTED`,
//!   `ECONNRESET`, `EPROTO`) or the call was interrupted (`EINTR`): the next
//!   connection is unaffected, so it retries at once.
//!
//! An error of any other kind is treated like exhaustion (backed off), so
//! no error makes the loop spin. Every error is counted in
//! `<prefix>_accept_errors_total{kind}`.
//!
//! [`Acceptor::accept`] is cancel-safe: the backoff is a deadline kept in
//! the acceptor, so selecting it against the shutdown signal stops a
//! daemon at once even while it backs off, and the next call still waits
//! out the rest of the backoff.

use std::{io, net::SocketAddr, time::Duration};
use tokio::{
    net::{TcpListener, TcpStream},
    time::Instant,
};

/// The first backoff after a resource-exhaustion error.
pub const BACKOFF_MIN: Duration = Duration::from_millis(1);
/// The longest backoff: at most one failed attempt per this long.
pub const BACKOFF_MAX: Duration = Duration::from_secs(1);
/// While backing off, one warning per this long at most.
pub const WARN_INTERVAL: Duration = Duration::from_secs(10);

/// What an `accept(2)` failure was; its `kind` label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AcceptErrorKind {
    /// `EMFILE`: the process's descriptor limit.
    Emfile,
    /// `ENFILE`: the system's descriptor limit.
    Enfile,
    /// `ENOBUFS`: no socket buffer memory.
    Enobufs,
    /// `ENOMEM`: no memory.
    Enomem,
    /// `ECONNABORTED`: the connection was aborted before it was accepted.
    ConnAborted,
    /// `ECONNRESET`: the connection was reset before it was accepted.
    ConnReset,
    /// `EINTR`.
    Interrupted,
    /// `EPROTO`: a protocol error on that connection.
    Proto,
    /// Anything else: backed off like exhaustion.
    Other,
}

impl AcceptErrorKind {
    pub const ALL: [AcceptErrorKind; 9] = [
        AcceptErrorKind::Emfile,
        AcceptErrorKind::Enfile,
        AcceptErrorKind::Enobufs,
        AcceptErrorKind::Enomem,
        AcceptErrorKind::ConnAborted,
        AcceptErrorKind::ConnReset,
        AcceptErrorKind::Interrupted,
        AcceptErrorKind::Proto,
        AcceptErrorKind::Other,
    ];

    pub fn of(e: &io::Error) -> AcceptErrorKind {
        use AcceptErrorKind::*;
        match e.raw_os_error() {
            Some(libc::EMFILE) => return Emfile,
            Some(libc::ENFILE) => return Enfile,
            Some(libc::ENOBUFS) => return Enobufs,
            Some(libc::ENOMEM) => return Enomem,
            Some(libc::EPROTO) => return Proto,
            _ => {}
        }
        match e.kind() {
            io::ErrorKind::ConnectionAborted => ConnAborted,
            io::ErrorKind::ConnectionReset => ConnReset,
            io::ErrorKind::Interrupted => Interrupted,
            _ => Other,
        }
    }

    /// The `kind` label of `<prefix>_accept_errors_total`.
    pub fn label(self) -> &'static str {
        use AcceptErrorKind::*;
        match self {
            Emfile => "emfile",
            Enfile => "enfile",
            Enobufs => "enobufs",
            Enomem => "enomem",
            ConnAborted => "econnaborted",
            ConnReset => "econnreset",
            Interrupted => "eintr",
            Proto => "eproto",
            Other => "other",
        }
    }

    /// Whether the listener is backed off after this error (an immediate
    /// retry would fail the same way); `false`: only that one connection
    /// was lost.
    pub fn backs_off(self) -> bool {
        use AcceptErrorKind::*;
        !matches!(self, ConnAborted | ConnReset | Interrupted | Proto)
    }
}

/// Allows one log line per interval; counts what it held back.
#[derive(Debug)]
pub struct LogLimiter {
    interval: Duration,
    last: Option<Instant>,
    suppressed: u64,
}

impl LogLimiter {
    pub fn new(interval: Duration) -> LogLimiter {
        LogLimiter {
            interval,
            last: None,
            suppressed: 0,
        }
    }

    /// `Some(n)`: log now, `n` lines were held back since the last one;
    /// `None`: hold this one back.
    pub fn check(&mut self) -> Option<u64> {
        let now = Instant::now();
        match self.last {
            Some(last) if now.duration_since(last) < self.interval => {
                self.suppressed += 1;
                None
            }
            _ => {
                self.last = Some(now);
                Some(std::mem::take(&mut self.suppressed))
            }
        }
    }
}

/// A [`LogLimiter`] for a `static`: one per kind of warning, shared by
/// every connection and thread of the process (a bad frame from each of a
/// thousand connections is one line per interval, not a thousand).
#[derive(Debug)]
pub struct SharedLogLimiter {
    interval: Duration,
    state: std::sync::Mutex<Option<LogLimiter>>,
}

impl SharedLogLimiter {
    pub const fn new(interval: Duration) -> SharedLogLimiter {
        SharedLogLimiter {
            interval,
            state: std::sync::Mutex::new(None),
        }
    }

    /// Like [`LogLimiter::check`].
    pub fn check(&self) -> Option<u64> {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        state
            .get_or_insert_with(|| LogLimiter::new(self.interval))
            .check()
    }
}

/// A listener whose [`accept`](Acceptor::accept) never spins (see the
/// module docs).
#[derive(Debug)]
pub struct Acceptor {
    listener: TcpListener,
    metric: String,
    /// The next backoff, if the last attempt failed for want of resources.
    delay: Option<Duration>,
    /// No attempt before this (cancel-safe backoff).
    resume_at: Option<Instant>,
    errors: u64,
    backoffs: u64,
    episode_errors: u64,
    warn: LogLimiter,
}

impl Acceptor {
    /// Accept on `listener`, counting errors in
    /// `<prefix>_accept_errors_total`.
    pub fn new(listener: TcpListener, prefix: &str) -> Acceptor {
        let metric = format!("{prefix}_accept_errors_total");
        metrics::describe_counter!(
            metric.clone(),
            "Failed accept(2) calls, by kind (emfile, enfile, enobufs, enomem: backed off; econnaborted, econnreset, eintr, eproto: retried at once; other: backed off)"
        );
        for kind in AcceptErrorKind::ALL {
            // `increment(0)`: present at zero, without resetting a series
            // another listener of the same prefix already counted in.
            metrics::counter!(metric.clone(), "kind" => kind.label()).increment(0);
        }
        Acceptor {
            listener,
            metric,
            delay: None,
            resume_at: None,
            errors: 0,
            backoffs: 0,
            episode_errors: 0,
            warn: LogLimiter::new(WARN_INTERVAL),
        }
    }

    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// The next connection. Errors are counted, logged (rate-limited) and
    /// retried, backing off while resources are exhausted; never returns
    /// an error. Cancel-safe.
    pub async fn accept(&mut self) -> (TcpStream, SocketAddr) {
        loop {
            if let Some(at) = self.resume_at {
                tokio::time::sleep_until(at).await;
                self.resume_at = None;
            }
            match self.listener.accept().await {
                Ok(accepted) => {
                    if self.delay.take().is_some() {
                        tracing::info!(
                            failed_attempts = std::mem::take(&mut self.episode_errors),
                            "accepting connections again"
                        );
                    }
                    return accepted;
                }
                Err(e) => self.failed(&e),
            }
        }
    }

    fn failed(&mut self, e: &io::Error) {
        let kind = AcceptErrorKind::of(e);
        self.errors += 1;
        metrics::counter!(self.metric.clone(), "kind" => kind.label()).increment(1);
        if !kind.backs_off() {
            tracing::debug!(error = %e, kind = kind.label(), "accept failed; retrying");
            return;
        }
        let delay = match self.delay {
            None => BACKOFF_MIN,
            Some(d) => (d * 2).min(BACKOFF_MAX),
        };
        self.delay = Some(delay);
        self.resume_at = Some(Instant::now() + delay);
        self.backoffs += 1;
        self.episode_errors += 1;
        if let Some(held_back) = self.warn.check() {
            tracing::warn!(
                error = %e,
                kind = kind.label(),
                backoff_ms = delay.as_millis() as u64,
                held_back,
                "cannot accept connections; backing off"
            );
        }
    }

    /// Failed accepts so far (of every kind).
    pub fn errors(&self) -> u64 {
        self.errors
    }

    /// Backoffs so far (failures for want of resources, or unknown ones).
    pub fn backoffs(&self) -> u64 {
        self.backoffs
    }

    /// The current backoff; `None` once an accept succeeded.
    pub fn backoff(&self) -> Option<Duration> {
        self.delay
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_are_told_apart() {
        let os = io::Error::from_raw_os_error;
        assert_eq!(AcceptErrorKind::of(&os(libc::EMFILE)).label(), "emfile");
        assert_eq!(AcceptErrorKind::of(&os(libc::ENFILE)).label(), "enfile");
        assert_eq!(AcceptErrorKind::of(&os(libc::ENOBUFS)).label(), "enobufs");
        assert_eq!(AcceptErrorKind::of(&os(libc::ENOMEM)).label(), "enomem");
        for transient in [
            libc::ECONNABORTED,
            libc::ECONNRESET,
            libc::EINTR,
            libc::EPROTO,
        ] {
            assert!(
                !AcceptErrorKind::of(&os(transient)).backs_off(),
                "{transient}"
            );
        }
        for exhausted in [
            libc::EMFILE,
            libc::ENFILE,
            libc::ENOBUFS,
            libc::ENOMEM,
            libc::EINVAL,
        ] {
            assert!(
                AcceptErrorKind::of(&os(exhausted)).backs_off(),
                "{exhausted}"
            );
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_log_limiter_allows_one_line_per_interval() {
        let mut l = LogLimiter::new(Duration::from_secs(10));
        assert_eq!(l.check(), Some(0));
        assert_eq!(l.check(), None);
        assert_eq!(l.check(), None);
        tokio::time::advance(Duration::from_secs(10)).await;
        assert_eq!(l.check(), Some(2));
    }

    #[tokio::test(start_paused = true)]
    async fn the_backoff_doubles_to_its_cap() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mut a = Acceptor::new(listener, "test");
        let mut seen = Vec::new();
        for _ in 0..12 {
            a.failed(&io::Error::from_raw_os_error(libc::EMFILE));
            seen.push(a.backoff().unwrap().as_millis());
        }
        assert_eq!(
            seen,
            [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1000, 1000],
            "1 ms doubling to 1 s"
        );
        a.failed(&io::Error::from_raw_os_error(libc::ECONNABORTED));
        assert_eq!(
            (a.errors(), a.backoffs()),
            (13, 12),
            "transient: no backoff"
        );
        let addr = a.local_addr().unwrap();
        let (_client, _) = tokio::join!(TcpStream::connect(addr), a.accept());
        assert_eq!(a.backoff(), None, "a success resets the backoff");
    }
}
