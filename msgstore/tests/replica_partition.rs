//! A replicated shard group of three real `msgstore` processes, each in
//! its own network namespace, under concurrent appends, fetches and acks,
//! while the leader is cut off from the other two replicas (not from the
//! test's clients) for about 3 s, three times. It proves that:
//!
//! * the isolated leader commits nothing: a write sent to it while it is
//!   cut off is answered `Unavailable` (or `NotLeader`) or not at all;
//! * the majority side elects a new leader during each partition and
//!   acknowledges appends before the partition heals;
//! * there is never more than one leader per term (checked at every look
//!   for the leader, during the partitions too);
//! * after healing, every acknowledged append is present exactly once at
//!   its seq, seqs are gap-free, no acknowledged ack is undone (also
//!   checked by every fetch during the run), every replica converges and
//!   every replica's own engine holds the same mailboxes.
//!
//! The network: a bridge in the root namespace (`10.77.<run>.254/24`, the
//! clients' side) and one namespace per replica joined to it by a veth
//! pair (`10.77.<run>.<1..3>`), the replica's client and raft ports bound
//! to that address; names carry the test's pid, and everything is removed
//! on drop, after a panic too (what a killed run left behind, its
//! replicas included, is removed by the next run). A partition is an nftables table in the
//! isolated replica's namespace dropping its traffic to and from the
//! other two replicas' addresses both ways; where `nft` is missing (or
//! `PARTITION_WITH=routes`), blackhole routes to the other side in the
//! namespaces of both sides do it instead.
//!
//! Needs root and `ip netns` (iproute2): without them the test prints why
//! and passes without running.

use msgstore::{
    client::{ClientError, ShardClient},
    raft::testing::{seed_from_env, Group, Load, CONFIG},
};
use proto::shard::ShardErrorCode;
use rand::{rngs::StdRng, Rng, SeedableRng};
use std::{
    io::Write,
    net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpListener, TcpStream},
    os::fd::AsRawFd,
    process::{Command, Stdio},
    sync::atomic::{AtomicU64, Ordering},
    time::{Duration, Instant},
};

const USERS: u64 = 40;
const REPLICAS: usize = 3;
const ROUNDS: usize = 3;
/// How long a partition lasts at least.
const PARTITION: Duration = Duration::from_secs(3);
/// Generous limits for the majority side's liveness during a partition.
const ELECTION_LIMIT: Duration = Duration::from_secs(20);
const PROGRESS_LIMIT: Duration = Duration::from_secs(20);
const CLIENT_PORT: u16 = 7100;
const RAFT_PORT: u16 = 7200;
const NS_PREFIX: &str = "imsp";
const BRIDGE_PREFIX: &str = "imsb";
const VETH_PREFIX: &str = "imsv";

