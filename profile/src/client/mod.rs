//! The async client of the profile service, for the gateway and imctl.
//!
//! [`ProfileClient`] is cheap to clone; clones share one pipelined TCP
//! connection. Any number of tasks may call it at once; each call waits for
//! an in-flight slot ([`ClientConfig::inflight_requests_max`]), sends its
//! request and waits for the response with its id.
//!
//! When the connection breaks, every request in flight fails with
//! [`ClientError::Disconnected`] (none hangs: each also has a deadline,
//! [`ClientConfig::request_timeout_ms`]); calls made while disconnected
//! fail at once; a background task reconnects with exponential backoff.
//!
//! [`ProfileClient::connect_subscribed`] also returns a bounded receiver of
//! the service's pushed [`Event`]s: `Invalidate { user, version }` after
//! every change of a user, `GroupChanged { group, version }` after every
//! change of a chat group, and `CacheReset` when the link was lost and
//! again when it is back (anything may have changed meanwhile) and when
//! events were dropped because the receiver fell
//! [`ClientConfig::events_max`] behind.

mod replicas;

use crate::server::RESPONSE_BODY_BYTES_MAX;
use bytes::BytesMut;
use daemon::secure::{LinkReader, LinkWriter};
use proto::{
    frame::{self, Decoded, FRAME_BODY_BYTES_MAX_DEFAULT},
    groups::{GroupId, GroupInfo, GroupRole, UserGroups},
    profile::{
        Account, AvatarHash, ErrorCode, Event, ImportUser, LoginView, Profile, ProfileError,
        ProfileStats, Relations, Request, RequestBody, ResponseBody, ServerMessage, ServiceInfo,
        UserId, AVATAR_RANGE_BYTES_MAX,
    },
};
use replicas::Replicas;
use std::{
    collections::HashMap,
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc, Mutex, Weak,
    },
    time::Duration,
};
use tokio::{
    io::AsyncReadExt,
    sync::{mpsc, oneshot, Notify, Semaphore},
};

/// Match one response variant or fail with a protocol error naming it.
macro_rules! expect_body {
    ($got:expr, $($pat:pat => $out:expr),+) => {
        match $got {
            $($pat => Ok($out),)+
            other => Err(unexpected(&other)),
        }
    };
}

/// What [`ProfileClient::claim_login`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LoginClaim {
    /// Recorded; the user's relations as of then.
    Fresh(Relations),
    /// Not newer than the user's last recorded login; nothing changed.
    Stale { last_ns: u64 },
}

/// Bytes the writer task gathers into one write at most.
const WRITE_BATCH_BYTES_MAX: usize = 256 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The service answered with a typed error.
    #[error("profile service error {:?}: {}", .0.code, .0.message)]
    Service(ProfileError),
    #[error("I/O error: {0}")]
    Io(#[from] std::io::Error),
    /// A bad frame, an oversized request, or a response of the wrong kind.
    #[error("protocol error: {0}")]
    Protocol(String),
    /// Not connected, or the connection broke while the request was in flight.
    #[error("disconnected from the profile service")]
    Disconnected,
    /// No answer within `request_timeout_ms`.
    #[error("no answer from the profile service in time")]
    Timeout,
}

