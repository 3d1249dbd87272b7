//! The gateway's delivery promises (docs/PROTOCOL.md §6.4, the module doc
//! of `gateway::router`), end to end with real processes: the gateway is a
//! real `gateway` process, shards are real `msgstore` processes where a
//! test kills or pauses one, clients speak the real protocol over UDP (raw
//! [`TestClient`]s, or the SDK). One test per promise; each says which
//! failure of the gateway before protocol v2 it guards against.

use crate::support;

use crate::support::{Cluster, Options, TestClient};
use client::sdk::{self, Connection, ImEvent, SdkError};
use proto::app::{
    AppError, AppErrorCode, Call, Delivery, GatewayMessage, LoginAnswer, LoginError, Reply,
    SendOutcome,
};
use std::{
    future::Future,
    pin::Pin,
    sync::{Arc, Mutex},
    task::Poll,
    time::Duration,
};

/// Rate limits out of the way: these tests are about delivery, not rates.
const FAST: &str = "[limits]\nmessages_per_user_per_s = 100000\nmessages_burst = 100000\n";

/// A guard against a hang, never a timing assertion.
const HANG: Duration = Duration::from_secs(30);

fn options(shards: usize) -> Options {
    Options {
        shards,
        gateway_toml: Some(FAST.into()),
        ..Options::default()
    }
}

fn sent(seq: u64) -> Result<Reply, AppError> {
    Ok(Reply::Sent(SendOutcome { seq }))
}

fn code(r: Result<Reply, AppError>) -> AppErrorCode {
    match r {
        Err(e) => e.code,
        Ok(reply) => panic!("expected an error, got {reply:?}"),
    }
}

fn bodies(shown: &[Delivery]) -> Vec<String> {
    shown
        .iter()
        .map(|d| String::from_utf8(d.body.clone()).unwrap())
        .collect()
}

type SendFuture<'a> = Pin<Box<dyn Future<Output = Result<SendOutcome, SdkError>> + Send + 'a>>;

