//! The client SDK: what a chat application links against.
//!
//! [`connect`] logs in (password or resume token, inside the session
//! handshake) at one of the addresses the gateway's name resolves to and
//! returns a [`Connection`] handle (cheap to clone) and a channel of
//! [`ImEvent`]s. One tokio task per connection owns the session: it
//! matches replies to requests by id, keeps every unanswered message in a
//! bounded outbox, and when the session is lost it logs in again with
//! backoff (the latest resume token first, the password as fallback) and
//! re-sends the outbox with the same message ids, in order.
//!
//! Receiving follows the mailbox (`proto::inbox`): every message a user
//! gets is stored in its mailbox with a seq, pushed while the user is
//! online, and fetched after every login. The task shows each seq once, in
//! order, as an [`ImEvent::Message`], whether it was pushed, fetched or
//! both, and acknowledges what it handed to the application's event
//! channel (which deletes it from the mailbox).
//!
//! Chat groups follow the same rules, one mailbox per group
//! (`group_inboxes`): after every login the task reads the user's group
//! list (`Call::Groups`) and starts each group's inbox at the member's read
//! cursor; group messages come as [`ImEvent::GroupMessage`], each once, in
//! the group's seq order, and the cursor is moved (`GroupAck`) over what
//! was handed out. Sends to a group ([`Connection::group_send`]) go through
//! the same outbox as 1:1 sends.
//!
//! Calls are answered whether or not the application reads its events.
//! While the event channel is full, messages wait in the mailbox,
//! unacknowledged: what the connection never handed out (it ended first)
//! is shown after the next login.

mod error;
mod establish;
mod group_inboxes;
mod outbox;
mod shown;
mod worker;

pub use error::{ConnectError, LostReason, SdkError};
pub use establish::GATEWAY_ADDRS_MAX;
pub use group_inboxes::{
    GroupStats, GROUP_DEDUPE_IDS_MAX, GROUP_HELD_BYTES_MAX, GROUP_READY_MAX, UNLISTED_BYTES_MAX,
};
pub use shown::{Mailbox, ShownMarks, SHOWN_MAILBOXES_MAX};

use proto::{
    app::{
        Call, Delivery, GroupSummary, LoginAccepted, Reply, SendOutcome, BODY_BYTES_MAX,
        FETCH_BYTES_MAX, FETCH_COUNT_MAX, PROFILES_MAX,
    },
    groups::{is_group, GroupId, GroupInfo, GroupInvite, GroupRole},
    inbox::InboxStats,
    presence::Status,
    profile::{AvatarHash, LoginView, Profile, UserId, AVATAR_BYTES_MAX, AVATAR_RANGE_BYTES_MAX},
    session::ClientConfig,
};
use std::{
    fmt,
    net::SocketAddr,
    sync::{Arc, Mutex, MutexGuard},
    time::Duration,
};
use tokio::sync::{mpsc, oneshot, Semaphore};
use worker::Command;

/// What the SDK logs in with.
#[derive(Clone)]
pub enum Credentials {
    /// Kept in memory: the fallback when a resume token is refused.
    Password { username: String, password: String },
    /// A token from an earlier login (`Connection::resume_token`).
    ResumeToken(Vec<u8>),
}

impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Credentials::Password { username, .. } => f
                .debug_struct("Password")
                .field("username", username)
                .finish_non_exhaustive(),
            Credentials::ResumeToken(_) => f.write_str("ResumeToken(..)"),
        }
    }
}

