//! The receiving side of a user's mailbox, sans-IO: which message to show
//! next, what to fetch, and what to acknowledge.
//!
//! Every message a user receives is stored in its mailbox first, under a
//! sequence number (seq) that grows by one per message; a recipient online
//! is then pushed the stored message with its seq (`docs/PROTOCOL.md`
//! §6.4). The mailbox is the single source of truth and pushes are only
//! notifications, so a client shows messages by seq: each seq once, in
//! order, whichever way it arrived (pushed, pushed twice, fetched after a
//! reconnect, or both). A push past a gap waits a moment for the missing
//! ones (pushes from different senders may overtake each other), then the
//! gap is fetched. What was taken to show ([`Inbox::poll_show`]) is
//! acknowledged cumulatively, which deletes it from the mailbox; a message
//! still waiting to be taken is not, so a client that stops before taking
//! it is shown it after its next login.
//!
//! A sender that retries after losing an answer may have its message
//! stored twice (under two seqs, one `msg_id`): the second is dropped by a
//! bounded memory of the `(sender, msg_id)` pairs shown.
//!
//! Like `session`, this takes `now` and answers in, and hands requests and
//! messages to show out: no socket, clock or thread. The client SDK drives
//! it; the gateway's test harness drives it as its simulated clients.

use crate::app::{Call, Delivery, FETCH_BYTES_MAX, FETCH_COUNT_MAX};
use std::{
    collections::{BTreeMap, HashSet, VecDeque},
    time::{Duration, Instant},
};

/// Limits and timers of an [`Inbox`].
#[derive(Debug, Clone)]
pub struct InboxConfig {
    /// A push past a gap waits this long for the missing seqs before the
    /// gap is fetched.
    pub gap_wait: Duration,
    /// What was shown is acknowledged within this long ...
    pub ack_delay: Duration,
    /// ... or as soon as this many messages are shown and unacknowledged.
    pub ack_every: u64,
    /// A failed fetch or ack is tried again after this long.
    pub retry_delay: Duration,
    /// Bytes of message bodies held past a gap at most; a push beyond it
    /// is dropped (it is in the mailbox, and fetched with the gap).
    pub held_bytes_max: usize,
    /// `(sender, msg_id)` pairs remembered to drop a message stored twice.
    pub dedupe_ids_max: usize,
    /// Messages ready to show and not yet taken ([`Inbox::poll_show`]) at
    /// most: while the application is this far behind, nothing is fetched
    /// and pushes are dropped (they are in the mailbox, fetched later).
    pub ready_max: usize,
    /// The page asked for by a fetch.
    pub fetch_count_max: u32,
    pub fetch_bytes_max: u32,
}

impl Default for InboxConfig {
    fn default() -> Self {
        InboxConfig {
            gap_wait: Duration::from_millis(100),
            ack_delay: Duration::from_millis(100),
            ack_every: 64,
            retry_delay: Duration::from_secs(1),
            held_bytes_max: 1024 * 1024,
            dedupe_ids_max: 65_536,
            ready_max: 1024,
            fetch_count_max: FETCH_COUNT_MAX,
            fetch_bytes_max: FETCH_BYTES_MAX,
        }
    }
}

/// A request the inbox wants sent to the gateway.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InboxRequest {
    /// `Call::Fetch`; answer with [`Inbox::on_page`] or
    /// [`Inbox::on_fetch_failed`].
    Fetch {
        after_seq: u64,
        max_count: u32,
        max_bytes: u32,
    },
    /// `Call::Ack`; answer with [`Inbox::on_ack_done`] or
    /// [`Inbox::on_ack_failed`].
    Ack { up_to_seq: u64 },
}

impl InboxRequest {
    /// The application call that carries this request.
    pub fn call(self) -> Call {
        match self {
            InboxRequest::Fetch {
                after_seq,
                max_count,
                max_bytes,
            } => Call::Fetch {
                after_seq,
                max_count,
                max_bytes,
            },
            InboxRequest::Ack { up_to_seq } => Call::Ack { up_to_seq },
        }
    }

    /// The application call that carries this request for the mailbox of
    /// `group` (a chat group: the same seq rules, the member's read cursor
    /// as its acknowledgement): `Call::GroupFetch` or `Call::GroupAck`.
    /// `GroupAck` is answered `Reply::Done`, not `Reply::Acked`.
    pub fn group_call(self, group: u64) -> Call {
        match self {
            InboxRequest::Fetch {
                after_seq,
                max_count,
                max_bytes,
            } => Call::GroupFetch {
                group,
                after_seq,
                max_count,
                max_bytes,
            },
            InboxRequest::Ack { up_to_seq } => Call::GroupAck { group, up_to_seq },
        }
    }
}

