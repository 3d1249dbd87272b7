//! TCP server of the presence protocol ([`proto::presence`]): one thread
//! owns the [`State`] and every connection, like Redis's event loop.
//!
//! Each connection's reader decodes the frames a socket read brought,
//! answers each at once into the connection's outbox and routes the events
//! the answer produced into the outboxes of the watching gateways; the
//! connection's writer sends its outbox with one write per wake-up.
//!
//! Limits and what happens at each:
//! * a frame body over [`ServerConfig::frame_body_bytes_max`], or bytes that
//!   are not a valid request: the connection is closed (logged, counted in
//!   `presence_bad_frames_total`);
//! * [`ServerConfig::outbox_bytes_max`]: a connection whose unsent answers
//!   reach half of it is not read until they drain (back-pressure); an event
//!   that would push it past the limit closes the connection (a gateway that
//!   does not read its events; `presence_slow_consumers_total`): the gateway
//!   reconnects and syncs again;
//! * [`ServerConfig::lease_ms`]: a connection that sends nothing for that
//!   long is closed; a gateway's users go offline [`ServerConfig::grace_ms`]
//!   after its connection ended unless it registers again;
//! * [`ServerConfig::connections_max`]: further connections are accepted and
//!   closed at once (`presence_connections_rejected_total`);
//! * the state's [`crate::Limits`] answer typed errors.
//!
//! Removing every slot of one gateway (grace ran out, or `SyncEnd`) scans
//! the table one of its 256 shards at a time and yields between shards, so
//! other connections are served during the scan (see ARCHITECTURE.md).

use crate::{
    state::{GatewayIndex, Limits, State},
    table::SHARDS,
};
use bytes::BytesMut;
use daemon::secure::{GateLimits, Link, LinkWriter, SecureListener};
use proto::{
    frame::{self, Decoded, FRAME_BODY_BYTES_MAX_DEFAULT},
    presence::{
        ErrorCode, PresenceError, Request, RequestBody, Response, ResponseBody, ServerFrame,
    },
};
use serde::{Deserialize, Serialize};
use std::{
    cell::{Cell, RefCell},
    collections::HashMap,
    net::SocketAddr,
    rc::Rc,
    time::{Duration, Instant, SystemTime},
};
use tokio::{
    io::AsyncReadExt,
    net::TcpListener,
    sync::{watch, Notify},
};

/// Largest frame body the server sends: a lookup answer of
/// `BATCH_USERS_MAX` entries of at most 22 bytes each fits easily.
pub const RESPONSE_BODY_BYTES_MAX: usize = 2 * FRAME_BODY_BYTES_MAX_DEFAULT;

/// Bytes requested from the socket per read when the buffer is empty.
const READ_CHUNK_BYTES: usize = 64 * 1024;

/// Limits of the TCP server; the `[server]` table of the daemon's config.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ServerConfig {
    /// Largest request frame body; a bigger (or malformed) frame closes the
    /// connection.
    pub frame_body_bytes_max: usize,
    /// Most unsent bytes of one connection (see the module docs).
    pub outbox_bytes_max: usize,
    /// Most open connections.
    pub connections_max: usize,
    /// A connection that sends nothing for this long is closed.
    pub lease_ms: u32,
    /// After a gateway's connection ended, how long its users stay online
    /// waiting for it to register again.
    pub grace_ms: u32,
    /// On shutdown, how long connections get to send what they have.
    pub shutdown_drain_ms: u64,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            frame_body_bytes_max: FRAME_BODY_BYTES_MAX_DEFAULT,
            outbox_bytes_max: 8 * 1024 * 1024,
            connections_max: 4096,
            lease_ms: 10_000,
            grace_ms: 10_000,
            shutdown_drain_ms: 5_000,
        }
    }
}