/// Limits and timers of the SDK (the session layer's are in
/// [`SdkConfig::session`]).
#[derive(Debug, Clone)]
pub struct SdkLimits {
    /// Requests other than sends waiting for their reply at most; more
    /// wait for a free slot (within their timeout).
    pub requests_in_flight_max: usize,
    /// Sends waiting for their answer at most; the rest of the outbox
    /// waits its turn, in order. Keep this plus `requests_in_flight_max`
    /// plus `group_requests_in_flight_max` plus 3 (the mailbox's fetch and
    /// ack, the group list) at or below the gateway's
    /// `requests_in_flight_per_session_max` (64), beyond which it answers
    /// `RateLimited`.
    pub sends_in_flight_max: usize,
    /// A request other than a send fails with `SdkError::Timeout` after
    /// this long; a send's request is re-sent (same `msg_id`) instead.
    pub request_timeout_ms: u64,
    /// A send without a final answer this long after `send` fails with its
    /// last retryable error (or `Timeout`): the message may still arrive,
    /// but it was not confirmed. 0: keep trying as long as the connection
    /// lasts.
    pub send_timeout_ms: u64,
    /// Messages waiting for the gateway's final answer at most; one more
    /// `send` fails with `SdkError::OutboxFull`.
    pub outbox_max: usize,
    /// After `RateLimited` or `Unavailable`, a message is re-sent this
    /// long later.
    pub send_retry_delay_ms: u64,
    /// Events buffered for the application at most (the channel's
    /// capacity); messages beyond it wait in the mailbox.
    pub events_max: usize,
    /// Session events buffered between the session driver and the SDK task.
    pub session_events_max: usize,
    /// (sender, message id) pairs remembered to drop a message stored twice
    /// (a sender's retry after a lost answer).
    pub dedupe_ids_max: usize,
    /// First reconnect delay; doubles per failed attempt up to the max
    /// (each delay is jittered down by up to half).
    pub reconnect_backoff_min_ms: u64,
    pub reconnect_backoff_max_ms: u64,
    /// Failed reconnect attempts in a row before the connection ends with
    /// `LostReason::GaveUp`.
    pub reconnect_attempts_max: u32,
    /// A login tries the gateways' addresses in turn, starting the next one
    /// this long after the previous one while none has answered (at once
    /// when one fails); the first to accept wins (happy eyeballs).
    pub gateway_stagger_ms: u64,
    /// An address whose handshake failed, or whose session stopped
    /// answering, is tried last for this long.
    pub dead_gateway_memory_ms: u64,
    /// Once a gateway of a login's round answered that another one claimed
    /// the round's `login_ns` (`Stale` with it), the winner's answer is
    /// awaited this long at most; then the login starts a new round above
    /// it (the winning gateway may have died, or been cut off, between its
    /// claim and its answer), at most `STALE_ROUNDS_MAX` times.
    pub claimed_login_wait_ms: u64,
    /// Chat groups followed at most (one inbox each; as many as a user may
    /// be in, the profile service's `user_groups_max`). Groups the list
    /// names beyond it (by id) are not followed: their pushes are dropped
    /// and counted (`GroupStats::over_limit`).
    pub groups_max: usize,
    /// Fetches and acks of the group inboxes in flight at most; the others
    /// wait their turn (groups take turns).
    pub group_requests_in_flight_max: usize,
}

impl Default for SdkLimits {
    fn default() -> Self {
        SdkLimits {
            requests_in_flight_max: 16,
            sends_in_flight_max: 32,
            request_timeout_ms: 15_000,
            send_timeout_ms: 60_000,
            outbox_max: 256,
            send_retry_delay_ms: 1_000,
            events_max: 1024,
            session_events_max: 1024,
            dedupe_ids_max: 65_536,
            reconnect_backoff_min_ms: 200,
            reconnect_backoff_max_ms: 10_000,
            reconnect_attempts_max: 30,
            gateway_stagger_ms: 250,
            dead_gateway_memory_ms: 30_000,
            claimed_login_wait_ms: 1_000,
            groups_max: 500,
            group_requests_in_flight_max: 8,
        }
    }
}

#[derive(Debug, Clone)]
pub struct SdkConfig {
    /// `host:port`, or several separated by commas. Every address the
    /// names resolve to is a gateway; a login races them (in random order,
    /// those that failed lately last, the next one `gateway_stagger_ms`
    /// after the previous) and keeps the first that accepts.
    pub gateway: String,
    /// The gateways' static public key (Noise_NK).
    pub gateway_public: [u8; 32],
    pub credentials: Credentials,
    pub limits: SdkLimits,
    /// Session-layer timers: handshake retry and timeout, heartbeat
    /// (`session.keepalive`, 30 s), idle expiry.
    pub session: ClientConfig,
    /// What this account's connections showed (shared by clones of this
    /// config): a connection never shows those seqs again, even when
    /// their acknowledgement was lost with an earlier connection.
    pub shown: ShownMarks,
}

