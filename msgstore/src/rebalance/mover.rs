//! Moving users between live shards: install routing by both maps, copy
//! each user whose owner changes (freeze at the old shard, copy the mailbox
//! with its sequence numbers, release it there as moved), then install the
//! new map alone.

use super::plan::{Plan, RebalanceError};
use crate::client::{ClientError, ShardClient};
use proto::{
    cluster::ShardRing,
    shard::{
        Routing, ShardErrorCode, FETCH_BYTES_MAX, FROZEN_USERS_MAX, IMPORT_RECORDS_MAX,
        LIST_USERS_MAX,
    },
};
use std::{collections::HashMap, sync::Arc, time::Duration};
use tokio::task::JoinSet;

/// Users copied at once by default. More moves faster and slows the
/// traffic more (`imbench rebalance`: 16 at once moved 2.6k users/s with the
/// load at 0.45 of its rate, 64 at once 7.1k users/s at 0.35).
pub const MOVES_INFLIGHT_DEFAULT: usize = 16;
/// Users copied at once at most: each holds one freeze at its old shard.
pub const MOVES_INFLIGHT_MAX: usize = FROZEN_USERS_MAX;
/// Attempts at one user before the rebalance stops with an error.
pub const MOVE_ATTEMPTS_MAX: u32 = 8;
/// Payload bytes copied per import request (a request frame holds 1 MiB).
const COPY_PAGE_BYTES_MAX: u32 = FETCH_BYTES_MAX / 2;
/// Pause before retrying a `Busy` answer.
const BUSY_RETRY: Duration = Duration::from_millis(20);

/// Users (and their live payload bytes) moving from one shard to another.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Flow {
    pub from: String,
    pub to: String,
    pub users: u64,
    pub bytes: u64,
}

/// What the caller hears while users move.
pub trait Progress: Send + Sync {
    /// How much is left to move, once it is known.
    fn planned(&self, users: u64, bytes: u64);
    /// One user was moved with `bytes` of live payload.
    fn moved(&self, bytes: u64);
}

/// What a rebalance moved.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Moved {
    pub users: u64,
    pub bytes: u64,
    pub records: u64,
}

/// Connections to every shard of a plan.
#[derive(Clone)]
pub struct Mover {
    moves_inflight: usize,
    plan: Arc<Plan>,
    target: Arc<ShardRing>,
    clients: Arc<HashMap<String, ShardClient>>,
}

fn shard_error(shard: &str, e: ClientError) -> RebalanceError {
    RebalanceError::Shard {
        shard: shard.to_owned(),
        message: e.to_string(),
    }
}

/// How long [`connect_leader`] waits for a replicated shard's group to
/// have a leader (an election in progress).
const LEADER_WAIT_MS_MAX: u64 = 5_000;

