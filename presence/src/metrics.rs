//! Every metric the presence daemon emits, in one table (see
//! [`daemon::catalog`]): [`register`] describes them all and puts each at
//! zero when the daemon starts. A new metric goes here too (a unit test
//! compares this table with the code).

use daemon::catalog::{self, Metric};
use metrics::Unit;

/// The `op` label of `presence_requests_total` (`server::op_name`).
pub(crate) const OPS: &[&str] = &[
    "register",
    "online",
    "offline",
    "lookup",
    "watch",
    "unwatch",
    "sync_begin",
    "sync_sessions",
    "sync_end",
    "gateways",
    "stats",
    "ping",
];

const METRICS: &[Metric] = &[
    Metric::counter("presence_requests_total", "Requests received, by op").by("op", OPS),
    Metric::counter(
        "presence_bad_frames_total",
        "Connections closed for an oversized or malformed frame",
    ),
    Metric::counter(
        "presence_connections_rejected_total",
        "Connections closed at once because connections_max was reached",
    ),
    Metric::counter(
        "presence_slow_consumers_total",
        "Connections closed because their unsent events passed outbox_bytes_max",
    ),
    Metric::counter(
        "presence_events_dropped_total",
        "Events for a gateway without a live connection",
    ),
    Metric::counter(
        "presence_leases_expired_total",
        "Connections closed because nothing arrived within lease_ms",
    ),
    Metric::counter(
        "presence_expired_users_total",
        "Users set offline because their gateway's grace period ran out",
    ),
    Metric::gauge("presence_connections", "Open connections"),
    Metric::gauge("presence_users_online", "Users in the online table"),
    Metric::gauge(
        "presence_gateways_connected",
        "Gateways with a live connection",
    ),
    Metric::gauge("presence_table_bytes", "Bytes of the online table's slots").unit(Unit::Bytes),
];

/// Metrics of the presence client, in the process that uses it (the
/// gateway).
const CLIENT: &[Metric] = &[Metric::counter(
    "presence_client_primary_switches_total",
    "Times the presence client moved its reads and events to another presence replica",
)];

/// Describe every metric of the presence daemon and put each at zero (a
/// series already there keeps its value). Call it before serving.
pub fn register() {
    catalog::register(METRICS);
}

/// The same for the metrics of the presence client ([`crate::replicas`]):
/// for the process that uses it.
pub fn register_client() {
    catalog::register(CLIENT);
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    #[test]
    fn every_metric_in_the_code_is_in_the_table() {
        let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
        catalog::assert_table_matches_sources(
            &[METRICS, CLIENT].concat(),
            &src,
            "presence::metrics",
        );
    }

    #[test]
    fn the_op_labels_are_every_op() {
        let file = Path::new(env!("CARGO_MANIFEST_DIR")).join("src/server.rs");
        catalog::assert_arms_are(&file, "op_name", OPS);
    }
}
