//! The gateway's routing logic as a sans-IO state machine, in the shape of
//! `proto::session` and presence's `State`: session events, service
//! answers and `now` go in; session operations (through [`Sessions`]) and
//! service work ([`Action`]) come out. The tokio driver (`driver.rs`) owns
//! the socket, the links and the clock and nothing else; the deterministic
//! harness in `tests/router_*.rs` drives this with scripted and faulty
//! services.
//!
//! What it promises (docs/PROTOCOL.md §6.4, ARCHITECTURE.md):
//! * the mailbox is the single source of truth: a send is appended to the
//!   recipient's mailbox first and answered `Sent{seq}` once durable; the
//!   stored message is then pushed, with its seq, to the recipient's
//!   session here or on the gateway presence says it is on (a session
//!   whose login was being checked meanwhile, past the mailbox figures its
//!   answer carries, is told `MailboxChanged` instead). Clients show
//!   messages by seq, so a message is shown once whichever way it came;
//! * per conversation (sender, recipient), messages are stored in the order
//!   they arrived: at most one store of a conversation is in flight, and
//!   after a retryable failure later sends of the conversation are refused
//!   until the failed one is re-sent, so a retry never lands behind a
//!   message sent after it;
//! * every send is answered within `send_answer_ms_max` (an
//!   `Unavailable` if its store has not come back by then; a retry of the
//!   same `msg_id` joins the store still in flight instead of storing
//!   again);
//! * who may write to whom is decided from a cache of the recipient's
//!   relations (friends, blocks, disabled), invalidated by the profile
//!   service's pushes, not by a round trip per message.

mod deadlines;
mod groups;
mod holds;
mod relations;
mod sends;
mod sessions;

use crate::{calls::CallResult, config::GatewayConfig};
use groups::GroupCache;
pub use groups::GroupMembers;
use proto::{
    app::{
        self, AppError, AppErrorCode, Call, ClientMessage, Delivery, GatewayMessage, StoredEnvelope,
    },
    clock::{quota, Clock, KeyedLimiter},
    groups::{is_group, GroupInfo},
    peer::{Forward, GroupForward, PeerOutcome},
    presence::Status,
    profile::Relations,
    session::{CloseReason, Event, MsgId, PendingId, SendError, ServerEvent},
};
use relations::RelationsCache;
use sends::Sends;
use sessions::SessionTable;
use std::{
    collections::VecDeque,
    time::{Duration, Instant},
};

/// The session operations the router needs: `proto::session`'s
/// `ServerEndpoint` in the gateway, a recording fake in the harness.
pub trait Sessions {
    /// An unused, unguessable session id for a login being checked.
    fn fresh_session_id(&mut self) -> u64;
    /// Accept a login under `session`; false if it can no longer be (the
    /// handshake was forgotten, or the endpoint is full).
    fn accept(&mut self, now: Instant, pending: PendingId, session: u64, answer: &[u8]) -> bool;
    fn reject(&mut self, pending: PendingId, answer: &[u8]);
    fn send(&mut self, session: u64, bytes: Vec<u8>) -> Result<MsgId, SendError>;
    fn close(&mut self, session: u64);
}

/// The two clocks the router reads, passed in with every input.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Now {
    /// For timers.
    pub at: Instant,
    /// Milliseconds since the Unix epoch, for `sent_at_ms`.
    pub wall_ms: u64,
}

