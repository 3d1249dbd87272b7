//! Holds: after a send of a conversation (sender, recipient) is refused
//! with a retryable error, nothing newer of that conversation may be
//! stored before the refused messages come again, in the order they first
//! arrived. A session delivers a client's requests in the order sent, and a
//! client sends refused messages again in their first order, so every
//! message it sent before it heard of a refusal reaches the gateway while
//! the hold still waits, and is refused (and held) too.

use crate::dedupe::FastMap;
use proto::app::AppErrorCode;
use std::{collections::BTreeMap, time::Instant};

/// (sender, recipient).
pub(crate) type ConvKey = (u64, u64);

/// Messages one hold waits for at most (a client has at most its window
/// of sends on the wire; past this, refusals are not remembered and the
/// hold just runs out).
pub const HOLD_IDS_MAX: usize = 256;

/// A refusal to hold a conversation for.
pub(crate) struct Hold {
    pub msg_id: u128,
    /// When the message first arrived (its place in the order).
    pub arrival: u64,
    /// What later sends are refused with meanwhile.
    pub code: AppErrorCode,
    /// The hold ends by itself then (a message it waits for may never come).
    pub until: Instant,
    /// Whether this refusal moves `until` on (a new failure does; a refusal
    /// by the hold itself does not).
    pub extend: bool,
}

struct Waiting {
    /// arrival -> msg_id.
    by_arrival: BTreeMap<u64, u128>,
    arrivals: FastMap<u128, u64>,
    code: AppErrorCode,
    until: Instant,
}

#[derive(Default)]
pub(crate) struct Holds {
    holds: FastMap<ConvKey, Waiting>,
}

impl Holds {
    /// Hold `conv` for the refused message (kept at its first arrival if it
    /// was held already).
    pub(crate) fn hold(&mut self, conv: ConvKey, h: Hold, now: Instant) {
        let w = self.holds.entry(conv).or_insert_with(|| Waiting {
            by_arrival: BTreeMap::new(),
            arrivals: FastMap::default(),
            code: h.code,
            until: h.until,
        });
        if w.until <= now {
            w.by_arrival.clear();
            w.arrivals.clear();
            w.until = h.until;
        }
        w.code = h.code;
        if h.extend {
            w.until = w.until.max(h.until);
        }
        if w.by_arrival.len() < HOLD_IDS_MAX && !w.arrivals.contains_key(&h.msg_id) {
            w.by_arrival.insert(h.arrival, h.msg_id);
            w.arrivals.insert(h.msg_id, h.arrival);
        }
    }

    /// Whether a send of `msg_id` may go ahead in `conv`: yes if nothing
    /// waits, or if it is the first waiting message (then `Some` of its
    /// first arrival, which it keeps should it be refused again); else the
    /// code to refuse it with.
    pub(crate) fn check(
        &mut self,
        conv: ConvKey,
        msg_id: u128,
        now: Instant,
    ) -> Result<Option<u64>, AppErrorCode> {
        let Some(w) = self.holds.get_mut(&conv) else {
            return Ok(None);
        };
        if w.until <= now {
            self.holds.remove(&conv);
            return Ok(None);
        }
        match w.by_arrival.first_key_value() {
            Some((&arrival, &first)) if first == msg_id => {
                w.by_arrival.pop_first();
                w.arrivals.remove(&msg_id);
                if w.by_arrival.is_empty() {
                    self.holds.remove(&conv);
                }
                Ok(Some(arrival))
            }
            _ => Err(w.code),
        }
    }

    pub(crate) fn forget_expired(&mut self, now: Instant) {
        self.holds.retain(|_, w| w.until > now);
    }

    /// Forget every hold of `sender`'s conversations.
    pub(crate) fn forget_sender(&mut self, sender: u64) {
        self.holds.retain(|(from, _), _| *from != sender);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    const CONV: ConvKey = (1, 2);

    fn refused(msg_id: u128, arrival: u64, until: Instant, extend: bool) -> Hold {
        Hold {
            msg_id,
            arrival,
            code: AppErrorCode::Unavailable,
            until,
            extend,
        }
    }

    #[test]
    fn refused_messages_go_ahead_only_in_their_first_order() {
        let now = Instant::now();
        let until = now + Duration::from_secs(30);
        let mut h = Holds::default();
        assert_eq!(h.check(CONV, 9, now), Ok(None), "nothing held");
        h.hold(CONV, refused(20, 2, until, true), now);
        h.hold(CONV, refused(10, 1, until, true), now);
        assert_eq!(h.check(CONV, 30, now), Err(AppErrorCode::Unavailable));
        assert_eq!(h.check(CONV, 20, now), Err(AppErrorCode::Unavailable));
        assert_eq!(h.check(CONV, 10, now), Ok(Some(1)));
        assert_eq!(h.check(CONV, 20, now), Ok(Some(2)));
        assert_eq!(h.check(CONV, 30, now), Ok(None), "released");
        assert_eq!(h.check((1, 3), 30, now), Ok(None), "other conversations");
    }

    #[test]
    fn a_message_refused_again_keeps_its_place() {
        let now = Instant::now();
        let until = now + Duration::from_secs(30);
        let mut h = Holds::default();
        h.hold(CONV, refused(10, 1, until, true), now);
        h.hold(CONV, refused(20, 2, until, true), now);
        assert_eq!(h.check(CONV, 10, now), Ok(Some(1)));
        h.hold(CONV, refused(10, 1, until, true), now); // failed again
        assert_eq!(h.check(CONV, 20, now), Err(AppErrorCode::Unavailable));
        assert_eq!(h.check(CONV, 10, now), Ok(Some(1)));
    }

    #[test]
    fn a_hold_runs_out_and_only_new_failures_make_it_last() {
        let now = Instant::now();
        let s = Duration::from_secs(1);
        let mut h = Holds::default();
        h.hold(CONV, refused(10, 1, now + 10 * s, true), now);
        // Refused by the hold itself: no longer.
        h.hold(CONV, refused(20, 2, now + 15 * s, false), now + 5 * s);
        assert_eq!(h.check(CONV, 30, now + 11 * s), Ok(None), "ran out");
        h.hold(CONV, refused(10, 1, now + 20 * s, true), now + 12 * s);
        h.hold(CONV, refused(20, 2, now + 25 * s, true), now + 13 * s);
        assert_eq!(
            h.check(CONV, 30, now + 22 * s),
            Err(AppErrorCode::Unavailable)
        );
        h.forget_expired(now + 26 * s);
        assert_eq!(h.check(CONV, 30, now + 26 * s), Ok(None));
    }

    #[test]
    fn a_sender_whose_session_ended_is_held_no_more() {
        let now = Instant::now();
        let mut h = Holds::default();
        h.hold(
            CONV,
            refused(10, 1, now + Duration::from_secs(30), true),
            now,
        );
        h.forget_sender(1);
        assert_eq!(h.check(CONV, 20, now), Ok(None));
    }

    #[test]
    fn a_hold_waits_for_a_bounded_number_of_messages() {
        let now = Instant::now();
        let until = now + Duration::from_secs(30);
        let mut h = Holds::default();
        for i in 0..HOLD_IDS_MAX as u128 + 10 {
            h.hold(CONV, refused(i, i as u64, until, true), now);
        }
        for i in 0..HOLD_IDS_MAX as u128 {
            assert_eq!(h.check(CONV, i, now), Ok(Some(i as u64)));
        }
        assert_eq!(h.check(CONV, 999, now), Ok(None), "the rest were not kept");
    }
}
