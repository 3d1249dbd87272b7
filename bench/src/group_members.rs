//! `imbench group`'s users: SDK connections (`client::sdk`), one task per
//! connection reading its events and logging every message it shows, the
//! senders, and the tracker of "delivered to every online member".
//!
//! Every body carries `(sender, counter, send instant)` (see [`Stamp`]),
//! so a message is known wherever it shows up, and the latency of its
//! delivery to the last online member is measured from the instant its
//! send was queued.

use client::sdk::{self, Connection, Credentials, ImEvent, SdkConfig};
use hdrhistogram::Histogram;
use std::{
    collections::{BTreeMap, HashMap, HashSet},
    future::Future,
    net::SocketAddr,
    pin::Pin,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex, MutexGuard, OnceLock,
    },
    task::Poll,
    time::{Duration, Instant},
};
use tokio::{
    sync::{mpsc, watch, Semaphore},
    task::{JoinHandle, JoinSet},
};

/// Latencies in microseconds, 1 us .. 60 s, 3 significant digits.
const LATENCY_US_MAX: u64 = 60_000_000;
const MAGIC: &[u8; 4] = b"grp1";
/// Bytes of a stamp: magic, sender, counter, send instant.
pub const STAMP_BYTES: usize = 4 + 8 + 8 + 8;

pub fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, LATENCY_US_MAX, 3).expect("valid histogram bounds")
}

fn record(hist: &mut Histogram<u64>, d: Duration) {
    let us = u64::try_from(d.as_micros()).unwrap_or(u64::MAX);
    hist.saturating_record(us.max(1));
}

/// The process-wide instant bodies count their send time from.
fn epoch() -> Instant {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

fn nanos_since_epoch(at: Instant) -> u64 {
    u64::try_from(at.saturating_duration_since(epoch()).as_nanos()).unwrap_or(u64::MAX)
}

/// What every message body starts with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stamp {
    pub sender: u64,
    pub counter: u64,
    /// Nanoseconds since [`epoch`] when the send was queued.
    pub sent_ns: u64,
}

impl Stamp {
    fn new(sender: u64, counter: u64, at: Instant) -> Stamp {
        Stamp {
            sender,
            counter,
            sent_ns: nanos_since_epoch(at),
        }
    }

    /// A body of `len` bytes (at least [`STAMP_BYTES`]) starting with it.
    pub fn body(&self, len: usize) -> Vec<u8> {
        let mut b = Vec::with_capacity(len.max(STAMP_BYTES));
        b.extend_from_slice(MAGIC);
        b.extend_from_slice(&self.sender.to_le_bytes());
        b.extend_from_slice(&self.counter.to_le_bytes());
        b.extend_from_slice(&self.sent_ns.to_le_bytes());
        b.resize(len.max(STAMP_BYTES), b'g');
        b
    }

    pub fn parse(body: &[u8]) -> Option<Stamp> {
        if body.len() < STAMP_BYTES || &body[..4] != MAGIC {
            return None;
        }
        let word = |at: usize| u64::from_le_bytes(body[at..at + 8].try_into().expect("8 bytes"));
        Some(Stamp {
            sender: word(4),
            counter: word(12),
            sent_ns: word(20),
        })
    }

    /// From the send to `now`.
    fn age(&self, now: Instant) -> Duration {
        Duration::from_nanos(nanos_since_epoch(now).saturating_sub(self.sent_ns))
    }
}

/// One user of the run.
#[derive(Debug, Clone)]
pub struct Account {
    /// Its place among the members (0 = the groups' owner).
    pub index: usize,
    pub user: u64,
    pub username: String,
    /// Which gateway it logs in at.
    pub gateway: usize,
    /// Logged in for the send phases (else only for the drain).
    pub online: bool,
}

/// One message as a member was shown it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Got {
    pub seq: u64,
    pub sender: u64,
    pub counter: u64,
}

/// Everything one connection was shown, in the order shown.
#[derive(Debug, Default)]
pub struct MemberLog {
    pub groups: HashMap<u64, Vec<Got>>,
    /// 1:1 messages (`sender` is the `from` of the delivery).
    pub direct: Vec<Got>,
    /// Messages of each group already shown, by (sender, counter).
    seen: HashSet<(u64, u64, u64)>,
    pub problems: BTreeMap<String, u64>,
}

