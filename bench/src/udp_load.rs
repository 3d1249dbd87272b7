//! UDP echo load over real loopback sockets: one load-generator loop that
//! drives any [`Peer`] (raw datagrams, an encrypted session, a stream of
//! handshakes) with the same batched I/O, and the raw UDP echo server
//! (the ceiling: the same batching, no crypto, no reliability).

use anyhow::{Context, Result};
use client::echo::RECV_BATCHES_PER_PASS;
use netio::udp::{self, RecvBatch, SendBatch};
use proto::session::{wire, ClientConfig, ClientSession, Event, SendError};
use rand::{rngs::OsRng, RngCore};
use std::{
    collections::{HashMap, VecDeque},
    net::SocketAddr,
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};
use tokio::net::UdpSocket;

/// How often a load loop looks at its stop flag when nothing happens.
const STOP_POLL: Duration = Duration::from_millis(20);
/// How often the handshake load looks for handshakes to retransmit.
const HANDSHAKE_SCAN: Duration = Duration::from_millis(50);

/// One client's side of an echo load: what it sends and what counts as a
/// completed round trip.
pub trait Peer {
    /// A datagram from the server; the round trips it completed.
    fn on_datagram(&mut self, now: Instant, d: &[u8]) -> u64;
    /// The next datagram to send, written into `buf`.
    fn poll_transmit(&mut self, now: Instant, buf: &mut [u8]) -> Option<usize>;
    fn poll_timeout(&self) -> Option<Instant>;
    fn handle_timeout(&mut self, now: Instant);
    /// What went wrong, if anything (reported with the figures).
    fn problem(&self) -> Option<String> {
        None
    }
}

/// Counters shared by the load loops and the phase's timer.
#[derive(Default)]
pub struct LoadShared {
    pub completed: AtomicU64,
    pub stop: AtomicBool,
}

/// Drive `peer` over `socket` against `server` until `shared.stop`.
pub async fn drive<P: Peer>(
    mut peer: P,
    socket: UdpSocket,
    server: SocketAddr,
    shared: Arc<LoadShared>,
) -> Result<P> {
    let mut inbox = RecvBatch::new();
    let mut outbox = SendBatch::new();
    while !shared.stop.load(Ordering::Relaxed) {
        let now = Instant::now();
        udp::send_all(&socket, &mut outbox, |buf| {
            peer.poll_transmit(now, buf).map(|n| (server, n))
        })
        .await;
        let wake = peer
            .poll_timeout()
            .map_or(now + STOP_POLL, |t| t.min(now + STOP_POLL));
        tokio::select! {
            r = socket.readable() => r.context("wait for the socket")?,
            () = netio::sleep_until(Some(wake)) => {}
        }
        let now = Instant::now();
        let mut completed = 0;
        while udp::try_recv(&socket, &mut inbox).context("recvmmsg")? > 0 {
            for (_, d) in inbox.iter() {
                completed += peer.on_datagram(now, d);
            }
        }
        shared.completed.fetch_add(completed, Ordering::Relaxed);
        if peer.poll_timeout().is_some_and(|t| t <= now) {
            peer.handle_timeout(now);
        }
    }
    Ok(peer)
}

/// The raw UDP echo server: every datagram straight back, with the echo
/// server's batching (drain up to `RECV_BATCHES_PER_PASS` receive
/// batches, then flush in send batches).
pub async fn raw_echo_server(socket: UdpSocket) -> Result<()> {
    let mut inbox = RecvBatch::new();
    let mut outbox = SendBatch::new();
    loop {
        socket.readable().await.context("wait for the socket")?;
        for _ in 0..RECV_BATCHES_PER_PASS {
            if udp::try_recv(&socket, &mut inbox).context("recvmmsg")? == 0 {
                break;
            }
            for (from, d) in inbox.iter() {
                if outbox.is_full() {
                    udp::send(&socket, &mut outbox).await;
                }
                outbox.push(from, d).expect("not full");
            }
        }
        if !outbox.is_empty() {
            udp::send(&socket, &mut outbox).await;
        }
    }
}

/// Raw datagrams: `window` in flight, one more sent per echo.
pub struct RawPeer {
    payload: Vec<u8>,
    owed: usize,
}

impl RawPeer {
    pub fn new(payload: Vec<u8>, window: usize) -> Self {
        RawPeer {
            payload,
            owed: window,
        }
    }
}

impl Peer for RawPeer {
    fn on_datagram(&mut self, _now: Instant, d: &[u8]) -> u64 {
        if d.len() != self.payload.len() {
            return 0;
        }
        self.owed += 1;
        1
    }

    fn poll_transmit(&mut self, _now: Instant, buf: &mut [u8]) -> Option<usize> {
        if self.owed == 0 {
            return None;
        }
        self.owed -= 1;
        buf[..self.payload.len()].copy_from_slice(&self.payload);
        Some(self.payload.len())
    }

    fn poll_timeout(&self) -> Option<Instant> {
        None
    }

    fn handle_timeout(&mut self, _now: Instant) {}
}

/// An encrypted reliable session: once connected, `window` messages in
/// flight, one more sent per echoed message.
pub struct SessionPeer {
    session: ClientSession,
    payload: Vec<u8>,
    window: usize,
    /// Messages owed to the window that the send queue refused so far.
    unsent: usize,
    pub connected: bool,
    pub closed: Option<Event>,
}

impl SessionPeer {
    pub fn new(now: Instant, server_public: [u8; 32], payload: Vec<u8>, window: usize) -> Self {
        let session = ClientSession::new(
            now,
            ClientConfig::default(),
            server_public,
            b"bench login",
            os_seed(),
        )
        .expect("short login payload");
        SessionPeer {
            session,
            payload,
            window,
            unsent: 0,
            connected: false,
            closed: None,
        }
    }

