//! `imbench group`: chat groups end to end, every component a real process
//! (presence, profile, two msgstore shards, two gateways; see
//! `group_cluster`), the users SDK connections (`client::sdk`, see
//! `group_members`).
//!
//! Setup: `--members` accounts (imported into the profile service with one
//! shared password hash), a large group of all of them and a small group of
//! the first `--members-small`, made and filled through the profile client
//! (invite, then accept). Member `i` logs in at gateway `i % 2`; members
//! `i % 4 < 2` are online during the send phases (so half of them, on both
//! gateways), the others only for the drain.
//!
//! Phases, all on the same cluster:
//! 1. small group, then large group: `--senders` online members send to the
//!    group, each keeping `--window` messages that are not yet shown at every
//!    online member (a closed loop: the rate is what the system delivers, the
//!    latency is not a queue the senders built). Measured: `GroupMessage`
//!    events per second at the online members, send -> shown at the last
//!    online member per message, and, from the processes' `/metrics` and the
//!    shard relays, shard appends, gateway forwards and gateway<->shard bytes
//!    per message;
//! 2. 1:1: the same number of senders, each to a friend online at the other
//!    gateway, `--direct-window` sends unanswered each: 1:1 messages shown
//!    per second;
//! 3. drain: the offline members log in (their events not read yet), then
//!    read until every one is `synced`.
//!
//! Then every member's log is checked: each message of its groups (and each
//! 1:1 message to it) shown exactly once, in seq order, with the seq its
//! sender was answered.

use crate::{
    e2e_report::Latency,
    group_cluster::Cluster,
    group_members::{
        self, close_all, log_in, sync_all, Account, LoginSettings, MemberLog, Online, SendLog,
        Shared, STAMP_BYTES,
    },
    group_report::{
        member_problems, Check, ClientFigures, CpuShare, DirectPhase, DrainPhase, GroupPhase,
        GroupReport, ServerFigures, Setup,
    },
};
use anyhow::{ensure, Context, Result};
use profile::{passwords::Hasher, ProfileClient};
use proto::profile::{ImportUser, IMPORT_FRIENDSHIPS_MAX, IMPORT_USERS_MAX};
use std::{
    collections::{BTreeMap, HashMap},
    net::SocketAddr,
    path::PathBuf,
    sync::{atomic::Ordering, Arc},
    time::{Duration, Instant},
};
use tokio::{
    sync::{watch, Semaphore},
    task::JoinSet,
};

const PASSWORD: &str = "group bench password";
const SHARDS: usize = 2;
const GATEWAYS: usize = 2;
/// Logins (password checks) in flight at once.
const LOGINS_IN_FLIGHT: usize = 32;
/// Membership calls to the profile service in flight at once.
const MEMBERSHIPS_IN_FLIGHT: usize = 64;
/// A phase stops waiting for its messages to be shown everywhere once
/// none was for this long.
const STALL: Duration = Duration::from_secs(15);
/// How long `synced` may take for each connection.
const SYNC_TIMEOUT: Duration = Duration::from_secs(60);
/// Load before the 1:1 phase's timed window starts.
const WARMUP: Duration = Duration::from_millis(500);
/// Events a drained member's connection buffers before they are read
/// (what it may fetch ahead while the others log in).
const DRAIN_EVENTS_MAX: usize = 64;

