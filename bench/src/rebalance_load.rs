//! The background load of `imbench rebalance`: writers and fetch+ack
//! drainers that route by one fixed (old) cluster map, like a gateway that
//! has not heard of the rebalance, follow `Moved` to wherever it points and
//! retry `Busy` a moment later. Each completed request is counted in the
//! measurement window current when it completes.

use crate::{
    load::Rng,
    report::{LatencyHist, LatencySummary},
};
use anyhow::Result;
use msgstore::client::{ClientError, ShardClient};
use proto::{
    cluster::{ClusterMap, ShardRing},
    shard::{RequestBody, ResponseBody, ShardErrorCode, FETCH_BYTES_MAX},
};
use serde::Serialize;
use std::{
    collections::HashMap,
    sync::{
        atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering::Relaxed},
        Arc, Mutex, RwLock,
    },
    time::{Duration, Instant},
};
use tokio::task::JoinHandle;

/// Pause before retrying a `Busy` (or `Unavailable`) answer.
const BUSY_RETRY: Duration = Duration::from_millis(5);
/// Attempts at one request (busy retries and redirects) before giving up:
/// 2,000 x 5 ms outlasts a freeze (`FREEZE_HOLD_MS`, 10 s).
const ROUTE_ATTEMPTS_MAX: u32 = 2000;
/// `Moved` answers followed for one request before giving up (one is
/// enough after an add or a remove; more means routing is going round).
const MOVED_HOPS_MAX: u32 = 4;
/// Records a drainer fetches (and acknowledges) per cycle.
const DRAIN_PAGE_COUNT: u32 = 100;
/// Bits of a message id left for the writer's counter; the user id sits
/// in the high 64 bits, the writer index above the counter.
const MSG_COUNTER_BITS: u32 = 40;

/// Routes by one map (replaced only when told), following `Moved` and
/// retrying `Busy`.
pub struct Router {
    map: RwLock<Routes>,
    /// One pipelined client per shard address, shared by every task.
    clients: Mutex<HashMap<String, ShardClient>>,
}

/// A map's ring and its shards' addresses.
struct Routes {
    ring: ShardRing,
    addrs: HashMap<String, String>,
}

impl Routes {
    fn new(map: &ClusterMap) -> Routes {
        Routes {
            ring: ShardRing::new(&map.shards),
            addrs: map
                .shards
                .iter()
                .map(|s| (s.id.clone(), s.addr.clone()))
                .collect(),
        }
    }
}

/// Why a routed request ended without an answer.
#[derive(Debug)]
pub enum RouteFail {
    /// The shard refused it for certain (nothing was written).
    Refused(String),
    /// The link broke: a write may or may not have happened.
    Link(ClientError),
}

/// A routed request's answer and the detours it took.
pub struct Routed {
    pub answer: Result<ResponseBody, RouteFail>,
    pub moved: u64,
    pub busy: u64,
}

impl Router {
    pub fn new(map: &ClusterMap) -> Router {
        Router {
            map: RwLock::new(Routes::new(map)),
            clients: Mutex::default(),
        }
    }

    /// Route by `map` from now on (a gateway that got the new map).
    pub fn set_map(&self, map: &ClusterMap) {
        *self.map.write().expect("map lock") = Routes::new(map);
    }

    /// The address of `user`'s owner under this router's map.
    pub fn owner_addr(&self, user: u64) -> String {
        let routes = self.map.read().expect("map lock");
        routes.addrs[routes.ring.owner(user)].clone()
    }

    pub async fn client(&self, addr: &str) -> Result<ShardClient, ClientError> {
        if let Some(c) = self.clients.lock().expect("clients lock").get(addr) {
            return Ok(c.clone());
        }
        let c = ShardClient::connect(addr).await?;
        let mut clients = self.clients.lock().expect("clients lock");
        Ok(clients.entry(addr.to_owned()).or_insert(c).clone())
    }

    fn forget(&self, addr: &str) {
        self.clients.lock().expect("clients lock").remove(addr);
    }

