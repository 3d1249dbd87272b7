//! Helpers shared by the tests that run the real `msgstore` binary.
// Each test crate uses its own subset of these helpers.
#![allow(dead_code)]

use std::{
    io::{BufRead, BufReader},
    net::SocketAddr,
    process::Child,
    sync::mpsc,
    time::Duration,
};

/// Read `child`'s stdout (which must be piped) until the daemon prints
/// "msgstore listening on ADDR"; the address, or a panic naming the exit
/// status if it does not within `limit`.
pub fn wait_for_listening(child: &mut Child, limit: Duration) -> SocketAddr {
    let stdout = child.stdout.take().expect("piped stdout");
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut sent = false;
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if let Some(addr) = line.strip_prefix("msgstore listening on ") {
                if !sent {
                    sent = tx.send(addr.trim().to_owned()).is_ok();
                }
            }
        }
    });
    match rx.recv_timeout(limit) {
        Ok(addr) => addr.parse().expect("listening line carries an address"),
        Err(_) => {
            let status = child.wait().expect("wait for msgstore");
            panic!("msgstore did not start (exit status {status}); see its stderr above");
        }
    }
}

/// A `msgstore` process started by a test; killed if still running when
/// dropped.
pub struct Daemon {
    pub child: std::process::Child,
    pub addr: SocketAddr,
}

impl Daemon {
    /// Start `cmd` (stdout piped, stderr inherited) and wait for its
    /// listening line.
    pub fn start_with(mut cmd: std::process::Command, limit: Duration) -> Daemon {
        let mut child = cmd
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::inherit())
            .spawn()
            .expect("spawn msgstore");
        let addr = wait_for_listening(&mut child, limit);
        Daemon { child, addr }
    }

    pub fn signal(&self, sig: libc::c_int) {
        signal(&self.child, sig);
    }

    /// SIGTERM and wait; the exit status.
    pub fn terminate(mut self) -> std::process::ExitStatus {
        self.signal(libc::SIGTERM);
        self.child.wait().expect("wait for msgstore")
    }

    /// SIGKILL and reap.
    pub fn kill(mut self) {
        sigkill(&mut self.child);
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

pub fn signal(child: &Child, sig: libc::c_int) {
    let pid = child.id() as libc::pid_t;
    // SAFETY: kill(2) on a child we spawned and have not reaped yet.
    let rc = unsafe { libc::kill(pid, sig) };
    assert_eq!(rc, 0, "kill({pid}, {sig}) failed");
}

/// SIGKILL and reap.
pub fn sigkill(child: &mut Child) {
    signal(child, libc::SIGKILL);
    child.wait().expect("reap msgstore");
}
