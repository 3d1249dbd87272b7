//! Asking every process of the map at once, each within a deadline, so a
//! dead or stuck process costs one timeout, not one per process.

use super::{
    problems, FollowerLag, GatewayStatus, GroupCount, PresenceReplica, ProfileStatus,
    ReplicaStatus, RoutingStatus, ShardStatus, Snapshot, Totals,
};
use anyhow::Context;
use msgstore::client::{ClientError, ShardClient};
use proto::{
    cluster::{ClusterMap, ShardEntry},
    groups::GROUP_ID_BASE,
    presence::{GatewayInfo, RequestBody as PresenceRequest, ResponseBody as PresenceResponse},
    shard::{RequestBody, ResponseBody, ShardErrorCode, ShardRole},
};
use std::{
    path::Path,
    time::{Duration, Instant},
};
use tokio::{task::JoinHandle, time::timeout_at};

/// Group mailboxes counted per shard at most (one `ListUsers` page): the
/// count stays one cheap request per refresh.
pub const GROUPS_COUNTED_MAX: u32 = 1000;

/// Read the map and ask everything in it.
pub async fn snapshot(path: &Path, timeout: Duration) -> anyhow::Result<Snapshot> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read the cluster map {}", path.display()))?;
    let map =
        ClusterMap::from_toml(&text).with_context(|| format!("cluster map {}", path.display()))?;
    let started = Instant::now();
    let presence = spawn_all(map.presence_replicas(), move |a| probe_presence(a, timeout));
    let profile = spawn_all(map.profile_replicas(), move |a| probe_profile(a, timeout));
    let shards: Vec<_> = map
        .shards
        .iter()
        .map(|s| spawn_all(s.addrs(), move |a| probe_replica(a, timeout)))
        .collect();
    let presence = join_all(presence).await;
    let profile = join_all(profile).await;
    let mut shard_rows = Vec::new();
    for (entry, replicas) in map.shards.iter().zip(shards) {
        shard_rows.push(shard(entry, join_all(replicas).await));
    }
    let mut snapshot = Snapshot {
        map_file: path.display().to_string(),
        map_epoch: map.epoch,
        took_ms: started.elapsed().as_millis() as u64,
        gateways: gateways(&map, &presence),
        totals: totals(&shard_rows),
        presence,
        profile,
        shards: shard_rows,
        problems: Vec::new(),
        all_good: false,
    };
    snapshot.problems = problems::find(&snapshot);
    snapshot.all_good = snapshot.problems.is_empty();
    Ok(snapshot)
}

fn spawn_all<T, F>(addrs: Vec<String>, probe: impl Fn(String) -> F) -> Vec<JoinHandle<T>>
where
    F: std::future::Future<Output = T> + Send + 'static,
    T: Send + 'static,
{
    addrs.into_iter().map(|a| tokio::spawn(probe(a))).collect()
}

async fn join_all<T>(tasks: Vec<JoinHandle<T>>) -> Vec<T> {
    let mut out = Vec::with_capacity(tasks.len());
    for t in tasks {
        out.push(t.await.expect("a probe does not panic"));
    }
    out
}

/// One presence replica: `Stats` and `Gateways`, on two links at once.
async fn probe_presence(addr: String, timeout: Duration) -> PresenceReplica {
    let ask = |body| {
        let addr = addr.clone();
        async move {
            match tokio::time::timeout(timeout, presence::client::request_once(&addr, body)).await {
                Ok(Ok(answer)) => Ok(answer),
                Ok(Err(e)) => Err(e.to_string()),
                Err(_) => Err(no_answer(timeout)),
            }
        }
    };
    let (stats, gateways) =
        tokio::join!(ask(PresenceRequest::Stats), ask(PresenceRequest::Gateways));
    let stats = stats.and_then(|a| match a {
        PresenceResponse::Stats(s) => Ok(s),
        other => Err(format!("unexpected answer to Stats: {other:?}")),
    });
    let gateways = gateways.and_then(|a| match a {
        PresenceResponse::Gateways { gateways } => Ok(gateways),
        other => Err(format!("unexpected answer to Gateways: {other:?}")),
    });
    let error = match (&stats, &gateways) {
        (Err(e), _) => Some(e.clone()),
        (Ok(_), Err(e)) => Some(format!("gateways: {e}")),
        _ => None,
    };
    PresenceReplica {
        addr,
        up: stats.is_ok(),
        error,
        stats: stats.ok(),
        gateways: gateways.ok(),
    }
}

