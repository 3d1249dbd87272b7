//! What the damage tests (`corruption.rs`, `log_damage.rs`,
//! `read_damage.rs`) share: a shard configuration whose files are easy to
//! find and edit, and readers of the on-disk layout (`docs/STORAGE.md`).

#![allow(dead_code)] // each test file uses a part

use msgstore::{EngineConfig, FsyncPolicy, Shard};
use std::{
    fs,
    path::{Path, PathBuf},
};

/// A log segment's header.
pub const WAL_HEADER: usize = 32;
/// A checked frame's header (length, checksum), in the log and in buckets.
pub const FRAME_HEADER: usize = 8;

/// One fan-out bucket (so the one bucket file is easy to find) and no
/// checkpoint during a test unless asked for.
pub fn config() -> EngineConfig {
    EngineConfig {
        wal_segment_bytes: 1 << 20,
        fsync: FsyncPolicy::Always,
        bucket_dirs: 1,
        bucket_files: 1,
        checkpoint_wal_bytes: 1 << 30,
        checkpoint_stall_wal_bytes: 1 << 30,
        wal_bytes_max: 1 << 30,
        checkpoint_interval_ms: 1 << 40,
        checkpoint_idle_ms: 1 << 40,
        index_map_bytes: 16 << 20,
        ..EngineConfig::default()
    }
}

pub fn open(dir: &Path) -> Shard {
    Shard::open(dir, config()).expect("open shard")
}

/// Offsets and total lengths (header included) of the checked frames of a
/// file, starting at `at`; stops at a zero length (a bucket file's unused
/// tail) or the end.
pub fn frames(bytes: &[u8], mut at: usize) -> Vec<(usize, usize)> {
    let mut out = Vec::new();
    while at + FRAME_HEADER <= bytes.len() {
        let len = u32::from_le_bytes(bytes[at..at + 4].try_into().unwrap()) as usize;
        if len == 0 || at + FRAME_HEADER + len > bytes.len() {
            break;
        }
        out.push((at, FRAME_HEADER + len));
        at += FRAME_HEADER + len;
    }
    out
}

/// The log's segment files, oldest first.
pub fn wal_segments(dir: &Path) -> Vec<PathBuf> {
    let mut segs: Vec<PathBuf> = fs::read_dir(dir.join("wal"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "log"))
        .collect();
    segs.sort();
    segs
}
