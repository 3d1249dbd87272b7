//! The gateway's event loop: the thin tokio driver around the two sans-IO
//! machines. It owns the UDP socket (batched I/O), the session endpoint
//! (`proto::session::ServerEndpoint`), the router (`crate::router`) and
//! the clock; it moves datagrams, timeouts and events between them, runs
//! the router's service work in tasks (each bounded by
//! `timers.service_timeout_ms`) and feeds the answers back as [`Cmd`]s. It
//! decides nothing itself.

use crate::{
    calls, login,
    router::{Action, Answer, Now, Router, RouterConfig, Sessions},
    services::{self, now_ms, Services},
};
use futures_util::stream::{FuturesUnordered, StreamExt};
use netio::udp::{self, RecvBatch, SendBatch};
use presence::PresenceEvent;
use proto::{
    app::{self, LoginAnswer, LoginError},
    peer::{Forward, GroupForward, PeerOutcome},
    session::{EndpointStats, MsgId, PendingId, SendError, ServerEndpoint},
};
use std::{sync::Arc, time::Instant};
use tokio::{
    net::UdpSocket,
    sync::{mpsc, oneshot, Semaphore},
};

/// Work finished off the loop.
pub enum Cmd {
    /// A service's answer to the router's work.
    Answer(Answer),
    /// Another gateway stored a message for a user it believes is here.
    PeerForward {
        forward: Forward,
        reply: oneshot::Sender<PeerOutcome>,
    },
    /// Another gateway stored a group message for members it believes are
    /// here; the reply: how many got it.
    PeerGroupForward {
        forward: GroupForward,
        reply: oneshot::Sender<u32>,
    },
}

/// Relation reads running at once at most (a `CacheReset` asks for every
/// online user's; they must not swamp the profile service).
pub const RELATION_LOADS_MAX: usize = 8;
/// Answers taken from the queue in one pass of the loop at most, before
/// its transmits go out (one `sendmmsg` for many answers, not one each).
pub const CMDS_PER_PASS_MAX: usize = 256;

impl Sessions for ServerEndpoint {
    fn fresh_session_id(&mut self) -> u64 {
        ServerEndpoint::fresh_session_id(self)
    }

    fn accept(&mut self, now: Instant, pending: PendingId, session: u64, answer: &[u8]) -> bool {
        self.accept_as(now, pending, session, answer).is_ok()
    }

    fn reject(&mut self, pending: PendingId, answer: &[u8]) {
        let _ = ServerEndpoint::reject(self, pending, answer);
    }

    fn send(&mut self, session: u64, bytes: Vec<u8>) -> Result<MsgId, SendError> {
        ServerEndpoint::send(self, session, bytes)
    }

    fn close(&mut self, session: u64) {
        ServerEndpoint::close(self, session)
    }
}

pub struct Driver {
    services: Arc<Services>,
    endpoint: ServerEndpoint,
    router: Router,
    cmds: mpsc::UnboundedSender<Cmd>,
    relation_loads: Arc<Semaphore>,
    /// The endpoint's counters as last exported to metrics.
    exported: EndpointStats,
}

fn now() -> Now {
    Now {
        at: Instant::now(),
        wall_ms: now_ms(),
    }
}

