//! `imbench chaos`'s cluster: every component a separate process, each
//! restartable on its own address and data directory, and the faults
//! done to them (SIGKILL then a restart, SIGSTOP then SIGCONT, and as
//! root a partition: cut off from every other process, then healed).
//!
//! As root (where `daemon::netns::Net` can be built), every process runs
//! in a network namespace of its own (host `t` for target `t`) on a
//! bridge imbench's clients reach; a partition unplugs the host's veth.
//! Elsewhere every process listens on loopback and there are no
//! partitions.
//!
//! Two presence replicas, a profile group of three replicas, two msgstore
//! shard groups of three replicas each (`msgstore::raft::testing::Group`,
//! fixed ports), two gateways sharing one static key and one resume-token
//! key. Every process holds
//! imbench's cluster key (`procs::start_daemon`, `Group::start`).

use crate::procs;
use anyhow::{ensure, Context, Result};
use daemon::{netns::Net, testing::free_addr};
use msgstore::raft::testing::Group;
use proto::cluster::{ClusterMap, ShardEntry};
use serde::Serialize;
use std::{
    ffi::OsString,
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

/// How long a daemon may take to print its listening line.
const START_TIMEOUT: Duration = Duration::from_secs(60);
/// Replicas of each shard group.
pub const REPLICAS: usize = 3;
/// Shard groups in the map.
pub const GROUPS: usize = 2;
pub const PRESENCE_REPLICAS: usize = 2;
pub const PROFILE_REPLICAS: usize = 3;
pub const GATEWAYS: usize = 2;

/// The replicas' settings: a small bucket fan-out (a replica starts in a
/// moment) and room for every group message of the run (a group's
/// messages stay 10 minutes after every member read them).
const REPLICA_CONFIG: &str = "\
[engine]
bucket_dirs = 16
bucket_files = 16
mailbox_messages_max = 10000000
mailbox_bytes_max = 4294967296
";

/// What a process is, for the fault rules and the report.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    Presence,
    Profile,
    Replica,
    Gateway,
}

/// One process faults can hit.
#[derive(Debug, Clone, Serialize)]
pub struct Target {
    /// `presence1`, `profile2`, `g2r3`, `gateway1`, ...
    pub name: String,
    pub role: Role,
    /// Processes of one redundancy set (the presence replicas, or the
    /// replicas of one group) are never faulted together: one machine
    /// dying is what the system promises to survive.
    pub set: Option<usize>,
}

/// A daemon other than a shard replica, restartable with the same
/// command line (same addresses, same data directory). Its stderr (the
/// logs) goes to `<name>.log` in the run's directory, appended across
/// restarts.
struct Daemon {
    /// The binary, which prints `"<tag> listening on ADDR"`.
    bin: PathBuf,
    tag: &'static str,
    args: Vec<OsString>,
    /// Where it listens (what it must print again after a restart).
    addr: SocketAddr,
    log: PathBuf,
    /// The network namespace it runs in, if any.
    netns: Option<String>,
    child: Option<Child>,
}

impl Daemon {
    fn new(
        (tag, name): (&'static str, &str),
        dir: &Path,
        (addr, netns): (SocketAddr, Option<String>),
        args: Vec<OsString>,
    ) -> Result<Daemon> {
        Ok(Daemon {
            bin: procs::locate_sibling(tag, tag, None)?,
            tag,
            args,
            addr,
            log: dir.join(format!("{name}.log")),
            netns,
            child: None,
        })
    }

    /// Start it and wait for its listening line (blocking; panics if it
    /// does not come within a minute, naming the exit status).
    fn start(&mut self) -> Result<()> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .with_context(|| format!("open {}", self.log.display()))?;
        let mut cmd = match &self.netns {
            Some(ns) => daemon::netns::command_in(ns, &self.bin),
            None => Command::new(&self.bin),
        };
        cmd.args(&self.args)
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(log);
        if std::env::var_os("RUST_LOG").is_none() {
            cmd.env("RUST_LOG", "warn");
        }
        daemon::testing::with_cluster_key(&mut cmd);
        let mut child = cmd
            .spawn()
            .with_context(|| format!("start {}", self.bin.display()))?;
        let addr = daemon::testing::wait_for_listening(&mut child, self.tag, START_TIMEOUT);
        if self.netns.is_some() {
            daemon::netns::check_in_place(child.id(), &self.bin);
        }
        self.child = Some(child);
        ensure!(
            addr == self.addr,
            "{} listens on {addr}, not on {}",
            self.tag,
            self.addr
        );
        Ok(())
    }