    /// Send `body` (a request about `user`) to its owner, following
    /// `Moved` and retrying `Busy` / `Unavailable`.
    pub async fn route(&self, user: u64, body: RequestBody) -> Routed {
        let mut addr = self.owner_addr(user);
        let (mut moved, mut busy) = (0, 0);
        let answer = loop {
            if moved + busy >= u64::from(ROUTE_ATTEMPTS_MAX) || moved > u64::from(MOVED_HOPS_MAX) {
                break Err(RouteFail::Refused(format!(
                    "gave up after {moved} redirects and {busy} busy answers"
                )));
            }
            let client = match self.client(&addr).await {
                Ok(c) => c,
                Err(e) => break Err(RouteFail::Link(e)),
            };
            match client.call(body.clone()).await {
                Ok(r) => break Ok(r),
                Err(ClientError::Shard(e)) => match e.code {
                    ShardErrorCode::Moved { addr: to, .. } => {
                        moved += 1;
                        addr = to;
                    }
                    ShardErrorCode::Busy | ShardErrorCode::Unavailable => {
                        busy += 1;
                        tokio::time::sleep(BUSY_RETRY).await;
                    }
                    other => break Err(RouteFail::Refused(format!("{other:?}: {}", e.message))),
                },
                Err(e) => {
                    self.forget(&addr);
                    break Err(RouteFail::Link(e));
                }
            }
        };
        Routed {
            answer,
            moved,
            busy,
        }
    }
}

/// What the load runs.
#[derive(Debug, Clone)]
pub struct LoadSpec {
    /// Writers and drainers pick users from `0..users` at random.
    pub users: u64,
    pub writers: usize,
    pub drainers: usize,
    pub payload_bytes: usize,
    /// Measurement windows (window 0 is the unmeasured warm-up).
    pub windows: usize,
    pub seed: u64,
}

/// Counters of one window, bumped by every task.
#[derive(Debug, Default)]
struct Counters {
    appends: AtomicU64,
    drain_cycles: AtomicU64,
    drained_records: AtomicU64,
    moved: AtomicU64,
    busy: AtomicU64,
    refused: AtomicU64,
    link_errors: AtomicU64,
    first_problem: Mutex<Option<String>>,
}

impl Counters {
    fn problem(&self, what: String) {
        self.first_problem
            .lock()
            .expect("problem lock")
            .get_or_insert(what);
    }
}

/// What the load did in one window.
#[derive(Debug, Clone, Default, Serialize)]
pub struct WindowStats {
    pub name: String,
    pub seconds: f64,
    /// Appends acknowledged as stored.
    pub appends: u64,
    pub appends_per_s: f64,
    /// Latency of acknowledged appends, redirects and busy waits included.
    pub append_latency: LatencySummary,
    /// Fetch + ack cycles that acknowledged at least one record.
    pub drain_cycles: u64,
    pub drain_cycles_per_s: f64,
    pub drained_records: u64,
    /// `Moved` answers followed / `Busy` answers waited out.
    pub moved_redirects: u64,
    pub busy_retries: u64,
    /// Requests given up (refused for certain) / lost with a broken link.
    pub refused: u64,
    pub link_errors: u64,
    /// The first refusal or broken link of the window.
    pub first_problem: Option<String>,
    /// Checkpoints the shards finished during the window (all shards).
    pub checkpoints: Option<u64>,
}

/// Message ids by fate, for the lost/duplicated check.
#[derive(Debug, Default)]
pub struct Ledger {
    /// Appends acknowledged as stored.
    pub stored: Vec<u128>,
    /// Appends whose link broke: stored at most once.
    pub unknown: Vec<u128>,
    /// Records fetched and then acknowledged (deleted) by a drainer.
    pub drained: Vec<u128>,
}

impl Ledger {
    pub fn merge(&mut self, other: Ledger) {
        self.stored.extend(other.stored);
        self.unknown.extend(other.unknown);
        self.drained.extend(other.drained);
    }
}

