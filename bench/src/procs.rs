//! Child server processes: start, wait until ready, read peak RSS, kill.

use anyhow::{bail, Context, Result};
use std::{
    collections::VecDeque,
    io::{BufRead, BufReader, Read},
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{mpsc, Arc, Mutex},
    time::{Duration, Instant},
};

const TAIL_LINES_MAX: usize = 40;

/// A child process that is killed (SIGKILL) and reaped when dropped.
pub struct ChildProc {
    name: String,
    child: Child,
    /// Last lines of its stdout and stderr, when they are piped to us.
    tail: Arc<Mutex<VecDeque<String>>>,
}

impl ChildProc {
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Peak resident set size (VmHWM) in bytes.
    pub fn peak_rss_bytes(&self) -> Result<u64> {
        peak_rss_bytes(self.pid())
    }

    /// The recent output lines, for error messages.
    pub fn tail(&self) -> String {
        let tail = self.tail.lock().map(|t| t.clone()).unwrap_or_default();
        tail.into_iter().collect::<Vec<_>>().join("\n")
    }

    /// Fail if the process has already exited.
    pub fn check_running(&mut self) -> Result<()> {
        if let Some(status) = self.child.try_wait()? {
            bail!(
                "{} exited early with {status}; its last output:\n{}",
                self.name,
                self.tail()
            );
        }
        Ok(())
    }

    /// Kill it now and wait for it.
    pub fn kill(mut self) -> Result<()> {
        self.kill_inner()
    }

