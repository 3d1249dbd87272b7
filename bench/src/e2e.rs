//! `imbench e2e`: the whole IM system end to end. Presence, profile and two
//! msgstore shards run in this process (crate `embedded`), the gateway
//! runs as its own process (its CPU time and datagrams are its own), and
//! simulated clients speak the real application protocol over real UDP
//! sessions (`e2e_fleet`). In the same run, the raw UDP echo ceiling of
//! `imbench session` gives the datagram rate the gateway is compared with.
//!
//! Phases: online messages between logged-in pairs (rate; latency of the
//! answer, send -> `Sent`, and of the delivery, send -> the push at the
//! recipient) in two shapes, a login storm (passwords, then resume tokens),
//! messages to offline users and their drain (`Fetch` + `Ack`). Every send
//! is stored in the recipient's mailbox before it is answered `Sent{seq}`
//! and pushed after (application protocol v2, `docs/PROTOCOL.md` §6.4).
//! Every message id a receiver gets (each mailbox seq once) is checked
//! against what senders were told. The two online shapes:
//! * bulk: few pairs with many sends in flight each (`--pairs`, `--window`):
//!   the most messages per second, several messages per datagram;
//! * chat: many pairs with one send in flight each (`--chat-pairs`), as
//!   people chat: every message, push, reply and acknowledgement travels in
//!   a datagram of its own, so this is where the gateway handles the most
//!   datagrams per second, and where `datagrams_vs_raw_udp` is measured.

use crate::{
    e2e_direct,
    e2e_fleet::{Counters, Fleet, Log, PlannedLogin, Role, BODY_BYTES},
    e2e_report::{self, Delivery, E2eReport, LoginResult, OfflineResult, OnlineResult, RawResult},
    e2e_storm, procs,
    udp_load::{self, LoadShared, RawPeer},
};
use anyhow::{bail, ensure, Context, Result};
use embedded::{Embedded, EmbeddedConfig};
use netio::udp;
use profile::{passwords::Hasher, ProfileClient};
use proto::{
    app::LoginMethod,
    profile::{ImportUser, IMPORT_USERS_MAX},
};
use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    process::Command,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};
use tokio::{sync::oneshot, task::JoinHandle};

const PASSWORD: &str = "e2e bench password";
/// How long the gateway may take to start.
const START_TIMEOUT: Duration = Duration::from_secs(30);
/// Longest any phase may wait for its logins or messages (guards hangs).
const PHASE_TIMEOUT: Duration = Duration::from_secs(120);
const POLL: Duration = Duration::from_millis(5);
/// Time the fleets get to send their sessions' CLOSEs before they stop.
const CLOSE_GRACE: Duration = Duration::from_millis(200);
/// Load before a timed window starts.
const WARMUP: Duration = Duration::from_millis(500);
/// Raw UDP echo: payload, sockets and datagrams in flight per socket.
const RAW_PAYLOAD_BYTES: usize = 100;
const RAW_CLIENTS: usize = 4;
const RAW_WINDOW: usize = 16;
/// The gateway's limits for the run: per-IP handshakes and per-user
/// message rates raised (every simulated client shares 127.0.0.1). Its
/// `/metrics` address goes before it.
const GATEWAY_LIMITS: &str = "\
[limits]
handshakes_per_ip_per_s = 1000000
messages_per_user_per_s = 1000000
messages_burst = 1000000
";

