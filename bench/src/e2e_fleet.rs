//! The simulated users of `imbench e2e`: many client sessions on one UDP
//! socket (demultiplexed by the handshake's client index, then by session
//! id), each playing one role of the application protocol. A fleet is a
//! [`Peer`], so `udp_load::drive` runs it with batched I/O.
//!
//! Two latencies are measured from the instant a send is queued: its
//! **answer** (`Reply::Sent`, at the sender) and its **delivery** (the push
//! reaching the recipient). Sender and receiver fleets run in one process,
//! so the send instant travels in the message body (its first 8 bytes:
//! nanoseconds since [`epoch`]).
//!
//! Receivers count each mailbox seq once, the first time they see it
//! (pushed or fetched), as a client shows it once (`docs/PROTOCOL.md` §6.4);
//! later copies of a seq are counted as repeats and dropped. They do not
//! drop a message stored twice under two seqs (as `proto::inbox::Inbox`
//! does by `(from, msg_id)`): that is a duplicate the delivery check must
//! see.
//!
//! An online phase ends the way clients would leave nothing behind: on
//! `Counters::quiesce` senders send no more and wait for their answers;
//! then on `Counters::catch_up` receivers fetch after the last seq they
//! saw (every message answered `Sent` is in the mailbox by then, but its
//! push may still be on its way: the gateway pushes after answering).

use crate::udp_load::{os_seed, Peer};
use hdrhistogram::Histogram;
use netio::udp;
use proto::{
    app::{
        self, Call, ClientMessage, Delivery, GatewayMessage, Login, LoginAnswer, LoginMethod,
        Reply, SendOutcome, FETCH_BYTES_MAX, FETCH_COUNT_MAX,
    },
    session::{wire, ClientConfig, ClientSession, Event},
};
use std::{
    collections::{BTreeMap, BTreeSet, HashMap, HashSet, VecDeque},
    sync::OnceLock,
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc,
    },
    time::Instant,
};

/// Bytes of every message body.
pub const BODY_BYTES: usize = 100;
/// The body's first bytes: the send instant, nanoseconds since [`epoch`].
const STAMP_BYTES: usize = 8;
const _: () = assert!(BODY_BYTES >= STAMP_BYTES);
/// A receiver acknowledges its mailbox after this many pushes.
const ACK_EVERY: u64 = 256;
/// Latencies in microseconds, 1 us .. 60 s, 3 significant digits.
const LATENCY_US_MAX: u64 = 60_000_000;

/// The process-wide instant message bodies count their send time from.
pub fn epoch() -> Instant {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

/// `at` as nanoseconds since [`epoch`] (0 before it).
fn stamp(at: Instant) -> u64 {
    u64::try_from(at.saturating_duration_since(epoch()).as_nanos()).unwrap_or(u64::MAX)
}

/// A body carrying `at` in its first 8 bytes.
fn stamped(body: &[u8], at: Instant) -> Vec<u8> {
    let mut body = body.to_vec();
    body[..STAMP_BYTES].copy_from_slice(&stamp(at).to_le_bytes());
    body
}

/// The send instant a body carries, as nanoseconds since [`epoch`].
fn sent_ns(body: &[u8]) -> Option<u64> {
    Some(u64::from_le_bytes(
        body.get(..STAMP_BYTES)?.try_into().ok()?,
    ))
}

fn latency_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, LATENCY_US_MAX, 3).expect("valid histogram bounds")
}

fn record_us(hist: &mut Histogram<u64>, nanos: u128) {
    let us = u64::try_from(nanos / 1000).unwrap_or(u64::MAX);
    hist.saturating_record(us.max(1));
}