/// Send every body to `to` on `conn` in this order without waiting for
/// answers in between (the SDK pipelines them); the answers, in the same
/// order. Each `send` is polled once, in order, before any is awaited, so
/// they enter the connection's outbox in the order given. `on_answer` is
/// called with the number answered so far as each answer comes, inside
/// the poll that saw it (a test acts at an exact point of the stream).
async fn send_all(
    conn: &Connection,
    to: u64,
    bodies: Vec<Vec<u8>>,
    mut on_answer: impl FnMut(usize),
) -> Vec<Result<SendOutcome, SdkError>> {
    let mut answered = 0;
    let mut sends: Vec<SendFuture<'_>> = bodies
        .into_iter()
        .map(|body| Box::pin(conn.send(to, body)) as SendFuture<'_>)
        .collect();
    let mut results: Vec<Option<Result<SendOutcome, SdkError>>> = vec![None; sends.len()];
    std::future::poll_fn(|cx| {
        let mut waiting = false;
        for (send, result) in sends.iter_mut().zip(results.iter_mut()) {
            if result.is_some() {
                continue;
            }
            match send.as_mut().poll(cx) {
                Poll::Ready(r) => {
                    *result = Some(r);
                    answered += 1;
                    on_answer(answered);
                }
                Poll::Pending => waiting = true,
            }
        }
        if waiting {
            Poll::Pending
        } else {
            Poll::Ready(())
        }
    })
    .await;
    results.into_iter().map(|r| r.expect("answered")).collect()
}

/// The seqs of answers that must all be `Sent`.
fn seqs(answers: Vec<Result<SendOutcome, SdkError>>) -> Vec<u64> {
    answers
        .into_iter()
        .enumerate()
        .map(|(i, a)| match a {
            Ok(SendOutcome { seq }) => seq,
            Err(e) => panic!("send {i}: {e}"),
        })
        .collect()
}

/// Wait (guarded) until `done` holds, checking every few milliseconds.
async fn wait_until(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + HANG;
    while !done() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{what}: not within {HANG:?}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Log in and show everything once: the mailbox is empty (nothing shown
/// again after the last session acknowledged it).
async fn assert_nothing_shown_again(c: &Cluster, user: &str, password: &str) {
    let (conn, mut events) = c.sdk(user, password).await;
    let shown = support::messages_until_synced(&conn, &mut events).await;
    assert_eq!(bodies(&shown), Vec::<String>::new(), "shown again");
    conn.close().await;
}

/// Order. Guards against stores racing each other: the old gateway stored
/// (or pushed) each send in a task of its own, so messages pipelined on
/// one session could land in the mailbox, and be shown, in another order
/// than sent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelined_sends_are_stored_and_shown_in_the_order_sent() {
    let c = Cluster::start_with(options(2)).await.0;
    let a = c.user("alice", "pa").await;
    let b = c.user("bob", "pb").await;
    c.befriend(a, b).await;
    let mut alice = c.login("alice", "pa").await.unwrap();
    // Five rounds of 20 (a race shows in some runs only).
    let ids: Vec<u128> = (1..=100).collect();
    for round in ids.chunks(20) {
        // All 20 on the wire before any reply is read.
        let requests: Vec<u32> = round
            .iter()
            .map(|&msg_id| {
                alice.start(Call::Send {
                    to: b,
                    msg_id,
                    body: format!("m{msg_id}").into_bytes(),
                })
            })
            .collect();
        for (&msg_id, id) in round.iter().zip(requests) {
            assert_eq!(alice.reply(id).await, sent(msg_id as u64), "send {msg_id}");
        }
    }

    let mut bob = c.login("bob", "pb").await.unwrap();
    let (messages, last_seq, more) = bob.fetch(0, 200).await;
    assert_eq!((last_seq, more), (100, false));
    let stored: Vec<(u128, u64)> = messages.iter().map(|m| (m.msg_id, m.seq)).collect();
    let want: Vec<(u128, u64)> = ids.iter().map(|&id| (id, id as u64)).collect();
    assert_eq!(stored, want, "stored in the order sent, consecutive seqs");
    bob.client.close();

    let (bob, mut events) = c.sdk("bob", "pb").await;
    let shown = support::messages_until_synced(&bob, &mut events).await;
    let want: Vec<String> = ids.iter().map(|id| format!("m{id}")).collect();
    assert_eq!(bodies(&shown), want, "shown in the order sent");
    bob.close().await;
}

/// A paused receiver. Guards against the sender waiting for the receiver
/// (the old gateway answered `Delivered` only once the recipient's session
/// acknowledged the push, so a receiver that stopped reading held every
/// sender up) and against a message shown twice (a push given up was
/// stored as well, and came again from the mailbox).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_receiver_neither_holds_up_the_sender_nor_sees_a_message_twice() {
    let c = Cluster::start_with(options(1)).await.0;
    let a = c.user("alice", "pa").await;
    let b = c.user("bob", "pb").await;
    c.befriend(a, b).await;
    let addr = c.gateway.addr.to_string();
    let mut config = c.sdk_config(&addr, "bob", "pb");
    // Bob's application falls behind soon: its SDK stops taking pushes
    // and fetches them later.
    config.limits.events_max = 16;
    let (bob, mut bob_events) = sdk::connect(config).await.unwrap();
    let mut config = c.sdk_config(&addr, "alice", "pa");
    config.limits.outbox_max = 1024;
    let (alice, _alice_events) = sdk::connect(config).await.unwrap();

    let count = 500;
    let messages: Vec<Vec<u8>> = (0..count).map(|i| format!("m{i}").into_bytes()).collect();
    // Nobody reads bob's events meanwhile.
    let answers = tokio::time::timeout(HANG, send_all(&alice, b, messages, |_| ()))
        .await
        .expect("every send answered while the receiver does not read");
    let want: Vec<u64> = (1..=count).collect();
    assert_eq!(seqs(answers), want, "all sent, in order");

    let shown = support::messages_until_shown(&bob, &mut bob_events, count as usize).await;
    let want: Vec<String> = (0..count).map(|i| format!("m{i}")).collect();
    assert_eq!(bodies(&shown), want, "every message once, in order");
    assert!(
        bob.stats().inbox.held_dropped > 0,
        "the receiver was really behind: {:?}",
        bob.stats()
    );
    bob.close().await;
    assert_nothing_shown_again(&c, "bob", "pb").await;
    alice.close().await;
}

/// A dead shard. Guards against a send left hanging on a shard that is
/// gone (the old gateway waited for it) and against a message lost or
/// stored twice around the restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_shard_fails_sends_back_and_the_sdk_delivers_once_after_its_restart() {
    let options = Options {
        shard_processes: true,
        ..options(1)
    };
    let (c, mut shards) = Cluster::start_with(options).await;
    let a = c.user("alice", "pa").await;
    let b = c.user("bob", "pb").await;
    c.befriend(a, b).await;
    let mut raw = c.login("alice", "pa").await.unwrap();
    assert_eq!(raw.send(b, 1, b"before").await, sent(1));

    shards[0].kill(); // SIGKILL
    let reply = tokio::time::timeout(HANG, raw.send(b, 2, b"refused"))
        .await
        .expect("a send to a dead shard is answered, not left hanging");
    assert_eq!(code(reply), AppErrorCode::Unavailable);
    raw.client.close();

    let (alice, _alice_events) = c.sdk("alice", "pa").await;
    let sending = {
        let alice = alice.clone();
        tokio::spawn(async move { alice.send(b, b"kept".to_vec()).await })
    };
    // Refused at least once (and kept in the outbox) before the restart.
    wait_until("the SDK re-sends after Unavailable", || {
        alice.stats().sends_reissued >= 1
    })
    .await;
    assert!(!sending.is_finished(), "the message is kept, not failed");
    shards[0].restart();
    let outcome = tokio::time::timeout(HANG, sending)
        .await
        .expect("sent after the restart")
        .unwrap();
    assert_eq!(outcome, Ok(SendOutcome { seq: 2 }));

    let mut bob = c.login("bob", "pb").await.unwrap();
    let (messages, _, more) = bob.fetch(0, 200).await;
    assert!(!more);
    let stored: Vec<(u64, &[u8])> = messages
        .iter()
        .map(|m| (m.seq, m.body.as_slice()))
        .collect();
    assert_eq!(
        stored,
        [(1, &b"before"[..]), (2, &b"kept"[..])],
        "stored once"
    );
    bob.client.close();
    let (bob, mut events) = c.sdk("bob", "pb").await;
    let shown = support::messages_until_synced(&bob, &mut events).await;
    assert_eq!(bodies(&shown), ["before", "kept"], "shown once");
    bob.close().await;
    alice.close().await;
}

