//! A deterministic simulated network for session tests: one gateway
//! endpoint and some clients exchange datagrams through a seeded network
//! that loses, duplicates, delays (with jitter, hence reorders) and drops
//! datagrams above an MTU. Virtual time only.
#![allow(dead_code)]

use proto::session::{
    ClientConfig, ClientSession, Event, ServerConfig, ServerEndpoint, ServerEvent, StaticKeypair,
};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::{
    collections::{BTreeMap, HashMap, VecDeque},
    net::SocketAddr,
    time::{Duration, Instant},
};

pub const SERVER: &str = "10.0.0.1:9000";

#[derive(Debug, Clone)]
pub struct NetConfig {
    pub loss: f64,
    pub duplicate: f64,
    pub delay: Duration,
    pub jitter: Duration,
    pub mtu: usize,
}

impl NetConfig {
    pub fn perfect() -> Self {
        NetConfig {
            loss: 0.0,
            duplicate: 0.0,
            delay: Duration::from_millis(10),
            jitter: Duration::ZERO,
            mtu: 1500,
        }
    }
}

pub struct Client {
    pub addr: SocketAddr,
    pub session: ClientSession,
    pub events: Vec<Event>,
}

pub struct Sim {
    pub now: Instant,
    pub rng: ChaCha8Rng,
    pub net: NetConfig,
    pub server: ServerEndpoint,
    pub server_events: Vec<ServerEvent>,
    pub clients: Vec<Client>,
    /// (deliver_at, sequence) -> (from, to, bytes)
    in_flight: BTreeMap<(Instant, u64), (SocketAddr, SocketAddr, Vec<u8>)>,
    seq: u64,
    /// Every datagram handed to the network, in order (for replay tests).
    pub log: Vec<(SocketAddr, SocketAddr, Vec<u8>)>,
    /// Accept logins automatically with this answer payload.
    pub auto_accept: Option<Vec<u8>>,
    /// Messages the server app queues per session when it can (back-pressure).
    pub server_outbox: HashMap<u64, VecDeque<Vec<u8>>>,
}

pub fn server_addr() -> SocketAddr {
    SERVER.parse().unwrap()
}

impl Sim {
    pub fn new(seed: u64, net: NetConfig, server_config: ServerConfig) -> Sim {
        let now = Instant::now();
        let keys = StaticKeypair::generate([7; 32]);
        let mut seed_bytes = [0u8; 32];
        seed_bytes[..8].copy_from_slice(&seed.to_le_bytes());
        Sim {
            now,
            rng: ChaCha8Rng::seed_from_u64(seed),
            net,
            server: ServerEndpoint::new(server_config, keys, seed_bytes, now),
            server_events: Vec::new(),
            clients: Vec::new(),
            in_flight: BTreeMap::new(),
            seq: 0,
            log: Vec::new(),
            auto_accept: Some(b"welcome".to_vec()),
            server_outbox: HashMap::new(),
        }
    }

    /// Add a client that logs in with `payload`; its index.
    pub fn connect(
        &mut self,
        config: ClientConfig,
        server_public: [u8; 32],
        payload: &[u8],
    ) -> usize {
        let i = self.clients.len();
        let addr: SocketAddr = format!("10.0.1.{}:{}", 1 + i / 200, 10_000 + i)
            .parse()
            .unwrap();
        let seed: [u8; 32] = self.rng.gen();
        let session = ClientSession::new(self.now, config, server_public, payload, seed).unwrap();
        self.clients.push(Client {
            addr,
            session,
            events: Vec::new(),
        });
        i
    }

    pub fn public_key(&self) -> [u8; 32] {
        *self.server.public_key()
    }

    /// Put a datagram on the network (subject to loss, duplication, delay).
    pub fn transmit(&mut self, from: SocketAddr, to: SocketAddr, bytes: Vec<u8>) {
        self.log.push((from, to, bytes.clone()));
        if bytes.len() > self.net.mtu || self.rng.gen_bool(self.net.loss) {
            return;
        }
        let copies = if self.rng.gen_bool(self.net.duplicate) {
            2
        } else {
            1
        };
        for _ in 0..copies {
            self.inject(from, to, bytes.clone());
        }
    }

    /// Deliver a datagram after the network delay, bypassing loss.
    pub fn inject(&mut self, from: SocketAddr, to: SocketAddr, bytes: Vec<u8>) {
        let jitter_us = self.net.jitter.as_micros() as u64;
        let jitter = Duration::from_micros(if jitter_us > 0 {
            self.rng.gen_range(0..jitter_us)
        } else {
            0
        });
        let at = self.now + self.net.delay + jitter;
        self.seq += 1;
        self.in_flight.insert((at, self.seq), (from, to, bytes));
    }

