//! TCP server for the shard protocol ([`proto::shard`]), in the shape of
//! Redis's event loop: one thread owns the engine and every connection.
//!
//! Each connection's reader decodes the frames a socket read brought and
//! answers them in the engine's open batch at once (no queue, no thread
//! hop); the answers wait, staged, until the batch is durable. A `Fetch`
//! page is encoded straight from the engine's records (no copy per record)
//! and, if every record it shows is durable already, written at once: it
//! changes nothing and shows nothing a crash could take back, so it need
//! not wait (it may overtake earlier answers of its connection). A committer
//! task runs once the readers that were ready have had their turn: it ends
//! the batch (one log write, and under `always` that write is the sync),
//! encodes every staged answer into its connection's buffer, lets the
//! engine do its time-driven work, and opens the next batch. Each
//! connection's writer task sends its buffer with one write; a reader that
//! answered enough at once to fill [`OUTBOX_FLUSH_BYTES`] writes it itself
//! when the writer task holds nothing (so the buffer stays small and in
//! cache, and bytes stay in order).
//!
//! Limits and what happens at each:
//! * a frame body over [`ServerConfig::frame_body_bytes_max`], or bytes that
//!   are not a valid request: the connection is closed (logged, counted in
//!   `msgstore_bad_frames_total`);
//! * [`ServerConfig::inflight_requests_max`] requests of one connection not
//!   written back yet: the server stops reading that socket until answers
//!   drain;
//! * a checkpoint running with more than the engine's
//!   `checkpoint_stall_wal_bytes` of log behind it: no connection is read
//!   until it is done (`msgstore_stalls_total`), so sustained load slows
//!   to what checkpoints sustain instead of filling the log to
//!   `wal_bytes_max`;
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

use crate::{
    engine::{failed_answer, Engine},
    log_writer::{Completion, LogWriter},
    Error,
};
use bytes::BytesMut;
use daemon::secure::{GateLimits, Link, LinkReader, LinkWriter};
use proto::{
    frame::{self, Decoded, FRAME_BODY_BYTES_MAX_DEFAULT},
    shard::{
        Request, RequestBody, Response, ResponseBody, ShardError, ShardErrorCode, FETCH_BYTES_MAX,
    },
    shard_page::RecordsResponseRef,
};
use serde::{Deserialize, Serialize};
use std::{
    cell::{Cell, RefCell},
    collections::VecDeque,
    net::SocketAddr,
    rc::Rc,
    time::{Duration, Instant},
};
use tokio::{
    io::AsyncReadExt,
    net::TcpListener,
    sync::{mpsc, watch, Notify},
};

/// Largest response frame body the server sends: a full fetch page plus one
/// oversized first record (the engine caps a message at 16 MiB).
pub const RESPONSE_BODY_BYTES_MAX: usize = FETCH_BYTES_MAX as usize + 17 * 1024 * 1024;

/// A batch this large is written at once even while another write runs.
const EAGER_BATCH_REQUESTS: usize = 32;

/// Largest allowed `inflight_requests_max`.
const INFLIGHT_REQUESTS_LIMIT: usize = 1 << 20;

/// Bytes requested from the socket per read when the buffer is empty.
const READ_CHUNK_BYTES: usize = 64 * 1024;

/// Answers written at once pile up in a connection's outbox to at most about
/// this much before the reader writes them itself (if no write is running):
/// a small outbox stays in the CPU cache, where encoding a page into it and
/// the kernel's copy out of it are cheap. (With 16 pages of 100 records
/// pipelined, the outboxes of 50 connections were 40 MiB of cold memory,
/// and encoding pages into them was a fifth of the server thread.)
const OUTBOX_FLUSH_BYTES: usize = 64 * 1024;

