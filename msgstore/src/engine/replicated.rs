//! What a Raft group's state machine needs of the engine
//! (docs/STORAGE.md, "Replicated shards"): no log of its own (the Raft log
//! is the durability point), an engine clock every replica sets alike, the
//! applied marker, and checkpoints that hold everything a write's answer
//! depends on (the frozen users and the routing too).
//!
//! The Raft glue (`crate::raft`) drives these; until it calls every one of
//! them they are unused outside tests.

use super::{
    index::{ExtraMeta, META_APPLIED, META_FROZEN, META_ROUTING},
    migrate::encode_frozen,
    recovery::OpenMode,
    routing, snapshot, Engine,
};
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
    ///
    /// First it finishes or undoes a snapshot install a crash interrupted
    /// ([`Engine::install_snapshot`]), and once `dir` is locked it removes
    /// what such an install left beside it.
    pub(crate) fn open_replicated(dir: &Path, config: EngineConfig) -> Result<Engine> {
        snapshot::finish_interrupted_install(dir)?;
        let (mut engine, _) = Engine::open_inner(dir, config, OpenMode::Replicated)?;
        snapshot::remove_install_leftovers(dir)?;
        // Even with nothing replayed: the index's log start must name the
        // (never written) segment this engine stands at, so that a later
        // standalone open starts its log there and replays all of it.
        engine.meta_dirty = true;
        engine.checkpoint_now()?;
        engine.wal.remove_all()?;
        // The index holds the routing now; it changes only with the
        // checkpointed state from here on.
        routing::remove_file(&engine.dir)?;
        Ok(engine)
    }

    /// Remember `marker` (opaque: the Raft glue's last applied log id and
    /// membership) as describing the state applied so far. Each checkpoint
    /// stores the marker current when it captures the state it covers, in
    /// the same index transaction; an open restores the last committed
    /// checkpoint's. Call it right after the entry's [`Engine::end_batch`],
    /// before anything may start a checkpoint ([`Engine::tick`]). Cheap: no
    /// I/O.
    pub(crate) fn set_applied(&mut self, marker: Vec<u8>) {
        self.applied = Some(marker);
        self.meta_dirty = true;
    }

    /// The marker last given to [`Engine::set_applied`], or after an open
    /// the one the last committed checkpoint stored; `None` if never set.
    pub(crate) fn applied(&self) -> Option<&[u8]> {
        self.applied.as_deref()
    }

    /// The meta entries a checkpoint starting now commits besides its log
    /// position: the applied marker (if set); for a replicated shard also
    /// the frozen users and the routing (if installed). Nothing for a
    /// standalone shard that never had a marker set.
    pub(super) fn extra_meta(&self) -> Result<ExtraMeta> {
        let mut extra = ExtraMeta::new();
        if let Some(marker) = &self.applied {
            extra.push((META_APPLIED, marker.clone()));
        }
        if self.replicated {
            extra.push((META_FROZEN, encode_frozen(&self.frozen)));
            if let Some(table) = &self.routing {
                let text = routing::to_text(table.routing())?;
                extra.push((META_ROUTING, text.into_bytes()));
            }
        }
        Ok(extra)
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
mod determinism;
#[cfg(test)]
pub(super) mod tests;
