//! The sessions open on this gateway: whose they are, how many requests
//! each has in flight, which friends each watches (for `ProfileChanged`),
//! what could not be pushed to it, and logins parked until their user's
//! relations are fresh.

use super::LoginOk;
use crate::dedupe::FastMap;
use proto::session::{MsgId, PendingId};

pub(crate) struct Session {
    pub(crate) user: u64,
    /// Requests being worked on (each answered once).
    pub(crate) in_flight: usize,
    /// The credential epoch the session logged in under.
    pub(crate) epoch: u32,
    /// Kicked: no longer the user's session; closed once `Kicked` settles.
    closing: bool,
    closing_after: Option<MsgId>,
    /// Friends whose profile changes this session is told of.
    watching: Vec<u64>,
    /// The highest seq that could not be pushed (its send queue was full).
    missed: Option<u64>,
    /// Per group, the highest group seq that could not be pushed.
    missed_groups: Vec<(u64, u64)>,
}

#[derive(Default)]
pub(crate) struct SessionTable {
    sessions: FastMap<u64, Session>,
    /// A user's current session here.
    users: FastMap<u64, u64>,
    /// Watched user -> sessions watching it.
    watchers: FastMap<u64, Vec<u64>>,
    parked: FastMap<u64, Vec<(PendingId, u64, LoginOk)>>,
}

impl SessionTable {
    pub(crate) fn len(&self) -> usize {
        self.sessions.len()
    }

    pub(crate) fn get(&self, session: u64) -> Option<&Session> {
        self.sessions.get(&session)
    }

    pub(crate) fn session_of(&self, user: u64) -> Option<u64> {
        self.users.get(&user).copied()
    }

    /// Users with a session here.
    pub(crate) fn users(&self) -> Vec<u64> {
        self.users.keys().copied().collect()
    }

    /// A new session of `user`; the session it replaces here, if any.
    pub(crate) fn register(&mut self, session: u64, user: u64, epoch: u32) -> Option<u64> {
        let s = Session {
            user,
            in_flight: 0,
            epoch,
            closing: false,
            closing_after: None,
            watching: Vec::new(),
            missed: None,
            missed_groups: Vec::new(),
        };
        self.sessions.insert(session, s);
        self.users.insert(user, session)
    }

    /// Mark `session` as ending (no longer its user's session); false if it
    /// is gone or ending already.
    pub(crate) fn start_closing(&mut self, session: u64) -> bool {
        let Some(s) = self.sessions.get_mut(&session) else {
            return false;
        };
        if s.closing {
            return false;
        }
        s.closing = true;
        if self.users.get(&s.user) == Some(&session) {
            self.users.remove(&s.user);
        }
        true
    }

    pub(crate) fn close_after(&mut self, session: u64, mid: MsgId) {
        if let Some(s) = self.sessions.get_mut(&session) {
            s.closing_after = Some(mid);
        }
    }

    pub(crate) fn is_close_after(&self, session: u64, mid: MsgId) -> bool {
        self.sessions
            .get(&session)
            .is_some_and(|s| s.closing_after == Some(mid))
    }

    /// The session closed: forget it; its user, if it was open.
    pub(crate) fn remove(&mut self, session: u64) -> Option<u64> {
        let s = self.sessions.remove(&session)?;
        if self.users.get(&s.user) == Some(&session) {
            self.users.remove(&s.user);
        }
        self.unwatch(session, &s.watching);
        Some(s.user)
    }

    pub(crate) fn take_slot(&mut self, session: u64) {
        if let Some(s) = self.sessions.get_mut(&session) {
            s.in_flight += 1;
        }
    }

    pub(crate) fn free_slot(&mut self, session: u64) {
        if let Some(s) = self.sessions.get_mut(&session) {
            s.in_flight = s.in_flight.saturating_sub(1);
        }
    }

    /// `session` watches exactly `friends` from now on.
    pub(crate) fn watch(&mut self, session: u64, friends: Vec<u64>) {
        let Some(s) = self.sessions.get_mut(&session) else {
            return;
        };
        let old = std::mem::replace(&mut s.watching, friends.clone());
        self.unwatch(session, &old);
        for f in friends {
            self.watchers.entry(f).or_default().push(session);
        }
    }

    fn unwatch(&mut self, session: u64, users: &[u64]) {
        for u in users {
            if let Some(list) = self.watchers.get_mut(u) {
                list.retain(|&s| s != session);
                if list.is_empty() {
                    self.watchers.remove(u);
                }
            }
        }
    }

    /// Sessions to tell that `user`'s profile changed: its own and those
    /// watching it.
    pub(crate) fn interested_in(&self, user: u64) -> Vec<u64> {
        let own = self.session_of(user);
        let watching = self.watchers.get(&user).into_iter().flatten().copied();
        own.into_iter().chain(watching).collect()
    }

    pub(crate) fn note_missed(&mut self, session: u64, seq: u64) {
        if let Some(s) = self.sessions.get_mut(&session) {
            s.missed = Some(s.missed.map_or(seq, |m| m.max(seq)));
            metrics::counter!("gateway_pushes_missed_total").increment(1);
        }
    }

    pub(crate) fn take_missed(&mut self, session: u64) -> Option<u64> {
        self.sessions.get_mut(&session)?.missed.take()
    }

    /// A group message could not be pushed to `session` (one entry per
    /// group: a session is in at most `user_groups_max` groups).
    pub(crate) fn note_missed_group(&mut self, session: u64, group: u64, seq: u64) {
        let Some(s) = self.sessions.get_mut(&session) else {
            return;
        };
        metrics::counter!("gateway_pushes_missed_total").increment(1);
        match s.missed_groups.iter_mut().find(|(g, _)| *g == group) {
            Some((_, m)) => *m = (*m).max(seq),
            None => s.missed_groups.push((group, seq)),
        }
    }

    pub(crate) fn take_missed_groups(&mut self, session: u64) -> Vec<(u64, u64)> {
        self.sessions
            .get_mut(&session)
            .map(|s| std::mem::take(&mut s.missed_groups))
            .unwrap_or_default()
    }

    pub(crate) fn park_login(&mut self, pending: PendingId, session: u64, ok: LoginOk) {
        self.parked
            .entry(ok.user)
            .or_default()
            .push((pending, session, ok));
    }

    pub(crate) fn take_parked_logins(&mut self, user: u64) -> Vec<(PendingId, u64, LoginOk)> {
        self.parked.remove(&user).unwrap_or_default()
    }

    /// Every session, forgotten: (session, user).
    pub(crate) fn drain(&mut self) -> Vec<(u64, u64)> {
        self.users.clear();
        self.watchers.clear();
        self.sessions.drain().map(|(id, s)| (id, s.user)).collect()
    }
}
