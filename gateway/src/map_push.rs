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
use tokio::io::AsyncReadExt;

/// A push (connect, send, answer) gives up after this long.
pub const MAP_PUSH_TIMEOUT_MS: u64 = 5000;

/// Why a push did not leave the gateway on the pushed map. `in_use` is the
/// epoch the gateway routes by.
#[derive(Debug, thiserror::Error)]
pub enum MapPushError {
    #[error("cannot reach the gateway at {addr}: {error}")]
    Io { addr: String, error: std::io::Error },
    #[error("the gateway at {addr} did not answer within {timeout_ms} ms")]
    Timeout { addr: String, timeout_ms: u64 },
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
    push_map_within(peer_addr, map, Duration::from_millis(MAP_PUSH_TIMEOUT_MS)).await
}

/// [`push_map`], giving up after `timeout` instead of
/// [`MAP_PUSH_TIMEOUT_MS`].
pub async fn push_map_within(
    peer_addr: &str,
    map: &ClusterMap,
    timeout: Duration,
) -> Result<u64, MapPushError> {
    let request = PeerRequest {
        id: 1,
        body: PeerRequestBody::MapUpdate(map.clone()),
    };
    let mut out = Vec::new();
    frame::encode(&request, crate::peers::PEER_FRAME_BYTES_MAX, &mut out)
        .map_err(|e| MapPushError::TooLarge(e.to_string()))?;
    let answer = tokio::time::timeout(timeout, exchange(peer_addr, &out))
        .await
        .map_err(|_| MapPushError::Timeout {
            addr: peer_addr.to_string(),
            timeout_ms: timeout.as_millis() as u64,
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
    let (mut rd, mut wr) = daemon::secure::connect(addr)
        .await
        .map_err(io)?
        .into_split();
    wr.send(request).await.map_err(io)?;
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
        if rd.read_buf(&mut buf).await.map_err(io)? == 0 {
            return Err(protocol("the gateway closed the link".into()));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proto::cluster::ShardEntry;

    fn map() -> ClusterMap {
        ClusterMap {
            epoch: 2,
            presence: "127.0.0.1:1".into(),
            profile: "127.0.0.1:2".into(),
            gateways: vec![],
            shards: vec![ShardEntry {
                id: "s1".into(),
                addr: "127.0.0.1:3".into(),
                weight: 1,
                replicas: Vec::new(),
            }],
        }
    }

    #[tokio::test]
    async fn a_silent_or_garbling_peer_fails_the_push() {
        let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = silent.local_addr().unwrap().to_string();
        let held = tokio::spawn(async move { silent.accept().await });
        let answer = push_map_within(&addr, &map(), Duration::from_millis(100)).await;
        assert!(matches!(
            answer,
            Err(MapPushError::Timeout {
                timeout_ms: 100,
                ..
            })
        ));
        held.abort();

        let garbling = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mut garbling = daemon::secure::SecureListener::new(
            garbling,
            "test",
            daemon::secure::GateLimits::default(),
        );
        let addr = garbling.local_addr().unwrap().to_string();
        tokio::spawn(async move {
            let (mut rd, mut wr) = garbling.accept().await.into_split();
            let mut buf = [0u8; 64];
            let _ = rd.read(&mut buf).await;
            wr.send(&[3, 0, 0, 0, 1, 0, 2]).await.unwrap(); // a Forwarded answer
        });
        let answer = push_map(&addr, &map()).await;
        assert!(
            matches!(answer, Err(MapPushError::Protocol { .. })),
            "{answer:?}"
        );
    }
}
