//! `imctl group`: chat groups as a person uses them, through the client SDK
//! and the gateway (docs/PROTOCOL.md §6.7): create, invite, join, answer,
//! leave, remove, list, members and send (`imctl inbox` reads what waits
//! in the user's groups and mailbox). A group is named by its id
//! or, among the user's own groups, by its name.

use crate::{output::Output, session_cmd::LoginArgs};
use anyhow::{bail, Context};
use clap::{Args, Subcommand};
use client::sdk::{Connection, SdkConfig};
use proto::{
    app::GroupSummary,
    groups::{is_group, GroupInfo},
};
use serde::Serialize;

#[derive(Debug, Args)]
pub struct GroupArgs {
    #[command(flatten)]
    login: LoginArgs,
    #[command(subcommand)]
    command: GroupCommand,
}

#[derive(Debug, Subcommand)]
enum GroupCommand {
    /// Create a group; the user is its owner.
    Create {
        name: String,
        #[arg(long, default_value = "")]
        topic: String,
    },
    /// Invite USERNAME into GROUP (the invitee accepts).
    Invite { group: String, username: String },
    /// Accept an invitation to GROUP (an id: the group is not yours yet).
    Accept { group: u64 },
    /// Decline an invitation to GROUP.
    Decline { group: u64 },
    /// Ask to join GROUP (an id); an owner or admin approves.
    Join { group: u64 },
    /// Approve USER's (an id) request to join GROUP.
    Approve { group: String, user: u64 },
    /// Refuse USER's request to join GROUP.
    Refuse { group: String, user: u64 },
    /// Leave GROUP.
    Leave { group: String },
    /// Remove USER (an id) from GROUP.
    Remove { group: String, user: u64 },
    /// The user's groups (with unread counts) and invitations.
    List,
    /// GROUP's members, roles and join requests.
    Members { group: String },
    /// Send a message to GROUP.
    Send {
        group: String,
        #[arg(required = true)]
        text: Vec<String>,
    },
}

#[derive(Serialize)]
struct GroupList {
    groups: Vec<GroupSummary>,
    invites: Vec<proto::groups::GroupInvite>,
}

#[derive(Serialize)]
struct Done {
    group: u64,
    done: &'static str,
}

/// How long `imctl group send` keeps trying a message the gateway could
/// not take yet.
const SEND_TIMEOUT_MS: u64 = 15_000;

pub async fn run(args: GroupArgs, out: &Output) -> anyhow::Result<()> {
    let tune = |c: &mut SdkConfig| c.limits.send_timeout_ms = SEND_TIMEOUT_MS;
    let (conn, _events) = args.login.connect_with(tune).await?;
    let result = command(&conn, args.command, out).await;
    conn.close().await;
    result
}

async fn command(conn: &Connection, command: GroupCommand, out: &Output) -> anyhow::Result<()> {
    let done = |group: u64, what: &'static str| {
        out.emit(&Done { group, done: what }, || {
            format!("{what} (group {group})")
        })
    };
    match command {
        GroupCommand::Create { name, topic } => {
            let info = conn.group_create(&name, &topic).await?;
            out.emit(&info, || {
                format!("created {} (group {})", info.name, info.group)
            })
        }
        GroupCommand::Invite { group, username } => {
            let group = resolve(conn, &group).await?;
            conn.group_invite(group, &username).await?;
            done(group, "invited")
        }
        GroupCommand::Accept { group } => {
            conn.group_answer_invite(group, true).await?;
            done(group, "joined")
        }
        GroupCommand::Decline { group } => {
            conn.group_answer_invite(group, false).await?;
            done(group, "declined")
        }
        GroupCommand::Join { group } => {
            conn.group_join(group).await?;
            done(group, "asked to join")
        }
        GroupCommand::Approve { group, user } => {
            let group = resolve(conn, &group).await?;
            conn.group_answer_join(group, user, true).await?;
            done(group, "approved")
        }
        GroupCommand::Refuse { group, user } => {
            let group = resolve(conn, &group).await?;
            conn.group_answer_join(group, user, false).await?;
            done(group, "refused")
        }
        GroupCommand::Leave { group } => {
            let group = resolve(conn, &group).await?;
            conn.group_leave(group).await?;
            done(group, "left")
        }
        GroupCommand::Remove { group, user } => {
            let group = resolve(conn, &group).await?;
            conn.group_remove(group, user).await?;
            done(group, "removed")
        }
        GroupCommand::List => {
            let (groups, invites) = conn.groups().await?;
            let list = GroupList { groups, invites };
            out.emit(&list, || describe_list(&list))
        }
        GroupCommand::Members { group } => {
            let group = resolve(conn, &group).await?;
            let info = conn.group_info(group).await?;
            out.emit(&info, || describe_members(&info))
        }
        GroupCommand::Send { group, text } => {
            let group = resolve(conn, &group).await?;
            let sent = conn.group_send(group, text.join(" ").into_bytes()).await;
            let seq = sent.context("message not sent (or not confirmed)")?.seq;
            out.emit(&serde_json::json!({"group": group, "seq": seq}), || {
                format!("sent to group {group} (group seq {seq})")
            })
        }
    }
}

/// A group given by id, or by name among the user's groups.
async fn resolve(conn: &Connection, group: &str) -> anyhow::Result<u64> {
    if let Ok(id) = group.parse::<u64>() {
        if !is_group(id) {
            bail!("{id} is not a group id");
        }
        return Ok(id);
    }
    let (groups, _) = conn.groups().await?;
    let mut found = groups.iter().filter(|g| g.name == group);
    match (found.next(), found.next()) {
        (Some(g), None) => Ok(g.group),
        (Some(_), Some(_)) => bail!("you are in several groups named {group}: give its id"),
        (None, _) => bail!("you are in no group named {group}"),
    }
}

fn describe_list(list: &GroupList) -> String {
    let mut lines: Vec<String> = list
        .groups
        .iter()
        .map(|g| {
            let unread = g.high_seq.saturating_sub(g.read_seq);
            format!(
                "{} (group {}, {}, {} members): {unread} unread",
                g.name,
                g.group,
                g.role.name(),
                g.members
            )
        })
        .collect();
    lines.extend(
        list.invites
            .iter()
            .map(|i| format!("invited to {} (group {}) by user {}", i.name, i.group, i.by)),
    );
    if lines.is_empty() {
        return "no groups".into();
    }
    lines.join("\n")
}

fn describe_members(info: &GroupInfo) -> String {
    let mut lines = vec![format!(
        "{} (group {}): {}",
        info.name, info.group, info.topic
    )];
    lines.extend(
        info.members
            .iter()
            .map(|m| format!("  user {} {}", m.user, m.role.name())),
    );
    lines.extend(
        info.joins
            .iter()
            .map(|u| format!("  user {u} asks to join")),
    );
    lines.join("\n")
}