    /// SIGTERM (a daemon drains and exits 0), then wait up to `timeout`;
    /// SIGKILL if it has not exited by then (an error: it should have).
    pub fn terminate(&mut self, timeout: Duration) -> Result<()> {
        if self.child.try_wait()?.is_some() {
            return Ok(());
        }
        let pid = libc::pid_t::try_from(self.pid()).context("a pid fits pid_t")?;
        // SAFETY: plain libc call on our own child's pid.
        unsafe { libc::kill(pid, libc::SIGTERM) };
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Some(status) = self.child.try_wait()? {
                anyhow::ensure!(
                    status.success(),
                    "{} exited with {status} on SIGTERM",
                    self.name
                );
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        self.kill_inner()?;
        bail!("{} did not exit within {timeout:?} of SIGTERM", self.name)
    }

    /// Stop it as an operator would (SIGTERM: a clean shutdown) and wait
    /// for it to exit; after `timeout` it is killed and that is an error.
    pub fn stop(mut self, timeout: Duration) -> Result<()> {
        self.terminate(timeout)
    }

    /// Kill it now and wait for it, in place.
    pub fn kill_now(&mut self) -> Result<()> {
        self.kill_inner()
    }

    fn kill_inner(&mut self) -> Result<()> {
        if self.child.try_wait()?.is_none() {
            self.child
                .kill()
                .with_context(|| format!("kill {}", self.name))?;
        }
        self.child
            .wait()
            .with_context(|| format!("wait {}", self.name))?;
        Ok(())
    }
}

impl Drop for ChildProc {
    fn drop(&mut self) {
        let _ = self.kill_inner();
    }
}

/// Start `cmd` with its output discarded (or redirected by the caller).
pub fn spawn(name: &str, cmd: &mut Command) -> Result<ChildProc> {
    let child = cmd
        .stdin(Stdio::null())
        .spawn()
        .with_context(|| format!("start {name} ({cmd:?})"))?;
    Ok(ChildProc {
        name: name.to_string(),
        child,
        tail: Arc::default(),
    })
}

/// Start `cmd` with stdout and stderr piped, and wait until one of its output
/// lines contains `needle`; returns that line. Output keeps being read (and
/// only its tail kept) for the life of the process.
pub fn spawn_and_wait_for_line(
    name: &str,
    cmd: &mut Command,
    needle: &str,
    timeout: Duration,
) -> Result<(ChildProc, String)> {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("start {name} ({cmd:?})"))?;
    let tail: Arc<Mutex<VecDeque<String>>> = Arc::default();
    let (tx, rx) = mpsc::channel();
    let stdout = child
        .stdout
        .take()
        .map(|s| Box::new(s) as Box<dyn Read + Send>);
    let stderr = child
        .stderr
        .take()
        .map(|s| Box::new(s) as Box<dyn Read + Send>);
    for pipe in [stdout, stderr].into_iter().flatten() {
        let tail = tail.clone();
        let tx = tx.clone();
        let needle = needle.to_string();
        std::thread::spawn(move || {
            for line in BufReader::new(pipe).lines() {
                let Ok(line) = line else { break };
                if line.contains(&needle) {
                    let _ = tx.send(line.clone());
                }
                if let Ok(mut t) = tail.lock() {
                    if t.len() >= TAIL_LINES_MAX {
                        t.pop_front();
                    }
                    t.push_back(line);
                }
            }
        });
    }
    let mut proc = ChildProc {
        name: name.to_string(),
        child,
        tail,
    };
    let deadline = Instant::now() + timeout;
    loop {
        match rx.recv_timeout(Duration::from_millis(50)) {
            Ok(line) => return Ok((proc, line)),
            Err(mpsc::RecvTimeoutError::Timeout) => {}
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                // Both pipes closed: the process is gone or closed them.
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        proc.check_running()?;
        if Instant::now() >= deadline {
            bail!(
                "{name} did not print {needle:?} within {timeout:?}; its last output:\n{}",
                proc.tail()
            );
        }
    }
}

/// A daemon binary: `explicit`, else `name` next to this executable (where
/// `cargo build -p PACKAGE -p bench` puts it).
pub fn locate_sibling(name: &str, package: &str, explicit: Option<&Path>) -> Result<PathBuf> {
    if let Some(p) = explicit {
        return Ok(p.to_path_buf());
    }
    let exe = std::env::current_exe().context("locate the imbench executable")?;
    let bin = exe
        .parent()
        .context("imbench executable has no directory")?
        .join(name);
    if !bin.exists() {
        bail!(
            "no {name} binary at {} (build it with `cargo build --release -p {package} -p bench`, \
             or pass --{name}-bin PATH)",
            bin.display()
        );
    }
    Ok(bin)
}

/// Start one of our daemons and wait (up to `timeout`) for its
/// `"<name> listening on ADDR"` line; the process and the address. The
/// daemon gets this process's cluster key (unless `cmd` names a key file),
/// so the benchmark's clients and the daemons it starts share one key.
pub fn start_daemon(
    name: &str,
    cmd: &mut Command,
    timeout: Duration,
) -> Result<(ChildProc, SocketAddr)> {
    daemon::testing::with_cluster_key(cmd);
    let needle = format!("{name} listening on ");
    let (proc, line) = spawn_and_wait_for_line(name, cmd, &needle, timeout)?;
    let addr = parse_listening_line(&line, &needle)
        .with_context(|| format!("no address in {name}'s line {line:?}"))?;
    Ok((proc, addr))
}

/// The address after `needle`, ignoring colour codes and trailing
/// punctuation.
fn parse_listening_line(line: &str, needle: &str) -> Option<SocketAddr> {
    let start = line.find(needle)? + needle.len();
    let word: String = line[start..]
        .chars()
        .take_while(|c| !c.is_whitespace() && *c != '\u{1b}')
        .collect();
    let word = word.trim_matches(|c: char| !(c.is_ascii_alphanumeric() || c == '[' || c == ']'));
    word.parse().ok()
}

/// CPU time (user + system, all threads) `pid` has used so far.
pub fn cpu_time(pid: u32) -> Result<Duration> {
    stat_cpu_time(&format!("/proc/{pid}/stat"))
}

/// Wait until the processes `pids` (with their children, such as Redis's
/// AOF rewrite) are idle: together they used under `SETTLE_CPU_SHARE` of one
/// core over a `SETTLE_WINDOW`, e.g. once servers have finished the
/// background work a load left behind. Returns how long that took, or
/// `None` if they were still busy after `max`.
pub async fn settle(pids: &[u32], max: Duration) -> Result<Option<Duration>> {
    const SETTLE_WINDOW: Duration = Duration::from_millis(300);
    const SETTLE_CPU_SHARE: f64 = 0.05;
    let start = std::time::Instant::now();
    loop {
        let before = family_cpu_time(pids);
        tokio::time::sleep(SETTLE_WINDOW).await;
        let used = family_cpu_time(pids).saturating_sub(before);
        if used.as_secs_f64() < SETTLE_CPU_SHARE * SETTLE_WINDOW.as_secs_f64() {
            return Ok(Some(start.elapsed()));
        }
        if start.elapsed() >= max {
            return Ok(None);
        }
    }
}

/// CPU time of `pids` and their live children (a process that ended in
/// between is simply not counted).
fn family_cpu_time(pids: &[u32]) -> Duration {
    let children = std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|p| parent_of(*p).is_some_and(|pp| pids.contains(&pp)));
    pids.iter()
        .copied()
        .chain(children.collect::<Vec<_>>())
        .filter_map(|p| cpu_time(p).ok())
        .sum()
}

/// The parent of `pid` (field 4 of /proc/PID/stat).
fn parent_of(pid: u32) -> Option<u32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.split_whitespace().nth(1)?.parse().ok()
}

/// CPU time (user + system) one thread of this process has used so far.
pub fn thread_cpu_time(tid: i32) -> Result<Duration> {
    stat_cpu_time(&format!("/proc/self/task/{tid}/stat"))
}

fn stat_cpu_time(path: &str) -> Result<Duration> {
    let stat = std::fs::read_to_string(path).with_context(|| format!("read {path}"))?;
    let ticks = parse_cpu_ticks(&stat).with_context(|| format!("unexpected {path}"))?;
    // SAFETY: plain libc query.
    let per_sec = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
    Ok(Duration::from_nanos(ticks * 1_000_000_000 / per_sec))
}