/// Run `prog args`; its stderr as the error.
fn run(prog: &str, args: &[&str], stdin: Option<&str>) -> Result<String, String> {
    let mut cmd = Command::new(prog);
    cmd.args(args)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd
        .spawn()
        .map_err(|e| format!("{prog} {}: {e}", args.join(" ")))?;
    if let Some(text) = stdin {
        let mut pipe = child.stdin.take().expect("piped stdin");
        pipe.write_all(text.as_bytes())
            .map_err(|e| format!("{prog}: {e}"))?;
    }
    let out = child
        .wait_with_output()
        .map_err(|e| format!("{prog}: {e}"))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(format!(
            "`{prog} {}` failed ({}): {}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

fn ip(args: &[&str]) -> Result<String, String> {
    run("ip", args, None)
}

/// How a partition is made.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Cut {
    /// A table in the isolated namespace dropping traffic both ways.
    Nftables,
    /// Blackhole routes in the namespaces of both sides.
    BlackholeRoutes,
}

const NFT_TABLE: &str = "msgstore_partition";

/// The namespaces, veth pairs and bridge of one run; removed on drop.
struct Net {
    pid: u32,
    subnet: u8,
    bridge: Option<String>,
    namespaces: Vec<String>,
    host_veths: Vec<String>,
    cut: Cut,
}

impl Net {
    /// Build the network, or say why it cannot be built here.
    fn setup() -> Result<Net, String> {
        // SAFETY: geteuid(2) has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            return Err("not root".into());
        }
        ip(&["netns", "list"]).map_err(|e| format!("no `ip netns`: {e}"))?;
        remove_stale();
        let pid = std::process::id();
        let subnet = free_subnet(pid)?;
        let mut net = Net {
            pid,
            subnet,
            bridge: None,
            namespaces: Vec::new(),
            host_veths: Vec::new(),
            cut: Cut::Nftables,
        };
        let bridge = format!("{BRIDGE_PREFIX}{pid}");
        ip(&["link", "add", "name", &bridge, "type", "bridge"])?;
        net.bridge = Some(bridge.clone());
        let gateway = format!("{}/24", net.root_addr());
        ip(&["addr", "add", &gateway, "dev", &bridge])?;
        ip(&["link", "set", &bridge, "up"])?;
        for i in 0..REPLICAS {
            let ns = format!("{NS_PREFIX}{pid}r{i}");
            ip(&["netns", "add", &ns])?;
            net.namespaces.push(ns.clone());
            let host = format!("{VETH_PREFIX}{pid}h{i}");
            let inner = format!("{VETH_PREFIX}{pid}n{i}");
            ip(&["link", "add", &host, "type", "veth", "peer", "name", &inner])?;
            net.host_veths.push(host.clone());
            ip(&["link", "set", &host, "master", &bridge])?;
            ip(&["link", "set", &host, "up"])?;
            ip(&["link", "set", &inner, "netns", &ns])?;
            let addr = format!("{}/24", net.addr(i));
            ip(&["-n", &ns, "addr", "add", &addr, "dev", &inner])?;
            ip(&["-n", &ns, "link", "set", &inner, "up"])?;
            ip(&["-n", &ns, "link", "set", "lo", "up"])?;
        }
        net.check_links()?;
        let routes = std::env::var("PARTITION_WITH").is_ok_and(|v| v == "routes");
        let nft = run(
            "ip",
            &["netns", "exec", &net.namespaces[0], "nft", "list", "tables"],
            None,
        );
        if routes || nft.is_err() {
            net.cut = Cut::BlackholeRoutes;
        }
        Ok(net)
    }

    fn root_addr(&self) -> Ipv4Addr {
        Ipv4Addr::new(10, 77, self.subnet, 254)
    }

    /// Replica `i`'s address (in its namespace).
    fn addr(&self, i: usize) -> Ipv4Addr {
        Ipv4Addr::new(10, 77, self.subnet, i as u8 + 1)
    }

    /// Every namespace reaches the next over the bridge, and the root
    /// namespace reaches each (a host whose bridge does not forward, e.g.
    /// a firewall on bridged traffic, cannot run the test).
    fn check_links(&self) -> Result<(), String> {
        for i in 0..REPLICAS {
            let here = SocketAddr::V4(SocketAddrV4::new(self.addr(i), 0));
            let listener = in_netns(&self.namespaces[i], move || TcpListener::bind(here))?
                .map_err(|e| format!("bind {here} in its namespace: {e}"))?;
            let at = listener.local_addr().expect("a bound address");
            let limit = Duration::from_secs(3);
            TcpStream::connect_timeout(&at, limit)
                .map_err(|e| format!("the root namespace cannot reach {at}: {e}"))?;
            let from = &self.namespaces[(i + 1) % REPLICAS];
            in_netns(from, move || TcpStream::connect_timeout(&at, limit))?
                .map_err(|e| format!("namespace {from} cannot reach {at}: {e}"))?;
        }
        Ok(())
    }

    /// Cut replica `i` off from every other replica, both ways.
    fn isolate(&self, i: usize) {
        let others: Vec<String> = (0..REPLICAS)
            .filter(|j| *j != i)
            .map(|j| self.addr(j).to_string())
            .collect();
        match self.cut {
            Cut::Nftables => {
                let set = others.join(", ");
                let script = format!(
                    "table inet {NFT_TABLE} {{\n\
                     chain input {{ type filter hook input priority filter; ip saddr {{ {set} }} drop; }}\n\
                     chain output {{ type filter hook output priority filter; ip daddr {{ {set} }} drop; }}\n\
                     }}\n"
                );
                let ns = &self.namespaces[i];
                run(
                    "ip",
                    &["netns", "exec", ns, "nft", "-f", "-"],
                    Some(&script),
                )
                .expect("add the partition table");
            }
            Cut::BlackholeRoutes => {
                for j in (0..REPLICAS).filter(|j| *j != i) {
                    self.blackhole("add", i, j);
                    self.blackhole("add", j, i);
                }
            }
        }
    }

    /// Undo [`Net::isolate`].
    fn heal(&self, i: usize) {
        match self.cut {
            Cut::Nftables => {
                let ns = &self.namespaces[i];
                run(
                    "ip",
                    &[
                        "netns", "exec", ns, "nft", "delete", "table", "inet", NFT_TABLE,
                    ],
                    None,
                )
                .expect("delete the partition table");
            }
            Cut::BlackholeRoutes => {
                for j in (0..REPLICAS).filter(|j| *j != i) {
                    self.blackhole("del", i, j);
                    self.blackhole("del", j, i);
                }
            }
        }
    }

    /// In replica `from`'s namespace, add or delete a blackhole route to
    /// replica `to`.
    fn blackhole(&self, op: &str, from: usize, to: usize) {
        let dst = format!("{}/32", self.addr(to));
        let ns = &self.namespaces[from];
        ip(&["-n", ns, "route", op, "blackhole", &dst]).expect("change a blackhole route");
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        // Deleting a namespace's name frees it once no process is in it
        // (the replicas were killed before: the group is dropped first),
        // and with it the veth ends inside; the host ends are deleted in
        // case a process still holds a namespace.
        for ns in &self.namespaces {
            if let Err(e) = ip(&["netns", "del", ns]) {
                eprintln!("cleanup: {e}");
            }
        }
        for veth in &self.host_veths {
            let _ = ip(&["link", "del", veth]);
        }
        if let Some(bridge) = &self.bridge {
            if let Err(e) = ip(&["link", "del", bridge]) {
                eprintln!("cleanup: {e}");
            }
        }
        eprintln!(
            "removed the namespaces, veths and bridge of run {} (10.77.{}.0/24)",
            self.pid, self.subnet
        );
    }
}

/// Run `f` on a thread that joined the network namespace `ns` (sockets it
/// makes stay in that namespace).
fn in_netns<T: Send + 'static>(
    ns: &str,
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<T, String> {
    let path = format!("/run/netns/{ns}");
    std::thread::spawn(move || {
        let file = std::fs::File::open(&path).map_err(|e| format!("open {path}: {e}"))?;
        // SAFETY: setns(2) with a namespace file we hold open; it moves
        // only this thread, which ends with `f`.
        if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
            return Err(format!("setns {path}: {}", std::io::Error::last_os_error()));
        }
        Ok(f())
    })
    .join()
    .expect("the namespace thread panicked")
}

