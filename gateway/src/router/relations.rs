//! What the router knows of users' relations (friends, blocks, disabled,
//! credential epoch), read from the profile service and cached within
//! `relations_cache_bytes_max`; an entry goes when profile pushes
//! `Invalidate` for its user (or at once when a call through this gateway
//! changed it). Who may write to whom, whether a login is still valid and
//! whether an open session was revoked are decided from here.

use super::{error, LoginOk, Now, Router, RouterConfig, Sessions};
use crate::dedupe::{FastMap, FastSet, Recent};
use proto::{
    app::{self, AppError, AppErrorCode, LoginAnswer, LoginError},
    profile::{Relations, GET_PROFILES_MAX},
    session::PendingId,
};
use quick_cache::{unsync::Cache, Weighter};
use std::time::{Duration, Instant};

/// A user the profile service does not know is remembered this long (ids
/// are handed out in order: an unknown id may exist soon).
pub const UNKNOWN_USER_TTL: Duration = Duration::from_secs(10);
/// Users whose latest invalidated version is remembered (to tell a stale
/// read from a fresh one).
pub const INVALIDATIONS_REMEMBERED: usize = 65_536;

#[derive(Clone)]
enum Entry {
    Known(Relations),
    Unknown { until: Instant },
}

#[derive(Clone)]
struct ByBytes;

impl Weighter<u64, Entry> for ByBytes {
    fn weight(&self, _: &u64, entry: &Entry) -> u64 {
        match entry {
            Entry::Known(r) => 64 + 8 * (r.friends.len() + r.blocked.len()) as u64,
            Entry::Unknown { .. } => 32,
        }
    }
}

/// What the cache says of a user.
pub(crate) enum Lookup<'a> {
    /// Not cached: load it.
    Missing,
    /// `None`: no such user.
    Known(Option<&'a Relations>),
}

pub(crate) struct RelationsCache {
    cache: Cache<u64, Entry, ByBytes>,
    /// Loads in flight, and whether the user was invalidated meanwhile.
    loading: FastMap<u64, bool>,
    /// To load, not yet handed out as an action.
    requested: Vec<u64>,
    invalidated: Recent<u64, u64>,
    /// Users online here whose relations could not be checked: tried again
    /// at the next housekeeping.
    revalidate: FastSet<u64>,
}

impl RelationsCache {
    pub(crate) fn new(bytes_max: usize) -> RelationsCache {
        RelationsCache {
            cache: Cache::with_weighter(bytes_max / 256 + 1, bytes_max as u64, ByBytes),
            loading: FastMap::default(),
            requested: Vec::new(),
            invalidated: Recent::new(INVALIDATIONS_REMEMBERED),
            revalidate: FastSet::default(),
        }
    }

    pub(crate) fn lookup(&self, now: Instant, user: u64) -> Lookup<'_> {
        match self.cache.get(&user) {
            Some(Entry::Known(r)) => Lookup::Known(Some(r)),
            Some(Entry::Unknown { until }) if *until > now => Lookup::Known(None),
            _ => Lookup::Missing,
        }
    }

    /// Load `user` (once, however often asked while the load runs).
    pub(crate) fn request(&mut self, user: u64) {
        if self.loading.contains_key(&user) {
            return;
        }
        self.loading.insert(user, false);
        self.requested.push(user);
    }

    /// The loads asked for since the last call, in requests of at most
    /// `GET_PROFILES_MAX` users.
    pub(crate) fn take_requests(&mut self) -> Vec<Vec<u64>> {
        if self.requested.is_empty() {
            return Vec::new();
        }
        let all = std::mem::take(&mut self.requested);
        all.chunks(GET_PROFILES_MAX).map(<[u64]>::to_vec).collect()
    }

    /// Whether `rel` was read before its user's newest invalidation.
    pub(crate) fn is_stale(&self, rel: &Relations) -> bool {
        self.invalidated
            .get(&rel.user)
            .is_some_and(|v| v > rel.version)
    }

    pub(crate) fn insert(&mut self, rel: Relations) {
        if self.is_stale(&rel) {
            return;
        }
        if let Some(Entry::Known(cached)) = self.cache.get(&rel.user) {
            if cached.version > rel.version {
                return;
            }
        }
        self.cache.insert(rel.user, Entry::Known(rel));
    }

    fn insert_unknown(&mut self, now: Instant, user: u64) {
        let until = now + UNKNOWN_USER_TTL;
        self.cache.insert(user, Entry::Unknown { until });
    }

    /// The profile service says `user` is at `version` now.
    pub(crate) fn invalidate(&mut self, user: u64, version: u64) {
        self.cache.remove(&user);
        if self.invalidated.get(&user).is_none_or(|v| v < version) {
            self.invalidated.insert(user, version);
        }
        if let Some(stale) = self.loading.get_mut(&user) {
            *stale = true;
        }
    }

    /// A call through this gateway changed `user`'s relations.
    pub(crate) fn drop_entry(&mut self, user: u64) {
        self.cache.remove(&user);
        if let Some(stale) = self.loading.get_mut(&user) {
            *stale = true;
        }
    }

    /// Anything cached may be stale (the profile link was lost).
    pub(crate) fn clear(&mut self) {
        self.cache.clear();
        for stale in self.loading.values_mut() {
            *stale = true;
        }
    }

    pub(crate) fn take_revalidations(&mut self) -> Vec<u64> {
        self.revalidate.drain().collect()
    }
}

