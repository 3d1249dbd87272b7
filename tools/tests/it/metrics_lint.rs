//! Every daemon's `/metrics` passes `promtool check metrics` (every metric
//! has HELP text, counters end in `_total`, no other naming lint), and the
//! key metrics exist at zero before any traffic, so alerts and dashboards
//! see them from the start.
//!
//! Each daemon runs as a real process (presence, profile, a standalone
//! shard, a shard replica, a gateway on top of the first three), with its
//! metrics listener on a port picked free first. Needs `promtool` (the
//! Debian package `prometheus`); `PROMTOOL` names another binary.

use daemon::testing::{free_addr, workspace_binary, DaemonProcess};
use proto::cluster::{ClusterMap, ShardEntry};
use std::{
    io::{Read, Write},
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::Duration,
};

/// Guard against a hung start; never a performance assertion.
const HANG_LIMIT: Duration = Duration::from_secs(60);

/// Series that must be on each daemon's page at zero before any traffic.
const PRESENCE_AT_ZERO: &[&str] = &[
    "presence_bad_frames_total",
    "presence_connections_rejected_total",
    "presence_requests_total{op=\"online\"}",
    "presence_slow_consumers_total",
    "presence_connections",
    "presence_users_online",
];
const PROFILE_AT_ZERO: &[&str] = &[
    "profile_connections_rejected_total",
    "profile_bad_frames_total",
    "profile_requests_total{op=\"check_password\"}",
    "profile_password_checks_total{result=\"wrong\"}",
    "profile_writes_failed_total{reason=\"map_full\"}",
    "profile_writes_failed_total{reason=\"disk_full\"}",
    "profile_write_queue_full_total",
    "profile_connections",
];
const SHARD_AT_ZERO: &[&str] = &[
    "msgstore_appends_total",
    "msgstore_appends_failed_total{reason=\"log_write\"}",
    "msgstore_appends_failed_total{reason=\"mailbox_full\"}",
    "msgstore_acks_total",
    "msgstore_bad_frames_total",
    "msgstore_requests_total{op=\"append\"}",
    "msgstore_connections_rejected_total",
    "msgstore_wal_torn_tails_total",
    "msgstore_stalled",
    "msgstore_connections",
];
const REPLICA_AT_ZERO: &[&str] = &[
    "msgstore_appends_total",
    "msgstore_appends_failed_total{reason=\"log_write\"}",
    "msgstore_bad_frames_total",
    "msgstore_raft_bad_frames_total",
    "msgstore_raft_proposals_total",
    "msgstore_raft_not_leader_answers_total",
    "msgstore_raft_log_torn_tails_total",
    "msgstore_raft_is_leader",
];
const GATEWAY_AT_ZERO: &[&str] = &[
    "gateway_logins_total{result=\"ok\"}",
    "gateway_logins_total{result=\"refused\"}",
    "gateway_sessions",
    "gateway_sends_in_progress",
    "gateway_messages_total{outcome=\"stored\"}",
    "gateway_bad_requests_total",
    "gateway_bad_peer_frames_total",
    "gateway_datagrams_dropped_total{reason=\"malformed\"}",
    "gateway_notify_failed_total{why=\"peer\"}",
    "gateway_peer_connections",
];

fn binary(name: &str) -> PathBuf {
    workspace_binary(Path::new(env!("CARGO_BIN_EXE_imctl")), name)
}

/// A daemon process and where its metrics are served.
struct Running {
    name: &'static str,
    process: DaemonProcess,
    metrics: SocketAddr,
}

/// Start daemon `name` with `args`, its metrics on a free port.
fn start(name: &'static str, args: &[&str]) -> Running {
    let metrics = free_addr();
    let mut cmd = Command::new(binary(name));
    cmd.args(args)
        .arg("--metrics-addr")
        .arg(metrics.to_string())
        .env("RUST_LOG", "warn");
    let process = DaemonProcess::start(cmd, name, HANG_LIMIT);
    Running {
        name,
        process,
        metrics,
    }
}