#[derive(clap::Args, Debug, Clone)]
pub struct E2eArgs {
    /// Small phases: the run takes under a minute.
    #[arg(long)]
    pub quick: bool,
    /// Also write the results as JSON to this file.
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// Sender/receiver pairs of the online phase and of the offline phase.
    #[arg(long, default_value_t = 64)]
    pub pairs: usize,
    /// Sends outstanding per sender (at most the gateway's
    /// requests_in_flight_per_session_max, 64).
    #[arg(long, default_value_t = 32)]
    pub window: usize,
    /// Sender/receiver pairs of the chat-shaped online phase (one send in
    /// flight per sender).
    #[arg(long, default_value_t = 256)]
    pub chat_pairs: usize,
    /// Length of the online phase's timed window [default: 10; quick: 3].
    #[arg(long)]
    pub duration_secs: Option<f64>,
    /// Sockets the clients of one role are spread over.
    #[arg(long, default_value_t = 4)]
    pub sockets: usize,
    /// Password logins of the login storm [default: 1000; quick: 150].
    #[arg(long)]
    pub password_logins: Option<usize>,
    /// Resume-token logins of the login storm [default: 20000; quick: 2000].
    #[arg(long)]
    pub resume_logins: Option<usize>,
    /// Handshakes in flight at once in the login storm.
    #[arg(long, default_value_t = 128)]
    pub logins_in_flight: usize,
    /// Idle sessions of the reconnect storm [default: 50000; quick: 5000].
    #[arg(long)]
    pub storm_sessions: Option<usize>,
    /// Messages stored for offline users, in all (at most 10,000 per receiver, a mailbox's default limit) [default: 600000; quick: 300000].
    #[arg(long)]
    pub offline_messages: Option<usize>,
    /// Run only these phases (comma-separated), e.g. to profile one; the
    /// figures of phases not run are absent.
    #[arg(long, value_enum, value_delimiter = ',', default_values_t = E2ePhase::all())]
    pub phases: Vec<E2ePhase>,
    /// The gateway binary [default: next to imbench].
    #[arg(long, value_name = "PATH")]
    pub gateway_bin: Option<PathBuf>,
}

/// A selectable part of the e2e benchmark.
#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum E2ePhase {
    /// Online messages, bulk shape.
    Online,
    /// Online messages, chat shape.
    Chat,
    /// The login storm (passwords, then resume tokens).
    Logins,
    /// Messages to offline users, the same shards driven directly, the drain.
    Offline,
    /// Idle sessions, the gateway restarted, every session back.
    Storm,
}

impl E2ePhase {
    fn all() -> Vec<E2ePhase> {
        vec![
            E2ePhase::Online,
            E2ePhase::Chat,
            E2ePhase::Logins,
            E2ePhase::Offline,
            E2ePhase::Storm,
        ]
    }
}

/// The figures a run uses, defaults resolved.
pub struct Plan {
    pub pairs: usize,
    pub window: usize,
    pub chat_pairs: usize,
    pub duration: Duration,
    pub sockets: usize,
    pub password_logins: usize,
    pub resume_logins: usize,
    pub logins_in_flight: usize,
    pub offline_per_sender: u64,
    pub storm_sessions: usize,
    pub phases: Vec<E2ePhase>,
}

impl Plan {
    fn new(a: &E2eArgs) -> Result<Plan> {
        let pick = |v: Option<usize>, full, quick| v.unwrap_or(if a.quick { quick } else { full });
        let pairs = a.pairs;
        ensure!(
            pairs > 0 && a.chat_pairs > 0 && a.sockets > 0,
            "need pairs, chat pairs and sockets > 0"
        );
        ensure!((1..=64).contains(&a.window), "window must be 1..=64");
        let offline = pick(a.offline_messages, 600_000, 300_000);
        Ok(Plan {
            pairs,
            window: a.window,
            chat_pairs: a.chat_pairs,
            duration: Duration::from_secs_f64(a.duration_secs.unwrap_or(if a.quick {
                3.0
            } else {
                10.0
            })),
            sockets: a.sockets,
            password_logins: pick(a.password_logins, 1000, 150).max(1),
            resume_logins: pick(a.resume_logins, 20_000, 2_000),
            logins_in_flight: a.logins_in_flight.max(1),
            offline_per_sender: offline.div_ceil(pairs) as u64,
            storm_sessions: pick(a.storm_sessions, 50_000, 5_000).max(1),
            phases: a.phases.clone(),
        })
    }