    /// Handle the session's events; the echoes among them.
    fn drain_events(&mut self) -> u64 {
        let mut echoes = 0;
        while let Some(event) = self.session.poll_event() {
            match event {
                Event::Connected { .. } => {
                    self.connected = true;
                    self.unsent += self.window;
                }
                Event::Message(_) => {
                    echoes += 1;
                    self.unsent += 1;
                }
                e @ (Event::Closed(_) | Event::Rejected { .. } | Event::GivenUp { .. }) => {
                    self.closed.get_or_insert(e);
                }
                Event::Acked(_) => {}
            }
        }
        while self.unsent > 0 {
            match self.session.send(self.payload.clone()) {
                Ok(_) => self.unsent -= 1,
                Err(SendError::QueueFull) => break,
                Err(_) => break, // closed: reported by `closed`
            }
        }
        echoes
    }
}

impl Peer for SessionPeer {
    fn on_datagram(&mut self, now: Instant, d: &[u8]) -> u64 {
        self.session.handle_datagram(now, d);
        self.drain_events()
    }

    fn poll_transmit(&mut self, now: Instant, buf: &mut [u8]) -> Option<usize> {
        self.session.poll_transmit(now, buf)
    }

    fn poll_timeout(&self) -> Option<Instant> {
        self.session.poll_timeout()
    }

    fn handle_timeout(&mut self, now: Instant) {
        self.session.handle_timeout(now);
        self.drain_events();
    }

    fn problem(&self) -> Option<String> {
        match (&self.closed, self.connected) {
            (Some(e), _) => Some(format!("a session ended: {e:?}")),
            (None, false) => Some("a session never connected".into()),
            (None, true) => None,
        }
    }
}

/// Handshakes back to back on one socket: `in_flight` at a time, each
/// replaced by a new one as soon as it is answered (the sessions are then
/// dropped without a CLOSE). Demultiplexed by the client index the
/// initiation carries.
pub struct HandshakePeer {
    server_public: [u8; 32],
    sessions: HashMap<u32, ClientSession>,
    out: VecDeque<Vec<u8>>,
    next_scan: Instant,
    pub failed: u64,
}

impl HandshakePeer {
    pub fn new(now: Instant, server_public: [u8; 32], in_flight: usize) -> Self {
        let mut peer = HandshakePeer {
            server_public,
            sessions: HashMap::with_capacity(in_flight),
            out: VecDeque::with_capacity(in_flight),
            next_scan: now + HANDSHAKE_SCAN,
            failed: 0,
        };
        for _ in 0..in_flight {
            peer.start_one(now);
        }
        peer
    }

    fn start_one(&mut self, now: Instant) {
        let mut session = ClientSession::new(
            now,
            ClientConfig::default(),
            self.server_public,
            b"bench login",
            os_seed(),
        )
        .expect("short login payload");
        let mut buf = [0u8; udp::SLOT_BYTES];
        let n = session.poll_transmit(now, &mut buf).expect("an initiation");
        let index = wire::parse_init(&buf[..n])
            .expect("an initiation")
            .client_index;
        self.out.push_back(buf[..n].to_vec());
        self.sessions.insert(index, session);
    }

    /// Queue what the session wants to send; replace it once it is done.
    /// Whether it connected.
    fn service(&mut self, now: Instant, index: u32) -> bool {
        let Some(session) = self.sessions.get_mut(&index) else {
            return false;
        };
        let mut buf = [0u8; udp::SLOT_BYTES];
        while let Some(n) = session.poll_transmit(now, &mut buf) {
            self.out.push_back(buf[..n].to_vec());
        }
        let mut connected = false;
        let mut done = false;
        while let Some(event) = session.poll_event() {
            match event {
                Event::Connected { .. } => (connected, done) = (true, true),
                _ => {
                    self.failed += 1;
                    done = true;
                }
            }
        }
        if done {
            self.sessions.remove(&index);
            self.start_one(now);
        }
        connected
    }
}

impl Peer for HandshakePeer {
    fn on_datagram(&mut self, now: Instant, d: &[u8]) -> u64 {
        let index = match d.first() {
            Some(&wire::TYPE_RESPONSE) => wire::parse_response(d).map(|r| r.client_index),
            Some(&wire::TYPE_COOKIE) => wire::parse_cookie(d).map(|(index, _)| index),
            _ => None,
        };
        let Some(index) = index else { return 0 };
        if let Some(session) = self.sessions.get_mut(&index) {
            session.handle_datagram(now, d);
        }
        u64::from(self.service(now, index))
    }

    fn poll_transmit(&mut self, _now: Instant, buf: &mut [u8]) -> Option<usize> {
        let d = self.out.pop_front()?;
        buf[..d.len()].copy_from_slice(&d);
        Some(d.len())
    }

    fn poll_timeout(&self) -> Option<Instant> {
        Some(self.next_scan)
    }

    fn handle_timeout(&mut self, now: Instant) {
        self.next_scan = now + HANDSHAKE_SCAN;
        let due: Vec<u32> = self
            .sessions
            .iter()
            .filter(|(_, s)| s.poll_timeout().is_some_and(|t| t <= now))
            .map(|(&i, _)| i)
            .collect();
        for index in due {
            if let Some(s) = self.sessions.get_mut(&index) {
                s.handle_timeout(now);
            }
            self.service(now, index);
        }
    }

    fn problem(&self) -> Option<String> {
        (self.failed > 0).then(|| format!("{} handshakes failed", self.failed))
    }
}

/// 32 bytes of OS randomness.
pub fn os_seed() -> [u8; 32] {
    let mut seed = [0u8; 32];
    OsRng.fill_bytes(&mut seed);
    seed
}
