//! Run a daemon binary as a real process in a test.
//!
//! Every daemon prints `"<name> listening on ADDR"` on stdout once it
//! serves; [`DaemonProcess::start`] waits for that line.

use std::{
    io::{BufRead, BufReader},
    net::SocketAddr,
    process::{Child, Command, ExitStatus, Stdio},
    sync::{mpsc, Mutex},
    time::Duration,
};

/// Read `child`'s stdout (which must be piped) until the daemon prints
/// `"<name> listening on ADDR"`; the address, or a panic naming the exit
/// status if it does not within `limit`. Later stdout lines are consumed
/// and dropped so the daemon never blocks on a full pipe.
pub fn wait_for_listening(child: &mut Child, name: &str, limit: Duration) -> SocketAddr {
    let stdout = child.stdout.take().expect("piped stdout");
    let prefix = format!("{name} listening on ");
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut sent = false;
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if let Some(addr) = line.strip_prefix(&prefix) {
                if !sent {
                    sent = tx.send(addr.trim().to_owned()).is_ok();
                }
            }
        }
    });
    match rx.recv_timeout(limit) {
        Ok(addr) => addr.parse().expect("listening line carries an address"),
        Err(_) => {
            let _ = child.kill();
            let status = child.wait().expect("wait for the daemon");
            panic!("{name} did not start (exit status {status}); see its stderr above");
        }
    }
}

/// A daemon process started by a test; killed if still running when
/// dropped.
pub struct DaemonProcess {
    pub child: Child,
    pub addr: SocketAddr,
}

impl DaemonProcess {
    /// Start `cmd` (stdout piped, stderr inherited) and wait up to `limit`
    /// for its `"<name> listening on ADDR"` line. Unless `cmd` names a key
    /// file of its own, the daemon gets this process's cluster key
    /// ([`cluster_key_file`]).
    pub fn start(mut cmd: Command, name: &str, limit: Duration) -> DaemonProcess {
        with_cluster_key(&mut cmd);
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {name}: {e}"));
        let addr = wait_for_listening(&mut child, name, limit);
        DaemonProcess { child, addr }
    }

    pub fn signal(&self, sig: libc::c_int) {
        signal(&self.child, sig);
    }

    /// SIGTERM and wait; the exit status.
    pub fn terminate(mut self) -> ExitStatus {
        self.signal(libc::SIGTERM);
        self.child.wait().expect("wait for the daemon")
    }

    /// SIGKILL and reap.
    pub fn kill(mut self) {
        sigkill(&mut self.child);
    }
}

impl Drop for DaemonProcess {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// The environment variable a daemon reads its key file's path from.
pub const KEY_FILE_ENV: &str = "IM_CLUSTER_KEY_FILE";

/// A file holding this process's cluster key (`crate::secure::key`), for
/// the daemons and tools a test starts; written once per process, in the
/// temporary directory.
pub fn cluster_key_file() -> &'static std::path::Path {
    static FILE: std::sync::OnceLock<std::path::PathBuf> = std::sync::OnceLock::new();
    FILE.get_or_init(|| {
        let path = std::env::temp_dir().join(format!("im-test-cluster-{}.key", std::process::id()));
        let _ = std::fs::remove_file(&path);
        crate::secure::write_key_file(&path, crate::secure::key())
            .expect("write the test key file");
        path
    })
}

/// Give `cmd` this process's cluster key unless it names one already.
pub fn with_cluster_key(cmd: &mut Command) {
    let named = cmd.get_envs().any(|(k, _)| k == KEY_FILE_ENV)
        || cmd.get_args().any(|a| a == "--cluster-key-file");
    if !named {
        cmd.env(KEY_FILE_ENV, cluster_key_file());
    }
}

/// Send `sig` to a child that has not been reaped.
pub fn signal(child: &Child, sig: libc::c_int) {
    let pid = child.id() as libc::pid_t;
    // SAFETY: kill(2) on a child we spawned and have not reaped yet.
    let rc = unsafe { libc::kill(pid, sig) };
    assert_eq!(rc, 0, "kill({pid}, {sig}) failed");
}

/// SIGKILL and reap.
pub fn sigkill(child: &mut Child) {
    signal(child, libc::SIGKILL);
    child.wait().expect("reap the daemon");
}

/// The workspace binary `name` (of the package of the same name): next to
/// `beside`, a binary cargo built for the running test (cargo builds every
/// workspace binary for the workspace's tests); built on demand otherwise,
/// in the profile `beside` was built in (its directory: `target/release`
/// is `--profile release`, `target/debug` is `dev`), so it lands there.
pub fn workspace_binary(beside: &std::path::Path, name: &str) -> std::path::PathBuf {
    let bin = beside.with_file_name(name);
    if !bin.exists() {
        let dir = beside.parent().and_then(|d| d.file_name());
        let profile = match dir.and_then(|d| d.to_str()) {
            Some("debug") | None => "dev",
            Some(profile) => profile,
        };
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let status = Command::new(cargo)
            .args(["build", "--profile", profile, "-p", name, "--bin", name])
            .status()
            .expect("run cargo build");
        assert!(status.success(), "cannot build the {name} binary");
    }
    bin
}

/// The sum of metric `name` over all its labels on a Prometheus endpoint;
/// 0 if the endpoint does not list it (yet).
pub async fn metric_sum(addr: SocketAddr, name: &str) -> f64 {
    scrape(addr)
        .await
        .lines()
        .filter_map(|l| {
            let rest = l.strip_prefix(name)?;
            let value = if let Some(labelled) = rest.strip_prefix('{') {
                labelled.split_once("} ")?.1
            } else {
                rest.strip_prefix(' ')?
            };
            value.trim().parse::<f64>().ok()
        })
        .sum()
}

