//! The whole system end to end on loopback: log in, see friends and who is
//! online, send messages that arrive whether the friend is online or not,
//! exactly once and in order (stored first, answered with their seq, then
//! pushed with it).

use crate::support;

use crate::support::{Cluster, TestClient};
use proto::{
    app::{
        AppErrorCode, Call, GatewayMessage, LoginAnswer, LoginError, LoginMethod, Reply,
        SendOutcome, BODY_BYTES_MAX,
    },
    presence::Status,
};

fn sent(seq: u64) -> Result<Reply, proto::app::AppError> {
    Ok(Reply::Sent(SendOutcome { seq }))
}

fn delivered(push: Option<GatewayMessage>) -> proto::app::Delivery {
    match push {
        Some(GatewayMessage::Deliver(d)) => d,
        other => panic!("expected a delivery, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logins_are_checked_and_tokens_resume() {
    let c = Cluster::start(1).await;
    c.user("alice", "alice-pw").await;
    match c.login("alice", "wrong").await {
        Err(LoginAnswer::Refused { code, .. }) => assert_eq!(code, LoginError::WrongCredentials),
        other => panic!("wrong password accepted? {:?}", other.map(|c| c.login)),
    }
    match c.login("nobody", "x").await {
        Err(LoginAnswer::Refused { code, .. }) => assert_eq!(code, LoginError::WrongCredentials),
        other => panic!("unknown user accepted? {:?}", other.map(|c| c.login)),
    }
    let alice = c.login("alice", "alice-pw").await.expect("right password");
    let token = alice.login.resume_token.clone();
    let again = TestClient::connect(
        c.gateway.addr,
        c.gateway_public,
        LoginMethod::Resume {
            token: token.clone(),
        },
    )
    .await
    .expect("a resume token logs in");
    assert_eq!(again.login.user, alice.login.user);
    let mut forged = token;
    forged[10] ^= 1;
    match TestClient::connect(
        c.gateway.addr,
        c.gateway_public,
        LoginMethod::Resume { token: forged },
    )
    .await
    {
        Err(LoginAnswer::Refused { code, .. }) => assert_eq!(code, LoginError::BadToken),
        other => panic!("forged token accepted? {:?}", other.map(|c| c.login)),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn online_messages_arrive_once_in_order_with_their_seq() {
    let c = Cluster::start(2).await;
    let a = c.user("alice", "pa").await;
    let b = c.user("bob", "pb").await;
    c.befriend(a, b).await;
    let mut alice = c.login("alice", "pa").await.unwrap();
    let mut bob = c.login("bob", "pb").await.unwrap();
    for i in 0..20u128 {
        let reply = alice
            .send(b, 1000 + i, format!("hello {i}").as_bytes())
            .await;
        assert_eq!(reply, sent(i as u64 + 1), "message {i}");
    }
    for i in 0..20u128 {
        let d = delivered(bob.push().await);
        assert_eq!(
            (d.from, d.msg_id, d.seq, d.body),
            (a, 1000 + i, i as u64 + 1, format!("hello {i}").into_bytes())
        );
    }
    // A retry of a sent message gets the same answer and no second copy.
    assert_eq!(alice.send(b, 1005, b"hello 5").await, sent(6));
    assert_eq!(alice.send(b, 2000, b"after").await, sent(21));
    let d = delivered(bob.push().await);
    assert_eq!(
        (d.msg_id, d.seq),
        (2000, 21),
        "the retry was neither stored nor pushed again"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn offline_messages_are_stored_and_fetched_at_login() {
    let c = Cluster::start(3).await;
    let a = c.user("alice", "pa").await;
    let b = c.user("bob", "pb").await;
    c.befriend(a, b).await;
    let mut alice = c.login("alice", "pa").await.unwrap();
    let mut seqs = Vec::new();
    for i in 0..10u128 {
        match alice.send(b, i + 1, format!("m{i}").as_bytes()).await {
            Ok(Reply::Sent(SendOutcome { seq })) => seqs.push(seq),
            other => panic!("expected sent, got {other:?}"),
        }
    }
    assert_eq!(seqs, (1..=10).collect::<Vec<_>>());
    // A retry of a stored message is answered the same and stored once.
    assert_eq!(alice.send(b, 3, b"m2").await, sent(3));
    let mut bob = c.login("bob", "pb").await.unwrap();
    assert_eq!(
        (bob.login.mailbox_count, bob.login.mailbox_high_seq),
        (10, 10)
    );
    let (messages, last_seq, more) = bob.fetch(0, 4).await;
    assert!(more);
    assert_eq!(last_seq, 4);
    let bodies: Vec<_> = messages
        .iter()
        .map(|m| String::from_utf8(m.body.clone()).unwrap())
        .collect();
    assert_eq!(bodies, ["m0", "m1", "m2", "m3"]);
    assert_eq!(
        bob.call(Call::Ack { up_to_seq: 4 }).await,
        Ok(Reply::Acked { removed: 4 })
    );
    let (messages, last_seq, more) = bob.fetch(4, 100).await;
    assert!(!more);
    assert_eq!(last_seq, 10);
    assert_eq!(
        messages.iter().map(|m| m.seq).collect::<Vec<_>>(),
        (5..=10).collect::<Vec<_>>()
    );
    assert_eq!(
        bob.call(Call::Ack { up_to_seq: 10 }).await,
        Ok(Reply::Acked { removed: 6 })
    );
    assert_eq!(bob.fetch(10, 100).await, (vec![], 0, false));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn friends_and_their_status_are_shown_and_pushed() {
    let c = Cluster::start(1).await;
    let a = c.user("alice", "pa").await;
    let b = c.user("bob", "pb").await;
    c.befriend(a, b).await;
    let mut alice = c.login("alice", "pa").await.unwrap();
    let view = alice.call(Call::LoginView).await;
    let Ok(Reply::LoginView { view, online }) = view else {
        panic!("{view:?}")
    };
    assert_eq!(view.profile.user, a);
    assert_eq!(view.groups[0].friends[0].user, b);
    assert!(online.is_empty(), "bob is offline");
    let bob = c.login("bob", "pb").await.unwrap();
    assert_eq!(
        alice.push().await,
        Some(GatewayMessage::FriendStatus {
            user: b,
            status: Some(Status::Online)
        })
    );
    bob.client.close();
    assert_eq!(
        alice.push().await,
        Some(GatewayMessage::FriendStatus {
            user: b,
            status: None
        })
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_login_kicks_the_first() {
    let c = Cluster::start(1).await;
    c.user("alice", "pa").await;
    let mut first = c.login("alice", "pa").await.unwrap();
    let _second = c.login("alice", "pa").await.unwrap();
    assert_eq!(first.push().await, Some(GatewayMessage::Kicked));
    assert_eq!(first.next().await, None, "the kicked session is closed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_sends_get_typed_errors_and_garbage_is_dropped() {
    let c = Cluster::start(1).await;
    let a = c.user("alice", "pa").await;
    let b = c.user("bob", "pb").await;
    c.befriend(a, b).await;
    let mut alice = c.login("alice", "pa").await.unwrap();
    let too_big = vec![b'x'; BODY_BYTES_MAX + 1];
    assert_eq!(
        alice.send(b, 1, &too_big).await.unwrap_err().code,
        AppErrorCode::MessageTooLarge
    );
    assert_eq!(
        alice.send(999_999, 2, b"hi").await.unwrap_err().code,
        AppErrorCode::UnknownUser
    );
    // Undecodable application messages inside a good session: dropped
    // (counted), the session and the gateway carry on.
    for junk in [vec![0xff; 10], vec![0x00], vec![0x01, 0x0c, 0x00, 0x99]] {
        alice.client.send(junk).unwrap();
    }
    assert!(matches!(
        alice.call(Call::Profiles { users: vec![b] }).await,
        Ok(Reply::Profiles(_))
    ));
    // Garbage datagrams at the gateway: dropped, and service continues.
    let junk = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    for i in 0..200u32 {
        let mut d = vec![(i % 7) as u8; 1 + (i as usize * 13) % 1300];
        d[0] = (i % 6) as u8;
        junk.send_to(&d, c.gateway.addr).await.unwrap();
    }
    assert_eq!(alice.send(b, 3, b"still here").await, sent(1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_cross_gateways_through_the_peer_link() {
    let c = Cluster::start(2).await;
    let second = c.second_gateway(2);
    let a = c.user("alice", "pa").await;
    let b = c.user("bob", "pb").await;
    c.befriend(a, b).await;
    let mut alice = c.login("alice", "pa").await.unwrap();
    let mut bob = c.login_at(second.addr, "bob", "pb").await.unwrap();
    for i in 0..10u128 {
        let reply = alice
            .send(b, 500 + i, format!("across {i}").as_bytes())
            .await;
        assert_eq!(reply, sent(i as u64 + 1), "message {i}");
    }
    // Each forward is its own task (a presence lookup, then the peer link),
    // so pushes may overtake each other; each carries its seq, by which
    // clients show them (proto::inbox).
    let mut pushed: Vec<(u64, u128, u64)> = Vec::new();
    for _ in 0..10 {
        let d = delivered(bob.push().await);
        pushed.push((d.seq, d.msg_id, d.from));
    }
    pushed.sort_unstable();
    let want: Vec<(u64, u128, u64)> = (0..10u128).map(|i| (i as u64 + 1, 500 + i, a)).collect();
    assert_eq!(pushed, want, "each pushed once, with its seq");
    // And back.
    assert_eq!(bob.send(a, 900, b"reply").await, sent(1));
    assert_eq!(delivered(alice.push().await).body, b"reply");
    // Bob leaves: the next message is stored, and fetched at his next login.
    bob.client.close();
    assert_eq!(alice.send(b, 1000, b"later").await, sent(11));
    let mut bob = c.login("bob", "pb").await.unwrap();
    let (messages, _, more) = bob.fetch(10, 100).await;
    assert!(!more);
    assert_eq!(
        messages
            .iter()
            .map(|m| (m.msg_id, m.seq))
            .collect::<Vec<_>>(),
        [(1000, 11)]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cached_profiles_are_refreshed_when_they_change() {
    let c = Cluster::start(1).await;
    c.user("alice", "pa").await;
    let b = c.user("bob", "pb").await;
    let mut alice = c.login("alice", "pa").await.unwrap();
    let mut bob = c.login("bob", "pb").await.unwrap();
    let nickname = |r: Result<Reply, proto::app::AppError>| match r {
        Ok(Reply::Profiles(p)) => p[0].nickname.clone(),
        other => panic!("{other:?}"),
    };
    let before = nickname(alice.call(Call::Profiles { users: vec![b] }).await);
    let set = Call::SetProfile {
        nickname: Some("Bobby".into()),
        signature: None,
    };
    assert_eq!(bob.call(set).await, Ok(Reply::Done));
    assert!(
        matches!(bob.push().await, Some(GatewayMessage::ProfileChanged { user, .. }) if user == b)
    );
    assert_ne!(before, "Bobby");
    assert_eq!(
        nickname(alice.call(Call::Profiles { users: vec![b] }).await),
        "Bobby"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_per_user_message_rate_is_limited() {
    let c = Cluster::start(1).await;
    let a = c.user("alice", "pa").await;
    let b = c.user("bob", "pb").await;
    c.befriend(a, b).await;
    let config = c.dir.path().join("limited.toml");
    std::fs::write(
        &config,
        "[limits]\nmessages_per_user_per_s = 1\nmessages_burst = 5\n",
    )
    .unwrap();
    let limited_data = c.dir.path().join("limited");
    let limited = support::start_gateway_with(
        c.dir.path(),
        3,
        &limited_data,
        &["--config", config.to_str().unwrap()],
    );
    let public = std::fs::read_to_string(limited_data.join("gateway.pub")).unwrap();
    let method = LoginMethod::Password {
        username: "alice".into(),
        password: "pa".into(),
    };
    let mut alice = TestClient::connect(
        limited.addr,
        gateway::keys::from_hex(&public).unwrap(),
        method,
    )
    .await
    .unwrap();
    let mut limited_count = 0;
    for i in 0..12u128 {
        match alice.send(b, 100 + i, b"quick").await {
            Ok(Reply::Sent(_)) => {}
            Err(e) if e.code == AppErrorCode::RateLimited => limited_count += 1,
            other => panic!("{other:?}"),
        }
    }
    assert!(
        limited_count >= 5,
        "a burst of 5 then 1/s: {limited_count} of 12 limited"
    );
}
