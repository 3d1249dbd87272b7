//! A whole cluster on loopback for end-to-end tests: presence, profile and
//! msgstore shards run in-process (each a real TCP daemon) or as real
//! `msgstore` processes, the gateway runs as a real `gateway` process;
//! clients speak the real protocol over UDP (raw, [`TestClient`], or
//! through the SDK, [`Cluster::sdk`]).
#![allow(dead_code)]

use client::{
    sdk::{self, Connection, Credentials, ImEvent, SdkConfig},
    Client, DriverConfig,
};
use daemon::testing::DaemonProcess;
use embedded::{Embedded, EmbeddedConfig};
use proto::{
    app::{self, Call, ClientMessage, GatewayMessage, Login, LoginAnswer, LoginMethod, Reply},
    session::Event,
};
use std::{
    collections::BTreeMap,
    net::SocketAddr,
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};
use tokio::sync::mpsc;

pub const WAIT: Duration = Duration::from_secs(20);

/// How to set up a [`Cluster`].
#[derive(Debug, Clone, Default)]
pub struct Options {
    /// Shards in the gateway's cluster map.
    pub shards: usize,
    /// In-process shards started but left out of the gateway's map (to move
    /// users to); `services.map` lists them after the others.
    pub spare_shards: usize,
    /// The map's shards as real `msgstore` processes (so a test can SIGKILL
    /// or SIGSTOP them) instead of in-process ones.
    pub shard_processes: bool,
    /// The gateways' config file (`--config`), e.g. `"[limits]\nallow_strangers = true\n"`.
    pub gateway_toml: Option<String>,
    /// Serve gateway 1's Prometheus `/metrics` (see [`Cluster::metric`]).
    pub metrics: bool,
    /// The map's one shard is a replicated group of three real `msgstore`
    /// processes ([`Cluster::group`]) instead of `shards` shards.
    pub shard_group: bool,
    /// Presence as this many real replica processes
    /// ([`Cluster::presence`], grace [`PRESENCE_GRACE_MS`]) instead of the
    /// in-process one.
    pub presence_replicas: usize,
}

/// The grace period of [`Options::presence_replicas`]' processes.
pub const PRESENCE_GRACE_MS: u32 = 500;

pub struct Cluster {
    pub dir: tempfile::TempDir,
    pub services: Embedded,
    pub gateway: DaemonProcess,
    pub gateway_public: [u8; 32],
    pub profile_client: profile::ProfileClient,
    /// The config file every gateway of this cluster is started with.
    pub gateway_config: Option<PathBuf>,
    /// Gateway 1's `/metrics` address.
    pub metrics: Option<SocketAddr>,
    /// With [`Options::shard_group`]: the group's replica processes.
    pub group: Option<msgstore::raft::testing::Group>,
    /// With [`Options::presence_replicas`]: the presence processes.
    pub presence: Vec<PresenceProcess>,
}

impl Cluster {
    /// Presence, profile and `shards` shards in-process; the gateway as a
    /// real process.
    pub async fn start(shards: usize) -> Cluster {
        let options = Options {
            shards,
            ..Options::default()
        };
        Cluster::start_with(options).await.0
    }

    /// One in-process shard, the gateway started with `gateway_toml` as its
    /// config file and serving `/metrics`.
    pub async fn metered(gateway_toml: &str) -> Cluster {
        let options = Options {
            shards: 1,
            gateway_toml: Some(gateway_toml.into()),
            metrics: true,
            ..Options::default()
        };
        Cluster::start_with(options).await.0
    }

    /// Like `start`, but the shards are real `msgstore` processes (so a
    /// test can SIGKILL them), on the given data directories.
    pub async fn start_with_shard_processes(shards: usize) -> (Cluster, Vec<ShardProcess>) {
        let options = Options {
            shards,
            shard_processes: true,
            ..Options::default()
        };
        Cluster::start_with(options).await
    }

