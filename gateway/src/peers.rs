//! The gateway-to-gateway link (`proto::peer`): telling the gateway a
//! recipient is online on to push a message already stored in its mailbox,
//! and serving such forwards from the others and cluster-map pushes
//! (`imctl rebalance`, see [`crate::map_push`]). One pipelined TCP
//! connection per peer, opened on first use; a broken link fails its
//! forwards (the recipient finds the message by seq).

use crate::{driver::Cmd, services::Services};
use bytes::BytesMut;
use presence::PresenceClient;
use proto::{
    frame::{self, Decoded, FRAME_BODY_BYTES_MAX_DEFAULT},
    peer::{Forward, PeerOutcome, PeerRequest, PeerRequestBody, PeerResponse, PeerResponseBody},
};
use std::{collections::HashMap, sync::Arc};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{tcp::OwnedWriteHalf, TcpListener, TcpStream},
    sync::{mpsc, oneshot, Mutex},
};

/// Forwards waiting for an answer on one link at most; beyond it `forward`
/// waits for room.
pub const PEER_IN_FLIGHT_MAX: usize = 4096;
/// Largest peer frame body (a message body is at most 16 KiB).
pub const PEER_FRAME_BYTES_MAX: usize = FRAME_BODY_BYTES_MAX_DEFAULT;

type Waiter = oneshot::Sender<PeerOutcome>;

/// Connections to the other gateways, by gateway id.
#[derive(Default)]
pub struct PeerLinks {
    links: Mutex<HashMap<u32, mpsc::Sender<(Forward, Waiter)>>>,
}

impl PeerLinks {
    /// Forward to gateway `gateway`; `None` if it cannot be reached or the
    /// link failed before an answer.
    /// Presence is asked for the gateway's address only to open a link.
    pub async fn forward(
        &self,
        presence: &PresenceClient,
        gateway: u32,
        forward: Forward,
    ) -> Option<PeerOutcome> {
        let link = self.link(presence, gateway).await?;
        let (tx, rx) = oneshot::channel();
        link.send((forward, tx)).await.ok()?;
        rx.await.ok()
    }

    async fn link(
        &self,
        presence: &PresenceClient,
        gateway: u32,
    ) -> Option<mpsc::Sender<(Forward, Waiter)>> {
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
        let stream = match TcpStream::connect(addr.as_str()).await {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(gateway, addr, error = %e, "cannot reach peer gateway");
                return None;
            }
        };
        let _ = stream.set_nodelay(true);
        let (tx, rx) = mpsc::channel(PEER_IN_FLIGHT_MAX);
        tokio::spawn(run_link(stream, rx));
        links.insert(gateway, tx.clone());
        Some(tx)
    }
}

/// One outgoing link: write forwards, match answers by id. Ends (failing
/// every waiter) when the connection breaks.
async fn run_link(stream: TcpStream, mut requests: mpsc::Receiver<(Forward, Waiter)>) {
    let (mut rd, mut wr) = stream.into_split();
    let mut waiting: HashMap<u64, Waiter> = HashMap::new();
    let mut next_id = 0u64;
    let mut buf = BytesMut::with_capacity(64 * 1024);
    let mut out = Vec::new();
    loop {
        tokio::select! {
            request = requests.recv() => {
                let Some((forward, waiter)) = request else { return };
                next_id += 1;
                out.clear();
                let request = PeerRequest { id: next_id, body: PeerRequestBody::Forward(forward) };
                if frame::encode(&request, PEER_FRAME_BYTES_MAX, &mut out).is_err() {
                    continue; // dropping the waiter fails the forward
                }
                waiting.insert(next_id, waiter);
                if wr.write_all(&out).await.is_err() {
                    return;
                }
            }
            read = rd.read_buf(&mut buf) => {
                if !matches!(read, Ok(n) if n > 0) {
                    return;
                }
                while let Ok(Decoded::Frame(r)) = frame::decode::<PeerResponse>(&mut buf, PEER_FRAME_BYTES_MAX) {
                    // A waiter answered with anything else is dropped: its
                    // forward failed.
                    if let (Some(w), PeerResponseBody::Forwarded(outcome)) = (waiting.remove(&r.id), r.body) {
                        let _ = w.send(outcome);
                    }
                }
            }
        }
    }
}

/// Accept links from other gateways (and tools); every forward goes to the
/// event loop, every map push to the map keeper.
pub async fn serve(
    listener: TcpListener,
    cmds: mpsc::UnboundedSender<Cmd>,
    services: Arc<Services>,
) {
    loop {
        let Ok((stream, from)) = listener.accept().await else {
            continue;
        };
        let _ = stream.set_nodelay(true);
        tracing::debug!(%from, "peer gateway connected");
        tokio::spawn(serve_link(stream, cmds.clone(), services.clone()));
    }
}

async fn serve_link(stream: TcpStream, cmds: mpsc::UnboundedSender<Cmd>, services: Arc<Services>) {
    let (mut rd, wr) = stream.into_split();
    let wr = Arc::new(Mutex::new(wr));
    let in_flight = Arc::new(tokio::sync::Semaphore::new(PEER_IN_FLIGHT_MAX));
    let mut buf = BytesMut::with_capacity(64 * 1024);
    loop {
        match frame::decode::<PeerRequest>(&mut buf, PEER_FRAME_BYTES_MAX) {
            Ok(Decoded::Frame(request)) => {
                let Ok(permit) = in_flight.clone().acquire_owned().await else {
                    return;
                };
                let answer = match request.body {
                    PeerRequestBody::Forward(forward) => {
                        let (tx, rx) = oneshot::channel();
                        if cmds.send(Cmd::PeerForward { forward, reply: tx }).is_err() {
                            return;
                        }
                        Answer::Forward(rx)
                    }
                    PeerRequestBody::MapUpdate(map) => Answer::Map(map),
                };
                tokio::spawn(answer_one(
                    request.id,
                    answer,
                    services.clone(),
                    wr.clone(),
                    permit,
                ));
            }
            Ok(Decoded::Incomplete) => match rd.read_buf(&mut buf).await {
                Ok(n) if n > 0 => {}
                _ => return,
            },
            Err(e) => {
                metrics::counter!("gateway_bad_peer_frames_total").increment(1);
                tracing::warn!(error = %e, "bad frame from a peer gateway; closing the link");
                return;
            }
        }
    }
}

/// What a request is waiting for.
enum Answer {
    /// The event loop's outcome of a forward.
    Forward(oneshot::Receiver<PeerOutcome>),
    /// A map to offer to the map keeper.
    Map(proto::cluster::ClusterMap),
}

/// Wait for one request's answer and write it back.
async fn answer_one(
    id: u64,
    answer: Answer,
    services: Arc<Services>,
    wr: Arc<Mutex<OwnedWriteHalf>>,
    _permit: tokio::sync::OwnedSemaphorePermit,
) {
    let body = match answer {
        Answer::Forward(rx) => {
            PeerResponseBody::Forwarded(rx.await.unwrap_or(PeerOutcome::NotHere))
        }
        Answer::Map(map) => PeerResponseBody::Map(services.maps.offer(&services.shards, map).await),
    };
    let mut out = Vec::new();
    if frame::encode(&PeerResponse { id, body }, PEER_FRAME_BYTES_MAX, &mut out).is_ok() {
        let _ = wr.lock().await.write_all(&out).await;
    }
}
