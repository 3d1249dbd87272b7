//! Chat groups in LMDB: the write operations ([`GroupOp`], applied by the
//! writer thread like every other [`super::ops::WriteOp`], each in its
//! nested transaction: checks first, then writes) and the reads
//! (`GetGroup`, `GetUserGroups`, a member's cursor).
//!
//! Semantics: `docs/PROTOCOL.md` §5.3 "Groups"; layout: `docs/STORAGE.md`.
//! Every key is made of big-endian ids, so a prefix scan by the first id
//! returns the second ones in ascending order, and the first
//! `group_cursors` key of a group holds its lowest cursor.

use super::{
    ops::{Changes, Outcome},
    records::{decode, encode, ChatGroupRecord, MemberRecord},
    RawDb, Store, META_NEXT_GROUP,
};
use crate::{error::Error, Result};
use heed::{RoTxn, RwTxn, WithoutTls};
use proto::{
    groups::{
        GroupId, GroupInfo, GroupInvite, GroupMember, GroupMembership, GroupRole, UserGroups,
        GROUP_ID_BASE,
    },
    profile::{Event, UserId},
};
use serde::{Deserialize, Serialize};

type Txn<'a> = RoTxn<'a, WithoutTls>;

/// One chat group write; text fields are already validated.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum GroupOp {
    Create {
        owner: UserId,
        name: String,
        topic: String,
    },
    Invite {
        by: UserId,
        group: GroupId,
        invitee: UserId,
    },
    AnswerInvite {
        user: UserId,
        group: GroupId,
        accept: bool,
        read_seq: u64,
    },
    JoinRequest {
        user: UserId,
        group: GroupId,
    },
    AnswerJoin {
        by: UserId,
        group: GroupId,
        user: UserId,
        accept: bool,
        read_seq: u64,
    },
    Leave {
        user: UserId,
        group: GroupId,
    },
    Remove {
        by: UserId,
        group: GroupId,
        user: UserId,
    },
    SetRole {
        by: UserId,
        group: GroupId,
        user: UserId,
        role: GroupRole,
    },
    Transfer {
        by: UserId,
        group: GroupId,
        to: UserId,
    },
    Rename {
        by: UserId,
        group: GroupId,
        name: Option<String>,
        topic: Option<String>,
    },
    Dissolve {
        by: UserId,
        group: GroupId,
    },
    Read {
        user: UserId,
        group: GroupId,
        up_to_seq: u64,
    },
}

/// Two ids as one key: `a` BE ++ `b` BE.
pub(crate) fn pair_key(a: u64, b: u64) -> [u8; 16] {
    let mut k = [0u8; 16];
    k[..8].copy_from_slice(&a.to_be_bytes());
    k[8..].copy_from_slice(&b.to_be_bytes());
    k
}

/// A `group_cursors` key: group ++ read_seq ++ user, all BE.
pub(crate) fn cursor_key(group: GroupId, read_seq: u64, user: UserId) -> [u8; 24] {
    let mut k = [0u8; 24];
    k[..8].copy_from_slice(&group.to_be_bytes());
    k[8..16].copy_from_slice(&read_seq.to_be_bytes());
    k[16..].copy_from_slice(&user.to_be_bytes());
    k
}

/// The big-endian id at bytes `at..at + 8` of a stored key or value.
fn id_at(bytes: &[u8], at: usize) -> Result<u64> {
    bytes
        .get(at..at + 8)
        .and_then(|b| b.try_into().ok())
        .map(u64::from_be_bytes)
        .ok_or_else(|| Error::Corrupt(format!("group key or value of {} bytes", bytes.len())))
}

/// The second id of every key of `db` starting with `id`, ascending.
fn seconds(db: &RawDb, txn: &Txn<'_>, id: u64) -> Result<Vec<u64>> {
    let mut out = Vec::new();
    for item in db.prefix_iter(txn, &id.to_be_bytes())? {
        out.push(id_at(item?.0, 8)?);
    }
    Ok(out)
}

/// How many keys of `db` start with `id`.
fn count(db: &RawDb, txn: &Txn<'_>, id: u64) -> Result<usize> {
    let mut n = 0;
    for item in db.prefix_iter(txn, &id.to_be_bytes())? {
        item?;
        n += 1;
    }
    Ok(n)
}

