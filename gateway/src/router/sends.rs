//! Sends: accepted in arrival order per conversation (sender, recipient),
//! stored in that order (one store per conversation in flight, the rest
//! batched behind it), answered once durable or at `send_answer_ms_max`,
//! remembered for retries, then pushed to the recipient.

use super::{
    deadlines::Deadlines,
    error,
    groups::{self, GroupLookup},
    holds::{Hold, Holds},
    relations::Lookup,
    Action, Now, Router, Sessions, StoreItem, NOTIFY_DELIVERIES_MAX,
};
use crate::dedupe::{FastMap, RecentSends, SendKey};
use proto::{
    app::{AppError, AppErrorCode, Delivery, Reply, SendOutcome, StoredEnvelope, BODY_BYTES_MAX},
    groups::is_group,
};
use std::{collections::VecDeque, time::Instant};

/// (sender, recipient): the recipient is a user or a group.
pub(crate) use super::holds::ConvKey;
/// A request waiting for a send's outcome: (session, request id).
pub(crate) type Waiter = (u64, u32);

/// A `Call::Send` as it arrived.
pub(crate) struct NewSend {
    pub session: u64,
    pub id: u32,
    pub key: SendKey,
    pub to: u64,
    pub body: Vec<u8>,
    /// The client says it sent this message before (a group send's
    /// `resend`).
    pub resent: bool,
}

struct Pending {
    to: u64,
    /// When it first arrived, in the order of all sends (a conversation's
    /// messages arrive in the order sent, on one session).
    arrival: u64,
    envelope: StoredEnvelope,
    waiters: Vec<Waiter>,
    /// When the waiters are answered `Unavailable` if no outcome came;
    /// `None` once they were (the store goes on; a retry waits again).
    deadline: Option<Instant>,
    /// A re-send after a failure that may have stored it ([`StoreItem`]).
    resent: bool,
    /// The session it last came on (first, or a retry that joined it).
    session: u64,
}

#[derive(Default)]
struct Conv {
    /// Accepted, not yet in a store, in arrival order.
    queue: VecDeque<SendKey>,
    /// The store in flight.
    storing: Option<u64>,
}

struct Batch {
    conv: ConvKey,
    keys: Vec<SendKey>,
}

pub(crate) struct Sends {
    pending: FastMap<SendKey, Pending>,
    convs: FastMap<ConvKey, Conv>,
    batches: FastMap<u64, Batch>,
    holds: Holds,
    deadlines: Deadlines,
    /// Conversations waiting for their recipient's relations, by recipient.
    waiting: FastMap<u64, Vec<ConvKey>>,
    done: RecentSends,
    next_batch: u64,
    next_arrival: u64,
}

impl Sends {
    pub(crate) fn new(dedupe_entries_max: usize) -> Sends {
        Sends {
            pending: FastMap::default(),
            convs: FastMap::default(),
            batches: FastMap::default(),
            holds: Holds::default(),
            deadlines: Deadlines::default(),
            waiting: FastMap::default(),
            done: RecentSends::new(dedupe_entries_max),
            next_batch: 0,
            next_arrival: 0,
        }
    }

    pub(crate) fn in_progress(&self) -> usize {
        self.pending.len()
    }

    pub(crate) fn next_deadline(&self) -> Option<Instant> {
        self.deadlines.first()
    }

    /// Sends whose answer is due: their waiters, taken (the sends go on).
    pub(crate) fn expire(&mut self, now: Instant) -> Vec<(SendKey, Vec<Waiter>)> {
        let mut out = Vec::new();
        while let Some((at, key)) = self.deadlines.pop_due(now) {
            match self.pending.get_mut(&key) {
                Some(p) if p.deadline == Some(at) => {
                    p.deadline = None;
                    out.push((key, std::mem::take(&mut p.waiters)));
                }
                _ => {} // answered or re-armed since: a stale entry
            }
        }
        self.tidy_deadlines();
        out
    }

    /// Drop stale deadline entries (see [`Deadlines`]).
    fn tidy_deadlines(&mut self) {
        let pending = &self.pending;
        self.deadlines.tidy(pending.len(), |&(at, key)| {
            pending.get(&key).is_some_and(|p| p.deadline == Some(at))
        });
    }

    pub(crate) fn forget_expired_holds(&mut self, now: Instant) {
        self.holds.forget_expired(now);
    }

    /// Forget `user`'s holds: its session ended, and its client sends
    /// everything unanswered again, in order, on its next one.
    pub(crate) fn forget_holds_of(&mut self, user: u64) {
        self.holds.forget_sender(user);
    }

