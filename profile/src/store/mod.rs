//! LMDB storage of accounts, profiles, friends, avatars and chat groups.
//!
//! One writer thread ([`writer`]) owns every write transaction (heed write
//! transactions must commit on the thread that opened them) and commits
//! groups of requests; readers open their own read transactions on any
//! thread, concurrently with it. Layout: `docs/STORAGE.md`.

pub mod groups;
pub mod ops;
pub mod records;
pub mod writer;

use crate::{config::Limits, error::Error, Result};
use heed::{
    byteorder::BigEndian,
    types::{Bytes, Str, U64},
    CommitOrAbort, Database, Env, EnvOpenOptions, RoTxn, WithoutTls,
};
use proto::profile::{
    Account, AvatarHash, FriendGroup, LoginView, PendingRequest, Profile, Relations, UserId,
};
use records::{decode, AccountRecord, BlocksRecord, FriendsRecord, ProfileRecord};
use std::path::Path;

pub(crate) type UserDb = Database<'static, U64<BigEndian>, Bytes>;
pub(crate) type NameDb = Database<'static, Str, U64<BigEndian>>;
pub(crate) type RawDb = Database<'static, Bytes, Bytes>;

/// Named LMDB databases of the environment. `blocks`, `auth` and `logins`
/// came after the first layout, the chat group databases (from `groups`
/// on) after them; opening creates whichever is missing, so an older
/// environment opens as it is (absent records mean "blocks nobody",
/// "epoch 0", "no login recorded" and "no groups").
pub(crate) const DATABASES: [&str; 18] = [
    "accounts",
    "usernames",
    "profiles",
    "friends",
    "requests",
    "avatars",
    "avatar_refs",
    "meta",
    "blocks",
    "auth",
    "logins",
    "groups",
    "group_members",
    "user_groups",
    "group_invites",
    "group_invitees",
    "group_joins",
    "group_cursors",
];

/// The open environment and its databases; shared by readers and the writer.
pub struct Store {
    pub(crate) env: Env<WithoutTls>,
    pub(crate) accounts: UserDb,
    pub(crate) usernames: NameDb,
    pub(crate) profiles: UserDb,
    pub(crate) friends: UserDb,
    /// value: [`BlocksRecord`].
    pub(crate) blocks: UserDb,
    /// value: the credential epoch (u32 BE); absent = 0.
    pub(crate) auth: UserDb,
    /// value: the `login_ns` of the user's last accepted login (u64 BE),
    /// then the number it was claimed with if any (u64 BE; `ops.rs`
    /// `LastLogin`); absent = none yet.
    pub(crate) logins: UserDb,
    /// key: recipient (8 bytes BE) ++ sender (8 bytes BE); value: the
    /// sender's group name for the recipient (UTF-8).
    pub(crate) requests: RawDb,
    /// key: SHA-256 (32 bytes); value: the image.
    pub(crate) avatars: RawDb,
    /// key: SHA-256; value: number of profiles using it (u64 BE).
    pub(crate) avatar_refs: RawDb,
    pub(crate) meta: RawDb,
    /// key: group id (u64 BE); value: [`records::ChatGroupRecord`].
    pub(crate) groups: UserDb,
    /// key: group ++ user (16 bytes BE); value: [`records::MemberRecord`].
    pub(crate) group_members: RawDb,
    /// key: user ++ group (16 bytes BE); value: empty. A user's groups.
    pub(crate) user_groups: RawDb,
    /// key: invitee ++ group (16 bytes BE); value: the inviter (u64 BE).
    pub(crate) group_invites: RawDb,
    /// key: group ++ invitee (16 bytes BE); value: empty. The same
    /// invitations by group, so a dissolve finds them.
    pub(crate) group_invitees: RawDb,
    /// key: group ++ user (16 bytes BE); value: empty. Join requests.
    pub(crate) group_joins: RawDb,
    /// key: group ++ read_seq ++ user (24 bytes BE); value: empty. The
    /// first key with a group's prefix holds its lowest cursor.
    pub(crate) group_cursors: RawDb,
    pub(crate) limits: Limits,
}

