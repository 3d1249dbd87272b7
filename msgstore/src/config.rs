//! Engine configuration: every limit the shard enforces, with its default.

use crate::engine::buckets::{auto_open_maps_max, max_map_count, MAP_COUNT_HEADROOM};
use serde::{Deserialize, Serialize};
use std::time::Duration;

pub use replication::FsyncPolicy;

/// Configuration of one shard directory. Every field has a default; see
/// `msgstore/msgstore.example.toml` for the documented TOML form.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct EngineConfig {
    /// Durability policy of appends and acks.
    pub fsync: FsyncPolicy,
    /// Number of bucket directories (`buckets/XX`), 1..=256.
    pub bucket_dirs: u16,
    /// Number of bucket files per directory (`buckets/XX/YY`), 1..=256.
    pub bucket_files: u16,
    /// Largest payload of one message.
    pub message_bytes_max: u32,
    /// Most unacknowledged messages one user's mailbox holds.
    pub mailbox_messages_max: u64,
    /// Most unacknowledged payload bytes one user's mailbox holds.
    pub mailbox_bytes_max: u64,
    /// Most bucket files mapped at once. Each map is one `vm.max_map_count`
    /// entry (the kernel default allows 65,530 for the whole process).
    /// Absent: every bucket if the limit allows it with 2,048 entries to
    /// spare, else as many as it allows (32,768 if it cannot be read).
    pub open_maps_max: Option<usize>,
    /// User states kept in memory after a checkpoint wrote them to the
    /// index, so users who are active again skip the index lookup.
    pub clean_states_max: usize,
    /// Create every missing bucket file when the shard opens, before it
    /// serves (a new 256 x 256 shard: 65,536 files, which can take a minute);
    /// otherwise files are created by the checkpoints that first need them.
    pub precreate_buckets: bool,
    /// Most requests waiting for the writer thread; callers past it wait.
    pub queue_requests_max: usize,
    /// Most requests the writer handles in one group commit.
    pub batch_requests_max: usize,
    /// Size of one write-ahead-log segment file (preallocated, zero-filled).
    pub wal_segment_bytes: u64,
    /// A checkpoint runs once this many log bytes were written since the last.
    /// Larger checkpoints write more records per bucket page they touch (at
    /// 1 M users over 65,536 buckets, 256 MiB sustained a third more appends
    /// than 64 MiB); the cost is memory (the records wait in memory) and
    /// replay time after a crash.
    pub checkpoint_wal_bytes: u64,
    /// ... or this long after the last one, if anything changed.
    pub checkpoint_interval_ms: u64,
    /// ... or once the log has not grown for this long (the shard went
    /// idle), if anything changed: an idle shard's log is checkpointed and
    /// trimmed, its memtable freed, and a crash then replays nothing.
    pub checkpoint_idle_ms: u64,
    /// While a checkpoint runs and the log not yet checkpointed exceeds
    /// this, the server reads no new requests until the checkpoint is done
    /// (back-pressure on clients, so checkpoints keep up with sustained
    /// load instead of the log reaching `wal_bytes_max`). Between
    /// `checkpoint_wal_bytes` and `wal_bytes_max`.
    pub checkpoint_stall_wal_bytes: u64,
    /// Appends are refused with `Error::Overloaded` while the un-checkpointed
    /// log exceeds this (a checkpoint keeps failing, e.g. disk full).
    pub wal_bytes_max: u64,
    /// Size of the LMDB map (the index can never grow past it).
    pub index_map_bytes: u64,
    /// A bucket is compacted when dead bytes exceed this share of it ...
    pub compact_dead_ratio: f64,
    /// ... and it is at least this large.
    pub compact_min_bytes: u64,
}

impl Default for EngineConfig {
    fn default() -> Self {
        Self {
            fsync: FsyncPolicy::Always,
            bucket_dirs: 256,
            bucket_files: 256,
            message_bytes_max: 64 * 1024,
            mailbox_messages_max: 10_000,
            mailbox_bytes_max: 16 * 1024 * 1024,
            open_maps_max: None,
            clean_states_max: 1_000_000,
            precreate_buckets: false,
            queue_requests_max: 65_536,
            batch_requests_max: 4096,
            wal_segment_bytes: 32 * 1024 * 1024,
            checkpoint_wal_bytes: 256 * 1024 * 1024,
            checkpoint_interval_ms: 30_000,
            checkpoint_idle_ms: 1_000,
            checkpoint_stall_wal_bytes: 512 * 1024 * 1024,
            wal_bytes_max: 1024 * 1024 * 1024,
            index_map_bytes: 4 * 1024 * 1024 * 1024,
            compact_dead_ratio: 0.5,
            compact_min_bytes: 64 * 1024,
        }
    }
}

