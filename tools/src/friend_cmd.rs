//! `imctl friend`: friend requests and friend lists.

use crate::{
    output::Output,
    profile_conn::{resolve, ProfileAddr},
};
use clap::{Args, Subcommand};
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
