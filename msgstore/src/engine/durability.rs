//! Which deferred log writes are durable yet.
//!
//! Under `always` the server hands each closed batch's log write to a writer
//! thread ([`super::Engine::end_batch_deferred`]) and goes on; under sustained
//! load some write is always in flight. A checkpoint covers the log up to
//! its start, so it may start while writes are in flight only if it waits,
//! before committing the index, until every write issued before its start
//! is durable: otherwise the index could take a state whose log write then
//! fails. This is that wait. Writers report here themselves, so the wait
//! never depends on the engine's thread (which may itself be waiting for
//! the checkpoint).
//!
//! Limit: at most [`WRITES_OUTSTANDING_MAX`] writes are outstanding (the
//! server runs at most `log_writes_inflight_max` <= 64).

use std::{
    collections::BTreeSet,
    sync::{Arc, Condvar, Mutex, MutexGuard},
};

/// Most deferred writes issued and not finished at once.
pub(crate) const WRITES_OUTSTANDING_MAX: usize = 1024;

#[derive(Default)]
pub(crate) struct LogDurability {
    state: Mutex<State>,
    changed: Condvar,
}

#[derive(Default)]
struct State {
    /// Number of the last write issued (writes are numbered from 1).
    issued: u64,
    /// Writes issued and not finished.
    outstanding: BTreeSet<u64>,
    /// The first failure: every later wait fails with it.
    failed: Option<String>,
}

/// One issued write; finishing it (or dropping it unfinished, which counts
/// as a failure) reports to its [`LogDurability`].
pub(crate) struct WriteTicket {
    durability: Arc<LogDurability>,
    number: u64,
    finished: bool,
}

impl LogDurability {
    fn lock(&self) -> MutexGuard<'_, State> {
        // The state is a set and a number: always consistent between calls.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Issue the next write.
    pub(crate) fn issue(self: &Arc<Self>) -> WriteTicket {
        let mut state = self.lock();
        state.issued += 1;
        let number = state.issued;
        state.outstanding.insert(number);
        assert!(
            state.outstanding.len() <= WRITES_OUTSTANDING_MAX,
            "more log writes outstanding than WRITES_OUTSTANDING_MAX"
        );
        WriteTicket {
            durability: self.clone(),
            number,
            finished: false,
        }
    }

    /// Number of the last write issued: a checkpoint starting now waits for
    /// this one and every earlier one.
    pub(crate) fn issued(&self) -> u64 {
        self.lock().issued
    }

    /// Block until every write numbered `up_to` or lower is durable; the
    /// first failure's message if any write failed.
    pub(crate) fn wait_durable(&self, up_to: u64) -> Result<(), String> {
        let mut state = self.lock();
        loop {
            if let Some(e) = &state.failed {
                return Err(e.clone());
            }
            if state.outstanding.first().is_none_or(|&n| n > up_to) {
                return Ok(());
            }
            state = self.changed.wait(state).unwrap_or_else(|p| p.into_inner());
        }
    }

    fn finish(&self, number: u64, result: Result<(), &str>) {
        let mut state = self.lock();
        let was_outstanding = state.outstanding.remove(&number);
        debug_assert!(was_outstanding, "a write finished twice");
        if let Err(e) = result {
            state.failed.get_or_insert_with(|| e.to_string());
        }
        drop(state);
        self.changed.notify_all();
    }
}

impl WriteTicket {
    /// The write is done: durable, or failed with `result`'s message.
    pub(crate) fn finish(mut self, result: Result<(), &str>) {
        self.finished = true;
        self.durability.finish(self.number, result);
    }
}

impl Drop for WriteTicket {
    fn drop(&mut self) {
        if !self.finished {
            self.durability
                .finish(self.number, Err("a log write was dropped unperformed"));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn waits_for_every_earlier_write_in_any_order() {
        let d = Arc::new(LogDurability::default());
        let (a, b) = (d.issue(), d.issue());
        let gate = d.issued();
        let later = d.issue();
        let waiter = {
            let d = d.clone();
            std::thread::spawn(move || d.wait_durable(gate))
        };
        b.finish(Ok(()));
        std::thread::sleep(Duration::from_millis(20));
        assert!(!waiter.is_finished(), "write 1 is still outstanding");
        a.finish(Ok(()));
        assert_eq!(waiter.join().unwrap(), Ok(()));
        // A write issued after the gate does not hold it.
        assert_eq!(d.wait_durable(gate), Ok(()));
        later.finish(Ok(()));
    }

    #[test]
    fn a_failed_or_dropped_write_fails_every_wait() {
        let d = Arc::new(LogDurability::default());
        let a = d.issue();
        d.issue().finish(Err("disk gone"));
        assert_eq!(d.wait_durable(d.issued()), Err("disk gone".to_string()));
        drop(a);
        let d = Arc::new(LogDurability::default());
        drop(d.issue());
        assert!(d.wait_durable(1).unwrap_err().contains("dropped"));
    }

    #[test]
    fn nothing_issued_is_durable_at_once() {
        let d = LogDurability::default();
        assert_eq!(d.wait_durable(d.issued()), Ok(()));
    }
}
