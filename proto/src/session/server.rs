//! The gateway side: many sessions behind one UDP socket.
//!
//! Datagrams are demultiplexed by their first byte (type) and, for
//! transport datagrams, by the session id in clear. Handshake initiations
//! are checked cheaply first (exact length, mac1 under the gateway's public
//! key, then the cookie when one is demanded) and only then cost a
//! Diffie-Hellman; the application decides each login (`accept` /
//! `reject`) and the answer is remembered for `handshake_timeout` so a
//! retransmitted initiation gets the same answer.

use super::{
    config::{CookieMode, ServerConfig},
    core::Core,
    crypto::{self, StaticKeypair, TransportKeys},
    wire::{
        self, Init, INIT_BLOCK_BYTES, INIT_MAC1_AT, INIT_MAC2_AT, INIT_PAYLOAD_MAX, MAC_BYTES,
        RESET_TOKEN_BYTES,
    },
    DropReason, Event, MsgId, SendError,
};
use crate::clock::{quota, Clock, KeyedLimiter};
use rand_chacha::ChaCha20Rng;
use rand_core::{RngCore, SeedableRng};
use snow::HandshakeState;
use std::{
    collections::{BTreeSet, HashMap, VecDeque},
    net::{IpAddr, SocketAddr},
    time::{Duration, Instant},
};

pub type SessionId = u64;

/// A handshake waiting for the application's `accept` or `reject`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PendingId(u64);

impl PendingId {
    /// An id made outside an endpoint, for simulations that drive an
    /// application (the gateway's router) without one.
    pub fn from_raw(raw: u64) -> PendingId {
        PendingId(raw)
    }
}

/// Datagrams (handshake answers, cookie replies) queued before sessions'
/// own transmits, at most; beyond it they are dropped and counted.
pub const RAW_OUT_MAX: usize = 1024;

/// COOKIE datagrams sent in answer to one initiation (back to back): the
/// cookie makes a handshake two round trips, so one loss should not cost a
/// retry; 2 × 21 bytes is still far less than the 1,200 that caused them.
pub const COOKIE_COPIES: usize = 2;

/// How often the per-source handshake limiters forget the addresses whose
/// bucket is full again (only while they remember any).
pub const HANDSHAKE_LIMIT_HOUSEKEEPING: Duration = Duration::from_secs(1);

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ServerEvent {
    /// A client's initiation passed every check: decide with `accept` or
    /// `reject` (within `handshake_timeout`).
    HandshakeRequest {
        pending: PendingId,
        from: SocketAddr,
        payload: Vec<u8>,
    },
    Session {
        session: SessionId,
        event: Event,
    },
}

/// Why `accept` or `reject` failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AcceptError {
    #[error("no such pending handshake (decided already or expired)")]
    UnknownPending,
    #[error("answer payload of {len} bytes exceeds {max}")]
    TooLarge { len: usize, max: usize },
    #[error("session table full")]
    Full,
    #[error("session id {0} is zero or taken")]
    IdTaken(SessionId),
}

/// Counters of everything that happened to datagrams; every drop reason
/// has one.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct EndpointStats {
    pub datagrams_in: u64,
    pub datagrams_out: u64,
    pub handshakes_requested: u64,
    pub handshakes_accepted: u64,
    pub handshakes_rejected: u64,
    pub cookies_sent: u64,
    pub dropped_malformed: u64,
    pub dropped_unauthentic: u64,
    pub dropped_replayed: u64,
    pub dropped_unknown_session: u64,
    pub dropped_closed: u64,
    pub dropped_duplicate_handshake: u64,
    pub dropped_full: u64,
    /// Initiations over their source's rate that no cookie could help.
    pub dropped_limited: u64,
    /// RESETs sent in answer to transport datagrams of unknown sessions.
    pub resets_sent: u64,
    /// RESETs not sent because `resets_per_s_max` was reached.
    pub resets_limited: u64,
}

