//! `imctl up` on ports the kernel picks, in a directory of its own, so
//! tests using it run beside each other and beside the one on the
//! standard ports.

use daemon::testing::signal;
use std::{
    io::{BufRead, BufReader},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

/// Any free loopback port.
const ANY: &str = "127.0.0.1:0";

pub struct Up {
    child: Child,
    /// The data directory (`--data`): demo.toml, cluster.toml.
    pub data: String,
    /// The profile service's address (for `imctl user --addr`).
    pub profile: String,
    /// Presence's address (for `imctl presence --addr`).
    pub presence: String,
    _dir: tempfile::TempDir,
}

impl Up {
    /// Start `imctl up` and wait until it is up (its guide's first line).
    pub fn start() -> Up {
        Up::start_with(&[])
    }

    /// [`Up::start`] with `extra` flags (`--replicas 3`).
    pub fn start_with(extra: &[&str]) -> Up {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().to_str().unwrap().to_string();
        let mut args = vec!["up", "--data", &data];
        for flag in [
            "--gateway",
            "--gateway-peer",
            "--presence",
            "--profile",
            "--metrics",
        ] {
            args.extend([flag, ANY]);
        }
        let shards = format!("{ANY},{ANY}");
        args.extend(["--shard", &shards]);
        args.extend(extra);
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_imctl"));
        cmd.args(&args).env("RUST_LOG", "warn");
        // This test process's key: `up` writes it to DATA/cluster.key, and
        // the `imctl` commands of `super::run` use it too.
        daemon::testing::with_cluster_key(&mut cmd);
        let mut child = cmd.stdout(Stdio::piped()).spawn().expect("start imctl up");
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let first = lines.next().expect("a guide line").expect("utf-8");
        assert!(first.starts_with("im-server is up"), "{first}");
        std::thread::spawn(move || for _ in lines {});
        let cluster = std::fs::read_to_string(dir.path().join("cluster.toml")).unwrap();
        let cluster: toml::Table = toml::from_str(&cluster).unwrap();
        let addr = |key: &str| cluster[key].as_str().expect("an address").to_string();
        Up {
            profile: addr("profile"),
            presence: addr("presence"),
            child,
            data,
            _dir: dir,
        }
    }

    /// SIGINT, then `imctl up` must exit cleanly.
    pub fn stop(mut self) {
        signal(&self.child, libc::SIGINT);
        let deadline = Instant::now() + Duration::from_secs(30);
        let status = loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                break status;
            }
            assert!(Instant::now() < deadline, "imctl up did not stop on SIGINT");
            std::thread::sleep(Duration::from_millis(50));
        };
        assert!(status.success(), "imctl up exited with {status}");
    }

    /// Create a user with this password on the profile service.
    pub fn add_user(&self, name: &str, password: &str) {
        let (ok, _, err) = super::run(
            &[
                "user",
                "--addr",
                &self.profile,
                "add",
                name,
                "--password-stdin",
            ],
            Some(&format!("{password}\n")),
        );
        assert!(ok, "imctl user add {name} failed: {err}");
    }
}

impl Drop for Up {
    /// Kills `imctl up` if the test failed before stopping it.
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}
