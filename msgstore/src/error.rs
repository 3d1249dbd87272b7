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
    /// The log has damage with valid entries after it: the shard refuses
    /// to start rather than drop acknowledged entries; `msgstore --repair`
    /// cuts the log there.
    #[error("{0}; refusing to start (nothing was changed on disk): run `msgstore --repair` (or `imctl shard repair --data DIR`) to cut the log there and drop what follows")]
    LogDamaged(Box<LogDamage>),
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
    /// A snapshot archive that is damaged, truncated or not one this
    /// version writes; nothing of it was installed.
    #[error("snapshot archive refused (nothing installed): {0}")]
    BadSnapshot(String),
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
            | Error::LogDamaged(_)
            | Error::BadSnapshot(_)
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

/// Where the write-ahead log is damaged with valid entries after the damage
/// (corruption, not a torn tail; docs/STORAGE.md, "Recovery").
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogDamage {
    /// The segment file holding the first bad byte.
    pub file: String,
    /// Byte offset of the first bad frame in that file (0: its header).
    pub offset: u64,
    /// What was wrong there.
    pub fault: String,
    /// Valid entries (checksum verified, known kind) after the damage, in
    /// this and later segments: what a repair drops.
    pub valid_after: u64,
    /// Appends among them.
    pub appends_after: u64,
    /// Bytes after the damage that are not part of a valid entry (nonzero,
    /// unreadable): the most entries of unknown user they can have held is
    /// `unreadable_bytes / 49` (the smallest append frame).
    pub unreadable_bytes: u64,
    /// (segment file, first byte, end byte) of every range a repair drops.
    pub dropped_ranges: Vec<(String, u64, u64)>,
    /// Per user: (lowest, highest) seq of the valid appends after the
    /// damage (and `next_seq - 1` of any Reseq), sorted by user.
    pub dropped_seqs: Vec<(u64, u64, u64)>,
}

impl std::fmt::Display for LogDamage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "write-ahead log segment {} is damaged at byte offset {} ({}), with {} valid entries \
             ({} appends) after it and {} unreadable bytes",
            self.file,
            self.offset,
            self.fault,
            self.valid_after,
            self.appends_after,
            self.unreadable_bytes
        )
    }
}

/// What `msgstore --repair` dropped (one entry per damaged log).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RepairReport {
    /// The damage that was cut off, if any (a clean log needs no repair).
    pub damage: Option<LogDamage>,
    /// Users whose next seq was raised past every seq they may have been
    /// given in the dropped part: (user, new next seq).
    pub raised: Vec<(u64, u64)>,
}
