//! Chat groups: the ids and the values that travel between the profile
//! service (which keeps groups and members), gateways and clients.
//!
//! A group's messages live once, in the group's mailbox on the shard that
//! consistent hashing picks for the group id; group ids and user ids never
//! collide, because every group id has [`GROUP_ID_BASE`] set and no user id
//! does. Each member has a read cursor (`read_seq`): every group seq up to
//! it was read. Semantics: `docs/PROTOCOL.md` §5.3 "Groups" and §6.7.

use crate::profile::UserId;
use serde::{Deserialize, Serialize};

/// A group id: assigned by the profile service, always `>= GROUP_ID_BASE`.
pub type GroupId = u64;

/// Bit 63: set in every group id and in no user id, so one `u64` names
/// either a user's mailbox or a group's, and consistent hashing places both.
pub const GROUP_ID_BASE: u64 = 1 << 63;

/// Whether `id` names a group (else a user).
pub fn is_group(id: u64) -> bool {
    id & GROUP_ID_BASE != 0
}

/// A member's role. Owner: exactly one per group; may do everything.
/// Admin: approves joins, removes members, renames. Member: reads, writes,
/// invites.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum GroupRole {
    Owner,
    Admin,
    Member,
}

impl GroupRole {
    /// Owner or admin: may approve joins, remove members, rename.
    pub fn manages(self) -> bool {
        matches!(self, GroupRole::Owner | GroupRole::Admin)
    }

    pub fn name(self) -> &'static str {
        match self {
            GroupRole::Owner => "owner",
            GroupRole::Admin => "admin",
            GroupRole::Member => "member",
        }
    }
}

/// One member of a group.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct GroupMember {
    pub user: UserId,
    pub role: GroupRole,
    /// Every group seq up to this was read by the member (its cursor).
    pub read_seq: u64,
}

/// A group as the profile service keeps it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GroupInfo {
    pub group: GroupId,
    pub name: String,
    pub topic: String,
    /// Increases on every change of the group's name, topic, members,
    /// roles or pending join requests (not on cursor moves).
    pub version: u64,
    /// Milliseconds since the Unix epoch.
    pub created_ms: u64,
    /// Every member, sorted by user id.
    pub members: Vec<GroupMember>,
    /// Users who asked to join and wait for an owner or admin, sorted.
    pub joins: Vec<UserId>,
}

impl GroupInfo {
    /// `user`'s entry, if a member.
    pub fn member(&self, user: UserId) -> Option<&GroupMember> {
        self.members
            .binary_search_by_key(&user, |m| m.user)
            .ok()
            .map(|i| &self.members[i])
    }
}

/// One group of a user, as its group list shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GroupMembership {
    pub group: GroupId,
    pub name: String,
    pub role: GroupRole,
    /// The user's cursor in the group.
    pub read_seq: u64,
    /// Members now.
    pub members: u32,
}

/// An invitation waiting for the invitee's answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GroupInvite {
    pub group: GroupId,
    pub name: String,
    /// Who invited.
    pub by: UserId,
}

/// A user's groups and the invitations waiting for it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct UserGroups {
    /// Sorted by group id.
    pub groups: Vec<GroupMembership>,
    /// Sorted by group id.
    pub invites: Vec<GroupInvite>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn group_ids_and_user_ids_never_collide() {
        assert!(is_group(GROUP_ID_BASE));
        assert!(is_group(u64::MAX));
        assert!(!is_group(GROUP_ID_BASE - 1));
        assert!(!is_group(1));
        // A group id is a 10-byte varint: the price of one bit.
        assert_eq!(postcard::to_stdvec(&GROUP_ID_BASE).unwrap().len(), 10);
    }

    #[test]
    fn member_is_found_by_binary_search() {
        let info = GroupInfo {
            group: GROUP_ID_BASE | 1,
            name: "g".into(),
            topic: String::new(),
            version: 1,
            created_ms: 0,
            members: [3u64, 5, 9]
                .iter()
                .map(|&user| GroupMember {
                    user,
                    role: GroupRole::Member,
                    read_seq: 0,
                })
                .collect(),
            joins: vec![],
        };
        assert_eq!(info.member(5).map(|m| m.user), Some(5));
        assert!(info.member(4).is_none());
    }
}
