//! The msgstore daemon: configuration file and startup of shard, TCP server
//! and metrics exporter. The `msgstore` binary is a thin shell around
//! [`start`]; tests and tools can run a daemon in-process the same way.

use crate::{
    engine::Engine,
    raft::node::{self as replica, RaftConfig},
    server::{self, ServerConfig},
    EngineConfig, Error,
};
use serde::{Deserialize, Serialize};
use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
};
use tokio::{net::TcpListener, sync::watch, task::JoinHandle};

/// Address the daemon listens on when neither file nor flag names one.
pub const LISTEN_ADDR_DEFAULT: &str = "127.0.0.1:7400";

/// Data directory used when neither the config file nor `--data` names one:
/// a folder under the current directory, so a first run needs no setup.
pub const DATA_DIR_DEFAULT: &str = "data/msgstore";

/// The daemon's TOML configuration file; see `msgstore/msgstore.example.toml`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DaemonConfig {
    /// Address of the shard protocol listener.
    pub listen: SocketAddr,
    /// Shard data directory (created if missing). Required.
    pub data: Option<PathBuf>,
    /// Address of the Prometheus `/metrics` HTTP listener; none if absent.
    pub metrics_addr: Option<SocketAddr>,
    /// Connection limits.
    pub server: ServerConfig,
    /// Storage engine settings.
    pub engine: EngineConfig,
    /// Present: this shard is one replica of a replicated shard group
    /// (`docs/STORAGE.md`, "Replicated shards").
    pub raft: Option<RaftConfig>,
}

impl Default for DaemonConfig {
    fn default() -> Self {
        Self {
            listen: LISTEN_ADDR_DEFAULT
                .parse()
                .expect("LISTEN_ADDR_DEFAULT is a valid address"),
            data: Some(PathBuf::from(DATA_DIR_DEFAULT)),
            metrics_addr: None,
            server: ServerConfig::default(),
            engine: EngineConfig::default(),
            raft: None,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error("cannot read config file {path}: {error}")]
    ReadConfig {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("invalid config file {path}: {message}")]
    ParseConfig { path: PathBuf, message: String },
    #[error("invalid configuration: {0}")]
    Config(String),
    #[error("cannot open the shard: {0}")]
    Engine(Error),
    #[error("cannot listen on {addr}: {error}")]
    Listen {
        addr: SocketAddr,
        error: std::io::Error,
    },
    #[error("the shard did not close cleanly: {0}")]
    Close(Error),
}

// Errors carry their cause in the message, not as `source()`, so that a
// report printing the whole chain does not repeat it.
impl From<Error> for DaemonError {
    fn from(e: Error) -> Self {
        DaemonError::Engine(e)
    }
}

impl DaemonError {
    /// True if the data directory is held by another process.
    pub fn is_locked(&self) -> bool {
        matches!(self, DaemonError::Engine(Error::Locked { .. }))
    }
}

impl DaemonConfig {
    /// Read and parse a TOML config file.
    pub fn load(path: &Path) -> Result<Self, DaemonError> {
        let text = std::fs::read_to_string(path).map_err(|error| DaemonError::ReadConfig {
            path: path.to_owned(),
            error,
        })?;
        Self::parse(&text).map_err(|message| DaemonError::ParseConfig {
            path: path.to_owned(),
            message,
        })
    }

    pub fn parse(text: &str) -> Result<Self, String> {
        toml::from_str(text).map_err(|e| e.to_string())
    }

    pub fn validate(&self) -> Result<(), String> {
        if self.data.is_none() {
            return Err("no data directory: set `data` in the config file or pass --data".into());
        }
        self.server.validate()?;
        if let Some(raft) = &self.raft {
            raft.validate()?;
        }
        self.engine.validate()
    }
}

/// A running daemon.
pub struct Daemon {
    local_addr: SocketAddr,
    raft_addr: Option<SocketAddr>,
    shutdown: watch::Sender<bool>,
    task: JoinHandle<Result<(), DaemonError>>,
}

impl Daemon {
    /// The address the shard protocol listener is bound to.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// The address a replica's replication listener is bound to (none for
    /// a standalone shard).
    pub fn raft_addr(&self) -> Option<SocketAddr> {
        self.raft_addr
    }

    /// Stop accepting, drain every connection, close the shard.
    pub async fn shutdown(mut self) -> Result<(), DaemonError> {
        let _ = self.shutdown.send(true);
        self.stopped().await
    }

    /// Wait until the daemon stops: through [`Daemon::shutdown`], or by
    /// itself after a fatal storage error (then the result says why).
    pub async fn wait(mut self) -> Result<(), DaemonError> {
        self.stopped().await
    }

