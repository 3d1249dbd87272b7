//! The client side: one session to one gateway.
//!
//! The initiation is built once (padded to HANDSHAKE_INIT_BYTES, mac1 under
//! the gateway's public key) and retransmitted unchanged with bounded,
//! jittered backoff (`handshake_retry` × 1.5 per retry up to
//! `handshake_retry_max`, each wait ±20%) until the response arrives, so
//! the gateway answers a retransmission with its remembered response
//! instead of a second login. A new cookie makes the client add mac2,
//! send the INIT twice at once and start the schedule over. A response that fails to
//! decrypt (forged) restarts the handshake with a fresh ephemeral key on
//! the next retry.
//!
//! Once established, an authentic RESET (the session id and the token the
//! RESPONSE carried) closes the session at once (`CloseReason::Reset`).

use super::{
    config::{ClientConfig, HANDSHAKE_INIT_BYTES},
    core::Core,
    crypto::{self, TransportKeys},
    server::EndpointStats,
    wire::{
        self, INIT_BLOCK_BYTES, INIT_MAC1_AT, INIT_MAC2_AT, INIT_NOISE_BYTES, INIT_PAYLOAD_MAX,
        RESET_TOKEN_BYTES,
    },
    CloseReason, DropReason, Event, MsgId, SendError,
};
use rand_chacha::ChaCha20Rng;
use rand_core::{RngCore, SeedableRng};
use snow::HandshakeState;
use std::{collections::VecDeque, time::Duration, time::Instant};

/// Why a client session could not be created.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConnectError {
    #[error("login payload of {len} bytes exceeds {max}")]
    PayloadTooLarge { len: usize, max: usize },
}

struct Handshake {
    hs: Box<HandshakeState>,
    init: Vec<u8>,
    client_index: u32,
    cookie: Option<[u8; wire::MAC_BYTES]>,
    next_retry: Instant,
    /// The current wait before jitter.
    retry_delay: Duration,
    /// A forged response broke `hs`: build a new initiation before resending.
    broken: bool,
}

enum State {
    Handshaking(Handshake),
    Established(Core),
    Done,
}

pub struct ClientSession {
    config: ClientConfig,
    server_public: [u8; 32],
    payload: Vec<u8>,
    rng: ChaCha20Rng,
    started: Instant,
    state: State,
    /// Copies of the initiation to send now (1; 2 after a new cookie).
    send_init: u8,
    /// The RESET token from the accepted RESPONSE (zeros: the gateway
    /// sends no RESETs, and none is accepted).
    reset_token: [u8; RESET_TOKEN_BYTES],
    events: VecDeque<Event>,
    stats: EndpointStats,
}

/// Each handshake wait is multiplied by this (as a fraction) ...
const RETRY_GROWTH: (u32, u32) = (3, 2);
/// ... and jittered by up to this many percent either way.
const RETRY_JITTER_PERCENT: u64 = 20;
/// Copies of the first initiation sent with a new cookie (back to back).
const COOKIE_INIT_COPIES: u8 = 2;

/// `base` ± RETRY_JITTER_PERCENT, uniformly, from the session's RNG.
fn jittered(base: Duration, rng: &mut ChaCha20Rng) -> Duration {
    let us = base.as_micros() as u64;
    let spread = us * RETRY_JITTER_PERCENT / 100;
    let offset = rng.next_u64() % (2 * spread + 1);
    Duration::from_micros(us - spread + offset)
}

impl ClientSession {
    /// Start a handshake carrying `payload` (the login request) to the
    /// gateway whose static public key is `server_public`. `seed`: 32 bytes
    /// of OS randomness in production, fixed in tests.
    pub fn new(
        now: Instant,
        config: ClientConfig,
        server_public: [u8; 32],
        payload: &[u8],
        seed: [u8; 32],
    ) -> Result<ClientSession, ConnectError> {
        if payload.len() > INIT_PAYLOAD_MAX {
            return Err(ConnectError::PayloadTooLarge {
                len: payload.len(),
                max: INIT_PAYLOAD_MAX,
            });
        }
        let mut rng = ChaCha20Rng::from_seed(seed);
        let handshake = build_handshake(now, &config, &server_public, payload, &mut rng);
        Ok(ClientSession {
            config,
            server_public,
            payload: payload.to_vec(),
            rng,
            started: now,
            state: State::Handshaking(handshake),
            send_init: 1,
            reset_token: [0; RESET_TOKEN_BYTES],
            events: VecDeque::new(),
            stats: EndpointStats::default(),
        })
    }

    pub fn stats(&self) -> &EndpointStats {
        &self.stats
    }

