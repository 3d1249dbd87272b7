//! [`PresenceClient`]: what a gateway uses to talk to the presence server.
//!
//! ```no_run
//! # async fn demo() -> Result<(), presence::ClientError> {
//! use presence::{ClientConfig, PresenceClient, PresenceEvent, Status};
//! let (client, mut events) =
//!     PresenceClient::connect("127.0.0.1:7300", 7, ClientConfig::default()).await?;
//! client.online(42, 1001, Status::Online).await?;
//! let friends = client.watch(1001, &[43, 44]).await?; // current entries
//! while let Some(event) = events.recv().await {
//!     match event {
//!         PresenceEvent::StatusChanged { user, entry, sessions } => { /* push to sessions */ }
//!         PresenceEvent::Kicked { user, session } => { /* close that session */ }
//!         PresenceEvent::Reconnected => { /* events may have been missed: look up again */ }
//!     }
//! }
//! # Ok(()) }
//! ```
//!
//! * One TCP connection, pipelined: any number of tasks may call at once
//!   (clones share the connection); at most
//!   [`ClientConfig::inflight_requests_max`] requests are unanswered,
//!   further callers wait for a slot.
//! * The client registers the gateway and keeps its lease: it pings every
//!   third of the server's `lease_ms` and treats an unanswered ping as a
//!   broken link.
//! * **The client tracks the gateway's sessions and watches itself**: every
//!   `online`, `offline`, `watch`, `unwatch` and `resync` updates its copy
//!   first, then is sent. On a broken link every request in flight fails
//!   with [`ClientError::Disconnected`] (none hangs; each also has
//!   [`ClientConfig::request_timeout_ms`]), and calls made while the link is
//!   down fail the same way at once, but their change is kept in the copy.
//!   The client reconnects with exponential backoff, registers again and
//!   sends the complete copy (`SyncBegin`, `SyncSessions`..., `SyncEnd`, then
//!   every session's watches), before any new call reaches the new link.
//!   Then it delivers [`PresenceEvent::Reconnected`].
//! * Pushed events arrive on a bounded `tokio::sync::mpsc` receiver of
//!   [`ClientConfig::events_queue_max`]; a full receiver stops the client
//!   from reading the socket. If it stays full, answers stop too: calls time
//!   out, an unanswered ping breaks the link (or the server closes a gateway
//!   that does not read its events), events queued meanwhile are lost, and
//!   after the reconnect the receiver gets [`PresenceEvent::Reconnected`].

use crate::server::RESPONSE_BODY_BYTES_MAX;
use bytes::BytesMut;
use daemon::secure::{LinkReader, LinkWriter};
use proto::{
    frame::{self, Decoded, FRAME_BODY_BYTES_MAX_DEFAULT},
    presence::{
        Entry, Event, GatewayInfo, PresenceError, PresenceStats, Request, RequestBody,
        ResponseBody, ServerFrame, SessionInfo, Status, BATCH_USERS_MAX,
    },
};
use std::{
    collections::{HashMap, HashSet},
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex, MutexGuard, Weak,
    },
    time::{Duration, SystemTime},
};
use tokio::{
    io::AsyncReadExt,
    sync::{mpsc, oneshot, Notify, Semaphore},
    task::AbortHandle,
};

/// Why a call failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The server answered with a typed error (table full, ...).
    #[error("presence error {:?}: {}", .0.code, .0.message)]
    Presence(PresenceError),
    #[error("I/O error: {0}")]
    Io(#[from] std::io::Error),
    /// A bad frame, an oversized request, or an answer of the wrong kind.
    #[error("protocol error: {0}")]
    Protocol(String),
    /// The link is down or broke while the request was in flight. A
    /// gateway call's change is kept and sent with the next sync.
    #[error("disconnected from the presence server")]
    Disconnected,
    #[error("no answer within the request timeout")]
    Timeout,
}

/// Settings of a [`PresenceClient`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientConfig {
    /// Where other gateways reach this one (told to the server).
    pub peer_addr: String,
    /// Most unanswered requests; further calls wait.
    pub inflight_requests_max: usize,
    /// Capacity of the event receiver.
    pub events_queue_max: usize,
    /// A call fails with [`ClientError::Timeout`] after this long.
    pub request_timeout_ms: u64,
    /// First reconnect delay; doubled per failed attempt ...
    pub backoff_min_ms: u64,
    /// ... up to this.
    pub backoff_max_ms: u64,
    /// Users per request; longer lists are split (the server's limit).
    pub batch_users_max: usize,
    /// Largest request frame body (the server's `frame_body_bytes_max`).
    pub request_body_bytes_max: usize,
}