#[derive(clap::Args, Debug, Clone)]
pub struct GroupArgs {
    /// Short phases: the run takes under a minute.
    #[arg(long)]
    pub quick: bool,
    /// Also write the results as JSON to this file.
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// Members of the large group (every account of the run).
    #[arg(long, default_value_t = 500)]
    pub members: usize,
    /// Members of the small group (the first accounts).
    #[arg(long, default_value_t = 50)]
    pub members_small: usize,
    /// Online members sending to the group (and 1:1 senders).
    #[arg(long, default_value_t = 4)]
    pub senders: usize,
    /// Group messages per sender sent and not yet shown at every online
    /// member.
    #[arg(long, default_value_t = 16)]
    pub window: usize,
    /// Sends of the large group's phase [default: 30 s; quick: 8 s].
    #[arg(long)]
    pub duration_secs: Option<f64>,
    /// Sends of the small group's phase [default: 10 s; quick: 3 s].
    #[arg(long)]
    pub small_duration_secs: Option<f64>,
    /// Timed window of the 1:1 phase [default: 10 s; quick: 3 s].
    #[arg(long)]
    pub direct_secs: Option<f64>,
    /// 1:1 sends unanswered per sender (the SDK sends 32 at once).
    #[arg(long, default_value_t = 32)]
    pub direct_window: usize,
    /// Bytes of every message body (a stamp of 28 bytes, then padding).
    #[arg(long, default_value_t = 200)]
    pub body_bytes: usize,
}

struct Plan {
    members: usize,
    members_small: usize,
    senders: usize,
    window: usize,
    large: Duration,
    small: Duration,
    direct: Duration,
    direct_window: usize,
    body_bytes: usize,
}

impl Plan {
    fn new(a: &GroupArgs) -> Result<Plan> {
        let secs = |v: Option<f64>, full: f64, quick: f64| {
            Duration::from_secs_f64(v.unwrap_or(if a.quick { quick } else { full }))
        };
        ensure!(a.senders > 0, "need at least one sender");
        ensure!(
            a.members_small <= a.members,
            "--members-small must not exceed --members"
        );
        // Online: i % 4 < 2.
        let online_small = (0..a.members_small).filter(|i| i % 4 < 2).count();
        let online = (0..a.members).filter(|i| i % 4 < 2).count();
        ensure!(
            online_small >= a.senders,
            "the small group has {online_small} online members, fewer than {} senders",
            a.senders
        );
        ensure!(
            online >= 2 * a.senders,
            "need {} online members for the 1:1 pairs, have {online}",
            2 * a.senders
        );
        ensure!(a.window > 0 && a.direct_window > 0, "windows must be > 0");
        ensure!(
            (STAMP_BYTES..=proto::app::BODY_BYTES_MAX).contains(&a.body_bytes),
            "--body-bytes must be {STAMP_BYTES}..={}",
            proto::app::BODY_BYTES_MAX
        );
        Ok(Plan {
            members: a.members,
            members_small: a.members_small,
            senders: a.senders,
            window: a.window,
            large: secs(a.duration_secs, 30.0, 8.0),
            small: secs(a.small_duration_secs, 10.0, 3.0),
            direct: secs(a.direct_secs, 10.0, 3.0),
            direct_window: a.direct_window,
            body_bytes: a.body_bytes,
        })
    }

    fn config_json(&self, quick: bool) -> serde_json::Value {
        serde_json::json!({
            "quick": quick,
            "shards": SHARDS,
            "gateways": GATEWAYS,
            "members": self.members,
            "members_small": self.members_small,
            "online": "members i % 4 < 2 (half), at gateway i % 2",
            "senders": self.senders,
            "window": self.window,
            "large_send_secs": self.large.as_secs_f64(),
            "small_send_secs": self.small.as_secs_f64(),
            "direct_secs": self.direct.as_secs_f64(),
            "direct_window": self.direct_window,
            "body_bytes": self.body_bytes,
            "processes": "presence, profile, msgstore x2, gateway x2 (release binaries next to imbench)",
            "shard_bytes": "counted by a TCP relay in imbench in front of each shard (the cluster map names the relays)",
            "gateway_limits": "handshakes_per_ip_per_s, messages_per_user_per_s and messages_burst raised to 1,000,000 (--config)",
            "shard_limits": "engine.mailbox_messages_max 10,000,000 and mailbox_bytes_max 4 GiB (--config): offline members keep every group message in the group's mailbox",
            "clients": "client::sdk connections, one UDP socket each, in imbench",
        })
    }
}

