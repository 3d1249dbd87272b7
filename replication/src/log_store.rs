//! The Raft log of a replicated shard on disk: openraft's storage-v2
//! [`RaftLogStorage`](openraft::storage::RaftLogStorage) and
//! [`RaftLogReader`](openraft::RaftLogReader), generic over the type config
//! `C` (its entries are serde values, stored with `postcard`).
//!
//! # Files
//!
//! One directory per log holds:
//!
//! | file                   | content                                              |
//! |------------------------|------------------------------------------------------|
//! | `<first_index:020>.seg`| a segment: frames of consecutive entries, the first  |
//! |                        | of index `first_index` (20 decimal digits)           |
//! | `vote`                 | one frame: postcard of `Vote<NodeId>`                |
//! | `committed`            | one frame: postcard of `Option<LogId<NodeId>>`       |
//! | `purged`               | one frame: postcard of `LogId<NodeId>`, the last     |
//! |                        | purged id (absent: nothing was ever purged)          |
//! | `<name>.tmp`           | a `vote`/`committed`/`purged` being replaced         |
//!
//! # Frame (all integers little-endian)
//!
//! ```text
//! offset  size  field
//! 0       4     body length L, u32; 1 <= L <= entry_bytes_max (segments)
//!                                   or 1 <= L <= 4096 (vote/committed/purged)
//! 4       4     CRC-32C (Castagnoli) of the L body bytes, u32
//! 8       L     body: postcard encoding of the value
//! ```
//!
//! A segment is frames back to back with nothing between or after them;
//! the body of a segment frame is `postcard(C::Entry)`, whose log id is
//! the entry's. Entry indexes are consecutive within a segment and across
//! segments (segment `n + 1` starts at the index after segment `n`'s
//! last). A new segment is started once the current one holds
//! `segment_bytes_max` bytes or more. A `vote`, `committed` or `purged`
//! file is exactly one frame. `vote` and `purged` are replaced atomically
//! (write `<name>.tmp`, fsync it, rename it over `<name>`, fsync the
//! directory); `committed`, a hint, is overwritten in place and not
//! synced (see Durability).
//!
//! # Durability
//!
//! * Appends are written by one writer thread: every append pending when
//!   it wakes is written with one `write` per segment and, under
//!   [`FsyncPolicy::Always`], one `fdatasync`
//!   per segment before any of their callbacks is called (group commit;
//!   a segment is synced before the next one is created).
//!   Under `IntervalMs` the callbacks are called once written and the
//!   segments are synced at that interval; under `Never`, never.
//! * `vote` and `purged` are synced under every policy, after every
//!   append queued before them was written (and synced). `committed` is
//!   written after them too but never synced: openraft saves it at every
//!   commit and uses it only to re-apply committed entries at start; one
//!   older than the truth (or lost, or torn: read as none, with a
//!   warning) only leaves the rest to be committed again by the leader.
//! * Truncation (ordered after the appends queued before it) removes the
//!   later segments (last first; under `Always` the directory is synced),
//!   then cuts the segment holding the first removed entry at that
//!   entry's offset (synced under `Always`).
//! * Purging writes `purged` first, then removes the segments wholly at
//!   or below it; a segment partly below it keeps its purged frames,
//!   which are skipped when reading. Entries appended at or below the
//!   last purged index are dropped (they are purged already).
//!
//! # Opening
//!
//! Segments are read in order and checked. A frame is valid if its length
//! is within bounds, its body is all there and its CRC holds. In the last
//! segment, an invalid frame after which no valid frame starts (at any
//! byte offset) is a torn write: the segment is cut at its offset (or
//! removed, if nothing is left), which is logged and counted in
//! `msgstore_raft_log_torn_tails_total`. Any other damage (an invalid
//! frame with a valid one after it, in the same segment or a later one; a
//! valid frame whose body does not decode; an index gap or an index going
//! backwards; a segment whose name is not its first index, or not 20
//! digits; a segment without entries before the last; a `vote` or
//! `purged` file that is not exactly one valid frame)
//! fails [`LogStore::open`] with [`LogStoreError::Damaged`] naming the
//! file and the byte offset, and nothing on disk is changed.
//!
//! Once every file checked out, opening also removes a last segment left
//! without entries and the segments wholly at or below `purged` (a purge
//! interrupted by a crash), and lowers a saved committed id that is past
//! the last entry to the last entry (possible only if an unsynced tail
//! was lost, under `IntervalMs` or `Never`).

mod frame;
mod raft_impl;
mod read;
mod scan;
mod state;
mod store;
mod writer;

#[cfg(test)]
mod tests;

use crate::FsyncPolicy;
use std::{io, path::PathBuf};

pub use store::{LogReader, LogStore};

/// Read the single-frame file `dir/name` (`None`: there is none); a file
/// that is not exactly one valid frame is [`LogStoreError::Damaged`].
pub(crate) fn read_meta_file<T: serde::de::DeserializeOwned>(
    dir: &std::path::Path,
    name: &str,
) -> Result<Option<T>, LogStoreError> {
    frame::read_meta(dir, name)
}

/// Replace the single-frame file `dir/name` with `value`, atomically and
/// synced.
pub(crate) fn write_meta_file<T: serde::Serialize>(
    dir: &std::path::Path,
    name: &str,
    value: &T,
) -> Result<(), LogStoreError> {
    let bytes = frame::encode_meta(value)
        .map_err(|e| LogStoreError::io("encode", dir.join(name), io::Error::other(e)))?;
    frame::write_atomic(dir, name, &bytes)
        .map_err(|e| LogStoreError::io("write", dir.join(name), e))
}

