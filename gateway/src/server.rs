//! The gateway's event loop: one task owns the UDP socket and the session
//! endpoint (`proto::session::ServerEndpoint`); everything that waits for a
//! service behind the gateway runs in its own task and comes back as a
//! [`Cmd`]. The loop routes messages: to a recipient online on this gateway
//! (answered `Delivered` once the recipient's client acknowledged it), or to
//! the recipient's shard (answered `Stored` once the shard made it durable).

use crate::{
    calls::{self, CallResult},
    dedupe::{FastMap, RecentSends},
    login::{self, LoginOutcome},
    services::{now_ms, Services},
};
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};
use netio::udp::{self, RecvBatch, SendBatch};
use presence::PresenceEvent;
use proto::{
    app::{
        self, AppError, AppErrorCode, Call, ClientMessage, Delivery, GatewayMessage, LoginAnswer,
        LoginError, Reply, SendOutcome, StoredEnvelope, BODY_BYTES_MAX,
    },
    peer::{Forward, PeerOutcome},
    session::{wire, Event, MsgId, PendingId, ServerEndpoint, ServerEvent},
};
use std::{net::IpAddr, num::NonZeroU32, sync::Arc, time::Instant};
use tokio::{
    net::UdpSocket,
    sync::{mpsc, oneshot},
};

/// Work finished off the loop.
pub enum Cmd {
    Login {
        pending: PendingId,
        session: u64,
        outcome: LoginOutcome,
    },
    Reply {
        session: u64,
        id: u32,
        result: CallResult,
    },
    SendDone {
        key: SendKey,
        result: Result<SendOutcome, AppError>,
    },
    /// Another gateway forwards a message for a user online here.
    PeerForward {
        forward: Forward,
        reply: oneshot::Sender<PeerOutcome>,
    },
}

/// (sender, message id): what makes a message unique.
pub type SendKey = (u64, u128);

struct Sess {
    user: u64,
    /// Requests of this session being worked on.
    in_flight: usize,
    /// Kicked: closed once this push (the `Kicked` message) is settled.
    closing_after: Option<MsgId>,
}

/// Who waits for a push to settle.
enum Origin {
    /// A sender on this gateway: answered `Delivered`, or the message is
    /// stored if the push is given up.
    Local {
        key: SendKey,
        to: u64,
        envelope: StoredEnvelope,
    },
    /// Another gateway; it stores the message itself if told `GivenUp`.
    Peer(oneshot::Sender<PeerOutcome>),
}

pub struct Loop {
    services: Arc<Services>,
    endpoint: ServerEndpoint,
    cmds: mpsc::UnboundedSender<Cmd>,
    sessions: FastMap<u64, Sess>,
    users: FastMap<u64, u64>,
    pending_logins: usize,
    pushes: FastMap<(u64, MsgId), Origin>,
    sends: FastMap<SendKey, Vec<(u64, u32)>>,
    done: RecentSends,
    /// The wall clock (ms since the Unix epoch), read once per loop pass.
    now_ms: u64,
    message_rate: DefaultKeyedRateLimiter<u64>,
    handshake_rate: DefaultKeyedRateLimiter<IpAddr>,
}

fn quota(per_s: u32, burst: u32) -> Quota {
    let n = |v: u32| NonZeroU32::new(v.max(1)).expect("at least 1");
    Quota::per_second(n(per_s)).allow_burst(n(burst))
}

impl Loop {
    pub fn new(
        services: Arc<Services>,
        endpoint: ServerEndpoint,
        cmds: mpsc::UnboundedSender<Cmd>,
    ) -> Loop {
        let limits = &services.config.limits;
        Loop {
            done: RecentSends::new(limits.dedupe_entries_max),
            now_ms: now_ms(),
            message_rate: RateLimiter::keyed(quota(
                limits.messages_per_user_per_s,
                limits.messages_burst,
            )),
            handshake_rate: RateLimiter::keyed(quota(
                limits.handshakes_per_ip_per_s,
                limits.handshakes_per_ip_per_s,
            )),
            services,
            endpoint,
            cmds,
            sessions: FastMap::default(),
            users: FastMap::default(),
            pending_logins: 0,
            pushes: FastMap::default(),
            sends: FastMap::default(),
        }
    }

