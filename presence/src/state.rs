//! Everything the presence server knows, and every operation on it: the
//! online [`Table`], the gateway table, the watchers, and the events each
//! change produces. No sockets and no clocks: the server passes the time in
//! and routes [`Outgoing`] events to connections.
//!
//! Watchers live apart from the table (most users have none): `watchers`
//! maps a watched user to the sessions watching it, `watching` maps a
//! session to the users it watches (to end them all when the session ends
//! and to enforce the per-session limit).

use crate::table::{Slot, Table, FLAG_MARK, SHARDS};
use proto::presence::{
    Entry, ErrorCode, Event, GatewayInfo, PresenceError, PresenceStats, SessionInfo, Status,
    BATCH_USERS_MAX, PEER_ADDR_BYTES_MAX,
};
use serde::{Deserialize, Serialize};
use std::{
    collections::{HashMap, HashSet},
    time::{Duration, Instant},
};

/// Index of a gateway in the gateway table (what a table slot stores).
pub type GatewayIndex = u16;

/// Most gateways the index type allows.
pub const GATEWAYS_LIMIT: usize = u16::MAX as usize;

/// Limits of the state; the `[limits]` table of the daemon's config.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Limits {
    /// Most users online at once; a new user past it gets `TableFull`.
    pub users_max: usize,
    /// Most sessions watching one user (`WatchersFull` past it).
    pub watchers_per_user_max: usize,
    /// Most users one session watches (`WatchesFull` past it).
    pub watches_per_session_max: usize,
    /// Most (session, watched user) pairs in all (`WatchesFull` past it).
    pub watches_max: usize,
    /// Most users (or sessions) in one request (`BatchTooLarge` past it).
    pub batch_users_max: usize,
    /// Most gateways known at once, connected or in grace (`GatewaysFull`).
    pub gateways_max: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            users_max: 20_000_000,
            watchers_per_user_max: 10_000,
            watches_per_session_max: 10_000,
            watches_max: 100_000_000,
            batch_users_max: BATCH_USERS_MAX,
            gateways_max: 1024,
        }
    }
}

impl Limits {
    pub fn validate(&self) -> Result<(), String> {
        let range = |name: &str, v: usize, hi: usize| {
            if v == 0 || v > hi {
                Err(format!("limits.{name} = {v} is outside 1..={hi}"))
            } else {
                Ok(())
            }
        };
        range("users_max", self.users_max, 1 << 32)?;
        range("watchers_per_user_max", self.watchers_per_user_max, 1 << 20)?;
        range(
            "watches_per_session_max",
            self.watches_per_session_max,
            1 << 20,
        )?;
        range("watches_max", self.watches_max, 1 << 34)?;
        range("batch_users_max", self.batch_users_max, BATCH_USERS_MAX)?;
        range("gateways_max", self.gateways_max, GATEWAYS_LIMIT)
    }
}

/// An event for the connection of gateway `gateway`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outgoing {
    pub gateway: GatewayIndex,
    pub event: Event,
}

struct Gateway {
    id: u32,
    peer_addr: String,
    /// The server's id of its live connection.
    connection: Option<u64>,
    /// When its users go offline, while it has no connection.
    grace_deadline: Option<Instant>,
    /// Written into every slot it sets; flipped by `SyncBegin`.
    mark: bool,
    syncing: bool,
    /// Being expired: no longer reachable by id, its slots are being removed.
    expiring: bool,
    users: u64,
}

/// What [`State::register`] did.
#[derive(Debug, PartialEq, Eq)]
pub struct Registered {
    pub index: GatewayIndex,
    /// The connection this one took over from, to be closed.
    pub replaced_connection: Option<u64>,
}

#[derive(Default)]
struct Counters {
    lookups: u64,
    updates: u64,
    events: u64,
    kicks: u64,
    expired: u64,
}

pub struct State {
    table: Table,
    gateways: Vec<Option<Gateway>>,
    by_id: HashMap<u32, GatewayIndex>,
    watchers: HashMap<u64, Vec<(GatewayIndex, u64)>>,
    watching: HashMap<(GatewayIndex, u64), Vec<u64>>,
    watches: usize,
    limits: Limits,
    grace: Duration,
    counters: Counters,
    events: Vec<Outgoing>,
}

fn error(code: ErrorCode, message: impl Into<String>) -> PresenceError {
    PresenceError {
        code,
        message: message.into(),
    }
}