/// Whether `key` (owner id ++ other id) may be added to the pending
/// entries of `db`: false if it is there already (nothing to do),
/// `LimitReached` (with `full(pending)` as its message) if its owner has
/// `max` pending.
fn pending_room(
    db: &RawDb,
    txn: &Txn<'_>,
    key: &[u8; 16],
    max: usize,
    full: impl FnOnce(usize) -> String,
) -> Result<bool> {
    if db.get(txn, key)?.is_some() {
        return Ok(false);
    }
    let owner = u64::from_be_bytes(key[..8].try_into().expect("16 bytes"));
    let pending = count(db, txn, owner)?;
    if pending >= max {
        return Err(Error::LimitReached(full(pending)));
    }
    Ok(true)
}

fn not_member(user: UserId, group: GroupId) -> Error {
    Error::NotMember(format!("user {user} is not a member of group {group}"))
}

// ---- reads ----
impl Store {
    pub(crate) fn group_in(
        &self,
        txn: &Txn<'_>,
        group: GroupId,
    ) -> Result<Option<ChatGroupRecord>> {
        let bytes = self.groups.get(txn, &group)?;
        bytes.map(|b| decode("group", b)).transpose()
    }

    /// The group's record, or `NotFound`.
    fn group_rw(&self, txn: &Txn<'_>, group: GroupId) -> Result<ChatGroupRecord> {
        self.group_in(txn, group)?
            .ok_or_else(|| Error::not_found_group(group))
    }

    pub(crate) fn member_in(
        &self,
        txn: &Txn<'_>,
        group: GroupId,
        user: UserId,
    ) -> Result<Option<MemberRecord>> {
        let bytes = self.group_members.get(txn, &pair_key(group, user))?;
        bytes.map(|b| decode("group member", b)).transpose()
    }

    /// `AlreadyMember` if `user` is a member of `group`.
    fn not_yet_member(&self, txn: &Txn<'_>, group: GroupId, user: UserId) -> Result<()> {
        match self.member_in(txn, group, user)? {
            Some(_) => Err(Error::AlreadyMember(format!(
                "user {user} is a member of group {group}"
            ))),
            None => Ok(()),
        }
    }

    /// `user`'s row, or `NotMember`.
    fn member_rw(&self, txn: &Txn<'_>, group: GroupId, user: UserId) -> Result<MemberRecord> {
        self.member_in(txn, group, user)?
            .ok_or_else(|| not_member(user, group))
    }

    /// `by`'s row if it is the owner or an admin (`NotMember`,
    /// `NotPermitted` otherwise).
    fn manager_rw(&self, txn: &Txn<'_>, group: GroupId, by: UserId) -> Result<MemberRecord> {
        let row = self.member_rw(txn, group, by)?;
        if !row.role.manages() {
            return Err(Error::NotPermitted(format!(
                "user {by} is a plain member of group {group}: only its owner or an admin may"
            )));
        }
        Ok(row)
    }

    /// `by`'s row if it is the owner (`NotMember`, `NotPermitted`
    /// otherwise).
    fn owner_rw(&self, txn: &Txn<'_>, group: GroupId, by: UserId) -> Result<MemberRecord> {
        let row = self.member_rw(txn, group, by)?;
        if row.role != GroupRole::Owner {
            return Err(Error::NotPermitted(format!(
                "user {by} is not the owner of group {group}: only the owner may"
            )));
        }
        Ok(row)
    }

    /// The lowest cursor of any member: the first `group_cursors` key with
    /// the group's prefix (one B-tree descent).
    pub(crate) fn min_read_seq_in(&self, txn: &Txn<'_>, group: GroupId) -> Result<u64> {
        match self
            .group_cursors
            .prefix_iter(txn, &group.to_be_bytes())?
            .next()
        {
            Some(item) => id_at(item?.0, 8),
            None => Err(Error::Corrupt(format!("group {group} has no cursor"))),
        }
    }