impl Driver {
    pub fn new(
        services: Arc<Services>,
        endpoint: ServerEndpoint,
        cmds: mpsc::UnboundedSender<Cmd>,
    ) -> Driver {
        Driver {
            router: Router::new(RouterConfig::new(&services.config), Instant::now()),
            exported: EndpointStats::default(),
            relation_loads: Arc::new(Semaphore::new(RELATION_LOADS_MAX)),
            services,
            endpoint,
            cmds,
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
        loop {
            self.flush(&socket, &mut outbox).await;
            let deadline = self
                .endpoint
                .poll_timeout()
                .map_or(self.router.poll_timeout(), |t| {
                    t.min(self.router.poll_timeout())
                });
            tokio::select! {
                r = socket.readable() => {
                    r?;
                    while udp::try_recv(&socket, &mut inbox)? > 0 {
                        let at = Instant::now();
                        for (from, d) in inbox.iter() {
                            self.endpoint.handle_datagram(at, from, d);
                        }
                        self.pump();
                    }
                }
                Some(cmd) = cmds.recv() => {
                    self.on_cmd(cmd);
                    for _ in 1..CMDS_PER_PASS_MAX {
                        let Ok(cmd) = cmds.try_recv() else { break };
                        self.on_cmd(cmd);
                    }
                }
                Some(event) = presence_events.recv() => self.on_presence(event),
                Some(event) = profile_events.recv() => self.on_profile(event),
                () = netio::sleep_until(Some(deadline)) => {
                    let now = now();
                    self.endpoint.handle_timeout(now.at);
                    self.router.handle_timeout(now, &mut self.endpoint);
                }
                _ = &mut stop => break,
            }
            self.pump();
            self.export_stats();
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

    /// Session events to the router, the router's work to tasks.
    fn pump(&mut self) {
        let now = now();
        while let Some(event) = self.endpoint.poll_event() {
            self.router.handle_event(now, event, &mut self.endpoint);
        }
        let actions: Vec<Action> = std::iter::from_fn(|| self.router.poll_action()).collect();
        self.spawn(actions);
        metrics::gauge!("gateway_sessions").set(self.router.session_count() as f64);
        metrics::gauge!("gateway_sends_in_progress").set(self.router.sends_in_progress() as f64);
    }

    /// Add what the endpoint counted since the last pass to the metrics:
    /// `gateway_datagrams_dropped_total{reason}`, `gateway_cookies_sent_total`,
    /// `gateway_resets_sent_total` (RESETs not sent for the per-second cap:
    /// `gateway_resets_limited_total`).
    fn export_stats(&mut self) {
        let (s, last) = (self.endpoint.stats(), &self.exported);
        if s == last {
            return;
        }
        let drops = [
            ("malformed", s.dropped_malformed, last.dropped_malformed),
            (
                "unauthentic",
                s.dropped_unauthentic,
                last.dropped_unauthentic,
            ),
            ("replayed", s.dropped_replayed, last.dropped_replayed),
            (
                "unknown_session",
                s.dropped_unknown_session,
                last.dropped_unknown_session,
            ),
            ("closed", s.dropped_closed, last.dropped_closed),
            (
                "duplicate_handshake",
                s.dropped_duplicate_handshake,
                last.dropped_duplicate_handshake,
            ),
            ("full", s.dropped_full, last.dropped_full),
            ("limited", s.dropped_limited, last.dropped_limited),
        ];
        for (reason, now, before) in drops {
            if now > before {
                metrics::counter!("gateway_datagrams_dropped_total", "reason" => reason)
                    .increment(now - before);
            }
        }
        let counters = [
            (
                "gateway_cookies_sent_total",
                s.cookies_sent,
                last.cookies_sent,
            ),
            ("gateway_resets_sent_total", s.resets_sent, last.resets_sent),
            (
                "gateway_resets_limited_total",
                s.resets_limited,
                last.resets_limited,
            ),
        ];
        for (name, now, before) in counters {
            if now > before {
                metrics::counter!(name).increment(now - before);
            }
        }
        self.exported = s.clone();
    }

    fn on_cmd(&mut self, cmd: Cmd) {
        match cmd {
            Cmd::Answer(answer) => self.router.handle_answer(now(), answer, &mut self.endpoint),
            Cmd::PeerForward { forward, reply } => {
                let outcome = self.router.peer_forward(forward, &mut self.endpoint);
                let _ = reply.send(outcome);
            }
            Cmd::PeerGroupForward { forward, reply } => {
                let pushed = self.router.peer_group_forward(forward, &mut self.endpoint);
                let _ = reply.send(pushed);
            }
        }
    }

    fn on_presence(&mut self, event: PresenceEvent) {
        match event {
            PresenceEvent::StatusChanged {
                user,
                entry,
                sessions,
            } => {
                let status = entry.map(|e| e.status);
                self.router
                    .friend_status(user, status, &sessions, &mut self.endpoint);
            }
            PresenceEvent::Kicked { session, .. } => {
                self.router.presence_kicked(session, &mut self.endpoint)
            }
            PresenceEvent::Reconnected => {}
        }
    }

    fn on_profile(&mut self, event: proto::profile::Event) {
        match event {
            proto::profile::Event::Invalidate { user, .. } => self.services.invalidate(Some(user)),
            proto::profile::Event::CacheReset => self.services.invalidate(None),
            proto::profile::Event::GroupChanged { .. } => {}
        }
        self.router.profile_event(event, &mut self.endpoint);
    }

    /// Run one pass's work of the router in one task, each piece
    /// concurrently; each answer comes back as a [`Cmd`] as soon as it is
    /// there. (One task a pass, not one a piece: the requests of a pass are
    /// queued on their links together, so they go out in few writes.)
    fn spawn(&self, actions: Vec<Action>) {
        if actions.is_empty() {
            return;
        }
        let services = self.services.clone();
        let cmds = self.cmds.clone();
        let loads = self.relation_loads.clone();
        tokio::spawn(async move {
            let mut work: FuturesUnordered<_> = actions
                .into_iter()
                .map(|action| async {
                    if let Some(answer) = perform(&services, action, &loads).await {
                        let _ = cmds.send(Cmd::Answer(answer));
                    }
                })
                .collect();
            while work.next().await.is_some() {}
        });
    }

    /// Close every session (clients reconnect, to this gateway when it is
    /// back or to another) and tell presence they are gone.
    async fn shutdown(&mut self, socket: &UdpSocket, outbox: &mut SendBatch) {
        self.router.shutdown(&mut self.endpoint);
        self.flush(socket, outbox).await;
        let mut set = tokio::task::JoinSet::new();
        while let Some(action) = self.router.poll_action() {
            if let Action::Offline { user, session } = action {
                let services = self.services.clone();
                set.spawn(async move { services.presence.offline(user, session).await });
            }
        }
        let all = async { while set.join_next().await.is_some() {} };
        let _ = tokio::time::timeout(std::time::Duration::from_secs(5), all).await;
    }
}

/// Do `action`; the router's answer, if it expects one. Every service
/// call is boxed, so this future stays small: the driver makes one per
/// action, and an unboxed one was the size of the largest call (several
/// KiB copied per action, a fifth of the gateway's CPU in the offline
/// store phase of `imbench e2e`).
async fn perform(services: &Arc<Services>, action: Action, loads: &Semaphore) -> Option<Answer> {
    Some(match action {
        Action::Login {
            pending,
            session,
            payload,
        } => {
            let outcome = calls::with_timeout(
                services,
                Box::pin(login::check(services, &payload, session)),
            )
            .await
            .unwrap_or_else(|e| {
                crate::router::LoginOutcome::Refused(app::encode(&LoginAnswer::Refused {
                    code: LoginError::Unavailable,
                    message: e.message,
                }))
            });
            Answer::Login {
                pending,
                session,
                outcome,
            }
        }
        Action::Call {
            session,
            id,
            user,
            call,
        } => {
            let (result, effects) = Box::pin(calls::run(services, session, user, call)).await;
            Answer::Call {
                session,
                id,
                result,
                effects,
            }
        }
        Action::Store { batch, to, items } => {
            metrics::counter!("gateway_stores_total").increment(1);
            metrics::counter!("gateway_stored_items_total").increment(items.len() as u64);
            // A re-sent message may be in the mailbox already (its first
            // store's answer was lost): stored only if it is not.
            let once = items.iter().any(|i| i.resent);
            let since_ms = services::now_ms().saturating_sub(services::GROUP_RESEND_WINDOW_MS);
            let result =
                Box::pin(calls::store(services, to, items, once.then_some(since_ms))).await;
            let group = proto::groups::is_group(to);
            if group && result.is_ok() && crate::group_calls::claim_tidy(services, to) {
                let services = services.clone();
                tokio::spawn(async move { crate::group_calls::tidy(&services, to).await });
            }
            Answer::Stored { batch, result }
        }
        Action::LoadRelations { users } => {
            metrics::counter!("gateway_relation_reads_total").increment(1);
            let _permit = loads.acquire().await.expect("never closed");
            let result = Box::pin(calls::relations(services, users.clone())).await;
            Answer::Relations { users, result }
        }
        Action::LoadGroup { group } => {
            metrics::counter!("gateway_group_reads_total").increment(1);
            let _permit = loads.acquire().await.expect("never closed");
            let result = Box::pin(calls::group(services, group)).await;
            Answer::Group { group, result }
        }
        Action::Notify { to, deliveries } => {
            Box::pin(calls::notify(services, to, deliveries)).await;
            return None;
        }
        Action::GroupNotify { forward } => {
            Box::pin(crate::group_calls::notify(services, forward)).await;
            return None;
        }
        Action::Offline { user, session } => {
            let offline = Box::pin(services.presence.offline(user, session));
            let _ = calls::with_timeout(services, offline).await;
            return None;
        }
    })
}
