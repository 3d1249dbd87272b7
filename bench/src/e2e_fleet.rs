//! The simulated users of `imbench e2e`: many client sessions on one UDP
//! socket (demultiplexed by the handshake's client index, then by session
//! id), each playing one role of the application protocol. A fleet is a
//! [`Peer`], so `udp_load::drive` runs it with batched I/O.

use crate::udp_load::{os_seed, Peer};
use hdrhistogram::Histogram;
use netio::udp;
use proto::{
    app::{
        self, Call, ClientMessage, GatewayMessage, Login, LoginAnswer, LoginMethod, Reply,
        SendOutcome, APP_PROTOCOL_VERSION, FETCH_BYTES_MAX, FETCH_COUNT_MAX,
    },
    session::{wire, ClientConfig, ClientSession, Event},
};
use std::{
    collections::{BTreeMap, BTreeSet, HashMap, HashSet, VecDeque},
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc,
    },
    time::Instant,
};

/// Bytes of every message body.
pub const BODY_BYTES: usize = 100;
/// A receiver acknowledges its mailbox after this many pushes.
const ACK_EVERY: u64 = 256;
/// Latencies in microseconds, 1 us .. 60 s, 3 significant digits.
const LATENCY_US_MAX: u64 = 60_000_000;

/// Progress of a phase, shared by its fleets and read by the controller.
#[derive(Default)]
pub struct Counters {
    /// Logins accepted.
    pub logins: AtomicU64,
    /// Logins refused or timed out.
    pub login_failures: AtomicU64,
    /// Sends answered (any answer) plus messages drained: the progress.
    pub ops_finished: AtomicU64,
    /// Sends answered Delivered or Stored, plus messages drained.
    pub ops_ok: AtomicU64,
    /// Receivers whose mailbox fetching ended (nothing more, or refused).
    pub drains_done: AtomicU64,
    pub datagrams_in: AtomicU64,
    pub datagrams_out: AtomicU64,
    /// Set by the controller: logged-in users start their work (senders
    /// send, receivers fetch), all at once.
    pub go: AtomicBool,
    /// Set by the controller: every fleet closes all its sessions.
    pub close: AtomicBool,
}

fn bump(counter: &AtomicU64, n: u64) {
    counter.fetch_add(n, Ordering::Relaxed);
}

/// What one simulated user does once logged in.
#[derive(Debug, Clone, Copy)]
pub enum Role {
    /// Keep `window` sends outstanding to `to`, `count` messages in all.
    Sender { to: u64, window: usize, count: u64 },
    /// Record pushes; fetch and acknowledge the whole mailbox at login.
    Receiver,
    /// Log in, then close the session at once.
    LoginOnly,
}

pub struct PlannedLogin {
    pub user: u64,
    pub method: LoginMethod,
    pub role: Role,
}

/// What a fleet saw, read once its phase is over.
pub struct Log {
    /// Message ids received (pushed or fetched), repeats included.
    pub received: Vec<u128>,
    /// Message ids answered `Delivered` / `Stored`.
    pub delivered: Vec<u128>,
    pub stored: Vec<u128>,
    /// Send to `Delivered` reply, microseconds.
    pub latency: Histogram<u64>,
    /// Resume tokens from accepted logins: (user, token).
    pub tokens: Vec<(u64, Vec<u8>)>,
    /// Anything unexpected, counted by kind.
    pub problems: BTreeMap<String, u64>,
}

impl Default for Log {
    fn default() -> Self {
        Self::new()
    }
}

impl Log {
    pub fn new() -> Self {
        Log {
            received: Vec::new(),
            delivered: Vec::new(),
            stored: Vec::new(),
            latency: Histogram::new_with_bounds(1, LATENCY_US_MAX, 3)
                .expect("valid histogram bounds"),
            tokens: Vec::new(),
            problems: BTreeMap::new(),
        }
    }

    pub fn problem(&mut self, what: impl Into<String>) {
        *self.problems.entry(what.into()).or_default() += 1;
    }
}

/// One simulated user: a session and its role's state.
struct Sim {
    user: u64,
    role: Role,
    session: ClientSession,
    connected: bool,
    closing: bool,
    dirty: bool,
    next_id: u32,
    /// Messages sent so far (the low half of the next message id).
    sent: u64,
    /// Send requests awaiting their reply: request id -> (message id, sent at).
    sends: HashMap<u32, (u128, Instant)>,
    /// The request id of the outstanding `Fetch`.
    fetch_id: Option<u32>,
    /// Receivers: every pushed seq up to this one arrived ...
    contiguous_seq: u64,
    /// ... these past it too ...
    early_seqs: BTreeSet<u64>,
    /// ... and the mailbox was acknowledged up to this one.
    acked_seq: u64,
}

