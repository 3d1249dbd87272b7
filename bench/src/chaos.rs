//! `imbench chaos`: a whole cluster of separate processes (2 presence
//! replicas, 3 profile replicas, 2 msgstore shard groups of 3 replicas, 2
//! gateways) under SDK clients that log in and out, send 1:1 and group
//! messages and drain, while a fault injector kills (SIGKILL, restart
//! after ~1 s on the same address and data directory), pauses (SIGSTOP
//! for 2-4 s, then SIGCONT) or, as root, cuts off (every process in a
//! network namespace of its own; the target's link down for 2-4 s, then
//! up) one process at a time, chosen by a seeded random schedule. At the end every client drains and a checker
//! compares everything acknowledged with everything shown
//! (`chaos/check.rs`); one more client logs in and out in a loop to time
//! how long logins keep failing after a fault.
//!
//! The fault rules: one process at a time (a fault ends, restarted or
//! continued, before the next starts, at most one every
//! [`FAULT_INTERVAL`]); and a presence replica or a replica of a shard
//! group is not faulted within [`SIBLING_RECOVERY`] of the end of a
//! fault of its sibling (the other presence replica, or another replica
//! of its group): one machine dying is the promise, so the one before
//! must have had time to come back (a restarted presence replica is
//! refilled by the gateways within 5 s, a replica catches up).
//! Where network namespaces cannot be made (not root), partitions are
//! not injected and the report says so.

mod check;
mod cluster;
mod users;

use crate::report::write_json;
use anyhow::{bail, Context, Result};
use clap::Args;
use cluster::{Cluster, Fault, FaultKind, Role};
use rand::{rngs::StdRng, Rng, SeedableRng};
use serde::Serialize;
use std::{
    collections::BTreeMap,
    path::PathBuf,
    sync::{atomic::Ordering, Arc},
    time::{Duration, Instant},
};
use tokio::task::JoinSet;
use users::{lock, Session, SharedLog, World};

/// A new fault starts at most this often.
const FAULT_INTERVAL: Duration = Duration::from_secs(2);
/// A killed process is restarted this long after the kill.
const KILL_DOWN: Duration = Duration::from_secs(1);
/// A paused process is continued, and a cut-off one healed, after 2 to
/// 4 s.
const PAUSE_MS: std::ops::RangeInclusive<u64> = 2_000..=4_000;
/// A process is not faulted within this long of the end of a fault of
/// its sibling (see the module's doc).
const SIBLING_RECOVERY: Duration = Duration::from_secs(5);
/// Faults in a run at least.
const FAULTS_MIN: usize = 8;
/// After the last fault, traffic goes on this long before the drain.
const SETTLE: Duration = Duration::from_secs(2);
/// How long each drain step may take for each user.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(60);
/// Before the faults, every user must have logged in within this long.
const WARMUP_LIMIT: Duration = Duration::from_secs(30);

const NO_PARTITIONS: &str = "network partitions are not injected (network namespaces cannot \
    be made here: not root, or no `ip netns`): only SIGKILL + restart and SIGSTOP + SIGCONT";
/// Names the run's namespaces and interfaces (`daemon::netns`).
const NET_TAG: &str = "ch";

#[derive(Args, Debug)]
pub struct ChaosArgs {
    /// About 30 s of faults (at least 8) with 12 users and 2 groups:
    /// under a minute in all.
    #[arg(long)]
    pub quick: bool,
    /// Also write the results as JSON to this file.
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// Seconds of faults [default: 120; quick: 30].
    #[arg(long)]
    pub secs: Option<u64>,
    /// Seed of the fault schedule and of the users' choices [default:
    /// random; printed, pass it again to replay the schedule].
    #[arg(long)]
    pub seed: Option<u64>,
    /// Users [default: 24; quick: 12].
    #[arg(long)]
    pub users: Option<usize>,
    /// Chat groups, each of about two thirds of the users [default: 3;
    /// quick: 2].
    #[arg(long)]
    pub groups: Option<usize>,
    /// Never fault processes of this role (repeatable): `--spare profile`
    /// while the profile service has no replicas (one process is the only
    /// copy, so faulting it tests a promise the system does not make yet).
    #[arg(long, value_enum)]
    pub spare: Vec<cluster::Role>,
    /// Keep the processes' logs (`*.log`) and data after a clean run too
    /// (a failed run always keeps them); the path is printed.
    #[arg(long)]
    pub keep: bool,
}