    pub fn config_json(&self, quick: bool) -> serde_json::Value {
        serde_json::json!({
            "quick": quick,
            "pairs": self.pairs,
            "window": self.window,
            "chat_pairs": self.chat_pairs,
            "chat_window": 1,
            "duration_secs": self.duration.as_secs_f64(),
            "sockets_per_role": self.sockets,
            "password_logins": self.password_logins,
            "resume_logins": self.resume_logins,
            "logins_in_flight": self.logins_in_flight,
            "offline_messages": self.offline_per_sender * self.pairs as u64,
            "storm_sessions": self.storm_sessions,
            "body_bytes": BODY_BYTES,
            "raw_udp": {"payload_bytes": RAW_PAYLOAD_BYTES, "sockets": RAW_CLIENTS, "window": RAW_WINDOW},
            "gateway_limits": "handshakes_per_ip_per_s, messages_per_user_per_s and messages_burst raised to 1,000,000 (--config)",
            "gateway": "separate process; presence, profile, 2 shards in imbench's process",
        })
    }
}

pub async fn run(args: E2eArgs) -> Result<()> {
    let plan = Plan::new(&args)?;
    let mut report = E2eReport::new(plan.config_json(args.quick));
    report.raw_udp = Some(raw_ceiling(plan.duration).await?);
    let dir = tempfile::tempdir().context("a temporary directory")?;
    let cluster = Cluster::start(dir.path(), args.gateway_bin.as_deref()).await?;
    let result = run_phases(&cluster, &plan, &mut report).await;
    report.gateway_peak_rss_bytes = cluster.gateway().peak_rss_bytes().ok();
    cluster.stop().await;
    if let Err(e) = result {
        report.problems.push(format!("{e:#}"));
    }
    report.finish();
    print!("{}", e2e_report::render(&report, &plan));
    if let Some(path) = &args.json {
        crate::report::write_json(path, "e2e", &report)?;
    }
    Ok(())
}

async fn run_phases(cluster: &Cluster, plan: &Plan, report: &mut E2eReport) -> Result<()> {
    let mut logs = Vec::new();
    let wanted = |p: E2ePhase| plan.phases.contains(&p);
    if wanted(E2ePhase::Online) {
        let (online, online_logs) = online_phase(cluster, plan, plan.pairs, plan.window).await?;
        report.online = Some(online);
        report.note_problems("online", &online_logs);
        logs.extend(online_logs);
    }
    if wanted(E2ePhase::Chat) {
        let (chat, chat_logs) = online_phase(cluster, plan, plan.chat_pairs, 1).await?;
        report.chat = Some(chat);
        report.note_problems("chat", &chat_logs);
        logs.extend(chat_logs);
    }
    if wanted(E2ePhase::Logins) {
        let (logins, storm_logs) = login_storm(cluster, plan).await?;
        // Right after the storm, on the same machine state.
        match crate::responder_crypto::measure() {
            Ok(c) => report.responder_crypto = Some(c),
            Err(e) => report.problems.push(format!("X25519 cost: {e}")),
        }
        report.logins = logins;
        report.note_problems("login storm", &storm_logs);
        logs.extend(storm_logs);
    }
    if wanted(E2ePhase::Offline) {
        offline_and_direct(cluster, plan, report, &mut logs).await?;
    }
    if wanted(E2ePhase::Storm) {
        let (storm, storm_logs) = e2e_storm::run(cluster, plan).await?;
        report.storm = Some(storm);
        report.note_problems("reconnect storm", &storm_logs);
        logs.extend(storm_logs);
    }
    report.delivery = Some(Delivery::check(&logs));
    Ok(())
}

/// The offline phase, then the same shards driven directly in its shape.
async fn offline_and_direct(
    cluster: &Cluster,
    plan: &Plan,
    report: &mut E2eReport,
    logs: &mut Vec<Log>,
) -> Result<()> {
    let before = cluster.stores().await?;
    let (offline, offline_logs) = offline_phase(cluster, plan).await?;
    let after = cluster.stores().await?;
    let (stores, items) = (after.0 - before.0, after.1 - before.1);
    ensure!(
        stores > 0.0,
        "the gateway counted no store in the offline phase"
    );
    let shape = e2e_direct::Shape {
        conversations: plan.pairs,
        items_per_store: (items / stores).round().max(1.0) as usize,
        messages: offline.stored as u64,
    };
    report.offline_direct = Some(e2e_direct::drive(cluster.services.map.clone(), shape).await?);
    report.offline = Some(offline);
    report.note_problems("offline", &offline_logs);
    logs.extend(offline_logs);
    Ok(())
}

