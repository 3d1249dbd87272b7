//! `imbench session`: the UDP session layer against the raw UDP echo
//! ceiling over real loopback sockets, handshakes per second, and bytes
//! per idle session, all in one run.
//!
//! Each echo phase runs the server on one thread and the load generator
//! on another (each a current-thread tokio runtime; the machine has two
//! cores), with the same batching (`recvmmsg`/`sendmmsg`, 32 datagrams)
//! and the same window of requests in flight on both targets.

use crate::{
    idle_sessions::{self, IdleResult},
    procs,
    report::{self, fmt_rate},
    udp_load::{self, HandshakePeer, LoadShared, Peer, RawPeer, SessionPeer},
};
use anyhow::{ensure, Context, Result};
use client::{EchoConfig, EchoServer, EchoStats};
use netio::udp;
use proto::session::{CookieMode, ServerConfig, StaticKeypair};
use serde::Serialize;
use std::{
    fmt::Write as _,
    net::SocketAddr,
    path::PathBuf,
    sync::{atomic::Ordering, mpsc, Arc},
    thread::JoinHandle,
    time::{Duration, Instant},
};
use tokio::sync::watch;

/// Load before the timed window starts (handshakes, warm caches).
const WARMUP: Duration = Duration::from_millis(500);
const WARMUP_QUICK: Duration = Duration::from_millis(300);
/// Largest echo payload: one message in one datagram.
const PAYLOAD_BYTES_MAX: usize = proto::session::wire::FRAG_DATA_MAX;
/// How long a phase's threads may take to start or stop.
const THREAD_TIMEOUT: Duration = Duration::from_secs(30);
/// The idle-memory target of the issue, bytes per idle session.
const IDLE_SESSION_BYTES_TARGET: f64 = 512.0;

#[derive(clap::Args, Debug, Clone)]
pub struct SessionArgs {
    /// Short phases and 100,000 idle sessions: the run takes under a minute.
    #[arg(long)]
    pub quick: bool,
    /// Also write the results as JSON to this file.
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// Client sockets (raw) / sessions (ours) of the echo load.
    #[arg(long, default_value_t = 4)]
    pub clients: usize,
    /// Requests in flight in total, split evenly across the clients.
    #[arg(long, default_value_t = 64)]
    pub window: usize,
    #[arg(long, default_value_t = 100)]
    pub payload_bytes: usize,
    /// Payload of the second pair of echo phases: too large for two
    /// messages to share a datagram, so both targets send the same number
    /// of datagrams.
    #[arg(long, default_value_t = 1000)]
    pub large_payload_bytes: usize,
    /// Length of each timed phase [default: 5; quick: 1.5].
    #[arg(long)]
    pub duration_secs: Option<f64>,
    /// Handshakes in flight at once in the handshake phase.
    #[arg(long, default_value_t = 256)]
    pub handshakes_in_flight: usize,
    /// Idle sessions built in-process [default: 1,000,000; quick: 100,000].
    #[arg(long)]
    pub idle_sessions: Option<usize>,
}