/// Service work for the driver; each ends in one [`Answer`] (the driver
/// bounds every wait), except `Notify` and `Offline`, which have none.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Check a login payload; answered [`Answer::Login`].
    Login {
        pending: PendingId,
        session: u64,
        payload: Vec<u8>,
    },
    /// A client call served by presence, profile or a shard; answered
    /// [`Answer::Call`].
    Call {
        session: u64,
        id: u32,
        user: u64,
        call: Call,
    },
    /// Append these messages to `to`'s mailbox in this order; answered
    /// [`Answer::Stored`].
    Store {
        batch: u64,
        to: u64,
        items: Vec<StoreItem>,
    },
    /// `to` has no session here: push `deliveries` (in seq order) through
    /// the gateway presence says it is on, if any. The messages of one
    /// stored batch share one action (one presence lookup), at most
    /// [`NOTIFY_DELIVERIES_MAX`].
    Notify { to: u64, deliveries: Vec<Delivery> },
    /// Read these users' relations from profile; answered
    /// [`Answer::Relations`].
    LoadRelations { users: Vec<u64> },
    /// Read a group's members from profile; answered [`Answer::Group`].
    LoadGroup { group: u64 },
    /// A stored group message for members with no session here: forward
    /// it once to each gateway presence says some of them are on.
    GroupNotify { forward: GroupForward },
    /// A session ended: tell presence.
    Offline { user: u64, session: u64 },
}

/// Deliveries one [`Action::Notify`] carries at most: a stored batch's
/// worth ([`STORE_BATCH_ITEMS_MAX`]); a longer run of deliveries to one
/// user starts another action.
pub const NOTIFY_DELIVERIES_MAX: usize = STORE_BATCH_ITEMS_MAX;

/// One message of a [`Action::Store`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoreItem {
    pub msg_id: u128,
    pub envelope: StoredEnvelope,
    /// A re-send of a message whose first store may have happened (it
    /// failed with a retryable error here, or the client says it sent it
    /// before): stored only if the mailbox does not hold it already
    /// (`AppendBatchOnce`).
    pub resent: bool,
}

/// What a service said.
#[derive(Debug, Clone, PartialEq)]
pub enum Answer {
    Login {
        pending: PendingId,
        session: u64,
        outcome: LoginOutcome,
    },
    Call {
        session: u64,
        id: u32,
        result: CallResult,
        effects: CallEffects,
    },
    /// Per item, in order: its seq or why it was not stored; or one error
    /// for the whole batch (nothing of it is known to be stored).
    Stored {
        batch: u64,
        result: Result<Vec<Result<u64, AppError>>, AppError>,
    },
    /// The relations of those of `users` that exist.
    Relations {
        users: Vec<u64>,
        result: Result<Vec<Relations>, AppError>,
    },
    /// The group, or `None` if there is no such group.
    Group {
        group: u64,
        result: Result<Option<GroupInfo>, AppError>,
    },
}

/// What a finished call changed that the router must know.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CallEffects {
    /// `LoginView`: the friends this session now watches.
    pub watching: Option<Vec<u64>>,
    /// Users whose relations changed (a friend accepted, removed, blocked):
    /// dropped from the cache at once, before the profile service's push.
    pub changed: Vec<u64>,
    /// Groups whose members changed (joined, left, removed): dropped from
    /// the cache at once, before the profile service's push.
    pub groups_changed: Vec<u64>,
}

#[derive(Debug, Clone, PartialEq)]
pub enum LoginOutcome {
    Accepted(LoginOk),
    /// The encoded `LoginAnswer::Refused`.
    Refused(Vec<u8>),
}

/// A login that checked out; presence already has the session.
#[derive(Debug, Clone, PartialEq)]
pub struct LoginOk {
    pub user: u64,
    /// The encoded `LoginAnswer::Accepted`.
    pub answer: Vec<u8>,
    /// The user's relations as read while checking it; their credential
    /// epoch is the one its resume token carries.
    pub relations: Relations,
}

/// The router's limits and timers (from the gateway's config).
#[derive(Debug, Clone)]
pub struct RouterConfig {
    pub sessions_max: usize,
    pub pending_logins_max: usize,
    pub requests_in_flight_per_session_max: usize,
    pub messages_per_user_per_s: u32,
    pub messages_burst: u32,
    pub dedupe_entries_max: usize,
    pub relations_cache_bytes_max: usize,
    pub group_cache_bytes_max: usize,
    pub allow_strangers: bool,
    pub send_answer: Duration,
    pub retry_hold: Duration,
    pub store_batch_items_max: usize,
    pub store_batch_bytes_max: usize,
}