/// The services in-process, the gateway as a process, and a profile client.
pub(crate) struct Cluster {
    pub(crate) services: Embedded,
    /// The gateway process (a new one after [`Cluster::restart_gateway`]).
    gateway: std::sync::Mutex<procs::ChildProc>,
    /// How the gateway is started (again on the same address and keys).
    launch: GatewayLaunch,
    pub(crate) addr: SocketAddr,
    /// The gateway's `/metrics`.
    metrics: SocketAddr,
    public: [u8; 32],
    profile: ProfileClient,
    next_user: AtomicU64,
}

/// The gateway's command line, but for its UDP address.
struct GatewayLaunch {
    bin: PathBuf,
    cluster: PathBuf,
    data: PathBuf,
    config: PathBuf,
}

impl GatewayLaunch {
    fn start(&self, listen: SocketAddr) -> Result<(procs::ChildProc, SocketAddr)> {
        let mut cmd = Command::new(&self.bin);
        cmd.arg("--listen")
            .arg(listen.to_string())
            .args(["--peer-listen", "127.0.0.1:0"])
            .arg("--cluster")
            .arg(&self.cluster)
            .arg("--data")
            .arg(&self.data)
            .arg("--config")
            .arg(&self.config);
        if std::env::var_os("RUST_LOG").is_none() {
            cmd.env("RUST_LOG", "warn");
        }
        procs::start_daemon("gateway", &mut cmd, START_TIMEOUT)
    }
}

impl Cluster {
    async fn start(dir: &Path, gateway_bin: Option<&Path>) -> Result<Cluster> {
        let bin = procs::locate_sibling("gateway", "gateway", gateway_bin)?;
        let services = Embedded::start(EmbeddedConfig::ephemeral(dir.to_path_buf(), 2))
            .await
            .context("start presence, profile and the shards")?;
        let config = dir.join("gateway.toml");
        let metrics = SocketAddr::from(([127, 0, 0, 1], procs::free_loopback_port()?));
        let toml = format!("metrics_addr = \"{metrics}\"\n{GATEWAY_LIMITS}");
        std::fs::write(&config, toml).context("write the gateway's config")?;
        let launch = GatewayLaunch {
            bin,
            cluster: services.cluster_path(),
            data: dir.join("gateway"),
            config,
        };
        let (gateway, addr) = launch.start(SocketAddr::from(([127, 0, 0, 1], 0)))?;
        let hex = std::fs::read_to_string(launch.data.join("gateway.pub"))
            .context("read the gateway's public key")?;
        let public = gateway::keys::from_hex(hex.trim()).context("the gateway's public key")?;
        let profile = ProfileClient::connect(services.map.profile.clone()).await?;
        Ok(Cluster {
            services,
            gateway: std::sync::Mutex::new(gateway),
            launch,
            addr,
            metrics,
            public,
            profile,
            next_user: AtomicU64::new(0),
        })
    }

    fn gateway(&self) -> std::sync::MutexGuard<'_, procs::ChildProc> {
        self.gateway.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Stop the gateway with SIGTERM (it closes every session) and start
    /// it again on the same address with the same keys; the seconds it was
    /// down (from the signal until it listens again).
    pub(crate) fn restart_gateway(&self) -> Result<f64> {
        let t0 = Instant::now();
        let launch = &self.launch;
        let addr = self.addr;
        let mut gateway = self.gateway();
        gateway.terminate(START_TIMEOUT)?;
        let (fresh, again) = launch.start(addr)?;
        ensure!(
            again == addr,
            "the gateway came back on {again}, not {addr}"
        );
        *gateway = fresh;
        Ok(t0.elapsed().as_secs_f64())
    }