pub async fn run(args: GroupArgs) -> Result<()> {
    let plan = Plan::new(&args)?;
    let mut report = GroupReport::new(plan.config_json(args.quick));
    let dir = tempfile::tempdir().context("a temporary directory")?;
    let mut cluster = Cluster::start(dir.path(), SHARDS, GATEWAYS).await?;
    let result = run_phases(&mut cluster, &plan, &mut report).await;
    if let Err(e) = result {
        report.problems.push(format!("{e:#}"));
    }
    if let Err(e) = cluster.check_running() {
        report.problems.push(format!("{e:#}"));
    }
    cluster.stop();
    report.finish(GATEWAYS, plan.body_bytes);
    print!("{}", crate::group_report::render(&report));
    if let Some(path) = &args.json {
        crate::report::write_json(path, "group", &report)?;
    }
    Ok(())
}

/// The groups of the run and who is in them.
struct Groups {
    small: u64,
    large: u64,
}

async fn run_phases(cluster: &mut Cluster, plan: &Plan, report: &mut GroupReport) -> Result<()> {
    let t = Instant::now();
    let accounts = create_accounts(&cluster.profile, plan.members).await?;
    let accounts_secs = t.elapsed().as_secs_f64();
    let t = Instant::now();
    let (groups, memberships) = make_groups(&cluster.profile, &accounts, plan).await?;
    let memberships_secs = t.elapsed().as_secs_f64();
    let gateways: Vec<SocketAddr> = cluster.gateways.iter().map(|g| g.udp).collect();
    let shared = Arc::new(Shared::default());
    let (open_tx, open_rx) = watch::channel(true);
    let online_accounts: Vec<Account> = accounts.iter().filter(|a| a.online).cloned().collect();
    let pairs = direct_pairs(&online_accounts, plan.senders);
    befriend(&cluster.profile, &pairs).await?;

    let t = Instant::now();
    let public = cluster.public;
    let how = |events_max| LoginSettings {
        gateways: &gateways,
        public,
        password: PASSWORD,
        events_max,
        parallel: LOGINS_IN_FLIGHT,
    };
    let (online, failed) =
        log_in(&online_accounts, &how(sdk_events_max()), &shared, &open_rx).await;
    drop(open_tx);
    report.setup = Some(Setup {
        accounts: accounts.len(),
        accounts_secs,
        memberships,
        memberships_secs,
        online_logins: online.len(),
        online_login_failures: failed.len(),
        online_login_secs: t.elapsed().as_secs_f64(),
    });
    for (a, why) in &failed {
        report
            .problems
            .push(format!("login of online member {} failed: {why}", a.index));
    }
    for (user, why) in sync_all(&online, SYNC_TIMEOUT).await {
        report
            .problems
            .push(format!("after login, user {user}: {why}"));
    }
    cluster.check_running()?;

    let mut sends: HashMap<u64, Vec<SendLog>> = HashMap::new();
    let small_online: Vec<&Online> = online
        .iter()
        .filter(|o| o.account.index < plan.members_small)
        .collect();
    let (phase, logs) = group_phase(
        cluster,
        plan,
        &shared,
        groups.small,
        plan.members_small,
        &small_online,
        plan.small,
    )
    .await?;
    report.group_small = Some(phase);
    sends.insert(groups.small, logs);
    cluster.check_running()?;
    let large_online: Vec<&Online> = online.iter().collect();
    let (phase, logs) = group_phase(
        cluster,
        plan,
        &shared,
        groups.large,
        plan.members,
        &large_online,
        plan.large,
    )
    .await?;
    report.group_large = Some(phase);
    sends.insert(groups.large, logs);
    cluster.check_running()?;

    let (direct, direct_sends) = direct_phase(cluster, plan, &shared, &online, &pairs).await?;
    report.direct = Some(direct);
    cluster.check_running()?;

    // The drain: the offline members log in, their events held back ...
    let offline_accounts: Vec<Account> = accounts.iter().filter(|a| !a.online).cloned().collect();
    let (gate_tx, gate_rx) = watch::channel(false);
    let t = Instant::now();
    let (drained, drain_failed) =
        log_in(&offline_accounts, &how(DRAIN_EVENTS_MAX), &shared, &gate_rx).await;
    let login_secs = t.elapsed().as_secs_f64();
    // ... then read until every one is synced.
    let shown_before = shared.group_shown.load(Ordering::Relaxed);
    let t = Instant::now();
    let _ = gate_tx.send(true);
    let not_synced = sync_all(&drained, SYNC_TIMEOUT).await;
    let secs = t.elapsed().as_secs_f64();
    let messages = shared.group_shown.load(Ordering::Relaxed) - shown_before;
    for (user, why) in &not_synced {
        report.problems.push(format!("drain, user {user}: {why}"));
    }
    for (a, why) in &drain_failed {
        report
            .problems
            .push(format!("login of offline member {} failed: {why}", a.index));
    }
    report.drain = Some(DrainPhase {
        members: offline_accounts.len(),
        login_failures: drain_failed.len(),
        login_secs,
        messages,
        secs,
        messages_per_sec: if secs > 0.0 {
            messages as f64 / secs
        } else {
            0.0
        },
        not_synced: not_synced.len(),
    });

    let online_logs = close_all(online).await;
    let drained_logs = close_all(drained).await;
    for (phase, logs) in [("online", &online_logs), ("drained", &drained_logs)] {
        let refs: Vec<&MemberLog> = logs.iter().map(|(_, l)| l).collect();
        for (what, n) in member_problems(&refs) {
            report
                .problems
                .push(format!("{phase} members: {what} (x{n})"));
        }
    }
    for (phase, logs) in [("group", sends.values().flatten().collect::<Vec<_>>())]
        .into_iter()
        .chain([("1:1", direct_sends.iter().collect::<Vec<_>>())])
    {
        for l in logs {
            for (what, n) in &l.failed {
                report
                    .problems
                    .push(format!("{phase} sender {}: {what} (x{n})", l.sender));
            }
        }
    }

    // Every member against what its senders were told.
    let expected: HashMap<u64, BTreeMap<u64, (u64, u64)>> = sends
        .iter()
        .map(|(&g, logs)| (g, expected_of(logs)))
        .collect();
    let in_group = |g: u64, a: &Account| g == groups.large || a.index < plan.members_small;
    let check_groups = |logs: &[(Account, MemberLog)], failed: &[(Account, String)], kind| {
        let mut c = Check::default();
        for (a, log) in logs {
            for (&g, exp) in &expected {
                if !in_group(g, a) {
                    continue;
                }
                let got = log.groups.get(&g).map(Vec::as_slice).unwrap_or_default();
                let who = format!(
                    "{kind} member {} (user {}, gateway {}) group {}",
                    a.index,
                    a.user,
                    a.gateway + 1,
                    name_of(&groups, g)
                );
                c.member(&who, exp, got, false);
            }
        }
        for (a, why) in failed {
            for (&g, exp) in &expected {
                if in_group(g, a) {
                    let who = format!("{kind} member {} group {}", a.index, name_of(&groups, g));
                    c.absent(&who, exp.len(), why);
                }
            }
        }
        c
    };
    report.check_group_online = Some(check_groups(&online_logs, &failed, "online"));
    report.check_group_drained = Some(check_groups(&drained_logs, &drain_failed, "drained"));
    let mut direct_check = Check::default();
    for (s, r) in &pairs {
        let Some(log) = direct_sends.iter().find(|l| l.sender == s.user) else {
            continue;
        };
        let exp: BTreeMap<u64, (u64, u64)> = log
            .sent
            .iter()
            .map(|&(c, seq)| (seq, (s.user, c)))
            .collect();
        let who = format!("1:1 receiver {} (from {})", r.index, s.index);
        match online_logs.iter().find(|(a, _)| a.user == r.user) {
            Some((_, l)) => direct_check.member(&who, &exp, &l.direct, true),
            None => direct_check.absent(&who, exp.len(), "not logged in"),
        }
    }
    report.check_direct = Some(direct_check);
    Ok(())
}

