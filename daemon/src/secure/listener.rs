//! The accept side of secure links.
//!
//! Connections are accepted by an [`Acceptor`] (no spinning when
//! descriptors run out) on a task of their own; each one's handshake runs
//! concurrently under [`GateLimits::handshake_timeout_ms`]. Only links that
//! proved they hold the cluster key are handed to the daemon, so a stranger
//! can occupy at most a handshake slot for a few seconds, never one of the
//! daemon's connection slots: those stay for known peers.
//!
//! Handshake slots are never refused to a newcomer: when they are full,
//! the *oldest* handshake in progress is dropped to make room (from the
//! same source address if that address is at its own limit). A peer holding
//! the key finishes its handshake within a round trip, so a flood of silent
//! connections must outpace that to keep it out, rather than merely fill
//! the slots once. Outcomes, each counted in
//! `<prefix>_link_rejected_total{reason}` as the connection is closed:
//! * `pending_limit`: dropped as the oldest of
//!   [`GateLimits::handshakes_pending_max`] handshakes in progress;
//! * `source_limit`: dropped as the oldest of
//!   [`GateLimits::handshakes_per_source_max`] from one IP address;
//! * `timeout`: the handshake took longer than its deadline;
//! * `bad_key`: a complete first message that does not prove the key;
//! * `malformed`: the connection closed or failed before a whole message.
//!
//! `<prefix>_link_handshakes_total` counts links authenticated;
//! `<prefix>_link_handshakes_pending` is the handshakes in progress.

use super::{key, stream::Link, ClusterKey, HANDSHAKE_TIMEOUT_MS};
use crate::{accept::Acceptor, LogLimiter};
use proto::link::HELLO_BYTES;
use std::{
    collections::{BTreeMap, HashMap, VecDeque},
    io,
    net::{IpAddr, SocketAddr},
    sync::{Arc, Mutex},
    time::Duration,
};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
    sync::mpsc,
    task::{AbortHandle, JoinHandle},
};

/// Limits of a listener's handshakes.
#[derive(Debug, Clone, Copy)]
pub struct GateLimits {
    pub handshakes_pending_max: usize,
    pub handshakes_per_source_max: usize,
    pub handshake_timeout_ms: u64,
}

impl Default for GateLimits {
    fn default() -> Self {
        GateLimits {
            handshakes_pending_max: 256,
            handshakes_per_source_max: 16,
            handshake_timeout_ms: HANDSHAKE_TIMEOUT_MS,
        }
    }
}

/// Authenticated links handed over but not taken by the daemon yet, at
/// most; handshakes wait (under their deadline) while it is full.
const READY_LINKS_MAX: usize = 64;

/// Why a connection was turned away (the `reason` label).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rejected {
    PendingLimit,
    SourceLimit,
    Timeout,
    BadKey,
    Malformed,
}

impl Rejected {
    pub const ALL: [Rejected; 5] = [
        Rejected::PendingLimit,
        Rejected::SourceLimit,
        Rejected::Timeout,
        Rejected::BadKey,
        Rejected::Malformed,
    ];

    pub fn label(self) -> &'static str {
        match self {
            Rejected::PendingLimit => "pending_limit",
            Rejected::SourceLimit => "source_limit",
            Rejected::Timeout => "timeout",
            Rejected::BadKey => "bad_key",
            Rejected::Malformed => "malformed",
        }
    }
}

/// A listener that yields only authenticated links. Dropping it stops
/// accepting (handshakes in progress end by their deadline).
pub struct SecureListener {
    ready: mpsc::Receiver<Link>,
    local: Option<SocketAddr>,
    task: JoinHandle<()>,
}

impl Drop for SecureListener {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl SecureListener {
    /// Serve `listener` with the process's cluster key; metrics are named
    /// `<prefix>_link_*`. Must be called inside a tokio runtime.
    pub fn new(listener: TcpListener, prefix: &str, limits: GateLimits) -> Self {
        Self::with_key(listener, prefix, limits, key().clone())
    }

    pub fn with_key(
        listener: TcpListener,
        prefix: &str,
        limits: GateLimits,
        key: ClusterKey,
    ) -> Self {
        let local = listener.local_addr().ok();
        let gate = Arc::new(Gate::new(prefix, limits, key));
        let (tx, ready) = mpsc::channel(READY_LINKS_MAX);
        let acceptor = Acceptor::new(listener, prefix);
        let task = tokio::spawn(accept_loop(acceptor, gate, tx));
        SecureListener { ready, local, task }
    }

    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.local
            .ok_or_else(|| io::Error::other("the listener has no local address"))
    }

    /// The next authenticated link. Cancel-safe.
    pub async fn accept(&mut self) -> Link {
        match self.ready.recv().await {
            Some(link) => link,
            // The accept loop never ends while we hold its handle.
            None => std::future::pending().await,
        }
    }
}

struct Gate {
    limits: GateLimits,
    key: ClusterKey,
    handshakes: String,
    pending_gauge: String,
    rejected: String,
    state: Mutex<Pending>,
    warn: Mutex<LogLimiter>,
}

/// Handshakes in progress, oldest first.
#[derive(Default)]
struct Pending {
    next_id: u64,
    all: BTreeMap<u64, (IpAddr, AbortHandle)>,
    by_source: HashMap<IpAddr, VecDeque<u64>>,
}

impl Pending {
    /// Forget handshake `id`; its source address and task, if it was here.
    fn remove(&mut self, id: u64) -> Option<(IpAddr, AbortHandle)> {
        let (ip, task) = self.all.remove(&id)?;
        if let Some(ids) = self.by_source.get_mut(&ip) {
            ids.retain(|i| *i != id);
            if ids.is_empty() {
                self.by_source.remove(&ip);
            }
        }
        if self.all.is_empty() {
            self.by_source.shrink_to(0);
        }
        Some((ip, task))
    }