impl ClientError {
    /// The service's error code, if it answered with one.
    pub fn code(&self) -> Option<ErrorCode> {
        match self {
            ClientError::Service(e) => Some(e.code),
            _ => None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientConfig {
    /// Most unanswered requests; further calls wait for a slot.
    pub inflight_requests_max: usize,
    /// Largest request frame body the client sends.
    pub request_body_bytes_max: usize,
    /// Largest response frame body the client accepts.
    pub response_body_bytes_max: usize,
    /// Capacity of the event channel.
    pub events_max: usize,
    /// A request without an answer after this long fails with `Timeout`.
    pub request_timeout_ms: u64,
    /// First reconnect delay; doubled after each failure ...
    pub reconnect_min_ms: u64,
    /// ... up to this.
    pub reconnect_max_ms: u64,
    /// Of a profile group: a read or password check one replica has not
    /// answered within this is tried at the next (reads change nothing),
    /// and that replica is avoided for a while (a paused process keeps its
    /// connections open). Writes are never sent twice, except a login
    /// claim, which is the same done twice (`ClaimLoginOnce`).
    pub replica_attempt_ms: u64,
}

impl Default for ClientConfig {
    fn default() -> Self {
        Self {
            inflight_requests_max: 1024,
            request_body_bytes_max: FRAME_BODY_BYTES_MAX_DEFAULT,
            response_body_bytes_max: RESPONSE_BODY_BYTES_MAX,
            events_max: 65_536,
            request_timeout_ms: 30_000,
            reconnect_min_ms: 50,
            reconnect_max_ms: 5_000,
            replica_attempt_ms: 2_000,
        }
    }
}

type Answer = Result<ResponseBody, ClientError>;

/// Requests waiting for their responses; `None` once the link broke.
#[derive(Default)]
struct Waiters {
    map: Mutex<Option<HashMap<u64, oneshot::Sender<Answer>>>>,
    closed: Notify,
    is_closed: AtomicBool,
}

impl Waiters {
    fn new() -> Arc<Self> {
        Arc::new(Self {
            map: Mutex::new(Some(HashMap::new())),
            ..Self::default()
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Option<HashMap<u64, oneshot::Sender<Answer>>>> {
        self.map.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Fail every waiter and refuse new ones.
    fn close(&self) {
        let waiters = self.lock().take();
        for (_, tx) in waiters.into_iter().flatten() {
            let _ = tx.send(Err(ClientError::Disconnected));
        }
        self.is_closed.store(true, Ordering::Release);
        self.closed.notify_waiters();
    }
}

/// One TCP connection.
struct Link {
    frames: mpsc::Sender<Vec<u8>>,
    waiters: Arc<Waiters>,
}

/// Where pushed events go; remembers to send a `CacheReset` once there is
/// room again after it had to drop events.
struct EventSink {
    tx: mpsc::Sender<Event>,
    overflowed: AtomicBool,
}

impl EventSink {
    fn deliver(&self, event: Event) {
        if self.overflowed.load(Ordering::Acquire) {
            if self.tx.try_send(Event::CacheReset).is_err() {
                return;
            }
            self.overflowed.store(false, Ordering::Release);
        }
        if self.tx.try_send(event).is_err() {
            self.overflowed.store(true, Ordering::Release);
        }
    }
}

struct Inner {
    addr: String,
    config: ClientConfig,
    link: Mutex<Option<Arc<Link>>>,
    slots: Semaphore,
    next_id: AtomicU64,
    events: Option<Arc<EventSink>>,
}

/// A reconnecting, pipelined client of the profile service: of one
/// process, or of the replicas of a profile group (an address list
/// `"a,b,c"`; see `replicas.rs` for where each request goes).
#[derive(Clone)]
pub struct ProfileClient {
    replicas: Arc<Replicas>,
}

impl ProfileClient {
    /// Connect with default limits, without events.
    pub async fn connect(addr: impl Into<String>) -> Result<Self, ClientError> {
        Self::connect_with(addr, ClientConfig::default()).await
    }

    pub async fn connect_with(
        addr: impl Into<String>,
        config: ClientConfig,
    ) -> Result<Self, ClientError> {
        Self::start(addr.into(), config, None).await
    }

    /// Connect and subscribe to pushed events; the receiver holds at most
    /// `config.events_max` of them. Its first event is `CacheReset`.
    pub async fn connect_subscribed(
        addr: impl Into<String>,
        config: ClientConfig,
    ) -> Result<(Self, mpsc::Receiver<Event>), ClientError> {
        let (tx, rx) = mpsc::channel(config.events_max.max(1));
        let sink = Arc::new(EventSink {
            tx,
            overflowed: AtomicBool::new(false),
        });
        Ok((Self::start(addr.into(), config, Some(sink)).await?, rx))
    }

    async fn start(
        addr: String,
        config: ClientConfig,
        events: Option<Arc<EventSink>>,
    ) -> Result<Self, ClientError> {
        if config.inflight_requests_max == 0 {
            return Err(ClientError::Protocol(
                "inflight_requests_max must be at least 1".into(),
            ));
        }
        let addrs: Vec<String> = addr
            .split(',')
            .map(str::trim)
            .filter(|a| !a.is_empty())
            .map(String::from)
            .collect();
        if addrs.is_empty() {
            return Err(ClientError::Protocol("no profile address given".into()));
        }
        let mut all = Vec::with_capacity(addrs.len());
        let mut first_error = None;
        for addr in addrs {
            let inner = Arc::new(Inner {
                addr,
                slots: Semaphore::new(config.inflight_requests_max),
                config: config.clone(),
                link: Mutex::new(None),
                next_id: AtomicU64::new(1),
                events: events.clone(),
            });
            let waiters = match establish(&inner).await {
                Ok(w) => w,
                Err(e) => {
                    // Reconnected in the background, as after a break.
                    tracing::debug!(addr = %inner.addr, error = %e, "profile replica not reachable yet");
                    first_error.get_or_insert(e);
                    let closed = Waiters::new();
                    closed.close();
                    closed
                }
            };
            tokio::spawn(supervise(Arc::downgrade(&inner), waiters));
            all.push(inner);
        }
        let replicas = Arc::new(Replicas::new(all));
        match first_error {
            Some(e) if !replicas.is_connected() => Err(e),
            _ => Ok(Self { replicas }),
        }
    }

    /// Whether a connection (to any replica) is up right now.
    pub fn is_connected(&self) -> bool {
        self.replicas.is_connected()
    }

    /// Send one request and wait for its answer; an `Error` body becomes
    /// [`ClientError::Service`].
    pub async fn call(&self, body: RequestBody) -> Answer {
        match self.replicas.call(body).await? {
            ResponseBody::Error(e) => Err(ClientError::Service(e)),
            // A follower named alone (a client of one replica).
            ResponseBody::NotLeader { leader } => Err(ClientError::Service(ProfileError {
                code: ErrorCode::Unavailable,
                message: format!("this replica does not lead its group (leader: {leader:?})"),
            })),
            other => Ok(other),
        }
    }

    /// The user id if the password is right and the account enabled.
    pub async fn check_password(
        &self,
        username: &str,
        password: &[u8],
    ) -> Result<UserId, ClientError> {
        let body = RequestBody::CheckPassword {
            username: username.as_bytes().to_vec(),
            password: password.to_vec(),
        };
        expect_body!(self.call(body).await?, ResponseBody::User(u) => u)
    }

    pub async fn create_user(
        &self,
        username: &str,
        password: &[u8],
    ) -> Result<UserId, ClientError> {
        let body = RequestBody::CreateUser {
            username: username.as_bytes().to_vec(),
            password: password.to_vec(),
        };
        expect_body!(self.call(body).await?, ResponseBody::User(u) => u)
    }

    /// Create accounts from ready PHC hashes (at most
    /// [`proto::profile::IMPORT_USERS_MAX`] per call); one result each.
    pub async fn import_users(
        &self,
        users: Vec<ImportUser>,
    ) -> Result<Vec<Result<UserId, ProfileError>>, ClientError> {
        expect_body!(self.call(RequestBody::ImportUsers { users }).await?, ResponseBody::Imported(r) => r)
    }

    /// Replace `user`'s password; revokes its resume tokens (the credential
    /// epoch increases).
    pub async fn set_password(&self, user: UserId, password: &[u8]) -> Result<(), ClientError> {
        let body = RequestBody::SetPassword {
            user,
            password: password.to_vec(),
        };
        expect_body!(self.call(body).await?, ResponseBody::Done => ())
    }

    /// Disable or enable `user`; a change revokes its resume tokens.
    pub async fn set_disabled(&self, user: UserId, disabled: bool) -> Result<(), ClientError> {
        expect_body!(self.call(RequestBody::SetDisabled { user, disabled }).await?, ResponseBody::Done => ())
    }

    pub async fn lookup(&self, username: &str) -> Result<UserId, ClientError> {
        let body = RequestBody::LookupUser {
            username: username.as_bytes().to_vec(),
        };
        expect_body!(self.call(body).await?, ResponseBody::User(u) => u)
    }

    pub async fn account(&self, user: UserId) -> Result<Account, ClientError> {
        expect_body!(self.call(RequestBody::GetAccount { user }).await?, ResponseBody::Account(a) => a)
    }

    pub async fn get_profile(&self, user: UserId) -> Result<Profile, ClientError> {
        expect_body!(self.call(RequestBody::GetProfile { user }).await?, ResponseBody::Profile(p) => p)
    }

    /// Profiles of the users that exist, in the order asked.
    pub async fn get_profiles(&self, users: Vec<UserId>) -> Result<Vec<Profile>, ClientError> {
        expect_body!(self.call(RequestBody::GetProfiles { users }).await?, ResponseBody::Profiles(p) => p)
    }

    /// Everything a client shows after login, in one request: own profile,
    /// friend groups with every friend's profile, pending requests.
    pub async fn friends(&self, user: UserId) -> Result<LoginView, ClientError> {
        expect_body!(self.call(RequestBody::LoginView { user }).await?, ResponseBody::LoginView(v) => v)
    }

    /// Change the fields given; returns the new version.
    pub async fn set_profile(
        &self,
        user: UserId,
        nickname: Option<&str>,
        signature: Option<&str>,
    ) -> Result<u64, ClientError> {
        let body = RequestBody::SetProfile {
            user,
            nickname: nickname.map(|s| s.as_bytes().to_vec()),
            signature: signature.map(|s| s.as_bytes().to_vec()),
        };
        expect_body!(self.call(body).await?, ResponseBody::Version(v) => v)
    }

    /// Store `image` as `user`'s avatar; its hash and the new version.
    pub async fn set_avatar(
        &self,
        user: UserId,
        image: Vec<u8>,
    ) -> Result<(AvatarHash, u64), ClientError> {
        expect_body!(self.call(RequestBody::SetAvatar { user, image }).await?,
            ResponseBody::Avatar { hash, version } => (hash, version))
    }

    /// Up to `len` bytes (at most [`AVATAR_RANGE_BYTES_MAX`]) of an avatar
    /// from `offset`, and the image's total size.
    pub async fn avatar_range(
        &self,
        hash: AvatarHash,
        offset: u32,
        len: u32,
    ) -> Result<(u32, Vec<u8>), ClientError> {
        expect_body!(self.call(RequestBody::AvatarRange { hash, offset, len }).await?,
            ResponseBody::AvatarBytes { total_len, bytes } => (total_len, bytes))
    }

    /// A whole avatar, fetched range by range.
    pub async fn avatar(&self, hash: AvatarHash) -> Result<Vec<u8>, ClientError> {
        let mut image = Vec::new();
        loop {
            let offset = u32::try_from(image.len())
                .map_err(|_| ClientError::Protocol("avatar too large".into()))?;
            let (total, bytes) = self
                .avatar_range(hash, offset, AVATAR_RANGE_BYTES_MAX)
                .await?;
            if bytes.is_empty() || image.len() + bytes.len() > total as usize {
                return if image.len() == total as usize {
                    Ok(image)
                } else {
                    Err(ClientError::Protocol("avatar ranges do not add up".into()))
                };
            }
            image.extend_from_slice(&bytes);
            if image.len() == total as usize {
                return Ok(image);
            }
        }
    }

    pub async fn friend_request(
        &self,
        from: UserId,
        to: UserId,
        group: &str,
    ) -> Result<(), ClientError> {
        let body = RequestBody::FriendRequest {
            from,
            to,
            group: group.as_bytes().to_vec(),
        };
        expect_body!(self.call(body).await?, ResponseBody::Done => ())
    }

    pub async fn friend_accept(
        &self,
        user: UserId,
        from: UserId,
        group: &str,
    ) -> Result<(), ClientError> {
        let body = RequestBody::FriendAccept {
            user,
            from,
            group: group.as_bytes().to_vec(),
        };
        expect_body!(self.call(body).await?, ResponseBody::Done => ())
    }

    pub async fn friend_reject(&self, user: UserId, from: UserId) -> Result<u64, ClientError> {
        expect_body!(self.call(RequestBody::FriendReject { user, from }).await?, ResponseBody::Version(v) => v)
    }

    pub async fn friend_remove(&self, user: UserId, friend: UserId) -> Result<(), ClientError> {
        expect_body!(self.call(RequestBody::FriendRemove { user, friend }).await?, ResponseBody::Done => ())
    }

    pub async fn friend_move(
        &self,
        user: UserId,
        friend: UserId,
        group: &str,
    ) -> Result<u64, ClientError> {
        let body = RequestBody::FriendMove {
            user,
            friend,
            group: group.as_bytes().to_vec(),
        };
        expect_body!(self.call(body).await?, ResponseBody::Version(v) => v)
    }

    /// Make every pair friends, filed under `group` on both sides.
    pub async fn import_friendships(
        &self,
        group: &str,
        pairs: Vec<(UserId, UserId)>,
    ) -> Result<(), ClientError> {
        let body = RequestBody::ImportFriendships {
            group: group.as_bytes().to_vec(),
            pairs,
        };
        expect_body!(self.call(body).await?, ResponseBody::Done => ())
    }

    /// `user` blocks `blocked`; `user`'s version after it (unchanged if
    /// `blocked` was already blocked).
    pub async fn block(&self, user: UserId, blocked: UserId) -> Result<u64, ClientError> {
        expect_body!(self.call(RequestBody::Block { user, blocked }).await?, ResponseBody::Version(v) => v)
    }

    /// `user` no longer blocks `blocked`; `user`'s version after it
    /// (unchanged if `blocked` was not blocked).
    pub async fn unblock(&self, user: UserId, blocked: UserId) -> Result<u64, ClientError> {
        expect_body!(self.call(RequestBody::Unblock { user, blocked }).await?, ResponseBody::Version(v) => v)
    }

    /// Friends, blocks, disabled flag, credential epoch and version of the
    /// users that exist (at most [`proto::profile::GET_PROFILES_MAX`]), in
    /// the order asked; each from one consistent snapshot.
    pub async fn relations(&self, users: Vec<UserId>) -> Result<Vec<Relations>, ClientError> {
        expect_body!(self.call(RequestBody::GetRelations { users }).await?, ResponseBody::Relations(r) => r)
    }

    /// Record `login_ns` as `user`'s newest login (see
    /// [`RequestBody::ClaimLoginOnce`]: with a number of its own, so a
    /// replica group's client may send it to the next replica when one
    /// does not answer).
    pub async fn claim_login(
        &self,
        user: UserId,
        login_ns: u64,
    ) -> Result<LoginClaim, ClientError> {
        let body = RequestBody::ClaimLoginOnce {
            user,
            login_ns,
            claim: rand::random(),
        };
        expect_body!(self.call(body).await?,
            ResponseBody::LoginClaimed(r) => LoginClaim::Fresh(r),
            ResponseBody::StaleLogin { last_ns } => LoginClaim::Stale { last_ns })
    }

    /// Create a group owned by `owner` (its only member, cursor 0).
    pub async fn group_create(
        &self,
        owner: UserId,
        name: &str,
        topic: &str,
    ) -> Result<GroupInfo, ClientError> {
        let body = RequestBody::GroupCreate {
            owner,
            name: name.as_bytes().to_vec(),
            topic: topic.as_bytes().to_vec(),
        };
        expect_body!(self.call(body).await?, ResponseBody::Group(g) => g)
    }

    /// Member `by` invites `invitee` (inviting again changes nothing).
    pub async fn group_invite(
        &self,
        by: UserId,
        group: GroupId,
        invitee: UserId,
    ) -> Result<(), ClientError> {
        let body = RequestBody::GroupInvite { by, group, invitee };
        expect_body!(self.call(body).await?, ResponseBody::Done => ())
    }

    /// `user` accepts (cursor `read_seq`) or declines an invitation.
    pub async fn group_answer_invite(
        &self,
        user: UserId,
        group: GroupId,
        accept: bool,
        read_seq: u64,
    ) -> Result<(), ClientError> {
        let body = RequestBody::GroupAnswerInvite {
            user,
            group,
            accept,
            read_seq,
        };
        expect_body!(self.call(body).await?, ResponseBody::Done => ())
    }

    /// `user` asks to join `group`.
    pub async fn group_join_request(
        &self,
        user: UserId,
        group: GroupId,
    ) -> Result<(), ClientError> {
        let body = RequestBody::GroupJoinRequest { user, group };
        expect_body!(self.call(body).await?, ResponseBody::Done => ())
    }

    /// Owner or admin `by` approves (cursor `read_seq`) or refuses
    /// `user`'s join request.
    pub async fn group_answer_join(
        &self,
        by: UserId,
        group: GroupId,
        user: UserId,
        accept: bool,
        read_seq: u64,
    ) -> Result<(), ClientError> {
        let body = RequestBody::GroupAnswerJoin {
            by,
            group,
            user,
            accept,
            read_seq,
        };
        expect_body!(self.call(body).await?, ResponseBody::Done => ())
    }

    /// `user` leaves `group` (not its owner).
    pub async fn group_leave(&self, user: UserId, group: GroupId) -> Result<(), ClientError> {
        let body = RequestBody::GroupLeave { user, group };
        expect_body!(self.call(body).await?, ResponseBody::Done => ())
    }

    /// `by` removes `user` from `group`.
    pub async fn group_remove(
        &self,
        by: UserId,
        group: GroupId,
        user: UserId,
    ) -> Result<(), ClientError> {
        let body = RequestBody::GroupRemove { by, group, user };
        expect_body!(self.call(body).await?, ResponseBody::Done => ())
    }

    /// The owner makes `user` an admin or a plain member.
    pub async fn group_set_role(
        &self,
        by: UserId,
        group: GroupId,
        user: UserId,
        role: GroupRole,
    ) -> Result<(), ClientError> {
        let body = RequestBody::GroupSetRole {
            by,
            group,
            user,
            role,
        };
        expect_body!(self.call(body).await?, ResponseBody::Done => ())
    }

    /// The owner hands `group` to member `to` and becomes an admin.
    pub async fn group_transfer(
        &self,
        by: UserId,
        group: GroupId,
        to: UserId,
    ) -> Result<(), ClientError> {
        let body = RequestBody::GroupTransfer { by, group, to };
        expect_body!(self.call(body).await?, ResponseBody::Done => ())
    }

    /// Owner or admin `by` changes the fields given (`None`: unchanged).
    pub async fn group_rename(
        &self,
        by: UserId,
        group: GroupId,
        name: Option<&str>,
        topic: Option<&str>,
    ) -> Result<(), ClientError> {
        let body = RequestBody::GroupRename {
            by,
            group,
            name: name.map(|s| s.as_bytes().to_vec()),
            topic: topic.map(|s| s.as_bytes().to_vec()),
        };
        expect_body!(self.call(body).await?, ResponseBody::Done => ())
    }

    /// The owner ends `group`.
    pub async fn group_dissolve(&self, by: UserId, group: GroupId) -> Result<(), ClientError> {
        let body = RequestBody::GroupDissolve { by, group };
        expect_body!(self.call(body).await?, ResponseBody::Done => ())
    }

    /// A group with its members (sorted by user) and join requests.
    pub async fn get_group(&self, group: GroupId) -> Result<GroupInfo, ClientError> {
        expect_body!(self.call(RequestBody::GetGroup { group }).await?, ResponseBody::Group(g) => g)
    }

    /// `user`'s groups and the invitations waiting for it.
    pub async fn user_groups(&self, user: UserId) -> Result<UserGroups, ClientError> {
        expect_body!(self.call(RequestBody::GetUserGroups { user }).await?,
            ResponseBody::UserGroups(g) => g)
    }

    /// Member `user` read `group` up to `up_to_seq`: its cursor (never
    /// moved back) and the group's lowest cursor, `(read_seq,
    /// min_read_seq)`.
    pub async fn group_read(
        &self,
        user: UserId,
        group: GroupId,
        up_to_seq: u64,
    ) -> Result<(u64, u64), ClientError> {
        let body = RequestBody::GroupRead {
            user,
            group,
            up_to_seq,
        };
        expect_body!(self.call(body).await?,
            ResponseBody::GroupRead { read_seq, min_read_seq } => (read_seq, min_read_seq))
    }

    /// The service's argon2id parameters.
    pub async fn info(&self) -> Result<ServiceInfo, ClientError> {
        expect_body!(self.call(RequestBody::Info).await?, ResponseBody::Info(i) => i)
    }

    /// The process's place in its group (a replica's role and Raft state).
    pub async fn stats(&self) -> Result<ProfileStats, ClientError> {
        expect_body!(self.call(RequestBody::Stats).await?, ResponseBody::Stats(s) => s)
    }

    pub async fn ping(&self) -> Result<(), ClientError> {
        expect_body!(self.call(RequestBody::Ping).await?, ResponseBody::Pong => ())
    }
}

fn unexpected(got: &ResponseBody) -> ClientError {
    let kind = format!("{got:?}");
    let kind = kind.split([' ', '(', '{']).next().unwrap_or("?");
    ClientError::Protocol(format!("unexpected {kind} response"))
}

impl Inner {
    fn current(&self) -> Option<Arc<Link>> {
        self.link.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    fn set_link(&self, link: Option<Arc<Link>>) {
        *self.link.lock().unwrap_or_else(|p| p.into_inner()) = link;
    }

    async fn call(&self, body: RequestBody) -> Answer {
        let _slot = self
            .slots
            .acquire()
            .await
            .map_err(|_| ClientError::Disconnected)?;
        let link = self.current().ok_or(ClientError::Disconnected)?;
        send_on(
            &link,
            &self.config,
            self.next_id.fetch_add(1, Ordering::Relaxed),
            body,
        )
        .await
    }
}

/// Removes a request's waiter when its call ends, however it ends (a no-op
/// once the answer took it).
struct Unregister<'a> {
    link: &'a Link,
    id: u64,
}

impl Drop for Unregister<'_> {
    fn drop(&mut self) {
        if let Some(map) = self.link.waiters.lock().as_mut() {
            map.remove(&self.id);
        }
    }
}

/// Send one request on `link` and wait for its answer (or the deadline).
async fn send_on(link: &Link, config: &ClientConfig, id: u64, body: RequestBody) -> Answer {
    let mut frame = Vec::new();
    frame::encode(
        &Request { id, body },
        config.request_body_bytes_max,
        &mut frame,
    )
    .map_err(|e| ClientError::Protocol(format!("request cannot be sent: {e}")))?;
    let (tx, rx) = oneshot::channel();
    match link.waiters.lock().as_mut() {
        Some(map) => map.insert(id, tx),
        None => return Err(ClientError::Disconnected),
    };
    // A call given up by its caller (a replica that did not answer in
    // time) leaves no waiter behind.
    let _unregister = Unregister { link, id };
    if link.frames.send(frame).await.is_err() {
        link.waiters.close();
    }
    let timeout = Duration::from_millis(config.request_timeout_ms);
    match tokio::time::timeout(timeout, rx).await {
        Ok(answer) => answer.unwrap_or(Err(ClientError::Disconnected)),
        Err(_) => Err(ClientError::Timeout),
    }
}

/// Connect, start the link's tasks, subscribe if asked; install the link.
async fn establish(inner: &Arc<Inner>) -> Result<Arc<Waiters>, ClientError> {
    let (rd, wr) = daemon::secure::connect(inner.addr.as_str())
        .await?
        .into_split();
    let waiters = Waiters::new();
    let (frames, frames_rx) = mpsc::channel(inner.config.inflight_requests_max + 1);
    tokio::spawn(write_frames(wr, frames_rx, waiters.clone()));
    tokio::spawn(read_messages(
        rd,
        waiters.clone(),
        inner.events.clone(),
        inner.config.response_body_bytes_max,
    ));
    let link = Arc::new(Link {
        frames,
        waiters: waiters.clone(),
    });
    if inner.events.is_some() {
        let id = inner.next_id.fetch_add(1, Ordering::Relaxed);
        match send_on(&link, &inner.config, id, RequestBody::Subscribe).await? {
            ResponseBody::Subscribed => {}
            other => return Err(unexpected(&other)),
        }
    }
    inner.set_link(Some(link));
    Ok(waiters)
}

/// Wait for the link to break, then reconnect with backoff; ends when every
/// client handle is gone.
async fn supervise(inner: Weak<Inner>, mut waiters: Arc<Waiters>) {
    loop {
        {
            let closed = waiters.closed.notified();
            if !waiters.is_closed.load(Ordering::Acquire) {
                closed.await;
            }
        }
        let Some(strong) = inner.upgrade() else {
            return;
        };
        strong.set_link(None);
        if let Some(events) = &strong.events {
            events.deliver(Event::CacheReset);
        }
        let mut delay = strong.config.reconnect_min_ms.max(1);
        let max = strong.config.reconnect_max_ms.max(delay);
        drop(strong);
        loop {
            tokio::time::sleep(Duration::from_millis(delay)).await;
            let Some(strong) = inner.upgrade() else {
                return;
            };
            match establish(&strong).await {
                Ok(w) => {
                    tracing::info!(addr = %strong.addr, "reconnected to the profile service");
                    waiters = w;
                    break;
                }
                Err(e) => {
                    tracing::debug!(addr = %strong.addr, error = %e, "reconnect failed");
                    delay = (delay * 2).min(max);
                }
            }
        }
    }
}

async fn write_frames(wr: LinkWriter, frames: mpsc::Receiver<Vec<u8>>, waiters: Arc<Waiters>) {
    if let Err(e) = daemon::link::write_frames(wr, frames, WRITE_BATCH_BYTES_MAX).await {
        tracing::debug!(error = %e, "profile client write failed");
        waiters.close();
    }
}

async fn read_messages(
    mut rd: LinkReader,
    waiters: Arc<Waiters>,
    events: Option<Arc<EventSink>>,
    body_bytes_max: usize,
) {
    let mut buf = BytesMut::with_capacity(64 * 1024);
    'link: loop {
        loop {
            match frame::decode::<ServerMessage>(&mut buf, body_bytes_max) {
                Ok(Decoded::Frame(ServerMessage::Response(r))) => {
                    let waiter = waiters.lock().as_mut().and_then(|m| m.remove(&r.id));
                    if let Some(tx) = waiter {
                        let _ = tx.send(Ok(r.body));
                    }
                }
                Ok(Decoded::Frame(ServerMessage::Event(e))) => {
                    if let Some(events) = &events {
                        events.deliver(e);
                    }
                }
                Ok(Decoded::Incomplete) => break,
                Err(e) => {
                    tracing::warn!(error = %e, "bad frame from the profile service; reconnecting");
                    break 'link;
                }
            }
        }
        match rd.read_buf(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(_) => {}
        }
    }
    waiters.close();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn event_sink_signals_overflow_with_a_reset() {
        let (tx, mut rx) = mpsc::channel(2);
        let sink = EventSink {
            tx,
            overflowed: AtomicBool::new(false),
        };
        let inv = |v| Event::Invalidate {
            user: 1,
            version: v,
        };
        for v in 1..=4 {
            sink.deliver(inv(v));
        }
        assert_eq!(rx.recv().await, Some(inv(1)));
        assert_eq!(rx.recv().await, Some(inv(2)));
        sink.deliver(inv(5));
        assert_eq!(
            rx.recv().await,
            Some(Event::CacheReset),
            "dropped events are announced"
        );
        assert_eq!(rx.recv().await, Some(inv(5)));
    }

    #[tokio::test]
    async fn calls_fail_fast_when_nothing_listens() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        drop(listener);
        assert!(ProfileClient::connect(addr.to_string()).await.is_err());
    }
}