impl Sim {
    fn request(&mut self, call: Call) -> Option<u32> {
        self.next_id = self.next_id.wrapping_add(1);
        let id = self.next_id;
        let bytes = app::encode(&ClientMessage { id, call });
        self.session.send(bytes).ok().map(|_| id)
    }
}

/// Many simulated users on one socket.
pub struct Fleet {
    server_public: [u8; 32],
    sims: Vec<Sim>,
    by_index: HashMap<u32, usize>,
    by_session: HashMap<u64, usize>,
    pending: VecDeque<PlannedLogin>,
    /// Handshakes in flight at once at most.
    handshakes_max: usize,
    handshaking: usize,
    /// First initiations, sent before anything else.
    out: VecDeque<Vec<u8>>,
    dirty: VecDeque<usize>,
    next_timeout: Option<Instant>,
    created: Instant,
    /// Whether every session was closed on `Counters::close`.
    closed_all: bool,
    /// Whether the users' work started on `Counters::go`.
    started: bool,
    /// Users with a handshake in flight (a user's next login waits).
    busy: HashSet<u64>,
    counters: Arc<Counters>,
    body: Vec<u8>,
    pub log: Log,
}

fn earlier(a: Option<Instant>, b: Option<Instant>) -> Option<Instant> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

impl Fleet {
    pub fn new(
        server_public: [u8; 32],
        logins: Vec<PlannedLogin>,
        handshakes_max: usize,
        counters: Arc<Counters>,
    ) -> Self {
        let mut fleet = Fleet {
            server_public,
            sims: Vec::with_capacity(logins.len()),
            by_index: HashMap::new(),
            by_session: HashMap::new(),
            pending: logins.into(),
            handshakes_max: handshakes_max.max(1),
            handshaking: 0,
            out: VecDeque::new(),
            dirty: VecDeque::new(),
            next_timeout: None,
            created: Instant::now(),
            closed_all: false,
            started: false,
            busy: HashSet::new(),
            counters,
            body: vec![b'm'; BODY_BYTES],
            log: Log::new(),
        };
        fleet.start_logins(Instant::now());
        fleet
    }

    fn start_logins(&mut self, now: Instant) {
        while self.handshaking < self.handshakes_max {
            let Some(plan) = self.next_login() else {
                return;
            };
            self.busy.insert(plan.user);
            let payload = app::encode(&Login {
                version: APP_PROTOCOL_VERSION,
                method: plan.method,
            });
            let mut session = ClientSession::new(
                now,
                ClientConfig::default(),
                self.server_public,
                &payload,
                os_seed(),
            )
            .expect("a login fits the handshake");
            let mut buf = [0u8; udp::SLOT_BYTES];
            let n = session.poll_transmit(now, &mut buf).expect("an initiation");
            let init = wire::parse_init(&buf[..n]).expect("an initiation");
            self.by_index.insert(init.client_index, self.sims.len());
            self.out.push_back(buf[..n].to_vec());
            self.next_timeout = earlier(self.next_timeout, session.poll_timeout());
            self.sims.push(Sim {
                user: plan.user,
                role: plan.role,
                session,
                connected: false,
                closing: false,
                dirty: false,
                next_id: 0,
                sent: 0,
                sends: HashMap::new(),
                fetch_id: None,
                contiguous_seq: 0,
                early_seqs: BTreeSet::new(),
                acked_seq: 0,
            });
            self.handshaking += 1;
        }
    }

    /// The first planned login whose user has no handshake in flight.
    fn next_login(&mut self) -> Option<PlannedLogin> {
        let at = self
            .pending
            .iter()
            .position(|p| !self.busy.contains(&p.user))?;
        self.pending.remove(at)
    }

    fn slot_of(&self, d: &[u8]) -> Option<usize> {
        match d.first() {
            Some(&wire::TYPE_TRANSPORT) => {
                let t = wire::parse_transport(d)?;
                self.by_session.get(&t.session_id).copied()
            }
            Some(&wire::TYPE_RESPONSE) => {
                let r = wire::parse_response(d)?;
                self.by_index.get(&r.client_index).copied()
            }
            Some(&wire::TYPE_COOKIE) => {
                let (index, _) = wire::parse_cookie(d)?;
                self.by_index.get(&index).copied()
            }
            _ => None,
        }
    }

    /// Handle the session's events, then queue it for transmission.
    fn service(&mut self, i: usize, now: Instant) {
        while let Some(event) = self.sims[i].session.poll_event() {
            match event {
                Event::Connected {
                    session_id,
                    payload,
                } => {
                    self.handshake_done(i);
                    self.by_session.insert(session_id, i);
                    self.on_login(i, now, &payload);
                }
                Event::Rejected { payload } => {
                    self.handshake_done(i);
                    let answer = app::decode::<LoginAnswer>(&payload);
                    self.login_failed(format!("login refused: {answer:?}"));
                }
                Event::Message(bytes) => self.on_message(i, now, &bytes),
                Event::Acked(_) => {}
                // Closing abandons what is in flight: expected then.
                Event::GivenUp { .. } if self.sims[i].closing => {}
                Event::GivenUp { .. } => self.log.problem("a message was given up"),
                Event::Closed(reason) => self.on_closed(i, reason),
            }
        }
        self.mark_dirty(i);
    }

