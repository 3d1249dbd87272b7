//! `imbench e2e`'s figures: one record per phase, the delivery check
//! (lost and duplicated messages), the printed table.

use crate::{
    e2e::{Plan, Snapshot},
    e2e_fleet::Log,
    report::{fmt_rate, ratio},
};
use crate::{e2e_direct::DirectResult, e2e_storm::StormResult, responder_crypto::ResponderCrypto};
use hdrhistogram::Histogram;
use serde::Serialize;
use std::{collections::HashMap, fmt::Write as _, time::Duration};

/// The target for `ratios.datagrams_vs_raw_udp`.
const DATAGRAMS_RATIO_TARGET: f64 = 0.5;

/// The target of `ratios.send_answer_ms_p999`: the gateway's promise to
/// answer every send within `timers.send_answer_ms_max` (the run keeps its
/// default).
fn send_answer_target_ms() -> u64 {
    gateway::config::Timers::default().send_answer_ms_max
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct Ratios {
    /// Datagrams the gateway handled per second in the chat-shaped online
    /// phase (one send in flight per sender; both ways, counted at the
    /// clients) over the raw UDP echo's (both ways).
    pub datagrams_vs_raw_udp: Option<f64>,
    /// The same in the bulk phase, where several messages share a datagram
    /// (so fewer datagrams carry more messages).
    pub datagrams_vs_raw_udp_bulk: Option<f64>,
    /// The slowest 0.1% of send answers (send -> `Sent` reply) in the
    /// chat-shaped online phase, milliseconds; the gateway promises at most
    /// `timers.send_answer_ms_max` (5,000 by default).
    pub send_answer_ms_p999: Option<f64>,
    /// Gateway CPU per resume-token login over the CPU of the X25519 work
    /// a Noise_NK responder must do (one key pair, two DH), measured in
    /// this process in the same run.
    pub resume_login_cpu_vs_x25519: Option<f64>,
    /// Sends to offline users stored per second through the gateway over
    /// the append rate of the same shards driven directly, as the gateway
    /// drives them, in the same run.
    pub offline_store_vs_shard: Option<f64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct RawResult {
    pub round_trips: u64,
    pub secs: f64,
    pub round_trips_per_sec: f64,
    /// Datagrams the echo server handled per second (in + out).
    pub datagrams_per_sec: f64,
}

/// A latency distribution, microseconds (hdrhistogram, 3 significant
/// digits).
#[derive(Debug, Clone, Serialize)]
pub struct Latency {
    pub p50_us: u64,
    pub p99_us: u64,
    pub p999_us: u64,
    pub max_us: u64,
    pub samples: u64,
}

impl Latency {
    pub fn of<'a>(hists: impl IntoIterator<Item = &'a Histogram<u64>>) -> Self {
        let mut all = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).expect("valid bounds");
        for h in hists {
            all.add(h).expect("same bounds");
        }
        Latency {
            p50_us: all.value_at_quantile(0.50),
            p99_us: all.value_at_quantile(0.99),
            p999_us: all.value_at_quantile(0.999),
            max_us: all.max(),
            samples: all.len(),
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct OnlineResult {
    pub pairs: usize,
    pub window: usize,
    /// Sends answered `Sent` in the timed window.
    pub messages: u64,
    pub secs: f64,
    pub messages_per_sec: f64,
    /// Send -> `Sent` reply at the sender, every send of the phase
    /// (warm-up included).
    pub answer: Latency,
    /// Send -> the push at the recipient, every message of the phase first
    /// seen pushed (warm-up included).
    pub delivery: Latency,
    /// Messages the receivers saw first in a fetched page rather than
    /// pushed (no delivery latency): their opening fetch, fetches after
    /// `MailboxChanged`, and the last fetch once every send was answered.
    pub fetched: u64,
    /// Copies of a mailbox seq already seen (a push of a message a fetch
    /// returned, or the reverse), dropped as a client does.
    pub seq_repeats: u64,
    /// `MailboxChanged` pushes: pushes the gateway could not queue (the
    /// receiver then fetches).
    pub mailbox_changed: u64,
    /// Datagrams between the clients and the gateway, both ways, per second.
    pub datagrams_per_sec: f64,
    pub datagrams_per_message: Option<f64>,
    pub gateway_cpu_us_per_message: Option<f64>,
    /// CPU of imbench's process (clients, presence, profile, shards).
    pub imbench_cpu_us_per_message: Option<f64>,
}

impl OnlineResult {
    pub fn new(
        (pairs, window): (usize, usize),
        start: &Snapshot,
        end: &Snapshot,
        logs: &[Log],
    ) -> Self {
        let secs = (end.at - start.at).as_secs_f64();
        let messages = end.ops_ok - start.ops_ok;
        let datagrams = end.datagrams - start.datagrams;
        let per_message = |v: f64| (messages > 0).then(|| v / messages as f64);
        let cpu = |b, a| cpu_us_per(b, a, messages);
        OnlineResult {
            pairs,
            window,
            messages,
            secs,
            messages_per_sec: messages as f64 / secs,
            answer: Latency::of(logs.iter().map(|l| &l.answer)),
            delivery: Latency::of(logs.iter().map(|l| &l.delivery)),
            fetched: logs.iter().map(|l| l.fetched).sum(),
            seq_repeats: logs.iter().map(|l| l.seq_repeats).sum(),
            mailbox_changed: logs.iter().map(|l| l.mailbox_changed).sum(),
            datagrams_per_sec: datagrams as f64 / secs,
            datagrams_per_message: per_message(datagrams as f64),
            gateway_cpu_us_per_message: cpu(end.gateway_cpu, start.gateway_cpu),
            imbench_cpu_us_per_message: cpu(end.imbench_cpu, start.imbench_cpu),
        }
    }
}

/// CPU from `a` to `b`, in microseconds per one of `n`.
pub fn cpu_us_per(b: Option<Duration>, a: Option<Duration>, n: u64) -> Option<f64> {
    let (b, a) = b.zip(a)?;
    (n > 0).then(|| b.saturating_sub(a).as_secs_f64() * 1e6 / n as f64)
}

#[derive(Debug, Clone, Serialize)]
pub struct LoginResult {
    /// `password` or `resume`.
    pub method: String,
    pub logins: u64,
    pub failed: u64,
    pub secs: f64,
    pub logins_per_sec: f64,
    pub gateway_cpu_us_per_login: Option<f64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct OfflineResult {
    /// Sends answered `Sent` (stored in the mailboxes of users who never
    /// logged in), in all.
    pub stored: usize,
    /// From the go signal (every sender logged in) to the last answer.
    pub store_secs: f64,
    /// Sends answered `Sent` per second.
    pub stored_per_sec: f64,
    /// While storing (what bounds the rate on a shared machine).
    pub gateway_cpu_us_per_message: Option<f64>,
    /// CPU of imbench's process (clients, presence, profile, shards).
    pub imbench_cpu_us_per_message: Option<f64>,
    /// Messages fetched by the receivers once they logged in (each seq
    /// once).
    pub drained: u64,
    /// From the go signal (every receiver logged in) to the last page.
    pub drain_secs: f64,
    pub drained_per_sec: f64,
}

impl OfflineResult {
    pub fn new(
        start: &Snapshot,
        end: &Snapshot,
        logs: &[Log],
        drained: u64,
        drain_secs: f64,
    ) -> Self {
        let store_secs = (end.at - start.at).as_secs_f64();
        let messages = end.ops_ok - start.ops_ok;
        OfflineResult {
            stored: logs.iter().map(|l| l.sent.len()).sum(),
            store_secs,
            stored_per_sec: messages as f64 / store_secs,
            gateway_cpu_us_per_message: cpu_us_per(end.gateway_cpu, start.gateway_cpu, messages),
            imbench_cpu_us_per_message: cpu_us_per(end.imbench_cpu, start.imbench_cpu, messages),
            drained,
            drain_secs,
            drained_per_sec: if drain_secs > 0.0 {
                drained as f64 / drain_secs
            } else {
                0.0
            },
        }
    }
}

/// What senders were told against what receivers got, over all phases.
#[derive(Debug, Clone, Serialize)]
pub struct Delivery {
    /// Message ids answered `Sent`.
    pub acknowledged: usize,
    /// Distinct message ids received (pushed or fetched).
    pub received: usize,
    /// Acknowledged but never received.
    pub lost: u64,
    /// Receptions beyond the first of the same id. Receivers log each
    /// mailbox seq once, so this counts a message stored under several
    /// seqs (or received by several users).
    pub duplicated: u64,
}

impl Delivery {
    pub fn check(logs: &[Log]) -> Self {
        let mut seen: HashMap<u128, u64> = HashMap::new();
        for id in logs.iter().flat_map(|l| l.received.iter()) {
            *seen.entry(*id).or_default() += 1;
        }
        let acked: Vec<u128> = logs.iter().flat_map(|l| l.sent.iter()).copied().collect();
        Delivery {
            acknowledged: acked.len(),
            received: seen.len(),
            lost: acked.iter().filter(|id| !seen.contains_key(id)).count() as u64,
            duplicated: seen.values().map(|n| n - 1).sum(),
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct E2eReport {
    pub ratios: Ratios,
    pub lost: Option<u64>,
    pub duplicated: Option<u64>,
    /// The chat-shaped online phase's send -> `Sent` answer p99.
    pub p99_us: Option<u64>,
    /// The chat-shaped online phase's send -> push at the recipient p99.
    pub delivery_p99_us: Option<u64>,
    pub config: serde_json::Value,
    pub raw_udp: Option<RawResult>,
    /// The bulk online phase.
    pub online: Option<OnlineResult>,
    /// The chat-shaped online phase.
    pub chat: Option<OnlineResult>,
    pub logins: Vec<LoginResult>,
    pub offline: Option<OfflineResult>,
    pub delivery: Option<Delivery>,
    pub gateway_peak_rss_bytes: Option<u64>,
    /// The reconnect storm: idle sessions, the gateway restarted.
    pub storm: Option<StormResult>,
    /// The offline phase's shards driven directly (`offline_store_vs_shard`).
    pub offline_direct: Option<DirectResult>,
    /// The responder's X25519 work, in-process (`resume_login_cpu_vs_x25519`).
    pub responder_crypto: Option<ResponderCrypto>,
    pub problems: Vec<String>,
}

impl E2eReport {
    pub fn new(config: serde_json::Value) -> Self {
        E2eReport {
            ratios: Ratios::default(),
            lost: None,
            duplicated: None,
            p99_us: None,
            delivery_p99_us: None,
            config,
            raw_udp: None,
            online: None,
            chat: None,
            logins: Vec::new(),
            offline: None,
            delivery: None,
            gateway_peak_rss_bytes: None,
            responder_crypto: None,
            offline_direct: None,
            storm: None,
            problems: Vec::new(),
        }
    }

    /// What the fleets of `phase` saw go wrong, summed by kind.
    pub fn note_problems(&mut self, phase: &str, logs: &[Log]) {
        let mut kinds = std::collections::BTreeMap::<&str, u64>::new();
        for (what, n) in logs.iter().flat_map(|l| l.problems.iter()) {
            *kinds.entry(what).or_default() += n;
        }
        for (what, n) in kinds {
            self.problems.push(format!("{phase}: {what} (x{n})"));
        }
    }

    /// Fill the headline fields from the phases.
    pub fn finish(&mut self) {
        let raw = self.raw_udp.as_ref().map(|r| r.datagrams_per_sec);
        let vs_raw = |o: &Option<OnlineResult>| ratio(o.as_ref().map(|o| o.datagrams_per_sec), raw);
        self.ratios.datagrams_vs_raw_udp = vs_raw(&self.chat);
        self.ratios.datagrams_vs_raw_udp_bulk = vs_raw(&self.online);
        self.lost = self.delivery.as_ref().map(|d| d.lost);
        self.duplicated = self.delivery.as_ref().map(|d| d.duplicated);
        self.ratios.send_answer_ms_p999 =
            self.chat.as_ref().map(|o| o.answer.p999_us as f64 / 1000.0);
        self.p99_us = self.chat.as_ref().map(|o| o.answer.p99_us);
        self.delivery_p99_us = self.chat.as_ref().map(|o| o.delivery.p99_us);
        self.ratios.offline_store_vs_shard = ratio(
            self.offline.as_ref().map(|o| o.stored_per_sec),
            self.offline_direct.as_ref().map(|d| d.stored_per_sec),
        );
        let resume = self.logins.iter().find(|l| l.method == "resume");
        self.ratios.resume_login_cpu_vs_x25519 = ratio(
            resume.and_then(|l| l.gateway_cpu_us_per_login),
            self.responder_crypto.as_ref().map(|c| c.x25519_us),
        );
    }
}

pub fn render(r: &E2eReport, plan: &Plan) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "imbench e2e: gateway process + presence, profile, 2 shards; online bulk {} pairs x {} in \
         flight, chat {} pairs x 1; {:.1} s online windows",
        plan.pairs,
        plan.window,
        plan.chat_pairs,
        plan.duration.as_secs_f64()
    );
    let _ = writeln!(
        out,
        "gateway limits raised by --config: handshakes_per_ip_per_s, messages_per_user_per_s\n"
    );
    render_online(&mut out, r);
    render_logins(&mut out, r);
    render_offline(&mut out, r);
    render_storm(&mut out, r);
    render_verdicts(&mut out, r);
    if !r.problems.is_empty() {
        let _ = writeln!(out, "\nproblems:");
        for p in &r.problems {
            let _ = writeln!(out, "  - {p}");
        }
    }
    out
}

fn render_online(out: &mut String, r: &E2eReport) {
    if let Some(raw) = &r.raw_udp {
        let _ = writeln!(
            out,
            "raw UDP echo ceiling   {:>9} round trips/s  {:>9} datagrams/s",
            fmt_rate(raw.round_trips_per_sec),
            fmt_rate(raw.datagrams_per_sec)
        );
    }
    for (name, phase) in [("online bulk", &r.online), ("online chat", &r.chat)] {
        if let Some(o) = phase {
            render_phase(out, name, o);
        }
    }
}

fn render_phase(out: &mut String, name: &str, o: &OnlineResult) {
    let _ = writeln!(
        out,
        "{name:<12}   {:>9} msgs/s  ({} answered Sent in {:.1} s; {} pairs x {} in flight)",
        fmt_rate(o.messages_per_sec),
        o.messages,
        o.secs,
        o.pairs,
        o.window,
    );
    let latency = |out: &mut String, what: &str, l: &Latency, note: &str| {
        let _ = writeln!(
            out,
            "  {what:<21}  p50 {} us  p99 {} us  p999 {} us  max {} us  ({} samples{note})",
            l.p50_us, l.p99_us, l.p999_us, l.max_us, l.samples
        );
    };
    latency(out, "answer (send->Sent)", &o.answer, "");
    let note = format!(
        "; {} first seen fetched, {} seq repeats dropped, {} MailboxChanged",
        o.fetched, o.seq_repeats, o.mailbox_changed
    );
    latency(out, "delivery (send->push)", &o.delivery, &note);
    let _ = writeln!(
        out,
        "  gateway datagrams    {:>9} /s  ({} per message)",
        fmt_rate(o.datagrams_per_sec),
        opt(o.datagrams_per_message, ""),
    );
    let _ = writeln!(
        out,
        "  CPU per message      gateway {}, imbench (clients + services) {}",
        opt(o.gateway_cpu_us_per_message, " us"),
        opt(o.imbench_cpu_us_per_message, " us")
    );
}

/// `v` with two decimals and `unit`, or `-`.
fn opt(v: Option<f64>, unit: &str) -> String {
    v.map(|v| format!("{v:.2}{unit}"))
        .unwrap_or_else(|| "-".into())
}

fn render_logins(out: &mut String, r: &E2eReport) {
    for l in &r.logins {
        let cpu = l
            .gateway_cpu_us_per_login
            .map(|v| format!("{v:.0} us"))
            .unwrap_or_else(|| "-".into());
        let _ = writeln!(
            out,
            "login storm ({:<8})  {:>9} logins/s  ({} ok, {} failed in {:.2} s; gateway CPU {} per login)",
            l.method,
            fmt_rate(l.logins_per_sec),
            l.logins,
            l.failed,
            l.secs,
            cpu
        );
    }
}

fn render_offline(out: &mut String, r: &E2eReport) {
    if let Some(c) = &r.responder_crypto {
        let _ = writeln!(
            out,
            "responder X25519 work  {:.1} us CPU (1 key pair + 2 DH, in-process); whole Noise_NK responder handshake {:.1} us",
            c.x25519_us, c.handshake_us
        );
    }
    let Some(o) = &r.offline else { return };
    let _ = writeln!(
        out,
        "offline store          {:>9} msgs/s  ({} answered Sent in {:.2} s; CPU per message gateway {}, imbench (clients + services) {})",
        fmt_rate(o.stored_per_sec),
        o.stored,
        o.store_secs,
        opt(o.gateway_cpu_us_per_message, " us"),
        opt(o.imbench_cpu_us_per_message, " us")
    );
    if let Some(d) = &r.offline_direct {
        let _ = writeln!(
            out,
            "  same shards direct   {:>9} msgs/s  ({} stored in {:.2} s: {} conversations, {} per AppendBatch, the gateway's shape; imbench CPU {} per message)",
            fmt_rate(d.stored_per_sec),
            d.stored,
            d.secs,
            d.conversations,
            d.items_per_store,
            opt(d.imbench_cpu_us_per_message, " us")
        );
    }
    let _ = writeln!(
        out,
        "offline drain          {:>9} msgs/s  ({} fetched in {:.2} s)",
        fmt_rate(o.drained_per_sec),
        o.drained,
        o.drain_secs
    );
}

fn render_storm(out: &mut String, r: &E2eReport) {
    let Some(s) = &r.storm else { return };
    let _ = writeln!(
        out,
        "reconnect storm        {} idle sessions (logged in in {:.1} s); gateway restarted (SIGTERM -> listening {:.2} s); all back {:.1} s after SIGTERM ({:.0} logins/s, {} retried, {} refused)",
        s.sessions, s.login_secs, s.restart_secs, s.all_back_secs, s.relogins_per_sec, s.retries, s.failed
    );
}

fn render_verdicts(out: &mut String, r: &E2eReport) {
    if let Some(d) = &r.delivery {
        let _ = writeln!(
            out,
            "\ndelivery check: {} answered Sent, {} distinct received -> lost {}, duplicated {} (must be 0 and 0: {})",
            d.acknowledged,
            d.received,
            d.lost,
            d.duplicated,
            if d.lost == 0 && d.duplicated == 0 { "met" } else { "NOT met" }
        );
    }
    let verdict = match r.ratios.datagrams_vs_raw_udp {
        Some(v) if v >= DATAGRAMS_RATIO_TARGET => format!("{v:.3} -> met"),
        Some(v) => format!("{v:.3} -> NOT met"),
        None => "n/a".into(),
    };
    let bulk = r
        .ratios
        .datagrams_vs_raw_udp_bulk
        .map_or_else(|| "n/a".into(), |v| format!("{v:.3}"));
    let _ = writeln!(
        out,
        "ratios (ours / raw UDP echo, target >= {DATAGRAMS_RATIO_TARGET}):\n  datagrams_vs_raw_udp       {verdict}   (chat shape)\n  datagrams_vs_raw_udp_bulk  {bulk}   (bulk shape: several messages per datagram)"
    );
    let target = send_answer_target_ms();
    let answer = match r.ratios.send_answer_ms_p999 {
        Some(v) if v <= target as f64 => format!("{v:.1} -> met"),
        Some(v) => format!("{v:.1} -> NOT met"),
        None => "n/a".into(),
    };
    let _ = writeln!(
        out,
        "  send_answer_ms_p999        {answer}   (target <= {target}: chat shape, slowest 0.1% of send -> Sent)"
    );
    let rows = [
        ("offline_store_vs_shard", r.ratios.offline_store_vs_shard),
        (
            "resume_login_cpu_vs_x25519",
            r.ratios.resume_login_cpu_vs_x25519,
        ),
    ];
    for (key, value) in rows {
        let target = crate::report_html::targets::target_of("e2e", key);
        let verdict = crate::report_html::targets::Verdict::of(target, value);
        let shown = value.map_or_else(|| "n/a".into(), |v| format!("{v:.3}"));
        let target = target.map_or_else(String::new, |t| format!("target {t}: "));
        let _ = writeln!(
            out,
            "  {key:<26} {shown} -> {}   ({target}{})",
            verdict.label(),
            what_of(key)
        );
    }
}

/// What each of the issue-22 ratios compares, for the printout.
fn what_of(key: &str) -> &'static str {
    match key {
        "offline_store_vs_shard" => {
            "offline stores/s via the gateway / the same shards driven as the gateway drives them"
        }
        "resume_login_cpu_vs_x25519" => {
            "gateway CPU per resume login / in-process X25519 work of a Noise_NK responder"
        }
        _ => "",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn log(sent: &[u128], received: &[u128]) -> Log {
        let mut log = Log::new();
        log.sent = sent.to_vec();
        log.received = received.to_vec();
        log
    }

    #[test]
    fn delivery_check_counts_lost_and_duplicated_across_fleets() {
        let senders = log(&[1, 2, 3, 4], &[]);
        let receivers = log(&[], &[1, 2, 2, 4]);
        let more = log(&[], &[2, 5]);
        let d = Delivery::check(&[senders, receivers, more]);
        assert_eq!(d.acknowledged, 4);
        assert_eq!(d.received, 4, "1, 2, 4, 5");
        assert_eq!(d.lost, 1, "3 was answered Sent but never received");
        assert_eq!(d.duplicated, 2, "2 arrived three times");
        let clean = Delivery::check(&[log(&[7, 8], &[8, 7])]);
        assert_eq!((clean.lost, clean.duplicated), (0, 0));
    }

    #[test]
    fn latency_merges_the_fleets_histograms() {
        let mut a = Log::new();
        let mut b = Log::new();
        for us in 1..=999 {
            a.answer.record(us).unwrap();
        }
        b.answer.record(50_000).unwrap();
        let l = Latency::of([&a.answer, &b.answer]);
        assert_eq!(l.samples, 1000);
        assert_eq!(l.p50_us, 500);
        assert_eq!(l.p999_us, 999, "the slowest 0.1% is the one sample above");
        assert!((50_000..50_100).contains(&l.max_us));
    }

    #[test]
    fn send_answer_ratio_is_the_chat_phases_p999_in_ms() {
        let mut r = E2eReport::new(serde_json::Value::Null);
        let mut log = Log::new();
        for _ in 0..999 {
            log.answer.record(1_000).unwrap();
        }
        log.answer.record(2_500_000).unwrap();
        log.delivery.record(3_000).unwrap();
        let snap = |ops_ok| crate::e2e::Snapshot {
            at: std::time::Instant::now(),
            ops_ok,
            datagrams: 0,
            gateway_cpu: None,
            imbench_cpu: None,
        };
        r.chat = Some(OnlineResult::new((1, 1), &snap(0), &snap(1000), &[log]));
        r.finish();
        assert_eq!(r.ratios.send_answer_ms_p999, Some(1.0));
        assert_eq!(r.p99_us, Some(1_000));
        assert!(r
            .delivery_p99_us
            .is_some_and(|us| (3_000..3_010).contains(&us)));
        let text = render_verdicts_text(&r);
        assert!(
            text.contains("send_answer_ms_p999        1.0 -> met"),
            "{text}"
        );
        assert!(text.contains("target <= 5000"), "{text}");
    }

    fn render_verdicts_text(r: &E2eReport) -> String {
        let mut out = String::new();
        render_verdicts(&mut out, r);
        out
    }

    #[test]
    fn problems_are_summed_by_kind_per_phase() {
        let mut a = Log::new();
        a.problem("kicked");
        a.problem("kicked");
        let mut b = Log::new();
        b.problem("kicked");
        b.problem("session closed: Expired");
        let mut r = E2eReport::new(serde_json::Value::Null);
        r.note_problems("online", &[a, b]);
        assert_eq!(
            r.problems,
            [
                "online: kicked (x3)",
                "online: session closed: Expired (x1)"
            ]
        );
    }
}
