//! What is wrong with the cluster, in plain words, from a [`Snapshot`].

use super::{
    brief, gather::leads, PresenceReplica, ProfileStatus, RoutingStatus, ShardStatus, Snapshot,
};
use proto::shard::ShardRole;

/// A follower this many entries behind its leader is a problem.
pub const LAG_ENTRIES_MAX: u64 = 1000;

/// Presence replicas whose users-online counts differ by more than this
/// share of the larger one disagree.
pub const PRESENCE_DISAGREEMENT: f64 = 0.01;

/// Every problem found, in the order the screen shows the processes.
pub fn find(s: &Snapshot) -> Vec<String> {
    let mut out = Vec::new();
    presence(&s.presence, &mut out);
    profile(&s.profile, &mut out);
    gateways(s, &mut out);
    for shard in &s.shards {
        shard_problems(shard, s.map_epoch, &mut out);
    }
    out
}

fn profile(replicas: &[ProfileStatus], out: &mut Vec<String>) {
    for p in replicas.iter().filter(|p| !p.up) {
        out.push(format!(
            "profile {} is down: {}",
            p.addr,
            brief(p.error.as_deref().unwrap_or("no answer"))
        ));
    }
    let roles: Vec<ShardRole> = replicas
        .iter()
        .filter_map(|p| Some(p.stats.as_ref()?.role))
        .collect();
    let grouped = replicas.len() > 1 || roles.iter().any(|r| *r != ShardRole::Standalone);
    if grouped && !roles.contains(&ShardRole::Leader) {
        out.push(
            "the profile group has no leader: sign-ups, profile changes and logins fail".into(),
        );
    }
}

fn presence(replicas: &[PresenceReplica], out: &mut Vec<String>) {
    for p in replicas.iter().filter(|p| !p.up) {
        out.push(format!(
            "presence {} is down: {}",
            p.addr,
            brief(p.error.as_deref().unwrap_or("no answer"))
        ));
    }
    let counts: Vec<(&str, u64)> = replicas
        .iter()
        .filter_map(|p| Some((p.addr.as_str(), p.stats?.users_online)))
        .collect();
    let low = counts.iter().min_by_key(|(_, n)| *n);
    let high = counts.iter().max_by_key(|(_, n)| *n);
    if let (Some((la, ln)), Some((ha, hn))) = (low, high) {
        if (hn - ln) as f64 > *hn as f64 * PRESENCE_DISAGREEMENT {
            out.push(format!(
                "presence replicas disagree on users online: {ha} has {hn}, {la} has {ln}"
            ));
        }
    }
}

fn gateways(s: &Snapshot, out: &mut Vec<String>) {
    for p in &s.presence {
        let Some(list) = &p.gateways else { continue };
        if list.is_empty() {
            out.push(format!(
                "no gateway is registered with presence {}: clients cannot log in",
                p.addr
            ));
        }
        for g in list.iter().filter(|g| !g.connected) {
            out.push(format!(
                "gateway {} ({}) is in grace on presence {}: its connection is gone, \
                 its users go offline when the grace period ends",
                g.gateway, g.peer_addr, p.addr
            ));
        }
    }
    if s.presence.iter().all(|p| p.gateways.is_none()) {
        return; // nothing known of the gateways
    }
    for g in s
        .gateways
        .iter()
        .filter(|g| g.in_map && g.seen_by.is_none())
    {
        out.push(format!(
            "gateway {} ({}) is in the map but not registered with presence: is it down?",
            g.id,
            g.udp.as_deref().unwrap_or("?")
        ));
    }
}

fn shard_problems(shard: &ShardStatus, map_epoch: u64, out: &mut Vec<String>) {
    for r in shard.replicas.iter().filter(|r| !r.up) {
        let what = if shard.replicated { "replica " } else { "" };
        out.push(format!(
            "shard {} {what}{} is down: {}",
            shard.id,
            r.addr,
            brief(r.error.as_deref().unwrap_or("no answer"))
        ));
    }
    if shard.replicated {
        leaders(shard, out);
        lags(shard, out);
    }
    routing(shard, map_epoch, out);
}

