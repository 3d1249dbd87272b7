//! `imctl`: the operator's and the person's command line.
//!
//! Each group of subcommands lives in its own module (`shard_cmd` talks to one
//! storage shard); later groups (presence, user, rebalance, up, chat) plug in
//! the same way: a clap `Args` type and an async `run`.

mod avatar_cmd;
mod chat_cmd;
mod demo;
mod friend_cmd;
mod group_cmd;
mod output;
mod presence_cmd;
mod profile_conn;
mod rebalance_cmd;
mod session_cmd;
mod shard_cmd;
mod shard_group_cmd;
mod status_cmd;
mod up_cmd;
mod user_cmd;

use clap::{Parser, Subcommand};
use std::process::ExitCode;

/// jemalloc, as in every daemon: memory freed when connections close goes
/// back to the system (glibc's heap kept growing as idle connections came
/// and went), and `process_heap_*_bytes` are read from its statistics.
#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

#[derive(Debug, Parser)]
#[command(name = "imctl", version, about = "Command line for the IM cluster")]
struct Cli {
    /// Print machine-readable JSON instead of human-readable text.
    #[arg(long, global = true)]
    json: bool,
    /// The cluster key file [default: data/cluster.key, if it exists].
    #[arg(long, global = true, env = "IM_CLUSTER_KEY_FILE", value_name = "FILE")]
    cluster_key_file: Option<std::path::PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Start the whole system on this machine (presence, profile, two
    /// shards, a gateway; data in ./data); Ctrl-C stops it.
    Up(up_cmd::UpArgs),
    /// Send one message as a user (defaults from DATA/demo.toml).
    Send(session_cmd::SendArgs),
    /// Read and acknowledge a user's stored messages.
    Inbox(session_cmd::InboxArgs),
    /// Chat as a user: friends, messages in and out, profile, requests.
    Chat(chat_cmd::ChatArgs),
    /// Chat groups as a user: create, invite, join, accept, leave, remove,
    /// list, members, send.
    Group(group_cmd::GroupArgs),
    /// Talk to one msgstore shard directly.
    Shard(shard_cmd::ShardArgs),
    /// A replicated profile group, through a replica's replication port
    /// (--addr RAFT_ADDR): init, add-replica, remove-replica, status.
    ProfileGroup {
        #[arg(long, value_name = "RAFT_ADDR")]
        addr: String,
        #[command(subcommand)]
        command: shard_group_cmd::GroupCommand,
    },
    /// Ask a presence server: stats, lookup USER..., gateways.
    Presence(presence_cmd::PresenceArgs),
    /// Accounts on the profile service: add, passwd, disable, show, import.
    User(user_cmd::UserArgs),
    /// Friend requests, friend lists and block lists on the profile service.
    Friend(friend_cmd::FriendArgs),
    /// Avatar images on the profile service.
    Avatar(avatar_cmd::AvatarArgs),
    /// Add or remove a shard while traffic flows; status; resume.
    Rebalance(rebalance_cmd::RebalanceArgs),
    /// The whole cluster on one screen: every process up or down, shards
    /// and replication, and what is wrong (exit code 1 if anything is).
    Status(status_cmd::StatusArgs),
    /// Write a new cluster key to FILE (mode 0600): give the same file to
    /// every process of the cluster (--cluster-key-file).
    Keygen {
        /// Where to write the key; an existing file is never overwritten.
        file: std::path::PathBuf,
    },
}

/// The key file `imctl up` writes in its default data directory.
const DEFAULT_KEY_FILE: &str = "data/cluster.key";

/// Make the cluster key this process's: the file named, or the embedded
/// default's if there is one. Without a key, links to daemons fail their
/// handshake (and say so).
fn install_cluster_key(named: Option<&std::path::Path>) -> anyhow::Result<()> {
    let default = std::path::Path::new(DEFAULT_KEY_FILE);
    let path = match named {
        Some(path) => path,
        None if default.exists() => default,
        None => return Ok(()),
    };
    daemon::secure::install_key(daemon::secure::load_key_file(path)?)?;
    Ok(())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("imctl: error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let out = output::Output { json: cli.json };
    // `imctl up` runs for long and speaks as itself (its stop messages too).
    let name = match cli.command {
        Command::Up(_) => "imctl up",
        _ => "imctl",
    };
    // `up` uses (or writes) the key in its data directory unless one is named.
    let key = match cli.command {
        Command::Keygen { .. } => Ok(()),
        Command::Up(_) if cli.cluster_key_file.is_none() => Ok(()),
        _ => install_cluster_key(cli.cluster_key_file.as_deref()),
    };
    if let Err(e) = key {
        return daemon::exit_code(name, Err(e));
    }
    let result = runtime.block_on(async {
        match cli.command {
            Command::Up(args) => up_cmd::run(args).await,
            Command::Send(args) => session_cmd::send(args, &out).await,
            Command::Inbox(args) => session_cmd::inbox(args, &out).await,
            Command::Chat(args) => chat_cmd::run(args).await,
            Command::Group(args) => group_cmd::run(args, &out).await,
            Command::Shard(args) => shard_cmd::run(args, &out).await,
            Command::ProfileGroup { addr, command } => {
                shard_group_cmd::run(&addr, command, &out).await
            }
            Command::Presence(args) => presence_cmd::run(args, &out).await,
            Command::User(args) => user_cmd::run(args, &out).await,
            Command::Friend(args) => friend_cmd::run(args, &out).await,
            Command::Avatar(args) => avatar_cmd::run(args, &out).await,
            Command::Rebalance(args) => rebalance_cmd::run(args, &out).await,
            Command::Status(args) => status_cmd::run(args, &out).await,
            Command::Keygen { file } => {
                daemon::secure::write_key_file(&file, &daemon::secure::generate())?;
                out.emit(&serde_json::json!({ "key_file": file }), || {
                    format!("wrote a new cluster key to {}", file.display())
                })
            }
        }
    });
    // `imctl status` printed its problems already: only the exit code.
    if let Err(e) = &result {
        if e.downcast_ref::<status_cmd::ProblemsFound>().is_some() {
            return ExitCode::FAILURE;
        }
    }
    daemon::exit_code(name, result)
}