impl State {
    pub fn new(limits: Limits, grace: Duration) -> Self {
        Self {
            table: Table::new(),
            gateways: Vec::new(),
            by_id: HashMap::new(),
            watchers: HashMap::new(),
            watching: HashMap::new(),
            watches: 0,
            limits,
            grace,
            counters: Counters::default(),
            events: Vec::new(),
        }
    }

    /// Events produced since the last call, oldest first.
    pub fn take_events(&mut self) -> Vec<Outgoing> {
        std::mem::take(&mut self.events)
    }

    pub fn users_online(&self) -> usize {
        self.table.len()
    }

    /// The live connection of a gateway, if any.
    pub fn connection_of(&self, index: GatewayIndex) -> Option<u64> {
        self.gateway(index).and_then(|g| g.connection)
    }

    fn gateway(&self, index: GatewayIndex) -> Option<&Gateway> {
        self.gateways
            .get(usize::from(index))
            .and_then(Option::as_ref)
    }

    fn gateway_mut(&mut self, index: GatewayIndex) -> &mut Gateway {
        self.gateways[usize::from(index)]
            .as_mut()
            .expect("a slot's gateway stays in the table until its slots are gone")
    }

    fn check_batch(&self, len: usize) -> Result<(), PresenceError> {
        if len > self.limits.batch_users_max {
            return Err(error(
                ErrorCode::BatchTooLarge,
                format!(
                    "{len} users in one request; the limit is {}",
                    self.limits.batch_users_max
                ),
            ));
        }
        Ok(())
    }

    /// Make connection `connection` gateway `id`.
    pub fn register(
        &mut self,
        id: u32,
        peer_addr: String,
        connection: u64,
    ) -> Result<Registered, PresenceError> {
        if peer_addr.len() > PEER_ADDR_BYTES_MAX {
            return Err(error(ErrorCode::BadRequest, "peer_addr is too long"));
        }
        if let Some(&index) = self.by_id.get(&id) {
            let g = self.gateway_mut(index);
            g.peer_addr = peer_addr;
            g.grace_deadline = None;
            let replaced_connection = g.connection.replace(connection);
            return Ok(Registered {
                index,
                replaced_connection,
            });
        }
        let free = self.gateways.iter().position(Option::is_none);
        let known = self.gateways.iter().filter(|g| g.is_some()).count();
        if known >= self.limits.gateways_max {
            return Err(error(
                ErrorCode::GatewaysFull,
                format!(
                    "{known} gateways are known; the limit is {}",
                    self.limits.gateways_max
                ),
            ));
        }
        let index = free.unwrap_or(self.gateways.len());
        let gateway = Gateway {
            id,
            peer_addr,
            connection: Some(connection),
            grace_deadline: None,
            mark: false,
            syncing: false,
            expiring: false,
            users: 0,
        };
        if index == self.gateways.len() {
            self.gateways.push(Some(gateway));
        } else {
            self.gateways[index] = Some(gateway);
        }
        let index = GatewayIndex::try_from(index).expect("gateways_max <= GATEWAYS_LIMIT");
        self.by_id.insert(id, index);
        Ok(Registered {
            index,
            replaced_connection: None,
        })
    }

    /// Connection `connection` of gateway `index` ended: its grace period
    /// starts (unless a newer connection took over).
    pub fn disconnected(&mut self, index: GatewayIndex, connection: u64, now: Instant) {
        let grace = self.grace;
        let g = self.gateway_mut(index);
        if g.connection == Some(connection) {
            g.connection = None;
            g.syncing = false;
            g.grace_deadline = Some(now + grace);
        }
    }

    /// The earliest grace deadline, for the server's timer.
    pub fn next_deadline(&self) -> Option<Instant> {
        self.gateways
            .iter()
            .flatten()
            .filter(|g| !g.expiring)
            .filter_map(|g| g.grace_deadline)
            .min()
    }

    /// Gateways whose grace ran out by `now`: they become unreachable by id
    /// and must be expired with [`State::remove_gateway_slots`] shard by
    /// shard, then [`State::finish_expiry`].
    pub fn start_expiries(&mut self, now: Instant) -> Vec<GatewayIndex> {
        let mut due = Vec::new();
        for (index, g) in self.gateways.iter_mut().enumerate() {
            let Some(g) = g else { continue };
            if !g.expiring && g.grace_deadline.is_some_and(|d| d <= now) {
                g.expiring = true;
                if self.by_id.get(&g.id) == Some(&(index as GatewayIndex)) {
                    self.by_id.remove(&g.id);
                }
                due.push(index as GatewayIndex);
            }
        }
        due
    }