    /// Like `start`, but the gateway's cluster map (`dir/cluster.toml`,
    /// epoch 1) holds only the first `in_map` shards; the others are spares
    /// to move users to. `services.map` still lists them all.
    pub async fn start_with_spare_shards(shards: usize, in_map: usize) -> Cluster {
        let options = Options {
            shards: in_map,
            spare_shards: shards - in_map,
            ..Options::default()
        };
        Cluster::start_with(options).await.0
    }

    /// The cluster `options` describe; the shard processes, if any.
    pub async fn start_with(options: Options) -> (Cluster, Vec<ShardProcess>) {
        let dir = tempfile::tempdir().unwrap();
        let in_process = if options.shard_processes {
            options.spare_shards
        } else {
            options.shards + options.spare_shards
        };
        let config = EmbeddedConfig::ephemeral(dir.path().to_path_buf(), in_process);
        let mut services = Embedded::start(config).await.expect("start the services");
        let processes: Vec<ShardProcess> = if options.shard_processes {
            (0..options.shards)
                .map(|i| ShardProcess::start(dir.path().join(format!("pshard{i}")), free_addr()))
                .collect()
        } else {
            Vec::new()
        };
        let mut in_map: Vec<_> = processes
            .iter()
            .enumerate()
            .map(|(i, p)| proto::cluster::ShardEntry {
                id: format!("p{i}"),
                addr: p.addr().to_string(),
                weight: 1,
                replicas: Vec::new(),
            })
            .collect();
        let spares = services.map.shards.clone();
        if options.shard_processes {
            services.map.shards = in_map.iter().chain(&spares).cloned().collect();
        } else {
            in_map = spares[..options.shards].to_vec();
        }
        let group = match options.shard_group {
            true => Some(start_group(dir.path()).await),
            false => None,
        };
        if let Some(g) = &group {
            let addrs: Vec<String> = g.client_addrs().iter().map(|a| a.to_string()).collect();
            in_map = vec![proto::cluster::ShardEntry {
                id: "g1".into(),
                addr: addrs[0].clone(),
                weight: 1,
                replicas: addrs,
            }];
        }
        let presence: Vec<PresenceProcess> = (0..options.presence_replicas)
            .map(|_| PresenceProcess::start(free_addr()))
            .collect();
        let mut gateway_map = services.map.clone();
        gateway_map.shards = in_map;
        if !presence.is_empty() {
            let addrs: Vec<String> = presence.iter().map(|p| p.addr().to_string()).collect();
            gateway_map.presence = addrs.join(",");
        }
        std::fs::write(dir.path().join("cluster.toml"), gateway_map.to_toml()).unwrap();
        let gateway_config = options.gateway_toml.map(|toml| {
            let path = dir.path().join("gateway.toml");
            std::fs::write(&path, toml).unwrap();
            path
        });
        let metrics = options.metrics.then(free_addr);
        let mut extra: Vec<String> = Vec::new();
        if let Some(path) = &gateway_config {
            extra.extend(["--config".into(), path.display().to_string()]);
        }
        if let Some(addr) = metrics {
            extra.extend(["--metrics-addr".into(), addr.to_string()]);
        }
        let extra: Vec<&str> = extra.iter().map(String::as_str).collect();
        let gateway = start_gateway_with(dir.path(), 1, &dir.path().join("gateway"), &extra);
        let profile_client = profile::ProfileClient::connect(services.map.profile.clone())
            .await
            .unwrap();
        let public = std::fs::read_to_string(dir.path().join("gateway/gateway.pub")).unwrap();
        let gateway_public = gateway::keys::from_hex(&public).expect("hex public key");
        let cluster = Cluster {
            dir,
            services,
            gateway,
            gateway_public,
            profile_client,
            gateway_config,
            metrics,
            group,
            presence,
        };
        (cluster, processes)
    }

