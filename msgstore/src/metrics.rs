//! Every metric a shard emits, in one table (see [`daemon::catalog`]):
//! [`register`] describes them all and puts each at zero when the daemon
//! starts, so `/metrics` shows them before the first event. A new metric
//! goes here too (a unit test compares this table with the code).

use crate::Error;
use daemon::catalog::{self, Metric};
use metrics::Unit;

/// The `op` label of `msgstore_requests_total`
/// (`proto::shard::RequestBody::op_name`).
pub(crate) const OPS: &[&str] = &[
    "append",
    "append_batch",
    "append_batch_once",
    "fetch",
    "ack",
    "expire",
    "set_routing",
    "get_routing",
    "list_users",
    "freeze",
    "import",
    "release",
    "user_stats",
    "stats",
    "ping",
];

/// `msgstore_appends_failed_total{reason}`: the batch's log write or sync
/// failed, so the append was answered with the error and not stored.
pub(crate) const APPEND_FAILED_LOG_WRITE: &str = "log_write";

/// The `reason` label of `msgstore_appends_failed_total`.
const APPEND_FAILED_REASONS: &[&str] = &[
    APPEND_FAILED_LOG_WRITE,
    "mailbox_full",
    "too_large",
    "overloaded",
    "poisoned",
    "moved",
    "busy",
    "conflict",
    "damaged",
    "storage",
    "other",
];

/// Why an append was refused, as its `reason` label.
fn refusal_reason(e: &Error) -> &'static str {
    match e {
        Error::MailboxFull { .. } => "mailbox_full",
        Error::MessageTooLarge { .. } => "too_large",
        Error::Overloaded(_) => "overloaded",
        Error::Poisoned(_) => "poisoned",
        Error::Moved { .. } => "moved",
        Error::Busy(_) => "busy",
        Error::Conflict(_) => "conflict",
        Error::Corrupt(_) => "damaged",
        Error::Io(_) | Error::Index(_) | Error::Storage(_) => "storage",
        _ => "other",
    }
}

/// Count an append the engine refused.
pub(crate) fn count_refused_append(e: &Error) {
    metrics::counter!("msgstore_appends_failed_total", "reason" => refusal_reason(e)).increment(1);
}

/// Metrics of every shard, standalone or a replica.
const COMMON: &[Metric] = &[
    Metric::counter(
        "msgstore_appends_total",
        "Messages stored (their batch's log write done); refused or failed appends are in msgstore_appends_failed_total",
    ),
    Metric::counter(
        "msgstore_appends_failed_total",
        "Appends not stored, by reason: log_write (the batch's log write or sync failed), mailbox_full, too_large, overloaded (the log is at wal_bytes_max), poisoned (a log write failed earlier; restart), moved or busy (the user is moving to another shard), conflict, damaged (a damaged index entry), storage (an I/O or index error), other",
    )
    .by("reason", APPEND_FAILED_REASONS),
    Metric::counter(
        "msgstore_appends_deduplicated_total",
        "AppendBatchOnce items answered with the seq of a copy already stored (a retry)",
    ),
    Metric::counter(
        "msgstore_appends_refused_damaged_total",
        "Appends refused because the user's index entry names a wrong bucket (also in msgstore_appends_failed_total{reason=\"damaged\"})",
    ),
    Metric::counter(
        "msgstore_acks_total",
        "Acks that deleted records (their batch stored)",
    ),
    Metric::counter(
        "msgstore_acks_capped_total",
        "Acks stopped before a record the shard cannot read (it stays for a repair)",
    ),
    Metric::counter(
        "msgstore_expired_records_total",
        "Records deleted by Expire requests (their batch stored)",
    ),
    Metric::counter(
        "msgstore_imported_records_total",
        "Records imported from another shard during a rebalance (their batch stored)",
    ),
    Metric::counter(
        "msgstore_moved_answers_total",
        "Requests answered Moved: the user belongs to another shard",
    ),
    Metric::counter(
        "msgstore_busy_answers_total",
        "Writes answered Busy because the user is being moved to another shard",
    ),
    Metric::counter(
        "msgstore_index_reads_total",
        "User states read from the index: users new to the shard, or whose state was not in memory (see clean_states_max)",
    ),
    Metric::counter(
        "msgstore_batches_total",
        "Batches of requests whose log entries were written",
    ),
    Metric::counter("msgstore_syncs_total", "fdatasync calls on the log"),
    Metric::counter("msgstore_checkpoints_total", "Checkpoints completed"),
    Metric::counter(
        "msgstore_checkpoint_failures_total",
        "Checkpoints that failed (retried later)",
    ),
    Metric::counter(
        "msgstore_compactions_total",
        "Bucket files rewritten without their deleted records",
    ),
    Metric::counter(
        "msgstore_bucket_bytes_trimmed_total",
        "Bytes of room past their records that an idle shard cut from grown bucket files",
    ),
    Metric::histogram(
        "msgstore_checkpoint_seconds",
        "Time from a checkpoint's start to its merge (its helper thread's work), in seconds",
    )
    .unit(Unit::Seconds),
    Metric::histogram(
        "msgstore_checkpoint_merge_seconds",
        "Time the server thread paused to take a finished checkpoint in, in seconds",
    )
    .unit(Unit::Seconds),
    Metric::gauge("msgstore_open_maps", "Bucket files mapped into memory"),
    Metric::counter(
        "msgstore_map_failures_total",
        "Bucket maps the kernel refused (ENOMEM); least recently used maps were dropped",
    ),
    Metric::counter(
        "msgstore_wal_corrupt_total",
        "Times the log was found damaged with valid entries after the damage (the shard refuses to start)",
    ),
    Metric::counter(
        "msgstore_wal_torn_tails_total",
        "Torn log tails (a write cut short by a crash) dropped at start",
    ),
    Metric::counter(
        "msgstore_corrupt_records_total",
        "Damaged places found: log damage, torn tails and unreadable bucket records",
    ),
    Metric::counter(
        "msgstore_unreachable_records_total",
        "Live records that cannot be read, by why: checksum, chain_broken, chain_skips_seqs, bad_bucket_id, no_bucket_file",
    )
    .by(
        "why",
        &[
            "checksum",
            "chain_broken",
            "chain_skips_seqs",
            "bad_bucket_id",
            "no_bucket_file",
        ],
    ),
    Metric::counter(
        "msgstore_bad_frames_total",
        "Client connections closed for an oversized or malformed frame",
    ),
    Metric::counter(
        "msgstore_connections_rejected_total",
        "Client connections closed at once because connections_max was reached",
    ),
];

