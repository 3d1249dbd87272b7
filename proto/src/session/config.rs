//! Protocol constants (fixed by the wire format) and tunable limits and
//! timers (per endpoint).

use std::time::Duration;

/// Largest UDP payload either side ever sends or accepts.
pub const DATAGRAM_BYTES_MAX: usize = 1200;
/// A handshake initiation is always exactly this long (padded), so that no
/// answer to it can be larger: the gateway never amplifies traffic.
pub const HANDSHAKE_INIT_BYTES: usize = DATAGRAM_BYTES_MAX;
/// Largest application message (login payloads excluded).
pub const MESSAGE_BYTES_MAX: usize = 64 * 1024;
/// Fragments a receiver buffers beyond its cumulative ack point; a sender
/// never has a fragment in flight at or beyond `peer_una + RECV_WINDOW`.
/// Larger than the fragments of one maximum message, so any message can
/// always be reassembled.
pub const RECV_WINDOW_FRAGMENTS: u32 = 128;
/// Datagram counters a receiver remembers behind the highest one it has
/// accepted; older counters are rejected as replays.
pub const REPLAY_WINDOW_COUNTERS: u64 = 128;
/// A session closes itself before its send counter reaches this value, so
/// a nonce is never reused.
pub const COUNTER_LIMIT: u64 = 1 << 60;
/// Acks (later fragments acknowledged) after which an unacknowledged
/// fragment is retransmitted at once (RFC 9002 kPacketThreshold).
pub const FAST_RETRANSMIT_ACKS: u8 = 3;
/// RTT assumed before the first sample (RFC 9002 kInitialRtt).
pub const INITIAL_RTT: Duration = Duration::from_millis(333);
/// Timer granularity (RFC 9002 kGranularity).
pub const GRANULARITY: Duration = Duration::from_millis(1);
/// Longest a receiver waits before acknowledging (RFC 9002 max_ack_delay).
pub const MAX_ACK_DELAY: Duration = Duration::from_millis(25);
/// Upper bound of a retransmission timeout after backoff.
pub const RTO_MAX: Duration = Duration::from_secs(10);

/// Limits and timers of one session (both sides).
#[derive(Debug, Clone)]
pub struct SessionConfig {
    /// Fragments in flight (sent, not acknowledged) at most; at most
    /// [`RECV_WINDOW_FRAGMENTS`].
    pub send_window_fragments: u32,
    /// Bytes of messages queued or in flight at most; `send` beyond it
    /// returns `SendError::QueueFull` (back-pressure).
    pub send_queue_bytes_max: usize,
    /// Transmissions of one fragment at most (first send included); when a
    /// fragment needs one more, the session closes with `TimedOut` and
    /// every unacknowledged message is reported given up.
    pub transmissions_max: u8,
    /// With nothing else to send for this long, send a PING (0: never).
    /// Clients use it as their heartbeat; gateways leave it 0.
    pub keepalive: Duration,
    /// Nothing received for this long: the session expires.
    pub idle_timeout: Duration,
    /// The unresponsive-peer rule (0: off; the gateway's default): when at
    /// least this many retransmission or probe timeouts have fired in a row
    /// (nothing authentic received in between) and nothing authentic has
    /// arrived for `unresponsive_after` since this side began waiting for
    /// an answer, the session closes with `CloseReason::TimedOut`. While it
    /// waits, this side sends PING probes: the first
    /// `clamp(rto, unresponsive_after / 16, unresponsive_after / 8)` after
    /// its last ack-eliciting datagram, then every `unresponsive_after / 16`.
    pub unresponsive_timeouts: u8,
    /// See `unresponsive_timeouts`.
    pub unresponsive_after: Duration,
}

impl Default for SessionConfig {
    fn default() -> Self {
        SessionConfig {
            send_window_fragments: RECV_WINDOW_FRAGMENTS,
            send_queue_bytes_max: 1024 * 1024,
            transmissions_max: 10,
            keepalive: Duration::ZERO,
            idle_timeout: Duration::from_secs(90),
            unresponsive_timeouts: 0,
            unresponsive_after: Duration::from_secs(4),
        }
    }
}

