//! Test networks of real hosts on one machine, for tests and benchmarks
//! that cut processes off from each other (as root).
//!
//! A [`Net`] is a bridge in the root namespace (`10.77.<subnet>.254/24`,
//! where the test or benchmark itself runs) and one network namespace per
//! host joined to it by a veth pair (`10.77.<subnet>.<1..>`). A process
//! started with [`Net::command`] runs in its host's namespace and binds
//! that host's address. Names carry the creating process's pid and a tag
//! of the caller's; everything is removed on drop, after a panic too, and
//! what a killed run left behind (its processes included) is removed by
//! the next run with the same tag.
//!
//! Two cuts:
//! * [`Net::isolate_from`]: an nftables table in the host's namespace
//!   drops its traffic with the given other hosts both ways (the root
//!   namespace still reaches it); where `nft` is missing, blackhole routes
//!   in the namespaces of both sides do it instead;
//! * [`Net::unplug`]: the host's veth end in the root namespace goes
//!   down, cutting it off from everything; [`Net::plug`] undoes it. TCP
//!   connections stay open across it, as across a real partition.

use std::{
    io::Write,
    net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpListener, TcpStream},
    os::fd::AsRawFd,
    path::Path,
    process::{Command, Stdio},
    time::Duration,
};

/// Hosts one [`Net`] may have (addresses `.1` to `.HOSTS_MAX`).
pub const HOSTS_MAX: usize = 200;

const NFT_TABLE: &str = "im_partition";

/// Run `prog args`; its stderr as the error.
pub fn run(prog: &str, args: &[&str], stdin: Option<&str>) -> Result<String, String> {
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

/// How [`Net::isolate_from`] cuts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cut {
    /// A table in the isolated namespace dropping traffic both ways.
    Nftables,
    /// Blackhole routes in the namespaces of both sides.
    BlackholeRoutes,
}

/// The namespaces, veth pairs and bridge of one run; removed on drop.
pub struct Net {
    tag: &'static str,
    pid: u32,
    subnet: u8,
    bridge: Option<String>,
    namespaces: Vec<String>,
    host_veths: Vec<String>,
    cut: Cut,
}