/// `meta` key of the next user id to assign (u64 BE).
pub(crate) const META_NEXT_USER: &[u8] = b"next_user_id";
/// `meta` key of the next group id to assign (u64 BE; absent:
/// `GROUP_ID_BASE + 1`).
pub(crate) const META_NEXT_GROUP: &[u8] = b"next_group_id";
/// `meta` key of the layout version (u32 BE).
pub(crate) const META_LAYOUT: &[u8] = b"layout";
pub(crate) const LAYOUT_VERSION: u32 = 1;

pub(crate) fn request_key(to: UserId, from: UserId) -> [u8; 16] {
    let mut k = [0u8; 16];
    k[..8].copy_from_slice(&to.to_be_bytes());
    k[8..].copy_from_slice(&from.to_be_bytes());
    k
}

/// The credential epoch stored in `auth` (4 bytes, big-endian).
pub(crate) fn decode_epoch(user: UserId, bytes: &[u8]) -> Result<u32> {
    let bytes: [u8; 4] = bytes
        .try_into()
        .map_err(|_| Error::Corrupt(format!("credential epoch of user {user} is not 4 bytes")))?;
    Ok(u32::from_be_bytes(bytes))
}

/// The postcard record of `user` in `db`, if any.
fn record_in<T: serde::de::DeserializeOwned>(
    db: &UserDb,
    txn: &RoTxn<'_, WithoutTls>,
    user: UserId,
    what: &str,
) -> Result<Option<T>> {
    db.get(txn, &user)?.map(|b| decode(what, b)).transpose()
}

impl Store {
    /// Open (or create) the environment in `dir` (the caller holds the
    /// directory lock).
    pub fn open(dir: &Path, map_bytes: u64, limits: Limits) -> Result<Store> {
        std::fs::create_dir_all(dir)?;
        let map_bytes =
            usize::try_from(map_bytes).map_err(|_| Error::Config("map_bytes".into()))?;
        // SAFETY: the data directory is locked by this process, so nothing
        // else opens this environment, and we open it once.
        let env = unsafe {
            EnvOpenOptions::new()
                .read_txn_without_tls()
                .map_size(map_bytes)
                .max_dbs(DATABASES.len() as u32)
                .max_readers(1024)
                .open(dir)?
        };
        let wtxn = env.write_txn()?;
        let dbs = env
            .create_databases_and_commit(wtxn, |dbo, wtxn| {
                let meta = dbo.create_database::<Bytes, Bytes>(wtxn, Some("meta"))?;
                match meta.get(wtxn, META_LAYOUT)? {
                    None => meta.put(wtxn, META_LAYOUT, &LAYOUT_VERSION.to_be_bytes())?,
                    Some(v) if v == LAYOUT_VERSION.to_be_bytes() => {}
                    Some(_) => return Ok(CommitOrAbort::Abort(())),
                }
                Ok::<_, heed::Error>(CommitOrAbort::Commit((
                    dbo.create_database(wtxn, Some("usernames"))?,
                    [
                        dbo.create_database(wtxn, Some("accounts"))?,
                        dbo.create_database(wtxn, Some("profiles"))?,
                        dbo.create_database(wtxn, Some("friends"))?,
                        dbo.create_database(wtxn, Some("blocks"))?,
                        dbo.create_database(wtxn, Some("auth"))?,
                        dbo.create_database(wtxn, Some("logins"))?,
                    ],
                    [
                        dbo.create_database(wtxn, Some("requests"))?,
                        dbo.create_database(wtxn, Some("avatars"))?,
                        dbo.create_database(wtxn, Some("avatar_refs"))?,
                        meta,
                    ],
                    dbo.create_database(wtxn, Some("groups"))?,
                    [
                        dbo.create_database(wtxn, Some("group_members"))?,
                        dbo.create_database(wtxn, Some("user_groups"))?,
                        dbo.create_database(wtxn, Some("group_invites"))?,
                        dbo.create_database(wtxn, Some("group_invitees"))?,
                        dbo.create_database(wtxn, Some("group_joins"))?,
                        dbo.create_database(wtxn, Some("group_cursors"))?,
                    ],
                )))
            })?
            .commit()
            .ok_or_else(|| Error::Corrupt("unknown layout version in meta".into()))?;
        let (
            usernames,
            [accounts, profiles, friends, blocks, auth, logins],
            [requests, avatars, avatar_refs, meta],
            groups,
            [group_members, user_groups, group_invites, group_invitees, group_joins, group_cursors],
        ): (NameDb, [UserDb; 6], [RawDb; 4], UserDb, [RawDb; 6]) = dbs;
        Ok(Store {
            env,
            accounts,
            usernames,
            profiles,
            friends,
            blocks,
            auth,
            logins,
            requests,
            avatars,
            avatar_refs,
            meta,
            groups,
            group_members,
            user_groups,
            group_invites,
            group_invitees,
            group_joins,
            group_cursors,
            limits,
        })
    }

