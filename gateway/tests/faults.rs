//! The system under a bad network and bad input: a lossy path (30% loss,
//! duplication, reordering) still delivers every message exactly once and
//! in order; a flood of handshakes from one address does not keep anyone
//! else out.

mod support;

use proto::{
    app::{GatewayMessage, LoginMethod, Reply, SendOutcome},
    session::wire,
};
use rand::{Rng, SeedableRng};
use std::{collections::HashSet, net::SocketAddr, sync::Arc, time::Duration};
use support::{Cluster, TestClient};
use tokio::net::UdpSocket;

/// A UDP proxy for one client: datagrams both ways are dropped with
/// `loss`, duplicated with `duplicate`, and delayed by up to `jitter`
/// (which reorders them). Seeded, so a failing run can be replayed.
async fn lossy_proxy(
    gateway: SocketAddr,
    seed: u64,
    loss: f64,
    duplicate: f64,
    jitter: Duration,
) -> SocketAddr {
    let front = Arc::new(UdpSocket::bind("127.0.0.1:0").await.unwrap());
    let back = Arc::new(UdpSocket::bind("127.0.0.1:0").await.unwrap());
    let addr = front.local_addr().unwrap();
    let client: Arc<std::sync::Mutex<Option<SocketAddr>>> = Arc::default();
    let rng = Arc::new(std::sync::Mutex::new(
        rand_chacha::ChaCha8Rng::seed_from_u64(seed),
    ));
    let relay = move |from: Arc<UdpSocket>, to: Arc<UdpSocket>, towards_gateway: bool| {
        let client = client.clone();
        let rng = rng.clone();
        async move {
            let mut buf = vec![0u8; 2048];
            loop {
                let Ok((n, src)) = from.recv_from(&mut buf).await else {
                    return;
                };
                let dest = if towards_gateway {
                    *client.lock().unwrap() = Some(src);
                    gateway
                } else {
                    match *client.lock().unwrap() {
                        Some(c) => c,
                        None => continue,
                    }
                };
                let (copies, delays) = {
                    let mut r = rng.lock().unwrap();
                    let copies = if r.gen_bool(loss) {
                        0
                    } else if r.gen_bool(duplicate) {
                        2
                    } else {
                        1
                    };
                    let delays: Vec<u64> = (0..copies)
                        .map(|_| r.gen_range(0..jitter.as_millis() as u64 + 1))
                        .collect();
                    (copies, delays)
                };
                for delay in delays.into_iter().take(copies) {
                    let to = to.clone();
                    let d = buf[..n].to_vec();
                    tokio::spawn(async move {
                        tokio::time::sleep(Duration::from_millis(delay)).await;
                        let _ = to.send_to(&d, dest).await;
                    });
                }
            }
        }
    };
    tokio::spawn(relay(front.clone(), back.clone(), true));
    tokio::spawn(relay(back, front, false));
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lossy_path_delivers_every_message_once_in_order() {
    let c = Cluster::start(2).await;
    let a = c.user("alice", "pa").await;
    let b = c.user("bob", "pb").await;
    let jitter = Duration::from_millis(20);
    let alice_path = lossy_proxy(c.gateway.addr, 1, 0.3, 0.1, jitter).await;
    let bob_path = lossy_proxy(c.gateway.addr, 2, 0.3, 0.1, jitter).await;
    let login = |u: &str, p: &str| LoginMethod::Password {
        username: u.into(),
        password: p.into(),
    };
    let mut alice = TestClient::connect(alice_path, c.gateway_public, login("alice", "pa"))
        .await
        .expect("alice logs in");
    let mut bob = TestClient::connect(bob_path, c.gateway_public, login("bob", "pb"))
        .await
        .expect("bob logs in");
    let count = 30u128;
    let mut stored = 0;
    for i in 0..count {
        match alice
            .send(b, 7000 + i, format!("lossy {i}").as_bytes())
            .await
        {
            Ok(Reply::Sent(SendOutcome::Delivered)) => {}
            Ok(Reply::Sent(SendOutcome::Stored { .. })) => stored += 1,
            other => panic!("message {i}: {other:?}"),
        }
    }
    // What the gateway stored (pushes it gave up on) is in bob's mailbox.
    let mut got: Vec<u128> = Vec::new();
    while got.len() + stored < count as usize {
        match bob.push().await {
            Some(GatewayMessage::Deliver(d)) => {
                assert_eq!(d.from, a);
                got.push(d.msg_id);
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    let (messages, _) = bob.fetch(0, 200).await;
    assert_eq!(
        messages.len(),
        stored,
        "every stored message is in the mailbox"
    );
    let pushed_in_order = got.windows(2).all(|w| w[0] < w[1]);
    assert!(pushed_in_order, "pushes arrive in send order: {got:?}");
    got.extend(messages.iter().map(|m| m.msg_id));
    let unique: HashSet<u128> = got.iter().copied().collect();
    assert_eq!(unique.len(), got.len(), "nothing shown twice");
    assert_eq!(unique, (7000..7000 + count).collect(), "nothing lost");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handshake_flood_from_one_address_does_not_stop_others_logging_in() {
    let c = Cluster::start(1).await;
    c.user("alice", "pa").await;
    let flood = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    // Initiations of the right length and type (they fail mac1 anyway):
    // the per-address limit drops most of them before any check.
    let mut init = vec![0u8; proto::session::config::HANDSHAKE_INIT_BYTES];
    init[0] = wire::TYPE_INIT;
    for i in 0..500u32 {
        init[1..5].copy_from_slice(&i.to_le_bytes());
        flood.send_to(&init, c.gateway.addr).await.unwrap();
    }
    let alice = TestClient::connect(
        c.gateway.addr,
        c.gateway_public,
        LoginMethod::Password {
            username: "alice".into(),
            password: "pa".into(),
        },
    )
    .await;
    assert!(
        alice.is_ok(),
        "a client on another address logs in during the flood"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_shard_fails_sends_back_and_loses_nothing_it_acknowledged() {
    let (c, mut shards) = Cluster::start_with_shard_processes(1).await;
    c.user("alice", "pa").await;
    let b = c.user("bob", "pb").await;
    let mut alice = c.login("alice", "pa").await.unwrap();
    let mut stored: Vec<u128> = Vec::new();
    let mut failed = 0;
    for i in 0..60u128 {
        if i == 20 {
            shards[0].kill(); // SIGKILL mid-traffic
        }
        if i == 40 {
            shards[0].restart();
        }
        match alice.send(b, 9000 + i, format!("m{i}").as_bytes()).await {
            Ok(Reply::Sent(SendOutcome::Stored { .. })) => stored.push(9000 + i),
            Err(e) if e.code == proto::app::AppErrorCode::Unavailable => failed += 1,
            other => panic!("message {i}: {other:?}"),
        }
    }
    assert!(
        failed >= 1,
        "sends while the shard was down were failed back to the sender"
    );
    assert!(
        stored.len() >= 40,
        "sends before the kill and after the restart were stored"
    );
    let mut bob = c.login("bob", "pb").await.unwrap();
    let (messages, more) = bob.fetch(0, 200).await;
    assert!(!more);
    let got: Vec<u128> = messages.iter().map(|m| m.msg_id).collect();
    assert_eq!(
        got, stored,
        "every message acknowledged as stored survived the kill, once, in order"
    );
}