    /// Remove the slots of gateway `index` in table shard `shard`, all of
    /// them (`keep_mark: None`) or those not written since the gateway's
    /// last `SyncBegin` (`Some(mark)`: slots whose mark differs). Watchers
    /// are told. Returns how many went.
    pub fn remove_gateway_slots(
        &mut self,
        index: GatewayIndex,
        shard: usize,
        keep_mark: Option<bool>,
    ) -> u64 {
        let stale = |s: &Slot| s.gateway == index && keep_mark.is_none_or(|m| s.mark() != m);
        let users = self.table.users_in_shard(shard, stale);
        let mut removed = 0;
        for user in users {
            let Some(slot) = self.table.get(user).filter(stale) else {
                continue;
            };
            self.remove_slot(&slot);
            removed += 1;
        }
        removed
    }

    /// The gateway's slots are gone: end its sessions' watches, free its
    /// index.
    pub fn finish_expiry(&mut self, index: GatewayIndex) {
        let sessions: Vec<(GatewayIndex, u64)> = self
            .watching
            .keys()
            .filter(|(g, _)| *g == index)
            .copied()
            .collect();
        for (g, session) in sessions {
            self.end_session(g, session);
        }
        let g = self.gateways[usize::from(index)]
            .take()
            .expect("an expiring gateway is in the table");
        assert_eq!(g.users, 0, "every slot of an expired gateway is removed");
    }

    fn entry(&self, slot: &Slot) -> Entry {
        Entry {
            gateway: self.gateway(slot.gateway).map_or(0, |g| g.id),
            session: slot.session,
            since_s: slot.since_s,
            status: Status::from_code(slot.status_code()).unwrap_or(Status::Online),
        }
    }

    fn slot(&self, index: GatewayIndex, user: u64, info: (u64, u32, Status)) -> Slot {
        let (session, since_s, status) = info;
        let mark = self.gateway(index).is_some_and(|g| g.mark);
        Slot {
            user,
            session,
            since_s,
            gateway: index,
            flags: status.code() | if mark { FLAG_MARK } else { 0 },
        }
    }

    /// Remove `slot` (which is in the table), end its session's watches and
    /// tell the user's watchers.
    fn remove_slot(&mut self, slot: &Slot) {
        let removed = self.table.remove(slot.user);
        debug_assert_eq!(removed.as_ref(), Some(slot));
        let g = self.gateway_mut(slot.gateway);
        g.users -= 1;
        if g.expiring {
            self.counters.expired += 1;
        }
        self.end_session(slot.gateway, slot.session);
        self.notify_watchers(slot.user, None);
    }

    /// Write `slot`, replacing whatever session the user had; the replaced
    /// session's gateway is told. Returns the replaced entry.
    fn put_slot(&mut self, slot: Slot) -> Result<Option<Entry>, PresenceError> {
        let previous = self.table.get(slot.user);
        if previous.is_none() && self.table.len() >= self.limits.users_max {
            return Err(error(
                ErrorCode::TableFull,
                format!(
                    "{} users are online; the limit is {}",
                    self.table.len(),
                    self.limits.users_max
                ),
            ));
        }
        let mut replaced = None;
        if let Some(p) = previous {
            self.gateway_mut(p.gateway).users -= 1;
            if (p.gateway, p.session) != (slot.gateway, slot.session) {
                replaced = Some(self.entry(&p));
                self.kick(p.gateway, slot.user, p.session);
            }
        }
        self.table.put(slot);
        self.gateway_mut(slot.gateway).users += 1;
        let entry = self.entry(&slot);
        if previous.map(|p| self.entry(&p)) != Some(entry) {
            self.notify_watchers(slot.user, Some(entry));
        }
        Ok(replaced)
    }

    fn kick(&mut self, index: GatewayIndex, user: u64, session: u64) {
        self.counters.kicks += 1;
        self.end_session(index, session);
        self.push(index, Event::Kicked { user, session });
    }

    fn push(&mut self, gateway: GatewayIndex, event: Event) {
        self.counters.events += 1;
        self.events.push(Outgoing { gateway, event });
    }

