//! The connection's task: owns the session, the requests in flight, the
//! outbox and the inboxes (`proto::inbox`: what to show next, what to fetch
//! and acknowledge; the user's own mailbox and one per chat group,
//! `group_inboxes`); reconnects when the session is lost.

use super::{
    establish::{establish, Dialer, Established, Link, Secrets},
    group_inboxes::{
        GroupInboxes, GroupTag, GROUP_DEDUPE_IDS_MAX, GROUP_GAP_WAIT, GROUP_HELD_BYTES_MAX,
        GROUP_READY_MAX,
    },
    lock,
    outbox::{Entry, Outbox, SendReply},
    shown::{Mailbox, ShownMarks},
    ConnectError, ImEvent, LostReason, Page, SdkConfig, SdkError, SdkLimits, Shared, SharedState,
};
use netio::sleep_until;
use proto::{
    app::{decode, encode, Call, ClientMessage, GatewayMessage, Reply},
    groups::is_group,
    inbox::{Inbox, InboxConfig, InboxRequest},
    session::{CloseReason, Event, SendError},
};
use rand::Rng;
use std::{
    collections::{BTreeMap, VecDeque},
    future::Future,
    pin::Pin,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};
use tokio::sync::{mpsc, oneshot};

pub(crate) enum Command {
    Call {
        call: Call,
        reply: oneshot::Sender<Result<Reply, SdkError>>,
    },
    Fetch {
        call: Call,
        reply: oneshot::Sender<Result<Page, SdkError>>,
    },
    Send {
        to: u64,
        body: Vec<u8>,
        reply: SendReply,
    },
    Logout {
        reply: oneshot::Sender<Result<(), SdkError>>,
    },
    /// Answer once everything known to be in the mailbox was shown and
    /// acknowledged (the shown seq).
    Synced {
        reply: oneshot::Sender<Result<u64, SdkError>>,
    },
    Close,
}

enum Waiter {
    Call(oneshot::Sender<Result<Reply, SdkError>>),
    Fetch(oneshot::Sender<Result<Page, SdkError>>),
    /// The outbox entry this request carries.
    Send(u64),
    Logout(oneshot::Sender<Result<(), SdkError>>),
    /// The inbox's fetch, or its ack up to this seq.
    InboxFetch,
    InboxAck(u64),
    /// The group list the task reads itself (after every login, ...).
    GroupList,
    /// A group inbox's fetch, or its ack up to this seq.
    GroupFetch(GroupTag),
    GroupAck(GroupTag, u64),
}

struct Pending {
    waiter: Waiter,
    deadline: Instant,
    /// Handed to the session (else still in `unsent`).
    sent: bool,
}

type Reconnect = Pin<Box<dyn Future<Output = Result<Established, LostReason>> + Send>>;

enum LinkState {
    Up(Link),
    Reconnecting(Reconnect),
    Gone,
}

enum Step {
    Command(Option<Command>),
    Session(Option<Event>),
    Reconnected(Result<Established, LostReason>),
    /// The application's event channel has room (false: it is closed).
    EventRoom(bool),
    Timer,
}

struct Worker {
    config: Arc<SdkConfig>,
    secrets: Secrets,
    /// Which gateway addresses failed lately (tried last on reconnects).
    dialer: Dialer,
    commands: mpsc::Receiver<Command>,
    events: mpsc::Sender<ImEvent>,
    shared: Shared,
    link: LinkState,
    requests: BTreeMap<u32, Pending>,
    next_id: u32,
    /// Encoded requests the session has not taken yet (its send queue was
    /// full, or the session is being re-established), in order.
    unsent: VecDeque<(u32, Vec<u8>)>,
    outbox: Outbox,
    inbox: Inbox,
    groups: GroupInboxes,
    shows: Turns,
    /// Events for the application, in order, not yet in its channel.
    out_events: VecDeque<ImEvent>,
    /// Waiting for the inbox to catch up.
    synced: Vec<oneshot::Sender<Result<u64, SdkError>>>,
    /// Logging out or closing once the inbox's acks are out (or `CLOSE_WAIT`
    /// passed).
    ending: Option<(Ending, Instant)>,
    request_timeout: Duration,
    /// A send without a final answer fails after this long (its last
    /// retryable error); `None`: never.
    send_timeout: Option<Duration>,
    /// The closed session's driver, sending its CLOSE.
    lingering: Option<tokio::task::JoinHandle<()>>,
}

