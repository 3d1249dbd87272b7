//! Write operations, applied by the writer thread inside a write
//! transaction. Each checks everything it needs before it writes, and runs
//! in a nested transaction that is aborted on error: a failed operation
//! leaves nothing behind.

use super::{
    groups::GroupOp,
    records::{decode, encode, AccountRecord, BlocksRecord, FriendsRecord, ProfileRecord},
    request_key, Store, META_NEXT_USER,
};
use crate::{error::Error, Result};
use heed::RwTxn;
use proto::{
    groups::GroupInfo,
    profile::{AvatarHash, Event, UserId},
};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};

/// One change the writer applies. Text fields are already validated.
/// (Serialized: a replicated profile carries ops in its Raft entries.)
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum WriteOp {
    CreateUser {
        username: String,
        phc: String,
    },
    SetPassword {
        user: UserId,
        phc: String,
    },
    SetDisabled {
        user: UserId,
        disabled: bool,
    },
    SetProfile {
        user: UserId,
        nickname: Option<String>,
        signature: Option<String>,
    },
    SetAvatar {
        user: UserId,
        hash: AvatarHash,
        image: Vec<u8>,
    },
    FriendRequest {
        from: UserId,
        to: UserId,
        group: String,
    },
    FriendAccept {
        user: UserId,
        from: UserId,
        group: String,
    },
    FriendReject {
        user: UserId,
        from: UserId,
    },
    FriendRemove {
        user: UserId,
        friend: UserId,
    },
    FriendMove {
        user: UserId,
        friend: UserId,
        group: String,
    },
    ImportFriendships {
        group: String,
        pairs: Vec<(UserId, UserId)>,
    },
    Block {
        user: UserId,
        blocked: UserId,
    },
    Unblock {
        user: UserId,
        blocked: UserId,
    },
    /// Record `login_ns` as the user's last login if it is greater than
    /// the one recorded ([`Outcome::Stale`] otherwise).
    ClaimLogin {
        user: UserId,
        login_ns: u64,
    },
    /// A chat group write (`store/groups.rs`).
    Group(GroupOp),
    /// [`WriteOp::ClaimLogin`] recorded with `claim`: the same `login_ns`
    /// and `claim` again is done again, changing nothing (a claim sent to
    /// a second replica after the first did not answer). Appended last:
    /// Raft entries written before it keep their variant numbers.
    ClaimLoginOnce {
        user: UserId,
        login_ns: u64,
        claim: u64,
    },
}

/// What a successful op returns.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Outcome {
    User(UserId),
    Version(u64),
    Done,
    /// A login not newer than this one, the user's last (nothing written).
    Stale(u64),
    /// A group as its creation left it.
    Group(Box<GroupInfo>),
    /// A member's cursor after a read, and the group's lowest cursor.
    Read {
        read_seq: u64,
        min_read_seq: u64,
    },
}

/// What an op changed, as the events to publish after the commit, in the
/// order they happened: `Invalidate` for a user whose version grew,
/// `GroupChanged` for a group whose version grew.
pub type Changes = Vec<Event>;

/// The wall clock in ms since the Unix epoch.
pub(crate) fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// `meta` key of the clock of the write transaction being applied (u64 BE
/// ms): set by whoever applies a batch (the writer thread: its own clock;
/// a replica: the leader's, carried in the entry), read by every op that
/// records a time, so replicas applying the same entry store the same.
pub(crate) const META_CLOCK: &[u8] = b"clock_ms";

impl Store {
    /// Set the clock the ops applied next in `txn` record.
    pub(crate) fn set_clock(&self, txn: &mut RwTxn, ms: u64) -> Result<()> {
        Ok(self.meta.put(txn, META_CLOCK, &ms.to_be_bytes())?)
    }

    /// The clock set for `txn` ([`Store::set_clock`]).
    pub(crate) fn clock_ms(&self, txn: &RwTxn) -> Result<u64> {
        match self.meta.get(txn, META_CLOCK)? {
            Some(b) => {
                Ok(u64::from_be_bytes(b.try_into().map_err(|_| {
                    Error::Corrupt("clock_ms is not 8 bytes".into())
                })?))
            }
            None => Err(Error::Corrupt("no clock set for this write".into())),
        }
    }

