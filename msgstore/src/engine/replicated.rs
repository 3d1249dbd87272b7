//! What a Raft group's state machine needs of the engine
//! (docs/STORAGE.md, "Replicated shards"): an engine clock every replica
//! sets alike.
//!
//! The Raft glue (`crate::raft`) drives these; until it calls every one of
//! them they are unused outside tests.
#![allow(dead_code, reason = "called by the Raft glue in crate::raft")]

use super::Engine;

impl Engine {
    /// Make `now_ms` (ms since the Unix epoch) the engine's clock until
    /// the next call: appends are stamped with it and freezes lapse by it.
    /// A replicated shard sets the time its Raft entry carries before
    /// applying the entry, so every replica computes the same results.
    /// Never called: the system wall clock.
    pub(crate) fn set_clock_ms(&mut self, now_ms: u64) {
        self.clock_ms = Some(now_ms);
    }
}