    fn kill(&mut self) -> Result<()> {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            child.wait().with_context(|| format!("reap {}", self.tag))?;
        }
        Ok(())
    }

    fn signal(&self, sig: libc::c_int) -> Result<()> {
        let child = self.child.as_ref().context("not running")?;
        send_signal(child.id(), sig)
    }

    fn check_running(&mut self) -> Result<()> {
        let log = self.log.display().to_string();
        match self.child.as_mut().map(|c| c.try_wait()) {
            Some(Ok(None)) => Ok(()),
            Some(Ok(Some(status))) => anyhow::bail!("exited with {status}; see {log}"),
            Some(Err(e)) => Err(e.into()),
            None => anyhow::bail!("not running"),
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.kill();
    }
}

fn send_signal(pid: u32, sig: libc::c_int) -> Result<()> {
    // SAFETY: kill(2) on a child we spawned and have not reaped.
    let rc = unsafe { libc::kill(pid as libc::pid_t, sig) };
    ensure!(
        rc == 0,
        "kill({pid}, {sig}): {}",
        std::io::Error::last_os_error()
    );
    Ok(())
}

fn os(words: &[&str]) -> Vec<OsString> {
    words.iter().map(OsString::from).collect()
}

pub struct Cluster {
    presence: Vec<Daemon>,
    profile: Vec<Daemon>,
    groups: Vec<Group>,
    gateways: Vec<Daemon>,
    /// Every process faults may hit, in a fixed order.
    pub targets: Vec<Target>,
    /// The gateways' UDP addresses.
    pub gateway_addrs: Vec<SocketAddr>,
    /// The gateways' static public key (one key, shared by both).
    pub public: [u8; 32],
    /// The profile replicas' client addresses, comma-separated (as in
    /// the map).
    pub profile_addrs: String,
    pub map: ClusterMap,
    /// The namespaces every process runs in (as root); dropped last,
    /// after the processes.
    net: Option<Net>,
}

/// Where target `t` runs: host `t` of the network (a namespace of its
/// own), or loopback.
#[derive(Clone, Copy)]
struct Places<'a>(Option<&'a Net>);

impl Places<'_> {
    /// A free port at target `t`'s address.
    fn addr(self, t: usize) -> SocketAddr {
        let free = free_addr();
        self.0.map_or(free, |net| net.socket_addr(t, free.port()))
    }

    fn netns(self, t: usize) -> Option<String> {
        self.0.map(|net| net.namespace(t).to_string())
    }

    fn place(self, t: usize) -> (SocketAddr, Option<String>) {
        (self.addr(t), self.netns(t))
    }
}

/// Targets in order: presence replicas, profile replicas, shard group
/// replicas (group by group), gateways; these give each one's index.
const FIRST_PROFILE: usize = PRESENCE_REPLICAS;
const FIRST_REPLICA: usize = FIRST_PROFILE + PROFILE_REPLICAS;
const FIRST_GATEWAY: usize = FIRST_REPLICA + GROUPS * REPLICAS;
/// Processes in the cluster (hosts of the network).
pub const PROCESSES: usize = FIRST_GATEWAY + GATEWAYS;

