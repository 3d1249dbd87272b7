//! Async client of one shard over one pipelined TCP connection.
//!
//! [`ShardClient`] is cheap to clone; every clone shares the connection. Any
//! number of tasks may call it at once: each call encodes its request, hands
//! the frame to a writer task (which batches whatever is queued into one
//! write) and waits for a reader task to route the response back by its id.
//! At most [`ClientConfig::inflight_requests_max`] requests are unanswered at
//! once; further callers wait for a slot.

use crate::server::RESPONSE_BODY_BYTES_MAX;
use bytes::BytesMut;
use daemon::secure::{LinkReader, LinkWriter};
use proto::{
    frame::{self, Decoded, FRAME_BODY_BYTES_MAX_DEFAULT},
    shard::{
        AppendItem, MailboxStats, Request, RequestBody, Response, ResponseBody, ShardError,
        ShardStats, StoredRecord,
    },
};
use std::{
    collections::HashMap,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex,
    },
};
use tokio::{
    io::AsyncReadExt,
    net::ToSocketAddrs,
    sync::{mpsc, oneshot, OwnedSemaphorePermit, Semaphore},
};

/// Default bound on unanswered requests of one client.
pub const CLIENT_INFLIGHT_REQUESTS_MAX_DEFAULT: usize = 4096;

/// Bytes the writer task gathers into one write at most.
const WRITE_BATCH_BYTES_MAX: usize = 256 * 1024;

/// Why a call failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The shard answered with a typed error (mailbox full, ...).
    #[error("shard error {:?}: {}", .0.code, .0.message)]
    Shard(ShardError),
    #[error("I/O error: {0}")]
    Io(#[from] std::io::Error),
    /// A bad frame, an oversized request, or a response of the wrong kind.
    #[error("protocol error: {0}")]
    Protocol(String),
    /// The connection broke (or was closed) while the request was in flight.
    #[error("disconnected from the shard")]
    Disconnected,
}

/// Limits of one client connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientConfig {
    /// Most unanswered requests; further calls wait.
    pub inflight_requests_max: usize,
    /// Largest request frame body the client sends (the shard's limit).
    pub request_body_bytes_max: usize,
    /// Largest response frame body the client accepts.
    pub response_body_bytes_max: usize,
}

impl Default for ClientConfig {
    fn default() -> Self {
        Self {
            inflight_requests_max: CLIENT_INFLIGHT_REQUESTS_MAX_DEFAULT,
            request_body_bytes_max: FRAME_BODY_BYTES_MAX_DEFAULT,
            response_body_bytes_max: RESPONSE_BODY_BYTES_MAX,
        }
    }
}

type Answer = Result<ResponseBody, ClientError>;

/// Requests waiting for their response, by id. `None` once the link broke.
struct Waiters {
    map: Option<HashMap<u64, (oneshot::Sender<Answer>, OwnedSemaphorePermit)>>,
}

struct Shared {
    waiters: Mutex<Waiters>,
}

impl Shared {
    fn lock(&self) -> std::sync::MutexGuard<'_, Waiters> {
        // A poisoned lock only means another caller panicked mid-insert; the
        // map itself is still consistent.
        self.waiters.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Fail every waiter and refuse new ones.
    fn disconnect(&self) {
        let waiters = self.lock().map.take();
        for (_, (tx, _permit)) in waiters.into_iter().flatten() {
            let _ = tx.send(Err(ClientError::Disconnected));
        }
    }
}

struct Inner {
    frames: mpsc::Sender<Vec<u8>>,
    shared: Arc<Shared>,
    slots: Arc<Semaphore>,
    next_id: AtomicU64,
    config: ClientConfig,
}

/// A pipelined connection to one shard. Clones share it.
#[derive(Clone)]
pub struct ShardClient {
    inner: Arc<Inner>,
}

/// A request sent and not yet answered; `.await` it via [`Pending::wait`].
pub struct Pending {
    rx: oneshot::Receiver<Answer>,
}

impl Pending {
    /// The shard's answer (an `Error` body is returned as a body, not as
    /// [`ClientError::Shard`]).
    pub async fn wait(self) -> Answer {
        self.rx.await.unwrap_or(Err(ClientError::Disconnected))
    }
}