/// The pid in a name `<prefix><pid>...`, if it is one of ours.
fn owner(name: &str, prefix: &str) -> Option<u32> {
    let rest = name.strip_prefix(prefix)?;
    let digits: String = rest.chars().take_while(|c| c.is_ascii_digit()).collect();
    digits.parse().ok()
}

fn alive(pid: u32) -> bool {
    std::path::Path::new(&format!("/proc/{pid}")).exists()
}

/// Remove what runs that were killed before cleaning up left behind:
/// their namespaces (and the replicas still running in them), veths and
/// bridges, named with the pid of a test that is gone.
fn remove_stale() {
    for line in ip(&["netns", "list"]).unwrap_or_default().lines() {
        let name = line.split_whitespace().next().unwrap_or("");
        if owner(name, NS_PREFIX).is_some_and(|pid| !alive(pid)) {
            // Its replicas outlived the killed test: only they run there.
            for pid in ip(&["netns", "pids", name]).unwrap_or_default().lines() {
                if let Ok(pid) = pid.trim().parse::<libc::pid_t>() {
                    // SAFETY: kill(2) has no memory preconditions.
                    unsafe { libc::kill(pid, libc::SIGKILL) };
                }
            }
            let _ = ip(&["netns", "del", name]);
            eprintln!("removed namespace {name}, left by a killed run");
        }
    }
    for line in ip(&["-o", "link", "show"]).unwrap_or_default().lines() {
        // "<index>: <name>[@<peer>]: ..."
        let Some(name) = line.split(": ").nth(1) else {
            continue;
        };
        let name = name.split('@').next().unwrap_or(name);
        let stale = [BRIDGE_PREFIX, VETH_PREFIX]
            .iter()
            .any(|p| owner(name, p).is_some_and(|pid| !alive(pid)));
        if stale {
            let _ = ip(&["link", "del", name]);
        }
    }
}