    /// Serve until `stop` fires; then close every session and tell presence.
    pub async fn run(
        mut self,
        socket: UdpSocket,
        mut cmds: mpsc::UnboundedReceiver<Cmd>,
        mut presence_events: mpsc::Receiver<PresenceEvent>,
        mut profile_events: mpsc::Receiver<proto::profile::Event>,
        mut stop: oneshot::Receiver<()>,
    ) -> std::io::Result<()> {
        let mut inbox = RecvBatch::new();
        let mut outbox = SendBatch::new();
        let mut housekeeping = tokio::time::interval(std::time::Duration::from_secs(10));
        loop {
            self.flush(&socket, &mut outbox).await;
            self.now_ms = now_ms();
            let deadline = self.endpoint.poll_timeout();
            tokio::select! {
                r = socket.readable() => {
                    r?;
                    while udp::try_recv(&socket, &mut inbox)? > 0 {
                        let now = Instant::now();
                        for (from, d) in inbox.iter() {
                            self.on_datagram(now, from, d);
                        }
                        self.handle_events();
                    }
                }
                Some(cmd) = cmds.recv() => self.on_cmd(cmd),
                Some(event) = presence_events.recv() => self.on_presence(event),
                Some(event) = profile_events.recv() => self.on_profile(event),
                () = netio::sleep_until(deadline) => self.endpoint.handle_timeout(Instant::now()),
                _ = housekeeping.tick() => {
                    self.message_rate.retain_recent();
                    self.handshake_rate.retain_recent();
                }
                _ = &mut stop => break,
            }
            self.handle_events();
        }
        self.shutdown(&socket, &mut outbox).await;
        Ok(())
    }

    async fn flush(&mut self, socket: &UdpSocket, outbox: &mut SendBatch) {
        let now = Instant::now();
        let endpoint = &mut self.endpoint;
        udp::send_all(socket, outbox, |buf| {
            endpoint.poll_transmit(now, buf).map(|t| (t.dest, t.len))
        })
        .await;
    }

    fn on_datagram(&mut self, now: Instant, from: std::net::SocketAddr, d: &[u8]) {
        if d.first() == Some(&wire::TYPE_INIT) && self.handshake_rate.check_key(&from.ip()).is_err()
        {
            metrics::counter!("gateway_handshakes_limited_total").increment(1);
            return;
        }
        self.endpoint.handle_datagram(now, from, d);
    }

    fn handle_events(&mut self) {
        while let Some(event) = self.endpoint.poll_event() {
            match event {
                ServerEvent::HandshakeRequest {
                    pending, payload, ..
                } => self.on_login(pending, payload),
                ServerEvent::Session { session, event } => self.on_session_event(session, event),
            }
        }
        metrics::gauge!("gateway_sessions").set(self.sessions.len() as f64);
    }

    fn on_login(&mut self, pending: PendingId, payload: Vec<u8>) {
        if self.pending_logins >= self.services.config.limits.pending_logins_max
            || self.sessions.len() >= self.services.config.limits.sessions_max
        {
            let busy = app::encode(&LoginAnswer::Refused {
                code: LoginError::Busy,
                message: "gateway busy".into(),
            });
            let _ = self.endpoint.reject(pending, &busy);
            metrics::counter!("gateway_logins_total", "result" => "busy").increment(1);
            return;
        }
        self.pending_logins += 1;
        let session = self.endpoint.fresh_session_id();
        let services = self.services.clone();
        let cmds = self.cmds.clone();
        tokio::spawn(async move {
            let outcome = login::check(&services, &payload, session).await;
            let _ = cmds.send(Cmd::Login {
                pending,
                session,
                outcome,
            });
        });
    }

    fn on_session_event(&mut self, session: u64, event: Event) {
        match event {
            Event::Message(bytes) => self.on_message(session, &bytes),
            Event::Acked(mid) => self.on_push_settled(session, mid, true),
            Event::GivenUp { id, .. } => self.on_push_settled(session, id, false),
            Event::Closed(reason) => self.on_closed(session, reason),
            Event::Connected { .. } | Event::Rejected { .. } => {}
        }
    }