/// Log in once and start the task.
pub(crate) async fn start(
    config: SdkConfig,
    commands: mpsc::Receiver<Command>,
    events: mpsc::Sender<ImEvent>,
) -> Result<Shared, ConnectError> {
    let mut secrets = Secrets::new(&config.credentials);
    let dialer = Dialer::default();
    let Established { link, accepted } = establish(&config, &secrets, &dialer).await?;
    secrets.token = Some(accepted.resume_token.clone());
    let shared = Arc::new(Mutex::new(SharedState {
        accepted,
        gateway: link.addr,
        lost: None,
        stats: Default::default(),
    }));
    let limits = &config.limits;
    let inbox_config = InboxConfig {
        dedupe_ids_max: limits.dedupe_ids_max.max(1),
        ready_max: limits.events_max.max(1),
        ..InboxConfig::default()
    };
    let mut inbox = Inbox::resume(inbox_config, config.shown.get(Mailbox::Direct));
    let login = lock(&shared).accepted.clone();
    inbox.on_login(Instant::now(), login.mailbox_count, login.mailbox_high_seq);
    let mut groups = group_inboxes(limits, config.shown.clone());
    groups.on_login();
    let worker = Worker {
        outbox: Outbox::new(limits.outbox_max),
        inbox,
        groups,
        shows: Turns::default(),
        out_events: VecDeque::new(),
        synced: Vec::new(),
        ending: None,
        request_timeout: Duration::from_millis(limits.request_timeout_ms),
        send_timeout: (limits.send_timeout_ms > 0)
            .then(|| Duration::from_millis(limits.send_timeout_ms)),
        config: Arc::new(config),
        secrets,
        dialer,
        commands,
        events,
        shared: shared.clone(),
        link: LinkState::Up(link),
        requests: BTreeMap::new(),
        next_id: 0,
        unsent: VecDeque::new(),
        lingering: None,
    };
    tokio::spawn(worker.run());
    Ok(shared)
}

/// Whose message is handed out next. The user's own inbox and the group
/// inboxes take turns (and the groups take turns among themselves), so a
/// busy group holds up neither the other groups nor direct messages.
#[derive(Default)]
struct Turns {
    groups_next: bool,
}

impl Turns {
    fn next(
        &mut self,
        inbox: &mut Inbox,
        groups: &mut GroupInboxes,
        shown: &ShownMarks,
    ) -> Option<ImEvent> {
        let direct = |inbox: &mut Inbox| {
            let d = inbox.poll_show()?;
            shown.record(Mailbox::Direct, d.seq);
            Some(ImEvent::Message(d))
        };
        let group = |groups: &mut GroupInboxes| {
            let (group, delivery) = groups.poll_show()?;
            Some(ImEvent::GroupMessage { group, delivery })
        };
        let event = if self.groups_next {
            group(groups).or_else(|| direct(inbox))
        } else {
            direct(inbox).or_else(|| group(groups))
        };
        self.groups_next = matches!(event, Some(ImEvent::Message(_)));
        event
    }
}

/// The group inboxes, under `limits`, going on from `shown`.
fn group_inboxes(limits: &SdkLimits, shown: ShownMarks) -> GroupInboxes {
    let config = InboxConfig {
        dedupe_ids_max: limits.dedupe_ids_max.clamp(1, GROUP_DEDUPE_IDS_MAX),
        ready_max: limits.events_max.clamp(1, GROUP_READY_MAX),
        held_bytes_max: GROUP_HELD_BYTES_MAX,
        gap_wait: GROUP_GAP_WAIT,
        ..InboxConfig::default()
    };
    GroupInboxes::new(
        config,
        limits.groups_max,
        limits.group_requests_in_flight_max,
    )
    .with_shown(shown)
}

/// What the application asked for once the acks are out.
enum Ending {
    Logout(oneshot::Sender<Result<(), SdkError>>),
    Close,
}