/// One task's private results.
struct TaskResult {
    hists: Vec<LatencyHist>,
    ledger: Ledger,
}

/// The running load.
pub struct Load {
    window: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
    counters: Arc<Vec<Counters>>,
    tasks: Vec<JoinHandle<TaskResult>>,
}

/// The id of writer `w`'s `n`th message to `user`.
pub fn msg_id(user: u64, w: usize, n: u64) -> u128 {
    assert!(n < 1 << MSG_COUNTER_BITS, "message counter overflow");
    (u128::from(user) << 64) | ((w as u128) << MSG_COUNTER_BITS) | u128::from(n)
}

/// The user a message id was written for.
pub fn msg_user(msg_id: u128) -> u64 {
    (msg_id >> 64) as u64
}

/// A payload of `len` bytes that starts with the message id.
pub fn payload(msg_id: u128, len: usize) -> Vec<u8> {
    let mut p = msg_id.to_le_bytes().to_vec();
    p.resize(len.max(16), 0xA5);
    p
}

impl Load {
    pub fn start(router: Arc<Router>, spec: &LoadSpec) -> Load {
        let window = Arc::new(AtomicUsize::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let counters: Arc<Vec<Counters>> =
            Arc::new((0..spec.windows).map(|_| Counters::default()).collect());
        let mut tasks = Vec::new();
        for i in 0..spec.writers + spec.drainers {
            let ctx = Ctx {
                router: router.clone(),
                spec: spec.clone(),
                window: window.clone(),
                stop: stop.clone(),
                counters: counters.clone(),
                index: i,
            };
            tasks.push(if i < spec.writers {
                tokio::spawn(ctx.write())
            } else {
                tokio::spawn(ctx.drain())
            });
        }
        Load {
            window,
            stop,
            counters,
            tasks,
        }
    }

    /// Count what completes from now on in window `i`.
    pub fn enter(&self, i: usize) {
        assert!(i < self.counters.len(), "window {i} was not declared");
        self.window.store(i, Relaxed);
    }

    /// Stop every task; the stats of each window (named and timed by
    /// `windows`, one `(name, seconds)` per declared window) and the ledger.
    pub async fn stop(self, windows: &[(String, f64)]) -> Result<(Vec<WindowStats>, Ledger)> {
        self.stop.store(true, Relaxed);
        let mut hists = vec![LatencyHist::new(); self.counters.len()];
        let mut ledger = Ledger::default();
        for t in self.tasks {
            let r = t.await?;
            for (all, h) in hists.iter_mut().zip(&r.hists) {
                all.merge(h)?;
            }
            ledger.merge(r.ledger);
        }
        let stats = windows
            .iter()
            .zip(self.counters.iter().zip(&hists))
            .map(|((name, seconds), (c, h))| window_stats(name, *seconds, c, h))
            .collect();
        Ok((stats, ledger))
    }
}

fn window_stats(name: &str, seconds: f64, c: &Counters, h: &LatencyHist) -> WindowStats {
    let per_s = |n: u64| n as f64 / seconds.max(1e-9);
    let appends = c.appends.load(Relaxed);
    let drain_cycles = c.drain_cycles.load(Relaxed);
    WindowStats {
        name: name.to_owned(),
        seconds,
        appends,
        appends_per_s: per_s(appends),
        append_latency: h.summary(),
        drain_cycles,
        drain_cycles_per_s: per_s(drain_cycles),
        drained_records: c.drained_records.load(Relaxed),
        moved_redirects: c.moved.load(Relaxed),
        busy_retries: c.busy.load(Relaxed),
        refused: c.refused.load(Relaxed),
        link_errors: c.link_errors.load(Relaxed),
        first_problem: c.first_problem.lock().expect("problem lock").clone(),
        checkpoints: None,
    }
}

/// What one load task works with.
struct Ctx {
    router: Arc<Router>,
    spec: LoadSpec,
    window: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
    counters: Arc<Vec<Counters>>,
    index: usize,
}

impl Ctx {
    /// Count a routed request's detours and failure in the current window;
    /// the window and its answer on success.
    fn account(&self, r: Routed, ledger: &mut Ledger, id: Option<u128>) -> Option<ResponseBody> {
        let c = &self.counters[self.window.load(Relaxed)];
        c.moved.fetch_add(r.moved, Relaxed);
        c.busy.fetch_add(r.busy, Relaxed);
        match r.answer {
            Ok(body) => Some(body),
            Err(RouteFail::Refused(why)) => {
                c.refused.fetch_add(1, Relaxed);
                c.problem(why);
                None
            }
            Err(RouteFail::Link(e)) => {
                c.link_errors.fetch_add(1, Relaxed);
                c.problem(format!("link: {e}"));
                ledger.unknown.extend(id);
                None
            }
        }
    }

