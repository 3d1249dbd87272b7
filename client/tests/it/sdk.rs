//! The client SDK against a stub gateway: a tokio task on a real UDP
//! socket around `ServerEndpoint` that speaks the application protocol
//! (`proto::app`, version 3) for two users, with switches to misbehave.
//!
//! Like the real gateway, the stub stores every message in the recipient's
//! mailbox first (per-recipient seq), answers the sender `Sent{seq}`, then
//! pushes the stored message with that seq to the recipient's session if it
//! has one; `Fetch` reads the mailbox, `Ack` deletes from it cumulatively.
//! Chat groups likewise: one mailbox per group, pushed to every member
//! online (the sender too), each member's read cursor moved by `GroupAck`,
//! `Groups` listing the user's groups with cursor and newest seq.

use client::sdk::{
    connect, ConnectError, Connection, Credentials, ImEvent, LostReason, Mailbox, Page, SdkConfig,
    SdkError, ShownMarks,
};
use proto::{
    app::{
        decode, encode, AppError, AppErrorCode, Call, ClientMessage, Delivery, GatewayMessage,
        GroupSummary, Login, LoginAccepted, LoginAnswer, LoginError, LoginMethod, Reply,
        SendOutcome,
    },
    groups::{GroupInfo, GroupMember, GroupRole, GROUP_ID_BASE},
    presence::Status,
    profile::{FriendGroup, LoginView, Profile},
    session::{
        config::DATAGRAM_BYTES_MAX, ClientConfig, CookieMode, Event, PendingId, ServerConfig,
        ServerEndpoint, ServerEvent, SessionConfig, SessionId, StaticKeypair,
    },
};
use rand::RngCore;
use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    future::Future,
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};
use tokio::{net::UdpSocket, sync::mpsc, task::JoinHandle, time::timeout};

/// Guards against hangs only; nothing here is a timing assertion.
const DEADLINE: Duration = Duration::from_secs(30);

const ALICE: u64 = 1;
const BOB: u64 = 2;
const USERS: [(&str, &str, u64); 2] = [("alice", "alice-pw", ALICE), ("bob", "bob-pw", BOB)];

async fn within<T>(what: &str, f: impl Future<Output = T>) -> T {
    timeout(DEADLINE, f)
        .await
        .unwrap_or_else(|_| panic!("{what}: no progress within {DEADLINE:?}"))
}

