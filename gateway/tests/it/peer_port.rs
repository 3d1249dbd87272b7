//! The gateway's peer port under too many connections and idle links (the
//! issue "The UDP edge under attack, loss and gateway failure", item 6):
//! beyond `limits.peer_connections_max` an (authenticated) link is closed
//! at once while the open links keep being served; a link silent for
//! `timers.peer_idle_timeout_s` is closed; connections that never prove the
//! cluster key take no link slot and lock no peer out.
//!
//! Every link here is authenticated with the test process's cluster key,
//! which the gateway process and the in-process services share.

use crate::support::{Cluster, WAIT};
use bytes::BytesMut;
use daemon::secure::{self, Link};
use daemon::testing::{idle_raw_connections, link, link_from};
use proto::{
    frame::{self, Decoded},
    peer::{Forward, PeerOutcome, PeerRequest, PeerRequestBody, PeerResponse, PeerResponseBody},
};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use tokio::io::AsyncReadExt;

/// Forward a message to user 999 (online nowhere) over `link`; the answer.
async fn forward(link: &mut Link, id: u64) -> PeerOutcome {
    let request = PeerRequest {
        id,
        body: PeerRequestBody::Forward(Forward {
            to: 999,
            from: 1,
            msg_id: id as u128,
            sent_at_ms: 0,
            body: b"hello".to_vec(),
            seq: 1,
        }),
    };
    let mut out = Vec::new();
    frame::encode(&request, gateway::peers::PEER_FRAME_BYTES_MAX, &mut out).unwrap();
    link.writer.send(&out).await.unwrap();
    let mut buf = BytesMut::new();
    let answer = async {
        loop {
            if let Decoded::Frame(r) = frame::decode::<PeerResponse>(&mut buf, 1 << 20).unwrap() {
                return r;
            }
            assert!(
                link.reader.read_buf(&mut buf).await.unwrap() > 0,
                "link closed"
            );
        }
    };
    let response = tokio::time::timeout(WAIT, answer).await.expect("answered");
    assert_eq!(response.id, id);
    match response.body {
        PeerResponseBody::Forwarded(outcome) => outcome,
        other => panic!("not a forward's answer: {other:?}"),
    }
}

/// Whether the gateway closed `link` (EOF or reset) within [`WAIT`].
async fn closed_by_gateway(link: &mut Link) -> bool {
    let mut byte = [0u8; 1];
    matches!(
        tokio::time::timeout(WAIT, link.reader.read(&mut byte)).await,
        Ok(Ok(0) | Err(_))
    )
}

/// Poll metric `name` until it is `want`.
async fn await_metric(c: &Cluster, name: &str, want: f64) {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let got = c.metric(name).await;
        if got == want {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{name} is {got}, not {want}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn beyond_peer_connections_max_a_link_is_closed_and_the_open_ones_are_served() {
    let c = Cluster::metered("[limits]\npeer_connections_max = 2\n").await;
    let peer = c.peer_addr(1).await;
    let mut a = link(&peer).await;
    let mut b = link(&peer).await;
    assert_eq!(forward(&mut a, 1).await, PeerOutcome::NotHere);
    assert_eq!(forward(&mut b, 1).await, PeerOutcome::NotHere);
    await_metric(&c, "gateway_peer_connections", 2.0).await;

    for _ in 0..3 {
        let mut refused = link(&peer).await;
        assert!(closed_by_gateway(&mut refused).await, "closed at once");
    }
    await_metric(&c, "gateway_peer_connections_refused_total", 3.0).await;
    assert_eq!(
        forward(&mut a, 2).await,
        PeerOutcome::NotHere,
        "still served"
    );
    assert_eq!(
        forward(&mut b, 2).await,
        PeerOutcome::NotHere,
        "still served"
    );

    // A link closed frees its slot.
    drop(b);
    await_metric(&c, "gateway_peer_connections", 1.0).await;
    let mut d = link(&peer).await;
    assert_eq!(forward(&mut d, 1).await, PeerOutcome::NotHere);
    assert_eq!(
        c.metric("gateway_peer_connections_refused_total").await,
        3.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_link_without_a_frame_for_peer_idle_timeout_s_is_closed() {
    let c = Cluster::metered("[timers]\npeer_idle_timeout_s = 2\n").await;
    let peer = c.peer_addr(1).await;
    let mut silent = link(&peer).await;
    let mut half = link(&peer).await;
    half.writer.send(&[200, 0, 0, 0, 1]).await.unwrap();
    assert!(
        closed_by_gateway(&mut silent).await,
        "a silent link is closed"
    );
    assert!(
        closed_by_gateway(&mut half).await,
        "half a frame is not a frame"
    );
    await_metric(&c, "gateway_peer_idle_closed_total", 2.0).await;
    await_metric(&c, "gateway_peer_connections", 0.0).await;

    // A link that keeps forwarding stays open across the timeout.
    let mut busy = link(&peer).await;
    for id in 1..=12 {
        assert_eq!(forward(&mut busy, id).await, PeerOutcome::NotHere);
        tokio::time::sleep(std::time::Duration::from_millis(250)).await;
    }
    assert_eq!(c.metric("gateway_peer_idle_closed_total").await, 2.0);
}

/// Connections that never prove the cluster key take no link slot: with
/// `peer_connections_max = 1` and 2,000 of them open from 127.0.0.1, a peer
/// from another address gets the one slot and is answered (and nothing was
/// counted open or refused); one from 127.0.0.1 itself (the strangers' own
/// address) gets in and is answered too while they stay open.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn strangers_take_no_link_slot_and_lock_no_peer_out() {
    let c = Cluster::metered("[limits]\npeer_connections_max = 1\n").await;
    let peer: SocketAddr = c.peer_addr(1).await.parse().unwrap();
    let raw = idle_raw_connections(peer, 2_000).await;

    let other = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2));
    let mut a = tokio::time::timeout(WAIT, link_from(other, peer))
        .await
        .expect("no hang")
        .expect("a peer from another address gets through");
    assert_eq!(forward(&mut a, 1).await, PeerOutcome::NotHere);
    assert_eq!(c.metric("gateway_peer_connections").await, 1.0);
    assert_eq!(
        c.metric("gateway_peer_connections_refused_total").await,
        0.0,
        "no stranger reached the link limit"
    );
    drop(a);
    await_metric(&c, "gateway_peer_connections", 0.0).await;

    // From the strangers' own address. Retried (until a generous deadline,
    // no timing asserted): the gate may turn a peer away while their
    // handshakes are pending.
    let deadline = tokio::time::Instant::now() + WAIT;
    let mut same = loop {
        match secure::connect(peer).await {
            Ok(link) => break link,
            Err(e) => assert!(
                tokio::time::Instant::now() < deadline,
                "a peer on 127.0.0.1 was locked out: {e}"
            ),
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    };
    assert_eq!(forward(&mut same, 2).await, PeerOutcome::NotHere);
    drop(raw);
}
