//! `imbench chaos`'s users: SDK connections (`client::sdk`, both gateways'
//! addresses, so the SDK picks one and fails over) that log in and out,
//! send 1:1 messages to friends and messages to their groups, and log
//! every message they are shown; and the prober, one more account that
//! logs in and out in a loop to time how long logins keep failing.
//!
//! Every body starts with a [`Stamp`] (sender, counter): the counter
//! grows with every message a user sends, whatever the conversation, so a
//! conversation's messages carry growing counters in the order sent.

use crate::group_members::Stamp;
use anyhow::{Context, Result};
use client::sdk::{self, Connection, Credentials, ImEvent, SdkConfig, SdkError, ShownMarks};
use profile::{passwords::Hasher, ProfileClient};
use proto::{
    app::SendOutcome,
    profile::{ImportUser, IMPORT_FRIENDSHIPS_MAX, IMPORT_USERS_MAX},
};
use rand::{rngs::StdRng, Rng, SeedableRng};
use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    future::Future,
    pin::Pin,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Mutex, MutexGuard,
    },
    time::{Duration, Instant},
};
use tokio::{
    sync::mpsc,
    task::{JoinHandle, JoinSet},
};

pub const PASSWORD: &str = "chaos bench password";
/// Sends a user has waiting for their answer at most.
const WINDOW: usize = 4;
/// Bytes of every body (a 28-byte stamp, then padding).
pub const BODY_BYTES: usize = 64;
/// A prober login not accepted within this long counts as failed.
pub const LOGIN_ATTEMPT_TIMEOUT: Duration = Duration::from_secs(3);
/// The prober waits this long between attempts.
const PROBE_PAUSE: Duration = Duration::from_millis(200);
/// A user whose login failed tries again after this long.
const RELOGIN_DELAY: Duration = Duration::from_millis(300);
/// After the faults, a user gives up logging in again after this long.
const DRAIN_LOGIN_LIMIT: Duration = Duration::from_secs(60);
/// How long a connection's reader may take to finish after the
/// connection ended.
const READER_WAIT: Duration = Duration::from_secs(10);

/// One user of the run.
#[derive(Debug, Clone)]
pub struct Account {
    pub index: usize,
    pub user: u64,
    pub username: String,
    /// Users it may write to.
    pub friends: Vec<u64>,
    /// Groups it is a member of.
    pub groups: Vec<u64>,
    /// Stays logged in for the whole run (its SDK reconnects by itself);
    /// the others log out and in again and again.
    pub stays: bool,
    /// What its connections showed, kept from one to the next as an
    /// application keeps it (`SdkConfig::shown`).
    pub shown: ShownMarks,
}

/// The accounts, groups and the prober of a run.
pub struct Population {
    pub accounts: Vec<Account>,
    /// Group id -> its members' user ids.
    pub groups: BTreeMap<u64, Vec<u64>>,
    pub prober: Account,
}

fn username(i: usize) -> String {
    format!("chaos{i}")
}