/// "bad frame" warnings (one per connection closed for one): at most one
/// per interval, with how many were held back (`msgstore_bad_frames_total`
/// counts them all).
pub(crate) static BAD_FRAME_WARNINGS: daemon::SharedLogLimiter =
    daemon::SharedLogLimiter::new(daemon::accept::WARN_INTERVAL);

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
    /// Under `fsync = "always"`: batches whose durable log write may run at
    /// once (each on its own writer thread). While they run, the next batch
    /// fills; more in flight hides more of the disk's latency.
    pub log_writes_inflight_max: usize,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            frame_body_bytes_max: FRAME_BODY_BYTES_MAX_DEFAULT,
            inflight_requests_max: 4096,
            connections_max: 4096,
            shutdown_drain_ms: 10_000,
            log_writes_inflight_max: 4,
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
        positive(
            "log_writes_inflight_max",
            self.log_writes_inflight_max as u64,
        )?;
        if self.log_writes_inflight_max > 64 {
            return Err("server.log_writes_inflight_max must be at most 64".into());
        }
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
    let (log, done) = LogWriter::start(config.log_writes_inflight_max)?;
    let core = Rc::new(Core::new(engine, config, log));
    let committer = tokio::task::spawn_local(commit_loop(core.clone()));
    let completions = tokio::task::spawn_local(completion_loop(core.clone(), done));
    let mut acceptor =
        daemon::secure::SecureListener::new(listener, "msgstore", GateLimits::default());
    loop {
        tokio::select! {
            link = acceptor.accept() => admit(&core, link),
            _ = wait_for_shutdown(&mut shutdown) => break,
            _ = core.fatal_notify.notified() => break,
        }
    }
    drop(acceptor);
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
    completions.abort();
    if let Some(e) = core.fatal.borrow().clone() {
        return Err(Error::Poisoned(e));
    }
    let mut engine = core.engine.borrow_mut();
    engine.end_batch()?;
    engine.shutdown()
}

/// State shared by the tasks of the server thread.
struct Core {
    engine: RefCell<Engine>,
    config: ServerConfig,
    log: LogWriter,
    /// Answers of the open batch, in the order they were produced.
    staged: RefCell<Vec<Staged>>,
    /// Closed batches whose answers wait for their log write (and for every
    /// batch closed before them), oldest first.
    closed: RefCell<VecDeque<Closed>>,
    /// Every batch up to this one is durable (and answered).
    durable_batch: Cell<u64>,
    /// A log write failed: the server stops, answering with the error.
    fatal: RefCell<Option<String>>,
    fatal_notify: Notify,
    /// A reader staged answers: the committer should run.
    work: Notify,
    stopping: Cell<bool>,
    stop_reading: Notify,
    /// Checkpoints are behind ([`Engine::checkpoint_stalled`]): readers
    /// read no new requests until `unstalled` fires.
    stalled: Cell<bool>,
    unstalled: Notify,
    /// Every connection is done: the committer may exit.
    finished: Cell<bool>,
    connections: Cell<usize>,
    connection_closed: Notify,
}

struct Staged {
    outbox: Rc<Outbox>,
    id: u64,
    answer: Answer,
}

/// An answer waiting for its batch to be durable.
// `Body` is the common answer: boxing it would cost an allocation each.
#[allow(clippy::large_enum_variant)]
enum Answer {
    Body(ResponseBody),
    /// A `Records` response already encoded (frame included): a page that
    /// shows a record of a batch not yet durable.
    Page(Vec<u8>),
}

/// A batch closed in the engine, not yet answered.
struct Closed {
    batch: u64,
    staged: Vec<Staged>,
    state: Durability,
    started: Instant,
}

enum Durability {
    /// Its log write is queued or running.
    Pending,
    Durable,
    Failed(String),
}

/// One connection's answers on their way to the socket.
struct Outbox {
    /// The link's sending half; `None` while the writer task holds it.
    wr: RefCell<Option<LinkWriter>>,
    /// The writer task holds bytes it has not finished writing: nothing
    /// else may write to the socket.
    writing: Cell<bool>,
    /// Encoded answers not sealed yet.
    buf: RefCell<Vec<u8>>,
    /// Requests read and not written back yet (staged, in `buf`, or sealed
    /// and not flushed).
    unanswered: Cell<usize>,
    /// How many answers `buf` holds.
    buffered: Cell<usize>,
    /// How many answers are sealed in the link and not flushed yet.
    sealed: Cell<usize>,
    ready: Notify,
    drained: Notify,
}