impl Worker {
    async fn run(mut self) {
        loop {
            self.drive_inbox(Instant::now());
            self.pump();
            let deadline = self.next_deadline();
            // Queued events, or messages waiting in the inboxes for room.
            let has_events = !self.out_events.is_empty()
                || self.inbox.waiting() > 0
                || self.groups.waiting() > 0;
            let step = match &mut self.link {
                LinkState::Up(link) => tokio::select! {
                    c = self.commands.recv() => Step::Command(c),
                    e = link.events.recv() => Step::Session(e),
                    room = self.events.reserve(), if has_events => Step::EventRoom(room.is_ok()),
                    () = sleep_until(deadline) => Step::Timer,
                },
                LinkState::Reconnecting(attempt) => tokio::select! {
                    c = self.commands.recv() => Step::Command(c),
                    r = attempt => Step::Reconnected(r),
                    room = self.events.reserve(), if has_events => Step::EventRoom(room.is_ok()),
                    () = sleep_until(deadline) => Step::Timer,
                },
                LinkState::Gone => {
                    self.flush_events().await;
                    if let Some(closing) = self.lingering.take() {
                        let _ = closing.await;
                    }
                    return;
                }
            };
            match step {
                Step::Command(Some(c)) => self.command(c),
                Step::Command(None) => self.finish(LostReason::Closed),
                Step::Session(Some(e)) => self.session_event(e),
                Step::Session(None) => self.session_lost(),
                Step::Reconnected(Ok(e)) => self.reconnected(e),
                Step::Reconnected(Err(reason)) => self.finish(reason),
                Step::EventRoom(true) => self.hand_out_events(),
                Step::EventRoom(false) => self.out_events.clear(), // nobody listens
                Step::Timer => self.timers(Instant::now()),
            }
        }
    }

    /// Hand queued events to the application while its channel has room
    /// (never waiting: replies keep being processed while it is full).
    fn hand_out_events(&mut self) {
        while let Some(event) = self.out_events.pop_front() {
            match self.events.try_send(event) {
                Ok(()) => {}
                Err(mpsc::error::TrySendError::Full(event)) => {
                    self.out_events.push_front(event);
                    return;
                }
                Err(mpsc::error::TrySendError::Closed(_)) => {
                    self.out_events.clear();
                    return;
                }
            }
        }
    }

    /// The connection is over: hand out the last events (the application
    /// is told why it ended), waiting at most `CLOSE_WAIT`.
    async fn flush_events(&mut self) {
        let events = std::mem::take(&mut self.out_events);
        let all = async {
            for event in events {
                if self.events.send(event).await.is_err() {
                    return;
                }
            }
        };
        let _ = tokio::time::timeout(super::CLOSE_WAIT, all).await;
    }

    // ---- requests out ----------------------------------------------------

    fn command(&mut self, command: Command) {
        match command {
            Command::Call { call, reply } => {
                self.issue(call, Waiter::Call(reply));
            }
            Command::Fetch { call, reply } => {
                self.issue(call, Waiter::Fetch(reply));
            }
            Command::Logout { reply } => self.begin_ending(Ending::Logout(reply)),
            Command::Close => self.begin_ending(Ending::Close),
            Command::Synced { reply } => self.synced.push(reply),
            Command::Send { to, body, reply } => {
                let entry = Entry {
                    to,
                    msg_id: rand::thread_rng().gen(),
                    body,
                    reply,
                    request: None,
                    retry_at: None,
                    attempts: 0,
                    queued_at: Instant::now(),
                    last_error: None,
                };
                match self.outbox.push(entry) {
                    Ok(_) => self.fill_window(Instant::now()),
                    Err(entry) => {
                        let max = self.outbox.max();
                        let _ = entry.reply.send(Err(SdkError::OutboxFull { max }));
                    }
                }
            }
        }
    }

    /// Queue one request; `pump` hands it to the session.
    fn issue(&mut self, call: Call, waiter: Waiter) -> u32 {
        let id = self.next_id;
        self.next_id = self.next_id.wrapping_add(1);
        let bytes = encode(&ClientMessage { id, call });
        let pending = Pending {
            waiter,
            deadline: Instant::now() + self.request_timeout,
            sent: false,
        };
        let previous = self.requests.insert(id, pending);
        debug_assert!(previous.is_none(), "request ids wrapped onto a live one");
        self.unsent.push_back((id, bytes));
        id
    }

    /// Logout or close after the inbox's last acknowledgement is out, so
    /// the next login does not show again what this one showed.
    fn begin_ending(&mut self, ending: Ending) {
        if !matches!(self.link, LinkState::Up(_)) {
            // No session to end: the gateway's has ended already.
            if let Ending::Logout(reply) = ending {
                let _ = reply.send(Ok(()));
            }
            return self.stop_now();
        }
        let now = Instant::now();
        self.inbox.ack_now(now);
        self.groups.ack_now(now);
        self.ending = Some((ending, now + super::CLOSE_WAIT));
    }

