//! The sliding replay window over datagram counters (RFC 6479 in spirit,
//! one 128-bit word): checked after decryption, updated only for datagrams
//! that were authentic and fully valid.

use super::config::REPLAY_WINDOW_COUNTERS;

#[derive(Debug, Default, Clone)]
pub struct ReplayWindow {
    /// One more than the highest counter accepted (0: none yet).
    next: u64,
    /// Bit i set: counter `next - 1 - i` was accepted.
    seen: u128,
}

impl ReplayWindow {
    /// Whether `counter` is new and inside the window (no state change).
    pub fn check(&self, counter: u64) -> bool {
        if counter >= self.next {
            return true;
        }
        let behind = self.next - 1 - counter;
        behind < REPLAY_WINDOW_COUNTERS && self.seen & (1u128 << behind) == 0
    }

    /// Record `counter` (which `check` accepted). Returns whether it is the
    /// newest counter so far.
    pub fn accept(&mut self, counter: u64) -> bool {
        debug_assert!(self.check(counter));
        if counter >= self.next {
            let shift = counter + 1 - self.next;
            self.seen = if shift >= 128 { 0 } else { self.seen << shift };
            self.seen |= 1;
            self.next = counter + 1;
            true
        } else {
            self.seen |= 1u128 << (self.next - 1 - counter);
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn duplicates_and_too_old_counters_are_refused() {
        let mut w = ReplayWindow::default();
        assert!(w.check(0));
        assert!(w.accept(0));
        assert!(!w.check(0));
        assert!(w.accept(5));
        assert!(w.check(3));
        assert!(!w.accept(3));
        assert!(!w.check(3));
        assert!(w.accept(5 + 200));
        assert!(!w.check(5), "beyond the window");
        assert!(w.check(205 - 127));
        assert!(!w.check(205 - 128));
    }

    proptest! {
        #[test]
        fn each_counter_is_accepted_at_most_once(counters in proptest::collection::vec(0u64..400, 1..300)) {
            let mut w = ReplayWindow::default();
            let mut accepted = std::collections::HashSet::new();
            for c in counters {
                if w.check(c) {
                    prop_assert!(accepted.insert(c), "counter {} accepted twice", c);
                    w.accept(c);
                }
            }
        }
    }
}
