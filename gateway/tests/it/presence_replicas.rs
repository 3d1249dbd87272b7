//! Presence as two replica processes: a gateway reports to both, keeps
//! logging people in and showing friends' status while one is down (kill
//! or pause), a restarted replica is rebuilt from the gateways' syncs, and
//! when a gateway dies its users go offline on every replica and their
//! friends on another gateway are told.

use crate::support;

use crate::support::{Cluster, Options, WAIT};
use proto::{
    app::{Call, GatewayMessage, Reply},
    presence::{Entry, RequestBody, ResponseBody, Status},
};
use std::time::Duration;

async fn two_replicas() -> Cluster {
    let options = Options {
        shards: 1,
        presence_replicas: 2,
        ..Options::default()
    };
    Cluster::start_with(options).await.0
}

/// `user`'s entry on replica `i`, asked directly.
async fn entry_on(c: &Cluster, i: usize, user: u64) -> Option<Entry> {
    let addr = c.presence[i].addr().to_string();
    match presence::client::request_once(&addr, RequestBody::Lookup { users: vec![user] }).await {
        Ok(ResponseBody::Entries { mut entries }) => entries.pop().flatten(),
        other => panic!("lookup on replica {i}: {other:?}"),
    }
}

/// Wait until replica `i` says whether `user` is online as `online`.
async fn until_on(c: &Cluster, i: usize, user: u64, online: bool) {
    let deadline = tokio::time::Instant::now() + WAIT;
    while entry_on(c, i, user).await.is_some() != online {
        assert!(
            tokio::time::Instant::now() < deadline,
            "replica {i} never showed user {user} online={online}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The next friend-status push, skipping anything else.
async fn next_status(client: &mut support::TestClient) -> (u64, Option<Status>) {
    loop {
        match tokio::time::timeout(WAIT, client.push()).await {
            Ok(Some(GatewayMessage::FriendStatus { user, status })) => return (user, status),
            Ok(Some(_)) => continue,
            other => panic!("no friend status push: {other:?}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logins_go_on_while_a_replica_is_down_and_it_is_rebuilt_when_back() {
    let mut c = two_replicas().await;
    let a = c.user("alice", "pa").await;
    let b = c.user("bob", "pb").await;
    let carol = c.user("carol", "pc").await;
    c.befriend(a, b).await;
    let mut alice = c.login("alice", "pa").await.unwrap();
    // The login view starts the watches of the friends' status.
    assert!(matches!(
        alice.call(Call::LoginView).await,
        Ok(Reply::LoginView { .. })
    ));
    for i in 0..2 {
        until_on(&c, i, a, true).await;
    }

    // The first replica (the primary) dies: logins and status go on.
    c.presence[0].kill();
    let _carol = c
        .login("carol", "pc")
        .await
        .expect("a login with one replica down");
    let bob = c
        .login("bob", "pb")
        .await
        .expect("a login with one replica down");
    assert_eq!(next_status(&mut alice).await, (b, Some(Status::Online)));
    until_on(&c, 1, carol, true).await;
    assert!(matches!(
        alice.call(Call::LoginView).await,
        Ok(Reply::LoginView { online, .. }) if online.iter().any(|(user, _)| *user == b)
    ));

    // Back on the same address, empty: the gateway's sync refills it.
    c.presence[0].restart();
    for user in [a, b, carol] {
        until_on(&c, 0, user, true).await;
    }

    // The other replica paused (SIGSTOP): the primary serves alone.
    c.presence[1]
        .process
        .as_ref()
        .unwrap()
        .signal(libc::SIGSTOP);
    bob.client.close();
    assert_eq!(next_status(&mut alice).await, (b, None));
    c.presence[1]
        .process
        .as_ref()
        .unwrap()
        .signal(libc::SIGCONT);
    until_on(&c, 1, b, false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_gateway_s_users_go_offline_everywhere_and_friends_are_told() {
    let c = two_replicas().await;
    let a = c.user("alice", "pa").await;
    let b = c.user("bob", "pb").await;
    c.befriend(a, b).await;
    let second = c.second_gateway(2);
    let mut bob = c
        .login_at(second.addr, "bob", "pb")
        .await
        .expect("bob on gateway 2");
    // The login view starts the watches of the friends' status.
    assert!(matches!(
        bob.call(Call::LoginView).await,
        Ok(Reply::LoginView { .. })
    ));
    let _alice = c.login("alice", "pa").await.unwrap();
    assert_eq!(next_status(&mut bob).await, (a, Some(Status::Online)));
    for i in 0..2 {
        until_on(&c, i, a, true).await;
    }

    // Gateway 1 is killed: after the lease and the grace period, alice is
    // offline on both replicas and bob (on gateway 2) is told.
    c.gateway.signal(libc::SIGKILL);
    assert_eq!(next_status(&mut bob).await, (a, None));
    for p in &c.presence {
        let addr = p.addr().to_string();
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let answer =
                presence::client::request_once(&addr, RequestBody::Lookup { users: vec![a] }).await;
            if let Ok(ResponseBody::Entries { entries }) = &answer {
                if entries == &vec![None] {
                    break;
                }
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "alice still online on {addr}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}