    /// The ending asked for, once the acks are out (or their time is up).
    fn finish_ending(&mut self, now: Instant) {
        let Some((_, deadline)) = &self.ending else {
            return;
        };
        let acked = self.inbox.all_acked() && self.groups.all_acked();
        if !acked && now < *deadline {
            return;
        }
        match self.ending.take().expect("checked").0 {
            Ending::Logout(reply) => {
                self.issue(Call::Logout, Waiter::Logout(reply));
            }
            Ending::Close => self.stop_now(),
        }
    }

    /// Hand what the inboxes show to the application and their requests to
    /// the session; answer `synced` waiters once they caught up.
    fn drive_inbox(&mut self, now: Instant) {
        // A message leaves its inbox only into the application's channel
        // (after the events queued before it): the inbox acknowledges what
        // was taken, so what still waits for room when the connection ends
        // stays in the mailbox for the next login. While the application is
        // behind, the inboxes stop fetching and drop pushes (fetched later).
        while self.out_events.is_empty() {
            match self.events.try_reserve() {
                Ok(permit) => {
                    match self
                        .shows
                        .next(&mut self.inbox, &mut self.groups, &self.config.shown)
                    {
                        Some(event) => permit.send(event),
                        None => break,
                    }
                }
                Err(mpsc::error::TrySendError::Full(())) => break,
                Err(mpsc::error::TrySendError::Closed(())) => {
                    // Nobody listens: taken and dropped, as other events.
                    while (self
                        .shows
                        .next(&mut self.inbox, &mut self.groups, &self.config.shown))
                    .is_some()
                    {}
                    break;
                }
            }
        }
        if matches!(self.link, LinkState::Up(_)) {
            while let Some(r) = self.inbox.poll_request(now) {
                let waiter = match r {
                    InboxRequest::Fetch { .. } => Waiter::InboxFetch,
                    InboxRequest::Ack { up_to_seq } => Waiter::InboxAck(up_to_seq),
                };
                self.issue(r.call(), waiter);
            }
            if self.groups.poll_list(now) {
                self.issue(Call::Groups, Waiter::GroupList);
            }
            while let Some((tag, r)) = self.groups.poll_request(now) {
                let waiter = match r {
                    InboxRequest::Fetch { .. } => Waiter::GroupFetch(tag),
                    InboxRequest::Ack { up_to_seq } => Waiter::GroupAck(tag, up_to_seq),
                };
                self.issue(r.group_call(tag.group), waiter);
            }
        }
        let caught_up = self.inbox.caught_up() && self.inbox.all_acked() && self.groups.synced();
        if caught_up && self.out_events.is_empty() {
            let seq = self.inbox.shown_seq();
            for w in self.synced.drain(..) {
                let _ = w.send(Ok(seq));
            }
        }
        self.finish_ending(now);
    }

    /// Put outbox entries on the wire, oldest first, while fewer than
    /// `sends_in_flight_max` are waiting for their answer (only while a
    /// session is up; a reconnect re-issues every entry).
    fn fill_window(&mut self, now: Instant) {
        if !matches!(self.link, LinkState::Up(_)) {
            return;
        }
        let on_wire = (self.requests.values())
            .filter(|p| matches!(p.waiter, Waiter::Send(_)))
            .count();
        let room = self
            .config
            .limits
            .sends_in_flight_max
            .saturating_sub(on_wire);
        for key in self.outbox.ready(now, room) {
            self.issue_send(key);
        }
    }

    fn issue_send(&mut self, key: u64) {
        let Some(entry) = self.outbox.get_mut(key) else {
            return;
        };
        let (to, msg_id, body) = (entry.to, entry.msg_id, entry.body.clone());
        let call = if is_group(to) {
            Call::GroupSend {
                group: to,
                msg_id,
                body,
                resend: entry.attempts > 0,
            }
        } else {
            Call::Send { to, msg_id, body }
        };
        entry.retry_at = None;
        let reissued = entry.attempts > 0;
        entry.attempts += 1;
        let id = self.issue(call, Waiter::Send(key));
        if let Some(entry) = self.outbox.get_mut(key) {
            entry.request = Some(id);
        }
        if reissued {
            lock(&self.shared).stats.sends_reissued += 1;
        }
    }

