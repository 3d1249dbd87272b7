//! The msgstore shards as the gateway sees them: which shard owns a user
//! (consistent hashing over the cluster map in use, which a newer epoch
//! replaces at run time), one pipelined connection per shard address,
//! opened on first use and reopened after it breaks, and the rebalance
//! answers: `Moved` is followed to the shard it names (even one the map in
//! use does not know yet), `Busy` is retried after a backoff.
//!
//! A call never splits a request between shards in a way that loses a
//! message: a shard answers `Moved` or `Busy` only for requests it did not
//! carry out, so retrying them elsewhere or later is safe, and an append is
//! reported stored only when some shard answered `Appended`.

use crate::shard_links::{Link, ShardLinks};
use msgstore::client::{ClientError, ShardClient};
use proto::{
    cluster::{ClusterMap, ShardRing},
    shard::{AppendItem, MailboxStats, ShardError, ShardErrorCode, StoredRecord},
};
use std::{
    collections::HashMap,
    future::Future,
    sync::{Arc, RwLock},
    time::Duration,
};

/// `Moved` answers one call follows at most; one more fails the call
/// (`Unavailable`): shards that disagree must not make a call loop.
pub const SHARD_REDIRECTS_MAX: u32 = 4;
/// First wait after a `Busy` answer; each further one doubles ...
pub const BUSY_BACKOFF_MS_FIRST: u64 = 10;
/// ... up to this.
pub const BUSY_BACKOFF_MS_MAX: u64 = 200;

/// Why a shard call failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ShardCallError {
    #[error("mailbox full")]
    MailboxFull,
    #[error("message too large for the shard")]
    TooLarge,
    #[error("shard {shard} unavailable: {reason}")]
    Unavailable { shard: String, reason: String },
}

/// `NotLeader` answers naming a leader one call follows at most; past it
/// the call waits and tries the group's replicas in turn, like a group
/// with no leader known.
pub const LEADER_REDIRECTS_MAX: u32 = 3;

/// A read or an ack (a call that may run twice) that one replica of a
/// group leaves unanswered this long is asked of the group's other
/// replicas: its leader may be paused or cut off, and the others elect a
/// new one within about a second (`raft.election_timeout_max_ms` twice).
/// Each replica gets one such timed attempt per call; once every replica
/// had one, the call waits on the leader named to it, as writes always do
/// (a write may have been stored; it is never sent twice).
pub const READ_ATTEMPT_MS_MAX: u64 = 1_000;

/// A cluster map with its ring built and its shards' addresses by id.
struct Placement {
    map: Arc<ClusterMap>,
    ring: ShardRing,
    addrs: HashMap<String, String>,
    /// Every replica address of each shard (`addr` first).
    replicas: HashMap<String, Vec<String>>,
}

impl Placement {
    fn new(map: ClusterMap) -> Placement {
        let addrs = map
            .shards
            .iter()
            .map(|s| (s.id.clone(), s.addr.clone()))
            .collect();
        let replicas = map
            .shards
            .iter()
            .map(|s| (s.id.clone(), s.addrs()))
            .collect();
        Placement {
            ring: ShardRing::new(&map.shards),
            addrs,
            replicas,
            map: Arc::new(map),
        }
    }
}

/// Where one attempt of a call goes.
#[derive(Debug, Clone)]
struct Target {
    shard: String,
    addr: String,
}

/// The waits between retries of a `Busy` user: doubling from
/// [`BUSY_BACKOFF_MS_FIRST`] to [`BUSY_BACKOFF_MS_MAX`], in all at most
/// `budget_ms`; then `None` (give up).
#[derive(Debug)]
pub struct BusyBackoff {
    next_ms: u64,
    left_ms: u64,
}

impl BusyBackoff {
    pub fn new(budget_ms: u64) -> BusyBackoff {
        BusyBackoff {
            next_ms: BUSY_BACKOFF_MS_FIRST,
            left_ms: budget_ms,
        }
    }

    pub fn next_wait(&mut self) -> Option<Duration> {
        if self.left_ms == 0 {
            return None;
        }
        let wait = self.next_ms.min(self.left_ms);
        self.left_ms -= wait;
        self.next_ms = (self.next_ms * 2).min(BUSY_BACKOFF_MS_MAX);
        Some(Duration::from_millis(wait))
    }
}

pub struct Shards {
    placement: RwLock<Arc<Placement>>,
    links: ShardLinks,
    busy_wait_ms_max: u64,
    /// The replica each replicated shard was last answered by as leader
    /// (or named as leader by another replica).
    leaders: RwLock<HashMap<String, String>>,
}