impl EngineConfig {
    /// Check ranges; returns a message naming the bad field.
    pub fn validate(&self) -> Result<(), String> {
        let range = |name: &str, v: u64, lo: u64, hi: u64| {
            if v < lo || v > hi {
                Err(format!("{name} = {v} is outside {lo}..={hi}"))
            } else {
                Ok(())
            }
        };
        range("bucket_dirs", self.bucket_dirs.into(), 1, 256)?;
        range("bucket_files", self.bucket_files.into(), 1, 256)?;
        range(
            "message_bytes_max",
            self.message_bytes_max.into(),
            1,
            16 * 1024 * 1024,
        )?;
        range(
            "mailbox_messages_max",
            self.mailbox_messages_max,
            1,
            1 << 32,
        )?;
        range("mailbox_bytes_max", self.mailbox_bytes_max, 1, 1 << 40)?;
        if let Some(maps) = self.open_maps_max {
            range("open_maps_max", maps as u64, 1, 1 << 24)?;
        }
        range(
            "queue_requests_max",
            self.queue_requests_max as u64,
            1,
            1 << 24,
        )?;
        range(
            "batch_requests_max",
            self.batch_requests_max as u64,
            1,
            1 << 20,
        )?;
        range(
            "checkpoint_wal_bytes",
            self.checkpoint_wal_bytes,
            4096,
            1 << 40,
        )?;
        range(
            "checkpoint_interval_ms",
            self.checkpoint_interval_ms,
            1,
            1 << 40,
        )?;
        range("checkpoint_idle_ms", self.checkpoint_idle_ms, 1, 1 << 40)?;
        range(
            "wal_bytes_max",
            self.wal_bytes_max,
            self.checkpoint_wal_bytes,
            1 << 42,
        )?;
        range(
            "checkpoint_stall_wal_bytes",
            self.checkpoint_stall_wal_bytes,
            self.checkpoint_wal_bytes,
            self.wal_bytes_max,
        )?;
        range("index_map_bytes", self.index_map_bytes, 1 << 20, 1 << 44)?;
        if !(0.0..=1.0).contains(&self.compact_dead_ratio) {
            return Err(format!(
                "compact_dead_ratio = {} is outside 0.0..=1.0",
                self.compact_dead_ratio
            ));
        }
        Ok(())
    }

    pub fn buckets(&self) -> u32 {
        u32::from(self.bucket_dirs) * u32::from(self.bucket_files)
    }

    /// The automatic `open_maps_max` for one of `shards` shards run in
    /// the same process (they share its `vm.max_map_count`).
    pub fn shared_open_maps_max(&self, shards: usize) -> usize {
        auto_open_maps_max(self.buckets() as usize, max_map_count(), shards)
    }

    /// `open_maps_max`, or the automatic budget for this machine.
    pub(crate) fn resolved_open_maps_max(&self) -> usize {
        let buckets = self.buckets() as usize;
        if let Some(maps) = self.open_maps_max {
            return maps;
        }
        let limit = max_map_count();
        let maps = auto_open_maps_max(buckets, limit, 1);
        if maps < buckets {
            tracing::warn!(
                buckets,
                open_maps_max = maps,
                vm_max_map_count = limit,
                "the process may not map every bucket file, so checkpoints will unmap and map \
                 files again; raise vm.max_map_count to at least {} (e.g. sysctl -w \
                 vm.max_map_count=262144) to keep them all mapped",
                buckets + MAP_COUNT_HEADROOM
            );
        }
        maps
    }

    pub(crate) fn checkpoint_interval(&self) -> Duration {
        Duration::from_millis(self.checkpoint_interval_ms)
    }

    pub(crate) fn checkpoint_idle(&self) -> Duration {
        Duration::from_millis(self.checkpoint_idle_ms)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fsync_policy_parses_and_prints() {
        for s in ["always", "never", "interval:1000"] {
            assert_eq!(s.parse::<FsyncPolicy>().unwrap().to_string(), s);
        }
        for bad in ["", "interval:", "interval:0", "interval:x", "sometimes"] {
            assert!(bad.parse::<FsyncPolicy>().is_err(), "{bad}");
        }
    }

    #[test]
    fn default_config_is_valid_and_bad_fields_are_named() {
        EngineConfig::default().validate().unwrap();
        let bad = EngineConfig {
            bucket_dirs: 0,
            ..EngineConfig::default()
        };
        assert!(bad.validate().unwrap_err().contains("bucket_dirs"));
        // The stall point lies between the checkpoint size and the log limit.
        for stall in [1 << 20, 2 << 30] {
            let bad = EngineConfig {
                checkpoint_stall_wal_bytes: stall,
                ..EngineConfig::default()
            };
            let e = bad.validate().unwrap_err();
            assert!(e.contains("checkpoint_stall_wal_bytes"), "{e}");
        }
    }
}