impl EndpointStats {
    pub fn count_drop(&mut self, reason: DropReason) {
        let c = match reason {
            DropReason::Malformed => &mut self.dropped_malformed,
            DropReason::Unauthentic => &mut self.dropped_unauthentic,
            DropReason::Replayed => &mut self.dropped_replayed,
            DropReason::UnknownSession => &mut self.dropped_unknown_session,
            DropReason::Closed => &mut self.dropped_closed,
            DropReason::DuplicateHandshake => &mut self.dropped_duplicate_handshake,
            DropReason::Full => &mut self.dropped_full,
            DropReason::Limited => &mut self.dropped_limited,
        };
        *c += 1;
    }

    pub fn dropped_total(&self) -> u64 {
        self.dropped_malformed
            + self.dropped_unauthentic
            + self.dropped_replayed
            + self.dropped_unknown_session
            + self.dropped_closed
            + self.dropped_duplicate_handshake
            + self.dropped_full
            + self.dropped_limited
    }
}

/// A datagram to send: `buf[..len]` to `dest`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Transmit {
    pub dest: SocketAddr,
    pub len: usize,
}

struct Session {
    core: Core,
    peer: SocketAddr,
    /// This session's one entry in the timer set, if any.
    timer_at: Option<Instant>,
    /// In the ready queue.
    ready: bool,
}

enum PendingState {
    Deciding(Box<HandshakeState>),
    Answered(Vec<u8>),
}

struct Pending {
    from: SocketAddr,
    client_index: u32,
    ephemeral: [u8; 32],
    state: PendingState,
}

/// The per-source handshake limit: one bucket per source IP address for
/// initiations without a valid cookie, another for those with one.
struct SourceLimits {
    clock: Clock,
    unproven: KeyedLimiter<IpAddr>,
    proven: KeyedLimiter<IpAddr>,
    /// Due while either table remembers an address.
    next_housekeeping: Option<Instant>,
}

impl SourceLimits {
    fn new(per_s: u32, now: Instant) -> Option<SourceLimits> {
        if per_s == 0 {
            return None;
        }
        let clock = Clock::new(now);
        Some(SourceLimits {
            unproven: clock.keyed(quota(per_s, per_s)),
            proven: clock.keyed(quota(per_s, per_s)),
            clock,
            next_housekeeping: None,
        })
    }

    /// Whether `ip` may start a handshake now; takes a token. A full table
    /// stores no new address: unproven sources are then refused (they get
    /// a COOKIE), proven ones pass unchecked.
    fn admit(&mut self, now: Instant, ip: IpAddr, proven: bool, max: usize) -> bool {
        self.clock.advance_to(now);
        let table = if proven { &self.proven } else { &self.unproven };
        if table.len() >= max {
            return proven;
        }
        let ok = table.check_key(&ip).is_ok();
        self.next_housekeeping
            .get_or_insert(now + HANDSHAKE_LIMIT_HOUSEKEEPING);
        ok
    }

    fn housekeeping(&mut self, now: Instant) {
        if self.next_housekeeping.is_none_or(|t| t > now) {
            return;
        }
        self.clock.advance_to(now);
        self.unproven.retain_recent();
        self.proven.retain_recent();
        self.next_housekeeping = if self.unproven.is_empty() && self.proven.is_empty() {
            self.unproven.shrink_to_fit();
            self.proven.shrink_to_fit();
            None
        } else {
            Some(now + HANDSHAKE_LIMIT_HOUSEKEEPING)
        };
    }
}

/// The one-second window of the RESET rate.
struct Resets {
    window_start: Instant,
    sent_in_window: u32,
}

struct Cookies {
    current: [u8; 32],
    previous: [u8; 32],
    rotated_at: Instant,
    window_start: Instant,
    inits_in_window: u32,
}

pub struct ServerEndpoint {
    config: ServerConfig,
    keys: StaticKeypair,
    mac1_key: [u8; 32],
    rng: ChaCha20Rng,
    slots: Vec<Option<Session>>,
    free: Vec<u32>,
    /// Session id -> slot (ids are random, drawn by this endpoint).
    index: HashMap<SessionId, u32, foldhash::fast::RandomState>,
    /// Exactly one (deadline, slot) per session that has a deadline.
    timers: BTreeSet<(Instant, u32)>,
    ready: VecDeque<u32>,
    pending: HashMap<u64, Pending>,
    by_ephemeral: HashMap<[u8; 32], u64>,
    pending_expiry: VecDeque<(Instant, u64)>,
    next_pending: u64,
    /// Entries of `pending` still deciding (the rest are answered).
    deciding: usize,
    cookies: Cookies,
    sources: Option<SourceLimits>,
    resets: Resets,
    raw_out: VecDeque<(SocketAddr, Vec<u8>)>,
    events: VecDeque<ServerEvent>,
    scratch: VecDeque<Event>,
    stats: EndpointStats,
}

