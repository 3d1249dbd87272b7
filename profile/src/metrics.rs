//! Every metric the profile daemon emits, in one table (see
//! [`daemon::catalog`]): [`register`] describes them all and puts each at
//! zero when the daemon starts. A new metric goes here too (a unit test
//! compares this table with the code).

use daemon::catalog::{self, Metric};
use metrics::Unit;

/// The `op` label of `profile_requests_total` (`service::op_name`).
pub(crate) const OPS: &[&str] = &[
    "check_password",
    "create_user",
    "import_users",
    "set_password",
    "set_disabled",
    "lookup_user",
    "get_account",
    "get_profile",
    "get_profiles",
    "login_view",
    "set_profile",
    "set_avatar",
    "avatar_range",
    "friend_request",
    "friend_accept",
    "friend_reject",
    "friend_remove",
    "friend_move",
    "import_friendships",
    "subscribe",
    "info",
    "ping",
    "block",
    "unblock",
    "get_relations",
    "claim_login",
    "group_create",
    "group_invite",
    "group_answer_invite",
    "group_join_request",
    "group_answer_join",
    "group_leave",
    "group_remove",
    "group_set_role",
    "group_transfer",
    "group_rename",
    "group_dissolve",
    "get_group",
    "get_user_groups",
    "group_read",
    "stats",
];

/// The `reason` label of `profile_writes_failed_total`
/// (`WriteFailure::label`).
const WRITE_FAILURES: [&str; 4] = ["map_full", "disk_full", "quota_exceeded", "io"];

const METRICS: &[Metric] = &[
    Metric::counter("profile_requests_total", "Requests received, by op").by("op", OPS),
    Metric::counter(
        "profile_bad_frames_total",
        "Connections closed for an oversized or malformed frame",
    ),
    Metric::counter(
        "profile_connections_rejected_total",
        "Connections closed at once because connections_max was reached",
    ),
    Metric::gauge("profile_connections", "Open connections"),
    Metric::gauge(
        "profile_subscribers",
        "Connections subscribed to change events",
    ),
    Metric::counter(
        "profile_password_checks_total",
        "Password checks done, by result (ok, wrong)",
    )
    .by("result", &["ok", "wrong"]),
    Metric::counter(
        "profile_password_queue_full_total",
        "Password jobs refused because the password queue was full (answered Busy)",
    ),
    Metric::counter(
        "profile_write_queue_full_total",
        "Writes refused because the writer queue was full (answered Busy)",
    ),
    Metric::counter(
        "profile_writes_failed_total",
        "Write ops not stored because their write transaction failed, by reason: map_full (LMDB map at store.map_bytes), disk_full (ENOSPC), quota_exceeded (EDQUOT), io (another I/O or LMDB error)",
    )
    .by("reason", &WRITE_FAILURES),
    Metric::counter(
        "profile_invalidations_sent_total",
        "Invalidate events queued to subscribers",
    ),
    Metric::counter(
        "profile_group_events_sent_total",
        "GroupChanged events queued to subscribers",
    ),
    Metric::gauge("profile_groups", "Chat groups stored"),
    Metric::counter(
        "profile_subscriber_resets_total",
        "Subscriber queues collapsed into one CacheReset because they were full",
    ),
    Metric::histogram(
        "profile_commit_seconds",
        "Time of one LMDB write transaction (a batch of writes), in seconds",
    )
    .unit(Unit::Seconds),
];

/// Metrics of a replica of a profile group (`raft/`), besides the shared
/// ones of `replication::metrics`.
const REPLICA: &[Metric] = &[
    Metric::counter(
        "profile_raft_snapshots_installed_total",
        "Snapshots received from the leader and installed",
    ),
    Metric::counter(
        "profile_raft_snapshot_bytes_total",
        "Snapshot bytes sent or received, by direction",
    )
    .by("direction", &["sent", "received"])
    .unit(Unit::Bytes),
];

/// Describe every metric of the profile daemon and put those of its mode
/// at zero (`replicated`: a replica of a profile group; a series already
/// there keeps its value). Call it before serving.
pub fn register(replicated: bool) {
    catalog::register(METRICS);
    let replica = [REPLICA, &replication::metrics::table("profile")].concat();
    if replicated {
        catalog::register(&replica);
    } else {
        catalog::describe(&replica);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::WriteFailure;
    use std::path::Path;

    #[test]
    fn every_metric_in_the_code_is_in_the_table() {
        let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
        catalog::assert_table_matches_sources(
            &[METRICS, REPLICA].concat(),
            &src,
            "profile::metrics",
        );
    }

    #[test]
    fn the_op_labels_are_every_op() {
        let file = Path::new(env!("CARGO_MANIFEST_DIR")).join("src/service.rs");
        catalog::assert_arms_are(&file, "op_name", OPS);
    }

    #[test]
    fn the_write_failure_labels_are_their_labels() {
        let labels: Vec<_> = WriteFailure::ALL.iter().map(|w| w.label()).collect();
        assert_eq!(labels, WRITE_FAILURES);
    }
}
