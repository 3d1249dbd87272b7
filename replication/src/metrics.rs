//! The metrics the shared replication code emits, named under the
//! service's prefix (`msgstore_raft_term`, `profile_raft_term`): one table
//! of suffixes here, turned into each daemon's catalog entries by
//! [`table`].

use daemon::catalog::Metric;
use metrics::Unit;
use std::{collections::HashMap, sync::Mutex};

/// `<prefix>_<suffix>`.
pub fn metric_name(prefix: &str, suffix: &str) -> String {
    format!("{prefix}_{suffix}")
}

/// The suffixes, as catalog entries (names without the prefix).
const SUFFIXES: &[Metric] = &[
    Metric::gauge("raft_term", "The replica's current Raft term"),
    Metric::gauge(
        "raft_is_leader",
        "1 if this replica leads its group, else 0",
    ),
    Metric::gauge(
        "raft_commit_index",
        "Highest log index known committed and applied here",
    ),
    Metric::gauge(
        "raft_last_log_index",
        "Highest log index in this replica's log",
    ),
    Metric::gauge(
        "raft_follower_lag_entries",
        "On the leader: entries each follower (by replica id) lacks",
    )
    .by_open("replica"),
    Metric::counter(
        "raft_elections_total",
        "Times this replica became a candidate",
    ),
    Metric::counter(
        "raft_read_index_retries_total",
        "Leadership checks of reads that missed their quorum and were tried again",
    ),
    Metric::counter(
        "raft_follower_reads_total",
        "Reads served by a follower after its leader's read index, by outcome",
    )
    .by("outcome", &["ok", "unavailable"]),
    Metric::counter(
        "raft_bad_frames_total",
        "Replication links closed for an oversized or malformed frame",
    ),
    Metric::counter(
        "raft_log_appends_total",
        "Raft log append calls whose entries were written",
    ),
    Metric::counter(
        "raft_log_syncs_total",
        "fdatasync calls on Raft log segment files",
    ),
    Metric::gauge("raft_log_bytes", "Bytes of Raft log segment files on disk").unit(Unit::Bytes),
    Metric::counter(
        "raft_log_torn_tails_total",
        "Torn last writes cut off when the Raft log was opened",
    ),
    Metric::counter(
        "raft_rebuilds_total",
        "Times this replica found its Raft log damaged, set it aside and began rebuilding from its peers",
    ),
    Metric::gauge(
        "raft_rebuilding",
        "1 while this replica rebuilds from its peers (no vote, no election), else 0",
    ),
];

/// The catalog entries of the replication metrics of a service whose
/// metrics start with `prefix`. (The names are made once per prefix and
/// kept for the life of the process, as the catalog wants.)
pub fn table(prefix: &'static str) -> Vec<Metric> {
    static NAMES: Mutex<Option<HashMap<(&'static str, &'static str), &'static str>>> =
        Mutex::new(None);
    let mut names = NAMES.lock().unwrap_or_else(|p| p.into_inner());
    let names = names.get_or_insert_with(HashMap::new);
    SUFFIXES
        .iter()
        .map(|m| {
            let name = *names
                .entry((prefix, m.name))
                .or_insert_with(|| metric_name(prefix, m.name).leak());
            Metric { name, ..*m }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    /// Every suffix is used by the code (quoted where the name is made),
    /// has HELP text, and counters end in `_total`.
    #[test]
    fn every_suffix_is_emitted_somewhere() {
        let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
        for m in SUFFIXES {
            assert!(
                daemon::catalog::quoted_in_sources(&src, m.name, "metrics.rs"),
                "{} is in the table but the code never emits it",
                m.name
            );
        }
        let prefixed = table("svc");
        daemon::catalog::assert_table_is_well_formed(&prefixed, "replication::metrics");
        assert!(prefixed.iter().all(|m| m.name.starts_with("svc_raft_")));
    }
}