impl SdkConfig {
    pub fn new(
        gateway: impl Into<String>,
        gateway_public: [u8; 32],
        credentials: Credentials,
    ) -> Self {
        SdkConfig {
            gateway: gateway.into(),
            gateway_public,
            credentials,
            limits: SdkLimits::default(),
            session: ClientConfig::default(),
            shown: ShownMarks::new(),
        }
    }
}

/// What the gateway pushes, and what happens to the connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ImEvent {
    /// A message for this user: each once, in mailbox (seq) order, whether
    /// it was pushed or fetched from the mailbox after a login.
    Message(Delivery),
    /// A friend came online, changed status, or went offline (`None`).
    FriendStatus {
        user: UserId,
        status: Option<Status>,
    },
    /// A profile this client has seen changed: read it again.
    ProfileChanged { user: UserId, version: u64 },
    /// The user logged in elsewhere; the connection is over (last event).
    Kicked,
    /// Logged in again after the session was lost; the outbox is being
    /// re-sent and messages stored meanwhile are fetched (they come as
    /// `Message` events). Friends' status pushes resume after `login_view`
    /// is called again.
    Reconnected {
        gateway: SocketAddr,
        mailbox_count: u64,
        mailbox_high_seq: u64,
    },
    /// The connection is over for good (last event); not sent after
    /// `logout` or `close`.
    SessionLost { reason: LostReason },
    /// A message of a group the user is in: each once, in the group's seq
    /// order (`delivery.seq`), whether pushed or fetched.
    GroupMessage { group: GroupId, delivery: Delivery },
    /// `count` messages of the group were not kept long enough for this
    /// member to read them (past the group's retention): they will never
    /// come. Told before the messages that follow them.
    GroupDropped { group: GroupId, count: u64 },
    /// The group's name, topic, members, roles or join requests changed,
    /// or it was dissolved, or the user joined or left it: read it again
    /// (`group_info`, `groups`). The connection reads its group list again
    /// by itself (it starts and drops group inboxes).
    GroupChanged { group: GroupId, version: u64 },
}

/// One page of the mailbox, as [`Connection::fetch`] reads it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Page {
    pub messages: Vec<Delivery>,
    /// The seq of the page's last record (0 for an empty page).
    pub last_seq: u64,
    /// Whether more stored messages follow.
    pub more: bool,
}

/// The login view: own profile, friend groups, pending requests, and the
/// friends online now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FriendsView {
    pub view: LoginView,
    pub online: Vec<(UserId, Status)>,
}

/// Counters of one connection.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct SdkStats {
    /// What the inbox showed, dropped as duplicates, skipped, fetched.
    pub inbox: InboxStats,
    /// Gateway messages that did not decode, dropped.
    pub malformed_messages: u64,
    /// Replies whose request was unknown (timed out or answered already).
    pub unmatched_replies: u64,
    /// Successful reconnects.
    pub reconnects: u64,
    /// Sends re-issued (after a timeout, a retryable error or a reconnect).
    pub sends_reissued: u64,
    /// The group inboxes: messages shown, duplicates, seqs told as dropped
    /// by retention, pushes dropped.
    pub groups: GroupStats,
}

pub(crate) struct SharedState {
    pub(crate) accepted: LoginAccepted,
    pub(crate) gateway: SocketAddr,
    pub(crate) lost: Option<LostReason>,
    pub(crate) stats: SdkStats,
}

pub(crate) type Shared = Arc<Mutex<SharedState>>;

pub(crate) fn lock(shared: &Shared) -> MutexGuard<'_, SharedState> {
    shared.lock().expect("sdk state mutex poisoned")
}

/// `close` and `logout` wait this long at most for the session's end.
pub const CLOSE_WAIT: Duration = Duration::from_secs(2);

