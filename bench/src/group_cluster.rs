//! `imbench group`'s cluster: presence, profile, two msgstore shards and
//! two gateways, each a real process with its own Prometheus `/metrics`
//! port, plus a byte-counting relay in front of each shard.
//!
//! The shards have no byte counters of their own (no `*_bytes_total`
//! metric on the shard port, none on the gateways' shard links), so the
//! cluster map names the relays instead of the shards: every byte a
//! gateway sends to a shard, and every byte a shard answers, passes a
//! relay and is counted there. Links between the cluster's processes are
//! encrypted, so a relay ends the gateway's secure link (every process
//! here, imbench included, holds imbench's cluster key) and opens its own
//! to the shard: it counts the protocol's frames as sent, not the links'
//! record overhead.

use crate::procs::{self, ChildProc};
use anyhow::{bail, Context, Result};
use daemon::secure::{GateLimits, LinkReader, LinkWriter, SecureListener};
use profile::ProfileClient;
use proto::{
    cluster::{ClusterMap, ShardEntry},
    shard::Request,
};
use std::{
    collections::{BTreeMap, HashMap},
    ffi::OsString,
    net::SocketAddr,
    path::Path,
    process::Command,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex,
    },
    time::Duration,
};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
    task::JoinHandle,
};

/// How long a daemon may take to print its listening line.
const START_TIMEOUT: Duration = Duration::from_secs(60);
/// A `/metrics` scrape gives up after this long.
const SCRAPE_TIMEOUT: Duration = Duration::from_secs(5);
/// The gateways' limits for the run: per-IP handshakes and per-user
/// message rates raised (every simulated client shares 127.0.0.1).
pub const GATEWAY_CONFIG: &str = "\
[limits]
handshakes_per_ip_per_s = 1000000
messages_per_user_per_s = 1000000
messages_burst = 1000000
";

/// The shards' limits for the run: a group's messages stay until every
/// member read them, and half the members read nothing until the drain,
/// so the default 10,000 unread messages per mailbox would end a phase
/// with `MailboxFull`.
pub const SHARD_CONFIG: &str = "\
[engine]
mailbox_messages_max = 10000000
mailbox_bytes_max = 4294967296
";

/// A daemon process and its `/metrics` address.
pub struct Node {
    pub proc: ChildProc,
    pub metrics: SocketAddr,
}

pub struct GatewayNode {
    pub node: Node,
    /// Where clients reach it (UDP).
    pub udp: SocketAddr,
}

/// Bytes a relay carried, each way, summed over its connections.
#[derive(Default)]
pub struct RelayBytes {
    /// Gateway -> shard (requests).
    pub up: AtomicU64,
    /// Shard -> gateway (answers).
    pub down: AtomicU64,
    /// The same by the op of the request (an answer counts for its
    /// request's op): op -> (up, down).
    pub by_op: Mutex<BTreeMap<&'static str, (u64, u64)>>,
}

impl RelayBytes {
    fn count(&self, op: &'static str, up: u64, down: u64) {
        let mut m = self.by_op.lock().expect("relay mutex");
        let e = m.entry(op).or_default();
        e.0 += up;
        e.1 += down;
    }
}

/// Request ids of one relayed connection awaiting their answer, by op.
type InFlight = Arc<Mutex<HashMap<u64, &'static str>>>;

/// Splits the gateway -> shard bytes into frames and names each one's op.
#[derive(Default)]
struct RequestFrames {
    buf: Vec<u8>,
}

impl RequestFrames {
    fn feed(&mut self, bytes: &[u8], relay: &RelayBytes, in_flight: &InFlight) {
        self.buf.extend_from_slice(bytes);
        let mut at = 0;
        while self.buf.len() - at >= 4 {
            let len =
                u32::from_le_bytes(self.buf[at..at + 4].try_into().expect("4 bytes")) as usize;
            if self.buf.len() - at < 4 + len {
                break;
            }
            let frame = &self.buf[at + 4..at + 4 + len];
            let op = match postcard::from_bytes::<Request>(frame) {
                Ok(r) => {
                    let op = r.body.op_name();
                    in_flight.lock().expect("relay mutex").insert(r.id, op);
                    op
                }
                Err(_) => "undecoded",
            };
            relay.count(op, (4 + len) as u64, 0);
            at += 4 + len;
        }
        self.buf.drain(..at);
    }
}

