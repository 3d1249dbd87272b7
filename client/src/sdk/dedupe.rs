//! Receivers drop a message they have already shown: a bounded memory of
//! the last `capacity` (sender, message id) pairs seen, oldest forgotten
//! first.

use std::collections::{HashSet, VecDeque};

pub(crate) struct Dedupe {
    seen: HashSet<(u64, u128)>,
    order: VecDeque<(u64, u128)>,
    capacity: usize,
}

impl Dedupe {
    pub(crate) fn new(capacity: usize) -> Self {
        assert!(capacity > 0, "dedupe capacity must be positive");
        Dedupe {
            seen: HashSet::new(),
            order: VecDeque::new(),
            capacity,
        }
    }

    /// True the first time a (sender, id) pair is offered while it is
    /// remembered; false for a duplicate.
    pub(crate) fn first_time(&mut self, from: u64, msg_id: u128) -> bool {
        if !self.seen.insert((from, msg_id)) {
            return false;
        }
        self.order.push_back((from, msg_id));
        if self.order.len() > self.capacity {
            let oldest = self.order.pop_front().expect("over capacity");
            self.seen.remove(&oldest);
        }
        debug_assert_eq!(self.seen.len(), self.order.len());
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn duplicates_are_refused_and_the_oldest_is_forgotten_at_capacity() {
        let mut d = Dedupe::new(2);
        assert!(d.first_time(1, 10));
        assert!(!d.first_time(1, 10));
        assert!(d.first_time(2, 10), "same id from another sender is new");
        assert!(d.first_time(1, 11)); // forgets (1, 10)
        assert!(!d.first_time(1, 11));
        assert!(d.first_time(1, 10), "forgotten beyond capacity");
        assert_eq!(d.seen.len(), 2);
    }
}