/// fsync the directory `dir` (its entries).
pub(crate) fn sync_dir_of(dir: &std::path::Path) -> Result<(), LogStoreError> {
    frame::sync_dir(dir).map_err(|e| LogStoreError::io("sync", dir, e))
}

/// The vote saved in the log directory `dir`, read without opening the
/// log (whose segments may be damaged).
pub fn read_vote<C: openraft::RaftTypeConfig>(
    dir: &std::path::Path,
) -> Result<Option<openraft::Vote<C::NodeId>>, LogStoreError> {
    frame::read_meta(dir, "vote")
}

/// Metric (`<prefix>_raft_log_appends_total`): `append` calls whose
/// entries were written.
const METRIC_APPENDS: &str = "raft_log_appends_total";
/// Metric: `fdatasync`s of segment files.
const METRIC_SYNCS: &str = "raft_log_syncs_total";
/// Metric (gauge): bytes of segment files on disk.
const METRIC_BYTES: &str = "raft_log_bytes";
/// Metric: torn tails cut off when a log was opened.
const METRIC_TORN_TAILS: &str = "raft_log_torn_tails_total";

/// The full name of metric `name` of a log configured with `config`.
fn metric(config: &LogStoreConfig, name: &str) -> String {
    crate::metrics::metric_name(config.metric_prefix, name)
}

/// Largest `entry_bytes_max` accepted (a frame's length is a u32; this
/// keeps one entry well below it).
pub const ENTRY_BYTES_MAX_LIMIT: u32 = 1 << 30;

/// How a log store writes, syncs and caches.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogStoreConfig {
    /// When appended entries are synced: `Always` syncs before the append's
    /// callback is called; `IntervalMs(n)` calls it once written and syncs
    /// at least every `n` ms; `Never` never syncs segments.
    pub fsync: FsyncPolicy,
    /// A new segment file is started once the current one holds this many
    /// bytes or more (so a segment exceeds it by at most one frame).
    pub segment_bytes_max: u64,
    /// Largest encoded entry (a frame body); larger entries are refused by
    /// `append`, and larger frames on disk are invalid.
    pub entry_bytes_max: u32,
    /// Encoded bytes of the most recent entries kept decoded in memory, so
    /// replication reads them without touching the disk. Entries not yet
    /// written are kept regardless.
    pub cache_bytes_max: u64,
    /// The first word of the log's metric names (`msgstore`, `profile`):
    /// `<prefix>_raft_log_appends_total` and so on.
    pub metric_prefix: &'static str,
}

impl Default for LogStoreConfig {
    fn default() -> Self {
        Self {
            fsync: FsyncPolicy::Always,
            segment_bytes_max: 64 * 1024 * 1024,
            entry_bytes_max: 16 * 1024 * 1024,
            cache_bytes_max: 64 * 1024 * 1024,
            metric_prefix: "msgstore",
        }
    }
}

impl LogStoreConfig {
    /// Check ranges; the message names the bad field.
    pub fn validate(&self) -> Result<(), LogStoreError> {
        if self.entry_bytes_max == 0 || self.entry_bytes_max > ENTRY_BYTES_MAX_LIMIT {
            return Err(LogStoreError::Config(format!(
                "entry_bytes_max = {} is outside 1..={ENTRY_BYTES_MAX_LIMIT}",
                self.entry_bytes_max
            )));
        }
        if self.segment_bytes_max == 0 {
            return Err(LogStoreError::Config("segment_bytes_max = 0".into()));
        }
        if let FsyncPolicy::IntervalMs(0) = self.fsync {
            return Err(LogStoreError::Config("fsync interval of 0 ms".into()));
        }
        Ok(())
    }
}

/// What can go wrong with a log store.
#[derive(Debug, thiserror::Error)]
pub enum LogStoreError {
    /// The configuration is out of range.
    #[error("invalid log store configuration: {0}")]
    Config(String),
    /// A file operation failed.
    #[error("{op} {}: {source}", path.display())]
    Io {
        op: &'static str,
        path: PathBuf,
        source: io::Error,
    },
    /// A file is damaged in a way that is not a torn last write; nothing
    /// on disk was changed.
    #[error("Raft log damaged: {} at byte {offset}: {reason}", file.display())]
    Damaged {
        file: PathBuf,
        offset: u64,
        reason: String,
    },
    /// An entry could not be encoded.
    #[error("cannot encode entry {index}: {source}")]
    Encode { index: u64, source: postcard::Error },
    /// An encoded entry is larger than `entry_bytes_max`.
    #[error("entry {index} is {len} bytes encoded, over entry_bytes_max = {max}")]
    EntryTooLarge { index: u64, len: usize, max: u32 },
    /// An appended entry does not follow the last one.
    #[error("appended entry has index {got}, expected {expected}")]
    NotConsecutive { expected: u64, got: u64 },
    /// A value read back from a segment does not check out.
    #[error("reading entry {index}: {reason}")]
    BadRead { index: u64, reason: String },
    /// An earlier write or sync failed; the store refuses every write.
    #[error("the Raft log refuses writes after a failed write or sync: {0}")]
    Poisoned(String),
    /// The writer thread is gone.
    #[error("the Raft log writer has stopped")]
    Closed,
}

impl LogStoreError {
    /// An I/O error on `path` during `op`.
    pub(crate) fn io(op: &'static str, path: impl Into<PathBuf>, source: io::Error) -> Self {
        Self::Io {
            op,
            path: path.into(),
            source,
        }
    }

    /// Damage in `file` at `offset`.
    fn damaged(file: impl Into<PathBuf>, offset: u64, reason: impl Into<String>) -> Self {
        Self::Damaged {
            file: file.into(),
            offset,
            reason: reason.into(),
        }
    }
}