impl ServerEndpoint {
    /// `seed`: 32 bytes of OS randomness in production, fixed in tests.
    pub fn new(config: ServerConfig, keys: StaticKeypair, seed: [u8; 32], now: Instant) -> Self {
        let mut rng = ChaCha20Rng::from_seed(seed);
        let mut secret = || {
            let mut s = [0u8; 32];
            rng.fill_bytes(&mut s);
            s
        };
        let cookies = Cookies {
            current: secret(),
            previous: secret(),
            rotated_at: now,
            window_start: now,
            inits_in_window: 0,
        };
        let sources = SourceLimits::new(config.handshakes_per_source_per_s, now);
        ServerEndpoint {
            mac1_key: crypto::mac1_key(&keys.public),
            config,
            keys,
            rng,
            slots: Vec::new(),
            free: Vec::new(),
            index: HashMap::default(),
            timers: BTreeSet::new(),
            ready: VecDeque::new(),
            pending: HashMap::new(),
            by_ephemeral: HashMap::new(),
            pending_expiry: VecDeque::new(),
            next_pending: 0,
            deciding: 0,
            cookies,
            sources,
            resets: Resets {
                window_start: now,
                sent_in_window: 0,
            },
            raw_out: VecDeque::new(),
            events: VecDeque::new(),
            scratch: VecDeque::new(),
            stats: EndpointStats::default(),
        }
    }

    pub fn public_key(&self) -> &[u8; 32] {
        &self.keys.public
    }

    pub fn stats(&self) -> &EndpointStats {
        &self.stats
    }

    pub fn session_count(&self) -> usize {
        self.index.len()
    }

    /// Entries in the timer set (one per session with a deadline).
    pub fn timer_count(&self) -> usize {
        self.timers.len()
    }

    /// Handshakes waiting for `accept` or `reject`.
    pub fn pending_count(&self) -> usize {
        self.deciding
    }

    /// Sessions holding queues or buffers (the rest are idle).
    pub fn active_session_count(&self) -> usize {
        self.slots
            .iter()
            .flatten()
            .filter(|s| !s.core.is_idle())
            .count()
    }

    /// Source addresses the handshake limiters remember (both tables).
    pub fn handshake_source_count(&self) -> usize {
        self.sources
            .as_ref()
            .map_or(0, |s| s.unproven.len() + s.proven.len())
    }

    /// The peer address a session currently sends to.
    pub fn peer(&self, session: SessionId) -> Option<SocketAddr> {
        let slot = *self.index.get(&session)?;
        self.slots[slot as usize].as_ref().map(|s| s.peer)
    }

    pub fn handle_datagram(&mut self, now: Instant, from: SocketAddr, d: &[u8]) {
        self.stats.datagrams_in += 1;
        let result = match d.first() {
            Some(&wire::TYPE_TRANSPORT) => self.on_transport(now, from, d),
            Some(&wire::TYPE_INIT) => self.on_init(now, from, d),
            _ => Err(DropReason::Malformed),
        };
        if let Err(reason) = result {
            self.stats.count_drop(reason);
        }
    }

    fn on_transport(&mut self, now: Instant, from: SocketAddr, d: &[u8]) -> Result<(), DropReason> {
        let t = wire::parse_transport(d).ok_or(DropReason::Malformed)?;
        let Some(&slot) = self.index.get(&t.session_id) else {
            self.reset(now, from, t.session_id);
            return Err(DropReason::UnknownSession);
        };
        let s = self.slots[slot as usize].as_mut().expect("indexed slot");
        let newest = s
            .core
            .handle(now, &t, &self.config.session, &mut self.scratch)?;
        if newest && s.peer != from {
            s.peer = from; // the client roamed (NAT rebinding)
        }
        self.after_change(slot);
        Ok(())
    }