/// Splits the shard -> gateway bytes into frames (without buffering their
/// bodies) and counts each for the op of the request it answers.
#[derive(Default)]
struct ResponseFrames {
    /// The start of a frame (its length, then the varint id) while it is
    /// incomplete.
    head: [u8; HEAD_BYTES],
    head_len: usize,
    /// Bytes of the current frame still to pass.
    rest: usize,
}

/// A frame's length prefix and the longest varint id.
const HEAD_BYTES: usize = 4 + 10;

impl ResponseFrames {
    fn feed(&mut self, bytes: &[u8], relay: &RelayBytes, in_flight: &InFlight) {
        let mut i = 0;
        while i < bytes.len() {
            if self.rest > 0 {
                let n = self.rest.min(bytes.len() - i);
                self.rest -= n;
                i += n;
                continue;
            }
            // At a frame's start: complete its head from what is here.
            let had = self.head_len;
            let take = (HEAD_BYTES - had).min(bytes.len() - i);
            self.head[had..had + take].copy_from_slice(&bytes[i..i + take]);
            let head = &self.head[..had + take];
            if head.len() < 4 {
                self.head_len = head.len();
                i += take;
                continue;
            }
            let len = u32::from_le_bytes(head[..4].try_into().expect("4 bytes")) as usize;
            let body = &head[4..head.len().min(4 + len)];
            let id = match varint(body) {
                Some(id) => id,
                // The id is cut off here, and more of the frame follows.
                None if body.len() < len && body.len() < 10 => {
                    self.head_len = head.len();
                    i += take;
                    continue;
                }
                None => u64::MAX,
            };
            let op = in_flight
                .lock()
                .expect("relay mutex")
                .remove(&id)
                .unwrap_or("unknown");
            relay.count(op, 0, (4 + len) as u64);
            // The frame's bytes from `i` on (those before are in the head).
            let here = 4 + len - had;
            let n = here.min(bytes.len() - i);
            i += n;
            self.rest = here - n;
            self.head_len = 0;
        }
    }
}

/// A postcard varint (u64) at the start of `b`, if complete.
fn varint(b: &[u8]) -> Option<u64> {
    let mut v = 0u64;
    for (i, &byte) in b.iter().enumerate().take(10) {
        v |= u64::from(byte & 0x7f) << (7 * i);
        if byte & 0x80 == 0 {
            return Some(v);
        }
    }
    None
}

struct Relay {
    bytes: Arc<RelayBytes>,
    task: JoinHandle<()>,
}

pub struct Cluster {
    pub presence: Node,
    pub profile_node: Node,
    pub shards: Vec<Node>,
    pub gateways: Vec<GatewayNode>,
    relays: Vec<Relay>,
    /// The gateways' static public key (one key, shared by both).
    pub public: [u8; 32],
    pub profile: ProfileClient,
}

/// The server-side counters the run compares before and after a phase.
#[derive(Debug, Clone, Default)]
pub struct ServerCounters {
    /// `msgstore_appends_total`, summed over the shards.
    pub shard_appends: f64,
    /// `msgstore_requests_total`, summed over the shards (all ops).
    pub shard_requests: f64,
    /// ... by op.
    pub shard_ops: BTreeMap<String, f64>,
    /// `gateway_group_forwards_total`, summed over the gateways.
    pub group_forwards: f64,
    /// `gateway_group_messages_total`, summed over the gateways.
    pub group_messages: f64,
    /// `gateway_group_pushes_total`, summed over the gateways.
    pub group_pushes: f64,
    /// `gateway_notify_failed_total` (every label), summed.
    pub notify_failed: f64,
    /// `gateway_pushes_dropped_total` (every label), summed.
    pub pushes_dropped: f64,
    /// `gateway_group_reads_total`, summed (group pages served).
    pub group_reads: f64,
    /// Bytes through the shard relays, gateway -> shard.
    pub relay_up: u64,
    /// Bytes through the shard relays, shard -> gateway.
    pub relay_down: u64,
    /// ... by op: (up, down).
    pub relay_ops: BTreeMap<String, (u64, u64)>,
}