impl Default for ClientConfig {
    fn default() -> Self {
        Self {
            peer_addr: String::new(),
            inflight_requests_max: 4096,
            events_queue_max: 65_536,
            request_timeout_ms: 30_000,
            backoff_min_ms: 50,
            backoff_max_ms: 5_000,
            batch_users_max: BATCH_USERS_MAX,
            request_body_bytes_max: FRAME_BODY_BYTES_MAX_DEFAULT,
        }
    }
}

/// What the server pushes, plus the client's own reconnect notice.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PresenceEvent {
    /// A watched user changed (`entry: None`: went offline); `sessions` are
    /// this gateway's sessions watching it.
    StatusChanged {
        user: u64,
        entry: Option<Entry>,
        sessions: Vec<u64>,
    },
    /// This gateway's `session` of `user` was replaced by a login elsewhere:
    /// close it. (The client already dropped it from its tracked sessions.)
    Kicked { user: u64, session: u64 },
    /// The link broke and is back, synced again; events may have been
    /// missed meanwhile.
    Reconnected,
}

type Waiter = oneshot::Sender<ResponseBody>;

/// One TCP connection: the bytes waiting for its writer task and the
/// requests waiting for answers.
struct Link {
    /// `None` once the link broke.
    pipe: Mutex<Option<Pipe>>,
    /// `pipe.out` has bytes for the writer.
    ready: Notify,
    dead: Notify,
    tasks: Mutex<Vec<AbortHandle>>,
}

#[derive(Default)]
struct Pipe {
    /// Encoded request frames not written yet.
    out: Vec<u8>,
    waiters: HashMap<u64, Waiter>,
}

impl Link {
    fn pipe(&self) -> MutexGuard<'_, Option<Pipe>> {
        self.pipe.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Encode one request into the writer's buffer and register its waiter;
    /// returns the request's id.
    fn send(&self, shared: &Shared, body: RequestBody, waiter: Waiter) -> Result<u64, ClientError> {
        let id = shared.next_id.fetch_add(1, Ordering::Relaxed);
        let max = shared.config.request_body_bytes_max;
        let mut pipe = self.pipe();
        let p = pipe.as_mut().ok_or(ClientError::Disconnected)?;
        frame::encode(&Request { id, body }, max, &mut p.out)
            .map_err(|e| ClientError::Protocol(format!("request cannot be sent: {e}")))?;
        p.waiters.insert(id, waiter);
        drop(pipe);
        self.ready.notify_one();
        Ok(id)
    }

    /// The link broke: fail every waiter (dropping its sender), stop the
    /// tasks, wake the supervisor.
    fn fail(&self) {
        let pipe = self.pipe().take();
        drop(pipe);
        for task in self
            .tasks
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .drain(..)
        {
            task.abort();
        }
        self.dead.notify_one();
    }
}

/// A request sent and not answered yet.
struct Pending<'a> {
    shared: &'a Shared,
    link: Arc<Link>,
    id: u64,
    rx: oneshot::Receiver<ResponseBody>,
    _permit: tokio::sync::SemaphorePermit<'a>,
}

impl Pending<'_> {
    /// The answer; an `Error` answer becomes [`ClientError::Presence`].
    async fn answer(self) -> Result<ResponseBody, ClientError> {
        match tokio::time::timeout(self.shared.timeout(), self.rx).await {
            Ok(Ok(ResponseBody::Error(e))) => Err(ClientError::Presence(e)),
            Ok(Ok(body)) => Ok(body),
            Ok(Err(_)) => Err(ClientError::Disconnected),
            Err(_) => {
                if let Some(p) = self.link.pipe().as_mut() {
                    p.waiters.remove(&self.id);
                }
                Err(ClientError::Timeout)
            }
        }
    }
}

/// The gateway's sessions and watches as the client tracks them.
#[derive(Default)]
struct Tracked {
    sessions: HashMap<u64, SessionInfo>,
    watches: HashMap<u64, HashSet<u64>>,
}

