//! The presence protocol: gateways (and operators) talk to the presence
//! server over one long TCP connection each.
//!
//! Upstream frames are [`Request`]s carrying a caller-chosen `id`; downstream
//! frames are [`ServerFrame`]s: either the [`Response`] echoing that `id`, or
//! an [`Event`] the server pushes on its own (a watched user changed, a
//! session was replaced by a login elsewhere). One connection pipelines many
//! requests; the server answers them in the order it read them.
//!
//! A gateway must [`RequestBody::Register`] first; until then only
//! `Lookup`, `Gateways`, `Stats` and `Ping` are allowed (operator tools).
//! Byte layout: see `docs/PROTOCOL.md` section "presence protocol".

use serde::{Deserialize, Serialize};

/// Version of these types, bumped on any incompatible change. Not sent on
/// the wire yet: presence and gateways are deployed together.
pub const PRESENCE_PROTOCOL_VERSION: u32 = 1;

/// Most users (or sessions) one request may carry: `Lookup`, `Watch`,
/// `Unwatch`, `SyncSessions`. The server may configure a smaller limit;
/// past it the request is answered with [`ErrorCode::BatchTooLarge`].
pub const BATCH_USERS_MAX: usize = 16_384;

/// Most bytes of a gateway's `peer_addr`.
pub const PEER_ADDR_BYTES_MAX: usize = 256;

/// What a user shows to others while online.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Status {
    Online,
    Away,
    Busy,
}

impl Status {
    /// The 2-bit code the presence table stores.
    pub fn code(self) -> u8 {
        match self {
            Status::Online => 0,
            Status::Away => 1,
            Status::Busy => 2,
        }
    }

    /// Inverse of [`Status::code`]; `None` for an unknown code.
    pub fn from_code(code: u8) -> Option<Status> {
        match code {
            0 => Some(Status::Online),
            1 => Some(Status::Away),
            2 => Some(Status::Busy),
            _ => None,
        }
    }
}

/// Where and since when a user is online.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Entry {
    /// Id of the gateway holding the session.
    pub gateway: u32,
    /// The gateway's session id.
    pub session: u64,
    /// Seconds since the Unix epoch when the session came online.
    pub since_s: u32,
    pub status: Status,
}

/// One session of a gateway's complete list ([`RequestBody::SyncSessions`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct SessionInfo {
    pub user: u64,
    pub session: u64,
    pub since_s: u32,
    pub status: Status,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Request {
    pub id: u64,
    pub body: RequestBody,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum RequestBody {
    /// Make this connection gateway `gateway`. Takes over from an older
    /// connection of the same id (which is closed) and cancels its grace
    /// period. `peer_addr` is where other gateways reach it.
    Register {
        gateway: u32,
        peer_addr: String,
    },
    /// `user` is online on this gateway in `session` (a new login, or a
    /// status change of the same session). Replaces any other session.
    Online {
        user: u64,
        session: u64,
        status: Status,
    },
    /// `user`'s `session` on this gateway ended. A no-op if the user is
    /// online in another session (the offline is stale).
    Offline {
        user: u64,
        session: u64,
    },
    /// Where each user is online; one answer per user, in order.
    Lookup {
        users: Vec<u64>,
    },
    /// `session` (of this gateway) watches `users`: their changes are pushed
    /// as [`Event::StatusChanged`]. Answers their current entries.
    Watch {
        session: u64,
        users: Vec<u64>,
    },
    /// `session` stops watching `users`.
    Unwatch {
        session: u64,
        users: Vec<u64>,
    },
    /// Start sending the gateway's complete session list. Every session of
    /// this gateway not sent again before [`RequestBody::SyncEnd`] goes
    /// offline at `SyncEnd`.
    SyncBegin,
    /// Part of the complete session list.
    SyncSessions {
        sessions: Vec<SessionInfo>,
    },
    /// The list is complete.
    SyncEnd,
    /// Every gateway the server knows.
    Gateways,
    Stats,
    Ping,
}

/// A gateway as the server knows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GatewayInfo {
    pub gateway: u32,
    pub peer_addr: String,
    /// It has a live connection (otherwise it is in its grace period).
    pub connected: bool,
    /// Users online on it.
    pub users: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct PresenceStats {
    pub users_online: u64,
    /// Slots of the table (occupied or not).
    pub table_capacity: u64,
    /// Bytes the table's slots occupy.
    pub table_bytes: u64,
    pub gateways_connected: u64,
    /// Gateways whose connection is gone and whose grace period runs.
    pub gateways_in_grace: u64,
    /// Users watched by at least one session.
    pub watched_users: u64,
    /// (session, watched user) pairs.
    pub watches: u64,
    pub lookups_total: u64,
    pub updates_total: u64,
    pub events_total: u64,
    pub kicks_total: u64,
    /// Users set offline because their gateway's grace period ran out.
    pub expired_users_total: u64,
}

/// Typed failures of one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ErrorCode {
    /// The operation needs a registered gateway connection.
    NotRegistered,
    /// The table holds `users_max` users: no new user can come online.
    TableFull,
    /// A watched user has `watchers_per_user_max` watching sessions.
    WatchersFull,
    /// The session watches `watches_per_session_max` users.
    WatchesFull,
    /// More users in one request than the server's `batch_users_max`.
    BatchTooLarge,
    /// `gateways_max` gateways are known.
    GatewaysFull,
    /// Outside the protocol (a `peer_addr` too long, `SyncSessions` without
    /// `SyncBegin`, ...).
    BadRequest,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PresenceError {
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
    /// The connection is gateway `gateway` now. The server closes it if no
    /// frame arrives for `lease_ms`; after that its users go offline unless
    /// it registers again within `grace_ms`.
    Registered {
        lease_ms: u32,
        grace_ms: u32,
    },
    /// The session is recorded; `replaced` is the session it replaced (whose
    /// gateway was sent [`Event::Kicked`]), if any.
    Online {
        replaced: Option<Entry>,
    },
    /// Whether the session was removed (false: it was not the user's
    /// current session).
    Offline {
        removed: bool,
    },
    /// One answer per user of a `Lookup` or `Watch`, in order.
    Entries {
        entries: Vec<Option<Entry>>,
    },
    /// How many of the users were watched by the session.
    Unwatched {
        removed: u32,
    },
    SyncStarted,
    /// Sessions recorded, and sessions refused because another gateway holds
    /// the user (each also sent as [`Event::Kicked`]).
    Synced {
        accepted: u32,
        kicked: u32,
    },
    /// Sessions of this gateway that were not re-sent and went offline.
    SyncEnded {
        removed: u64,
    },
    Gateways {
        gateways: Vec<GatewayInfo>,
    },
    Stats(PresenceStats),
    Pong,
    Error(PresenceError),
}

/// Pushed by the server without a request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Event {
    /// `user` changed; `entry` is `None` when it went offline. `sessions`
    /// are the sessions of the receiving gateway that watch the user.
    StatusChanged {
        user: u64,
        entry: Option<Entry>,
        sessions: Vec<u64>,
    },
    /// `session` of `user` on the receiving gateway was replaced by a login
    /// elsewhere (or refused in a sync): close it.
    Kicked { user: u64, session: u64 },
}

