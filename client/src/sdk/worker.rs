//! The connection's task: owns the session, the requests in flight, the
//! outbox and the dedupe memory; reconnects when the session is lost.

use super::{
    dedupe::Dedupe,
    establish::{establish, Established, Link, Secrets},
    lock,
    outbox::{Entry, Outbox, SendReply},
    ConnectError, ImEvent, LostReason, Page, SdkConfig, SdkError, Shared, SharedState,
};
use netio::sleep_until;
use proto::{
    app::{decode, encode, AppErrorCode, Call, ClientMessage, GatewayMessage, Reply},
    session::{Event, SendError},
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
    Close,
}

enum Waiter {
    Call(oneshot::Sender<Result<Reply, SdkError>>),
    Fetch(oneshot::Sender<Result<Page, SdkError>>),
    /// The outbox entry this request carries.
    Send(u64),
    Logout(oneshot::Sender<Result<(), SdkError>>),
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
    Timer,
}

struct Worker {
    config: Arc<SdkConfig>,
    secrets: Secrets,
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
    dedupe: Dedupe,
    request_timeout: Duration,
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
    let Established { link, accepted } = establish(&config, &secrets).await?;
    secrets.token = Some(accepted.resume_token.clone());
    let shared = Arc::new(Mutex::new(SharedState {
        accepted,
        gateway: link.addr,
        lost: None,
        stats: Default::default(),
    }));
    let limits = &config.limits;
    let worker = Worker {
        outbox: Outbox::new(limits.outbox_max),
        dedupe: Dedupe::new(limits.dedupe_ids_max.max(1)),
        request_timeout: Duration::from_millis(limits.request_timeout_ms),
        config: Arc::new(config),
        secrets,
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

impl Worker {
    async fn run(mut self) {
        loop {
            self.pump();
            let deadline = self.next_deadline();
            let step = match &mut self.link {
                LinkState::Up(link) => tokio::select! {
                    c = self.commands.recv() => Step::Command(c),
                    e = link.events.recv() => Step::Session(e),
                    () = sleep_until(deadline) => Step::Timer,
                },
                LinkState::Reconnecting(attempt) => tokio::select! {
                    c = self.commands.recv() => Step::Command(c),
                    r = attempt => Step::Reconnected(r),
                    () = sleep_until(deadline) => Step::Timer,
                },
                LinkState::Gone => {
                    if let Some(closing) = self.lingering.take() {
                        let _ = closing.await;
                    }
                    return;
                }
            };
            match step {
                Step::Command(Some(c)) => self.command(c),
                Step::Command(None) => self.finish(LostReason::Closed).await,
                Step::Session(Some(e)) => self.session_event(e).await,
                Step::Session(None) => self.session_lost(),
                Step::Reconnected(Ok(e)) => self.reconnected(e).await,
                Step::Reconnected(Err(reason)) => self.finish(reason).await,
                Step::Timer => self.timers(Instant::now()),
            }
        }
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
            Command::Logout { reply } => {
                if matches!(self.link, LinkState::Up(_)) {
                    self.issue(Call::Logout, Waiter::Logout(reply));
                } else {
                    // No session to end: the gateway's has ended already.
                    let _ = reply.send(Ok(()));
                    self.stop_now();
                }
            }
            Command::Close => self.stop_now(),
            Command::Send { to, body, reply } => {
                let entry = Entry {
                    to,
                    msg_id: rand::thread_rng().gen(),
                    body,
                    reply,
                    request: None,
                    retry_at: None,
                    attempts: 0,
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
        let call = Call::Send {
            to: entry.to,
            msg_id: entry.msg_id,
            body: entry.body.clone(),
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

    async fn session_event(&mut self, event: Event) {
        match event {
            Event::Message(bytes) => match decode::<GatewayMessage>(&bytes) {
                Ok(message) => self.gateway_message(message).await,
                Err(e) => {
                    tracing::warn!(error = %e, "dropping a malformed gateway message");
                    lock(&self.shared).stats.malformed_messages += 1;
                }
            },
            Event::Closed(reason) => {
                tracing::info!(?reason, "gateway session lost");
                self.session_lost();
            }
            // Acks make room (`pump` runs next); given-up messages are
            // re-sent from the outbox after the reconnect that follows.
            Event::Acked(_) | Event::GivenUp { .. } => {}
            Event::Connected { .. } | Event::Rejected { .. } => {}
        }
    }

    async fn gateway_message(&mut self, message: GatewayMessage) {
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
                if self.dedupe.first_time(d.from, d.msg_id) {
                    self.emit(ImEvent::Message(d)).await;
                } else {
                    lock(&self.shared).stats.duplicates_dropped += 1;
                }
            }
            GatewayMessage::FriendStatus { user, status } => {
                self.emit(ImEvent::FriendStatus { user, status }).await;
            }
            GatewayMessage::ProfileChanged { user, version } => {
                self.emit(ImEvent::ProfileChanged { user, version }).await;
            }
            GatewayMessage::Kicked => {
                self.emit(ImEvent::Kicked).await;
                self.close_link();
                self.end(LostReason::Kicked);
            }
        }
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
        }
        true
    }

    fn page(&mut self, reply: Reply) -> Result<Page, SdkError> {
        let Reply::Mailbox { messages, more } = reply else {
            return Err(SdkError::Protocol(format!("fetch answered with {reply:?}")));
        };
        let last_seq = messages.iter().filter_map(|d| d.seq).max();
        let total = messages.len();
        let messages: Vec<_> = messages
            .into_iter()
            .filter(|d| self.dedupe.first_time(d.from, d.msg_id))
            .collect();
        lock(&self.shared).stats.duplicates_dropped += (total - messages.len()) as u64;
        Ok(Page {
            messages,
            last_seq,
            more,
        })
    }

    fn send_answered(&mut self, key: u64, result: Result<Reply, SdkError>) {
        let retryable = matches!(
            &result,
            Err(SdkError::App {
                code: AppErrorCode::RateLimited | AppErrorCode::Unavailable,
                ..
            })
        );
        if retryable {
            let delay = Duration::from_millis(self.config.limits.send_retry_delay_ms);
            if let Some(entry) = self.outbox.get_mut(key) {
                entry.request = None;
                entry.retry_at = Some(Instant::now() + delay);
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
        let retries = match self.link {
            LinkState::Up(_) => self.outbox.next_retry(),
            _ => None,
        };
        [requests, retries].into_iter().flatten().min()
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
            }
        }
        self.unsent.retain(|(id, _)| self.requests.contains_key(id));
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
        for (id, pending) in std::mem::take(&mut self.requests) {
            let (deadline, sent) = (pending.deadline, pending.sent);
            match pending.waiter {
                Waiter::Send(_) => {}
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
        let attempt = reconnect(self.config.clone(), self.secrets.clone());
        self.link = LinkState::Reconnecting(Box::pin(attempt));
    }

    async fn reconnected(&mut self, established: Established) {
        let Established { link, accepted } = established;
        self.secrets.token = Some(accepted.resume_token.clone());
        let event = ImEvent::Reconnected {
            gateway: link.addr,
            mailbox_count: accepted.mailbox_count,
            mailbox_high_seq: accepted.mailbox_high_seq,
        };
        {
            let mut shared = lock(&self.shared);
            shared.gateway = link.addr;
            shared.accepted = accepted;
            shared.stats.reconnects += 1;
        }
        tracing::info!(gateway = %link.addr, "reconnected");
        self.link = LinkState::Up(link);
        self.fill_window(Instant::now());
        self.emit(event).await;
    }

    /// The connection is over: tell the application why (unless it asked).
    async fn finish(&mut self, reason: LostReason) {
        self.close_link();
        self.end(reason.clone());
        if reason != LostReason::Closed {
            self.emit(ImEvent::SessionLost { reason }).await;
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
                Waiter::Send(_) => {}
            }
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

    async fn emit(&mut self, event: ImEvent) {
        // Nobody listening is fine: requests still work.
        let _ = self.events.send(event).await;
    }
}

/// How long a closed session's driver may take to send its CLOSE.
const CLOSE_LINGER: Duration = Duration::from_secs(1);

/// Log in again with backoff until it works, is refused for good, or
/// `reconnect_attempts_max` attempts have failed.
async fn reconnect(config: Arc<SdkConfig>, secrets: Secrets) -> Result<Established, LostReason> {
    let limits = &config.limits;
    let backoff_max_ms = limits.reconnect_backoff_max_ms.max(1);
    let mut backoff_ms = limits.reconnect_backoff_min_ms.clamp(1, backoff_max_ms);
    let mut attempts = 0;
    loop {
        let delay_ms = rand::thread_rng().gen_range(backoff_ms / 2..=backoff_ms);
        tokio::time::sleep(Duration::from_millis(delay_ms)).await;
        attempts += 1;
        match establish(&config, &secrets).await {
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
