//! Chat groups in the router: who is in a group (read from the profile
//! service with `GetGroup`, cached within `group_cache_bytes_max`, dropped
//! when profile pushes `GroupChanged` or a call through this gateway
//! changed the group), the membership check of group calls, and the
//! fan-out of a stored group message: one push per member with a session
//! here, and one `GroupForward` per other gateway with members online
//! (docs/PROTOCOL.md §6.7).

use super::{error, Action, Now, Router, Sessions};
use crate::dedupe::{FastMap, Recent};
use proto::{
    app::{self, AppError, AppErrorCode, Call, Delivery, GatewayMessage},
    groups::{is_group, GroupInfo},
    peer::GroupForward,
};
use quick_cache::{unsync::Cache, Weighter};
use std::{
    sync::Arc,
    time::{Duration, Instant},
};

/// A group the profile service does not know (or dissolved) is remembered
/// this long.
pub const UNKNOWN_GROUP_TTL: Duration = Duration::from_secs(10);
/// Groups whose latest invalidated version is remembered.
pub const GROUP_INVALIDATIONS_REMEMBERED: usize = 65_536;
/// Calls waiting for one group's membership at most; beyond, `RateLimited`.
pub const PARKED_CALLS_PER_GROUP_MAX: usize = 1024;

/// Who is in a group, as of `version`.
#[derive(Debug, PartialEq, Eq)]
pub struct GroupMembers {
    pub version: u64,
    /// Sorted.
    pub members: Vec<u64>,
}

impl GroupMembers {
    pub fn from_info(info: &GroupInfo) -> GroupMembers {
        GroupMembers {
            version: info.version,
            members: info.members.iter().map(|m| m.user).collect(),
        }
    }

    pub fn contains(&self, user: u64) -> bool {
        self.members.binary_search(&user).is_ok()
    }
}

#[derive(Clone)]
enum Entry {
    Known(Arc<GroupMembers>),
    Gone { until: Instant },
}

#[derive(Clone)]
struct ByBytes;

impl Weighter<u64, Entry> for ByBytes {
    fn weight(&self, _: &u64, entry: &Entry) -> u64 {
        match entry {
            Entry::Known(g) => 64 + 8 * g.members.len() as u64,
            Entry::Gone { .. } => 32,
        }
    }
}

/// What the cache says of a group.
pub(crate) enum GroupLookup {
    /// Not cached: load it.
    Missing,
    /// `None`: no such group.
    Known(Option<Arc<GroupMembers>>),
}

/// A call that needs the caller's membership, waiting for the group.
struct ParkedCall {
    session: u64,
    id: u32,
    user: u64,
    call: Call,
}

pub(crate) struct GroupCache {
    cache: Cache<u64, Entry, ByBytes>,
    /// Loads in flight, and whether the group changed meanwhile.
    loading: FastMap<u64, bool>,
    requested: Vec<u64>,
    invalidated: Recent<u64, u64>,
    parked: FastMap<u64, Vec<ParkedCall>>,
    /// `GroupChanged` to tell the members here once the group is read
    /// again: its version, and the members before the change.
    announce: FastMap<u64, (u64, Vec<u64>)>,
    /// Stored messages whose group changed after their send was checked:
    /// pushed to the members once the group is read again.
    deferred: FastMap<u64, Vec<Delivery>>,
}

impl GroupCache {
    pub(crate) fn new(bytes_max: usize) -> GroupCache {
        GroupCache {
            cache: Cache::with_weighter(bytes_max / 1024 + 1, bytes_max as u64, ByBytes),
            loading: FastMap::default(),
            requested: Vec::new(),
            invalidated: Recent::new(GROUP_INVALIDATIONS_REMEMBERED),
            parked: FastMap::default(),
            announce: FastMap::default(),
            deferred: FastMap::default(),
        }
    }

    pub(crate) fn lookup(&self, now: Instant, group: u64) -> GroupLookup {
        match self.cache.get(&group) {
            Some(Entry::Known(g)) => GroupLookup::Known(Some(g.clone())),
            Some(Entry::Gone { until }) if *until > now => GroupLookup::Known(None),
            _ => GroupLookup::Missing,
        }
    }

    /// Load `group` (once, however often asked while the load runs).
    pub(crate) fn request(&mut self, group: u64) {
        if self.loading.contains_key(&group) {
            return;
        }
        self.loading.insert(group, false);
        self.requested.push(group);
    }

    pub(crate) fn take_requests(&mut self) -> Vec<u64> {
        std::mem::take(&mut self.requested)
    }

    /// The profile service says `group` is at `version` now: the members
    /// cached before the change, if any.
    pub(crate) fn invalidate(&mut self, group: u64, version: u64) -> Vec<u64> {
        let old = self.drop_entry(group);
        if self.invalidated.get(&group).is_none_or(|v| v < version) {
            self.invalidated.insert(group, version);
        }
        old
    }

