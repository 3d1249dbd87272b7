//! Rate limiting in virtual time: governor's limiters driven by the `now`
//! a sans-IO machine is given, never by a real clock.
//!
//! [`Clock`] keeps a governor [`FakeRelativeClock`] in step with the
//! `Instant`s passed in; limiters built with [`Clock::governor`] read it.
//! Used by the session endpoint's per-source handshake limit and by the
//! gateway's router (messages per user).

use governor::{
    clock::FakeRelativeClock, middleware::NoOpMiddleware, nanos::Nanos,
    state::keyed::HashMapStateStore, Quota, RateLimiter,
};
use std::{num::NonZeroU32, time::Instant};

/// A keyed rate limiter (one bucket per key, in a `HashMap`) on virtual
/// time. Its memory grows with the keys seen: call `retain_recent`.
pub type KeyedLimiter<K> =
    RateLimiter<K, HashMapStateStore<K>, FakeRelativeClock, NoOpMiddleware<Nanos>>;

/// The governor clock, advanced to each `now` the owner is given (never
/// backwards: an earlier `now` leaves it where it is).
#[derive(Debug, Clone)]
pub struct Clock {
    clock: FakeRelativeClock,
    at: Instant,
}

impl Clock {
    /// A clock that reads 0 at `now`.
    pub fn new(now: Instant) -> Clock {
        Clock {
            clock: FakeRelativeClock::default(),
            at: now,
        }
    }

    /// The governor clock to build limiters with (a handle to this one).
    pub fn governor(&self) -> FakeRelativeClock {
        self.clock.clone()
    }

    /// Move the clock forward to `now`.
    pub fn advance_to(&mut self, now: Instant) {
        if now > self.at {
            self.clock.advance(now - self.at);
            self.at = now;
        }
    }

    /// A keyed limiter on this clock.
    pub fn keyed<K: std::hash::Hash + Eq + Clone>(&self, quota: Quota) -> KeyedLimiter<K> {
        RateLimiter::hashmap_with_clock(quota, self.governor())
    }
}

/// `per_s` per second with bursts of `burst` (each at least 1).
pub fn quota(per_s: u32, burst: u32) -> Quota {
    let n = |v: u32| NonZeroU32::new(v.max(1)).expect("at least 1");
    Quota::per_second(n(per_s)).allow_burst(n(burst))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn limiters_refill_with_the_time_passed_in_only() {
        let t0 = Instant::now();
        let mut clock = Clock::new(t0);
        let limiter: KeyedLimiter<u8> = clock.keyed(quota(2, 2));
        assert!(limiter.check_key(&1).is_ok());
        assert!(limiter.check_key(&1).is_ok());
        assert!(limiter.check_key(&1).is_err(), "burst used up");
        assert!(limiter.check_key(&2).is_ok(), "other keys are separate");
        clock.advance_to(t0 + Duration::from_millis(500));
        assert!(limiter.check_key(&1).is_ok(), "one token back after 0.5 s");
        assert!(limiter.check_key(&1).is_err());
        clock.advance_to(t0); // never backwards
        assert!(limiter.check_key(&1).is_err());
        clock.advance_to(t0 + Duration::from_secs(5));
        limiter.retain_recent();
        assert!(limiter.is_empty(), "full buckets are forgotten");
    }
}