/// `users` accounts (one password hash), each a friend of the next two
/// (a ring), `groups` groups of about two thirds of the users each
/// (overlapping windows of the ring), and the prober (no friends, no
/// groups).
pub async fn populate(profile: &ProfileClient, users: usize, groups: usize) -> Result<Population> {
    let hasher = Hasher::for_service(&profile.info().await?)?;
    let phc = hasher.hash(PASSWORD.as_bytes())?;
    let names: Vec<String> = (0..users)
        .map(username)
        .chain(["chaosprobe".to_string()])
        .collect();
    let mut ids = Vec::with_capacity(names.len());
    for chunk in names.chunks(IMPORT_USERS_MAX) {
        let batch = chunk
            .iter()
            .map(|n| ImportUser {
                username: n.clone().into_bytes(),
                phc: phc.clone(),
            })
            .collect();
        for r in profile.import_users(batch).await? {
            ids.push(r.map_err(|e| anyhow::anyhow!("import a user: {}", e.message))?);
        }
    }
    let mut pairs = BTreeSet::new();
    for i in 0..users {
        for step in [1, 2] {
            let j = (i + step) % users;
            if j != i {
                pairs.insert((ids[i.min(j)], ids[i.max(j)]));
            }
        }
    }
    let pairs: Vec<(u64, u64)> = pairs.into_iter().collect();
    for chunk in pairs.chunks(IMPORT_FRIENDSHIPS_MAX) {
        profile
            .import_friendships("Friends", chunk.to_vec())
            .await
            .context("make the friendships")?;
    }
    let mut accounts: Vec<Account> = (0..users)
        .map(|i| Account {
            index: i,
            user: ids[i],
            username: names[i].clone(),
            friends: pairs
                .iter()
                .filter_map(|&(a, b)| match (a == ids[i], b == ids[i]) {
                    (true, _) => Some(b),
                    (_, true) => Some(a),
                    _ => None,
                })
                .collect(),
            groups: Vec::new(),
            stays: i % 3 == 0,
            shown: ShownMarks::new(),
        })
        .collect();
    let size = (users * 2 / 3).max(2).min(users);
    let mut group_members = BTreeMap::new();
    for g in 0..groups {
        let first = g * users / groups.max(1);
        let members: Vec<usize> = (0..size).map(|k| (first + k) % users).collect();
        let owner = ids[members[0]];
        let group = profile
            .group_create(owner, &format!("chaos {}", g + 1), "imbench chaos")
            .await
            .context("create a group")?
            .group;
        for &m in &members[1..] {
            profile
                .group_invite(owner, group, ids[m])
                .await
                .context("invite a member")?;
            profile
                .group_answer_invite(ids[m], group, true, 0)
                .await
                .context("accept an invitation")?;
        }
        for &m in &members {
            accounts[m].groups.push(group);
        }
        group_members.insert(group, members.iter().map(|&m| ids[m]).collect());
    }
    let prober = Account {
        index: users,
        user: ids[users],
        username: names[users].clone(),
        friends: Vec::new(),
        groups: Vec::new(),
        stays: false,
        shown: ShownMarks::new(),
    };
    Ok(Population {
        accounts,
        groups: group_members,
        prober,
    })
}

/// What every user task shares.
pub struct World {
    /// Both gateways, comma separated.
    pub gateways: String,
    pub public: [u8; 32],
    pub start: Instant,
    /// The faults are over: the prober stops.
    pub faults_over: AtomicBool,
    /// Users send no more, wait for their sends' answers and stay (or
    /// get) logged in for the drain.
    pub stopping: AtomicBool,
}

impl World {
    fn ms(&self) -> f64 {
        self.start.elapsed().as_secs_f64() * 1e3
    }

    pub fn stopping(&self) -> bool {
        self.stopping.load(Ordering::Relaxed)
    }

    fn config(&self, account: &Account) -> SdkConfig {
        let mut config = SdkConfig::new(
            self.gateways.clone(),
            self.public,
            Credentials::Password {
                username: account.username.clone(),
                password: PASSWORD.to_string(),
            },
        );
        config.shown = account.shown.clone();
        config
    }
}

/// Which mailbox a shown message came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Conv {
    /// The user's own mailbox (a 1:1 message).
    Direct,
    Group(u64),
}

/// One message as a user was shown it.
#[derive(Debug, Clone)]
pub struct Shown {
    pub conv: Conv,
    /// The delivery's `from`.
    pub from: u64,
    /// The stamp's sender and counter.
    pub sender: u64,
    pub counter: u64,
    /// Its seq in the mailbox it came from.
    pub seq: u64,
    /// The user's connection it was shown on (from 1).
    pub conn: u32,
    /// Shown on the fresh login at the very end (the drain's second
    /// step), not before.
    pub relogin: bool,
    pub at_ms: f64,
}

/// One send and its final answer.
#[derive(Debug, Clone)]
pub struct Sent {
    pub sender: u64,
    pub counter: u64,
    /// A user or a group.
    pub to: u64,
    /// `Sent{seq}`, or the error it ended with.
    pub result: Result<u64, String>,
    pub at_ms: f64,
    pub answered_ms: f64,
}