/// A group with no leader, two, or replicas naming different leaders.
fn leaders(shard: &ShardStatus, out: &mut Vec<String>) {
    let up: Vec<_> = shard.replicas.iter().filter(|r| r.up).collect();
    if up.is_empty() {
        return; // each replica was reported down
    }
    let leaders: Vec<String> = up
        .iter()
        .filter(|r| leads(r))
        .map(|r| {
            let term = r
                .stats
                .as_ref()
                .and_then(|s| s.raft.as_ref())
                .map(|r| r.term);
            format!("{} (term {})", r.addr, term.unwrap_or(0))
        })
        .collect();
    match leaders.len() {
        0 => out.push(format!(
            "shard {} has no leader: its writes and reads fail until one is elected \
             (is a majority of its replicas up?)",
            shard.id
        )),
        1 => {}
        n => out.push(format!(
            "shard {} has {n} leaders: {}",
            shard.id,
            leaders.join(", ")
        )),
    }
    let mut named: Vec<u64> = up.iter().filter_map(|r| r.stats.as_ref()?.leader).collect();
    named.sort_unstable();
    named.dedup();
    if named.len() > 1 {
        out.push(format!(
            "shard {}: its replicas disagree on the leader (they name replicas {named:?})",
            shard.id
        ));
    }
    for r in up.iter().filter(|r| {
        r.stats
            .as_ref()
            .is_some_and(|s| matches!(s.role, ShardRole::Standalone))
    }) {
        out.push(format!(
            "shard {}: {} is listed as a replica but runs standalone",
            shard.id, r.addr
        ));
    }
}

fn lags(shard: &ShardStatus, out: &mut Vec<String>) {
    for f in shard.replication.iter().filter(|f| f.lag > LAG_ENTRIES_MAX) {
        out.push(format!(
            "shard {}: replica {}{} lags the leader by {} entries",
            shard.id,
            f.replica,
            f.addr
                .as_ref()
                .map(|a| format!(" ({a})"))
                .unwrap_or_default(),
            f.lag
        ));
    }
}