impl Tracked {
    fn end_session(&mut self, user: u64, session: u64) {
        if self
            .sessions
            .get(&user)
            .is_some_and(|s| s.session == session)
        {
            self.sessions.remove(&user);
        }
        self.watches.remove(&session);
    }
}

struct Inner {
    tracked: Tracked,
    link: Option<Arc<Link>>,
}

struct Shared {
    inner: Mutex<Inner>,
    next_id: AtomicU64,
    slots: Semaphore,
    gateway: u32,
    addr: String,
    config: ClientConfig,
    events: mpsc::Sender<PresenceEvent>,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn timeout(&self) -> Duration {
        Duration::from_millis(self.config.request_timeout_ms)
    }
}

/// Stops the supervisor and the link when the last client handle goes.
struct Guard {
    shared: Arc<Shared>,
    supervisor: AbortHandle,
}

impl Drop for Guard {
    fn drop(&mut self) {
        self.supervisor.abort();
        if let Some(link) = self.shared.lock().link.take() {
            link.fail();
        }
    }
}

/// A gateway's connection to the presence server. Clones share it.
#[derive(Clone)]
pub struct PresenceClient {
    shared: Arc<Shared>,
    _guard: Arc<Guard>,
}

impl PresenceClient {
    /// Connect, register as gateway `gateway`, and keep the link up. The
    /// first connection must succeed; later breaks are repaired in the
    /// background. Returns the client and the receiver of pushed events.
    pub async fn connect(
        addr: impl Into<String>,
        gateway: u32,
        config: ClientConfig,
    ) -> Result<(PresenceClient, mpsc::Receiver<PresenceEvent>), ClientError> {
        Self::open(addr.into(), gateway, config, true).await
    }

    /// Like [`PresenceClient::connect`], but a first connection that fails
    /// is retried in the background like any later break (a replica that
    /// is down when the gateway starts); calls fail with
    /// [`ClientError::Disconnected`] until it is up, their changes kept for
    /// the sync.
    pub async fn start(
        addr: impl Into<String>,
        gateway: u32,
        config: ClientConfig,
    ) -> Result<(PresenceClient, mpsc::Receiver<PresenceEvent>), ClientError> {
        Self::open(addr.into(), gateway, config, false).await
    }

    async fn open(
        addr: String,
        gateway: u32,
        config: ClientConfig,
        must_connect: bool,
    ) -> Result<(PresenceClient, mpsc::Receiver<PresenceEvent>), ClientError> {
        if config.inflight_requests_max == 0
            || config.events_queue_max == 0
            || config.batch_users_max == 0
        {
            return Err(ClientError::Protocol(
                "inflight_requests_max, events_queue_max and batch_users_max must be at least 1"
                    .into(),
            ));
        }
        let (events, events_rx) = mpsc::channel(config.events_queue_max);
        let shared = Arc::new(Shared {
            inner: Mutex::new(Inner {
                tracked: Tracked::default(),
                link: None,
            }),
            next_id: AtomicU64::new(1),
            slots: Semaphore::new(config.inflight_requests_max),
            gateway,
            addr,
            config,
            events,
        });
        let lease = match establish(&shared).await {
            Ok(lease) => lease,
            Err(e) if must_connect => return Err(e),
            Err(e) => {
                tracing::warn!(addr = %shared.addr, error = %e, "presence replica unreachable; retrying in the background");
                Duration::from_millis(shared.config.backoff_max_ms)
            }
        };
        let supervisor = tokio::spawn(supervise(Arc::downgrade(&shared), lease)).abort_handle();
        let guard = Arc::new(Guard {
            shared: shared.clone(),
            supervisor,
        });
        Ok((
            PresenceClient {
                shared,
                _guard: guard,
            },
            events_rx,
        ))
    }

