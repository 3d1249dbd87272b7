//! `imctl shard --addr RAFT_ADDR group ...` and `imctl profile-group
//! --addr RAFT_ADDR ...`: form and change a replica group (a shard's, the
//! profile service's: the commands are the same) and show its state,
//! through a replica's replication port.

use crate::output::Output;
use anyhow::{bail, Context};
use clap::Subcommand;
use replication::{
    peer::{admin, AdminRequest, AdminResponse, GroupStatus},
    Replica, ReplicaId,
};
use std::{collections::BTreeMap, fmt::Write as _, time::Duration};

/// How long one group command may take (adding a replica waits for it to
/// catch up, which can take a snapshot's transfer).
const ADMIN_DEADLINE: Duration = Duration::from_secs(600);

/// `NotLeader` answers one command follows at most.
const ADMIN_REDIRECTS_MAX: usize = 3;

#[derive(Debug, Subcommand)]
pub enum GroupCommand {
    /// Form a new group of these replicas (each ID=RAFT_ADDR@CLIENT_ADDR),
    /// sent to the replica at --addr, which must be one of them.
    Init {
        #[arg(long = "replica", value_name = "ID=RAFT@CLIENT", required = true)]
        replicas: Vec<String>,
    },
    /// Add a replica: it catches up by snapshot, then log, then votes.
    AddReplica {
        /// ID=RAFT_ADDR@CLIENT_ADDR of the new replica (already running).
        #[arg(long = "replica", value_name = "ID=RAFT@CLIENT")]
        replica: String,
    },
    /// Remove replica ID from the group (a dead machine's, or to shrink it).
    RemoveReplica {
        #[arg(long, value_name = "ID")]
        id: ReplicaId,
    },
    /// Leader, term, and each replica's log, applied index and lag.
    Status,
}

pub async fn run(addr: &str, command: GroupCommand, out: &Output) -> anyhow::Result<()> {
    match command {
        GroupCommand::Init { replicas } => {
            let members = replicas
                .iter()
                .map(|r| parse_replica(r))
                .collect::<anyhow::Result<BTreeMap<_, _>>>()?;
            let n = members.len();
            send(addr, AdminRequest::Init { members }).await?;
            out.emit(&serde_json::json!({"initialized": n}), || {
                format!("group formed with {n} replicas")
            })
        }
        GroupCommand::AddReplica { replica } => {
            let (id, replica) = parse_replica(&replica)?;
            let leader = send(addr, AdminRequest::AddLearner { id, replica }).await?;
            let mut voters = status(&leader).await?.voters;
            voters.push(id);
            send(&leader, AdminRequest::ChangeMembership { voters }).await?;
            out.emit(&serde_json::json!({"added": id}), || {
                format!("replica {id} caught up and votes")
            })
        }
        GroupCommand::RemoveReplica { id } => {
            let leader = leader_addr(addr).await?;
            let voters: Vec<_> = status(&leader)
                .await?
                .voters
                .into_iter()
                .filter(|v| *v != id)
                .collect();
            if voters.is_empty() {
                bail!("replica {id} is the group's last voter");
            }
            send(&leader, AdminRequest::ChangeMembership { voters }).await?;
            out.emit(&serde_json::json!({"removed": id}), || {
                format!("replica {id} removed")
            })
        }
        GroupCommand::Status => {
            let s = status(addr).await?;
            out.emit(&s, || render(&s))
        }
    }
}

/// `ID=RAFT_ADDR@CLIENT_ADDR`.
fn parse_replica(text: &str) -> anyhow::Result<(ReplicaId, Replica)> {
    let (id, addrs) = text
        .split_once('=')
        .with_context(|| format!("{text:?}: expected ID=RAFT_ADDR@CLIENT_ADDR"))?;
    let (raft, client) = addrs
        .split_once('@')
        .with_context(|| format!("{text:?}: expected ID=RAFT_ADDR@CLIENT_ADDR"))?;
    let id: ReplicaId = id
        .parse()
        .with_context(|| format!("{id:?} is not a replica id"))?;
    if id == 0 {
        bail!("replica ids start at 1");
    }
    Ok((
        id,
        Replica {
            raft_addr: raft.to_string(),
            client_addr: client.to_string(),
        },
    ))
}

async fn status(addr: &str) -> anyhow::Result<GroupStatus> {
    match admin(addr, AdminRequest::Status, ADMIN_DEADLINE).await? {
        AdminResponse::Status(s) => Ok(s),
        other => bail!("{addr} answered {other:?} to a status request"),
    }
}

/// The replication address of the group's leader, as `addr` knows it.
async fn leader_addr(addr: &str) -> anyhow::Result<String> {
    let s = status(addr).await?;
    let leader = s
        .leader
        .context("the group has no leader right now; try again")?;
    s.members
        .get(&leader)
        .map(|r| r.raft_addr.clone())
        .context("the leader is not among the members")
}

/// Send `request`, following `NotLeader`; the address that did it.
async fn send(addr: &str, request: AdminRequest) -> anyhow::Result<String> {
    let mut at = addr.to_string();
    for _ in 0..=ADMIN_REDIRECTS_MAX {
        match admin(&at, request.clone(), ADMIN_DEADLINE).await? {
            AdminResponse::Done => return Ok(at),
            AdminResponse::NotLeader { leader: Some(l) } => at = l,
            AdminResponse::NotLeader { leader: None } => {
                bail!("{at} does not lead the group and knows no leader; try again")
            }
            AdminResponse::Failed(e) => bail!("{at}: {e}"),
            AdminResponse::Status(_) | AdminResponse::ReadIndex(_) => {
                bail!("{at} answered something else than a command's outcome")
            }
        }
    }
    bail!("more than {ADMIN_REDIRECTS_MAX} not-leader answers")
}

fn render(s: &GroupStatus) -> String {
    let mut text = format!(
        "replica {} is {} in term {}; leader: {}\n",
        s.id,
        s.role,
        s.term,
        s.leader.map_or("none".into(), |l| l.to_string())
    );
    let last = s.last_log_index.unwrap_or(0);
    for (id, r) in &s.members {
        let kind = if s.voters.contains(id) {
            "voter"
        } else {
            "learner"
        };
        let matched = s.matched.get(id).copied().flatten();
        let lag = matched.map_or("?".into(), |m| last.saturating_sub(m).to_string());
        let _ = writeln!(
            text,
            "  {id} {kind} raft={} client={} matched={} lag={lag}",
            r.raft_addr,
            r.client_addr,
            matched.map_or("?".into(), |m| m.to_string())
        );
    }
    let _ = write!(
        text,
        "  here: last_log={} applied={} snapshot={}",
        last,
        s.applied_index.unwrap_or(0),
        s.snapshot_index.map_or("none".into(), |i| i.to_string())
    );
    text
}
