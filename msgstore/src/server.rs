//! TCP server for the shard protocol ([`proto::shard`]).
//!
//! One task per connection. Requests are submitted to the [`Shard`] as they
//! arrive (pipelining) and answered in request order by a writer task that
//! batches every response that is ready into one write.
//!
//! Limits and what happens at each:
//! * a frame body over [`ServerConfig::frame_body_bytes_max`], or bytes that
//!   are not a valid request: the connection is closed (logged, counted in
//!   `msgstore_bad_frames_total`);
//! * [`ServerConfig::inflight_requests_max`] requests of one connection not
//!   answered yet: the server stops reading that socket until answers drain;
//! * [`ServerConfig::connections_max`] open connections: further connections
//!   are accepted and closed at once (`msgstore_connections_rejected_total`);
//! * protocol limits: an `AppendBatch` of more than
//!   [`APPEND_BATCH_ITEMS_MAX`] items is answered with `BadRequest`; a
//!   `Fetch` is clamped to [`FETCH_COUNT_MAX`] records and [`FETCH_BYTES_MAX`]
//!   bytes.
//!
//! Shutdown: when the shutdown signal fires the server stops accepting, every
//! connection stops reading, answers what it already read and flushes; then
//! [`run`] returns and the caller closes the shard.

use crate::{Error, Shard};
use bytes::BytesMut;
use proto::{
    frame::{self, Decoded, FRAME_BODY_BYTES_MAX_DEFAULT},
    shard::{
        Request, RequestBody, Response, ResponseBody, ShardError, ShardErrorCode,
        APPEND_BATCH_ITEMS_MAX, FETCH_BYTES_MAX, FETCH_COUNT_MAX,
    },
};
use serde::{Deserialize, Serialize};
use std::{
    future::Future,
    net::SocketAddr,
    pin::Pin,
    sync::Arc,
    task::Poll,
    time::{Duration, Instant},
};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{
        tcp::{OwnedReadHalf, OwnedWriteHalf},
        TcpListener, TcpStream,
    },
    sync::{mpsc, watch, OwnedSemaphorePermit, Semaphore},
    task::JoinSet,
};

/// Largest response frame body the server sends: a full fetch page plus one
/// oversized first record (the engine caps a message at 16 MiB).
pub const RESPONSE_BODY_BYTES_MAX: usize = FETCH_BYTES_MAX as usize + 17 * 1024 * 1024;

/// Buffered response bytes past which the writer flushes even if more
/// responses are ready.
const WRITE_BUFFER_FLUSH_BYTES: usize = 256 * 1024;

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
        if self.inflight_requests_max > Semaphore::MAX_PERMITS {
            return Err("server.inflight_requests_max is too large".into());
        }
        Ok(())
    }
}

/// Accept connections on `listener` and serve them with `shard` until
/// `shutdown` becomes `true` (or its sender is dropped); then stop accepting,
/// let every connection drain and return.
pub async fn run(
    listener: TcpListener,
    shard: Shard,
    config: ServerConfig,
    mut shutdown: watch::Receiver<bool>,
) {
    describe_metrics();
    let config = Arc::new(config);
    let mut conns = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => admit(&mut conns, stream, peer, &shard, &config, &shutdown),
                Err(e) => accept_failed(e).await,
            },
            _ = wait_for_shutdown(&mut shutdown) => break,
        }
    }
    drop(listener);
    while conns.try_join_next().is_some() {}
    tracing::info!(
        connections = conns.len(),
        "shutting down: draining connections"
    );
    drain(conns, Duration::from_millis(config.shutdown_drain_ms)).await;
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
        "msgstore_request_duration_seconds",
        Unit::Seconds,
        "Time from receiving a request to its answer being ready, by op"
    );
}

async fn wait_for_shutdown(shutdown: &mut watch::Receiver<bool>) {
    // An error means the sender is gone: treat it as a shutdown request.
    let _ = shutdown.wait_for(|stop| *stop).await;
}

/// Errors like EMFILE are transient: wait a little instead of spinning.
async fn accept_failed(e: std::io::Error) {
    tracing::warn!(error = %e, "accept failed");
    tokio::time::sleep(Duration::from_millis(50)).await;
}

fn admit(
    conns: &mut JoinSet<()>,
    stream: TcpStream,
    peer: SocketAddr,
    shard: &Shard,
    config: &Arc<ServerConfig>,
    shutdown: &watch::Receiver<bool>,
) {
    while conns.try_join_next().is_some() {}
    if conns.len() >= config.connections_max {
        metrics::counter!("msgstore_connections_rejected_total").increment(1);
        tracing::warn!(%peer, max = config.connections_max, "connection limit reached; closing");
        drop(stream);
        return;
    }
    let _ = stream.set_nodelay(true);
    let conn = Connection {
        shard: shard.clone(),
        config: config.clone(),
        peer,
    };
    let shutdown = shutdown.clone();
    conns.spawn(async move {
        metrics::gauge!("msgstore_connections").increment(1.0);
        conn.serve(stream, shutdown).await;
        metrics::gauge!("msgstore_connections").decrement(1.0);
    });
}

