//! What this client has shown, kept across its connections.
//!
//! A message is deleted from its mailbox (a group's cursor moved) only once
//! its acknowledgement arrives. One whose acknowledgement was lost (the
//! connection ended during a gateway's pause, or the application closed it
//! while the gateway was away) is delivered again after the next login.
//! [`ShownMarks`] remember, per mailbox, the highest seq handed to the
//! application; a connection made with the same marks never shows those
//! seqs again and acknowledges them once more. Seqs only grow in a mailbox
//! and are never given twice, so one number per mailbox is enough.
//!
//! The marks live as long as the application keeps them: give every
//! connection of one account the same `ShownMarks` (clone the
//! `SdkConfig`, or set `SdkConfig::shown`). To keep them across restarts,
//! save [`ShownMarks::to_bytes`] and load it with
//! [`ShownMarks::from_bytes`].

use proto::groups::GroupId;
use serde::{Deserialize, Serialize};
use std::{
    collections::BTreeMap,
    sync::{Arc, Mutex},
};

/// Mailboxes remembered at most (the user's own and one per group, as
/// many as a user may be in, with room to spare); past it the lowest group
/// ids are forgotten (their messages may then be shown again).
pub const SHOWN_MAILBOXES_MAX: usize = 1024;

/// A mailbox of the user.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Mailbox {
    /// The user's own (1:1 messages).
    Direct,
    /// A chat group's.
    Group(GroupId),
}

/// The highest seq shown per mailbox; cheap to clone (clones share).
#[derive(Debug, Clone, Default)]
pub struct ShownMarks {
    marks: Arc<Mutex<BTreeMap<Mailbox, u64>>>,
}

impl ShownMarks {
    pub fn new() -> ShownMarks {
        ShownMarks::default()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<Mailbox, u64>> {
        self.marks.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The highest seq of `mailbox` shown (0: none).
    pub fn get(&self, mailbox: Mailbox) -> u64 {
        self.lock().get(&mailbox).copied().unwrap_or(0)
    }

    /// `seq` of `mailbox` was handed to the application.
    pub(crate) fn record(&self, mailbox: Mailbox, seq: u64) {
        let mut marks = self.lock();
        let mark = marks.entry(mailbox).or_default();
        *mark = (*mark).max(seq);
        while marks.len() > SHOWN_MAILBOXES_MAX {
            let Some(first_group) = marks
                .keys()
                .find(|m| matches!(m, Mailbox::Group(_)))
                .copied()
            else {
                break;
            };
            marks.remove(&first_group);
        }
    }

    /// The marks as bytes, to save.
    pub fn to_bytes(&self) -> Vec<u8> {
        let marks: Vec<(Mailbox, u64)> = self.lock().iter().map(|(m, s)| (*m, *s)).collect();
        postcard::to_allocvec(&marks).expect("marks encode")
    }

    /// Marks saved by [`ShownMarks::to_bytes`]; `None` if `bytes` are not.
    pub fn from_bytes(bytes: &[u8]) -> Option<ShownMarks> {
        let marks: Vec<(Mailbox, u64)> = postcard::from_bytes(bytes).ok()?;
        if marks.len() > SHOWN_MAILBOXES_MAX {
            return None;
        }
        Some(ShownMarks {
            marks: Arc::new(Mutex::new(marks.into_iter().collect())),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn marks_only_grow_and_survive_bytes() {
        let marks = ShownMarks::new();
        marks.record(Mailbox::Direct, 5);
        marks.record(Mailbox::Direct, 3);
        marks.record(Mailbox::Group(1 << 63 | 7), 9);
        assert_eq!(marks.get(Mailbox::Direct), 5);
        let back = ShownMarks::from_bytes(&marks.to_bytes()).unwrap();
        assert_eq!(back.get(Mailbox::Direct), 5);
        assert_eq!(back.get(Mailbox::Group(1 << 63 | 7)), 9);
        assert_eq!(back.get(Mailbox::Group(1)), 0);
    }

    #[test]
    fn past_the_limit_the_lowest_groups_are_forgotten() {
        let marks = ShownMarks::new();
        marks.record(Mailbox::Direct, 1);
        for g in 0..SHOWN_MAILBOXES_MAX as u64 + 5 {
            marks.record(Mailbox::Group(g), 1);
        }
        assert_eq!(marks.lock().len(), SHOWN_MAILBOXES_MAX);
        assert_eq!(marks.get(Mailbox::Direct), 1, "the user's own stays");
        assert_eq!(marks.get(Mailbox::Group(0)), 0);
    }

    proptest! {
        /// Whatever bytes are loaded, the answer is marks or `None`.
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
            let _ = ShownMarks::from_bytes(&bytes);
        }
    }
}