    /// Hand queued requests to the session until its queue is full.
    fn pump(&mut self) {
        let LinkState::Up(link) = &self.link else {
            return;
        };
        let mut refused = Vec::new();
        while let Some((id, bytes)) = self.unsent.pop_front() {
            let Some(pending) = self.requests.get_mut(&id) else {
                continue; // timed out before it went out
            };
            match link.client.send(bytes.clone()) {
                Ok(_) => pending.sent = true,
                Err(SendError::QueueFull | SendError::Closed | SendError::UnknownSession) => {
                    // Wait for room (acks wake the loop) or for the
                    // session's end (a reconnect re-queues).
                    self.unsent.push_front((id, bytes));
                    break;
                }
                Err(e @ (SendError::TooLarge { .. } | SendError::Empty)) => {
                    refused.push((id, SdkError::Invalid(e.to_string())));
                }
            }
        }
        for (id, error) in refused {
            self.answer(id, Err(error));
        }
    }

    // ---- what comes back ------------------------------------------------

    fn session_event(&mut self, event: Event) {
        match event {
            Event::Message(bytes) => match decode::<GatewayMessage>(&bytes) {
                Ok(message) => self.gateway_message(message),
                Err(e) => {
                    tracing::warn!(error = %e, "dropping a malformed gateway message");
                    lock(&self.shared).stats.malformed_messages += 1;
                }
            },
            Event::Closed(reason) => {
                tracing::info!(?reason, "gateway session lost");
                if matches!(reason, CloseReason::TimedOut | CloseReason::Expired) {
                    // The gateway stopped answering: log in elsewhere first.
                    if let LinkState::Up(link) = &self.link {
                        let memory =
                            Duration::from_millis(self.config.limits.dead_gateway_memory_ms);
                        self.dialer.mark_dead(link.addr, Instant::now(), memory);
                    }
                }
                self.session_lost();
            }
            // Acks make room (`pump` runs next); given-up messages are
            // re-sent from the outbox after the reconnect that follows.
            Event::Acked(_) | Event::GivenUp { .. } => {}
            Event::Connected { .. } | Event::Rejected { .. } => {}
        }
    }

    fn gateway_message(&mut self, message: GatewayMessage) {
        match message {
            GatewayMessage::Reply { id, result } => {
                let result = result.map_err(|e| SdkError::App {
                    code: e.code,
                    message: e.message,
                });
                if !self.answer(id, result) {
                    lock(&self.shared).stats.unmatched_replies += 1;
                }
            }
            GatewayMessage::Deliver(d) => {
                self.inbox.on_push(Instant::now(), d);
                lock(&self.shared).stats.inbox = self.inbox.stats();
            }
            GatewayMessage::MailboxChanged { high_seq } => {
                self.inbox.on_mailbox_changed(high_seq);
            }
            GatewayMessage::FriendStatus { user, status } => {
                self.emit(ImEvent::FriendStatus { user, status });
            }
            GatewayMessage::ProfileChanged { user, version } => {
                self.emit(ImEvent::ProfileChanged { user, version });
            }
            GatewayMessage::Kicked => {
                self.emit(ImEvent::Kicked);
                self.close_link();
                self.end(LostReason::Kicked);
            }
            GatewayMessage::GroupDeliver { group, delivery } => {
                self.groups.on_push(Instant::now(), group, delivery);
                self.publish_group_stats();
            }
            GatewayMessage::GroupMailboxChanged { group, high_seq } => {
                self.groups.on_mailbox_changed(group, high_seq);
            }
            GatewayMessage::GroupChanged { group, version } => {
                // Joined, left, dissolved, renamed...: read the list again
                // (it starts and drops group inboxes).
                self.groups.want_list();
                self.emit(ImEvent::GroupChanged { group, version });
            }
        }
    }

    fn publish_group_stats(&self) {
        lock(&self.shared).stats.groups = self.groups.stats();
    }

