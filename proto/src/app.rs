//! The application protocol carried inside a UDP session: what a client and
//! its gateway say to each other. Every value is one postcard-encoded
//! session message (at most 64 KiB); the login request and its answer ride
//! in the handshake (at most 1,113 and 1,136 bytes).
//!
//! Requests carry an `id` chosen by the client; the gateway answers each
//! with exactly one [`GatewayMessage::Reply`] of the same id. Everything
//! else the gateway sends is pushed: messages, friends' status, profile
//! changes, kicks. Byte layout: `docs/PROTOCOL.md` section 6.

use crate::{
    groups::{GroupInfo, GroupInvite, GroupRole},
    presence::Status,
    profile::{AvatarHash, LoginView, Profile},
};
use serde::{Deserialize, Serialize};

/// Bumped on any incompatible change; sent in [`Login`]. Version 2: the
/// mailbox is the single source of truth (every message is stored, then
/// pushed with its seq; `Reply::Sent` carries the seq), blocks, typed
/// permission errors, `MailboxChanged`. Version 3: [`Login::login_ns`]
/// (a login is accepted only with a newer one than the user's last) and
/// [`LoginAnswer::Stale`].
pub const APP_PROTOCOL_VERSION: u16 = 3;
/// Largest message body a client may send.
pub const BODY_BYTES_MAX: usize = 16 * 1024;
/// Largest page of stored messages one fetch returns (bytes of bodies).
pub const FETCH_BYTES_MAX: u32 = 48 * 1024;
/// Most stored messages one fetch returns.
pub const FETCH_COUNT_MAX: u32 = 200;
/// Most users in one `Profiles` call.
pub const PROFILES_MAX: usize = 200;

/// The handshake payload.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Login {
    pub version: u16,
    pub method: LoginMethod,
    /// The login's freshness: nanoseconds since the Unix epoch by the
    /// client's clock, and greater than every `login_ns` the client used
    /// before. The service accepts a login only if this is greater than the
    /// last one it accepted for the user, so a captured handshake replayed
    /// later is refused whatever its age ([`LoginAnswer::Stale`]).
    pub login_ns: u64,
}

impl Login {
    /// A login of this protocol version.
    pub fn new(method: LoginMethod, login_ns: u64) -> Login {
        Login {
            version: APP_PROTOCOL_VERSION,
            method,
            login_ns,
        }
    }