impl ServerCounters {
    pub fn since(&self, before: &ServerCounters) -> ServerCounters {
        ServerCounters {
            shard_appends: self.shard_appends - before.shard_appends,
            shard_requests: self.shard_requests - before.shard_requests,
            shard_ops: self
                .shard_ops
                .iter()
                .map(|(op, n)| (op.clone(), n - before.shard_ops.get(op).unwrap_or(&0.0)))
                .filter(|(_, n)| *n != 0.0)
                .collect(),
            group_forwards: self.group_forwards - before.group_forwards,
            group_messages: self.group_messages - before.group_messages,
            group_pushes: self.group_pushes - before.group_pushes,
            notify_failed: self.notify_failed - before.notify_failed,
            pushes_dropped: self.pushes_dropped - before.pushes_dropped,
            group_reads: self.group_reads - before.group_reads,
            relay_up: self.relay_up - before.relay_up,
            relay_down: self.relay_down - before.relay_down,
            relay_ops: self
                .relay_ops
                .iter()
                .map(|(op, &(u, d))| {
                    let (bu, bd) = before.relay_ops.get(op).copied().unwrap_or_default();
                    (op.clone(), (u - bu, d - bd))
                })
                .filter(|(_, (u, d))| *u + *d > 0)
                .collect(),
        }
    }
}

fn metrics_addr() -> Result<SocketAddr> {
    Ok(SocketAddr::from((
        [127, 0, 0, 1],
        procs::free_loopback_port()?,
    )))
}

fn args<const N: usize>(words: [&str; N]) -> Vec<OsString> {
    words.iter().map(OsString::from).collect()
}

/// Start `name` (a binary next to imbench) with `args`, a `/metrics`
/// port, and logs at `warn` unless `RUST_LOG` says otherwise.
fn start_node(name: &str, args: Vec<OsString>) -> Result<(Node, SocketAddr)> {
    let bin = procs::locate_sibling(name, name, None)?;
    let metrics = metrics_addr()?;
    let mut cmd = Command::new(bin);
    cmd.args(args)
        .arg("--metrics-addr")
        .arg(metrics.to_string())
        .env("NO_COLOR", "1");
    if std::env::var_os("RUST_LOG").is_none() {
        cmd.env("RUST_LOG", "warn");
    }
    let (proc, addr) = procs::start_daemon(name, &mut cmd, START_TIMEOUT)?;
    Ok((Node { proc, metrics }, addr))
}

impl Cluster {
    pub async fn start(dir: &Path, shards: usize, gateways: usize) -> Result<Cluster> {
        let (presence, presence_addr) = start_node("presence", args(["--listen", "127.0.0.1:0"]))?;
        let mut profile_args = args(["--listen", "127.0.0.1:0", "--data"]);
        profile_args.push(dir.join("profile").into_os_string());
        let (profile_node, profile_addr) = start_node("profile", profile_args)?;
        let shard_config = dir.join("msgstore.toml");
        std::fs::write(&shard_config, SHARD_CONFIG).context("write the shards' config")?;
        let mut shard_nodes = Vec::new();
        let mut relays = Vec::new();
        let mut entries = Vec::new();
        for i in 0..shards {
            let mut shard_args = args(["--listen", "127.0.0.1:0", "--data"]);
            shard_args.push(dir.join(format!("shard{}", i + 1)).into_os_string());
            shard_args.push("--config".into());
            shard_args.push(shard_config.clone().into_os_string());
            let (node, addr) = start_node("msgstore", shard_args)?;
            let (relay_addr, relay) = Relay::start(addr).await?;
            entries.push(ShardEntry {
                id: format!("s{}", i + 1),
                addr: relay_addr.to_string(),
                weight: 1,
                replicas: Vec::new(),
            });
            shard_nodes.push(node);
            relays.push(relay);
        }
        let map = ClusterMap {
            epoch: 1,
            presence: presence_addr.to_string(),
            profile: profile_addr.to_string(),
            gateways: Vec::new(),
            shards: entries,
        };
        let map_path = dir.join("cluster.toml");
        std::fs::write(&map_path, map.to_toml()).context("write the cluster map")?;
        let config = dir.join("gateway.toml");
        std::fs::write(&config, GATEWAY_CONFIG).context("write the gateways' config")?;
        // One static key and one resume-token key for the whole cluster,
        // as an operator would copy them: made once, copied to each.
        let first = dir.join("gateway1");
        let keys = gateway::keys::load_dir(&first).context("create the gateways' keys")?;
        let mut gateway_nodes = Vec::new();
        for i in 0..gateways {
            let data = dir.join(format!("gateway{}", i + 1));
            if i > 0 {
                share_gateway_keys(&first, &data)?;
            }
            let id = (i + 1).to_string();
            let mut gw_args = args([
                "--listen",
                "127.0.0.1:0",
                "--peer-listen",
                "127.0.0.1:0",
                "--id",
                &id,
                "--cluster",
            ]);
            gw_args.push(map_path.clone().into_os_string());
            gw_args.push("--data".into());
            gw_args.push(data.into_os_string());
            gw_args.push("--config".into());
            gw_args.push(config.clone().into_os_string());
            let (node, udp) = start_node("gateway", gw_args)?;
            gateway_nodes.push(GatewayNode { node, udp });
        }
        let profile = ProfileClient::connect(profile_addr.to_string())
            .await
            .context("connect to the profile service")?;
        Ok(Cluster {
            presence,
            profile_node,
            shards: shard_nodes,
            gateways: gateway_nodes,
            relays,
            public: keys.keypair.public,
            profile,
        })
    }

