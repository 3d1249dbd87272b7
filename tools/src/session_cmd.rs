//! `imctl send` and `imctl inbox`: one-shot commands of a person, through
//! the client SDK and the gateway like any client. Defaults come from
//! `DATA/demo.toml` (written by `imctl up`).

use crate::{
    demo::{Demo, DATA_DIR_DEFAULT},
    output::Output,
};
use anyhow::{bail, Context};
use clap::Args;
use client::sdk::{self, Connection, Credentials, ImEvent, SdkConfig};
use proto::app::Delivery;
use serde::Serialize;
use std::{collections::HashMap, path::PathBuf};

/// Who logs in where.
#[derive(Debug, Args)]
pub struct LoginArgs {
    /// The user to log in as.
    #[arg(long)]
    user: String,
    /// The password [default: the demo user's, from DATA/demo.toml].
    #[arg(long, env = "IMCTL_PASSWORD", hide_env_values = true)]
    password: Option<String>,
    /// The gateway, host:port [default: from DATA/demo.toml].
    #[arg(long, value_name = "ADDR")]
    gateway: Option<String>,
    /// The gateway's public key, hex [default: from DATA/demo.toml].
    #[arg(long, value_name = "HEX")]
    public_key: Option<String>,
    /// Where `imctl up` keeps its data (for demo.toml).
    #[arg(long, value_name = "DIR", default_value = DATA_DIR_DEFAULT)]
    data: PathBuf,
}

#[derive(Debug, Args)]
pub struct SendArgs {
    #[command(flatten)]
    login: LoginArgs,
    /// The recipient: a friend's username, or a user id.
    #[arg(long)]
    to: String,
    /// The message.
    #[arg(required = true)]
    text: Vec<String>,
}

#[derive(Debug, Args)]
pub struct InboxArgs {
    #[command(flatten)]
    login: LoginArgs,
}

impl LoginArgs {
    pub fn user(&self) -> &str {
        &self.user
    }

    /// Log in through the SDK.
    pub async fn connect(
        &self,
    ) -> anyhow::Result<(Connection, tokio::sync::mpsc::Receiver<sdk::ImEvent>)> {
        self.connect_with(|_| {}).await
    }

    /// Log in through the SDK, with `tune` adjusting its settings.
    pub async fn connect_with(
        &self,
        tune: impl FnOnce(&mut SdkConfig),
    ) -> anyhow::Result<(Connection, tokio::sync::mpsc::Receiver<sdk::ImEvent>)> {
        let demo = Demo::load(&self.data).ok();
        let gateway = match (&self.gateway, &demo) {
            (Some(g), _) => g.clone(),
            (None, Some(d)) => d.gateway.clone(),
            (None, None) => bail!("no --gateway and no demo.toml in {}", self.data.display()),
        };
        let public_key = match (&self.public_key, &demo) {
            (Some(k), _) => {
                gateway::keys::from_hex(k).context("--public-key is not 64 hex digits")?
            }
            (None, Some(d)) => d.public_key()?,
            (None, None) => bail!(
                "no --public-key and no demo.toml in {}",
                self.data.display()
            ),
        };
        let password = match (&self.password, &demo) {
            (Some(p), _) => p.clone(),
            (None, Some(d)) => d
                .password_of(&self.user)
                .with_context(|| format!("{} is not a demo user: give --password", self.user))?
                .to_string(),
            (None, None) => bail!("no --password"),
        };
        let credentials = Credentials::Password {
            username: self.user.clone(),
            password,
        };
        let mut config = SdkConfig::new(gateway, public_key, credentials);
        tune(&mut config);
        sdk::connect(config)
            .await
            .with_context(|| format!("cannot log in as {}", self.user))
    }
}

/// Usernames of the logged-in user's friends, by id.
async fn friend_names(conn: &Connection) -> anyhow::Result<HashMap<u64, String>> {
    let view = conn.login_view().await?;
    Ok(view
        .view
        .groups
        .iter()
        .flat_map(|g| g.friends.iter().map(|p| (p.user, p.username.clone())))
        .collect())
}