    /// Route a reply to its request; false if no request has this id.
    fn answer(&mut self, id: u32, result: Result<Reply, SdkError>) -> bool {
        let Some(pending) = self.requests.remove(&id) else {
            return false;
        };
        match pending.waiter {
            Waiter::Call(tx) => {
                let _ = tx.send(result);
            }
            Waiter::Fetch(tx) => {
                let _ = tx.send(result.and_then(|r| self.page(r)));
            }
            Waiter::Send(key) => {
                self.send_answered(key, result);
                self.fill_window(Instant::now());
            }
            Waiter::Logout(tx) => {
                let _ = tx.send(result.map(|_| ()));
                self.stop_now();
            }
            Waiter::InboxFetch => {
                let now = Instant::now();
                match result {
                    Ok(Reply::Mailbox {
                        messages,
                        last_seq,
                        more,
                    }) => self.inbox.on_page(now, messages, last_seq, more),
                    other => {
                        tracing::debug!(?other, "mailbox fetch failed; retrying later");
                        self.inbox.on_fetch_failed(now);
                    }
                }
                lock(&self.shared).stats.inbox = self.inbox.stats();
            }
            Waiter::InboxAck(up_to) => match result {
                Ok(reply) if is_ack(&reply) => self.inbox.on_ack_done(Instant::now(), up_to),
                _ => self.inbox.on_ack_failed(Instant::now()),
            },
            Waiter::GroupList => {
                let now = Instant::now();
                match result {
                    Ok(Reply::Groups { groups, .. }) => self.groups.on_list(now, groups),
                    other => {
                        tracing::debug!(?other, "group list read failed");
                        self.groups.on_list_failed(now, !is_retryable(&other));
                    }
                }
                self.publish_group_stats();
            }
            Waiter::GroupFetch(tag) => {
                let now = Instant::now();
                match result {
                    Ok(Reply::GroupMailbox {
                        messages,
                        last_seq,
                        more,
                        dropped,
                    }) => {
                        let told =
                            (self.groups).on_page(now, tag, messages, last_seq, more, dropped);
                        if told > 0 {
                            let group = tag.group;
                            self.emit(ImEvent::GroupDropped { group, count: told });
                        }
                    }
                    other => {
                        tracing::debug!(?other, group = tag.group, "group fetch failed");
                        self.group_request_failed(&other);
                        self.groups.on_fetch_failed(now, tag);
                    }
                }
                self.publish_group_stats();
            }
            Waiter::GroupAck(tag, up_to) => match result {
                Ok(reply) if is_ack(&reply) => self.groups.on_ack_done(Instant::now(), tag, up_to),
                other => {
                    self.group_request_failed(&other);
                    self.groups.on_ack_failed(Instant::now(), tag);
                }
            },
        }
        true
    }

    /// A group's fetch or ack refused for good (not a member any more, no
    /// such group): the list, read again, drops the group's inbox. A
    /// retryable failure is retried by the inbox itself.
    fn group_request_failed(&mut self, result: &Result<Reply, SdkError>) {
        if !is_retryable(result) {
            self.groups.want_list();
        }
    }

    fn page(&mut self, reply: Reply) -> Result<Page, SdkError> {
        match reply {
            Reply::Mailbox {
                messages,
                last_seq,
                more,
            } => Ok(Page {
                messages,
                last_seq,
                more,
            }),
            other => Err(SdkError::Protocol(format!("fetch answered with {other:?}"))),
        }
    }

    fn send_answered(&mut self, key: u64, result: Result<Reply, SdkError>) {
        let retryable = matches!(&result, Err(SdkError::App { code, .. }) if code.is_retryable());
        if retryable {
            let delay = Duration::from_millis(self.config.limits.send_retry_delay_ms);
            if let Some(entry) = self.outbox.get_mut(key) {
                entry.request = None;
                entry.retry_at = Some(Instant::now() + delay);
                entry.last_error = result.err().map(Box::new);
            }
            return;
        }
        let Some(entry) = self.outbox.remove(key) else {
            return;
        };
        let outcome = match result {
            Ok(Reply::Sent(outcome)) => Ok(outcome),
            Ok(other) => Err(SdkError::Protocol(format!("send answered with {other:?}"))),
            Err(e) => Err(e),
        };
        let _ = entry.reply.send(outcome);
    }

    // ---- timers -----------------------------------------------------------

    fn next_deadline(&self) -> Option<Instant> {
        let requests = self.requests.values().map(|p| p.deadline).min();
        // Retries wait for a session; a reconnect re-issues them all.
        let (retries, inbox, groups) = match self.link {
            LinkState::Up(_) => (
                self.outbox.next_retry(),
                self.inbox.poll_timeout(),
                self.groups.poll_timeout(),
            ),
            _ => (None, None, None),
        };
        let ending = self.ending.as_ref().map(|(_, t)| *t);
        let give_up = self.outbox.next_give_up(self.send_timeout);
        [requests, retries, inbox, groups, ending, give_up]
            .into_iter()
            .flatten()
            .min()
    }