/// One connection of a user (an SDK `Connection`, which may have
/// reconnected by itself within).
#[derive(Debug, Clone, serde::Serialize)]
pub struct ConnRecord {
    /// From 1 (`u32::MAX`: the drain's fresh login).
    pub no: u32,
    pub opened_ms: f64,
    /// When `logout`/`close` was called, and when it returned.
    pub ending_ms: Option<f64>,
    pub ended_ms: Option<f64>,
    /// `logout`, `close`, or `logout` after the SDK had lost it for good.
    pub how: Option<String>,
    /// The gateway of the first login.
    pub gateway: String,
}

/// An `ImEvent::GroupDropped`: the gateway said `count` seqs of the
/// group after what the member had shown are gone (retention).
#[derive(Debug, Clone, serde::Serialize)]
pub struct Dropped {
    pub group: u64,
    pub count: u64,
    pub conn: u32,
    pub at_ms: f64,
    /// The newest seq of the group this connection had shown before.
    pub shown_before: Option<u64>,
    /// The next seq of the group it showed after (filled in at the end).
    pub next_shown: Option<u64>,
}

/// Everything one user did and was shown.
#[derive(Debug, Default)]
pub struct UserLog {
    pub connections: Vec<ConnRecord>,
    pub dropped: Vec<Dropped>,
    pub shown: Vec<Shown>,
    pub sent: Vec<Sent>,
    pub logins: u64,
    pub login_failures: BTreeMap<String, u64>,
    /// Logins (first ones and the SDK's reconnects) per gateway address.
    pub by_gateway: BTreeMap<String, u64>,
    pub reconnects: u64,
    /// Other events worth counting: kicked, lost, dropped, unstamped.
    pub events: BTreeMap<String, u64>,
}

impl UserLog {
    fn count(&mut self, what: impl Into<String>) {
        *self.events.entry(what.into()).or_default() += 1;
    }
}

pub type SharedLog = Arc<Mutex<UserLog>>;

pub fn lock(log: &SharedLog) -> MutexGuard<'_, UserLog> {
    log.lock().unwrap_or_else(|p| p.into_inner())
}

/// A logged-in connection and the task logging its events.
pub struct Session {
    pub conn: Connection,
    reader: JoinHandle<()>,
    no: u32,
    log: SharedLog,
    start: Instant,
}

impl Session {
    /// Log in (one attempt, every gateway address); `no` numbers the
    /// user's connections, `relogin` marks the drain's fresh login.
    pub async fn open(
        world: &World,
        account: &Account,
        log: &SharedLog,
        no: u32,
        relogin: bool,
    ) -> Result<Session, String> {
        match sdk::connect(world.config(account)).await {
            Ok((conn, events)) => {
                {
                    let mut l = lock(log);
                    l.logins += 1;
                    let gateway = conn.gateway().to_string();
                    *l.by_gateway.entry(gateway.clone()).or_default() += 1;
                    l.connections.push(ConnRecord {
                        no,
                        opened_ms: world.ms(),
                        ending_ms: None,
                        ended_ms: None,
                        how: None,
                        gateway,
                    });
                }
                let reader =
                    tokio::spawn(read_events(events, log.clone(), world.start, no, relogin));
                Ok(Session {
                    conn,
                    reader,
                    no,
                    log: log.clone(),
                    start: world.start,
                })
            }
            Err(e) => {
                let why = format!("{e}");
                *lock(log).login_failures.entry(why.clone()).or_default() += 1;
                Err(why)
            }
        }
    }

    /// Log out (or close without logging out), after the SDK acknowledged
    /// what it handed out; then wait until every event was logged.
    pub async fn end(self, logout: bool) {
        let ms = |start: Instant| start.elapsed().as_secs_f64() * 1e3;
        let ending_ms = ms(self.start);
        let how = match (logout, self.conn.lost()) {
            (true, None) => "logout".to_string(),
            (false, None) => "close".to_string(),
            (_, Some(lost)) => format!("ended after the connection was lost: {lost}"),
        };
        if logout {
            let _ = self.conn.logout().await;
        } else {
            self.conn.close().await;
        }
        drop(self.conn);
        let _ = tokio::time::timeout(READER_WAIT, self.reader).await;
        let mut l = lock(&self.log);
        if let Some(c) = l.connections.iter_mut().rev().find(|c| c.no == self.no) {
            c.ending_ms = Some(ending_ms);
            c.ended_ms = Some(ms(self.start));
            c.how = Some(how);
        }
    }
}

