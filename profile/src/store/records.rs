//! The values stored in LMDB, each a postcard-encoded struct (field order
//! as declared; layout in `docs/STORAGE.md`).

use crate::{error::Error, Result};
use proto::profile::{AvatarHash, UserId};
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
}