    /// A call through this gateway changed `group`: the members cached
    /// before, if any.
    pub(crate) fn drop_entry(&mut self, group: u64) -> Vec<u64> {
        if let Some(stale) = self.loading.get_mut(&group) {
            *stale = true;
        }
        match self.cache.remove(&group) {
            Some((_, Entry::Known(g))) => g.members.clone(),
            _ => Vec::new(),
        }
    }

    pub(crate) fn clear(&mut self) {
        self.cache.clear();
        for stale in self.loading.values_mut() {
            *stale = true;
        }
    }

    fn is_stale(&self, info: &GroupInfo) -> bool {
        self.invalidated
            .get(&info.group)
            .is_some_and(|v| v > info.version)
    }
}

/// Whether `from` may send to the group `g` (`None`: no such group).
pub(crate) fn may_send(g: Option<&GroupMembers>, from: u64) -> Result<(), AppError> {
    match g {
        None => Err(error(AppErrorCode::UnknownUser, "no such group")),
        Some(g) if !g.contains(from) => Err(error(
            AppErrorCode::NotAllowed,
            "you are not a member of this group",
        )),
        Some(_) => Ok(()),
    }
}

/// The group a call needs the caller's membership of, if any.
pub(crate) fn membership_needed(call: &Call) -> Option<u64> {
    match call {
        Call::GroupFetch { group, .. } | Call::GroupAck { group, .. } => Some(*group),
        Call::GroupInfo { group } => Some(*group),
        _ => None,
    }
}

/// `BadRequest` for a group call with a user id.
pub(crate) fn check_ids(call: &Call) -> Result<(), AppError> {
    let group = match call {
        Call::GroupFetch { group, .. }
        | Call::GroupAck { group, .. }
        | Call::GroupInfo { group }
        | Call::GroupInvite { group, .. }
        | Call::GroupAnswerInvite { group, .. }
        | Call::GroupJoin { group }
        | Call::GroupAnswerJoin { group, .. }
        | Call::GroupLeave { group }
        | Call::GroupRemove { group, .. }
        | Call::GroupSetRole { group, .. }
        | Call::GroupTransfer { group, .. }
        | Call::GroupRename { group, .. }
        | Call::GroupDissolve { group } => *group,
        _ => return Ok(()),
    };
    if is_group(group) {
        Ok(())
    } else {
        Err(error(AppErrorCode::BadRequest, "not a group id"))
    }
}

impl Router {
    /// A call that needs `user`'s membership of `group`: dispatched once
    /// the membership is known, refused if it is not one.
    pub(super) fn member_call(
        &mut self,
        now: Now,
        group: u64,
        parked: (u64, u32, u64, Call),
        io: &mut impl Sessions,
    ) {
        let (session, id, user, call) = parked;
        match self.groups.lookup(now.at, group) {
            GroupLookup::Known(g) => match may_send(g.as_deref(), user) {
                Ok(()) => self.dispatch_call(session, id, user, call),
                Err(e) => self.reply(session, id, Err(e), io),
            },
            GroupLookup::Missing => {
                let waiting = self.groups.parked.entry(group).or_default();
                if waiting.len() >= PARKED_CALLS_PER_GROUP_MAX {
                    let e = error(AppErrorCode::RateLimited, "too many calls waiting");
                    return self.reply(session, id, Err(e), io);
                }
                self.sessions.take_slot(session);
                waiting.push(ParkedCall {
                    session,
                    id,
                    user,
                    call,
                });
                self.groups.request(group);
            }
        }
    }

    /// The profile service's answer to a group load (`Ok(None)`: no such
    /// group).
    pub(super) fn on_group(
        &mut self,
        now: Now,
        group: u64,
        result: Result<Option<GroupInfo>, AppError>,
        io: &mut impl Sessions,
    ) {
        let stale = self.groups.loading.remove(&group).unwrap_or(false);
        let info = match result {
            Err(e) => return self.group_failed(now, group, e, io),
            Ok(Some(info)) if stale || self.groups.is_stale(&info) => {
                return self.groups.request(group);
            }
            Ok(None) if stale => return self.groups.request(group),
            Ok(info) => info,
        };
        let entry = match &info {
            Some(info) => Entry::Known(Arc::new(GroupMembers::from_info(info))),
            None => Entry::Gone {
                until: now.at + UNKNOWN_GROUP_TTL,
            },
        };
        self.groups.cache.insert(group, entry);
        for delivery in self.groups.deferred.remove(&group).unwrap_or_default() {
            self.fan_out(now, group, delivery, io);
        }
        self.relations_arrived(now, group, None, io);
        for p in self.groups.parked.remove(&group).unwrap_or_default() {
            self.sessions.free_slot(p.session);
            self.member_call(now, group, (p.session, p.id, p.user, p.call), io);
        }
        if let Some((version, mut told)) = self.groups.announce.remove(&group) {
            if let Some(info) = &info {
                told.extend(info.members.iter().map(|m| m.user));
            }
            self.announce_group(group, version, told, io);
        }
    }

