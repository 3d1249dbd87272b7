//! The outcomes of recently settled sends, by (sender, message id), so a
//! retry is answered with its first outcome and neither pushed nor stored
//! again. Bounded: the oldest entry goes first (a FIFO ring beside a hash
//! map, both O(1) per message).

use crate::server::SendKey;
use proto::app::SendOutcome;
use std::collections::{HashMap, VecDeque};

pub type FastMap<K, V> = HashMap<K, V, foldhash::fast::RandomState>;

pub struct RecentSends {
    outcomes: FastMap<SendKey, SendOutcome>,
    order: VecDeque<SendKey>,
    max: usize,
}

impl RecentSends {
    pub fn new(max: usize) -> Self {
        assert!(max >= 1);
        RecentSends {
            outcomes: FastMap::default(),
            order: VecDeque::new(),
            max,
        }
    }

    pub fn get(&self, key: &SendKey) -> Option<SendOutcome> {
        self.outcomes.get(key).copied()
    }

    pub fn insert(&mut self, key: SendKey, outcome: SendOutcome) {
        if self.outcomes.insert(key, outcome).is_some() {
            return; // already remembered (and queued)
        }
        self.order.push_back(key);
        if self.order.len() > self.max {
            let oldest = self
                .order
                .pop_front()
                .expect("over the limit, so not empty");
            self.outcomes.remove(&oldest);
        }
        debug_assert_eq!(self.order.len(), self.outcomes.len());
    }

    pub fn len(&self) -> usize {
        self.outcomes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.outcomes.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn remembers_up_to_the_limit_and_forgets_the_oldest_first() {
        let mut r = RecentSends::new(2);
        r.insert((1, 1), SendOutcome::Delivered);
        r.insert((1, 2), SendOutcome::Stored { seq: 5 });
        r.insert((1, 1), SendOutcome::Delivered); // again: no second slot
        assert_eq!(r.len(), 2);
        r.insert((2, 1), SendOutcome::Delivered);
        assert_eq!(r.len(), 2);
        assert_eq!(r.get(&(1, 1)), None, "the oldest went");
        assert_eq!(r.get(&(1, 2)), Some(SendOutcome::Stored { seq: 5 }));
        assert_eq!(r.get(&(2, 1)), Some(SendOutcome::Delivered));
    }
}
