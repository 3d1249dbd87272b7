//! TCP server of the profile protocol ([`proto::profile`]).
//!
//! Each connection has a reader task and a writer task. The reader decodes
//! requests: reads (profiles, login views, avatar ranges) are answered at
//! once from an LMDB read transaction; everything else (password checks,
//! writes) runs in its own task, so a slow argon2 check never holds up the
//! reads behind it (responses carry their request's id and may come back
//! out of order). The writer task sends responses and, once the connection
//! subscribed, pushed events, gathering whatever is ready into one write.
//!
//! Limits and what happens at each:
//! * a frame over `server.frame_body_bytes_max` or bytes that are not a
//!   request: the connection is closed (`profile_bad_frames_total`);
//! * `server.inflight_requests_max` unanswered requests of one connection:
//!   the reader stops reading until answers are written (back-pressure);
//! * `server.connections_max` connections: further ones are accepted and
//!   closed at once (`profile_connections_rejected_total`);
//! * a subscriber's queue at `server.subscriber_events_max`: collapsed into
//!   one `CacheReset` (see [`crate::notify`]).
//!
//! Shutdown: stop accepting, stop reading, let in-flight requests answer
//! (up to `server.shutdown_drain_ms`), close.

use crate::{
    config::ServerConfig,
    notify::Subscription,
    service::{op_name, Service},
};
use bytes::BytesMut;
use daemon::secure::{GateLimits, Link, LinkWriter, SecureListener};
use proto::{
    frame::{self, Decoded},
    profile::{
        ErrorCode, ProfileError, Request, RequestBody, Response, ResponseBody, ServerMessage,
    },
};
use std::{
    net::SocketAddr,
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc,
    },
    time::Duration,
};
use tokio::{
    io::AsyncReadExt,
    net::TcpListener,
    sync::{mpsc, watch, OwnedSemaphorePermit, Semaphore},
};

/// Largest response frame body the server sends (a login view of
/// `friends_max` friends with long signatures fits).
pub const RESPONSE_BODY_BYTES_MAX: usize = 16 * 1024 * 1024;

/// Bytes gathered into one socket write at most.
const WRITE_BATCH_BYTES: usize = 256 * 1024;
const READ_CHUNK_BYTES: usize = 64 * 1024;

enum Out {
    Response(Response, OwnedSemaphorePermit),
    Subscribed(u64, Arc<Subscription>, OwnedSemaphorePermit),
}

struct Shared {
    service: Arc<Service>,
    config: ServerConfig,
    connections: AtomicUsize,
    shutdown: watch::Receiver<bool>,
}

/// Serve `listener` until `shutdown` turns true; then drain and return.
pub async fn run(
    listener: TcpListener,
    service: Arc<Service>,
    config: ServerConfig,
    shutdown: watch::Receiver<bool>,
) {
    let shared = Arc::new(Shared {
        service,
        config,
        connections: AtomicUsize::new(0),
        shutdown: shutdown.clone(),
    });
    let mut stop = shutdown;
    let mut tasks = tokio::task::JoinSet::new();
    let mut acceptor = SecureListener::new(listener, "profile", GateLimits::default());
    loop {
        tokio::select! {
            link = acceptor.accept() => admit(&shared, &mut tasks, link),
            _ = stopped(&mut stop) => break,
        }
        while tasks.try_join_next().is_some() {}
    }
    drop(acceptor);
    let drain = Duration::from_millis(shared.config.shutdown_drain_ms);
    if tokio::time::timeout(drain, async { while tasks.join_next().await.is_some() {} })
        .await
        .is_err()
    {
        tracing::warn!("connections did not drain in time; cutting them");
        tasks.abort_all();
    }
}

fn admit(shared: &Arc<Shared>, tasks: &mut tokio::task::JoinSet<()>, link: Link) {
    let peer = link.peer;
    if shared.connections.load(Ordering::Relaxed) >= shared.config.connections_max {
        metrics::counter!("profile_connections_rejected_total").increment(1);
        tracing::warn!(%peer, "connection limit reached; closing");
        return;
    }
    shared.connections.fetch_add(1, Ordering::Relaxed);
    metrics::gauge!("profile_connections").increment(1.0);
    let shared = shared.clone();
    tasks.spawn(async move {
        serve(&shared, link, peer).await;
        shared.connections.fetch_sub(1, Ordering::Relaxed);
        metrics::gauge!("profile_connections").decrement(1.0);
    });
}

/// "bad frame" warnings (one per connection closed for one): at most one
/// per interval, with how many were held back (`profile_bad_frames_total`
/// counts them all).
static BAD_FRAME_WARNINGS: daemon::SharedLogLimiter =
    daemon::SharedLogLimiter::new(daemon::accept::WARN_INTERVAL);