/// A `10.77.<n>.0/24` no address or route of the root namespace uses,
/// starting from one the pid picks.
fn free_subnet(pid: u32) -> Result<u8, String> {
    let used = ip(&["-4", "-o", "addr", "show"])? + &ip(&["-4", "route", "show"])?;
    (0..254u32)
        .map(|k| ((pid + k) % 254 + 1) as u8)
        .find(|n| !used.contains(&format!("10.77.{n}.")))
        .ok_or_else(|| "no free 10.77.x.0/24 subnet".into())
}

/// Appends acknowledged per replica (by the one the client talked to).
/// Send one append straight to the isolated leader: it must not be
/// acknowledged. Returns the append (user, msg_id) for the model's maybe
/// list (an unanswered write may be committed later).
async fn probe_isolated(addr: SocketAddr, user: u64, msg_id: u128) -> (u64, u128) {
    let answer = tokio::time::timeout(Duration::from_secs(10), async {
        let c = ShardClient::connect(addr).await?;
        c.append(user, msg_id, vec![0xee]).await
    })
    .await;
    match answer {
        Err(_) => eprintln!("  the isolated leader did not answer the probe"),
        Ok(Err(ClientError::Shard(e)))
            if matches!(
                e.code,
                ShardErrorCode::Unavailable | ShardErrorCode::NotLeader { .. }
            ) =>
        {
            eprintln!("  the isolated leader answered the probe {:?}", e.code)
        }
        Ok(answer) => panic!("the isolated leader {addr} answered an append with {answer:?}"),
    }
    (user, msg_id)
}

