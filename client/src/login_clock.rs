//! The `login_ns` a login carries (`proto::app::Login`): the wall clock in
//! nanoseconds since the Unix epoch, and strictly greater than every one
//! this process handed out before, whatever the clock does (a step back
//! after an NTP correction included), so two logins of one process never
//! carry the same or a decreasing value.

use std::sync::atomic::{AtomicU64, Ordering};

static LAST_NS: AtomicU64 = AtomicU64::new(0);

/// Nanoseconds since the Unix epoch by the system clock (0 before it).
pub fn wall_ns() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
}

/// The next `login_ns`: at least `floor_ns + 1` (a gateway said the
/// user's last accepted login was `floor_ns`; 0 when nothing is known),
/// at least the wall clock, and above every value returned before.
pub fn next_login_ns(floor_ns: u64) -> u64 {
    let wanted = wall_ns().max(floor_ns.saturating_add(1));
    let previous = LAST_NS
        .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |last| {
            Some(wanted.max(last.saturating_add(1)))
        })
        .expect("the closure always returns Some");
    wanted.max(previous.saturating_add(1))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_only_grow_and_respect_the_floor() {
        let a = next_login_ns(0);
        let b = next_login_ns(0);
        assert!(b > a);
        let far = wall_ns() + 3_600_000_000_000;
        let c = next_login_ns(far);
        assert!(c > far);
        assert!(next_login_ns(0) > c, "a later call never goes back");
    }
}
