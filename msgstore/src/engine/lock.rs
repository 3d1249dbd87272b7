//! The shard directory lock: one process per shard directory.

use crate::{Error, Result};
use std::{fs::File, path::Path};

/// Held for the life of the engine; the OS releases it when the process
/// dies, so a crash never leaves a stale lock behind.
pub struct DirLock {
    _file: File,
}

impl DirLock {
    pub fn acquire(dir: &Path) -> Result<DirLock> {
        std::fs::create_dir_all(dir)?;
        let file = File::create(dir.join("LOCK"))?;
        match file.try_lock() {
            Ok(()) => Ok(DirLock { _file: file }),
            Err(std::fs::TryLockError::WouldBlock) => Err(Error::Locked {
                dir: dir.display().to_string(),
            }),
            Err(std::fs::TryLockError::Error(e)) => Err(e.into()),
        }
    }
}