    fn on_cmd(&mut self, cmd: Cmd) {
        match cmd {
            Cmd::Login {
                pending,
                session,
                outcome,
            } => {
                self.pending_logins -= 1;
                self.on_login_done(pending, session, outcome);
            }
            Cmd::Reply {
                session,
                id,
                result,
            } => {
                if let Some(s) = self.sessions.get_mut(&session) {
                    s.in_flight -= 1;
                }
                self.reply(session, id, result);
            }
            Cmd::SendDone { key, result } => self.finish_send(key, result),
            Cmd::PeerForward { forward, reply } => self.on_peer_forward(forward, reply),
        }
    }

    fn on_login_done(&mut self, pending: PendingId, session: u64, outcome: LoginOutcome) {
        match outcome {
            Ok((user, answer)) => {
                match self
                    .endpoint
                    .accept_as(Instant::now(), pending, session, &answer)
                {
                    Ok(session) => {
                        self.register(session, user);
                        metrics::counter!("gateway_logins_total", "result" => "ok").increment(1);
                    }
                    Err(e) => {
                        tracing::warn!(user, error = %e, "login checked but the session could not be created");
                        // Presence already has it: take it back.
                        let services = self.services.clone();
                        tokio::spawn(async move {
                            let _ = services.presence.offline(user, session).await;
                        });
                    }
                }
            }
            Err(refusal) => {
                let _ = self.endpoint.reject(pending, &refusal);
                metrics::counter!("gateway_logins_total", "result" => "refused").increment(1);
            }
        }
    }

    /// A session presence already knows of (see `login::check`).
    fn register(&mut self, session: u64, user: u64) {
        self.sessions.insert(
            session,
            Sess {
                user,
                in_flight: 0,
                closing_after: None,
            },
        );
        if let Some(old) = self.users.insert(user, session) {
            self.kick(old);
        }
    }

    /// Tell a replaced session it was kicked; close it once that arrived.
    fn kick(&mut self, session: u64) {
        let Some(s) = self.sessions.get_mut(&session) else {
            return;
        };
        if s.closing_after.is_some() {
            return; // kicked already (by our own login and by presence)
        }
        if self.users.get(&s.user) == Some(&session) {
            self.users.remove(&s.user);
        }
        match self
            .endpoint
            .send(session, app::encode(&GatewayMessage::Kicked))
        {
            Ok(mid) => s.closing_after = Some(mid),
            Err(_) => self.endpoint.close(session),
        }
        metrics::counter!("gateway_kicks_total").increment(1);
    }

    fn on_message(&mut self, session: u64, bytes: &[u8]) {
        let max = self
            .services
            .config
            .limits
            .requests_in_flight_per_session_max;
        let Some(s) = self.sessions.get_mut(&session) else {
            return;
        };
        let Ok(msg) = app::decode::<ClientMessage>(bytes) else {
            metrics::counter!("gateway_bad_requests_total").increment(1);
            return;
        };
        if s.in_flight >= max {
            return self.reply(
                session,
                msg.id,
                Err(calls::error(
                    AppErrorCode::RateLimited,
                    "too many requests in flight",
                )),
            );
        }
        let user = s.user;
        match msg.call {
            Call::Send { to, msg_id, body } => {
                self.on_send(session, user, msg.id, to, msg_id, body)
            }
            Call::Logout => {
                self.endpoint.close(session);
            }
            call => {
                s.in_flight += 1;
                self.spawn_call(session, user, msg.id, call);
            }
        }
    }

    fn spawn_call(&self, session: u64, user: u64, id: u32, call: Call) {
        let services = self.services.clone();
        let cmds = self.cmds.clone();
        tokio::spawn(async move {
            let result = run_call(&services, session, user, call).await;
            let _ = cmds.send(Cmd::Reply {
                session,
                id,
                result,
            });
        });
    }

