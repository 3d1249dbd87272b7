//! `imbench group`'s figures: one record per phase, the delivery check
//! (every member shows every message once, in seq order), the printed
//! table and the JSON file.

use crate::{
    e2e_report::Latency,
    group_cluster::ServerCounters,
    group_members::{Got, MemberLog},
    report::fmt_rate,
};
use serde::Serialize;
use std::{
    collections::{BTreeMap, HashSet},
    fmt::Write as _,
};

/// The brief's targets.
const APPENDS_TARGET: f64 = 1.0;
const FORWARDS_TARGET_MAX: f64 = 1.0;
const DELIVERIES_VS_DIRECT_TARGET: f64 = 2.0;
/// Lost / duplicated details kept in the JSON file, and printed.
const DETAILS_KEPT: usize = 200;
const DETAILS_PRINTED: usize = 20;

#[derive(Debug, Clone, Default, Serialize)]
pub struct Ratios {
    /// Shard appends during the group phases / group messages answered
    /// `Sent` (both group phases).
    pub shard_appends_per_group_message: Option<f64>,
    /// Gateway group forwards per group message / (gateways - 1).
    pub gateway_forwards_per_message_vs_gateways: Option<f64>,
    /// Bytes between the gateways and the shards (both ways) per group
    /// message / the body's bytes, in the small group's phase ...
    pub shard_bytes_per_message_vs_body_50: Option<f64>,
    /// ... and in the large group's.
    pub shard_bytes_per_message_vs_body_500: Option<f64>,
    /// Group deliveries per second (large group) / 1:1 deliveries per
    /// second, the same number of senders.
    pub deliveries_vs_direct_messages: Option<f64>,
    pub lost: Option<u64>,
    pub duplicated: Option<u64>,
}

/// The server-side counters over one phase.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ServerFigures {
    pub shard_appends: f64,
    pub shard_requests: f64,
    /// Shard requests by op (`msgstore_requests_total{op}`).
    pub shard_ops: BTreeMap<String, f64>,
    pub gateway_group_forwards: f64,
    pub gateway_group_messages: f64,
    pub gateway_group_pushes: f64,
    pub gateway_notify_failed: f64,
    pub gateway_pushes_dropped: f64,
    /// Group member lists the gateways read from profile
    /// (`gateway_group_reads_total`).
    pub gateway_group_loads: f64,
    /// Bytes gateway -> shard, counted by the relays.
    pub shard_bytes_up: u64,
    /// Bytes shard -> gateway.
    pub shard_bytes_down: u64,
    /// The same by the op of the request (an answer counts for its
    /// request's): op -> (up, down).
    pub shard_bytes_by_op: BTreeMap<String, (u64, u64)>,
}

impl ServerFigures {
    /// Bytes both ways of the ops that store (`append*`), and of the rest.
    pub fn store_and_other_bytes(&self) -> (u64, u64) {
        let mut store = 0;
        let mut other = 0;
        for (op, (u, d)) in &self.shard_bytes_by_op {
            if op.starts_with("append") {
                store += u + d;
            } else {
                other += u + d;
            }
        }
        (store, other)
    }
}

impl From<ServerCounters> for ServerFigures {
    fn from(c: ServerCounters) -> Self {
        ServerFigures {
            shard_appends: c.shard_appends,
            shard_requests: c.shard_requests,
            shard_ops: c.shard_ops,
            gateway_group_forwards: c.group_forwards,
            gateway_group_messages: c.group_messages,
            gateway_group_pushes: c.group_pushes,
            gateway_notify_failed: c.notify_failed,
            gateway_pushes_dropped: c.pushes_dropped,
            gateway_group_loads: c.group_reads,
            shard_bytes_up: c.relay_up,
            shard_bytes_down: c.relay_down,
            shard_bytes_by_op: c.relay_ops,
        }
    }
}