impl MemberLog {
    pub fn problem(&mut self, what: impl Into<String>) {
        *self.problems.entry(what.into()).or_default() += 1;
    }

    /// Log a group message; whether this member sees it for the first
    /// time.
    fn group(&mut self, group: u64, seq: u64, stamp: &Stamp) -> bool {
        self.groups.entry(group).or_default().push(Got {
            seq,
            sender: stamp.sender,
            counter: stamp.counter,
        });
        self.seen.insert((group, stamp.sender, stamp.counter))
    }
}

/// Group messages sent and not yet shown at every online member.
#[derive(Default)]
pub struct Tracker {
    /// (group, sender, counter) -> online members still to show it.
    pending: HashMap<(u64, u64, u64), u32>,
    /// Each sender's window: a permit back once a message is everywhere.
    windows: HashMap<u64, Arc<Semaphore>>,
    /// Send -> shown at the last online member.
    pub everywhere: Option<Histogram<u64>>,
    pub completed: u64,
    pub last_completion: Option<Instant>,
}

impl Tracker {
    pub fn start_phase(&mut self, windows: HashMap<u64, Arc<Semaphore>>) {
        self.pending.clear();
        self.windows = windows;
        self.everywhere = Some(histogram());
        self.completed = 0;
        self.last_completion = None;
    }

    fn register(&mut self, group: u64, sender: u64, counter: u64, members: u32) {
        self.pending.insert((group, sender, counter), members);
    }

    fn shown(&mut self, group: u64, stamp: &Stamp, now: Instant) {
        let key = (group, stamp.sender, stamp.counter);
        let Some(left) = self.pending.get_mut(&key) else {
            return;
        };
        *left -= 1;
        if *left > 0 {
            return;
        }
        self.pending.remove(&key);
        if let Some(h) = &mut self.everywhere {
            record(h, stamp.age(now));
        }
        self.completed += 1;
        self.last_completion = Some(now);
        if let Some(w) = self.windows.get(&stamp.sender) {
            w.add_permits(1);
        }
    }

    /// A send that failed: it will not be everywhere; its window slot back.
    fn abandon(&mut self, group: u64, sender: u64, counter: u64) {
        if self.pending.remove(&(group, sender, counter)).is_some() {
            if let Some(w) = self.windows.get(&sender) {
                w.add_permits(1);
            }
        }
    }

    pub fn pending(&self) -> usize {
        self.pending.len()
    }

    /// Messages not shown everywhere: (group, sender, counter, members
    /// still to show it).
    pub fn incomplete(&self) -> Vec<(u64, u64, u64, u32)> {
        let mut v: Vec<_> = self
            .pending
            .iter()
            .map(|(&(g, s, c), &n)| (g, s, c, n))
            .collect();
        v.sort_unstable();
        v
    }
}

/// State every connection's reader shares.
#[derive(Default)]
pub struct Shared {
    pub tracker: Mutex<Tracker>,
    /// `GroupMessage` events, every connection.
    pub group_shown: AtomicU64,
    /// `Message` events (1:1), every connection.
    pub direct_shown: AtomicU64,
}

impl Shared {
    pub fn tracker(&self) -> MutexGuard<'_, Tracker> {
        self.tracker.lock().expect("tracker mutex")
    }
}

/// A logged-in account.
pub struct Online {
    pub account: Account,
    pub conn: Connection,
    pub log: Arc<Mutex<MemberLog>>,
    reader: JoinHandle<()>,
}

impl Online {
    /// Close the connection; the log as it ends.
    pub async fn close(self) -> (Account, MemberLog) {
        self.conn.close().await;
        // The reader ends when the event channel closes with the task.
        let _ = tokio::time::timeout(Duration::from_secs(5), self.reader).await;
        let log = std::mem::take(&mut *self.log.lock().expect("member log mutex"));
        (self.account, log)
    }
}