    /// Resume tokens for `users` (fresh accounts, never logged in) signed
    /// with the gateway's token key, as their earlier logins would have
    /// been given.
    pub(crate) async fn mint_tokens(&self, users: &[u64]) -> Result<Vec<Vec<u8>>> {
        let key =
            gateway::keys::load_or_create(&self.launch.data.join(gateway::keys::TOKEN_KEY_FILE))?;
        let keys = gateway::resume::TokenKeys::cluster(key);
        let probe = users.first().copied().into_iter().collect();
        let epoch = self
            .profile
            .relations(probe)
            .await?
            .first()
            .map_or(0, |r| r.credential_epoch);
        let now_s = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)?
            .as_secs();
        Ok(users
            .iter()
            .map(|&user| {
                let claims = gateway::resume::ResumeClaims {
                    user,
                    issued_at_s: now_s,
                    expires_at_s: now_s + 3600,
                    credential_epoch: epoch,
                };
                let mut nonce = [0u8; gateway::resume::NONCE_BYTES];
                nonce[..8].copy_from_slice(&user.to_le_bytes());
                keys.issue(claims, nonce).to_vec()
            })
            .collect())
    }

    /// `n` new accounts sharing one password hash; their ids.
    pub(crate) async fn users(&self, n: usize) -> Result<Vec<u64>> {
        let hasher = Hasher::for_service(&self.profile.info().await?)?;
        let phc = hasher.hash(PASSWORD.as_bytes())?;
        let first = self.next_user.fetch_add(n as u64, Ordering::Relaxed);
        let mut ids = Vec::with_capacity(n);
        for start in (0..n).step_by(IMPORT_USERS_MAX) {
            let batch = (start..(start + IMPORT_USERS_MAX).min(n))
                .map(|i| ImportUser {
                    username: username(first + i as u64).into_bytes(),
                    phc: phc.clone(),
                })
                .collect();
            for r in self.profile.import_users(batch).await? {
                ids.push(r.map_err(|e| anyhow::anyhow!("import a user: {}", e.message))?);
            }
        }
        Ok(ids)
    }

    /// `n` fresh users, each to log in once with a resume token
    /// ([`Cluster::mint_tokens`]) and then act as `role`.
    pub(crate) async fn resume_logins(&self, n: usize, role: Role) -> Result<Vec<PlannedLogin>> {
        let users = self.users(n).await?;
        let tokens = self.mint_tokens(&users).await?;
        Ok(users
            .into_iter()
            .zip(tokens)
            .map(|(user, token)| PlannedLogin {
                user,
                method: LoginMethod::Resume { token },
                role,
            })
            .collect())
    }

    /// Make `a[i]` and `b[i]` friends (only friends may write to each
    /// other).
    async fn befriend(&self, a: &[u64], b: &[u64]) -> Result<()> {
        let pairs: Vec<(u64, u64)> = a.iter().copied().zip(b.iter().copied()).collect();
        for chunk in pairs.chunks(proto::profile::IMPORT_FRIENDSHIPS_MAX) {
            self.profile
                .import_friendships("Friends", chunk.to_vec())
                .await
                .context("make the pairs friends")?;
        }
        Ok(())
    }

    /// The gateway's stores to shards and the messages in them so far.
    async fn stores(&self) -> Result<(f64, f64)> {
        let text = crate::group_cluster::scrape(self.metrics).await?;
        Ok((
            crate::group_cluster::metric_sum(&text, "gateway_stores_total"),
            crate::group_cluster::metric_sum(&text, "gateway_stored_items_total"),
        ))
    }

    fn gateway_cpu(&self) -> Option<Duration> {
        procs::cpu_time(self.gateway().pid()).ok()
    }

    async fn stop(self) {
        let _ = self.gateway().kill_now();
        self.services.shutdown().await;
    }
}

fn username(n: u64) -> String {
    format!("e2e{n}")
}

fn password_login(ids: &[u64], first: u64, role: impl Fn(usize) -> Role) -> Vec<PlannedLogin> {
    ids.iter()
        .enumerate()
        .map(|(i, &user)| PlannedLogin {
            user,
            method: LoginMethod::Password {
                username: username(first + i as u64),
                password: PASSWORD.into(),
            },
            role: role(i),
        })
        .collect()
}