    /// The handshake to drop to make room for one from `ip`, and why.
    fn victim(&self, ip: IpAddr, limits: &GateLimits) -> Option<(u64, Rejected)> {
        if let Some(ids) = self.by_source.get(&ip) {
            if ids.len() >= limits.handshakes_per_source_max {
                return ids.front().map(|id| (*id, Rejected::SourceLimit));
            }
        }
        if self.all.len() >= limits.handshakes_pending_max {
            return self
                .all
                .keys()
                .next()
                .map(|id| (*id, Rejected::PendingLimit));
        }
        None
    }
}

impl Gate {
    fn new(prefix: &str, limits: GateLimits, key: ClusterKey) -> Gate {
        let gate = Gate {
            limits,
            key,
            handshakes: format!("{prefix}_link_handshakes_total"),
            pending_gauge: format!("{prefix}_link_handshakes_pending"),
            rejected: format!("{prefix}_link_rejected_total"),
            state: Mutex::default(),
            warn: Mutex::new(LogLimiter::new(crate::accept::WARN_INTERVAL)),
        };
        metrics::describe_counter!(
            gate.handshakes.clone(),
            "Links from other cluster processes authenticated with the cluster key"
        );
        metrics::describe_gauge!(gate.pending_gauge.clone(), "Link handshakes in progress");
        metrics::describe_counter!(
            gate.rejected.clone(),
            "Connections closed before they proved the cluster key, by reason (pending_limit, source_limit, timeout, bad_key, malformed)"
        );
        // `increment(0)`: present at zero, without resetting what another
        // listener of the same prefix counted (an embedded cluster runs
        // several shards in one process).
        metrics::counter!(gate.handshakes.clone()).increment(0);
        metrics::gauge!(gate.pending_gauge.clone()).increment(0.0);
        for reason in Rejected::ALL {
            metrics::counter!(gate.rejected.clone(), "reason" => reason.label()).increment(0);
        }
        gate
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Pending> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Start the handshake of `stream` from `from`, dropping the oldest one
    /// in progress if the slots are full.
    fn admit(self: &Arc<Self>, stream: TcpStream, from: SocketAddr, ready: &mpsc::Sender<Link>) {
        let mut pending = self.lock();
        if let Some((old, why)) = pending.victim(from.ip(), &self.limits) {
            if let Some((ip, task)) = pending.remove(old) {
                task.abort();
                self.reject(SocketAddr::new(ip, 0), why);
            }
        }
        let id = pending.next_id;
        pending.next_id += 1;
        // Spawned under the lock: the task cannot finish (and remove its
        // entry) before the entry exists.
        let task = tokio::spawn(run_handshake(self.clone(), id, stream, from, ready.clone()));
        pending.all.insert(id, (from.ip(), task.abort_handle()));
        pending
            .by_source
            .entry(from.ip())
            .or_default()
            .push_back(id);
        metrics::gauge!(self.pending_gauge.clone()).set(pending.all.len() as f64);
    }

    /// Handshake `id` ended; `false` if it had been dropped already.
    fn release(&self, id: u64) -> bool {
        let mut pending = self.lock();
        let was_there = pending.remove(id).is_some();
        metrics::gauge!(self.pending_gauge.clone()).set(pending.all.len() as f64);
        was_there
    }

    fn reject(&self, from: SocketAddr, why: Rejected) {
        metrics::counter!(self.rejected.clone(), "reason" => why.label()).increment(1);
        let mut warn = self.warn.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(held_back) = warn.check() {
            tracing::warn!(%from, reason = why.label(), held_back, "connection refused: it did not prove the cluster key");
        }
    }
}

async fn accept_loop(mut acceptor: Acceptor, gate: Arc<Gate>, ready: mpsc::Sender<Link>) {
    loop {
        let (stream, from) = acceptor.accept().await;
        gate.admit(stream, from, &ready);
    }
}

/// One handshake under its deadline; an authenticated link is handed to
/// the daemon (waiting, still under the deadline, while it is busy).
async fn run_handshake(
    gate: Arc<Gate>,
    id: u64,
    stream: TcpStream,
    from: SocketAddr,
    ready: mpsc::Sender<Link>,
) {
    let deadline = Duration::from_millis(gate.limits.handshake_timeout_ms);
    let result = tokio::time::timeout(deadline, handshake(stream, &gate.key)).await;
    if !gate.release(id) {
        return; // dropped to make room, and counted then
    }
    match result {
        Ok(Ok(link)) => {
            metrics::counter!(gate.handshakes.clone()).increment(1);
            let _ = ready.send(link).await;
        }
        Ok(Err(why)) => gate.reject(from, why),
        Err(_) => gate.reject(from, Rejected::Timeout),
    }
}

async fn handshake(mut stream: TcpStream, key: &ClusterKey) -> Result<Link, Rejected> {
    let _ = stream.set_nodelay(true);
    let mut hello = [0u8; HELLO_BYTES];
    stream
        .read_exact(&mut hello)
        .await
        .map_err(|_| Rejected::Malformed)?;
    let (answer, keys) = proto::link::accept(key, super::key::random_seed(), &hello)
        .map_err(|_| Rejected::BadKey)?;
    stream
        .write_all(&answer)
        .await
        .map_err(|_| Rejected::Malformed)?;
    Link::new(stream, keys).map_err(|_| Rejected::Malformed)
}
