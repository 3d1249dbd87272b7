//! `imctl presence`: statistics, lookups and the gateway list of a presence
//! server. Read-only: it does not register as a gateway.

use crate::output::Output;
use anyhow::Context;
use clap::{Args, Subcommand};
use presence::client::request_once;
use proto::presence::{Entry, GatewayInfo, PresenceStats, RequestBody, ResponseBody};
use serde::Serialize;
use std::fmt::Write as _;

#[derive(Debug, Args)]
pub struct PresenceArgs {
    /// Address of the presence server (HOST:PORT).
    #[arg(long, value_name = "HOST:PORT", env = "IMCTL_PRESENCE_ADDR")]
    addr: String,
    #[command(subcommand)]
    command: PresenceCommand,
}

#[derive(Debug, Subcommand)]
enum PresenceCommand {
    /// Statistics of the server (users online, table size, gateways, ...).
    Stats,
    /// Where each USER is online.
    Lookup {
        #[arg(required = true, value_name = "USER")]
        users: Vec<u64>,
    },
    /// Every gateway the server knows.
    Gateways,
}

pub async fn run(args: PresenceArgs, out: &Output) -> anyhow::Result<()> {
    let (body, what) = match &args.command {
        PresenceCommand::Stats => (RequestBody::Stats, "stats"),
        PresenceCommand::Lookup { users } => (
            RequestBody::Lookup {
                users: users.clone(),
            },
            "lookup",
        ),
        PresenceCommand::Gateways => (RequestBody::Gateways, "gateways"),
    };
    let answer = request_once(&args.addr, body)
        .await
        .with_context(|| format!("{what} at presence server {}", args.addr))?;
    match (args.command, answer) {
        (PresenceCommand::Stats, ResponseBody::Stats(s)) => out.emit(&s, || human_stats(&s)),
        (PresenceCommand::Lookup { users }, ResponseBody::Entries { entries }) => {
            let rows: Vec<UserEntry> = users
                .into_iter()
                .zip(entries)
                .map(|(user, entry)| UserEntry { user, entry })
                .collect();
            out.emit(&rows, || human_entries(&rows))
        }
        (PresenceCommand::Gateways, ResponseBody::Gateways { gateways }) => {
            out.emit(&gateways, || human_gateways(&gateways))
        }
        (_, other) => anyhow::bail!("unexpected answer from the presence server: {other:?}"),
    }
}

#[derive(Serialize)]
struct UserEntry {
    user: u64,
    /// `null` when offline.
    entry: Option<Entry>,
}

fn human_entries(rows: &[UserEntry]) -> String {
    let mut text = String::new();
    for r in rows {
        let _ = match r.entry {
            Some(e) => writeln!(
                text,
                "{}: {:?} on gateway {} session {} since {}",
                r.user, e.status, e.gateway, e.session, e.since_s
            ),
            None => writeln!(text, "{}: offline", r.user),
        };
    }
    text
}

fn human_gateways(gateways: &[GatewayInfo]) -> String {
    let mut text = String::new();
    if gateways.is_empty() {
        text.push_str("no gateways\n");
    }
    for g in gateways {
        let state = if g.connected { "connected" } else { "in grace" };
        let _ = writeln!(
            text,
            "gateway {} at {:?}: {state}, {} users",
            g.gateway, g.peer_addr, g.users
        );
    }
    text
}

fn human_stats(s: &PresenceStats) -> String {
    let rows: [(&str, u64); 12] = [
        ("users_online", s.users_online),
        ("table_capacity", s.table_capacity),
        ("table_bytes", s.table_bytes),
        ("gateways_connected", s.gateways_connected),
        ("gateways_in_grace", s.gateways_in_grace),
        ("watched_users", s.watched_users),
        ("watches", s.watches),
        ("lookups_total", s.lookups_total),
        ("updates_total", s.updates_total),
        ("events_total", s.events_total),
        ("kicks_total", s.kicks_total),
        ("expired_users_total", s.expired_users_total),
    ];
    rows.iter()
        .map(|(name, value)| format!("{:<22} {value}\n", format!("{name}:")))
        .collect()
}
