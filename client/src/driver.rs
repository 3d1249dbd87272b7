//! A thin tokio driver around one [`ClientSession`]: one UDP socket, one
//! task that feeds datagrams and timeouts in and sends transmits out, a
//! [`Client`] handle to send on, and a bounded channel of events.
//!
//! The session lives behind a mutex the handle and the task share, so
//! `send` answers at once (`SendError::QueueFull` is the back-pressure).
//! When the event channel is full the task waits for the application
//! before it reads more datagrams: the kernel buffer fills, and the
//! protocol's retransmissions cover what the kernel drops.

use netio::{
    sleep_until,
    udp::{self, RecvBatch, SendBatch},
};
use proto::session::{
    ClientConfig, ClientSession, ConnectError, EndpointStats, Event, MsgId, SendError,
};
use rand::{rngs::OsRng, RngCore};
use std::{
    io,
    net::SocketAddr,
    sync::{Arc, Mutex, MutexGuard},
    time::Instant,
};
use tokio::{net::UdpSocket, sync::mpsc, sync::Notify, task::JoinHandle};

/// Everything a client needs to reach one gateway.
#[derive(Debug, Clone)]
pub struct DriverConfig {
    pub server: SocketAddr,
    /// The gateway's static public key (Noise_NK: known in advance).
    pub server_public: [u8; 32],
    /// Rides in the handshake initiation (the login request).
    pub login: Vec<u8>,
    pub session: ClientConfig,
    /// Events buffered for the application at most.
    pub events_max: usize,
}