#[derive(Debug, Serialize)]
struct Ratios {
    acked_lost: u64,
    duplicated: u64,
    out_of_order: u64,
    faults: u64,
    login_gap_ms_max: f64,
}

#[derive(Debug, Serialize)]
struct FaultSummary {
    by_kind: BTreeMap<&'static str, u64>,
    /// target -> kind -> count.
    by_target: BTreeMap<String, BTreeMap<&'static str, u64>>,
    by_role: BTreeMap<String, u64>,
    timeline: Vec<Fault>,
}

#[derive(Debug, Serialize)]
struct Logins {
    /// Logins of the users (first logins; the SDK's reconnects apart).
    user_logins: u64,
    user_login_failures: BTreeMap<String, u64>,
    /// Reconnects the users' SDK made by itself.
    user_reconnects: u64,
    /// Logins and reconnects by gateway address.
    by_gateway: BTreeMap<String, u64>,
    probe_attempts: u64,
    probe_failures: u64,
    /// The slowest accepted prober login.
    probe_login_ms_max: f64,
    /// Failure streaks of the prober, each with the fault it followed.
    streaks: Vec<StreakReport>,
}

#[derive(Debug, Serialize)]
struct StreakReport {
    #[serde(flatten)]
    streak: users::Streak,
    /// The last fault that started before the streak (its `n`).
    after_fault: Option<usize>,
}

#[derive(Debug, Serialize)]
struct DuplicateReport {
    #[serde(flatten)]
    run: check::DupRun,
    username: String,
    first_connection: Option<users::ConnRecord>,
    again_connection: Option<users::ConnRecord>,
    /// The last fault started before the first connection began ending.
    fault_at_first_end: Option<usize>,
}

#[derive(Debug, Serialize)]
struct DroppedReport {
    user: u64,
    username: String,
    #[serde(flatten)]
    event: users::Dropped,
}

#[derive(Debug, Serialize)]
struct Durations {
    setup: f64,
    faults: f64,
    drain: f64,
    total: f64,
}

#[derive(Debug, Serialize)]
struct Report {
    ratios: Ratios,
    seed: u64,
    faults: FaultSummary,
    messages: check::Verdict,
    /// Each run of duplicates with the connection that showed them first
    /// (how and when it ended) and the fault at that moment.
    duplicates: Vec<DuplicateReport>,
    /// Every `GroupDropped` a member was told (none is expected: nothing
    /// is old enough to be trimmed in a run), with the seqs around it.
    group_dropped: Vec<DroppedReport>,
    logins: Logins,
    /// Other client events (sessions lost, kicks), summed over users.
    client_events: BTreeMap<String, u64>,
    duration_secs: Durations,
    notes: Vec<&'static str>,
    problems: Vec<String>,
    config: serde_json::Value,
}

