//! The sends' answer deadlines in time order. A deadline is `now +
//! timers.send_answer_ms_max`, so they come in non-decreasing order and
//! queue at the back in O(1) (one out of order is put in its place). A
//! send that is answered, or re-armed, leaves its old entry behind (lazy
//! deletion): the owner says which entries are still live, stale ones are
//! dropped from the front as they are met, and the whole queue is
//! compacted once stale entries outnumber live ones by
//! [`STALE_ENTRIES_SLACK`], so it never holds more than twice the live
//! deadlines plus that slack.

use crate::dedupe::SendKey;
use std::{collections::VecDeque, time::Instant};

/// Stale entries tolerated beyond the live ones before a compaction.
pub(crate) const STALE_ENTRIES_SLACK: usize = 1024;

pub(crate) type Entry = (Instant, SendKey);

#[derive(Default)]
pub(crate) struct Deadlines {
    queue: VecDeque<Entry>,
}

impl Deadlines {
    pub(crate) fn push(&mut self, at: Instant, key: SendKey) {
        match self.queue.back() {
            Some(&(last, _)) if last > at => {
                let pos = self.queue.partition_point(|&(t, _)| t <= at);
                self.queue.insert(pos, (at, key));
            }
            _ => self.queue.push_back((at, key)),
        }
    }

    /// The earliest entry's time (maybe a stale one: a wake-up early).
    pub(crate) fn first(&self) -> Option<Instant> {
        self.queue.front().map(|&(t, _)| t)
    }

    /// The earliest entry, taken, if its time has come.
    pub(crate) fn pop_due(&mut self, now: Instant) -> Option<Entry> {
        match self.queue.front() {
            Some(&(at, _)) if at <= now => self.queue.pop_front(),
            _ => None,
        }
    }

    /// Drop the stale entries at the front; compact everything when stale
    /// entries outnumber the `live` ones by more than the slack.
    pub(crate) fn tidy(&mut self, live: usize, is_live: impl Fn(&Entry) -> bool) {
        while self.queue.front().is_some_and(|e| !is_live(e)) {
            self.queue.pop_front();
        }
        if self.queue.len() > 2 * live + STALE_ENTRIES_SLACK {
            self.queue.retain(|e| is_live(e));
        }
        debug_assert!(self.queue.len() <= 2 * live + STALE_ENTRIES_SLACK);
    }

    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.queue.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::{collections::HashMap, time::Duration};

    #[test]
    fn entries_come_out_in_time_order_even_when_pushed_out_of_order() {
        let t0 = Instant::now();
        let at = |ms| t0 + Duration::from_millis(ms);
        let mut d = Deadlines::default();
        for (ms, k) in [(10, 1), (20, 2), (15, 3), (20, 4), (5, 5)] {
            d.push(at(ms), (k, 0));
        }
        assert_eq!(d.first(), Some(at(5)));
        assert!(d.pop_due(at(4)).is_none());
        let keys: Vec<u64> = std::iter::from_fn(|| d.pop_due(at(20)))
            .map(|(_, k)| k.0)
            .collect();
        assert_eq!(keys, [5, 1, 3, 2, 4], "by time, then in push order");
    }

    #[test]
    fn stale_entries_stay_bounded_by_the_live_ones() {
        let t0 = Instant::now();
        let mut d = Deadlines::default();
        let mut live: HashMap<SendKey, Instant> = HashMap::new();
        // Every send answered out of order, its entry left behind; one in
        // 100 stays pending.
        for i in 0..100_000u64 {
            let (key, at) = ((i, 0), t0 + Duration::from_micros(i));
            d.push(at, key);
            live.insert(key, at);
            if i % 100 != 0 {
                live.remove(&(i - i % 7, 0));
                live.remove(&key);
            }
            let is_live = |e: &Entry| live.get(&e.1) == Some(&e.0);
            d.tidy(live.len(), is_live);
            assert!(d.len() <= 2 * live.len() + STALE_ENTRIES_SLACK);
        }
        // Every live deadline is still there, in order.
        let mut due = Vec::new();
        while let Some(e) = d.pop_due(t0 + Duration::from_secs(1)) {
            if live.get(&e.1) == Some(&e.0) {
                due.push(e.1);
            }
        }
        assert_eq!(due.len(), live.len());
        assert!(due.windows(2).all(|w| w[0].0 < w[1].0));
    }
}