/// Where and how accounts log in.
pub struct LoginSettings<'a> {
    /// The gateways' UDP addresses (an account logs in at
    /// `gateways[account.gateway]`).
    pub gateways: &'a [SocketAddr],
    pub public: [u8; 32],
    pub password: &'a str,
    /// The connections' event channel room (`SdkLimits::events_max`).
    pub events_max: usize,
    /// Logins at once at most.
    pub parallel: usize,
}

/// Log every account in, each at its gateway; their readers start showing
/// once `gate` is true. The connections, and the accounts that failed with
/// why.
pub async fn log_in(
    accounts: &[Account],
    how: &LoginSettings<'_>,
    shared: &Arc<Shared>,
    gate: &watch::Receiver<bool>,
) -> (Vec<Online>, Vec<(Account, String)>) {
    let permits = Arc::new(Semaphore::new(how.parallel.max(1)));
    let mut tasks = JoinSet::new();
    for a in accounts.iter().cloned() {
        let mut config = SdkConfig::new(
            how.gateways[a.gateway].to_string(),
            how.public,
            Credentials::Password {
                username: a.username.clone(),
                password: how.password.to_string(),
            },
        );
        config.limits.events_max = how.events_max;
        let permits = permits.clone();
        let shared = shared.clone();
        let gate = gate.clone();
        tasks.spawn(async move {
            let _permit = permits.acquire_owned().await.expect("never closed");
            match sdk::connect(config).await {
                Ok((conn, events)) => {
                    let log = Arc::new(Mutex::new(MemberLog::default()));
                    let reader = tokio::spawn(read_events(events, log.clone(), shared, gate));
                    Ok(Online {
                        account: a,
                        conn,
                        log,
                        reader,
                    })
                }
                Err(e) => Err((a, format!("{e}"))),
            }
        });
    }
    let mut online = Vec::new();
    let mut failed = Vec::new();
    while let Some(r) = tasks.join_next().await {
        match r {
            Ok(Ok(o)) => online.push(o),
            Ok(Err(f)) => failed.push(f),
            Err(e) => join_failed(&mut failed, e),
        }
    }
    online.sort_by_key(|o| o.account.index);
    (online, failed)
}

fn join_failed(failed: &mut Vec<(Account, String)>, e: tokio::task::JoinError) {
    let a = Account {
        index: usize::MAX,
        user: 0,
        username: "?".into(),
        gateway: 0,
        online: false,
    };
    failed.push((a, format!("login task failed: {e}")));
}

/// Show (log) every event of one connection, once `gate` opens.
async fn read_events(
    mut events: mpsc::Receiver<ImEvent>,
    log: Arc<Mutex<MemberLog>>,
    shared: Arc<Shared>,
    mut gate: watch::Receiver<bool>,
) {
    let _ = gate.wait_for(|open| *open).await;
    while let Some(event) = events.recv().await {
        let now = Instant::now();
        let mut l = log.lock().expect("member log mutex");
        match event {
            ImEvent::GroupMessage { group, delivery } => {
                shared.group_shown.fetch_add(1, Ordering::Relaxed);
                let Some(stamp) = Stamp::parse(&delivery.body) else {
                    l.problem("a group message without a stamp");
                    continue;
                };
                if stamp.sender != delivery.from {
                    l.problem("a group message whose from is not its stamp's sender");
                }
                if l.group(group, delivery.seq, &stamp) {
                    drop(l);
                    shared.tracker().shown(group, &stamp, now);
                }
            }
            ImEvent::Message(d) => {
                shared.direct_shown.fetch_add(1, Ordering::Relaxed);
                match Stamp::parse(&d.body) {
                    Some(stamp) => l.direct.push(Got {
                        seq: d.seq,
                        sender: d.from,
                        counter: stamp.counter,
                    }),
                    None => l.problem("a 1:1 message without a stamp"),
                }
            }
            ImEvent::GroupDropped { count, .. } => {
                l.problem(format!("GroupDropped ({count} messages)"))
            }
            ImEvent::Reconnected { .. } => l.problem("session lost and reconnected"),
            ImEvent::SessionLost { reason } => l.problem(format!("session lost: {reason}")),
            ImEvent::Kicked => l.problem("kicked"),
            ImEvent::FriendStatus { .. }
            | ImEvent::ProfileChanged { .. }
            | ImEvent::GroupChanged { .. } => {}
        }
    }
}