impl Cluster {
    /// Start every process: each in a namespace of `net` when given.
    pub async fn start(dir: &Path, net: Option<Net>) -> Result<Cluster> {
        let places = Places(net.as_ref());
        let mut presence = Vec::new();
        for i in 0..PRESENCE_REPLICAS {
            let (addr, netns) = places.place(i);
            let name = format!("presence{}", i + 1);
            let args = os(&["--listen", &addr.to_string()]);
            let mut d = Daemon::new(("presence", &name), dir, (addr, netns), args)?;
            d.start()?;
            presence.push(d);
        }
        let profile = start_profile_group(dir, places).await?;
        let profile_addrs = profile
            .iter()
            .map(|p| p.addr.to_string())
            .collect::<Vec<_>>()
            .join(",");

        let msgstore = procs::locate_sibling("msgstore", "msgstore", None)?;
        let mut groups = Vec::new();
        let mut entries = Vec::new();
        for g in 0..GROUPS {
            let gdir = dir.join(format!("group{}", g + 1));
            std::fs::create_dir_all(&gdir).context("create a group's directory")?;
            let hosts = (0..REPLICAS).map(|r| FIRST_REPLICA + g * REPLICAS + r);
            let at = hosts.map(|t| (places.addr(t), places.addr(t), places.netns(t)));
            let group = Group::start_with(&msgstore, &gdir, REPLICA_CONFIG, at.collect()).await;
            let addrs: Vec<String> = group.client_addrs().iter().map(|a| a.to_string()).collect();
            entries.push(ShardEntry {
                id: format!("g{}", g + 1),
                addr: addrs[0].clone(),
                weight: 1,
                replicas: addrs,
            });
            groups.push(group);
        }
        let map = ClusterMap {
            epoch: 1,
            presence: presence
                .iter()
                .map(|p| p.addr.to_string())
                .collect::<Vec<_>>()
                .join(","),
            profile: profile_addrs.clone(),
            gateways: Vec::new(),
            shards: entries,
        };
        let map_path = dir.join("cluster.toml");
        std::fs::write(&map_path, map.to_toml()).context("write the cluster map")?;
        let config = dir.join("gateway.toml");
        std::fs::write(&config, crate::group_cluster::GATEWAY_CONFIG)
            .context("write the gateways' config")?;
        // One static key and one resume-token key for both gateways, as
        // an operator copies them (each keeps its own reset key).
        let first = dir.join("gateway1");
        let keys = gateway::keys::load_dir(&first).context("create the gateways' keys")?;
        let mut gateways = Vec::new();
        for i in 0..GATEWAYS {
            let data = dir.join(format!("gateway{}", i + 1));
            if i > 0 {
                crate::group_cluster::share_gateway_keys(&first, &data)?;
            }
            let (udp, netns) = places.place(FIRST_GATEWAY + i);
            let peer = places.addr(FIRST_GATEWAY + i);
            let id = (i + 1).to_string();
            let mut args = os(&[
                "--listen",
                &udp.to_string(),
                "--peer-listen",
                &peer.to_string(),
                "--id",
                &id,
                "--cluster",
            ]);
            args.push(map_path.clone().into_os_string());
            args.push("--data".into());
            args.push(data.into_os_string());
            args.push("--config".into());
            args.push(config.clone().into_os_string());
            let name = format!("gateway{}", i + 1);
            let mut d = Daemon::new(("gateway", &name), dir, (udp, netns), args)?;
            d.start()?;
            gateways.push(d);
        }
        let mut targets = Vec::new();
        for i in 0..PRESENCE_REPLICAS {
            targets.push(Target {
                name: format!("presence{}", i + 1),
                role: Role::Presence,
                set: Some(0),
            });
        }
        for i in 0..PROFILE_REPLICAS {
            targets.push(Target {
                name: format!("profile{}", i + 1),
                role: Role::Profile,
                set: Some(1 + GROUPS),
            });
        }
        for g in 0..GROUPS {
            for r in 0..REPLICAS {
                targets.push(Target {
                    name: format!("g{}r{}", g + 1, r + 1),
                    role: Role::Replica,
                    set: Some(1 + g),
                });
            }
        }
        for i in 0..GATEWAYS {
            targets.push(Target {
                name: format!("gateway{}", i + 1),
                role: Role::Gateway,
                set: None,
            });
        }
        let gateway_addrs = gateways.iter().map(|g| g.addr).collect();
        Ok(Cluster {
            presence,
            profile,
            groups,
            gateways,
            targets,
            gateway_addrs,
            public: keys.keypair.public,
            profile_addrs,
            map,
            net,
        })
    }

    /// Whether partitions can be made (every process in a namespace).
    pub fn can_partition(&self) -> bool {
        self.net.is_some()
    }