    /// Send a keepalive PING after this long without sending anything
    /// (0: never), from now on: a client sets what its gateway asked for at
    /// login (`heartbeat_s`), which it learns only after the handshake.
    pub fn set_keepalive(&mut self, keepalive: Duration) {
        self.config.session.keepalive = keepalive;
    }

    pub fn session_id(&self) -> Option<u64> {
        match &self.state {
            State::Established(core) => Some(core.id()),
            _ => None,
        }
    }

    pub fn is_established(&self) -> bool {
        matches!(&self.state, State::Established(c) if !c.is_closed())
    }

    pub fn is_closed(&self) -> bool {
        match &self.state {
            State::Done => true,
            State::Established(core) => core.is_closed(),
            State::Handshaking(_) => false,
        }
    }

    /// Whether nothing is queued, in flight or buffered.
    pub fn is_idle(&self) -> bool {
        match &self.state {
            State::Established(core) => core.is_idle(),
            _ => true,
        }
    }

    /// The smoothed RTT estimate, once established.
    pub fn smoothed_rtt(&self) -> Option<Duration> {
        match &self.state {
            State::Established(core) => Some(core.rtt().smoothed()),
            _ => None,
        }
    }

    pub fn handle_datagram(&mut self, now: Instant, d: &[u8]) {
        self.stats.datagrams_in += 1;
        let result = match d.first() {
            Some(&wire::TYPE_TRANSPORT) => self.on_transport(now, d),
            Some(&wire::TYPE_RESPONSE) => self.on_response(now, d),
            Some(&wire::TYPE_COOKIE) => self.on_cookie(now, d),
            Some(&wire::TYPE_RESET) => self.on_reset(d),
            _ => Err(DropReason::Malformed),
        };
        if let Err(reason) = result {
            self.stats.count_drop(reason);
        }
    }

    fn on_transport(&mut self, now: Instant, d: &[u8]) -> Result<(), DropReason> {
        let t = wire::parse_transport(d).ok_or(DropReason::Malformed)?;
        let State::Established(core) = &mut self.state else {
            return Err(DropReason::UnknownSession);
        };
        if t.session_id != core.id() {
            return Err(DropReason::UnknownSession);
        }
        core.handle(now, &t, &self.config.session, &mut self.events)?;
        Ok(())
    }

    fn on_response(&mut self, now: Instant, d: &[u8]) -> Result<(), DropReason> {
        let r = wire::parse_response(d).ok_or(DropReason::Malformed)?;
        let State::Handshaking(h) = &mut self.state else {
            return Err(DropReason::UnknownSession); // a late duplicate
        };
        if r.client_index != h.client_index || h.broken {
            return Err(DropReason::UnknownSession);
        }
        let mut block = [0u8; HANDSHAKE_INIT_BYTES];
        let Ok(n) = h.hs.read_message(r.noise, &mut block) else {
            h.broken = true; // snow's state is spent; start over on the next retry
            return Err(DropReason::Unauthentic);
        };
        let Some((status, token, payload)) = wire::parse_response_block(&block[..n]) else {
            h.broken = true;
            return Err(DropReason::Malformed);
        };
        let payload = payload.to_vec();
        if status == wire::STATUS_ACCEPTED {
            self.reset_token = token;
            let keys = TransportKeys::split(&mut h.hs);
            self.state = State::Established(Core::new(r.session_id, keys, now));
            self.events.push_back(Event::Connected {
                session_id: r.session_id,
                payload,
            });
        } else {
            self.state = State::Done;
            self.events.push_back(Event::Rejected { payload });
        }
        Ok(())
    }

    fn on_reset(&mut self, d: &[u8]) -> Result<(), DropReason> {
        let (session_id, token) = wire::parse_reset(d).ok_or(DropReason::Malformed)?;
        let State::Established(core) = &mut self.state else {
            return Err(DropReason::UnknownSession);
        };
        if session_id != core.id() {
            return Err(DropReason::UnknownSession);
        }
        if core.is_closed() {
            return Err(DropReason::Closed);
        }
        let expected = self.reset_token;
        if expected == [0; RESET_TOKEN_BYTES] || !crypto::token_eq(&token, &expected) {
            return Err(DropReason::Unauthentic);
        }
        core.reset(&mut self.events);
        Ok(())
    }