/// Counters of one inbox.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct InboxStats {
    /// Messages handed out to show.
    pub shown: u64,
    /// Copies dropped: a seq already shown, or a `(sender, msg_id)` already
    /// shown under another seq.
    pub duplicates: u64,
    /// Pushes dropped because `held_bytes_max` or `ready_max` was reached
    /// (fetched later).
    pub held_dropped: u64,
    /// Seqs skipped because the mailbox no longer had them (acknowledged
    /// by another client of the same user).
    pub skipped: u64,
    pub fetches: u64,
}

/// The recipient's view of its mailbox.
#[derive(Debug)]
pub struct Inbox {
    config: InboxConfig,
    /// Every seq up to this one was shown (or was gone from the mailbox).
    shown: u64,
    /// The highest seq known to exist.
    known_high: u64,
    /// Messages past a gap, by seq.
    held: BTreeMap<u64, Delivery>,
    held_bytes: usize,
    /// In order, waiting for [`Inbox::poll_show`].
    ready: VecDeque<Delivery>,
    /// The fetch in flight: its `after_seq`, and the highest seq known to
    /// exist when it was sent (every seq up to it was stored before the
    /// fetch was served).
    fetching: Option<(u64, u64)>,
    /// The last page said more follow.
    more: bool,
    /// Since when a gap is open (a message held past it).
    gap_since: Option<Instant>,
    fetch_not_before: Option<Instant>,
    /// Acknowledged (or being acknowledged) up to here: by this inbox no
    /// further than [`Inbox::taken`], by another client of the user (as a
    /// login reports) maybe further.
    acked: u64,
    ack_in_flight: Option<u64>,
    ack_due: Option<Instant>,
    seen: Seen,
    stats: InboxStats,
}

impl Inbox {
    pub fn new(config: InboxConfig) -> Inbox {
        assert!(config.ack_every >= 1 && config.fetch_count_max >= 1);
        Inbox {
            seen: Seen::new(config.dedupe_ids_max.max(1)),
            config,
            shown: 0,
            known_high: 0,
            held: BTreeMap::new(),
            held_bytes: 0,
            ready: VecDeque::new(),
            fetching: None,
            more: false,
            gap_since: None,
            fetch_not_before: None,
            acked: 0,
            ack_in_flight: None,
            ack_due: None,
            stats: InboxStats::default(),
        }
    }

    /// An inbox that goes on from an earlier connection of this client,
    /// which showed every seq up to `shown` (what the application kept,
    /// `client::sdk::ShownMarks`): those are never shown again, and are
    /// acknowledged after the next login if the mailbox still holds them
    /// (their acknowledgement was lost with that connection).
    pub fn resume(config: InboxConfig, shown: u64) -> Inbox {
        let mut inbox = Inbox::new(config);
        inbox.shown = shown;
        inbox.known_high = shown;
        inbox
    }

    /// A (new) session is up: its login said the mailbox holds
    /// `mailbox_count` messages up to `mailbox_high_seq`. Requests of an
    /// earlier session are void (their answers never come). One fetch
    /// follows every login.
    pub fn on_login(&mut self, now: Instant, mailbox_count: u64, mailbox_high_seq: u64) {
        let acked = mailbox_high_seq.saturating_sub(mailbox_count);
        self.fetching = None;
        self.ack_in_flight = None;
        self.fetch_not_before = None;
        self.known_high = self.known_high.max(mailbox_high_seq);
        self.acked = self.acked.max(acked);
        if acked > self.shown {
            // Acknowledged already (by an earlier session of this client, or
            // by another client of the user): nothing up to it is shown.
            let kept = self.held.split_off(&(acked + 1));
            for (_, d) in std::mem::replace(&mut self.held, kept) {
                self.held_bytes -= d.body.len();
                self.stats.duplicates += 1;
            }
            self.shown = acked;
        }
        self.advance(now);
        // Fetch once after every login, whatever the figures say: they are
        // 0/0 when the shard did not answer during the login, and a
        // message stored between the login's read of them and the
        // session's start is in neither them nor a push.
        self.more = true;
        if self.shown > self.acked && self.ack_due.is_none() {
            // An ack lost with the old session goes again.
            self.ack_due = Some(now + self.config.ack_delay);
        }
    }

