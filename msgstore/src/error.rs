//! Errors of the storage engine.

use proto::shard::{ShardError, ShardErrorCode};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("mailbox of user {user} is full ({reason})")]
    MailboxFull { user: u64, reason: &'static str },
    #[error("message of {len} bytes exceeds the limit of {max} bytes")]
    MessageTooLarge { len: usize, max: u32 },
    #[error("invalid configuration: {0}")]
    Config(String),
    #[error("shard directory {dir} is locked by another process")]
    Locked { dir: String },
    #[error("the shard is overloaded: {0}")]
    Overloaded(&'static str),
    #[error("the shard is closed")]
    Closed,
    #[error("the shard stopped accepting writes after a failed sync; restart it to recover: {0}")]
    Poisoned(String),
    #[error("I/O error: {0}")]
    Io(#[from] std::io::Error),
    #[error("index (LMDB) error: {0}")]
    Index(#[from] heed::Error),
    #[error("corrupt shard data: {0}")]
    Corrupt(String),
    #[error("storage error: {0}")]
    Storage(String),
    #[error("user moved to shard {shard} at {addr} (cluster map epoch {epoch})")]
    Moved {
        shard: String,
        addr: String,
        epoch: u64,
    },
    #[error("busy: {0}; retry in a moment")]
    Busy(&'static str),
    #[error("conflict: {0}")]
    Conflict(String),
}

impl From<daemon::LockError> for Error {
    fn from(e: daemon::LockError) -> Self {
        match e {
            daemon::LockError::Locked { dir } => Error::Locked { dir },
            daemon::LockError::Io { source, .. } => Error::Io(source),
        }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// The wire form of this error.
    pub fn to_wire(&self) -> ShardError {
        let code = match self {
            Error::MailboxFull { .. } => ShardErrorCode::MailboxFull,
            Error::MessageTooLarge { .. } => ShardErrorCode::MessageTooLarge,
            Error::Overloaded(_) | Error::Closed => ShardErrorCode::Unavailable,
            Error::Config(_) => ShardErrorCode::BadRequest,
            Error::Moved { shard, addr, epoch } => ShardErrorCode::Moved {
                shard: shard.clone(),
                addr: addr.clone(),
                epoch: *epoch,
            },
            Error::Busy(_) => ShardErrorCode::Busy,
            Error::Conflict(_) => ShardErrorCode::Conflict,
            Error::Locked { .. }
            | Error::Poisoned(_)
            | Error::Io(_)
            | Error::Index(_)
            | Error::Corrupt(_)
            | Error::Storage(_) => ShardErrorCode::Storage,
        };
        ShardError {
            code,
            message: self.to_string(),
        }
    }

    /// A copy for answering several waiters with the same failure.
    pub(crate) fn duplicate(&self) -> Error {
        match self {
            Error::MailboxFull { user, reason } => Error::MailboxFull {
                user: *user,
                reason,
            },
            Error::MessageTooLarge { len, max } => Error::MessageTooLarge {
                len: *len,
                max: *max,
            },
            Error::Overloaded(r) => Error::Overloaded(r),
            Error::Closed => Error::Closed,
            Error::Poisoned(m) => Error::Poisoned(m.clone()),
            Error::Moved { shard, addr, epoch } => Error::Moved {
                shard: shard.clone(),
                addr: addr.clone(),
                epoch: *epoch,
            },
            Error::Busy(r) => Error::Busy(r),
            Error::Conflict(m) => Error::Conflict(m.clone()),
            other => Error::Storage(other.to_string()),
        }
    }
}