/// What one sender did.
pub struct SendLog {
    pub sender: u64,
    /// Answered `Sent`: (counter, seq).
    pub sent: Vec<(u64, u64)>,
    /// Sends that ended with an error, by error.
    pub failed: BTreeMap<String, u64>,
    /// Send -> `Sent`.
    pub answer: Histogram<u64>,
}

impl SendLog {
    fn new(sender: u64) -> Self {
        SendLog {
            sender,
            sent: Vec::new(),
            failed: BTreeMap::new(),
            answer: histogram(),
        }
    }
}

type SendResult = (u64, Instant, Result<proto::app::SendOutcome, sdk::SdkError>);
type SendFuture = Pin<Box<dyn Future<Output = SendResult> + Send>>;

/// Poll `fut` once (so its command is queued now, in the order of the
/// calls: the SDK's command channel serves waiting senders first come,
/// first served); its output if it is already done.
pub(crate) async fn poll_once<T>(fut: &mut Pin<Box<dyn Future<Output = T> + Send>>) -> Option<T> {
    std::future::poll_fn(|cx| {
        Poll::Ready(match fut.as_mut().poll(cx) {
            Poll::Ready(v) => Some(v),
            Poll::Pending => None,
        })
    })
    .await
}

/// Queue one send (to a user, or with `group` to a group) and return
/// its future, already polled once.
async fn queue_send(
    conn: &Connection,
    to: u64,
    group: bool,
    counter: u64,
    at: Instant,
    body: Vec<u8>,
) -> Result<SendFuture, SendResult> {
    let c = conn.clone();
    let mut fut: SendFuture = Box::pin(async move {
        let r = if group {
            c.group_send(to, body).await
        } else {
            c.send(to, body).await
        };
        (counter, at, r)
    });
    match poll_once(&mut fut).await {
        Some(done) => Err(done),
        None => Ok(fut),
    }
}

/// Send to `group` until `deadline`, one message per free slot of
/// `window` (a slot comes back once the message is shown at all
/// `online_members`, see [`Tracker`]).
#[allow(clippy::too_many_arguments)]
pub async fn group_sender(
    conn: Connection,
    group: u64,
    online_members: u32,
    window: Arc<Semaphore>,
    deadline: Instant,
    body_bytes: usize,
    shared: Arc<Shared>,
) -> SendLog {
    let user = conn.user();
    let mut log = SendLog::new(user);
    let mut tasks: JoinSet<SendResult> = JoinSet::new();
    let handle = |log: &mut SendLog, (counter, at, r): SendResult| {
        if r.is_err() {
            shared.tracker().abandon(group, user, counter);
        }
        settle(log, counter, at, r);
    };
    for counter in 0.. {
        let acquired = tokio::time::timeout_at(deadline.into(), window.acquire()).await;
        let Ok(Ok(permit)) = acquired else { break };
        permit.forget();
        let at = Instant::now();
        let body = Stamp::new(user, counter, at).body(body_bytes);
        shared
            .tracker()
            .register(group, user, counter, online_members);
        match queue_send(&conn, group, true, counter, at, body).await {
            Ok(fut) => {
                tasks.spawn(fut);
            }
            Err(done) => handle(&mut log, done),
        }
        while let Some(done) = tasks.try_join_next() {
            match done {
                Ok(done) => handle(&mut log, done),
                Err(e) => log.problem(format!("send task: {e}")),
            }
        }
    }
    while let Some(done) = tasks.join_next().await {
        match done {
            Ok(done) => handle(&mut log, done),
            Err(e) => log.problem(format!("send task: {e}")),
        }
    }
    log
}

