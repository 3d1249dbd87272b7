//! TCP server for the shard protocol ([`proto::shard`]), in the shape of
//! Redis's event loop: one thread owns the engine and every connection.
//!
//! Each connection's reader decodes the frames a socket read brought and
//! answers them in the engine's open batch at once (no queue, no thread
//! hop); the answers wait, staged, until the batch is durable. A committer
//! task runs once the readers that were ready have had their turn: it ends
//! the batch (one log write, and under `always` that write is the sync),
//! encodes every staged answer into its connection's buffer, lets the
//! engine do its time-driven work, and opens the next batch. Each
//! connection's writer sends its buffer with one write.
//!
//! Limits and what happens at each:
//! * a frame body over [`ServerConfig::frame_body_bytes_max`], or bytes that
//!   are not a valid request: the connection is closed (logged, counted in
//!   `msgstore_bad_frames_total`);
//! * [`ServerConfig::inflight_requests_max`] requests of one connection not
//!   written back yet: the server stops reading that socket until answers
//!   drain;
//! * [`ServerConfig::connections_max`] open connections: further connections
//!   are accepted and closed at once (`msgstore_connections_rejected_total`);
//! * protocol limits (applied where requests are answered, in the engine):
//!   an `AppendBatch` of more than [`proto::shard::APPEND_BATCH_ITEMS_MAX`]
//!   items is answered with `BadRequest`; a `Fetch` is clamped to
//!   [`proto::shard::FETCH_COUNT_MAX`] records and
//!   [`proto::shard::FETCH_BYTES_MAX`] bytes.
//!
//! Shutdown: when the shutdown signal fires the server stops accepting, every
//! connection stops reading, its answers are committed and written; then the
//! engine syncs and checkpoints and [`run`] returns.

use crate::engine::{failed_answer, Engine};
use bytes::BytesMut;
use proto::{
    frame::{self, Decoded, FRAME_BODY_BYTES_MAX_DEFAULT},
    shard::{
        Request, RequestBody, Response, ResponseBody, ShardError, ShardErrorCode, FETCH_BYTES_MAX,
    },
};
use serde::{Deserialize, Serialize};
use std::{
    cell::{Cell, RefCell},
    net::SocketAddr,
    rc::Rc,
    time::{Duration, Instant},
};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{
        tcp::{OwnedReadHalf, OwnedWriteHalf},
        TcpListener, TcpStream,
    },
    sync::{watch, Notify},
};

/// Largest response frame body the server sends: a full fetch page plus one
/// oversized first record (the engine caps a message at 16 MiB).
pub const RESPONSE_BODY_BYTES_MAX: usize = FETCH_BYTES_MAX as usize + 17 * 1024 * 1024;

/// Largest allowed `inflight_requests_max`.
const INFLIGHT_REQUESTS_LIMIT: usize = 1 << 20;

/// Bytes requested from the socket per read when the buffer is empty.
const READ_CHUNK_BYTES: usize = 64 * 1024;

/// Limits of the TCP server; the `[server]` table of the daemon's config.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ServerConfig {
    /// Largest request frame body; a bigger (or malformed) frame closes the
    /// connection.
    pub frame_body_bytes_max: usize,
    /// Most unanswered requests of one connection; past it the server stops
    /// reading that connection until answers drain.
    pub inflight_requests_max: usize,
    /// Most open connections; further ones are accepted and closed at once.
    pub connections_max: usize,
    /// On shutdown, how long connections get to answer what they read before
    /// they are cut.
    pub shutdown_drain_ms: u64,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            frame_body_bytes_max: FRAME_BODY_BYTES_MAX_DEFAULT,
            inflight_requests_max: 4096,
            connections_max: 4096,
            shutdown_drain_ms: 10_000,
        }
    }
}