/// A paused shard. Guards against a send waiting as long as the shard is
/// stopped (the old gateway had no bound on the answer) and against a retry
/// storing a second copy while the first store is still on its way.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_shard_is_answered_unavailable_in_time_and_a_retry_stores_nothing_twice() {
    let options = Options {
        shard_processes: true,
        gateway_toml: Some(format!("{FAST}[timers]\nsend_answer_ms_max = 1000\n")),
        metrics: true,
        ..options(1)
    };
    let (c, shards) = Cluster::start_with(options).await;
    let a = c.user("alice", "pa").await;
    let b = c.user("bob", "pb").await;
    c.befriend(a, b).await;
    let mut alice = c.login("alice", "pa").await.unwrap();
    assert_eq!(alice.send(b, 1, b"before").await, sent(1));

    shards[0].pause(); // SIGSTOP
    let reply = tokio::time::timeout(HANG, alice.send(b, 2, b"paused"))
        .await
        .expect("a send to a stopped shard is answered");
    shards[0].resume(); // SIGCONT
    assert_eq!(code(reply), AppErrorCode::Unavailable);
    assert_eq!(
        c.metric("gateway_send_answer_timeouts_total").await,
        1.0,
        "answered at send_answer_ms_max"
    );

    // The same message again: the store still in flight (or done by now)
    // answers it; nothing is stored again.
    assert_eq!(alice.send(b, 2, b"paused").await, sent(2));
    let mut bob = c.login("bob", "pb").await.unwrap();
    let (messages, _, _) = bob.fetch(0, 200).await;
    let copies: Vec<u64> = messages
        .iter()
        .filter(|m| m.msg_id == 2)
        .map(|m| m.seq)
        .collect();
    assert_eq!(copies, [2], "one stored copy");
    assert_eq!(messages.len(), 2);
}