    /// Like [`Daemon::wait`], usable in `select!` next to a signal.
    pub async fn stopped(&mut self) -> Result<(), DaemonError> {
        match (&mut self.task).await {
            Ok(result) => result,
            Err(e) => Err(DaemonError::Close(Error::Storage(format!(
                "daemon task failed: {e}"
            )))),
        }
    }
}

/// Open the shard, bind the listener, start serving. Returns once the
/// listener is bound.
pub async fn start(config: DaemonConfig) -> Result<Daemon, DaemonError> {
    config.validate().map_err(DaemonError::Config)?;
    crate::metrics::register(config.raft.is_some());
    let (listener, local_addr) = bind(config.listen)?;
    // A replica's replication port is bound here too, so a port in use is
    // told as such and port 0 works (see `Daemon::raft_addr`).
    let raft_bound = config.raft.as_ref().map(|r| bind(r.listen)).transpose()?;
    let raft_addr = raft_bound.as_ref().map(|(_, addr)| *addr);
    let (opened_tx, opened_rx) = tokio::sync::oneshot::channel();
    let (done_tx, done_rx) = tokio::sync::oneshot::channel();
    let (shutdown, shutdown_rx) = watch::channel(false);
    let data = config.data.clone().unwrap_or_default();
    let (engine_config, server_config) = (config.engine.clone(), config.server.clone());
    let raft_config = config.raft.clone();
    std::thread::Builder::new()
        .name("msgstore-core".into())
        .spawn(move || {
            let configs = (engine_config, server_config);
            let result = match raft_config.zip(raft_bound) {
                Some((raft, (raft_listener, _))) => {
                    let listeners = (listener, raft_listener);
                    serve_replica(&data, (configs, raft), listeners, shutdown_rx, opened_tx)
                }
                None => serve_on_this_thread(&data, configs, listener, shutdown_rx, opened_tx),
            };
            let _ = done_tx.send(result);
        })
        .map_err(|e| DaemonError::Engine(Error::Io(e)))?;
    match opened_rx.await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => return Err(e),
        Err(_) => {
            let result = done_rx.await.unwrap_or(Ok(()));
            return Err(result.err().unwrap_or_else(|| {
                DaemonError::Engine(Error::Storage("the shard thread ended at start".into()))
            }));
        }
    }
    let task = tokio::spawn(async move {
        done_rx.await.unwrap_or_else(|_| {
            Err(DaemonError::Close(Error::Storage(
                "the shard thread died".into(),
            )))
        })
    });
    tracing::info!(%local_addr, data = ?config.data, "msgstore listening on {local_addr}");
    Ok(Daemon {
        local_addr,
        raft_addr,
        shutdown,
        task,
    })
}

/// A nonblocking listener on `addr` and the address it got.
fn bind(addr: SocketAddr) -> Result<(std::net::TcpListener, SocketAddr), DaemonError> {
    let listen = |error| DaemonError::Listen { addr, error };
    let listener = std::net::TcpListener::bind(addr).map_err(listen)?;
    listener.set_nonblocking(true).map_err(listen)?;
    let local = listener.local_addr().map_err(listen)?;
    Ok((listener, local))
}

/// The shard's thread: open the engine, then run the server on a
/// current-thread runtime until shutdown (see `server`).
fn serve_on_this_thread(
    data: &Path,
    (engine_config, server_config): (EngineConfig, ServerConfig),
    listener: std::net::TcpListener,
    shutdown: watch::Receiver<bool>,
    opened: tokio::sync::oneshot::Sender<Result<(), DaemonError>>,
) -> Result<(), DaemonError> {
    let engine = match Engine::open(data, engine_config) {
        Ok(engine) => engine,
        Err(e) => {
            let _ = opened.send(Err(e.into()));
            return Ok(());
        }
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| DaemonError::Engine(Error::Io(e)))?;
    let local = tokio::task::LocalSet::new();
    local.block_on(&runtime, async move {
        let addr = listener
            .local_addr()
            .map_err(|e| DaemonError::Engine(Error::Io(e)))?;
        let listener =
            TcpListener::from_std(listener).map_err(|error| DaemonError::Listen { addr, error })?;
        let _ = opened.send(Ok(()));
        server::run(listener, engine, server_config, shutdown)
            .await
            .map_err(DaemonError::Close)
    })
}

/// A replica's thread: a runtime of its own (Raft's tasks, the engine's
/// work on blocking threads), serving until shutdown (see `raft::node`).
fn serve_replica(
    data: &Path,
    ((engine_config, server_config), raft): ((EngineConfig, ServerConfig), RaftConfig),
    (listener, raft_listener): (std::net::TcpListener, std::net::TcpListener),
    shutdown: watch::Receiver<bool>,
    opened: tokio::sync::oneshot::Sender<Result<(), DaemonError>>,
) -> Result<(), DaemonError> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("msgstore-replica")
        .enable_all()
        .build()
        .map_err(|e| DaemonError::Engine(Error::Io(e)))?;
    runtime.block_on(async move {
        let tokio_listener = |l: std::net::TcpListener| {
            let addr = l
                .local_addr()
                .map_err(|e| DaemonError::Engine(Error::Io(e)))?;
            TcpListener::from_std(l).map_err(|error| DaemonError::Listen { addr, error })
        };
        let listeners = (tokio_listener(listener)?, tokio_listener(raft_listener)?);
        let (started_tx, started_rx) = tokio::sync::oneshot::channel();
        let configs = (engine_config, server_config, raft);
        let run = replica::run(data, configs, listeners, shutdown, started_tx);
        tokio::pin!(run);
        let started = tokio::select! {
            started = started_rx => {
                started.unwrap_or_else(|_| Err("the replica ended at start".into()))
            }
            // `run` sends its start's outcome before it ends: a start that
            // failed ends it with the same error.
            result = &mut run => Err(match result {
                Err(e) => e.to_string(),
                Ok(()) => "the replica ended at start".into(),
            }),
        };
        if let Err(e) = started {
            let _ = opened.send(Err(DaemonError::Engine(Error::Storage(e))));
            return Ok(());
        }
        let _ = opened.send(Ok(()));
        run.await.map_err(DaemonError::Close)
    })
}