/// utime + stime (fields 14 and 15) of a /proc/PID/stat line; the command
/// name (field 2) may contain spaces, so count from its closing parenthesis.
fn parse_cpu_ticks(stat: &str) -> Option<u64> {
    let rest = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // After ")": field 3 (state) is index 0, so field N is index N - 3.
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some(utime + stime)
}

/// This thread's CPU time (`CLOCK_THREAD_CPUTIME_ID`, nanosecond grain).
pub fn own_thread_cpu_time() -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes into the timespec we own.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    assert_eq!(
        rc, 0,
        "CLOCK_THREAD_CPUTIME_ID is always available on Linux"
    );
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

/// The calling thread's id (for [`thread_cpu_time`]).
pub fn current_tid() -> i32 {
    // SAFETY: plain libc query.
    unsafe { libc::gettid() }
}

/// Peak resident set size (VmHWM) of `pid` in bytes.
pub fn peak_rss_bytes(pid: u32) -> Result<u64> {
    status_bytes(pid, "VmHWM:")
}

/// Current resident set size (VmRSS) of `pid` in bytes.
pub fn rss_bytes(pid: u32) -> Result<u64> {
    status_bytes(pid, "VmRSS:")
}

/// Anonymous resident memory (RssAnon) of `pid` in bytes: its heap and
/// stacks, not the file pages it maps (those are the page cache's).
pub fn anon_rss_bytes(pid: u32) -> Result<u64> {
    status_bytes(pid, "RssAnon:")
}

fn status_bytes(pid: u32, field: &str) -> Result<u64> {
    let path = format!("/proc/{pid}/status");
    let status = std::fs::read_to_string(&path).with_context(|| format!("read {path}"))?;
    parse_status_kib(&status, field).with_context(|| format!("no {field} line in {path}"))
}

fn parse_status_kib(status: &str, field: &str) -> Option<u64> {
    let line = status.lines().find(|l| l.starts_with(field))?;
    let kib: u64 = line
        .trim_start_matches(field)
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    Some(kib * 1024)
}

/// A loopback port that was free a moment ago (for TCP and UDP).
pub fn free_loopback_port() -> Result<u16> {
    Ok(daemon::testing::free_addr().port())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_address_in_log_lines() {
        const N: &str = "msgstore listening on ";
        let a: SocketAddr = "127.0.0.1:4567".parse().unwrap();
        for line in [
            "msgstore listening on 127.0.0.1:4567",
            "2024-01-01T00:00:00Z  INFO msgstore: msgstore listening on 127.0.0.1:4567 fsync=always",
            "\u{1b}[2mts\u{1b}[0m msgstore listening on 127.0.0.1:4567\u{1b}[0m",
            "msgstore listening on 127.0.0.1:4567.",
        ] {
            assert_eq!(parse_listening_line(line, N), Some(a), "{line}");
        }
        assert_eq!(parse_listening_line("starting", N), None);
    }

    #[test]
    fn children_are_found_by_their_parent() {
        let mut child = std::process::Command::new("sleep")
            .arg("5")
            .spawn()
            .unwrap();
        assert_eq!(parent_of(child.id()), Some(std::process::id()));
        // The family's CPU time includes the child's (read without error).
        assert!(family_cpu_time(&[std::process::id()]) >= cpu_time(child.id()).unwrap());
        child.kill().unwrap();
        child.wait().unwrap();
    }

    #[test]
    fn cpu_ticks_are_read_after_the_command_name() {
        let stat = "42 (redis server) S 1 42 42 0 -1 4194560 100 0 0 0 250 75 0 0 20 0 4 0";
        assert_eq!(parse_cpu_ticks(stat), Some(325));
        assert_eq!(parse_cpu_ticks("garbage"), None);
        assert!(cpu_time(std::process::id()).is_ok());
    }

    #[test]
    fn parses_vm_hwm() {
        let status = "Name:\tx\nVmPeak:\t  100 kB\nVmHWM:\t    2048 kB\nVmRSS:\t 1 kB\n";
        assert_eq!(parse_status_kib(status, "VmHWM:"), Some(2048 * 1024));
        assert_eq!(parse_status_kib(status, "VmRSS:"), Some(1024));
        let status = "VmRSS:\t  3000 kB\nRssAnon:\t    1200 kB\nRssFile:\t  1800 kB\n";
        assert_eq!(parse_status_kib(status, "RssAnon:"), Some(1200 * 1024));
        assert_eq!(parse_status_kib("Name: x\n", "VmHWM:"), None);
    }

    #[test]
    fn own_peak_rss_is_readable() {
        assert!(peak_rss_bytes(std::process::id()).unwrap() > 0);
        assert!(rss_bytes(std::process::id()).unwrap() > 0);
        assert!(anon_rss_bytes(std::process::id()).unwrap() > 0);
        assert!(thread_cpu_time(current_tid()).is_ok());
    }
}