/// Whether `from` may write to `to`, whose relations are `rel` (`None`:
/// no such user). A non-friend and a blocked sender get the same error.
pub(crate) fn may_write(
    rel: Option<&Relations>,
    from: u64,
    to: u64,
    config: &RouterConfig,
) -> Result<(), AppError> {
    let Some(rel) = rel else {
        return Err(error(AppErrorCode::UnknownUser, "no such user"));
    };
    if rel.disabled {
        return Err(error(
            AppErrorCode::RecipientDisabled,
            "the recipient's account is disabled",
        ));
    }
    let friend = rel.friends.binary_search(&from).is_ok();
    let blocked = rel.blocked.binary_search(&from).is_ok();
    if blocked || !(friend || config.allow_strangers || from == to) {
        return Err(error(
            AppErrorCode::NotAllowed,
            "you cannot write to this user",
        ));
    }
    Ok(())
}

fn refusal(code: LoginError, message: &str) -> Vec<u8> {
    app::encode(&LoginAnswer::Refused {
        code,
        message: message.into(),
    })
}

/// Why a login or a session bound to credential epoch `epoch` is no longer
/// valid under `rel`, if it is not.
fn revoked(rel: Option<&Relations>, epoch: u32) -> Option<(LoginError, &'static str)> {
    match rel {
        None => Some((LoginError::WrongCredentials, "no such user")),
        Some(r) if r.disabled => Some((LoginError::AccountDisabled, "account disabled")),
        Some(r) if r.credential_epoch != epoch => Some((
            LoginError::BadToken,
            "the password changed: log in with the new one",
        )),
        Some(_) => None,
    }
}

impl Router {
    pub(super) fn on_relations(
        &mut self,
        now: Now,
        users: Vec<u64>,
        result: Result<Vec<Relations>, AppError>,
        io: &mut impl Sessions,
    ) {
        let mut found: FastMap<u64, Relations> = match result {
            Ok(list) => list.into_iter().map(|r| (r.user, r)).collect(),
            Err(e) => {
                for user in users {
                    self.relations.loading.remove(&user);
                    self.relations_failed(now, user, &e, io);
                }
                return;
            }
        };
        for user in users {
            let stale = self.relations.loading.remove(&user).unwrap_or(false);
            match found.remove(&user) {
                Some(rel) if stale || self.relations.is_stale(&rel) => {
                    self.relations.request(user);
                    continue;
                }
                Some(rel) => self.relations.insert(rel),
                None if stale => {
                    self.relations.request(user);
                    continue;
                }
                None => self.relations.insert_unknown(now.at, user),
            }
            self.relations_known(now, user, io);
        }
    }

    /// `user`'s relations are in the cache: go on with what waited for them.
    fn relations_known(&mut self, now: Now, user: u64, io: &mut impl Sessions) {
        self.relations_arrived(now, user, None, io);
        let epoch_rel = match self.relations.lookup(now.at, user) {
            Lookup::Known(rel) => rel.cloned(),
            Lookup::Missing => return,
        };
        for (pending, session, ok) in self.sessions.take_parked_logins(user) {
            match revoked(epoch_rel.as_ref(), ok.relations.credential_epoch) {
                Some((code, message)) => {
                    self.refuse_checked_login(pending, session, &ok, code, message, io)
                }
                None => self.finish_login(now, pending, session, ok, io),
            }
        }
        if let Some(session) = self.sessions.session_of(user) {
            let epoch = self.sessions.get(session).map_or(0, |s| s.epoch);
            if let Some((_, why)) = revoked(epoch_rel.as_ref(), epoch) {
                tracing::info!(user, why, "session revoked");
                metrics::counter!("gateway_sessions_revoked_total").increment(1);
                io.close(session);
            }
        }
    }

    fn relations_failed(&mut self, now: Now, user: u64, e: &AppError, io: &mut impl Sessions) {
        self.relations_arrived(now, user, Some(e.clone()), io);
        for (pending, session, ok) in self.sessions.take_parked_logins(user) {
            let message = "profile service unavailable; retry";
            self.refuse_checked_login(pending, session, &ok, LoginError::Unavailable, message, io);
        }
        if self.sessions.session_of(user).is_some() {
            self.relations.revalidate.insert(user);
        }
    }

    /// Refuse a login presence was already told of.
    fn refuse_checked_login(
        &mut self,
        pending: PendingId,
        session: u64,
        ok: &LoginOk,
        code: LoginError,
        message: &str,
        io: &mut impl Sessions,
    ) {
        io.reject(pending, &refusal(code, message));
        metrics::counter!("gateway_logins_total", "result" => "refused").increment(1);
        self.actions.push_back(super::Action::Offline {
            user: ok.user,
            session,
        });
    }
}