/// Log every message of one connection, in the order shown.
async fn read_events(
    mut events: mpsc::Receiver<ImEvent>,
    log: SharedLog,
    start: Instant,
    no: u32,
    relogin: bool,
) {
    while let Some(event) = events.recv().await {
        let at_ms = start.elapsed().as_secs_f64() * 1e3;
        let mut l = lock(&log);
        let (conv, d) = match event {
            ImEvent::Message(d) => (Conv::Direct, d),
            ImEvent::GroupMessage { group, delivery } => (Conv::Group(group), delivery),
            ImEvent::Reconnected { gateway, .. } => {
                l.reconnects += 1;
                *l.by_gateway.entry(gateway.to_string()).or_default() += 1;
                continue;
            }
            ImEvent::GroupDropped { group, count } => {
                l.count("GroupDropped events");
                let shown_before = (l.shown.iter().rev())
                    .find(|s| s.conn == no && s.conv == Conv::Group(group))
                    .map(|s| s.seq);
                l.dropped.push(Dropped {
                    group,
                    count,
                    conn: no,
                    at_ms,
                    shown_before,
                    next_shown: None,
                });
                continue;
            }
            ImEvent::SessionLost { reason } => {
                l.count(format!("session lost: {reason}"));
                continue;
            }
            ImEvent::Kicked => {
                l.count("kicked");
                continue;
            }
            ImEvent::FriendStatus { .. }
            | ImEvent::ProfileChanged { .. }
            | ImEvent::GroupChanged { .. } => continue,
        };
        let Some(stamp) = Stamp::parse(&d.body) else {
            l.count("a message without a stamp");
            continue;
        };
        l.shown.push(Shown {
            conv,
            from: d.from,
            sender: stamp.sender,
            counter: stamp.counter,
            seq: d.seq,
            conn: no,
            relogin,
            at_ms,
        });
    }
}

type SendResult = (u64, u64, f64, Result<SendOutcome, SdkError>);
type SendFuture = Pin<Box<dyn Future<Output = SendResult> + Send>>;

fn record(world: &World, log: &SharedLog, sender: u64, (counter, to, at_ms, r): SendResult) {
    let result = match r {
        Ok(outcome) => Ok(outcome.seq),
        Err(e) => Err(format!("{e}")),
    };
    lock(log).sent.push(Sent {
        sender,
        counter,
        to,
        result,
        at_ms,
        answered_ms: world.ms(),
    });
}

/// One user until the drain: log in, send to friends and groups for a
/// while, wait for every answer, log out (or close), stay away a while,
/// again; users that `stays` log in once. Once `stopping`, it waits for
/// its sends' answers and returns its connection (logging in again if
/// it was away), or `None` if it could not log in again.
pub async fn user_loop(
    world: Arc<World>,
    account: Account,
    log: SharedLog,
    seed: u64,
) -> Option<Session> {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut counter = 0u64;
    let mut no = 0u32;
    let mut stopped_at: Option<Instant> = None;
    loop {
        if world.stopping() && stopped_at.is_none() {
            stopped_at = Some(Instant::now());
        }
        if stopped_at.is_some_and(|t| t.elapsed() > DRAIN_LOGIN_LIMIT) {
            lock(&log).count("could not log in for the drain");
            return None;
        }
        no += 1;
        let session = match Session::open(&world, &account, &log, no, false).await {
            Ok(s) => s,
            Err(_) => {
                tokio::time::sleep(RELOGIN_DELAY).await;
                continue;
            }
        };
        if world.stopping() {
            return Some(session);
        }
        let online = if account.stays {
            Duration::from_secs(86_400)
        } else {
            Duration::from_millis(rng.gen_range(2_000..8_000))
        };
        let until = Instant::now() + online;
        let mut sends: JoinSet<SendResult> = JoinSet::new();
        while !world.stopping() && Instant::now() < until && session.conn.lost().is_none() {
            while let Some(done) = sends.try_join_next() {
                match done {
                    Ok(r) => record(&world, &log, account.user, r),
                    Err(e) => lock(&log).count(format!("send task failed: {e}")),
                }
            }
            if sends.len() < WINDOW {
                let (to, group) = pick(&mut rng, &account);
                let body = Stamp {
                    sender: account.user,
                    counter,
                    sent_ns: 0,
                }
                .body(BODY_BYTES);
                let conn = session.conn.clone();
                let (c, at_ms) = (counter, world.ms());
                counter += 1;
                let mut fut: SendFuture = Box::pin(async move {
                    let r = if group {
                        conn.group_send(to, body).await
                    } else {
                        conn.send(to, body).await
                    };
                    (c, to, at_ms, r)
                });
                match crate::group_members::poll_once(&mut fut).await {
                    Some(done) => record(&world, &log, account.user, done),
                    None => {
                        sends.spawn(fut);
                    }
                }
            }
            tokio::time::sleep(Duration::from_millis(rng.gen_range(150..450))).await;
        }
        while let Some(done) = sends.join_next().await {
            match done {
                Ok(r) => record(&world, &log, account.user, r),
                Err(e) => lock(&log).count(format!("send task failed: {e}")),
            }
        }
        if world.stopping() && session.conn.lost().is_none() {
            return Some(session);
        }
        let logout = rng.gen_bool(0.7);
        session.end(logout).await;
        if !world.stopping() {
            tokio::time::sleep(Duration::from_millis(rng.gen_range(500..3_000))).await;
        }
    }
}