impl ServerConfig {
    /// Check ranges; returns a message naming the bad field.
    pub fn validate(&self) -> Result<(), String> {
        let range = |name: &str, v: u64, lo: u64, hi: u64| {
            if v < lo || v > hi {
                Err(format!("server.{name} = {v} is outside {lo}..={hi}"))
            } else {
                Ok(())
            }
        };
        range(
            "frame_body_bytes_max",
            self.frame_body_bytes_max as u64,
            1024,
            u64::from(u32::MAX),
        )?;
        range(
            "outbox_bytes_max",
            self.outbox_bytes_max as u64,
            2 * RESPONSE_BODY_BYTES_MAX as u64,
            1 << 34,
        )?;
        range("connections_max", self.connections_max as u64, 1, 1 << 20)?;
        range("lease_ms", self.lease_ms.into(), 100, 3_600_000)?;
        range("grace_ms", self.grace_ms.into(), 0, 3_600_000)?;
        range("shutdown_drain_ms", self.shutdown_drain_ms, 0, 3_600_000)
    }

    fn lease(&self) -> Duration {
        Duration::from_millis(self.lease_ms.into())
    }
}

/// Serve `listener` until `shutdown` becomes true (or its sender is gone);
/// then stop accepting and reading, send what is buffered, return. Must run
/// inside a [`tokio::task::LocalSet`].
pub(crate) async fn run(
    listener: TcpListener,
    config: ServerConfig,
    limits: Limits,
    mut shutdown: watch::Receiver<bool>,
) {
    let grace = Duration::from_millis(config.grace_ms.into());
    let core = Rc::new(Core {
        state: RefCell::new(State::new(limits, grace)),
        config,
        conns: RefCell::new(HashMap::new()),
        next_conn: Cell::new(1),
        stopping: Cell::new(false),
        stop_reading: Notify::new(),
        connection_closed: Notify::new(),
        deadline_changed: Notify::new(),
    });
    let expirer = tokio::task::spawn_local(expire_loop(core.clone()));
    let gauges = tokio::task::spawn_local(gauge_loop(core.clone()));
    let mut acceptor = SecureListener::new(listener, "presence", GateLimits::default());
    loop {
        tokio::select! {
            link = acceptor.accept() => admit(&core, link),
            _ = shutdown.wait_for(|stop| *stop) => break,
        }
    }
    drop(acceptor);
    core.stopping.set(true);
    core.stop_reading.notify_waiters();
    let drain = Duration::from_millis(core.config.shutdown_drain_ms);
    let drained = tokio::time::timeout(drain, async {
        while !core.conns.borrow().is_empty() {
            core.connection_closed.notified().await;
        }
    })
    .await;
    if drained.is_err() {
        tracing::warn!("connections did not drain in time; closing them");
    }
    expirer.abort();
    gauges.abort();
}

struct Core {
    state: RefCell<State>,
    config: ServerConfig,
    conns: RefCell<HashMap<u64, Rc<Conn>>>,
    next_conn: Cell<u64>,
    stopping: Cell<bool>,
    stop_reading: Notify,
    connection_closed: Notify,
    /// A gateway's grace period started: the expiry timer re-reads it.
    deadline_changed: Notify,
}

/// One connection: its outbox, and which gateway it is.
#[derive(Default)]
struct Conn {
    id: u64,
    gateway: Cell<Option<GatewayIndex>>,
    /// Encoded frames not written yet.
    outbox: RefCell<Vec<u8>>,
    ready: Notify,
    drained: Notify,
    /// Close it now (taken over, slow consumer).
    kill: Notify,
    killed: Cell<bool>,
}

impl Conn {
    fn push(&self, frame: &ServerFrame) {
        let mut out = self.outbox.borrow_mut();
        if let Err(e) = frame::encode(frame, RESPONSE_BODY_BYTES_MAX, &mut out) {
            // Only a lookup answer can be large, and BATCH_USERS_MAX keeps
            // it far below the limit.
            tracing::error!(error = %e, "frame cannot be encoded; dropped");
        }
        drop(out);
        self.ready.notify_one();
    }

    fn close(&self) {
        self.killed.set(true);
        // Both the reader and the writer may wait on it; each checks
        // `killed` before it waits.
        self.kill.notify_waiters();
    }
}