    /// Apply `ops` in `wtxn` at clock `now_ms`, each in a nested
    /// transaction of its own (one failing leaves the others), pushing what
    /// they changed to `changes`; one result per op. `Err` only for a
    /// storage failure, after which `wtxn` must be aborted. The writer
    /// thread and a replica's state machine both apply through this.
    pub(crate) fn apply_ops(
        &self,
        wtxn: &mut RwTxn,
        ops: Vec<WriteOp>,
        now_ms: u64,
        changes: &mut Changes,
    ) -> Result<Vec<Result<Outcome>>> {
        self.set_clock(wtxn, now_ms)?;
        let mut results = Vec::with_capacity(ops.len());
        for op in ops {
            let mut op_changes = Changes::new();
            let mut nested = self.env.nested_write_txn(wtxn)?;
            match self.apply(&mut nested, op, &mut op_changes) {
                Ok(outcome) => {
                    nested.commit()?;
                    changes.extend(op_changes);
                    results.push(Ok(outcome));
                }
                Err(e) => {
                    nested.abort();
                    if matches!(e, Error::Lmdb(_) | Error::Io(_)) {
                        return Err(e);
                    }
                    results.push(Err(e));
                }
            }
        }
        Ok(results)
    }

    /// Apply `op` in `txn`; the users it changed are pushed to `changes`.
    pub(crate) fn apply(
        &self,
        txn: &mut RwTxn,
        op: WriteOp,
        changes: &mut Changes,
    ) -> Result<Outcome> {
        match op {
            WriteOp::CreateUser { username, phc } => self.create_user(txn, username, phc),
            WriteOp::SetPassword { user, phc } => {
                self.update_credentials(txn, user, changes, |a| {
                    a.phc = phc;
                    true
                })
            }
            WriteOp::SetDisabled { user, disabled } => {
                self.update_credentials(txn, user, changes, |a| {
                    std::mem::replace(&mut a.disabled, disabled) != disabled
                })
            }
            WriteOp::SetProfile {
                user,
                nickname,
                signature,
            } => self.set_profile(txn, user, nickname, signature, changes),
            WriteOp::SetAvatar { user, hash, image } => {
                self.set_avatar(txn, user, hash, &image, changes)
            }
            WriteOp::FriendRequest { from, to, group } => {
                self.friend_request(txn, from, to, &group, changes)
            }
            WriteOp::FriendAccept { user, from, group } => {
                self.friend_accept(txn, user, from, &group, changes)
            }
            WriteOp::FriendReject { user, from } => {
                if !self.requests.delete(txn, &request_key(user, from))? {
                    return Err(Error::NotFound(format!(
                        "friend request from {from} to {user}"
                    )));
                }
                self.bump(txn, user, changes)
            }
            WriteOp::FriendRemove { user, friend } => {
                self.friend_remove(txn, user, friend, changes)
            }
            WriteOp::FriendMove {
                user,
                friend,
                group,
            } => self.friend_move(txn, user, friend, &group, changes),
            WriteOp::ImportFriendships { group, pairs } => {
                self.import_friendships(txn, &group, &pairs, changes)
            }
            WriteOp::Block { user, blocked } => self.block(txn, user, blocked, changes),
            WriteOp::Unblock { user, blocked } => self.unblock(txn, user, blocked, changes),
            WriteOp::ClaimLogin { user, login_ns } => self.claim_login(txn, user, login_ns, None),
            WriteOp::ClaimLoginOnce {
                user,
                login_ns,
                claim,
            } => self.claim_login(txn, user, login_ns, Some(claim)),
            WriteOp::Group(op) => self.apply_group(txn, op, changes),
        }
    }

