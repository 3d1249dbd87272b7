//! Pushing a cluster map to one gateway over its peer link (what
//! `imctl rebalance` does for every gateway at the end of a rebalance):
//! one `MapUpdate` request on a fresh connection, one answer.

use bytes::BytesMut;
use proto::{
    cluster::ClusterMap,
    frame::{self, Decoded},
    peer::{MapAnswer, PeerRequest, PeerRequestBody, PeerResponse, PeerResponseBody},
};
use std::time::Duration;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};

/// A push (connect, send, answer) gives up after this long.
pub const MAP_PUSH_TIMEOUT_MS: u64 = 5000;

/// Why a push did not leave the gateway on the pushed map. `in_use` is the
/// epoch the gateway routes by.
#[derive(Debug, thiserror::Error)]
pub enum MapPushError {
    #[error("cannot reach the gateway at {addr}: {error}")]
    Io { addr: String, error: std::io::Error },
    #[error("the gateway at {addr} did not answer within {MAP_PUSH_TIMEOUT_MS} ms")]
    Timeout { addr: String },
    #[error("bad answer from the gateway at {addr}: {reason}")]
    Protocol { addr: String, reason: String },
    #[error("the map cannot be sent: {0}")]
    TooLarge(String),
    #[error("the gateway routes by epoch {in_use}, newer than (or a different map of the same epoch as) the map pushed")]
    Older { in_use: u64 },
    #[error("the gateway finds the map invalid (it routes by epoch {in_use})")]
    Invalid { in_use: u64 },
    #[error("the gateway cannot save the map (it routes by epoch {in_use})")]
    Storage { in_use: u64 },
}

/// Push `map` to the gateway whose peer link listens on `peer_addr`; the
/// epoch it routes by afterwards (the map's own: pushing the map in use
/// again succeeds too).
pub async fn push_map(peer_addr: &str, map: &ClusterMap) -> Result<u64, MapPushError> {
    let request = PeerRequest {
        id: 1,
        body: PeerRequestBody::MapUpdate(map.clone()),
    };
    let mut out = Vec::new();
    frame::encode(&request, crate::peers::PEER_FRAME_BYTES_MAX, &mut out)
        .map_err(|e| MapPushError::TooLarge(e.to_string()))?;
    let timeout = Duration::from_millis(MAP_PUSH_TIMEOUT_MS);
    let answer = tokio::time::timeout(timeout, exchange(peer_addr, &out))
        .await
        .map_err(|_| MapPushError::Timeout {
            addr: peer_addr.to_string(),
        })??;
    match answer {
        MapAnswer::Accepted { epoch } => Ok(epoch),
        MapAnswer::Older { epoch } => Err(MapPushError::Older { in_use: epoch }),
        MapAnswer::Invalid { epoch } => Err(MapPushError::Invalid { in_use: epoch }),
        MapAnswer::Storage { epoch } => Err(MapPushError::Storage { in_use: epoch }),
    }
}

/// Send the request frame, read the answer to it.
async fn exchange(addr: &str, request: &[u8]) -> Result<MapAnswer, MapPushError> {
    let io = |error| MapPushError::Io {
        addr: addr.to_string(),
        error,
    };
    let protocol = |reason: String| MapPushError::Protocol {
        addr: addr.to_string(),
        reason,
    };
    let mut stream = TcpStream::connect(addr).await.map_err(io)?;
    stream.write_all(request).await.map_err(io)?;
    let mut buf = BytesMut::with_capacity(256);
    loop {
        match frame::decode::<PeerResponse>(&mut buf, crate::peers::PEER_FRAME_BYTES_MAX) {
            Ok(Decoded::Frame(PeerResponse {
                id: 1,
                body: PeerResponseBody::Map(answer),
            })) => return Ok(answer),
            Ok(Decoded::Frame(other)) => {
                return Err(protocol(format!("unexpected response {other:?}")))
            }
            Ok(Decoded::Incomplete) => {}
            Err(e) => return Err(protocol(e.to_string())),
        }
        if stream.read_buf(&mut buf).await.map_err(io)? == 0 {
            return Err(protocol("the gateway closed the link".into()));
        }
    }
}