    fn timers(&mut self, now: Instant) {
        let expired: Vec<u32> = self
            .requests
            .iter()
            .filter(|(_, p)| p.deadline <= now)
            .map(|(id, _)| *id)
            .collect();
        for id in expired {
            let pending = self.requests.remove(&id).expect("listed");
            match pending.waiter {
                // No answer yet: ask again with the same message id.
                Waiter::Send(key) => {
                    if let Some(entry) = self.outbox.get_mut(key) {
                        entry.request = None;
                    }
                }
                Waiter::Logout(tx) => {
                    let _ = tx.send(Err(SdkError::Timeout));
                    self.stop_now();
                }
                Waiter::Call(tx) => drop(tx.send(Err(SdkError::Timeout))),
                Waiter::Fetch(tx) => drop(tx.send(Err(SdkError::Timeout))),
                Waiter::InboxFetch => self.inbox.on_fetch_failed(now),
                Waiter::InboxAck(_) => self.inbox.on_ack_failed(now),
                Waiter::GroupList => self.groups.on_list_failed(now, false),
                Waiter::GroupFetch(tag) => self.groups.on_fetch_failed(now, tag),
                Waiter::GroupAck(tag, _) => self.groups.on_ack_failed(now, tag),
            }
        }
        self.unsent.retain(|(id, _)| self.requests.contains_key(id));
        for entry in self.outbox.give_up(now, self.send_timeout) {
            let error = entry.last_error.map_or(SdkError::Timeout, |e| *e);
            let _ = entry.reply.send(Err(error));
        }
        self.fill_window(now);
    }

    // ---- losing and regaining the session ---------------------------------

    /// The session is gone: fail the requests that were on it (sends stay
    /// in the outbox) and start reconnecting.
    fn session_lost(&mut self) {
        if !matches!(self.link, LinkState::Up(_)) {
            return;
        }
        self.outbox.detach_all();
        let mut logged_out = false;
        let now = Instant::now();
        for (id, pending) in std::mem::take(&mut self.requests) {
            let (deadline, sent) = (pending.deadline, pending.sent);
            match pending.waiter {
                Waiter::Send(_) => {}
                // The next login's mailbox figures start the inbox again
                // (and its group list the group inboxes).
                Waiter::InboxFetch => self.inbox.on_fetch_failed(now),
                Waiter::InboxAck(_) => self.inbox.on_ack_failed(now),
                Waiter::GroupList => self.groups.on_list_failed(now, false),
                Waiter::GroupFetch(tag) => self.groups.on_fetch_failed(now, tag),
                Waiter::GroupAck(tag, _) => self.groups.on_ack_failed(now, tag),
                Waiter::Logout(tx) => {
                    // The gateway ended the session, as asked.
                    let _ = tx.send(Ok(()));
                    logged_out = true;
                }
                // Never went out: it goes out on the next session.
                waiter if !sent => {
                    let pending = Pending {
                        waiter,
                        deadline,
                        sent,
                    };
                    self.requests.insert(id, pending);
                }
                Waiter::Call(tx) => drop(tx.send(Err(SdkError::SessionLost))),
                Waiter::Fetch(tx) => drop(tx.send(Err(SdkError::SessionLost))),
            }
        }
        self.unsent.retain(|(id, _)| self.requests.contains_key(id));
        if logged_out {
            self.stop_now();
            return;
        }
        let attempt = reconnect(
            self.config.clone(),
            self.secrets.clone(),
            self.dialer.clone(),
        );
        self.link = LinkState::Reconnecting(Box::pin(attempt));
    }

    fn reconnected(&mut self, established: Established) {
        let Established { link, accepted } = established;
        self.secrets.token = Some(accepted.resume_token.clone());
        let event = ImEvent::Reconnected {
            gateway: link.addr,
            mailbox_count: accepted.mailbox_count,
            mailbox_high_seq: accepted.mailbox_high_seq,
        };
        self.inbox.on_login(
            Instant::now(),
            accepted.mailbox_count,
            accepted.mailbox_high_seq,
        );
        // The group list is read again; it restarts the group inboxes.
        self.groups.on_login();
        {
            let mut shared = lock(&self.shared);
            shared.gateway = link.addr;
            shared.accepted = accepted;
            shared.stats.reconnects += 1;
        }
        tracing::info!(gateway = %link.addr, "reconnected");
        self.link = LinkState::Up(link);
        self.fill_window(Instant::now());
        self.emit(event);
    }