impl Core {
    /// Put the events the state produced into their gateways' outboxes.
    fn route_events(&self) {
        let events = self.state.borrow_mut().take_events();
        if events.is_empty() {
            return;
        }
        let conns = self.conns.borrow();
        let state = self.state.borrow();
        for out in events {
            let conn = state.connection_of(out.gateway).and_then(|c| conns.get(&c));
            let Some(conn) = conn.filter(|c| !c.killed.get()) else {
                metrics::counter!("presence_events_dropped_total").increment(1);
                continue;
            };
            conn.push(&ServerFrame::Event(out.event));
            if conn.outbox.borrow().len() > self.config.outbox_bytes_max {
                metrics::counter!("presence_slow_consumers_total").increment(1);
                tracing::warn!(conn = conn.id, "gateway does not read its events; closing");
                conn.close();
            }
        }
    }

    /// Remove every slot of `gateway` that `keep_mark` selects (see
    /// [`State::remove_gateway_slots`]), one shard at a time, yielding in
    /// between so other connections are served.
    async fn remove_gateway_slots(&self, gateway: GatewayIndex, keep_mark: Option<bool>) -> u64 {
        let mut removed = 0;
        for shard in 0..SHARDS {
            removed += self
                .state
                .borrow_mut()
                .remove_gateway_slots(gateway, shard, keep_mark);
            self.route_events();
            tokio::task::yield_now().await;
        }
        removed
    }
}

/// Expire gateways whose grace ran out.
async fn expire_loop(core: Rc<Core>) {
    loop {
        let next = core.state.borrow().next_deadline();
        match next {
            Some(at) => {
                tokio::select! {
                    _ = tokio::time::sleep_until(at.into()) => {}
                    _ = core.deadline_changed.notified() => continue,
                }
            }
            None => {
                core.deadline_changed.notified().await;
                continue;
            }
        }
        let due = core.state.borrow_mut().start_expiries(Instant::now());
        for gateway in due {
            let removed = core.remove_gateway_slots(gateway, None).await;
            core.state.borrow_mut().finish_expiry(gateway);
            core.route_events();
            metrics::counter!("presence_expired_users_total").increment(removed);
            tracing::info!(
                gateway,
                removed,
                "gateway grace period ran out; its users are offline"
            );
            set_gauges(&core);
        }
    }
}

/// How often the gauges are refreshed.
const GAUGE_INTERVAL: Duration = Duration::from_secs(1);

async fn gauge_loop(core: Rc<Core>) {
    loop {
        set_gauges(&core);
        tokio::time::sleep(GAUGE_INTERVAL).await;
    }
}

fn set_gauges(core: &Core) {
    let stats = core.state.borrow().stats();
    metrics::gauge!("presence_users_online").set(stats.users_online as f64);
    metrics::gauge!("presence_gateways_connected").set(stats.gateways_connected as f64);
    metrics::gauge!("presence_table_bytes").set(stats.table_bytes as f64);
}

fn admit(core: &Rc<Core>, link: Link) {
    let peer = link.peer;
    if core.conns.borrow().len() >= core.config.connections_max || core.stopping.get() {
        metrics::counter!("presence_connections_rejected_total").increment(1);
        tracing::warn!(%peer, max = core.config.connections_max, "connection limit reached; closing");
        return;
    }
    let id = core.next_conn.get();
    core.next_conn.set(id + 1);
    let conn = Rc::new(Conn {
        id,
        ..Conn::default()
    });
    core.conns.borrow_mut().insert(id, conn.clone());
    metrics::gauge!("presence_connections").increment(1.0);
    let core = core.clone();
    tokio::task::spawn_local(async move {
        serve(&core, link, &conn, peer).await;
        core.conns.borrow_mut().remove(&id);
        if let Some(gateway) = conn.gateway.get() {
            core.state
                .borrow_mut()
                .disconnected(gateway, id, Instant::now());
            core.deadline_changed.notify_one();
            tracing::info!(%peer, gateway, "gateway connection ended; grace period started");
        }
        metrics::gauge!("presence_connections").decrement(1.0);
        core.connection_closed.notify_waiters();
    });
}

/// "bad frame" warnings (one per connection closed for one): at most one
/// per interval, with how many were held back (`presence_bad_frames_total`
/// counts them all).
static BAD_FRAME_WARNINGS: daemon::SharedLogLimiter =
    daemon::SharedLogLimiter::new(daemon::accept::WARN_INTERVAL);