    /// Every member of `group` with its row, sorted by user.
    fn member_rows(&self, txn: &Txn<'_>, group: GroupId) -> Result<Vec<(UserId, MemberRecord)>> {
        let mut out = Vec::new();
        for item in self.group_members.prefix_iter(txn, &group.to_be_bytes())? {
            let (key, value) = item?;
            out.push((id_at(key, 8)?, decode("group member", value)?));
        }
        Ok(out)
    }

    /// A group as `GetGroup` answers it, from one read transaction.
    pub fn group(&self, group: GroupId) -> Result<GroupInfo> {
        let txn = self.read_txn()?;
        let rec = self.group_rw(&txn, group)?;
        let members = self.member_rows(&txn, group)?;
        let members = members
            .into_iter()
            .map(|(user, m)| GroupMember {
                user,
                role: m.role,
                read_seq: m.read_seq,
            })
            .collect();
        Ok(GroupInfo {
            group,
            name: rec.name,
            topic: rec.topic,
            version: rec.version,
            created_ms: rec.created_ms,
            members,
            joins: seconds(&self.group_joins, &txn, group)?,
        })
    }

    /// `user`'s groups and invitations, from one read transaction.
    pub fn user_groups(&self, user: UserId) -> Result<UserGroups> {
        let txn = self.read_txn()?;
        if self.accounts.get(&txn, &user)?.is_none() {
            return Err(Error::not_found_user(user));
        }
        let mut out = UserGroups::default();
        for group in seconds(&self.user_groups, &txn, user)? {
            let rec = self.indexed_group(&txn, group, user)?;
            let m = self.member_in(&txn, group, user)?.ok_or_else(|| {
                Error::Corrupt(format!("user {user} lists group {group} but is no member"))
            })?;
            out.groups.push(GroupMembership {
                group,
                name: rec.name,
                role: m.role,
                read_seq: m.read_seq,
                members: rec.members,
            });
        }
        for item in self.group_invites.prefix_iter(&txn, &user.to_be_bytes())? {
            let (key, value) = item?;
            let group = id_at(key, 8)?;
            let rec = self.indexed_group(&txn, group, user)?;
            let by = id_at(value, 0)?;
            out.invites.push(GroupInvite {
                group,
                name: rec.name,
                by,
            });
        }
        Ok(out)
    }

    /// The record of a group an index entry of `user` names.
    fn indexed_group(
        &self,
        txn: &Txn<'_>,
        group: GroupId,
        user: UserId,
    ) -> Result<ChatGroupRecord> {
        self.group_in(txn, group)?.ok_or_else(|| {
            Error::Corrupt(format!(
                "an index entry of user {user} names missing group {group}"
            ))
        })
    }

    /// `user`'s cursor in `group` and the group's lowest, if a member.
    pub fn group_cursor(&self, user: UserId, group: GroupId) -> Result<Option<(u64, u64)>> {
        let txn = self.read_txn()?;
        match self.member_in(&txn, group, user)? {
            Some(m) => Ok(Some((m.read_seq, self.min_read_seq_in(&txn, group)?))),
            None => Ok(None),
        }
    }

    /// Entries of each group database by name, for consistency checks in
    /// tests and tools (LMDB stats, no scan).
    pub fn group_table_sizes(&self) -> Result<Vec<(&'static str, u64)>> {
        let txn = self.read_txn()?;
        let mut out = vec![("groups", self.groups.len(&txn)?)];
        for (name, db) in [
            ("group_members", &self.group_members),
            ("user_groups", &self.user_groups),
            ("group_invites", &self.group_invites),
            ("group_invitees", &self.group_invitees),
            ("group_joins", &self.group_joins),
            ("group_cursors", &self.group_cursors),
        ] {
            out.push((name, db.len(&txn)?));
        }
        Ok(out)
    }

    /// Number of groups (an LMDB stat, no scan).
    pub fn group_count(&self) -> Result<u64> {
        let txn = self.read_txn()?;
        Ok(self.groups.len(&txn)?)
    }
}