    fn mark_dirty(&mut self, i: usize) {
        if !self.sims[i].dirty {
            self.sims[i].dirty = true;
            self.dirty.push_back(i);
        }
    }

    fn handshake_done(&mut self, i: usize) {
        self.handshaking -= 1;
        self.busy.remove(&self.sims[i].user);
        self.by_index.retain(|_, &mut slot| slot != i);
    }

    fn login_failed(&mut self, why: String) {
        bump(&self.counters.login_failures, 1);
        self.log.problem(why);
    }

    fn on_closed(&mut self, i: usize, reason: proto::session::CloseReason) {
        let sim = &self.sims[i];
        let expected = sim.closing;
        if !sim.connected {
            self.handshake_done(i);
            self.login_failed(format!("handshake ended: {reason:?}"));
        } else if !expected {
            self.log.problem(format!("session closed: {reason:?}"));
        }
        let abandoned = self.sims[i].sends.len() as u64;
        self.sims[i].sends.clear();
        bump(&self.counters.ops_finished, abandoned);
    }

    fn on_login(&mut self, i: usize, now: Instant, payload: &[u8]) {
        let accepted = match app::decode::<LoginAnswer>(payload) {
            Ok(LoginAnswer::Accepted(a)) => a,
            other => return self.login_failed(format!("login not accepted: {other:?}")),
        };
        bump(&self.counters.logins, 1);
        self.sims[i].connected = true;
        self.log
            .tokens
            .push((self.sims[i].user, accepted.resume_token));
        match self.sims[i].role {
            Role::LoginOnly => {
                self.sims[i].closing = true;
                self.sims[i].session.close();
            }
            Role::Sender { .. } | Role::Receiver if self.started => self.start_work(i, now),
            Role::Sender { .. } | Role::Receiver => {}
        }
    }

    fn start_work(&mut self, i: usize, now: Instant) {
        match self.sims[i].role {
            Role::Sender { .. } => self.send_more(i, now),
            Role::Receiver => self.fetch(i, 0),
            Role::LoginOnly => {}
        }
    }

    fn go_requested(&self) -> bool {
        !self.started && self.counters.go.load(Ordering::Relaxed)
    }

    /// The controller said go: every logged-in user starts its work.
    fn start_all(&mut self, now: Instant) {
        self.started = true;
        for i in 0..self.sims.len() {
            if self.sims[i].connected && !self.sims[i].closing {
                self.start_work(i, now);
                self.mark_dirty(i);
            }
        }
    }

    fn on_message(&mut self, i: usize, now: Instant, bytes: &[u8]) {
        match app::decode::<GatewayMessage>(bytes) {
            Ok(GatewayMessage::Deliver(d)) => {
                self.log.received.push(d.msg_id);
                self.on_push(i, d.seq);
            }
            Ok(GatewayMessage::Reply { id, result }) => {
                if self.sims[i].fetch_id == Some(id) {
                    self.on_mailbox(i, result);
                } else if let Some((msg_id, at)) = self.sims[i].sends.remove(&id) {
                    self.on_sent(i, now, msg_id, at, result);
                }
            }
            Ok(GatewayMessage::Kicked) => self.log.problem("kicked"),
            Ok(_) => {}
            Err(e) => self
                .log
                .problem(format!("undecodable gateway message: {e}")),
        }
    }

    fn on_sent(
        &mut self,
        i: usize,
        now: Instant,
        msg_id: u128,
        at: Instant,
        result: Result<Reply, app::AppError>,
    ) {
        bump(&self.counters.ops_finished, 1);
        match result {
            Ok(Reply::Sent(SendOutcome { .. })) => {
                let us = u64::try_from((now - at).as_micros()).unwrap_or(u64::MAX);
                self.log.latency.saturating_record(us.max(1));
                self.log.delivered.push(msg_id);
                bump(&self.counters.ops_ok, 1);
            }
            Ok(other) => self.log.problem(format!("send answered {other:?}")),
            Err(e) => self.log.problem(format!("send refused: {:?}", e.code)),
        }
        self.send_more(i, now);
    }

    fn send_more(&mut self, i: usize, now: Instant) {
        let sim = &mut self.sims[i];
        let Role::Sender { to, window, count } = sim.role else {
            return;
        };
        while sim.sends.len() < window && sim.sent < count {
            let msg_id = (u128::from(sim.user) << 64) | u128::from(sim.sent);
            let call = Call::Send {
                to,
                msg_id,
                body: self.body.clone(),
            };
            let Some(id) = sim.request(call) else {
                self.log.problem("send queue refused a message");
                return;
            };
            sim.sends.insert(id, (msg_id, now));
            sim.sent += 1;
        }
    }