fn routing(shard: &ShardStatus, map_epoch: u64, out: &mut Vec<String>) {
    let answering = match shard.replicated {
        true => shard.leader.as_deref(),
        false => shard
            .replicas
            .first()
            .filter(|r| r.up)
            .map(|r| r.addr.as_str()),
    };
    let epoch = match (&shard.routing, answering) {
        (RoutingStatus::Installed { epoch, .. }, _) => *epoch,
        (RoutingStatus::Unknown { error }, Some(addr)) => {
            out.push(format!(
                "shard {} ({addr}) did not tell the map it routes by: {}",
                shard.id,
                brief(error)
            ));
            return;
        }
        _ => return,
    };
    if epoch < map_epoch {
        out.push(format!(
            "shard {} routes by map epoch {epoch}, older than the map's {map_epoch} \
             (an unfinished rebalance? `imctl rebalance status`)",
            shard.id
        ));
    } else if epoch > map_epoch {
        out.push(format!(
            "shard {} routes by map epoch {epoch}, newer than the map's {map_epoch}: \
             this map file is out of date",
            shard.id
        ));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::status_cmd::{FollowerLag, ReplicaStatus, Totals};
    use proto::{
        presence::{GatewayInfo, PresenceStats},
        shard::{RaftStats, ShardStats},
    };

    fn presence(addr: &str, users_online: u64, connected: bool) -> PresenceReplica {
        PresenceReplica {
            addr: addr.into(),
            up: true,
            error: None,
            stats: Some(PresenceStats {
                users_online,
                ..PresenceStats::default()
            }),
            gateways: Some(vec![GatewayInfo {
                gateway: 1,
                peer_addr: "g1".into(),
                connected,
                users: users_online,
            }]),
        }
    }

    fn replica(addr: &str, role: ShardRole, term: u64) -> ReplicaStatus {
        ReplicaStatus {
            addr: addr.into(),
            up: true,
            error: None,
            stats: Some(ShardStats {
                role,
                raft: Some(RaftStats {
                    term,
                    ..RaftStats::default()
                }),
                ..ShardStats::default()
            }),
            routing: RoutingStatus::NotLeader,
            groups: None,
        }
    }

    fn group(replicas: Vec<ReplicaStatus>, routing: RoutingStatus) -> ShardStatus {
        ShardStatus {
            id: "g1".into(),
            weight: 1,
            replicated: true,
            leader: replicas.iter().find(|r| leads(r)).map(|r| r.addr.clone()),
            replicas,
            routing,
            mailboxes: None,
            messages: None,
            groups: None,
            replication: vec![FollowerLag {
                replica: 3,
                addr: None,
                matched: Some(10),
                lag: 1001,
            }],
        }
    }

    fn snapshot(presence: Vec<PresenceReplica>, shards: Vec<ShardStatus>) -> Snapshot {
        Snapshot {
            map_file: "map".into(),
            map_epoch: 4,
            took_ms: 0,
            presence,
            profile: vec![ProfileStatus {
                addr: "p".into(),
                up: true,
                error: None,
                ping_ms: Some(1.0),
                stats: None,
            }],
            gateways: Vec::new(),
            shards,
            totals: Totals::default(),
            problems: Vec::new(),
            all_good: false,
        }
    }

    #[test]
    fn each_kind_of_trouble_is_named() {
        let leaders = vec![
            replica("a", ShardRole::Leader, 2),
            replica("b", ShardRole::Leader, 3),
        ];
        let old_routing = RoutingStatus::Installed {
            epoch: 3,
            target: None,
        };
        let s = snapshot(
            vec![presence("p1", 1000, true), presence("p2", 1011, false)],
            vec![group(leaders, old_routing)],
        );
        let found = find(&s);
        let expect = [
            "presence replicas disagree on users online: p2 has 1011, p1 has 1000",
            "gateway 1 (g1) is in grace on presence p2",
            "shard g1 has 2 leaders: a (term 2), b (term 3)",
            "shard g1: replica 3 lags the leader by 1001 entries",
            "shard g1 routes by map epoch 3, older than the map's 4",
        ];
        for e in expect {
            assert!(
                found.iter().any(|p| p.starts_with(e)),
                "{e:?} in {found:#?}"
            );
        }
        assert_eq!(found.len(), expect.len(), "{found:#?}");
    }

    /// A profile group with a replica down and none leading says both; one
    /// leading is all good.
    #[test]
    fn a_profile_group_without_a_leader_is_named() {
        let member = |addr: &str, role: Option<ShardRole>| ProfileStatus {
            addr: addr.into(),
            up: role.is_some(),
            error: role.is_none().then(|| "connection refused".into()),
            ping_ms: role.map(|_| 1.0),
            stats: role.map(|role| proto::profile::ProfileStats {
                role,
                leader: None,
                raft: Some(RaftStats::default()),
            }),
        };
        let mut s = snapshot(vec![presence("p1", 10, true)], Vec::new());
        s.profile = vec![
            member("r1", Some(ShardRole::Follower)),
            member("r2", None),
            member("r3", Some(ShardRole::Candidate)),
        ];
        let found = find(&s);
        assert_eq!(
            found,
            [
                "profile r2 is down: connection refused",
                "the profile group has no leader: sign-ups, profile changes and logins fail",
            ],
            "{found:#?}"
        );
        s.profile[0] = member("r1", Some(ShardRole::Leader));
        let found = find(&s);
        assert_eq!(found, ["profile r2 is down: connection refused"]);
    }

    #[test]
    fn a_healthy_cluster_has_no_problems_and_no_leader_is_one() {
        let healthy = vec![
            replica("a", ShardRole::Leader, 2),
            replica("b", ShardRole::Follower, 2),
        ];
        let mut shard = group(healthy, RoutingStatus::NotInstalled);
        shard.replication[0].lag = 1000;
        let s = snapshot(
            vec![presence("p1", 1000, true), presence("p2", 1010, true)],
            vec![shard],
        );
        assert_eq!(find(&s), Vec::<String>::new());

        let leaderless = vec![replica("b", ShardRole::Candidate, 5)];
        let shard = group(leaderless, RoutingStatus::NotLeader);
        let mut s = snapshot(vec![presence("p1", 0, true)], vec![shard]);
        s.presence[0].gateways = Some(Vec::new());
        let found = find(&s);
        assert!(
            found[0].starts_with("no gateway is registered"),
            "{found:?}"
        );
        assert!(found[1].starts_with("shard g1 has no leader"), "{found:?}");
    }
}
