//! The README's path: `imctl up`, then `imctl send`, `imctl inbox` and
//! `imctl chat` with nothing but the demo file. (That test uses the standard ports
//! 7100/7101/7300/7401/7402/7500/9100, which must be free; the others here
//! let the kernel pick every port, so they run beside it.) Also: a taken
//! port is named with its flag, and `/metrics` serves every component.

use crate::common;

use daemon::testing::signal;
use std::{
    io::{BufRead, BufReader, Read, Write},
    net::SocketAddr,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

/// Any free loopback port.
const ANY: &str = "127.0.0.1:0";

/// Kills `imctl up` if the test fails before stopping it.
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

#[test]
fn up_then_send_and_inbox_with_the_demo_defaults() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().to_str().unwrap();
    let mut up = Command::new(env!("CARGO_BIN_EXE_imctl"))
        .args(["up", "--data", data])
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .spawn()
        .expect("start imctl up");
    let mut lines = BufReader::new(up.stdout.take().unwrap()).lines();
    let mut up = KillOnDrop(up);
    let first = lines.next().expect("a guide line").expect("utf-8");
    assert!(first.starts_with("im-server is up"), "{first}");
    std::thread::spawn(move || for _ in lines {});
    let (ok, out, err) = run_against(
        data,
        &[
            "send", "--data", data, "--user", "alice", "--to", "bob", "hello", "bob",
        ],
    );
    assert!(ok, "send failed: {err}");
    assert_eq!(out.trim(), "sent to bob (mailbox seq 1)");
    let (ok, out, err) = run_against(data, &["inbox", "--data", data, "--user", "bob"]);
    assert!(ok, "inbox failed: {err}");
    assert_eq!(out.trim(), "alice: hello bob");
    let (ok, out, _) = run_against(data, &["inbox", "--data", data, "--user", "bob"]);
    assert!(ok);
    assert_eq!(
        out.trim(),
        "no stored messages",
        "acknowledged messages are gone"
    );
    chat_in_a_terminal(data);
    stop(&mut up);
}

/// The key file `imctl up` (run without one, as here) wrote in its data
/// directory `data`: its path, after checking it is readable by its owner
/// only.
fn cluster_key_file(data: &str) -> String {
    use std::os::unix::fs::PermissionsExt;
    let path = std::path::Path::new(data).join("cluster.key");
    let mode = std::fs::metadata(&path)
        .unwrap_or_else(|e| panic!("imctl up wrote no {}: {e}", path.display()))
        .permissions()
        .mode();
    assert_eq!(mode & 0o077, 0, "{} is mode {mode:o}", path.display());
    path.to_str().unwrap().to_string()
}

/// Run `imctl ARGS` against the `imctl up` of `data`, with that cluster's
/// key file.
fn run_against(data: &str, args: &[&str]) -> (bool, String, String) {
    let key = cluster_key_file(data);
    let mut all = args.to_vec();
    all.extend(["--cluster-key-file", &key]);
    common::run(&all, None)
}

/// SIGINT, then `imctl up` must exit cleanly.
fn stop(up: &mut KillOnDrop) {
    signal(&up.0, libc::SIGINT);
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(status) = up.0.try_wait().unwrap() {
            break status;
        }
        assert!(Instant::now() < deadline, "imctl up did not stop on SIGINT");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(status.success(), "imctl up exited with {status}");
}

/// `imctl up` arguments with every address on a port the kernel picks,
/// but `flag` set to `value`.
fn up_args(data: &str, flag: &str, value: &str) -> Vec<String> {
    let mut args = vec!["up".to_string(), "--data".into(), data.into()];
    for f in [
        "--gateway",
        "--gateway-peer",
        "--presence",
        "--profile",
        "--shard",
        "--metrics",
    ] {
        let v = match f {
            _ if f == flag => value.to_string(),
            "--shard" => format!("{ANY},{ANY}"),
            _ => ANY.to_string(),
        };
        args.extend([f.to_string(), v]);
    }
    args
}

#[test]
fn a_port_in_use_is_named_with_what_wanted_it_and_its_flag() {
    let tcp = std::net::TcpListener::bind(ANY).unwrap();
    let udp = std::net::UdpSocket::bind(ANY).unwrap();
    let tcp = tcp.local_addr().unwrap().to_string();
    let udp = udp.local_addr().unwrap().to_string();
    let cases = [
        ("--presence", tcp.clone(), &tcp, "presence"),
        ("--profile", tcp.clone(), &tcp, "profile"),
        // The second shard: the first, profile and presence are running
        // by then and must be stopped cleanly.
        ("--shard", format!("{ANY},{tcp}"), &tcp, "shard 2"),
        ("--gateway", udp.clone(), &udp, "the gateway"),
        (
            "--gateway-peer",
            tcp.clone(),
            &tcp,
            "the gateway's peer listener",
        ),
        ("--metrics", tcp.clone(), &tcp, "metrics"),
    ];
    for (flag, value, taken, what) in cases {
        let dir = tempfile::tempdir().unwrap();
        let args = up_args(dir.path().to_str().unwrap(), flag, &value);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let (ok, _, err) = common::run(&args, None);
        assert!(!ok, "imctl up {flag} {value} started on a taken port");
        let expected = format!(
            "imctl up: error: {taken} is already in use ({what}; pick another with {flag} ADDR)"
        );
        assert_eq!(err.trim(), expected, "imctl up {flag} {value}");
    }
}

