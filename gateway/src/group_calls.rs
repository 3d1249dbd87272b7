//! The service work of chat groups (docs/PROTOCOL.md §6.7): paging a
//! group's mailbox, moving a member's cursor (and trimming the mailbox
//! below the lowest cursor), the user's group list with unread counts, the
//! membership calls answered by the profile service, and forwarding a
//! stored group message once to each other gateway with members online.
//! The router checked membership before any of the reads and writes here.

use crate::{
    calls::{fetch_records, from_profile, from_shard, page, with_timeout, CallResult},
    router::CallEffects,
    services::{now_ms, Services, GROUP_EXPIRY_INTERVAL_MS, GROUP_RESEND_WINDOW_MS},
};
use futures_util::future::join_all;
use proto::{
    app::{Call, GroupSummary, Reply},
    groups::UserGroups,
    peer::GroupForward,
};
use std::collections::BTreeMap;

/// Serve a group call; `Err` gives back a call that is not one.
pub async fn serve(
    services: &Services,
    user: u64,
    call: Call,
    effects: &mut CallEffects,
) -> Result<CallResult, Call> {
    let p = &services.profile;
    let changed = changed_group(&call);
    let result = match call {
        Call::GroupFetch {
            group,
            after_seq,
            max_count,
            max_bytes,
        } => {
            tidy_due(services, group).await;
            fetch(services, group, after_seq, max_count, max_bytes).await
        }
        Call::GroupAck { group, up_to_seq } => ack(services, user, group, up_to_seq).await,
        Call::Groups => groups(services, user).await,
        Call::GroupInfo { group } => p
            .get_group(group)
            .await
            .map(Reply::Group)
            .map_err(from_profile),
        Call::GroupCreate { name, topic } => p
            .group_create(user, &name, &topic)
            .await
            .map(Reply::Group)
            .map_err(from_profile),
        Call::GroupInvite { group, username } => match p.lookup(&username).await {
            Ok(invitee) => done(p.group_invite(user, group, invitee).await),
            Err(e) => Err(from_profile(e)),
        },
        Call::GroupAnswerInvite { group, accept } => {
            let read_seq = start_seq(services, group, accept).await;
            done(p.group_answer_invite(user, group, accept, read_seq).await)
        }
        Call::GroupJoin { group } => done(p.group_join_request(user, group).await),
        Call::GroupAnswerJoin {
            group,
            user: joiner,
            accept,
        } => {
            let read_seq = start_seq(services, group, accept).await;
            done(
                p.group_answer_join(user, group, joiner, accept, read_seq)
                    .await,
            )
        }
        Call::GroupLeave { group } => done(p.group_leave(user, group).await),
        Call::GroupRemove { group, user: who } => done(p.group_remove(user, group, who).await),
        Call::GroupSetRole {
            group,
            user: who,
            role,
        } => done(p.group_set_role(user, group, who, role).await),
        Call::GroupTransfer { group, to } => done(p.group_transfer(user, group, to).await),
        Call::GroupRename { group, name, topic } => done(
            p.group_rename(user, group, name.as_deref(), topic.as_deref())
                .await,
        ),
        Call::GroupDissolve { group } => done(p.group_dissolve(user, group).await),
        other => return Err(other),
    };
    if result.is_ok() {
        effects.groups_changed = changed.into_iter().collect();
    }
    Ok(result)
}

/// The group whose members a successful `call` changed.
fn changed_group(call: &Call) -> Option<u64> {
    match call {
        Call::GroupAnswerInvite { group, .. }
        | Call::GroupAnswerJoin { group, .. }
        | Call::GroupLeave { group }
        | Call::GroupRemove { group, .. }
        | Call::GroupDissolve { group } => Some(*group),
        _ => None,
    }
}

fn done<T>(result: Result<T, profile::ClientError>) -> CallResult {
    result.map(|_| Reply::Done).map_err(from_profile)
}

/// A new member's cursor: the group's newest seq, so it reads what is sent
/// from now on (0 if the shard did not answer: it then reads what is
/// kept).
async fn start_seq(services: &Services, group: u64, accept: bool) -> u64 {
    if !accept {
        return 0;
    }
    let stats = with_timeout(services, services.shards.user_stats(group)).await;
    stats.ok().and_then(Result::ok).map_or(0, |s| s.last_seq)
}

/// A page of the group's mailbox. `dropped`: seqs after `after_seq` that
/// are gone (trimmed past retention) before the page's first message, or,
/// on an empty last page, up to the group's newest seq.
///
/// An empty last page is looked at twice: the newest seq is read first,
/// then the page again, so a message stored between the first look and
/// the read of the newest seq is found by the second look instead of being
/// taken for a gap (a member told such a message is gone skips it: the
/// chaos run caught exactly that).
async fn fetch(
    services: &Services,
    group: u64,
    after_seq: u64,
    max_count: u32,
    max_bytes: u32,
) -> CallResult {
    let (mut records, mut more) =
        fetch_records(services, group, after_seq, max_count, max_bytes).await?;
    let mut newest = None;
    if records.is_empty() && !more {
        let stats = services
            .shards
            .user_stats(group)
            .await
            .map_err(from_shard)?;
        newest = Some(stats.last_seq);
        (records, more) = fetch_records(services, group, after_seq, max_count, max_bytes).await?;
    }
    let first = records.first().map(|r| r.seq);
    let (messages, last_seq) = page(group, records);
    let dropped = match (first, newest) {
        (Some(first), _) => first.saturating_sub(after_seq + 1),
        (None, Some(newest)) if !more => newest.saturating_sub(after_seq),
        _ => 0,
    };
    if dropped > 0 {
        metrics::counter!("gateway_group_dropped_shown_total").increment(dropped);
    }
    Ok(Reply::GroupMailbox {
        messages,
        last_seq,
        more,
        dropped,
    })
}

