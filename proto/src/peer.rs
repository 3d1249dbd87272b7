//! The gateway-to-gateway link: a gateway that stored a message tells the
//! gateway its recipient is online on (per presence) to push it, and the
//! rebalance tool pushes
//! a new cluster map to every gateway, over TCP with the usual
//! length-prefixed postcard frames (`frame`). Byte layout:
//! `docs/PROTOCOL.md` section 7.

use crate::{app::Delivery, cluster::ClusterMap};
use serde::{Deserialize, Serialize};

/// Sent by the gateway of the sender, or by `imctl rebalance`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerRequest {
    pub id: u64,
    pub body: PeerRequestBody,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum PeerRequestBody {
    /// Push a stored message to a session on the receiving gateway.
    Forward(Forward),
    /// Route by this cluster map from now on, if its epoch is newer than
    /// the one in use (answered [`PeerResponseBody::Map`]).
    MapUpdate(ClusterMap),
    /// Push a group message, stored once in the group's mailbox, to those
    /// of `members` with a session on the receiving gateway (answered
    /// [`PeerResponseBody::GroupForwarded`]). A gateway sends at most one
    /// per message to each other gateway with members online.
    GroupForward(GroupForward),
}

/// A group message for the members presence says are on the receiving
/// gateway.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GroupForward {
    pub group: u64,
    /// The members to push to, sorted (the receiver pushes only to those
    /// it has a session of).
    pub members: Vec<u64>,
    /// `delivery.seq` is the message's seq in the group's mailbox.
    pub delivery: Delivery,
}

/// Push this message, already stored in `to`'s mailbox at `seq`, to `to`'s
/// session on the receiving gateway.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Forward {
    pub to: u64,
    pub from: u64,
    pub msg_id: u128,
    pub sent_at_ms: u64,
    #[serde(with = "serde_bytes")]
    pub body: Vec<u8>,
    pub seq: u64,
}

impl Forward {
    /// Push `delivery`, stored in `to`'s mailbox, to `to`.
    pub fn new(to: u64, delivery: Delivery) -> Forward {
        Forward {
            to,
            from: delivery.from,
            msg_id: delivery.msg_id,
            sent_at_ms: delivery.sent_at_ms,
            body: delivery.body,
            seq: delivery.seq,
        }
    }

    /// What to push to the recipient's session.
    pub fn into_delivery(self) -> Delivery {
        Delivery {
            from: self.from,
            msg_id: self.msg_id,
            sent_at_ms: self.sent_at_ms,
            body: self.body,
            seq: self.seq,
        }
    }
}

/// Sent back by the receiving gateway, once per request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerResponse {
    pub id: u64,
    pub body: PeerResponseBody,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum PeerResponseBody {
    /// The answer to a [`PeerRequestBody::Forward`].
    Forwarded(PeerOutcome),
    /// The answer to a [`PeerRequestBody::MapUpdate`].
    Map(MapAnswer),
    /// The answer to a [`PeerRequestBody::GroupForward`]: how many of the
    /// members got it handed to their session.
    GroupForwarded { pushed: u32 },
}

/// What the receiving gateway did with a [`Forward`]. Either way the
/// message stays in the mailbox: a recipient shows it once, by its seq.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum PeerOutcome {
    /// Handed to the recipient's session (not yet acknowledged by it).
    Pushed,
    /// The recipient has no session on this gateway (any more).
    NotHere,
}

/// What a gateway did with a pushed map. `epoch` is always the epoch of
/// the map it routes by after the request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum MapAnswer {
    /// The map is in use (and persisted); pushing the map already in use
    /// again is accepted too.
    Accepted { epoch: u64 },
    /// The map's epoch is older than the one in use, or equal with
    /// different contents: nothing changed.
    Older { epoch: u64 },
    /// The map breaks a rule of `docs/PROTOCOL.md` section 4 (no shards,
    /// duplicate ids, ...): nothing changed.
    Invalid { epoch: u64 },
    /// The map could not be saved in the gateway's data directory: nothing
    /// changed.
    Storage { epoch: u64 },
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cluster::{GatewayEntry, ShardEntry};
    use crate::frame::{decode, encode, Decoded, FRAME_BODY_BYTES_MAX_DEFAULT};
    use bytes::BytesMut;
    use proptest::prelude::*;

    #[test]
    fn frames_round_trip_with_pinned_bytes() {
        let r = PeerResponse {
            id: 7,
            body: PeerResponseBody::Forwarded(PeerOutcome::NotHere),
        };
        assert_eq!(round_trip(&r), [3, 0, 0, 0, 7, 0, 1]);
        let accepted = PeerResponse {
            id: 8,
            body: PeerResponseBody::Map(MapAnswer::Accepted { epoch: 300 }),
        };
        assert_eq!(round_trip(&accepted), [5, 0, 0, 0, 8, 1, 0, 0xac, 0x02]);
        let older = PeerResponse {
            id: 9,
            body: PeerResponseBody::Map(MapAnswer::Older { epoch: 4 }),
        };
        assert_eq!(round_trip(&older), [4, 0, 0, 0, 9, 1, 1, 4]);
        let forward = PeerRequest {
            id: 1,
            body: PeerRequestBody::Forward(Forward {
                to: 2,
                from: 3,
                msg_id: 4,
                sent_at_ms: 5,
                body: b"hi".to_vec(),
                seq: 6,
            }),
        };
        assert_eq!(
            round_trip(&forward),
            [10, 0, 0, 0, 1, 0, 2, 3, 4, 5, 2, b'h', b'i', 6]
        );
        let update = PeerRequest {
            id: 2,
            body: PeerRequestBody::MapUpdate(ClusterMap {
                epoch: 6,
                presence: "p".into(),
                profile: "q".into(),
                gateways: vec![GatewayEntry {
                    id: 1,
                    udp: "u".into(),
                    peer: "v".into(),
                }],
                shards: vec![ShardEntry {
                    id: "s1".into(),
                    addr: "a".into(),
                    weight: 1,
                    replicas: Vec::new(),
                }],
            }),
        };
        let mut want = vec![21, 0, 0, 0, 2, 1, 6, 1, b'p', 1, b'q'];
        want.extend([1, 1, 1, b'u', 1, b'v']);
        // A shard: id, addr, weight, replicas (none).
        want.extend([1, 2, b's', b'1', 1, b'a', 1, 0]);
        assert_eq!(round_trip(&update), want);
    }

    /// Encode `value` as a frame, check it decodes back; the frame bytes.
    fn round_trip<T>(value: &T) -> Vec<u8>
    where
        T: Serialize + serde::de::DeserializeOwned + PartialEq + std::fmt::Debug + Clone,
    {
        let mut out = Vec::new();
        encode(value, FRAME_BODY_BYTES_MAX_DEFAULT, &mut out).unwrap();
        let mut buf = BytesMut::from(&out[..]);
        assert_eq!(
            decode::<T>(&mut buf, FRAME_BODY_BYTES_MAX_DEFAULT).unwrap(),
            Decoded::Frame(value.clone())
        );
        out
    }

    proptest! {
        #[test]
        fn decoders_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
            let mut buf = BytesMut::from(&bytes[..]);
            let _ = decode::<PeerRequest>(&mut buf, 4096);
            let mut buf = BytesMut::from(&bytes[..]);
            let _ = decode::<PeerResponse>(&mut buf, 4096);
        }
    }
}