impl RouterConfig {
    pub fn new(config: &GatewayConfig) -> RouterConfig {
        let l = &config.limits;
        RouterConfig {
            sessions_max: l.sessions_max,
            pending_logins_max: l.pending_logins_max,
            requests_in_flight_per_session_max: l.requests_in_flight_per_session_max,
            messages_per_user_per_s: l.messages_per_user_per_s,
            messages_burst: l.messages_burst,
            dedupe_entries_max: l.dedupe_entries_max,
            relations_cache_bytes_max: l.relations_cache_bytes_max,
            group_cache_bytes_max: l.group_cache_bytes_max,
            allow_strangers: l.allow_strangers,
            send_answer: Duration::from_millis(config.timers.send_answer_ms_max),
            retry_hold: Duration::from_millis(config.timers.retry_hold_ms),
            store_batch_items_max: STORE_BATCH_ITEMS_MAX,
            store_batch_bytes_max: STORE_BATCH_BYTES_MAX,
        }
    }
}

/// Messages of one conversation in one store at most.
pub const STORE_BATCH_ITEMS_MAX: usize = 256;
/// Body bytes in one store at most (well within a shard frame).
pub const STORE_BATCH_BYTES_MAX: usize = 512 * 1024;
/// How often the router tidies up (rate-limiter memory, expired holds,
/// sessions whose relations could not be checked).
pub const HOUSEKEEPING: Duration = Duration::from_secs(1);

/// "undecodable request" warnings: at most one per interval, with how many
/// were held back (`gateway_bad_requests_total` counts them all).
static BAD_REQUEST_WARNINGS: daemon::SharedLogLimiter =
    daemon::SharedLogLimiter::new(daemon::accept::WARN_INTERVAL);

type MessageRate = KeyedLimiter<u64>;

pub struct Router {
    config: RouterConfig,
    sessions: SessionTable,
    sends: Sends,
    relations: RelationsCache,
    groups: GroupCache,
    actions: VecDeque<Action>,
    pending_logins: usize,
    message_rate: MessageRate,
    clock: Clock,
    next_housekeeping: Instant,
}

pub(crate) fn error(code: AppErrorCode, message: impl Into<String>) -> AppError {
    AppError {
        code,
        message: message.into(),
    }
}

impl Router {
    pub fn new(config: RouterConfig, now: Instant) -> Router {
        let clock = Clock::new(now);
        let message_rate =
            clock.keyed(quota(config.messages_per_user_per_s, config.messages_burst));
        Router {
            sends: Sends::new(config.dedupe_entries_max),
            relations: RelationsCache::new(config.relations_cache_bytes_max),
            groups: GroupCache::new(config.group_cache_bytes_max),
            sessions: SessionTable::default(),
            actions: VecDeque::new(),
            pending_logins: 0,
            message_rate,
            clock,
            next_housekeeping: now + HOUSEKEEPING,
            config,
        }
    }

    /// The next service work to do.
    pub fn poll_action(&mut self) -> Option<Action> {
        self.actions.pop_front()
    }

    /// When [`Router::handle_timeout`] is next due.
    pub fn poll_timeout(&self) -> Instant {
        self.sends
            .next_deadline()
            .map_or(self.next_housekeeping, |d| d.min(self.next_housekeeping))
    }

    /// Sessions open, for the gauge.
    pub fn session_count(&self) -> usize {
        self.sessions.len()
    }

    /// Sends accepted and not yet finished (queued or being stored).
    pub fn sends_in_progress(&self) -> usize {
        self.sends.in_progress()
    }

    // ---- inputs ----------------------------------------------------------

    pub fn handle_event(&mut self, now: Now, event: ServerEvent, io: &mut impl Sessions) {
        self.clock.advance_to(now.at);
        match event {
            ServerEvent::HandshakeRequest {
                pending, payload, ..
            } => self.on_login_request(pending, payload, io),
            ServerEvent::Session { session, event } => match event {
                Event::Message(bytes) => self.on_message(now, session, &bytes, io),
                Event::Acked(mid) => self.on_push_settled(session, mid, true, io),
                Event::GivenUp { id, .. } => self.on_push_settled(session, id, false, io),
                Event::Closed(reason) => self.on_closed(session, reason),
                Event::Connected { .. } | Event::Rejected { .. } => {}
            },
        }
        self.flush_loads();
    }