pub async fn run(args: ChaosArgs) -> Result<()> {
    let secs = args.secs.unwrap_or(if args.quick { 30 } else { 120 });
    let users_n = args.users.unwrap_or(if args.quick { 12 } else { 24 });
    let groups_n = args.groups.unwrap_or(if args.quick { 2 } else { 3 });
    anyhow::ensure!(users_n >= 3, "--users must be at least 3");
    let seed = args.seed.unwrap_or_else(rand::random);
    println!(
        "chaos: seed {seed}; {secs} s of faults; {users_n} users, {groups_n} groups, 1 prober"
    );
    let t0 = Instant::now();
    let net = match daemon::netns::Net::setup(NET_TAG, cluster::PROCESSES) {
        Ok(net) => {
            println!(
                "every process in a network namespace of its own on 10.77.{}.0/24: \
                 partitions are injected",
                net.subnet()
            );
            Some(net)
        }
        Err(why) => {
            println!("note: {NO_PARTITIONS} ({why})");
            None
        }
    };
    let notes = if net.is_some() {
        vec![]
    } else {
        vec![NO_PARTITIONS]
    };
    let dir = tempfile::tempdir().context("a temporary directory")?;
    let mut cluster = Cluster::start(dir.path(), net).await?;
    let partitions = cluster.can_partition();
    println!(
        "cluster up in {:.1} s: presence {}, profile {}, shard groups {}, gateways {}",
        t0.elapsed().as_secs_f64(),
        cluster.map.presence,
        cluster.profile_addrs,
        cluster
            .map
            .shards
            .iter()
            .map(|s| format!("{}=[{}]", s.id, s.replicas.join(" ")))
            .collect::<Vec<_>>()
            .join(" "),
        cluster
            .gateway_addrs
            .iter()
            .map(|a| a.to_string())
            .collect::<Vec<_>>()
            .join(" "),
    );
    let profile = profile::ProfileClient::connect(cluster.profile_addrs.clone())
        .await
        .context("connect to the profile service")?;
    let pop = users::populate(&profile, users_n, groups_n).await?;
    drop(profile);
    let setup_secs = t0.elapsed().as_secs_f64();

    let world = Arc::new(World {
        gateways: cluster
            .gateway_addrs
            .iter()
            .map(|a| a.to_string())
            .collect::<Vec<_>>()
            .join(","),
        public: cluster.public,
        start: Instant::now(),
        faults_over: Default::default(),
        stopping: Default::default(),
    });
    let logs: Vec<SharedLog> = pop.accounts.iter().map(|_| Default::default()).collect();
    let mut loops = JoinSet::new();
    for (a, log) in pop.accounts.iter().zip(&logs) {
        let user_seed = seed ^ (0x9e37_79b9_7f4a_7c15u64.wrapping_mul(a.index as u64 + 1));
        let (w, a, l) = (world.clone(), a.clone(), log.clone());
        loops.spawn(async move { (a.index, users::user_loop(w, a, l, user_seed).await) });
    }
    // Everyone logged in once before the first fault.
    let warm = Instant::now();
    while logs.iter().any(|l| lock(l).logins == 0) {
        if warm.elapsed() > WARMUP_LIMIT {
            bail!("not every user logged in within {WARMUP_LIMIT:?} (before any fault)");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let prober = tokio::spawn(users::prober(world.clone(), pop.prober.clone()));

    let faults_start = Instant::now();
    let faults = inject_faults(&mut cluster, &args.spare, secs, seed, faults_start, &world).await;
    let faults_secs = faults_start.elapsed().as_secs_f64();
    world.faults_over.store(true, Ordering::Relaxed);
    let faults = faults?;
    tokio::time::sleep(SETTLE).await;
    let attempts = prober.await.context("the prober")?;
    let probe_end_ms = world.start.elapsed().as_secs_f64() * 1e3;

    // The drain: users stop sending, wait for their answers and stay
    // (or get) logged in; each waits until synced; then each logs in
    // afresh and waits until synced again.
    let drain_start = Instant::now();
    let mut problems = Vec::new();
    world.stopping.store(true, Ordering::Relaxed);
    cluster.wait_for_leaders(Duration::from_secs(30)).await;
    let mut sessions: BTreeMap<usize, Option<Session>> = BTreeMap::new();
    while let Some(r) = loops.join_next().await {
        let (i, s) = r.context("a user task")?;
        if s.is_none() {
            problems.push(format!("user {i}: no login for the drain"));
        }
        sessions.insert(i, s);
    }
    let mut syncs = JoinSet::new();
    for (&i, s) in &mut sessions {
        if let Some(s) = s.take() {
            syncs.spawn(async move {
                let r = users::sync(&s, DRAIN_TIMEOUT).await;
                (i, s, r)
            });
        }
    }
    while let Some(r) = syncs.join_next().await {
        let (i, s, r) = r.context("a sync task")?;
        if let Err(e) = r {
            problems.push(format!("user {i}, drain: {e}"));
        }
        sessions.insert(i, Some(s));
    }
    let mut relogins = JoinSet::new();
    for (i, s) in sessions {
        let (w, a, l) = (world.clone(), pop.accounts[i].clone(), logs[i].clone());
        relogins
            .spawn(async move { (i, users::relogin_and_sync(w, a, l, s, DRAIN_TIMEOUT).await) });
    }
    while let Some(r) = relogins.join_next().await {
        let (i, r) = r.context("a relogin task")?;
        if let Err(e) = r {
            problems.push(format!("user {i}, fresh login at the end: {e}"));
        }
    }
    let drain_secs = drain_start.elapsed().as_secs_f64();
    problems.extend(cluster.check_running());
    cluster.stop();

    // The check.
    let mut sent = Vec::new();
    let mut shown = BTreeMap::new();
    let mut client_events: BTreeMap<String, u64> = BTreeMap::new();
    let mut user_login_failures: BTreeMap<String, u64> = BTreeMap::new();
    let (mut user_logins, mut user_reconnects) = (0, 0);
    let mut group_dropped = Vec::new();
    for (a, log) in pop.accounts.iter().zip(&logs) {
        let mut l = lock(log);
        users::finish_dropped(&mut l);
        group_dropped.extend(l.dropped.iter().map(|d| DroppedReport {
            user: a.user,
            username: a.username.clone(),
            event: d.clone(),
        }));
        sent.append(&mut l.sent);
        shown.insert(a.user, std::mem::take(&mut l.shown));
        for (k, n) in &l.events {
            *client_events.entry(k.clone()).or_default() += n;
        }
        for (k, n) in &l.login_failures {
            *user_login_failures.entry(k.clone()).or_default() += n;
        }
        user_logins += l.logins;
        user_reconnects += l.reconnects;
    }
    let verdict = check::check(&sent, &shown, &users::members(&pop));
    let streaks = users::streaks(&attempts, probe_end_ms);
    let streaks: Vec<StreakReport> = streaks
        .into_iter()
        .map(|s| StreakReport {
            after_fault: last_fault_before(&faults, s.first_failure_end_ms),
            streak: s,
        })
        .collect();
    let duplicates = explain_duplicates(&verdict, &pop, &logs, &faults);
    let report = Report {
        ratios: Ratios {
            acked_lost: verdict.acked_lost,
            duplicated: verdict.duplicated,
            out_of_order: verdict.out_of_order,
            faults: faults.len() as u64,
            login_gap_ms_max: streaks.iter().map(|s| s.streak.ms).fold(0.0, f64::max),
        },
        seed,
        faults: summarize(&faults),
        logins: Logins {
            user_logins,
            user_login_failures,
            user_reconnects,
            by_gateway: users::logins_by_gateway(&logs),
            probe_attempts: attempts.len() as u64,
            probe_failures: attempts.iter().filter(|a| !a.ok).count() as u64,
            probe_login_ms_max: attempts
                .iter()
                .filter(|a| a.ok)
                .map(|a| a.ms)
                .fold(0.0, f64::max),
            streaks,
        },
        messages: verdict,
        duplicates,
        group_dropped,
        client_events,
        duration_secs: Durations {
            setup: setup_secs,
            faults: faults_secs,
            drain: drain_secs,
            total: t0.elapsed().as_secs_f64(),
        },
        notes,
        problems,
        config: serde_json::json!({
            "quick": args.quick,
            "spared_roles": &args.spare,
            "fault_secs": secs,
            "users": users_n,
            "users_always_online": pop.accounts.iter().filter(|a| a.stays).count(),
            "groups": pop.groups.iter().map(|(g, m)| serde_json::json!({"id": g, "members": m.len()})).collect::<Vec<_>>(),
            "friends": "each user and the next two (a ring)",
            "presence_replicas": cluster::PRESENCE_REPLICAS,
            "profile_replicas": cluster::PROFILE_REPLICAS,
            "partitions": partitions,
            "shard_groups": cluster::GROUPS,
            "replicas_per_group": cluster::REPLICAS,
            "gateways": cluster::GATEWAYS,
            "fault_interval_ms": FAULT_INTERVAL.as_millis() as u64,
            "kill_down_ms": KILL_DOWN.as_millis() as u64,
            "pause_ms": [*PAUSE_MS.start(), *PAUSE_MS.end()],
            "sibling_recovery_ms": SIBLING_RECOVERY.as_millis() as u64,
            "faults_min": FAULTS_MIN,
            "settle_ms": SETTLE.as_millis() as u64,
            "send_window": 4,
            "body_bytes": users::BODY_BYTES,
            "prober_attempt_timeout_ms": users::LOGIN_ATTEMPT_TIMEOUT.as_millis() as u64,
            "clients": "client::sdk connections to both gateways' addresses, in imbench",
            "processes": "release binaries next to imbench, each its own process",
        }),
    };
    print(&report);
    if let Some(path) = &args.json {
        write_json(path, "chaos", &report)?;
    }
    let v = &report.messages;
    if args.keep && v.clean() {
        println!("logs and data kept in {}", dir.keep().display());
        return Ok(());
    }
    if !v.clean() {
        // The processes' logs (`*.log`, `group*/r*.log`) and data, kept.
        let kept = dir.keep();
        bail!(
            "chaos: {} acknowledged messages lost, {} duplicated, {} out of order, {} misdelivered \
             (seed {seed}; logs and data kept in {})",
            v.acked_lost,
            v.duplicated,
            v.out_of_order,
            v.misdelivered,
            kept.display()
        );
    }
    Ok(())
}

/// One planned fault.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Planned {
    target: usize,
    kind: FaultKind,
    down: Duration,
}

impl Planned {
    /// How long the fault is taken to last when planning.
    fn lasts(&self) -> Duration {
        match self.kind {
            FaultKind::Kill => KILL_NOMINAL,
            FaultKind::Pause | FaultKind::Partition => self.down,
        }
    }
}

/// The fault schedule of a seed: targets, kinds and durations drawn from
/// the seed alone, the sibling rule applied on a nominal clock (a kill
/// lasts [`KILL_NOMINAL`], a pause its length, faults start every
/// [`FAULT_INTERVAL`] or when the previous one ends), so a seed always
/// gives the same sequence whatever the timing of the run; the injector
/// then waits, if need be, until the rule also holds on the real clock.
struct Schedule {
    rng: StdRng,
    /// Redundancy set of each target.
    sets: Vec<Option<usize>>,
    /// Nominal time of the next fault.
    now: Duration,
    /// Each set's last fault: (target, nominal end).
    set_ended: BTreeMap<usize, (usize, Duration)>,
    /// Targets never faulted (`--spare`).
    spared: Vec<bool>,
    /// The kinds of fault drawn from, equally likely.
    kinds: Vec<FaultKind>,
}

/// What a kill (1 s down, then a restart) is taken to last when planning.
const KILL_NOMINAL: Duration = Duration::from_millis(1_500);

impl Schedule {
    fn new(seed: u64, sets: Vec<Option<usize>>) -> Schedule {
        Schedule {
            rng: StdRng::seed_from_u64(seed),
            sets,
            now: Duration::ZERO,
            set_ended: BTreeMap::new(),
            spared: Vec::new(),
            kinds: vec![FaultKind::Kill, FaultKind::Pause],
        }
    }

    /// Cut processes off too (where every process has a namespace).
    fn with_partitions(mut self, partitions: bool) -> Schedule {
        if partitions {
            self.kinds.push(FaultKind::Partition);
        }
        self
    }

    /// Leave the targets marked `true` alone.
    fn sparing(mut self, spared: Vec<bool>) -> Schedule {
        self.spared = spared;
        self
    }

    fn next(&mut self) -> Planned {
        let now = self.now;
        let eligible: Vec<usize> = (0..self.sets.len())
            .filter(|&t| !self.spared.get(t).copied().unwrap_or(false))
            .filter(
                |&t| match self.sets[t].and_then(|s| self.set_ended.get(&s)) {
                    Some(&(last, ended)) => last == t || now >= ended + SIBLING_RECOVERY,
                    None => true,
                },
            )
            .collect();
        let target = eligible[self.rng.gen_range(0..eligible.len())];
        let kind = self.kinds[self.rng.gen_range(0..self.kinds.len())];
        let down = match kind {
            FaultKind::Kill => KILL_DOWN,
            FaultKind::Pause | FaultKind::Partition => {
                Duration::from_millis(self.rng.gen_range(PAUSE_MS))
            }
        };
        let planned = Planned { target, kind, down };
        let lasts = planned.lasts();
        if let Some(set) = self.sets[target] {
            self.set_ended.insert(set, (target, now + lasts));
        }
        self.now = now + lasts.max(FAULT_INTERVAL);
        planned
    }
}

/// Fault one process after another, as the seed's [`Schedule`] says,
/// until `secs` have passed and at least [`FAULTS_MIN`] were done; the
/// faults, in order.
async fn inject_faults(
    cluster: &mut Cluster,
    spare: &[cluster::Role],
    secs: u64,
    seed: u64,
    start: Instant,
    world: &World,
) -> Result<Vec<Fault>> {
    let sets = cluster.targets.iter().map(|t| t.set).collect();
    let spared = cluster
        .targets
        .iter()
        .map(|t| spare.contains(&t.role))
        .collect();
    let mut schedule = Schedule::new(seed, sets)
        .sparing(spared)
        .with_partitions(cluster.can_partition());
    let mut faults: Vec<Fault> = Vec::new();
    // When each redundancy set's last fault really ended.
    let mut set_ended: BTreeMap<usize, (usize, Instant)> = BTreeMap::new();
    let mut next = start;
    let run = Duration::from_secs(secs);
    loop {
        tokio::time::sleep_until(next.into()).await;
        if start.elapsed() >= run && faults.len() >= FAULTS_MIN {
            return Ok(faults);
        }
        let Planned {
            target: t,
            kind,
            down,
        } = schedule.next();
        if let Some(&(last, ended)) = cluster.targets[t].set.and_then(|s| set_ended.get(&s)) {
            if last != t {
                tokio::time::sleep_until((ended + SIBLING_RECOVERY).into()).await;
            }
        }
        let n = faults.len() + 1;
        let at = Instant::now();
        let fault = cluster::inject(cluster, t, kind, down, n, world.start).await?;
        println!(
            "fault {n:>3} at {:>6.1} s: {:<5} {:<10} {:>6.0} ms",
            fault.at_s,
            kind.name(),
            fault.target,
            fault.down_ms,
        );
        if let Some(set) = cluster.targets[t].set {
            set_ended.insert(set, (t, Instant::now()));
        }
        faults.push(fault);
        next = (at + FAULT_INTERVAL).max(Instant::now());
    }
}

/// The last fault that started at or before `ms` (the run's clock).
fn last_fault_before(faults: &[Fault], ms: f64) -> Option<usize> {
    faults
        .iter()
        .rev()
        .find(|f| f.at_s * 1e3 <= ms)
        .map(|f| f.n)
}

/// Each run of duplicates with the connections involved.
fn explain_duplicates(
    v: &check::Verdict,
    pop: &users::Population,
    logs: &[SharedLog],
    faults: &[Fault],
) -> Vec<DuplicateReport> {
    v.duplicate_runs
        .iter()
        .map(|run| {
            let i = pop.accounts.iter().position(|a| a.user == run.user);
            let conn = |no: u32| {
                i.and_then(|i| {
                    lock(&logs[i])
                        .connections
                        .iter()
                        .find(|c| c.no == no)
                        .cloned()
                })
            };
            let first_connection = conn(run.first_conn);
            let fault_at_first_end = first_connection
                .as_ref()
                .and_then(|c| c.ending_ms)
                .and_then(|ms| last_fault_before(faults, ms));
            DuplicateReport {
                run: run.clone(),
                username: i.map_or_else(String::new, |i| pop.accounts[i].username.clone()),
                first_connection,
                again_connection: conn(run.again_conn),
                fault_at_first_end,
            }
        })
        .collect()
}

fn summarize(faults: &[Fault]) -> FaultSummary {
    let mut by_kind: BTreeMap<&'static str, u64> = BTreeMap::new();
    let mut by_target: BTreeMap<String, BTreeMap<&'static str, u64>> = BTreeMap::new();
    let mut by_role: BTreeMap<String, u64> = BTreeMap::new();
    for f in faults {
        *by_kind.entry(f.kind.name()).or_default() += 1;
        *by_target
            .entry(f.target.clone())
            .or_default()
            .entry(f.kind.name())
            .or_default() += 1;
        let role = match f.role {
            Role::Presence => "presence",
            Role::Profile => "profile",
            Role::Replica => "replica",
            Role::Gateway => "gateway",
        };
        *by_role.entry(role.to_string()).or_default() += 1;
    }
    FaultSummary {
        by_kind,
        by_target,
        by_role,
        timeline: faults.to_vec(),
    }
}

fn print(r: &Report) {
    let m = &r.messages;
    let f = &r.faults;
    println!(
        "\nfaults: {} in {:.1} s ({}); by role: {}",
        r.ratios.faults,
        r.duration_secs.faults,
        f.by_kind
            .iter()
            .map(|(k, n)| format!("{k} {n}"))
            .collect::<Vec<_>>()
            .join(", "),
        f.by_role
            .iter()
            .map(|(k, n)| format!("{k} {n}"))
            .collect::<Vec<_>>()
            .join(", "),
    );
    println!(
        "messages: {} sent, {} acknowledged ({} 1:1, {} group), {} failed{}",
        m.sent,
        m.acked,
        m.acked_direct,
        m.acked_group,
        m.failed.values().sum::<u64>(),
        if m.failed.is_empty() {
            String::new()
        } else {
            format!(" {:?}", m.failed)
        }
    );
    println!(
        "shown: {} deliveries expected, {} shown ({} unique); shown though unanswered {}, \
         stored twice {}, first shown at the final fresh login {}",
        m.expected_deliveries,
        m.shown,
        m.shown_unique,
        m.shown_unacked,
        m.seq_differs,
        m.shown_only_after_relogin
    );
    let l = &r.logins;
    println!(
        "logins: users {} ({} failed), SDK reconnects {}, by gateway {:?}; prober {} attempts, \
         {} failed, slowest accepted {:.0} ms",
        l.user_logins,
        l.user_login_failures.values().sum::<u64>(),
        l.user_reconnects,
        l.by_gateway,
        l.probe_attempts,
        l.probe_failures,
        l.probe_login_ms_max
    );
    for s in &l.streaks {
        println!(
            "  logins failed for {:.0} ms ({} attempts{}) from {:.1} s, fault {}: {}",
            s.streak.ms,
            s.streak.failures,
            if s.streak.ongoing {
                ", still failing"
            } else {
                ""
            },
            s.streak.start_ms / 1e3,
            s.after_fault
                .and_then(|n| r.faults.timeline.get(n - 1))
                .map(Fault::describe)
                .unwrap_or_else(|| "none".into()),
            s.streak.first_error
        );
    }
    if !r.client_events.is_empty() {
        println!("client events: {:?}", r.client_events);
    }
    for e in m.examples.iter().filter(|e| !e.starts_with("duplicated")) {
        println!("  {e}");
    }
    for d in &r.duplicates {
        let fault = d
            .fault_at_first_end
            .and_then(|n| r.faults.timeline.get(n - 1))
            .map(Fault::describe)
            .unwrap_or_else(|| "none".into());
        let first = d.first_connection.as_ref();
        println!(
            "  duplicated: {} ({}) shown {} {} message(s) (seq {}..={}, {}) first on connection {} \
             at {:.1} s, again on connection {} at {:.1} s; connection {} opened {:.1} s, {} at \
             {:.1} s (returned {:.1} s); last fault before: {fault}",
            d.username,
            d.run.user,
            d.run.count,
            d.run.conv,
            d.run.seq_min,
            d.run.seq_max,
            if d.run.same_seq { "same seqs" } else { "stored twice" },
            d.run.first_conn,
            d.run.first_shown_ms / 1e3,
            d.run.again_conn,
            d.run.again_shown_ms / 1e3,
            d.run.first_conn,
            first.map_or(0.0, |c| c.opened_ms / 1e3),
            first.and_then(|c| c.how.clone()).unwrap_or_else(|| "still open".into()),
            first.and_then(|c| c.ending_ms).unwrap_or(0.0) / 1e3,
            first.and_then(|c| c.ended_ms).unwrap_or(0.0) / 1e3,
        );
    }
    for d in &r.group_dropped {
        let e = &d.event;
        println!(
            "  GroupDropped: {} ({}) told {} seq(s) of group {} gone at {:.1} s on connection {} \
             (it had shown up to seq {:?}; next shown {:?}): nothing is old enough to be trimmed",
            d.username,
            d.user,
            e.count,
            e.group,
            e.at_ms / 1e3,
            e.conn,
            e.shown_before,
            e.next_shown
        );
    }
    for p in &r.problems {
        println!("problem: {p}");
    }
    println!(
        "duration: setup {:.1} s, faults {:.1} s, drain {:.1} s, total {:.1} s",
        r.duration_secs.setup, r.duration_secs.faults, r.duration_secs.drain, r.duration_secs.total
    );
    println!("ratios:");
    println!("  acked_lost        {} (must be 0)", r.ratios.acked_lost);
    println!("  duplicated        {} (must be 0)", r.ratios.duplicated);
    println!("  out_of_order      {} (must be 0)", r.ratios.out_of_order);
    println!("  faults            {}", r.ratios.faults);
    println!("  login_gap_ms_max  {:.0}", r.ratios.login_gap_ms_max);
    if m.misdelivered > 0 {
        println!("  (misdelivered     {} (must be 0))", m.misdelivered);
    }
    println!(
        "seed {} (--seed {} replays the fault schedule)",
        r.seed, r.seed
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sets() -> Vec<Option<usize>> {
        // presence x2, profile, two groups of three, two gateways.
        let mut v = vec![Some(0), Some(0), None];
        v.extend([Some(1); 3]);
        v.extend([Some(2); 3]);
        v.extend([None, None]);
        v
    }

    #[test]
    fn a_seed_gives_one_schedule_that_keeps_siblings_apart() {
        let plan = |seed| {
            let mut s = Schedule::new(seed, sets()).with_partitions(true);
            (0..200)
                .map(|_| (s.now, s.next()))
                .collect::<Vec<(Duration, Planned)>>()
        };
        assert_eq!(plan(7), plan(7));
        assert_ne!(plan(7), plan(8));
        let p = plan(7);
        let (mut kills, mut pauses, mut cuts) = (0, 0, 0);
        for (i, (at, f)) in p.iter().enumerate() {
            match f.kind {
                FaultKind::Kill => kills += 1,
                FaultKind::Pause => pauses += 1,
                FaultKind::Partition => cuts += 1,
            }
            if f.kind != FaultKind::Kill {
                assert!(PAUSE_MS.contains(&(f.down.as_millis() as u64)));
            }
            // A sibling's fault ended at least SIBLING_RECOVERY before.
            let set = sets()[f.target];
            for (bat, b) in &p[..i] {
                if set.is_some() && sets()[b.target] == set && b.target != f.target {
                    assert!(
                        *bat + b.lasts() + SIBLING_RECOVERY <= *at,
                        "fault {i}: {p:?}"
                    );
                }
            }
        }
        assert!(
            kills > 40 && pauses > 40 && cuts > 40,
            "{kills} kills, {pauses} pauses, {cuts} partitions"
        );
        let mut without = Schedule::new(7, sets());
        let kinds: Vec<FaultKind> = (0..200).map(|_| without.next().kind).collect();
        assert!(
            !kinds.contains(&FaultKind::Partition),
            "partitions where none can be made"
        );
    }
}