    /// The protocol version a login payload claims, read from its first
    /// field alone, so a client of another version is told which one the
    /// gateway speaks even when the rest does not decode.
    pub fn version_of(payload: &[u8]) -> Option<u16> {
        postcard::take_from_bytes::<u16>(payload)
            .ok()
            .map(|(v, _)| v)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum LoginMethod {
    Password {
        username: String,
        password: String,
    },
    /// A token from an earlier [`LoginAccepted`].
    Resume {
        #[serde(with = "serde_bytes")]
        token: Vec<u8>,
    },
}

/// The handshake answer payload.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum LoginAnswer {
    Accepted(LoginAccepted),
    Refused {
        code: LoginError,
        message: String,
    },
    /// `login_ns` was not greater than `last_ns`, the last one accepted
    /// for this user (a replayed handshake, or a device whose clock is
    /// behind another's). Nothing happened. A client that built this login
    /// itself logs in again with a `login_ns` above `last_ns`; a replay's
    /// sender cannot build one.
    Stale {
        last_ns: u64,
    },
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LoginAccepted {
    pub user: u64,
    /// Log in with this next time instead of the password.
    #[serde(with = "serde_bytes")]
    pub resume_token: Vec<u8>,
    /// Messages waiting in the offline mailbox, and the highest sequence
    /// number among them (0: none).
    pub mailbox_count: u64,
    pub mailbox_high_seq: u64,
    /// Send something (a heartbeat) at least this often.
    pub heartbeat_s: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum LoginError {
    /// Unknown user or wrong password (deliberately one code).
    WrongCredentials,
    AccountDisabled,
    /// The resume token does not verify or has expired: log in with the
    /// password.
    BadToken,
    /// Too many logins right now: retry later.
    Busy,
    /// A service behind the gateway is unreachable: retry later.
    Unavailable,
    /// [`Login::version`] or the payload is not understood.
    BadRequest,
}

/// A request from the client.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClientMessage {
    pub id: u32,
    pub call: Call,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Call {
    /// Send `body` to `to`. `msg_id` is chosen by the sender, unique per
    /// message, and kept across retries: the gateway and the recipient
    /// drop a second copy. Answered with [`Reply::Sent`] once the message
    /// is durable in `to`'s mailbox (docs/PROTOCOL.md §6.4).
    Send {
        to: u64,
        msg_id: u128,
        #[serde(with = "serde_bytes")]
        body: Vec<u8>,
    },
    /// Stored messages with `seq > after_seq`, at most `max_count` and
    /// about `max_bytes` (one message more if the first alone is larger).
    Fetch {
        after_seq: u64,
        max_count: u32,
        max_bytes: u32,
    },
    /// Delete stored messages up to and including `up_to_seq`.
    Ack {
        up_to_seq: u64,
    },
    /// Own profile, friend groups with friends' profiles, pending friend
    /// requests, and which friends are online; friends' status changes are
    /// pushed from then on.
    LoginView,
    Profiles {
        users: Vec<u64>,
    },
    AvatarRange {
        hash: AvatarHash,
        offset: u32,
        len: u32,
    },
    SetProfile {
        nickname: Option<String>,
        signature: Option<String>,
    },
    SetStatus(Status),
    FriendRequest {
        to_username: String,
        group: String,
    },
    FriendAccept {
        from: u64,
        group: String,
    },
    FriendReject {
        from: u64,
    },
    FriendRemove {
        friend: u64,
    },
    /// End the session; presence is told at once.
    Logout,
    /// Refuse messages (and friend requests) from `user` from now on.
    Block {
        user: u64,
    },
    Unblock {
        user: u64,
    },
    // ---- chat groups (docs/PROTOCOL.md §6.7) ----
    /// Send `body` to every member of `group` (the sender must be one). The
    /// message is stored once, in the group's mailbox; answered
    /// [`Reply::Sent`] with its group seq once durable there; members
    /// online get [`GatewayMessage::GroupDeliver`], the others fetch.
    GroupSend {
        group: u64,
        msg_id: u128,
        #[serde(with = "serde_bytes")]
        body: Vec<u8>,
        /// The client sent this message before (to this gateway or
        /// another) and has no answer: it is stored only if the group's
        /// mailbox does not hold it already.
        resend: bool,
    },
    /// The group's stored messages with `seq > after_seq`, as
    /// [`Call::Fetch`] pages a mailbox; [`Reply::GroupMailbox`].
    GroupFetch {
        group: u64,
        after_seq: u64,
        max_count: u32,
        max_bytes: u32,
    },
    /// Move this member's read cursor to `up_to_seq` (never back);
    /// [`Reply::Done`].
    GroupAck {
        group: u64,
        up_to_seq: u64,
    },
    /// This user's groups with unread counts, and invitations waiting;
    /// [`Reply::Groups`].
    Groups,
    /// Create a group with this user as owner; [`Reply::Group`].
    GroupCreate {
        name: String,
        topic: String,
    },
    /// Invite a user (by username) into a group this user is in;
    /// [`Reply::Done`].
    GroupInvite {
        group: u64,
        username: String,
    },
    /// Accept or decline an invitation; [`Reply::Done`].
    GroupAnswerInvite {
        group: u64,
        accept: bool,
    },
    /// Ask to join; an owner or admin answers; [`Reply::Done`].
    GroupJoin {
        group: u64,
    },
    /// An owner or admin accepts or refuses `user`'s join request;
    /// [`Reply::Done`].
    GroupAnswerJoin {
        group: u64,
        user: u64,
        accept: bool,
    },
    /// [`Reply::Done`].
    GroupLeave {
        group: u64,
    },
    /// [`Reply::Done`].
    GroupRemove {
        group: u64,
        user: u64,
    },
    /// The owner makes `user` an admin or a member; [`Reply::Done`].
    GroupSetRole {
        group: u64,
        user: u64,
        role: GroupRole,
    },
    /// The owner hands the group to member `to`; [`Reply::Done`].
    GroupTransfer {
        group: u64,
        to: u64,
    },
    /// [`Reply::Done`].
    GroupRename {
        group: u64,
        name: Option<String>,
        topic: Option<String>,
    },
    /// [`Reply::Done`].
    GroupDissolve {
        group: u64,
    },
    /// The group, its members and join requests (members only);
    /// [`Reply::Group`].
    GroupInfo {
        group: u64,
    },
}

/// Everything the gateway sends inside a session.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum GatewayMessage {
    Reply {
        id: u32,
        result: Result<Reply, AppError>,
    },
    /// A message for this user, pushed while online.
    Deliver(Delivery),
    /// A friend came online, changed status, or went offline (`None`).
    FriendStatus { user: u64, status: Option<Status> },
    /// A profile this client has seen changed (read it again).
    ProfileChanged { user: u64, version: u64 },
    /// The user logged in elsewhere; this session is over.
    Kicked,
    /// Messages up to `high_seq` wait in the mailbox and some of them could
    /// not be pushed (the session's send queue was full): fetch after the
    /// last seq shown.
    MailboxChanged { high_seq: u64 },
    /// A message of a group this user is in, pushed while online;
    /// `delivery.seq` is its seq in the group's mailbox.
    GroupDeliver { group: u64, delivery: Delivery },
    /// The group's name, topic, members, roles or join requests changed,
    /// or it was dissolved: read it again (`GroupInfo`, `Groups`).
    GroupChanged { group: u64, version: u64 },
    /// Group messages up to `high_seq` could not be pushed (the session's
    /// send queue was full): fetch the group after the last seq shown.
    GroupMailboxChanged { group: u64, high_seq: u64 },
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Delivery {
    pub from: u64,
    pub msg_id: u128,
    /// The gateway's clock when it accepted the message (ms since the Unix
    /// epoch).
    pub sent_at_ms: u64,
    #[serde(with = "serde_bytes")]
    pub body: Vec<u8>,
    /// The message's sequence number in the recipient's mailbox: pushed
    /// and fetched copies of one message carry the same seq.
    pub seq: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Reply {
    Sent(SendOutcome),
    Mailbox {
        messages: Vec<Delivery>,
        /// The seq of the page's last record (0 for an empty page). A record
        /// the gateway cannot decode is left out of `messages` but counted
        /// here, so a client moves past it.
        last_seq: u64,
        /// Whether more stored messages follow the last one returned.
        more: bool,
    },
    Acked {
        removed: u64,
    },
    LoginView {
        view: LoginView,
        /// Friends online now, with their status.
        online: Vec<(u64, Status)>,
    },
    Profiles(Vec<Profile>),
    AvatarBytes {
        total_len: u32,
        #[serde(with = "serde_bytes")]
        bytes: Vec<u8>,
    },
    Done,
    /// A page of a group's mailbox ([`Call::GroupFetch`]).
    GroupMailbox {
        messages: Vec<Delivery>,
        /// As in [`Reply::Mailbox`].
        last_seq: u64,
        more: bool,
        /// Seqs after `after_seq` that no longer exist (past the group's
        /// retention, or not readable): the client skips them and tells
        /// its user how many were missed, never a silent gap.
        dropped: u64,
    },
    Groups {
        groups: Vec<GroupSummary>,
        invites: Vec<GroupInvite>,
    },
    Group(GroupInfo),
}

/// One group of the user, with where its mailbox stands.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GroupSummary {
    pub group: u64,
    pub name: String,
    pub role: GroupRole,
    pub members: u32,
    /// The user's cursor: every seq up to it was read.
    pub read_seq: u64,
    /// The highest seq stored in the group's mailbox (0 when the shard did
    /// not answer): `high_seq - read_seq` messages are unread.
    pub high_seq: u64,
}

/// The answer to a send: the message is durable in the recipient's mailbox
/// (per its shard's fsync policy) at `seq`; a recipient online gets it
/// pushed, one offline fetches it after login.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct SendOutcome {
    pub seq: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AppError {
    pub code: AppErrorCode,
    pub message: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum AppErrorCode {
    /// The recipient's mailbox is full.
    MailboxFull,
    /// Over [`BODY_BYTES_MAX`] (or the shard's message limit).
    MessageTooLarge,
    UnknownUser,
    /// Over the per-user message rate: retry later.
    RateLimited,
    /// A service behind the gateway failed or is unreachable: retry.
    Unavailable,
    /// Outside the protocol's limits or not understood.
    BadRequest,
    /// Refused by the profile service (the message says why).
    Refused,
    /// The sender may not write to this recipient: not friends (while the
    /// gateway's `allow_strangers` is off), or blocked by the recipient.
    /// One code for both on purpose: it reveals nothing more.
    NotAllowed,
    /// The recipient's account is disabled.
    RecipientDisabled,
}

impl AppErrorCode {
    /// Whether the same request may succeed later unchanged: a client
    /// re-sends it (with the same `msg_id`, for a send) after a delay.
    pub fn is_retryable(self) -> bool {
        matches!(self, AppErrorCode::RateLimited | AppErrorCode::Unavailable)
    }
}

/// What the gateway stores in a shard record's payload for an offline
/// message (the record's own `msg_id` is the message id).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredEnvelope {
    pub from: u64,
    pub sent_at_ms: u64,
    #[serde(with = "serde_bytes")]
    pub body: Vec<u8>,
}

/// Encode any protocol value (postcard).
pub fn encode<T: Serialize>(value: &T) -> Vec<u8> {
    postcard::to_stdvec(value).expect("protocol values always serialize")
}

/// Decode exactly one value: trailing bytes are an error.
pub fn decode<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> Result<T, DecodeError> {
    let (value, rest) = postcard::take_from_bytes(bytes).map_err(|e| DecodeError(e.to_string()))?;
    if !rest.is_empty() {
        return Err(DecodeError(format!("{} trailing bytes", rest.len())));
    }
    Ok(value)
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("malformed application message: {0}")]
pub struct DecodeError(pub String);

#[cfg(test)]
mod tests {
    use super::*;
    use crate::session::wire::{INIT_PAYLOAD_MAX, RESPONSE_PAYLOAD_MAX};
    use proptest::prelude::*;

    #[test]
    fn logins_and_answers_fit_the_handshake() {
        let method = LoginMethod::Password {
            username: "u".repeat(64),
            password: "p".repeat(crate::profile::PASSWORD_BYTES_MAX),
        };
        let login = Login::new(method, u64::MAX);
        assert!(encode(&login).len() <= INIT_PAYLOAD_MAX);
        let stale = LoginAnswer::Stale { last_ns: u64::MAX };
        assert!(encode(&stale).len() <= RESPONSE_PAYLOAD_MAX);
        let answer = LoginAnswer::Accepted(LoginAccepted {
            user: u64::MAX,
            resume_token: vec![0; 72],
            mailbox_count: u64::MAX,
            mailbox_high_seq: u64::MAX,
            heartbeat_s: 30,
        });
        assert!(encode(&answer).len() <= RESPONSE_PAYLOAD_MAX);
    }

    #[test]
    fn values_round_trip_and_trailing_bytes_are_refused() {
        let m = ClientMessage {
            id: 7,
            call: Call::Send {
                to: 2,
                msg_id: 99,
                body: b"hi".to_vec(),
            },
        };
        let mut bytes = encode(&m);
        assert_eq!(decode::<ClientMessage>(&bytes), Ok(m));
        bytes.push(0);
        assert!(decode::<ClientMessage>(&bytes).is_err());
    }

    /// Pinned bytes, so docs/PROTOCOL.md section 6 stays true.
    #[test]
    fn encodings_match_the_documented_layout() {
        let ack = ClientMessage {
            id: 1,
            call: Call::Ack { up_to_seq: 5 },
        };
        assert_eq!(encode(&ack), [0x01, 0x02, 0x05]);
        let sent = GatewayMessage::Reply {
            id: 1,
            result: Ok(Reply::Sent(SendOutcome { seq: 300 })),
        };
        assert_eq!(encode(&sent), [0x00, 0x01, 0x00, 0x00, 0xac, 0x02]);
        let err = GatewayMessage::Reply {
            id: 2,
            result: Err(AppError {
                code: AppErrorCode::RateLimited,
                message: "x".into(),
            }),
        };
        assert_eq!(encode(&err), [0x00, 0x02, 0x01, 0x03, 0x01, b'x']);
        assert_eq!(encode(&GatewayMessage::Kicked), [0x04]);
        let login = Login::new(LoginMethod::Resume { token: vec![9] }, 300);
        assert_eq!(encode(&login), [0x03, 0x01, 0x01, 0x09, 0xac, 0x02]);
        assert_eq!(Login::version_of(&encode(&login)), Some(3));
        assert_eq!(Login::version_of(&[0x02, 0xff]), Some(2), "the rest unread");
        assert_eq!(Login::version_of(&[]), None);
        let stale = LoginAnswer::Stale { last_ns: 300 };
        assert_eq!(encode(&stale), [0x02, 0xac, 0x02]);
        let push = GatewayMessage::Deliver(Delivery {
            from: 3,
            msg_id: 4,
            sent_at_ms: 5,
            body: b"hi".to_vec(),
            seq: 300,
        });
        assert_eq!(encode(&push), [0x01, 3, 4, 5, 2, b'h', b'i', 0xac, 0x02]);
        let changed = GatewayMessage::MailboxChanged { high_seq: 7 };
        assert_eq!(encode(&changed), [0x05, 0x07]);
        let block = ClientMessage {
            id: 9,
            call: Call::Block { user: 3 },
        };
        assert_eq!(encode(&block), [0x09, 0x0d, 0x03]);
    }

    /// Request ids are u32 varints in both directions (section 6.2).
    #[test]
    fn request_ids_are_varints() {
        let fetch = ClientMessage {
            id: 300,
            call: Call::Fetch {
                after_seq: 0,
                max_count: 200,
                max_bytes: 49_152,
            },
        };
        assert_eq!(
            encode(&fetch),
            [0xac, 0x02, 0x01, 0x00, 0xc8, 0x01, 0x80, 0x80, 0x03]
        );
        let logout = ClientMessage {
            id: u32::MAX,
            call: Call::Logout,
        };
        assert_eq!(encode(&logout), [0xff, 0xff, 0xff, 0xff, 0x0f, 0x0c]);
        let done = GatewayMessage::Reply {
            id: 300,
            result: Ok(Reply::Done),
        };
        assert_eq!(encode(&done), [0x00, 0xac, 0x02, 0x00, 0x06]);
    }

    proptest! {
        #[test]
        fn decoders_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = decode::<Login>(&bytes);
            let _ = decode::<LoginAnswer>(&bytes);
            let _ = decode::<ClientMessage>(&bytes);
            let _ = decode::<GatewayMessage>(&bytes);
            let _ = decode::<StoredEnvelope>(&bytes);
        }
    }
}