fn served_by(served: &[AtomicU64], replicas: impl Iterator<Item = usize>) -> u64 {
    replicas.map(|i| served[i].load(Ordering::Relaxed)).sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_group_of_three_keeps_every_acknowledged_write_through_partitions() {
    let net = match Net::setup() {
        Ok(net) => net,
        Err(why) => {
            eprintln!(
                "SKIPPED replica_partition: cannot make network namespaces here ({why}); \
                 the test needs root and `ip netns`"
            );
            return;
        }
    };
    eprintln!(
        "network 10.77.{}.0/24, namespaces {:?}, partitions by {:?}",
        net.subnet, net.namespaces, net.cut
    );
    let seed = seed_from_env();
    let mut rng = StdRng::seed_from_u64(seed);
    // Kept on failure (the replicas' logs are in it), removed on success.
    let dir = tempfile::tempdir().unwrap().keep();
    eprintln!("replica data and logs in {}", dir.display());
    let bin = std::path::Path::new(env!("CARGO_BIN_EXE_msgstore"));
    let places = (0..REPLICAS)
        .map(|i| {
            let at = |port| SocketAddr::V4(SocketAddrV4::new(net.addr(i), port));
            (
                at(CLIENT_PORT),
                at(RAFT_PORT),
                Some(net.namespaces[i].clone()),
            )
        })
        .collect();
    // Declared after `net`: dropped (replicas killed) before it.
    let mut group = Group::start_with(bin, &dir, CONFIG, places).await;
    let addrs = group.client_addrs();

    let load = Load::new(addrs.clone(), USERS);
    let served = load.served.clone();
    let tasks = load.start(seed);

    for round in 0..ROUNDS {
        tokio::time::sleep(Duration::from_millis(rng.gen_range(500..1000))).await;
        let old = group.wait_for_leader(Duration::from_secs(10)).await;
        let majority = move || (0..REPLICAS).filter(move |j| *j != old);
        let before = served_by(&served, majority());
        net.isolate(old);
        let cut_at = Instant::now();
        eprintln!("round {round}: replica {} (leader) isolated", old + 1);
        let probe = tokio::spawn(probe_isolated(
            addrs[old],
            rng.gen_range(1..=USERS),
            rng.gen(),
        ));

        // A new leader on the majority side (one leader per term is
        // checked at every look).
        let new = loop {
            let leader = group.wait_for_leader(ELECTION_LIMIT).await;
            if leader != old {
                break leader;
            }
            assert!(
                cut_at.elapsed() < ELECTION_LIMIT,
                "round {round}: no new leader within {ELECTION_LIMIT:?} of isolating replica {}",
                old + 1
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        let elected = cut_at.elapsed();
        // ... which acknowledges appends while the partition lasts.
        while served_by(&served, majority()) == before {
            assert!(
                cut_at.elapsed() < PROGRESS_LIMIT,
                "round {round}: the majority side acknowledged no append within \
                 {PROGRESS_LIMIT:?} of the partition"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let progressed = cut_at.elapsed();
        while cut_at.elapsed() < PARTITION {
            tokio::time::sleep(Duration::from_millis(250)).await;
            group.wait_for_leader(ELECTION_LIMIT).await;
        }
        let (user, msg_id) = probe.await.expect("the probe panicked");
        load.model
            .lock()
            .unwrap()
            .maybe
            .entry(user)
            .or_default()
            .push(msg_id);
        let during = served_by(&served, majority()) - before;
        net.heal(old);
        eprintln!(
            "round {round}: replica {} elected after {elected:?}, first append acknowledged \
             by the majority after {progressed:?}, {during} during the partition; healed \
             after {:?}",
            new + 1,
            cut_at.elapsed()
        );
        let healed_at = Instant::now();
        let leader = group.wait_for_leader(Duration::from_secs(10)).await;
        eprintln!(
            "round {round}: leader after healing: replica {} ({:?})",
            leader + 1,
            healed_at.elapsed()
        );
    }
    load.stop.store(true, Ordering::Relaxed);
    for t in tasks {
        t.await.expect("a client task panicked");
    }
    let converge_at = Instant::now();
    let applied = group.wait_converged(Duration::from_secs(30)).await;
    eprintln!(
        "converged at index {applied} in {:?}",
        converge_at.elapsed()
    );

    let m = std::mem::take(&mut *load.model.lock().unwrap());
    let acked: usize = m.acked.values().map(|v| v.len()).sum();
    let unknown: usize = m.maybe.values().map(|v| v.len()).sum();
    assert!(acked > 50, "too few appends were acknowledged: {acked}");
    group.check_against(&m, USERS, CONFIG).await;
    let served: Vec<u64> = served.iter().map(|s| s.load(Ordering::Relaxed)).collect();
    eprintln!(
        "acknowledged appends: {acked} (per replica {served:?}), unknown outcomes: {unknown}"
    );
    drop(group);
    drop(net);
    let _ = std::fs::remove_dir_all(&dir);
}