    /// Every process still running (else its last output).
    pub fn check_running(&mut self) -> Result<()> {
        self.presence.proc.check_running()?;
        self.profile_node.proc.check_running()?;
        for n in &mut self.shards {
            n.proc.check_running()?;
        }
        for g in &mut self.gateways {
            g.node.proc.check_running()?;
        }
        Ok(())
    }

    /// Scrape every shard and gateway; read the relays.
    pub async fn counters(&self) -> Result<ServerCounters> {
        let mut c = ServerCounters::default();
        for s in &self.shards {
            let text = scrape(s.metrics).await?;
            c.shard_appends += metric_sum(&text, "msgstore_appends_total");
            c.shard_requests += metric_sum(&text, "msgstore_requests_total");
            for (op, n) in metric_by_label(&text, "msgstore_requests_total", "op") {
                *c.shard_ops.entry(op).or_default() += n;
            }
        }
        for g in &self.gateways {
            let text = scrape(g.node.metrics).await?;
            c.group_forwards += metric_sum(&text, "gateway_group_forwards_total");
            c.group_messages += metric_sum(&text, "gateway_group_messages_total");
            c.group_pushes += metric_sum(&text, "gateway_group_pushes_total");
            c.notify_failed += metric_sum(&text, "gateway_notify_failed_total");
            c.pushes_dropped += metric_sum(&text, "gateway_pushes_dropped_total");
            c.group_reads += metric_sum(&text, "gateway_group_reads_total");
        }
        for r in &self.relays {
            c.relay_up += r.bytes.up.load(Ordering::Relaxed);
            c.relay_down += r.bytes.down.load(Ordering::Relaxed);
            for (op, (u, d)) in r.bytes.by_op.lock().expect("relay mutex").iter() {
                let e = c.relay_ops.entry(op.to_string()).or_default();
                e.0 += u;
                e.1 += d;
            }
        }
        Ok(c)
    }

    /// CPU time of every process of the cluster, by role.
    pub fn cpu(&self) -> Vec<(String, Option<Duration>)> {
        let mut out = vec![
            ("presence".to_string(), self.presence.proc.pid()),
            ("profile".to_string(), self.profile_node.proc.pid()),
        ];
        for (i, s) in self.shards.iter().enumerate() {
            out.push((format!("shard{}", i + 1), s.proc.pid()));
        }
        for (i, g) in self.gateways.iter().enumerate() {
            out.push((format!("gateway{}", i + 1), g.node.proc.pid()));
        }
        out.push(("imbench".to_string(), std::process::id()));
        let mut cpu: Vec<(String, Option<Duration>)> = out
            .into_iter()
            .map(|(name, pid)| (name, procs::cpu_time(pid).ok()))
            .collect();
        cpu.push(("machine".to_string(), machine_busy().ok()));
        cpu
    }

    pub fn stop(self) {
        for r in &self.relays {
            r.task.abort();
        }
        // The processes are killed (SIGKILL) and reaped when dropped.
    }
}

impl Relay {
    /// Listen on a free loopback port; every (secure) link is carried to
    /// `target` over a secure link of its own, its bytes counted.
    async fn start(target: SocketAddr) -> Result<(SocketAddr, Relay)> {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .context("bind a shard relay")?;
        let addr = listener.local_addr()?;
        let mut listener = SecureListener::new(listener, "imbench_relay", GateLimits::default());
        let bytes = Arc::new(RelayBytes::default());
        let counted = bytes.clone();
        let task = tokio::spawn(async move {
            loop {
                let inbound = listener.accept().await;
                let bytes = counted.clone();
                tokio::spawn(async move {
                    let Ok(outbound) = daemon::secure::connect(target).await else {
                        return;
                    };
                    let (in_r, in_w) = inbound.into_split();
                    let (out_r, out_w) = outbound.into_split();
                    let in_flight = InFlight::default();
                    let up =
                        tokio::spawn(pump(in_r, out_w, bytes.clone(), in_flight.clone(), true));
                    pump(out_r, in_w, bytes, in_flight, false).await;
                    up.abort();
                });
            }
        });
        Ok((addr, Relay { bytes, task }))
    }
}