    /// The user's version does not change (nothing a cache holds did).
    /// `claim`: the same `login_ns` claimed with the same number again is
    /// done again (see [`WriteOp::ClaimLoginOnce`]).
    fn claim_login(
        &self,
        txn: &mut RwTxn,
        user: UserId,
        login_ns: u64,
        claim: Option<u64>,
    ) -> Result<Outcome> {
        if self.accounts.get(txn, &user)?.is_none() {
            return Err(Error::not_found_user(user));
        }
        let last = match self.logins.get(txn, &user)? {
            Some(b) => LastLogin::decode(b).ok_or_else(|| {
                Error::Corrupt(format!("last login of user {user}: {} bytes", b.len()))
            })?,
            None => LastLogin::default(),
        };
        if login_ns == last.login_ns && claim.is_some() && claim == last.claim {
            return Ok(Outcome::Done); // this very claim, sent again
        }
        if login_ns <= last.login_ns {
            return Ok(Outcome::Stale(last.login_ns));
        }
        let now = LastLogin { login_ns, claim };
        self.logins.put(txn, &user, &now.encode())?;
        Ok(Outcome::Done)
    }

    fn create_user(&self, txn: &mut RwTxn, username: String, phc: String) -> Result<Outcome> {
        if self.usernames.get(txn, &username)?.is_some() {
            return Err(Error::UsernameTaken(username));
        }
        let user = match self.meta.get(txn, META_NEXT_USER)? {
            Some(b) => u64::from_be_bytes(
                b.try_into()
                    .map_err(|_| Error::Corrupt("next_user_id is not 8 bytes".into()))?,
            ),
            None => 1,
        };
        self.meta
            .put(txn, META_NEXT_USER, &(user + 1).to_be_bytes())?;
        self.usernames.put(txn, &username, &user)?;
        let account = AccountRecord {
            username: username.clone(),
            phc,
            disabled: false,
            created_ms: self.clock_ms(txn)?,
        };
        self.accounts.put(txn, &user, &encode(&account)?)?;
        let profile = ProfileRecord {
            username,
            version: 1,
            ..ProfileRecord::default()
        };
        self.profiles.put(txn, &user, &encode(&profile)?)?;
        Ok(Outcome::User(user))
    }

    /// Apply `f` to `user`'s account; if it says the credentials changed
    /// (a new password, `disabled` flipped), write the account, increment
    /// the credential epoch (revoking every resume token of the user) and
    /// bump the version, so caches holding the old epoch are invalidated.
    fn update_credentials(
        &self,
        txn: &mut RwTxn,
        user: UserId,
        changes: &mut Changes,
        f: impl FnOnce(&mut AccountRecord) -> bool,
    ) -> Result<Outcome> {
        let mut a: AccountRecord = match self.accounts.get(txn, &user)? {
            Some(b) => decode("account", b)?,
            None => return Err(Error::not_found_user(user)),
        };
        if !f(&mut a) {
            return Ok(Outcome::Done);
        }
        let p = self.profile_rw(txn, user)?;
        // Wrapping: an old token matches again only after 2^32 changes.
        let epoch = self.epoch_in(txn, user)?.wrapping_add(1);
        self.accounts.put(txn, &user, &encode(&a)?)?;
        self.auth.put(txn, &user, &epoch.to_be_bytes())?;
        self.put_profile(txn, user, p, changes)?;
        Ok(Outcome::Done)
    }

    pub(super) fn profile_rw(&self, txn: &RwTxn, user: UserId) -> Result<ProfileRecord> {
        self.profile_in(txn, user)?
            .ok_or_else(|| Error::not_found_user(user))
    }

    /// Write `p` with its version increased; the new version.
    fn put_profile(
        &self,
        txn: &mut RwTxn,
        user: UserId,
        mut p: ProfileRecord,
        changes: &mut Changes,
    ) -> Result<u64> {
        p.version += 1;
        self.profiles.put(txn, &user, &encode(&p)?)?;
        changes.push(Event::Invalidate {
            user,
            version: p.version,
        });
        Ok(p.version)
    }

    pub(super) fn bump(
        &self,
        txn: &mut RwTxn,
        user: UserId,
        changes: &mut Changes,
    ) -> Result<Outcome> {
        let p = self.profile_rw(txn, user)?;
        Ok(Outcome::Version(self.put_profile(txn, user, p, changes)?))
    }

