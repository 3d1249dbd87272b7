//! Messages sent and not yet answered for good, in the order they were
//! sent. An entry leaves only with the gateway's final answer (`Sent`, or
//! an error that retrying cannot fix) or when the connection ends; across
//! a reconnect it is re-sent with the same `msg_id`.

use super::SdkError;
use proto::app::SendOutcome;
use std::{
    collections::BTreeMap,
    time::{Duration, Instant},
};
use tokio::sync::oneshot;

pub(crate) type SendReply = oneshot::Sender<Result<SendOutcome, SdkError>>;

pub(crate) struct Entry {
    pub(crate) to: u64,
    pub(crate) msg_id: u128,
    pub(crate) body: Vec<u8>,
    pub(crate) reply: SendReply,
    /// The request carrying it on the current session, if any.
    pub(crate) request: Option<u32>,
    /// Re-send no earlier than this (after `RateLimited` / `Unavailable`).
    pub(crate) retry_at: Option<Instant>,
    /// Times it was put on the wire.
    pub(crate) attempts: u32,
    /// When the application sent it.
    pub(crate) queued_at: Instant,
    /// The last retryable error it was answered with.
    pub(crate) last_error: Option<SdkError>,
}

pub(crate) struct Outbox {
    entries: BTreeMap<u64, Entry>,
    next: u64,
    max: usize,
}

impl Outbox {
    pub(crate) fn new(max: usize) -> Self {
        assert!(max > 0, "outbox_max must be positive");
        Outbox {
            entries: BTreeMap::new(),
            next: 0,
            max,
        }
    }

    /// Add a message; refused (and handed back) when `max` are waiting.
    pub(crate) fn push(&mut self, entry: Entry) -> Result<u64, Box<Entry>> {
        if self.entries.len() >= self.max {
            return Err(Box::new(entry));
        }
        let key = self.next;
        self.next += 1;
        self.entries.insert(key, entry);
        Ok(key)
    }

    pub(crate) fn get_mut(&mut self, key: u64) -> Option<&mut Entry> {
        self.entries.get_mut(&key)
    }

    pub(crate) fn remove(&mut self, key: u64) -> Option<Entry> {
        self.entries.remove(&key)
    }

    /// Up to `room` entries to put on the wire, oldest first: those with
    /// no request on the wire, stopping at the first whose retry delay is
    /// still running (nothing overtakes a message held back).
    pub(crate) fn ready(&self, now: Instant, room: usize) -> Vec<u64> {
        self.entries
            .iter()
            .filter(|(_, e)| e.request.is_none())
            .take_while(|(_, e)| e.retry_at.is_none_or(|t| t <= now))
            .take(room)
            .map(|(k, _)| *k)
            .collect()
    }

    /// The earliest retry delay still running.
    pub(crate) fn next_retry(&self) -> Option<Instant> {
        self.entries
            .values()
            .filter(|e| e.request.is_none())
            .filter_map(|e| e.retry_at)
            .min()
    }

    /// When the oldest entry runs out of `send_timeout`.
    pub(crate) fn next_give_up(&self, send_timeout: Option<Duration>) -> Option<Instant> {
        let timeout = send_timeout?;
        self.entries.values().map(|e| e.queued_at + timeout).min()
    }

    /// Take the entries older than `send_timeout`: their sends fail (they
    /// may still have been stored; the application is told they were not
    /// confirmed).
    pub(crate) fn give_up(&mut self, now: Instant, send_timeout: Option<Duration>) -> Vec<Entry> {
        let Some(timeout) = send_timeout else {
            return Vec::new();
        };
        let old: Vec<u64> = (self.entries.iter())
            .filter(|(_, e)| e.queued_at + timeout <= now)
            .map(|(k, _)| *k)
            .collect();
        old.into_iter()
            .filter_map(|k| self.entries.remove(&k))
            .collect()
    }

    /// Forget which request carried each entry (the session is gone).
    pub(crate) fn detach_all(&mut self) {
        for e in self.entries.values_mut() {
            e.request = None;
        }
    }

    /// Empty the outbox, answering every entry with `error`.
    pub(crate) fn fail_all(&mut self, error: &SdkError) {
        for (_, e) in std::mem::take(&mut self.entries) {
            let _ = e.reply.send(Err(error.clone()));
        }
    }

    pub(crate) fn max(&self) -> usize {
        self.max
    }
}