impl ShardClient {
    /// Connect with default limits.
    pub async fn connect(addr: impl ToSocketAddrs) -> Result<Self, ClientError> {
        Self::connect_with(addr, ClientConfig::default()).await
    }

    pub async fn connect_with(
        addr: impl ToSocketAddrs,
        config: ClientConfig,
    ) -> Result<Self, ClientError> {
        if config.inflight_requests_max == 0 {
            return Err(ClientError::Protocol(
                "inflight_requests_max must be at least 1".into(),
            ));
        }
        let (rd, wr) = daemon::secure::connect(addr).await?.into_split();
        let shared = Arc::new(Shared {
            waiters: Mutex::new(Waiters {
                map: Some(HashMap::new()),
            }),
        });
        let (frames, frames_rx) = mpsc::channel(config.inflight_requests_max);
        tokio::spawn(write_frames(wr, frames_rx, shared.clone()));
        tokio::spawn(read_responses(
            rd,
            shared.clone(),
            config.response_body_bytes_max,
        ));
        Ok(Self {
            inner: Arc::new(Inner {
                frames,
                shared,
                slots: Arc::new(Semaphore::new(config.inflight_requests_max)),
                next_id: AtomicU64::new(1),
                config,
            }),
        })
    }

    /// Send one request without waiting for its answer. Waits only for an
    /// in-flight slot; cheap enough to pipeline thousands from one task.
    pub async fn send(&self, body: RequestBody) -> Result<Pending, ClientError> {
        let inner = &self.inner;
        let id = inner.next_id.fetch_add(1, Ordering::Relaxed);
        let mut frame = Vec::new();
        frame::encode(
            &Request { id, body },
            inner.config.request_body_bytes_max,
            &mut frame,
        )
        .map_err(|e| ClientError::Protocol(format!("request cannot be sent: {e}")))?;
        let permit = inner
            .slots
            .clone()
            .acquire_owned()
            .await
            .map_err(|_| ClientError::Disconnected)?;
        let (tx, rx) = oneshot::channel();
        match inner.shared.lock().map.as_mut() {
            Some(map) => map.insert(id, (tx, permit)),
            None => return Err(ClientError::Disconnected),
        };
        if inner.frames.send(frame).await.is_err() {
            inner.shared.disconnect();
        }
        Ok(Pending { rx })
    }

    /// Send several requests back to back, then wait for all answers (in the
    /// order given).
    pub async fn send_many(&self, bodies: impl IntoIterator<Item = RequestBody>) -> Vec<Answer> {
        let mut pending = Vec::new();
        for body in bodies {
            pending.push(self.send(body).await);
        }
        let mut answers = Vec::with_capacity(pending.len());
        for p in pending {
            answers.push(match p {
                Ok(p) => p.wait().await,
                Err(e) => Err(e),
            });
        }
        answers
    }

    /// Send one request and wait for its answer; an `Error` body becomes
    /// [`ClientError::Shard`].
    pub async fn call(&self, body: RequestBody) -> Answer {
        match self.send(body).await?.wait().await? {
            ResponseBody::Error(e) => Err(ClientError::Shard(e)),
            other => Ok(other),
        }
    }

    /// Store one message; returns its sequence number.
    pub async fn append(
        &self,
        user: u64,
        msg_id: u128,
        payload: Vec<u8>,
    ) -> Result<u64, ClientError> {
        match self
            .call(RequestBody::Append {
                user,
                msg_id,
                payload,
            })
            .await?
        {
            ResponseBody::Appended { seq } => Ok(seq),
            other => Err(unexpected("Appended", &other)),
        }
    }

    /// Store several messages; each item succeeds or fails on its own.
    pub async fn append_batch(
        &self,
        items: Vec<AppendItem>,
    ) -> Result<Vec<Result<u64, ShardError>>, ClientError> {
        self.append_items(RequestBody::AppendBatch { items }).await
    }

    /// `append_batch`, storing no item whose mailbox holds a live record
    /// with its `msg_id` stored at or after `since_ms` (that record's seq
    /// is its result instead).
    pub async fn append_batch_once(
        &self,
        items: Vec<AppendItem>,
        since_ms: u64,
    ) -> Result<Vec<Result<u64, ShardError>>, ClientError> {
        self.append_items(RequestBody::AppendBatchOnce { items, since_ms })
            .await
    }

