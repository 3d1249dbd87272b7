//! Bounded memories of recent things, the oldest forgotten first (a FIFO
//! ring beside a hash map, both O(1) per entry): the outcomes of recently
//! settled sends, by (sender, message id), so a retry is answered with its
//! first outcome and not stored again; and the newest profile versions
//! recently invalidated, by user.

use proto::app::SendOutcome;
use std::{
    collections::{HashMap, VecDeque},
    hash::Hash,
};

pub type FastMap<K, V> = HashMap<K, V, foldhash::fast::RandomState>;
pub type FastSet<K> = std::collections::HashSet<K, foldhash::fast::RandomState>;

/// (sender, message id): what makes a message unique.
pub type SendKey = (u64, u128);

/// Outcomes of recently settled sends.
pub type RecentSends = Recent<SendKey, SendOutcome>;

/// At most `max` entries; inserting one more forgets the oldest.
pub struct Recent<K, V> {
    values: FastMap<K, V>,
    order: VecDeque<K>,
    max: usize,
}

impl<K: Hash + Eq + Copy, V: Copy> Recent<K, V> {
    pub fn new(max: usize) -> Self {
        assert!(max >= 1);
        Recent {
            values: FastMap::default(),
            order: VecDeque::new(),
            max,
        }
    }

    pub fn get(&self, key: &K) -> Option<V> {
        self.values.get(key).copied()
    }

    /// Remember `value` for `key` (replacing an older value of the same key,
    /// which keeps its place in the order).
    pub fn insert(&mut self, key: K, value: V) {
        if self.values.insert(key, value).is_some() {
            return; // already remembered (and queued)
        }
        self.order.push_back(key);
        if self.order.len() > self.max {
            let oldest = self
                .order
                .pop_front()
                .expect("over the limit, so not empty");
            self.values.remove(&oldest);
        }
        debug_assert_eq!(self.order.len(), self.values.len());
    }

    pub fn len(&self) -> usize {
        self.values.len()
    }

    pub fn is_empty(&self) -> bool {
        self.values.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn remembers_up_to_the_limit_and_forgets_the_oldest_first() {
        let mut r = RecentSends::new(2);
        r.insert((1, 1), SendOutcome { seq: 1 });
        r.insert((1, 2), SendOutcome { seq: 5 });
        r.insert((1, 1), SendOutcome { seq: 1 }); // again: no second slot
        assert_eq!(r.len(), 2);
        r.insert((2, 1), SendOutcome { seq: 2 });
        assert_eq!(r.len(), 2);
        assert_eq!(r.get(&(1, 1)), None, "the oldest went");
        assert_eq!(r.get(&(1, 2)), Some(SendOutcome { seq: 5 }));
        assert_eq!(r.get(&(2, 1)), Some(SendOutcome { seq: 2 }));
    }
}
