//! Running the imctl binary from tests.

#![allow(dead_code)]

pub mod tmux;

use std::{
    io::Write,
    process::{Command, Stdio},
};

/// Run `imctl ARGS` (with `stdin` as its standard input, if given):
/// (success, stdout, stderr).
pub fn run(args: &[&str], stdin: Option<&str>) -> (bool, String, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_imctl"))
        .args(args)
        .env_remove("IMCTL_PASSWORD")
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

/// Run `imctl --json ARGS`, which must succeed; its output parsed.
pub fn json(args: &[&str]) -> serde_json::Value {
    let mut all = vec!["--json"];
    all.extend_from_slice(args);
    let (ok, stdout, stderr) = run(&all, None);
    assert!(ok, "imctl {args:?} failed: {stderr}");
    serde_json::from_str(&stdout).unwrap_or_else(|e| panic!("bad JSON {stdout:?}: {e}"))
}