/// Copy `from` to `to` until either ends, counting the bytes (by op: a
/// request is named before it goes on, so its answer finds its name).
async fn pump(
    mut from: LinkReader,
    mut to: LinkWriter,
    bytes: Arc<RelayBytes>,
    in_flight: InFlight,
    up: bool,
) {
    let mut buf = vec![0u8; 64 * 1024];
    let counter = if up { &bytes.up } else { &bytes.down };
    let mut requests = RequestFrames::default();
    let mut responses = ResponseFrames::default();
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        counter.fetch_add(n as u64, Ordering::Relaxed);
        if up {
            requests.feed(&buf[..n], &bytes, &in_flight);
        } else {
            responses.feed(&buf[..n], &bytes, &in_flight);
        }
        if to.send(&buf[..n]).await.is_err() {
            break;
        }
    }
    let _ = to.shutdown().await;
}

/// CPU time every core of the machine spent busy (not idle, not waiting
/// for I/O) since boot: the first line of `/proc/stat`.
fn machine_busy() -> Result<Duration> {
    let stat = std::fs::read_to_string("/proc/stat").context("read /proc/stat")?;
    let line = stat.lines().next().context("empty /proc/stat")?;
    let ticks: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|v| v.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal ...
    let busy: u64 = ticks
        .iter()
        .take(8)
        .enumerate()
        .filter(|(i, _)| *i != 3 && *i != 4)
        .map(|(_, v)| v)
        .sum();
    // SAFETY: plain libc query.
    let per_sec = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
    Ok(Duration::from_nanos(busy * 1_000_000_000 / per_sec))
}

/// `GET /metrics` (the body, headers included).
pub async fn scrape(addr: SocketAddr) -> Result<String> {
    let get = async {
        let mut stream = TcpStream::connect(addr).await?;
        let request = format!("GET /metrics HTTP/1.0\r\nHost: {addr}\r\n\r\n");
        stream.write_all(request.as_bytes()).await?;
        let mut text = String::new();
        stream.read_to_string(&mut text).await?;
        Ok::<_, std::io::Error>(text)
    };
    match tokio::time::timeout(SCRAPE_TIMEOUT, get).await {
        Ok(Ok(text)) if text.starts_with("HTTP/1.") && text.contains(" 200 ") => Ok(text),
        Ok(Ok(text)) => bail!(
            "scrape of {addr}: unexpected answer {:?}",
            text.lines().next()
        ),
        Ok(Err(e)) => Err(e).with_context(|| format!("scrape {addr}")),
        Err(_) => bail!("scrape of {addr} timed out"),
    }
}

/// The samples of metric `name` by the value of its label `label`
/// (summed over its other labels).
pub fn metric_by_label(text: &str, name: &str, label: &str) -> BTreeMap<String, f64> {
    let mut out = BTreeMap::new();
    let key = format!("{label}=\"");
    for l in text.lines().filter(|l| !l.starts_with('#')) {
        let Some(rest) = l.strip_prefix(name).and_then(|r| r.strip_prefix('{')) else {
            continue;
        };
        let Some(close) = rest.find('}') else {
            continue;
        };
        let labels = &rest[..close];
        let Some(at) = labels.find(&key) else {
            continue;
        };
        let value_start = &labels[at + key.len()..];
        let Some(end) = value_start.find('"') else {
            continue;
        };
        let Some(v) = rest[close + 1..]
            .split_whitespace()
            .next()
            .and_then(|v| v.parse::<f64>().ok())
        else {
            continue;
        };
        *out.entry(value_start[..end].to_string()).or_default() += v;
    }
    out
}

/// The sum of every sample of metric `name` (any labels) in a Prometheus
/// text page; 0 when the page does not list it (not counted yet).
pub fn metric_sum(text: &str, name: &str) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let rest = l.strip_prefix(name)?;
            let value = match rest.chars().next()? {
                ' ' => rest,
                '{' => &rest[rest.find('}')? + 1..],
                _ => return None,
            };
            value.split_whitespace().next()?.parse::<f64>().ok()
        })
        .sum()
}

