//! Helpers for a service's state machine (openraft's `RaftStateMachine`):
//! its error type and where its blocking work runs.

// openraft's traits fix the error type (`StorageError`, 224 bytes).
#![allow(clippy::result_large_err)]

use crate::ReplicaId;
use openraft::{StorageError, StorageIOError};

/// The error every state-machine call returns (openraft treats it as
/// fatal: the replica stops).
pub type SmError = StorageError<ReplicaId>;

/// A failure to apply or read the state machine.
pub fn sm_error(e: impl std::fmt::Display) -> SmError {
    StorageIOError::write_state_machine(&std::io::Error::other(e.to_string())).into()
}

/// A failure to build, keep or install a snapshot.
pub fn snap_error(e: impl std::fmt::Display) -> SmError {
    StorageIOError::write_snapshot(None, &std::io::Error::other(e.to_string())).into()
}

/// Run `f` on a blocking thread (work that takes a lock and may do disk
/// I/O for long: building or installing a snapshot).
pub async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, SmError> + Send + 'static,
) -> Result<T, SmError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| sm_error(&e))?
}

/// Run `f` (short blocking work: applying entries) on this thread,
/// telling a multi-thread runtime so that it moves its other tasks away.
/// Applying is on the path of every write's answer: handing it to the
/// blocking pool cost a thread wake-up (about 0.2 ms) per entry.
pub fn in_place<T>(f: impl FnOnce() -> T) -> T {
    use tokio::runtime::{Handle, RuntimeFlavor};
    match Handle::try_current().map(|h| h.runtime_flavor()) {
        Ok(RuntimeFlavor::MultiThread) => tokio::task::block_in_place(f),
        _ => f(),
    }
}