    async fn append_items(
        &self,
        body: RequestBody,
    ) -> Result<Vec<Result<u64, ShardError>>, ClientError> {
        match self.call(body).await? {
            ResponseBody::AppendedBatch { results } => Ok(results),
            other => Err(unexpected("AppendedBatch", &other)),
        }
    }

    /// Live records of `user` after `after_seq`, and whether more remain.
    pub async fn fetch(
        &self,
        user: u64,
        after_seq: u64,
        max_count: u32,
        max_bytes: u32,
    ) -> Result<(Vec<StoredRecord>, bool), ClientError> {
        let body = RequestBody::Fetch {
            user,
            after_seq,
            max_count,
            max_bytes,
        };
        match self.call(body).await? {
            ResponseBody::Records { records, more } => Ok((records, more)),
            other => Err(unexpected("Records", &other)),
        }
    }

    /// Delete `user`'s records up to `up_to_seq`; returns how many went.
    pub async fn ack(&self, user: u64, up_to_seq: u64) -> Result<u64, ClientError> {
        match self.call(RequestBody::Ack { user, up_to_seq }).await? {
            ResponseBody::Acked { removed } => Ok(removed),
            other => Err(unexpected("Acked", &other)),
        }
    }

    /// Delete `user`'s oldest records stored before `before_ms` with a seq
    /// up to `up_to_seq`; returns how many went.
    pub async fn expire(
        &self,
        user: u64,
        before_ms: u64,
        up_to_seq: u64,
    ) -> Result<u64, ClientError> {
        let body = RequestBody::Expire {
            user,
            before_ms,
            up_to_seq,
        };
        match self.call(body).await? {
            ResponseBody::Acked { removed } => Ok(removed),
            other => Err(unexpected("Acked", &other)),
        }
    }

    pub async fn user_stats(&self, user: u64) -> Result<MailboxStats, ClientError> {
        match self.call(RequestBody::UserStats { user }).await? {
            ResponseBody::UserStats(stats) => Ok(stats),
            other => Err(unexpected("UserStats", &other)),
        }
    }

    pub async fn stats(&self) -> Result<ShardStats, ClientError> {
        match self.call(RequestBody::Stats).await? {
            ResponseBody::Stats(stats) => Ok(stats),
            other => Err(unexpected("Stats", &other)),
        }
    }

    pub async fn ping(&self) -> Result<(), ClientError> {
        match self.call(RequestBody::Ping).await? {
            ResponseBody::Pong => Ok(()),
            other => Err(unexpected("Pong", &other)),
        }
    }
}

pub(crate) fn unexpected(wanted: &str, got: &ResponseBody) -> ClientError {
    let kind = format!("{got:?}");
    let kind = kind.split([' ', '(', '{']).next().unwrap_or("?");
    ClientError::Protocol(format!("expected a {wanted} response, got {kind}"))
}

/// Write queued frames (gathered); on a write error, fail every waiter.
async fn write_frames(wr: LinkWriter, frames: mpsc::Receiver<Vec<u8>>, shared: Arc<Shared>) {
    if let Err(e) = daemon::link::write_frames(wr, frames, WRITE_BATCH_BYTES_MAX).await {
        tracing::debug!(error = %e, "shard client write failed");
        shared.disconnect();
    }
}

/// Route responses to their callers until the link ends; then fail the rest.
async fn read_responses(mut rd: LinkReader, shared: Arc<Shared>, body_bytes_max: usize) {
    let mut buf = BytesMut::with_capacity(64 * 1024);
    loop {
        loop {
            match frame::decode::<Response>(&mut buf, body_bytes_max) {
                Ok(Decoded::Frame(response)) => deliver(&shared, response),
                Ok(Decoded::Incomplete) => break,
                Err(e) => {
                    tracing::warn!(error = %e, "bad frame from shard; dropping connection");
                    shared.disconnect();
                    return;
                }
            }
        }
        match rd.read_buf(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(_) => {}
        }
    }
    shared.disconnect();
}

fn deliver(shared: &Shared, response: Response) {
    let waiter = shared
        .lock()
        .map
        .as_mut()
        .and_then(|m| m.remove(&response.id));
    match waiter {
        // The permit drops here, freeing the slot.
        Some((tx, _permit)) => {
            let _ = tx.send(Ok(response.body));
        }
        None => tracing::warn!(id = response.id, "response to an unknown request id"),
    }
}