    pub fn handle_answer(&mut self, now: Now, answer: Answer, io: &mut impl Sessions) {
        self.clock.advance_to(now.at);
        match answer {
            Answer::Login {
                pending,
                session,
                outcome,
            } => {
                self.pending_logins -= 1;
                self.on_login_checked(now, pending, session, outcome, io);
            }
            Answer::Call {
                session,
                id,
                result,
                effects,
            } => self.on_call_done(session, id, result, effects, io),
            Answer::Stored { batch, result } => self.on_stored(now, batch, result, io),
            Answer::Relations { users, result } => self.on_relations(now, users, result, io),
            Answer::Group { group, result } => self.on_group(now, group, result, io),
        }
        self.flush_loads();
    }

    pub fn handle_timeout(&mut self, now: Now, io: &mut impl Sessions) {
        self.clock.advance_to(now.at);
        for (key, waiters) in self.sends.expire(now.at) {
            metrics::counter!("gateway_send_answer_timeouts_total").increment(1);
            let e = error(
                AppErrorCode::Unavailable,
                "the recipient's mailbox did not answer in time; retry with the same msg_id",
            );
            self.answer_waiters(&waiters, Err(e), io);
            tracing::debug!(from = key.0, "send answer timed out");
        }
        if now.at >= self.next_housekeeping {
            self.next_housekeeping = now.at + HOUSEKEEPING;
            self.message_rate.retain_recent();
            self.sends.forget_expired_holds(now.at);
            let users = self.relations.take_revalidations();
            for user in users {
                self.relations.request(user);
            }
        }
        self.flush_loads();
    }

    /// A friend of some sessions here changed status (presence's push).
    pub fn friend_status(
        &mut self,
        user: u64,
        status: Option<Status>,
        sessions: &[u64],
        io: &mut impl Sessions,
    ) {
        let push = GatewayMessage::FriendStatus { user, status };
        for &session in sessions {
            self.push(session, &push, io);
        }
    }

    /// Presence says this session was replaced by a login elsewhere.
    pub fn presence_kicked(&mut self, session: u64, io: &mut impl Sessions) {
        self.kick(session, io);
    }

    /// The profile service's push.
    pub fn profile_event(&mut self, event: proto::profile::Event, io: &mut impl Sessions) {
        match event {
            proto::profile::Event::Invalidate { user, version } => {
                self.relations.invalidate(user, version);
                let changed = GatewayMessage::ProfileChanged { user, version };
                for session in self.sessions.interested_in(user) {
                    self.push(session, &changed, io);
                }
                if self.sessions.session_of(user).is_some() {
                    self.relations.request(user);
                }
            }
            proto::profile::Event::GroupChanged { group, version } => {
                self.group_changed(group, version);
            }
            proto::profile::Event::CacheReset => {
                self.relations.clear();
                self.groups.clear();
                for user in self.sessions.users() {
                    self.relations.request(user);
                }
            }
        }
        self.flush_loads();
    }

    /// Another gateway stored a message for a user it believes is here.
    pub fn peer_forward(&mut self, forward: Forward, io: &mut impl Sessions) -> PeerOutcome {
        match self.sessions.session_of(forward.to) {
            Some(session) => {
                self.push_delivery(session, forward.into_delivery(), io);
                PeerOutcome::Pushed
            }
            None => PeerOutcome::NotHere,
        }
    }

    /// Close every session (clients reconnect elsewhere or later); presence
    /// is told through `Offline` actions.
    pub fn shutdown(&mut self, io: &mut impl Sessions) {
        for (session, user) in self.sessions.drain() {
            io.close(session);
            self.actions.push_back(Action::Offline { user, session });
        }
    }

    // ---- logins ------------------------------------------------------------