    /// Cut target `t` off from every other process (`cut`), or heal it.
    pub fn partition(&self, t: usize, cut: bool) -> Result<()> {
        let net = self.net.as_ref().context("no network namespaces")?;
        let r = if cut { net.unplug(t) } else { net.plug(t) };
        r.map_err(anyhow::Error::msg)
    }

    /// Target `t` (an index into `targets`): its daemon, or its group
    /// and replica.
    fn locate(&mut self, t: usize) -> Place<'_> {
        if t < FIRST_PROFILE {
            Place::Daemon(&mut self.presence[t])
        } else if t < FIRST_REPLICA {
            Place::Daemon(&mut self.profile[t - FIRST_PROFILE])
        } else if t < FIRST_GATEWAY {
            let i = t - FIRST_REPLICA;
            Place::Replica(&mut self.groups[i / REPLICAS], i % REPLICAS)
        } else {
            Place::Daemon(&mut self.gateways[t - FIRST_GATEWAY])
        }
    }

    /// SIGKILL target `t` (and reap it).
    pub fn kill(&mut self, t: usize) -> Result<()> {
        match self.locate(t) {
            Place::Daemon(d) => d.kill(),
            Place::Replica(g, r) => {
                g.replicas[r].kill();
                Ok(())
            }
        }
    }

    /// Start target `t` again on its address and data directory; waits
    /// for its listening line (blocking).
    pub fn restart(&mut self, t: usize) -> Result<()> {
        match self.locate(t) {
            Place::Daemon(d) => d.start(),
            Place::Replica(g, r) => {
                // Panics (with the replica's log beside its data) if it
                // does not come back within a minute.
                g.replicas[r].start();
                Ok(())
            }
        }
    }

    /// Send `sig` (SIGSTOP, SIGCONT) to target `t`.
    pub fn signal(&mut self, t: usize, sig: libc::c_int) -> Result<()> {
        match self.locate(t) {
            Place::Daemon(d) => d.signal(sig),
            Place::Replica(g, r) => {
                let child = g.replicas[r]
                    .child
                    .as_ref()
                    .context("replica not running")?;
                send_signal(child.id(), sig)
            }
        }
    }

    /// Every process still running (else which one is not, and why).
    pub fn check_running(&mut self) -> Vec<String> {
        let mut problems = Vec::new();
        for t in 0..self.targets.len() {
            let name = self.targets[t].name.clone();
            let r = match self.locate(t) {
                Place::Daemon(d) => d.check_running(),
                Place::Replica(g, r) => match g.replicas[r].child.as_mut() {
                    Some(c) => match c.try_wait() {
                        Ok(None) => Ok(()),
                        Ok(Some(status)) => Err(anyhow::anyhow!(
                            "exited with {status}; see {}",
                            g.replicas[r].data.with_extension("log").display()
                        )),
                        Err(e) => Err(e.into()),
                    },
                    None => Err(anyhow::anyhow!("not running")),
                },
            };
            if let Err(e) = r {
                problems.push(format!("{name}: {e:#}"));
            }
        }
        problems
    }

    /// Wait until each shard group has a leader (at most `limit` each).
    pub async fn wait_for_leaders(&self, limit: Duration) {
        for g in &self.groups {
            g.wait_for_leader(limit).await;
        }
    }

    /// SIGKILL everything (what dropping does), the groups last.
    pub fn stop(mut self) {
        let daemons = self.gateways.iter_mut().chain(self.presence.iter_mut());
        for d in daemons.chain(self.profile.iter_mut()) {
            let _ = d.kill();
        }
        for g in &mut self.groups {
            for r in &mut g.replicas {
                r.kill();
            }
        }
    }
}