    /// A pushed message (`GatewayMessage::Deliver`).
    pub fn on_push(&mut self, now: Instant, delivery: Delivery) {
        self.known_high = self.known_high.max(delivery.seq);
        if delivery.seq <= self.shown || self.held.contains_key(&delivery.seq) {
            self.stats.duplicates += 1;
            return;
        }
        let len = delivery.body.len();
        let behind = self.ready.len() >= self.config.ready_max;
        let gap = delivery.seq > self.shown + 1;
        if behind || (gap && self.held_bytes + len > self.config.held_bytes_max) {
            self.stats.held_dropped += 1;
            self.more = true;
            return;
        }
        self.hold(delivery);
        self.advance(now);
    }

    /// `GatewayMessage::MailboxChanged`: messages up to `high_seq` exist.
    pub fn on_mailbox_changed(&mut self, high_seq: u64) {
        if high_seq > self.shown {
            self.known_high = self.known_high.max(high_seq);
            self.more = true;
        }
    }

    /// The answer to the fetch in flight (`Reply::Mailbox`): the page's
    /// messages, the seq of its last record (0 for an empty page; records
    /// the gateway could not decode are counted there but not in
    /// `messages`) and whether more follow.
    ///
    /// A page holds every live record after the fetch's `after_seq` up to
    /// `last_seq` (and, when no more follow, every one the mailbox held when
    /// it was read). A seq in that range that is not in `messages` is gone:
    /// acknowledged by another client of the user, or unreadable. It is
    /// skipped, never waited for. Seqs learnt of while the fetch was on its
    /// way may have been stored after it was read: they are not skipped.
    pub fn on_page(&mut self, now: Instant, messages: Vec<Delivery>, last_seq: u64, more: bool) {
        let Some((_, known_at_fetch)) = self.fetching.take() else {
            return; // not ours (a fetch of an earlier session)
        };
        self.stats.fetches += 1;
        let gone_through = if more {
            last_seq
        } else {
            last_seq.max(known_at_fetch)
        };
        for d in messages {
            self.known_high = self.known_high.max(d.seq);
            if d.seq > self.shown && !self.held.contains_key(&d.seq) {
                self.hold(d);
            }
        }
        self.known_high = self.known_high.max(last_seq);
        self.more = more;
        // A gap this page did not fill waits its time again.
        self.gap_since = None;
        self.advance_through(now, gone_through);
    }

    pub fn on_fetch_failed(&mut self, now: Instant) {
        if self.fetching.take().is_some() {
            self.fetch_not_before = Some(now + self.config.retry_delay);
        }
    }

    pub fn on_ack_done(&mut self, now: Instant, up_to_seq: u64) {
        self.ack_in_flight = None;
        self.acked = self.acked.max(up_to_seq);
        if self.shown > self.acked && self.ack_due.is_none() {
            self.ack_due = Some(now + self.config.ack_delay);
        }
    }

    pub fn on_ack_failed(&mut self, now: Instant) {
        self.ack_in_flight = None;
        self.ack_due = Some(now + self.config.retry_delay);
    }

    /// The next message to show, in seq order.
    pub fn poll_show(&mut self) -> Option<Delivery> {
        self.ready.pop_front()
    }

    /// The next request to send, if one is due.
    pub fn poll_request(&mut self, now: Instant) -> Option<InboxRequest> {
        if self.fetch_due(now) {
            self.fetching = Some((self.shown, self.known_high));
            self.fetch_not_before = None;
            return Some(InboxRequest::Fetch {
                after_seq: self.shown,
                max_count: self.config.fetch_count_max,
                max_bytes: self.config.fetch_bytes_max,
            });
        }
        let taken = self.taken();
        if self.ack_in_flight.is_none() && taken > self.acked {
            let many = taken - self.acked >= self.config.ack_every;
            if many || self.ack_due.is_some_and(|t| t <= now) {
                self.ack_in_flight = Some(taken);
                self.ack_due = None;
                return Some(InboxRequest::Ack { up_to_seq: taken });
            }
        }
        None
    }

    /// When [`Inbox::poll_request`] may have something new without any
    /// other input. Never a time at which it would have nothing to do: a
    /// retry delay or an ack delay whose cause went away meanwhile (a gap
    /// filled by pushes, an ack the next login reported applied) is not
    /// named, or a driver woken by it would be woken at once again and
    /// again.
    pub fn poll_timeout(&self) -> Option<Instant> {
        let can_fetch = self.fetching.is_none() && self.ready.len() < self.config.ready_max;
        let gap = self
            .gap_since
            .filter(|_| can_fetch)
            .map(|t| (t + self.config.gap_wait).max(self.fetch_not_before.unwrap_or(t)));
        let unseen = self.more || (self.known_high > self.shown && self.held.is_empty());
        let retry = self.fetch_not_before.filter(|_| can_fetch && unseen);
        let ack = self
            .ack_due
            .filter(|_| self.ack_in_flight.is_none() && self.taken() > self.acked);
        [gap, ack, retry].into_iter().flatten().min()
    }