struct Inner {
    commands: mpsc::Sender<Command>,
    in_flight: Semaphore,
    request_timeout: Duration,
    shared: Shared,
}

/// A logged-in connection to the IM service. Clones share it; when the
/// last clone is dropped the session is closed (without logging out).
#[derive(Clone)]
pub struct Connection {
    inner: Arc<Inner>,
}

impl fmt::Debug for Connection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let shared = lock(&self.inner.shared);
        f.debug_struct("Connection")
            .field("user", &shared.accepted.user)
            .field("gateway", &shared.gateway)
            .field("lost", &shared.lost)
            .finish_non_exhaustive()
    }
}

/// Log in and start the connection's task. The first login is tried once
/// (every address of the name, until one answers); reconnects after it
/// are automatic.
pub async fn connect(
    config: SdkConfig,
) -> Result<(Connection, mpsc::Receiver<ImEvent>), ConnectError> {
    let limits = &config.limits;
    let (events_tx, events_rx) = mpsc::channel(limits.events_max.max(1));
    let commands_max = limits.requests_in_flight_max + limits.outbox_max + 16;
    let (commands_tx, commands_rx) = mpsc::channel(commands_max);
    let inner = Inner {
        commands: commands_tx,
        in_flight: Semaphore::new(limits.requests_in_flight_max.max(1)),
        request_timeout: Duration::from_millis(limits.request_timeout_ms),
        shared: worker::start(config, commands_rx, events_tx).await?,
    };
    let connection = Connection {
        inner: Arc::new(inner),
    };
    Ok((connection, events_rx))
}

impl Connection {
    /// Send `body` (1 to `BODY_BYTES_MAX` bytes) to `to`. Resolves with the
    /// gateway's final answer: `Sent{seq}` once the message is durable in
    /// the recipient's mailbox, or a final error (`NotAllowed`,
    /// `MailboxFull`, `MessageTooLarge`, `UnknownUser`, ...). Across lost
    /// sessions and retryable refusals the message stays in the outbox and
    /// is re-sent with the same message id, before any later message,
    /// until `send_timeout_ms`.
    pub async fn send(&self, to: UserId, body: Vec<u8>) -> Result<SendOutcome, SdkError> {
        if is_group(to) {
            return Err(SdkError::Invalid(format!(
                "{to} is a group id: send to a group with group_send"
            )));
        }
        self.enqueue(to, body).await
    }

    /// Send `body` (1 to `BODY_BYTES_MAX` bytes) to every member of
    /// `group` (this user must be one). As [`Connection::send`]: the same
    /// outbox, order and retries with the same message id; `Sent{seq}` is
    /// the message's seq in the group's mailbox. Members online get it
    /// pushed, this user too (it comes back as an
    /// [`ImEvent::GroupMessage`] in its place among the group's messages).
    pub async fn group_send(&self, group: GroupId, body: Vec<u8>) -> Result<SendOutcome, SdkError> {
        check_group(group)?;
        self.enqueue(group, body).await
    }

    /// A message into the outbox (`to`: a user or a group).
    async fn enqueue(&self, to: u64, body: Vec<u8>) -> Result<SendOutcome, SdkError> {
        if body.is_empty() || body.len() > BODY_BYTES_MAX {
            return Err(SdkError::Invalid(format!(
                "a body is 1 to {BODY_BYTES_MAX} bytes, not {}",
                body.len()
            )));
        }
        let (reply, rx) = oneshot::channel();
        self.command(Command::Send { to, body, reply }).await?;
        rx.await.map_err(|_| self.closed())?
    }

    /// One page of stored messages with `seq > after_seq`, read as they
    /// are (no duplicates dropped, nothing marked shown or acknowledged:
    /// the connection's own mailbox sync does that and shows them as
    /// events).
    pub async fn fetch(
        &self,
        after_seq: u64,
        max_count: u32,
        max_bytes: u32,
    ) -> Result<Page, SdkError> {
        if max_count > FETCH_COUNT_MAX || max_bytes > FETCH_BYTES_MAX {
            return Err(SdkError::Invalid(format!(
                "fetch of {max_count} messages / {max_bytes} bytes exceeds \
                 {FETCH_COUNT_MAX} / {FETCH_BYTES_MAX}"
            )));
        }
        let call = Call::Fetch {
            after_seq,
            max_count,
            max_bytes,
        };
        let (reply, rx) = oneshot::channel();
        self.request(Command::Fetch { call, reply }, rx).await
    }