/// CPU time a process used over a phase, as a share of one core.
#[derive(Debug, Clone, Serialize)]
pub struct CpuShare {
    pub process: String,
    pub cores: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct GroupPhase {
    pub members: usize,
    /// Members logged in during the phase (the group's deliveries go to
    /// them).
    pub online_members: usize,
    pub senders: usize,
    /// Messages per sender sent and not yet shown at every online member.
    pub window: usize,
    /// Group messages answered `Sent`.
    pub messages: u64,
    pub send_failures: u64,
    /// `GroupMessage` events at the online members, from the first send
    /// to the moment the last message was shown at every online member.
    pub deliveries: u64,
    pub secs: f64,
    pub deliveries_per_sec: f64,
    pub messages_per_sec: f64,
    /// Send -> shown at the last online member, per message.
    pub everywhere: Latency,
    /// Send -> `Sent` at the sender.
    pub answer: Latency,
    /// Messages not shown at every online member when the phase gave up
    /// waiting.
    pub incomplete: usize,
    pub server: ServerFigures,
    pub appends_per_message: Option<f64>,
    pub forwards_per_message: Option<f64>,
    pub shard_bytes_per_message: Option<f64>,
    pub shard_bytes_per_message_vs_body: Option<f64>,
    pub cpu: Vec<CpuShare>,
    /// The online members' SDK group-inbox counters over the phase.
    pub clients: ClientFigures,
    /// What went wrong in the phase.
    pub notes: Vec<String>,
}

/// `client::sdk` group-inbox counters (`SdkStats::groups.inbox`), summed
/// over connections.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct ClientFigures {
    pub shown: u64,
    pub fetches: u64,
    /// Pushes the inbox dropped (held bytes or ready room full): fetched.
    pub held_dropped: u64,
    pub duplicates: u64,
}