async fn drain(mut conns: JoinSet<()>, limit: Duration) {
    let all = async { while conns.join_next().await.is_some() {} };
    if tokio::time::timeout(limit, all).await.is_err() {
        tracing::warn!(
            connections = conns.len(),
            "connections did not drain in time; cutting them"
        );
        conns.shutdown().await;
    }
}

/// The answer to one request, pending on the shard.
type ResponseFuture = Pin<Box<dyn Future<Output = Response> + Send>>;

/// One queued answer and the in-flight slot it occupies until written.
type Pending = (ResponseFuture, OwnedSemaphorePermit);

struct Connection {
    shard: Shard,
    config: Arc<ServerConfig>,
    peer: SocketAddr,
}

/// Why a connection's read side stopped.
enum ReadEnd {
    /// Peer closed, shutdown, or the writer is gone: answer what was read.
    Drain,
    /// Bad input: close at once.
    Abort,
}

impl Connection {
    async fn serve(self, stream: TcpStream, shutdown: watch::Receiver<bool>) {
        let (rd, wr) = stream.into_split();
        let inflight = Arc::new(Semaphore::new(self.config.inflight_requests_max));
        let (tx, rx) = mpsc::channel(self.config.inflight_requests_max);
        let writer = tokio::spawn(write_responses(wr, rx, self.peer));
        match self.read_requests(rd, tx, inflight, shutdown).await {
            ReadEnd::Drain => {
                let _ = writer.await;
            }
            ReadEnd::Abort => writer.abort(),
        }
        tracing::debug!(peer = %self.peer, "connection closed");
    }

    async fn read_requests(
        &self,
        mut rd: OwnedReadHalf,
        tx: mpsc::Sender<Pending>,
        inflight: Arc<Semaphore>,
        mut shutdown: watch::Receiver<bool>,
    ) -> ReadEnd {
        let mut buf = BytesMut::with_capacity(READ_CHUNK_BYTES);
        loop {
            loop {
                let request = match frame::decode::<Request>(
                    &mut buf,
                    self.config.frame_body_bytes_max,
                ) {
                    Ok(Decoded::Frame(request)) => request,
                    Ok(Decoded::Incomplete) => break,
                    Err(e) => {
                        metrics::counter!("msgstore_bad_frames_total").increment(1);
                        tracing::warn!(peer = %self.peer, reason = %e, "bad frame; closing connection");
                        return ReadEnd::Abort;
                    }
                };
                let permit = tokio::select! {
                    permit = inflight.clone().acquire_owned() => match permit {
                        Ok(permit) => permit,
                        Err(_) => return ReadEnd::Drain,
                    },
                    _ = wait_for_shutdown(&mut shutdown) => return ReadEnd::Drain,
                };
                let answer = dispatch(&self.shard, request);
                if tx.send((answer, permit)).await.is_err() {
                    return ReadEnd::Drain;
                }
            }
            if buf.capacity() - buf.len() < READ_CHUNK_BYTES / 4 {
                buf.reserve(READ_CHUNK_BYTES);
            }
            tokio::select! {
                read = rd.read_buf(&mut buf) => match read {
                    Ok(0) => return ReadEnd::Drain,
                    Ok(_) => {}
                    Err(e) => {
                        tracing::debug!(peer = %self.peer, error = %e, "read failed");
                        return ReadEnd::Drain;
                    }
                },
                _ = wait_for_shutdown(&mut shutdown) => return ReadEnd::Drain,
            }
        }
    }
}

/// Write answers in request order; write whenever no further answer is ready
/// right now (or the buffer is large). A slot is freed once its answer is
/// handed to the socket.
async fn write_responses(
    mut wr: OwnedWriteHalf,
    mut rx: mpsc::Receiver<Pending>,
    peer: SocketAddr,
) {
    let mut out = Vec::with_capacity(WRITE_BUFFER_FLUSH_BYTES);
    let mut written_slots = Vec::new();
    loop {
        let (mut answer, permit) = match rx.try_recv() {
            Ok(next) => next,
            Err(mpsc::error::TryRecvError::Empty) => {
                if flush(&mut wr, &mut out, &mut written_slots, peer)
                    .await
                    .is_err()
                {
                    return;
                }
                match rx.recv().await {
                    Some(next) => next,
                    None => break,
                }
            }
            Err(mpsc::error::TryRecvError::Disconnected) => break,
        };
        let response = match poll_once(&mut answer).await {
            Some(response) => response,
            None => {
                if flush(&mut wr, &mut out, &mut written_slots, peer)
                    .await
                    .is_err()
                {
                    return;
                }
                answer.await
            }
        };
        encode_response(&response, &mut out);
        written_slots.push(permit);
        if out.len() >= WRITE_BUFFER_FLUSH_BYTES
            && flush(&mut wr, &mut out, &mut written_slots, peer)
                .await
                .is_err()
        {
            return;
        }
    }
    if flush(&mut wr, &mut out, &mut written_slots, peer)
        .await
        .is_ok()
    {
        let _ = wr.shutdown().await;
    }
}

