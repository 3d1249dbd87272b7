//! Running the imctl binary from tests.

#![allow(dead_code)]

pub mod tmux;
pub mod up;

use std::{
    io::{Read, Write},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

/// `imctl ARGS` with this test process's cluster key (the key of the
/// daemons it runs in-process and of [`up::Up`]) unless `args` name one.
fn imctl(args: &[&str]) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_imctl"));
    cmd.args(args).env_remove("IMCTL_PASSWORD");
    daemon::testing::with_cluster_key(&mut cmd);
    cmd
}

/// Run `imctl ARGS` (with `stdin` as its standard input, if given):
/// (success, stdout, stderr).
pub fn run(args: &[&str], stdin: Option<&str>) -> (bool, String, String) {
    let mut child = imctl(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run imctl");
    if let Some(text) = stdin {
        let mut input = child.stdin.take().expect("piped stdin");
        input
            .write_all(text.as_bytes())
            .expect("write imctl's stdin");
    }
    drop(child.stdin.take());
    let out = child.wait_with_output().expect("wait for imctl");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Like [`run`], but `imctl` must exit within `limit` (a guard against a
/// hang, not a measure of speed): it is killed and the test fails if not.
pub fn run_within(args: &[&str], limit: Duration) -> (bool, String, String) {
    let mut child = imctl(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run imctl");
    let read = |mut pipe: Box<dyn Read + Send>| {
        std::thread::spawn(move || {
            let mut text = String::new();
            let _ = pipe.read_to_string(&mut text);
            text
        })
    };
    let out = read(Box::new(child.stdout.take().unwrap()));
    let err = read(Box::new(child.stderr.take().unwrap()));
    let deadline = Instant::now() + limit;
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("imctl {args:?} still ran after {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    (status.success(), out.join().unwrap(), err.join().unwrap())
}

/// Run `imctl --json ARGS`, which must succeed; its output parsed.
pub fn json(args: &[&str]) -> serde_json::Value {
    let mut all = vec!["--json"];
    all.extend_from_slice(args);
    let (ok, stdout, stderr) = run(&all, None);
    assert!(ok, "imctl {args:?} failed: {stderr}");
    serde_json::from_str(&stdout).unwrap_or_else(|e| panic!("bad JSON {stdout:?}: {e}"))
}
