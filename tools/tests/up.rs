//! The README's path: `imctl up`, then `imctl send`, `imctl inbox` and
//! `imctl chat` with nothing but the demo file. (`imctl up` uses the standard ports
//! 7100/7300/7401/7402/7500, which must be free.)

mod common;

use daemon::testing::signal;
use std::{
    io::{BufRead, BufReader},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

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
    let (ok, out, err) = common::run(
        &[
            "send", "--data", data, "--user", "alice", "--to", "bob", "hello", "bob",
        ],
        None,
    );
    assert!(ok, "send failed: {err}");
    assert_eq!(out.trim(), "sent to bob: stored (mailbox seq 1)");
    let (ok, out, err) = common::run(&["inbox", "--data", data, "--user", "bob"], None);
    assert!(ok, "inbox failed: {err}");
    assert_eq!(out.trim(), "alice: hello bob");
    let (ok, out, _) = common::run(&["inbox", "--data", data, "--user", "bob"], None);
    assert!(ok);
    assert_eq!(
        out.trim(),
        "no stored messages",
        "acknowledged messages are gone"
    );
    chat_in_a_terminal(data);
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

/// `imctl chat` in a real terminal: the friend list and prompt, a message
/// arriving while a line is half typed (the line survives), sending, and
/// `/quit`.
fn chat_in_a_terminal(data: &str) {
    let imctl = env!("CARGO_BIN_EXE_imctl");
    let term = common::tmux::Tmux::start(&format!(
        "RUST_LOG=warn {imctl} chat --data {data} --user alice --to bob"
    ));
    let screen = term.wait_for("to bob>");
    assert!(screen.contains("friends (1):"), "{screen}");
    assert!(screen.contains("logged in as alice"), "{screen}");
    term.type_text("half typed");
    term.wait_for("to bob> half typed");
    let (ok, out, err) = common::run(
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
        None,
    );
    assert!(ok, "send failed: {err}");
    assert_eq!(out.trim(), "sent to alice: delivered");
    term.wait_for("bob: incoming now");
    let screen = term.wait_for("* bob went offline");
    let last = screen.lines().rfind(|l| !l.trim().is_empty()).unwrap_or("");
    assert_eq!(last.trim_end(), "to bob> half typed", "screen:\n{screen}");
    term.type_text(" and finished");
    term.enter();
    term.wait_for("(stored: they will get it when they are back)");
    term.type_text("/quit");
    term.enter();
    term.wait_exit();
    let (ok, out, err) = common::run(&["inbox", "--data", data, "--user", "bob"], None);
    assert!(ok, "inbox failed: {err}");
    assert_eq!(out.trim(), "alice: half typed and finished");
}
