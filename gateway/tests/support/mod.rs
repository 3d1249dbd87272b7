//! A whole cluster on loopback for end-to-end tests: presence, profile and
//! msgstore shards run in-process (each a real TCP daemon), the gateway runs
//! as a real `gateway` process; clients speak the real protocol over UDP.
#![allow(dead_code)]

use client::{Client, DriverConfig};
use daemon::testing::DaemonProcess;
use embedded::{Embedded, EmbeddedConfig};
use proto::{
    app::{
        self, Call, ClientMessage, GatewayMessage, Login, LoginAnswer, LoginMethod, Reply,
        APP_PROTOCOL_VERSION,
    },
    session::Event,
};
use std::{path::Path, process::Command, time::Duration};
use tokio::sync::mpsc;

pub const WAIT: Duration = Duration::from_secs(20);

pub struct Cluster {
    pub dir: tempfile::TempDir,
    pub services: Embedded,
    pub gateway: DaemonProcess,
    pub gateway_public: [u8; 32],
    pub profile_client: profile::ProfileClient,
}

impl Cluster {
    /// Presence, profile and `shards` shards in-process; the gateway as a
    /// real process.
    pub async fn start(shards: usize) -> Cluster {
        let dir = tempfile::tempdir().unwrap();
        let services = Embedded::start(EmbeddedConfig::ephemeral(dir.path().to_path_buf(), shards))
            .await
            .expect("start the services");
        Cluster::with_gateway(dir, services).await
    }

    /// Like `start`, but the shards are real `msgstore` processes (so a
    /// test can SIGKILL them), on the given data directories.
    pub async fn start_with_shard_processes(shards: usize) -> (Cluster, Vec<ShardProcess>) {
        let dir = tempfile::tempdir().unwrap();
        let mut services = Embedded::start(EmbeddedConfig::ephemeral(dir.path().to_path_buf(), 0))
            .await
            .expect("start the services");
        let processes: Vec<ShardProcess> = (0..shards)
            .map(|i| {
                ShardProcess::start(
                    dir.path().join(format!("pshard{i}")),
                    "127.0.0.1:0".parse().unwrap(),
                )
            })
            .collect();
        services.map.shards = processes
            .iter()
            .enumerate()
            .map(|(i, p)| proto::cluster::ShardEntry {
                id: format!("p{i}"),
                addr: p.addr().to_string(),
                weight: 1,
            })
            .collect();
        std::fs::write(dir.path().join("cluster.toml"), services.map.to_toml()).unwrap();
        (Cluster::with_gateway(dir, services).await, processes)
    }

    /// Like `start`, but the gateway's cluster map (`dir/cluster.toml`,
    /// epoch 1) holds only the first `in_map` shards; the others are spares
    /// to move users to. `services.map` still lists them all.
    pub async fn start_with_spare_shards(shards: usize, in_map: usize) -> Cluster {
        let dir = tempfile::tempdir().unwrap();
        let services = Embedded::start(EmbeddedConfig::ephemeral(dir.path().to_path_buf(), shards))
            .await
            .expect("start the services");
        let mut map = services.map.clone();
        map.shards.truncate(in_map);
        std::fs::write(dir.path().join("cluster.toml"), map.to_toml()).unwrap();
        Cluster::with_gateway(dir, services).await
    }

    /// Stop gateway 1 (SIGTERM; it must exit cleanly) and start it again
    /// on the same data directory and cluster file, with `extra` flags.
    pub fn restart_gateway(&mut self, extra: &[&str]) {
        self.gateway.signal(libc::SIGTERM);
        let status = self.gateway.child.wait().expect("wait for the gateway");
        assert!(status.success(), "the gateway stopped cleanly: {status}");
        let dir = self.dir.path();
        self.gateway = start_gateway_with(dir, 1, &dir.join("gateway"), extra);
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

    /// Start gateway 1 as a process for `services` (whose cluster map is in
    /// `dir/cluster.toml`).
    async fn with_gateway(dir: tempfile::TempDir, services: Embedded) -> Cluster {
        let profile_client = profile::ProfileClient::connect(services.map.profile.clone())
            .await
            .unwrap();
        let gateway = start_gateway(dir.path());
        let public = std::fs::read_to_string(dir.path().join("gateway/gateway.pub")).unwrap();
        let gateway_public = gateway::keys::from_hex(&public).expect("hex public key");
        Cluster {
            dir,
            services,
            gateway,
            gateway_public,
            profile_client,
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
        start_gateway_with(self.dir.path(), id, &data, &[])
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
        let method = LoginMethod::Password {
            username: username.into(),
            password: password.into(),
        };
        TestClient::connect(self.gateway.addr, self.gateway_public, method).await
    }
}

pub fn start_gateway(dir: &Path) -> DaemonProcess {
    start_gateway_with(dir, 1, &dir.join("gateway"), &[])
}

/// Gateway `id` with its key files in `data` (copy `token.key` there first
/// to share the cluster's resume-token key).
pub fn start_gateway_with(dir: &Path, id: u32, data: &Path, extra: &[&str]) -> DaemonProcess {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_gateway"));
    cmd.args(extra);
    cmd.args(["--listen", "127.0.0.1:0", "--peer-listen", "127.0.0.1:0"])
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
pub fn msgstore_binary() -> std::path::PathBuf {
    daemon::testing::workspace_binary(Path::new(env!("CARGO_BIN_EXE_gateway")), "msgstore")
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
    pub closed: Option<Event>,
}

impl TestClient {
    pub async fn connect(
        addr: std::net::SocketAddr,
        public: [u8; 32],
        method: LoginMethod,
    ) -> Result<TestClient, LoginAnswer> {
        let login = app::encode(&Login {
            version: APP_PROTOCOL_VERSION,
            method,
        });
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
        self.next_id += 1;
        let id = self.next_id;
        self.client
            .send(app::encode(&ClientMessage { id, call }))
            .expect("queue the request");
        loop {
            match self
                .next()
                .await
                .expect("session open while waiting for a reply")
            {
                GatewayMessage::Reply { id: got, result } if got == id => return result,
                other => self.pushes.push(other),
            }
        }
    }

    /// One mailbox page: (messages, more).
    pub async fn fetch(&mut self, after_seq: u64, max_count: u32) -> (Vec<app::Delivery>, bool) {
        let call = Call::Fetch {
            after_seq,
            max_count,
            max_bytes: app::FETCH_BYTES_MAX,
        };
        match self.call(call).await {
            Ok(Reply::Mailbox { messages, more }) => (messages, more),
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
        self.next().await
    }
}

// (Not every test binary uses them.)
#[allow(unused_imports)]
pub use daemon::testing::{free_addr, metric};