/// One downstream frame.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ServerFrame {
    Response(Response),
    Event(Event),
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frame::{self, Decoded};
    use bytes::BytesMut;
    use proptest::prelude::*;

    #[test]
    fn status_codes_round_trip() {
        for s in [Status::Online, Status::Away, Status::Busy] {
            assert_eq!(Status::from_code(s.code()), Some(s));
        }
        assert_eq!(Status::from_code(3), None);
    }

    #[test]
    fn known_bytes_of_a_lookup() {
        // Pinned so docs/PROTOCOL.md's worked example stays true.
        let req = Request {
            id: 5,
            body: RequestBody::Lookup {
                users: vec![1, 300],
            },
        };
        let mut out = Vec::new();
        frame::encode(&req, 1024, &mut out).unwrap();
        assert_eq!(out, [6, 0, 0, 0, 5, 3, 2, 1, 0xAC, 0x02]);
        let frame = ServerFrame::Event(Event::Kicked {
            user: 7,
            session: 9,
        });
        let body = postcard::to_stdvec(&frame).unwrap();
        assert_eq!(body, [1, 1, 7, 9]);
        let answer = ServerFrame::Response(Response {
            id: 5,
            body: ResponseBody::Entries {
                entries: vec![
                    Some(Entry {
                        gateway: 3,
                        session: 10,
                        since_s: 1_700_000_000,
                        status: Status::Online,
                    }),
                    None,
                ],
            },
        });
        let mut out = Vec::new();
        frame::encode(&answer, 1024, &mut out).unwrap();
        assert_eq!(
            out,
            [14, 0, 0, 0, 0, 5, 3, 2, 1, 3, 10, 0x80, 0xE2, 0xCF, 0xAA, 0x06, 0, 0]
        );
        let register = Request {
            id: 1,
            body: RequestBody::Register {
                gateway: 2,
                peer_addr: "a".into(),
            },
        };
        out.clear();
        frame::encode(&register, 1024, &mut out).unwrap();
        assert_eq!(out, [5, 0, 0, 0, 1, 0, 2, 1, 0x61]);
    }

    #[test]
    fn every_message_round_trips() {
        let entry = Entry {
            gateway: 3,
            session: u64::MAX,
            since_s: 1_700_000_000,
            status: Status::Away,
        };
        let frames = [
            ServerFrame::Response(Response {
                id: 1,
                body: ResponseBody::Entries {
                    entries: vec![Some(entry), None],
                },
            }),
            ServerFrame::Event(Event::StatusChanged {
                user: 2,
                entry: Some(entry),
                sessions: vec![4, 5],
            }),
        ];
        for f in frames {
            let body = postcard::to_stdvec(&f).unwrap();
            assert_eq!(frame::decode_body::<ServerFrame>(&body).unwrap(), f);
        }
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            for max in [16usize, 4096] {
                let mut buf = BytesMut::from(&bytes[..]);
                let before = buf.len();
                match frame::decode::<Request>(&mut buf, max) {
                    Ok(Decoded::Frame(_)) => prop_assert!(buf.len() < before),
                    Ok(Decoded::Incomplete) | Err(_) => prop_assert_eq!(buf.len(), before),
                }
                let mut buf = BytesMut::from(&bytes[..]);
                let _ = frame::decode::<ServerFrame>(&mut buf, max);
            }
            let _ = frame::decode_body::<Request>(&bytes);
            let _ = frame::decode_body::<ServerFrame>(&bytes);
        }

        #[test]
        fn lookups_round_trip(id in any::<u64>(), users in proptest::collection::vec(any::<u64>(), 0..64)) {
            let req = Request { id, body: RequestBody::Lookup { users } };
            let mut out = Vec::new();
            frame::encode(&req, 4096, &mut out).unwrap();
            let mut buf = BytesMut::from(&out[..]);
            prop_assert_eq!(frame::decode::<Request>(&mut buf, 4096).unwrap(), Decoded::Frame(req));
        }
    }
}