    /// Gateway 1's metric `name` (without labels); its metrics must be on.
    pub async fn metric(&self, name: &str) -> f64 {
        metric(self.metrics.expect("Options::metrics was set"), name).await
    }

    /// Stop gateway 1 (SIGTERM; it must exit cleanly) and start it again
    /// on the same data directory and cluster file, with `extra` flags
    /// (and the cluster's config file unless they name one).
    pub fn restart_gateway(&mut self, extra: &[&str]) {
        self.gateway.signal(libc::SIGTERM);
        let status = self.gateway.child.wait().expect("wait for the gateway");
        assert!(status.success(), "the gateway stopped cleanly: {status}");
        let dir = self.dir.path();
        let mut flags: Vec<String> = extra.iter().map(|s| s.to_string()).collect();
        if let (Some(path), false) = (&self.gateway_config, extra.contains(&"--config")) {
            flags.extend(["--config".into(), path.display().to_string()]);
        }
        let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
        self.gateway = start_gateway_with(dir, 1, &dir.join("gateway"), &flags);
    }

    /// SIGKILL gateway 1, leave it down for `down`, and start it again on
    /// the same UDP address, data directory, cluster file, config file and
    /// metrics address (its sessions are gone; its keys are not).
    pub async fn kill_and_restart_gateway(&mut self, down: Duration) {
        self.gateway.signal(libc::SIGKILL);
        let _ = self.gateway.child.wait();
        tokio::time::sleep(down).await;
        let listen = self.gateway.addr.to_string();
        let mut flags: Vec<String> = vec!["--listen".into(), listen];
        if let Some(path) = &self.gateway_config {
            flags.extend(["--config".into(), path.display().to_string()]);
        }
        if let Some(addr) = self.metrics {
            flags.extend(["--metrics-addr".into(), addr.to_string()]);
        }
        let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
        let dir = self.dir.path();
        self.gateway = start_gateway_with(dir, 1, &dir.join("gateway"), &flags);
    }