/// The body of `GET /metrics` at `addr`.
fn scrape(addr: SocketAddr) -> String {
    let mut stream = std::net::TcpStream::connect(addr)
        .unwrap_or_else(|e| panic!("connect to the metrics endpoint {addr}: {e}"));
    stream.set_read_timeout(Some(HANG_LIMIT)).unwrap();
    write!(stream, "GET /metrics HTTP/1.0\r\nHost: {addr}\r\n\r\n").unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    let (head, body) = response
        .split_once("\r\n\r\n")
        .unwrap_or_else(|| panic!("not an HTTP response: {response:?}"));
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    body.to_string()
}

/// Run `promtool check metrics` on `page`: it must exit 0 and say nothing.
fn promtool_check(daemon: &str, page: &str) {
    let promtool = std::env::var("PROMTOOL").unwrap_or_else(|_| "promtool".into());
    let mut child = match Command::new(&promtool)
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
    {
        Ok(child) => child,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => panic!(
            "{promtool} not found: install the Debian package prometheus for promtool \
             (apt-get install prometheus), or name it in PROMTOOL"
        ),
        Err(e) => panic!("cannot run {promtool}: {e}"),
    };
    child
        .stdin
        .take()
        .unwrap()
        .write_all(page.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success() && said.trim().is_empty(),
        "promtool check metrics on {daemon}'s /metrics ({}):\n{said}\n--- the page:\n{page}",
        out.status
    );
}

/// The value of `series` (a name, with its labels as rendered) on `page`.
fn value(page: &str, series: &str) -> Option<f64> {
    page.lines().find_map(|l| {
        l.strip_prefix(series)?
            .strip_prefix(' ')?
            .trim()
            .parse()
            .ok()
    })
}

/// Scrape `d`, lint the page, and check `at_zero` are on it at zero.
fn check(d: &Running, at_zero: &[&str]) {
    let page = scrape(d.metrics);
    promtool_check(d.name, &page);
    let missing: Vec<String> = at_zero
        .iter()
        .filter_map(|s| match value(&page, s) {
            Some(v) => (v != 0.0).then(|| format!("{s} is {v}, not 0")),
            None => Some(format!("{s} is missing")),
        })
        .collect();
    assert!(
        missing.is_empty(),
        "{} before any traffic: {}\n--- the page:\n{page}",
        d.name,
        missing.join("; ")
    );
}

#[test]
fn every_daemon_s_metrics_pass_promtool_and_start_at_zero() {
    let dir = tempfile::tempdir().unwrap();
    let data = |name: &str| dir.path().join(name).to_str().unwrap().to_string();

    let presence = start("presence", &["--listen", "127.0.0.1:0"]);
    check(&presence, PRESENCE_AT_ZERO);

    let profile = start(
        "profile",
        &["--listen", "127.0.0.1:0", "--data", &data("profile")],
    );
    check(&profile, PROFILE_AT_ZERO);

    let shard = start(
        "msgstore",
        &["--listen", "127.0.0.1:0", "--data", &data("shard")],
    );
    check(&shard, SHARD_AT_ZERO);

    let replica = start(
        "msgstore",
        &[
            "--listen",
            "127.0.0.1:0",
            "--data",
            &data("replica"),
            "--raft-id",
            "1",
            "--raft-listen",
            "127.0.0.1:0",
        ],
    );
    check(&replica, REPLICA_AT_ZERO);

    let map = ClusterMap {
        epoch: 1,
        presence: presence.process.addr.to_string(),
        profile: profile.process.addr.to_string(),
        gateways: Vec::new(),
        shards: vec![ShardEntry {
            id: "s1".into(),
            addr: shard.process.addr.to_string(),
            weight: 1,
            replicas: Vec::new(),
        }],
    };
    let cluster = dir.path().join("cluster.toml");
    std::fs::write(&cluster, map.to_toml()).unwrap();
    let gateway = start(
        "gateway",
        &[
            "--listen",
            "127.0.0.1:0",
            "--peer-listen",
            "127.0.0.1:0",
            "--id",
            "1",
            "--cluster",
            cluster.to_str().unwrap(),
            "--data",
            &data("gateway"),
        ],
    );
    check(&gateway, GATEWAY_AT_ZERO);

    // Once the gateway has connected to presence and profile, their pages
    // (links counted, requests by op) still pass.
    for d in [&presence, &profile, &shard, &replica, &gateway] {
        promtool_check(d.name, &scrape(d.metrics));
    }
}