// ---- writes ----
impl Store {
    /// Apply one group write in `txn`; the events it causes go to `changes`.
    pub(crate) fn apply_group(
        &self,
        txn: &mut RwTxn,
        op: GroupOp,
        changes: &mut Changes,
    ) -> Result<Outcome> {
        match op {
            GroupOp::Create { owner, name, topic } => {
                self.group_create(txn, owner, name, topic, changes)
            }
            GroupOp::Invite { by, group, invitee } => {
                self.group_invite(txn, by, group, invitee, changes)
            }
            GroupOp::AnswerInvite {
                user,
                group,
                accept,
                read_seq,
            } => self.group_answer_invite(txn, user, group, accept.then_some(read_seq), changes),
            GroupOp::JoinRequest { user, group } => {
                self.group_join_request(txn, user, group, changes)
            }
            GroupOp::AnswerJoin {
                by,
                group,
                user,
                accept,
                read_seq,
            } => self.group_answer_join(txn, by, group, user, accept.then_some(read_seq), changes),
            GroupOp::Leave { user, group } => self.group_leave(txn, user, group, changes),
            GroupOp::Remove { by, group, user } => self.group_remove(txn, by, group, user, changes),
            GroupOp::SetRole {
                by,
                group,
                user,
                role,
            } => self.group_set_role(txn, by, group, user, role, changes),
            GroupOp::Transfer { by, group, to } => self.group_transfer(txn, by, group, to, changes),
            GroupOp::Rename {
                by,
                group,
                name,
                topic,
            } => self.group_rename(txn, by, group, name, topic, changes),
            GroupOp::Dissolve { by, group } => self.group_dissolve(txn, by, group, changes),
            GroupOp::Read {
                user,
                group,
                up_to_seq,
            } => self.group_read(txn, user, group, up_to_seq),
        }
    }

    /// The next group id (never reused: the counter only grows).
    fn next_group_id(&self, txn: &mut RwTxn) -> Result<GroupId> {
        let group = match self.meta.get(txn, META_NEXT_GROUP)? {
            Some(b) => id_at(b, 0)?,
            None => GROUP_ID_BASE + 1,
        };
        let next = group
            .checked_add(1)
            .ok_or_else(|| Error::LimitReached("every group id is used".into()))?;
        self.meta.put(txn, META_NEXT_GROUP, &next.to_be_bytes())?;
        Ok(group)
    }

    /// Write `rec` with its version increased; publish `GroupChanged`.
    fn put_group(
        &self,
        txn: &mut RwTxn,
        group: GroupId,
        mut rec: ChatGroupRecord,
        changes: &mut Changes,
    ) -> Result<Outcome> {
        rec.version += 1;
        self.groups.put(txn, &group, &encode(&rec)?)?;
        changes.push(Event::GroupChanged {
            group,
            version: rec.version,
        });
        Ok(Outcome::Done)
    }

    fn put_member(
        &self,
        txn: &mut RwTxn,
        group: GroupId,
        user: UserId,
        row: &MemberRecord,
    ) -> Result<()> {
        Ok(self
            .group_members
            .put(txn, &pair_key(group, user), &encode(row)?)?)
    }

    /// Refuse a user already in `user_groups_max` groups.
    fn check_user_room(&self, txn: &Txn<'_>, user: UserId) -> Result<()> {
        let n = count(&self.user_groups, txn, user)?;
        if n >= self.limits.user_groups_max {
            return Err(Error::LimitReached(format!(
                "user {user} is in {n} groups (user_groups_max)"
            )));
        }
        Ok(())
    }

    /// Store a member row, its cursor and the user's index entry.
    fn insert_member(
        &self,
        txn: &mut RwTxn,
        group: GroupId,
        rec: &mut ChatGroupRecord,
        user: UserId,
        row: MemberRecord,
    ) -> Result<()> {
        self.put_member(txn, group, user, &row)?;
        self.group_cursors
            .put(txn, &cursor_key(group, row.read_seq, user), &[])?;
        self.user_groups.put(txn, &pair_key(user, group), &[])?;
        rec.members += 1;
        Ok(())
    }

    /// Delete what [`Store::insert_member`] stored.
    fn remove_member(
        &self,
        txn: &mut RwTxn,
        group: GroupId,
        rec: &mut ChatGroupRecord,
        user: UserId,
        row: MemberRecord,
    ) -> Result<()> {
        self.group_members.delete(txn, &pair_key(group, user))?;
        self.group_cursors
            .delete(txn, &cursor_key(group, row.read_seq, user))?;
        self.user_groups.delete(txn, &pair_key(user, group))?;
        rec.members = rec.members.saturating_sub(1);
        Ok(())
    }

