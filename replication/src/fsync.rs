//! When a write becomes durable relative to its acknowledgement: the
//! `fsync` setting of the shards' write-ahead log and of every Raft log.

use serde::{Deserialize, Serialize};
use std::{fmt, str::FromStr};

/// When an append becomes durable relative to its acknowledgement.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum FsyncPolicy {
    /// The write-ahead log is fdatasync'ed before any request of the batch is
    /// answered: an acknowledged append survives a power loss.
    Always,
    /// Answer at once; the log is fdatasync'ed at least every this many ms.
    IntervalMs(u64),
    /// Never fdatasync the log; the OS writes it back when it likes.
    Never,
}

impl FromStr for FsyncPolicy {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "always" => Ok(Self::Always),
            "never" => Ok(Self::Never),
            _ => match s.strip_prefix("interval:").map(str::parse::<u64>) {
                Some(Ok(ms)) if ms > 0 => Ok(Self::IntervalMs(ms)),
                _ => Err(format!(
                    "unknown fsync policy {s:?}: expected always, interval:<ms> (ms > 0) or never"
                )),
            },
        }
    }
}

impl fmt::Display for FsyncPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Always => write!(f, "always"),
            Self::IntervalMs(ms) => write!(f, "interval:{ms}"),
            Self::Never => write!(f, "never"),
        }
    }
}

impl TryFrom<String> for FsyncPolicy {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        s.parse()
    }
}

impl From<FsyncPolicy> for String {
    fn from(p: FsyncPolicy) -> String {
        p.to_string()
    }
}