/// The profile group: three replicas with their own replication ports,
/// formed as an operator would (`imctl profile-group init`).
async fn start_profile_group(dir: &Path, places: Places<'_>) -> Result<Vec<Daemon>> {
    let mut replicas = Vec::new();
    let mut members = std::collections::BTreeMap::new();
    for i in 0..PROFILE_REPLICAS {
        let t = FIRST_PROFILE + i;
        let (id, (addr, netns), raft) = (i as u64 + 1, places.place(t), places.addr(t));
        let name = format!("profile{id}");
        let mut args = os(&[
            "--listen",
            &addr.to_string(),
            "--raft-id",
            &id.to_string(),
            "--raft-listen",
            &raft.to_string(),
            "--data",
        ]);
        args.push(dir.join(&name).into_os_string());
        let mut d = Daemon::new(("profile", &name), dir, (addr, netns), args)?;
        d.start()?;
        replicas.push(d);
        let replica = replication::Replica {
            raft_addr: raft.to_string(),
            client_addr: addr.to_string(),
        };
        members.insert(id, replica);
    }
    let first = members[&1].raft_addr.clone();
    let init = replication::peer::AdminRequest::Init { members };
    let answer = replication::peer::admin(&first, init, START_TIMEOUT)
        .await
        .context("form the profile group")?;
    ensure!(
        matches!(answer, replication::peer::AdminResponse::Done),
        "forming the profile group: {answer:?}"
    );
    Ok(replicas)
}

enum Place<'a> {
    Daemon(&'a mut Daemon),
    Replica(&'a mut Group, usize),
}

/// The kinds of fault.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, PartialOrd, Ord)]
#[serde(rename_all = "snake_case")]
pub enum FaultKind {
    /// SIGKILL, then a restart on the same address and data directory.
    Kill,
    /// SIGSTOP, then SIGCONT.
    Pause,
    /// Cut off from every other process (its namespace's link down),
    /// then healed (as root only).
    Partition,
}

impl FaultKind {
    pub fn name(self) -> &'static str {
        match self {
            FaultKind::Kill => "kill",
            FaultKind::Pause => "pause",
            FaultKind::Partition => "partition",
        }
    }
}

/// One fault as it happened.
#[derive(Debug, Clone, Serialize)]
pub struct Fault {
    /// From 1.
    pub n: usize,
    pub target: String,
    pub role: Role,
    pub kind: FaultKind,
    /// Seconds since the run's clock started (the users' clock).
    pub at_s: f64,
    /// How long the target was down (killed until it listened again) or
    /// stopped, in ms.
    pub down_ms: f64,
    /// ... when it ended (restarted or continued).
    pub end_s: f64,
}

impl Fault {
    /// `#N kind target start-end s`, as the report names a fault.
    pub fn describe(&self) -> String {
        format!(
            "#{} {} {} {:.1}-{:.1} s",
            self.n,
            self.kind.name(),
            self.target,
            self.at_s,
            self.end_s
        )
    }
}

/// Do one fault to target `t`: kill it, wait `down`, restart it; or stop
/// it for `down` and continue it; or cut it off for `down` and heal it.
/// Blocking parts run in place (the
/// runtime is multi-threaded).
pub async fn inject(
    cluster: &mut Cluster,
    t: usize,
    kind: FaultKind,
    down: Duration,
    n: usize,
    start: Instant,
) -> Result<Fault> {
    let target = cluster.targets[t].clone();
    let at = Instant::now();
    match kind {
        FaultKind::Kill => {
            tokio::task::block_in_place(|| cluster.kill(t))
                .with_context(|| format!("kill {}", target.name))?;
            tokio::time::sleep(down).await;
            tokio::task::block_in_place(|| cluster.restart(t))
                .with_context(|| format!("restart {}", target.name))?;
        }
        FaultKind::Pause => {
            cluster
                .signal(t, libc::SIGSTOP)
                .with_context(|| format!("stop {}", target.name))?;
            tokio::time::sleep(down).await;
            cluster
                .signal(t, libc::SIGCONT)
                .with_context(|| format!("continue {}", target.name))?;
        }
        FaultKind::Partition => {
            tokio::task::block_in_place(|| cluster.partition(t, true))
                .with_context(|| format!("cut {} off", target.name))?;
            tokio::time::sleep(down).await;
            tokio::task::block_in_place(|| cluster.partition(t, false))
                .with_context(|| format!("heal {}", target.name))?;
        }
    }
    let end = Instant::now();
    Ok(Fault {
        n,
        target: target.name,
        role: target.role,
        kind,
        at_s: at.saturating_duration_since(start).as_secs_f64(),
        down_ms: (end - at).as_secs_f64() * 1e3,
        end_s: end.saturating_duration_since(start).as_secs_f64(),
    })
}
