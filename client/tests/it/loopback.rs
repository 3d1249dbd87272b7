//! The session layer over real loopback UDP sockets: the echo server and
//! client drivers, with the batched I/O underneath.

use client::{Client, DriverConfig, EchoConfig, EchoServer};
use netio::udp;
use proto::session::{
    config::DATAGRAM_BYTES_MAX, wire, ClientConfig, CloseReason, CookieMode, Event, SendError,
    ServerConfig, StaticKeypair,
};
use rand::{rngs::StdRng, Rng, RngCore, SeedableRng};
use std::{collections::VecDeque, future::Future, time::Duration};
use tokio::{sync::mpsc, time::timeout};

/// Guards against hangs only; nothing here is a timing assertion.
const DEADLINE: Duration = Duration::from_secs(30);

fn server_config(cookie_mode: CookieMode) -> EchoConfig {
    EchoConfig {
        server: ServerConfig {
            cookie_mode,
            ..ServerConfig::default()
        },
        ..EchoConfig::default()
    }
}

fn start_echo(cookie_mode: CookieMode) -> EchoServer {
    let mut seed = [0u8; 32];
    rand::thread_rng().fill_bytes(&mut seed);
    EchoServer::start(
        "127.0.0.1:0".parse().unwrap(),
        StaticKeypair::generate(seed),
        server_config(cookie_mode),
    )
    .unwrap()
}

async fn within<T>(what: &str, f: impl Future<Output = T>) -> T {
    timeout(DEADLINE, f)
        .await
        .unwrap_or_else(|_| panic!("{what}: no progress within {DEADLINE:?}"))
}

async fn connect(server: &EchoServer, login: &[u8]) -> (Client, mpsc::Receiver<Event>) {
    let config = DriverConfig::new(server.local_addr(), server.public_key(), login.to_vec());
    let (client, mut events) = Client::connect(config).await.unwrap();
    let event = within("handshake", events.recv()).await.unwrap();
    match event {
        Event::Connected { payload, .. } => assert_eq!(payload, b"welcome"),
        other => panic!("expected Connected, got {other:?}"),
    }
    (client, events)
}

/// A message whose bytes say which one it is, `len` bytes long.
fn message(tag: u32, len: usize) -> Vec<u8> {
    let mut rng = StdRng::seed_from_u64(u64::from(tag));
    let mut m = vec![0u8; len];
    rng.fill_bytes(&mut m);
    m[..4.min(len)].copy_from_slice(&tag.to_le_bytes()[..4.min(len)]);
    m
}

