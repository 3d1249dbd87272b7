//! The profile service protocol: accounts, profiles, friends and avatars,
//! between gateways (and tools) and the profile daemon.
//!
//! The client sends [`Request`] frames; the service sends [`ServerMessage`]
//! frames: either a [`Response`] (echoing its request's `id`; responses of
//! one connection may come back in any order) or a pushed [`Event`] on a
//! connection that sent [`RequestBody::Subscribe`].
//!
//! Text fields of requests travel as bytes so that invalid UTF-8 reaches the
//! service and is refused with [`ErrorCode::InvalidUtf8`] instead of breaking
//! the frame. Byte layout: see `docs/PROTOCOL.md`.

use crate::groups::{GroupId, GroupInfo, GroupRole, UserGroups};
use serde::{Deserialize, Serialize};

/// Version of these types, bumped on any incompatible change (not sent on
/// the wire yet: the service and its callers are deployed together).
pub const PROFILE_PROTOCOL_VERSION: u32 = 1;

/// A user id: assigned by the service when the account is created.
pub type UserId = u64;

/// SHA-256 of an avatar image: its content address.
pub type AvatarHash = [u8; 32];

/// Most accounts in one [`RequestBody::ImportUsers`].
pub const IMPORT_USERS_MAX: usize = 1000;
/// Most pairs in one [`RequestBody::ImportFriendships`].
pub const IMPORT_FRIENDSHIPS_MAX: usize = 10_000;
/// Most users in one [`RequestBody::GetProfiles`].
pub const GET_PROFILES_MAX: usize = 1000;
/// Most bytes one [`RequestBody::AvatarRange`] returns: a range fits one UDP
/// datagram of the session layer (1,200 bytes of payload) with room to spare.
pub const AVATAR_RANGE_BYTES_MAX: u32 = 1000;
/// Largest avatar image the protocol carries (the service may set less).
pub const AVATAR_BYTES_MAX: usize = 256 * 1024;
/// Largest password accepted (bytes); longer ones are refused, not hashed.
pub const PASSWORD_BYTES_MAX: usize = 256;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Request {
    pub id: u64,
    pub body: RequestBody,
}