    /// Wait until every message known to be in the mailbox was handed out
    /// as an `ImEvent::Message` and acknowledged, and likewise every group
    /// message (the group list read since the last login, every group's
    /// messages handed out as `ImEvent::GroupMessage` and its cursor
    /// moved); the seq of the user's mailbox shown up to. After a login
    /// this is the moment the messages stored while the user was away have
    /// all been shown. Read the events meanwhile: messages beyond the
    /// channel's room (`events_max`) wait for it, and so does this.
    pub async fn synced(&self) -> Result<u64, SdkError> {
        let (reply, rx) = oneshot::channel();
        self.command(Command::Synced { reply }).await?;
        rx.await.map_err(|_| self.closed())?
    }

    /// Own profile, friend groups with profiles, pending friend requests
    /// and friends online; their status changes are pushed from then on.
    pub async fn login_view(&self) -> Result<FriendsView, SdkError> {
        match self.call(Call::LoginView).await? {
            Reply::LoginView { view, online } => Ok(FriendsView { view, online }),
            other => Err(unexpected(&other)),
        }
    }

    /// At most `PROFILES_MAX` users.
    pub async fn profiles(&self, users: Vec<UserId>) -> Result<Vec<Profile>, SdkError> {
        if users.len() > PROFILES_MAX {
            return Err(SdkError::Invalid(format!(
                "{} users exceed {PROFILES_MAX}",
                users.len()
            )));
        }
        match self.call(Call::Profiles { users }).await? {
            Reply::Profiles(profiles) => Ok(profiles),
            other => Err(unexpected(&other)),
        }
    }

    /// The whole avatar image, read in pieces of `AVATAR_RANGE_BYTES_MAX`.
    pub async fn avatar(&self, hash: AvatarHash) -> Result<Vec<u8>, SdkError> {
        let mut image = Vec::new();
        loop {
            let call = Call::AvatarRange {
                hash,
                offset: image.len() as u32,
                len: AVATAR_RANGE_BYTES_MAX,
            };
            let Reply::AvatarBytes { total_len, bytes } = self.call(call).await? else {
                return Err(SdkError::Protocol("avatar: not AvatarBytes".into()));
            };
            let total = total_len as usize;
            let bad = total > AVATAR_BYTES_MAX
                || bytes.len() > AVATAR_RANGE_BYTES_MAX as usize
                || image.len() + bytes.len() > total
                || (bytes.is_empty() && image.len() < total);
            if bad {
                return Err(SdkError::Protocol(format!(
                    "avatar piece of {} bytes at {} of {total_len}",
                    bytes.len(),
                    image.len()
                )));
            }
            image.extend_from_slice(&bytes);
            if image.len() == total {
                return Ok(image);
            }
        }
    }

    pub async fn set_profile(
        &self,
        nickname: Option<String>,
        signature: Option<String>,
    ) -> Result<(), SdkError> {
        self.done(Call::SetProfile {
            nickname,
            signature,
        })
        .await
    }

    pub async fn set_status(&self, status: Status) -> Result<(), SdkError> {
        self.done(Call::SetStatus(status)).await
    }

    pub async fn friend_request(&self, to_username: &str, group: &str) -> Result<(), SdkError> {
        self.done(Call::FriendRequest {
            to_username: to_username.to_string(),
            group: group.to_string(),
        })
        .await
    }

    pub async fn friend_accept(&self, from: UserId, group: &str) -> Result<(), SdkError> {
        self.done(Call::FriendAccept {
            from,
            group: group.to_string(),
        })
        .await
    }