/// One timed phase over loopback.
#[derive(Debug, Clone, Serialize)]
pub struct PhaseResult {
    /// `echo` (`--payload-bytes`), `echo_large` (`--large-payload-bytes`)
    /// or `handshake`.
    pub phase: String,
    /// `raw_udp` or `session`.
    pub target: String,
    /// Round trips (echo) or handshakes completed in the window.
    pub ops: u64,
    pub elapsed_secs: f64,
    pub ops_per_sec: f64,
    /// CPU time of the server thread per op, microseconds.
    pub server_cpu_us_per_op: Option<f64>,
    /// CPU time of the load-generator thread per op, microseconds.
    pub client_cpu_us_per_op: Option<f64>,
    /// Our echo server's counters over the whole phase (warm-up included).
    pub server: Option<EchoServerSummary>,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct Ratios {
    /// Our encrypted reliable echo's round trips/s over the raw UDP echo's
    /// (`--payload-bytes`; small messages may share a datagram).
    pub echo_vs_raw_udp: Option<f64>,
    /// The same with `--large-payload-bytes` (one message per datagram).
    pub echo_large_vs_raw_udp: Option<f64>,
    /// Two echo loops on one port (SO_REUSEPORT, a thread each) over one
    /// loop, `--large-payload-bytes`: whether a gateway pays for a loop per
    /// core on this machine (the load generator shares its cores).
    pub reuseport_x2_vs_one_loop: Option<f64>,
}

/// Our echo server's counters after a phase.
#[derive(Debug, Clone, Serialize)]
pub struct EchoServerSummary {
    pub datagrams_in: u64,
    pub datagrams_out: u64,
    pub dropped: u64,
    pub messages: u64,
    pub echo_dropped: u64,
    pub handshakes_accepted: u64,
}

impl EchoServerSummary {
    /// The sum over several server loops.
    fn sum(all: &[EchoStats]) -> Option<Self> {
        let mut parts = all.iter().map(EchoServerSummary::from);
        let first = parts.next()?;
        Some(parts.fold(first, |a, b| EchoServerSummary {
            datagrams_in: a.datagrams_in + b.datagrams_in,
            datagrams_out: a.datagrams_out + b.datagrams_out,
            dropped: a.dropped + b.dropped,
            messages: a.messages + b.messages,
            echo_dropped: a.echo_dropped + b.echo_dropped,
            handshakes_accepted: a.handshakes_accepted + b.handshakes_accepted,
        }))
    }
}

impl From<&EchoStats> for EchoServerSummary {
    fn from(s: &EchoStats) -> Self {
        EchoServerSummary {
            datagrams_in: s.endpoint.datagrams_in,
            datagrams_out: s.endpoint.datagrams_out,
            dropped: s.dropped_total(),
            messages: s.messages,
            echo_dropped: s.echo_dropped,
            handshakes_accepted: s.endpoint.handshakes_accepted,
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct SessionReport {
    pub ratios: Ratios,
    /// `idle.rss_bytes_per_session`: resident-set growth per idle session.
    pub bytes_per_idle_session: Option<f64>,
    pub config: serde_json::Value,
    pub phases: Vec<PhaseResult>,
    pub idle: Option<IdleResult>,
    pub problems: Vec<String>,
}

struct Plan {
    duration: Duration,
    warmup: Duration,
    idle_sessions: usize,
    per_client_window: usize,
}

pub async fn run(args: SessionArgs) -> Result<()> {
    ensure!(
        args.clients > 0 && args.window >= args.clients,
        "need window >= clients > 0"
    );
    for bytes in [args.payload_bytes, args.large_payload_bytes] {
        ensure!(
            (1..=PAYLOAD_BYTES_MAX).contains(&bytes),
            "payloads must be 1..={PAYLOAD_BYTES_MAX} bytes (one datagram)"
        );
    }
    let default_secs = if args.quick { 1.5 } else { 5.0 };
    let plan = Plan {
        duration: Duration::from_secs_f64(args.duration_secs.unwrap_or(default_secs)),
        warmup: if args.quick { WARMUP_QUICK } else { WARMUP },
        idle_sessions: args
            .idle_sessions
            .unwrap_or(if args.quick { 100_000 } else { 1_000_000 }),
        per_client_window: args.window / args.clients,
    };
    let mut report = SessionReport {
        ratios: Ratios::default(),
        bytes_per_idle_session: None,
        config: config_json(&args, &plan),
        phases: Vec::new(),
        idle: None,
        problems: Vec::new(),
    };
    // First, while the heap is fresh: the idle sessions (blocking work).
    let n = plan.idle_sessions;
    match tokio::task::spawn_blocking(move || idle_sessions::measure(n)).await? {
        Ok(idle) => report.idle = Some(idle),
        Err(e) => report.problems.push(format!("idle sessions: {e:#}")),
    }
    run_phases(&args, &plan, &mut report);
    let ratio = |phase| {
        report::ratio(
            rate(&report, phase, "session"),
            rate(&report, phase, "raw_udp"),
        )
    };
    report.ratios = Ratios {
        echo_vs_raw_udp: ratio("echo"),
        echo_large_vs_raw_udp: ratio("echo_large"),
        reuseport_x2_vs_one_loop: report::ratio(
            rate(&report, "echo_large", "session_x2"),
            rate(&report, "echo_large", "session"),
        ),
    };
    report.bytes_per_idle_session = report.idle.as_ref().map(|i| i.rss_bytes_per_session);
    print!("{}", render(&report, &args, &plan));
    if let Some(path) = &args.json {
        report::write_json(path, "session", &report)?;
    }
    Ok(())
}

fn run_phases(args: &SessionArgs, plan: &Plan, report: &mut SessionReport) {
    let window = plan.per_client_window;
    let mut outcomes = Vec::new();
    for (phase, bytes) in [
        ("echo", args.payload_bytes),
        ("echo_large", args.large_payload_bytes),
    ] {
        let payload: Vec<u8> = (0..bytes).map(|i| i as u8).collect();
        let p = payload.clone();
        outcomes.push(run_phase(
            phase,
            "raw_udp",
            ServerKind::Raw,
            args.clients,
            plan,
            move |_, _| RawPeer::new(p.clone(), window),
        ));
        outcomes.push(run_phase(
            phase,
            "session",
            ServerKind::Echo(echo_config()),
            args.clients,
            plan,
            move |now, key| SessionPeer::new(now, key, payload.clone(), window),
        ));
    }
    let payload: Vec<u8> = (0..args.large_payload_bytes).map(|i| i as u8).collect();
    outcomes.push(run_phase(
        "echo_large",
        "session_x2",
        ServerKind::Shared(echo_config(), 2),
        args.clients,
        plan,
        move |now, key| SessionPeer::new(now, key, payload.clone(), window),
    ));
    let in_flight = args.handshakes_in_flight;
    outcomes.push(run_phase(
        "handshake",
        "session",
        ServerKind::Echo(echo_config()),
        1,
        plan,
        move |now, key| HandshakePeer::new(now, key, in_flight),
    ));
    for outcome in outcomes {
        match outcome {
            Ok((result, problems)) => {
                let name = format!("{} {}", result.phase, result.target);
                if let Some(s) = result.server.as_ref().filter(|s| s.dropped > 0) {
                    report.problems.push(format!(
                        "{name}: the server dropped {} datagrams",
                        s.dropped
                    ));
                }
                report
                    .problems
                    .extend(problems.iter().map(|p| format!("{name}: {p}")));
                report.phases.push(result);
            }
            Err(e) => report.problems.push(format!("{e:#}")),
        }
    }
}

/// The gateway's defaults, without cookies (a loopback bench is not under
/// attack; the cookie path costs one more round trip per handshake).
fn echo_config() -> EchoConfig {
    EchoConfig {
        server: ServerConfig {
            cookie_mode: CookieMode::Never,
            ..ServerConfig::default()
        },
        ..EchoConfig::default()
    }
}

fn rate(report: &SessionReport, phase: &str, target: &str) -> Option<f64> {
    report
        .phases
        .iter()
        .find(|p| p.phase == phase && p.target == target)
        .map(|p| p.ops_per_sec)
}

fn config_json(args: &SessionArgs, plan: &Plan) -> serde_json::Value {
    serde_json::json!({
        "quick": args.quick,
        "clients": args.clients,
        "window": args.window,
        "payload_bytes": args.payload_bytes,
        "duration_secs": plan.duration.as_secs_f64(),
        "warmup_secs": plan.warmup.as_secs_f64(),
        "handshakes_in_flight": args.handshakes_in_flight,
        "idle_sessions": plan.idle_sessions,
        "batch_datagrams": udp::BATCH_DATAGRAMS,
    })
}

enum ServerKind {
    Raw,
    Echo(EchoConfig),
    /// Echo servers, one loop (thread) each, on sockets sharing one port
    /// with SO_REUSEPORT.
    Shared(EchoConfig, usize),
}

/// What a started thread reports back: its address and key (server), its
/// thread id (for CPU time).
struct Started {
    addr: SocketAddr,
    public_key: [u8; 32],
    tid: i32,
}

/// The server threads of a phase: where they listen, their thread ids, and
/// their joins (each returning its echo stats, if an echo server).
struct Servers {
    addr: SocketAddr,
    public_key: [u8; 32],
    tids: Vec<i32>,
    joins: Vec<JoinHandle<Result<Option<EchoStats>>>>,
}

fn current_thread_runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("build a tokio runtime")
}

/// What one server thread serves.
enum ServerSocket {
    Raw,
    /// An echo server with these keys, on a new socket or on a shared one.
    Echo(Box<(StaticKeypair, EchoConfig, Option<std::net::UdpSocket>)>),
}

/// The servers of a phase, each on its own thread, until `stop` turns true.
fn spawn_servers(kind: ServerKind, stop: watch::Receiver<bool>) -> Result<Servers> {
    let keys = || StaticKeypair::generate(udp_load::os_seed());
    let sockets: Vec<ServerSocket> = match kind {
        ServerKind::Raw => vec![ServerSocket::Raw],
        ServerKind::Echo(config) => vec![ServerSocket::Echo(Box::new((keys(), config, None)))],
        ServerKind::Shared(config, loops) => {
            let k = keys();
            udp::bind_shared("127.0.0.1:0".parse().expect("valid"), loops)?
                .into_iter()
                .map(|s| ServerSocket::Echo(Box::new((k.clone(), config.clone(), Some(s)))))
                .collect()
        }
    };
    let mut servers: Option<Servers> = None;
    for socket in sockets {
        let (started, join) = spawn_server_thread(socket, stop.clone())?;
        let all = servers.get_or_insert_with(|| Servers {
            addr: started.addr,
            public_key: started.public_key,
            tids: Vec::new(),
            joins: Vec::new(),
        });
        all.tids.push(started.tid);
        all.joins.push(join);
    }
    servers.context("no server thread")
}

/// One server loop on its own thread, until `stop` turns true.
fn spawn_server_thread(
    socket: ServerSocket,
    mut stop: watch::Receiver<bool>,
) -> Result<(Started, JoinHandle<Result<Option<EchoStats>>>)> {
    let (tx, rx) = mpsc::channel();
    let join = std::thread::Builder::new()
        .name("bench-server".into())
        .spawn(move || -> Result<Option<EchoStats>> {
            current_thread_runtime()?.block_on(async move {
                let any: SocketAddr = "127.0.0.1:0".parse().expect("valid");
                let tid = procs::current_tid();
                let stopped = async move {
                    let _ = stop.wait_for(|s| *s).await;
                };
                match socket {
                    ServerSocket::Raw => {
                        let socket = udp::bind(any)?;
                        let addr = socket.local_addr()?;
                        let _ = tx.send(Started {
                            addr,
                            public_key: [0; 32],
                            tid,
                        });
                        tokio::select! {
                            r = udp_load::raw_echo_server(socket) => r.map(|()| None),
                            () = stopped => Ok(None),
                        }
                    }
                    ServerSocket::Echo(echo) => {
                        let (keys, config, shared) = *echo;
                        let socket = match shared {
                            Some(s) => tokio::net::UdpSocket::from_std(s)?,
                            None => udp::bind(any)?,
                        };
                        let server = EchoServer::start_on(socket, keys, config)?;
                        let _ = tx.send(Started {
                            addr: server.local_addr(),
                            public_key: server.public_key(),
                            tid,
                        });
                        stopped.await;
                        Ok(Some(server.stats()))
                    }
                }
            })
        })
        .context("spawn the server thread")?;
    let started = rx
        .recv_timeout(THREAD_TIMEOUT)
        .context("server thread did not start")?;
    Ok((started, join))
}

/// The load generator of a phase on its own thread: `clients` peers, one
/// socket each, until `shared.stop`. Each peer's problem, if any.
fn spawn_clients<P: Peer + 'static>(
    clients: usize,
    server: &Servers,
    make: impl Fn(Instant, [u8; 32]) -> P + Send + 'static,
    shared: Arc<LoadShared>,
) -> Result<(i32, JoinHandle<Result<Vec<String>>>)> {
    let (tx, rx) = mpsc::channel();
    let (addr, key) = (server.addr, server.public_key);
    let join = std::thread::Builder::new()
        .name("bench-clients".into())
        .spawn(move || -> Result<Vec<String>> {
            let _ = tx.send(procs::current_tid());
            let local = tokio::task::LocalSet::new();
            current_thread_runtime()?.block_on(local.run_until(async move {
                let mut tasks = Vec::new();
                for _ in 0..clients {
                    let socket = udp::bind("127.0.0.1:0".parse().expect("valid"))?;
                    let peer = make(Instant::now(), key);
                    tasks.push(tokio::task::spawn_local(udp_load::drive(
                        peer,
                        socket,
                        addr,
                        shared.clone(),
                    )));
                }
                let mut problems = Vec::new();
                for t in tasks {
                    problems.extend(t.await??.problem());
                }
                Ok(problems)
            }))
        })
        .context("spawn the client thread")?;
    let tid = rx
        .recv_timeout(THREAD_TIMEOUT)
        .context("client thread did not start")?;
    Ok((tid, join))
}

/// Completed ops and CPU times at one instant.
struct Snapshot {
    at: Instant,
    ops: u64,
    server_cpu: Option<Duration>,
    client_cpu: Option<Duration>,
}

fn snapshot(shared: &LoadShared, server_tids: &[i32], client_tid: i32) -> Snapshot {
    let server_cpu = server_tids
        .iter()
        .map(|t| procs::thread_cpu_time(*t).ok())
        .sum::<Option<Duration>>();
    Snapshot {
        at: Instant::now(),
        ops: shared.completed.load(Ordering::Relaxed),
        server_cpu,
        client_cpu: procs::thread_cpu_time(client_tid).ok(),
    }
}

/// One timed phase: its figures and the load generator's problems.
fn run_phase<P: Peer + 'static>(
    phase: &str,
    target: &str,
    kind: ServerKind,
    clients: usize,
    plan: &Plan,
    make: impl Fn(Instant, [u8; 32]) -> P + Send + 'static,
) -> Result<(PhaseResult, Vec<String>)> {
    let (stop_tx, stop_rx) = watch::channel(false);
    let servers = spawn_servers(kind, stop_rx)?;
    let shared = Arc::new(LoadShared::default());
    let (client_tid, client_join) = spawn_clients(clients, &servers, make, shared.clone())?;
    std::thread::sleep(plan.warmup);
    let start = snapshot(&shared, &servers.tids, client_tid);
    std::thread::sleep(plan.duration);
    let end = snapshot(&shared, &servers.tids, client_tid);
    shared.stop.store(true, Ordering::Relaxed);
    let problems = client_join
        .join()
        .map_err(|_| anyhow::anyhow!("{phase} {target}: client thread panicked"))?
        .with_context(|| format!("{phase} {target}: load generator"))?;
    let _ = stop_tx.send(true);
    let mut server_stats = Vec::new();
    for join in servers.joins {
        let stats = join
            .join()
            .map_err(|_| anyhow::anyhow!("{phase} {target}: server thread panicked"))?
            .with_context(|| format!("{phase} {target}: server"))?;
        server_stats.extend(stats);
    }
    let ops = end.ops - start.ops;
    let secs = (end.at - start.at).as_secs_f64();
    let per_op = |a: Option<Duration>, b: Option<Duration>| match (a, b) {
        (Some(a), Some(b)) if ops > 0 => Some((b - a).as_secs_f64() * 1e6 / ops as f64),
        _ => None,
    };
    let result = PhaseResult {
        phase: phase.into(),
        target: target.into(),
        ops,
        elapsed_secs: secs,
        ops_per_sec: ops as f64 / secs,
        server_cpu_us_per_op: per_op(start.server_cpu, end.server_cpu),
        client_cpu_us_per_op: per_op(start.client_cpu, end.client_cpu),
        server: EchoServerSummary::sum(&server_stats),
    };
    Ok((result, problems))
}

fn render(report: &SessionReport, args: &SessionArgs, plan: &Plan) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "imbench session: loopback UDP, batches of {}, {} clients x {} in flight, {:.1} s per phase",
        udp::BATCH_DATAGRAMS,
        args.clients,
        plan.per_client_window,
        plan.duration.as_secs_f64()
    );
    let _ = writeln!(
        out,
        "echo: {} B payloads; echo_large: {} B; handshake: {} in flight, Noise_NK, no cookies\n",
        args.payload_bytes, args.large_payload_bytes, args.handshakes_in_flight
    );
    let _ = writeln!(
        out,
        "{:<10} {:<10} {:>10} {:>12} {:>12} {:>10}",
        "phase", "target", "ops/s", "srv cpu/op", "cli cpu/op", "msgs/dgram"
    );
    let us = |v: Option<f64>| {
        v.map(|v| format!("{v:.2} us"))
            .unwrap_or_else(|| "-".into())
    };
    for p in &report.phases {
        let _ = writeln!(
            out,
            "{:<10} {:<10} {:>10} {:>12} {:>12} {:>10}",
            p.phase,
            p.target,
            fmt_rate(p.ops_per_sec),
            us(p.server_cpu_us_per_op),
            us(p.client_cpu_us_per_op),
            packing(p)
        );
    }
    let _ = writeln!(
        out,
        "(ops: echo round trips or handshakes; msgs/dgram: messages per datagram the server received)"
    );
    if let Some(i) = &report.idle {
        render_idle(&mut out, i);
    }
    let show = |v: Option<f64>| v.map(|v| format!("{v:.3}")).unwrap_or_else(|| "n/a".into());
    let r = &report.ratios;
    let _ = writeln!(
        out,
        "\nratios (ours / peer, target >= 0.5):\n  echo_vs_raw_udp        {}\n  echo_large_vs_raw_udp  {}\n\
         two loops with SO_REUSEPORT / one loop (echo_large; pays if > 1):\n  reuseport_x2_vs_one_loop {}",
        show(r.echo_vs_raw_udp),
        show(r.echo_large_vs_raw_udp),
        show(r.reuseport_x2_vs_one_loop)
    );
    if !report.problems.is_empty() {
        let _ = writeln!(out, "\nproblems:");
        for p in &report.problems {
            let _ = writeln!(out, "  - {p}");
        }
    }
    out
}

