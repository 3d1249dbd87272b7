//! What a Raft group's state machine needs of the engine
//! (docs/STORAGE.md, "Replicated shards"): no log of its own (the Raft log
//! is the durability point), an engine clock every replica sets alike.
//!
//! The Raft glue (`crate::raft`) drives these; until it calls every one of
//! them they are unused outside tests.
#![allow(dead_code, reason = "called by the Raft glue in crate::raft")]

use super::{recovery::OpenMode, Engine};
use crate::{EngineConfig, Result};
use std::path::Path;

impl Engine {
    /// Open `dir` as the state machine of a Raft group. Like
    /// [`Engine::open`] it replays a log left by a standalone past; then it
    /// checkpoints (the index's log start moves past every segment) and
    /// deletes the log. From then on batches write no log bytes:
    /// [`Engine::end_batch`] and [`Engine::end_batch_deferred`] commit at
    /// once (the latter returns `Ok(None)`). Checkpoints are triggered as
    /// before, by the bytes batches would have logged and by time.
    pub(crate) fn open_replicated(dir: &Path, config: EngineConfig) -> Result<Engine> {
        let (mut engine, _) = Engine::open_inner(dir, config, OpenMode::Replicated)?;
        // Even with nothing replayed: the index's log start must name the
        // (never written) segment this engine stands at, so that a later
        // standalone open starts its log there and replays all of it.
        engine.meta_dirty = true;
        engine.checkpoint_now()?;
        engine.wal.remove_all()?;
        Ok(engine)
    }

    /// Whether this engine was opened with [`Engine::open_replicated`].
    pub(crate) fn is_replicated(&self) -> bool {
        self.replicated
    }

    /// The bytes batches logged (or, replicated, would have logged) since
    /// the last checkpoint exceed `wal_bytes_max`: a standalone engine
    /// refuses appends and imports with `Overloaded` here. A replicated one
    /// applies everything (a refusal decided by a replica's own checkpoint
    /// progress would make replicas differ), so its owner should hold new
    /// proposals back while this holds.
    pub(crate) fn over_wal_bytes_max(&self) -> bool {
        self.wal.bytes_since_checkpoint > self.config.wal_bytes_max
    }

    /// Make `now_ms` (ms since the Unix epoch) the engine's clock until
    /// the next call: appends are stamped with it and freezes lapse by it.
    /// A replicated shard sets the time its Raft entry carries before
    /// applying the entry, so every replica computes the same results.
    /// Never called: the system wall clock.
    pub(crate) fn set_clock_ms(&mut self, now_ms: u64) {
        self.clock_ms = Some(now_ms);
    }

    /// Commit a replicated batch without a log write: count the bytes it
    /// would have logged, so checkpoints come as if it had.
    pub(super) fn count_unlogged(&mut self) {
        self.wal.bytes_since_checkpoint += self.wal_buf.len() as u64;
        self.wal_buf.clear();
        self.batch_logged();
    }
}

#[cfg(test)]
mod tests;
