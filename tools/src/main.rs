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
mod up_cmd;
mod user_cmd;

use clap::{Parser, Subcommand};
use std::process::ExitCode;

#[derive(Debug, Parser)]
#[command(name = "imctl", version, about = "Command line for the IM cluster")]
struct Cli {
    /// Print machine-readable JSON instead of human-readable text.
    #[arg(long, global = true)]
    json: bool,
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
    let result = runtime.block_on(async {
        match cli.command {
            Command::Up(args) => up_cmd::run(args).await,
            Command::Send(args) => session_cmd::send(args, &out).await,
            Command::Inbox(args) => session_cmd::inbox(args, &out).await,
            Command::Chat(args) => chat_cmd::run(args).await,
            Command::Group(args) => group_cmd::run(args, &out).await,
            Command::Shard(args) => shard_cmd::run(args, &out).await,
            Command::Presence(args) => presence_cmd::run(args, &out).await,
            Command::User(args) => user_cmd::run(args, &out).await,
            Command::Friend(args) => friend_cmd::run(args, &out).await,
            Command::Avatar(args) => avatar_cmd::run(args, &out).await,
            Command::Rebalance(args) => rebalance_cmd::run(args, &out).await,
        }
    });
    daemon::exit_code(name, result)
}