    fn set_profile(
        &self,
        txn: &mut RwTxn,
        user: UserId,
        nickname: Option<String>,
        signature: Option<String>,
        changes: &mut Changes,
    ) -> Result<Outcome> {
        let mut p = self.profile_rw(txn, user)?;
        if let Some(n) = nickname {
            p.nickname = n;
        }
        if let Some(s) = signature {
            p.signature = s;
        }
        Ok(Outcome::Version(self.put_profile(txn, user, p, changes)?))
    }

    fn avatar_refs_add(&self, txn: &mut RwTxn, hash: &AvatarHash, delta: i64) -> Result<u64> {
        let count = match self.avatar_refs.get(txn, hash)? {
            Some(b) => u64::from_be_bytes(
                b.try_into()
                    .map_err(|_| Error::Corrupt("avatar reference count is not 8 bytes".into()))?,
            ),
            None => 0,
        };
        let count = count.saturating_add_signed(delta);
        if count == 0 {
            self.avatar_refs.delete(txn, hash)?;
            self.avatars.delete(txn, hash)?;
        } else {
            self.avatar_refs.put(txn, hash, &count.to_be_bytes())?;
        }
        Ok(count)
    }

    fn set_avatar(
        &self,
        txn: &mut RwTxn,
        user: UserId,
        hash: AvatarHash,
        image: &[u8],
        changes: &mut Changes,
    ) -> Result<Outcome> {
        let mut p = self.profile_rw(txn, user)?;
        if p.avatar == Some(hash) {
            return Ok(Outcome::Version(p.version));
        }
        if self.avatar_refs_add(txn, &hash, 1)? == 1 {
            self.avatars.put(txn, &hash, image)?;
        }
        if let Some(old) = p.avatar.replace(hash) {
            self.avatar_refs_add(txn, &old, -1)?;
        }
        Ok(Outcome::Version(self.put_profile(txn, user, p, changes)?))
    }

    fn friends_rw(&self, txn: &RwTxn, user: UserId) -> Result<FriendsRecord> {
        self.friends_in(txn, user)
    }

    /// Whether `f` may take one more friend into `group`.
    fn check_room(&self, user: UserId, f: &FriendsRecord, group: &str) -> Result<()> {
        if f.count() >= self.limits.friends_max {
            return Err(Error::LimitReached(format!(
                "user {user} has {} friends (friends_max)",
                self.limits.friends_max
            )));
        }
        if f.would_add_group(group) && f.groups.len() >= self.limits.groups_max {
            return Err(Error::LimitReached(format!(
                "user {user} has {} groups (groups_max)",
                self.limits.groups_max
            )));
        }
        Ok(())
    }

    fn friend_request(
        &self,
        txn: &mut RwTxn,
        from: UserId,
        to: UserId,
        group: &str,
        changes: &mut Changes,
    ) -> Result<Outcome> {
        if from == to {
            return Err(Error::InvalidField {
                field: "friend",
                reason: "a user cannot befriend itself".into(),
            });
        }
        self.profile_rw(txn, from)?;
        self.profile_rw(txn, to)?;
        if self.blocks_in(txn, to)?.contains(from) {
            // The same error as an unknown `to`: a blocked user learns
            // nothing from it.
            return Err(Error::not_found_user(to));
        }
        let mine = self.friends_rw(txn, from)?;
        if mine.contains(to) {
            return Err(Error::AlreadyFriends(from, to));
        }
        self.check_room(from, &mine, group)?;
        let key = request_key(to, from);
        if self.requests.get(txn, &key)?.is_none() {
            let pending = self.requests.prefix_iter(txn, &to.to_be_bytes())?.count();
            if pending >= self.limits.requests_pending_max {
                return Err(Error::LimitReached(format!(
                    "user {to} has {pending} pending friend requests (requests_pending_max)"
                )));
            }
        }
        self.requests.put(txn, &key, group.as_bytes())?;
        self.bump(txn, to, changes)?;
        Ok(Outcome::Done)
    }