/// A friend (60%) or one of the user's groups (40%): (id, is a group).
fn pick(rng: &mut StdRng, account: &Account) -> (u64, bool) {
    let group = !account.groups.is_empty() && (account.friends.is_empty() || rng.gen_bool(0.4));
    if group {
        (account.groups[rng.gen_range(0..account.groups.len())], true)
    } else {
        (
            account.friends[rng.gen_range(0..account.friends.len())],
            false,
        )
    }
}

/// The drain's second step for one user: end `session` (logging out),
/// log in afresh, wait until synced, log out. Whether it was synced (or
/// why not).
pub async fn relogin_and_sync(
    world: Arc<World>,
    account: Account,
    log: SharedLog,
    session: Option<Session>,
    timeout: Duration,
) -> Result<(), String> {
    if let Some(s) = session {
        s.end(true).await;
    }
    let deadline = Instant::now() + timeout;
    let session = loop {
        match Session::open(&world, &account, &log, u32::MAX, true).await {
            Ok(s) => break s,
            Err(e) if Instant::now() >= deadline => return Err(format!("no login: {e}")),
            Err(_) => tokio::time::sleep(RELOGIN_DELAY).await,
        }
    };
    let left = deadline.saturating_duration_since(Instant::now());
    let r = match tokio::time::timeout(left, session.conn.synced()).await {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(e)) => Err(format!("synced failed: {e}")),
        Err(_) => Err(format!("not synced within {timeout:?}")),
    };
    session.end(true).await;
    r
}

/// Wait until `session` is synced, within `timeout`.
pub async fn sync(session: &Session, timeout: Duration) -> Result<(), String> {
    match tokio::time::timeout(timeout, session.conn.synced()).await {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(e)) => Err(format!("synced failed: {e}")),
        Err(_) => Err(format!("not synced within {timeout:?}")),
    }
}

/// One prober login.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Attempt {
    /// Ms since the run's start when it began.
    pub start_ms: f64,
    /// Until accepted, or until it failed.
    pub ms: f64,
    pub ok: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// Log the prober in and out until the faults are over.
pub async fn prober(world: Arc<World>, account: Account) -> Vec<Attempt> {
    let mut attempts = Vec::new();
    while !world.faults_over.load(Ordering::Relaxed) {
        let start_ms = world.ms();
        let mut config = world.config(&account);
        config.limits.events_max = 16;
        let r = tokio::time::timeout(LOGIN_ATTEMPT_TIMEOUT, sdk::connect(config)).await;
        let ms = world.ms() - start_ms;
        let (ok, error) = match r {
            Ok(Ok((conn, events))) => {
                let _ = conn.logout().await;
                drop(events);
                (true, None)
            }
            Ok(Err(e)) => (false, Some(format!("{e}"))),
            Err(_) => (
                false,
                Some(format!("not accepted within {LOGIN_ATTEMPT_TIMEOUT:?}")),
            ),
        };
        attempts.push(Attempt {
            start_ms,
            ms,
            ok,
            error,
        });
        tokio::time::sleep(PROBE_PAUSE).await;
    }
    attempts
}