/// Messages per datagram the server received (raw UDP: 1 by construction).
fn packing(p: &PhaseResult) -> String {
    match (&p.server, p.target.as_str()) {
        (_, "raw_udp") => "1".into(),
        (Some(s), _) if p.phase != "handshake" && s.datagrams_in > 0 => {
            format!("{:.2}", s.messages as f64 / s.datagrams_in as f64)
        }
        _ => "-".into(),
    }
}

fn render_idle(out: &mut String, i: &IdleResult) {
    let verdict = if i.rss_bytes_per_session <= IDLE_SESSION_BYTES_TARGET {
        "met"
    } else {
        "NOT met"
    };
    let _ = writeln!(
        out,
        "\nidle sessions: {} built in-process in {:.1} s ({} not idle)",
        i.sessions, i.build_secs, i.active_sessions
    );
    let _ = writeln!(
        out,
        "  resident set growth: {:.1} bytes/session (reported; after malloc_trim)",
        i.rss_bytes_per_session
    );
    let _ = writeln!(
        out,
        "  live heap growth:    {:.1} bytes/session (counting allocator)",
        i.heap_bytes_per_session
    );
    let _ = writeln!(
        out,
        "  target: at most {IDLE_SESSION_BYTES_TARGET} -> {verdict}"
    );
}