/// Progress of a phase, shared by its fleets and read by the controller.
#[derive(Default)]
pub struct Counters {
    /// Logins accepted.
    pub logins: AtomicU64,
    /// Logins refused or timed out.
    pub login_failures: AtomicU64,
    /// Sends answered (any answer, or abandoned at a session's end).
    pub ops_finished: AtomicU64,
    /// Sends answered `Sent`: stored in the recipient's mailbox.
    pub ops_ok: AtomicU64,
    /// Messages receivers saw first in a fetched page (the drain's progress).
    pub fetched: AtomicU64,
    /// Receivers whose mailbox fetching ended (nothing more, or refused).
    pub drains_done: AtomicU64,
    /// Senders that stopped on `quiesce` with no send unanswered.
    pub senders_idle: AtomicU64,
    /// Receivers whose fetch after `catch_up` ended (or whose session was
    /// gone).
    pub caught_up: AtomicU64,
    pub datagrams_in: AtomicU64,
    pub datagrams_out: AtomicU64,
    /// Set by the controller: logged-in users start their work (senders
    /// send, receivers fetch), all at once.
    pub go: AtomicBool,
    /// Set by the controller: senders send nothing more.
    pub quiesce: AtomicBool,
    /// Set by the controller once every send was answered: receivers fetch
    /// what they did not see pushed.
    pub catch_up: AtomicBool,
    /// Set by the controller: every fleet closes all its sessions.
    pub close: AtomicBool,
    /// `Role::Reconnecting` logins that did not get through and were
    /// started again (not counted in `login_failures`).
    pub login_retries: AtomicU64,
}

fn bump(counter: &AtomicU64, n: u64) {
    counter.fetch_add(n, Ordering::Relaxed);
}

/// What one simulated user does once logged in.
#[derive(Debug, Clone, Copy)]
pub enum Role {
    /// Keep `window` sends outstanding to `to`, `count` messages in all.
    Sender { to: u64, window: usize, count: u64 },
    /// Record pushes; fetch and acknowledge the whole mailbox at the go
    /// signal (or at login after it).
    Receiver,
    /// Log in, then close the session at once.
    LoginOnly,
    /// Stay logged in, idle; whenever the session ends (the gateway closed
    /// it, or a login did not get through), log in again with the newest
    /// resume token, as a client does after its gateway restarts.
    Reconnecting,
}

pub struct PlannedLogin {
    pub user: u64,
    pub method: LoginMethod,
    pub role: Role,
}

/// What a fleet saw, read once its phase is over.
pub struct Log {
    /// Message ids received: one per mailbox seq, logged the first time
    /// the seq was seen (pushed or fetched).
    pub received: Vec<u128>,
    /// Message ids answered `Sent` (stored in the recipient's mailbox).
    pub sent: Vec<u128>,
    /// Send -> `Sent` reply at the sender, microseconds.
    pub answer: Histogram<u64>,
    /// Send -> push at the recipient, microseconds: every message first
    /// seen pushed.
    pub delivery: Histogram<u64>,
    /// Messages first seen in a fetched page (no delivery latency).
    pub fetched: u64,
    /// Copies of a seq already seen (pushed after it was fetched, or
    /// fetched after it was pushed), dropped.
    pub seq_repeats: u64,
    /// `MailboxChanged` pushes (pushes the gateway could not queue).
    pub mailbox_changed: u64,
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
            sent: Vec::new(),
            answer: latency_histogram(),
            delivery: latency_histogram(),
            fetched: 0,
            seq_repeats: 0,
            mailbox_changed: 0,
            tokens: Vec::new(),
            problems: BTreeMap::new(),
        }
    }

    pub fn problem(&mut self, what: impl Into<String>) {
        *self.problems.entry(what.into()).or_default() += 1;
    }
}

/// The mailbox seqs a receiver has seen, as a client keeps what it showed.
#[derive(Debug, Default)]
struct SeenSeqs {
    /// Every seq up to this one was seen (or is gone from the mailbox) ...
    through: u64,
    /// ... and these past it.
    past: BTreeSet<u64>,
}

impl SeenSeqs {
    /// Whether `seq` is seen for the first time (it is recorded).
    fn first_sight(&mut self, seq: u64) -> bool {
        if seq <= self.through || !self.past.insert(seq) {
            return false;
        }
        self.advance();
        true
    }

    /// A fetched page covered every seq up to `last_seq` (those it did not
    /// hold are gone): the page must have been asked for after a seq not
    /// above `through`.
    fn covered_through(&mut self, last_seq: u64) {
        if last_seq > self.through {
            self.through = last_seq;
            self.past = self.past.split_off(&(last_seq + 1));
            self.advance();
        }
    }

