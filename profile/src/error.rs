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
    #[error("the service is closed")]
    Closed,
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

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
            Error::Locked { .. } | Error::Io(_) | Error::Lmdb(_) | Error::Corrupt(_) => {
                ErrorCode::Storage
            }
        }
    }

    /// The wire form of this error.
    pub fn to_wire(&self) -> ProfileError {
        ProfileError {
            code: self.code(),
            message: self.to_string(),
        }
    }

    pub(crate) fn not_found_user(user: u64) -> Error {
        Error::NotFound(format!("user {user}"))
    }

    pub(crate) fn not_found_group(group: u64) -> Error {
        Error::NotFound(format!("group {group}"))
    }
}