/// Who may write. Guards against the old gateway's rules (anyone could
/// write to anyone, blocks were not applied, a disabled account still
/// collected messages) and against a round trip to the profile service per
/// message (relations are cached, and dropped at once when a call through
/// the gateway changes them).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_friends_who_are_not_blocked_may_write_and_relations_are_cached() {
    let options = Options {
        metrics: true,
        ..options(1)
    };
    let c = Cluster::start_with(options).await.0;
    let pc = &c.profile_client;
    let alice = c.user("alice", "pa").await;
    let bob = c.user("bob", "pb").await;
    let carol = c.user("carol", "pc").await;
    let dave = c.user("dave", "pd").await;
    let erin = c.user("erin", "pe").await;
    let frank = c.user("frank", "pf").await;
    c.befriend(alice, bob).await;
    c.befriend(dave, bob).await;
    pc.block(bob, dave).await.unwrap();
    c.befriend(alice, erin).await;
    pc.set_disabled(erin, true).await.unwrap();
    c.befriend(alice, frank).await;
    let mut a = c.login("alice", "pa").await.unwrap();

    // 50 sends to a recipient whose relations are not cached yet, all on
    // the wire at once: one read of its relations (two at most, should a
    // push of the profile service come between).
    let before = c.metric("gateway_relation_reads_total").await;
    let requests: Vec<u32> = (0..50u128)
        .map(|i| {
            a.start(Call::Send {
                to: frank,
                msg_id: 100 + i,
                body: b"hi".to_vec(),
            })
        })
        .collect();
    for (i, id) in requests.into_iter().enumerate() {
        assert_eq!(a.reply(id).await, sent(i as u64 + 1), "send {i}");
    }
    let reads = c.metric("gateway_relation_reads_total").await - before;
    assert!(reads <= 2.0, "{reads} relation reads for 50 sends");

    let mut carol_client = c.login("carol", "pc").await.unwrap();
    let mut dave_client = c.login("dave", "pd").await.unwrap();
    let stranger = carol_client.send(bob, 1, b"hello?").await;
    let blocked = dave_client.send(bob, 2, b"hello?").await;
    assert_eq!(code(stranger.clone()), AppErrorCode::NotAllowed);
    assert_eq!(
        blocked, stranger,
        "a blocked friend is told what a stranger is"
    );
    assert_eq!(
        code(a.send(999_999_999, 3, b"hello?").await),
        AppErrorCode::UnknownUser
    );
    assert_eq!(
        code(a.send(erin, 4, b"hello?").await),
        AppErrorCode::RecipientDisabled
    );
    let shard = msgstore::client::ShardClient::connect(c.services.shards[0].local_addr())
        .await
        .unwrap();
    assert_eq!(shard.user_stats(erin).await.unwrap().last_seq, 0);
    let mut bob_client = c.login("bob", "pb").await.unwrap();
    assert_eq!(
        bob_client.fetch(0, 200).await,
        (vec![], 0, false),
        "nothing refused was stored"
    );

    let request = Call::FriendRequest {
        to_username: "bob".into(),
        group: "Friends".into(),
    };
    assert_eq!(carol_client.call(request).await, Ok(Reply::Done));
    let accept = Call::FriendAccept {
        from: carol,
        group: "Friends".into(),
    };
    assert_eq!(bob_client.call(accept).await, Ok(Reply::Done));
    assert_eq!(
        carol_client.send(bob, 5, b"friends now").await,
        sent(1),
        "a new friend may write at once"
    );
}

/// Wait for `ProfileChanged{user}`; a `ProfileChanged` for anyone else
/// before it fails.
async fn profile_changed(client: &mut TestClient, user: u64) {
    loop {
        match client.push().await {
            Some(GatewayMessage::ProfileChanged { user: u, .. }) if u == user => return,
            Some(GatewayMessage::ProfileChanged { user: u, .. }) => {
                panic!("ProfileChanged for {u} while waiting for {user}")
            }
            Some(_) => {}
            None => panic!("session closed"),
        }
    }
}