    fn on_login_request(&mut self, pending: PendingId, payload: Vec<u8>, io: &mut impl Sessions) {
        if self.pending_logins >= self.config.pending_logins_max
            || self.sessions.len() >= self.config.sessions_max
        {
            let busy = app::encode(&app::LoginAnswer::Refused {
                code: app::LoginError::Busy,
                message: "gateway busy".into(),
            });
            io.reject(pending, &busy);
            metrics::counter!("gateway_logins_total", "result" => "busy").increment(1);
            return;
        }
        self.pending_logins += 1;
        let session = io.fresh_session_id();
        self.actions.push_back(Action::Login {
            pending,
            session,
            payload,
        });
    }

    fn on_login_checked(
        &mut self,
        now: Now,
        pending: PendingId,
        session: u64,
        outcome: LoginOutcome,
        io: &mut impl Sessions,
    ) {
        let ok = match outcome {
            LoginOutcome::Refused(answer) => {
                io.reject(pending, &answer);
                metrics::counter!("gateway_logins_total", "result" => "refused").increment(1);
                return;
            }
            LoginOutcome::Accepted(ok) => ok,
        };
        if self.relations.is_stale(&ok.relations) {
            // Changed (a password, a disable) while the login was checked:
            // decide on fresh relations.
            self.relations.request(ok.user);
            self.sessions.park_login(pending, session, ok);
            return;
        }
        self.relations.insert(ok.relations.clone());
        self.finish_login(now, pending, session, ok, io);
    }

    fn finish_login(
        &mut self,
        now: Now,
        pending: PendingId,
        session: u64,
        ok: LoginOk,
        io: &mut impl Sessions,
    ) {
        if !io.accept(now.at, pending, session, &ok.answer) {
            tracing::warn!(
                user = ok.user,
                "login checked but the session could not be created"
            );
            self.actions.push_back(Action::Offline {
                user: ok.user,
                session,
            });
            return;
        }
        metrics::counter!("gateway_logins_total", "result" => "ok").increment(1);
        let epoch = ok.relations.credential_epoch;
        if let Some(old) = self.sessions.register(session, ok.user, epoch) {
            self.kick(old, io);
        }
    }

    /// Tell a replaced session it was kicked; close it once that arrived.
    fn kick(&mut self, session: u64, io: &mut impl Sessions) {
        if !self.sessions.start_closing(session) {
            return; // gone, or kicked already
        }
        match io.send(session, app::encode(&GatewayMessage::Kicked)) {
            Ok(mid) => self.sessions.close_after(session, mid),
            Err(_) => io.close(session),
        }
        metrics::counter!("gateway_kicks_total").increment(1);
    }

    fn on_closed(&mut self, session: u64, reason: CloseReason) {
        if let Some(user) = self.sessions.remove(session) {
            tracing::debug!(session, user, ?reason, "session closed");
            self.sends.forget_holds_of(user);
            self.actions.push_back(Action::Offline { user, session });
        }
    }

    fn on_push_settled(&mut self, session: u64, mid: MsgId, acked: bool, io: &mut impl Sessions) {
        if self.sessions.is_close_after(session, mid) {
            io.close(session);
            return;
        }
        if acked {
            // The client takes messages again: tell it what it missed.
            if let Some(high_seq) = self.sessions.take_missed(session) {
                let hint = GatewayMessage::MailboxChanged { high_seq };
                if io.send(session, app::encode(&hint)).is_err() {
                    self.sessions.note_missed(session, high_seq);
                }
            }
            for (group, high_seq) in self.sessions.take_missed_groups(session) {
                let hint = GatewayMessage::GroupMailboxChanged { group, high_seq };
                if io.send(session, app::encode(&hint)).is_err() {
                    self.sessions.note_missed_group(session, group, high_seq);
                }
            }
        }
    }

    // ---- requests --------------------------------------------------------