    /// Update the tracked copy with `track` and send `body`; the answer is
    /// awaited with [`Pending::answer`]. Waits only for an in-flight slot.
    async fn begin(
        &self,
        body: RequestBody,
        track: impl FnOnce(&mut Tracked),
    ) -> Result<Pending<'_>, ClientError> {
        let shared = &self.shared;
        let permit = shared
            .slots
            .acquire()
            .await
            .map_err(|_| ClientError::Disconnected)?;
        let (tx, rx) = oneshot::channel();
        let mut inner = shared.lock();
        track(&mut inner.tracked);
        let link = inner.link.clone().ok_or(ClientError::Disconnected)?;
        let id = link.send(shared, body, tx)?;
        Ok(Pending {
            shared,
            link,
            id,
            rx,
            _permit: permit,
        })
    }

    /// [`PresenceClient::begin`] and wait for the answer.
    async fn call(
        &self,
        body: RequestBody,
        track: impl FnOnce(&mut Tracked),
    ) -> Result<ResponseBody, ClientError> {
        self.begin(body, track).await?.answer().await
    }

    /// Send one request per chunk of `users` (pipelined) and join the
    /// answers' entries in order.
    async fn entries_in_chunks(
        &self,
        users: &[u64],
        body: impl Fn(Vec<u64>) -> RequestBody,
        track: impl Fn(&mut Tracked, &[u64]),
    ) -> Result<Vec<Option<Entry>>, ClientError> {
        let mut pending = Vec::new();
        for chunk in users.chunks(self.shared.config.batch_users_max) {
            pending.push(
                self.begin(body(chunk.to_vec()), |t| track(t, chunk))
                    .await?,
            );
        }
        let mut entries = Vec::with_capacity(users.len());
        for p in pending {
            match p.answer().await? {
                ResponseBody::Entries { entries: part } => entries.extend(part),
                other => return Err(unexpected("Entries", &other)),
            }
        }
        Ok(entries)
    }

    /// `user` is online on this gateway in `session` (a login, or a status
    /// change). Returns the session it replaced, whose gateway was told.
    pub async fn online(
        &self,
        user: u64,
        session: u64,
        status: Status,
    ) -> Result<Option<Entry>, ClientError> {
        let since_s = now_s();
        let body = RequestBody::Online {
            user,
            session,
            status,
        };
        let mut new = false;
        let track = |t: &mut Tracked| {
            let since_s = match t.sessions.get(&user) {
                Some(s) if s.session == session => s.since_s,
                _ => {
                    new = true;
                    since_s
                }
            };
            let info = SessionInfo {
                user,
                session,
                since_s,
                status,
            };
            if let Some(old) = t.sessions.insert(user, info) {
                if old.session != session {
                    t.watches.remove(&old.session);
                }
            }
        };
        let answer = self.call(body, track).await;
        if new && matches!(answer, Err(ClientError::Presence(_))) {
            // Refused (the table is full): the server does not hold it.
            self.shared.lock().tracked.end_session(user, session);
        }
        match answer? {
            ResponseBody::Online { replaced } => Ok(replaced),
            other => Err(unexpected("Online", &other)),
        }
    }

    /// `user`'s `session` ended; true if it was the user's current one. The
    /// session's watches end too.
    pub async fn offline(&self, user: u64, session: u64) -> Result<bool, ClientError> {
        let body = RequestBody::Offline { user, session };
        match self.call(body, |t| t.end_session(user, session)).await? {
            ResponseBody::Offline { removed } => Ok(removed),
            other => Err(unexpected("Offline", &other)),
        }
    }

    /// Where each user is online, in order.
    pub async fn lookup(&self, users: &[u64]) -> Result<Vec<Option<Entry>>, ClientError> {
        self.entries_in_chunks(users, |users| RequestBody::Lookup { users }, |_, _| {})
            .await
    }

    /// `session` watches `users` from now on; returns their current entries.
    /// Refused by a watch limit ([`ClientError::Presence`]), the client
    /// forgets the watches this call added (when `users` spans several
    /// requests, the server may still hold those of the earlier ones until
    /// the next sync).
    pub async fn watch(
        &self,
        session: u64,
        users: &[u64],
    ) -> Result<Vec<Option<Entry>>, ClientError> {
        let before = self.shared.lock().tracked.watches.get(&session).cloned();
        let answer = self
            .entries_in_chunks(
                users,
                |users| RequestBody::Watch { session, users },
                |t, chunk| t.watches.entry(session).or_default().extend(chunk),
            )
            .await;
        if matches!(answer, Err(ClientError::Presence(_))) {
            // Refused (a watch limit): forget what this call added.
            let mut inner = self.shared.lock();
            match before {
                Some(before) => inner.tracked.watches.insert(session, before),
                None => inner.tracked.watches.remove(&session),
            };
        }
        answer
    }

    /// `session` stops watching `users`; how many it watched.
    pub async fn unwatch(&self, session: u64, users: &[u64]) -> Result<u32, ClientError> {
        let mut removed = 0;
        for chunk in users.chunks(self.shared.config.batch_users_max) {
            let track = |t: &mut Tracked| {
                if let Some(w) = t.watches.get_mut(&session) {
                    w.retain(|u| !chunk.contains(u));
                }
            };
            let body = RequestBody::Unwatch {
                session,
                users: chunk.to_vec(),
            };
            match self.call(body, track).await? {
                ResponseBody::Unwatched { removed: n } => removed += n,
                other => return Err(unexpected("Unwatched", &other)),
            }
        }
        Ok(removed)
    }

    /// Replace the tracked session list with `sessions` (the gateway's
    /// complete list) and send it to the server; sessions not in it go
    /// offline there, and their tracked watches are dropped. Returns how
    /// many the server accepted (others were kicked: see the events).
    pub async fn resync(&self, sessions: Vec<SessionInfo>) -> Result<u32, ClientError> {
        let (link, answers) = {
            let mut inner = self.shared.lock();
            inner.tracked.sessions = sessions.iter().map(|s| (s.user, *s)).collect();
            let live: HashSet<u64> = sessions.iter().map(|s| s.session).collect();
            inner.tracked.watches.retain(|s, _| live.contains(s));
            let link = inner.link.clone().ok_or(ClientError::Disconnected)?;
            let answers = queue_sync(&self.shared, &link, &inner.tracked, false)?;
            (link, answers)
        };
        let answers = wait_all(&self.shared, &link, answers).await?;
        let mut accepted = 0;
        for answer in answers {
            match answer {
                ResponseBody::Synced { accepted: n, .. } => accepted += n,
                ResponseBody::Error(e) => return Err(ClientError::Presence(e)),
                _ => {}
            }
        }
        Ok(accepted)
    }

    pub async fn stats(&self) -> Result<PresenceStats, ClientError> {
        match self.call(RequestBody::Stats, |_| {}).await? {
            ResponseBody::Stats(stats) => Ok(stats),
            other => Err(unexpected("Stats", &other)),
        }
    }

    pub async fn gateways(&self) -> Result<Vec<GatewayInfo>, ClientError> {
        match self.call(RequestBody::Gateways, |_| {}).await? {
            ResponseBody::Gateways { gateways } => Ok(gateways),
            other => Err(unexpected("Gateways", &other)),
        }
    }

    /// Every watched user with the gateway's sessions watching it.
    pub fn watchers(&self) -> HashMap<u64, Vec<u64>> {
        let inner = self.shared.lock();
        let mut by_user: HashMap<u64, Vec<u64>> = HashMap::new();
        for (&session, users) in &inner.tracked.watches {
            for &user in users {
                by_user.entry(user).or_default().push(session);
            }
        }
        by_user
    }

    /// Whether the link is up (registered and synced).
    pub fn is_connected(&self) -> bool {
        self.shared.lock().link.is_some()
    }

    /// The server's address.
    pub fn addr(&self) -> &str {
        &self.shared.addr
    }

    /// The sessions the client tracks (what the next sync sends).
    pub fn tracked_sessions(&self) -> Vec<SessionInfo> {
        self.shared
            .lock()
            .tracked
            .sessions
            .values()
            .copied()
            .collect()
    }
}

