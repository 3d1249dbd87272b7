//! The secure, reliable UDP session layer, sans-IO.
//!
//! Datagrams and `now` go in; datagrams to send, the next timeout and
//! events come out. Nothing in here touches a socket, a clock, a thread or
//! a global RNG: the caller passes the time and 32-byte seeds.
//!
//! * [`ServerEndpoint`]: the gateway side, many sessions behind one UDP
//!   socket, demultiplexed by session id.
//! * [`ClientSession`]: the client side, one session.
//!
//! Both share [`core`]: Noise_NK (snow) handshake keys, ChaCha20-Poly1305
//! transport with an explicit 64-bit counter as nonce, a replay window
//! checked after decryption, and reliability: per-fragment sequence
//! numbers, cumulative + selective acks, RFC 9002 RTT and retransmission
//! timeout with backoff, fast retransmit, a bounded send window and queue,
//! fragmentation of messages up to 64 KiB into datagrams of at most 1,200
//! bytes, and a retry budget after which the session closes and every
//! unacknowledged message is handed back as given up. `docs/PROTOCOL.md`
//! section 2 has every byte.

mod client;
pub mod config;
mod core;
pub mod crypto;
mod recv_side;
mod replay;
mod rtt;
mod send_side;
mod server;
pub mod wire;

pub use client::ClientSession;
pub use client::ConnectError;
pub use config::{ClientConfig, CookieMode, ServerConfig, SessionConfig};
pub use crypto::StaticKeypair;
pub use server::HANDSHAKE_LIMIT_HOUSEKEEPING;
pub use server::{
    AcceptError, EndpointStats, PendingId, ServerEndpoint, ServerEvent, SessionId, Transmit,
};

/// A message's number within its session (0, 1, 2, ... per direction).
pub type MsgId = u64;

/// What a session reports to its application.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// Client only: the gateway accepted the handshake; its answer payload.
    Connected { session_id: u64, payload: Vec<u8> },
    /// Client only: the gateway refused the handshake; its answer payload.
    /// The session is closed.
    Rejected { payload: Vec<u8> },
    /// A complete message from the peer, in order, exactly once.
    Message(Vec<u8>),
    /// The peer has every fragment of this message.
    Acked(MsgId),
    /// This message is not known to have arrived and never will be sent
    /// again (the session closed first); its payload is handed back.
    GivenUp { id: MsgId, data: Vec<u8> },
    /// The session is over; nothing more will come from it.
    Closed(CloseReason),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CloseReason {
    /// This side called `close`.
    Local,
    /// The peer sent CLOSE with this reason code.
    Peer(u8),
    /// A fragment used up its retry budget: the peer is unreachable.
    TimedOut,
    /// Nothing received for `idle_timeout`.
    Expired,
    /// The (authenticated) peer broke the protocol.
    ProtocolError,
    /// The datagram counter reached its limit.
    CounterExhausted,
    /// Client only: no handshake answer within `handshake_timeout`.
    HandshakeTimedOut,
    /// Client only: the gateway answered with an authentic RESET: it no
    /// longer knows this session (it restarted, or closed the session and
    /// the CLOSE was lost). Log in again at once.
    Reset,
}

/// Why `send` refused a message (nothing was queued).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SendError {
    #[error("message of {len} bytes exceeds the 64 KiB limit")]
    TooLarge { len: usize },
    #[error("empty message")]
    Empty,
    #[error("send queue full; wait for acknowledgements")]
    QueueFull,
    #[error("session closed")]
    Closed,
    #[error("no such session")]
    UnknownSession,
}

/// Why an incoming datagram was dropped. Every drop is counted in
/// [`EndpointStats`] (or the client's equivalent) and changes no state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DropReason {
    /// Not a datagram of this protocol, or the wrong length for its type.
    Malformed,
    /// The AEAD tag or a MAC did not verify.
    Unauthentic,
    /// A counter already seen, or too old for the replay window.
    Replayed,
    /// No session with this id (or the handshake it answers is unknown).
    UnknownSession,
    /// The session is closed.
    Closed,
    /// A duplicate of a handshake initiation that is still being decided.
    DuplicateHandshake,
    /// A limit was reached (sessions or pending handshakes).
    Full,
    /// A handshake initiation over its source address's rate
    /// (`handshakes_per_source_per_s`) that no cookie can help: it carried
    /// a valid cookie already, or the endpoint never sends cookies.
    Limited,
}