impl Shards {
    /// Route by `map` (validated); a `Busy` user is waited for at most
    /// `busy_wait_ms_max` per call.
    pub fn new(map: ClusterMap, busy_wait_ms_max: u64) -> Shards {
        metrics::gauge!("gateway_cluster_map_epoch").set(map.epoch as f64);
        Shards {
            placement: RwLock::new(Arc::new(Placement::new(map))),
            links: ShardLinks::default(),
            busy_wait_ms_max,
            leaders: RwLock::default(),
        }
    }

    fn placement(&self) -> Arc<Placement> {
        // A poisoned lock only means a panic elsewhere; the Arc inside is
        // always a complete placement.
        self.placement
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// The map in use.
    pub fn map(&self) -> Arc<ClusterMap> {
        self.placement().map.clone()
    }

    /// Route by `map` (validated) from now on if its epoch is newer than
    /// the one in use; the epoch in use afterwards.
    pub fn adopt(&self, map: ClusterMap) -> u64 {
        let mut slot = self.placement.write().unwrap_or_else(|p| p.into_inner());
        if map.epoch > slot.map.epoch {
            let next = Placement::new(map);
            self.links
                .retain(|addr| next.replicas.values().flatten().any(|a| a == addr));
            tracing::info!(
                from = slot.map.epoch,
                to = next.map.epoch,
                "cluster map adopted"
            );
            metrics::gauge!("gateway_cluster_map_epoch").set(next.map.epoch as f64);
            *slot = Arc::new(next);
        }
        slot.map.epoch
    }

    /// The owner of `user` under the map in use (its leader, if known).
    fn owner(&self, user: u64) -> Target {
        let placement = self.placement();
        let shard = placement.ring.owner(user).to_string();
        let addr = self
            .leader_of(&shard)
            .unwrap_or_else(|| placement.addrs[&shard].clone());
        Target { shard, addr }
    }

    fn leader_of(&self, shard: &str) -> Option<String> {
        let leaders = self.leaders.read().unwrap_or_else(|p| p.into_inner());
        leaders.get(shard).cloned()
    }

    fn set_leader(&self, shard: &str, addr: Option<String>) {
        let mut leaders = self.leaders.write().unwrap_or_else(|p| p.into_inner());
        match addr {
            Some(a) => leaders.insert(shard.to_string(), a),
            None => leaders.remove(shard),
        };
    }

    /// The replica after `target`'s in its group, if the shard has others.
    fn next_replica(&self, target: &Target) -> Option<Target> {
        let placement = self.placement();
        let replicas = placement.replicas.get(&target.shard)?;
        if replicas.len() < 2 {
            return None;
        }
        let at = replicas.iter().position(|a| *a == target.addr);
        let next = at.map_or(0, |i| (i + 1) % replicas.len());
        Some(Target {
            shard: target.shard.clone(),
            addr: replicas[next].clone(),
        })
    }

    /// The first replica after `target`'s in its group that is not in
    /// `unanswered`, if any.
    fn untried_replica(&self, target: &Target, unanswered: &[String]) -> Option<Target> {
        let placement = self.placement();
        let replicas = placement.replicas.get(&target.shard)?;
        let at = replicas.iter().position(|a| *a == target.addr).unwrap_or(0);
        (1..replicas.len())
            .map(|step| &replicas[(at + step) % replicas.len()])
            .find(|a| !unanswered.contains(a))
            .map(|addr| Target {
                shard: target.shard.clone(),
                addr: addr.clone(),
            })
    }

    /// Where a `Moved` answer points; an answer without an address names
    /// a shard of the map in use.
    fn redirect(&self, shard: String, addr: String) -> Result<Target, ShardCallError> {
        if !addr.is_empty() {
            return Ok(Target { shard, addr });
        }
        match self.placement().addrs.get(&shard) {
            Some(addr) => Ok(Target {
                addr: addr.clone(),
                shard,
            }),
            None => Err(ShardCallError::Unavailable {
                reason: format!("moved to shard {shard}, whose address is unknown"),
                shard,
            }),
        }
    }

    fn is_in_map(&self, addr: &str) -> bool {
        self.placement()
            .replicas
            .values()
            .flatten()
            .any(|a| a == addr)
    }

    async fn client(&self, target: &Target) -> Result<(Arc<Link>, ShardClient), ShardCallError> {
        let link = self.links.get(&target.addr, |a| self.is_in_map(a));
        match link.client().await {
            Ok(c) => Ok((link, c)),
            Err(reason) => Err(ShardCallError::Unavailable {
                shard: target.shard.clone(),
                reason,
            }),
        }
    }

    /// Run `op` against `user`'s shard, following `Moved` and waiting out
    /// `Busy` within their limits. A connection found broken is dropped;
    /// an `op` that may run twice (`Retry::OnBrokenLink`: a read, an ack)
    /// is then tried once more on a new one, since a link breaks silently
    /// while nothing is sent on it (the shard restarted meanwhile).
    async fn call<T, F>(
        &self,
        user: u64,
        retry: Retry,
        op: impl Fn(ShardClient) -> F,
    ) -> Result<T, ShardCallError>
    where
        F: Future<Output = Result<T, ClientError>>,
    {
        let mut target = self.owner(user);
        let mut redirects = 0;
        let mut leader_redirects = 0;
        let mut busy = BusyBackoff::new(self.busy_wait_ms_max);
        let mut retried = false;
        // Replicas that left a timed attempt of this call unanswered.
        let mut unanswered: Vec<String> = Vec::new();
        loop {
            let (link, client) = match self.client(&target).await {
                Ok(c) => c,
                // Nothing was sent: another replica of the group may lead.
                Err(e) => match self.next_replica(&target) {
                    Some(next) => {
                        metrics::counter!("gateway_shard_replica_switches_total").increment(1);
                        self.set_leader(&target.shard, None);
                        let Some(wait) = busy.next_wait() else {
                            return Err(e);
                        };
                        tokio::time::sleep(wait).await;
                        target = next;
                        continue;
                    }
                    None => return Err(e),
                },
            };
            let timed = retry == Retry::OnBrokenLink
                && !unanswered.contains(&target.addr)
                && self.untried_replica(&target, &unanswered).is_some();
            let answer = if timed {
                tokio::time::timeout(Duration::from_millis(READ_ATTEMPT_MS_MAX), op(client)).await
            } else {
                Ok(op(client).await)
            };
            let error = match answer {
                Ok(Ok(v)) => return Ok(v),
                Ok(Err(e)) => e,
                Err(_) => {
                    metrics::counter!("gateway_shard_read_attempt_timeouts_total").increment(1);
                    tracing::debug!(shard = %target.shard, addr = %target.addr, "a replica left a read unanswered; asking the others");
                    self.set_leader(&target.shard, None);
                    unanswered.push(target.addr.clone());
                    target = self.untried_replica(&target, &unanswered).unwrap_or(target);
                    continue;
                }
            };
            let unavailable = |reason: String| ShardCallError::Unavailable {
                shard: target.shard.clone(),
                reason,
            };
            match error {
                ClientError::Shard(ShardError {
                    code: ShardErrorCode::Moved { shard, addr, epoch },
                    ..
                }) => {
                    metrics::counter!("gateway_shard_moved_total").increment(1);
                    redirects += 1;
                    if redirects > SHARD_REDIRECTS_MAX {
                        return Err(unavailable(format!(
                            "more than {SHARD_REDIRECTS_MAX} moved answers (the last to {shard})"
                        )));
                    }
                    tracing::debug!(user, from = %target.shard, to = %shard, epoch, "user moved");
                    target = self.redirect(shard, addr)?;
                }
                ClientError::Shard(ShardError {
                    code: ShardErrorCode::NotLeader { leader },
                    ..
                }) => {
                    metrics::counter!("gateway_shard_not_leader_total").increment(1);
                    leader_redirects += 1;
                    // A leader that left this call unanswered is not gone
                    // to while another replica is untried.
                    let silent = |addr: &String| {
                        unanswered.contains(addr)
                            && self.untried_replica(&target, &unanswered).is_some()
                    };
                    let leader = leader.filter(|addr| !silent(addr));
                    match leader.filter(|_| leader_redirects <= LEADER_REDIRECTS_MAX) {
                        Some(addr) => {
                            self.set_leader(&target.shard, Some(addr.clone()));
                            target.addr = addr;
                        }
                        None => {
                            // No leader known (an election): wait, then ask
                            // the next replica.
                            self.set_leader(&target.shard, None);
                            let Some(wait) = busy.next_wait() else {
                                return Err(unavailable(format!(
                                    "no leader of the group within {} ms",
                                    self.busy_wait_ms_max
                                )));
                            };
                            tokio::time::sleep(wait).await;
                            target = self
                                .untried_replica(&target, &unanswered)
                                .or_else(|| self.next_replica(&target))
                                .unwrap_or(target);
                        }
                    }
                }
                ClientError::Shard(ShardError {
                    code: ShardErrorCode::Busy,
                    ..
                }) => {
                    metrics::counter!("gateway_shard_busy_retries_total").increment(1);
                    let Some(wait) = busy.next_wait() else {
                        return Err(unavailable(format!(
                            "the user is being moved and stayed busy for {} ms",
                            self.busy_wait_ms_max
                        )));
                    };
                    tokio::time::sleep(wait).await;
                }
                ClientError::Disconnected if retry == Retry::OnBrokenLink && !retried => {
                    retried = true;
                    link.forget().await;
                    metrics::counter!("gateway_shard_reconnect_retries_total").increment(1);
                }
                e => return Err(failed(&target.shard, &link, e).await),
            }
        }
    }

    /// Store a message durably in `user`'s mailbox; its sequence number.
    pub async fn append(
        &self,
        user: u64,
        msg_id: u128,
        payload: Vec<u8>,
    ) -> Result<u64, ShardCallError> {
        self.call(user, Retry::Never, |c| {
            let payload = payload.clone();
            async move { c.append(user, msg_id, payload).await }
        })
        .await
    }

    /// Store messages durably in `user`'s mailbox, in this order: per item
    /// its sequence number or why it was not stored. Routing is decided per
    /// user, so a batch is moved or busy as a whole and followed as one.
    /// With `once_since_ms`, an item the mailbox already holds (its msg_id,
    /// stored since then) is not stored again: its seq is the answer.
    pub async fn append_batch(
        &self,
        user: u64,
        items: Vec<(u128, Vec<u8>)>,
        once_since_ms: Option<u64>,
    ) -> Result<Vec<Result<u64, ShardCallError>>, ShardCallError> {
        let results = self
            .call(user, Retry::Never, |c| {
                let items = items
                    .iter()
                    .map(|(msg_id, payload)| AppendItem {
                        user,
                        msg_id: *msg_id,
                        payload: payload.clone(),
                    })
                    .collect();
                async move {
                    let results = match once_since_ms {
                        Some(since_ms) => c.append_batch_once(items, since_ms).await?,
                        None => c.append_batch(items).await?,
                    };
                    match results.first() {
                        Some(Err(e))
                            if matches!(
                                e.code,
                                ShardErrorCode::Moved { .. }
                                    | ShardErrorCode::Busy
                                    | ShardErrorCode::NotLeader { .. }
                            ) =>
                        {
                            Err(ClientError::Shard(e.clone()))
                        }
                        _ => Ok(results),
                    }
                }
            })
            .await?;
        Ok(results.into_iter().map(|r| r.map_err(item_error)).collect())
    }

    pub async fn fetch(
        &self,
        user: u64,
        after_seq: u64,
        max_count: u32,
        max_bytes: u32,
    ) -> Result<(Vec<StoredRecord>, bool), ShardCallError> {
        self.call(user, Retry::OnBrokenLink, |c| async move {
            c.fetch(user, after_seq, max_count, max_bytes).await
        })
        .await
    }

    pub async fn ack(&self, user: u64, up_to_seq: u64) -> Result<u64, ShardCallError> {
        self.call(user, Retry::OnBrokenLink, |c| async move {
            c.ack(user, up_to_seq).await
        })
        .await
    }

    /// Delete `mailbox`'s oldest records stored before `before_ms` with a
    /// seq up to `up_to_seq`.
    pub async fn expire(
        &self,
        mailbox: u64,
        before_ms: u64,
        up_to_seq: u64,
    ) -> Result<u64, ShardCallError> {
        self.call(mailbox, Retry::OnBrokenLink, |c| async move {
            c.expire(mailbox, before_ms, up_to_seq).await
        })
        .await
    }

    pub async fn user_stats(&self, user: u64) -> Result<MailboxStats, ShardCallError> {
        self.call(user, Retry::OnBrokenLink, |c| async move {
            c.user_stats(user).await
        })
        .await
    }
}

/// Whether a shard call may be sent again after its connection broke.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Retry {
    /// Appends: the shard may have stored them before the link broke.
    Never,
    /// Reads and (cumulative) acks: the same result either way.
    OnBrokenLink,
}

