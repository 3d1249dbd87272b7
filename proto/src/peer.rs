//! The gateway-to-gateway link: a gateway forwards a message to the gateway
//! its recipient is online on (per presence), over TCP with the usual
//! length-prefixed postcard frames (`frame`). Byte layout:
//! `docs/PROTOCOL.md` section 7.

use serde::{Deserialize, Serialize};

/// Sent by the gateway of the sender.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerRequest {
    pub id: u64,
    pub forward: Forward,
}

/// Push this message to `to`'s session on the receiving gateway.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Forward {
    pub to: u64,
    pub from: u64,
    pub msg_id: u128,
    pub sent_at_ms: u64,
    #[serde(with = "serde_bytes")]
    pub body: Vec<u8>,
}

/// Sent back by the receiving gateway, once per request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerResponse {
    pub id: u64,
    pub outcome: PeerOutcome,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum PeerOutcome {
    /// The recipient's client acknowledged the push.
    Delivered,
    /// The recipient has no session on this gateway (any more).
    NotHere,
    /// The push was given up (the session closed first): store it.
    GivenUp,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frame::{decode, encode, Decoded, FRAME_BODY_BYTES_MAX_DEFAULT};
    use bytes::BytesMut;
    use proptest::prelude::*;

    #[test]
    fn frames_round_trip_with_pinned_bytes() {
        let r = PeerResponse {
            id: 7,
            outcome: PeerOutcome::GivenUp,
        };
        let mut out = Vec::new();
        encode(&r, FRAME_BODY_BYTES_MAX_DEFAULT, &mut out).unwrap();
        assert_eq!(out, [2, 0, 0, 0, 7, 2]);
        let mut buf = BytesMut::from(&out[..]);
        assert_eq!(
            decode::<PeerResponse>(&mut buf, FRAME_BODY_BYTES_MAX_DEFAULT).unwrap(),
            Decoded::Frame(r)
        );
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