    fn on_send(&mut self, session: u64, user: u64, id: u32, to: u64, msg_id: u128, body: Vec<u8>) {
        if body.len() > BODY_BYTES_MAX || body.is_empty() {
            let e = calls::error(
                AppErrorCode::MessageTooLarge,
                format!("a message body is 1 to {BODY_BYTES_MAX} bytes"),
            );
            return self.reply(session, id, Err(e));
        }
        if self.message_rate.check_key(&user).is_err() {
            metrics::counter!("gateway_messages_total", "outcome" => "rate_limited").increment(1);
            return self.reply(
                session,
                id,
                Err(calls::error(AppErrorCode::RateLimited, "sending too fast")),
            );
        }
        let key = (user, msg_id);
        if let Some(outcome) = self.done.get(&key) {
            metrics::counter!("gateway_messages_total", "outcome" => "duplicate").increment(1);
            return self.reply(session, id, Ok(Reply::Sent(outcome)));
        }
        self.sessions
            .get_mut(&session)
            .expect("caller checked")
            .in_flight += 1;
        if let Some(waiters) = self.sends.get_mut(&key) {
            waiters.push((session, id)); // a retry while the first copy is on its way
            return;
        }
        self.sends.insert(key, vec![(session, id)]);
        let envelope = StoredEnvelope {
            from: user,
            sent_at_ms: self.now_ms,
            body,
        };
        self.route(key, to, envelope);
    }

    /// Push to a recipient online here, else deliver elsewhere.
    fn route(&mut self, key: SendKey, to: u64, envelope: StoredEnvelope) {
        let delivery = Delivery {
            from: envelope.from,
            msg_id: key.1,
            sent_at_ms: envelope.sent_at_ms,
            body: envelope.body.clone(),
            seq: None,
        };
        if let Some(mid) = self.push(to, delivery) {
            self.pushes.insert(mid, Origin::Local { key, to, envelope });
            return;
        }
        let services = self.services.clone();
        let cmds = self.cmds.clone();
        tokio::spawn(async move {
            let result = calls::deliver_elsewhere(&services, to, key.1, &envelope).await;
            let _ = cmds.send(Cmd::SendDone { key, result });
        });
    }

    /// Push a delivery to `to`'s session here; its (session, message).
    fn push(&mut self, to: u64, delivery: Delivery) -> Option<(u64, MsgId)> {
        let &session = self.users.get(&to)?;
        let bytes = app::encode(&GatewayMessage::Deliver(delivery));
        let mid = self.endpoint.send(session, bytes).ok()?;
        Some((session, mid))
    }

    fn on_peer_forward(&mut self, f: Forward, reply: oneshot::Sender<PeerOutcome>) {
        let delivery = Delivery {
            from: f.from,
            msg_id: f.msg_id,
            sent_at_ms: f.sent_at_ms,
            body: f.body,
            seq: None,
        };
        match self.push(f.to, delivery) {
            Some(mid) => {
                self.pushes.insert(mid, Origin::Peer(reply));
            }
            None => {
                let _ = reply.send(PeerOutcome::NotHere);
            }
        }
    }

    fn spawn_store(&self, key: SendKey, to: u64, envelope: StoredEnvelope) {
        let services = self.services.clone();
        let cmds = self.cmds.clone();
        tokio::spawn(async move {
            let result = calls::store(&services, to, key.1, &envelope).await;
            let _ = cmds.send(Cmd::SendDone { key, result });
        });
    }

    fn on_push_settled(&mut self, session: u64, mid: MsgId, acked: bool) {
        if let Some(s) = self.sessions.get(&session) {
            if s.closing_after == Some(mid) {
                self.endpoint.close(session);
                return;
            }
        }
        match self.pushes.remove(&(session, mid)) {
            Some(Origin::Local { key, to, envelope }) if !acked => {
                self.spawn_store(key, to, envelope)
            }
            Some(Origin::Local { key, .. }) => self.finish_send(key, Ok(SendOutcome::Delivered)),
            Some(Origin::Peer(reply)) => {
                let outcome = if acked {
                    PeerOutcome::Delivered
                } else {
                    PeerOutcome::GivenUp
                };
                let _ = reply.send(outcome);
            }
            None => {}
        }
    }

    fn finish_send(&mut self, key: SendKey, result: Result<SendOutcome, AppError>) {
        let outcome = match &result {
            Ok(SendOutcome::Delivered) => "delivered",
            Ok(SendOutcome::Stored { .. }) => "stored",
            Err(_) => "error",
        };
        metrics::counter!("gateway_messages_total", "outcome" => outcome).increment(1);
        if let Ok(outcome) = result {
            self.done.insert(key, outcome);
        }
        for (session, id) in self.sends.remove(&key).unwrap_or_default() {
            if let Some(s) = self.sessions.get_mut(&session) {
                s.in_flight -= 1;
            }
            self.reply(session, id, result.clone().map(Reply::Sent));
        }
    }