    fn arrival(&mut self) -> u64 {
        self.next_arrival += 1;
        self.next_arrival
    }

    /// Arm (or re-arm) `key`'s deadline; an older entry goes stale.
    fn set_deadline(&mut self, key: SendKey, at: Instant) {
        if let Some(p) = self.pending.get_mut(&key) {
            p.deadline = Some(at);
            self.deadlines.push(at, key);
        }
    }
}

impl Router {
    pub(super) fn on_send(
        &mut self,
        now: Now,
        send: NewSend,
        in_flight_full: bool,
        io: &mut impl Sessions,
    ) {
        let (from, msg_id) = send.key;
        let Refusal { error: e, by_hold } = match self.admit(now, &send, in_flight_full) {
            Ok(Admit::Answered(outcome)) => {
                metrics::counter!("gateway_messages_total", "outcome" => "duplicate").increment(1);
                self.reply(send.session, send.id, Ok(Reply::Sent(outcome)), io);
                return;
            }
            Ok(Admit::Joined) => return,
            Ok(Admit::New { arrival }) => return self.accept_send(now, send, arrival, io),
            Err(r) => r,
        };
        let code = e.code;
        let heard = self.try_reply(send.session, send.id, Err(e), io);
        let outcome = if code.is_retryable() {
            // A refusal by the hold itself does not make it last longer,
            // unless the client did not hear of it: it sends this message
            // again only at its request timeout, and the hold must still
            // be there to keep what it sent after from going first.
            self.hold(now, (from, send.to), msg_id, None, code, !by_hold || !heard);
            "retry"
        } else {
            "refused"
        };
        metrics::counter!("gateway_messages_total", "outcome" => outcome).increment(1);
    }

    /// Take a send that passed every check: queue it behind its
    /// conversation's earlier messages.
    fn accept_send(
        &mut self,
        now: Now,
        send: NewSend,
        arrival: Option<u64>,
        io: &mut impl Sessions,
    ) {
        let (from, _) = send.key;
        let conv = (from, send.to);
        self.sessions.take_slot(send.session);
        let envelope = StoredEnvelope {
            from,
            sent_at_ms: now.wall_ms,
            body: send.body,
        };
        // A hold waited for it: an earlier attempt failed here, perhaps
        // after the shard had stored it.
        let resent = send.resent || arrival.is_some();
        let arrival = match arrival {
            Some(a) => a,
            None => self.sends.arrival(),
        };
        let pending = Pending {
            to: send.to,
            arrival,
            envelope,
            waiters: vec![(send.session, send.id)],
            deadline: None,
            resent,
            session: send.session,
        };
        self.sends.pending.insert(send.key, pending);
        self.sends
            .set_deadline(send.key, now.at + self.config.send_answer);
        self.sends
            .convs
            .entry(conv)
            .or_default()
            .queue
            .push_back(send.key);
        self.pump(now, conv, io);
    }

    /// The checks a send passes before it is accepted, cheapest first.
    fn admit(&mut self, now: Now, send: &NewSend, in_flight_full: bool) -> Result<Admit, Refusal> {
        if send.body.is_empty() {
            return Err(error(AppErrorCode::BadRequest, "an empty message").into());
        }
        if send.body.len() > BODY_BYTES_MAX {
            return Err(error(
                AppErrorCode::MessageTooLarge,
                format!("a message body is at most {BODY_BYTES_MAX} bytes"),
            )
            .into());
        }
        if let Some(outcome) = self.sends.done.get(&send.key) {
            return Ok(Admit::Answered(outcome));
        }
        if in_flight_full {
            return Err(error(AppErrorCode::RateLimited, "too many requests in flight").into());
        }
        if let Some(p) = self.sends.pending.get_mut(&send.key) {
            // A retry while the first copy is on its way: same outcome.
            p.waiters.push((send.session, send.id));
            p.session = send.session;
            let rearm = p.deadline.is_none();
            self.sessions.take_slot(send.session);
            if rearm {
                self.sends
                    .set_deadline(send.key, now.at + self.config.send_answer);
            }
            return Ok(Admit::Joined);
        }
        let conv = (send.key.0, send.to);
        let arrival = self
            .sends
            .holds
            .check(conv, send.key.1, now.at)
            .map_err(|code| Refusal {
                error: error(
                    code,
                    "an earlier message to this user must be sent again first",
                ),
                by_hold: true,
            })?;
        if self.message_rate.check_key(&send.key.0).is_err() {
            // Refused after all: back in the hold, in its place.
            let code = AppErrorCode::RateLimited;
            self.hold(now, conv, send.key.1, arrival, code, true);
            return Err(error(code, "sending too fast").into());
        }
        Ok(Admit::New { arrival })
    }