/// Fleets running on `sockets` sockets until stopped.
pub(crate) struct Running {
    counters: Arc<Counters>,
    shared: Arc<LoadShared>,
    tasks: Vec<JoinHandle<Result<Fleet>>>,
}

impl Running {
    pub(crate) fn launch(
        cluster: &Cluster,
        logins: Vec<PlannedLogin>,
        sockets: usize,
        handshakes_max: usize,
        counters: &Arc<Counters>,
    ) -> Result<Running> {
        let shared = Arc::new(LoadShared::default());
        let mut parts: Vec<Vec<PlannedLogin>> = (0..sockets).map(|_| Vec::new()).collect();
        // By user, so one fleet serializes a user's logins.
        for l in logins {
            parts[l.user as usize % sockets].push(l);
        }
        let mut tasks = Vec::new();
        for part in parts.into_iter().filter(|p| !p.is_empty()) {
            let socket = udp::bind("127.0.0.1:0".parse().expect("valid"))?;
            let fleet = Fleet::new(
                cluster.public,
                part,
                handshakes_max.div_ceil(sockets),
                counters.clone(),
            );
            tasks.push(tokio::spawn(udp_load::drive(
                fleet,
                socket,
                cluster.addr,
                shared.clone(),
            )));
        }
        Ok(Running {
            counters: counters.clone(),
            shared,
            tasks,
        })
    }

    /// `logins` as a login storm runs them: over the plan's sockets,
    /// `logins_in_flight` handshakes at once.
    pub(crate) fn storm(
        cluster: &Cluster,
        plan: &Plan,
        logins: Vec<PlannedLogin>,
        counters: &Arc<Counters>,
    ) -> Result<Running> {
        Running::launch(
            cluster,
            logins,
            plan.sockets,
            plan.logins_in_flight,
            counters,
        )
    }

    /// Close every session (so the gateway forgets them), then stop.
    pub(crate) async fn stop(self) -> Result<Vec<Log>> {
        self.counters.close.store(true, Ordering::Relaxed);
        tokio::time::sleep(CLOSE_GRACE).await;
        self.shared.stop.store(true, Ordering::Relaxed);
        let mut logs = Vec::new();
        for t in self.tasks {
            logs.push(t.await??.log);
        }
        Ok(logs)
    }
}

/// Wait until `done` (checked every few ms); fails after PHASE_TIMEOUT.
pub(crate) async fn wait_for(what: &str, mut done: impl FnMut() -> bool) -> Result<()> {
    let deadline = Instant::now() + PHASE_TIMEOUT;
    while !done() {
        if Instant::now() >= deadline {
            bail!("timed out after {PHASE_TIMEOUT:?} waiting for {what}");
        }
        tokio::time::sleep(POLL).await;
    }
    Ok(())
}

fn load(c: &AtomicU64) -> u64 {
    c.load(Ordering::Relaxed)
}

/// Logins accepted or failed reach `n`.
async fn wait_logins(counters: &Counters, n: usize, what: &str) -> Result<()> {
    wait_for(what, || {
        load(&counters.logins) + load(&counters.login_failures) >= n as u64
    })
    .await
}

