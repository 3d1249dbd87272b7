//! `imctl shard`: append, fetch, ack and stats against one msgstore shard.

use crate::output::Output;
use anyhow::Context;
use clap::{Args, Subcommand};
use msgstore::client::ShardClient;
use proto::shard::{MailboxStats, ShardStats, StoredRecord, FETCH_BYTES_MAX, FETCH_COUNT_MAX};
use serde::Serialize;
use std::fmt::Write as _;

#[derive(Debug, Args)]
pub struct ShardArgs {
    /// Address of the shard (HOST:PORT); every command but `repair`.
    #[arg(long, value_name = "HOST:PORT", env = "IMCTL_SHARD_ADDR")]
    addr: Option<String>,
    #[command(subcommand)]
    command: ShardCommand,
}

#[derive(Debug, Subcommand)]
enum ShardCommand {
    /// Store a text message in USER's mailbox (with a random msg_id).
    Append { user: u64, text: String },
    /// Show USER's stored messages, oldest first.
    Fetch {
        user: u64,
        /// Only messages with a sequence number above this.
        #[arg(long, default_value_t = 0, value_name = "SEQ")]
        after: u64,
        /// At most this many messages (the shard caps it at 1000).
        #[arg(long, default_value_t = 100, value_name = "N")]
        max: u32,
    },
    /// Delete USER's messages up to and including SEQ.
    Ack { user: u64, seq: u64 },
    /// The mailboxes the shard holds, users' and groups' (a group id has
    /// bit 63 set), with what each keeps.
    Mailboxes {
        /// Only users' (`users`) or groups' (`groups`) mailboxes.
        #[arg(long, value_enum)]
        only: Option<MailboxKind>,
        /// At most this many.
        #[arg(long, default_value_t = 1000, value_name = "N")]
        max: usize,
    },
    /// Statistics of the shard, or of one mailbox with --user (a user or
    /// group id).
    Stats {
        #[arg(long, value_name = "USER")]
        user: Option<u64>,
    },
    /// A replicated shard group (--addr is then a replica's replication
    /// address, its raft.listen).
    #[command(subcommand)]
    Group(crate::shard_group_cmd::GroupCommand),
    /// Offline, with the shard stopped: cut a standalone shard's log at
    /// the damage that keeps it from starting (a corrupt entry with valid
    /// ones after it) and print exactly what was dropped. Seqs past the
    /// cut are never given again. Does nothing to a log that is not
    /// corrupt.
    Repair {
        /// The shard's data directory (its `data` setting).
        #[arg(long, value_name = "DIR")]
        data: std::path::PathBuf,
        /// The shard's TOML config, for its engine settings.
        #[arg(long, value_name = "FILE")]
        config: Option<std::path::PathBuf>,
    },
}

pub async fn run(args: ShardArgs, out: &Output) -> anyhow::Result<()> {
    if let ShardCommand::Repair { data, config } = args.command {
        return repair(data, config, out);
    }
    let addr = args
        .addr
        .context("--addr (or IMCTL_SHARD_ADDR) is required")?;
    match args.command {
        ShardCommand::Group(group) => crate::shard_group_cmd::run(&addr, group, out).await,
        command => run_on_shard(&addr, command, out).await,
    }
}

fn repair(
    data: std::path::PathBuf,
    config: Option<std::path::PathBuf>,
    out: &Output,
) -> anyhow::Result<()> {
    let mut config = match config {
        Some(path) => msgstore::daemon::DaemonConfig::load(&path)?,
        None => msgstore::daemon::DaemonConfig::default(),
    };
    config.data = Some(data);
    let lines = msgstore::daemon::repair_shard(config)?;
    out.emit(&lines, || lines.join("\n"))
}