#[derive(Serialize)]
struct Sent {
    to: u64,
    seq: u64,
}

/// How long `imctl send` keeps trying a message the gateway could not
/// take yet (a shard down, a rate limit) before it says so.
const SEND_TIMEOUT_MS: u64 = 15_000;

pub async fn send(args: SendArgs, out: &Output) -> anyhow::Result<()> {
    let tune = |c: &mut SdkConfig| c.limits.send_timeout_ms = SEND_TIMEOUT_MS;
    let (conn, _events) = args.login.connect_with(tune).await?;
    let friends = friend_names(&conn).await?;
    let to = match args.to.parse::<u64>() {
        Ok(id) => id,
        Err(_) => {
            *friends
                .iter()
                .find(|(_, name)| **name == args.to)
                .with_context(|| {
                    format!(
                        "{} is not a friend of {} (give a user id)",
                        args.to, args.login.user
                    )
                })?
                .0
        }
    };
    let sent = conn.send(to, args.text.join(" ").into_bytes()).await;
    conn.close().await;
    let sent = Sent {
        to,
        seq: sent
            .with_context(|| format!("message to {} not sent (or not confirmed)", args.to))?
            .seq,
    };
    out.emit(&sent, || {
        format!("sent to {} (mailbox seq {})", args.to, sent.seq)
    })
}

#[derive(Serialize)]
struct InboxMessage {
    /// The group it was sent to; `None` for a message to the user.
    group: Option<u64>,
    from: u64,
    from_name: Option<String>,
    seq: u64,
    sent_at_ms: u64,
    text: String,
}

/// The messages waiting for the logged-in user, in its mailbox and its
/// groups (the group, if any, with each): the connection shows them (as
/// events) after login, and `synced` says when all were shown and
/// acknowledged.
async fn waiting_messages(
    conn: &Connection,
    events: &mut tokio::sync::mpsc::Receiver<ImEvent>,
) -> anyhow::Result<Vec<(Option<u64>, Delivery)>> {
    let mut messages = Vec::new();
    let synced = conn.synced();
    tokio::pin!(synced);
    loop {
        tokio::select! {
            done = &mut synced => {
                done?;
                break;
            }
            event = events.recv() => match event {
                Some(event) => take_message(event, &mut messages),
                None => bail!("the connection ended before the mailbox was read"),
            },
        }
    }
    while let Ok(event) = events.try_recv() {
        take_message(event, &mut messages);
    }
    Ok(messages)
}

fn take_message(event: ImEvent, messages: &mut Vec<(Option<u64>, Delivery)>) {
    match event {
        ImEvent::Message(d) => messages.push((None, d)),
        ImEvent::GroupMessage { group, delivery } => messages.push((Some(group), delivery)),
        ImEvent::GroupDropped { group, count } => {
            eprintln!("group {group}: {count} older messages are no longer kept");
        }
        _ => {}
    }
}

pub async fn inbox(args: InboxArgs, out: &Output) -> anyhow::Result<()> {
    let (conn, mut events) = args.login.connect().await?;
    let friends = friend_names(&conn).await?;
    let messages: Vec<InboxMessage> = waiting_messages(&conn, &mut events)
        .await?
        .into_iter()
        .map(|(group, d)| InboxMessage {
            group,
            from: d.from,
            from_name: friends.get(&d.from).cloned(),
            seq: d.seq,
            sent_at_ms: d.sent_at_ms,
            text: String::from_utf8_lossy(&d.body).into_owned(),
        })
        .collect();
    conn.close().await;
    out.emit(&messages, || {
        if messages.is_empty() {
            return "no stored messages".to_string();
        }
        messages
            .iter()
            .map(|m| {
                let from = m
                    .from_name
                    .clone()
                    .unwrap_or_else(|| format!("user {}", m.from));
                match m.group {
                    Some(g) => format!("[group {g}] {from}: {}", m.text),
                    None => format!("{from}: {}", m.text),
                }
            })
            .collect::<Vec<_>>()
            .join("\n")
    })
}
