//! The buffers a batch's log bytes travel in from the engine to a log
//! writer thread, and back.
//!
//! Under `always` each closed batch hands its encoded log entries to a
//! writer thread ([`super::Engine::end_batch_deferred`]). A fresh buffer per
//! batch would regrow from empty on the server thread, copying itself at
//! every doubling and faulting in new pages; instead a writer gives the
//! buffer back when its write is done and the next batch takes it, cleared,
//! capacity kept.
//!
//! Limits: at most [`SPARE_BUFFERS_MAX`] buffers wait here, and a buffer
//! grown past [`KEPT_BUFFER_BYTES_MAX`] (one unusually large batch) is
//! freed instead of kept.

use std::sync::{Mutex, PoisonError};

/// Most buffers kept for reuse (the server runs at most
/// `log_writes_inflight_max` <= 64 writes at once).
pub(crate) const SPARE_BUFFERS_MAX: usize = 64;

/// A buffer with more capacity than this is not kept.
pub(crate) const KEPT_BUFFER_BYTES_MAX: usize = 8 << 20;

#[derive(Default)]
pub(crate) struct LogBuffers {
    spare: Mutex<Vec<Vec<u8>>>,
}

impl LogBuffers {
    /// An empty buffer: a given-back one if any (its capacity kept), else
    /// a new one.
    pub(crate) fn take(&self) -> Vec<u8> {
        let buf = self.lock().pop().unwrap_or_default();
        debug_assert!(buf.is_empty());
        buf
    }

    /// A write is done with `buf`: keep it for a later batch, unless the
    /// pool is full or `buf` is too large to keep.
    pub(crate) fn give_back(&self, mut buf: Vec<u8>) {
        if buf.capacity() == 0 || buf.capacity() > KEPT_BUFFER_BYTES_MAX {
            return;
        }
        buf.clear();
        let mut spare = self.lock();
        if spare.len() < SPARE_BUFFERS_MAX {
            spare.push(buf);
        }
    }

    /// Free every kept buffer (the shard went idle).
    pub(crate) fn release(&self) {
        *self.lock() = Vec::new();
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Vec<u8>>> {
        self.spare.lock().unwrap_or_else(PoisonError::into_inner)
    }

    #[cfg(test)]
    fn spare_count(&self) -> usize {
        self.lock().len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_given_back_buffer_comes_back_empty_with_its_capacity() {
        let pool = LogBuffers::default();
        let mut buf = pool.take();
        buf.extend_from_slice(&[7; 5000]);
        let capacity = buf.capacity();
        pool.give_back(buf);
        let again = pool.take();
        assert!(again.is_empty());
        assert_eq!(again.capacity(), capacity);
        assert_eq!(pool.spare_count(), 0);
    }

    #[test]
    fn keeps_at_most_the_limit_and_frees_oversized_buffers() {
        let pool = LogBuffers::default();
        for _ in 0..SPARE_BUFFERS_MAX + 5 {
            pool.give_back(Vec::with_capacity(100));
        }
        assert_eq!(pool.spare_count(), SPARE_BUFFERS_MAX);
        pool.release();
        assert_eq!(pool.spare_count(), 0);
        pool.give_back(Vec::with_capacity(16));
        assert_eq!(pool.spare_count(), 1, "kept again after a release");
        let pool = LogBuffers::default();
        pool.give_back(Vec::with_capacity(KEPT_BUFFER_BYTES_MAX + 1));
        pool.give_back(Vec::new());
        assert_eq!(pool.spare_count(), 0);
        assert_eq!(pool.take().capacity(), 0);
    }
}
