//! The gateway-to-gateway link (`proto::peer`): telling the gateway a
//! recipient is online on to push a message already stored in its mailbox,
//! and serving such forwards from the others and cluster-map pushes
//! (`imctl rebalance`, see [`crate::map_push`]). One pipelined TCP
//! connection per peer, opened on first use; a broken link fails its
//! forwards (the recipient finds the message by seq).
//!
//! Limits of the peer port (what happens at each):
//! * `limits.peer_connections_max` links open at once: a further connection
//!   is accepted and closed at once, so the backlog never fills
//!   (`gateway_peer_connections_refused_total`, warned at most once per
//!   10 s); `gateway_peer_connections` is the number open;
//! * `timers.peer_idle_timeout_s` without a complete frame: the link is
//!   closed (`gateway_peer_idle_closed_total`); a forward racing the close
//!   fails like on any broken link;
//! * a frame body over [`PEER_FRAME_BYTES_MAX`] or bytes that are not a
//!   request: the link is closed (`gateway_bad_peer_frames_total`), so a
//!   link buffers at most one frame and one read;
//! * [`PEER_IN_FLIGHT_MAX`] requests of one link unanswered: the link is
//!   not read until answers are written;
//! * accept errors back off instead of spinning ([`daemon::Acceptor`],
//!   `gateway_peer_accept_errors_total{kind}`).

use crate::{driver::Cmd, services::Services};
use bytes::BytesMut;
use daemon::secure::{GateLimits, Link, LinkWriter, SecureListener};
use presence::PresenceReplicas;
use proto::{
    frame::{self, Decoded, FRAME_BODY_BYTES_MAX_DEFAULT},
    peer::{
        Forward, GroupForward, PeerOutcome, PeerRequest, PeerRequestBody, PeerResponse,
        PeerResponseBody,
    },
};
use std::{collections::HashMap, sync::Arc, time::Duration};
use tokio::{
    io::{AsyncRead, AsyncReadExt},
    net::TcpListener,
    sync::{mpsc, oneshot, Mutex, OwnedSemaphorePermit, Semaphore},
    time::Instant,
};

/// Forwards waiting for an answer on one link at most; beyond it `forward`
/// waits for room.
pub const PEER_IN_FLIGHT_MAX: usize = 4096;
/// Largest peer frame body (a message body is at most 16 KiB).
pub const PEER_FRAME_BYTES_MAX: usize = FRAME_BODY_BYTES_MAX_DEFAULT;

type Waiter = oneshot::Sender<PeerResponseBody>;
type LinkSender = mpsc::Sender<(PeerRequestBody, Waiter)>;

/// Connections to the other gateways, by gateway id.
#[derive(Default)]
pub struct PeerLinks {
    links: Mutex<HashMap<u32, LinkSender>>,
}

impl PeerLinks {
    /// Forward to gateway `gateway`; `None` if it cannot be reached or the
    /// link failed before an answer.
    /// Presence is asked for the gateway's address only to open a link.
    pub async fn forward(
        &self,
        presence: &PresenceReplicas,
        gateway: u32,
        forward: Forward,
    ) -> Option<PeerOutcome> {
        let body = PeerRequestBody::Forward(forward);
        match self.request(presence, gateway, body).await? {
            PeerResponseBody::Forwarded(outcome) => Some(outcome),
            _ => None,
        }
    }

    /// Forward a group message to gateway `gateway`; how many of its
    /// members there got it, or `None` as for [`PeerLinks::forward`].
    pub async fn group_forward(
        &self,
        presence: &PresenceReplicas,
        gateway: u32,
        forward: GroupForward,
    ) -> Option<u32> {
        let body = PeerRequestBody::GroupForward(forward);
        match self.request(presence, gateway, body).await? {
            PeerResponseBody::GroupForwarded { pushed } => Some(pushed),
            _ => None,
        }
    }