/// A run of failed prober logins and the success that ended it.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Streak {
    /// When the first failed attempt began (ms since the run's start) ...
    pub start_ms: f64,
    /// ... and when it failed.
    pub first_failure_end_ms: f64,
    /// When the next login was accepted (or the probing ended).
    pub end_ms: f64,
    pub ms: f64,
    pub failures: u64,
    /// The probing ended before a login was accepted again.
    pub ongoing: bool,
    /// What the first failure said.
    pub first_error: String,
}

/// The failure streaks of `attempts` (in order): each from the start of
/// its first failed attempt to the moment the next attempt was accepted.
pub fn streaks(attempts: &[Attempt], end_ms: f64) -> Vec<Streak> {
    let mut out = Vec::new();
    let mut open: Option<(f64, f64, u64, String)> = None;
    for a in attempts {
        if !a.ok {
            match open.as_mut() {
                Some((_, _, n, _)) => *n += 1,
                None => {
                    let why = a.error.clone().unwrap_or_default();
                    open = Some((a.start_ms, a.start_ms + a.ms, 1, why));
                }
            }
        } else if let Some((start_ms, first_failure_end_ms, failures, first_error)) = open.take() {
            let end = a.start_ms + a.ms;
            out.push(Streak {
                start_ms,
                first_failure_end_ms,
                end_ms: end,
                ms: end - start_ms,
                failures,
                ongoing: false,
                first_error,
            });
        }
    }
    if let Some((start_ms, first_failure_end_ms, failures, first_error)) = open {
        out.push(Streak {
            start_ms,
            first_failure_end_ms,
            end_ms: end_ms.max(start_ms),
            ms: end_ms.max(start_ms) - start_ms,
            failures,
            ongoing: true,
            first_error,
        });
    }
    out
}

/// Fill in each `GroupDropped`'s next shown seq of its group.
pub fn finish_dropped(log: &mut UserLog) {
    for d in &mut log.dropped {
        d.next_shown = (log.shown.iter())
            .find(|s| s.conn == d.conn && s.conv == Conv::Group(d.group) && s.at_ms >= d.at_ms)
            .map(|s| s.seq);
    }
}

/// Logins per gateway over every user, for the report.
pub fn logins_by_gateway(logs: &[SharedLog]) -> BTreeMap<String, u64> {
    let mut out = BTreeMap::new();
    for l in logs {
        for (g, n) in &lock(l).by_gateway {
            *out.entry(g.clone()).or_default() += n;
        }
    }
    out
}

/// Group id -> members, as the checker wants it.
pub fn members(pop: &Population) -> HashMap<u64, Vec<u64>> {
    pop.groups.iter().map(|(g, m)| (*g, m.clone())).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(start_ms: f64, ms: f64, ok: bool) -> Attempt {
        Attempt {
            start_ms,
            ms,
            ok,
            error: (!ok).then(|| "down".to_string()),
        }
    }

    #[test]
    fn a_streak_runs_from_the_first_failure_to_the_next_acceptance() {
        let a = [
            at(0.0, 10.0, true),
            at(100.0, 3000.0, false),
            at(3300.0, 5.0, false),
            at(3500.0, 20.0, true),
            at(3700.0, 10.0, true),
            at(4000.0, 50.0, false),
        ];
        let s = streaks(&a, 5000.0);
        assert_eq!(s.len(), 2);
        assert_eq!(
            (s[0].start_ms, s[0].end_ms, s[0].failures),
            (100.0, 3520.0, 2)
        );
        assert_eq!(s[0].ms, 3420.0);
        assert!(!s[0].ongoing);
        assert_eq!((s[1].ms, s[1].failures, s[1].ongoing), (1000.0, 1, true));
        assert!(streaks(&a[..1], 10.0).is_empty());
    }
}
