//! The SDK's typed errors.

use proto::app::{AppErrorCode, LoginError};

/// Why a login (the first one, or a reconnect) did not produce a session.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConnectError {
    #[error("cannot resolve gateway address {addr}: {message}")]
    Resolve { addr: String, message: String },
    #[error("gateway address {0} resolves to no address")]
    NoAddress(String),
    #[error("socket: {0}")]
    Io(String),
    /// The gateway answered and refused the login.
    #[error("login refused ({code:?}): {message}")]
    Refused { code: LoginError, message: String },
    /// The login was refused as not newer than the user's last accepted
    /// login (`last_ns`): another device's clock is ahead of this one's.
    /// The SDK retries above it by itself; this reaches the application
    /// only when that kept failing.
    #[error("login refused as stale: the last accepted login is at {last_ns} ns")]
    Stale { last_ns: u64 },
    /// No gateway address answered the handshake in time.
    #[error("no gateway answered the handshake ({tried} addresses tried)")]
    Unreachable { tried: usize },
    /// The gateway's handshake answer is not a `LoginAnswer`.
    #[error("malformed login answer: {0}")]
    BadAnswer(String),
    /// The login request does not fit in the handshake.
    #[error("login request too large: {0}")]
    LoginTooLarge(String),
}

impl ConnectError {
    /// Whether trying again later may succeed (the SDK's reconnect loop
    /// keeps trying only after these).
    pub fn is_transient(&self) -> bool {
        match self {
            ConnectError::Refused { code, .. } => {
                matches!(code, LoginError::Busy | LoginError::Unavailable)
            }
            ConnectError::Resolve { .. }
            | ConnectError::NoAddress(_)
            | ConnectError::Io(_)
            | ConnectError::Unreachable { .. }
            | ConnectError::Stale { .. } => true,
            ConnectError::BadAnswer(_) | ConnectError::LoginTooLarge(_) => false,
        }
    }
}

/// Why a request failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SdkError {
    /// The gateway answered with an error.
    #[error("gateway error ({code:?}): {message}")]
    App { code: AppErrorCode, message: String },
    /// No reply within `request_timeout_ms`.
    #[error("no reply within the request timeout")]
    Timeout,
    /// The outbox already holds `outbox_max` unanswered messages.
    #[error("outbox full ({max} messages waiting for an answer)")]
    OutboxFull { max: usize },
    /// Checked before anything is sent: over `BODY_BYTES_MAX`,
    /// `PROFILES_MAX`, ...
    #[error("request outside the protocol's limits: {0}")]
    Invalid(String),
    /// The session broke while this (non-send) request was in flight; it
    /// may or may not have been carried out. Sends are never failed with
    /// this: they stay in the outbox and are re-sent after the reconnect.
    #[error("session lost while the request was in flight")]
    SessionLost,
    /// The connection is over for good (see `ImEvent::SessionLost`).
    #[error("connection closed: {0}")]
    Closed(LostReason),
    /// The gateway answered with a reply that does not fit the request.
    #[error("unexpected reply from the gateway: {0}")]
    Protocol(String),
}

/// Why a connection ended for good (no more reconnects).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LostReason {
    /// The user logged in elsewhere.
    #[error("kicked: logged in elsewhere")]
    Kicked,
    /// `logout` or `close` was called, or every handle was dropped.
    #[error("closed by the application")]
    Closed,
    /// A reconnect's login was refused for good (wrong credentials,
    /// account disabled, bad token without a password to fall back on).
    #[error("reconnect refused: {0}")]
    Refused(ConnectError),
    /// `reconnect_attempts_max` reconnects in a row failed; the last error.
    #[error("reconnect gave up after {attempts} attempts: {last}")]
    GaveUp { attempts: u32, last: ConnectError },
}