    /// Every database by its name (in [`DATABASES`] order), as raw bytes:
    /// for copying a whole store (a replica installing a snapshot).
    pub(crate) fn every_database(&self) -> [(&'static str, RawDb); DATABASES.len()] {
        let handles: [RawDb; DATABASES.len()] = [
            self.accounts.remap_types(),
            self.usernames.remap_types(),
            self.profiles.remap_types(),
            self.friends.remap_types(),
            self.requests,
            self.avatars,
            self.avatar_refs,
            self.meta,
            self.blocks.remap_types(),
            self.auth.remap_types(),
            self.logins.remap_types(),
            self.groups.remap_types(),
            self.group_members,
            self.user_groups,
            self.group_invites,
            self.group_invitees,
            self.group_joins,
            self.group_cursors,
        ];
        let mut i = 0;
        handles.map(|db| {
            i += 1;
            (DATABASES[i - 1], db)
        })
    }

    pub fn read_txn(&self) -> Result<RoTxn<'_, WithoutTls>> {
        Ok(self.env.read_txn()?)
    }

    pub(crate) fn account_in(
        &self,
        txn: &RoTxn<'_, WithoutTls>,
        user: UserId,
    ) -> Result<Option<AccountRecord>> {
        record_in(&self.accounts, txn, user, "account")
    }

    pub(crate) fn profile_in(
        &self,
        txn: &RoTxn<'_, WithoutTls>,
        user: UserId,
    ) -> Result<Option<ProfileRecord>> {
        record_in(&self.profiles, txn, user, "profile")
    }

    pub(crate) fn friends_in(
        &self,
        txn: &RoTxn<'_, WithoutTls>,
        user: UserId,
    ) -> Result<FriendsRecord> {
        Ok(record_in(&self.friends, txn, user, "friends")?.unwrap_or_default())
    }

    pub(crate) fn blocks_in(
        &self,
        txn: &RoTxn<'_, WithoutTls>,
        user: UserId,
    ) -> Result<BlocksRecord> {
        Ok(record_in(&self.blocks, txn, user, "blocks")?.unwrap_or_default())
    }

    pub(crate) fn epoch_in(&self, txn: &RoTxn<'_, WithoutTls>, user: UserId) -> Result<u32> {
        self.auth
            .get(txn, &user)?
            .map_or(Ok(0), |b| decode_epoch(user, b))
    }

    /// The id and PHC hash of `username`, or `None`.
    pub fn credentials(&self, username: &str) -> Result<Option<(UserId, AccountRecord)>> {
        let txn = self.read_txn()?;
        let Some(user) = self.usernames.get(&txn, username)? else {
            return Ok(None);
        };
        let account = self
            .account_in(&txn, user)?
            .ok_or_else(|| Error::Corrupt(format!("username {username:?} names no account")))?;
        Ok(Some((user, account)))
    }

    pub fn lookup(&self, username: &str) -> Result<UserId> {
        let txn = self.read_txn()?;
        self.usernames
            .get(&txn, username)?
            .ok_or_else(|| Error::NotFound(format!("username {username:?}")))
    }

    pub fn account(&self, user: UserId) -> Result<Account> {
        let txn = self.read_txn()?;
        let a = self
            .account_in(&txn, user)?
            .ok_or_else(|| Error::not_found_user(user))?;
        Ok(Account {
            user,
            username: a.username,
            disabled: a.disabled,
            created_ms: a.created_ms,
        })
    }

    fn public(user: UserId, p: ProfileRecord) -> Profile {
        Profile {
            user,
            username: p.username,
            nickname: p.nickname,
            signature: p.signature,
            avatar: p.avatar,
            version: p.version,
        }
    }

    pub fn profile(&self, user: UserId) -> Result<Profile> {
        let txn = self.read_txn()?;
        let p = self
            .profile_in(&txn, user)?
            .ok_or_else(|| Error::not_found_user(user))?;
        Ok(Self::public(user, p))
    }