/// Profile changes reach friends. Guards against `ProfileChanged` going
/// only to the user's own session (friends showed a stale nickname) and
/// against it going to sessions that do not watch the user.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn profile_changes_are_pushed_to_friends_watching_and_nobody_else() {
    let c = Cluster::start_with(options(1)).await.0;
    let a = c.user("alice", "pa").await;
    let b = c.user("bob", "pb").await;
    let cc = c.user("carol", "pc").await;
    c.befriend(a, b).await;
    let mut bob = c.login("bob", "pb").await.unwrap();
    let mut carol = c.login("carol", "pc").await.unwrap();
    for client in [&mut bob, &mut carol] {
        assert!(matches!(
            client.call(Call::LoginView).await,
            Ok(Reply::LoginView { .. })
        ));
    }
    let mut alice = c.login("alice", "pa").await.unwrap();
    let nickname = |name: &str| Call::SetProfile {
        nickname: Some(name.into()),
        signature: None,
    };
    assert_eq!(alice.call(nickname("Ally")).await, Ok(Reply::Done));

    profile_changed(&mut alice, a).await;
    profile_changed(&mut bob, a).await;
    // Carol's own change comes after alice's (profile pushes them in
    // order), so had alice's reached carol, it would come first.
    assert_eq!(carol.call(nickname("Cee")).await, Ok(Reply::Done));
    profile_changed(&mut carol, cc).await;
}

/// Tokens. Guards against tokens that were equal for two logins in the
/// same second (the old token had no nonce) and against a changed password
/// or a disabled account leaving sessions open and old tokens valid.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_are_unique_and_revoked_by_a_password_change_or_a_disable() {
    let c = Cluster::start_with(options(1)).await.0;
    let a = c.user("alice", "pa").await;
    let first = c.login("alice", "pa").await.unwrap();
    let token = first.login.resume_token.clone();
    let now_s = || {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs()
    };
    let (mut one, mut two);
    let mut tries = 0;
    loop {
        let at = now_s();
        one = c.resume(&token).await.expect("resume");
        two = c.resume(&token).await.expect("resume");
        tries += 1;
        if now_s() == at || tries == 5 {
            break;
        }
    }
    assert_eq!(one.login.resume_token.len(), 72);
    assert_ne!(
        one.login.resume_token, two.login.resume_token,
        "two logins in the same second get different tokens"
    );
    drop(one);

    // A password change closes the open session and revokes its token.
    let old_token = two.login.resume_token.clone();
    c.profile_client.set_password(a, b"new-pw").await.unwrap();
    tokio::time::timeout(HANG, two.closed())
        .await
        .expect("the session is closed");
    let refused = |r: Result<TestClient, LoginAnswer>| match r {
        Err(LoginAnswer::Refused { code, .. }) => code,
        Ok(client) => panic!("logged in: {:?}", client.login),
        Err(other) => panic!("{other:?}"),
    };
    assert_eq!(refused(c.resume(&old_token).await), LoginError::BadToken);
    assert_eq!(
        refused(c.login("alice", "pa").await),
        LoginError::WrongCredentials
    );
    let mut fresh = c.login("alice", "new-pw").await.expect("the new password");
    let fresh_token = fresh.login.resume_token.clone();

    // A disable closes the session; no login of any kind is taken.
    c.profile_client.set_disabled(a, true).await.unwrap();
    tokio::time::timeout(HANG, fresh.closed())
        .await
        .expect("the session is closed");
    assert_eq!(
        refused(c.login("alice", "new-pw").await),
        LoginError::AccountDisabled
    );
    assert_eq!(
        refused(c.resume(&fresh_token).await),
        LoginError::AccountDisabled
    );
}