fn now_s() -> u32 {
    let secs = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    u32::try_from(secs).unwrap_or(u32::MAX)
}

fn unexpected(wanted: &str, got: &ResponseBody) -> ClientError {
    let kind = format!("{got:?}");
    let kind = kind.split([' ', '(', '{']).next().unwrap_or("?");
    ClientError::Protocol(format!("expected a {wanted} answer, got {kind}"))
}

/// Queue the complete tracked state on `link`: (optionally `Register`),
/// `SyncBegin`, `SyncSessions`..., `SyncEnd`, each session's `Watch`es.
/// Returns the answers' receivers, in order.
fn queue_sync(
    shared: &Shared,
    link: &Link,
    tracked: &Tracked,
    register: bool,
) -> Result<Vec<oneshot::Receiver<ResponseBody>>, ClientError> {
    let batch = shared.config.batch_users_max;
    let mut bodies = Vec::new();
    if register {
        bodies.push(RequestBody::Register {
            gateway: shared.gateway,
            peer_addr: shared.config.peer_addr.clone(),
        });
    }
    bodies.push(RequestBody::SyncBegin);
    let sessions: Vec<SessionInfo> = tracked.sessions.values().copied().collect();
    for chunk in sessions.chunks(batch) {
        bodies.push(RequestBody::SyncSessions {
            sessions: chunk.to_vec(),
        });
    }
    bodies.push(RequestBody::SyncEnd);
    for (&session, users) in &tracked.watches {
        let users: Vec<u64> = users.iter().copied().collect();
        for chunk in users.chunks(batch) {
            bodies.push(RequestBody::Watch {
                session,
                users: chunk.to_vec(),
            });
        }
    }
    let mut answers = Vec::with_capacity(bodies.len());
    for body in bodies {
        let (tx, rx) = oneshot::channel();
        link.send(shared, body, tx)?;
        answers.push(rx);
    }
    Ok(answers)
}