/// Send 1:1 to `to` until `deadline`, `window` sends unanswered at most.
pub async fn direct_sender(
    conn: Connection,
    to: u64,
    window: usize,
    deadline: Instant,
    body_bytes: usize,
) -> SendLog {
    let user = conn.user();
    let mut log = SendLog::new(user);
    let mut tasks: JoinSet<SendResult> = JoinSet::new();
    for counter in 0.. {
        while tasks.len() >= window.max(1) {
            match tasks.join_next().await {
                Some(Ok((c, at, r))) => settle(&mut log, c, at, r),
                Some(Err(e)) => log.problem(format!("send task: {e}")),
                None => break,
            }
        }
        let at = Instant::now();
        if at >= deadline {
            break;
        }
        let body = Stamp::new(user, counter, at).body(body_bytes);
        match queue_send(&conn, to, false, counter, at, body).await {
            Ok(fut) => {
                tasks.spawn(fut);
            }
            Err((c, at, r)) => settle(&mut log, c, at, r),
        }
    }
    while let Some(done) = tasks.join_next().await {
        match done {
            Ok((c, at, r)) => settle(&mut log, c, at, r),
            Err(e) => log.problem(format!("send task: {e}")),
        }
    }
    log
}

impl SendLog {
    fn problem(&mut self, what: String) {
        *self.failed.entry(what).or_default() += 1;
    }
}

fn settle(
    log: &mut SendLog,
    counter: u64,
    at: Instant,
    r: Result<proto::app::SendOutcome, sdk::SdkError>,
) {
    match r {
        Ok(outcome) => {
            record(&mut log.answer, at.elapsed());
            log.sent.push((counter, outcome.seq));
        }
        Err(e) => log.problem(format!("send failed: {e}")),
    }
}

/// Wait until every connection is `synced` (each within `timeout`); the
/// ones that were not, with why.
pub async fn sync_all<'a>(
    online: impl IntoIterator<Item = &'a Online>,
    timeout: Duration,
) -> Vec<(u64, String)> {
    let mut tasks = JoinSet::new();
    for o in online {
        let conn = o.conn.clone();
        let user = o.account.user;
        tasks.spawn(async move {
            match tokio::time::timeout(timeout, conn.synced()).await {
                Ok(Ok(_)) => None,
                Ok(Err(e)) => Some((user, format!("synced failed: {e}"))),
                Err(_) => Some((user, format!("not synced within {timeout:?}"))),
            }
        });
    }
    let mut failed = Vec::new();
    while let Some(r) = tasks.join_next().await {
        match r {
            Ok(Some(f)) => failed.push(f),
            Ok(None) => {}
            Err(e) => failed.push((0, format!("synced task: {e}"))),
        }
    }
    failed.sort();
    failed
}

/// Close every connection; their logs.
pub async fn close_all(online: Vec<Online>) -> Vec<(Account, MemberLog)> {
    let mut tasks = JoinSet::new();
    for o in online {
        tasks.spawn(o.close());
    }
    let mut logs = Vec::new();
    while let Some(r) = tasks.join_next().await {
        if let Ok(l) = r {
            logs.push(l);
        }
    }
    logs.sort_by_key(|(a, _)| a.index);
    logs
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stamps_round_trip_in_bodies_of_any_length() {
        let s = Stamp {
            sender: 7,
            counter: 9,
            sent_ns: 123,
        };
        let b = s.body(200);
        assert_eq!(b.len(), 200);
        assert_eq!(Stamp::parse(&b), Some(s));
        assert_eq!(s.body(3).len(), STAMP_BYTES, "never shorter than a stamp");
        assert_eq!(Stamp::parse(b"grp1"), None);
        assert_eq!(Stamp::parse(&[0u8; 64]), None);
    }

    #[test]
    fn a_message_is_everywhere_once_the_last_member_shows_it() {
        let mut t = Tracker::default();
        let w = Arc::new(Semaphore::new(0));
        t.start_phase([(7, w.clone())].into_iter().collect());
        t.register(1, 7, 0, 2);
        let s = Stamp {
            sender: 7,
            counter: 0,
            sent_ns: 0,
        };
        t.shown(1, &s, Instant::now());
        assert_eq!((t.completed, w.available_permits()), (0, 0));
        t.shown(1, &s, Instant::now());
        assert_eq!((t.completed, w.available_permits()), (1, 1));
        t.shown(1, &s, Instant::now());
        assert_eq!(t.completed, 1, "a later copy changes nothing");
        t.register(1, 7, 1, 2);
        t.abandon(1, 7, 1);
        assert_eq!((t.pending(), w.available_permits()), (0, 2));
    }
}