/// Metrics of a standalone shard's server (`server.rs`).
const STANDALONE: &[Metric] = &[
    Metric::counter("msgstore_requests_total", "Requests received, by op").by("op", OPS),
    Metric::gauge("msgstore_connections", "Open client connections"),
    Metric::gauge(
        "msgstore_stalled",
        "1 while checkpoints are behind and no new requests are read",
    ),
    Metric::counter(
        "msgstore_stalls_total",
        "Times reading stopped because a checkpoint ran with more than checkpoint_stall_wal_bytes of log behind it",
    ),
    Metric::histogram(
        "msgstore_commit_seconds",
        "Time to make one batch of requests durable (the log write and sync), in seconds",
    )
    .unit(Unit::Seconds),
    Metric::histogram(
        "msgstore_commit_requests",
        "Requests answered by one batch (group commit size)",
    ),
];

/// Metrics of a replica of a replicated shard group (`raft/`).
const REPLICA: &[Metric] = &[
    Metric::counter(
        "msgstore_raft_proposals_total",
        "Raft entries proposed by this replica",
    ),
    Metric::counter(
        "msgstore_raft_proposals_refused_total",
        "Write chunks refused without a proposal because checkpoints are failing (nothing stored)",
    ),
    Metric::counter(
        "msgstore_raft_not_leader_answers_total",
        "Requests answered NotLeader",
    ),
    Metric::counter(
        "msgstore_raft_snapshots_installed_total",
        "Snapshots received from the leader and installed",
    ),
    Metric::counter(
        "msgstore_raft_snapshot_bytes_total",
        "Snapshot bytes sent or received, by direction",
    )
    .by("direction", &["sent", "received"])
    .unit(Unit::Bytes),
];

/// Metrics of the in-process engine handle ([`crate::Shard`]) only.
const IN_PROCESS: &[Metric] = &[
    Metric::counter(
        "msgstore_queue_full_total",
        "Requests refused because the in-process shard's writer queue was full",
    ),
    Metric::histogram(
        "msgstore_batch_requests",
        "Requests in one batch of the in-process shard's writer",
    ),
];

/// Describe every metric of a shard and put those of this mode
/// (`replicated`: a replica of a group) at zero. Idempotent; call it
/// before the engine opens (recovery counts torn tails).
pub fn register(replicated: bool) {
    catalog::register(COMMON);
    if replicated {
        catalog::register(REPLICA);
        catalog::register(&replication::metrics::table("msgstore"));
        catalog::describe(STANDALONE);
    } else {
        catalog::register(STANDALONE);
        catalog::describe(REPLICA);
        catalog::describe(&replication::metrics::table("msgstore"));
    }
    catalog::describe(IN_PROCESS);
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn all() -> Vec<Metric> {
        [COMMON, STANDALONE, REPLICA, IN_PROCESS].concat()
    }

    #[test]
    fn every_metric_in_the_code_is_in_the_table() {
        let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
        catalog::assert_table_matches_sources(&all(), &src, "msgstore::metrics");
    }

    #[test]
    fn the_op_labels_are_every_op() {
        let file = Path::new(env!("CARGO_MANIFEST_DIR")).join("../proto/src/shard.rs");
        catalog::assert_arms_are(&file, "op_name", OPS);
    }

    #[test]
    fn every_refusal_reason_is_listed() {
        let errors = [
            Error::MailboxFull {
                user: 1,
                reason: "byte limit",
            },
            Error::MessageTooLarge { len: 2, max: 1 },
            Error::Overloaded("x"),
            Error::Poisoned("x".into()),
            Error::Busy("x"),
            Error::Conflict("x".into()),
            Error::Corrupt("x".into()),
            Error::Storage("x".into()),
            Error::Closed,
        ];
        for e in &errors {
            assert!(APPEND_FAILED_REASONS.contains(&refusal_reason(e)), "{e}");
        }
    }
}
