//! The values stored in LMDB, each a postcard-encoded struct (field order
//! as declared; layout in `docs/STORAGE.md`).

use crate::{error::Error, Result};
use proto::{
    groups::GroupRole,
    profile::{AvatarHash, UserId},
};
use serde::{de::DeserializeOwned, Deserialize, Serialize};

/// `accounts`: user id -> this.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AccountRecord {
    pub username: String,
    /// argon2id PHC string.
    pub phc: String,
    pub disabled: bool,
    pub created_ms: u64,
}

/// `profiles`: user id -> this.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct ProfileRecord {
    /// The account's username (never changes), kept here so a profile is
    /// one read.
    pub username: String,
    pub nickname: String,
    pub signature: String,
    pub avatar: Option<AvatarHash>,
    /// Increases on every change of this record, of the user's friends,
    /// pending requests or block list, and of its credentials (password,
    /// `disabled`): whatever a cache of the user holds.
    pub version: u64,
}

/// `friends`: user id -> this (absent: no friends, no groups).
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct FriendsRecord {
    pub groups: Vec<GroupRecord>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GroupRecord {
    pub name: String,
    pub members: Vec<UserId>,
}

impl FriendsRecord {
    pub fn count(&self) -> usize {
        self.groups.iter().map(|g| g.members.len()).sum()
    }

    pub fn contains(&self, user: UserId) -> bool {
        self.groups.iter().any(|g| g.members.contains(&user))
    }

    /// Remove `user` from whichever group holds it; whether it was there.
    /// Groups left empty stay (they are the user's own).
    pub fn remove(&mut self, user: UserId) -> bool {
        for g in &mut self.groups {
            if let Some(i) = g.members.iter().position(|&m| m == user) {
                g.members.remove(i);
                return true;
            }
        }
        false
    }

    /// Add `user` to `group` (created if missing). The caller checks limits
    /// with [`FriendsRecord::would_add_group`].
    pub fn add(&mut self, user: UserId, group: &str) {
        match self.groups.iter_mut().find(|g| g.name == group) {
            Some(g) => g.members.push(user),
            None => self.groups.push(GroupRecord {
                name: group.to_owned(),
                members: vec![user],
            }),
        }
    }

    pub fn would_add_group(&self, group: &str) -> bool {
        !self.groups.iter().any(|g| g.name == group)
    }

    /// Every friend, whatever the group, sorted ascending.
    pub fn sorted_members(&self) -> Vec<UserId> {
        let mut all: Vec<UserId> = self
            .groups
            .iter()
            .flat_map(|g| g.members.iter().copied())
            .collect();
        all.sort_unstable();
        all
    }
}

/// `blocks`: user id -> this (absent: blocks nobody). Sorted ascending,
/// no duplicates, so a check is a binary search and the list goes out in
/// [`proto::profile::Relations`] as stored.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct BlocksRecord {
    pub blocked: Vec<UserId>,
}

impl BlocksRecord {
    pub fn contains(&self, user: UserId) -> bool {
        self.blocked.binary_search(&user).is_ok()
    }

    /// Add `user` in its place; whether it was new. The caller checks
    /// `blocks_max`.
    pub fn insert(&mut self, user: UserId) -> bool {
        match self.blocked.binary_search(&user) {
            Ok(_) => false,
            Err(i) => {
                self.blocked.insert(i, user);
                true
            }
        }
    }

    /// Remove `user`; whether it was there.
    pub fn remove(&mut self, user: UserId) -> bool {
        match self.blocked.binary_search(&user) {
            Ok(i) => {
                self.blocked.remove(i);
                true
            }
            Err(_) => false,
        }
    }
}

/// `groups`: group id -> this (absent: no such group, or dissolved).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChatGroupRecord {
    pub name: String,
    pub topic: String,
    /// Increases on every change of the name, topic, members, roles or
    /// join requests (not on cursor moves).
    pub version: u64,
    pub created_ms: u64,
    /// The one member whose role is `Owner`.
    pub owner: UserId,
    /// Rows of `group_members` with this group's prefix, kept here so a
    /// group list and the `group_members_max` check need no count.
    pub members: u32,
}

/// `group_members`: group ++ user -> this.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemberRecord {
    pub role: GroupRole,
    /// The member's cursor; `group_cursors` holds the same number.
    pub read_seq: u64,
    pub joined_ms: u64,
}

pub fn encode<T: Serialize>(value: &T) -> Result<Vec<u8>> {
    postcard::to_stdvec(value).map_err(|e| Error::Corrupt(format!("cannot encode: {e}")))
}

pub fn decode<T: DeserializeOwned>(what: &str, bytes: &[u8]) -> Result<T> {
    proto::frame::decode_body(bytes).map_err(|e| Error::Corrupt(format!("{what}: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn friends_record_add_remove_and_layout() {
        let mut f = FriendsRecord::default();
        f.add(7, "Friends");
        f.add(9, "Work");
        f.add(8, "Friends");
        assert_eq!(f.count(), 3);
        assert!(f.remove(7));
        assert!(!f.remove(7));
        assert_eq!(f.groups.len(), 2);
        // groups: 2 entries; "Friends" [8]; "Work" [9]
        let bytes = encode(&f).unwrap();
        assert_eq!(
            bytes,
            [&[2, 7][..], b"Friends", &[1, 8, 4], b"Work", &[1, 9]].concat()
        );
        assert_eq!(decode::<FriendsRecord>("friends", &bytes).unwrap(), f);
        assert!(decode::<FriendsRecord>("friends", &[5]).is_err());
        f.add(3, "Work");
        assert_eq!(f.sorted_members(), [3, 8, 9]);
    }

    #[test]
    fn blocks_record_stays_sorted_without_duplicates() {
        let mut b = BlocksRecord::default();
        assert!(b.insert(300) && b.insert(7) && b.insert(9));
        assert!(!b.insert(7), "already blocked");
        assert_eq!(b.blocked, [7, 9, 300]);
        assert!(b.contains(9) && !b.contains(8));
        assert!(b.remove(9) && !b.remove(9));
        // blocked: 2 entries, varints 7 and 300.
        let bytes = encode(&b).unwrap();
        assert_eq!(bytes, [2, 7, 0xac, 0x02]);
        assert_eq!(decode::<BlocksRecord>("blocks", &bytes).unwrap(), b);
    }

    #[test]
    fn group_records_layout() {
        let g = ChatGroupRecord {
            name: "ab".into(),
            topic: String::new(),
            version: 3,
            created_ms: 300,
            owner: 5,
            members: 2,
        };
        let bytes = encode(&g).unwrap();
        assert_eq!(bytes, [2, b'a', b'b', 0, 3, 0xac, 0x02, 5, 2]);
        assert_eq!(decode::<ChatGroupRecord>("group", &bytes).unwrap(), g);
        let m = MemberRecord {
            role: GroupRole::Admin,
            read_seq: 300,
            joined_ms: 1,
        };
        // role: variant 1; read_seq 300; joined_ms 1.
        assert_eq!(encode(&m).unwrap(), [1, 0xac, 0x02, 1]);
    }
}