    fn on_init(&mut self, now: Instant, from: SocketAddr, d: &[u8]) -> Result<(), DropReason> {
        let init = wire::parse_init(d).ok_or(DropReason::Malformed)?;
        if !crypto::mac_verify(&self.mac1_key, &d[..INIT_MAC1_AT], init.mac1) {
            return Err(DropReason::Unauthentic);
        }
        self.rotate_cookie_secret(now);
        let proven =
            init.mac2 != [0u8; MAC_BYTES] && self.cookie_valid(from, &d[..INIT_MAC2_AT], init.mac2);
        let demanded = self.cookie_required(now);
        if !proven && (demanded || !self.admit(now, from.ip(), false)) {
            if self.config.cookie_mode == CookieMode::Never {
                return Err(DropReason::Limited);
            }
            let cookie = crypto::cookie(&self.cookies.current, from);
            let reply = wire::write_cookie(init.client_index, &cookie);
            for _ in 0..COOKIE_COPIES {
                if self.queue_raw(from, reply.clone()) {
                    self.stats.cookies_sent += 1;
                }
            }
            return Ok(());
        }
        if proven && !self.admit(now, from.ip(), true) {
            return Err(DropReason::Limited);
        }
        let ephemeral: [u8; 32] = init.noise[..32].try_into().expect("32 bytes");
        if let Some(&pid) = self.by_ephemeral.get(&ephemeral) {
            return self.on_duplicate_init(pid, from);
        }
        if self.deciding >= self.config.pending_handshakes_max
            || self.index.len() >= self.config.sessions_max
        {
            return Err(DropReason::Full);
        }
        self.start_pending(now, from, &init, ephemeral)
    }

    /// Whether the per-source limit lets `ip` start a handshake now.
    fn admit(&mut self, now: Instant, ip: IpAddr, proven: bool) -> bool {
        let max = self.config.handshake_sources_max;
        self.sources
            .as_mut()
            .is_none_or(|s| s.admit(now, ip, proven, max))
    }

    /// Answer a transport datagram of an unknown session with a RESET,
    /// when a reset key is configured and the per-second cap allows.
    fn reset(&mut self, now: Instant, to: SocketAddr, session_id: SessionId) {
        let Some(key) = self.config.reset_key else {
            return;
        };
        let r = &mut self.resets;
        if now >= r.window_start + Duration::from_secs(1) {
            r.window_start = now;
            r.sent_in_window = 0;
        }
        if r.sent_in_window >= self.config.resets_per_s_max {
            self.stats.resets_limited += 1;
            return;
        }
        r.sent_in_window += 1;
        let token = crypto::reset_token(&key, session_id);
        if self.queue_raw(to, wire::write_reset(session_id, &token)) {
            self.stats.resets_sent += 1;
        }
    }

    fn on_duplicate_init(&mut self, pid: u64, from: SocketAddr) -> Result<(), DropReason> {
        let p = &self.pending[&pid];
        match &p.state {
            PendingState::Answered(reply) if p.from == from => {
                let reply = reply.clone();
                self.queue_raw(from, reply);
                Ok(())
            }
            _ => Err(DropReason::DuplicateHandshake),
        }
    }

    fn start_pending(
        &mut self,
        now: Instant,
        from: SocketAddr,
        init: &Init<'_>,
        ephemeral: [u8; 32],
    ) -> Result<(), DropReason> {
        let seed = self.seed();
        let mut hs = crypto::responder(&self.keys, seed);
        let mut block = [0u8; INIT_BLOCK_BYTES];
        let n = hs
            .read_message(init.noise, &mut block)
            .map_err(|_| DropReason::Unauthentic)?;
        debug_assert_eq!(n, INIT_BLOCK_BYTES);
        let len = u16::from_le_bytes([block[0], block[1]]) as usize;
        if len > INIT_PAYLOAD_MAX {
            return Err(DropReason::Malformed);
        }
        let pid = self.next_pending;
        self.next_pending += 1;
        self.pending.insert(
            pid,
            Pending {
                from,
                client_index: init.client_index,
                ephemeral,
                state: PendingState::Deciding(Box::new(hs)),
            },
        );
        self.by_ephemeral.insert(ephemeral, pid);
        self.deciding += 1;
        self.pending_expiry
            .push_back((now + self.config.handshake_timeout, pid));
        self.stats.handshakes_requested += 1;
        self.events.push_back(ServerEvent::HandshakeRequest {
            pending: PendingId(pid),
            from,
            payload: block[2..2 + len].to_vec(),
        });
        Ok(())
    }

