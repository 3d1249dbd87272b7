//! The sliding replay window over datagram counters (RFC 6479 in spirit,
//! one 128-bit word): checked after decryption, updated only for datagrams
//! that were authentic and fully valid.

use super::config::{COUNTER_LIMIT, REPLAY_WINDOW_COUNTERS};

#[derive(Debug, Default, Clone)]
pub struct ReplayWindow {
    /// One more than the highest counter accepted (0: none yet).
    next: u64,
    /// Bit i set: counter `next - 1 - i` was accepted.
    seen: u128,
}

impl ReplayWindow {
    /// Whether `counter` is new and inside the window (no state change).
    /// A counter at or past `COUNTER_LIMIT` is never valid: a sender closes
    /// its session before it gets there (and `counter + 1` must not
    /// overflow).
    pub fn check(&self, counter: u64) -> bool {
        if counter >= COUNTER_LIMIT {
            return false;
        }
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

    #[test]
    fn counters_past_the_limit_are_refused_not_overflowed() {
        let mut w = ReplayWindow::default();
        assert!(
            !w.check(u64::MAX),
            "an authentic datagram cannot reset the window"
        );
        assert!(!w.check(COUNTER_LIMIT));
        assert!(w.check(COUNTER_LIMIT - 1));
        assert!(w.accept(COUNTER_LIMIT - 1));
        assert!(!w.check(COUNTER_LIMIT - 1));
    }

    proptest! {
        #[test]
        fn any_counter_is_checked_without_panicking(c in any::<u64>(), prior in any::<u64>()) {
            let mut w = ReplayWindow::default();
            if w.check(prior) {
                w.accept(prior);
            }
            if w.check(c) {
                w.accept(c);
            }
        }

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