impl ClientFigures {
    pub fn since(&self, before: &ClientFigures) -> ClientFigures {
        ClientFigures {
            shown: self.shown - before.shown,
            fetches: self.fetches - before.fetches,
            held_dropped: self.held_dropped - before.held_dropped,
            duplicates: self.duplicates - before.duplicates,
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct DirectPhase {
    pub pairs: usize,
    /// Sends unanswered per sender at most.
    pub window: usize,
    /// 1:1 messages shown at the receivers within the timed window.
    pub deliveries: u64,
    pub secs: f64,
    pub deliveries_per_sec: f64,
    /// Answered `Sent`, the whole phase.
    pub messages: u64,
    pub send_failures: u64,
    pub answer: Latency,
    pub cpu: Vec<CpuShare>,
    pub notes: Vec<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct DrainPhase {
    pub members: usize,
    pub login_failures: usize,
    /// Logging them in (password logins; their events not read yet).
    pub login_secs: f64,
    /// Group messages shown at them once their events were read ...
    pub messages: u64,
    /// ... until every one of them was `synced`.
    pub secs: f64,
    pub messages_per_sec: f64,
    pub not_synced: usize,
}

#[derive(Debug, Clone, Serialize)]
pub struct Setup {
    pub accounts: usize,
    pub accounts_secs: f64,
    /// Invitations + answers, both groups.
    pub memberships: usize,
    pub memberships_secs: f64,
    pub online_logins: usize,
    pub online_login_failures: usize,
    pub online_login_secs: f64,
}

/// What members were shown against what senders were told.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Check {
    /// (member, message) pairs that had to be shown.
    pub expected: u64,
    /// ... shown once, in order.
    pub shown: u64,
    /// ... never shown.
    pub lost: u64,
    /// Shown again, or out of seq order (a seq not above the one before).
    pub duplicated: u64,
    /// 1:1 only: a message shown before one its sender sent earlier (the
    /// per-conversation order).
    pub order_inversions: u64,
    /// Shown with a seq no sender was told (a send that failed but was
    /// stored, or a wrong seq).
    pub unexpected: u64,
    /// Which member missed which seqs, and the like.
    pub details: Vec<String>,
}

impl Check {
    fn detail(&mut self, what: String) {
        if self.details.len() < DETAILS_KEPT {
            self.details.push(what);
        }
    }

    /// A member's messages of one conversation (a group, or its 1:1
    /// sender) in the order shown, against `expected` (seq -> (sender,
    /// counter)).
    pub fn member(
        &mut self,
        who: &str,
        expected: &BTreeMap<u64, (u64, u64)>,
        got: &[Got],
        counter_order: bool,
    ) {
        self.expected += expected.len() as u64;
        let mut last_seq = 0;
        let mut last_counter: Option<u64> = None;
        let mut seen = HashSet::new();
        let mut shown = HashSet::new();
        for g in got {
            if g.seq <= last_seq {
                self.duplicated += 1;
                self.detail(format!(
                    "{who}: seq {} shown after seq {last_seq} (sender {} #{})",
                    g.seq, g.sender, g.counter
                ));
                continue;
            }
            last_seq = g.seq;
            if !seen.insert((g.sender, g.counter)) {
                self.duplicated += 1;
                self.detail(format!(
                    "{who}: message {} #{} shown again at seq {}",
                    g.sender, g.counter, g.seq
                ));
                continue;
            }
            if counter_order {
                if last_counter.is_some_and(|c| g.counter < c) {
                    self.order_inversions += 1;
                    self.detail(format!(
                        "{who}: #{} (seq {}) shown after #{}",
                        g.counter,
                        g.seq,
                        last_counter.unwrap_or_default()
                    ));
                }
                last_counter = Some(g.counter);
            }
            match expected.get(&g.seq) {
                Some(&(sender, counter)) if (sender, counter) == (g.sender, g.counter) => {
                    shown.insert(g.seq);
                }
                Some(&(sender, counter)) => {
                    self.unexpected += 1;
                    self.detail(format!(
                        "{who}: seq {} is {} #{}, but {sender} #{counter} was answered Sent with it",
                        g.seq, g.sender, g.counter
                    ));
                }
                None => {
                    self.unexpected += 1;
                    self.detail(format!(
                        "{who}: seq {} ({} #{}) was never answered Sent",
                        g.seq, g.sender, g.counter
                    ));
                }
            }
        }
        self.shown += shown.len() as u64;
        let missed: Vec<u64> = expected
            .keys()
            .filter(|s| !shown.contains(s))
            .copied()
            .collect();
        if !missed.is_empty() {
            self.lost += missed.len() as u64;
            self.detail(format!(
                "{who}: missed {} of {} messages, seqs {}",
                missed.len(),
                expected.len(),
                seq_ranges(&missed)
            ));
        }
    }

    /// A member who never logged in: it showed nothing.
    pub fn absent(&mut self, who: &str, expected: usize, why: &str) {
        self.expected += expected as u64;
        self.lost += expected as u64;
        self.detail(format!("{who}: missed all {expected} messages ({why})"));
    }
}

/// `1-5, 9, 12-13` (at most 12 runs, then `...`).
pub fn seq_ranges(seqs: &[u64]) -> String {
    let mut runs: Vec<(u64, u64)> = Vec::new();
    for &s in seqs {
        match runs.last_mut() {
            Some((_, end)) if *end + 1 == s => *end = s,
            _ => runs.push((s, s)),
        }
    }
    let mut parts: Vec<String> = runs
        .iter()
        .take(12)
        .map(|&(a, b)| {
            if a == b {
                a.to_string()
            } else {
                format!("{a}-{b}")
            }
        })
        .collect();
    if runs.len() > 12 {
        parts.push(format!("... ({} runs)", runs.len()));
    }
    parts.join(", ")
}

/// Problems a member's connection logged, summed by kind.
pub fn member_problems(logs: &[&MemberLog]) -> BTreeMap<String, u64> {
    let mut kinds = BTreeMap::new();
    for (what, n) in logs.iter().flat_map(|l| l.problems.iter()) {
        *kinds.entry(what.clone()).or_default() += n;
    }
    kinds
}

#[derive(Debug, Clone, Serialize)]
pub struct GroupReport {
    pub ratios: Ratios,
    pub config: serde_json::Value,
    pub setup: Option<Setup>,
    pub group_small: Option<GroupPhase>,
    pub group_large: Option<GroupPhase>,
    pub direct: Option<DirectPhase>,
    pub drain: Option<DrainPhase>,
    /// Group messages at the online members (both groups).
    pub check_group_online: Option<Check>,
    /// Group messages at the drained offline members.
    pub check_group_drained: Option<Check>,
    /// 1:1 messages at their receivers.
    pub check_direct: Option<Check>,
    pub problems: Vec<String>,
}

impl GroupReport {
    pub fn new(config: serde_json::Value) -> Self {
        GroupReport {
            ratios: Ratios::default(),
            config,
            setup: None,
            group_small: None,
            group_large: None,
            direct: None,
            drain: None,
            check_group_online: None,
            check_group_drained: None,
            check_direct: None,
            problems: Vec::new(),
        }
    }

    /// The ratios from the phases.
    pub fn finish(&mut self, gateways: usize, body_bytes: usize) {
        let phases: Vec<&GroupPhase> = [&self.group_small, &self.group_large]
            .into_iter()
            .flatten()
            .collect();
        let messages: u64 = phases.iter().map(|p| p.messages).sum();
        let per_message = |v: f64| (messages > 0).then(|| v / messages as f64);
        let appends: f64 = phases.iter().map(|p| p.server.shard_appends).sum();
        let forwards: f64 = phases.iter().map(|p| p.server.gateway_group_forwards).sum();
        let r = &mut self.ratios;
        r.shard_appends_per_group_message = per_message(appends);
        r.gateway_forwards_per_message_vs_gateways = per_message(forwards)
            .filter(|_| gateways > 1)
            .map(|f| f / (gateways - 1) as f64);
        let vs_body = |p: &Option<GroupPhase>| {
            p.as_ref()
                .and_then(|p| p.shard_bytes_per_message)
                .map(|b| b / body_bytes as f64)
        };
        r.shard_bytes_per_message_vs_body_50 = vs_body(&self.group_small);
        r.shard_bytes_per_message_vs_body_500 = vs_body(&self.group_large);
        r.deliveries_vs_direct_messages = match (&self.group_large, &self.direct) {
            (Some(g), Some(d)) if d.deliveries_per_sec > 0.0 => {
                Some(g.deliveries_per_sec / d.deliveries_per_sec)
            }
            _ => None,
        };
        let checks: Vec<&Check> = [
            &self.check_group_online,
            &self.check_group_drained,
            &self.check_direct,
        ]
        .into_iter()
        .flatten()
        .collect();
        if !checks.is_empty() {
            r.lost = Some(checks.iter().map(|c| c.lost).sum());
            r.duplicated = Some(checks.iter().map(|c| c.duplicated).sum());
        }
    }
}

fn opt(v: Option<f64>, digits: usize) -> String {
    v.map(|v| format!("{v:.digits$}"))
        .unwrap_or_else(|| "n/a".into())
}

pub fn render(r: &GroupReport) -> String {
    let mut out = String::new();
    let c = &r.config;
    let _ = writeln!(
        out,
        "imbench group: presence, profile, {} shards and {} gateways, each a process; \
         {} members (half online, alternating gateways), {} senders x {} undelivered, \
         {}-byte bodies",
        c["shards"], c["gateways"], c["members"], c["senders"], c["window"], c["body_bytes"]
    );
    let _ = writeln!(
        out,
        "gateway limits raised by --config: handshakes_per_ip_per_s, messages_per_user_per_s; \
         shard limits raised: mailbox_messages_max, mailbox_bytes_max (offline members keep every group message)\n"
    );
    if let Some(s) = &r.setup {
        let _ = writeln!(
            out,
            "setup                  {} accounts in {:.2} s, {} memberships in {:.2} s, {} online logins in {:.2} s ({} failed)",
            s.accounts,
            s.accounts_secs,
            s.memberships,
            s.memberships_secs,
            s.online_logins,
            s.online_login_secs,
            s.online_login_failures
        );
    }
    for (name, phase) in [("group", &r.group_small), ("group", &r.group_large)] {
        if let Some(p) = phase {
            render_group(&mut out, name, p);
        }
    }
    if let Some(d) = &r.direct {
        let _ = writeln!(
            out,
            "direct 1:1             {:>9} deliveries/s  ({} shown in {:.1} s; {} pairs x {} in flight; {} answered Sent, {} failed)",
            fmt_rate(d.deliveries_per_sec),
            d.deliveries,
            d.secs,
            d.pairs,
            d.window,
            d.messages,
            d.send_failures
        );
        latency(&mut out, "answer (send->Sent)", &d.answer);
        render_cpu(&mut out, &d.cpu);
        render_notes(&mut out, &d.notes);
    }
    if let Some(d) = &r.drain {
        let _ = writeln!(
            out,
            "offline drain          {:>9} msgs/s  ({} group messages to {} members in {:.2} s, until all synced; \
             their logins took {:.2} s, {} failed; {} not synced)",
            fmt_rate(d.messages_per_sec),
            d.messages,
            d.members,
            d.secs,
            d.login_secs,
            d.login_failures,
            d.not_synced
        );
    }
    render_checks(&mut out, r);
    render_ratios(&mut out, r);
    if !r.problems.is_empty() {
        let _ = writeln!(out, "\nproblems:");
        for p in &r.problems {
            let _ = writeln!(out, "  - {p}");
        }
    }
    out
}

fn latency(out: &mut String, what: &str, l: &Latency) {
    let _ = writeln!(
        out,
        "  {what:<21}  p50 {} us  p99 {} us  p999 {} us  max {} us  ({} samples)",
        l.p50_us, l.p99_us, l.p999_us, l.max_us, l.samples
    );
}

fn render_cpu(out: &mut String, cpu: &[CpuShare]) {
    if cpu.is_empty() {
        return;
    }
    let parts: Vec<String> = cpu
        .iter()
        .map(|c| format!("{} {:.2}", c.process, c.cores))
        .collect();
    let _ = writeln!(out, "  CPU (cores)            {}", parts.join(", "));
}

fn render_notes(out: &mut String, notes: &[String]) {
    for n in notes {
        let _ = writeln!(out, "  NOTE: {n}");
    }
}

fn render_group(out: &mut String, name: &str, p: &GroupPhase) {
    let _ = writeln!(
        out,
        "{name} {:>3} members     {:>9} deliveries/s  ({} deliveries to {} online in {:.2} s; {} messages answered Sent, {:.0}/s, {} failed)",
        p.members,
        fmt_rate(p.deliveries_per_sec),
        p.deliveries,
        p.online_members,
        p.secs,
        p.messages,
        p.messages_per_sec,
        p.send_failures
    );
    latency(out, "send->every online", &p.everywhere);
    latency(out, "answer (send->Sent)", &p.answer);
    let s = &p.server;
    let ops: Vec<String> = s
        .shard_ops
        .iter()
        .map(|(op, n)| format!("{op} {n:.0}"))
        .collect();
    let _ = writeln!(
        out,
        "  shards                 {:.0} appends ({} per message), {:.0} requests ({}), {} B up + {} B down = {} B per message ({} x body)",
        s.shard_appends,
        opt(p.appends_per_message, 3),
        s.shard_requests,
        ops.join(", "),
        s.shard_bytes_up,
        s.shard_bytes_down,
        opt(p.shard_bytes_per_message, 1),
        opt(p.shard_bytes_per_message_vs_body, 3),
    );
    let _ = writeln!(
        out,
        "  gateways               {:.0} group messages, {:.0} forwards ({} per message), {:.0} pushes, {:.0} member-list loads, {:.0} notify failed, {:.0} pushes dropped",
        s.gateway_group_messages,
        s.gateway_group_forwards,
        opt(p.forwards_per_message, 3),
        s.gateway_group_pushes,
        s.gateway_group_loads,
        s.gateway_notify_failed,
        s.gateway_pushes_dropped
    );
    let per_msg = |b: u64| {
        if p.messages > 0 {
            format!("{:.1}", b as f64 / p.messages as f64)
        } else {
            "n/a".into()
        }
    };
    let (store, other) = s.store_and_other_bytes();
    let by_op: Vec<String> = s
        .shard_bytes_by_op
        .iter()
        .map(|(op, (u, d))| format!("{op} {u}+{d}"))
        .collect();
    let _ = writeln!(
        out,
        "  shard bytes by op      storing {} B per message, other ops {} B per message  ({})",
        per_msg(store),
        per_msg(other),
        by_op.join(", ")
    );
    let c = &p.clients;
    let _ = writeln!(
        out,
        "  clients (SDK)          {} group messages shown, {} group fetches, {} pushes dropped by the inbox (fetched later), {} copies dropped",
        c.shown, c.fetches, c.held_dropped, c.duplicates
    );
    render_cpu(out, &p.cpu);
    render_notes(out, &p.notes);
}

fn render_checks(out: &mut String, r: &GroupReport) {
    let _ = writeln!(out);
    for (what, check) in [
        ("group, online members ", &r.check_group_online),
        ("group, drained offline", &r.check_group_drained),
        ("1:1, receivers        ", &r.check_direct),
    ] {
        let Some(c) = check else { continue };
        let _ = writeln!(
            out,
            "delivery check ({what}): {} expected, {} shown once in order -> lost {}, duplicated {}, unexpected {}{}",
            c.expected,
            c.shown,
            c.lost,
            c.duplicated,
            c.unexpected,
            if what.starts_with("1:1") {
                format!(", order inversions {}", c.order_inversions)
            } else {
                String::new()
            }
        );
        for d in c.details.iter().take(DETAILS_PRINTED) {
            let _ = writeln!(out, "    {d}");
        }
        if c.details.len() > DETAILS_PRINTED {
            let _ = writeln!(
                out,
                "    ... {} more in the JSON file",
                c.details.len() - DETAILS_PRINTED
            );
        }
    }
}

fn render_ratios(out: &mut String, r: &GroupReport) {
    let q = &r.ratios;
    let verdict = |ok: Option<bool>| match ok {
        Some(true) => "met",
        Some(false) => "NOT met",
        None => "n/a",
    };
    let _ = writeln!(out, "ratios (ours / peer):");
    let _ = writeln!(
        out,
        "  shard_appends_per_group_message           {}  (target {APPENDS_TARGET}: {})",
        opt(q.shard_appends_per_group_message, 3),
        verdict(
            q.shard_appends_per_group_message
                .map(|v| (v - APPENDS_TARGET).abs() < 1e-9)
        )
    );
    let _ = writeln!(
        out,
        "  gateway_forwards_per_message_vs_gateways  {}  (target <= {FORWARDS_TARGET_MAX}: {})",
        opt(q.gateway_forwards_per_message_vs_gateways, 3),
        verdict(
            q.gateway_forwards_per_message_vs_gateways
                .map(|v| v <= FORWARDS_TARGET_MAX + 1e-9)
        )
    );
    let grows = match (
        q.shard_bytes_per_message_vs_body_50,
        q.shard_bytes_per_message_vs_body_500,
    ) {
        // Within 5%: the same protocol bytes per message, whatever the
        // member count.
        (Some(a), Some(b)) => Some(b <= a * 1.05),
        _ => None,
    };
    let _ = writeln!(
        out,
        "  shard_bytes_per_message_vs_body_50        {}",
        opt(q.shard_bytes_per_message_vs_body_50, 3)
    );
    let _ = writeln!(
        out,
        "  shard_bytes_per_message_vs_body_500       {}  (must not grow with members: {})",
        opt(q.shard_bytes_per_message_vs_body_500, 3),
        verdict(grows)
    );
    let _ = writeln!(
        out,
        "  deliveries_vs_direct_messages             {}  (target >= {DELIVERIES_VS_DIRECT_TARGET}: {})",
        opt(q.deliveries_vs_direct_messages, 3),
        verdict(
            q.deliveries_vs_direct_messages
                .map(|v| v >= DELIVERIES_VS_DIRECT_TARGET)
        )
    );
    let count = |v: Option<u64>| v.map_or_else(|| "n/a".into(), |v| v.to_string());
    let _ = writeln!(
        out,
        "  lost                                      {}  (must be 0: {})",
        count(q.lost),
        verdict(q.lost.map(|v| v == 0))
    );
    let _ = writeln!(
        out,
        "  duplicated                                {}  (must be 0: {})",
        count(q.duplicated),
        verdict(q.duplicated.map(|v| v == 0))
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    fn got(seq: u64, counter: u64) -> Got {
        Got {
            seq,
            sender: 9,
            counter,
        }
    }

    fn expected(n: u64) -> BTreeMap<u64, (u64, u64)> {
        (1..=n).map(|s| (s, (9, s - 1))).collect()
    }

    #[test]
    fn a_clean_member_shows_everything_once() {
        let mut c = Check::default();
        let list: Vec<Got> = (1..=5).map(|s| got(s, s - 1)).collect();
        c.member("m", &expected(5), &list, true);
        assert_eq!((c.expected, c.shown, c.lost, c.duplicated), (5, 5, 0, 0));
        assert!(c.details.is_empty());
    }

    #[test]
    fn missed_repeated_and_reordered_seqs_are_counted() {
        let mut c = Check::default();
        let list = [got(1, 0), got(3, 2), got(2, 1), got(3, 2), got(5, 4)];
        c.member("m", &expected(5), &list, false);
        assert_eq!(
            c.lost, 2,
            "2 came out of order (not counted shown), 4 never"
        );
        assert_eq!(c.duplicated, 2, "2 after 3, and 3 again");
        assert!(
            c.details.iter().any(|d| d.contains("seqs 2, 4")),
            "{:?}",
            c.details
        );
    }

    #[test]
    fn a_message_stored_twice_and_an_unknown_seq_are_flagged() {
        let mut c = Check::default();
        let list = [got(1, 0), got(2, 0), got(7, 6)];
        c.member("m", &expected(2), &list, false);
        assert_eq!(c.duplicated, 1);
        assert_eq!(c.unexpected, 1);
        assert_eq!(c.lost, 1);
    }

    #[test]
    fn counter_order_inversions_are_counted_for_direct_messages() {
        let mut c = Check::default();
        let exp: BTreeMap<u64, (u64, u64)> = [(1, (9, 1)), (2, (9, 0))].into_iter().collect();
        c.member("m", &exp, &[got(1, 1), got(2, 0)], true);
        assert_eq!((c.order_inversions, c.lost, c.duplicated), (1, 0, 0));
    }

    #[test]
    fn seq_ranges_are_compact() {
        assert_eq!(seq_ranges(&[1, 2, 3, 5, 7, 8]), "1-3, 5, 7-8");
        assert_eq!(seq_ranges(&[]), "");
    }

    #[test]
    fn ratios_serialize_with_exactly_the_seven_keys() {
        let v = serde_json::to_value(Ratios::default()).unwrap();
        let mut keys: Vec<_> = v.as_object().unwrap().keys().cloned().collect();
        keys.sort();
        assert_eq!(
            keys,
            [
                "deliveries_vs_direct_messages",
                "duplicated",
                "gateway_forwards_per_message_vs_gateways",
                "lost",
                "shard_appends_per_group_message",
                "shard_bytes_per_message_vs_body_50",
                "shard_bytes_per_message_vs_body_500"
            ]
        );
    }
}