daemon::impl_service!(Daemon);

/// `msgstore --repair` / `imctl shard repair`: open the shard in `dir`
/// offline (it must not be running: the directory lock is taken), and if
/// its log is damaged with valid entries after the damage, cut the log
/// there. Before anything is cut, every user's next seq is raised past
/// every seq the dropped part may have given it and checkpointed (so no
/// seq is ever given twice). A clean log or a torn tail is handled as a
/// normal open does. Returns what was dropped.
pub fn repair_log(dir: &Path, config: EngineConfig) -> Result<crate::error::RepairReport, Error> {
    config.validate().map_err(Error::Config)?;
    let (engine, report) = Engine::open_for_repair(dir, config)?;
    engine.finish_repair(&report)?;
    if let Some(d) = &report.damage {
        tracing::warn!(
            file = %d.file,
            offset = d.offset,
            entries = d.valid_after,
            appends = d.appends_after,
            unreadable_bytes = d.unreadable_bytes,
            raised = report.raised.len(),
            "repaired the log: cut at the damage"
        );
    }
    Ok(report)
}

/// `msgstore --repair` and `imctl shard repair --data DIR`: repair the
/// log of the standalone shard `config` describes (see [`repair_log`]);
/// the lines saying exactly what was dropped.
pub fn repair_shard(config: DaemonConfig) -> Result<Vec<String>, Error> {
    let dir = config
        .data
        .clone()
        .unwrap_or_else(|| PathBuf::from(DATA_DIR_DEFAULT));
    Ok(repair_summary(&repair_log(&dir, config.engine)?))
}

/// The lines `msgstore --repair` prints: exactly what was dropped.
pub fn repair_summary(report: &crate::error::RepairReport) -> Vec<String> {
    let Some(d) = &report.damage else {
        return vec!["log is not corrupt: nothing to repair".to_string()];
    };
    let mut out = vec![format!(
        "cut the log at {} byte offset {} ({}): dropped {} valid entries ({} appends) and {} unreadable bytes \
         (at most {} entries of unknown user)",
        d.file,
        d.offset,
        d.fault,
        d.valid_after,
        d.appends_after,
        d.unreadable_bytes,
        d.unreadable_bytes.div_ceil(49)
    )];
    for (file, from, to) in &d.dropped_ranges {
        out.push(format!("dropped bytes {from}..{to} of {file}"));
    }
    for (user, lo, hi) in &d.dropped_seqs {
        out.push(format!("dropped user {user} seqs {lo}..={hi}"));
    }
    for (user, next) in &report.raised {
        out.push(format!("user {user}: next seq raised to {next}"));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn example_config_parses_and_is_valid() {
        let text = include_str!("../msgstore.example.toml");
        let config = DaemonConfig::parse(text).expect("example config parses");
        config.validate().expect("example config is valid");
    }

    #[test]
    fn the_example_raft_table_parses_to_the_defaults() {
        let text = include_str!("../msgstore.example.toml");
        let start = text.find("# [raft]").expect("the example documents [raft]");
        let table: String = text[start..]
            .lines()
            .map(|l| l.strip_prefix("# ").unwrap_or(""))
            .filter(|l| !l.starts_with('#'))
            .collect::<Vec<_>>()
            .join("\n");
        let config = DaemonConfig::parse(&table).expect("the [raft] example parses");
        assert_eq!(config.raft, Some(RaftConfig::default()));
    }

    #[test]
    fn unknown_fields_are_refused() {
        let err = DaemonConfig::parse("listen = \"127.0.0.1:1\"\nbogus = 1\n").unwrap_err();
        assert!(err.contains("bogus"), "{err}");
        let err = DaemonConfig::parse("[server]\nframe_bytes = 1\n").unwrap_err();
        assert!(err.contains("frame_bytes"), "{err}");
    }

    #[test]
    fn missing_data_dir_is_named() {
        let config = DaemonConfig {
            data: None,
            ..DaemonConfig::default()
        };
        let err = config.validate().unwrap_err();
        assert!(err.contains("data"), "{err}");
        DaemonConfig::default().validate().unwrap();
    }
}