async fn flush(
    wr: &mut OwnedWriteHalf,
    out: &mut Vec<u8>,
    slots: &mut Vec<OwnedSemaphorePermit>,
    peer: SocketAddr,
) -> std::io::Result<()> {
    if !out.is_empty() {
        if let Err(e) = wr.write_all(out).await {
            tracing::debug!(%peer, error = %e, "write failed");
            return Err(e);
        }
        out.clear();
    }
    slots.clear();
    Ok(())
}

/// Poll a future once: its output if it is ready now.
async fn poll_once<F: Future + Unpin>(fut: &mut F) -> Option<F::Output> {
    std::future::poll_fn(|cx| match Pin::new(&mut *fut).poll(cx) {
        Poll::Ready(v) => Poll::Ready(Some(v)),
        Poll::Pending => Poll::Ready(None),
    })
    .await
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

fn engine_error(e: Error) -> ResponseBody {
    ResponseBody::Error(e.to_wire())
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

/// Submit one request to the shard; the returned future yields its answer.
fn dispatch(shard: &Shard, request: Request) -> ResponseFuture {
    let op = op_name(&request.body);
    metrics::counter!("msgstore_requests_total", "op" => op).increment(1);
    let started = Instant::now();
    let body = submit(shard, request.body);
    let id = request.id;
    Box::pin(async move {
        let body = body.await;
        metrics::histogram!("msgstore_request_duration_seconds", "op" => op)
            .record(started.elapsed().as_secs_f64());
        Response { id, body }
    })
}

type BodyFuture = Pin<Box<dyn Future<Output = ResponseBody> + Send>>;

fn ready(body: ResponseBody) -> BodyFuture {
    Box::pin(std::future::ready(body))
}

fn submit(shard: &Shard, body: RequestBody) -> BodyFuture {
    match body {
        RequestBody::Append {
            user,
            msg_id,
            payload,
        } => {
            let ticket = shard.append(user, msg_id, payload);
            Box::pin(async move {
                match ticket.await {
                    Ok(seq) => ResponseBody::Appended { seq },
                    Err(e) => engine_error(e),
                }
            })
        }
        RequestBody::AppendBatch { items } => submit_batch(shard, items),
        RequestBody::Fetch {
            user,
            after_seq,
            max_count,
            max_bytes,
        } => {
            let ticket = shard.fetch(
                user,
                after_seq,
                max_count.min(FETCH_COUNT_MAX),
                max_bytes.min(FETCH_BYTES_MAX),
            );
            Box::pin(async move {
                match ticket.await {
                    Ok(page) => ResponseBody::Records {
                        records: page.records,
                        more: page.more,
                    },
                    Err(e) => engine_error(e),
                }
            })
        }
        RequestBody::Ack { user, up_to_seq } => {
            let ticket = shard.ack(user, up_to_seq);
            Box::pin(async move {
                match ticket.await {
                    Ok(removed) => ResponseBody::Acked { removed },
                    Err(e) => engine_error(e),
                }
            })
        }
        RequestBody::UserStats { user } => {
            let ticket = shard.user_stats(user);
            Box::pin(async move {
                match ticket.await {
                    Ok(stats) => ResponseBody::UserStats(stats),
                    Err(e) => engine_error(e),
                }
            })
        }
        RequestBody::Stats => {
            let ticket = shard.stats();
            Box::pin(async move {
                match ticket.await {
                    Ok(stats) => ResponseBody::Stats(stats),
                    Err(e) => engine_error(e),
                }
            })
        }
        RequestBody::Ping => ready(ResponseBody::Pong),
    }
}

fn submit_batch(shard: &Shard, items: Vec<proto::shard::AppendItem>) -> BodyFuture {
    if items.len() > APPEND_BATCH_ITEMS_MAX {
        return ready(error_body(
            ShardErrorCode::BadRequest,
            format!(
                "append batch of {} items exceeds the limit of {APPEND_BATCH_ITEMS_MAX}",
                items.len()
            ),
        ));
    }
    let items = items
        .into_iter()
        .map(|i| crate::AppendRequest {
            user: i.user,
            msg_id: i.msg_id,
            payload: i.payload,
        })
        .collect();
    let ticket = shard.append_batch(items);
    Box::pin(async move {
        match ticket.await {
            Ok(results) => ResponseBody::AppendedBatch {
                results: results
                    .into_iter()
                    .map(|r| r.map_err(|e| e.to_wire()))
                    .collect(),
            },
            Err(e) => engine_error(e),
        }
    })
}