fn name_of(groups: &Groups, g: u64) -> &'static str {
    if g == groups.small {
        "small"
    } else {
        "large"
    }
}

/// seq -> (sender, counter) of every message answered `Sent`.
fn expected_of(logs: &[SendLog]) -> BTreeMap<u64, (u64, u64)> {
    logs.iter()
        .flat_map(|l| l.sent.iter().map(move |&(c, seq)| (seq, (l.sender, c))))
        .collect()
}

/// The SDK's own default room for events (online members read at once).
fn sdk_events_max() -> usize {
    client::sdk::SdkLimits::default().events_max
}

fn username(i: usize) -> String {
    format!("grp{i}")
}

/// `n` accounts sharing one password hash.
async fn create_accounts(profile: &ProfileClient, n: usize) -> Result<Vec<Account>> {
    let hasher = Hasher::for_service(&profile.info().await?)?;
    let phc = hasher.hash(PASSWORD.as_bytes())?;
    let mut accounts = Vec::with_capacity(n);
    for start in (0..n).step_by(IMPORT_USERS_MAX) {
        let end = (start + IMPORT_USERS_MAX).min(n);
        let batch = (start..end)
            .map(|i| ImportUser {
                username: username(i).into_bytes(),
                phc: phc.clone(),
            })
            .collect();
        let ids = profile.import_users(batch).await?;
        for (i, r) in (start..end).zip(ids) {
            let user = r.map_err(|e| anyhow::anyhow!("import a user: {}", e.message))?;
            accounts.push(Account {
                index: i,
                user,
                username: username(i),
                gateway: i % GATEWAYS,
                online: i % 4 < 2,
            });
        }
    }
    Ok(accounts)
}