/// A gateway killed mid-stream. Guards against a message lost or shown
/// twice around the failover (stored by the dead gateway, its answer lost,
/// re-sent through the other) and against messages shown out of order
/// (the old client showed pushes as they arrived, so a message re-sent
/// through the surviving gateway could overtake one the dead gateway had
/// stored or forwarded).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_killed_mid_stream_loses_nothing_and_shows_nothing_twice() {
    let c = Cluster::start_with(options(2)).await.0;
    let second = c.second_gateway(2);
    let a = c.user("alice", "pa").await;
    let b = c.user("bob", "pb").await;
    c.befriend(a, b).await;
    let both = format!("{},{}", c.gateway.addr, second.addr);
    let mut config = c.sdk_config(&both, "alice", "pa");
    // Notice the dead gateway in about a second.
    config.session.session.keepalive = Duration::from_millis(200);
    config.session.session.idle_timeout = Duration::from_millis(1500);
    config.session.handshake_timeout = Duration::from_secs(1);
    let (alice, _alice_events) = sdk::connect(config).await.unwrap();
    let (doomed, other) = if alice.gateway() == c.gateway.addr {
        (&c.gateway, &second)
    } else {
        (&second, &c.gateway)
    };
    let config = c.sdk_config(&other.addr.to_string(), "bob", "pb");
    let (bob, mut bob_events) = sdk::connect(config).await.unwrap();
    let shown: Arc<Mutex<Vec<Delivery>>> = Arc::default();
    let reader = {
        let shown = shown.clone();
        tokio::spawn(async move {
            while let Some(event) = bob_events.recv().await {
                if let ImEvent::Message(d) = event {
                    shown.lock().unwrap().push(d);
                }
            }
        })
    };

    // The gateway dies the moment the tenth answer arrives, with the
    // other 190 sends in flight (polling a counter from another task
    // instead let all 200 be answered first, once).
    let count = 200;
    let messages: Vec<Vec<u8>> = (0..count).map(|i| format!("m{i}").into_bytes()).collect();
    let kill_at_tenth = |answered: usize| {
        if answered == 10 {
            doomed.signal(libc::SIGKILL);
        }
    };
    let answers = tokio::time::timeout(HANG, send_all(&alice, b, messages, kill_at_tenth))
        .await
        .expect("every send answered after the failover");
    for (i, answer) in answers.iter().enumerate() {
        assert!(answer.is_ok(), "send {i}: {answer:?}");
    }
    assert!(alice.stats().reconnects >= 1, "alice moved");
    assert_eq!(alice.gateway(), other.addr);

    wait_until("every message shown", || {
        shown.lock().unwrap().len() >= count
    })
    .await;
    tokio::time::timeout(HANG, bob.synced())
        .await
        .expect("synced")
        .unwrap();
    bob.close().await;
    reader.await.unwrap();
    let want: Vec<String> = (0..count).map(|i| format!("m{i}")).collect();
    assert_eq!(
        bodies(&shown.lock().unwrap()),
        want,
        "all shown once, in the order sent"
    );
    alice.close().await;
}

/// A replicated shard losing its leader. The map's one shard is a group of
/// three `msgstore` processes. A sender's first hundred messages are
/// stored; then the group's leader is SIGKILLed and the next hundred are
/// sent at once, while the group has no leader (it is restarted half a
/// second later). The gateway follows `NotLeader` to the new leader and
/// tries the replicas in turn meanwhile; a send answered `Unavailable` is
/// re-sent by the SDK. Every message ends `Sent`, and the receiver is
/// shown each once, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shard_group_losing_its_leader_keeps_every_message_and_shows_it_once() {
    let options = Options {
        shard_group: true,
        metrics: true,
        ..options(1)
    };
    let (mut c, _) = Cluster::start_with(options).await;
    let a = c.user("alice", "pa").await;
    let b = c.user("bob", "pb").await;
    c.befriend(a, b).await;
    let (alice, _alice_events) = c.sdk("alice", "pa").await;
    let bodies_sent: Vec<String> = (0..200).map(|i| format!("m{i}")).collect();
    let as_bytes = |r: std::ops::Range<usize>| -> Vec<Vec<u8>> {
        bodies_sent[r]
            .iter()
            .map(|b| b.clone().into_bytes())
            .collect()
    };
    seqs(send_all(&alice, b, as_bytes(0..100), |_| ()).await);

    let group = c.group.as_mut().expect("a shard group");
    let leader = group.wait_for_leader(HANG).await;
    group.replicas[leader].kill();
    let restart = async {
        tokio::time::sleep(Duration::from_millis(500)).await;
        group.replicas[leader].start();
    };
    let sends = tokio::time::timeout(HANG * 2, send_all(&alice, b, as_bytes(100..200), |_| ()));
    let (answers, ()) = tokio::join!(sends, restart);
    seqs(answers.expect("every send answered"));
    // The loss was felt: the gateway went looking for the new leader, or a
    // send was refused (its link to the dead leader broke) and re-sent.
    let reissued = alice.stats().sends_reissued;
    alice.close().await;
    let switched = c.metric("gateway_shard_replica_switches_total").await
        + c.metric("gateway_shard_not_leader_total").await;
    assert!(
        switched > 0.0 || reissued > 0,
        "the leader's death went unnoticed: was it killed?"
    );

    let (bob, mut events) = c.sdk("bob", "pb").await;
    let shown = support::messages_until_synced(&bob, &mut events).await;
    assert_eq!(bodies(&shown), bodies_sent, "each shown once, in order");
    bob.close().await;
}
