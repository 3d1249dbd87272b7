//! Helpers for tests of replicated services (used by their integration
//! tests, so not behind `cfg(test)`).

use std::path::{Path, PathBuf};

/// Flip one byte in the middle of the newest segment of the Raft log in
/// `raft_dir` (with entries after it: damage, not a torn tail). Returns
/// the segment's path. Panics if there is none.
pub fn flip_a_byte_mid_log(raft_dir: &Path) -> PathBuf {
    let segment = std::fs::read_dir(raft_dir)
        .expect("list the log directory")
        .map(|e| e.expect("a directory entry").path())
        .filter(|p| p.extension().is_some_and(|x| x == "seg"))
        .max()
        .expect("a log segment");
    let mut bytes = std::fs::read(&segment).expect("read the segment");
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0x40;
    std::fs::write(&segment, bytes).expect("write the segment");
    segment
}