    fn flush_transmits(&mut self) {
        let mut buf = [0u8; 1500];
        let server = server_addr();
        loop {
            let mut any = false;
            while let Some(t) = self.server.poll_transmit(self.now, &mut buf) {
                self.transmit(server, t.dest, buf[..t.len].to_vec());
                any = true;
            }
            for i in 0..self.clients.len() {
                while let Some(n) = self.clients[i].session.poll_transmit(self.now, &mut buf) {
                    let from = self.clients[i].addr;
                    self.transmit(from, server, buf[..n].to_vec());
                    any = true;
                }
            }
            self.run_apps();
            if !any {
                break;
            }
        }
    }

    fn run_apps(&mut self) {
        while let Some(e) = self.server.poll_event() {
            if let ServerEvent::HandshakeRequest { pending, .. } = &e {
                if let Some(answer) = self.auto_accept.clone() {
                    if self.server.accept(self.now, *pending, &answer).is_err() {
                        self.server.reject(*pending, b"full").unwrap();
                    }
                }
            }
            self.server_events.push(e);
        }
        for c in &mut self.clients {
            while let Some(e) = c.session.poll_event() {
                c.events.push(e);
            }
        }
        let sessions: Vec<u64> = self.server_outbox.keys().copied().collect();
        for id in sessions {
            let queue = self.server_outbox.get_mut(&id).unwrap();
            while let Some(m) = queue.front() {
                match self.server.send(id, m.clone()) {
                    Ok(_) => {
                        queue.pop_front();
                    }
                    Err(_) => break,
                }
            }
        }
    }

    fn next_event_time(&self) -> Option<Instant> {
        let net = self.in_flight.keys().next().map(|(t, _)| *t);
        let server = self.server.poll_timeout();
        let clients = self
            .clients
            .iter()
            .filter_map(|c| c.session.poll_timeout())
            .min();
        [net, server, clients].into_iter().flatten().min()
    }

    /// Advance to the next thing that happens; false when nothing is left.
    pub fn step(&mut self) -> bool {
        self.flush_transmits();
        let Some(t) = self.next_event_time() else {
            return false;
        };
        self.now = self.now.max(t);
        while let Some(entry) = self.in_flight.first_entry() {
            if entry.key().0 > self.now {
                break;
            }
            let (from, to, bytes) = entry.remove();
            if to == server_addr() {
                self.server.handle_datagram(self.now, from, &bytes);
            } else if let Some(c) = self.clients.iter_mut().find(|c| c.addr == to) {
                c.session.handle_datagram(self.now, &bytes);
            }
        }
        if self.server.poll_timeout().is_some_and(|t| t <= self.now) {
            self.server.handle_timeout(self.now);
        }
        for c in &mut self.clients {
            if c.session.poll_timeout().is_some_and(|t| t <= self.now) {
                c.session.handle_timeout(self.now);
            }
        }
        self.flush_transmits();
        true
    }

    /// Step until `done` holds or `limit` of virtual time passes; whether
    /// `done` held.
    pub fn run_until(&mut self, limit: Duration, mut done: impl FnMut(&Sim) -> bool) -> bool {
        let end = self.now + limit;
        while self.now < end {
            if done(self) {
                return true;
            }
            if !self.step() {
                return done(self);
            }
        }
        done(self)
    }

    /// The session id of client `i` once connected.
    pub fn session_of(&self, i: usize) -> Option<u64> {
        self.clients[i].session.session_id()
    }

    /// Messages the server received from session `id`, in order.
    pub fn server_messages(&self, id: u64) -> Vec<Vec<u8>> {
        self.server_events
            .iter()
            .filter_map(|e| match e {
                ServerEvent::Session {
                    session,
                    event: Event::Message(m),
                } if *session == id => Some(m.clone()),
                _ => None,
            })
            .collect()
    }

    pub fn client_messages(&self, i: usize) -> Vec<Vec<u8>> {
        self.clients[i]
            .events
            .iter()
            .filter_map(|e| match e {
                Event::Message(m) => Some(m.clone()),
                _ => None,
            })
            .collect()
    }
}

/// A message whose bytes say which message it is (so reordering or
/// corruption would show), `len` bytes long.
pub fn message(tag: u32, len: usize) -> Vec<u8> {
    let mut m = Vec::with_capacity(len);
    let mut x = tag.wrapping_mul(2654435761).wrapping_add(1);
    while m.len() < len {
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
        m.extend_from_slice(&x.to_le_bytes());
    }
    m.truncate(len);
    m[..4.min(len)].copy_from_slice(&tag.to_le_bytes()[..4.min(len)]);
    m
}