/// Tidy `group`'s mailbox, if this gateway has not in the last
/// `GROUP_EXPIRY_INTERVAL_MS` (after a store, a page or an ack of the
/// group): delete what every member has read (as far as this gateway knows)
/// once it is older than `GROUP_RESEND_WINDOW_MS`, and whatever is past
/// `limits.group_retention_days`. At most two shard requests a minute per
/// group and gateway, whatever the traffic. Best effort: what fails is
/// tried again next time.
pub async fn tidy_due(services: &Services, group: u64) {
    if claim_tidy(services, group) {
        tidy(services, group).await;
    }
}

/// Whether `group`'s mailbox is due a tidy from this gateway; if so it is
/// marked done now (cheap: one cache read, so a store answered on the
/// event loop's task spawns no task for a group that is not due).
pub fn claim_tidy(services: &Services, group: u64) -> bool {
    let now = now_ms();
    let last = services.group_expiries.get(&group).unwrap_or(0);
    if now < last.saturating_add(GROUP_EXPIRY_INTERVAL_MS) {
        return false;
    }
    services.group_expiries.insert(group, now);
    true
}

/// Tidy `group`'s mailbox now (see [`tidy_due`]).
pub async fn tidy(services: &Services, group: u64) {
    let now = now_ms();
    let read_by_all = services.group_trims.get(&group).unwrap_or(0);
    let days = u64::from(services.config.limits.group_retention_days);
    let mut expiries = vec![];
    if read_by_all > 0 {
        expiries.push((now.saturating_sub(GROUP_RESEND_WINDOW_MS), read_by_all));
    }
    if days > 0 {
        expiries.push((now.saturating_sub(days * 86_400_000), u64::MAX));
    }
    for (before_ms, up_to_seq) in expiries {
        let expire = services.shards.expire(group, before_ms, up_to_seq);
        match with_timeout(services, expire).await {
            Ok(Ok(removed)) => {
                metrics::counter!("gateway_group_expired_total").increment(removed);
            }
            _ => {
                services.group_expiries.remove(&group);
            }
        }
    }
}

/// Move the member's cursor, and remember how far every member has read
/// (profile's lowest cursor) for the next tidy of the mailbox.
async fn ack(services: &Services, user: u64, group: u64, up_to_seq: u64) -> CallResult {
    let (_, min_read_seq) = services
        .profile
        .group_read(user, group, up_to_seq)
        .await
        .map_err(from_profile)?;
    if min_read_seq > services.group_trims.get(&group).unwrap_or(0) {
        services.group_trims.insert(group, min_read_seq);
    }
    tidy_due(services, group).await;
    Ok(Reply::Done)
}

/// The user's groups, each with the newest seq of its mailbox (read from
/// the shards concurrently; 0 where a shard did not answer).
async fn groups(services: &Services, user: u64) -> CallResult {
    let UserGroups { groups, invites } = services
        .profile
        .user_groups(user)
        .await
        .map_err(from_profile)?;
    let highs = join_all(groups.iter().map(|g| services.shards.user_stats(g.group))).await;
    let groups = groups
        .into_iter()
        .zip(highs)
        .map(|(g, stats)| GroupSummary {
            group: g.group,
            name: g.name,
            role: g.role,
            members: g.members,
            read_seq: g.read_seq,
            high_seq: stats.map_or(0, |s| s.last_seq),
        })
        .collect();
    Ok(Reply::Groups { groups, invites })
}

/// A stored group message for members with no session here: one forward
/// to each gateway presence says some of them are on. Best effort, like a
/// 1:1 forward: a member who misses the push finds the message by seq.
pub async fn notify(services: &Services, forward: GroupForward) {
    let lookup = with_timeout(services, services.presence.lookup(&forward.members)).await;
    let Ok(Ok(entries)) = lookup else {
        metrics::counter!("gateway_notify_failed_total", "why" => "presence").increment(1);
        return;
    };
    let mut by_gateway: BTreeMap<u32, Vec<u64>> = BTreeMap::new();
    for (&user, entry) in forward.members.iter().zip(entries) {
        match entry {
            Some(e) if e.gateway != services.gateway_id => {
                by_gateway.entry(e.gateway).or_default().push(user)
            }
            _ => {} // offline, or logging in here: it fetches
        }
    }
    let sends = by_gateway.into_iter().map(|(gateway, members)| {
        let one = GroupForward {
            group: forward.group,
            members,
            delivery: forward.delivery.clone(),
        };
        async move {
            metrics::counter!("gateway_group_forwards_total").increment(1);
            let sent = services
                .peers
                .group_forward(&services.presence, gateway, one);
            if with_timeout(services, sent).await.ok().flatten().is_none() {
                metrics::counter!("gateway_notify_failed_total", "why" => "peer").increment(1);
            }
        }
    });
    join_all(sends).await;
}
