//! Every metric the gateway emits, in one table (see [`daemon::catalog`]):
//! [`register`] describes them all and puts each at zero when the gateway
//! starts. A new metric goes here too (a unit test compares this table
//! with the code).

use daemon::catalog::{self, Metric};

const METRICS: &[Metric] = &[
    // Sessions and logins.
    Metric::gauge("gateway_sessions", "Client sessions open on this gateway"),
    Metric::gauge(
        "gateway_sends_in_progress",
        "Messages accepted from clients whose store has not answered yet",
    ),
    Metric::counter(
        "gateway_logins_total",
        "Logins decided, by result: ok, refused (wrong credentials, disabled, revoked, unavailable service), busy (too many logins in progress)",
    )
    .by("result", &["ok", "refused", "busy"]),
    Metric::counter(
        "gateway_logins_stale_total",
        "Logins refused as stale: a later login of the same user was already claimed",
    ),
    Metric::counter(
        "gateway_kicks_total",
        "Sessions closed because a newer login of the same user replaced them",
    ),
    Metric::counter(
        "gateway_sessions_revoked_total",
        "Sessions closed because the account's credentials changed or it was disabled",
    ),
    Metric::counter(
        "gateway_bad_requests_total",
        "Client requests that could not be decoded (dropped)",
    ),
    // The UDP endpoint.
    Metric::counter(
        "gateway_datagrams_dropped_total",
        "Datagrams dropped by the session endpoint, by reason",
    )
    .by(
        "reason",
        &[
            "malformed",
            "unauthentic",
            "replayed",
            "unknown_session",
            "closed",
            "duplicate_handshake",
            "full",
            "limited",
        ],
    ),
    Metric::counter(
        "gateway_cookies_sent_total",
        "Handshake cookies sent (cookie mode: a client must prove its address first)",
    ),
    Metric::counter(
        "gateway_resets_sent_total",
        "RESETs sent for datagrams of unknown sessions",
    ),
    Metric::counter(
        "gateway_resets_limited_total",
        "RESETs not sent because of the per-second cap",
    ),
    // Messages.
    Metric::counter(
        "gateway_messages_total",
        "Messages sent by clients, by outcome: stored, duplicate (a retry answered from memory), retry (refused for now; the client retries), refused",
    )
    .by("outcome", &["stored", "duplicate", "retry", "refused"]),
    Metric::counter(
        "gateway_send_answer_timeouts_total",
        "Sends whose store did not answer in time (the client is told to retry)",
    ),
    Metric::counter("gateway_stores_total", "Store batches sent to the shards"),
    Metric::counter(
        "gateway_stored_items_total",
        "Messages in the store batches sent to the shards",
    ),
    Metric::counter(
        "gateway_undecodable_records_total",
        "Stored messages that could not be decoded (skipped when read)",
    ),
    Metric::counter(
        "gateway_replies_dropped_total",
        "Replies not sent because the session's queue was full",
    ),
    Metric::counter(
        "gateway_pushes_dropped_total",
        "Pushes not sent because the session's queue was full",
    ),
    Metric::counter(
        "gateway_pushes_missed_total",
        "Pushes a session missed (it is told to fetch by seq)",
    ),
    Metric::counter(
        "gateway_notify_failed_total",
        "Notifications of a new message that failed, by why: presence (lookup failed), peer (the forward to the recipient's gateway failed), group (the group could not be read)",
    )
    .by("why", &["presence", "peer", "group"]),
    Metric::counter(
        "gateway_relation_reads_total",
        "Reads of users' relations (friends, blocks) from profile",
    ),
    // Groups.
    Metric::counter(
        "gateway_group_messages_total",
        "Group messages fanned out from this gateway",
    ),
    Metric::counter(
        "gateway_group_pushes_total",
        "Group messages pushed to sessions on this gateway",
    ),
    Metric::counter(
        "gateway_group_forwards_total",
        "Group messages forwarded to another gateway (one per gateway)",
    ),
    Metric::counter("gateway_group_reads_total", "Reads of groups from profile"),
    Metric::counter(
        "gateway_group_expired_total",
        "Group messages deleted because every member read them or they passed the retention",
    ),
    Metric::counter(
        "gateway_group_dropped_shown_total",
        "Group messages reported to clients as dropped (expired before they read them)",
    ),
    // Peer links.
    Metric::gauge("gateway_peer_connections", "Open links on the peer port"),
    Metric::counter(
        "gateway_peer_connections_refused_total",
        "Peer-port connections closed at once because limits.peer_connections_max links were open",
    ),
    Metric::counter(
        "gateway_peer_idle_closed_total",
        "Peer-port links closed after timers.peer_idle_timeout_s without a complete frame",
    ),
    Metric::counter(
        "gateway_bad_peer_frames_total",
        "Peer-port links closed for an oversized or malformed frame",
    ),
    // Shards and the cluster map.
    Metric::gauge(
        "gateway_cluster_map_epoch",
        "Epoch of the cluster map in use",
    ),
    Metric::counter(
        "gateway_map_updates_total",
        "Cluster maps pushed to this gateway, by outcome: accepted, older (an epoch not above the one in use), invalid, storage (could not be saved)",
    )
    .by("outcome", &["accepted", "older", "invalid", "storage"]),
    Metric::counter(
        "gateway_shard_moved_total",
        "Shard requests answered Moved (the user is on another shard)",
    ),
    Metric::counter(
        "gateway_shard_not_leader_total",
        "Shard requests answered NotLeader by a replica",
    ),
    Metric::counter(
        "gateway_shard_replica_switches_total",
        "Shard requests sent to another replica of the group after a failed connection",
    ),
    Metric::counter(
        "gateway_shard_read_attempt_timeouts_total",
        "Reads and acks a replica of a shard group left unanswered for READ_ATTEMPT_MS_MAX, then asked of its other replicas",
    ),
    Metric::counter(
        "gateway_shard_busy_retries_total",
        "Shard requests retried after a Busy answer",
    ),
    Metric::counter(
        "gateway_shard_reconnect_retries_total",
        "Shard requests retried on a new connection",
    ),
    Metric::counter(
        "gateway_shard_links_pruned_total",
        "Times the shard link table was full and links to shards no longer in the map were dropped",
    ),
];

/// Describe every metric of the gateway (and of the presence client it
/// uses) and put each at zero (a series already there keeps its value).
/// Call it before the gateway starts.
pub fn register() {
    catalog::register(METRICS);
    presence::metrics::register_client();
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    #[test]
    fn every_metric_in_the_code_is_in_the_table() {
        let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
        catalog::assert_table_matches_sources(METRICS, &src, "gateway::metrics");
    }
}
