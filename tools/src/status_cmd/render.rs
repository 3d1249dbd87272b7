//! A [`Snapshot`] as text for a person: one screen, problems last.

use super::{
    brief, FollowerLag, GatewayStatus, PresenceReplica, ProfileStatus, ReplicaStatus,
    RoutingStatus, ShardStatus, Snapshot, Totals,
};
use proto::shard::ShardRole;
use std::{fmt::Write as _, time::Duration};

pub fn human(s: &Snapshot, watching: Option<Duration>) -> String {
    let mut t = String::new();
    let _ = write!(
        t,
        "cluster map {}: epoch {} (asked everything in {} ms",
        s.map_file, s.map_epoch, s.took_ms
    );
    match watching {
        Some(every) => {
            let _ = writeln!(t, "; every {} s, Ctrl-C stops)", every.as_secs());
        }
        None => t.push_str(")\n"),
    }
    t.push_str("\nPRESENCE\n");
    for p in &s.presence {
        presence(&mut t, p);
    }
    t.push_str("PROFILE\n");
    for p in &s.profile {
        profile(&mut t, p);
    }
    t.push_str("GATEWAYS (their map epochs are not shown)\n");
    if s.gateways.is_empty() {
        t.push_str("  none\n");
    }
    for g in &s.gateways {
        gateway(&mut t, g);
    }
    t.push_str("SHARDS\n");
    for shard in &s.shards {
        shard_rows(&mut t, shard);
    }
    totals(&mut t, &s.totals);
    problems(&mut t, &s.problems);
    t
}

fn or_unknown(e: &Option<String>) -> String {
    brief(e.as_deref().unwrap_or("no answer"))
}

fn profile(t: &mut String, p: &ProfileStatus) {
    let (Some(ms), Some(st)) = (p.ping_ms, &p.stats) else {
        let _ = writeln!(t, "  {:<21} DOWN  {}", p.addr, or_unknown(&p.error));
        return;
    };
    let _ = write!(t, "  {:<21} up    ping {ms:.1} ms", p.addr);
    if let Some(raft) = &st.raft {
        let applied = raft.applied_index.unwrap_or(0);
        let _ = write!(t, ", {:?}, term {}, applied {applied}", st.role, raft.term);
    }
    t.push('\n');
}

fn presence(t: &mut String, p: &PresenceReplica) {
    let Some(st) = &p.stats else {
        let _ = writeln!(t, "  {:<21} DOWN  {}", p.addr, or_unknown(&p.error));
        return;
    };
    let _ = writeln!(
        t,
        "  {:<21} up    {} users online, gateways: {} connected, {} in grace",
        p.addr, st.users_online, st.gateways_connected, st.gateways_in_grace
    );
    if let Some(e) = &p.error {
        let _ = writeln!(t, "  {:<21}       {}", "", brief(e));
    }
}

fn gateway(t: &mut String, g: &GatewayStatus) {
    let state = match g.connected {
        Some(true) => "connected",
        Some(false) => "IN GRACE",
        None => "NOT REGISTERED",
    };
    let _ = write!(
        t,
        "  {:<4} udp {:<21} peer {:<21} {state}",
        g.id,
        g.udp.as_deref().unwrap_or("(not in the map)"),
        g.peer
    );
    let _ = match g.users {
        Some(n) => writeln!(t, ", {n} users"),
        None => writeln!(t),
    };
}

fn shard_rows(t: &mut String, s: &ShardStatus) {
    if !s.replicated {
        let r = &s.replicas[0];
        let _ = write!(t, "  {:<6} {:<21} ", s.id, r.addr);
        replica_state(t, r);
        let _ = writeln!(t, ", {}", counts_and_routing(s));
        return;
    }
    let _ = writeln!(
        t,
        "  {:<6} group of {}, leader {}, {}",
        s.id,
        s.replicas.len(),
        s.leader.as_deref().unwrap_or("NONE"),
        counts_and_routing(s)
    );
    for r in &s.replicas {
        let _ = write!(t, "    {:<25} ", r.addr);
        replica_state(t, r);
        raft(t, r, &s.replication);
        t.push('\n');
    }
    let unreached = s.replication.iter().filter(|f| f.addr.is_none());
    for f in unreached {
        let _ = writeln!(
            t,
            "    replica {} (not reached): lag {} entries",
            f.replica, f.lag
        );
    }
}

fn replica_state(t: &mut String, r: &ReplicaStatus) {
    let Some(stats) = &r.stats else {
        let _ = write!(t, "DOWN  {}", or_unknown(&r.error));
        return;
    };
    let role = match stats.role {
        ShardRole::Standalone => "standalone",
        ShardRole::Leader => "leader",
        ShardRole::Follower => "follower",
        ShardRole::Candidate => "CANDIDATE",
        ShardRole::Learner => "learner",
    };
    let _ = write!(t, "up    {role:<10}");
}

/// A replica's Raft state; a follower's lag as the leader sees it.
fn raft(t: &mut String, r: &ReplicaStatus, lags: &[FollowerLag]) {
    let Some(raft) = r.stats.as_ref().and_then(|s| s.raft.as_ref()) else {
        return;
    };
    let n = |i: Option<u64>| i.map_or("-".to_string(), |i| i.to_string());
    let _ = write!(
        t,
        " term {} log {} committed {} applied {}",
        raft.term,
        n(raft.last_log_index),
        n(raft.committed_index),
        n(raft.applied_index)
    );
    if let Some(f) = lags.iter().find(|f| f.addr.as_deref() == Some(&r.addr)) {
        let _ = write!(t, " lag {}", f.lag);
    }
}

fn counts_and_routing(s: &ShardStatus) -> String {
    let n = |v: Option<u64>| v.map_or("?".to_string(), |v| v.to_string());
    let routing = match &s.routing {
        RoutingStatus::Installed {
            epoch,
            target: Some(to),
        } => format!("routing epoch {epoch} (moving to {to})"),
        RoutingStatus::Installed { epoch, .. } => format!("routing epoch {epoch}"),
        RoutingStatus::NotInstalled => "no routing installed".into(),
        RoutingStatus::NotLeader => "routing: ask the leader".into(),
        RoutingStatus::Unknown { error } => format!("routing unknown ({})", brief(error)),
    };
    let groups = match s.groups {
        Some(g) if g.complete => format!(" ({} groups)", g.mailboxes),
        Some(g) => format!(" (over {} groups)", g.mailboxes),
        None => String::new(),
    };
    format!(
        "{} mailboxes{groups}, {} messages, {routing}",
        n(s.mailboxes),
        n(s.messages)
    )
}

fn totals(t: &mut String, totals: &Totals) {
    let _ = writeln!(
        t,
        "TOTALS {} mailboxes ({} of them groups'), {} messages ({} in groups){}",
        totals.mailboxes,
        totals.group_mailboxes,
        totals.messages,
        totals.group_messages,
        if totals.complete {
            ""
        } else {
            "; INCOMPLETE: a shard did not tell, or has more groups than counted"
        }
    );
}

fn problems(t: &mut String, problems: &[String]) {
    if problems.is_empty() {
        t.push_str("\nall good\n");
        return;
    }
    let _ = writeln!(t, "\nPROBLEMS ({})", problems.len());
    for p in problems {
        let _ = writeln!(t, "  - {p}");
    }
}