    fn group_failed(&mut self, now: Now, group: u64, e: AppError, io: &mut impl Sessions) {
        if let Some(lost) = self.groups.deferred.remove(&group) {
            // Not pushed: the members find them by seq (§6.7).
            metrics::counter!("gateway_notify_failed_total", "why" => "group")
                .increment(lost.len() as u64);
        }
        self.relations_arrived(now, group, Some(e.clone()), io);
        for p in self.groups.parked.remove(&group).unwrap_or_default() {
            self.sessions.free_slot(p.session);
            self.reply(p.session, p.id, Err(e.clone()), io);
        }
        if let Some((version, told)) = self.groups.announce.remove(&group) {
            self.announce_group(group, version, told, io);
        }
    }

    /// The profile service's push: tell the members here (before and after
    /// the change) once the group is read again.
    pub(super) fn group_changed(&mut self, group: u64, version: u64) {
        let old = self.groups.invalidate(group, version);
        let entry = self
            .groups
            .announce
            .entry(group)
            .or_insert((version, Vec::new()));
        entry.0 = entry.0.max(version);
        entry.1.extend(old);
        self.groups.request(group);
    }

    fn announce_group(
        &mut self,
        group: u64,
        version: u64,
        mut users: Vec<u64>,
        io: &mut impl Sessions,
    ) {
        users.sort_unstable();
        users.dedup();
        let bytes = app::encode(&GatewayMessage::GroupChanged { group, version });
        for user in users {
            if let Some(session) = self.sessions.session_of(user) {
                if io.send(session, bytes.clone()).is_err() {
                    metrics::counter!("gateway_pushes_dropped_total").increment(1);
                }
            }
        }
    }

    /// A group message is stored: push it to the members as this router
    /// knows them now, not when the send was checked (a member removed
    /// meanwhile gets nothing stored after the router learnt of it); if
    /// the group changed and is being read again, once it is.
    pub(super) fn fan_out(
        &mut self,
        now: Now,
        group: u64,
        delivery: Delivery,
        io: &mut impl Sessions,
    ) {
        match self.groups.lookup(now.at, group) {
            GroupLookup::Known(Some(members)) => self.fan_out_to(group, delivery, &members, io),
            GroupLookup::Known(None) => {} // dissolved since
            GroupLookup::Missing => {
                self.groups
                    .deferred
                    .entry(group)
                    .or_default()
                    .push(delivery);
                self.groups.request(group);
            }
        }
    }

    /// Push to every member with a session here (the sender too: its
    /// client places its own message by seq), and hand the others to one
    /// forward per gateway.
    fn fan_out_to(
        &mut self,
        group: u64,
        delivery: Delivery,
        members: &GroupMembers,
        io: &mut impl Sessions,
    ) {
        metrics::counter!("gateway_group_messages_total").increment(1);
        let seq = delivery.seq;
        let push = GatewayMessage::GroupDeliver { group, delivery };
        let bytes = app::encode(&push);
        let mut elsewhere = Vec::new();
        let mut pushed = 0u64;
        for &user in &members.members {
            match self.sessions.session_of(user) {
                Some(session) => {
                    pushed += 1;
                    self.push_group_bytes(session, group, seq, bytes.clone(), io);
                }
                None => elsewhere.push(user),
            }
        }
        metrics::counter!("gateway_group_pushes_total").increment(pushed);
        if elsewhere.is_empty() {
            return;
        }
        let GatewayMessage::GroupDeliver { delivery, .. } = push else {
            unreachable!("built above")
        };
        self.actions.push_back(Action::GroupNotify {
            forward: GroupForward {
                group,
                members: elsewhere,
                delivery,
            },
        });
    }

    /// Another gateway stored a group message for members it believes are
    /// here: how many of them got it.
    pub fn peer_group_forward(&mut self, forward: GroupForward, io: &mut impl Sessions) -> u32 {
        let (group, seq) = (forward.group, forward.delivery.seq);
        let members = forward.members;
        let bytes = app::encode(&GatewayMessage::GroupDeliver {
            group,
            delivery: forward.delivery,
        });
        let mut pushed = 0u32;
        for user in members {
            if let Some(session) = self.sessions.session_of(user) {
                pushed += 1;
                self.push_group_bytes(session, group, seq, bytes.clone(), io);
            }
        }
        metrics::counter!("gateway_group_pushes_total").increment(pushed.into());
        pushed
    }

    /// Push an encoded `GroupDeliver`; one that cannot be queued waits in
    /// the group's mailbox and the session is told `GroupMailboxChanged`
    /// once it reads again.
    fn push_group_bytes(
        &mut self,
        session: u64,
        group: u64,
        seq: u64,
        bytes: Vec<u8>,
        io: &mut impl Sessions,
    ) {
        if io.send(session, bytes).is_err() {
            metrics::counter!("gateway_pushes_dropped_total").increment(1);
            self.sessions.note_missed_group(session, group, seq);
        }
    }
}