async fn serve(shared: &Arc<Shared>, link: Link, peer: SocketAddr) {
    let (mut rd, wr) = link.into_split();
    let (out_tx, out_rx) = mpsc::unbounded_channel();
    let writer = tokio::spawn(write_loop(wr, out_rx, peer));
    let slots = Arc::new(Semaphore::new(shared.config.inflight_requests_max));
    let mut buf = BytesMut::with_capacity(READ_CHUNK_BYTES);
    let mut stop = shared.shutdown.clone();
    'read: loop {
        loop {
            match frame::decode::<Request>(&mut buf, shared.config.frame_body_bytes_max) {
                Ok(Decoded::Frame(request)) => {
                    let Ok(permit) = slots.clone().acquire_owned().await else {
                        break 'read;
                    };
                    dispatch(shared, request, permit, &out_tx);
                }
                Ok(Decoded::Incomplete) => break,
                Err(e) => {
                    metrics::counter!("profile_bad_frames_total").increment(1);
                    if let Some(held_back) = BAD_FRAME_WARNINGS.check() {
                        tracing::warn!(%peer, reason = %e, held_back, "bad frame; closing connection");
                    }
                    writer.abort();
                    return;
                }
            }
        }
        buf.reserve(READ_CHUNK_BYTES);
        tokio::select! {
            read = rd.read_buf(&mut buf) => match read {
                Ok(0) | Err(_) => break,
                Ok(_) => {}
            },
            _ = stopped(&mut stop) => break,
        }
    }
    // Let every request read so far answer, then close.
    drop(out_tx);
    let _ = writer.await;
}

fn dispatch(
    shared: &Arc<Shared>,
    request: Request,
    permit: OwnedSemaphorePermit,
    out: &mpsc::UnboundedSender<Out>,
) {
    metrics::counter!("profile_requests_total", "op" => op_name(&request.body)).increment(1);
    let Request { id, body } = request;
    if matches!(body, RequestBody::Subscribe) {
        let sub = shared
            .service
            .hub()
            .subscribe(shared.config.subscriber_events_max);
        let _ = out.send(Out::Subscribed(id, sub, permit));
    } else if Service::is_read(&body) && !shared.service.reads_wait() {
        let body = shared.service.read(body);
        let _ = out.send(Out::Response(Response { id, body }, permit));
    } else {
        let service = shared.service.clone();
        let out = out.clone();
        tokio::spawn(async move {
            let body = service.handle(body).await;
            let _ = out.send(Out::Response(Response { id, body }, permit));
        });
    }
}

/// Resolves once shutdown was asked for (or its sender is gone).
async fn stopped(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}

async fn next_events(sub: &Option<Arc<Subscription>>) -> Vec<proto::profile::Event> {
    match sub {
        Some(sub) => sub.next_events().await,
        None => std::future::pending().await,
    }
}

async fn write_loop(mut wr: LinkWriter, mut rx: mpsc::UnboundedReceiver<Out>, peer: SocketAddr) {
    let mut sub: Option<Arc<Subscription>> = None;
    let mut buf = Vec::with_capacity(WRITE_BATCH_BYTES);
    let mut permits = Vec::new();
    loop {
        tokio::select! {
            biased;
            out = rx.recv() => match out {
                Some(out) => take(out, &mut buf, &mut permits, &mut sub),
                None => break,
            },
            events = next_events(&sub) => {
                for e in events {
                    encode(&ServerMessage::Event(e), &mut buf);
                }
            }
        }
        while buf.len() < WRITE_BATCH_BYTES {
            match rx.try_recv() {
                Ok(out) => take(out, &mut buf, &mut permits, &mut sub),
                Err(_) => break,
            }
        }
        if let Err(e) = wr.send(&buf).await {
            tracing::debug!(%peer, error = %e, "write failed");
            return;
        }
        buf.clear();
        permits.clear();
    }
    let _ = wr.send(&buf).await;
    let _ = wr.shutdown().await;
}

fn take(
    out: Out,
    buf: &mut Vec<u8>,
    permits: &mut Vec<OwnedSemaphorePermit>,
    sub: &mut Option<Arc<Subscription>>,
) {
    let (response, permit) = match out {
        Out::Response(r, p) => (r, p),
        Out::Subscribed(id, s, p) => {
            *sub = Some(s);
            (
                Response {
                    id,
                    body: ResponseBody::Subscribed,
                },
                p,
            )
        }
    };
    encode(&ServerMessage::Response(response), buf);
    permits.push(permit);
}

fn encode(msg: &ServerMessage, buf: &mut Vec<u8>) {
    if let Err(e) = frame::encode(msg, RESPONSE_BODY_BYTES_MAX, buf) {
        tracing::error!(error = %e, "message cannot be encoded");
        if let ServerMessage::Response(r) = msg {
            let fallback = ServerMessage::Response(Response {
                id: r.id,
                body: ResponseBody::Error(ProfileError {
                    code: ErrorCode::Storage,
                    message: format!("response cannot be encoded: {e}"),
                }),
            });
            let _ = frame::encode(&fallback, RESPONSE_BODY_BYTES_MAX, buf);
        }
    }
}