/// Why one item of a batch was not stored.
fn item_error(e: ShardError) -> ShardCallError {
    match e.code {
        ShardErrorCode::MailboxFull => ShardCallError::MailboxFull,
        ShardErrorCode::MessageTooLarge => ShardCallError::TooLarge,
        _ => ShardCallError::Unavailable {
            shard: String::new(),
            reason: e.message,
        },
    }
}

/// Map a client error; forget a broken connection so the next call
/// reconnects.
async fn failed(shard: &str, link: &Link, e: ClientError) -> ShardCallError {
    if let ClientError::Shard(err) = &e {
        match err.code {
            ShardErrorCode::MailboxFull => return ShardCallError::MailboxFull,
            ShardErrorCode::MessageTooLarge => return ShardCallError::TooLarge,
            _ => {}
        }
    } else {
        link.forget().await;
    }
    ShardCallError::Unavailable {
        shard: shard.to_string(),
        reason: e.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn busy_backoff_doubles_to_its_cap_and_stops_at_the_budget() {
        let mut b = BusyBackoff::new(1000);
        let mut waits = Vec::new();
        while let Some(w) = b.next_wait() {
            waits.push(w.as_millis() as u64);
        }
        assert_eq!(waits, [10, 20, 40, 80, 160, 200, 200, 200, 90]);
        assert_eq!(waits.iter().sum::<u64>(), 1000);
        assert!(BusyBackoff::new(0).next_wait().is_none());
    }
}