    fn notify_watchers(&mut self, user: u64, entry: Option<Entry>) {
        let Some(watchers) = self.watchers.get(&user) else {
            return;
        };
        let mut by_gateway: Vec<(GatewayIndex, Vec<u64>)> = Vec::new();
        for &(g, session) in watchers {
            match by_gateway.iter_mut().find(|(x, _)| *x == g) {
                Some((_, sessions)) => sessions.push(session),
                None => by_gateway.push((g, vec![session])),
            }
        }
        for (g, sessions) in by_gateway {
            self.push(
                g,
                Event::StatusChanged {
                    user,
                    entry,
                    sessions,
                },
            );
        }
    }

    /// `session` of gateway `index` ended: drop its watches.
    fn end_session(&mut self, index: GatewayIndex, session: u64) {
        let Some(users) = self.watching.remove(&(index, session)) else {
            return;
        };
        self.watches -= users.len();
        for user in users {
            self.drop_watcher(user, (index, session));
        }
    }

    fn drop_watcher(&mut self, user: u64, watcher: (GatewayIndex, u64)) {
        if let Some(list) = self.watchers.get_mut(&user) {
            list.retain(|w| *w != watcher);
            if list.is_empty() {
                self.watchers.remove(&user);
            }
        }
    }

    pub fn online(
        &mut self,
        index: GatewayIndex,
        user: u64,
        session: u64,
        status: Status,
        now_s: u32,
    ) -> Result<Option<Entry>, PresenceError> {
        self.counters.updates += 1;
        let since_s = match self.table.get(user) {
            Some(p) if (p.gateway, p.session) == (index, session) => p.since_s,
            _ => now_s,
        };
        let slot = self.slot(index, user, (session, since_s, status));
        self.put_slot(slot)
    }

    pub fn offline(&mut self, index: GatewayIndex, user: u64, session: u64) -> bool {
        self.counters.updates += 1;
        let current = self
            .table
            .get(user)
            .filter(|s| (s.gateway, s.session) == (index, session));
        match current {
            Some(slot) => {
                self.remove_slot(&slot);
                true
            }
            None => {
                self.end_session(index, session);
                false
            }
        }
    }

    pub fn lookup(&mut self, users: &[u64]) -> Result<Vec<Option<Entry>>, PresenceError> {
        self.check_batch(users.len())?;
        self.counters.lookups += users.len() as u64;
        Ok(users
            .iter()
            .map(|&u| self.table.get(u).map(|s| self.entry(&s)))
            .collect())
    }

    /// `session` of gateway `index` watches `users`; all or nothing.
    pub fn watch(
        &mut self,
        index: GatewayIndex,
        session: u64,
        users: &[u64],
    ) -> Result<Vec<Option<Entry>>, PresenceError> {
        self.check_batch(users.len())?;
        let key = (index, session);
        let watched = self.watching.get(&key);
        let mut new: Vec<u64> = Vec::new();
        let mut seen = HashSet::new();
        for &user in users {
            if seen.insert(user) && !watched.is_some_and(|w| w.contains(&user)) {
                new.push(user);
            }
        }
        self.check_watch_limits(watched.map_or(0, Vec::len), &new)?;
        for &user in &new {
            self.watchers.entry(user).or_default().push(key);
        }
        self.watches += new.len();
        self.watching.entry(key).or_default().extend(new);
        self.lookup(users)
    }

    /// Whether a session watching `have` users may watch `new` more.
    fn check_watch_limits(&self, have: usize, new: &[u64]) -> Result<(), PresenceError> {
        if have + new.len() > self.limits.watches_per_session_max {
            return Err(error(
                ErrorCode::WatchesFull,
                format!(
                    "the session would watch {} users; the limit is {}",
                    have + new.len(),
                    self.limits.watches_per_session_max
                ),
            ));
        }
        if self.watches + new.len() > self.limits.watches_max {
            return Err(error(
                ErrorCode::WatchesFull,
                format!(
                    "{} watches in all; the limit is {}",
                    self.watches, self.limits.watches_max
                ),
            ));
        }
        let max = self.limits.watchers_per_user_max;
        if let Some(&full) = new
            .iter()
            .find(|u| self.watchers.get(u).is_some_and(|w| w.len() >= max))
        {
            return Err(error(
                ErrorCode::WatchersFull,
                format!("user {full} has {max} watching sessions, the limit"),
            ));
        }
        Ok(())
    }