async fn run_on_shard(addr: &str, command: ShardCommand, out: &Output) -> anyhow::Result<()> {
    let client = ShardClient::connect(addr)
        .await
        .with_context(|| format!("cannot connect to shard {addr}"))?;
    match command {
        ShardCommand::Group(group) => crate::shard_group_cmd::run(addr, group, out).await,
        ShardCommand::Repair { .. } => anyhow::bail!("repair runs offline, not against --addr"),
        ShardCommand::Append { user, text } => append(&client, out, user, text).await,
        ShardCommand::Fetch { user, after, max } => fetch(&client, out, user, after, max).await,
        ShardCommand::Ack { user, seq } => ack(&client, out, user, seq).await,
        ShardCommand::Mailboxes { only, max } => mailboxes(&client, out, only, max).await,
        ShardCommand::Stats { user: Some(user) } => user_stats(&client, out, user).await,
        ShardCommand::Stats { user: None } => shard_stats(&client, out).await,
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum MailboxKind {
    Users,
    Groups,
}

#[derive(Serialize)]
struct Mailbox {
    id: u64,
    group: bool,
    live_count: u64,
    live_bytes: u64,
}

async fn mailboxes(
    client: &ShardClient,
    out: &Output,
    only: Option<MailboxKind>,
    max: usize,
) -> anyhow::Result<()> {
    let wanted = |id: u64| match only {
        None => true,
        Some(MailboxKind::Groups) => proto::groups::is_group(id),
        Some(MailboxKind::Users) => !proto::groups::is_group(id),
    };
    let mut found = Vec::new();
    let mut start = Some(0);
    while let Some(from) = start.filter(|_| found.len() < max) {
        let (page, next) = client
            .list_users(from, proto::shard::LIST_USERS_MAX)
            .await?;
        found.extend(
            page.into_iter()
                .filter(|u| wanted(u.user))
                .map(|u| Mailbox {
                    id: u.user,
                    group: proto::groups::is_group(u.user),
                    live_count: u.live_count,
                    live_bytes: u.live_bytes,
                }),
        );
        start = next;
    }
    found.truncate(max);
    out.emit(&found, || {
        let mut text = String::new();
        for m in &found {
            let kind = if m.group { "group" } else { "user" };
            let _ = writeln!(
                text,
                "{kind} {}: {} messages, {} bytes",
                m.id, m.live_count, m.live_bytes
            );
        }
        if text.is_empty() {
            text = "no mailboxes".into();
        }
        text
    })
}

#[derive(Serialize)]
struct Appended {
    user: u64,
    seq: u64,
    msg_id: String,
}

async fn append(client: &ShardClient, out: &Output, user: u64, text: String) -> anyhow::Result<()> {
    let msg_id: u128 = rand::random();
    let seq = client.append(user, msg_id, text.into_bytes()).await?;
    let result = Appended {
        user,
        seq,
        msg_id: format!("{msg_id:032x}"),
    };
    out.emit(&result, || {
        format!("appended user={user} seq={seq} msg_id={}", result.msg_id)
    })
}

/// One record as imctl shows it: the payload as (lossy) UTF-8 text.
#[derive(Serialize)]
struct Record {
    seq: u64,
    msg_id: String,
    timestamp_ms: u64,
    text: String,
}

impl From<StoredRecord> for Record {
    fn from(r: StoredRecord) -> Self {
        Record {
            seq: r.seq,
            msg_id: format!("{:032x}", r.msg_id),
            timestamp_ms: r.timestamp_ms,
            text: String::from_utf8_lossy(&r.payload).into_owned(),
        }
    }
}

#[derive(Serialize)]
struct Page {
    user: u64,
    records: Vec<Record>,
    more: bool,
}

async fn fetch(
    client: &ShardClient,
    out: &Output,
    user: u64,
    after: u64,
    max: u32,
) -> anyhow::Result<()> {
    let (records, more) = client
        .fetch(user, after, max.min(FETCH_COUNT_MAX), FETCH_BYTES_MAX)
        .await?;
    let page = Page {
        user,
        records: records.into_iter().map(Record::from).collect(),
        more,
    };
    out.emit(&page, || human_page(&page))
}

fn human_page(page: &Page) -> String {
    let mut text = String::new();
    if page.records.is_empty() {
        let _ = writeln!(text, "no messages for user {}", page.user);
    }
    for r in &page.records {
        let _ = writeln!(text, "{:>8}  {}  {}", r.seq, r.timestamp_ms, r.text);
    }
    if page.more {
        let _ = writeln!(text, "(more messages follow; use --after)");
    }
    text
}

#[derive(Serialize)]
struct Acked {
    user: u64,
    up_to_seq: u64,
    removed: u64,
}

async fn ack(client: &ShardClient, out: &Output, user: u64, seq: u64) -> anyhow::Result<()> {
    let removed = client.ack(user, seq).await?;
    let result = Acked {
        user,
        up_to_seq: seq,
        removed,
    };
    out.emit(&result, || {
        format!("acked user={user} up_to={seq} removed={removed}")
    })
}

async fn user_stats(client: &ShardClient, out: &Output, user: u64) -> anyhow::Result<()> {
    let s: MailboxStats = client.user_stats(user).await?;
    out.emit(&s, || {
        format!(
            "user:        {user}\nlive_count:  {}\nlive_bytes:  {}\nlast_seq:    {}\nacked_seq:   {}",
            s.live_count, s.live_bytes, s.last_seq, s.acked_seq
        )
    })
}

async fn shard_stats(client: &ShardClient, out: &Output) -> anyhow::Result<()> {
    let s: ShardStats = client.stats().await?;
    out.emit(&s, || human_shard_stats(&s))
}

fn human_shard_stats(s: &ShardStats) -> String {
    let rows: [(&str, u64); 14] = [
        ("users", s.users),
        ("live_messages", s.live_messages),
        ("live_bytes", s.live_bytes),
        ("appends_total", s.appends_total),
        ("acks_total", s.acks_total),
        ("batches_total", s.batches_total),
        ("syncs_total", s.syncs_total),
        ("checkpoints_total", s.checkpoints_total),
        ("compactions_total", s.compactions_total),
        ("wal_bytes", s.wal_bytes),
        ("bucket_bytes", s.bucket_bytes),
        ("dead_bytes", s.dead_bytes),
        ("open_maps", s.open_maps),
        ("corrupt_records_total", s.corrupt_records_total),
    ];
    let mut text: String = rows
        .iter()
        .map(|(name, value)| format!("{:<22} {value}\n", format!("{name}:")))
        .collect();
    let role = serde_json::to_value(s.role).unwrap_or_default();
    let _ = writeln!(text, "{:<22} {}", "role:", role.as_str().unwrap_or("?"));
    if let Some(leader) = s.leader {
        let _ = writeln!(text, "{:<22} replica {leader}", "leader:");
    }
    if let Some(raft) = &s.raft {
        let n = |i: Option<u64>| i.map_or("-".to_string(), |i| i.to_string());
        let _ = writeln!(text, "{:<22} {} (term {})", "replica:", raft.id, raft.term);
        let _ = writeln!(text, "{:<22} {}", "last_log_index:", n(raft.last_log_index));
        let _ = writeln!(
            text,
            "{:<22} {}",
            "committed_index:",
            n(raft.committed_index)
        );
        let _ = writeln!(text, "{:<22} {}", "applied_index:", n(raft.applied_index));
        for p in raft.matched.iter().filter(|p| p.replica != raft.id) {
            let lag = raft.lag_of(p.replica).unwrap_or(0);
            let _ = writeln!(text, "{:<22} replica {}: lag {lag}", "follower:", p.replica);
        }
    }
    text
}