    /// Make `user` a plain member with cursor `read_seq`, within
    /// `group_members_max` and the user's `user_groups_max`; its invitation
    /// and join request (if any) go.
    fn admit(
        &self,
        txn: &mut RwTxn,
        group: GroupId,
        rec: &mut ChatGroupRecord,
        user: UserId,
        read_seq: u64,
    ) -> Result<()> {
        if self.member_in(txn, group, user)?.is_some() {
            return Err(Error::AlreadyMember(format!(
                "user {user} is a member of group {group}"
            )));
        }
        if rec.members as usize >= self.limits.group_members_max {
            return Err(Error::LimitReached(format!(
                "group {group} has {} members (group_members_max)",
                rec.members
            )));
        }
        self.check_user_room(txn, user)?;
        self.delete_invite(txn, user, group)?;
        self.group_joins.delete(txn, &pair_key(group, user))?;
        let row = MemberRecord {
            role: GroupRole::Member,
            read_seq,
            joined_ms: self.clock_ms(txn)?,
        };
        self.insert_member(txn, group, rec, user, row)
    }

    /// Delete `invitee`'s invitation to `group`; whether there was one.
    fn delete_invite(&self, txn: &mut RwTxn, invitee: UserId, group: GroupId) -> Result<bool> {
        self.group_invitees.delete(txn, &pair_key(group, invitee))?;
        Ok(self.group_invites.delete(txn, &pair_key(invitee, group))?)
    }

    fn group_create(
        &self,
        txn: &mut RwTxn,
        owner: UserId,
        name: String,
        topic: String,
        changes: &mut Changes,
    ) -> Result<Outcome> {
        self.profile_rw(txn, owner)?;
        self.check_user_room(txn, owner)?;
        let group = self.next_group_id(txn)?;
        let created_ms = self.clock_ms(txn)?;
        let mut rec = ChatGroupRecord {
            name,
            topic,
            version: 1,
            created_ms,
            owner,
            members: 0,
        };
        let row = MemberRecord {
            role: GroupRole::Owner,
            read_seq: 0,
            joined_ms: created_ms,
        };
        self.insert_member(txn, group, &mut rec, owner, row)?;
        self.groups.put(txn, &group, &encode(&rec)?)?;
        self.bump(txn, owner, changes)?;
        Ok(Outcome::Group(Box::new(GroupInfo {
            group,
            name: rec.name,
            topic: rec.topic,
            version: rec.version,
            created_ms,
            members: vec![GroupMember {
                user: owner,
                role: GroupRole::Owner,
                read_seq: 0,
            }],
            joins: Vec::new(),
        })))
    }

    fn group_invite(
        &self,
        txn: &mut RwTxn,
        by: UserId,
        group: GroupId,
        invitee: UserId,
        changes: &mut Changes,
    ) -> Result<Outcome> {
        self.group_rw(txn, group)?;
        self.member_rw(txn, group, by)?;
        self.profile_rw(txn, invitee)?;
        if self.blocks_in(txn, invitee)?.contains(by) {
            // The same answer as for an unknown invitee.
            return Err(Error::not_found_user(invitee));
        }
        self.not_yet_member(txn, group, invitee)?;
        let key = pair_key(invitee, group);
        let max = self.limits.group_invites_pending_max;
        let full = |n| {
            format!("user {invitee} has {n} pending group invitations (group_invites_pending_max)")
        };
        if !pending_room(&self.group_invites, txn, &key, max, full)? {
            return Ok(Outcome::Done);
        }
        self.group_invites.put(txn, &key, &by.to_be_bytes())?;
        self.group_invitees
            .put(txn, &pair_key(group, invitee), &[])?;
        self.bump(txn, invitee, changes)?;
        Ok(Outcome::Done)
    }