impl Net {
    /// Build a network of `hosts` hosts, or say why it cannot be built
    /// here (not root, no `ip netns`, a bridge that does not forward).
    /// `tag` (two or three lowercase letters) names the run's interfaces
    /// and namespaces: `im<tag>n<pid>h<i>` and so on, within the kernel's
    /// 15 bytes for a pid up to 7 digits and 99 hosts.
    pub fn setup(tag: &'static str, hosts: usize) -> Result<Net, String> {
        if !(1..=HOSTS_MAX).contains(&hosts) {
            return Err(format!("{hosts} hosts: 1 to {HOSTS_MAX} can be made"));
        }
        // SAFETY: geteuid(2) has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            return Err("not root".into());
        }
        ip(&["netns", "list"]).map_err(|e| format!("no `ip netns`: {e}"))?;
        remove_stale(tag);
        let pid = std::process::id();
        let subnet = free_subnet(pid)?;
        let mut net = Net {
            tag,
            pid,
            subnet,
            bridge: None,
            namespaces: Vec::new(),
            host_veths: Vec::new(),
            cut: Cut::Nftables,
        };
        let bridge = format!("{}{pid}", prefix(tag, 'b'));
        ip(&["link", "add", "name", &bridge, "type", "bridge"])?;
        net.bridge = Some(bridge.clone());
        let gateway = format!("{}/24", net.root_addr());
        ip(&["addr", "add", &gateway, "dev", &bridge])?;
        ip(&["link", "set", &bridge, "up"])?;
        for i in 0..hosts {
            net.add_host(i, &bridge)?;
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

    fn add_host(&mut self, i: usize, bridge: &str) -> Result<(), String> {
        let pid = self.pid;
        let ns = format!("{}{pid}h{i}", prefix(self.tag, 'n'));
        ip(&["netns", "add", &ns])?;
        self.namespaces.push(ns.clone());
        let host = format!("{}{pid}h{i}", prefix(self.tag, 'v'));
        let inner = format!("{}{pid}n{i}", prefix(self.tag, 'v'));
        ip(&["link", "add", &host, "type", "veth", "peer", "name", &inner])?;
        self.host_veths.push(host.clone());
        ip(&["link", "set", &host, "master", bridge])?;
        ip(&["link", "set", &host, "up"])?;
        ip(&["link", "set", &inner, "netns", &ns])?;
        let addr = format!("{}/24", self.addr(i));
        ip(&["-n", &ns, "addr", "add", &addr, "dev", &inner])?;
        ip(&["-n", &ns, "link", "set", &inner, "up"])?;
        ip(&["-n", &ns, "link", "set", "lo", "up"])?;
        Ok(())
    }

    pub fn hosts(&self) -> usize {
        self.namespaces.len()
    }

    /// The `10.77.<subnet>.0/24` the run took.
    pub fn subnet(&self) -> u8 {
        self.subnet
    }

    pub fn cut(&self) -> Cut {
        self.cut
    }

    /// The root namespace's address on the bridge.
    pub fn root_addr(&self) -> Ipv4Addr {
        Ipv4Addr::new(10, 77, self.subnet, 254)
    }

    /// Host `i`'s address (in its namespace).
    pub fn addr(&self, i: usize) -> Ipv4Addr {
        Ipv4Addr::new(10, 77, self.subnet, i as u8 + 1)
    }

    /// `port` at host `i`'s address.
    pub fn socket_addr(&self, i: usize, port: u16) -> SocketAddr {
        SocketAddr::V4(SocketAddrV4::new(self.addr(i), port))
    }

    /// Host `i`'s namespace name.
    pub fn namespace(&self, i: usize) -> &str {
        &self.namespaces[i]
    }

    /// A command that runs `bin` in host `i`'s namespace. `ip netns exec`
    /// execs it in place (no fork), so the child's pid is `bin`'s and
    /// signals reach it (see [`check_in_place`]).
    pub fn command(&self, i: usize, bin: &Path) -> Command {
        command_in(&self.namespaces[i], bin)
    }

    /// Every namespace reaches the next over the bridge, and the root
    /// namespace reaches each (a host whose bridge does not forward, e.g.
    /// a firewall on bridged traffic, cannot run these tests).
    fn check_links(&self) -> Result<(), String> {
        let n = self.hosts();
        for i in 0..n {
            let here = self.socket_addr(i, 0);
            let listener = in_netns(&self.namespaces[i], move || TcpListener::bind(here))?
                .map_err(|e| format!("bind {here} in its namespace: {e}"))?;
            let at = listener.local_addr().expect("a bound address");
            let limit = Duration::from_secs(3);
            TcpStream::connect_timeout(&at, limit)
                .map_err(|e| format!("the root namespace cannot reach {at}: {e}"))?;
            let from = &self.namespaces[(i + 1) % n];
            in_netns(from, move || TcpStream::connect_timeout(&at, limit))?
                .map_err(|e| format!("namespace {from} cannot reach {at}: {e}"))?;
        }
        Ok(())
    }

    /// Cut host `i` off from `others`, both ways (the root namespace
    /// still reaches every host).
    pub fn isolate_from(&self, i: usize, others: &[usize]) -> Result<(), String> {
        match self.cut {
            Cut::Nftables => {
                let set: Vec<String> = others.iter().map(|j| self.addr(*j).to_string()).collect();
                let set = set.join(", ");
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
                .map(drop)
            }
            Cut::BlackholeRoutes => others.iter().try_for_each(|j| {
                self.blackhole("add", i, *j)?;
                self.blackhole("add", *j, i)
            }),
        }
    }

    /// Undo [`Net::isolate_from`] with the same `others`.
    pub fn heal_from(&self, i: usize, others: &[usize]) -> Result<(), String> {
        match self.cut {
            Cut::Nftables => {
                let ns = &self.namespaces[i];
                let delete = [
                    "netns", "exec", ns, "nft", "delete", "table", "inet", NFT_TABLE,
                ];
                run("ip", &delete, None).map(drop)
            }
            Cut::BlackholeRoutes => others.iter().try_for_each(|j| {
                self.blackhole("del", i, *j)?;
                self.blackhole("del", *j, i)
            }),
        }
    }

    /// Cut host `i` off from every other host and the root namespace:
    /// its veth end on the bridge goes down.
    pub fn unplug(&self, i: usize) -> Result<(), String> {
        ip(&["link", "set", &self.host_veths[i], "down"]).map(drop)
    }

    /// Undo [`Net::unplug`].
    pub fn plug(&self, i: usize) -> Result<(), String> {
        ip(&["link", "set", &self.host_veths[i], "up"]).map(drop)
    }

    /// In host `from`'s namespace, add or delete a blackhole route to
    /// host `to`.
    fn blackhole(&self, op: &str, from: usize, to: usize) -> Result<(), String> {
        let dst = format!("{}/32", self.addr(to));
        let ns = &self.namespaces[from];
        ip(&["-n", ns, "route", op, "blackhole", &dst]).map(drop)
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        // Deleting a namespace's name frees it once no process is in it
        // (the caller kills its processes first), and with it the veth
        // ends inside; the host ends are deleted in case a process still
        // holds a namespace.
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

/// A command that runs `bin` in the namespace `ns` (see [`Net::command`]).
pub fn command_in(ns: &str, bin: &Path) -> Command {
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", ns]).arg(bin);
    cmd
}

/// Assert that `pid`, started by [`Net::command`], is `bin` itself (so
/// signals sent to it reach `bin`, not an `ip` that forked).
pub fn check_in_place(pid: u32, bin: &Path) {
    let exe = std::fs::read_link(format!("/proc/{pid}/exe"));
    let bin = std::fs::canonicalize(bin).ok();
    assert!(
        exe.ok() == bin,
        "`ip netns exec` did not exec {bin:?} in place: signals would miss it"
    );
}

/// `im<tag><kind>`: the start of every name a run with `tag` makes.
fn prefix(tag: &str, kind: char) -> String {
    format!("im{tag}{kind}")
}

/// Run `f` on a thread that joined the network namespace `ns` (sockets it
/// makes stay in that namespace).
pub fn in_netns<T: Send + 'static>(
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
    Path::new(&format!("/proc/{pid}")).exists()
}

/// Remove what runs with `tag` that were killed before cleaning up left
/// behind: their namespaces (and the processes still running in them),
/// veths and bridges, named with the pid of a process that is gone.
fn remove_stale(tag: &str) {
    let ns_prefix = prefix(tag, 'n');
    for line in ip(&["netns", "list"]).unwrap_or_default().lines() {
        let name = line.split_whitespace().next().unwrap_or("");
        if owner(name, &ns_prefix).is_some_and(|pid| !alive(pid)) {
            // Its processes outlived the killed run: only they run there.
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
    let links = [prefix(tag, 'b'), prefix(tag, 'v')];
    for line in ip(&["-o", "link", "show"]).unwrap_or_default().lines() {
        // "<index>: <name>[@<peer>]: ..."
        let Some(name) = line.split(": ").nth(1) else {
            continue;
        };
        let name = name.split('@').next().unwrap_or(name);
        let stale = links
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_fit_the_kernel_s_limit_and_name_their_owner() {
        let longest = format!("{}{}h{}", prefix("sp", 'v'), 9_999_999u32, 99);
        assert!(longest.len() <= 15, "{longest}");
        assert_eq!(owner(&longest, &prefix("sp", 'v')), Some(9_999_999));
        assert_eq!(owner("imspv12h3", &prefix("ch", 'v')), None);
    }
}