    /// Start the next store of `conv` if none is in flight: as many queued
    /// messages as one store takes, each checked against the recipient's
    /// relations (loaded first if not cached).
    pub(super) fn pump(&mut self, now: Now, conv: ConvKey, io: &mut impl Sessions) {
        let Some(c) = self.sends.convs.get(&conv) else {
            return;
        };
        if c.storing.is_some() {
            return;
        }
        if c.queue.is_empty() {
            self.sends.convs.remove(&conv);
            return;
        }
        let to = conv.1;
        let verdict = if is_group(to) {
            match self.groups.lookup(now.at, to) {
                GroupLookup::Missing => return self.wait_for_recipient(conv),
                GroupLookup::Known(g) => groups::may_send(g.as_deref(), conv.0),
            }
        } else {
            match self.relations.lookup(now.at, to) {
                Lookup::Missing => return self.wait_for_recipient(conv),
                Lookup::Known(rel) => super::relations::may_write(rel, conv.0, to, &self.config),
            }
        };
        if let Err(e) = verdict {
            // The recipient refuses this sender: every queued message.
            let keys: Vec<SendKey> = self
                .sends
                .convs
                .remove(&conv)
                .unwrap_or_default()
                .queue
                .into();
            for key in keys {
                self.finish(now, key, Err(e.clone()), io);
            }
            return;
        }
        self.start_store(conv);
    }

    /// Load what `conv`'s recipient (a user's relations or a group's
    /// members) needs before its messages are checked; `conv` waits.
    fn wait_for_recipient(&mut self, conv: ConvKey) {
        let to = conv.1;
        if is_group(to) {
            self.groups.request(to);
        } else {
            self.relations.request(to);
        }
        let waiting = self.sends.waiting.entry(to).or_default();
        if !waiting.contains(&conv) {
            waiting.push(conv);
        }
    }

    fn start_store(&mut self, conv: ConvKey) {
        let c = self.sends.convs.get_mut(&conv).expect("pumped");
        let (mut items, mut keys, mut bytes) = (Vec::new(), Vec::new(), 0);
        while let Some(&key) = c.queue.front() {
            let p = &self.sends.pending[&key];
            let len = p.envelope.body.len();
            let full = items.len() >= self.config.store_batch_items_max
                || bytes + len > self.config.store_batch_bytes_max;
            if !items.is_empty() && full {
                break;
            }
            c.queue.pop_front();
            bytes += len;
            items.push(StoreItem {
                msg_id: key.1,
                envelope: p.envelope.clone(),
                resent: p.resent,
            });
            keys.push(key);
        }
        let batch = self.sends.next_batch;
        self.sends.next_batch += 1;
        c.storing = Some(batch);
        self.sends.batches.insert(batch, Batch { conv, keys });
        self.actions.push_back(Action::Store {
            batch,
            to: conv.1,
            items,
        });
    }

    pub(super) fn on_stored(
        &mut self,
        now: Now,
        batch: u64,
        result: Result<Vec<Result<u64, AppError>>, AppError>,
        io: &mut impl Sessions,
    ) {
        let Some(Batch { conv, keys }) = self.sends.batches.remove(&batch) else {
            return;
        };
        if let Some(c) = self.sends.convs.get_mut(&conv) {
            c.storing = None;
        }
        let results = match result {
            Ok(r) if r.len() == keys.len() => r,
            Ok(r) => {
                let e = error(
                    AppErrorCode::Unavailable,
                    format!("the shard answered {} of {} items", r.len(), keys.len()),
                );
                vec![Err(e); keys.len()]
            }
            Err(e) => vec![Err(e); keys.len()],
        };
        let mut failed: Option<AppError> = None;
        for (key, r) in keys.into_iter().zip(results) {
            if let Err(e) = &r {
                if e.code.is_retryable() {
                    failed = Some(e.clone());
                }
            }
            self.finish(now, key, r.map(|seq| SendOutcome { seq }), io);
        }
        if let Some(e) = failed {
            self.fail_conversation(now, conv, e, io);
        }
        self.pump(now, conv, io);
    }

    fn hold(
        &mut self,
        now: Now,
        conv: ConvKey,
        msg_id: u128,
        arrival: Option<u64>,
        code: AppErrorCode,
        extend: bool,
    ) {
        let arrival = match arrival {
            Some(a) => a,
            None => self.sends.arrival(),
        };
        let hold = Hold {
            msg_id,
            arrival,
            code,
            until: now.at + self.config.retry_hold,
            extend,
        };
        self.sends.holds.hold(conv, hold, now.at);
    }