    pub fn unwatch(
        &mut self,
        index: GatewayIndex,
        session: u64,
        users: &[u64],
    ) -> Result<u32, PresenceError> {
        self.check_batch(users.len())?;
        let key = (index, session);
        let Some(watched) = self.watching.get_mut(&key) else {
            return Ok(0);
        };
        let before = watched.len();
        let drop: HashSet<u64> = users.iter().copied().collect();
        watched.retain(|u| !drop.contains(u));
        let removed = before - watched.len();
        if watched.is_empty() {
            self.watching.remove(&key);
        }
        self.watches -= removed;
        for &user in &drop {
            self.drop_watcher(user, key);
        }
        Ok(removed as u32)
    }

    /// Start a sync: slots written from now on carry the gateway's new mark.
    pub fn sync_begin(&mut self, index: GatewayIndex) {
        let g = self.gateway_mut(index);
        g.mark = !g.mark;
        g.syncing = true;
    }

    /// Record part of the gateway's complete session list. A user another
    /// gateway holds stays there; the syncing gateway is told to kick it.
    pub fn sync_sessions(
        &mut self,
        index: GatewayIndex,
        sessions: &[SessionInfo],
    ) -> Result<(u32, u32), PresenceError> {
        self.check_batch(sessions.len())?;
        if !self.gateway(index).is_some_and(|g| g.syncing) {
            return Err(error(
                ErrorCode::BadRequest,
                "SyncSessions without SyncBegin",
            ));
        }
        let (mut accepted, mut kicked) = (0, 0);
        for s in sessions {
            let held_elsewhere = self.table.get(s.user).is_some_and(|p| {
                p.gateway != index && self.gateway(p.gateway).is_some_and(|g| !g.expiring)
            });
            if held_elsewhere {
                kicked += 1;
                self.kick(index, s.user, s.session);
                continue;
            }
            let slot = self.slot(index, s.user, (s.session, s.since_s, s.status));
            self.put_slot(slot)?;
            accepted += 1;
        }
        Ok((accepted, kicked))
    }

    /// End a sync; the caller then removes the slots not re-sent with
    /// [`State::remove_gateway_slots`]`(index, shard, Some(mark))` for every
    /// shard. Returns that mark.
    pub fn sync_end(&mut self, index: GatewayIndex) -> Result<bool, PresenceError> {
        let g = self.gateway_mut(index);
        if !g.syncing {
            return Err(error(ErrorCode::BadRequest, "SyncEnd without SyncBegin"));
        }
        g.syncing = false;
        Ok(g.mark)
    }

    pub fn gateways(&self) -> Vec<GatewayInfo> {
        let mut list: Vec<GatewayInfo> = self
            .gateways
            .iter()
            .flatten()
            .filter(|g| !g.expiring)
            .map(|g| GatewayInfo {
                gateway: g.id,
                peer_addr: g.peer_addr.clone(),
                connected: g.connection.is_some(),
                users: g.users,
            })
            .collect();
        list.sort_by_key(|g| g.gateway);
        list
    }

    pub fn stats(&self) -> PresenceStats {
        let live = || self.gateways.iter().flatten().filter(|g| !g.expiring);
        PresenceStats {
            users_online: self.table.len() as u64,
            table_capacity: self.table.capacity() as u64,
            table_bytes: self.table.bytes() as u64,
            gateways_connected: live().filter(|g| g.connection.is_some()).count() as u64,
            gateways_in_grace: live().filter(|g| g.connection.is_none()).count() as u64,
            watched_users: self.watchers.len() as u64,
            watches: self.watches as u64,
            lookups_total: self.counters.lookups,
            updates_total: self.counters.updates,
            events_total: self.counters.events,
            kicks_total: self.counters.kicks,
            expired_users_total: self.counters.expired,
        }
    }

    /// Check the cross-structure invariants (tests; O(everything)).
    pub fn check_invariants(&self) {
        let mut per_gateway = vec![0u64; self.gateways.len()];
        for shard in 0..SHARDS {
            for user in self.table.users_in_shard(shard, |_| true) {
                let slot = self.table.get(user).expect("scanned users are present");
                per_gateway[usize::from(slot.gateway)] += 1;
            }
        }
        for (i, g) in self.gateways.iter().enumerate() {
            let users = g.as_ref().map_or(0, |g| g.users);
            assert_eq!(users, per_gateway[i], "user count of gateway index {i}");
        }
        let pairs: usize = self.watching.values().map(Vec::len).sum();
        let back: usize = self.watchers.values().map(Vec::len).sum();
        assert_eq!(pairs, self.watches);
        assert_eq!(back, self.watches);
        for ((g, session), users) in &self.watching {
            for u in users {
                assert!(self.watchers[u].contains(&(*g, *session)));
            }
        }
    }
}