    /// Where gateway `id` listens for peer links (as registered with
    /// presence), waiting for it to register.
    pub async fn peer_addr(&self, id: u32) -> String {
        use proto::presence::{RequestBody, ResponseBody};
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let answer =
                presence::client::request_once(&self.services.map.presence, RequestBody::Gateways)
                    .await;
            if let Ok(ResponseBody::Gateways { gateways }) = answer {
                if let Some(g) = gateways.iter().find(|g| g.gateway == id && g.connected) {
                    return g.peer_addr.clone();
                }
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "gateway {id} registered in time"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Another gateway of the cluster (same keys, so clients know one
    /// public key and resume tokens work on both).
    pub fn second_gateway(&self, id: u32) -> DaemonProcess {
        let data = self.dir.path().join(format!("gateway{id}"));
        std::fs::create_dir_all(&data).unwrap();
        for file in ["gateway.key", "token.key"] {
            std::fs::copy(self.dir.path().join("gateway").join(file), data.join(file)).unwrap();
        }
        let config = self
            .gateway_config
            .as_ref()
            .map(|p| p.display().to_string());
        let extra: Vec<&str> = match &config {
            Some(path) => vec!["--config", path],
            None => Vec::new(),
        };
        start_gateway_with(self.dir.path(), id, &data, &extra)
    }

    /// Create a user; its id.
    pub async fn user(&self, name: &str, password: &str) -> u64 {
        self.profile_client
            .create_user(name, password.as_bytes())
            .await
            .expect("create user")
    }

    pub async fn befriend(&self, a: u64, b: u64) {
        self.profile_client
            .friend_request(a, b, "Friends")
            .await
            .unwrap();
        self.profile_client
            .friend_accept(b, a, "Friends")
            .await
            .unwrap();
    }

    pub async fn login(&self, username: &str, password: &str) -> Result<TestClient, LoginAnswer> {
        self.login_at(self.gateway.addr, username, password).await
    }

    /// A raw login at the gateway listening on `addr`.
    pub async fn login_at(
        &self,
        addr: SocketAddr,
        username: &str,
        password: &str,
    ) -> Result<TestClient, LoginAnswer> {
        let method = LoginMethod::Password {
            username: username.into(),
            password: password.into(),
        };
        TestClient::connect(addr, self.gateway_public, method).await
    }

    /// A raw login with a resume token at gateway 1.
    pub async fn resume(&self, token: &[u8]) -> Result<TestClient, LoginAnswer> {
        let method = LoginMethod::Resume {
            token: token.to_vec(),
        };
        TestClient::connect(self.gateway.addr, self.gateway_public, method).await
    }

    /// SDK settings for `username` at `gateways` (`host:port`, comma
    /// separated), with the SDK's defaults otherwise.
    pub fn sdk_config(&self, gateways: &str, username: &str, password: &str) -> SdkConfig {
        let credentials = Credentials::Password {
            username: username.into(),
            password: password.into(),
        };
        SdkConfig::new(gateways, self.gateway_public, credentials)
    }

    /// An SDK connection of `username` at gateway 1.
    pub async fn sdk(
        &self,
        username: &str,
        password: &str,
    ) -> (Connection, mpsc::Receiver<ImEvent>) {
        let config = self.sdk_config(&self.gateway.addr.to_string(), username, password);
        sdk::connect(config).await.expect("SDK login")
    }
}

/// Read `conn`'s events until its `synced` answers (everything in the
/// mailbox was shown and acknowledged), for a connection whose events
/// nobody else reads; the messages shown, in order.
pub async fn messages_until_synced(
    conn: &Connection,
    events: &mut mpsc::Receiver<ImEvent>,
) -> Vec<app::Delivery> {
    let mut shown = Vec::new();
    let synced = conn.synced();
    tokio::pin!(synced);
    let deadline = tokio::time::sleep(WAIT);
    tokio::pin!(deadline);
    loop {
        tokio::select! {
            r = &mut synced => {
                r.expect("synced");
                break;
            }
            Some(event) = events.recv() => {
                if let ImEvent::Message(d) = event {
                    shown.push(d);
                }
            }
            () = &mut deadline => panic!("not synced within {WAIT:?}: {} shown", shown.len()),
        }
    }
    // `synced` answers once every event was handed to the channel.
    while let Ok(event) = events.try_recv() {
        if let ImEvent::Message(d) = event {
            shown.push(d);
        }
    }
    shown
}

/// Read `conn`'s events until `count` messages were shown, then until it
/// is synced: for a connection online while the messages were sent
/// (`synced` covers what the connection knows of, and a push may still be
/// on its way).
pub async fn messages_until_shown(
    conn: &Connection,
    events: &mut mpsc::Receiver<ImEvent>,
    count: usize,
) -> Vec<app::Delivery> {
    let mut shown = Vec::new();
    let deadline = tokio::time::Instant::now() + WAIT;
    while shown.len() < count {
        match tokio::time::timeout_at(deadline, events.recv()).await {
            Ok(Some(ImEvent::Message(d))) => shown.push(d),
            Ok(Some(_)) => {}
            Ok(None) => panic!("the connection ended: {} of {count} shown", shown.len()),
            Err(_) => panic!("{} of {count} shown within {WAIT:?}", shown.len()),
        }
    }
    shown.extend(messages_until_synced(conn, events).await);
    shown
}

pub fn start_gateway(dir: &Path) -> DaemonProcess {
    start_gateway_with(dir, 1, &dir.join("gateway"), &[])
}

/// Gateway `id` with its key files in `data` (copy `token.key` there first
/// to share the cluster's resume-token key).
pub fn start_gateway_with(dir: &Path, id: u32, data: &Path, extra: &[&str]) -> DaemonProcess {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_gateway"));
    cmd.args(extra);
    if !extra.contains(&"--listen") {
        cmd.arg("--listen").arg(free_addr().to_string());
    }
    cmd.args(["--peer-listen", "127.0.0.1:0"])
        .arg("--id")
        .arg(id.to_string())
        .arg("--cluster")
        .arg(dir.join("cluster.toml"))
        .arg("--data")
        .arg(data)
        .env("RUST_LOG", "warn");
    DaemonProcess::start(cmd, "gateway", WAIT)
}

/// The `msgstore` binary: next to this test's `gateway` binary.
/// A shard group of three `msgstore` processes, data under `dir/group`.
pub async fn start_group(dir: &Path) -> msgstore::raft::testing::Group {
    let data = dir.join("group");
    std::fs::create_dir_all(&data).unwrap();
    let config = "[engine]\nbucket_dirs = 4\nbucket_files = 4\n";
    msgstore::raft::testing::Group::start(&msgstore_binary(), &data, 3, config).await
}

pub fn msgstore_binary() -> std::path::PathBuf {
    daemon::testing::workspace_binary(Path::new(env!("CARGO_BIN_EXE_gateway")), "msgstore")
}

/// A presence replica as a real process, restartable on the same address.
pub struct PresenceProcess {
    pub process: Option<DaemonProcess>,
    addr: std::net::SocketAddr,
}

impl PresenceProcess {
    pub fn start(listen: std::net::SocketAddr) -> PresenceProcess {
        let bin =
            daemon::testing::workspace_binary(Path::new(env!("CARGO_BIN_EXE_gateway")), "presence");
        let mut cmd = Command::new(bin);
        cmd.args(["--listen", &listen.to_string()])
            .args(["--grace-ms", &PRESENCE_GRACE_MS.to_string()])
            .env("RUST_LOG", "warn");
        let process = DaemonProcess::start(cmd, "presence", WAIT);
        let addr = process.addr;
        PresenceProcess {
            process: Some(process),
            addr,
        }
    }

    pub fn addr(&self) -> std::net::SocketAddr {
        self.addr
    }

    pub fn kill(&mut self) {
        if let Some(p) = self.process.take() {
            p.kill();
        }
    }

    /// Start again on the same address.
    pub fn restart(&mut self) {
        self.kill();
        *self = PresenceProcess::start(self.addr);
    }
}

/// A shard as a real process, restartable on the same data and address.
pub struct ShardProcess {
    pub data: std::path::PathBuf,
    pub process: Option<DaemonProcess>,
    addr: std::net::SocketAddr,
}

impl ShardProcess {
    pub fn start(data: std::path::PathBuf, listen: std::net::SocketAddr) -> ShardProcess {
        let mut cmd = Command::new(msgstore_binary());
        cmd.arg("--data")
            .arg(&data)
            .arg("--listen")
            .arg(listen.to_string())
            .env("RUST_LOG", "warn");
        let process = DaemonProcess::start(cmd, "msgstore", WAIT);
        let addr = process.addr;
        ShardProcess {
            data,
            process: Some(process),
            addr,
        }
    }

    pub fn addr(&self) -> std::net::SocketAddr {
        self.addr
    }

    pub fn kill(&mut self) {
        if let Some(p) = self.process.take() {
            p.kill();
        }
    }

    /// SIGSTOP, and wait until every thread of the process has stopped (a
    /// signal is delivered asynchronously): it stays, its sockets stay
    /// open, nothing is read or answered until [`ShardProcess::resume`].
    pub fn pause(&self) {
        let process = self.process.as_ref().expect("running");
        process.signal(libc::SIGSTOP);
        let tasks = format!("/proc/{}/task", process.child.id());
        let deadline = std::time::Instant::now() + WAIT;
        loop {
            let states: Vec<String> = std::fs::read_dir(&tasks)
                .expect("the process's threads")
                .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("stat")).ok())
                .collect();
            // The state follows the parenthesised command name.
            let stopped = |stat: &String| {
                stat.rsplit_once(") ")
                    .is_some_and(|(_, rest)| rest.starts_with('T') || rest.starts_with('t'))
            };
            if !states.is_empty() && states.iter().all(stopped) {
                return;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "the shard did not stop: {states:?}"
            );
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// SIGCONT after [`ShardProcess::pause`].
    pub fn resume(&self) {
        self.process
            .as_ref()
            .expect("running")
            .signal(libc::SIGCONT);
    }

    /// Start again on the same data directory and address.
    pub fn restart(&mut self) {
        let again = ShardProcess::start(self.data.clone(), self.addr);
        self.process = again.process;
    }
}

/// A client speaking the application protocol over a real session.
pub struct TestClient {
    pub client: Client,
    pub events: mpsc::Receiver<Event>,
    pub login: app::LoginAccepted,
    next_id: u32,
    /// Pushes seen while waiting for replies.
    pub pushes: Vec<GatewayMessage>,
    /// Replies to other requests seen while waiting for one.
    replies: BTreeMap<u32, Result<Reply, app::AppError>>,
    pub closed: Option<Event>,
}

impl TestClient {
    pub async fn connect(
        addr: std::net::SocketAddr,
        public: [u8; 32],
        method: LoginMethod,
    ) -> Result<TestClient, LoginAnswer> {
        let login = app::encode(&Login::new(method, client::next_login_ns(0)));
        let (client, mut events) = Client::connect(DriverConfig::new(addr, public, login))
            .await
            .expect("bind");
        let event = tokio::time::timeout(WAIT, events.recv())
            .await
            .expect("login answer in time")
            .expect("event");
        let payload = match event {
            Event::Connected { payload, .. } => payload,
            Event::Rejected { payload } => {
                return Err(app::decode(&payload).expect("answer decodes"))
            }
            other => panic!("no login answer: {other:?}"),
        };
        match app::decode::<LoginAnswer>(&payload).expect("answer decodes") {
            LoginAnswer::Accepted(login) => Ok(TestClient {
                client,
                events,
                login,
                next_id: 0,
                pushes: Vec::new(),
                replies: BTreeMap::new(),
                closed: None,
            }),
            refused => Err(refused),
        }
    }

    /// Take the next gateway message (or `None` once the session closed).
    pub async fn next(&mut self) -> Option<GatewayMessage> {
        loop {
            let event = tokio::time::timeout(WAIT, self.events.recv())
                .await
                .expect("an event in time")?;
            match event {
                Event::Message(bytes) => {
                    return Some(app::decode(&bytes).expect("gateway message decodes"))
                }
                e @ Event::Closed(_) => {
                    self.closed = Some(e);
                    return None;
                }
                _ => {}
            }
        }
    }

    /// Send a call and wait for its reply, keeping pushes that come first.
    pub async fn call(&mut self, call: Call) -> Result<Reply, app::AppError> {
        let id = self.start(call);
        self.reply(id).await
    }

    /// Send a call without waiting for its reply (pipelining); its id.
    pub fn start(&mut self, call: Call) -> u32 {
        self.next_id += 1;
        let id = self.next_id;
        self.client
            .send(app::encode(&ClientMessage { id, call }))
            .expect("queue the request");
        id
    }

    /// Wait for the reply to request `id`, keeping pushes and other
    /// replies that come first.
    pub async fn reply(&mut self, id: u32) -> Result<Reply, app::AppError> {
        if let Some(result) = self.replies.remove(&id) {
            return result;
        }
        loop {
            match self
                .next()
                .await
                .expect("session open while waiting for a reply")
            {
                GatewayMessage::Reply { id: got, result } if got == id => return result,
                GatewayMessage::Reply { id: got, result } => {
                    self.replies.insert(got, result);
                }
                other => self.pushes.push(other),
            }
        }
    }

    /// One mailbox page: (messages, last_seq, more).
    pub async fn fetch(
        &mut self,
        after_seq: u64,
        max_count: u32,
    ) -> (Vec<app::Delivery>, u64, bool) {
        let call = Call::Fetch {
            after_seq,
            max_count,
            max_bytes: app::FETCH_BYTES_MAX,
        };
        match self.call(call).await {
            Ok(Reply::Mailbox {
                messages,
                last_seq,
                more,
            }) => (messages, last_seq, more),
            other => panic!("fetch: {other:?}"),
        }
    }

    pub async fn send(
        &mut self,
        to: u64,
        msg_id: u128,
        body: &[u8],
    ) -> Result<Reply, app::AppError> {
        self.call(Call::Send {
            to,
            msg_id,
            body: body.to_vec(),
        })
        .await
    }

    /// Wait for the next push (taking already-seen pushes first).
    pub async fn push(&mut self) -> Option<GatewayMessage> {
        if !self.pushes.is_empty() {
            return Some(self.pushes.remove(0));
        }
        loop {
            match self.next().await? {
                GatewayMessage::Reply { id, result } => {
                    self.replies.insert(id, result);
                }
                push => return Some(push),
            }
        }
    }

    /// Wait until the gateway closes this session (skipping pushes); the
    /// session's closing event.
    pub async fn closed(&mut self) -> Event {
        while self.next().await.is_some() {}
        self.closed.clone().expect("closed")
    }
}

// (Not every test binary uses them.)
#[allow(unused_imports)]
pub use daemon::testing::{free_addr, metric};

/// A UDP proxy for one client: datagrams both ways are dropped with
/// `loss`, duplicated with `duplicate`, and delayed by up to `jitter`
/// (which reorders them). Seeded, so a failing run can be replayed.
pub async fn lossy_proxy(
    gateway: SocketAddr,
    seed: u64,
    loss: f64,
    duplicate: f64,
    jitter: Duration,
) -> SocketAddr {
    use rand::Rng;
    let front = std::sync::Arc::new(tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap());
    let back = std::sync::Arc::new(tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap());
    let addr = front.local_addr().unwrap();
    let client: std::sync::Arc<std::sync::Mutex<Option<SocketAddr>>> = std::sync::Arc::default();
    let rng = std::sync::Arc::new(std::sync::Mutex::new(
        <rand_chacha::ChaCha8Rng as rand::SeedableRng>::seed_from_u64(seed),
    ));
    let relay = move |from: std::sync::Arc<tokio::net::UdpSocket>,
                      to: std::sync::Arc<tokio::net::UdpSocket>,
                      towards_gateway: bool| {
        let client = client.clone();
        let rng = rng.clone();
        async move {
            let mut buf = vec![0u8; 2048];
            loop {
                let Ok((n, src)) = from.recv_from(&mut buf).await else {
                    return;
                };
                let dest = if towards_gateway {
                    *client.lock().unwrap() = Some(src);
                    gateway
                } else {
                    match *client.lock().unwrap() {
                        Some(c) => c,
                        None => continue,
                    }
                };
                let (copies, delays) = {
                    let mut r = rng.lock().unwrap();
                    let copies = if r.gen_bool(loss) {
                        0
                    } else if r.gen_bool(duplicate) {
                        2
                    } else {
                        1
                    };
                    let delays: Vec<u64> = (0..copies)
                        .map(|_| r.gen_range(0..jitter.as_millis() as u64 + 1))
                        .collect();
                    (copies, delays)
                };
                for delay in delays.into_iter().take(copies) {
                    let to = to.clone();
                    let d = buf[..n].to_vec();
                    tokio::spawn(async move {
                        tokio::time::sleep(Duration::from_millis(delay)).await;
                        let _ = to.send_to(&d, dest).await;
                    });
                }
            }
        }
    };
    tokio::spawn(relay(front.clone(), back.clone(), true));
    tokio::spawn(relay(back, front, false));
    addr
}