    pub async fn friend_reject(&self, from: UserId) -> Result<(), SdkError> {
        self.done(Call::FriendReject { from }).await
    }

    pub async fn friend_remove(&self, friend: UserId) -> Result<(), SdkError> {
        self.done(Call::FriendRemove { friend }).await
    }

    /// Refuse messages and friend requests from `user` from now on.
    pub async fn block(&self, user: UserId) -> Result<(), SdkError> {
        self.done(Call::Block { user }).await
    }

    pub async fn unblock(&self, user: UserId) -> Result<(), SdkError> {
        self.done(Call::Unblock { user }).await
    }

    // ---- chat groups -----------------------------------------------------

    /// The user's groups (with its read cursor and the group's newest seq
    /// in each) and the invitations waiting for its answer.
    pub async fn groups(&self) -> Result<(Vec<GroupSummary>, Vec<GroupInvite>), SdkError> {
        match self.call(Call::Groups).await? {
            Reply::Groups { groups, invites } => Ok((groups, invites)),
            other => Err(unexpected(&other)),
        }
    }

    /// Create a group with this user as its owner.
    pub async fn group_create(&self, name: &str, topic: &str) -> Result<GroupInfo, SdkError> {
        self.group_info_reply(Call::GroupCreate {
            name: name.to_string(),
            topic: topic.to_string(),
        })
        .await
    }

    /// The group, its members and join requests (members only).
    pub async fn group_info(&self, group: GroupId) -> Result<GroupInfo, SdkError> {
        check_group(group)?;
        self.group_info_reply(Call::GroupInfo { group }).await
    }

    /// Invite a user, by username, into a group this user is in.
    pub async fn group_invite(&self, group: GroupId, username: &str) -> Result<(), SdkError> {
        let username = username.to_string();
        self.group_done(group, Call::GroupInvite { group, username })
            .await
    }

    /// Accept or decline an invitation.
    pub async fn group_answer_invite(&self, group: GroupId, accept: bool) -> Result<(), SdkError> {
        self.group_done(group, Call::GroupAnswerInvite { group, accept })
            .await
    }

    /// Ask to join; an owner or admin answers.
    pub async fn group_join(&self, group: GroupId) -> Result<(), SdkError> {
        self.group_done(group, Call::GroupJoin { group }).await
    }

    /// As an owner or admin, accept or refuse `user`'s join request.
    pub async fn group_answer_join(
        &self,
        group: GroupId,
        user: UserId,
        accept: bool,
    ) -> Result<(), SdkError> {
        let call = Call::GroupAnswerJoin {
            group,
            user,
            accept,
        };
        self.group_done(group, call).await
    }

    pub async fn group_leave(&self, group: GroupId) -> Result<(), SdkError> {
        self.group_done(group, Call::GroupLeave { group }).await
    }

    pub async fn group_remove(&self, group: GroupId, user: UserId) -> Result<(), SdkError> {
        self.group_done(group, Call::GroupRemove { group, user })
            .await
    }

    /// As the owner, make `user` an admin or a member.
    pub async fn group_set_role(
        &self,
        group: GroupId,
        user: UserId,
        role: GroupRole,
    ) -> Result<(), SdkError> {
        self.group_done(group, Call::GroupSetRole { group, user, role })
            .await
    }

    /// As the owner, hand the group to member `to`.
    pub async fn group_transfer(&self, group: GroupId, to: UserId) -> Result<(), SdkError> {
        self.group_done(group, Call::GroupTransfer { group, to })
            .await
    }

    /// Change the name, the topic or both (`None`: unchanged).
    pub async fn group_rename(
        &self,
        group: GroupId,
        name: Option<String>,
        topic: Option<String>,
    ) -> Result<(), SdkError> {
        self.group_done(group, Call::GroupRename { group, name, topic })
            .await
    }

    pub async fn group_dissolve(&self, group: GroupId) -> Result<(), SdkError> {
        self.group_done(group, Call::GroupDissolve { group }).await
    }