    /// A retryable failure in `conv`: fail what is queued behind it too, so
    /// nothing overtakes the retry (each failed message holds the
    /// conversation until it comes again).
    pub(super) fn fail_conversation(
        &mut self,
        now: Now,
        conv: ConvKey,
        e: AppError,
        io: &mut impl Sessions,
    ) {
        let queued: Vec<SendKey> = match self.sends.convs.get_mut(&conv) {
            Some(c) => c.queue.drain(..).collect(),
            None => Vec::new(),
        };
        for key in queued {
            self.finish(now, key, Err(e.clone()), io);
        }
    }

    /// Conversations waiting for `to`'s relations, which are now known (or
    /// could not be loaded: `Err`).
    pub(super) fn relations_arrived(
        &mut self,
        now: Now,
        to: u64,
        failed: Option<AppError>,
        io: &mut impl Sessions,
    ) {
        for conv in self.sends.waiting.remove(&to).unwrap_or_default() {
            match &failed {
                Some(e) => self.fail_conversation(now, conv, e.clone(), io),
                None => self.pump(now, conv, io),
            }
        }
    }

    /// The send's outcome: answer its waiters; a stored message is
    /// remembered for retries and pushed to its recipient (to a group's
    /// members as the router knows them now).
    fn finish(
        &mut self,
        now: Now,
        key: SendKey,
        result: Result<SendOutcome, AppError>,
        io: &mut impl Sessions,
    ) {
        let Some(p) = self.sends.pending.remove(&key) else {
            return;
        };
        if p.deadline.is_some() {
            self.sends.tidy_deadlines();
        }
        let outcome = match &result {
            Ok(_) => "stored",
            Err(e) if e.code.is_retryable() => {
                // Only while the session it came on lasts: a client on a new
                // session re-sends everything unanswered, in order, from
                // its outbox (maybe settled elsewhere meanwhile), so a hold
                // made for an older session's message would refuse it for
                // nothing until it ran out, and a later message could then
                // overtake one whose refusal the client had not heard yet.
                if self.sessions.session_of(key.0) == Some(p.session) {
                    self.hold(now, (key.0, p.to), key.1, Some(p.arrival), e.code, true);
                }
                "retry"
            }
            Err(_) => "refused",
        };
        metrics::counter!("gateway_messages_total", "outcome" => outcome).increment(1);
        self.answer_waiters(&p.waiters, result.clone(), io);
        let Ok(outcome) = result else {
            return;
        };
        self.sends.done.insert(key, outcome);
        let delivery = Delivery {
            from: key.0,
            msg_id: key.1,
            sent_at_ms: p.envelope.sent_at_ms,
            body: p.envelope.body,
            seq: outcome.seq,
        };
        if is_group(p.to) {
            return self.fan_out(now, p.to, delivery, io);
        }
        match self.sessions.session_of(p.to) {
            Some(session) => self.push_delivery(session, delivery, io),
            None => self.notify(p.to, delivery),
        }
    }

    /// Queue `delivery` for `to`'s gateway elsewhere: with the action just
    /// queued if that one is for `to` too (a stored batch's messages, in
    /// order), so a batch costs one presence lookup, not one a message.
    fn notify(&mut self, to: u64, delivery: Delivery) {
        if let Some(Action::Notify {
            to: last,
            deliveries,
        }) = self.actions.back_mut()
        {
            if *last == to && deliveries.len() < NOTIFY_DELIVERIES_MAX {
                deliveries.push(delivery);
                return;
            }
        }
        self.actions.push_back(Action::Notify {
            to,
            deliveries: vec![delivery],
        });
    }

    pub(super) fn answer_waiters(
        &mut self,
        waiters: &[Waiter],
        result: Result<SendOutcome, AppError>,
        io: &mut impl Sessions,
    ) {
        for &(session, id) in waiters {
            self.sessions.free_slot(session);
            self.reply(session, id, result.clone().map(Reply::Sent), io);
        }
    }
}

/// Why `admit` refused a send.
struct Refusal {
    error: AppError,
    /// Refused because the conversation is held (not a new failure).
    by_hold: bool,
}

impl From<AppError> for Refusal {
    fn from(error: AppError) -> Refusal {
        Refusal {
            error,
            by_hold: false,
        }
    }
}

/// What `admit` decided for a send that may go ahead.
enum Admit {
    /// Settled before: its first outcome.
    Answered(SendOutcome),
    /// In progress: the request waits for the same outcome.
    Joined,
    /// To be stored; `arrival`: its first arrival, if a hold waited for it.
    New { arrival: Option<u64> },
}