impl Outbox {
    fn new(wr: LinkWriter) -> Outbox {
        Outbox {
            wr: RefCell::new(Some(wr)),
            writing: Cell::new(false),
            buf: RefCell::default(),
            unanswered: Cell::new(0),
            buffered: Cell::new(0),
            sealed: Cell::new(0),
            ready: Notify::new(),
            drained: Notify::new(),
        }
    }

    /// Write the buffered answers now, without waiting, if the buffer has
    /// grown past [`OUTBOX_FLUSH_BYTES`] and the writer task holds nothing
    /// (so bytes stay in order). What the socket does not take stays
    /// sealed in the link for the writer task; errors are left to it too.
    fn flush_if_large(&self) {
        let mut buf = self.buf.borrow_mut();
        if self.writing.get() || buf.len() < OUTBOX_FLUSH_BYTES {
            return;
        }
        let mut slot = self.wr.borrow_mut();
        let Some(wr) = slot.as_mut() else { return };
        if wr.seal(&buf).is_err() {
            return;
        }
        buf.clear();
        self.sealed
            .set(self.sealed.get() + self.buffered.replace(0));
        if let Ok(true) = wr.try_flush() {
            self.unanswered
                .set(self.unanswered.get() - self.sealed.replace(0));
        } else {
            self.ready.notify_one();
        }
    }
}

impl Core {
    fn new(mut engine: Engine, config: ServerConfig, log: LogWriter) -> Core {
        engine.begin_batch();
        Core {
            engine: RefCell::new(engine),
            config,
            log,
            staged: RefCell::new(Vec::new()),
            closed: RefCell::new(VecDeque::new()),
            durable_batch: Cell::new(0),
            fatal: RefCell::new(None),
            fatal_notify: Notify::new(),
            work: Notify::new(),
            stopping: Cell::new(false),
            stop_reading: Notify::new(),
            stalled: Cell::new(false),
            unstalled: Notify::new(),
            finished: Cell::new(false),
            connections: Cell::new(0),
            connection_closed: Notify::new(),
        }
    }

    /// Close the open batch: hand its durable write to the log writer (or
    /// commit it here), do the engine's time-driven work, open the next
    /// batch, and answer whatever is durable now.
    fn close_batch(&self) {
        let staged = std::mem::take(&mut *self.staged.borrow_mut());
        let mut engine = self.engine.borrow_mut();
        let batch = engine.current_batch();
        let mut lost = false;
        let state = match engine.end_batch_deferred() {
            Ok(None) => Durability::Durable,
            Ok(Some(write)) => {
                lost = !self.log.submit(batch, write);
                Durability::Pending
            }
            Err(e) => Durability::Failed(e.to_string()),
        };
        engine.tick();
        engine.begin_batch();
        let stalled = engine.checkpoint_stalled();
        drop(engine);
        self.set_stalled(stalled);
        if !staged.is_empty() {
            metrics::histogram!("msgstore_commit_requests").record(staged.len() as f64);
        }
        self.closed.borrow_mut().push_back(Closed {
            batch,
            staged,
            state,
            started: Instant::now(),
        });
        if lost {
            // Like a failed write: this batch and every later one fail.
            self.write_finished(batch, Err("the log writer threads are gone".into()));
            return;
        }
        self.answer_durable();
    }

    /// Start or end a stall: while checkpoints are behind, readers wait.
    fn set_stalled(&self, stalled: bool) {
        if self.stalled.replace(stalled) == stalled {
            return;
        }
        metrics::gauge!("msgstore_stalled").set(if stalled { 1.0 } else { 0.0 });
        if stalled {
            metrics::counter!("msgstore_stalls_total").increment(1);
            tracing::debug!("checkpoints are behind: reading no new requests until one is done");
        } else {
            self.unstalled.notify_waiters();
        }
    }