/// Receivers log in first (so every send finds its recipient online), then
/// `pairs` senders send with `window` outstanding until the timed window
/// ends.
async fn online_phase(
    cluster: &Cluster,
    plan: &Plan,
    pairs: usize,
    window: usize,
) -> Result<(OnlineResult, Vec<Log>)> {
    let first = load(&cluster.next_user);
    let ids = cluster.users(2 * pairs).await?;
    let (senders, receivers) = ids.split_at(pairs);
    cluster.befriend(senders, receivers).await?;
    let counters = Arc::new(Counters::default());
    let logins = password_login(receivers, first + pairs as u64, |_| Role::Receiver);
    let rx = Running::launch(cluster, logins, plan.sockets, pairs, &counters)?;
    wait_logins(&counters, pairs, "the online receivers' logins").await?;
    let role = |i: usize| Role::Sender {
        to: receivers[i],
        window,
        count: u64::MAX,
    };
    let tx = Running::launch(
        cluster,
        password_login(senders, first, role),
        plan.sockets,
        pairs,
        &counters,
    )?;
    wait_logins(&counters, 2 * pairs, "the online senders' logins").await?;
    counters.go.store(true, Ordering::Relaxed);
    tokio::time::sleep(WARMUP).await;
    let start = Snapshot::take(&counters, cluster);
    tokio::time::sleep(plan.duration).await;
    let end = Snapshot::take(&counters, cluster);
    // Leave nothing behind: every send answered, then every receiver
    // fetches what it did not see pushed (pushes follow the answers).
    counters.quiesce.store(true, Ordering::Relaxed);
    let failed = || load(&counters.login_failures);
    wait_for("the online sends' last answers", || {
        load(&counters.senders_idle) + failed() >= pairs as u64
    })
    .await?;
    counters.catch_up.store(true, Ordering::Relaxed);
    wait_for("the online receivers' last fetch", || {
        load(&counters.caught_up) + failed() >= pairs as u64
    })
    .await?;
    let mut logs = tx.stop().await?;
    logs.extend(rx.stop().await?);
    Ok((
        OnlineResult::new((pairs, window), &start, &end, &logs),
        logs,
    ))
}

/// Counters and the gateway's CPU time at one instant.
pub struct Snapshot {
    pub at: Instant,
    pub ops_ok: u64,
    pub datagrams: u64,
    pub gateway_cpu: Option<Duration>,
    /// This process: the clients, presence, profile and the shards.
    pub imbench_cpu: Option<Duration>,
}

impl Snapshot {
    fn take(c: &Counters, cluster: &Cluster) -> Snapshot {
        Snapshot {
            at: Instant::now(),
            ops_ok: load(&c.ops_ok),
            datagrams: load(&c.datagrams_in) + load(&c.datagrams_out),
            gateway_cpu: cluster.gateway_cpu(),
            imbench_cpu: procs::cpu_time(std::process::id()).ok(),
        }
    }
}

/// Password logins of fresh users (each session closed as soon as it is
/// accepted), then resume logins of other fresh users, who stay logged in.
async fn login_storm(cluster: &Cluster, plan: &Plan) -> Result<(Vec<LoginResult>, Vec<Log>)> {
    let first = load(&cluster.next_user);
    let ids = cluster.users(plan.password_logins).await?;
    let logins = password_login(&ids, first, |_| Role::LoginOnly);
    let (password, mut logs) = storm(cluster, plan, "password", logins).await?;
    // Distinct users who stay logged in, as after a gateway restart: a
    // login that closed at once would count its logout in the login's
    // CPU, and one user logging in again and again its session's
    // replacement.
    let logins = cluster
        .resume_logins(plan.resume_logins, Role::Reconnecting)
        .await?;
    let (resume, resume_logs) = storm(cluster, plan, "resume", logins).await?;
    logs.extend(resume_logs);
    Ok((vec![password, resume], logs))
}

async fn storm(
    cluster: &Cluster,
    plan: &Plan,
    method: &str,
    logins: Vec<PlannedLogin>,
) -> Result<(LoginResult, Vec<Log>)> {
    let n = logins.len();
    let counters = Arc::new(Counters::default());
    let t = Instant::now();
    let cpu = cluster.gateway_cpu();
    let running = Running::storm(cluster, plan, logins, &counters)?;
    wait_logins(&counters, n, &format!("{n} {method} logins")).await?;
    let secs = t.elapsed().as_secs_f64();
    let cpu = cluster.gateway_cpu().zip(cpu).map(|(b, a)| b - a);
    let logs = running.stop().await?;
    let ok = load(&counters.logins);
    let result = LoginResult {
        method: method.into(),
        logins: ok,
        failed: load(&counters.login_failures),
        secs,
        logins_per_sec: ok as f64 / secs,
        gateway_cpu_us_per_login: cpu
            .filter(|_| ok > 0)
            .map(|c| c.as_secs_f64() * 1e6 / ok as f64),
    };
    Ok((result, logs))
}