impl ServerConfig {
    /// Check ranges; returns a message naming the bad field.
    pub fn validate(&self) -> Result<(), String> {
        let positive = |name: &str, v: u64| {
            if v == 0 {
                Err(format!("server.{name} must be at least 1"))
            } else {
                Ok(())
            }
        };
        positive("frame_body_bytes_max", self.frame_body_bytes_max as u64)?;
        positive("inflight_requests_max", self.inflight_requests_max as u64)?;
        positive("connections_max", self.connections_max as u64)?;
        if self.frame_body_bytes_max > u32::MAX as usize {
            return Err("server.frame_body_bytes_max must fit in 32 bits".into());
        }
        if self.inflight_requests_max > INFLIGHT_REQUESTS_LIMIT {
            return Err("server.inflight_requests_max is too large".into());
        }
        Ok(())
    }
}

/// Accept connections on `listener` and serve them with `engine` until
/// `shutdown` becomes `true` (or its sender is dropped); then stop
/// accepting, let every connection drain, sync and checkpoint the engine.
///
/// Must run inside a [`tokio::task::LocalSet`] on a current-thread runtime:
/// the engine is owned by this one thread.
pub(crate) async fn run(
    listener: TcpListener,
    engine: Engine,
    config: ServerConfig,
    mut shutdown: watch::Receiver<bool>,
) -> crate::Result<()> {
    describe_metrics();
    let core = Rc::new(Core::new(engine, config));
    let committer = tokio::task::spawn_local(commit_loop(core.clone()));
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => admit(&core, stream, peer),
                Err(e) => accept_failed(e).await,
            },
            _ = wait_for_shutdown(&mut shutdown) => break,
        }
    }
    drop(listener);
    tracing::info!(
        connections = core.connections.get(),
        "shutting down: draining connections"
    );
    core.stopping.set(true);
    core.stop_reading.notify_waiters();
    let limit = Duration::from_millis(core.config.shutdown_drain_ms);
    let drained = async {
        while core.connections.get() > 0 {
            core.connection_closed.notified().await;
        }
    };
    if tokio::time::timeout(limit, drained).await.is_err() {
        tracing::warn!(
            connections = core.connections.get(),
            "connections did not drain in time; cutting them"
        );
    }
    core.finished.set(true);
    core.work.notify_one();
    let _ = committer.await;
    let mut engine = core.engine.borrow_mut();
    engine.end_batch()?;
    engine.shutdown()
}

/// State shared by the tasks of the server thread.
struct Core {
    engine: RefCell<Engine>,
    config: ServerConfig,
    /// Answers of the open batch, in the order they were produced.
    staged: RefCell<Vec<Staged>>,
    /// A reader staged answers: the committer should run.
    work: Notify,
    stopping: Cell<bool>,
    stop_reading: Notify,
    /// Every connection is done: the committer may exit.
    finished: Cell<bool>,
    connections: Cell<usize>,
    connection_closed: Notify,
}

struct Staged {
    outbox: Rc<Outbox>,
    id: u64,
    body: ResponseBody,
}

/// One connection's answers on their way to the socket.
#[derive(Default)]
struct Outbox {
    /// Encoded answers not written yet.
    buf: RefCell<Vec<u8>>,
    /// Requests read and not written back yet (staged or in `buf`).
    unanswered: Cell<usize>,
    /// How many answers `buf` holds.
    buffered: Cell<usize>,
    ready: Notify,
    drained: Notify,
}

impl Core {
    fn new(mut engine: Engine, config: ServerConfig) -> Core {
        engine.begin_batch();
        Core {
            engine: RefCell::new(engine),
            config,
            staged: RefCell::new(Vec::new()),
            work: Notify::new(),
            stopping: Cell::new(false),
            stop_reading: Notify::new(),
            finished: Cell::new(false),
            connections: Cell::new(0),
            connection_closed: Notify::new(),
        }
    }

