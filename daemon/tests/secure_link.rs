//! Secure links over real sockets: data both ways, strangers refused and
//! counted, the handshake deadline, per-source limits.

use daemon::secure::{self, ClusterKey, GateLimits, SecureListener};
use std::time::Duration;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
};

async fn listener(limits: GateLimits) -> SecureListener {
    let tcp = TcpListener::bind("127.0.0.1:0").await.unwrap();
    SecureListener::new(tcp, "test", limits)
}

#[tokio::test]
async fn a_link_carries_large_and_small_writes_both_ways() {
    let mut server = listener(GateLimits::default()).await;
    let addr = server.local_addr().unwrap();
    let big: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
    let expected = big.clone();
    let echo = tokio::spawn(async move {
        let link = server.accept().await;
        let (mut rd, mut wr) = link.into_split();
        let mut got = vec![0u8; expected.len()];
        rd.read_exact(&mut got).await.unwrap();
        assert!(got == expected, "the listener read other bytes");
        wr.send(b"done").await.unwrap();
        wr.shutdown().await.unwrap();
        let mut rest = Vec::new();
        rd.read_to_end(&mut rest).await.unwrap();
        rest
    });
    let link = secure::connect(addr).await.unwrap();
    let (mut rd, mut wr) = link.into_split();
    // In uneven pieces, some larger than a record.
    let mut at = 0;
    for size in [1, 70_000, 5, 200_000].iter().cycle() {
        let end = (at + size).min(big.len());
        wr.send(&big[at..end]).await.unwrap();
        at = end;
        if at == big.len() {
            break;
        }
    }
    let mut done = Vec::new();
    rd.read_to_end(&mut done).await.unwrap();
    assert_eq!(done, b"done");
    wr.send(b"tail").await.unwrap();
    wr.shutdown().await.unwrap();
    assert_eq!(echo.await.unwrap(), b"tail");
}

#[tokio::test]
async fn a_wrong_key_gets_nothing_and_a_peer_still_gets_through() {
    let mut server = listener(GateLimits::default()).await;
    let addr = server.local_addr().unwrap();
    let stranger = ClusterKey::from_bytes([42; 32]);
    let e = secure::connect_with(addr, &stranger).await.err().unwrap();
    assert_eq!(e.kind(), std::io::ErrorKind::ConnectionRefused, "{e}");
    // Garbage instead of a handshake: closed without an answer.
    let mut raw = TcpStream::connect(addr).await.unwrap();
    raw.write_all(&[0x55; 100]).await.unwrap();
    let mut answer = Vec::new();
    let read = raw.read_to_end(&mut answer).await;
    assert!(answer.is_empty(), "a stranger was answered: {read:?}");
    // The listener handed nothing over; a real peer still gets through.
    let ok = tokio::spawn(async move { secure::connect(addr).await.map(|l| l.peer) });
    let link = tokio::time::timeout(Duration::from_secs(5), server.accept())
        .await
        .expect("a peer with the key gets through");
    assert!(ok.await.unwrap().is_ok());
    drop(link);
}

#[tokio::test]
async fn a_silent_connection_is_closed_at_the_deadline() {
    let limits = GateLimits {
        handshake_timeout_ms: 200,
        ..GateLimits::default()
    };
    let server = listener(limits).await;
    let mut raw = TcpStream::connect(server.local_addr().unwrap())
        .await
        .unwrap();
    let mut buf = [0u8; 1];
    let read = tokio::time::timeout(Duration::from_secs(5), raw.read(&mut buf))
        .await
        .expect("the listener closed the silent connection");
    assert!(matches!(read, Ok(0) | Err(_)), "{read:?}");
}

/// Whether the listener closed `stream` (EOF or an error) within 5 s.
async fn closed(stream: &mut TcpStream) -> bool {
    let mut buf = [0u8; 1];
    matches!(
        tokio::time::timeout(Duration::from_secs(5), stream.read(&mut buf)).await,
        Ok(Ok(0) | Err(_))
    )
}

#[tokio::test]
async fn silent_connections_cannot_keep_a_peer_out() {
    for (pending_max, per_source_max) in [(100, 4), (4, 100)] {
        let limits = GateLimits {
            handshakes_pending_max: pending_max,
            handshakes_per_source_max: per_source_max,
            handshake_timeout_ms: 30_000,
        };
        let mut server = listener(limits).await;
        let addr = server.local_addr().unwrap();
        let mut silent = Vec::new();
        for _ in 0..4 {
            silent.push(TcpStream::connect(addr).await.unwrap());
        }
        // Every slot is taken; a peer still gets in, in the oldest's place.
        let peer = tokio::spawn(async move { secure::connect(addr).await.is_ok() });
        tokio::time::timeout(Duration::from_secs(5), server.accept())
            .await
            .expect("the peer got a slot");
        assert!(peer.await.unwrap());
        assert!(closed(&mut silent[0]).await, "the oldest was dropped");
        // The others still wait for their handshake (the deadline is far).
        let mut buf = [0u8; 1];
        let still =
            tokio::time::timeout(Duration::from_millis(200), silent[3].read(&mut buf)).await;
        assert!(still.is_err(), "a newer one was dropped: {still:?}");
    }
}

/// A link whose peer vanishes without closing (its host unplugged, as a
/// dead machine or a partition leaves it) fails at this end by itself,
/// from the keepalive probes (`secure::tcp`: ~25 s), instead of staying
/// open for hours. Needs root and `ip netns`; skipped with a message
/// without them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_link_to_a_vanished_peer_fails_by_itself() {
    let net = match daemon::netns::Net::setup("ka", 1) {
        Ok(net) => net,
        Err(why) => {
            eprintln!("SKIPPED: cannot make network namespaces here ({why})");
            return;
        }
    };
    let at = net.socket_addr(0, 0);
    let tcp = daemon::netns::in_netns(net.namespace(0), move || std::net::TcpListener::bind(at))
        .unwrap()
        .unwrap();
    tcp.set_nonblocking(true).unwrap();
    let addr = tcp.local_addr().unwrap();
    let mut server = SecureListener::new(
        TcpListener::from_std(tcp).unwrap(),
        "test",
        GateLimits::default(),
    );
    let (dialed, _accepted) = tokio::join!(secure::connect(addr), server.accept());
    let (mut rd, _wr) = dialed.unwrap().into_split();
    net.unplug(0).unwrap();
    // The probes' budget (10 s + 3 x 5 s) and a margin: a guard against
    // a link that never fails, not a measure of speed.
    let mut byte = [0u8; 1];
    let read = tokio::time::timeout(Duration::from_secs(90), rd.read(&mut byte)).await;
    let read = read.expect("the link to a vanished peer was still open after 90 s");
    assert!(read.is_err(), "the link ended without an error: {read:?}");
    drop(server);
    drop(net);
}