    /// Profiles of `users` that exist, in the order given.
    pub fn profiles(&self, users: &[UserId]) -> Result<Vec<Profile>> {
        let txn = self.read_txn()?;
        let mut out = Vec::with_capacity(users.len());
        for &u in users {
            if let Some(p) = self.profile_in(&txn, u)? {
                out.push(Self::public(u, p));
            }
        }
        Ok(out)
    }

    /// Own profile, groups with friends' profiles, pending requests: all
    /// from one read transaction (one consistent snapshot).
    pub fn login_view(&self, user: UserId) -> Result<LoginView> {
        let txn = self.read_txn()?;
        let own = self
            .profile_in(&txn, user)?
            .ok_or_else(|| Error::not_found_user(user))?;
        let friends = self.friends_in(&txn, user)?;
        let mut groups = Vec::with_capacity(friends.groups.len());
        for g in friends.groups {
            let mut profiles = Vec::with_capacity(g.members.len());
            for m in g.members {
                let p = self.profile_in(&txn, m)?.ok_or_else(|| {
                    Error::Corrupt(format!("friend {m} of user {user} has no profile"))
                })?;
                profiles.push(Self::public(m, p));
            }
            groups.push(FriendGroup {
                name: g.name,
                friends: profiles,
            });
        }
        let mut requests = Vec::new();
        for item in self.requests.prefix_iter(&txn, &user.to_be_bytes())? {
            let (key, _group) = item?;
            let from = u64::from_be_bytes(
                key[8..16]
                    .try_into()
                    .map_err(|_| Error::Corrupt("friend request key is not 16 bytes".into()))?,
            );
            let username = self
                .profile_in(&txn, from)?
                .map(|p| p.username)
                .unwrap_or_default();
            requests.push(PendingRequest { from, username });
        }
        Ok(LoginView {
            profile: Self::public(user, own),
            groups,
            requests,
        })
    }

    /// Relations of the `users` that exist, in the order given, all from
    /// one read transaction (each `version` matches the lists beside it).
    pub fn relations(&self, users: &[UserId]) -> Result<Vec<Relations>> {
        let txn = self.read_txn()?;
        let mut out = Vec::with_capacity(users.len());
        for &u in users {
            if let Some(r) = self.relations_in(&txn, u)? {
                out.push(r);
            }
        }
        Ok(out)
    }

    fn relations_in(&self, txn: &RoTxn<'_, WithoutTls>, user: UserId) -> Result<Option<Relations>> {
        let Some(account) = self.account_in(txn, user)? else {
            return Ok(None);
        };
        let profile = self
            .profile_in(txn, user)?
            .ok_or_else(|| Error::Corrupt(format!("account {user} has no profile")))?;
        Ok(Some(Relations {
            user,
            disabled: account.disabled,
            credential_epoch: self.epoch_in(txn, user)?,
            version: profile.version,
            friends: self.friends_in(txn, user)?.sorted_members(),
            blocked: self.blocks_in(txn, user)?.blocked,
        }))
    }

    /// `len` bytes (at most `max`) of an avatar from `offset`, and its size.
    pub fn avatar_range(
        &self,
        hash: &AvatarHash,
        offset: u32,
        len: u32,
        max: u32,
    ) -> Result<(u32, Vec<u8>)> {
        let txn = self.read_txn()?;
        let image = self
            .avatars
            .get(&txn, hash)?
            .ok_or_else(|| Error::NotFound(format!("avatar {}", crate::avatar::hex(hash))))?;
        let total = image.len();
        let start = (offset as usize).min(total);
        let end = start.saturating_add(len.min(max) as usize).min(total);
        Ok((total as u32, image[start..end].to_vec()))
    }

    /// Every user's friends, for consistency checks in tests and tools.
    pub fn friend_lists(&self) -> Result<Vec<(UserId, FriendsRecord)>> {
        let txn = self.read_txn()?;
        let mut out = Vec::new();
        for item in self.friends.iter(&txn)? {
            let (user, bytes) = item?;
            out.push((user, decode("friends", bytes)?));
        }
        Ok(out)
    }