#[test]
fn metrics_of_every_component_are_served_on_one_listener() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().to_str().unwrap();
    let mut up = Command::new(env!("CARGO_BIN_EXE_imctl"))
        .args(up_args(data, "--metrics", ANY))
        .stdout(Stdio::piped())
        .spawn()
        .expect("start imctl up");
    let mut lines = BufReader::new(up.stdout.take().unwrap()).lines();
    let mut up = KillOnDrop(up);
    let metrics: SocketAddr = loop {
        let line = lines.next().expect("the metrics line").expect("utf-8");
        if let Some(url) = line.split_whitespace().find(|w| w.starts_with("http://")) {
            let addr = url.strip_prefix("http://").unwrap();
            break addr
                .strip_suffix("/metrics")
                .expect("a /metrics URL")
                .parse()
                .unwrap();
        }
    };
    std::thread::spawn(move || for _ in lines {});
    let (ok, _, err) = run_against(
        data,
        &[
            "send", "--data", data, "--user", "alice", "--to", "bob", "hi",
        ],
    );
    assert!(ok, "send failed: {err}");
    let text = scrape(metrics);
    for prefix in ["gateway_", "msgstore_", "presence_", "profile_"] {
        assert!(
            text.lines().any(|l| l.starts_with(prefix)),
            "no {prefix} metric in:\n{text}"
        );
    }
    stop(&mut up);
}

/// `GET /metrics`: the whole answer, headers included.
fn scrape(addr: SocketAddr) -> String {
    let mut stream = std::net::TcpStream::connect(addr).expect("metrics listener");
    stream
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    write!(stream, "GET /metrics HTTP/1.0\r\nHost: {addr}\r\n\r\n").unwrap();
    let mut text = String::new();
    stream.read_to_string(&mut text).unwrap();
    assert!(
        text.starts_with("HTTP/1.0 200") || text.starts_with("HTTP/1.1 200"),
        "{text}"
    );
    text
}

/// `imctl chat` in a real terminal: the friend list and prompt, a message
/// arriving while a line is half typed (the line survives), sending, and
/// `/quit`.
fn chat_in_a_terminal(data: &str) {
    let imctl = env!("CARGO_BIN_EXE_imctl");
    let key = cluster_key_file(data);
    let term = common::tmux::Tmux::start(&format!(
        "RUST_LOG=warn {imctl} chat --data {data} --user alice --to bob --cluster-key-file {key}"
    ));
    let screen = term.wait_for("to bob>");
    assert!(screen.contains("friends (1):"), "{screen}");
    assert!(screen.contains("logged in as alice"), "{screen}");
    term.type_text("half typed");
    term.wait_for("to bob> half typed");
    let (ok, out, err) = run_against(
        data,
        &[
            "send",
            "--data",
            data,
            "--user",
            "bob",
            "--to",
            "alice",
            "incoming now",
        ],
    );
    assert!(ok, "send failed: {err}");
    assert_eq!(out.trim(), "sent to alice (mailbox seq 1)");
    term.wait_for("bob: incoming now");
    let screen = term.wait_for("* bob went offline");
    let last = screen.lines().rfind(|l| !l.trim().is_empty()).unwrap_or("");
    assert_eq!(last.trim_end(), "to bob> half typed", "screen:\n{screen}");
    term.type_text(" and finished");
    term.enter();
    term.wait_for("(sent; bob is offline and will get it when back)");
    term.type_text("/quit");
    term.enter();
    term.wait_exit();
    let (ok, out, err) = run_against(data, &["inbox", "--data", data, "--user", "bob"]);
    assert!(ok, "inbox failed: {err}");
    assert_eq!(out.trim(), "alice: half typed and finished");
}

/// `imctl up --replicas 3`: every shard and the profile service run as
/// groups of three (one leader each), and the README's path works on
/// them: a user added, a message sent and read.
#[test]
fn up_with_three_replicas_runs_profile_and_shards_as_groups() {
    let up = common::up::Up::start_with(&["--replicas", "3"]);
    assert_eq!(up.profile.split(',').count(), 3, "{}", up.profile);
    let map = format!("{}/cluster.toml", up.data);
    let status = (0..100)
        .map(|_| {
            std::thread::sleep(Duration::from_millis(100));
            let (_, out, _) = common::run(&["status", "--cluster", &map, "--json"], None);
            serde_json::from_str::<serde_json::Value>(&out).unwrap_or_default()
        })
        .find(|s| s["all_good"] == true)
        .expect("imctl status never said all good");
    let roles = |list: &serde_json::Value| -> Vec<String> {
        let replicas = list.as_array().expect("a list of replicas");
        let role = |r: &serde_json::Value| r["stats"]["role"].as_str().unwrap_or("").to_string();
        let mut roles: Vec<String> = replicas.iter().map(role).collect();
        roles.sort();
        roles
    };
    let group = ["follower", "follower", "leader"];
    assert_eq!(roles(&status["profile"]), group, "{status:#}");
    for shard in status["shards"].as_array().unwrap() {
        assert_eq!(roles(&shard["replicas"]), group, "{shard:#}");
    }
    up.add_user("carol", "carol's password");
    let data = up.data.as_str();
    let send = [
        "send", "--data", data, "--user", "alice", "--to", "bob", "hi",
    ];
    let (ok, out, err) = common::run(&send, None);
    assert!(ok, "send failed: {err}");
    assert_eq!(out.trim(), "sent to bob (mailbox seq 1)");
    let (ok, out, err) = common::run(&["inbox", "--data", data, "--user", "bob"], None);
    assert!(ok, "inbox failed: {err}");
    assert_eq!(out.trim(), "alice: hi");
    up.stop();
}