/// Senders send to users who never logged in (stored in their mailboxes,
/// answered `Sent`); then the receivers log in and drain their mailboxes.
async fn offline_phase(cluster: &Cluster, plan: &Plan) -> Result<(OfflineResult, Vec<Log>)> {
    let first = load(&cluster.next_user);
    let ids = cluster.users(2 * plan.pairs).await?;
    let (senders, receivers) = ids.split_at(plan.pairs);
    cluster.befriend(senders, receivers).await?;
    let total = plan.offline_per_sender * plan.pairs as u64;
    let counters = Arc::new(Counters::default());
    let role = |i: usize| Role::Sender {
        to: receivers[i],
        window: plan.window,
        count: plan.offline_per_sender,
    };
    let tx = Running::launch(
        cluster,
        password_login(senders, first, role),
        plan.sockets,
        plan.pairs,
        &counters,
    )?;
    wait_logins(&counters, plan.pairs, "the offline senders' logins").await?;
    let start = Snapshot::take(&counters, cluster);
    counters.go.store(true, Ordering::Relaxed);
    wait_for("the offline sends' answers", || {
        load(&counters.ops_finished) >= total
    })
    .await?;
    let end = Snapshot::take(&counters, cluster);
    let mut logs = tx.stop().await?;
    let drain = Arc::new(Counters::default());
    let logins = password_login(receivers, first + plan.pairs as u64, |_| Role::Receiver);
    let rx = Running::launch(cluster, logins, plan.sockets, plan.pairs, &drain)?;
    wait_logins(&drain, plan.pairs, "the offline receivers' logins").await?;
    let drain_start = Instant::now();
    drain.go.store(true, Ordering::Relaxed);
    wait_for("the receivers' drains", || {
        load(&drain.drains_done) + load(&drain.login_failures) >= plan.pairs as u64
    })
    .await?;
    let drain_secs = drain_start.elapsed().as_secs_f64();
    logs.extend(rx.stop().await?);
    let drained = load(&drain.fetched);
    Ok((
        OfflineResult::new(&start, &end, &logs, drained, drain_secs),
        logs,
    ))
}

/// The raw UDP echo ceiling (`imbench session`'s server and peer): echo
/// server on its own thread, clients in this runtime; datagrams per second
/// counted both ways.
async fn raw_ceiling(duration: Duration) -> Result<RawResult> {
    let (addr_tx, addr_rx) = oneshot::channel();
    let (stop_tx, stop_rx) = oneshot::channel::<()>();
    let server = std::thread::Builder::new()
        .name("raw-echo".into())
        .spawn(move || -> Result<()> {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            rt.block_on(async move {
                let socket = udp::bind("127.0.0.1:0".parse().expect("valid"))?;
                let _ = addr_tx.send(socket.local_addr()?);
                tokio::select! {
                    r = udp_load::raw_echo_server(socket) => r,
                    _ = stop_rx => Ok(()),
                }
            })
        })
        .context("spawn the raw echo server")?;
    let addr = addr_rx.await.context("the raw echo server did not start")?;
    let shared = Arc::new(LoadShared::default());
    let mut tasks = Vec::new();
    for _ in 0..RAW_CLIENTS {
        let socket = udp::bind("127.0.0.1:0".parse().expect("valid"))?;
        let peer = RawPeer::new(vec![7; RAW_PAYLOAD_BYTES], RAW_WINDOW);
        tasks.push(tokio::spawn(udp_load::drive(
            peer,
            socket,
            addr,
            shared.clone(),
        )));
    }
    tokio::time::sleep(WARMUP).await;
    let (t0, n0) = (Instant::now(), load(&shared.completed));
    tokio::time::sleep(duration).await;
    let (t1, n1) = (Instant::now(), load(&shared.completed));
    shared.stop.store(true, Ordering::Relaxed);
    for t in tasks {
        t.await??;
    }
    let _ = stop_tx.send(());
    server
        .join()
        .map_err(|_| anyhow::anyhow!("the raw echo server panicked"))??;
    let secs = (t1 - t0).as_secs_f64();
    let round_trips = n1 - n0;
    Ok(RawResult {
        round_trips,
        secs,
        round_trips_per_sec: round_trips as f64 / secs,
        datagrams_per_sec: 2.0 * round_trips as f64 / secs,
    })
}
