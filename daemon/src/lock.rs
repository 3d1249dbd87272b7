//! The data directory lock: one process per data directory.

use std::{fs::File, path::Path};

#[derive(Debug, thiserror::Error)]
pub enum LockError {
    /// Another process holds the lock.
    #[error("data directory {dir} is locked by another process")]
    Locked { dir: String },
    #[error("cannot lock data directory {dir}: {source}")]
    Io {
        dir: String,
        #[source]
        source: std::io::Error,
    },
}

/// How long `acquire` keeps trying while the lock is taken. A lock whose
/// holder just closed it can still be held for an instant by a child process
/// forked in between (until its exec closes the inherited descriptor), so a
/// close-then-reopen in a process that also spawns processes must not fail.
pub const LOCK_WAIT_MS: u64 = 500;

/// Held for the life of the daemon; the OS releases it when the process
/// dies, so a crash never leaves a stale lock behind.
#[derive(Debug)]
pub struct DirLock {
    _file: File,
}

impl DirLock {
    /// Create `dir` if missing and lock `dir/LOCK` (flock), waiting at most
    /// [`LOCK_WAIT_MS`] for a holder to let go.
    pub fn acquire(dir: &Path) -> Result<DirLock, LockError> {
        let io = |source| LockError::Io {
            dir: dir.display().to_string(),
            source,
        };
        std::fs::create_dir_all(dir).map_err(io)?;
        let file = File::create(dir.join("LOCK")).map_err(io)?;
        let deadline = std::time::Instant::now() + std::time::Duration::from_millis(LOCK_WAIT_MS);
        loop {
            match file.try_lock() {
                Ok(()) => return Ok(DirLock { _file: file }),
                Err(std::fs::TryLockError::WouldBlock) if std::time::Instant::now() < deadline => {
                    std::thread::sleep(std::time::Duration::from_millis(5));
                }
                Err(std::fs::TryLockError::WouldBlock) => {
                    return Err(LockError::Locked {
                        dir: dir.display().to_string(),
                    })
                }
                Err(std::fs::TryLockError::Error(e)) => return Err(io(e)),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn second_lock_on_the_same_directory_is_refused_until_the_first_is_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let first = DirLock::acquire(dir.path()).unwrap();
        let err = DirLock::acquire(dir.path()).unwrap_err();
        assert!(matches!(err, LockError::Locked { .. }), "{err}");
        drop(first);
        DirLock::acquire(dir.path()).expect("free again once dropped");
    }
}
