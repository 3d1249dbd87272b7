//! The one table of the benchmarks' ratio targets (from `bench/README.md`
//! and the issues that asked for them), and the verdict of a value.

use std::fmt;

/// Every benchmark that writes a JSON file: the subcommands' names, the
/// `"bench"` field of their JSON.
pub const BENCHES: &[&str] = &[
    "storage",
    "presence",
    "profile",
    "session",
    "e2e",
    "rebalance",
    "group",
    "failover",
    "chaos",
];

/// How a value is held against its target.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cmp {
    AtLeast,
    AtMost,
    Equal,
}

impl Cmp {
    pub fn symbol(self) -> &'static str {
        match self {
            Cmp::AtLeast => ">=",
            Cmp::AtMost => "<=",
            Cmp::Equal => "==",
        }
    }
}

/// One ratio's target.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Target {
    pub bench: &'static str,
    pub key: &'static str,
    pub cmp: Cmp,
    pub value: f64,
    /// What the figure is, in a few words.
    pub what: &'static str,
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.cmp.symbol(), fmt_value(self.value))
    }
}

/// Tolerance of `==` (the counts compared are integers; a ratio such as
/// appends per message is 1.0 exactly when it holds).
const EQUAL_TOLERANCE: f64 = 1e-9;

impl Target {
    pub fn passes(&self, v: f64) -> bool {
        match self.cmp {
            Cmp::AtLeast => v >= self.value,
            Cmp::AtMost => v <= self.value,
            Cmp::Equal => (v - self.value).abs() <= EQUAL_TOLERANCE * self.value.abs().max(1.0),
        }
    }
}

const fn t(
    bench: &'static str,
    key: &'static str,
    cmp: Cmp,
    value: f64,
    what: &'static str,
) -> Target {
    Target {
        bench,
        key,
        cmp,
        value,
        what,
    }
}

use Cmp::{AtLeast, AtMost, Equal};

/// The targets. A ratio key of a run with no row here is shown without one.
#[rustfmt::skip]
pub const TARGETS: &[Target] = &[
    // storage (README, issue)
    t("storage", "append_gateway_shape_vs_redis_always", AtLeast, 2.0, "appends/s in the gateway's shape vs Redis AOF always"),
    t("storage", "disk_bytes_per_msg_vs_redis", AtMost, 1.0, "disk bytes per stored message vs Redis"),
    t("storage", "anon_rss_vs_redis", AtMost, 0.5, "anonymous resident memory vs Redis"),
    t("storage", "restart_secs_vs_redis_load", AtMost, 1.0, "restart time vs Redis loading its AOF"),
    t("storage", "replicated_vs_redis_wait_p16", AtLeast, 1.0, "3-replica group vs Redis primary + replica with WAIT, 16 in flight"),
    // presence (README)
    t("presence", "memory_per_user_vs_redis", AtMost, 0.5, "RSS growth per online user vs Redis"),
    t("presence", "lookup_vs_redis", AtLeast, 2.0, "batched lookups/s vs MGET"),
    t("presence", "update_vs_redis", AtLeast, 1.0, "online/offline updates/s vs SET/DEL"),
    t("presence", "bytes_per_user", AtMost, 100.0, "bytes per online user (at 10 M users)"),
    // session (README, imbench session's printout)
    t("session", "echo_vs_raw_udp", AtLeast, 0.5, "encrypted reliable echo vs raw UDP echo"),
    t("session", "echo_large_vs_raw_udp", AtLeast, 0.5, "the same with 1000-byte payloads"),
    // e2e (README, issue)
    t("e2e", "datagrams_vs_raw_udp", AtLeast, 0.5, "gateway datagrams/s (chat shape) vs raw UDP echo"),
    t("e2e", "send_answer_ms_p999", AtMost, 5000.0, "slowest 0.1% of send answers, ms (timers.send_answer_ms_max)"),
    t("e2e", "offline_store_vs_shard", AtLeast, 0.5, "offline messages stored/s vs the shard alone"),
    t("e2e", "resume_login_cpu_vs_x25519", AtMost, 1.5, "gateway CPU per resume login vs the X25519 floor"),
    // group (README)
    t("group", "shard_appends_per_group_message", Equal, 1.0, "shard appends per group message"),
    t("group", "gateway_forwards_per_message_vs_gateways", AtMost, 1.0, "gateway forwards per message / (gateways - 1)"),
    t("group", "deliveries_vs_direct_messages", AtLeast, 2.0, "group deliveries/s vs 1:1 messages/s"),
    t("group", "lost", Equal, 0.0, "messages never shown to a member"),
    t("group", "duplicated", Equal, 0.0, "messages shown twice"),
    // failover (README, issue)
    t("failover", "acked_lost", Equal, 0.0, "acknowledged appends lost"),
    t("failover", "duplicated", Equal, 0.0, "appends stored twice"),
    t("failover", "kills", AtLeast, 5.0, "leader kills in the run"),
    t("failover", "failover_ms_max", AtMost, 3000.0, "kill -> next acknowledged append, ms, worst"),
    // chaos (README, issue)
    t("chaos", "acked_lost", Equal, 0.0, "acknowledged messages never shown"),
    t("chaos", "duplicated", Equal, 0.0, "messages shown twice"),
    t("chaos", "out_of_order", Equal, 0.0, "messages shown out of order"),
    t("chaos", "faults", AtLeast, 8.0, "faults injected"),
    t("chaos", "login_gap_ms_max", AtMost, 5000.0, "longest stretch of failing logins, ms"),
];