/// A connection to the shard: a standalone shard at its address; a
/// replicated one at the replica that leads its group (the one whose
/// `Stats` says `Leader`), so that every write of the rebalance goes
/// where it can commit. A leader lost during the rebalance makes its
/// calls fail with `NotLeader`: run the command again, it resumes.
async fn connect_leader(s: &proto::cluster::ShardEntry) -> Result<ShardClient, RebalanceError> {
    if s.replicas.is_empty() {
        return ShardClient::connect(s.addr.as_str())
            .await
            .map_err(|e| shard_error(&s.id, e));
    }
    let deadline =
        tokio::time::Instant::now() + std::time::Duration::from_millis(LEADER_WAIT_MS_MAX);
    loop {
        for addr in s.addrs() {
            let Ok(client) = ShardClient::connect(addr.as_str()).await else {
                continue;
            };
            if client
                .stats()
                .await
                .is_ok_and(|st| st.role == proto::shard::ShardRole::Leader)
            {
                return Ok(client);
            }
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(RebalanceError::Shard {
                shard: s.id.clone(),
                message: format!(
                    "no replica of {:?} leads its group within {LEADER_WAIT_MS_MAX} ms",
                    s.addrs()
                ),
            });
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
}

fn code(e: &ClientError) -> Option<&ShardErrorCode> {
    match e {
        ClientError::Shard(s) => Some(&s.code),
        _ => None,
    }
}

impl Mover {
    /// Connect to every shard either map names.
    pub async fn connect(plan: Plan) -> Result<Mover, RebalanceError> {
        let shards = plan.shards();
        Mover::connect_to(plan, shards).await
    }

    /// Connect to the old map's shards only: enough for [`Mover::survey`]
    /// (a dry run, before a new shard is even started).
    pub async fn connect_sources(plan: Plan) -> Result<Mover, RebalanceError> {
        let shards = plan.from.shards.clone();
        Mover::connect_to(plan, shards).await
    }

    /// Connect to the new map's shards only: enough to finish a rebalance
    /// whose users are all moved ([`Mover::install_final_routing`]), even
    /// after a removed shard was shut down.
    pub async fn connect_targets(plan: Plan) -> Result<Mover, RebalanceError> {
        let shards = plan.to.shards.clone();
        Mover::connect_to(plan, shards).await
    }

    async fn connect_to(
        plan: Plan,
        shards: Vec<proto::cluster::ShardEntry>,
    ) -> Result<Mover, RebalanceError> {
        let mut clients = HashMap::new();
        for s in shards {
            let client = connect_leader(&s).await?;
            clients.insert(s.id.clone(), client);
        }
        Ok(Mover {
            moves_inflight: MOVES_INFLIGHT_DEFAULT,
            target: Arc::new(plan.target_ring()),
            plan: Arc::new(plan),
            clients: Arc::new(clients),
        })
    }

    /// Copy up to `n` users at once (clamped to 1 ..= MOVES_INFLIGHT_MAX).
    pub fn set_moves_inflight(&mut self, n: usize) {
        self.moves_inflight = n.clamp(1, MOVES_INFLIGHT_MAX);
    }

    fn client(&self, shard: &str) -> &ShardClient {
        &self.clients[shard]
    }

    /// Every shard routes by both maps: the old owners keep serving users
    /// not moved yet and create no new mailboxes for users they lose.
    pub async fn install_moving_routing(&self) -> Result<(), RebalanceError> {
        for s in self.plan.shards() {
            let routing = Routing {
                me: s.id.clone(),
                current: self.plan.from.clone(),
                target: Some(self.plan.to.clone()),
            };
            self.install(&s.id, routing).await?;
        }
        Ok(())
    }

    /// Every shard of the new map routes by it alone. A removed shard keeps
    /// routing by both, so it answers `Moved` for as long as it runs.
    pub async fn install_final_routing(&self) -> Result<(), RebalanceError> {
        for s in &self.plan.to.shards {
            let routing = Routing {
                me: s.id.clone(),
                current: self.plan.to.clone(),
                target: None,
            };
            self.install(&s.id, routing).await?;
        }
        Ok(())
    }

    async fn install(&self, shard: &str, routing: Routing) -> Result<(), RebalanceError> {
        self.client(shard)
            .set_routing(routing)
            .await
            .map_err(|e| shard_error(shard, e))
    }

    /// Users whose owner changes, per (old shard, new shard), with bytes.
    pub async fn survey(&self) -> Result<Vec<Flow>, RebalanceError> {
        Ok(flows(&self.leaving_all().await?, &self.target))
    }

    /// Per shard of the old map, its users that the new map gives to
    /// another shard, with their live payload bytes.
    async fn leaving_all(&self) -> Result<Vec<(String, Vec<(u64, u64)>)>, RebalanceError> {
        let mut all = Vec::new();
        for source in &self.plan.from.shards {
            all.push((source.id.clone(), self.leaving(&source.id).await?));
        }
        Ok(all)
    }

    /// The users on `shard` that the new map gives to another shard.
    async fn leaving(&self, shard: &str) -> Result<Vec<(u64, u64)>, RebalanceError> {
        let mut out = Vec::new();
        let mut start = 0;
        loop {
            let (users, next) = self
                .client(shard)
                .list_users(start, LIST_USERS_MAX)
                .await
                .map_err(|e| shard_error(shard, e))?;
            out.extend(
                users
                    .iter()
                    .filter(|u| self.target.owner(u.user) != shard)
                    .map(|u| (u.user, u.live_bytes)),
            );
            match next {
                None => return Ok(out),
                Some(next) if next > start => start = next,
                Some(next) => {
                    return Err(RebalanceError::Shard {
                        shard: shard.to_owned(),
                        message: format!("user listing went back from {start} to {next}"),
                    })
                }
            }
        }
    }

    /// Move every user whose owner changes, several at once (see
    /// [`Mover::set_moves_inflight`]). The shards of the old map are
    /// listed once: while both maps are installed none of them gains a
    /// user it loses under the new map.
    pub async fn move_all(&self, progress: &dyn Progress) -> Result<Moved, RebalanceError> {
        let leaving = self.leaving_all().await?;
        let planned = flows(&leaving, &self.target);
        progress.planned(
            planned.iter().map(|f| f.users).sum(),
            planned.iter().map(|f| f.bytes).sum(),
        );
        let mut total = Moved::default();
        for (source, users) in leaving {
            let mut tasks = JoinSet::new();
            for (user, _) in users {
                if tasks.len() >= self.moves_inflight {
                    total.add(joined(tasks.join_next().await, progress)?);
                }
                let (mover, from) = (self.clone(), source.clone());
                tasks.spawn(async move { mover.move_user(&from, user).await });
            }
            while let Some(done) = tasks.join_next().await {
                total.add(joined(Some(done), progress)?);
            }
        }
        Ok(total)
    }

    /// Move `user` from `from` to its owner under the new map, retrying
    /// `Busy` and expired freezes. A user already moved counts nothing.
    pub async fn move_user(&self, from: &str, user: u64) -> Result<Moved, RebalanceError> {
        let mut last_error = None;
        for _ in 0..MOVE_ATTEMPTS_MAX {
            match self.try_move_user(from, user).await {
                Ok(moved) => return Ok(moved),
                Err(e) if matches!(code(&e), Some(ShardErrorCode::Moved { .. })) => {
                    return Ok(Moved::default())
                }
                Err(e)
                    if matches!(
                        code(&e),
                        Some(ShardErrorCode::Busy | ShardErrorCode::Conflict)
                    ) =>
                {
                    last_error = Some(e);
                    tokio::time::sleep(BUSY_RETRY).await;
                }
                Err(e) => return Err(shard_error(from, e)),
            }
        }
        let e = last_error.expect("at least one attempt failed");
        Err(RebalanceError::Shard {
            shard: from.to_owned(),
            message: format!(
                "user {user} could not be moved after {MOVE_ATTEMPTS_MAX} attempts: {e}"
            ),
        })
    }

    async fn try_move_user(&self, from: &str, user: u64) -> Result<Moved, ClientError> {
        let to = self.target.owner(user).to_owned();
        let (src, dst) = (self.client(from), self.client(&to));
        let token = rand::random::<u64>();
        let frozen = src.freeze(user, token).await?;
        let mut after = frozen.acked_seq;
        let mut records = 0;
        loop {
            let (page, more) = src
                .fetch(user, after, IMPORT_RECORDS_MAX as u32, COPY_PAGE_BYTES_MAX)
                .await?;
            after = page.last().map_or(after, |r| r.seq);
            records += page.len() as u64;
            let imported = dst.import(user, frozen.acked_seq, page).await?;
            if !more {
                if imported.last_seq != frozen.last_seq || imported.acked_seq < frozen.acked_seq {
                    return Err(ClientError::Protocol(format!(
                        "user {user}: the copy at {to} ends at seq {} (acked {}), the original \
                         at {} (acked {})",
                        imported.last_seq, imported.acked_seq, frozen.last_seq, frozen.acked_seq
                    )));
                }
                break;
            }
        }
        src.release(user, token, true).await?;
        Ok(Moved {
            users: 1,
            bytes: frozen.live_bytes,
            records,
        })
    }
}

/// Sum leaving users per (old shard, new shard), sorted.
fn flows(leaving: &[(String, Vec<(u64, u64)>)], target: &ShardRing) -> Vec<Flow> {
    let mut flows: HashMap<(&str, &str), Flow> = HashMap::new();
    for (from, users) in leaving {
        for &(user, bytes) in users {
            let to = target.owner(user);
            let flow = flows.entry((from, to)).or_insert_with(|| Flow {
                from: from.clone(),
                to: to.to_owned(),
                users: 0,
                bytes: 0,
            });
            flow.users += 1;
            flow.bytes += bytes;
        }
    }
    let mut flows: Vec<Flow> = flows.into_values().collect();
    flows.sort_by(|a, b| (&a.from, &a.to).cmp(&(&b.from, &b.to)));
    flows
}

impl Moved {
    fn add(&mut self, other: Moved) {
        self.users += other.users;
        self.bytes += other.bytes;
        self.records += other.records;
    }
}

fn joined(
    done: Option<Result<Result<Moved, RebalanceError>, tokio::task::JoinError>>,
    progress: &dyn Progress,
) -> Result<Moved, RebalanceError> {
    let moved = match done {
        Some(Ok(result)) => result?,
        Some(Err(e)) => {
            return Err(RebalanceError::Plan(format!("a move task failed: {e}")));
        }
        None => Moved::default(),
    };
    if moved.users > 0 {
        progress.moved(moved.bytes);
    }
    Ok(moved)
}