async fn wait_all(
    shared: &Shared,
    link: &Link,
    answers: Vec<oneshot::Receiver<ResponseBody>>,
) -> Result<Vec<ResponseBody>, ClientError> {
    let mut out = Vec::with_capacity(answers.len());
    for rx in answers {
        match tokio::time::timeout(shared.timeout(), rx).await {
            Ok(Ok(body)) => out.push(body),
            Ok(Err(_)) => return Err(ClientError::Disconnected),
            Err(_) => {
                link.fail();
                return Err(ClientError::Timeout);
            }
        }
    }
    Ok(out)
}

/// Connect, register, send the tracked state, publish the link. Returns
/// the server's lease.
async fn establish(shared: &Arc<Shared>) -> Result<Duration, ClientError> {
    let (rd, wr) = daemon::secure::connect(shared.addr.as_str())
        .await?
        .into_split();
    let link = Arc::new(Link {
        pipe: Mutex::new(Some(Pipe::default())),
        ready: Notify::new(),
        dead: Notify::new(),
        tasks: Mutex::new(Vec::new()),
    });
    let writer = tokio::spawn(write_frames(wr, link.clone()));
    let reader = tokio::spawn(read_frames(rd, link.clone(), Arc::downgrade(shared)));
    link.tasks
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .extend([writer.abort_handle(), reader.abort_handle()]);
    let answers = {
        let mut inner = shared.lock();
        let answers = queue_sync(shared, &link, &inner.tracked, true);
        if answers.is_ok() {
            inner.link = Some(link.clone());
        }
        answers
    };
    let answers = match answers {
        Ok(a) => wait_all(shared, &link, a).await,
        Err(e) => Err(e),
    };
    let answers = answers.inspect_err(|_| link.fail())?;
    let lease = match answers.first() {
        Some(ResponseBody::Registered { lease_ms, .. }) => {
            Duration::from_millis((*lease_ms).into())
        }
        Some(ResponseBody::Error(e)) => {
            link.fail();
            return Err(ClientError::Presence(e.clone()));
        }
        other => {
            link.fail();
            return Err(ClientError::Protocol(format!(
                "unexpected answer to Register: {other:?}"
            )));
        }
    };
    for answer in &answers[1..] {
        if let ResponseBody::Error(e) = answer {
            tracing::warn!(code = ?e.code, message = %e.message, "the server refused part of the sync");
        }
    }
    Ok(lease)
}

/// Keep the link up: ping every third of the lease; on a break, back off,
/// reconnect and sync again.
async fn supervise(shared: Weak<Shared>, mut lease: Duration) {
    loop {
        let Some(s) = shared.upgrade() else { return };
        let link = s.lock().link.clone();
        if let Some(link) = link {
            keep_alive(&s, &link, lease).await;
            link.fail();
            let mut inner = s.lock();
            if inner.link.as_ref().is_some_and(|l| Arc::ptr_eq(l, &link)) {
                inner.link = None;
            }
        }
        let mut backoff = Duration::from_millis(s.config.backoff_min_ms);
        let max = Duration::from_millis(s.config.backoff_max_ms);
        loop {
            tokio::time::sleep(backoff).await;
            match establish(&s).await {
                Ok(new_lease) => {
                    lease = new_lease;
                    tracing::info!(gateway = s.gateway, "reconnected to presence and synced");
                    let _ = s.events.send(PresenceEvent::Reconnected).await;
                    break;
                }
                Err(e) => {
                    tracing::warn!(error = %e, ?backoff, "presence reconnect failed");
                    backoff = (backoff * 2).min(max);
                }
            }
        }
    }
}