/// Both groups, owned by member 0; everyone else invited and accepting.
/// The groups and the membership calls made.
async fn make_groups(
    profile: &ProfileClient,
    accounts: &[Account],
    plan: &Plan,
) -> Result<(Groups, usize)> {
    let owner = accounts[0].user;
    let small = profile
        .group_create(owner, "bench small", "imbench group")
        .await
        .context("create the small group")?
        .group;
    let large = profile
        .group_create(owner, "bench large", "imbench group")
        .await
        .context("create the large group")?
        .group;
    let permits = Arc::new(Semaphore::new(MEMBERSHIPS_IN_FLIGHT));
    let mut tasks = JoinSet::new();
    let mut calls = 0;
    for a in &accounts[1..] {
        let groups = if a.index < plan.members_small {
            vec![small, large]
        } else {
            vec![large]
        };
        for g in groups {
            calls += 2;
            let (p, permits, user) = (profile.clone(), permits.clone(), a.user);
            tasks.spawn(async move {
                let _permit = permits.acquire_owned().await.expect("never closed");
                p.group_invite(owner, g, user)
                    .await
                    .with_context(|| format!("invite user {user}"))?;
                p.group_answer_invite(user, g, true, 0)
                    .await
                    .with_context(|| format!("user {user} accepts"))?;
                Ok::<_, anyhow::Error>(())
            });
        }
    }
    while let Some(r) = tasks.join_next().await {
        r??;
    }
    let info = profile.get_group(large).await?;
    ensure!(
        info.members.len() == accounts.len(),
        "the large group has {} members, not {}",
        info.members.len(),
        accounts.len()
    );
    Ok((Groups { small, large }, calls))
}

/// Sender `i` (the first online members) and a receiver online at the
/// other gateway, never a sender.
fn direct_pairs(online: &[Account], senders: usize) -> Vec<(Account, Account)> {
    let mut free: Vec<&Account> = online[senders..].iter().collect();
    online[..senders]
        .iter()
        .map(|s| {
            let at = free
                .iter()
                .position(|r| r.gateway != s.gateway)
                .unwrap_or(0);
            (s.clone(), free.remove(at).clone())
        })
        .collect()
}