/// One profile process: connect and `Stats` (its role in its group).
async fn probe_profile(addr: String, timeout: Duration) -> ProfileStatus {
    let started = Instant::now();
    let ask = async {
        let client = profile::ProfileClient::connect(addr.clone()).await?;
        client.stats().await
    };
    let result = match tokio::time::timeout(timeout, ask).await {
        Ok(Ok(stats)) => Ok((started.elapsed().as_secs_f64() * 1000.0, stats)),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err(no_answer(timeout)),
    };
    match result {
        Ok((ms, stats)) => ProfileStatus {
            addr,
            up: true,
            error: None,
            ping_ms: Some(ms),
            stats: Some(stats),
        },
        Err(e) => ProfileStatus {
            addr,
            up: false,
            error: Some(e),
            ping_ms: None,
            stats: None,
        },
    }
}

/// One shard process: `Stats`, `GetRouting` and one page of group
/// mailboxes, pipelined on one link; each answer kept if it came in time.
async fn probe_replica(addr: String, timeout: Duration) -> ReplicaStatus {
    let deadline = tokio::time::Instant::now() + timeout;
    let mut status = ReplicaStatus {
        addr: addr.clone(),
        up: false,
        error: None,
        stats: None,
        routing: RoutingStatus::Unknown {
            error: "not asked".into(),
        },
        groups: None,
    };
    let client = match timeout_at(deadline, ShardClient::connect(addr.as_str())).await {
        Ok(Ok(c)) => c,
        Ok(Err(e)) => return down(status, format!("cannot connect: {e}")),
        Err(_) => return down(status, no_answer(timeout)),
    };
    let asks = [
        RequestBody::Stats,
        RequestBody::GetRouting,
        RequestBody::ListUsers {
            start: GROUP_ID_BASE,
            limit: GROUPS_COUNTED_MAX,
        },
    ];
    let mut answers = Vec::new();
    for body in asks {
        answers.push(client.send(body).await);
    }
    let mut answers = answers.into_iter();
    let mut next = || answers.next().expect("one answer per request");
    let stats = answer(next(), deadline, timeout).await;
    let routing = answer(next(), deadline, timeout).await;
    let groups = answer(next(), deadline, timeout).await;
    match stats {
        Ok(ResponseBody::Stats(s)) => {
            status.up = true;
            status.stats = Some(s);
        }
        Ok(ResponseBody::Error(e)) => status.error = Some(format!("{:?}: {}", e.code, e.message)),
        Ok(other) => status.error = Some(format!("unexpected answer to Stats: {other:?}")),
        Err(e) => status.error = Some(e),
    }
    status.routing = routing_status(routing);
    status.groups = group_count(groups);
    status
}

fn down(mut status: ReplicaStatus, error: String) -> ReplicaStatus {
    status.routing = RoutingStatus::Unknown {
        error: error.clone(),
    };
    status.error = Some(error);
    status
}

/// A pipelined answer, waited for until `deadline`.
async fn answer(
    sent: Result<msgstore::client::Pending, ClientError>,
    deadline: tokio::time::Instant,
    timeout: Duration,
) -> Result<ResponseBody, String> {
    let pending = sent.map_err(|e| e.to_string())?;
    match timeout_at(deadline, pending.wait()).await {
        Ok(answer) => answer.map_err(|e| e.to_string()),
        Err(_) => Err(no_answer(timeout)),
    }
}

fn routing_status(answer: Result<ResponseBody, String>) -> RoutingStatus {
    match answer {
        Ok(ResponseBody::Routing(Some(r))) => RoutingStatus::Installed {
            epoch: r.current.epoch,
            target: r.target.map(|t| t.epoch),
        },
        Ok(ResponseBody::Routing(None)) => RoutingStatus::NotInstalled,
        Ok(ResponseBody::Error(e)) if matches!(e.code, ShardErrorCode::NotLeader { .. }) => {
            RoutingStatus::NotLeader
        }
        Ok(ResponseBody::Error(e)) => RoutingStatus::Unknown { error: e.message },
        Ok(other) => RoutingStatus::Unknown {
            error: format!("unexpected answer: {other:?}"),
        },
        Err(error) => RoutingStatus::Unknown { error },
    }
}

fn group_count(answer: Result<ResponseBody, String>) -> Option<GroupCount> {
    match answer {
        Ok(ResponseBody::Users { users, next }) => Some(GroupCount {
            mailboxes: users.len() as u64,
            messages: users.iter().map(|u| u.live_count).sum(),
            complete: next.is_none(),
        }),
        _ => None,
    }
}

