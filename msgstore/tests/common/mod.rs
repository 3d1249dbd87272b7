//! Helpers shared by the tests that run the real `msgstore` binary.

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