    /// End the open batch, hand every staged answer to its connection, do
    /// the engine's time-driven work, open the next batch.
    fn commit(&self) {
        let staged = std::mem::take(&mut *self.staged.borrow_mut());
        let mut engine = self.engine.borrow_mut();
        let started = Instant::now();
        let result = engine.end_batch();
        if !staged.is_empty() {
            metrics::histogram!("msgstore_commit_seconds").record(started.elapsed().as_secs_f64());
            metrics::histogram!("msgstore_commit_requests").record(staged.len() as f64);
        }
        let mut touched: Vec<Rc<Outbox>> = Vec::new();
        for s in staged {
            let body = match &result {
                Ok(()) => s.body,
                Err(e) => failed_answer(s.body, e),
            };
            encode_response(&Response { id: s.id, body }, &mut s.outbox.buf.borrow_mut());
            s.outbox.buffered.set(s.outbox.buffered.get() + 1);
            if !touched.last().is_some_and(|t| Rc::ptr_eq(t, &s.outbox)) {
                touched.push(s.outbox);
            }
        }
        for outbox in touched {
            outbox.ready.notify_one();
        }
        engine.tick();
        engine.begin_batch();
    }
}

/// Commit whenever readers staged answers (after every ready reader had its
/// turn, so one sync covers them all) or the engine has timed work.
async fn commit_loop(core: Rc<Core>) {
    loop {
        let wait = core.engine.borrow().next_wakeup();
        tokio::select! {
            _ = core.work.notified() => {}
            _ = tokio::time::sleep(wait) => {}
        }
        // Let every reader that is ready now add to this batch first.
        tokio::task::yield_now().await;
        core.commit();
        if core.finished.get() && core.staged.borrow().is_empty() {
            return;
        }
    }
}

fn admit(core: &Rc<Core>, stream: TcpStream, peer: SocketAddr) {
    if core.connections.get() >= core.config.connections_max || core.stopping.get() {
        metrics::counter!("msgstore_connections_rejected_total").increment(1);
        tracing::warn!(%peer, max = core.config.connections_max, "connection limit reached; closing");
        drop(stream);
        return;
    }
    let _ = stream.set_nodelay(true);
    core.connections.set(core.connections.get() + 1);
    metrics::gauge!("msgstore_connections").increment(1.0);
    let core = core.clone();
    tokio::task::spawn_local(async move {
        serve(&core, stream, peer).await;
        core.connections.set(core.connections.get() - 1);
        metrics::gauge!("msgstore_connections").decrement(1.0);
        core.connection_closed.notify_waiters();
        tracing::debug!(%peer, "connection closed");
    });
}

/// Why a connection's read side stopped.
enum ReadEnd {
    /// Peer closed, shutdown, or the socket failed: answer what was read.
    Drain,
    /// Bad input: close at once.
    Abort,
}

async fn serve(core: &Rc<Core>, stream: TcpStream, peer: SocketAddr) {
    let (rd, wr) = stream.into_split();
    let outbox = Rc::new(Outbox::default());
    let writer = tokio::task::spawn_local(write_answers(wr, outbox.clone(), peer));
    match read_requests(core, rd, &outbox, peer).await {
        ReadEnd::Drain => {
            while outbox.unanswered.get() > 0 && !writer.is_finished() {
                outbox.drained.notified().await;
            }
        }
        ReadEnd::Abort => {}
    }
    writer.abort();
}

async fn read_requests(
    core: &Rc<Core>,
    mut rd: OwnedReadHalf,
    outbox: &Rc<Outbox>,
    peer: SocketAddr,
) -> ReadEnd {
    let mut buf = BytesMut::with_capacity(READ_CHUNK_BYTES);
    let limit = core.config.inflight_requests_max;
    loop {
        let mut staged_any = false;
        loop {
            if outbox.unanswered.get() >= limit {
                break;
            }
            let request = match frame::decode::<Request>(&mut buf, core.config.frame_body_bytes_max)
            {
                Ok(Decoded::Frame(request)) => request,
                Ok(Decoded::Incomplete) => break,
                Err(e) => {
                    metrics::counter!("msgstore_bad_frames_total").increment(1);
                    tracing::warn!(%peer, reason = %e, "bad frame; closing connection");
                    return ReadEnd::Abort;
                }
            };
            metrics::counter!("msgstore_requests_total", "op" => op_name(&request.body))
                .increment(1);
            let body = core.engine.borrow_mut().respond(request.body);
            core.staged.borrow_mut().push(Staged {
                outbox: outbox.clone(),
                id: request.id,
                body,
            });
            outbox.unanswered.set(outbox.unanswered.get() + 1);
            staged_any = true;
        }
        if staged_any {
            core.work.notify_one();
        }
        if outbox.unanswered.get() >= limit {
            // Back-pressure: read nothing more until answers drain.
            outbox.drained.notified().await;
            continue;
        }
        if buf.capacity() - buf.len() < READ_CHUNK_BYTES / 4 {
            buf.reserve(READ_CHUNK_BYTES);
        }
        if core.stopping.get() {
            return ReadEnd::Drain;
        }
        tokio::select! {
            read = rd.read_buf(&mut buf) => match read {
                Ok(0) => return ReadEnd::Drain,
                Ok(_) => {}
                Err(e) => {
                    tracing::debug!(%peer, error = %e, "read failed");
                    return ReadEnd::Drain;
                }
            },
            _ = core.stop_reading.notified() => return ReadEnd::Drain,
        }
    }
}

