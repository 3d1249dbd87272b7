//! Kill -9 a gateway during traffic: its clients (on the client SDK, given
//! both gateways' addresses) reconnect to the other gateway and re-send
//! their outbox; nothing is lost and nothing is shown twice.

mod support;

use client::sdk::{self, Connection, Credentials, ImEvent, SdkConfig};
use proto::app::SendOutcome;
use std::{collections::HashSet, time::Duration};
use support::Cluster;

/// SDK settings that notice a dead gateway in about a second.
fn config(gateways: &str, public: [u8; 32], user: &str, password: &str) -> SdkConfig {
    let credentials = Credentials::Password {
        username: user.into(),
        password: password.into(),
    };
    let mut c = SdkConfig::new(gateways, public, credentials);
    c.session.session.keepalive = Duration::from_millis(200);
    c.session.session.idle_timeout = Duration::from_millis(1500);
    c.session.handshake_timeout = Duration::from_secs(3);
    c
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_gateway_loses_nothing_clients_move_to_the_other() {
    let mut c = Cluster::start(2).await;
    let mut second = Some(c.second_gateway(2));
    let both = format!("{},{}", c.gateway.addr, second.as_ref().unwrap().addr);
    c.user("alice", "pa").await;
    let b = c.user("bob", "pb").await;
    let (alice, _alice_events) = sdk::connect(config(&both, c.gateway_public, "alice", "pa"))
        .await
        .unwrap();
    let (bob, mut bob_events) = sdk::connect(config(&both, c.gateway_public, "bob", "pb"))
        .await
        .unwrap();
    let received = tokio::spawn(async move {
        let mut ids = Vec::new();
        while let Some(event) = bob_events.recv().await {
            if let ImEvent::Message(d) = event {
                ids.push(d.msg_id);
            }
        }
        ids
    });
    let mut sent = 0usize;
    for i in 0..40 {
        if i == 15 {
            // SIGKILL the gateway alice is on, mid-traffic.
            if alice.gateway() == c.gateway.addr {
                let killed = std::mem::replace(&mut c.gateway, second.take().unwrap());
                killed.kill();
            } else {
                second.take().unwrap().kill();
            }
        }
        match alice.send(b, format!("m{i}").into_bytes()).await {
            Ok(SendOutcome::Delivered | SendOutcome::Stored { .. }) => sent += 1,
            Err(e) => panic!("message {i} failed: {e}"),
        }
    }
    assert_eq!(sent, 40);
    assert!(
        alice.stats().reconnects >= 1,
        "alice moved to the surviving gateway"
    );
    let stored = drain_all(&bob).await;
    bob.close().await;
    alice.close().await;
    let pushed = received.await.unwrap();
    let mut all: Vec<u128> = pushed;
    all.extend(stored);
    let unique: HashSet<u128> = all.iter().copied().collect();
    assert_eq!(unique.len(), all.len(), "nothing shown twice");
    assert_eq!(unique.len(), 40, "nothing lost");
}

/// Everything in bob's mailbox, waiting until presence and the gateways
/// have settled (messages stored while bob was moving).
async fn drain_all(bob: &Connection) -> Vec<u128> {
    let mut ids = Vec::new();
    for _ in 0..3 {
        ids.extend(
            bob.drain_mailbox()
                .await
                .unwrap()
                .into_iter()
                .map(|d| d.msg_id),
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    ids
}