    /// An acknowledgement not yet sent (to send before closing).
    pub fn unacked(&self) -> Option<u64> {
        let taken = self.taken();
        (taken > self.acked && self.ack_in_flight.is_none()).then_some(taken)
    }

    /// Acknowledge what was taken at the next [`Inbox::poll_request`],
    /// without waiting for `ack_delay` (before a close).
    pub fn ack_now(&mut self, now: Instant) {
        if self.taken() > self.acked {
            self.ack_due = Some(now);
        }
    }

    /// Everything taken was acknowledged (and confirmed); messages still
    /// waiting to be taken are left in the mailbox.
    pub fn all_acked(&self) -> bool {
        self.taken() <= self.acked
    }

    /// Messages ready to show and not yet taken ([`Inbox::poll_show`]).
    pub fn waiting(&self) -> usize {
        self.ready.len()
    }

    /// Everything known to exist was shown and nothing is being fetched.
    pub fn caught_up(&self) -> bool {
        self.shown >= self.known_high
            && self.fetching.is_none()
            && !self.more
            && self.held.is_empty()
            && self.ready.is_empty()
    }

    /// Every seq up to this one was shown (some may still wait to be
    /// taken).
    pub fn shown_seq(&self) -> u64 {
        self.shown
    }

    /// Every seq up to this one was taken by [`Inbox::poll_show`], or
    /// dropped as a copy, or skipped: what may be acknowledged.
    fn taken(&self) -> u64 {
        self.ready.front().map_or(self.shown, |d| d.seq - 1)
    }

    pub fn stats(&self) -> InboxStats {
        self.stats
    }

    fn fetch_due(&self, now: Instant) -> bool {
        if self.fetching.is_some()
            || self.fetch_not_before.is_some_and(|t| t > now)
            || self.ready.len() >= self.config.ready_max
        {
            return false;
        }
        let gap_expired = self
            .gap_since
            .is_some_and(|t| t + self.config.gap_wait <= now);
        let unseen = self.known_high > self.shown && self.held.is_empty();
        self.more || unseen || gap_expired
    }

    fn hold(&mut self, d: Delivery) {
        self.held_bytes += d.body.len();
        self.held.insert(d.seq, d);
    }

    /// Move every message that follows `shown` without a gap to `ready`.
    fn advance(&mut self, now: Instant) {
        self.advance_through(now, 0);
    }

    /// [`Inbox::advance`], where every seq up to `gone_through` that is not
    /// held is gone from the mailbox (skipped).
    fn advance_through(&mut self, now: Instant, gone_through: u64) {
        loop {
            let next = self.shown + 1;
            let first = self.held.keys().next().copied();
            if first == Some(next) {
                let d = self.held.remove(&next).expect("the first held");
                self.held_bytes -= d.body.len();
                self.shown = next;
                self.release(d);
            } else if next <= gone_through {
                let to = first.map_or(gone_through, |f| (f - 1).min(gone_through));
                self.stats.skipped += to - self.shown;
                self.shown = to;
            } else {
                break;
            }
        }
        if self.held.is_empty() {
            self.gap_since = None;
        } else if self.gap_since.is_none() {
            self.gap_since = Some(now);
        }
        if self.shown > self.acked && self.ack_due.is_none() {
            self.ack_due = Some(now + self.config.ack_delay);
        }
    }

    /// Show `d` unless its `(sender, msg_id)` was shown already.
    fn release(&mut self, d: Delivery) {
        if self.seen.first_time(d.from, d.msg_id) {
            self.stats.shown += 1;
            self.ready.push_back(d);
        } else {
            self.stats.duplicates += 1;
        }
    }
}

/// The last `capacity` `(sender, msg_id)` pairs shown, oldest forgotten
/// first.
#[derive(Debug)]
struct Seen {
    set: HashSet<(u64, u128)>,
    order: VecDeque<(u64, u128)>,
    capacity: usize,
}

impl Seen {
    fn new(capacity: usize) -> Seen {
        Seen {
            set: HashSet::new(),
            order: VecDeque::new(),
            capacity,
        }
    }

    fn first_time(&mut self, from: u64, msg_id: u128) -> bool {
        if !self.set.insert((from, msg_id)) {
            return false;
        }
        self.order.push_back((from, msg_id));
        if self.order.len() > self.capacity {
            let oldest = self.order.pop_front().expect("over capacity");
            self.set.remove(&oldest);
        }
        true
    }
}

#[cfg(test)]
mod tests;