impl SessionConfig {
    /// The client's defaults: a heartbeat every 30 s, and a gateway that
    /// leaves 3 timeouts in a row and 4 s unanswered is declared dead.
    pub fn client() -> Self {
        SessionConfig {
            keepalive: Duration::from_secs(30),
            unresponsive_timeouts: 3,
            unresponsive_after: Duration::from_secs(4),
            ..SessionConfig::default()
        }
    }
}

/// When the server demands a cookie before it spends anything on a
/// handshake initiation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CookieMode {
    /// Never (tests and trusted networks).
    Never,
    /// When more initiations than this arrived in the current second.
    UnderLoad { inits_per_s_max: u32 },
    /// Always.
    Always,
}

/// Limits and timers of a server endpoint.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    pub session: SessionConfig,
    /// Established sessions at most; an initiation beyond it is answered
    /// by nothing and counted (`dropped_sessions_full`).
    pub sessions_max: usize,
    /// Handshakes read and waiting for the application's accept/reject at
    /// most; an initiation beyond it is dropped and counted.
    pub pending_handshakes_max: usize,
    /// Answered handshakes remembered (for retransmitted initiations) at
    /// most; beyond it the oldest answer is forgotten early.
    pub answered_handshakes_max: usize,
    /// How long a pending handshake waits for accept/reject, and how long
    /// an answered one is remembered (at most `answered_handshakes_max`).
    pub handshake_timeout: Duration,
    pub cookie_mode: CookieMode,
    /// The cookie secret rotates this often; cookies of the current and
    /// previous secret are accepted.
    pub cookie_rotation: Duration,
    /// Handshake initiations per source IP address (port ignored) and
    /// second, bursts of the same number; 0: no limit. Counted only after
    /// mac1, in two buckets per address: one for initiations without a
    /// valid cookie (mac2), whose empty bucket is answered with a COOKIE,
    /// and one for initiations with one, whose empty bucket drops
    /// (`DropReason::Limited`). docs/PROTOCOL.md §2.2. Default 0: an
    /// endpoint in a test or a benchmark takes every handshake; the gateway
    /// daemon sets its `limits.handshakes_per_ip_per_s` (default 20).
    pub handshakes_per_source_per_s: u32,
    /// Source addresses each of the two handshake limiters remembers at
    /// most. A full table stores no new address: an initiation without a
    /// valid cookie is then answered with a COOKIE (dropped as `Limited`
    /// under `CookieMode::Never`), one with a valid cookie skips the
    /// per-source check. Addresses whose bucket is full again are forgotten
    /// every second.
    pub handshake_sources_max: usize,
    /// The key of the RESET tokens (`crypto::reset_token`); `None`: no
    /// token in the RESPONSE (zeros) and no RESET is ever sent.
    pub reset_key: Option<[u8; 32]>,
    /// RESET datagrams sent per second at most (a one-second window, the
    /// whole endpoint); beyond it nothing is sent (`resets_limited`).
    pub resets_per_s_max: u32,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            session: SessionConfig::default(),
            sessions_max: 1_000_000,
            pending_handshakes_max: 4096,
            answered_handshakes_max: 65_536,
            handshake_timeout: Duration::from_secs(10),
            cookie_mode: CookieMode::UnderLoad {
                inits_per_s_max: 2000,
            },
            cookie_rotation: Duration::from_secs(120),
            handshakes_per_source_per_s: 0,
            handshake_sources_max: 65_536,
            reset_key: None,
            resets_per_s_max: 1000,
        }
    }
}

/// Limits and timers of a client.
#[derive(Debug, Clone)]
pub struct ClientConfig {
    pub session: SessionConfig,
    /// First retransmission of an unanswered initiation; each next wait is
    /// 1.5 times the previous one, at most `handshake_retry_max`, and every
    /// wait is jittered by ±20% (the session's seeded RNG). A COOKIE starts
    /// the schedule over (the path works; the next answer is due).
    pub handshake_retry: Duration,
    /// The longest wait between two initiations (before jitter).
    pub handshake_retry_max: Duration,
    /// Give up the handshake after this long.
    pub handshake_timeout: Duration,
}

impl Default for ClientConfig {
    fn default() -> Self {
        ClientConfig {
            session: SessionConfig::client(),
            handshake_retry: Duration::from_millis(500),
            handshake_retry_max: Duration::from_secs(2),
            handshake_timeout: Duration::from_secs(15),
        }
    }
}
