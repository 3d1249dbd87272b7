//! `imctl friend`: friend requests, friend lists and block lists.

use crate::{
    output::Output,
    profile_conn::{resolve, ProfileAddr},
};
use anyhow::bail;
use clap::{Args, Subcommand};
use profile::ProfileClient;
use proto::profile::{UserId, GET_PROFILES_MAX};
use serde::Serialize;
use std::fmt::Write as _;

#[derive(Debug, Args)]
pub struct FriendArgs {
    #[command(flatten)]
    addr: ProfileAddr,
    #[command(subcommand)]
    command: FriendCommand,
}

#[derive(Debug, Subcommand)]
enum FriendCommand {
    /// USER asks FRIEND to be friends (USER, FRIEND: username or id).
    Add {
        user: String,
        friend: String,
        /// USER's group for FRIEND once accepted.
        #[arg(long, default_value = "Friends")]
        group: String,
    },
    /// USER accepts the request of FROM.
    Accept {
        user: String,
        from: String,
        /// USER's group for FROM.
        #[arg(long, default_value = "Friends")]
        group: String,
    },
    /// USER's friend groups with every friend, and pending requests.
    List { user: String },
    /// USER blocks TARGET: TARGET's friend requests to USER are refused
    /// (blocking does not end a friendship).
    Block { user: String, target: String },
    /// USER no longer blocks TARGET.
    Unblock { user: String, target: String },
    /// The users USER blocks.
    Blocked { user: String },
}

/// One blocked user, as `friend blocked` prints it.
#[derive(Debug, Serialize)]
struct BlockedUser {
    user: UserId,
    username: String,
}

pub async fn run(args: FriendArgs, out: &Output) -> anyhow::Result<()> {
    let client = args.addr.connect().await?;
    match args.command {
        FriendCommand::Add {
            user,
            friend,
            group,
        } => {
            let (from, to) = (
                resolve(&client, &user).await?,
                resolve(&client, &friend).await?,
            );
            client.friend_request(from, to, &group).await?;
            out.emit(
                &serde_json::json!({ "from": from, "to": to, "group": group }),
                || format!("friend request sent from {from} to {to}"),
            )
        }
        FriendCommand::Accept { user, from, group } => {
            let (user, from) = (
                resolve(&client, &user).await?,
                resolve(&client, &from).await?,
            );
            client.friend_accept(user, from, &group).await?;
            out.emit(
                &serde_json::json!({ "user": user, "friend": from, "group": group }),
                || format!("users {user} and {from} are friends"),
            )
        }
        FriendCommand::Block { user, target } => {
            let (user, target) = (
                resolve(&client, &user).await?,
                resolve(&client, &target).await?,
            );
            let version = client.block(user, target).await?;
            out.emit(
                &serde_json::json!({ "user": user, "blocked": target, "version": version }),
                || format!("user {user} blocks {target}"),
            )
        }
        FriendCommand::Unblock { user, target } => {
            let (user, target) = (
                resolve(&client, &user).await?,
                resolve(&client, &target).await?,
            );
            let version = client.unblock(user, target).await?;
            out.emit(
                &serde_json::json!({ "user": user, "unblocked": target, "version": version }),
                || format!("user {user} no longer blocks {target}"),
            )
        }
        FriendCommand::Blocked { user } => {
            let id = resolve(&client, &user).await?;
            let blocked = blocked_users(&client, id).await?;
            out.emit(
                &serde_json::json!({ "user": id, "blocked": blocked }),
                || {
                    let mut text = String::new();
                    for b in &blocked {
                        let _ = writeln!(text, "  {:>8}  {}", b.user, b.username);
                    }
                    if blocked.is_empty() {
                        let _ = writeln!(text, "user {id} blocks nobody");
                    }
                    text
                },
            )
        }
        FriendCommand::List { user } => {
            let id = resolve(&client, &user).await?;
            let view = client.friends(id).await?;
            out.emit(&view, || {
                let mut text = String::new();
                for g in &view.groups {
                    let _ = writeln!(text, "{} ({})", g.name, g.friends.len());
                    for f in &g.friends {
                        let _ =
                            writeln!(text, "  {:>8}  {:<20} {}", f.user, f.username, f.nickname);
                    }
                }
                if view.groups.is_empty() {
                    let _ = writeln!(text, "user {id} has no friends yet");
                }
                for r in &view.requests {
                    let _ = writeln!(text, "request from {} ({})", r.from, r.username);
                }
                text
            })
        }
    }
}

/// The users `id` blocks, with their usernames: the ids from its relations,
/// the names from their profiles (asked for in requests of at most
/// [`GET_PROFILES_MAX`] users, since a user may block up to 100,000).
async fn blocked_users(client: &ProfileClient, id: UserId) -> anyhow::Result<Vec<BlockedUser>> {
    let Some(relations) = client.relations(vec![id]).await?.pop() else {
        bail!("no user {id}");
    };
    let mut out = Vec::with_capacity(relations.blocked.len());
    for chunk in relations.blocked.chunks(GET_PROFILES_MAX) {
        let profiles = client.get_profiles(chunk.to_vec()).await?;
        out.extend(profiles.into_iter().map(|p| BlockedUser {
            user: p.user,
            username: p.username,
        }));
    }
    Ok(out)
}