/// Write whatever answers are buffered, one write per wake-up.
async fn write_answers(mut wr: OwnedWriteHalf, outbox: Rc<Outbox>, peer: SocketAddr) {
    let mut out = Vec::new();
    loop {
        outbox.ready.notified().await;
        std::mem::swap(&mut out, &mut *outbox.buf.borrow_mut());
        let count = outbox.buffered.replace(0);
        if out.is_empty() {
            continue;
        }
        if let Err(e) = wr.write_all(&out).await {
            tracing::debug!(%peer, error = %e, "write failed");
            outbox.unanswered.set(0);
            outbox.drained.notify_one();
            return;
        }
        out.clear();
        outbox.unanswered.set(outbox.unanswered.get() - count);
        outbox.drained.notify_one();
    }
}

fn describe_metrics() {
    use metrics::{describe_counter, describe_gauge, describe_histogram, Unit};
    describe_counter!("msgstore_requests_total", "Requests received, by op");
    describe_counter!(
        "msgstore_bad_frames_total",
        "Connections closed for an oversized or malformed frame"
    );
    describe_counter!(
        "msgstore_connections_rejected_total",
        "Connections closed at once because connections_max was reached"
    );
    describe_gauge!("msgstore_connections", "Open client connections");
    describe_histogram!(
        "msgstore_commit_seconds",
        Unit::Seconds,
        "Time to make one batch of requests durable (the log write and sync)"
    );
    describe_histogram!(
        "msgstore_commit_requests",
        "Requests answered by one batch (group commit size)"
    );
}
async fn wait_for_shutdown(shutdown: &mut watch::Receiver<bool>) {
    // An error means the sender is gone: treat it as a shutdown request.
    let _ = shutdown.wait_for(|stop| *stop).await;
}
async fn accept_failed(e: std::io::Error) {
    tracing::warn!(error = %e, "accept failed");
    tokio::time::sleep(Duration::from_millis(50)).await;
}
fn encode_response(response: &Response, out: &mut Vec<u8>) {
    if let Err(e) = frame::encode(response, RESPONSE_BODY_BYTES_MAX, out) {
        tracing::error!(id = response.id, error = %e, "response cannot be encoded");
        let fallback = Response {
            id: response.id,
            body: error_body(
                ShardErrorCode::Storage,
                format!("response cannot be encoded: {e}"),
            ),
        };
        // A small error response always fits.
        let _ = frame::encode(&fallback, RESPONSE_BODY_BYTES_MAX, out);
    }
}
fn error_body(code: ShardErrorCode, message: String) -> ResponseBody {
    ResponseBody::Error(ShardError { code, message })
}
fn op_name(body: &RequestBody) -> &'static str {
    match body {
        RequestBody::Append { .. } => "append",
        RequestBody::AppendBatch { .. } => "append_batch",
        RequestBody::Fetch { .. } => "fetch",
        RequestBody::Ack { .. } => "ack",
        RequestBody::UserStats { .. } => "user_stats",
        RequestBody::Stats => "stats",
        RequestBody::Ping => "ping",
    }
}