/// Poll `check` until it holds (guarded by `DEADLINE`).
async fn until(what: &str, mut check: impl FnMut() -> bool) {
    within(what, async {
        while !check() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
}

// ---- the stub gateway ------------------------------------------------------

/// One user's mailbox as a shard keeps it: seqs 1, 2, ... given out in
/// order, deleted cumulatively by acknowledgements.
#[derive(Debug, Default, Clone)]
struct StubMailbox {
    /// Live records (seq > `acked`), in seq order.
    records: Vec<Delivery>,
    /// The last seq given out (0: none yet).
    last_seq: u64,
    /// Acknowledged (deleted) up to here.
    acked: u64,
}

impl StubMailbox {
    fn store(&mut self, from: u64, msg_id: u128, body: Vec<u8>) -> Delivery {
        self.last_seq += 1;
        let delivery = Delivery {
            from,
            msg_id,
            sent_at_ms: 0,
            body,
            seq: self.last_seq,
        };
        self.records.push(delivery.clone());
        delivery
    }

    /// Live records after `after_seq`, at most `max`, and whether more
    /// follow.
    fn page(&self, after_seq: u64, max: usize) -> (Vec<Delivery>, bool) {
        let mut later = self.records.iter().filter(|d| d.seq > after_seq);
        let page: Vec<Delivery> = later.by_ref().take(max).cloned().collect();
        (page, later.next().is_some())
    }

    /// Delete everything up to `up_to_seq`; how many records went.
    fn ack(&mut self, up_to_seq: u64) -> u64 {
        let before = self.records.len();
        self.records.retain(|d| d.seq > up_to_seq);
        self.acked = self.acked.max(up_to_seq.min(self.last_seq));
        (before - self.records.len()) as u64
    }

    fn seqs(&self) -> Vec<u64> {
        self.records.iter().map(|d| d.seq).collect()
    }
}

/// What the stub saw and how it behaves; shared with the test.
#[derive(Default)]
struct StubState {
    /// Push every `Deliver` twice (the same seq).
    duplicate_deliveries: bool,
    /// Store sends without pushing them (as when the recipient's session
    /// queue is full).
    suppress_pushes: bool,
    /// Right after each login, push every live record of the user's
    /// mailbox (racing the fetch the client makes after its login).
    push_mailbox_on_login: bool,
    /// Answer this many of the next sends `Unavailable` (not stored).
    unavailable_sends: u32,
    /// Swallow `Send` requests (never answer them).
    swallow_sends: bool,
    /// Swallow every other request.
    swallow_calls: bool,
    /// Refuse resume tokens (as after a key change).
    refuse_tokens: bool,
    /// Swallow `Ack` requests.
    swallow_acks: bool,
    /// Push a message that does not decode right after each login.
    garbage_after_login: bool,
    /// Most records one fetch returns (else the client's `max_count`).
    page_max: Option<usize>,
    /// Avatar ranges asked for: (offset, len).
    avatar_ranges: Vec<(u32, u32)>,
    /// Sessions that ended (closed by the client or expired).
    sessions_closed: usize,
    /// Every `Send` received: (sender, msg_id, body).
    sends: Vec<(u64, u128, Vec<u8>)>,
    /// Every `Fetch` answered: (user, after_seq, seqs returned).
    fetches: Vec<(u64, u64, Vec<u64>)>,
    /// Every `Ack` received (swallowed ones too): (user, up_to_seq).
    acks: Vec<(u64, u64)>,
    /// Every `Block` and `Unblock` received: (user, call).
    relation_calls: Vec<(u64, Call)>,
    /// (blocker, blocked).
    blocked: BTreeSet<(u64, u64)>,
    /// Accepted logins by method: (user, by resume token).
    logins: Vec<(u64, bool)>,
    /// Each user's last accepted `login_ns`, as the profile service keeps
    /// it (stubs that share a state share this too, as gateways share
    /// profile): a login not newer is answered `Stale`.
    last_login_ns: HashMap<u64, u64>,
    /// Logins answered `Stale`.
    stale_logins: usize,
    mailboxes: BTreeMap<u64, StubMailbox>,
    groups: BTreeMap<u64, StubGroup>,
    /// Every `GroupSend` received: (sender, group, msg_id).
    group_sends: Vec<(u64, u64, u128)>,
    /// `Groups` calls answered.
    group_lists: usize,
}

/// A chat group: one mailbox (trimmed with `ack`, as past retention) and
/// each member's read cursor.
#[derive(Debug, Default, Clone)]
struct StubGroup {
    mailbox: StubMailbox,
    /// member -> read_seq.
    members: BTreeMap<u64, u64>,
}

impl StubState {
    fn mailbox(&mut self, user: u64) -> &mut StubMailbox {
        self.mailboxes.entry(user).or_default()
    }
}

/// What a test asks the running stub to push.
enum StubCommand {
    /// Push these stored records of `to`'s mailbox, in this order.
    Push { to: u64, seqs: Vec<u64> },
    /// `MailboxChanged` with the mailbox's last seq.
    MailboxChanged { to: u64 },
    /// Push these stored records of `group` to member `to`, in this order.
    GroupPush { group: u64, to: u64, seqs: Vec<u64> },
    /// `GroupChanged` to `to`.
    GroupChanged { group: u64, to: u64 },
}

struct Stub {
    addr: SocketAddr,
    keys: StaticKeypair,
    state: Arc<Mutex<StubState>>,
    commands: mpsc::UnboundedSender<StubCommand>,
    task: JoinHandle<()>,
}

impl Stub {
    async fn start(addr: SocketAddr, keys: StaticKeypair) -> Stub {
        Stub::start_with(addr, keys, Arc::default()).await
    }

    /// A stub on `state` (a restarted gateway whose mailboxes, kept by
    /// their shards, survived it).
    async fn start_with(
        addr: SocketAddr,
        keys: StaticKeypair,
        state: Arc<Mutex<StubState>>,
    ) -> Stub {
        let socket = UdpSocket::bind(addr).await.unwrap();
        let addr = socket.local_addr().unwrap();
        let mut seed = [0u8; 32];
        rand::thread_rng().fill_bytes(&mut seed);
        let config = ServerConfig {
            cookie_mode: CookieMode::Never,
            ..ServerConfig::default()
        };
        let gateway = StubGateway {
            endpoint: ServerEndpoint::new(config, keys.clone(), seed, Instant::now()),
            state: state.clone(),
            users: HashMap::new(),
            sessions: HashMap::new(),
        };
        let (commands, commands_rx) = mpsc::unbounded_channel();
        let task = tokio::spawn(gateway.serve(socket, commands_rx));
        Stub {
            addr,
            keys,
            state,
            commands,
            task,
        }
    }

    async fn fresh() -> Stub {
        let mut seed = [0u8; 32];
        rand::thread_rng().fill_bytes(&mut seed);
        Stub::start(
            "127.0.0.1:0".parse().unwrap(),
            StaticKeypair::generate(seed),
        )
        .await
    }

    /// Stop it for good (its socket is closed when this returns).
    async fn kill(self) -> (SocketAddr, StaticKeypair) {
        self.task.abort();
        let _ = self.task.await;
        (self.addr, self.keys)
    }

    fn state(&self) -> std::sync::MutexGuard<'_, StubState> {
        self.state.lock().unwrap()
    }

    fn sends(&self) -> Vec<(u64, u128, Vec<u8>)> {
        self.state().sends.clone()
    }

    /// A copy of `user`'s mailbox.
    fn mailbox(&self, user: u64) -> StubMailbox {
        self.state().mailbox(user).clone()
    }

    /// Store a message in `to`'s mailbox without pushing it; its seq.
    fn store(&self, to: u64, from: u64, msg_id: u128, body: &[u8]) -> u64 {
        let mut state = self.state();
        state.mailbox(to).store(from, msg_id, body.to_vec()).seq
    }

    fn push(&self, to: u64, seqs: &[u64]) {
        let seqs = seqs.to_vec();
        self.commands.send(StubCommand::Push { to, seqs }).unwrap();
    }

    fn mailbox_changed(&self, to: u64) {
        self.commands
            .send(StubCommand::MailboxChanged { to })
            .unwrap();
    }

    /// Make `user` a member of `group` (created if new) at `read_seq`.
    fn join(&self, group: u64, user: u64, read_seq: u64) {
        let mut state = self.state();
        let g = state.groups.entry(group).or_default();
        g.members.insert(user, read_seq);
    }

    /// Store a group message without pushing it; its seq.
    fn group_store(&self, group: u64, from: u64, body: &[u8]) -> u64 {
        let mut state = self.state();
        let g = state.groups.get_mut(&group).expect("a stub group");
        let msg_id = u128::from(g.mailbox.last_seq + 1) << 64 | u128::from(from);
        g.mailbox.store(from, msg_id, body.to_vec()).seq
    }

    fn group(&self, group: u64) -> StubGroup {
        self.state()
            .groups
            .get(&group)
            .expect("a stub group")
            .clone()
    }

    fn group_push(&self, group: u64, to: u64, seqs: &[u64]) {
        let seqs = seqs.to_vec();
        let command = StubCommand::GroupPush { group, to, seqs };
        self.commands.send(command).unwrap();
    }

    fn group_changed(&self, group: u64, to: u64) {
        let command = StubCommand::GroupChanged { group, to };
        self.commands.send(command).unwrap();
    }
}

struct StubGateway {
    endpoint: ServerEndpoint,
    state: Arc<Mutex<StubState>>,
    /// user -> its latest session.
    users: HashMap<u64, SessionId>,
    sessions: HashMap<SessionId, u64>,
}

impl StubGateway {
    async fn serve(
        mut self,
        socket: UdpSocket,
        mut commands: mpsc::UnboundedReceiver<StubCommand>,
    ) {
        let mut buf = vec![0u8; DATAGRAM_BYTES_MAX];
        let mut datagram = vec![0u8; 2048];
        loop {
            let now = Instant::now();
            self.handle_events(now);
            while let Some(t) = self.endpoint.poll_transmit(now, &mut buf) {
                let _ = socket.send_to(&buf[..t.len], t.dest).await;
            }
            let deadline = self.endpoint.poll_timeout();
            tokio::select! {
                r = socket.recv_from(&mut datagram) => {
                    let Ok((n, from)) = r else { continue };
                    self.endpoint.handle_datagram(Instant::now(), from, &datagram[..n]);
                }
                Some(command) = commands.recv() => self.command(command),
                () = netio::sleep_until(deadline) => self.endpoint.handle_timeout(Instant::now()),
            }
        }
    }

    fn command(&mut self, command: StubCommand) {
        match command {
            StubCommand::Push { to, seqs } => {
                let stored = self.state.lock().unwrap().mailbox(to).records.clone();
                for seq in seqs {
                    let d = stored.iter().find(|d| d.seq == seq).expect("stored");
                    self.push_to(to, &GatewayMessage::Deliver(d.clone()));
                }
            }
            StubCommand::MailboxChanged { to } => {
                let high_seq = self.state.lock().unwrap().mailbox(to).last_seq;
                self.push_to(to, &GatewayMessage::MailboxChanged { high_seq });
            }
            StubCommand::GroupPush { group, to, seqs } => {
                let g = self.state.lock().unwrap().groups[&group].clone();
                for seq in seqs {
                    let d = g.mailbox.records.iter().find(|d| d.seq == seq);
                    let delivery = d.expect("stored").clone();
                    self.push_to(to, &GatewayMessage::GroupDeliver { group, delivery });
                }
            }
            StubCommand::GroupChanged { group, to } => {
                let version = self.state.lock().unwrap().group_lists as u64;
                self.push_to(to, &GatewayMessage::GroupChanged { group, version });
            }
        }
    }

    fn handle_events(&mut self, now: Instant) {
        while let Some(event) = self.endpoint.poll_event() {
            match event {
                ServerEvent::HandshakeRequest {
                    pending, payload, ..
                } => self.login(now, pending, &payload),
                ServerEvent::Session {
                    session,
                    event: Event::Message(bytes),
                } => {
                    let message: ClientMessage = decode(&bytes).expect("the SDK sends valid calls");
                    self.call(session, message);
                }
                ServerEvent::Session {
                    session,
                    event: Event::Closed(_),
                } => {
                    self.state.lock().unwrap().sessions_closed += 1;
                    if let Some(user) = self.sessions.remove(&session) {
                        if self.users.get(&user) == Some(&session) {
                            self.users.remove(&user);
                        }
                    }
                }
                ServerEvent::Session { .. } => {}
            }
        }
    }

    fn login(&mut self, now: Instant, pending: PendingId, payload: &[u8]) {
        let login: Login = decode(payload).expect("the SDK sends valid logins");
        assert_eq!(login.version, proto::app::APP_PROTOCOL_VERSION);
        let (user, by_token) = match login.method {
            LoginMethod::Password { username, password } => (
                USERS
                    .iter()
                    .find(|(u, p, _)| *u == username && *p == password)
                    .map(|u| u.2),
                false,
            ),
            LoginMethod::Resume { .. } if self.state.lock().unwrap().refuse_tokens => (None, true),
            LoginMethod::Resume { token } => (
                token
                    .strip_prefix(b"token:")
                    .and_then(|id| id.try_into().ok())
                    .map(u64::from_le_bytes),
                true,
            ),
        };
        let Some(user) = user else {
            let code = if by_token {
                LoginError::BadToken
            } else {
                LoginError::WrongCredentials
            };
            let answer = LoginAnswer::Refused {
                code,
                message: "no".into(),
            };
            self.endpoint.reject(pending, &encode(&answer)).unwrap();
            return;
        };
        let last_ns = {
            let mut state = self.state.lock().unwrap();
            let last = state.last_login_ns.get(&user).copied().unwrap_or(0);
            if login.login_ns > last {
                state.last_login_ns.insert(user, login.login_ns);
                None
            } else {
                state.stale_logins += 1;
                Some(last)
            }
        };
        if let Some(last_ns) = last_ns {
            let answer = LoginAnswer::Stale { last_ns };
            self.endpoint.reject(pending, &encode(&answer)).unwrap();
            return;
        }
        let mut resume_token = b"token:".to_vec();
        resume_token.extend_from_slice(&user.to_le_bytes());
        let mailbox = self.state.lock().unwrap().mailbox(user).clone();
        let answer = LoginAnswer::Accepted(LoginAccepted {
            user,
            resume_token,
            mailbox_count: mailbox.records.len() as u64,
            mailbox_high_seq: mailbox.last_seq,
            heartbeat_s: 30,
        });
        let session = self
            .endpoint
            .accept(now, pending, &encode(&answer))
            .unwrap();
        let (garbage, push_stored) = {
            let mut state = self.state.lock().unwrap();
            state.logins.push((user, by_token));
            (state.garbage_after_login, state.push_mailbox_on_login)
        };
        if garbage {
            let _ = self.endpoint.send(session, vec![0xff; 7]);
        }
        if push_stored {
            for d in mailbox.records {
                self.push(session, &GatewayMessage::Deliver(d));
            }
        }
        let online = GatewayMessage::FriendStatus {
            user,
            status: Some(Status::Online),
        };
        let others: Vec<SessionId> = (self.users.iter())
            .filter(|(u, _)| **u != user)
            .map(|(_, s)| *s)
            .collect();
        for other in others {
            self.push(other, &online);
        }
        if let Some(old) = self.users.insert(user, session) {
            self.push(old, &GatewayMessage::Kicked);
            self.sessions.remove(&old);
        }
        self.sessions.insert(session, user);
    }

    fn push(&mut self, session: SessionId, message: &GatewayMessage) {
        let _ = self.endpoint.send(session, encode(message));
    }

    /// Push to `user`'s session, if it has one.
    fn push_to(&mut self, user: u64, message: &GatewayMessage) {
        if let Some(&session) = self.users.get(&user) {
            self.push(session, message);
        }
    }

    fn call(&mut self, session: SessionId, message: ClientMessage) {
        let Some(&user) = self.sessions.get(&session) else {
            return;
        };
        if self.state.lock().unwrap().swallow_calls && !matches!(message.call, Call::Send { .. }) {
            return;
        }
        let result = match message.call {
            Call::Send { to, msg_id, body } => {
                let swallow = {
                    let mut state = self.state.lock().unwrap();
                    state.sends.push((user, msg_id, body.clone()));
                    state.swallow_sends
                };
                if swallow {
                    return;
                }
                self.send(user, to, msg_id, body)
            }
            Call::Fetch {
                after_seq,
                max_count,
                ..
            } => {
                let mut state = self.state.lock().unwrap();
                let max = state.page_max.unwrap_or(usize::MAX).min(max_count as usize);
                let (messages, more) = state.mailbox(user).page(after_seq, max);
                let seqs: Vec<u64> = messages.iter().map(|d| d.seq).collect();
                let last_seq = seqs.last().copied().unwrap_or(0);
                state.fetches.push((user, after_seq, seqs));
                Ok(Reply::Mailbox {
                    messages,
                    last_seq,
                    more,
                })
            }
            Call::Ack { up_to_seq } => {
                let mut state = self.state.lock().unwrap();
                state.acks.push((user, up_to_seq));
                if state.swallow_acks {
                    return;
                }
                let removed = state.mailbox(user).ack(up_to_seq);
                Ok(Reply::Acked { removed })
            }
            Call::Block { user: other } => {
                let mut state = self.state.lock().unwrap();
                state.relation_calls.push((user, message.call.clone()));
                state.blocked.insert((user, other));
                Ok(Reply::Done)
            }
            Call::Unblock { user: other } => {
                let mut state = self.state.lock().unwrap();
                state.relation_calls.push((user, message.call.clone()));
                state.blocked.remove(&(user, other));
                Ok(Reply::Done)
            }
            Call::LoginView => {
                let friends = USERS.iter().filter(|u| u.2 != user).map(|u| profile(u.2));
                let view = LoginView {
                    profile: profile(user),
                    groups: vec![FriendGroup {
                        name: "friends".into(),
                        friends: friends.collect(),
                    }],
                    requests: Vec::new(),
                };
                let online = (self.users.keys())
                    .filter(|u| **u != user)
                    .map(|u| (*u, Status::Online))
                    .collect();
                Ok(Reply::LoginView { view, online })
            }
            Call::AvatarRange { hash, offset, len } => {
                self.state.lock().unwrap().avatar_ranges.push((offset, len));
                let image = avatar_image();
                let start = (offset as usize).min(image.len());
                let end = (start + len as usize).min(image.len());
                if hash == AVATAR_HASH {
                    Ok(Reply::AvatarBytes {
                        total_len: image.len() as u32,
                        bytes: image[start..end].to_vec(),
                    })
                } else {
                    Err(AppError {
                        code: AppErrorCode::Refused,
                        message: "no such avatar".into(),
                    })
                }
            }
            Call::Profiles { users } => Ok(Reply::Profiles(
                USERS
                    .iter()
                    .filter(|u| users.contains(&u.2))
                    .map(|u| profile(u.2))
                    .collect(),
            )),
            Call::SetStatus(_) => Ok(Reply::Done),
            Call::GroupSend {
                group,
                msg_id,
                body,
                ..
            } => {
                let record = (user, group, msg_id);
                self.state.lock().unwrap().group_sends.push(record);
                self.group_send(user, group, msg_id, body)
            }
            Call::Groups => {
                let mut state = self.state.lock().unwrap();
                state.group_lists += 1;
                let groups = (state.groups.iter())
                    .filter_map(|(&group, g)| {
                        Some(GroupSummary {
                            group,
                            name: format!("group {group}"),
                            role: GroupRole::Member,
                            members: g.members.len() as u32,
                            read_seq: *g.members.get(&user)?,
                            high_seq: g.mailbox.last_seq,
                        })
                    })
                    .collect();
                Ok(Reply::Groups {
                    groups,
                    invites: Vec::new(),
                })
            }
            Call::GroupFetch {
                group,
                after_seq,
                max_count,
                ..
            } => {
                let mut state = self.state.lock().unwrap();
                let max = state.page_max.unwrap_or(usize::MAX).min(max_count as usize);
                match state.groups.get_mut(&group) {
                    Some(g) if g.members.contains_key(&user) => {
                        let (messages, more) = g.mailbox.page(after_seq, max);
                        let last_seq = messages.last().map_or(0, |d| d.seq);
                        // As the gateway: seqs after `after_seq` that are
                        // gone before the page, or up to the newest.
                        let dropped = match messages.first() {
                            Some(d) => d.seq - (after_seq + 1),
                            None if !more => g.mailbox.last_seq.saturating_sub(after_seq),
                            None => 0,
                        };
                        Ok(Reply::GroupMailbox {
                            messages,
                            last_seq,
                            more,
                            dropped,
                        })
                    }
                    _ => Err(not_a_member()),
                }
            }
            Call::GroupAck { group, up_to_seq } => {
                let mut state = self.state.lock().unwrap();
                let g = state.groups.get_mut(&group);
                match g.and_then(|g| Some((g.mailbox.last_seq, g.members.get_mut(&user)?))) {
                    Some((last_seq, cursor)) => {
                        *cursor = (*cursor).max(up_to_seq.min(last_seq));
                        Ok(Reply::Done)
                    }
                    None => Err(not_a_member()),
                }
            }
            Call::GroupCreate { name, topic } => {
                let mut state = self.state.lock().unwrap();
                let group = GROUP_ID_BASE | (state.groups.len() as u64 + 1);
                let g = state.groups.entry(group).or_default();
                g.members.insert(user, 0);
                Ok(Reply::Group(GroupInfo {
                    group,
                    name,
                    topic,
                    version: 1,
                    created_ms: 0,
                    members: vec![GroupMember {
                        user,
                        role: GroupRole::Owner,
                        read_seq: 0,
                    }],
                    joins: Vec::new(),
                }))
            }
            Call::GroupLeave { group } => {
                let mut state = self.state.lock().unwrap();
                let g = state.groups.get_mut(&group);
                match g.and_then(|g| g.members.remove(&user)) {
                    Some(_) => Ok(Reply::Done),
                    None => Err(not_a_member()),
                }
            }
            Call::Logout => {
                self.reply(session, message.id, Ok(Reply::Done));
                self.endpoint.close(session);
                return;
            }
            _ => Err(AppError {
                code: AppErrorCode::BadRequest,
                message: "not in the stub".into(),
            }),
        };
        self.reply(session, message.id, result);
    }

    /// Store first, then push the stored message to the recipient's
    /// session (unless told not to).
    fn send(&mut self, from: u64, to: u64, msg_id: u128, body: Vec<u8>) -> Result<Reply, AppError> {
        if !USERS.iter().any(|u| u.2 == to) {
            return Err(AppError {
                code: AppErrorCode::UnknownUser,
                message: format!("no user {to}"),
            });
        }
        let (delivery, copies) = {
            let mut state = self.state.lock().unwrap();
            if state.unavailable_sends > 0 {
                state.unavailable_sends -= 1;
                return Err(AppError {
                    code: AppErrorCode::Unavailable,
                    message: "shard down".into(),
                });
            }
            if state.blocked.contains(&(to, from)) {
                return Err(AppError {
                    code: AppErrorCode::NotAllowed,
                    message: "not allowed".into(),
                });
            }
            let delivery = state.mailbox(to).store(from, msg_id, body);
            let copies = match (state.suppress_pushes, state.duplicate_deliveries) {
                (true, _) => 0,
                (false, false) => 1,
                (false, true) => 2,
            };
            (delivery, copies)
        };
        let seq = delivery.seq;
        let push = GatewayMessage::Deliver(delivery);
        for _ in 0..copies {
            self.push_to(to, &push);
        }
        Ok(Reply::Sent(SendOutcome { seq }))
    }

    /// Store in the group's mailbox first, then push to every member
    /// online, the sender too (unless told not to).
    fn group_send(
        &mut self,
        from: u64,
        group: u64,
        msg_id: u128,
        body: Vec<u8>,
    ) -> Result<Reply, AppError> {
        let (delivery, members, copies) = {
            let mut state = self.state.lock().unwrap();
            if state.unavailable_sends > 0 {
                state.unavailable_sends -= 1;
                return Err(AppError {
                    code: AppErrorCode::Unavailable,
                    message: "shard down".into(),
                });
            }
            let copies = match (state.suppress_pushes, state.duplicate_deliveries) {
                (true, _) => 0,
                (false, false) => 1,
                (false, true) => 2,
            };
            let Some(g) = state.groups.get_mut(&group) else {
                return Err(AppError {
                    code: AppErrorCode::UnknownUser,
                    message: "no such group".into(),
                });
            };
            if !g.members.contains_key(&from) {
                return Err(not_a_member());
            }
            let delivery = g.mailbox.store(from, msg_id, body);
            let members: Vec<u64> = g.members.keys().copied().collect();
            (delivery, members, copies)
        };
        let seq = delivery.seq;
        let push = GatewayMessage::GroupDeliver { group, delivery };
        for member in members {
            for _ in 0..copies {
                self.push_to(member, &push);
            }
        }
        Ok(Reply::Sent(SendOutcome { seq }))
    }

    fn reply(&mut self, session: SessionId, id: u32, result: Result<Reply, AppError>) {
        self.push(session, &GatewayMessage::Reply { id, result });
    }
}

fn not_a_member() -> AppError {
    AppError {
        code: AppErrorCode::NotAllowed,
        message: "not a member".into(),
    }
}

fn profile(user: u64) -> Profile {
    let username = USERS.iter().find(|u| u.2 == user).expect("a stub user").0;
    Profile {
        user,
        username: username.into(),
        nickname: username.to_uppercase(),
        signature: String::new(),
        avatar: None,
        version: 1,
    }
}

const AVATAR_HASH: [u8; 32] = [7; 32];

/// 2,500 bytes: three ranges of at most 1,000.
fn avatar_image() -> Vec<u8> {
    (0..2500u32).map(|i| (i % 251) as u8).collect()
}

// ---- the SDK side ----------------------------------------------------------

/// Short session timers so a dead gateway is noticed quickly; generous
/// deadlines elsewhere.
fn config(stub: &Stub, credentials: Credentials) -> SdkConfig {
    let mut config = SdkConfig::new(stub.addr.to_string(), stub.keys.public, credentials);
    config.session = ClientConfig {
        session: SessionConfig {
            keepalive: Duration::from_millis(200),
            idle_timeout: Duration::from_millis(1500),
            ..SessionConfig::client()
        },
        handshake_retry: Duration::from_millis(100),
        handshake_timeout: Duration::from_secs(2),
        ..ClientConfig::default()
    };
    config.limits.reconnect_backoff_min_ms = 50;
    config.limits.reconnect_backoff_max_ms = 500;
    config.limits.reconnect_attempts_max = 1000;
    config.limits.send_retry_delay_ms = 50;
    config
}

fn password(user: &str) -> Credentials {
    let (username, password, _) = USERS.iter().find(|u| u.0 == user).unwrap();
    Credentials::Password {
        username: username.to_string(),
        password: password.to_string(),
    }
}

async fn login(stub: &Stub, user: &str) -> (Connection, mpsc::Receiver<ImEvent>) {
    within("login", connect(config(stub, password(user))))
        .await
        .unwrap()
}

/// The next message event (other events are skipped).
async fn next_message(events: &mut mpsc::Receiver<ImEvent>) -> Delivery {
    within("next message", async {
        loop {
            match events.recv().await.expect("event stream ended") {
                ImEvent::Message(d) => return d,
                _ => continue,
            }
        }
    })
    .await
}

/// The next `n` message events.
async fn messages(events: &mut mpsc::Receiver<ImEvent>, n: usize) -> Vec<Delivery> {
    let mut messages = Vec::with_capacity(n);
    for _ in 0..n {
        messages.push(next_message(events).await);
    }
    messages
}

/// Message events already in the channel (without waiting).
fn handed_out(events: &mut mpsc::Receiver<ImEvent>) -> Vec<Delivery> {
    std::iter::from_fn(|| events.try_recv().ok())
        .filter_map(|e| match e {
            ImEvent::Message(d) => Some(d),
            _ => None,
        })
        .collect()
}

/// Wait for `synced` (everything known to be in the mailbox handed out and
/// acknowledged); its seq and the messages handed out meanwhile.
async fn synced(
    connection: &Connection,
    events: &mut mpsc::Receiver<ImEvent>,
) -> (u64, Vec<Delivery>) {
    let seq = within("synced", connection.synced()).await.unwrap();
    (seq, handed_out(events))
}

fn seqs(messages: &[Delivery]) -> Vec<u64> {
    messages.iter().map(|d| d.seq).collect()
}

fn bodies(messages: &[Delivery]) -> Vec<Vec<u8>> {
    messages.iter().map(|d| d.body.clone()).collect()
}

#[tokio::test]
async fn login_is_accepted_or_refused_with_a_typed_error() {
    let stub = Stub::fresh().await;
    let (alice, _events) = login(&stub, "alice").await;
    assert_eq!(alice.user(), ALICE);
    assert_eq!(
        alice.resume_token(),
        [b"token:".as_slice(), &ALICE.to_le_bytes()].concat()
    );
    assert_eq!(alice.gateway(), stub.addr);

    let wrong = Credentials::Password {
        username: "alice".into(),
        password: "guess".into(),
    };
    let refusal = |credentials| async {
        match connect(config(&stub, credentials)).await.err().unwrap() {
            ConnectError::Refused { code, .. } => code,
            other => panic!("expected a refusal, got {other:?}"),
        }
    };
    assert_eq!(refusal(wrong).await, LoginError::WrongCredentials);
    let bad_token = Credentials::ResumeToken(b"forged".to_vec());
    assert_eq!(refusal(bad_token).await, LoginError::BadToken);
    let token = Credentials::ResumeToken(alice.resume_token());
    let (again, _events) = connect(config(&stub, token)).await.unwrap();
    assert_eq!(again.user(), ALICE);
    assert_eq!(stub.state().logins, vec![(ALICE, false), (ALICE, true)]);
    // The second login kicked the first, which closed its session;
    // closing the second tells the gateway too.
    again.close().await;
    assert_eq!(again.lost(), Some(LostReason::Closed));
    until("the gateway sees both closes", || {
        stub.state().sessions_closed == 2
    })
    .await;
    assert_eq!(alice.lost(), Some(LostReason::Kicked));
}

#[tokio::test]
async fn two_clients_exchange_messages_exactly_once_and_in_order() {
    const N: usize = 40;
    let stub = Stub::fresh().await;
    let (alice, mut alice_events) = login(&stub, "alice").await;
    let (bob, mut bob_events) = login(&stub, "bob").await;
    let talk = |from: Connection, to: u64| async move {
        for i in 0..=N {
            let body = if i == N {
                b"end".to_vec()
            } else {
                format!("m{i}").into_bytes()
            };
            // One sender per mailbox: seqs 1, 2, ... in send order.
            let seq = i as u64 + 1;
            assert_eq!(from.send(to, body).await, Ok(SendOutcome { seq }));
        }
    };
    let a = tokio::spawn(talk(alice.clone(), BOB));
    let b = tokio::spawn(talk(bob.clone(), ALICE));
    for (events, from) in [(&mut bob_events, ALICE), (&mut alice_events, BOB)] {
        let mut ids = std::collections::HashSet::new();
        for i in 0..=N {
            let d = next_message(events).await;
            let expected = if i == N {
                b"end".to_vec()
            } else {
                format!("m{i}").into_bytes()
            };
            assert_eq!((d.from, d.body, d.seq), (from, expected, i as u64 + 1));
            assert!(ids.insert(d.msg_id), "message ids are unique");
        }
    }
    within("senders", a).await.unwrap();
    within("senders", b).await.unwrap();
    assert_eq!(stub.sends().len(), 2 * (N + 1), "each message sent once");
    assert_eq!(alice.stats().inbox.duplicates, 0);
    assert_eq!(alice.stats().inbox.shown, N as u64 + 1);
}

#[tokio::test]
async fn a_message_pushed_twice_is_shown_once() {
    let stub = Stub::fresh().await;
    stub.state().duplicate_deliveries = true;
    let (alice, _alice_events) = login(&stub, "alice").await;
    let (bob, mut bob_events) = login(&stub, "bob").await;
    for i in 0..10 {
        alice.send(BOB, format!("m{i}").into_bytes()).await.unwrap();
    }
    alice.send(BOB, b"end".to_vec()).await.unwrap();
    // Both copies of each message (one seq) precede the next message, so
    // every duplicate up to "end" has been dropped once "end" shows.
    for i in 0..10 {
        let d = next_message(&mut bob_events).await;
        assert_eq!((d.seq, d.body), (i + 1, format!("m{i}").into_bytes()));
    }
    assert_eq!(next_message(&mut bob_events).await.body, b"end");
    let duplicates = bob.stats().inbox.duplicates;
    assert!((10..=11).contains(&duplicates), "{:?}", bob.stats());
    let (seq, more) = synced(&bob, &mut bob_events).await;
    assert_eq!((seq, more), (11, vec![]), "nothing shown twice");
}

#[tokio::test]
async fn a_gateway_restart_loses_nothing_and_resends_with_the_same_id() {
    let stub = Stub::fresh().await;
    stub.state().swallow_sends = true;
    let (alice, mut alice_events) = login(&stub, "alice").await;
    let sender = alice.clone();
    let send = tokio::spawn(async move { sender.send(BOB, b"survives".to_vec()).await });
    until("the first gateway sees the send", || {
        stub.sends().len() == 1
    })
    .await;
    let first = stub.sends()[0].clone();

    let (addr, keys) = stub.kill().await;
    let stub = Stub::start(addr, keys).await;
    let outcome = within("the re-sent message is answered", send)
        .await
        .unwrap();
    assert_eq!(outcome, Ok(SendOutcome { seq: 1 }));
    assert_eq!(
        stub.sends(),
        vec![first.clone()],
        "same msg_id, sent once here"
    );
    assert_eq!(
        stub.state().logins,
        vec![(ALICE, true)],
        "resumed with the token"
    );
    let reconnected = within("Reconnected event", async {
        loop {
            if let ImEvent::Reconnected { gateway, .. } = alice_events.recv().await.unwrap() {
                return gateway;
            }
        }
    })
    .await;
    assert_eq!(reconnected, addr);
    assert_eq!(alice.stats().reconnects, 1);

    // Bob, offline throughout, is shown it from the mailbox exactly once.
    let (bob, mut bob_events) = login(&stub, "bob").await;
    assert_eq!(bob.login().mailbox_count, 1);
    let (seq, shown) = synced(&bob, &mut bob_events).await;
    assert_eq!(seq, 1);
    assert_eq!(shown.len(), 1);
    assert_eq!((shown[0].from, shown[0].msg_id), (ALICE, first.1));
    assert_eq!(shown[0].body, b"survives");
    let mailbox = stub.mailbox(BOB);
    assert_eq!(
        (mailbox.acked, mailbox.records.len()),
        (1, 0),
        "acknowledged"
    );
}

#[tokio::test]
async fn a_full_outbox_refuses_with_a_typed_error() {
    let stub = Stub::fresh().await;
    stub.state().swallow_sends = true;
    let mut config = config(&stub, password("alice"));
    config.limits.outbox_max = 2;
    let (alice, _events) = connect(config).await.unwrap();
    let mut waiting = Vec::new();
    for i in 0..2 {
        let a = alice.clone();
        waiting.push(tokio::spawn(async move { a.send(BOB, vec![i]).await }));
    }
    until("both sends reach the gateway", || stub.sends().len() == 2).await;
    assert_eq!(
        alice.send(BOB, vec![9]).await,
        Err(SdkError::OutboxFull { max: 2 })
    );
    // Ending the connection answers what was waiting.
    alice.logout().await.unwrap();
    for w in waiting {
        let result = within("outbox answered", w).await.unwrap();
        assert_eq!(result, Err(SdkError::Closed(LostReason::Closed)));
    }
    assert_eq!(
        alice.send(BOB, vec![1]).await,
        Err(SdkError::Closed(LostReason::Closed))
    );
}

#[tokio::test]
async fn final_errors_and_kicks_reach_the_caller() {
    let stub = Stub::fresh().await;
    let (alice, mut events) = login(&stub, "alice").await;
    let unknown = alice.send(99, b"hi".to_vec()).await;
    assert!(
        matches!(
            unknown,
            Err(SdkError::App {
                code: AppErrorCode::UnknownUser,
                ..
            })
        ),
        "{unknown:?}"
    );
    let big = alice
        .send(BOB, vec![0; proto::app::BODY_BYTES_MAX + 1])
        .await;
    assert!(matches!(big, Err(SdkError::Invalid(_))), "{big:?}");

    // A second login of the same user kicks the first.
    let (_again, _events2) = login(&stub, "alice").await;
    let kicked = within("Kicked", events.recv()).await;
    assert_eq!(kicked, Some(ImEvent::Kicked));
    assert_eq!(within("events end", events.recv()).await, None);
    assert_eq!(alice.lost(), Some(LostReason::Kicked));
    assert_eq!(
        alice.send(BOB, b"x".to_vec()).await,
        Err(SdkError::Closed(LostReason::Kicked))
    );
}

#[tokio::test]
async fn profile_avatar_and_status_calls_and_pushed_friend_status() {
    let stub = Stub::fresh().await;
    let (alice, mut alice_events) = login(&stub, "alice").await;
    let (bob, _bob_events) = login(&stub, "bob").await;
    let event = within("friend status", alice_events.recv()).await;
    assert_eq!(
        event,
        Some(ImEvent::FriendStatus {
            user: BOB,
            status: Some(Status::Online)
        })
    );
    let profiles = alice.profiles(vec![BOB, 99]).await.unwrap();
    assert_eq!(profiles.len(), 1);
    assert_eq!(
        (profiles[0].user, profiles[0].nickname.as_str()),
        (BOB, "BOB")
    );
    let too_many = alice.profiles(vec![1; proto::app::PROFILES_MAX + 1]).await;
    assert!(
        matches!(too_many, Err(SdkError::Invalid(_))),
        "{too_many:?}"
    );

    assert_eq!(bob.avatar(AVATAR_HASH).await.unwrap(), avatar_image());
    let ranges = stub.state().avatar_ranges.clone();
    assert_eq!(ranges, vec![(0, 1000), (1000, 1000), (2000, 1000)]);
    let missing = bob.avatar([0; 32]).await;
    assert!(
        matches!(
            missing,
            Err(SdkError::App {
                code: AppErrorCode::Refused,
                ..
            })
        ),
        "{missing:?}"
    );
    bob.set_status(Status::Away).await.unwrap();
}

#[tokio::test]
async fn unanswered_requests_time_out_and_garbage_is_counted() {
    let stub = Stub::fresh().await;
    {
        let mut state = stub.state();
        state.swallow_calls = true;
        state.garbage_after_login = true;
    }
    let mut config = config(&stub, password("alice"));
    config.limits.request_timeout_ms = 300;
    config.limits.requests_in_flight_max = 1;
    let (alice, _events) = connect(config).await.unwrap();
    // One slot: the second request waits for it and times out too.
    let (first, second) = tokio::join!(alice.block(BOB), alice.fetch(0, 10, 1000));
    assert_eq!(first, Err(SdkError::Timeout));
    assert_eq!(second, Err(SdkError::Timeout));
    until("the malformed push is counted", || {
        alice.stats().malformed_messages == 1
    })
    .await;
    // The session survives both.
    stub.state().swallow_calls = false;
    let empty = Page {
        messages: vec![],
        last_seq: 0,
        more: false,
    };
    assert_eq!(alice.fetch(0, 10, 1000).await, Ok(empty));
}

#[tokio::test]
async fn a_dead_gateway_fails_over_to_another_address() {
    let mut seed = [0u8; 32];
    rand::thread_rng().fill_bytes(&mut seed);
    let keys = StaticKeypair::generate(seed);
    let any: SocketAddr = "127.0.0.1:0".parse().unwrap();
    let one = Stub::start(any, keys.clone()).await;
    let two = Stub::start(any, keys).await;
    let mut config = config(&one, password("alice"));
    config.gateway = format!("{}, {}", one.addr, two.addr);
    let (alice, mut events) = connect(config).await.unwrap();
    let (dead, alive) = if alice.gateway() == one.addr {
        (one, two)
    } else {
        (two, one)
    };
    assert_eq!(dead.state().logins.len(), 1);
    dead.kill().await;
    let outcome = within("send after failover", alice.send(BOB, b"x".to_vec())).await;
    assert_eq!(outcome, Ok(SendOutcome { seq: 1 }));
    assert_eq!(alice.gateway(), alive.addr);
    assert_eq!(alive.state().logins, vec![(ALICE, true)]);
    let reconnected = within("Reconnected", async {
        loop {
            if let Some(ImEvent::Reconnected { gateway, .. }) = events.recv().await {
                return gateway;
            }
        }
    })
    .await;
    assert_eq!(reconnected, alive.addr);
}

/// Two stubs with the same key and one shared state (mailboxes and each
/// user's last login: a cluster's gateways share the shards and profile).
async fn cluster() -> (Stub, Stub) {
    let mut seed = [0u8; 32];
    rand::thread_rng().fill_bytes(&mut seed);
    let keys = StaticKeypair::generate(seed);
    let any: SocketAddr = "127.0.0.1:0".parse().unwrap();
    let state: Arc<Mutex<StubState>> = Arc::default();
    let one = Stub::start_with(any, keys.clone(), state.clone()).await;
    let two = Stub::start_with(any, keys, state).await;
    (one, two)
}

#[tokio::test]
async fn racing_gateways_open_one_session_and_the_loser_is_stale() {
    for _ in 0..5 {
        let (one, two) = cluster().await;
        let mut config = config(&one, password("alice"));
        config.gateway = format!("{}, {}", one.addr, two.addr);
        config.limits.gateway_stagger_ms = 0; // both handshakes at once
        let (alice, mut events) = within("login", connect(config)).await.unwrap();
        let outcome = within("send", alice.send(BOB, b"x".to_vec())).await;
        assert_eq!(outcome, Ok(SendOutcome { seq: 1 }));
        // The losing handshake, if it went out before the winner's answer
        // came (it went out before that send), was answered Stale: its
        // login_ns was claimed by the winner's.
        assert_eq!(one.state().logins, vec![(ALICE, false)], "one session");
        assert!(one.state().stale_logins <= 1);
        let seen: Vec<ImEvent> = std::iter::from_fn(|| events.try_recv().ok()).collect();
        assert!(
            !seen
                .iter()
                .any(|e| matches!(e, ImEvent::Kicked | ImEvent::SessionLost { .. })),
            "the race kicked nobody: {seen:?}"
        );
    }
}

#[tokio::test]
async fn a_dead_address_first_costs_no_handshake_timeout() {
    let (live, other) = cluster().await;
    let (dead, _keys) = other.kill().await;
    let mut config = config(&live, password("alice"));
    config.gateway = format!("{dead}, {}", live.addr);
    // Were the dead address waited out, the login would take this long and
    // `within` would fail the test first.
    config.session.handshake_timeout = Duration::from_secs(600);
    config.limits.gateway_stagger_ms = 100;
    for _ in 0..5 {
        let (alice, _events) = within("login past a dead address", connect(config.clone()))
            .await
            .unwrap();
        assert_eq!(alice.gateway(), live.addr);
        alice.close().await;
    }
    assert_eq!(live.state().logins.len(), 5);
}

#[tokio::test]
async fn a_gateway_that_stopped_answering_is_tried_last() {
    // Four rounds: were the silent address not remembered, each reconnect
    // would try it first half the time.
    for _ in 0..4 {
        let (one, two) = cluster().await;
        let mut config = config(&one, password("alice"));
        config.gateway = format!("{}, {}", one.addr, two.addr);
        config.limits.gateway_stagger_ms = 60_000; // one address at a time
        let (alice, _events) = within("login", connect(config)).await.unwrap();
        let (dead, alive) = if alice.gateway() == one.addr {
            (one, two)
        } else {
            (two, one)
        };
        let (addr, _keys) = dead.kill().await;
        // The address stays bound and answers nothing: its INITs are counted.
        let silent = UdpSocket::bind(addr).await.unwrap();
        let outcome = within("send after failover", alice.send(BOB, b"x".to_vec())).await;
        assert_eq!(outcome, Ok(SendOutcome { seq: 1 }));
        assert_eq!(alice.gateway(), alive.addr);
        let mut buf = [0u8; 2048];
        let mut inits = 0;
        while let Ok((n, _)) = silent.try_recv_from(&mut buf) {
            inits += usize::from(n > 0 && buf[0] == 1);
        }
        assert_eq!(inits, 0, "the reconnect tried the silent gateway first");
        alice.close().await;
    }
}

#[tokio::test]
async fn a_login_behind_another_device_s_clock_retries_above_it() {
    let stub = Stub::fresh().await;
    let ahead_ns = client::login_clock::wall_ns() + 3_600 * 1_000_000_000;
    stub.state().last_login_ns.insert(ALICE, ahead_ns);
    let (alice, _events) = login(&stub, "alice").await;
    assert_eq!(stub.state().stale_logins, 1, "refused once, then above it");
    assert!(stub.state().last_login_ns[&ALICE] > ahead_ns);
    let outcome = within("send", alice.send(BOB, b"x".to_vec())).await;
    assert_eq!(outcome, Ok(SendOutcome { seq: 1 }));
}

/// Kill the stub under a connected client; start a new one on the same
/// address set up by `prepare`, or none.
async fn restart(stub: Stub, prepare: Option<fn(&mut StubState)>) -> Option<Stub> {
    let (addr, keys) = stub.kill().await;
    let prepare = prepare?;
    let stub = Stub::start(addr, keys).await;
    prepare(&mut stub.state());
    Some(stub)
}

async fn last_event(events: &mut mpsc::Receiver<ImEvent>) -> ImEvent {
    within("the event stream ends", async {
        let mut last = None;
        while let Some(event) = events.recv().await {
            last = Some(event);
        }
        last.expect("at least one event")
    })
    .await
}

#[tokio::test]
async fn a_refused_token_falls_back_to_the_password() {
    let stub = Stub::fresh().await;
    let (alice, _events) = login(&stub, "alice").await;
    let stub = restart(stub, Some(|s| s.refuse_tokens = true))
        .await
        .unwrap();
    let outcome = within("send after reconnect", alice.send(BOB, b"x".to_vec())).await;
    assert_eq!(outcome, Ok(SendOutcome { seq: 1 }));
    assert_eq!(stub.state().logins, vec![(ALICE, false)], "by password");
}

#[tokio::test]
async fn a_refused_token_without_a_password_ends_the_connection() {
    let stub = Stub::fresh().await;
    let (first, _events) = login(&stub, "alice").await;
    let token = Credentials::ResumeToken(first.resume_token());
    let (alice, mut events) = connect(config(&stub, token)).await.unwrap();
    let sender = alice.clone();
    let send = tokio::spawn(async move { sender.send(BOB, b"x".to_vec()).await });
    let _stub = restart(stub, Some(|s| s.refuse_tokens = true)).await;
    let ImEvent::SessionLost {
        reason: LostReason::Refused(ConnectError::Refused { code, .. }),
    } = last_event(&mut events).await
    else {
        panic!("expected SessionLost(Refused)");
    };
    assert_eq!(code, LoginError::BadToken);
    let failed = within("the outbox is answered", send).await.unwrap();
    assert!(
        matches!(failed, Err(SdkError::Closed(LostReason::Refused(_)))),
        "{failed:?}"
    );
}

#[tokio::test]
async fn reconnecting_gives_up_after_the_attempts_max() {
    let stub = Stub::fresh().await;
    let mut config = config(&stub, password("alice"));
    config.limits.reconnect_attempts_max = 2;
    config.session.handshake_timeout = Duration::from_millis(300);
    let (alice, mut events) = connect(config).await.unwrap();
    restart(stub, None).await;
    let event = last_event(&mut events).await;
    let ImEvent::SessionLost {
        reason: LostReason::GaveUp { attempts, last },
    } = event
    else {
        panic!("expected SessionLost(GaveUp), got {event:?}");
    };
    assert_eq!(attempts, 2);
    assert_eq!(last, ConnectError::Unreachable { tried: 1 });
    assert!(matches!(alice.lost(), Some(LostReason::GaveUp { .. })));
}

#[tokio::test]
async fn a_full_event_channel_loses_nothing() {
    let stub = Stub::fresh().await;
    let (alice, _alice_events) = login(&stub, "alice").await;
    let mut config = config(&stub, password("bob"));
    config.limits.events_max = 1;
    let (bob, mut bob_events) = connect(config).await.unwrap();
    for i in 0..20u8 {
        alice.send(BOB, vec![i]).await.unwrap();
    }
    // Bob reads nothing yet: his calls are answered all the same, and the
    // pushes his inbox had no room for wait in the mailbox.
    within(
        "a call while the channel is full",
        bob.set_status(Status::Away),
    )
    .await
    .unwrap();
    let shown = messages(&mut bob_events, 20).await;
    assert_eq!(seqs(&shown), (1..=20).collect::<Vec<u64>>());
    assert_eq!(
        bodies(&shown),
        (0..20u8).map(|i| vec![i]).collect::<Vec<_>>()
    );
    assert_eq!(synced(&bob, &mut bob_events).await, (20, vec![]));
    let stats = bob.stats().inbox;
    assert!(stats.held_dropped > 0, "pushes were dropped: {stats:?}");
    assert!(stats.fetches > 0, "and fetched: {stats:?}");
}

#[tokio::test]
async fn a_failed_ack_is_retried_and_nothing_is_shown_twice() {
    let stub = Stub::fresh().await;
    let (alice, _alice_events) = login(&stub, "alice").await;
    for i in 0..3u8 {
        let outcome = alice.send(BOB, vec![i]).await;
        assert_eq!(
            outcome,
            Ok(SendOutcome {
                seq: u64::from(i) + 1
            })
        );
    }
    stub.state().swallow_acks = true;
    let mut config = config(&stub, password("bob"));
    config.limits.request_timeout_ms = 300;
    let (bob, mut bob_events) = connect(config).await.unwrap();
    let shown = messages(&mut bob_events, 3).await;
    assert_eq!(bodies(&shown), vec![vec![0], vec![1], vec![2]]);
    until("bob acknowledges", || !stub.state().acks.is_empty()).await;
    assert_eq!(stub.state().acks[0], (BOB, 3));
    assert_eq!(stub.mailbox(BOB).seqs(), [1, 2, 3], "not acknowledged");
    // The ack is tried again (its request timed out) and goes through.
    stub.state().swallow_acks = false;
    assert_eq!(synced(&bob, &mut bob_events).await, (3, vec![]));
    let mailbox = stub.mailbox(BOB);
    assert_eq!((mailbox.acked, mailbox.records.len()), (3, 0));
    assert_eq!(bob.stats().inbox.shown, 3);
}

#[tokio::test]
async fn at_most_sends_in_flight_max_sends_wait_for_an_answer() {
    let stub = Stub::fresh().await;
    stub.state().swallow_sends = true;
    let mut config = config(&stub, password("alice"));
    config.limits.sends_in_flight_max = 2;
    config.limits.request_timeout_ms = 200;
    let (alice, _events) = connect(config).await.unwrap();
    let a = alice.clone();
    // `join!` polls in order, so the sends enter the outbox in order.
    let sending = tokio::spawn(async move {
        let (r0, r1, r2, r3) = tokio::join!(
            a.send(BOB, vec![0]),
            a.send(BOB, vec![1]),
            a.send(BOB, vec![2]),
            a.send(BOB, vec![3])
        );
        [r0, r1, r2, r3]
    });
    // Unanswered, the two oldest time out and go again before the others.
    until("two sends and their re-sends", || stub.sends().len() >= 4).await;
    let first: Vec<Vec<u8>> = stub.sends()[..4].iter().map(|s| s.2.clone()).collect();
    assert!(first.iter().all(|b| b == &[0] || b == &[1]), "{first:?}");
    stub.state().swallow_sends = false;
    let results = within("all answered", sending).await.unwrap();
    assert!(
        results.iter().all(|r| matches!(r, Ok(SendOutcome { .. }))),
        "{results:?}"
    );
    assert!(alice.stats().sends_reissued >= 2);
}

// ---- protocol v2: the mailbox is the single source of truth -----------------

#[tokio::test]
async fn messages_stored_while_offline_come_after_login_in_order_once() {
    let stub = Stub::fresh().await;
    stub.state().page_max = Some(3); // several pages
    let (alice, _alice_events) = login(&stub, "alice").await;
    for i in 0..7u8 {
        let outcome = alice.send(BOB, vec![i]).await;
        assert_eq!(
            outcome,
            Ok(SendOutcome {
                seq: u64::from(i) + 1
            })
        );
    }
    let (bob, mut bob_events) = login(&stub, "bob").await;
    let accepted = bob.login();
    assert_eq!((accepted.mailbox_count, accepted.mailbox_high_seq), (7, 7));
    let shown = messages(&mut bob_events, 7).await;
    assert_eq!(seqs(&shown), [1, 2, 3, 4, 5, 6, 7]);
    assert_eq!(
        bodies(&shown),
        (0..7u8).map(|i| vec![i]).collect::<Vec<_>>()
    );
    assert!(shown.iter().all(|d| d.from == ALICE));
    assert_eq!(synced(&bob, &mut bob_events).await, (7, vec![]), "once");
    assert!(stub.state().fetches.len() >= 3, "page by page");
    bob.close().await;
    let mailbox = stub.mailbox(BOB);
    assert_eq!((mailbox.acked, mailbox.records.len()), (7, 0));

    // The next login finds them acknowledged: nothing is shown again.
    let (bob, mut bob_events) = login(&stub, "bob").await;
    let accepted = bob.login();
    assert_eq!((accepted.mailbox_count, accepted.mailbox_high_seq), (0, 7));
    assert_eq!(synced(&bob, &mut bob_events).await, (7, vec![]));
}

/// `close` and `logout` send the last acknowledgement first (without
/// waiting for `synced`), so the next login does not show it again.
#[tokio::test]
async fn close_and_logout_acknowledge_what_was_shown_first() {
    let stub = Stub::fresh().await;
    for i in 1..=3u8 {
        stub.store(BOB, ALICE, u128::from(i), &[i]);
    }
    let (bob, mut bob_events) = login(&stub, "bob").await;
    assert_eq!(seqs(&messages(&mut bob_events, 3).await), [1, 2, 3]);
    bob.close().await;
    assert_eq!(stub.mailbox(BOB).acked, 3);

    for i in 4..=5u8 {
        stub.store(BOB, ALICE, u128::from(i), &[i]);
    }
    let (bob, mut bob_events) = login(&stub, "bob").await;
    assert_eq!(bob.login().mailbox_count, 2);
    assert_eq!(seqs(&messages(&mut bob_events, 2).await), [4, 5]);
    bob.logout().await.unwrap();
    assert_eq!(stub.mailbox(BOB).acked, 5);
    assert_eq!(stub.state().acks.last(), Some(&(BOB, 5)));
}

/// The acknowledgements of a connection are lost (the gateway swallows
/// them, as one paused while the application closes): the next connection
/// made with the same `ShownMarks` shows none of those messages again and
/// acknowledges them; one made without them shows them all again.
#[tokio::test]
async fn a_new_connection_with_the_same_marks_never_shows_a_message_again() {
    let stub = Stub::fresh().await;
    for i in 1..=3u8 {
        stub.store(BOB, ALICE, u128::from(i), &[i]);
    }
    stub.state().swallow_acks = true;
    let marks = ShownMarks::new();
    let mut first = config(&stub, password("bob"));
    first.shown = marks.clone();
    let (bob, mut bob_events) = within("login", connect(first)).await.unwrap();
    assert_eq!(seqs(&messages(&mut bob_events, 3).await), [1, 2, 3]);
    bob.close().await;
    assert_eq!(stub.mailbox(BOB).acked, 0, "every ack was lost");
    assert_eq!(marks.get(Mailbox::Direct), 3);
    stub.state().swallow_acks = false;

    stub.store(BOB, ALICE, 4, &[4]);
    let mut again = config(&stub, password("bob"));
    again.shown = marks.clone();
    let (bob, mut bob_events) = within("login", connect(again)).await.unwrap();
    let (seq, shown) = synced(&bob, &mut bob_events).await;
    assert_eq!(
        seqs(&shown),
        [4],
        "1..=3 were shown by the first connection"
    );
    assert_eq!(seq, 4);
    assert_eq!(stub.mailbox(BOB).acked, 4);
    bob.close().await;

    // The same mailbox state without the marks: all shown again.
    let stub = Stub::fresh().await;
    for i in 1..=3u8 {
        stub.store(BOB, ALICE, u128::from(i), &[i]);
    }
    let (bob, mut bob_events) = login(&stub, "bob").await;
    assert_eq!(seqs(&messages(&mut bob_events, 3).await), [1, 2, 3]);
    bob.close().await;
}

#[tokio::test]
async fn pushes_overlapping_the_login_fetch_are_shown_once() {
    let stub = Stub::fresh().await;
    for i in 0..3u8 {
        stub.store(BOB, ALICE, u128::from(i), &[i]);
    }
    // Every stored message is pushed right after the login, while the
    // client's own fetch reads the same seqs.
    stub.state().push_mailbox_on_login = true;
    let (bob, mut bob_events) = login(&stub, "bob").await;
    let (seq, shown) = synced(&bob, &mut bob_events).await;
    assert_eq!(seq, 3);
    assert_eq!(seqs(&shown), [1, 2, 3]);
    let fetches = stub.state().fetches.clone();
    assert_eq!(fetches[0], (BOB, 0, vec![1, 2, 3]), "the page overlapped");

    // Online: one seq pushed, then fetched after a mailbox change too.
    let (alice, _alice_events) = login(&stub, "alice").await;
    stub.state().push_mailbox_on_login = false;
    assert_eq!(
        alice.send(BOB, b"x".to_vec()).await,
        Ok(SendOutcome { seq: 4 })
    );
    assert_eq!(next_message(&mut bob_events).await.seq, 4);
    stub.store(BOB, ALICE, 99, b"y");
    stub.push(BOB, &[4, 5, 4]);
    stub.mailbox_changed(BOB);
    assert_eq!(next_message(&mut bob_events).await.seq, 5);
    assert_eq!(synced(&bob, &mut bob_events).await, (5, vec![]));
}

#[tokio::test]
async fn pushes_out_of_seq_order_are_shown_in_order() {
    let stub = Stub::fresh().await;
    let (bob, mut bob_events) = login(&stub, "bob").await;
    for i in 1..=4u8 {
        stub.store(BOB, ALICE, u128::from(i), &[i]);
    }
    stub.push(BOB, &[3, 1, 4, 2]);
    let shown = messages(&mut bob_events, 4).await;
    assert_eq!(seqs(&shown), [1, 2, 3, 4]);
    assert_eq!(bodies(&shown), [[1], [2], [3], [4]]);
    assert_eq!(synced(&bob, &mut bob_events).await, (4, vec![]));

    // A gap no push fills is fetched after a moment.
    for i in 5..=7u8 {
        stub.store(BOB, ALICE, u128::from(i), &[i]);
    }
    stub.push(BOB, &[7]);
    assert_eq!(seqs(&messages(&mut bob_events, 3).await), [5, 6, 7]);
    assert_eq!(stub.state().fetches.last(), Some(&(BOB, 4, vec![5, 6, 7])));
    assert_eq!(synced(&bob, &mut bob_events).await, (7, vec![]));
}

#[tokio::test]
async fn a_message_stored_twice_is_shown_once() {
    let stub = Stub::fresh().await;
    // A sender's retry after a lost answer: one msg_id, two seqs.
    stub.store(BOB, ALICE, 42, b"x");
    stub.store(BOB, ALICE, 42, b"x");
    stub.store(BOB, ALICE, 43, b"y");
    let (bob, mut bob_events) = login(&stub, "bob").await;
    let (seq, shown) = synced(&bob, &mut bob_events).await;
    assert_eq!(seq, 3, "the copy's seq counts as shown");
    assert_eq!(seqs(&shown), [1, 3]);
    assert_eq!(bodies(&shown), [b"x".to_vec(), b"y".to_vec()]);
    assert_eq!(stub.mailbox(BOB).acked, 3);

    // Pushed, the same; the same msg_id from another sender is another
    // message.
    stub.store(BOB, ALICE, 44, b"z");
    stub.store(BOB, ALICE, 44, b"z");
    stub.store(BOB, BOB, 44, b"own");
    stub.push(BOB, &[4, 5, 6]);
    let shown = messages(&mut bob_events, 2).await;
    assert_eq!(seqs(&shown), [4, 6]);
    assert_eq!(synced(&bob, &mut bob_events).await, (6, vec![]));
    assert_eq!(bob.stats().inbox.duplicates, 2);
}

#[tokio::test]
async fn calls_are_answered_while_the_application_reads_no_events() {
    let stub = Stub::fresh().await;
    for i in 0..20u8 {
        stub.store(BOB, ALICE, u128::from(i), &[i]);
    }
    let mut config = config(&stub, password("bob"));
    config.limits.events_max = 2;
    let (bob, mut bob_events) = connect(config).await.unwrap();
    // Nobody reads the events: more messages wait than the channel holds.
    let view = within("login view", bob.login_view()).await.unwrap();
    assert_eq!(view.view.profile.user, BOB);
    assert_eq!(view.view.groups[0].friends[0].user, ALICE);
    let shown = messages(&mut bob_events, 20).await;
    assert_eq!(seqs(&shown), (1..=20).collect::<Vec<u64>>());
    assert_eq!(synced(&bob, &mut bob_events).await, (20, vec![]));
}

#[tokio::test]
async fn a_mailbox_change_fetches_what_was_not_pushed() {
    let stub = Stub::fresh().await;
    let (alice, _alice_events) = login(&stub, "alice").await;
    let (bob, mut bob_events) = login(&stub, "bob").await;
    assert_eq!(synced(&bob, &mut bob_events).await, (0, vec![]));
    let bobs_fetches = |stub: &Stub| stub.state().fetches.iter().filter(|f| f.0 == BOB).count();
    assert_eq!(bobs_fetches(&stub), 1, "the one fetch after login");
    stub.state().suppress_pushes = true;
    for i in 0..3u8 {
        alice.send(BOB, vec![i]).await.unwrap();
    }
    assert_eq!(bobs_fetches(&stub), 1, "nothing told bob yet");
    stub.mailbox_changed(BOB);
    let shown = messages(&mut bob_events, 3).await;
    assert_eq!(seqs(&shown), [1, 2, 3]);
    assert_eq!(synced(&bob, &mut bob_events).await, (3, vec![]));
    assert_eq!(bobs_fetches(&stub), 2);
}

#[tokio::test]
async fn a_send_answered_unavailable_is_resent_and_not_overtaken() {
    let stub = Stub::fresh().await;
    stub.state().unavailable_sends = 2;
    let mut config = config(&stub, password("alice"));
    // One send on the wire at a time: the second waits in the outbox while
    // the first is held back for its retry delay.
    config.limits.sends_in_flight_max = 1;
    let (alice, _events) = connect(config).await.unwrap();
    let (first, second) = tokio::join!(
        alice.send(BOB, b"first".to_vec()),
        alice.send(BOB, b"second".to_vec())
    );
    assert_eq!(first, Ok(SendOutcome { seq: 1 }));
    assert_eq!(second, Ok(SendOutcome { seq: 2 }));
    let sends = stub.sends();
    let order: Vec<&[u8]> = sends.iter().map(|s| s.2.as_slice()).collect();
    assert_eq!(order, [b"first".as_slice(), b"first", b"first", b"second"]);
    assert!(sends[..3].iter().all(|s| s.1 == sends[0].1), "one msg_id");
    assert_ne!(sends[3].1, sends[0].1);
    assert_eq!(alice.stats().sends_reissued, 2);
    let stored = stub.mailbox(BOB).records;
    assert_eq!(bodies(&stored), [b"first".to_vec(), b"second".to_vec()]);
}

#[tokio::test]
async fn a_send_never_accepted_fails_after_the_send_timeout() {
    let stub = Stub::fresh().await;
    stub.state().unavailable_sends = u32::MAX;
    let mut config = config(&stub, password("alice"));
    config.limits.send_timeout_ms = 500;
    let (alice, _events) = connect(config).await.unwrap();
    let failed = within("the send gives up", alice.send(BOB, b"x".to_vec())).await;
    assert!(
        matches!(
            failed,
            Err(SdkError::App {
                code: AppErrorCode::Unavailable,
                ..
            })
        ),
        "{failed:?}"
    );
    let sends = stub.sends();
    assert!(sends.len() >= 2, "re-sent meanwhile: {sends:?}");
    assert!(sends.iter().all(|s| s.1 == sends[0].1), "one msg_id");
    // The outbox let it go: the next message goes through on its own.
    // (A last copy of the first may still have been on its way, and be
    // stored: it was not confirmed, which is all a failed send says.)
    stub.state().unavailable_sends = 0;
    let next = within("the next send", alice.send(BOB, b"y".to_vec())).await;
    assert!(matches!(next, Ok(SendOutcome { .. })), "{next:?}");
    let stored = bodies(&stub.mailbox(BOB).records);
    assert_eq!(stored.last(), Some(&b"y".to_vec()), "{stored:?}");
}

#[tokio::test]
async fn block_and_unblock_reach_the_gateway() {
    let stub = Stub::fresh().await;
    let (alice, _alice_events) = login(&stub, "alice").await;
    let (bob, _bob_events) = login(&stub, "bob").await;
    bob.block(ALICE).await.unwrap();
    let refused = within("a final answer", alice.send(BOB, b"x".to_vec())).await;
    assert!(
        matches!(
            refused,
            Err(SdkError::App {
                code: AppErrorCode::NotAllowed,
                ..
            })
        ),
        "{refused:?}"
    );
    assert_eq!(stub.sends().len(), 1, "a final error: not re-sent");
    bob.unblock(ALICE).await.unwrap();
    assert_eq!(
        alice.send(BOB, b"y".to_vec()).await,
        Ok(SendOutcome { seq: 1 })
    );
    assert_eq!(
        stub.state().relation_calls,
        vec![
            (BOB, Call::Block { user: ALICE }),
            (BOB, Call::Unblock { user: ALICE })
        ]
    );
}

/// What the application was never handed (it stopped reading while more
/// messages waited than its channel holds) is not acknowledged at close:
/// the next login shows it, each message once overall.
#[tokio::test]
async fn a_close_acknowledges_only_what_was_handed_out() {
    let stub = Stub::fresh().await;
    for i in 1..=10u8 {
        stub.store(BOB, ALICE, u128::from(i), &[i]);
    }
    let mut config = config(&stub, password("bob"));
    config.limits.events_max = 2;
    let (bob, mut bob_events) = connect(config.clone()).await.unwrap();
    let first = next_message(&mut bob_events).await;
    assert_eq!(first.seq, 1);
    bob.close().await;
    // What the channel still holds after the close was handed out too.
    let mut got = vec![first];
    got.extend(handed_out(&mut bob_events));
    let n = got.len() as u64;
    assert_eq!(seqs(&got), (1..=n).collect::<Vec<u64>>());
    assert!(n < 10, "the channel holds 2 events: {n} handed out");
    assert_eq!(stub.mailbox(BOB).acked, n, "no more than was handed out");

    let (bob, mut bob_events) = connect(config).await.unwrap();
    assert_eq!(bob.login().mailbox_count, 10 - n);
    let rest = messages(&mut bob_events, (10 - n) as usize).await;
    assert_eq!(seqs(&rest), (n + 1..=10).collect::<Vec<u64>>());
    assert_eq!(synced(&bob, &mut bob_events).await, (10, vec![]));
}

#[tokio::test]
async fn a_reconnect_fetches_what_was_stored_meanwhile_and_acknowledges_again() {
    let stub = Stub::fresh().await;
    let mut config = config(&stub, password("bob"));
    config.limits.request_timeout_ms = 300;
    let (bob, mut bob_events) = connect(config).await.unwrap();
    stub.state().swallow_acks = true;
    for i in 1..=2u8 {
        stub.store(BOB, ALICE, u128::from(i), &[i]);
    }
    stub.push(BOB, &[1, 2]);
    assert_eq!(seqs(&messages(&mut bob_events, 2).await), [1, 2]);
    until("bob acknowledges", || !stub.state().acks.is_empty()).await;

    // The gateway restarts; the mailbox, on its shard, keeps the unacked
    // messages and gets two more meanwhile.
    let state = stub.state.clone();
    let (addr, keys) = stub.kill().await;
    {
        let mut state = state.lock().unwrap();
        state.swallow_acks = false;
        for i in 3..=4u8 {
            state.mailbox(BOB).store(ALICE, u128::from(i), vec![i]);
        }
    }
    let stub = Stub::start_with(addr, keys, state).await;
    let reconnected = within("Reconnected", async {
        loop {
            match bob_events.recv().await.expect("events") {
                ImEvent::Reconnected {
                    mailbox_count,
                    mailbox_high_seq,
                    ..
                } => return (mailbox_count, mailbox_high_seq),
                ImEvent::Message(d) => panic!("shown again before the reconnect: {d:?}"),
                _ => {}
            }
        }
    })
    .await;
    assert_eq!(reconnected, (4, 4));
    let shown = messages(&mut bob_events, 2).await;
    assert_eq!(seqs(&shown), [3, 4], "1 and 2 are not shown again");
    assert_eq!(synced(&bob, &mut bob_events).await, (4, vec![]));
    let mailbox = stub.mailbox(BOB);
    assert_eq!((mailbox.acked, mailbox.records.len()), (4, 0));
}

// ---- chat groups -------------------------------------------------------------

const G1: u64 = GROUP_ID_BASE | 1;
const G2: u64 = GROUP_ID_BASE | 2;

/// The events already in the channel (without waiting).
fn drain(events: &mut mpsc::Receiver<ImEvent>) -> Vec<ImEvent> {
    std::iter::from_fn(|| events.try_recv().ok()).collect()
}

/// The next `n` group messages as (group, seq, body) (other events are
/// skipped).
async fn group_messages(
    events: &mut mpsc::Receiver<ImEvent>,
    n: usize,
) -> Vec<(u64, u64, Vec<u8>)> {
    within("group messages", async {
        let mut shown = Vec::new();
        while shown.len() < n {
            let event = events.recv().await.expect("event stream ended");
            if let ImEvent::GroupMessage { group, delivery } = event {
                shown.push((group, delivery.seq, delivery.body));
            }
        }
        shown
    })
    .await
}

/// Wait for `synced`; the group messages handed out meanwhile, as
/// (group, seq), and the other group events.
async fn group_synced(
    connection: &Connection,
    events: &mut mpsc::Receiver<ImEvent>,
) -> (Vec<(u64, u64)>, Vec<ImEvent>) {
    within("synced", connection.synced()).await.unwrap();
    let (mut shown, mut other) = (Vec::new(), Vec::new());
    for event in drain(events) {
        match event {
            ImEvent::GroupMessage { group, delivery } => shown.push((group, delivery.seq)),
            e @ (ImEvent::GroupDropped { .. } | ImEvent::GroupChanged { .. }) => other.push(e),
            _ => {}
        }
    }
    (shown, other)
}

#[tokio::test]
async fn group_messages_are_shown_once_in_order_and_the_cursor_follows() {
    const N: u64 = 20;
    let stub = Stub::fresh().await;
    stub.state().duplicate_deliveries = true;
    stub.join(G1, ALICE, 0);
    stub.join(G1, BOB, 0);
    let (alice, mut alice_events) = login(&stub, "alice").await;
    let (bob, mut bob_events) = login(&stub, "bob").await;
    // Some messages go out while bob's group list is still being read.
    for i in 1..=N {
        let body = format!("m{i}").into_bytes();
        let sent = alice.group_send(G1, body).await;
        assert_eq!(sent, Ok(SendOutcome { seq: i }));
    }
    let expected: Vec<(u64, u64, Vec<u8>)> = (1..=N)
        .map(|i| (G1, i, format!("m{i}").into_bytes()))
        .collect();
    assert_eq!(group_messages(&mut bob_events, N as usize).await, expected);
    assert_eq!(
        group_messages(&mut alice_events, N as usize).await,
        expected,
        "the sender sees its own messages in their place"
    );
    assert_eq!(group_synced(&bob, &mut bob_events).await, (vec![], vec![]));
    assert_eq!(stub.group(G1).members[&BOB], N, "bob's cursor");
    let stats = bob.stats().groups;
    assert_eq!((stats.inbox.shown, stats.groups), (N, 1));
    assert!(stats.inbox.duplicates >= N - 1, "{stats:?}");
    assert_eq!(bob.stats().inbox.shown, 0, "nothing in the 1:1 mailbox");
}

#[tokio::test]
async fn group_messages_stored_while_away_come_after_the_cursor_and_gaps_are_told() {
    let stub = Stub::fresh().await;
    stub.join(G1, ALICE, 0);
    stub.join(G1, BOB, 2);
    for i in 1..=5u8 {
        stub.group_store(G1, ALICE, &[i]);
    }
    // G2 kept only seqs 3 and 4: 1 and 2 went past its retention before
    // bob read them.
    stub.join(G2, BOB, 0);
    for i in 1..=4u8 {
        stub.group_store(G2, ALICE, &[i]);
    }
    stub.state().groups.get_mut(&G2).unwrap().mailbox.ack(2);
    stub.store(BOB, ALICE, 1, b"direct");
    let (bob, mut bob_events) = login(&stub, "bob").await;
    within("synced", bob.synced()).await.unwrap();
    let events = drain(&mut bob_events);
    let g1: Vec<u64> = (events.iter())
        .filter_map(|e| match e {
            ImEvent::GroupMessage {
                group: G1,
                delivery,
            } => Some(delivery.seq),
            _ => None,
        })
        .collect();
    assert_eq!(g1, [3, 4, 5], "after the cursor, in order, once");
    let g2: Vec<String> = (events.iter())
        .filter_map(|e| match e {
            ImEvent::GroupMessage {
                group: G2,
                delivery,
            } => Some(format!("m{}", delivery.seq)),
            ImEvent::GroupDropped { group: G2, count } => Some(format!("dropped {count}")),
            _ => None,
        })
        .collect();
    assert_eq!(g2, ["dropped 2", "m3", "m4"], "told before what follows");
    let direct = events
        .iter()
        .filter(|e| matches!(e, ImEvent::Message(d) if d.body == b"direct"));
    assert_eq!(direct.count(), 1);
    assert_eq!(stub.group(G1).members[&BOB], 5);
    assert_eq!(stub.group(G2).members[&BOB], 4);
    let stats = bob.stats().groups;
    assert_eq!((stats.inbox.shown, stats.dropped_told), (5, 2));
}

#[tokio::test]
async fn a_group_joined_after_login_starts_at_its_cursor_whatever_push_comes_first() {
    let stub = Stub::fresh().await;
    let (bob, mut bob_events) = login(&stub, "bob").await;
    assert_eq!(group_synced(&bob, &mut bob_events).await, (vec![], vec![]));
    stub.join(G1, ALICE, 0);
    for i in 1..=4u8 {
        stub.group_store(G1, ALICE, &[i]);
    }
    // Bob joins at the group's newest seq, 4; then 5 and 6 are stored and
    // only 6's push reaches him (5's is still on its way, or was dropped).
    stub.join(G1, BOB, 4);
    stub.group_store(G1, ALICE, b"five");
    stub.group_store(G1, ALICE, b"six");
    stub.group_push(G1, BOB, &[6]);
    let shown = group_messages(&mut bob_events, 2).await;
    let shown: Vec<(u64, &[u8])> = shown.iter().map(|(_, s, b)| (*s, &b[..])).collect();
    assert_eq!(shown, [(5, &b"five"[..]), (6, &b"six"[..])]);
    assert_eq!(group_synced(&bob, &mut bob_events).await, (vec![], vec![]));
    assert_eq!(stub.group(G1).members[&BOB], 6);
    assert!(stub.state().group_lists >= 2, "the push had the list read");
}

#[tokio::test]
async fn a_group_change_is_told_and_starts_or_drops_the_group_s_inbox() {
    let stub = Stub::fresh().await;
    stub.join(G1, ALICE, 0);
    stub.group_store(G1, ALICE, b"before bob");
    let (bob, mut bob_events) = login(&stub, "bob").await;
    assert_eq!(group_synced(&bob, &mut bob_events).await, (vec![], vec![]));
    // Invited and accepted elsewhere: at cursor 0, so he reads what is kept.
    stub.join(G1, BOB, 0);
    stub.group_changed(G1, BOB);
    let shown = group_messages(&mut bob_events, 1).await;
    assert_eq!(shown, [(G1, 1, b"before bob".to_vec())]);
    let (shown, told) = group_synced(&bob, &mut bob_events).await;
    assert_eq!(shown, []);
    assert!(
        told.is_empty(),
        "the change came before the message: {told:?}"
    );
    assert_eq!(bob.stats().groups.groups, 1);
    // Left: the list read after the change drops the inbox.
    bob.group_leave(G1).await.unwrap();
    stub.group_changed(G1, BOB);
    until("the inbox is dropped", || bob.stats().groups.groups == 0).await;
    let (_, told) = group_synced(&bob, &mut bob_events).await;
    assert!(
        told.iter()
            .any(|e| matches!(e, ImEvent::GroupChanged { group: G1, .. })),
        "{told:?}"
    );
}

#[tokio::test]
async fn a_group_send_shares_the_outbox_and_retries_with_the_same_id() {
    let stub = Stub::fresh().await;
    let (alice, mut alice_events) = login(&stub, "alice").await;
    let info = alice.group_create("tea", "oolong").await.unwrap();
    assert_eq!((info.name.as_str(), info.members.len()), ("tea", 1));
    let group = info.group;
    stub.state().unavailable_sends = 2;
    let first = alice.group_send(group, b"one".to_vec());
    let second = alice.send(BOB, b"two".to_vec());
    let (first, second) = within("sends", async { tokio::join!(first, second) }).await;
    assert_eq!(first, Ok(SendOutcome { seq: 1 }));
    assert_eq!(second, Ok(SendOutcome { seq: 1 }));
    let sends = stub.state().group_sends.clone();
    assert!(sends.len() >= 2, "re-sent after Unavailable: {sends:?}");
    assert!(
        sends.iter().all(|s| *s == (ALICE, group, sends[0].2)),
        "the same id each time: {sends:?}"
    );
    assert_eq!(stub.group(group).mailbox.last_seq, 1, "stored once");
    let shown = group_messages(&mut alice_events, 1).await;
    assert_eq!(shown, [(group, 1, b"one".to_vec())]);

    // Ids in the wrong place are refused before anything is sent.
    let invalid = |r: Result<_, SdkError>| matches!(r, Err(SdkError::Invalid(_)));
    assert!(invalid(alice.send(group, b"x".to_vec()).await.map(drop)));
    assert!(invalid(
        alice.group_send(BOB, b"x".to_vec()).await.map(drop)
    ));
    assert!(invalid(alice.group_leave(BOB).await));
    assert!(invalid(alice.group_info(BOB).await.map(drop)));
    let (groups, invites) = alice.groups().await.unwrap();
    assert_eq!(groups.iter().map(|g| g.group).collect::<Vec<_>>(), [group]);
    assert!(invites.is_empty());
}

#[tokio::test]
async fn a_reconnect_reads_the_group_list_again_and_goes_on_from_the_cursor() {
    let stub = Stub::fresh().await;
    stub.join(G1, ALICE, 0);
    stub.join(G1, BOB, 0);
    let (bob, mut bob_events) = login(&stub, "bob").await;
    assert_eq!(group_synced(&bob, &mut bob_events).await, (vec![], vec![]));
    for i in 1..=2u8 {
        stub.group_store(G1, ALICE, &[i]);
    }
    stub.group_push(G1, BOB, &[2, 1]);
    let shown = group_messages(&mut bob_events, 2).await;
    assert_eq!(shown.iter().map(|m| m.1).collect::<Vec<_>>(), [1, 2]);
    until("bob's cursor moves", || stub.group(G1).members[&BOB] == 2).await;

    // The gateway restarts; the group gets two more messages meanwhile.
    let state = stub.state.clone();
    let (addr, keys) = stub.kill().await;
    for i in 3..=4u8 {
        let mut state = state.lock().unwrap();
        let g = state.groups.get_mut(&G1).unwrap();
        g.mailbox.store(ALICE, u128::from(i), vec![i]);
    }
    let stub = Stub::start_with(addr, keys, state).await;
    let shown = group_messages(&mut bob_events, 2).await;
    assert_eq!(
        shown.iter().map(|m| m.1).collect::<Vec<_>>(),
        [3, 4],
        "1 and 2 are not shown again"
    );
    assert_eq!(group_synced(&bob, &mut bob_events).await, (vec![], vec![]));
    assert_eq!(stub.group(G1).members[&BOB], 4);
    assert_eq!(stub.state().group_lists, 2, "one list per login");
    assert_eq!(bob.stats().reconnects, 1);
}