    fn seed(&mut self) -> [u8; 32] {
        let mut s = [0u8; 32];
        self.rng.fill_bytes(&mut s);
        s
    }

    fn rotate_cookie_secret(&mut self, now: Instant) {
        let c = &mut self.cookies;
        if now >= c.rotated_at + self.config.cookie_rotation {
            c.previous = c.current;
            self.rng.fill_bytes(&mut c.current);
            c.rotated_at = now;
        }
    }

    fn cookie_required(&mut self, now: Instant) -> bool {
        let c = &mut self.cookies;
        if now >= c.window_start + std::time::Duration::from_secs(1) {
            c.window_start = now;
            c.inits_in_window = 0;
        }
        c.inits_in_window = c.inits_in_window.saturating_add(1);
        match self.config.cookie_mode {
            CookieMode::Never => false,
            CookieMode::Always => true,
            CookieMode::UnderLoad { inits_per_s_max } => c.inits_in_window > inits_per_s_max,
        }
    }

    fn cookie_valid(&self, from: SocketAddr, covered: &[u8], mac2: &[u8]) -> bool {
        [&self.cookies.current, &self.cookies.previous]
            .into_iter()
            .any(|secret| crypto::mac_verify(&crypto::cookie(secret, from), covered, mac2))
    }

    /// Queue a datagram; false (dropped, counted `Full`) beyond RAW_OUT_MAX.
    fn queue_raw(&mut self, to: SocketAddr, datagram: Vec<u8>) -> bool {
        if self.raw_out.len() >= RAW_OUT_MAX {
            self.stats.count_drop(DropReason::Full);
            return false;
        }
        self.raw_out.push_back((to, datagram));
        true
    }

    /// Accept a login: the session exists from now on and `payload` rides
    /// in the handshake response.
    pub fn accept(
        &mut self,
        now: Instant,
        pending: PendingId,
        payload: &[u8],
    ) -> Result<SessionId, AcceptError> {
        let id = self.fresh_session_id();
        self.accept_as(now, pending, id, payload)
    }

    /// A fresh, unused session id the application may pass to
    /// [`ServerEndpoint::accept_as`] (for example to register the session
    /// elsewhere before the client hears it was accepted).
    pub fn fresh_session_id(&mut self) -> SessionId {
        loop {
            let id = self.rng.next_u64();
            if id != 0 && !self.index.contains_key(&id) {
                return id;
            }
        }
    }

    /// `accept` with a session id chosen by the application (non-zero,
    /// unused; unguessable ids come from [`ServerEndpoint::fresh_session_id`]).
    pub fn accept_as(
        &mut self,
        now: Instant,
        pending: PendingId,
        id: SessionId,
        payload: &[u8],
    ) -> Result<SessionId, AcceptError> {
        self.check_answer(pending, payload)?;
        if self.index.len() >= self.config.sessions_max {
            return Err(AcceptError::Full);
        }
        if id == 0 || self.index.contains_key(&id) {
            return Err(AcceptError::IdTaken(id));
        }
        let token = self
            .config
            .reset_key
            .map_or([0; RESET_TOKEN_BYTES], |k| crypto::reset_token(&k, id));
        let (mut hs, from, reply) =
            self.answer(pending, id, wire::STATUS_ACCEPTED, &token, payload);
        let keys = TransportKeys::split(&mut hs);
        let slot = self.insert_session(Session {
            core: Core::new(id, keys, now),
            peer: from,
            timer_at: None,
            ready: false,
        });
        self.queue_raw(from, reply);
        self.stats.handshakes_accepted += 1;
        self.after_change(slot);
        Ok(id)
    }