    /// The connection is over: tell the application why (unless it asked).
    fn finish(&mut self, reason: LostReason) {
        self.close_link();
        self.end(reason.clone());
        if reason != LostReason::Closed {
            self.emit(ImEvent::SessionLost { reason });
        }
    }

    /// End the connection at the application's request.
    fn stop_now(&mut self) {
        self.close_link();
        self.end(LostReason::Closed);
    }

    /// Fail everything still waiting and stop the task.
    fn end(&mut self, reason: LostReason) {
        lock(&self.shared).lost = Some(reason.clone());
        let error = SdkError::Closed(reason);
        self.outbox.fail_all(&error);
        for (_, pending) in std::mem::take(&mut self.requests) {
            match pending.waiter {
                Waiter::Call(tx) => drop(tx.send(Err(error.clone()))),
                Waiter::Fetch(tx) => drop(tx.send(Err(error.clone()))),
                Waiter::Logout(tx) => drop(tx.send(Ok(()))),
                Waiter::Send(_)
                | Waiter::InboxFetch
                | Waiter::InboxAck(_)
                | Waiter::GroupList
                | Waiter::GroupFetch(_)
                | Waiter::GroupAck(..) => {}
            }
        }
        for w in self.synced.drain(..) {
            let _ = w.send(Err(error.clone()));
        }
        if let Some((Ending::Logout(reply), _)) = self.ending.take() {
            let _ = reply.send(Ok(()));
        }
        self.unsent.clear();
        self.link = LinkState::Gone;
    }

    /// Close the session cleanly: its driver lives on (detached) until the
    /// CLOSE is out, at most `CLOSE_LINGER`.
    fn close_link(&mut self) {
        let LinkState::Up(mut link) = std::mem::replace(&mut self.link, LinkState::Gone) else {
            return;
        };
        link.client.close();
        self.lingering = Some(tokio::spawn(async move {
            let drain = async { while link.events.recv().await.is_some() {} };
            let _ = tokio::time::timeout(CLOSE_LINGER, drain).await;
            drop(link.client);
        }));
    }

    /// Queue an event for the application (handed out as its channel has
    /// room; nobody listening is fine: requests still work).
    fn emit(&mut self, event: ImEvent) {
        self.out_events.push_back(event);
    }
}

/// An acknowledgement's answer: `Acked` for the user's mailbox, `Done` for
/// a group's cursor.
fn is_ack(reply: &Reply) -> bool {
    matches!(reply, Reply::Acked { .. } | Reply::Done)
}

/// Whether a failed request may succeed unchanged later: a retryable
/// error, a timeout or a lost session (not a final refusal, nor a reply
/// that does not fit).
fn is_retryable(result: &Result<Reply, SdkError>) -> bool {
    match result {
        Err(SdkError::App { code, .. }) => code.is_retryable(),
        Err(SdkError::Timeout | SdkError::SessionLost) => true,
        Ok(_) | Err(_) => false,
    }
}

/// How long a closed session's driver may take to send its CLOSE.
const CLOSE_LINGER: Duration = Duration::from_secs(1);

/// Log in again with backoff until it works, is refused for good, or
/// `reconnect_attempts_max` attempts have failed.
async fn reconnect(
    config: Arc<SdkConfig>,
    secrets: Secrets,
    dialer: Dialer,
) -> Result<Established, LostReason> {
    let limits = &config.limits;
    let backoff_max_ms = limits.reconnect_backoff_max_ms.max(1);
    let mut backoff_ms = limits.reconnect_backoff_min_ms.clamp(1, backoff_max_ms);
    let mut attempts = 0;
    loop {
        let delay_ms = rand::thread_rng().gen_range(backoff_ms / 2..=backoff_ms);
        tokio::time::sleep(Duration::from_millis(delay_ms)).await;
        attempts += 1;
        match establish(&config, &secrets, &dialer).await {
            Ok(established) => return Ok(established),
            Err(e) if !e.is_transient() => return Err(LostReason::Refused(e)),
            Err(last) if attempts >= limits.reconnect_attempts_max => {
                return Err(LostReason::GaveUp { attempts, last })
            }
            Err(e) => {
                tracing::info!(error = %e, attempts, "reconnect failed; backing off");
                backoff_ms = (backoff_ms * 2).min(backoff_max_ms);
            }
        }
    }
}