    /// A log write finished: mark its batch (and, on failure, every later
    /// one), answer what is durable, keep the log busy.
    fn write_finished(&self, batch: u64, result: Result<(), String>) {
        self.engine.borrow_mut().log_write_done(batch, &result);
        let mut seen = false;
        for c in self.closed.borrow_mut().iter_mut() {
            seen |= c.batch == batch;
            match &result {
                _ if !seen => {}
                Ok(()) if c.batch == batch => {
                    metrics::histogram!("msgstore_commit_seconds")
                        .record(c.started.elapsed().as_secs_f64());
                    c.state = Durability::Durable;
                }
                Ok(()) => {}
                // Later batches were applied on top of this one.
                Err(e) => c.state = Durability::Failed(e.clone()),
            }
        }
        if let Err(e) = result {
            tracing::error!(error = %e, "log write failed; answering with errors and stopping");
            self.fatal.borrow_mut().get_or_insert(e);
            self.fatal_notify.notify_one();
        }
        self.answer_durable();
        if self.may_close() {
            self.close_batch();
        }
    }

    /// Send the answers of the oldest closed batches whose writes are done.
    fn answer_durable(&self) {
        let mut touched: Vec<Rc<Outbox>> = Vec::new();
        loop {
            let ready = self
                .closed
                .borrow()
                .front()
                .is_some_and(|c| !matches!(c.state, Durability::Pending));
            if !ready {
                break;
            }
            let c = self.closed.borrow_mut().pop_front().expect("checked above");
            let failure = match &c.state {
                Durability::Failed(e) => Some(Error::Storage(e.clone())),
                _ => {
                    self.durable_batch.set(c.batch);
                    None
                }
            };
            for s in c.staged {
                write_answer(s.id, s.answer, failure.as_ref(), &s.outbox);
                s.outbox.buffered.set(s.outbox.buffered.get() + 1);
                if !touched.last().is_some_and(|t| Rc::ptr_eq(t, &s.outbox)) {
                    touched.push(s.outbox);
                }
            }
        }
        for outbox in touched {
            outbox.ready.notify_one();
        }
    }

    /// Whether the open batch may be closed now: it has answers, and either
    /// no log write is running, or a writer is free and the batch is large
    /// enough to be worth a write of its own (small batches wait for the
    /// running write: fewer, larger writes cost less CPU).
    fn may_close(&self) -> bool {
        let inflight = self.engine.borrow().log_inflight();
        let staged = self.staged.borrow().len();
        staged > 0
            && (inflight == 0
                || (inflight < self.config.log_writes_inflight_max
                    && staged >= EAGER_BATCH_REQUESTS))
    }

    /// Answer one request in the open batch: the answer to stage, or
    /// `None` if it went into `outbox` at once. A `Fetch` page is encoded
    /// straight from the engine's records; if every record it shows is
    /// durable it is sent at once (it changes nothing and shows nothing a
    /// crash could take back), so it may overtake earlier answers.
    fn answer(&self, request: Request, outbox: &Outbox) -> Option<Answer> {
        let RequestBody::Fetch {
            user,
            after_seq,
            max_count,
            max_bytes,
        } = request.body
        else {
            return Some(Answer::Body(self.engine.borrow_mut().respond(request.body)));
        };
        let durable = self.durable_batch.get();
        let mut engine = self.engine.borrow_mut();
        let page = engine.fetch_with(user, after_seq, (max_count, max_bytes), |page| {
            let response = RecordsResponseRef {
                id: request.id,
                records: &page.records,
                more: page.more,
            };
            if page.newest_batch <= durable {
                encode_answer(request.id, &response, &mut outbox.buf.borrow_mut());
                outbox.buffered.set(outbox.buffered.get() + 1);
                None
            } else {
                let mut bytes = Vec::new();
                encode_answer(request.id, &response, &mut bytes);
                Some(Answer::Page(bytes))
            }
        });
        page.unwrap_or_else(|e| Some(Answer::Body(ResponseBody::Error(e.to_wire()))))
    }

    fn log_busy(&self) -> bool {
        self.engine.borrow().log_inflight() > 0
    }
}