/// Send every message (waiting for acks when the queue is full) and
/// collect the echoes; every echo must come back exactly once, in order.
async fn echo_all(client: &Client, events: &mut mpsc::Receiver<Event>, messages: &[Vec<u8>]) {
    let mut to_send: VecDeque<&Vec<u8>> = messages.iter().collect();
    let mut echoed = Vec::new();
    let mut acked = 0;
    while echoed.len() < messages.len() {
        while let Some(m) = to_send.front() {
            match client.send((*m).clone()) {
                Ok(_) => {
                    to_send.pop_front();
                }
                Err(SendError::QueueFull) => break,
                Err(e) => panic!("send: {e}"),
            }
        }
        match within("echo", events.recv()).await.expect("driver running") {
            Event::Message(m) => echoed.push(m),
            Event::Acked(_) => acked += 1,
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(echoed.len(), messages.len());
    for (i, (got, sent)) in echoed.iter().zip(messages).enumerate() {
        assert!(
            got == sent,
            "echo {i} differs ({} vs {} bytes)",
            got.len(),
            sent.len()
        );
    }
    assert!(acked <= messages.len());
}

#[tokio::test]
async fn messages_of_every_size_arrive_once_and_in_order_both_ways() {
    let server = start_echo(CookieMode::Never);
    let (client, mut events) = connect(&server, b"login alice").await;
    let sizes = [
        1, 100, 1_142, 1_143, 1_144, 2_400, 9_999, 40_000, 65_536, 65_536, 7, 65_535,
    ];
    let messages: Vec<Vec<u8>> = (0..60)
        .map(|i| message(i, sizes[i as usize % sizes.len()]))
        .collect();
    echo_all(&client, &mut events, &messages).await;
    let stats = server.stats();
    assert_eq!(
        stats.messages,
        messages.len() as u64,
        "server got each once"
    );
    assert_eq!(stats.echo_dropped, 0);
    assert_eq!(stats.sessions, 1);
    assert_eq!(client.driver_stats().foreign_datagrams, 0);
}

#[tokio::test]
async fn concurrent_clients_get_their_own_echoes() {
    let server = start_echo(CookieMode::Never);
    let mut tasks = Vec::new();
    for c in 0..8u32 {
        let (client, mut events) = connect(&server, format!("login {c}").as_bytes()).await;
        tasks.push(tokio::spawn(async move {
            let messages: Vec<Vec<u8>> = (0..100)
                .map(|i| message(c * 1000 + i, 1 + (i as usize * 37) % 3000))
                .collect();
            echo_all(&client, &mut events, &messages).await;
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let stats = server.stats();
    assert_eq!(stats.messages, 800);
    assert_eq!(stats.endpoint.handshakes_accepted, 8);
}

#[tokio::test]
async fn the_cookie_path_works_over_real_sockets() {
    let server = start_echo(CookieMode::Always);
    let (client, mut events) = connect(&server, b"login bob").await;
    echo_all(&client, &mut events, &[message(1, 500)]).await;
    assert!(server.stats().endpoint.cookies_sent >= 1);
}

#[tokio::test]
async fn a_client_with_the_wrong_server_key_never_connects() {
    let server = start_echo(CookieMode::Never);
    let wrong = StaticKeypair::generate([42; 32]).public;
    assert_ne!(wrong, server.public_key());
    let mut config = DriverConfig::new(server.local_addr(), wrong, b"login eve".to_vec());
    config.session = ClientConfig {
        handshake_retry: Duration::from_millis(100),
        handshake_timeout: Duration::from_millis(800),
        ..ClientConfig::default()
    };
    let (client, mut events) = Client::connect(config).await.unwrap();
    let event = within("handshake timeout", events.recv()).await;
    assert_eq!(event, Some(Event::Closed(CloseReason::HandshakeTimedOut)));
    assert_eq!(client.session_id(), None);
    let stats = server.stats();
    assert!(stats.endpoint.dropped_unauthentic >= 1, "{stats:?}");
    assert_eq!(stats.endpoint.handshakes_requested, 0);
    assert_eq!(stats.sessions, 0);
}

/// Random bytes of random lengths, some shaped like real datagram types.
fn garbage(rng: &mut StdRng, count: usize) -> Vec<Vec<u8>> {
    (0..count)
        .map(|i| {
            let len = match i % 4 {
                0 => wire::TRANSPORT_HEADER_BYTES + rng.gen_range(0..200),
                1 => DATAGRAM_BYTES_MAX,
                2 => rng.gen_range(0..=DATAGRAM_BYTES_MAX + 300),
                _ => rng.gen_range(0..8),
            };
            let mut d = vec![0u8; len];
            rng.fill_bytes(&mut d);
            if let Some(t) = d.first_mut() {
                *t = [
                    wire::TYPE_TRANSPORT,
                    wire::TYPE_INIT,
                    *t,
                    wire::TYPE_RESPONSE,
                ][i % 4];
            }
            d
        })
        .collect()
}

#[tokio::test]
async fn garbage_datagrams_are_counted_and_the_server_keeps_serving() {
    let server = start_echo(CookieMode::Never);
    let mut rng = StdRng::seed_from_u64(0xBAD);
    let junk = garbage(&mut rng, 400);
    let sender = udp::bind("127.0.0.1:0".parse().unwrap()).unwrap();
    for d in &junk {
        sender.send_to(d, server.local_addr()).await.unwrap();
    }
    within("garbage counted", async {
        while server.stats().endpoint.datagrams_in + server.stats().truncated_datagrams
            < junk.len() as u64
        {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    let stats = server.stats();
    assert_eq!(stats.dropped_total(), junk.len() as u64, "{stats:?}");
    assert_eq!(stats.endpoint.handshakes_requested, 0);
    assert_eq!(stats.endpoint.datagrams_out, 0, "garbage is never answered");
    let (client, mut events) = connect(&server, b"login after garbage").await;
    echo_all(&client, &mut events, &[message(9, 3000)]).await;
}

#[tokio::test]
async fn close_ends_the_session_on_both_sides() {
    let server = start_echo(CookieMode::Never);
    let (client, mut events) = connect(&server, b"login carol").await;
    echo_all(&client, &mut events, &[message(3, 10)]).await;
    client.close();
    let event = within("close", events.recv()).await;
    assert_eq!(event, Some(Event::Closed(CloseReason::Local)));
    within("server forgets the session", async {
        while server.stats().sessions != 0 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    within("driver task ends", async {
        while !client.is_finished() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
}

#[tokio::test]
async fn echoes_beyond_the_backlog_limit_are_dropped_and_counted() {
    let mut config = server_config(CookieMode::Never);
    // Room for one 3,000-byte echo in flight and none waiting.
    config.server.session.send_queue_bytes_max = 4_000;
    config.backlog_bytes_max = 0;
    let mut seed = [0u8; 32];
    rand::thread_rng().fill_bytes(&mut seed);
    let server = EchoServer::start(
        "127.0.0.1:0".parse().unwrap(),
        StaticKeypair::generate(seed),
        config,
    )
    .unwrap();
    let (client, mut events) = connect(&server, b"login dave").await;
    let messages: Vec<Vec<u8>> = (0..40).map(|i| message(i, 3_000)).collect();
    for m in &messages {
        client.send(m.clone()).unwrap();
    }
    within("server got every message", async {
        while server.stats().messages < 40 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    let dropped = server.stats().echo_dropped;
    assert!(dropped > 0, "no echo was refused: {:?}", server.stats());
    // The echoes that were queued still arrive, in order, exactly once.
    let mut echoed = Vec::new();
    while echoed.len() < (40 - dropped) as usize {
        if let Event::Message(m) = within("echo", events.recv()).await.unwrap() {
            echoed.push(m);
        }
    }
    let mut expected = messages.iter();
    for m in &echoed {
        assert!(expected.any(|e| e == m), "echo out of order or unknown");
    }
    assert_eq!(server.stats().messages, 40);
}

#[tokio::test]
async fn an_application_that_reads_late_still_gets_everything_once_in_order() {
    let server = start_echo(CookieMode::Never);
    let mut config = DriverConfig::new(server.local_addr(), server.public_key(), b"slow".to_vec());
    config.events_max = 1;
    let (client, mut events) = Client::connect(config).await.unwrap();
    assert!(matches!(
        within("handshake", events.recv()).await,
        Some(Event::Connected { .. })
    ));
    let messages: Vec<Vec<u8>> = (0..50).map(|i| message(i, 2_000)).collect();
    for m in &messages {
        client.send(m.clone()).unwrap();
    }
    // The driver stops reading the socket while its one-event channel is
    // full; the protocol retransmits whatever the kernel drops meanwhile.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut echoed = Vec::new();
    while echoed.len() < messages.len() {
        match within("echo", events.recv()).await.unwrap() {
            Event::Message(m) => echoed.push(m),
            Event::Acked(_) => {}
            other => panic!("unexpected {other:?}"),
        }
    }
    assert!(echoed == messages, "echoes differ from what was sent");
}