    fn reply(&mut self, session: u64, id: u32, result: CallResult) {
        let msg = GatewayMessage::Reply { id, result };
        if self.endpoint.send(session, app::encode(&msg)).is_err() {
            metrics::counter!("gateway_replies_dropped_total").increment(1);
        }
    }

    fn on_closed(&mut self, session: u64, reason: proto::session::CloseReason) {
        let Some(s) = self.sessions.remove(&session) else {
            return;
        };
        tracing::debug!(session, user = s.user, ?reason, "session closed");
        if self.users.get(&s.user) == Some(&session) {
            self.users.remove(&s.user);
        }
        let services = self.services.clone();
        tokio::spawn(async move {
            let _ = services.presence.offline(s.user, session).await;
        });
    }

    fn on_presence(&mut self, event: PresenceEvent) {
        match event {
            PresenceEvent::StatusChanged {
                user,
                entry,
                sessions,
            } => {
                let push = app::encode(&GatewayMessage::FriendStatus {
                    user,
                    status: entry.map(|e| e.status),
                });
                for session in sessions {
                    let _ = self.endpoint.send(session, push.clone());
                }
            }
            PresenceEvent::Kicked { session, .. } => self.kick(session),
            PresenceEvent::Reconnected => {}
        }
    }

    fn on_profile(&mut self, event: proto::profile::Event) {
        match event {
            proto::profile::Event::Invalidate { user, version } => {
                self.services.invalidate(Some(user));
                if let Some(&session) = self.users.get(&user) {
                    let changed = GatewayMessage::ProfileChanged { user, version };
                    let _ = self.endpoint.send(session, app::encode(&changed));
                }
            }
            proto::profile::Event::CacheReset => self.services.invalidate(None),
        }
    }

    /// Close every session (clients reconnect, to this gateway when it is
    /// back or to another) and tell presence they are gone.
    async fn shutdown(&mut self, socket: &UdpSocket, outbox: &mut SendBatch) {
        let sessions: Vec<(u64, u64)> = self.sessions.iter().map(|(s, v)| (*s, v.user)).collect();
        for (session, _) in &sessions {
            self.endpoint.close(*session);
        }
        self.flush(socket, outbox).await;
        let mut set = tokio::task::JoinSet::new();
        for (session, user) in sessions {
            let services = self.services.clone();
            set.spawn(async move { services.presence.offline(user, session).await });
        }
        let all = async { while set.join_next().await.is_some() {} };
        let _ = tokio::time::timeout(std::time::Duration::from_secs(5), all).await;
    }
}

async fn run_call(services: &Services, session: u64, user: u64, call: Call) -> CallResult {
    match call {
        Call::Fetch {
            after_seq,
            max_count,
            max_bytes,
        } => calls::fetch(services, user, after_seq, max_count, max_bytes).await,
        Call::Ack { up_to_seq } => calls::ack(services, user, up_to_seq).await,
        Call::LoginView => calls::login_view(services, user, session)
            .await
            .map(|(reply, _)| reply),
        Call::Profiles { users } => calls::profiles(services, users).await,
        Call::AvatarRange { hash, offset, len } => {
            calls::avatar_range(services, hash, offset, len).await
        }
        Call::SetProfile {
            nickname,
            signature,
        } => calls::set_profile(services, user, nickname, signature).await,
        Call::SetStatus(status) => calls::set_status(services, user, session, status).await,
        Call::FriendRequest { to_username, group } => {
            calls::friend_request(services, user, &to_username, &group).await
        }
        Call::FriendAccept { from, group } => {
            calls::friend_accept(services, user, from, &group).await
        }
        Call::FriendReject { from } => calls::friend_reject(services, user, from).await,
        Call::FriendRemove { friend } => calls::friend_remove(services, user, friend).await,
        Call::Send { .. } | Call::Logout => Err(calls::error(
            AppErrorCode::BadRequest,
            "handled by the loop",
        )),
    }
}