    fn advance(&mut self) {
        while self.past.remove(&(self.through + 1)) {
            self.through += 1;
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum CatchUp {
    No,
    /// Asked for; a fetch sent before it may be in flight.
    Wanted,
    /// A fetch sent after it is in flight (or its next pages).
    Fetching,
    Done,
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
    /// Fetch again once the outstanding one is answered.
    refetch: bool,
    /// Receivers: where the fetch asked for by `Counters::catch_up` is.
    catch_up: CatchUp,
    /// Senders: stopped on `Counters::quiesce` with nothing unanswered.
    idle: bool,
    /// Receivers: the mailbox seqs seen ...
    seen: SeenSeqs,
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
    /// Whether senders stopped on `Counters::quiesce`.
    quiescing: bool,
    /// Whether receivers were asked to fetch on `Counters::catch_up`.
    catching_up: bool,
    /// Users with a handshake in flight (a user's next login waits).
    busy: HashSet<u64>,
    /// `Role::Reconnecting` users' newest resume tokens.
    tokens: HashMap<u64, Vec<u8>>,
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
        epoch(); // fixed before the first send
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
            quiescing: false,
            catching_up: false,
            busy: HashSet::new(),
            tokens: HashMap::new(),
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
            let payload = app::encode(&Login::new(plan.method, client::next_login_ns(0)));
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
                refetch: false,
                catch_up: CatchUp::No,
                idle: false,
                seen: SeenSeqs::default(),
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
        if matches!(sim.role, Role::Reconnecting) && !expected {
            return self.reconnect(i);
        }
        if !sim.connected {
            self.handshake_done(i);
            self.login_failed(format!("handshake ended: {reason:?}"));
        } else if !expected {
            self.log.problem(format!("session closed: {reason:?}"));
        }
        let abandoned = self.sims[i].sends.len() as u64;
        self.sims[i].sends.clear();
        bump(&self.counters.ops_finished, abandoned);
        self.check_idle(i);
        self.sims[i].fetch_id = None;
        self.end_catch_up(i);
    }

    fn on_login(&mut self, i: usize, now: Instant, payload: &[u8]) {
        let accepted = match app::decode::<LoginAnswer>(payload) {
            Ok(LoginAnswer::Accepted(a)) => a,
            other => return self.login_failed(format!("login not accepted: {other:?}")),
        };
        bump(&self.counters.logins, 1);
        let sim = &mut self.sims[i];
        sim.connected = true;
        // Seqs up to here were acknowledged before this login.
        let acked = accepted
            .mailbox_high_seq
            .saturating_sub(accepted.mailbox_count);
        sim.seen.covered_through(acked);
        sim.acked_seq = sim.acked_seq.max(acked);
        let user = self.sims[i].user;
        if matches!(self.sims[i].role, Role::Reconnecting) {
            self.tokens.insert(user, accepted.resume_token.clone());
        }
        self.log.tokens.push((user, accepted.resume_token));
        match self.sims[i].role {
            Role::LoginOnly => {
                self.sims[i].closing = true;
                self.sims[i].session.close();
            }
            Role::Sender { .. } | Role::Receiver if self.started => self.start_work(i, now),
            Role::Sender { .. } | Role::Receiver | Role::Reconnecting => {}
        }
    }

    /// A `Role::Reconnecting` session ended unasked: log in again with the
    /// newest token (a handshake that did not get through is a retry).
    fn reconnect(&mut self, i: usize) {
        let user = self.sims[i].user;
        if self.sims[i].connected {
            self.sims[i].connected = false;
        } else {
            self.handshake_done(i);
            bump(&self.counters.login_retries, 1);
        }
        let Some(token) = self.tokens.get(&user).cloned() else {
            return self.login_failed("no resume token to reconnect with".into());
        };
        self.pending.push_back(PlannedLogin {
            user,
            method: LoginMethod::Resume { token },
            role: Role::Reconnecting,
        });
    }

    fn start_work(&mut self, i: usize, now: Instant) {
        match self.sims[i].role {
            Role::Sender { .. } => self.send_more(i, now),
            Role::Receiver => self.fetch(i),
            Role::LoginOnly | Role::Reconnecting => {}
        }
    }

    fn go_requested(&self) -> bool {
        !self.started && self.counters.go.load(Ordering::Relaxed)
    }

    fn quiesce_requested(&self) -> bool {
        !self.quiescing && self.counters.quiesce.load(Ordering::Relaxed)
    }

    /// The controller said quiesce: senders send no more.
    fn quiesce_all(&mut self) {
        self.quiescing = true;
        for i in 0..self.sims.len() {
            self.check_idle(i);
        }
    }

    /// A quiescing sender with nothing unanswered is idle (counted once).
    fn check_idle(&mut self, i: usize) {
        let sim = &mut self.sims[i];
        if self.quiescing
            && sim.connected
            && matches!(sim.role, Role::Sender { .. })
            && !sim.idle
            && sim.sends.is_empty()
        {
            sim.idle = true;
            bump(&self.counters.senders_idle, 1);
        }
    }

    fn catch_up_requested(&self) -> bool {
        !self.catching_up && self.counters.catch_up.load(Ordering::Relaxed)
    }

    /// The controller said catch up: every receiver fetches after the last
    /// seq it saw (one whose session is gone counts as caught up; one
    /// that never logged in counts as a login failure).
    fn catch_up_all(&mut self) {
        self.catching_up = true;
        for i in 0..self.sims.len() {
            let sim = &mut self.sims[i];
            if !matches!(sim.role, Role::Receiver) || !sim.connected {
                continue;
            }
            sim.catch_up = CatchUp::Wanted;
            if !sim.closing {
                self.want_fetch(i);
                self.mark_dirty(i);
            } else {
                self.end_catch_up(i);
            }
        }
    }

    fn end_catch_up(&mut self, i: usize) {
        let sim = &mut self.sims[i];
        if matches!(sim.catch_up, CatchUp::Wanted | CatchUp::Fetching) {
            sim.catch_up = CatchUp::Done;
            bump(&self.counters.caught_up, 1);
        }
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
            Ok(GatewayMessage::Deliver(d)) => self.on_push(i, now, &d),
            Ok(GatewayMessage::Reply { id, result }) => {
                if self.sims[i].fetch_id == Some(id) {
                    self.on_mailbox(i, result);
                } else if let Some((msg_id, at)) = self.sims[i].sends.remove(&id) {
                    self.on_sent(i, now, msg_id, at, result);
                }
            }
            Ok(GatewayMessage::MailboxChanged { high_seq }) => {
                self.log.mailbox_changed += 1;
                if high_seq > self.sims[i].seen.through {
                    self.want_fetch(i);
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
                record_us(&mut self.log.answer, (now - at).as_nanos());
                self.log.sent.push(msg_id);
                bump(&self.counters.ops_ok, 1);
            }
            Ok(other) => self.log.problem(format!("send answered {other:?}")),
            Err(e) => self.log.problem(format!("send refused: {:?}", e.code)),
        }
        self.send_more(i, now);
        self.check_idle(i);
    }

    fn send_more(&mut self, i: usize, now: Instant) {
        let sim = &mut self.sims[i];
        let Role::Sender { to, window, count } = sim.role else {
            return;
        };
        while !self.quiescing && sim.sends.len() < window && sim.sent < count {
            let msg_id = (u128::from(sim.user) << 64) | u128::from(sim.sent);
            let call = Call::Send {
                to,
                msg_id,
                body: stamped(&self.body, now),
            };
            let Some(id) = sim.request(call) else {
                self.log.problem("send queue refused a message");
                return;
            };
            sim.sends.insert(id, (msg_id, now));
            sim.sent += 1;
        }
    }

    /// A receiver got a message pushed: log it if its seq is new (its
    /// delivery latency too), then acknowledge the mailbox in steps of
    /// `ACK_EVERY` up to the highest seq below which every seq was seen
    /// (what a client does after showing them), so mailboxes stay small.
    fn on_push(&mut self, i: usize, now: Instant, d: &Delivery) {
        if !self.sims[i].seen.first_sight(d.seq) {
            self.log.seq_repeats += 1;
            return;
        }
        self.log.received.push(d.msg_id);
        match sent_ns(&d.body) {
            Some(sent) => {
                let nanos = u128::from(stamp(now).saturating_sub(sent));
                record_us(&mut self.log.delivery, nanos);
            }
            None => self.log.problem("a pushed body without its send time"),
        }
        let sim = &mut self.sims[i];
        if sim.seen.through >= sim.acked_seq + ACK_EVERY {
            sim.acked_seq = sim.seen.through;
            let up_to_seq = sim.acked_seq;
            sim.request(Call::Ack { up_to_seq });
        }
    }

    /// Fetch now, or once the fetch in flight is answered.
    fn want_fetch(&mut self, i: usize) {
        if self.sims[i].fetch_id.is_some() {
            self.sims[i].refetch = true;
        } else {
            self.fetch(i);
        }
    }

    /// Fetch the page after the last seq below which every seq was seen.
    fn fetch(&mut self, i: usize) {
        let sim = &mut self.sims[i];
        let call = Call::Fetch {
            after_seq: sim.seen.through,
            max_count: FETCH_COUNT_MAX,
            max_bytes: FETCH_BYTES_MAX,
        };
        sim.refetch = false;
        if sim.catch_up == CatchUp::Wanted {
            sim.catch_up = CatchUp::Fetching;
        }
        sim.fetch_id = sim.request(call);
        if sim.fetch_id.is_none() {
            self.fetching_ended(i, "fetch queue refused".into());
        }
    }

    /// A page: log its messages whose seq is new, acknowledge everything
    /// up to it, fetch the next one while more follow.
    fn on_mailbox(&mut self, i: usize, result: Result<Reply, app::AppError>) {
        self.sims[i].fetch_id = None;
        let (messages, last_seq, more) = match result {
            Ok(Reply::Mailbox {
                messages,
                last_seq,
                more,
            }) => (messages, last_seq, more),
            Ok(other) => return self.fetching_ended(i, format!("fetch answered {other:?}")),
            Err(e) => return self.fetching_ended(i, format!("fetch refused: {:?}", e.code)),
        };
        let sim = &mut self.sims[i];
        let mut new = 0;
        for m in &messages {
            if sim.seen.first_sight(m.seq) {
                self.log.received.push(m.msg_id);
                new += 1;
            } else {
                self.log.seq_repeats += 1;
            }
        }
        self.log.fetched += new;
        bump(&self.counters.fetched, new);
        // The page was asked for after `seen.through` as it was then: every
        // seq up to `last_seq` it does not hold is gone.
        sim.seen.covered_through(last_seq);
        if sim.seen.through > sim.acked_seq {
            sim.acked_seq = sim.seen.through;
            let up_to_seq = sim.acked_seq;
            sim.request(Call::Ack { up_to_seq });
        }
        if (more && last_seq > 0) || sim.refetch || sim.catch_up == CatchUp::Wanted {
            self.fetch(i);
        } else {
            bump(&self.counters.drains_done, 1);
            self.end_catch_up(i);
        }
    }

    /// A fetch failed: the receiver fetches no more.
    fn fetching_ended(&mut self, i: usize, why: String) {
        bump(&self.counters.drains_done, 1);
        self.sims[i].refetch = false;
        self.end_catch_up(i);
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
        if self.close_requested()
            || self.go_requested()
            || self.quiesce_requested()
            || self.catch_up_requested()
        {
            return Some(self.created); // due at once
        }
        self.next_timeout
    }

    fn handle_timeout(&mut self, now: Instant) {
        if self.go_requested() {
            self.start_all(now);
        }
        if self.quiesce_requested() {
            self.quiesce_all();
        }
        if self.catch_up_requested() {
            self.catch_up_all();
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn each_seq_is_seen_once_whether_pushed_or_fetched() {
        let mut seen = SeenSeqs::default();
        assert!(seen.first_sight(2), "pushed past a gap");
        assert!(seen.first_sight(1));
        assert_eq!(seen.through, 2);
        assert!(!seen.first_sight(2), "the page repeats a pushed seq");
        assert!(seen.first_sight(5));
        assert!(!seen.first_sight(5));
        // A page after 2 up to 6 that held 3 and 6: 4 is gone.
        assert!(seen.first_sight(3));
        assert!(seen.first_sight(6));
        seen.covered_through(6);
        assert_eq!(seen.through, 6);
        assert!(seen.past.is_empty());
        assert!(!seen.first_sight(4), "covered by the page");
        assert!(seen.first_sight(8));
        seen.covered_through(7);
        assert_eq!(seen.through, 8, "8 was seen already");
        seen.covered_through(3);
        assert_eq!(seen.through, 8, "never moves back");
    }

    #[test]
    fn bodies_carry_their_send_instant() {
        let at = epoch() + Duration::from_micros(1234);
        let body = stamped(&[b'm'; BODY_BYTES], at);
        assert_eq!(body.len(), BODY_BYTES);
        assert_eq!(sent_ns(&body), Some(1_234_000));
        assert_eq!(&body[STAMP_BYTES..], &[b'm'; BODY_BYTES - STAMP_BYTES]);
        assert_eq!(sent_ns(&body[..7]), None);
    }
}