/// Give the gateway whose data directory is `data` the static key and the
/// resume-token key of the one in `first`, as an operator copies them
/// (each keeps its own reset key).
pub(crate) fn share_gateway_keys(first: &std::path::Path, data: &std::path::Path) -> Result<()> {
    std::fs::create_dir_all(data)?;
    for file in [
        gateway::keys::STATIC_KEY_FILE,
        gateway::keys::TOKEN_KEY_FILE,
    ] {
        std::fs::copy(first.join(file), data.join(file)).with_context(|| format!("copy {file}"))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proto::shard::RequestBody;

    #[test]
    fn metric_sum_adds_every_label_set_and_nothing_else() {
        let page = "# TYPE gateway_notify_failed_total counter\n\
                    gateway_notify_failed_total{why=\"peer\"} 2\n\
                    gateway_notify_failed_total{why=\"presence\"} 3\n\
                    gateway_notify_failed_total_other 100\n\
                    msgstore_appends_total 41\n";
        assert_eq!(metric_sum(page, "gateway_notify_failed_total"), 5.0);
        assert_eq!(metric_sum(page, "msgstore_appends_total"), 41.0);
        assert_eq!(metric_sum(page, "missing_total"), 0.0);
        let by = metric_by_label(page, "gateway_notify_failed_total", "why");
        assert_eq!(by.get("peer"), Some(&2.0));
        assert_eq!(by.get("presence"), Some(&3.0));
        assert_eq!(by.len(), 2);
    }

    fn frame<T: serde::Serialize>(v: &T) -> Vec<u8> {
        let body = postcard::to_stdvec(v).unwrap();
        let mut f = (body.len() as u32).to_le_bytes().to_vec();
        f.extend(body);
        f
    }

    #[test]
    fn frames_are_counted_by_op_however_the_bytes_are_split() {
        use proto::shard::{Response, ResponseBody};
        let fetch = Request {
            id: 300,
            body: RequestBody::Fetch {
                user: 1,
                after_seq: 0,
                max_count: 10,
                max_bytes: 1000,
            },
        };
        let ping = Request {
            id: 7,
            body: RequestBody::Ping,
        };
        let pong = |id| Response {
            id,
            body: ResponseBody::Pong,
        };
        let up: Vec<u8> = [frame(&fetch), frame(&ping)].concat();
        // Answers out of order; the fetch's is long (1,000 bytes after a
        // Pong body: only the length and the id are read).
        let short = frame(&pong(7));
        let mut long = frame(&pong(300));
        long.extend(vec![0u8; 1000]);
        let len = (long.len() - 4) as u32;
        long[..4].copy_from_slice(&len.to_le_bytes());
        let down: Vec<u8> = [short.clone(), long.clone(), short.clone()].concat();
        for split in [1, 2, 3, 5, 13, 64, 4096] {
            let relay = RelayBytes::default();
            let in_flight = InFlight::default();
            let mut r = RequestFrames::default();
            for chunk in up.chunks(split) {
                r.feed(chunk, &relay, &in_flight);
            }
            let mut a = ResponseFrames::default();
            for chunk in down.chunks(split) {
                a.feed(chunk, &relay, &in_flight);
            }
            let m = relay.by_op.lock().unwrap().clone();
            let n = |v: &Vec<u8>| v.len() as u64;
            assert_eq!(
                m.get("fetch"),
                Some(&(n(&frame(&fetch)), n(&long))),
                "split {split}"
            );
            assert_eq!(m.get("ping"), Some(&(n(&frame(&ping)), n(&short))));
            assert_eq!(m.get("unknown"), Some(&(0, n(&short))), "id 7 twice");
            assert!(in_flight.lock().unwrap().is_empty());
        }
    }

    #[tokio::test]
    async fn the_relay_carries_and_counts_both_ways() {
        let echo = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let target = echo.local_addr().unwrap();
        let mut echo = SecureListener::new(echo, "test_echo", GateLimits::default());
        tokio::spawn(async move {
            let mut s = echo.accept().await;
            let mut buf = [0u8; 5];
            s.reader.read_exact(&mut buf).await.unwrap();
            s.writer.send(b"hello world").await.unwrap();
        });
        let (addr, relay) = Relay::start(target).await.unwrap();
        let mut c = daemon::secure::connect(addr).await.unwrap();
        c.writer.send(b"12345").await.unwrap();
        let mut got = [0u8; 11];
        c.reader.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"hello world");
        assert_eq!(relay.bytes.up.load(Ordering::Relaxed), 5);
        assert_eq!(relay.bytes.down.load(Ordering::Relaxed), 11);
        relay.task.abort();
    }
}