    async fn write(self) -> TaskResult {
        let mut rng = Rng::new(self.spec.seed ^ (self.index as u64 + 1));
        let mut hists = vec![LatencyHist::new(); self.counters.len()];
        let mut ledger = Ledger::default();
        let mut n = 0;
        while !self.stop.load(Relaxed) {
            n += 1;
            let user = rng.below(self.spec.users);
            let id = msg_id(user, self.index + 1, n);
            let body = RequestBody::Append {
                user,
                msg_id: id,
                payload: payload(id, self.spec.payload_bytes),
            };
            let started = Instant::now();
            let routed = self.router.route(user, body).await;
            let elapsed = started.elapsed();
            match self.account(routed, &mut ledger, Some(id)) {
                Some(ResponseBody::Appended { .. }) => {
                    let w = self.window.load(Relaxed);
                    self.counters[w].appends.fetch_add(1, Relaxed);
                    hists[w].record(elapsed);
                    ledger.stored.push(id);
                }
                Some(other) => panic!("append answered {other:?}"),
                None => {}
            }
        }
        TaskResult { hists, ledger }
    }

    async fn drain(self) -> TaskResult {
        let mut rng = Rng::new(self.spec.seed ^ !(self.index as u64));
        let mut ledger = Ledger::default();
        while !self.stop.load(Relaxed) {
            let user = rng.below(self.spec.users);
            let fetch = RequestBody::Fetch {
                user,
                after_seq: 0,
                max_count: DRAIN_PAGE_COUNT,
                max_bytes: FETCH_BYTES_MAX,
            };
            let routed = self.router.route(user, fetch).await;
            let records = match self.account(routed, &mut ledger, None) {
                Some(ResponseBody::Records { records, .. }) => records,
                Some(other) => panic!("fetch answered {other:?}"),
                None => continue,
            };
            let Some(last) = records.last().map(|r| r.seq) else {
                continue;
            };
            let ack = RequestBody::Ack {
                user,
                up_to_seq: last,
            };
            let routed = self.router.route(user, ack).await;
            match self.account(routed, &mut ledger, None) {
                Some(ResponseBody::Acked { .. }) => {
                    let c = &self.counters[self.window.load(Relaxed)];
                    c.drain_cycles.fetch_add(1, Relaxed);
                    c.drained_records.fetch_add(records.len() as u64, Relaxed);
                    ledger.drained.extend(records.iter().map(|r| r.msg_id));
                }
                Some(other) => panic!("ack answered {other:?}"),
                None => {}
            }
        }
        TaskResult {
            hists: Vec::new(),
            ledger,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn message_ids_carry_their_user_and_payloads_their_id() {
        let id = msg_id(u64::MAX - 3, 7, 12345);
        assert_eq!(msg_user(id), u64::MAX - 3);
        assert_ne!(id, msg_id(u64::MAX - 3, 8, 12345));
        let p = payload(id, 200);
        assert_eq!(p.len(), 200);
        assert_eq!(u128::from_le_bytes(p[..16].try_into().unwrap()), id);
    }
}