    /// `read_seq`: `Some` to accept with that cursor, `None` to decline.
    fn group_answer_invite(
        &self,
        txn: &mut RwTxn,
        user: UserId,
        group: GroupId,
        read_seq: Option<u64>,
        changes: &mut Changes,
    ) -> Result<Outcome> {
        if !self.delete_invite(txn, user, group)? {
            return Err(Error::NotMember(format!(
                "user {user} has no invitation to group {group}"
            )));
        }
        self.bump(txn, user, changes)?;
        let Some(read_seq) = read_seq else {
            return Ok(Outcome::Done);
        };
        let mut rec = self.group_rw(txn, group)?;
        self.admit(txn, group, &mut rec, user, read_seq)?;
        self.put_group(txn, group, rec, changes)
    }

    fn group_join_request(
        &self,
        txn: &mut RwTxn,
        user: UserId,
        group: GroupId,
        changes: &mut Changes,
    ) -> Result<Outcome> {
        let rec = self.group_rw(txn, group)?;
        self.profile_rw(txn, user)?;
        self.not_yet_member(txn, group, user)?;
        let key = pair_key(group, user);
        let max = self.limits.group_joins_pending_max;
        let full =
            |n| format!("group {group} has {n} pending join requests (group_joins_pending_max)");
        if !pending_room(&self.group_joins, txn, &key, max, full)? {
            return Ok(Outcome::Done);
        }
        self.group_joins.put(txn, &key, &[])?;
        self.put_group(txn, group, rec, changes)
    }

    /// `read_seq`: `Some` to accept with that cursor, `None` to refuse.
    fn group_answer_join(
        &self,
        txn: &mut RwTxn,
        by: UserId,
        group: GroupId,
        user: UserId,
        read_seq: Option<u64>,
        changes: &mut Changes,
    ) -> Result<Outcome> {
        let mut rec = self.group_rw(txn, group)?;
        self.manager_rw(txn, group, by)?;
        if !self.group_joins.delete(txn, &pair_key(group, user))? {
            return Err(Error::NotMember(format!(
                "user {user} has not asked to join group {group}"
            )));
        }
        if let Some(read_seq) = read_seq {
            self.admit(txn, group, &mut rec, user, read_seq)?;
            self.bump(txn, user, changes)?;
        }
        self.put_group(txn, group, rec, changes)
    }

    fn group_leave(
        &self,
        txn: &mut RwTxn,
        user: UserId,
        group: GroupId,
        changes: &mut Changes,
    ) -> Result<Outcome> {
        let mut rec = self.group_rw(txn, group)?;
        let row = self.member_rw(txn, group, user)?;
        if row.role == GroupRole::Owner {
            return Err(Error::NotPermitted(format!(
                "the owner cannot leave group {group}: transfer ownership \
                 (GroupTransfer) or dissolve the group (GroupDissolve) first"
            )));
        }
        self.remove_member(txn, group, &mut rec, user, row)?;
        self.bump(txn, user, changes)?;
        self.put_group(txn, group, rec, changes)
    }

    fn group_remove(
        &self,
        txn: &mut RwTxn,
        by: UserId,
        group: GroupId,
        user: UserId,
        changes: &mut Changes,
    ) -> Result<Outcome> {
        if by == user {
            return Err(Error::InvalidField {
                field: "user",
                reason: "a member does not remove itself: GroupLeave".into(),
            });
        }
        let mut rec = self.group_rw(txn, group)?;
        let by_row = self.manager_rw(txn, group, by)?;
        let row = self.member_rw(txn, group, user)?;
        if by_row.role != GroupRole::Owner && row.role != GroupRole::Member {
            return Err(Error::NotPermitted(format!(
                "user {user} is the {} of group {group}: an admin removes members only",
                row.role.name()
            )));
        }
        self.remove_member(txn, group, &mut rec, user, row)?;
        self.bump(txn, user, changes)?;
        self.put_group(txn, group, rec, changes)
    }