    /// Refuse a login; `payload` (the reason) rides in the response.
    pub fn reject(&mut self, pending: PendingId, payload: &[u8]) -> Result<(), AcceptError> {
        self.check_answer(pending, payload)?;
        let zeros = [0; RESET_TOKEN_BYTES];
        let (_, from, reply) = self.answer(pending, 0, wire::STATUS_REJECTED, &zeros, payload);
        self.queue_raw(from, reply);
        self.stats.handshakes_rejected += 1;
        Ok(())
    }

    fn check_answer(&self, pending: PendingId, payload: &[u8]) -> Result<(), AcceptError> {
        match self.pending.get(&pending.0) {
            Some(Pending {
                state: PendingState::Deciding(_),
                ..
            }) => {}
            _ => return Err(AcceptError::UnknownPending),
        }
        if payload.len() > wire::RESPONSE_PAYLOAD_MAX {
            return Err(AcceptError::TooLarge {
                len: payload.len(),
                max: wire::RESPONSE_PAYLOAD_MAX,
            });
        }
        Ok(())
    }

    /// Write the handshake response and remember it for retransmitted
    /// initiations; the finished handshake, the peer and the datagram.
    fn answer(
        &mut self,
        pending: PendingId,
        id: SessionId,
        status: u8,
        reset_token: &[u8; RESET_TOKEN_BYTES],
        payload: &[u8],
    ) -> (Box<HandshakeState>, SocketAddr, Vec<u8>) {
        let p = self.pending.get_mut(&pending.0).expect("checked");
        let PendingState::Deciding(mut hs) =
            std::mem::replace(&mut p.state, PendingState::Answered(Vec::new()))
        else {
            unreachable!("checked by check_answer");
        };
        let reply = write_response(&mut hs, p.client_index, id, status, reset_token, payload);
        p.state = PendingState::Answered(reply.clone());
        let from = p.from;
        self.deciding -= 1;
        if self.pending.len() - self.deciding > self.config.answered_handshakes_max {
            self.forget_oldest_answer();
        }
        (hs, from, reply)
    }

    /// Drop the oldest remembered answer (a retransmission of its
    /// initiation would then be decided again).
    fn forget_oldest_answer(&mut self) {
        let oldest = self.pending_expiry.iter().position(|(_, pid)| {
            matches!(
                self.pending.get(pid),
                Some(Pending {
                    state: PendingState::Answered(_),
                    ..
                })
            )
        });
        if let Some(i) = oldest {
            let (_, pid) = self.pending_expiry.remove(i).expect("position is in range");
            let p = self.pending.remove(&pid).expect("found above");
            self.by_ephemeral.remove(&p.ephemeral);
        }
    }

    fn insert_session(&mut self, s: Session) -> u32 {
        let id = s.core.id();
        let slot = match self.free.pop() {
            Some(slot) => {
                self.slots[slot as usize] = Some(s);
                slot
            }
            None => {
                self.slots.push(Some(s));
                (self.slots.len() - 1) as u32
            }
        };
        self.index.insert(id, slot);
        slot
    }

    /// Queue a message on a session.
    pub fn send(&mut self, session: SessionId, data: Vec<u8>) -> Result<MsgId, SendError> {
        let slot = *self.index.get(&session).ok_or(SendError::UnknownSession)?;
        let s = self.slots[slot as usize].as_mut().expect("indexed slot");
        let id = s.core.send(data, &self.config.session)?;
        self.after_change(slot);
        Ok(id)
    }

    /// Close a session cleanly (a CLOSE goes to the peer; unacknowledged
    /// messages come back as given up).
    pub fn close(&mut self, session: SessionId) {
        if let Some(&slot) = self.index.get(&session) {
            let s = self.slots[slot as usize].as_mut().expect("indexed slot");
            s.core.close(&mut self.scratch);
            self.after_change(slot);
        }
    }