/// One account of an [`RequestBody::ImportUsers`]: a username and a ready
/// argon2id PHC string (`$argon2id$v=19$m=...,t=...,p=...$salt$hash`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImportUser {
    #[serde(with = "serde_bytes")]
    pub username: Vec<u8>,
    pub phc: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum RequestBody {
    /// Check `password` for `username`; answered with [`ResponseBody::User`].
    /// Unknown users and wrong passwords give the same error.
    CheckPassword {
        #[serde(with = "serde_bytes")]
        username: Vec<u8>,
        #[serde(with = "serde_bytes")]
        password: Vec<u8>,
    },
    /// Create an account; [`ResponseBody::User`] with the new id.
    CreateUser {
        #[serde(with = "serde_bytes")]
        username: Vec<u8>,
        #[serde(with = "serde_bytes")]
        password: Vec<u8>,
    },
    /// Create many accounts from ready hashes in one transaction;
    /// [`ResponseBody::Imported`], one result per account in order.
    ImportUsers {
        users: Vec<ImportUser>,
    },
    /// Replace a password; [`ResponseBody::Done`]. Increments the user's
    /// credential epoch (revoking every resume token) and its version (so
    /// an [`Event::Invalidate`] is pushed).
    SetPassword {
        user: UserId,
        #[serde(with = "serde_bytes")]
        password: Vec<u8>,
    },
    /// Disable (or enable again) an account; [`ResponseBody::Done`]. When
    /// the flag changes, the credential epoch and the version increase as
    /// for [`RequestBody::SetPassword`]; otherwise nothing changes.
    SetDisabled {
        user: UserId,
        disabled: bool,
    },
    /// The id of a username; [`ResponseBody::User`].
    LookupUser {
        #[serde(with = "serde_bytes")]
        username: Vec<u8>,
    },
    /// Account facts (never the hash); [`ResponseBody::Account`].
    GetAccount {
        user: UserId,
    },
    /// [`ResponseBody::Profile`].
    GetProfile {
        user: UserId,
    },
    /// [`ResponseBody::Profiles`]; unknown users are left out.
    GetProfiles {
        users: Vec<UserId>,
    },
    /// What a client reads after login: own profile, friend groups with
    /// every friend's profile, pending requests; [`ResponseBody::LoginView`].
    LoginView {
        user: UserId,
    },
    /// Change the fields given (`None`: unchanged); [`ResponseBody::Version`].
    SetProfile {
        user: UserId,
        #[serde(with = "serde_bytes")]
        nickname: Option<Vec<u8>>,
        #[serde(with = "serde_bytes")]
        signature: Option<Vec<u8>>,
    },
    /// Store an image and make it `user`'s avatar; [`ResponseBody::Avatar`].
    SetAvatar {
        user: UserId,
        #[serde(with = "serde_bytes")]
        image: Vec<u8>,
    },
    /// Bytes `offset..offset + len` of an avatar (`len` is clamped to
    /// [`AVATAR_RANGE_BYTES_MAX`]); [`ResponseBody::AvatarBytes`].
    AvatarRange {
        hash: AvatarHash,
        offset: u32,
        len: u32,
    },
    /// `from` asks `to` to be friends; `from` will file `to` under `group`.
    /// [`ResponseBody::Done`].
    FriendRequest {
        from: UserId,
        to: UserId,
        #[serde(with = "serde_bytes")]
        group: Vec<u8>,
    },
    /// `user` accepts the request of `from`, filing `from` under `group`.
    FriendAccept {
        user: UserId,
        from: UserId,
        #[serde(with = "serde_bytes")]
        group: Vec<u8>,
    },
    /// `user` rejects the request of `from`.
    FriendReject {
        user: UserId,
        from: UserId,
    },
    /// End a friendship, on both sides.
    FriendRemove {
        user: UserId,
        friend: UserId,
    },
    /// Move `friend` into `user`'s group `group` (created if missing).
    FriendMove {
        user: UserId,
        friend: UserId,
        #[serde(with = "serde_bytes")]
        group: Vec<u8>,
    },
    /// Make every pair friends at once (both sides filed under `group`):
    /// bulk loading for tests and benchmarks. [`ResponseBody::Done`].
    ImportFriendships {
        #[serde(with = "serde_bytes")]
        group: Vec<u8>,
        pairs: Vec<(UserId, UserId)>,
    },
    /// Push [`Event`]s to this connection from now on. The first event
    /// after this is always [`Event::CacheReset`].
    Subscribe,
    /// The service's argon2id parameters; [`ResponseBody::Info`].
    Info,
    Ping,
    /// `user` blocks `blocked`: friend requests from `blocked` to `user` are
    /// refused; gateways read block lists ([`RequestBody::GetRelations`])
    /// to decide who may write to whom.
    /// [`ResponseBody::Version`] (`user`'s); blocking someone already
    /// blocked changes nothing.
    Block {
        user: UserId,
        blocked: UserId,
    },
    /// `user` no longer blocks `blocked`; [`ResponseBody::Version`]
    /// (`user`'s). Unblocking someone not blocked changes nothing.
    Unblock {
        user: UserId,
        blocked: UserId,
    },
    /// What a gateway needs to decide whether one user may write to another
    /// and whether a resume token is still valid;
    /// [`ResponseBody::Relations`], unknown users left out. At most
    /// [`GET_PROFILES_MAX`] users.
    GetRelations {
        users: Vec<UserId>,
    },
    /// A gateway is about to accept a login of `user` whose credentials it
    /// checked: record `login_ns` as the user's newest login if it is
    /// greater than the last one recorded (durably, before answering), and
    /// answer [`ResponseBody::LoginClaimed`] with the user's relations;
    /// otherwise record nothing and answer [`ResponseBody::StaleLogin`].
    /// One `login_ns` is claimed at most once, whichever gateway asks.
    ClaimLogin {
        user: UserId,
        login_ns: u64,
    },
    // ---- chat groups (`crate::groups`; docs/PROTOCOL.md §5.3 "Groups") ----
    /// Create a group owned by `owner` (its only member, cursor 0);
    /// [`ResponseBody::Group`].
    GroupCreate {
        owner: UserId,
        #[serde(with = "serde_bytes")]
        name: Vec<u8>,
        #[serde(with = "serde_bytes")]
        topic: Vec<u8>,
    },
    /// Member `by` invites `invitee`, who answers with
    /// [`RequestBody::GroupAnswerInvite`]; [`ResponseBody::Done`].
    GroupInvite {
        by: UserId,
        group: GroupId,
        invitee: UserId,
    },
    /// `user` accepts (becoming a member whose cursor is `read_seq`: the
    /// group mailbox's last seq as the caller read it) or declines an
    /// invitation; [`ResponseBody::Done`].
    GroupAnswerInvite {
        user: UserId,
        group: GroupId,
        accept: bool,
        read_seq: u64,
    },
    /// `user` asks to join; an owner or admin answers with
    /// [`RequestBody::GroupAnswerJoin`]. [`ResponseBody::Done`].
    GroupJoinRequest {
        user: UserId,
        group: GroupId,
    },
    /// Owner or admin `by` approves (cursor `read_seq`, as for an
    /// invitation) or refuses `user`'s join request; [`ResponseBody::Done`].
    GroupAnswerJoin {
        by: UserId,
        group: GroupId,
        user: UserId,
        accept: bool,
        read_seq: u64,
    },
    /// `user` leaves (the owner cannot: it transfers ownership or
    /// dissolves first); [`ResponseBody::Done`].
    GroupLeave {
        user: UserId,
        group: GroupId,
    },
    /// `by` removes `user` (the owner removes anyone else, an admin only
    /// members); [`ResponseBody::Done`].
    GroupRemove {
        by: UserId,
        group: GroupId,
        user: UserId,
    },
    /// The owner makes `user` an admin or a member; [`ResponseBody::Done`].
    GroupSetRole {
        by: UserId,
        group: GroupId,
        user: UserId,
        role: GroupRole,
    },
    /// The owner hands the group to member `to` and becomes an admin;
    /// [`ResponseBody::Done`].
    GroupTransfer {
        by: UserId,
        group: GroupId,
        to: UserId,
    },
    /// Owner or admin `by` changes the fields given; [`ResponseBody::Done`].
    GroupRename {
        by: UserId,
        group: GroupId,
        #[serde(with = "serde_bytes")]
        name: Option<Vec<u8>>,
        #[serde(with = "serde_bytes")]
        topic: Option<Vec<u8>>,
    },
    /// The owner ends the group: every member and invitation is gone and
    /// the id is never used again; [`ResponseBody::Done`].
    GroupDissolve {
        by: UserId,
        group: GroupId,
    },
    /// [`ResponseBody::Group`].
    GetGroup {
        group: GroupId,
    },
    /// `user`'s groups and pending invitations; [`ResponseBody::UserGroups`].
    GetUserGroups {
        user: UserId,
    },
    /// Member `user` read the group up to `up_to_seq`: its cursor becomes
    /// the larger of the two (never moves back). No version change, no
    /// event. [`ResponseBody::GroupRead`].
    GroupRead {
        user: UserId,
        group: GroupId,
        up_to_seq: u64,
    },
    /// This process's place in its profile group; [`ResponseBody::Stats`].
    /// Answered at once, without a read index (a replica cut off from its
    /// leader still says so).
    Stats,
    /// [`RequestBody::ClaimLogin`] that may be sent again: the claim is
    /// recorded with `claim` (a random number the sender chose for this
    /// one login), and the same `login_ns` with the same `claim` is
    /// answered [`ResponseBody::LoginClaimed`] again, changing nothing. So
    /// a gateway whose claim got no answer from one replica (paused, cut
    /// off) sends it to the next: whether the first was done or not, one
    /// login is claimed once. Any other claim of that `login_ns` (a
    /// replayed handshake, at any gateway, gets a new `claim`) is still
    /// [`ResponseBody::StaleLogin`].
    ClaimLoginOnce {
        user: UserId,
        login_ns: u64,
        claim: u64,
    },
}