/// Return once the link is dead or a ping went unanswered for a lease.
async fn keep_alive(shared: &Shared, link: &Link, lease: Duration) {
    let interval = lease / 3;
    loop {
        tokio::select! {
            _ = link.dead.notified() => return,
            _ = tokio::time::sleep(interval) => {}
        }
        let (tx, rx) = oneshot::channel();
        if link.send(shared, RequestBody::Ping, tx).is_err() {
            return;
        }
        match tokio::time::timeout(lease, rx).await {
            Ok(Ok(_)) => {}
            _ => return,
        }
    }
}

/// Write whatever the callers encoded, one write per wake-up, until the
/// link breaks.
async fn write_frames(mut wr: LinkWriter, link: Arc<Link>) {
    let mut out = Vec::new();
    loop {
        link.ready.notified().await;
        match link.pipe().as_mut() {
            Some(p) => std::mem::swap(&mut out, &mut p.out),
            None => break,
        }
        if out.is_empty() {
            continue;
        }
        if let Err(e) = wr.send(&out).await {
            tracing::debug!(error = %e, "presence client write failed");
            break;
        }
        out.clear();
    }
    link.fail();
}

/// Route answers to their callers and events to the receiver until the
/// link ends.
async fn read_frames(mut rd: LinkReader, link: Arc<Link>, shared: Weak<Shared>) {
    let mut buf = BytesMut::with_capacity(64 * 1024);
    'link: loop {
        loop {
            match frame::decode::<ServerFrame>(&mut buf, RESPONSE_BODY_BYTES_MAX) {
                Ok(Decoded::Frame(ServerFrame::Response(r))) => {
                    let waiter = link.pipe().as_mut().and_then(|p| p.waiters.remove(&r.id));
                    if let Some(tx) = waiter {
                        let _ = tx.send(r.body);
                    }
                }
                Ok(Decoded::Frame(ServerFrame::Event(event))) => {
                    let Some(shared) = shared.upgrade() else {
                        break 'link;
                    };
                    let event = match event {
                        Event::Kicked { user, session } => {
                            shared.lock().tracked.end_session(user, session);
                            PresenceEvent::Kicked { user, session }
                        }
                        Event::StatusChanged {
                            user,
                            entry,
                            sessions,
                        } => PresenceEvent::StatusChanged {
                            user,
                            entry,
                            sessions,
                        },
                    };
                    let _ = shared.events.send(event).await;
                }
                Ok(Decoded::Incomplete) => break,
                Err(e) => {
                    tracing::warn!(error = %e, "bad frame from presence; dropping the link");
                    break 'link;
                }
            }
        }
        match rd.read_buf(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(_) => {}
        }
    }
    link.fail();
}

/// One request on a fresh, unregistered connection (operator tools:
/// `Lookup`, `Gateways`, `Stats`, `Ping`); its answer.
pub async fn request_once(addr: &str, body: RequestBody) -> Result<ResponseBody, ClientError> {
    let (mut rd, mut wr) = daemon::secure::connect(addr).await?.into_split();
    let mut out = Vec::new();
    frame::encode(
        &Request { id: 1, body },
        FRAME_BODY_BYTES_MAX_DEFAULT,
        &mut out,
    )
    .map_err(|e| ClientError::Protocol(e.to_string()))?;
    wr.send(&out).await?;
    let mut buf = BytesMut::with_capacity(64 * 1024);
    loop {
        match frame::decode::<ServerFrame>(&mut buf, RESPONSE_BODY_BYTES_MAX) {
            Ok(Decoded::Frame(ServerFrame::Response(r))) => {
                return match r.body {
                    ResponseBody::Error(e) => Err(ClientError::Presence(e)),
                    body => Ok(body),
                }
            }
            Ok(Decoded::Frame(ServerFrame::Event(_))) => continue,
            Ok(Decoded::Incomplete) => {}
            Err(e) => return Err(ClientError::Protocol(e.to_string())),
        }
        if rd.read_buf(&mut buf).await? == 0 {
            return Err(ClientError::Disconnected);
        }
    }
}
