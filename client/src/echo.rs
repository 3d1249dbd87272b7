//! An echo server around [`ServerEndpoint`]: accepts every login and sends
//! every message back to its session. It proves the session layer over
//! real sockets (tests, `imbench session`); the gateway (issue 6) is the
//! real server.
//!
//! One task, one socket, one loop: drain every ready datagram (batches of
//! `recvmmsg`), fire due timers, answer events, then flush every transmit
//! in `sendmmsg` batches, and wait for the socket or the next timer.

use netio::{
    sleep_until,
    udp::{self, RecvBatch, SendBatch},
};
use proto::session::{
    EndpointStats, Event, SendError, ServerConfig, ServerEndpoint, ServerEvent, SessionId,
    StaticKeypair,
};
use rand::{rngs::OsRng, RngCore};
use std::{
    collections::{HashSet, VecDeque},
    io,
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::Instant,
};
use tokio::{net::UdpSocket, task::JoinHandle};

/// Receive batches handled per pass at most before timers and transmits
/// get their turn.
pub const RECV_BATCHES_PER_PASS: usize = 16;

#[derive(Debug, Clone)]
pub struct EchoConfig {
    pub server: ServerConfig,
    /// The answer payload of every accepted login.
    pub welcome: Vec<u8>,
    /// Bytes of echoes waiting for room in their session's send queue at
    /// most; an echo beyond it is dropped and counted (`echo_dropped`).
    pub backlog_bytes_max: usize,
}

impl Default for EchoConfig {
    fn default() -> Self {
        EchoConfig {
            server: ServerConfig::default(),
            welcome: b"welcome".to_vec(),
            backlog_bytes_max: 8 * 1024 * 1024,
        }
    }
}

/// What the echo server did, published after every pass.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct EchoStats {
    pub endpoint: EndpointStats,
    pub sessions: usize,
    /// Messages received (each is echoed or counted in `echo_dropped`).
    pub messages: u64,
    pub echo_dropped: u64,
    /// Datagrams longer than the protocol allows, dropped before parsing.
    pub truncated_datagrams: u64,
    /// Datagrams the kernel refused to send.
    pub send_errors: u64,
}

impl EchoStats {
    /// Every datagram dropped, by the endpoint or before it.
    pub fn dropped_total(&self) -> u64 {
        self.endpoint.dropped_total() + self.truncated_datagrams
    }
}

/// A running echo server; dropping it stops the task.
pub struct EchoServer {
    local_addr: SocketAddr,
    public_key: [u8; 32],
    stats: Arc<Mutex<EchoStats>>,
    task: JoinHandle<()>,
}

impl EchoServer {
    /// Bind `addr` and serve on the current tokio runtime.
    pub fn start(addr: SocketAddr, keys: StaticKeypair, config: EchoConfig) -> io::Result<Self> {
        Self::start_on(udp::bind(addr)?, keys, config)
    }