    /// End the session at the gateway (presence is told at once) and the
    /// connection, after acknowledging what was handed out; unanswered sends
    /// fail with `Closed`. Returns once the session's CLOSE is out (or
    /// after `CLOSE_WAIT` twice).
    pub async fn logout(&self) -> Result<(), SdkError> {
        let (reply, rx) = oneshot::channel();
        let result = self.request(Command::Logout { reply }, rx).await;
        self.ended().await;
        result
    }

    /// End the connection without logging out (the gateway sees the
    /// session close), after acknowledging what was handed out; unanswered sends
    /// fail with `Closed`. Returns once the CLOSE is out (or after
    /// `CLOSE_WAIT` twice), so a program may exit.
    pub async fn close(&self) {
        let _ = self.inner.commands.send(Command::Close).await;
        self.ended().await;
    }

    /// Wait for the connection's task to end (bounded by twice
    /// `CLOSE_WAIT`: the last acks, then the CLOSE; the task may also be
    /// waiting for the application to read events).
    async fn ended(&self) {
        let _ = tokio::time::timeout(2 * CLOSE_WAIT, self.inner.commands.closed()).await;
    }

    /// The current login: user id, latest resume token, mailbox figures.
    pub fn login(&self) -> LoginAccepted {
        lock(&self.inner.shared).accepted.clone()
    }

    pub fn user(&self) -> UserId {
        lock(&self.inner.shared).accepted.user
    }

    /// The latest resume token (for `Credentials::ResumeToken` next time).
    pub fn resume_token(&self) -> Vec<u8> {
        lock(&self.inner.shared).accepted.resume_token.clone()
    }

    /// The gateway address of the current (or last) session.
    pub fn gateway(&self) -> SocketAddr {
        lock(&self.inner.shared).gateway
    }

    pub fn stats(&self) -> SdkStats {
        lock(&self.inner.shared).stats
    }

    /// Why the connection ended, once it has.
    pub fn lost(&self) -> Option<LostReason> {
        lock(&self.inner.shared).lost.clone()
    }

    async fn call(&self, call: Call) -> Result<Reply, SdkError> {
        let (reply, rx) = oneshot::channel();
        self.request(Command::Call { call, reply }, rx).await
    }

    async fn done(&self, call: Call) -> Result<(), SdkError> {
        match self.call(call).await? {
            Reply::Done => Ok(()),
            other => Err(unexpected(&other)),
        }
    }

    /// A call about `group` answered `Done`.
    async fn group_done(&self, group: GroupId, call: Call) -> Result<(), SdkError> {
        check_group(group)?;
        self.done(call).await
    }

    /// A call answered with a group (`Reply::Group`).
    async fn group_info_reply(&self, call: Call) -> Result<GroupInfo, SdkError> {
        match self.call(call).await? {
            Reply::Group(info) => Ok(info),
            other => Err(unexpected(&other)),
        }
    }

    /// A request that takes one of the `requests_in_flight_max` slots
    /// until its reply (the task times it out).
    async fn request<T>(
        &self,
        command: Command,
        rx: oneshot::Receiver<Result<T, SdkError>>,
    ) -> Result<T, SdkError> {
        let permit =
            tokio::time::timeout(self.inner.request_timeout, self.inner.in_flight.acquire())
                .await
                .map_err(|_| SdkError::Timeout)?
                .expect("the semaphore is never closed");
        self.command(command).await?;
        let result = rx.await.map_err(|_| self.closed())?;
        drop(permit);
        result
    }

    async fn command(&self, command: Command) -> Result<(), SdkError> {
        self.inner
            .commands
            .send(command)
            .await
            .map_err(|_| self.closed())
    }

    fn closed(&self) -> SdkError {
        SdkError::Closed(self.lost().unwrap_or(LostReason::Closed))
    }
}

/// Refuse a user id where a group id belongs, before anything is sent.
fn check_group(group: u64) -> Result<(), SdkError> {
    if is_group(group) {
        Ok(())
    } else {
        Err(SdkError::Invalid(format!("{group} is not a group id")))
    }
}

fn unexpected(reply: &Reply) -> SdkError {
    SdkError::Protocol(format!("unexpected reply {reply:?}"))
}