    async fn request(
        &self,
        presence: &PresenceReplicas,
        gateway: u32,
        body: PeerRequestBody,
    ) -> Option<PeerResponseBody> {
        let link = self.link(presence, gateway).await?;
        let (tx, rx) = oneshot::channel();
        link.send((body, tx)).await.ok()?;
        rx.await.ok()
    }

    async fn link(&self, presence: &PresenceReplicas, gateway: u32) -> Option<LinkSender> {
        let mut links = self.links.lock().await;
        if let Some(l) = links.get(&gateway).filter(|l| !l.is_closed()) {
            return Some(l.clone());
        }
        let addr = presence
            .gateways()
            .await
            .ok()?
            .into_iter()
            .find(|g| g.gateway == gateway && !g.peer_addr.is_empty())?
            .peer_addr;
        let stream = match daemon::secure::connect(addr.as_str()).await {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(gateway, addr, error = %e, "cannot reach peer gateway");
                return None;
            }
        };
        let (tx, rx) = mpsc::channel(PEER_IN_FLIGHT_MAX);
        tokio::spawn(run_link(stream, rx));
        links.insert(gateway, tx.clone());
        Some(tx)
    }
}

/// One outgoing link: write requests, match answers by id. Ends (failing
/// every waiter) when the connection breaks.
async fn run_link(stream: Link, mut requests: mpsc::Receiver<(PeerRequestBody, Waiter)>) {
    let (mut rd, mut wr) = stream.into_split();
    let mut waiting: HashMap<u64, Waiter> = HashMap::new();
    let mut next_id = 0u64;
    let mut buf = BytesMut::with_capacity(64 * 1024);
    let mut out = Vec::new();
    loop {
        tokio::select! {
            request = requests.recv() => {
                let Some((body, waiter)) = request else { return };
                next_id += 1;
                out.clear();
                let request = PeerRequest { id: next_id, body };
                if frame::encode(&request, PEER_FRAME_BYTES_MAX, &mut out).is_err() {
                    continue; // dropping the waiter fails the forward
                }
                waiting.insert(next_id, waiter);
                if wr.send(&out).await.is_err() {
                    return;
                }
            }
            read = rd.read_buf(&mut buf) => {
                if !matches!(read, Ok(n) if n > 0) {
                    return;
                }
                while let Ok(Decoded::Frame(r)) = frame::decode::<PeerResponse>(&mut buf, PEER_FRAME_BYTES_MAX) {
                    if let Some(w) = waiting.remove(&r.id) {
                        let _ = w.send(r.body);
                    }
                }
            }
        }
    }
}

/// Accept links from other gateways (and tools); every forward goes to the
/// event loop, every map push to the map keeper. Runs until aborted (the
/// gateway's shutdown); the links end with the process.
pub async fn serve(
    listener: TcpListener,
    cmds: mpsc::UnboundedSender<Cmd>,
    services: Arc<Services>,
) {
    let max = services.config.limits.peer_connections_max;
    let idle = Duration::from_secs(services.config.timers.peer_idle_timeout_s.into());
    let slots = Arc::new(Semaphore::new(max));
    let mut refusals = daemon::LogLimiter::new(daemon::accept::WARN_INTERVAL);
    let mut acceptor = SecureListener::new(listener, "gateway_peer", GateLimits::default());
    loop {
        let stream = acceptor.accept().await;
        let from = stream.peer;
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            metrics::counter!("gateway_peer_connections_refused_total").increment(1);
            if let Some(held_back) = refusals.check() {
                tracing::warn!(%from, max, held_back, "peer connection limit reached; closing");
            }
            drop(stream);
            continue;
        };
        tracing::debug!(%from, "peer gateway connected");
        let open = OpenLink::new(slot);
        let (cmds, services) = (cmds.clone(), services.clone());
        tokio::spawn(async move {
            serve_link(stream, cmds, services, idle).await;
            drop(open);
            tracing::debug!(%from, "peer link closed");
        });
    }
}