async fn befriend(profile: &ProfileClient, pairs: &[(Account, Account)]) -> Result<()> {
    let pairs: Vec<(u64, u64)> = pairs.iter().map(|(s, r)| (s.user, r.user)).collect();
    for chunk in pairs.chunks(IMPORT_FRIENDSHIPS_MAX) {
        profile
            .import_friendships("Friends", chunk.to_vec())
            .await
            .context("make the 1:1 pairs friends")?;
    }
    Ok(())
}

fn cpu_shares(
    before: &[(String, Option<Duration>)],
    after: &[(String, Option<Duration>)],
    secs: f64,
) -> Vec<CpuShare> {
    before
        .iter()
        .zip(after)
        .filter_map(|((name, b), (_, a))| {
            let used = a.zip(*b).map(|(a, b)| a.saturating_sub(b))?;
            Some(CpuShare {
                process: name.clone(),
                cores: used.as_secs_f64() / secs.max(1e-9),
            })
        })
        .collect()
}

fn client_figures(online: &[&Online]) -> ClientFigures {
    let mut c = ClientFigures::default();
    for o in online {
        let s = o.conn.stats().groups.inbox;
        c.shown += s.shown;
        c.fetches += s.fetches;
        c.held_dropped += s.held_dropped;
        c.duplicates += s.duplicates;
    }
    c
}