/// The text of a Prometheus endpoint.
pub async fn scrape(addr: SocketAddr) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr)
        .await
        .expect("metrics endpoint");
    let request = format!("GET /metrics HTTP/1.0\r\nHost: {addr}\r\n\r\n");
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut text = String::new();
    stream.read_to_string(&mut text).await.unwrap();
    text
}

/// The value of metric `name` (without labels) on a Prometheus endpoint;
/// 0 if the endpoint does not list it (yet).
pub async fn metric(addr: SocketAddr, name: &str) -> f64 {
    scrape(addr)
        .await
        .lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
        .unwrap_or(0.0)
}

/// Ports [`free_addr`] picks from: below Linux's ephemeral range (32768 and
/// up by default), so an outgoing connection of some other process cannot
/// take a port while the daemon that owns it is down for a restart.
const TEST_PORTS: std::ops::Range<u16> = 20_000..32_000;

/// A free loopback TCP port's address, for a daemon that may be restarted
/// on it. Never the same port twice in one test process.
pub fn free_addr() -> SocketAddr {
    use std::hash::{BuildHasher, Hasher};
    static GIVEN: Mutex<Vec<u16>> = Mutex::new(Vec::new());
    let mut given = GIVEN.lock().unwrap_or_else(|p| p.into_inner());
    let span = u64::from(TEST_PORTS.end - TEST_PORTS.start);
    for attempt in 0u64.. {
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write_u64(attempt);
        let port = TEST_PORTS.start + (h.finish() % span) as u16;
        if given.contains(&port) {
            continue;
        }
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        if std::net::TcpListener::bind(addr).is_ok() && std::net::UdpSocket::bind(addr).is_ok() {
            given.push(port);
            return addr;
        }
        assert!(attempt < 10_000, "no free port in {TEST_PORTS:?}");
    }
    unreachable!("the loop returns or panics")
}

/// Copy the directory tree `from` to `to`, leaving out files named `skip`:
/// a data directory as a crash would leave it, taken from a process still
/// running (which keeps its lock on `from`).
pub fn copy_dir_except(from: &std::path::Path, to: &std::path::Path, skip: &str) {
    std::fs::create_dir_all(to).expect("create the copy's directory");
    for entry in std::fs::read_dir(from).expect("read the directory") {
        let entry = entry.expect("a directory entry");
        let target = to.join(entry.file_name());
        if entry.file_type().expect("its type").is_dir() {
            copy_dir_except(&entry.path(), &target, skip);
        } else if entry.file_name() != skip {
            std::fs::copy(entry.path(), target).expect("copy a file");
        }
    }
}

/// How long the link helpers below wait before calling a test hung.
pub const LINK_HANG_LIMIT: Duration = Duration::from_secs(60);

/// An authenticated link to `addr` with this process's key, for tests that
/// write frames by hand; panics if it cannot be made.
pub async fn link(addr: impl tokio::net::ToSocketAddrs) -> crate::secure::Link {
    tokio::time::timeout(LINK_HANG_LIMIT, crate::secure::connect(addr))
        .await
        .expect("no hang")
        .expect("an authenticated link")
}

/// An authenticated link to `addr` from the local address `source` (a
/// second loopback address: another source for per-source limits).
pub async fn link_from(
    source: std::net::IpAddr,
    addr: SocketAddr,
) -> std::io::Result<crate::secure::Link> {
    let socket = tokio::net::TcpSocket::new_v4()?;
    socket.bind(SocketAddr::new(source, 0))?;
    let stream = socket.connect(addr).await?;
    crate::secure::dial(stream, crate::secure::key()).await
}

/// `n` TCP connections to `addr` from 127.0.0.1 that never start the
/// handshake (strangers), kept open by the caller.
pub async fn idle_raw_connections(addr: SocketAddr, n: usize) -> Vec<tokio::net::TcpStream> {
    let mut raw = Vec::with_capacity(n);
    for _ in 0..n {
        let stream = tokio::time::timeout(LINK_HANG_LIMIT, tokio::net::TcpStream::connect(addr))
            .await
            .expect("no hang")
            .expect("a raw connection");
        raw.push(stream);
    }
    raw
}

/// Files the process started by `cmd` writes may not grow past `bytes`
/// (RLIMIT_FSIZE): a write past it fails with EFBIG, as on a full disk,
/// instead of the process being killed by SIGXFSZ (ignored).
pub fn limit_file_size(cmd: &mut std::process::Command, bytes: u64) {
    use std::os::unix::process::CommandExt;
    // SAFETY: only async-signal-safe calls between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            let limit = libc::rlimit {
                rlim_cur: bytes,
                rlim_max: bytes,
            };
            libc::signal(libc::SIGXFSZ, libc::SIG_IGN);
            if libc::setrlimit(libc::RLIMIT_FSIZE, &limit) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// Wait up to `limit` for `child` to exit by itself: its status, or `None`
/// if it still runs.
pub fn wait_exit(child: &mut Child, limit: Duration) -> Option<ExitStatus> {
    let started = std::time::Instant::now();
    while started.elapsed() < limit {
        if let Some(status) = child.try_wait().expect("try_wait") {
            return Some(status);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    None
}