impl DriverConfig {
    pub fn new(server: SocketAddr, server_public: [u8; 32], login: Vec<u8>) -> Self {
        DriverConfig {
            server,
            server_public,
            login,
            session: ClientConfig::default(),
            events_max: 1024,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum DriverError {
    #[error("socket: {0}")]
    Io(#[from] io::Error),
    #[error(transparent)]
    Connect(#[from] ConnectError),
}

/// Counters of the driver itself (the session's are in `EndpointStats`).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct DriverStats {
    /// Datagrams from an address other than the server's, dropped.
    pub foreign_datagrams: u64,
    /// Datagrams longer than the protocol allows, dropped.
    pub truncated_datagrams: u64,
    /// Datagrams the kernel refused to send.
    pub send_errors: u64,
}

struct Shared {
    session: Mutex<ClientSession>,
    driver: Mutex<DriverStats>,
    wake: Notify,
}

impl Shared {
    fn session(&self) -> MutexGuard<'_, ClientSession> {
        self.session.lock().expect("session mutex poisoned")
    }
}

/// One client session over a real UDP socket. Dropping it stops the task
/// (without a CLOSE; call [`close`](Self::close) first for a clean end).
pub struct Client {
    shared: Arc<Shared>,
    local_addr: SocketAddr,
    task: JoinHandle<()>,
}

impl Client {
    /// Bind a socket, start the handshake and the task. `Event::Connected`
    /// (or `Rejected`, or `Closed(HandshakeTimedOut)`) arrives on the
    /// returned channel.
    pub async fn connect(
        config: DriverConfig,
    ) -> Result<(Client, mpsc::Receiver<Event>), DriverError> {
        let unspecified: SocketAddr = if config.server.is_ipv4() {
            "0.0.0.0:0".parse().expect("valid")
        } else {
            "[::]:0".parse().expect("valid")
        };
        let socket = udp::bind(unspecified)?;
        let local_addr = socket.local_addr()?;
        let mut seed = [0u8; 32];
        OsRng.fill_bytes(&mut seed);
        let session = ClientSession::new(
            Instant::now(),
            config.session,
            config.server_public,
            &config.login,
            seed,
        )?;
        let shared = Arc::new(Shared {
            session: Mutex::new(session),
            driver: Mutex::new(DriverStats::default()),
            wake: Notify::new(),
        });
        let (tx, rx) = mpsc::channel(config.events_max.max(1));
        let task = tokio::spawn(run(socket, shared.clone(), config.server, tx));
        Ok((
            Client {
                shared,
                local_addr,
                task,
            },
            rx,
        ))
    }

    /// Queue a message (at most 64 KiB); `QueueFull` until acknowledgements
    /// make room.
    pub fn send(&self, data: Vec<u8>) -> Result<MsgId, SendError> {
        let id = self.shared.session().send(data)?;
        self.shared.wake.notify_one();
        Ok(id)
    }

    /// Close cleanly: a CLOSE goes to the gateway, unacknowledged messages
    /// come back as `GivenUp`, then `Closed(Local)`; the task then ends.
    pub fn close(&self) {
        self.shared.session().close();
        self.shared.wake.notify_one();
    }

    pub fn session_id(&self) -> Option<u64> {
        self.shared.session().session_id()
    }

    /// See `ClientSession::set_keepalive`.
    pub fn set_keepalive(&self, keepalive: std::time::Duration) {
        self.shared.session().set_keepalive(keepalive);
        self.shared.wake.notify_one();
    }

    pub fn stats(&self) -> EndpointStats {
        self.shared.session().stats().clone()
    }

    pub fn driver_stats(&self) -> DriverStats {
        *self.shared.driver.lock().expect("stats mutex poisoned")
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Whether the task has ended (session closed, or the event receiver
    /// dropped, or the socket failed).
    pub fn is_finished(&self) -> bool {
        self.task.is_finished()
    }
}

impl Drop for Client {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn run(socket: UdpSocket, shared: Arc<Shared>, server: SocketAddr, tx: mpsc::Sender<Event>) {
    if let Err(e) = drive(&socket, &shared, server, &tx).await {
        tracing::warn!(%server, error = %e, "client session driver stopped");
    }
}

async fn drive(
    socket: &UdpSocket,
    shared: &Shared,
    server: SocketAddr,
    tx: &mpsc::Sender<Event>,
) -> io::Result<()> {
    let mut inbox = RecvBatch::new();
    let mut outbox = SendBatch::new();
    loop {
        flush_transmits(socket, shared, server, &mut outbox).await;
        loop {
            let event = shared.session().poll_event();
            let Some(event) = event else { break };
            if tx.send(event).await.is_err() {
                return Ok(()); // nobody listens any more
            }
        }
        let (deadline, closed) = {
            let s = shared.session();
            (s.poll_timeout(), s.is_closed())
        };
        if closed {
            return Ok(());
        }
        tokio::select! {
            r = socket.readable() => {
                r?;
                receive_ready(socket, shared, server, &mut inbox)?;
            }
            () = sleep_until(deadline) => shared.session().handle_timeout(Instant::now()),
            () = shared.wake.notified() => {}
        }
    }
}

/// Feed every datagram already waiting on the socket to the session.
fn receive_ready(
    socket: &UdpSocket,
    shared: &Shared,
    server: SocketAddr,
    inbox: &mut RecvBatch,
) -> io::Result<()> {
    while udp::try_recv(socket, inbox)? > 0 {
        let now = Instant::now();
        let mut foreign = 0;
        {
            let mut s = shared.session();
            for (from, d) in inbox.iter() {
                if from == server {
                    s.handle_datagram(now, d);
                } else {
                    foreign += 1;
                }
            }
        }
        let mut stats = shared.driver.lock().expect("stats mutex poisoned");
        stats.foreign_datagrams += foreign;
        stats.truncated_datagrams = inbox.truncated_total();
    }
    Ok(())
}

/// Send everything the session has to send, a batch at a time.
async fn flush_transmits(
    socket: &UdpSocket,
    shared: &Shared,
    server: SocketAddr,
    outbox: &mut SendBatch,
) {
    let now = Instant::now();
    udp::send_all(socket, outbox, |buf| {
        shared
            .session()
            .poll_transmit(now, buf)
            .map(|n| (server, n))
    })
    .await;
    shared
        .driver
        .lock()
        .expect("stats mutex poisoned")
        .send_errors = outbox.errors().0;
}