    fn friend_accept(
        &self,
        txn: &mut RwTxn,
        user: UserId,
        from: UserId,
        group: &str,
        changes: &mut Changes,
    ) -> Result<Outcome> {
        let key = request_key(user, from);
        let their_group = match self.requests.get(txn, &key)? {
            Some(g) => std::str::from_utf8(g)
                .map_err(|_| Error::Corrupt("friend request group is not UTF-8".into()))?
                .to_owned(),
            None => {
                return Err(Error::NotFound(format!(
                    "friend request from {from} to {user}"
                )))
            }
        };
        let mut mine = self.friends_rw(txn, user)?;
        let mut theirs = self.friends_rw(txn, from)?;
        if mine.contains(from) {
            return Err(Error::AlreadyFriends(user, from));
        }
        self.check_room(user, &mine, group)?;
        self.check_room(from, &theirs, &their_group)?;
        mine.add(from, group);
        theirs.add(user, &their_group);
        self.friends.put(txn, &user, &encode(&mine)?)?;
        self.friends.put(txn, &from, &encode(&theirs)?)?;
        self.requests.delete(txn, &key)?;
        self.requests.delete(txn, &request_key(from, user))?;
        self.bump(txn, user, changes)?;
        self.bump(txn, from, changes)?;
        Ok(Outcome::Done)
    }

    fn friend_remove(
        &self,
        txn: &mut RwTxn,
        user: UserId,
        friend: UserId,
        changes: &mut Changes,
    ) -> Result<Outcome> {
        let mut mine = self.friends_rw(txn, user)?;
        let mut theirs = self.friends_rw(txn, friend)?;
        if !mine.remove(friend) {
            return Err(Error::NotFriends(user, friend));
        }
        if !theirs.remove(user) {
            return Err(Error::Corrupt(format!(
                "friendship of {user} and {friend} is one-sided"
            )));
        }
        self.friends.put(txn, &user, &encode(&mine)?)?;
        self.friends.put(txn, &friend, &encode(&theirs)?)?;
        self.bump(txn, user, changes)?;
        self.bump(txn, friend, changes)?;
        Ok(Outcome::Done)
    }

    fn friend_move(
        &self,
        txn: &mut RwTxn,
        user: UserId,
        friend: UserId,
        group: &str,
        changes: &mut Changes,
    ) -> Result<Outcome> {
        let mut mine = self.friends_rw(txn, user)?;
        if !mine.remove(friend) {
            return Err(Error::NotFriends(user, friend));
        }
        self.check_room(user, &mine, group)?;
        mine.add(friend, group);
        self.friends.put(txn, &user, &encode(&mine)?)?;
        self.bump(txn, user, changes)
    }

    /// Every pair becomes friends (pairs already friends are skipped); each
    /// touched list is read and written once.
    fn import_friendships(
        &self,
        txn: &mut RwTxn,
        group: &str,
        pairs: &[(UserId, UserId)],
        changes: &mut Changes,
    ) -> Result<Outcome> {
        let mut lists: HashMap<UserId, FriendsRecord> = HashMap::new();
        for &(a, b) in pairs {
            if a == b {
                return Err(Error::InvalidField {
                    field: "friend",
                    reason: format!("user {a} cannot befriend itself"),
                });
            }
            for u in [a, b] {
                if let std::collections::hash_map::Entry::Vacant(slot) = lists.entry(u) {
                    self.profile_rw(txn, u)?;
                    slot.insert(self.friends_rw(txn, u)?);
                }
            }
            if lists[&a].contains(b) {
                continue;
            }
            for (u, other) in [(a, b), (b, a)] {
                let list = lists.get_mut(&u).expect("loaded above");
                self.check_room(u, list, group)?;
                list.add(other, group);
            }
        }
        let sorted: BTreeMap<_, _> = lists.into_iter().collect();
        for (u, list) in sorted {
            self.friends.put(txn, &u, &encode(&list)?)?;
            self.bump(txn, u, changes)?;
        }
        Ok(Outcome::Done)
    }