/// One group's send phase.
async fn group_phase(
    cluster: &Cluster,
    plan: &Plan,
    shared: &Arc<Shared>,
    group: u64,
    members: usize,
    online: &[&Online],
    duration: Duration,
) -> Result<(GroupPhase, Vec<SendLog>)> {
    let senders: Vec<&Online> = online.iter().take(plan.senders).copied().collect();
    let before = cluster.counters().await?;
    let clients_before = client_figures(online);
    let windows: HashMap<u64, Arc<Semaphore>> = senders
        .iter()
        .map(|s| (s.account.user, Arc::new(Semaphore::new(plan.window))))
        .collect();
    shared.tracker().start_phase(windows.clone());
    let cpu_before = cluster.cpu();
    let shown_before = shared.group_shown.load(Ordering::Relaxed);
    let go = Instant::now();
    let deadline = go + duration;
    let mut tasks = JoinSet::new();
    for s in &senders {
        tasks.spawn(group_members::group_sender(
            s.conn.clone(),
            group,
            online.len() as u32,
            windows[&s.account.user].clone(),
            deadline,
            plan.body_bytes,
            shared.clone(),
        ));
    }
    let mut logs = Vec::new();
    while let Some(r) = tasks.join_next().await {
        logs.push(r.context("a group sender")?);
    }
    // Wait until every message answered Sent is shown everywhere (or
    // nothing moves for STALL).
    let (end, shown) = loop {
        let (pending, last) = {
            let t = shared.tracker();
            (t.pending(), t.last_completion)
        };
        let now = Instant::now();
        if pending == 0 {
            break (
                last.unwrap_or(now),
                shared.group_shown.load(Ordering::Relaxed),
            );
        }
        let progress = last.unwrap_or(deadline).max(deadline);
        if now.saturating_duration_since(progress) > STALL {
            break (
                last.unwrap_or(now),
                shared.group_shown.load(Ordering::Relaxed),
            );
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    let cpu_after = cluster.cpu();
    let (incomplete, everywhere) = {
        let mut t = shared.tracker();
        let incomplete = t.incomplete();
        (incomplete, t.everywhere.take())
    };
    // Then every online member catches up (fetching what it was not
    // pushed) before the counters are read again.
    let not_synced = sync_all(online.iter().copied(), SYNC_TIMEOUT).await;
    let after = cluster.counters().await?;
    let server = after.since(&before);
    let clients = client_figures(online).since(&clients_before);
    let secs = end.saturating_duration_since(go).as_secs_f64().max(1e-9);
    let messages: u64 = logs.iter().map(|l| l.sent.len() as u64).sum();
    let deliveries = shown - shown_before;
    let per_message = |v: f64| (messages > 0).then(|| v / messages as f64);
    let bytes = (server.relay_up + server.relay_down) as f64;
    let mut phase = GroupPhase {
        members,
        online_members: online.len(),
        senders: senders.len(),
        window: plan.window,
        messages,
        send_failures: logs.iter().map(|l| l.failed.values().sum::<u64>()).sum(),
        deliveries,
        secs,
        deliveries_per_sec: deliveries as f64 / secs,
        messages_per_sec: messages as f64 / secs,
        everywhere: Latency::of(everywhere.iter()),
        answer: Latency::of(logs.iter().map(|l| &l.answer)),
        incomplete: incomplete.len(),
        appends_per_message: per_message(server.shard_appends),
        forwards_per_message: per_message(server.group_forwards),
        shard_bytes_per_message: per_message(bytes),
        shard_bytes_per_message_vs_body: per_message(bytes).map(|b| b / plan.body_bytes as f64),
        server: ServerFigures::from(server),
        cpu: cpu_shares(&cpu_before, &cpu_after, secs),
        clients,
        notes: Vec::new(),
    };
    if !incomplete.is_empty() {
        let some: Vec<String> = incomplete
            .iter()
            .take(10)
            .map(|(_, s, c, n)| format!("sender {s} #{c} ({n} members short)"))
            .collect();
        phase.notes.push(format!(
            "{} messages not shown at every online member within {STALL:?} of the last progress, e.g. {}",
            incomplete.len(),
            some.join(", ")
        ));
    }
    for (user, why) in not_synced {
        phase
            .notes
            .push(format!("after the phase, user {user}: {why}"));
    }
    Ok((phase, logs))
}

/// 1:1 at full speed: each pair's sender keeps `direct_window` sends
/// unanswered; the messages shown at the receivers are counted over a
/// timed window after a warm-up.
async fn direct_phase(
    cluster: &Cluster,
    plan: &Plan,
    shared: &Arc<Shared>,
    online: &[Online],
    pairs: &[(Account, Account)],
) -> Result<(DirectPhase, Vec<SendLog>)> {
    let deadline = Instant::now() + WARMUP + plan.direct;
    let mut tasks = JoinSet::new();
    for (s, r) in pairs {
        let conn = online
            .iter()
            .find(|o| o.account.user == s.user)
            .context("a 1:1 sender is not logged in")?
            .conn
            .clone();
        tasks.spawn(group_members::direct_sender(
            conn,
            r.user,
            plan.direct_window,
            deadline,
            plan.body_bytes,
        ));
    }
    tokio::time::sleep(WARMUP).await;
    let cpu_before = cluster.cpu();
    let (t0, n0) = (Instant::now(), shared.direct_shown.load(Ordering::Relaxed));
    tokio::time::sleep(plan.direct).await;
    let (t1, n1) = (Instant::now(), shared.direct_shown.load(Ordering::Relaxed));
    let cpu_after = cluster.cpu();
    let mut logs = Vec::new();
    while let Some(r) = tasks.join_next().await {
        logs.push(r.context("a 1:1 sender")?);
    }
    // Every receiver shows what is left before the check.
    let receivers = online
        .iter()
        .filter(|o| pairs.iter().any(|(_, r)| r.user == o.account.user));
    let notes = sync_all(receivers, SYNC_TIMEOUT)
        .await
        .into_iter()
        .map(|(user, why)| format!("after the phase, user {user}: {why}"))
        .collect();
    let secs = (t1 - t0).as_secs_f64();
    let deliveries = n1 - n0;
    Ok((
        DirectPhase {
            pairs: pairs.len(),
            window: plan.direct_window,
            deliveries,
            secs,
            deliveries_per_sec: deliveries as f64 / secs,
            messages: logs.iter().map(|l| l.sent.len() as u64).sum(),
            send_failures: logs.iter().map(|l| l.failed.values().sum::<u64>()).sum(),
            answer: Latency::of(logs.iter().map(|l| &l.answer)),
            cpu: cpu_shares(&cpu_before, &cpu_after, secs),
            notes,
        },
        logs,
    ))
}