/// A user's public profile.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Profile {
    pub user: UserId,
    pub username: String,
    pub nickname: String,
    pub signature: String,
    pub avatar: Option<AvatarHash>,
    /// Increases on every change of the profile, the friend list, the
    /// pending requests, the block list or the credentials.
    pub version: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Account {
    pub user: UserId,
    pub username: String,
    pub disabled: bool,
    /// Milliseconds since the Unix epoch.
    pub created_ms: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FriendGroup {
    pub name: String,
    /// Friends in this group, with their profiles.
    pub friends: Vec<Profile>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PendingRequest {
    pub from: UserId,
    pub username: String,
}

/// One user's relations and credential state, as a gateway caches them
/// (dropped on [`Event::Invalidate`] for the user).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Relations {
    pub user: UserId,
    pub disabled: bool,
    /// Increases on every password change and every change of `disabled`:
    /// a resume token carrying an older epoch is no longer valid.
    pub credential_epoch: u32,
    /// The user's version (the same number as [`Profile::version`]).
    pub version: u64,
    /// Every friend of the user, sorted ascending.
    pub friends: Vec<UserId>,
    /// Users this user blocks, sorted ascending.
    pub blocked: Vec<UserId>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LoginView {
    pub profile: Profile,
    pub groups: Vec<FriendGroup>,
    /// Friend requests waiting for this user's answer.
    pub requests: Vec<PendingRequest>,
}

/// argon2id parameters of the service.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceInfo {
    pub argon2_m_kib: u32,
    pub argon2_t: u32,
    pub argon2_p: u32,
}

/// Typed failures of one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ErrorCode {
    /// Unknown username or wrong password (deliberately one code).
    WrongCredentials,
    /// The password is right but the account is disabled.
    AccountDisabled,
    /// No such user (or avatar, or friend request).
    NotFound,
    UsernameTaken,
    /// A text field is longer than its limit.
    FieldTooLong,
    /// A text field is not UTF-8.
    InvalidUtf8,
    /// A field breaks a rule other than length (empty, bad characters,
    /// weak or malformed password hash, a user befriending or blocking
    /// itself, ...).
    InvalidField,
    /// A per-user limit (friends, groups, pending requests, blocks) is
    /// reached.
    LimitReached,
    /// Not a PNG, JPEG or WebP image, or dimensions over the limit.
    BadImage,
    /// An image over the size limit.
    ImageTooLarge,
    AlreadyFriends,
    NotFriends,
    /// The password pool's queue (or the writer's) is full: retry later.
    Busy,
    /// The request is outside the protocol's limits.
    BadRequest,
    /// I/O or LMDB failure (map full, ...): nothing was stored.
    Storage,
    /// The user is not a member of the group (or not invited, or has not
    /// asked to join).
    NotMember,
    /// The user's role does not allow this (or the owner tried to leave).
    NotPermitted,
    /// Already a member (or already invited, or already asked to join).
    AlreadyMember,
    /// A replicated profile group has no leader that confirmed or committed
    /// the request within its deadline (a replica cut off from its
    /// majority, an election under way). A write may still be committed
    /// later; retry, at another replica if this one stays unavailable.
    Unavailable,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProfileError {
    pub code: ErrorCode,
    pub message: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Response {
    pub id: u64,
    pub body: ResponseBody,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ResponseBody {
    User(UserId),
    Imported(Vec<Result<UserId, ProfileError>>),
    Done,
    Account(Account),
    Profile(Profile),
    Profiles(Vec<Profile>),
    LoginView(LoginView),
    /// The user's version after the change.
    Version(u64),
    Avatar {
        hash: AvatarHash,
        version: u64,
    },
    AvatarBytes {
        /// The whole image's size.
        total_len: u32,
        #[serde(with = "serde_bytes")]
        bytes: Vec<u8>,
    },
    Info(ServiceInfo),
    Subscribed,
    Pong,
    Error(ProfileError),
    /// Answer to [`RequestBody::GetRelations`], in the order asked.
    Relations(Vec<Relations>),
    /// Answer to [`RequestBody::ClaimLogin`]: the login was newer and is
    /// recorded; the user's relations as of then.
    LoginClaimed(Relations),
    /// Answer to [`RequestBody::ClaimLogin`]: not newer than `last_ns`,
    /// the user's last recorded login; nothing changed.
    StaleLogin {
        last_ns: u64,
    },
    /// Answer to [`RequestBody::GroupCreate`] and [`RequestBody::GetGroup`].
    Group(GroupInfo),
    /// Answer to [`RequestBody::GetUserGroups`].
    UserGroups(UserGroups),
    /// Answer to [`RequestBody::GroupRead`]: the member's cursor now, and
    /// the lowest cursor of any member (what every member has read: the
    /// group's mailbox may delete up to it).
    GroupRead {
        read_seq: u64,
        min_read_seq: u64,
    },
    /// A write sent to a replica of a profile group that does not lead
    /// it: nothing was done; send it to `leader` (the leader's client
    /// address, if this replica knows one).
    NotLeader {
        leader: Option<String>,
    },
    /// Answer to [`RequestBody::Stats`].
    Stats(ProfileStats),
}

/// A profile process's place in its group.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProfileStats {
    /// `Standalone` for a single process, else its Raft role.
    pub role: crate::shard::ShardRole,
    /// The leader's client address, if known (a replica).
    pub leader: Option<String>,
    /// Its Raft state (a replica), as a shard replica reports it.
    pub raft: Option<crate::shard::RaftStats>,
}

/// Pushed to subscribed connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Event {
    /// `user`'s profile, friend list, block list or credentials changed;
    /// its version is now `version`.
    Invalidate { user: UserId, version: u64 },
    /// Drop every cached entry: sent first on every subscription, and when
    /// events had to be dropped (a subscriber that fell behind).
    CacheReset,
    /// `group`'s name, topic, members, roles or join requests changed (or
    /// it was dissolved); its version is now `version`. Cursor moves are
    /// not pushed.
    GroupChanged { group: GroupId, version: u64 },
}

/// Every frame the service sends.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ServerMessage {
    Response(Response),
    Event(Event),
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frame::{decode, encode, Decoded};
    use bytes::BytesMut;
    use proptest::prelude::*;

    #[test]
    fn invalid_utf8_in_a_request_still_decodes() {
        let req = Request {
            id: 3,
            body: RequestBody::SetProfile {
                user: 1,
                nickname: Some(vec![0xff, 0xfe]),
                signature: None,
            },
        };
        let mut out = Vec::new();
        encode(&req, 1024, &mut out).unwrap();
        let mut buf = BytesMut::from(&out[..]);
        assert_eq!(decode::<Request>(&mut buf, 1024), Ok(Decoded::Frame(req)));
    }

    #[test]
    fn server_message_layout_is_as_documented() {
        let msg = ServerMessage::Event(Event::Invalidate {
            user: 5,
            version: 300,
        });
        // Event = variant 1, Invalidate = variant 0, varints 5 and 300.
        assert_eq!(postcard::to_stdvec(&msg).unwrap(), [1, 0, 5, 0xac, 0x02]);
        let pong = ServerMessage::Response(Response {
            id: 7,
            body: ResponseBody::Pong,
        });
        assert_eq!(postcard::to_stdvec(&pong).unwrap(), [0, 7, 12]);
        let reset = ServerMessage::Event(Event::CacheReset);
        assert_eq!(postcard::to_stdvec(&reset).unwrap(), [1, 1]);
        let ping = Request {
            id: 1,
            body: RequestBody::Ping,
        };
        assert_eq!(postcard::to_stdvec(&ping).unwrap(), [1, 21]);
        let get = Request {
            id: 2,
            body: RequestBody::GetProfile { user: 5 },
        };
        assert_eq!(postcard::to_stdvec(&get).unwrap(), [2, 7, 5]);
        let range = RequestBody::AvatarRange {
            hash: [9; 32],
            offset: 1,
            len: 2,
        };
        let bytes = postcard::to_stdvec(&range).unwrap();
        assert_eq!(
            (bytes.len(), bytes[0], bytes[1], &bytes[33..]),
            (35, 12, 9, &[1u8, 2][..])
        );
    }

    #[test]
    fn block_and_relations_layout_is_as_documented() {
        let block = Request {
            id: 3,
            body: RequestBody::Block {
                user: 5,
                blocked: 7,
            },
        };
        // Block = variant 22, Unblock = 23, GetRelations = 24.
        assert_eq!(postcard::to_stdvec(&block).unwrap(), [3, 22, 5, 7]);
        let unblock = RequestBody::Unblock {
            user: 5,
            blocked: 7,
        };
        assert_eq!(postcard::to_stdvec(&unblock).unwrap(), [23, 5, 7]);
        let get = Request {
            id: 4,
            body: RequestBody::GetRelations {
                users: vec![5, 300],
            },
        };
        let mut frame = Vec::new();
        encode(&get, 1024, &mut frame).unwrap();
        assert_eq!(frame, [6, 0, 0, 0, 4, 24, 2, 5, 0xac, 0x02]);
        // Response = 0, id 4, Relations = variant 14, one entry: user 5,
        // enabled, epoch 2, version 300, friends [7, 9], blocked [300].
        let answer = ServerMessage::Response(Response {
            id: 4,
            body: ResponseBody::Relations(vec![Relations {
                user: 5,
                disabled: false,
                credential_epoch: 2,
                version: 300,
                friends: vec![7, 9],
                blocked: vec![300],
            }]),
        });
        let mut frame = Vec::new();
        encode(&answer, 1024, &mut frame).unwrap();
        assert_eq!(
            frame,
            [15, 0, 0, 0, 0, 4, 14, 1, 5, 0, 2, 0xac, 0x02, 2, 7, 9, 1, 0xac, 0x02]
        );
        let mut buf = BytesMut::from(&frame[..]);
        assert_eq!(
            decode::<ServerMessage>(&mut buf, 1024),
            Ok(Decoded::Frame(answer))
        );
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            use crate::frame::decode_keeps_buffer_consistent as consistent;
            prop_assert!(consistent::<Request>(&bytes));
            prop_assert!(consistent::<ServerMessage>(&bytes));
        }

        #[test]
        fn arbitrary_bodies_never_panic(body in proptest::collection::vec(any::<u8>(), 1..256)) {
            let _ = crate::frame::decode_body::<Request>(&body);
            let _ = crate::frame::decode_body::<ServerMessage>(&body);
        }

        /// Random bytes rarely reach the newest variants' contents; a valid
        /// relations answer or request, damaged, does.
        #[test]
        fn damaged_relations_never_panic(
            users in proptest::collection::vec(any::<u64>(), 0..4),
            epoch in any::<u32>(),
            cut in any::<prop::sample::Index>(),
            flip in any::<prop::sample::Index>(),
            mask in 1u8..,
        ) {
            let relations = users.iter().map(|&u| Relations {
                user: u,
                disabled: u % 2 == 0,
                credential_epoch: epoch,
                version: u.rotate_left(7),
                friends: users.clone(),
                blocked: vec![u],
            }).collect();
            let answer = ServerMessage::Response(Response { id: 1, body: ResponseBody::Relations(relations) });
            let request = Request { id: 2, body: RequestBody::GetRelations { users } };
            for mut bytes in [postcard::to_stdvec(&answer).unwrap(), postcard::to_stdvec(&request).unwrap()] {
                let at = flip.index(bytes.len());
                bytes[at] ^= mask;
                bytes.truncate(cut.index(bytes.len()) + 1);
                let _ = crate::frame::decode_body::<Request>(&bytes);
                let _ = crate::frame::decode_body::<ServerMessage>(&bytes);
            }
        }
    }
}