fn no_answer(timeout: Duration) -> String {
    format!("no answer within {} ms", timeout.as_millis())
}

/// A shard's row: its replicas, and what its leader (or the standalone
/// shard) tells of the whole shard.
fn shard(entry: &ShardEntry, replicas: Vec<ReplicaStatus>) -> ShardStatus {
    let leader = replicas.iter().find(|r| leads(r));
    let counted = leader.or_else(|| replicas.iter().find(|r| r.up));
    let stats = counted.and_then(|r| r.stats.as_ref());
    ShardStatus {
        id: entry.id.clone(),
        weight: entry.weight,
        replicated: !entry.replicas.is_empty(),
        leader: leader
            .filter(|_| !entry.replicas.is_empty())
            .map(|r| r.addr.clone()),
        routing: match (leader, replicas.first()) {
            (Some(r), _) => r.routing.clone(),
            (None, Some(r)) if entry.replicas.is_empty() => r.routing.clone(),
            _ => RoutingStatus::Unknown {
                error: "no leader".into(),
            },
        },
        mailboxes: stats.map(|s| s.users),
        messages: stats.map(|s| s.live_messages),
        groups: leader.and_then(|r| r.groups),
        replication: leader.map_or_else(Vec::new, |l| lags(l, &replicas)),
        replicas,
    }
}

/// It answers for the shard: a standalone shard, or a group's leader.
pub fn leads(r: &ReplicaStatus) -> bool {
    r.stats
        .as_ref()
        .is_some_and(|s| matches!(s.role, ShardRole::Standalone | ShardRole::Leader))
}

/// The leader's view of every other member's log.
fn lags(leader: &ReplicaStatus, replicas: &[ReplicaStatus]) -> Vec<FollowerLag> {
    let Some(raft) = leader.stats.as_ref().and_then(|s| s.raft.as_ref()) else {
        return Vec::new();
    };
    let addr_of = |id: u64| {
        replicas.iter().find_map(|r| {
            let rid = r.stats.as_ref()?.raft.as_ref()?.id;
            (rid == id).then(|| r.addr.clone())
        })
    };
    raft.matched
        .iter()
        .filter(|p| p.replica != raft.id)
        .map(|p| FollowerLag {
            replica: p.replica,
            addr: addr_of(p.replica),
            matched: p.matched,
            lag: raft.lag_of(p.replica).unwrap_or(0),
        })
        .collect()
}

/// The map's gateways, then those only presence knows, each as the first
/// presence replica that lists it sees it.
fn gateways(map: &ClusterMap, presence: &[PresenceReplica]) -> Vec<GatewayStatus> {
    let seen = |id: u32| -> Option<(&str, &GatewayInfo)> {
        presence.iter().find_map(|p| {
            let g = p.gateways.as_ref()?.iter().find(|g| g.gateway == id)?;
            Some((p.addr.as_str(), g))
        })
    };
    let mut ids: Vec<u32> = map.gateways.iter().map(|g| g.id).collect();
    for p in presence {
        for g in p.gateways.iter().flatten() {
            if !ids.contains(&g.gateway) {
                ids.push(g.gateway);
            }
        }
    }
    ids.into_iter()
        .map(|id| {
            let in_map = map.gateways.iter().find(|g| g.id == id);
            let seen = seen(id);
            GatewayStatus {
                id,
                in_map: in_map.is_some(),
                udp: in_map.map(|g| g.udp.clone()),
                peer: seen.map_or_else(
                    || in_map.map(|g| g.peer.clone()).unwrap_or_default(),
                    |(_, g)| g.peer_addr.clone(),
                ),
                seen_by: seen.map(|(a, _)| a.to_string()),
                connected: seen.map(|(_, g)| g.connected),
                users: seen.map(|(_, g)| g.users),
            }
        })
        .collect()
}

fn totals(shards: &[ShardStatus]) -> Totals {
    let mut t = Totals {
        complete: true,
        ..Totals::default()
    };
    for s in shards {
        t.mailboxes += s.mailboxes.unwrap_or(0);
        t.messages += s.messages.unwrap_or(0);
        let groups = s.groups.unwrap_or_default();
        t.group_mailboxes += groups.mailboxes;
        t.group_messages += groups.messages;
        t.complete &= s.mailboxes.is_some() && s.groups.is_some_and(|g| g.complete);
    }
    t
}