    fn on_cookie(&mut self, now: Instant, d: &[u8]) -> Result<(), DropReason> {
        let (client_index, cookie) = wire::parse_cookie(d).ok_or(DropReason::Malformed)?;
        let State::Handshaking(h) = &mut self.state else {
            return Err(DropReason::UnknownSession);
        };
        if client_index != h.client_index {
            return Err(DropReason::UnknownSession);
        }
        if h.cookie == Some(cookie) {
            // The same cookie again (the gateway sends each twice, and
            // answers every INIT sent before the first arrived): nothing new.
            return Ok(());
        }
        h.cookie = Some(cookie);
        let mac2 = crypto::mac(&cookie, &h.init[..INIT_MAC2_AT]);
        h.init[INIT_MAC2_AT..].copy_from_slice(&mac2);
        // A new cookie made the handshake two round trips: the first INIT
        // with it goes out twice at once, so that one loss does not cost a
        // retry, and the schedule starts over (the path works; the answer
        // is due in a round trip).
        self.send_init = COOKIE_INIT_COPIES;
        h.retry_delay = self.config.handshake_retry;
        h.next_retry = now + jittered(h.retry_delay, &mut self.rng);
        Ok(())
    }

    pub fn send(&mut self, data: Vec<u8>) -> Result<MsgId, SendError> {
        match &mut self.state {
            State::Established(core) => core.send(data, &self.config.session),
            _ => Err(SendError::Closed),
        }
    }

    pub fn close(&mut self) {
        match &mut self.state {
            State::Established(core) => core.close(&mut self.events),
            State::Handshaking(_) => {
                self.state = State::Done;
                self.events.push_back(Event::Closed(CloseReason::Local));
            }
            State::Done => {}
        }
    }

    pub fn poll_transmit(&mut self, now: Instant, buf: &mut [u8]) -> Option<usize> {
        match &mut self.state {
            State::Handshaking(h) if self.send_init > 0 => {
                self.send_init -= 1;
                if h.broken {
                    let cookie = h.cookie;
                    *h = build_handshake(
                        now,
                        &self.config,
                        &self.server_public,
                        &self.payload,
                        &mut self.rng,
                    );
                    h.cookie = cookie;
                    if let Some(c) = cookie {
                        let mac2 = crypto::mac(&c, &h.init[..INIT_MAC2_AT]);
                        h.init[INIT_MAC2_AT..].copy_from_slice(&mac2);
                    }
                }
                buf[..h.init.len()].copy_from_slice(&h.init);
                self.stats.datagrams_out += 1;
                Some(h.init.len())
            }
            State::Established(core) => {
                let n = core.poll_transmit(now, buf, &self.config.session, &mut self.events)?;
                self.stats.datagrams_out += 1;
                Some(n)
            }
            _ => None,
        }
    }

    pub fn poll_timeout(&self) -> Option<Instant> {
        match &self.state {
            State::Handshaking(h) => Some(
                h.next_retry
                    .min(self.started + self.config.handshake_timeout),
            ),
            State::Established(core) => core.next_timeout(&self.config.session),
            State::Done => None,
        }
    }

    pub fn handle_timeout(&mut self, now: Instant) {
        match &mut self.state {
            State::Handshaking(_) if now >= self.started + self.config.handshake_timeout => {
                self.state = State::Done;
                self.events
                    .push_back(Event::Closed(CloseReason::HandshakeTimedOut));
            }
            State::Handshaking(h) if now >= h.next_retry => {
                let (num, den) = RETRY_GROWTH;
                h.retry_delay = (h.retry_delay * num / den).min(self.config.handshake_retry_max);
                h.next_retry = now + jittered(h.retry_delay, &mut self.rng);
                self.send_init = 1;
            }
            State::Established(core) => {
                core.handle_timeout(now, &self.config.session, &mut self.events)
            }
            _ => {}
        }
    }

    pub fn poll_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }
}

fn build_handshake(
    now: Instant,
    config: &ClientConfig,
    server_public: &[u8; 32],
    payload: &[u8],
    rng: &mut ChaCha20Rng,
) -> Handshake {
    let mut seed = [0u8; 32];
    rng.fill_bytes(&mut seed);
    let mut hs = crypto::initiator(server_public, seed);
    let client_index = rng.next_u32();
    let mut block = [0u8; INIT_BLOCK_BYTES];
    block[..2].copy_from_slice(&(payload.len() as u16).to_le_bytes());
    block[2..2 + payload.len()].copy_from_slice(payload);
    let mut init = vec![0u8; HANDSHAKE_INIT_BYTES];
    init[0] = wire::TYPE_INIT;
    init[1..5].copy_from_slice(&client_index.to_le_bytes());
    let n = hs
        .write_message(&block, &mut init[5..INIT_MAC1_AT])
        .expect("initiation fits");
    assert_eq!(n, INIT_NOISE_BYTES);
    let mac1 = crypto::mac(&crypto::mac1_key(server_public), &init[..INIT_MAC1_AT]);
    init[INIT_MAC1_AT..INIT_MAC2_AT].copy_from_slice(&mac1);
    Handshake {
        hs: Box::new(hs),
        init,
        client_index,
        cookie: None,
        next_retry: now + jittered(config.handshake_retry, rng),
        retry_delay: config.handshake_retry,
        broken: false,
    }
}