    fn group_set_role(
        &self,
        txn: &mut RwTxn,
        by: UserId,
        group: GroupId,
        user: UserId,
        role: GroupRole,
        changes: &mut Changes,
    ) -> Result<Outcome> {
        if role == GroupRole::Owner {
            return Err(Error::InvalidField {
                field: "role",
                reason: "ownership changes hands by GroupTransfer".into(),
            });
        }
        let rec = self.group_rw(txn, group)?;
        self.owner_rw(txn, group, by)?;
        let mut row = self.member_rw(txn, group, user)?;
        if row.role == GroupRole::Owner {
            return Err(Error::InvalidField {
                field: "user",
                reason: "the owner's role changes by GroupTransfer only".into(),
            });
        }
        if row.role == role {
            return Ok(Outcome::Done);
        }
        row.role = role;
        self.put_member(txn, group, user, &row)?;
        self.put_group(txn, group, rec, changes)
    }

    fn group_transfer(
        &self,
        txn: &mut RwTxn,
        by: UserId,
        group: GroupId,
        to: UserId,
        changes: &mut Changes,
    ) -> Result<Outcome> {
        if by == to {
            return Err(Error::InvalidField {
                field: "to",
                reason: "the owner already owns the group".into(),
            });
        }
        let mut rec = self.group_rw(txn, group)?;
        let mut by_row = self.owner_rw(txn, group, by)?;
        let mut to_row = self.member_rw(txn, group, to)?;
        by_row.role = GroupRole::Admin;
        to_row.role = GroupRole::Owner;
        rec.owner = to;
        self.put_member(txn, group, by, &by_row)?;
        self.put_member(txn, group, to, &to_row)?;
        self.put_group(txn, group, rec, changes)
    }

    fn group_rename(
        &self,
        txn: &mut RwTxn,
        by: UserId,
        group: GroupId,
        name: Option<String>,
        topic: Option<String>,
        changes: &mut Changes,
    ) -> Result<Outcome> {
        let mut rec = self.group_rw(txn, group)?;
        self.manager_rw(txn, group, by)?;
        let mut changed = false;
        for (new, old) in [(name, &mut rec.name), (topic, &mut rec.topic)] {
            if let Some(new) = new.filter(|n| n != old) {
                *old = new;
                changed = true;
            }
        }
        if !changed {
            return Ok(Outcome::Done);
        }
        self.put_group(txn, group, rec, changes)
    }

    /// Delete the group and everything naming it; bump every member's and
    /// invitee's version; `GroupChanged` with the version after the last.
    fn group_dissolve(
        &self,
        txn: &mut RwTxn,
        by: UserId,
        group: GroupId,
        changes: &mut Changes,
    ) -> Result<Outcome> {
        let mut rec = self.group_rw(txn, group)?;
        self.owner_rw(txn, group, by)?;
        let members = self.member_rows(txn, group)?;
        for &(user, row) in &members {
            self.remove_member(txn, group, &mut rec, user, row)?;
        }
        let invitees = seconds(&self.group_invitees, txn, group)?;
        for &invitee in &invitees {
            self.delete_invite(txn, invitee, group)?;
        }
        for user in seconds(&self.group_joins, txn, group)? {
            self.group_joins.delete(txn, &pair_key(group, user))?;
        }
        self.groups.delete(txn, &group)?;
        for user in members.iter().map(|&(u, _)| u).chain(invitees) {
            self.bump(txn, user, changes)?;
        }
        changes.push(Event::GroupChanged {
            group,
            version: rec.version + 1,
        });
        Ok(Outcome::Done)
    }

    /// Move `user`'s cursor up to `up_to_seq` (never back); touches
    /// `group_cursors` only when it moves. No version, no event.
    fn group_read(
        &self,
        txn: &mut RwTxn,
        user: UserId,
        group: GroupId,
        up_to_seq: u64,
    ) -> Result<Outcome> {
        let Some(mut row) = self.member_in(txn, group, user)? else {
            self.group_rw(txn, group)?;
            return Err(not_member(user, group));
        };
        if up_to_seq > row.read_seq {
            self.group_cursors
                .delete(txn, &cursor_key(group, row.read_seq, user))?;
            self.group_cursors
                .put(txn, &cursor_key(group, up_to_seq, user), &[])?;
            row.read_seq = up_to_seq;
            self.put_member(txn, group, user, &row)?;
        }
        Ok(Outcome::Read {
            read_seq: row.read_seq,
            min_read_seq: self.min_read_seq_in(txn, group)?,
        })
    }
}