    /// Pending requests as (to, from) pairs.
    pub fn pending_requests(&self) -> Result<Vec<(UserId, UserId)>> {
        let txn = self.read_txn()?;
        let mut out = Vec::new();
        for item in self.requests.iter(&txn)? {
            let (k, _) = item?;
            let k: [u8; 16] = k
                .try_into()
                .map_err(|_| Error::Corrupt("friend request key is not 16 bytes".into()))?;
            let to = u64::from_be_bytes(k[..8].try_into().unwrap_or_default());
            let from = u64::from_be_bytes(k[8..].try_into().unwrap_or_default());
            out.push((to, from));
        }
        Ok(out)
    }

    /// Number of stored avatar images.
    pub fn avatar_count(&self) -> Result<u64> {
        let txn = self.read_txn()?;
        Ok(self.avatars.len(&txn)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An environment made with the first `n` of [`DATABASES`] (8: before
    /// `blocks` and `auth` existed; 11: before chat groups), one account
    /// with its profile.
    fn older_layout(dir: &Path, n: usize) {
        // SAFETY: a fresh temporary directory, opened once at a time.
        let env = unsafe {
            EnvOpenOptions::new()
                .map_size(16 << 20)
                .max_dbs(n as u32)
                .open(dir)
                .unwrap()
        };
        let account = AccountRecord {
            username: "old".into(),
            phc: "x".into(),
            disabled: false,
            created_ms: 0,
        };
        let profile = ProfileRecord {
            username: "old".into(),
            version: 4,
            ..ProfileRecord::default()
        };
        let key = 1u64.to_be_bytes();
        let wtxn = env.write_txn().unwrap();
        env.create_databases_and_commit(wtxn, |dbo, wtxn| {
            let mut dbs = Vec::new();
            for name in &DATABASES[..n] {
                dbs.push(dbo.create_database::<Bytes, Bytes>(wtxn, Some(name))?);
            }
            let [accounts, _, profiles, _, _, _, _, meta, ..] = dbs[..] else {
                unreachable!("at least eight databases")
            };
            meta.put(wtxn, META_LAYOUT, &1u32.to_be_bytes())?;
            accounts.put(wtxn, &key, &records::encode(&account).unwrap())?;
            profiles.put(wtxn, &key, &records::encode(&profile).unwrap())?;
            Ok::<_, heed::Error>(CommitOrAbort::<_, ()>::Commit(()))
        })
        .unwrap()
        .unwrap_commit();
    }

    #[test]
    fn an_environment_without_blocks_and_auth_opens_as_it_is() {
        let dir = tempfile::tempdir().unwrap();
        older_layout(dir.path(), 8);
        let store = Store::open(dir.path(), 16 << 20, Limits::default()).unwrap();
        let relations = store.relations(&[1, 2]).unwrap();
        assert_eq!(
            relations,
            [Relations {
                user: 1,
                disabled: false,
                credential_epoch: 0,
                version: 4,
                friends: vec![],
                blocked: vec![],
            }]
        );
        let txn = store.read_txn().unwrap();
        assert_eq!(store.blocks.len(&txn).unwrap(), 0);
        assert_eq!(store.auth.len(&txn).unwrap(), 0);
        let layout = store.meta.get(&txn, META_LAYOUT).unwrap();
        assert_eq!(layout, Some(&LAYOUT_VERSION.to_be_bytes()[..]));
    }

    #[test]
    fn an_environment_without_group_databases_opens_and_creates_them() {
        let dir = tempfile::tempdir().unwrap();
        older_layout(dir.path(), 11);
        let store = Store::open(dir.path(), 16 << 20, Limits::default()).unwrap();
        assert_eq!(store.group_count().unwrap(), 0);
        assert_eq!(
            store.user_groups(1).unwrap(),
            proto::groups::UserGroups::default()
        );
        assert_eq!(store.relations(&[1]).unwrap()[0].version, 4);
        let txn = store.read_txn().unwrap();
        assert_eq!(store.meta.get(&txn, META_NEXT_GROUP).unwrap(), None);
        for db in [
            &store.group_members,
            &store.user_groups,
            &store.group_invites,
            &store.group_invitees,
            &store.group_joins,
            &store.group_cursors,
        ] {
            assert_eq!(db.len(&txn).unwrap(), 0, "created empty");
        }
    }

    #[test]
    fn a_corrupt_epoch_is_a_typed_error() {
        assert_eq!(decode_epoch(1, &[0, 0, 1, 2]).unwrap(), 258);
        assert!(matches!(decode_epoch(1, &[1, 2]), Err(Error::Corrupt(_))));
    }
}