    /// Serve on `socket` (for example one of several `udp::bind_shared`
    /// sockets on one port) on the current tokio runtime.
    pub fn start_on(
        socket: UdpSocket,
        keys: StaticKeypair,
        config: EchoConfig,
    ) -> io::Result<Self> {
        let local_addr = socket.local_addr()?;
        let public_key = keys.public;
        let mut seed = [0u8; 32];
        OsRng.fill_bytes(&mut seed);
        let endpoint = ServerEndpoint::new(config.server.clone(), keys, seed, Instant::now());
        let stats = Arc::new(Mutex::new(EchoStats::default()));
        let echo = Echo {
            endpoint,
            config,
            backlog: VecDeque::new(),
            backlog_bytes: 0,
            stats: EchoStats::default(),
        };
        let task = tokio::spawn(serve(socket, echo, stats.clone()));
        Ok(EchoServer {
            local_addr,
            public_key,
            stats,
            task,
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    pub fn public_key(&self) -> [u8; 32] {
        self.public_key
    }

    pub fn stats(&self) -> EchoStats {
        self.stats.lock().expect("stats mutex poisoned").clone()
    }
}

impl Drop for EchoServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

struct Echo {
    endpoint: ServerEndpoint,
    config: EchoConfig,
    /// Echoes refused with `QueueFull`, oldest first.
    backlog: VecDeque<(SessionId, Vec<u8>)>,
    backlog_bytes: usize,
    stats: EchoStats,
}

impl Echo {
    fn handle_events(&mut self, now: Instant) {
        while let Some(event) = self.endpoint.poll_event() {
            match event {
                ServerEvent::HandshakeRequest { pending, .. } => {
                    // Refused only when the table is full (counted by the
                    // endpoint) or the payload is too large (it is not).
                    let _ = self.endpoint.accept(now, pending, &self.config.welcome);
                }
                ServerEvent::Session {
                    session,
                    event: Event::Message(data),
                } => {
                    self.stats.messages += 1;
                    self.echo(session, data);
                }
                ServerEvent::Session { .. } => {}
            }
        }
    }

    fn echo(&mut self, session: SessionId, data: Vec<u8>) {
        if !self.backlog.is_empty() && self.backlog.iter().any(|(s, _)| *s == session) {
            self.hold(session, data); // keep this session's order
            return;
        }
        // `send` consumes the message even when it refuses it: keep a copy
        // for the backlog.
        match self.endpoint.send(session, data.clone()) {
            Ok(_) => {}
            Err(SendError::QueueFull) => self.hold(session, data),
            Err(_) => self.stats.echo_dropped += 1,
        }
    }

    fn hold(&mut self, session: SessionId, data: Vec<u8>) {
        if self.backlog_bytes + data.len() > self.config.backlog_bytes_max {
            self.stats.echo_dropped += 1;
            return;
        }
        self.backlog_bytes += data.len();
        self.backlog.push_back((session, data));
    }

    /// Retry held echoes in order; a session whose queue is still full
    /// keeps the rest of its echoes held.
    fn retry_backlog(&mut self) {
        if self.backlog.is_empty() {
            return;
        }
        let mut blocked = HashSet::new();
        for (session, data) in std::mem::take(&mut self.backlog) {
            self.backlog_bytes -= data.len();
            if blocked.contains(&session) {
                self.hold(session, data);
                continue;
            }
            match self.endpoint.send(session, data.clone()) {
                Ok(_) => {}
                Err(SendError::QueueFull) => {
                    blocked.insert(session);
                    self.hold(session, data);
                }
                Err(_) => self.stats.echo_dropped += 1,
            }
        }
    }
}

async fn serve(socket: UdpSocket, mut echo: Echo, published: Arc<Mutex<EchoStats>>) {
    if let Err(e) = serve_loop(&socket, &mut echo, &published).await {
        tracing::error!(error = %e, "echo server stopped");
    }
}

async fn serve_loop(
    socket: &UdpSocket,
    echo: &mut Echo,
    published: &Mutex<EchoStats>,
) -> io::Result<()> {
    let mut inbox = RecvBatch::new();
    let mut outbox = SendBatch::new();
    loop {
        let now = Instant::now();
        for _ in 0..RECV_BATCHES_PER_PASS {
            if udp::try_recv(socket, &mut inbox)? == 0 {
                break;
            }
            for (from, d) in inbox.iter() {
                echo.endpoint.handle_datagram(now, from, d);
            }
            echo.handle_events(now);
        }
        if echo.endpoint.poll_timeout().is_some_and(|t| t <= now) {
            echo.endpoint.handle_timeout(now);
        }
        echo.handle_events(now);
        echo.retry_backlog();
        flush(socket, echo, &mut outbox).await;
        echo.stats.truncated_datagrams = inbox.truncated_total();
        echo.stats.send_errors = outbox.errors().0;
        publish(echo, published);
        let deadline = echo.endpoint.poll_timeout();
        tokio::select! {
            r = socket.readable() => r?,
            () = sleep_until(deadline) => {}
        }
    }
}

/// Send every transmit the endpoint has, in `sendmmsg` batches.
async fn flush(socket: &UdpSocket, echo: &mut Echo, outbox: &mut SendBatch) {
    let now = Instant::now();
    let endpoint = &mut echo.endpoint;
    udp::send_all(socket, outbox, |buf| {
        endpoint.poll_transmit(now, buf).map(|t| (t.dest, t.len))
    })
    .await;
}

fn publish(echo: &Echo, published: &Mutex<EchoStats>) {
    let mut p = published.lock().expect("stats mutex poisoned");
    *p = EchoStats {
        endpoint: echo.endpoint.stats().clone(),
        sessions: echo.endpoint.session_count(),
        ..echo.stats.clone()
    };
}