async fn serve(core: &Rc<Core>, link: Link, conn: &Rc<Conn>, peer: SocketAddr) {
    let (mut rd, wr) = link.into_split();
    let writer = tokio::task::spawn_local(write_frames(wr, conn.clone()));
    let mut buf = BytesMut::with_capacity(READ_CHUNK_BYTES);
    let pause_bytes = core.config.outbox_bytes_max / 2;
    'conn: loop {
        loop {
            if conn.outbox.borrow().len() >= pause_bytes || conn.killed.get() {
                break;
            }
            match frame::decode::<Request>(&mut buf, core.config.frame_body_bytes_max) {
                Ok(Decoded::Frame(request)) => {
                    let body = handle(core, conn, request.body).await;
                    let response = Response {
                        id: request.id,
                        body,
                    };
                    conn.push(&ServerFrame::Response(response));
                    core.route_events();
                }
                Ok(Decoded::Incomplete) => break,
                Err(e) => {
                    metrics::counter!("presence_bad_frames_total").increment(1);
                    if let Some(held_back) = BAD_FRAME_WARNINGS.check() {
                        tracing::warn!(%peer, reason = %e, held_back, "bad frame; closing connection");
                    }
                    break 'conn;
                }
            }
        }
        if conn.killed.get() || core.stopping.get() {
            break;
        }
        if conn.outbox.borrow().len() >= pause_bytes {
            conn.drained.notified().await;
            continue;
        }
        if buf.capacity() - buf.len() < READ_CHUNK_BYTES / 4 {
            buf.reserve(READ_CHUNK_BYTES);
        }
        tokio::select! {
            read = tokio::time::timeout(core.config.lease(), rd.read_buf(&mut buf)) => match read {
                Ok(Ok(0)) => break,
                Ok(Ok(_)) => {}
                Ok(Err(e)) => {
                    tracing::debug!(%peer, error = %e, "read failed");
                    break;
                }
                Err(_) => {
                    metrics::counter!("presence_leases_expired_total").increment(1);
                    tracing::warn!(%peer, "nothing received within the lease; closing");
                    break;
                }
            },
            _ = core.stop_reading.notified() => break,
            _ = conn.kill.notified() => break,
        }
    }
    // Send what is buffered (unless killed), then close.
    if !conn.killed.get() {
        conn.close();
        let drain = Duration::from_millis(core.config.shutdown_drain_ms);
        let abort = writer.abort_handle();
        if tokio::time::timeout(drain, writer).await.is_err() {
            abort.abort();
        }
    } else {
        writer.abort();
    }
}

/// Write whatever is buffered, one write per wake-up, until the connection
/// is closed and its outbox is empty.
async fn write_frames(mut wr: LinkWriter, conn: Rc<Conn>) {
    let mut out = Vec::new();
    loop {
        std::mem::swap(&mut out, &mut *conn.outbox.borrow_mut());
        if out.is_empty() {
            if conn.killed.get() {
                let _ = wr.shutdown().await;
                return;
            }
            tokio::select! {
                _ = conn.ready.notified() => {}
                _ = conn.kill.notified() => {}
            }
            continue;
        }
        if let Err(e) = wr.send(&out).await {
            tracing::debug!(conn = conn.id, error = %e, "write failed");
            conn.close();
            return;
        }
        out.clear();
        conn.drained.notify_one();
    }
}

fn refuse(code: ErrorCode, message: impl Into<String>) -> ResponseBody {
    ResponseBody::Error(PresenceError {
        code,
        message: message.into(),
    })
}

fn now_s() -> u32 {
    let secs = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    u32::try_from(secs).unwrap_or(u32::MAX)
}

fn answer(result: Result<ResponseBody, PresenceError>) -> ResponseBody {
    result.unwrap_or_else(ResponseBody::Error)
}