    /// `user` and `blocked`, both existing and distinct, with `user`'s
    /// profile (for its version) and block list.
    fn block_parties(
        &self,
        txn: &RwTxn,
        user: UserId,
        blocked: UserId,
    ) -> Result<(ProfileRecord, BlocksRecord)> {
        if user == blocked {
            return Err(Error::InvalidField {
                field: "blocked",
                reason: "a user cannot block itself".into(),
            });
        }
        let p = self.profile_rw(txn, user)?;
        self.profile_rw(txn, blocked)?;
        Ok((p, self.blocks_in(txn, user)?))
    }

    /// `user` blocks `blocked`, and drops `blocked`'s pending friend
    /// request to `user` if there is one; already blocked changes nothing
    /// (the current version, no bump, no invalidation).
    fn block(
        &self,
        txn: &mut RwTxn,
        user: UserId,
        blocked: UserId,
        changes: &mut Changes,
    ) -> Result<Outcome> {
        let (p, mut list) = self.block_parties(txn, user, blocked)?;
        if list.contains(blocked) {
            return Ok(Outcome::Version(p.version));
        }
        if list.blocked.len() >= self.limits.blocks_max {
            return Err(Error::LimitReached(format!(
                "user {user} blocks {} users (blocks_max)",
                self.limits.blocks_max
            )));
        }
        list.insert(blocked);
        self.blocks.put(txn, &user, &encode(&list)?)?;
        self.requests.delete(txn, &request_key(user, blocked))?;
        Ok(Outcome::Version(self.put_profile(txn, user, p, changes)?))
    }

    /// `user` no longer blocks `blocked`; not blocked changes nothing. An
    /// emptied list is deleted (absent means "blocks nobody").
    fn unblock(
        &self,
        txn: &mut RwTxn,
        user: UserId,
        blocked: UserId,
        changes: &mut Changes,
    ) -> Result<Outcome> {
        let (p, mut list) = self.block_parties(txn, user, blocked)?;
        if !list.remove(blocked) {
            return Ok(Outcome::Version(p.version));
        }
        if list.blocked.is_empty() {
            self.blocks.delete(txn, &user)?;
        } else {
            self.blocks.put(txn, &user, &encode(&list)?)?;
        }
        Ok(Outcome::Version(self.put_profile(txn, user, p, changes)?))
    }
}

/// A user's last accepted login, as the `logins` database holds it:
/// `login_ns` (u64 BE), then the claim's number (u64 BE) if it was made
/// with one ([`WriteOp::ClaimLoginOnce`]); 8 or 16 bytes.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(crate) struct LastLogin {
    pub(crate) login_ns: u64,
    pub(crate) claim: Option<u64>,
}

impl LastLogin {
    fn decode(bytes: &[u8]) -> Option<LastLogin> {
        let word = |at: usize| Some(u64::from_be_bytes(bytes.get(at..at + 8)?.try_into().ok()?));
        match bytes.len() {
            8 => Some(LastLogin {
                login_ns: word(0)?,
                claim: None,
            }),
            16 => Some(LastLogin {
                login_ns: word(0)?,
                claim: Some(word(8)?),
            }),
            _ => None,
        }
    }

    fn encode(&self) -> Vec<u8> {
        let mut out = self.login_ns.to_be_bytes().to_vec();
        if let Some(claim) = self.claim {
            out.extend_from_slice(&claim.to_be_bytes());
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::LastLogin;

    #[test]
    fn a_last_login_is_8_or_16_bytes_and_anything_else_is_refused() {
        for last in [
            LastLogin {
                login_ns: 5,
                claim: None,
            },
            LastLogin {
                login_ns: u64::MAX,
                claim: Some(0),
            },
        ] {
            assert_eq!(LastLogin::decode(&last.encode()), Some(last));
        }
        assert_eq!(
            LastLogin {
                login_ns: 1,
                claim: None
            }
            .encode()
            .len(),
            8
        );
        for len in [0, 1, 7, 9, 15, 17, 24] {
            assert_eq!(LastLogin::decode(&vec![0xAB; len]), None, "{len} bytes");
        }
    }
}