/// The target of `key` in benchmark `bench`, if it has one.
pub fn target_of(bench: &str, key: &str) -> Option<&'static Target> {
    TARGETS.iter().find(|t| t.bench == bench && t.key == key)
}

/// A value held against its target.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Pass,
    Fail,
    /// No target is known for the key.
    NoTarget,
    /// The run has no value (JSON `null`: a side of the ratio was missing).
    NoValue,
}

impl Verdict {
    pub fn of(target: Option<&Target>, value: Option<f64>) -> Verdict {
        match (target, value) {
            (_, None) => Verdict::NoValue,
            (None, Some(_)) => Verdict::NoTarget,
            (Some(t), Some(v)) if t.passes(v) => Verdict::Pass,
            (Some(_), Some(_)) => Verdict::Fail,
        }
    }

    pub fn label(self) -> &'static str {
        match self {
            Verdict::Pass => "pass",
            Verdict::Fail => "FAIL",
            Verdict::NoTarget => "no target",
            Verdict::NoValue => "no value",
        }
    }
}

/// A value for a label: integers as such, others with 3 significant
/// decimals at most.
pub fn fmt_value(v: f64) -> String {
    if v.fract() == 0.0 && v.abs() < 1e15 {
        format!("{v:.0}")
    } else if v.abs() >= 100.0 {
        format!("{v:.1}")
    } else {
        let s = format!("{v:.3}");
        s.trim_end_matches('0').trim_end_matches('.').to_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_comparison_passes_and_fails_where_it_should() {
        let at_least = target_of("storage", "replicated_vs_redis_wait_p16").unwrap();
        assert!(at_least.passes(1.0) && at_least.passes(1.7));
        assert!(!at_least.passes(0.99));
        let at_most = target_of("failover", "failover_ms_max").unwrap();
        assert!(at_most.passes(3000.0) && at_most.passes(12.0));
        assert!(!at_most.passes(3000.5));
        let equal = target_of("chaos", "acked_lost").unwrap();
        assert!(equal.passes(0.0));
        assert!(!equal.passes(1.0));
        let one = target_of("group", "shard_appends_per_group_message").unwrap();
        assert!(one.passes(1.0) && !one.passes(1.01));
        assert_eq!(at_least.to_string(), ">= 1");
        assert_eq!(at_most.to_string(), "<= 3000");
    }

    #[test]
    fn verdicts_cover_a_missing_target_and_a_missing_value() {
        let t = target_of("e2e", "offline_store_vs_shard");
        assert_eq!(Verdict::of(t, Some(0.6)), Verdict::Pass);
        assert_eq!(Verdict::of(t, Some(0.4)), Verdict::Fail);
        assert_eq!(Verdict::of(t, None), Verdict::NoValue);
        assert_eq!(
            Verdict::of(target_of("e2e", "no_such_key"), Some(1.0)),
            Verdict::NoTarget
        );
        // The same key is held to its own benchmark's target.
        assert!(target_of("storage", "acked_lost").is_none());
    }

    #[test]
    fn the_table_names_known_benches_once_per_key() {
        for (i, a) in TARGETS.iter().enumerate() {
            assert!(BENCHES.contains(&a.bench), "{}", a.bench);
            assert!(a.value.is_finite() && !a.what.is_empty());
            for b in &TARGETS[i + 1..] {
                assert!(
                    !(a.bench == b.bench && a.key == b.key),
                    "{} {}",
                    a.bench,
                    a.key
                );
            }
        }
    }

    #[test]
    fn the_storage_report_writes_every_storage_target_key() {
        let keys = serde_json::to_value(crate::report::Ratios::default()).unwrap();
        for t in TARGETS.iter().filter(|t| t.bench == "storage") {
            assert!(keys.get(t.key).is_some(), "{}", t.key);
        }
    }

    #[test]
    fn values_print_short() {
        assert_eq!(fmt_value(0.0), "0");
        assert_eq!(fmt_value(0.40204), "0.402");
        assert_eq!(fmt_value(0.5), "0.5");
        assert_eq!(fmt_value(3893.54), "3893.5");
    }
}