async fn handle(core: &Rc<Core>, conn: &Rc<Conn>, body: RequestBody) -> ResponseBody {
    metrics::counter!("presence_requests_total", "op" => op_name(&body)).increment(1);
    match body {
        // Requests any connection may send.
        RequestBody::Register { gateway, peer_addr } => register(core, conn, gateway, peer_addr),
        RequestBody::Lookup { users } => answer(
            core.state
                .borrow_mut()
                .lookup(&users)
                .map(|entries| ResponseBody::Entries { entries }),
        ),
        RequestBody::Gateways => ResponseBody::Gateways {
            gateways: core.state.borrow().gateways(),
        },
        RequestBody::Stats => {
            set_gauges(core);
            ResponseBody::Stats(core.state.borrow().stats())
        }
        RequestBody::Ping => ResponseBody::Pong,
        // Requests of a registered gateway.
        body => match conn.gateway.get() {
            None => refuse(ErrorCode::NotRegistered, "register as a gateway first"),
            Some(g) if body == RequestBody::SyncEnd => sync_end(core, g).await,
            Some(g) => answer(gateway_request(&mut core.state.borrow_mut(), g, body)),
        },
    }
}

/// End gateway `g`'s sync: remove its slots not re-sent, a shard at a time.
async fn sync_end(core: &Rc<Core>, g: GatewayIndex) -> ResponseBody {
    let ended = core.state.borrow_mut().sync_end(g);
    match ended {
        Ok(mark) => ResponseBody::SyncEnded {
            removed: core.remove_gateway_slots(g, Some(mark)).await,
        },
        Err(e) => ResponseBody::Error(e),
    }
}

/// The requests of gateway `g` that the state answers at once.
fn gateway_request(
    state: &mut State,
    g: GatewayIndex,
    body: RequestBody,
) -> Result<ResponseBody, PresenceError> {
    match body {
        RequestBody::Online {
            user,
            session,
            status,
        } => state
            .online(g, user, session, status, now_s())
            .map(|replaced| ResponseBody::Online { replaced }),
        RequestBody::Offline { user, session } => Ok(ResponseBody::Offline {
            removed: state.offline(g, user, session),
        }),
        RequestBody::Watch { session, users } => state
            .watch(g, session, &users)
            .map(|entries| ResponseBody::Entries { entries }),
        RequestBody::Unwatch { session, users } => state
            .unwatch(g, session, &users)
            .map(|removed| ResponseBody::Unwatched { removed }),
        RequestBody::SyncBegin => {
            state.sync_begin(g);
            Ok(ResponseBody::SyncStarted)
        }
        RequestBody::SyncSessions { sessions } => state
            .sync_sessions(g, &sessions)
            .map(|(accepted, kicked)| ResponseBody::Synced { accepted, kicked }),
        other => Ok(refuse(
            ErrorCode::BadRequest,
            format!("unexpected request {}", op_name(&other)),
        )),
    }
}

fn register(core: &Rc<Core>, conn: &Rc<Conn>, gateway: u32, peer_addr: String) -> ResponseBody {
    if conn.gateway.get().is_some() {
        return refuse(
            ErrorCode::BadRequest,
            "this connection is registered already",
        );
    }
    let registered = core
        .state
        .borrow_mut()
        .register(gateway, peer_addr, conn.id);
    match registered {
        Ok(r) => {
            conn.gateway.set(Some(r.index));
            if let Some(old) = r
                .replaced_connection
                .and_then(|c| core.conns.borrow().get(&c).cloned())
            {
                tracing::info!(
                    gateway,
                    "a new connection of the gateway takes over; closing the old one"
                );
                old.close();
            }
            tracing::info!(gateway, conn = conn.id, "gateway registered");
            set_gauges(core);
            ResponseBody::Registered {
                lease_ms: core.config.lease_ms,
                grace_ms: core.config.grace_ms,
            }
        }
        Err(e) => ResponseBody::Error(e),
    }
}

fn op_name(body: &RequestBody) -> &'static str {
    match body {
        RequestBody::Register { .. } => "register",
        RequestBody::Online { .. } => "online",
        RequestBody::Offline { .. } => "offline",
        RequestBody::Lookup { .. } => "lookup",
        RequestBody::Watch { .. } => "watch",
        RequestBody::Unwatch { .. } => "unwatch",
        RequestBody::SyncBegin => "sync_begin",
        RequestBody::SyncSessions { .. } => "sync_sessions",
        RequestBody::SyncEnd => "sync_end",
        RequestBody::Gateways => "gateways",
        RequestBody::Stats => "stats",
        RequestBody::Ping => "ping",
    }
}
