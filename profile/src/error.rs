//! Errors of the profile service, and their wire form.

use proto::profile::{ErrorCode, ProfileError};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("wrong username or password")]
    WrongCredentials,
    #[error("account {0} is disabled")]
    AccountDisabled(u64),
    #[error("{0} not found")]
    NotFound(String),
    #[error("username {0:?} is taken")]
    UsernameTaken(String),
    #[error("{field} is {len} bytes, over the limit of {max}")]
    FieldTooLong {
        field: &'static str,
        len: usize,
        max: usize,
    },
    #[error("{0} is not valid UTF-8")]
    InvalidUtf8(&'static str),
    #[error("invalid {field}: {reason}")]
    InvalidField { field: &'static str, reason: String },
    #[error("limit reached: {0}")]
    LimitReached(String),
    #[error("not an accepted image: {0}")]
    BadImage(String),
    #[error("image of {len} bytes exceeds the limit of {max} bytes")]
    ImageTooLarge { len: usize, max: usize },
    #[error("users {0} and {1} are already friends")]
    AlreadyFriends(u64, u64),
    #[error("users {0} and {1} are not friends")]
    NotFriends(u64, u64),
    #[error("not a member: {0}")]
    NotMember(String),
    #[error("not permitted: {0}")]
    NotPermitted(String),
    #[error("already a member: {0}")]
    AlreadyMember(String),
    #[error("the service is busy: {0}")]
    Busy(&'static str),
    #[error("bad request: {0}")]
    BadRequest(String),
    #[error("invalid configuration: {0}")]
    Config(String),
    #[error("data directory {dir} is locked by another process")]
    Locked { dir: String },
    #[error("I/O error: {0}")]
    Io(#[from] std::io::Error),
    #[error("LMDB error: {0}")]
    Lmdb(#[from] heed::Error),
    #[error("corrupt profile data: {0}")]
    Corrupt(String),
    /// A write transaction failed for want of room: the LMDB map or the
    /// disk is full. Nothing of it was stored; nothing is damaged.
    #[error("storage full: {0}")]
    StorageFull(String),
    /// A write transaction failed (an I/O or LMDB error other than a full
    /// map or disk). Nothing of it was stored.
    #[error("write failed, nothing stored: {0}")]
    WriteFailed(String),
    #[error("the service is closed")]
    Closed,
    /// A replica that does not lead its group got a write; `leader` is the
    /// leader's client address, if known.
    #[error("this replica does not lead the profile group (leader: {leader:?})")]
    NotLeader { leader: Option<String> },
    /// No leader committed or confirmed the request in time.
    #[error("the profile group is unavailable: {0}")]
    Unavailable(String),
    /// An op the group committed and every replica refused alike.
    #[error("{}", .0.message)]
    Refused(ProfileError),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Why a write transaction failed (the `reason` label of
/// `profile_writes_failed_total`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum WriteFailure {
    /// `MDB_MAP_FULL`: the map reached `store.map_bytes`.
    MapFull,
    /// `ENOSPC` (`io::ErrorKind::StorageFull`).
    DiskFull,
    /// `EDQUOT` (`io::ErrorKind::QuotaExceeded`).
    QuotaExceeded,
    /// Any other I/O or LMDB error.
    Other,
}

impl WriteFailure {
    #[cfg(test)]
    pub(crate) const ALL: [WriteFailure; 4] = [
        WriteFailure::MapFull,
        WriteFailure::DiskFull,
        WriteFailure::QuotaExceeded,
        WriteFailure::Other,
    ];

    pub(crate) fn label(self) -> &'static str {
        match self {
            WriteFailure::MapFull => "map_full",
            WriteFailure::DiskFull => "disk_full",
            WriteFailure::QuotaExceeded => "quota_exceeded",
            WriteFailure::Other => "io",
        }
    }
}

impl From<daemon::LockError> for Error {
    fn from(e: daemon::LockError) -> Self {
        match e {
            daemon::LockError::Locked { dir } => Error::Locked { dir },
            daemon::LockError::Io { source, .. } => Error::Io(source),
        }
    }
}

impl Error {
    pub fn code(&self) -> ErrorCode {
        match self {
            Error::WrongCredentials => ErrorCode::WrongCredentials,
            Error::AccountDisabled(_) => ErrorCode::AccountDisabled,
            Error::NotFound(_) => ErrorCode::NotFound,
            Error::UsernameTaken(_) => ErrorCode::UsernameTaken,
            Error::FieldTooLong { .. } => ErrorCode::FieldTooLong,
            Error::InvalidUtf8(_) => ErrorCode::InvalidUtf8,
            Error::InvalidField { .. } => ErrorCode::InvalidField,
            Error::LimitReached(_) => ErrorCode::LimitReached,
            Error::BadImage(_) => ErrorCode::BadImage,
            Error::ImageTooLarge { .. } => ErrorCode::ImageTooLarge,
            Error::AlreadyFriends(..) => ErrorCode::AlreadyFriends,
            Error::NotFriends(..) => ErrorCode::NotFriends,
            Error::NotMember(_) => ErrorCode::NotMember,
            Error::NotPermitted(_) => ErrorCode::NotPermitted,
            Error::AlreadyMember(_) => ErrorCode::AlreadyMember,
            Error::Busy(_) | Error::Closed => ErrorCode::Busy,
            Error::BadRequest(_) | Error::Config(_) => ErrorCode::BadRequest,
            Error::Locked { .. }
            | Error::Io(_)
            | Error::Lmdb(_)
            | Error::Corrupt(_)
            | Error::StorageFull(_)
            | Error::WriteFailed(_) => ErrorCode::Storage,
            Error::NotLeader { .. } | Error::Unavailable(_) => ErrorCode::Unavailable,
            Error::Refused(e) => e.code,
        }
    }

    /// The answer for a request that failed with `self`: `NotLeader` for a
    /// follower's refusal, else the error.
    pub fn into_response(self) -> proto::profile::ResponseBody {
        match self {
            Error::NotLeader { leader } => proto::profile::ResponseBody::NotLeader { leader },
            other => proto::profile::ResponseBody::Error(other.to_wire()),
        }
    }

    /// The wire form of this error.
    pub fn to_wire(&self) -> ProfileError {
        if let Error::Refused(e) = self {
            return e.clone();
        }
        ProfileError {
            code: self.code(),
            message: self.to_string(),
        }
    }

    /// What the failure `self` of a batch's write transaction is for each
    /// op of the batch: [`Error::StorageFull`] if the LMDB map or the disk
    /// is full, else [`Error::WriteFailed`] (never "corrupt": a failed
    /// write damages nothing).
    pub(crate) fn write_failed(&self) -> Error {
        let text = match self.write_failure() {
            WriteFailure::MapFull => {
                "the LMDB map is full (store.map_bytes): raise store.map_bytes and restart; nothing was stored"
            }
            WriteFailure::DiskFull => "the disk is full (ENOSPC): free space; nothing was stored",
            WriteFailure::QuotaExceeded => {
                "the disk quota is exceeded (EDQUOT): free space; nothing was stored"
            }
            WriteFailure::Other => return Error::WriteFailed(self.to_string()),
        };
        Error::StorageFull(text.to_string())
    }

    /// Why a write transaction failed with `self`.
    pub(crate) fn write_failure(&self) -> WriteFailure {
        let io = match self {
            Error::Lmdb(heed::Error::Mdb(heed::MdbError::MapFull)) => return WriteFailure::MapFull,
            Error::Lmdb(heed::Error::Io(e)) | Error::Io(e) => e,
            _ => return WriteFailure::Other,
        };
        // ENOSPC and EDQUOT (`raw_os_error`) are these kinds.
        match io.kind() {
            std::io::ErrorKind::StorageFull => WriteFailure::DiskFull,
            std::io::ErrorKind::QuotaExceeded => WriteFailure::QuotaExceeded,
            _ => WriteFailure::Other,
        }
    }

    pub(crate) fn not_found_user(user: u64) -> Error {
        Error::NotFound(format!("user {user}"))
    }

    pub(crate) fn not_found_group(group: u64) -> Error {
        Error::NotFound(format!("group {group}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn os(code: i32) -> Error {
        Error::Lmdb(heed::Error::Io(std::io::Error::from_raw_os_error(code)))
    }

    #[test]
    fn a_full_map_or_disk_is_not_called_corrupt() {
        let map_full = Error::Lmdb(heed::Error::Mdb(heed::MdbError::MapFull));
        let cases = [
            (map_full, WriteFailure::MapFull, "LMDB map is full"),
            (os(libc::ENOSPC), WriteFailure::DiskFull, "disk is full"),
            (
                Error::Io(std::io::Error::from_raw_os_error(libc::ENOSPC)),
                WriteFailure::DiskFull,
                "disk is full",
            ),
            (os(libc::EDQUOT), WriteFailure::QuotaExceeded, "quota"),
        ];
        for (e, why, says) in cases {
            assert_eq!(e.write_failure(), why, "{e}");
            let answer = e.write_failed();
            assert!(matches!(answer, Error::StorageFull(_)), "{answer:?}");
            let text = answer.to_string();
            assert!(text.starts_with("storage full: "), "{text}");
            assert!(text.contains(says), "{text}");
            assert!(!text.contains("corrupt"), "{text}");
            assert_eq!(answer.code(), ErrorCode::Storage);
        }
    }

    #[test]
    fn another_write_failure_says_what_happened() {
        let e = os(libc::EIO);
        assert_eq!(e.write_failure(), WriteFailure::Other);
        let answer = e.write_failed();
        assert!(matches!(answer, Error::WriteFailed(_)), "{answer:?}");
        let text = answer.to_string();
        assert!(text.starts_with("write failed, nothing stored: "), "{text}");
        assert!(!text.contains("corrupt"), "{text}");
    }
}