/// One link counted in `gateway_peer_connections`, holding its slot.
struct OpenLink(#[allow(dead_code)] OwnedSemaphorePermit);

impl OpenLink {
    fn new(slot: OwnedSemaphorePermit) -> OpenLink {
        metrics::gauge!("gateway_peer_connections").increment(1.0);
        OpenLink(slot)
    }
}

impl Drop for OpenLink {
    fn drop(&mut self) {
        metrics::gauge!("gateway_peer_connections").decrement(1.0);
    }
}

/// "bad frame from a peer gateway" warnings: at most one per interval, with
/// how many were held back (`gateway_bad_peer_frames_total` counts them
/// all).
static BAD_PEER_FRAME_WARNINGS: daemon::SharedLogLimiter =
    daemon::SharedLogLimiter::new(daemon::accept::WARN_INTERVAL);

/// What reading a link brought.
#[derive(Debug)]
enum LinkRead {
    Request(PeerRequest),
    /// The other side closed the link, or it failed.
    Closed,
    /// No complete frame before the idle deadline.
    Idle,
    Bad(frame::FrameError),
}

/// The next request in `buf`, reading `rd` as needed until `deadline`.
async fn next_request(
    rd: &mut (impl AsyncRead + Unpin),
    buf: &mut BytesMut,
    deadline: Instant,
) -> LinkRead {
    loop {
        match frame::decode::<PeerRequest>(buf, PEER_FRAME_BYTES_MAX) {
            Ok(Decoded::Frame(request)) => return LinkRead::Request(request),
            Ok(Decoded::Incomplete) => {
                match tokio::time::timeout_at(deadline, rd.read_buf(buf)).await {
                    Ok(Ok(n)) if n > 0 => {}
                    Ok(_) => return LinkRead::Closed,
                    Err(_) => return LinkRead::Idle,
                }
            }
            Err(e) => return LinkRead::Bad(e),
        }
    }
}

async fn serve_link(
    stream: Link,
    cmds: mpsc::UnboundedSender<Cmd>,
    services: Arc<Services>,
    idle: Duration,
) {
    let (mut rd, wr) = stream.into_split();
    let wr = Arc::new(Mutex::new(wr));
    let in_flight = Arc::new(tokio::sync::Semaphore::new(PEER_IN_FLIGHT_MAX));
    let mut buf = BytesMut::with_capacity(64 * 1024);
    let mut deadline = Instant::now() + idle;
    loop {
        let request = match next_request(&mut rd, &mut buf, deadline).await {
            LinkRead::Request(request) => request,
            LinkRead::Closed => return,
            LinkRead::Idle => {
                metrics::counter!("gateway_peer_idle_closed_total").increment(1);
                tracing::debug!(?idle, "peer link idle; closing it");
                return;
            }
            LinkRead::Bad(e) => {
                metrics::counter!("gateway_bad_peer_frames_total").increment(1);
                if let Some(held_back) = BAD_PEER_FRAME_WARNINGS.check() {
                    tracing::warn!(error = %e, held_back, "bad frame from a peer gateway; closing the link");
                }
                return;
            }
        };
        let Ok(permit) = in_flight.clone().acquire_owned().await else {
            return;
        };
        deadline = Instant::now() + idle;
        let answer = match request.body {
            PeerRequestBody::Forward(forward) => {
                let (tx, rx) = oneshot::channel();
                if cmds.send(Cmd::PeerForward { forward, reply: tx }).is_err() {
                    return;
                }
                Answer::Forward(rx)
            }
            PeerRequestBody::MapUpdate(map) => Answer::Map(map),
            PeerRequestBody::GroupForward(forward) => {
                let (tx, rx) = oneshot::channel();
                if cmds
                    .send(Cmd::PeerGroupForward { forward, reply: tx })
                    .is_err()
                {
                    return;
                }
                Answer::GroupForward(rx)
            }
        };
        tokio::spawn(answer_one(
            request.id,
            answer,
            services.clone(),
            wr.clone(),
            permit,
        ));
    }
}

/// What a request is waiting for.
enum Answer {
    /// The event loop's outcome of a forward.
    Forward(oneshot::Receiver<PeerOutcome>),
    /// A map to offer to the map keeper.
    Map(proto::cluster::ClusterMap),
    /// The event loop's count of members a group message was pushed to.
    GroupForward(oneshot::Receiver<u32>),
}

/// Wait for one request's answer and write it back.
async fn answer_one(
    id: u64,
    answer: Answer,
    services: Arc<Services>,
    wr: Arc<Mutex<LinkWriter>>,
    _permit: tokio::sync::OwnedSemaphorePermit,
) {
    let body = match answer {
        Answer::Forward(rx) => {
            PeerResponseBody::Forwarded(rx.await.unwrap_or(PeerOutcome::NotHere))
        }
        Answer::Map(map) => PeerResponseBody::Map(services.maps.offer(&services.shards, map).await),
        Answer::GroupForward(rx) => PeerResponseBody::GroupForwarded {
            pushed: rx.await.unwrap_or(0),
        },
    };
    let mut out = Vec::new();
    if frame::encode(&PeerResponse { id, body }, PEER_FRAME_BYTES_MAX, &mut out).is_ok() {
        let _ = wr.lock().await.send(&out).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;

    fn request_frame(id: u64) -> Vec<u8> {
        let forward = Forward {
            to: 7,
            from: 8,
            msg_id: 9,
            sent_at_ms: 10,
            body: b"hi".to_vec(),
            seq: 11,
        };
        let mut out = Vec::new();
        let request = PeerRequest {
            id,
            body: PeerRequestBody::Forward(forward),
        };
        frame::encode(&request, PEER_FRAME_BYTES_MAX, &mut out).unwrap();
        out
    }

    /// Paused time: the idle deadline passes as soon as nothing else can
    /// happen, so these tests wait for no clock.
    #[tokio::test(start_paused = true)]
    async fn a_link_without_a_complete_frame_until_its_deadline_is_idle() {
        let (mut near, mut far) = tokio::io::duplex(1024);
        let mut buf = BytesMut::new();
        let idle = Duration::from_secs(300);

        near.write_all(&request_frame(1)).await.unwrap();
        let read = next_request(&mut far, &mut buf, Instant::now() + idle).await;
        assert!(
            matches!(read, LinkRead::Request(ref r) if r.id == 1),
            "{read:?}"
        );

        // Silence.
        let read = next_request(&mut far, &mut buf, Instant::now() + idle).await;
        assert!(matches!(read, LinkRead::Idle), "{read:?}");

        // Half a frame, then silence: still idle.
        let frame = request_frame(2);
        near.write_all(&frame[..frame.len() / 2]).await.unwrap();
        let read = next_request(&mut far, &mut buf, Instant::now() + idle).await;
        assert!(matches!(read, LinkRead::Idle), "{read:?}");

        // The rest before the deadline: the frame.
        let deadline = Instant::now() + idle;
        let rest = frame[frame.len() / 2..].to_vec();
        let writer = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_secs(299)).await;
            near.write_all(&rest).await.unwrap();
            near
        });
        let read = next_request(&mut far, &mut buf, deadline).await;
        assert!(
            matches!(read, LinkRead::Request(ref r) if r.id == 2),
            "{read:?}"
        );

        drop(writer.await.unwrap());
        let read = next_request(&mut far, &mut buf, Instant::now() + idle).await;
        assert!(matches!(read, LinkRead::Closed), "{read:?}");
    }

    #[tokio::test]
    async fn an_oversized_frame_is_refused_without_buffering_it() {
        let (mut near, mut far) = tokio::io::duplex(1024);
        let mut buf = BytesMut::new();
        let len = (PEER_FRAME_BYTES_MAX as u32 + 1).to_le_bytes();
        near.write_all(&len).await.unwrap();
        let deadline = Instant::now() + Duration::from_secs(300);
        let read = next_request(&mut far, &mut buf, deadline).await;
        assert!(matches!(read, LinkRead::Bad(_)), "{read:?}");
    }
}