/// Close a batch whenever readers staged answers (after every ready reader
/// had its turn) and a log writer is free, or the engine has timed work.
/// While all writers are busy, answers pile up in the open batch; the next
/// completion closes it at once, so the log is never idle under load.
async fn commit_loop(core: Rc<Core>) {
    loop {
        let wait = core.engine.borrow().next_wakeup();
        tokio::select! {
            _ = core.work.notified() => {}
            _ = tokio::time::sleep(wait) => {}
        }
        // Let every reader that is ready now add to this batch first.
        tokio::task::yield_now().await;
        if core.may_close() || (core.staged.borrow().is_empty() && !core.log_busy()) {
            // (An empty close still runs the engine's timed work.)
            core.close_batch();
        }
        if core.finished.get() && core.staged.borrow().is_empty() && !core.log_busy() {
            return;
        }
    }
}

/// Feed log-write completions back to the server thread.
async fn completion_loop(core: Rc<Core>, mut done: mpsc::UnboundedReceiver<Completion>) {
    while let Some((batch, result)) = done.recv().await {
        core.write_finished(batch, result);
    }
}

fn admit(core: &Rc<Core>, link: Link) {
    let peer = link.peer;
    if core.connections.get() >= core.config.connections_max || core.stopping.get() {
        metrics::counter!("msgstore_connections_rejected_total").increment(1);
        tracing::warn!(%peer, max = core.config.connections_max, "connection limit reached; closing");
        drop(link);
        return;
    }
    core.connections.set(core.connections.get() + 1);
    metrics::gauge!("msgstore_connections").increment(1.0);
    let core = core.clone();
    tokio::task::spawn_local(async move {
        serve(&core, link).await;
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

async fn serve(core: &Rc<Core>, link: Link) {
    let peer = link.peer;
    let (rd, wr) = link.into_split();
    let outbox = Rc::new(Outbox::new(wr));
    let writer = tokio::task::spawn_local(write_answers(outbox.clone(), peer));
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
    mut rd: LinkReader,
    outbox: &Rc<Outbox>,
    peer: SocketAddr,
) -> ReadEnd {
    let mut buf = BytesMut::with_capacity(READ_CHUNK_BYTES);
    let limit = core.config.inflight_requests_max;
    loop {
        let (mut staged_any, mut answered_now) = (false, false);
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
                    if let Some(held_back) = BAD_FRAME_WARNINGS.check() {
                        tracing::warn!(%peer, reason = %e, held_back, "bad frame; closing connection");
                    }
                    return ReadEnd::Abort;
                }
            };
            metrics::counter!("msgstore_requests_total", "op" => request.body.op_name())
                .increment(1);
            outbox.unanswered.set(outbox.unanswered.get() + 1);
            let id = request.id;
            match core.answer(request, outbox) {
                Some(answer) => {
                    core.staged.borrow_mut().push(Staged {
                        outbox: outbox.clone(),
                        id,
                        answer,
                    });
                    staged_any = true;
                }
                None => {
                    answered_now = true;
                    outbox.flush_if_large();
                }
            }
        }
        if staged_any {
            core.work.notify_one();
        }
        if answered_now {
            outbox.ready.notify_one();
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
        // Checked before every read, not only when a batch closes: one
        // batch may read a great deal.
        if !core.stalled.get() && core.engine.borrow().checkpoint_stalled() {
            core.set_stalled(true);
        }
        if core.stalled.get() {
            tokio::select! {
                _ = core.unstalled.notified() => continue,
                _ = core.stop_reading.notified() => return ReadEnd::Drain,
            }
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
async fn write_answers(outbox: Rc<Outbox>, peer: SocketAddr) {
    let mut out = Vec::new();
    loop {
        outbox.ready.notified().await;
        std::mem::swap(&mut out, &mut *outbox.buf.borrow_mut());
        let count = outbox.buffered.replace(0) + outbox.sealed.replace(0);
        if count == 0 && out.is_empty() {
            continue;
        }
        outbox.writing.set(true);
        let mut wr = outbox
            .wr
            .borrow_mut()
            .take()
            .expect("only the writer task takes the link");
        let written = match wr.seal(&out) {
            Ok(()) => wr.flush().await,
            Err(e) => Err(e),
        };
        *outbox.wr.borrow_mut() = Some(wr);
        outbox.writing.set(false);
        if let Err(e) = written {
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

async fn wait_for_shutdown(shutdown: &mut watch::Receiver<bool>) {
    // An error means the sender is gone: treat it as a shutdown request.
    let _ = shutdown.wait_for(|stop| *stop).await;
}
/// Put a staged answer into its outbox: as it is, or (its batch failed)
/// as the error.
fn write_answer(id: u64, answer: Answer, failure: Option<&Error>, outbox: &Outbox) {
    let out = &mut outbox.buf.borrow_mut();
    let body = match (answer, failure) {
        (Answer::Page(bytes), None) => return out.extend_from_slice(&bytes),
        (Answer::Body(body), None) => body,
        (Answer::Body(body), Some(e)) => failed_answer(body, e),
        (Answer::Page(_), Some(e)) => ResponseBody::Error(e.to_wire()),
    };
    encode_response(&Response { id, body }, out);
}
fn encode_response(response: &Response, out: &mut Vec<u8>) {
    encode_answer(response.id, response, out);
}
/// Encode the response to request `id`; one that cannot be encoded (too
/// large) becomes a `Storage` error.
fn encode_answer(id: u64, response: &impl Serialize, out: &mut Vec<u8>) {
    if let Err(e) = frame::encode(response, RESPONSE_BODY_BYTES_MAX, out) {
        tracing::error!(id, error = %e, "response cannot be encoded");
        let fallback = Response {
            id,
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

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncReadExt;

    /// An outbox on one end of a loopback link, and the other end.
    async fn outbox_pair() -> (Outbox, daemon::secure::LinkReader) {
        let (ours, theirs) = daemon::secure::loopback_pair().await;
        (Outbox::new(ours.writer), theirs.reader)
    }

    fn fill(outbox: &Outbox, bytes: usize, answers: usize) {
        outbox
            .buf
            .borrow_mut()
            .extend(std::iter::repeat_n(7u8, bytes));
        outbox.buffered.set(outbox.buffered.get() + answers);
        outbox.unanswered.set(outbox.unanswered.get() + answers);
    }

    #[tokio::test]
    async fn the_reader_writes_a_large_outbox_only_when_the_writer_holds_nothing() {
        let (outbox, mut peer) = outbox_pair().await;
        // Below the threshold: left for the writer task.
        fill(&outbox, OUTBOX_FLUSH_BYTES - 1, 1);
        outbox.flush_if_large();
        assert_eq!(outbox.buf.borrow().len(), OUTBOX_FLUSH_BYTES - 1);
        // The writer task holds bytes: writing now would put these first.
        fill(&outbox, 1, 1);
        outbox.writing.set(true);
        outbox.flush_if_large();
        assert_eq!(outbox.buf.borrow().len(), OUTBOX_FLUSH_BYTES);
        assert_eq!(outbox.unanswered.get(), 2);
        // It holds nothing: all of it goes, and both answers are done.
        outbox.writing.set(false);
        outbox.flush_if_large();
        assert!(outbox.buf.borrow().is_empty());
        assert_eq!((outbox.buffered.get(), outbox.unanswered.get()), (0, 0));
        let mut got = vec![0u8; OUTBOX_FLUSH_BYTES];
        peer.read_exact(&mut got).await.unwrap();
        assert!(got.iter().all(|b| *b == 7));
    }

    #[tokio::test]
    async fn what_the_socket_does_not_take_stays_for_the_writer() {
        let (outbox, _peer) = outbox_pair().await;
        // Far more than a loopback socket holds while the peer reads nothing.
        let total = 64 * 1024 * 1024;
        fill(&outbox, total, 3);
        outbox.flush_if_large();
        assert!(outbox.buf.borrow().is_empty(), "sealed into the link");
        let left = outbox.wr.borrow().as_ref().unwrap().unsent_bytes();
        assert!(left > 0 && left < total, "partly written: {left} left");
        assert_eq!(outbox.sealed.get(), 3, "the answers are not done yet");
        assert_eq!(outbox.unanswered.get(), 3);
    }
}