    fn on_message(&mut self, now: Now, session: u64, bytes: &[u8], io: &mut impl Sessions) {
        let Some(s) = self.sessions.get(session) else {
            return;
        };
        let user = s.user;
        let Ok(msg) = app::decode::<ClientMessage>(bytes) else {
            metrics::counter!("gateway_bad_requests_total").increment(1);
            if let Some(held_back) = BAD_REQUEST_WARNINGS.check() {
                tracing::warn!(
                    user,
                    session,
                    held_back,
                    "undecodable request from a client; dropped"
                );
            }
            return;
        };
        let in_flight_full = s.in_flight >= self.config.requests_in_flight_per_session_max;
        let (to, msg_id, body, resent) = match msg.call {
            Call::Send { to, msg_id, body } if !is_group(to) => (to, msg_id, body, false),
            Call::GroupSend {
                group,
                msg_id,
                body,
                resend,
            } if is_group(group) => (group, msg_id, body, resend),
            Call::Send { .. } | Call::GroupSend { .. } => {
                let e = error(
                    AppErrorCode::BadRequest,
                    "Send takes a user id, GroupSend a group id",
                );
                return self.reply(session, msg.id, Err(e), io);
            }
            Call::Logout => return io.close(session),
            _ if in_flight_full => {
                let e = error(AppErrorCode::RateLimited, "too many requests in flight");
                return self.reply(session, msg.id, Err(e), io);
            }
            call => {
                if let Err(e) = groups::check_ids(&call) {
                    return self.reply(session, msg.id, Err(e), io);
                }
                return match groups::membership_needed(&call) {
                    Some(group) => self.member_call(now, group, (session, msg.id, user, call), io),
                    None => self.dispatch_call(session, msg.id, user, call),
                };
            }
        };
        let send = sends::NewSend {
            session,
            id: msg.id,
            key: (user, msg_id),
            to,
            body,
            resent,
        };
        self.on_send(now, send, in_flight_full, io);
    }

    /// Hand a call to the services.
    fn dispatch_call(&mut self, session: u64, id: u32, user: u64, call: Call) {
        self.sessions.take_slot(session);
        self.actions.push_back(Action::Call {
            session,
            id,
            user,
            call,
        });
    }

    fn on_call_done(
        &mut self,
        session: u64,
        id: u32,
        result: CallResult,
        effects: CallEffects,
        io: &mut impl Sessions,
    ) {
        self.sessions.free_slot(session);
        if let Some(friends) = effects.watching {
            self.sessions.watch(session, friends);
        }
        for user in effects.changed {
            self.relations.drop_entry(user);
        }
        for group in effects.groups_changed {
            self.groups.drop_entry(group);
        }
        self.reply(session, id, result, io);
    }

    fn reply(&mut self, session: u64, id: u32, result: CallResult, io: &mut impl Sessions) {
        self.try_reply(session, id, result, io);
    }

    /// Reply; false if the session could not queue it (the client hears
    /// nothing and retries only at its request timeout).
    fn try_reply(
        &mut self,
        session: u64,
        id: u32,
        result: CallResult,
        io: &mut impl Sessions,
    ) -> bool {
        let msg = GatewayMessage::Reply { id, result };
        if io.send(session, app::encode(&msg)).is_err() {
            metrics::counter!("gateway_replies_dropped_total").increment(1);
            return false;
        }
        true
    }

    /// Push to a session here; false if it could not be queued.
    fn push(&mut self, session: u64, msg: &GatewayMessage, io: &mut impl Sessions) -> bool {
        match io.send(session, app::encode(msg)) {
            Ok(_) => true,
            Err(_) => {
                metrics::counter!("gateway_pushes_dropped_total").increment(1);
                false
            }
        }
    }

    /// Push a stored message; one that cannot be queued (the session's send
    /// queue is full: a client that stopped reading) waits in the mailbox,
    /// and the session is told `MailboxChanged` once it reads again.
    fn push_delivery(&mut self, session: u64, delivery: Delivery, io: &mut impl Sessions) {
        let seq = delivery.seq;
        if !self.push(session, &GatewayMessage::Deliver(delivery), io) {
            self.sessions.note_missed(session, seq);
        }
    }

    fn flush_loads(&mut self) {
        for users in self.relations.take_requests() {
            self.actions.push_back(Action::LoadRelations { users });
        }
        for group in self.groups.take_requests() {
            self.actions.push_back(Action::LoadGroup { group });
        }
    }
}
