//! Kill -9 a gateway during traffic: its clients (on the client SDK, given
//! both gateways' addresses) reconnect to the other gateway and re-send
//! their outbox; nothing is lost and nothing is shown twice.

use crate::support;

use crate::support::Cluster;
use client::sdk::{self, Credentials, SdkConfig};
use std::{collections::HashSet, time::Duration};

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
    let a = c.user("alice", "pa").await;
    let b = c.user("bob", "pb").await;
    c.befriend(a, b).await;
    let (alice, _alice_events) = sdk::connect(config(&both, c.gateway_public, "alice", "pa"))
        .await
        .unwrap();
    let (bob, mut bob_events) = sdk::connect(config(&both, c.gateway_public, "bob", "pb"))
        .await
        .unwrap();
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
            Ok(_) => sent += 1,
            Err(e) => panic!("message {i} failed: {e}"),
        }
    }
    assert_eq!(sent, 40);
    assert!(
        alice.stats().reconnects >= 1,
        "alice moved to the surviving gateway"
    );
    // Everything bob was pushed or fetches now, each once by seq.
    let shown = support::messages_until_shown(&bob, &mut bob_events, 40).await;
    bob.close().await;
    alice.close().await;
    let bodies: Vec<String> = shown
        .iter()
        .map(|d| String::from_utf8(d.body.clone()).unwrap())
        .collect();
    let unique: HashSet<&String> = bodies.iter().collect();
    assert_eq!(unique.len(), bodies.len(), "nothing shown twice");
    assert_eq!(unique.len(), 40, "nothing lost");
    let want: Vec<String> = (0..40).map(|i| format!("m{i}")).collect();
    assert_eq!(bodies, want, "shown in the order sent");
}
