//! The system under a bad network, bad input and a dying shard: a lossy
//! path (30% loss, duplication, reordering) still stores every message
//! exactly once, in order, and shows it so; a flood of handshakes from one
//! address does not keep anyone else out; a killed shard fails sends back
//! and loses nothing it acknowledged.

use crate::support;

use crate::support::{Cluster, TestClient};
use client::sdk;
use proto::{
    app::{AppErrorCode, LoginMethod, Reply, SendOutcome},
    session::wire,
};
use std::time::Duration;
use tokio::net::UdpSocket;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lossy_path_delivers_every_message_once_in_order() {
    let c = Cluster::start(2).await;
    let a = c.user("alice", "pa").await;
    let b = c.user("bob", "pb").await;
    c.befriend(a, b).await;
    let jitter = Duration::from_millis(20);
    let alice_path = support::lossy_proxy(c.gateway.addr, 1, 0.3, 0.1, jitter).await;
    let bob_path = support::lossy_proxy(c.gateway.addr, 2, 0.3, 0.1, jitter).await;
    let mut alice = TestClient::connect(
        alice_path,
        c.gateway_public,
        LoginMethod::Password {
            username: "alice".into(),
            password: "pa".into(),
        },
    )
    .await
    .expect("alice logs in");
    // Bob on the SDK: pushes lost on the way (given up by the session) are
    // fetched from the mailbox; each message is shown once, by seq.
    let (bob, mut bob_events) = sdk::connect(c.sdk_config(&bob_path.to_string(), "bob", "pb"))
        .await
        .expect("bob logs in");
    let count = 30u64;
    for i in 0..count {
        let reply = alice
            .send(b, 7000 + i as u128, format!("lossy {i}").as_bytes())
            .await;
        assert_eq!(
            reply,
            Ok(Reply::Sent(SendOutcome { seq: i + 1 })),
            "message {i}: stored once, in the order sent"
        );
    }
    let shown = support::messages_until_shown(&bob, &mut bob_events, count as usize).await;
    let got: Vec<(u128, u64)> = shown.iter().map(|d| (d.msg_id, d.seq)).collect();
    let want: Vec<(u128, u64)> = (0..count).map(|i| (7000 + i as u128, i + 1)).collect();
    assert_eq!(got, want, "every message shown once, in order");
    assert_eq!(shown[0].from, a);
    bob.close().await;
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
    let a = c.user("alice", "pa").await;
    let b = c.user("bob", "pb").await;
    c.befriend(a, b).await;
    let mut alice = c.login("alice", "pa").await.unwrap();
    let mut seqs: Vec<u64> = Vec::new();
    let mut failed = 0;
    for i in 0..60u128 {
        if i == 20 {
            shards[0].kill(); // SIGKILL mid-traffic, between two sends
        }
        // Like every client: a message refused with a retryable error is
        // sent again, with the same id, before the next one.
        loop {
            match alice.send(b, 9000 + i, format!("m{i}").as_bytes()).await {
                Ok(Reply::Sent(SendOutcome { seq })) => {
                    seqs.push(seq);
                    break;
                }
                Err(e) if e.code == AppErrorCode::Unavailable => {
                    failed += 1;
                    if failed == 3 {
                        shards[0].restart();
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                other => panic!("message {i}: {other:?}"),
            }
        }
    }
    assert!(
        failed >= 3,
        "sends while the shard was down were failed back to the sender"
    );
    assert_eq!(seqs, (1..=60).collect::<Vec<_>>(), "each stored once");
    let mut bob = c.login("bob", "pb").await.unwrap();
    let (messages, _, more) = bob.fetch(0, 200).await;
    assert!(!more);
    let got: Vec<u128> = messages.iter().map(|m| m.msg_id).collect();
    assert_eq!(
        got,
        (9000..9060).collect::<Vec<_>>(),
        "every message acknowledged as stored survived the kill, once, in order"
    );
}

/// A shard killed and restarted while nobody talked to it: the gateway's
/// connection to it broke meanwhile. The next login must still read the
/// mailbox's figures (on a new connection), or the SDK, told the mailbox
/// is empty, never fetches what waits there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_login_after_a_shard_restart_sees_the_messages_waiting() {
    let (c, mut shards) = Cluster::start_with_shard_processes(1).await;
    let a = c.user("alice", "pa").await;
    let b = c.user("bob", "pb").await;
    c.befriend(a, b).await;
    let mut alice = c.login("alice", "pa").await.unwrap();
    assert_eq!(
        alice.send(b, 1, b"waiting").await,
        Ok(Reply::Sent(SendOutcome { seq: 1 }))
    );
    shards[0].kill();
    shards[0].restart();
    let (bob, mut events) = c.sdk("bob", "pb").await;
    assert_eq!(
        (bob.login().mailbox_count, bob.login().mailbox_high_seq),
        (1, 1),
        "the login read the mailbox's figures"
    );
    let shown = support::messages_until_synced(&bob, &mut events).await;
    let bodies: Vec<&[u8]> = shown.iter().map(|d| d.body.as_slice()).collect();
    assert_eq!(bodies, [&b"waiting"[..]]);
    bob.close().await;
}
