//! Connections come and go; a daemon's heap does not grow with them.
//!
//! Each daemon with a TCP port (presence, profile, a shard) runs as a real
//! process. Every cycle opens 1,000 connections that never prove the
//! cluster key (some silent, some sending garbage) and 200 authenticated
//! links, then closes them all. The daemon's heap
//! (`process_heap_allocated_bytes`, from jemalloc) after the last cycle
//! must be within a small margin of its size after the first: before the
//! secure links and jemalloc, presence grew by about 3 KB per connection
//! opened and closed and never shrank (20.8 -> 81.7 MB over 10 cycles of
//! 2,000), which this margin would catch many times over.

use daemon::testing::{free_addr, metric, metric_sum, workspace_binary, DaemonProcess};
use std::{
    net::SocketAddr,
    path::Path,
    process::Command,
    time::{Duration, Instant},
};
use tokio::{io::AsyncWriteExt, net::TcpStream};

/// Guard against a hung test; never a performance assertion.
const HANG_LIMIT: Duration = Duration::from_secs(60);
const CYCLES: usize = 4;
const STRANGERS_PER_CYCLE: usize = 1_000;
const LINKS_PER_CYCLE: usize = 200;
/// How much a heap may differ between the first and the last cycle: far
/// below what 3 KB kept per connection would add over four cycles
/// (1,200 x 3 x 3 KB = 10.8 MB), and than 3 KB kept per authenticated
/// link (200 x 3 x 3 KB = 1.8 MB).
const HEAP_GROWTH_BYTES_MAX: f64 = 1024.0 * 1024.0;

fn binary(name: &str) -> std::path::PathBuf {
    workspace_binary(Path::new(env!("CARGO_BIN_EXE_imctl")), name)
}

struct Running {
    process: DaemonProcess,
    metrics: SocketAddr,
    _data: tempfile::TempDir,
}

fn start(name: &str) -> Running {
    let data = tempfile::tempdir().unwrap();
    let metrics = free_addr();
    let mut cmd = Command::new(binary(name));
    cmd.args(["--listen", "127.0.0.1:0", "--metrics-addr"])
        .arg(metrics.to_string())
        .env("RUST_LOG", "error");
    if name != "presence" {
        cmd.arg("--data").arg(data.path().join(name));
    }
    let process = DaemonProcess::start(cmd, name, HANG_LIMIT);
    Running {
        process,
        metrics,
        _data: data,
    }
}

/// One cycle: strangers and authenticated links opened, then all closed;
/// how many strangers connected.
async fn cycle(addr: SocketAddr) -> usize {
    let mut strangers = Vec::with_capacity(STRANGERS_PER_CYCLE);
    for i in 0..STRANGERS_PER_CYCLE {
        let Ok(mut s) = TcpStream::connect(addr).await else {
            continue;
        };
        if i % 2 == 0 {
            let _ = s.write_all(&[0xA5; 100]).await;
        }
        strangers.push(s);
    }
    let mut links = Vec::with_capacity(LINKS_PER_CYCLE);
    for _ in 0..LINKS_PER_CYCLE {
        links.push(
            daemon::secure::connect(addr)
                .await
                .expect("an authenticated link"),
        );
    }
    let connected = strangers.len();
    drop(strangers);
    drop(links);
    connected
}

/// The heap once it has settled: the daemon closes what we dropped on its
/// own time, so read until two readings 200 ms apart agree (or give up and
/// take the last).
async fn settled_heap(metrics: SocketAddr) -> f64 {
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut last = metric(metrics, "process_heap_allocated_bytes").await;
    loop {
        tokio::time::sleep(Duration::from_millis(200)).await;
        let now = metric(metrics, "process_heap_allocated_bytes").await;
        if (now - last).abs() < 64.0 * 1024.0 || Instant::now() > deadline {
            return now;
        }
        last = now;
    }
}

async fn check(name: &str) {
    let daemon = start(name);
    let addr = daemon.process.addr;
    let mut strangers = cycle(addr).await;
    let first = settled_heap(daemon.metrics).await;
    assert!(
        first > 0.0,
        "{name}: no heap statistics (is jemalloc its allocator?)"
    );
    for _ in 1..CYCLES {
        strangers += cycle(addr).await;
    }
    let last = settled_heap(daemon.metrics).await;
    eprintln!("{name}: heap after the first cycle {first} bytes, after the last {last} bytes");
    assert!(
        last - first < HEAP_GROWTH_BYTES_MAX,
        "{name}: the heap grew by {} bytes over {} cycles of {} connections",
        last - first,
        CYCLES - 1,
        STRANGERS_PER_CYCLE + LINKS_PER_CYCLE
    );
    // Every stranger was turned away and counted, none let through.
    let rejected = metric_sum(daemon.metrics, &format!("{name}_link_rejected_total")).await;
    let admitted = metric(daemon.metrics, &format!("{name}_link_handshakes_total")).await;
    assert_eq!(rejected as usize, strangers, "{name}: strangers counted");
    assert_eq!(
        admitted as usize,
        CYCLES * LINKS_PER_CYCLE,
        "{name}: links admitted"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn presence_heap_does_not_grow_with_connections() {
    tokio::time::timeout(HANG_LIMIT * 3, check("presence"))
        .await
        .expect("no hang");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn profile_heap_does_not_grow_with_connections() {
    tokio::time::timeout(HANG_LIMIT * 3, check("profile"))
        .await
        .expect("no hang");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shard_heap_does_not_grow_with_connections() {
    tokio::time::timeout(HANG_LIMIT * 3, check("msgstore"))
        .await
        .expect("no hang");
}