    /// A receiver got `seq` pushed: acknowledge the mailbox in steps of
    /// `ACK_EVERY` up to the highest seq below which every push arrived
    /// (what a client does after showing them), so mailboxes stay small.
    fn on_push(&mut self, i: usize, seq: u64) {
        let sim = &mut self.sims[i];
        if seq > sim.contiguous_seq {
            sim.early_seqs.insert(seq);
        }
        while sim.early_seqs.remove(&(sim.contiguous_seq + 1)) {
            sim.contiguous_seq += 1;
        }
        if sim.contiguous_seq >= sim.acked_seq + ACK_EVERY {
            sim.acked_seq = sim.contiguous_seq;
            let up_to_seq = sim.acked_seq;
            sim.request(Call::Ack { up_to_seq });
        }
    }

    fn fetch(&mut self, i: usize, after_seq: u64) {
        let call = Call::Fetch {
            after_seq,
            max_count: FETCH_COUNT_MAX,
            max_bytes: FETCH_BYTES_MAX,
        };
        self.sims[i].fetch_id = self.sims[i].request(call);
    }

    fn on_mailbox(&mut self, i: usize, result: Result<Reply, app::AppError>) {
        self.sims[i].fetch_id = None;
        let (messages, more) = match result {
            Ok(Reply::Mailbox { messages, more, .. }) => (messages, more),
            Ok(other) => return self.drain_ended(format!("fetch answered {other:?}")),
            Err(e) => return self.drain_ended(format!("fetch refused: {:?}", e.code)),
        };
        let n = messages.len() as u64;
        self.log.received.extend(messages.iter().map(|m| m.msg_id));
        let Some(last) = messages.last().map(|m| m.seq) else {
            bump(&self.counters.drains_done, 1);
            return;
        };
        bump(&self.counters.ops_ok, n);
        bump(&self.counters.ops_finished, n);
        self.sims[i].request(Call::Ack { up_to_seq: last });
        if more {
            self.fetch(i, last);
        } else {
            bump(&self.counters.drains_done, 1);
        }
    }

    fn drain_ended(&mut self, why: String) {
        bump(&self.counters.drains_done, 1);
        self.log.problem(why);
    }

    fn count_out(&self) {
        bump(&self.counters.datagrams_out, 1);
    }

    fn close_requested(&self) -> bool {
        !self.closed_all && self.counters.close.load(Ordering::Relaxed)
    }

    /// Close every session (a CLOSE each) and start no more logins.
    fn close_all(&mut self, now: Instant) {
        self.closed_all = true;
        self.pending.clear();
        for i in 0..self.sims.len() {
            self.sims[i].closing = true;
            self.sims[i].session.close();
            self.service(i, now);
        }
    }
}

impl Peer for Fleet {
    fn on_datagram(&mut self, now: Instant, d: &[u8]) -> u64 {
        bump(&self.counters.datagrams_in, 1);
        let Some(i) = self.slot_of(d) else {
            self.log.problem("a datagram for no session");
            return 0;
        };
        self.sims[i].session.handle_datagram(now, d);
        self.service(i, now);
        self.start_logins(now);
        0
    }

    fn poll_transmit(&mut self, now: Instant, buf: &mut [u8]) -> Option<usize> {
        if let Some(d) = self.out.pop_front() {
            buf[..d.len()].copy_from_slice(&d);
            self.count_out();
            return Some(d.len());
        }
        while let Some(&i) = self.dirty.front() {
            if let Some(n) = self.sims[i].session.poll_transmit(now, buf) {
                self.count_out();
                return Some(n);
            }
            self.dirty.pop_front();
            self.sims[i].dirty = false;
            self.next_timeout = earlier(self.next_timeout, self.sims[i].session.poll_timeout());
        }
        None
    }

    fn poll_timeout(&self) -> Option<Instant> {
        if self.close_requested() || self.go_requested() {
            return Some(self.created); // due at once
        }
        self.next_timeout
    }

    fn handle_timeout(&mut self, now: Instant) {
        if self.go_requested() {
            self.start_all(now);
        }
        if self.close_requested() {
            self.close_all(now);
        }
        self.next_timeout = None;
        for i in 0..self.sims.len() {
            let due = self.sims[i].session.poll_timeout();
            if due.is_some_and(|t| t <= now) {
                self.sims[i].session.handle_timeout(now);
                self.service(i, now);
            }
            self.next_timeout = earlier(self.next_timeout, self.sims[i].session.poll_timeout());
        }
        self.start_logins(now);
    }
}