    /// Move the session's events out, queue it for transmit, re-arm its
    /// timer, or remove it once closed.
    fn after_change(&mut self, slot: u32) {
        let s = self.slots[slot as usize].as_mut().expect("live slot");
        let id = s.core.id();
        self.events.extend(
            self.scratch
                .drain(..)
                .map(|event| ServerEvent::Session { session: id, event }),
        );
        if s.core.is_closed() {
            if let Some(t) = s.timer_at {
                self.timers.remove(&(t, slot));
            }
            self.index.remove(&id);
            self.slots[slot as usize] = None;
            self.free.push(slot);
            return;
        }
        if !s.ready && s.core.wants_transmit(&self.config.session) {
            s.ready = true;
            self.ready.push_back(slot);
        }
        let next = s.core.next_timeout(&self.config.session);
        if next != s.timer_at {
            if let Some(old) = s.timer_at {
                self.timers.remove(&(old, slot));
            }
            if let Some(t) = next {
                self.timers.insert((t, slot));
            }
            s.timer_at = next;
        }
    }

    /// The next datagram to send, written into `buf` (at least
    /// `DATAGRAM_BYTES_MAX` long).
    pub fn poll_transmit(&mut self, now: Instant, buf: &mut [u8]) -> Option<Transmit> {
        if let Some((dest, d)) = self.raw_out.pop_front() {
            buf[..d.len()].copy_from_slice(&d);
            self.stats.datagrams_out += 1;
            return Some(Transmit { dest, len: d.len() });
        }
        while let Some(slot) = self.ready.pop_front() {
            let Some(s) = self.slots[slot as usize].as_mut() else {
                continue;
            };
            s.ready = false;
            let sent = s
                .core
                .poll_transmit(now, buf, &self.config.session, &mut self.scratch);
            let dest = s.peer;
            self.after_change(slot);
            if let Some(len) = sent {
                self.stats.datagrams_out += 1;
                return Some(Transmit { dest, len });
            }
        }
        None
    }

    pub fn poll_event(&mut self) -> Option<ServerEvent> {
        self.events.pop_front()
    }

    /// When `handle_timeout` should next be called.
    pub fn poll_timeout(&self) -> Option<Instant> {
        let timer = self.timers.first().map(|(t, _)| *t);
        let pending = self.pending_expiry.front().map(|(t, _)| *t);
        let sources = self.sources.as_ref().and_then(|s| s.next_housekeeping);
        [timer, pending, sources].into_iter().flatten().min()
    }

    pub fn handle_timeout(&mut self, now: Instant) {
        self.expire_pending(now);
        if let Some(s) = self.sources.as_mut() {
            s.housekeeping(now);
        }
        while let Some(&(t, slot)) = self.timers.first() {
            if t > now {
                break;
            }
            self.timers.pop_first();
            let s = self.slots[slot as usize]
                .as_mut()
                .expect("timers hold live slots only");
            debug_assert_eq!(s.timer_at, Some(t));
            s.timer_at = None;
            s.core
                .handle_timeout(now, &self.config.session, &mut self.scratch);
            self.after_change(slot);
        }
    }

    fn expire_pending(&mut self, now: Instant) {
        while let Some(&(t, pid)) = self.pending_expiry.front() {
            if t > now {
                break;
            }
            self.pending_expiry.pop_front();
            if let Some(p) = self.pending.remove(&pid) {
                self.by_ephemeral.remove(&p.ephemeral);
                if matches!(p.state, PendingState::Deciding(_)) {
                    self.deciding -= 1;
                }
            }
        }
    }
}

/// RESPONSE: type | client_index | session_id | noise msg2 whose plaintext
/// is status | reset_token | payload_len u16 | payload.
fn write_response(
    hs: &mut HandshakeState,
    client_index: u32,
    id: SessionId,
    status: u8,
    reset_token: &[u8; RESET_TOKEN_BYTES],
    payload: &[u8],
) -> Vec<u8> {
    let block = wire::write_response_block(status, reset_token, payload);
    let mut d = vec![0u8; super::config::HANDSHAKE_INIT_BYTES];
    d[0] = wire::TYPE_RESPONSE;
    d[1..5].copy_from_slice(&client_index.to_le_bytes());
    d[5..13].copy_from_slice(&id.to_le_bytes());
    let n = hs
        .write_message(&block, &mut d[wire::RESPONSE_HEADER_BYTES..])
        .expect("response fits (payload checked)");
    d.truncate(wire::RESPONSE_HEADER_BYTES + n);
    assert!(
        d.len() <= super::config::HANDSHAKE_INIT_BYTES,
        "never amplify"
    );
    d
}
