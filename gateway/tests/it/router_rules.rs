//! The router's rules, one scripted scenario each, in the deterministic
//! world of `sim` (virtual time, model services, model clients following
//! docs/PROTOCOL.md §6.4).

use crate::sim::{Health, World, MS};
use proto::{
    app::{AppErrorCode, GatewayMessage},
    profile::Relations,
};
use std::time::Duration;

const A: u64 = 1;
const B: u64 = 2;
const C: u64 = 3;

/// A and B, friends, both on gateway 0.
fn pair(seed: u64) -> World {
    let mut w = World::new(seed, 1);
    w.user(A, 0);
    w.user(B, 0);
    w.befriend(A, B);
    w
}

fn online(w: &mut World, users: &[u64]) {
    for &u in users {
        w.login(u);
    }
    let ok = w.run_until(Duration::from_secs(5), |w| {
        users.iter().all(|u| w.clients[u].session().is_some())
    });
    assert!(ok, "logged in: {}", w.describe());
}

fn shown_ids(w: &World, user: u64) -> Vec<u128> {
    w.clients[&user].shown.iter().map(|d| d.msg_id).collect()
}

#[test]
fn pipelined_sends_to_an_offline_user_are_stored_and_shown_in_order() {
    for seed in 0..20 {
        let mut w = pair(seed);
        w.faults.latency_ms = (0, 20); // answers overtake each other
        online(&mut w, &[A]);
        let ids: Vec<u128> = (0..40)
            .map(|i| w.send(A, B, format!("m{i}").as_bytes()))
            .collect();
        w.run_until(Duration::from_secs(10), |w| w.clients[&A].outbox_len() == 0);
        let stored: Vec<u128> = w.mailboxes[&B].records.iter().map(|r| r.msg_id).collect();
        assert_eq!(stored, ids, "seed {seed}: stored in the order sent");
        online(&mut w, &[B]);
        w.settle();
        assert_eq!(
            shown_ids(&w, B),
            ids,
            "seed {seed}: shown in the order sent"
        );
        w.check_invariants();
    }
}

#[test]
fn online_messages_are_stored_first_then_pushed_with_their_seq() {
    let mut w = pair(1);
    online(&mut w, &[A, B]);
    let id = w.send(A, B, b"hi");
    w.run_until(Duration::from_secs(2), |w| !w.clients[&B].shown.is_empty());
    let d = &w.clients[&B].shown[0];
    assert_eq!((d.msg_id, d.seq), (id, 1));
    assert_eq!(w.clients[&A].sent[&id], 1, "the sender is told the seq");
    assert_eq!(
        w.action_counts.get("notify"),
        None,
        "pushed here, no notify"
    );
    w.settle();
    w.check_invariants();
}

#[test]
fn a_paused_receiver_neither_delays_the_sender_nor_sees_a_message_twice() {
    let mut w = pair(2);
    online(&mut w, &[A, B]);
    w.client(B).paused = true;
    let ids: Vec<u128> = (0..60).map(|i| w.send(A, B, &[i as u8; 100])).collect();
    // Answered at once, paused or not.
    w.run_until(Duration::from_secs(2), |w| w.clients[&A].outbox_len() == 0);
    assert_eq!(w.clients[&A].sent.len(), 60, "{}", w.describe());
    // The receiver stays paused past its session's timeout, then resumes:
    // it logs in again and shows everything once, in order.
    w.run_for(Duration::from_secs(8), 10 * MS);
    w.client(B).paused = false;
    w.settle();
    assert_eq!(shown_ids(&w, B), ids);
    w.check_invariants();
}

#[test]
fn pushes_a_full_session_cannot_take_are_announced_when_it_reads_again() {
    let mut w = pair(3);
    online(&mut w, &[A, B]);
    w.client(B).paused = true;
    let ids: Vec<u128> = (0..60).map(|i| w.send(A, B, &[i as u8; 100])).collect();
    w.run_for(Duration::from_secs(1), 5 * MS);
    // Resumed before its session expired: the pushes it missed come from
    // the mailbox after a MailboxChanged, without a new login.
    let session = w.clients[&B].session();
    w.client(B).paused = false;
    let all = w.run_until(Duration::from_secs(3), |w| {
        w.clients[&B].shown.len() == ids.len()
    });
    assert!(all, "{}", w.describe());
    assert_eq!(w.clients[&B].session(), session, "the same session");
    assert_eq!(shown_ids(&w, B), ids);
    w.settle();
    w.check_invariants();
}

#[test]
fn a_dead_shard_gives_unavailable_within_the_bound_and_retries_keep_order() {
    let mut w = pair(4);
    online(&mut w, &[A, B]);
    w.shard = Health::Down;
    let ids: Vec<u128> = (0..10).map(|i| w.send(A, B, &[i])).collect();
    w.run_for(Duration::from_millis(500), 5 * MS);
    assert!(w.clients[&A].sent.is_empty(), "nothing stored while down");
    assert_eq!(w.clients[&A].outbox_len(), 10, "kept for a retry");
    w.shard = Health::Up;
    w.settle();
    assert_eq!(shown_ids(&w, B), ids);
    w.check_invariants();
}

#[test]
fn a_hung_shard_is_answered_unavailable_in_time_and_nothing_is_stored_twice() {
    let mut w = pair(5);
    online(&mut w, &[A, B]);
    w.shard = Health::Hung;
    let ids: Vec<u128> = (0..10).map(|i| w.send(A, B, &[i])).collect();
    w.run_for(Duration::from_secs(6), 5 * MS);
    assert!(w.clients[&A].sent.is_empty());
    w.shard = Health::Up;
    w.settle();
    assert_eq!(shown_ids(&w, B), ids);
    w.check_invariants(); // includes: every send answered within the bound
}

#[test]
fn a_lost_store_answer_is_retried_without_a_second_copy_where_the_store_is_remembered() {
    let mut w = pair(6);
    online(&mut w, &[A, B]);
    w.faults.store_answer_lost = 1.0;
    let id = w.send(A, B, b"once");
    w.run_for(Duration::from_secs(4), 5 * MS);
    w.faults.store_answer_lost = 0.0;
    w.settle();
    let copies = w.mailboxes[&B]
        .records
        .iter()
        .filter(|r| r.msg_id == id)
        .count();
    assert!(copies >= 1);
    assert_eq!(shown_ids(&w, B), [id], "shown once whatever was stored");
    w.check_invariants();
}

#[test]
fn a_retry_of_a_message_being_stored_waits_for_the_same_store() {
    let mut w = pair(7);
    w.faults.latency_ms = (2500, 2500); // slower than the answer bound
    online(&mut w, &[A, B]);
    let id = w.send(A, B, b"slow");
    // Answered Unavailable at 2 s; the client retries; the retry joins.
    w.run_for(Duration::from_secs(4), 5 * MS);
    w.faults.latency_ms = (0, 3);
    w.settle();
    let copies = w.mailboxes[&B]
        .records
        .iter()
        .filter(|r| r.msg_id == id)
        .count();
    assert_eq!(copies, 1, "the retry did not store a second copy");
    w.check_invariants();
}

#[test]
fn strangers_blocked_unknown_and_disabled_recipients_get_typed_errors() {
    let mut w = pair(8);
    w.user(C, 0);
    online(&mut w, &[A, B, C]);
    let stranger = w.send(C, A, b"hello?");
    let unknown = w.send(A, 99, b"anyone?");
    w.change_relations(B, |r: &mut Relations| r.blocked.push(A));
    let blocked = w.send(A, B, b"let me in");
    w.run_for(Duration::from_millis(200), 5 * MS);
    w.change_relations(C, |r: &mut Relations| r.disabled = true);
    w.change_relations(A, |r: &mut Relations| r.friends.push(C));
    let disabled = w.send(A, C, b"still there?");
    w.run_for(Duration::from_millis(200), 5 * MS);
    assert_eq!(w.clients[&C].refused[&stranger], AppErrorCode::NotAllowed);
    assert_eq!(w.clients[&A].refused[&unknown], AppErrorCode::UnknownUser);
    assert_eq!(w.clients[&A].refused[&blocked], AppErrorCode::NotAllowed);
    assert_eq!(
        w.clients[&A].refused[&disabled],
        AppErrorCode::RecipientDisabled
    );
    assert!(w.mailboxes.get(&A).is_none_or(|m| m.records.is_empty()));
}

#[test]
fn who_may_write_is_decided_from_the_cache_not_per_message() {
    let mut w = pair(9);
    online(&mut w, &[A]);
    let loads_before = w.action_counts.get("relations").copied().unwrap_or(0);
    for i in 0..200u32 {
        w.send(A, B, &i.to_le_bytes());
    }
    w.run_until(Duration::from_secs(5), |w| w.clients[&A].outbox_len() == 0);
    let loads = w.action_counts["relations"] - loads_before;
    assert_eq!(loads, 1, "one relations read for 200 messages to one user");
}

#[test]
fn an_accepted_friendship_can_be_written_to_at_once_and_a_removed_one_cannot() {
    let mut w = World::new(10, 1);
    w.user(A, 0);
    w.user(B, 0);
    online(&mut w, &[A, B]);
    let early = w.send(A, B, b"before");
    w.run_for(Duration::from_millis(100), 5 * MS);
    assert_eq!(w.clients[&A].refused[&early], AppErrorCode::NotAllowed);
    // Friends now (profile pushes the invalidation).
    w.change_relations(A, |r| r.friends.push(B));
    w.change_relations(B, |r| r.friends.push(A));
    let now_ok = w.send(A, B, b"after");
    w.run_for(Duration::from_millis(100), 5 * MS);
    assert!(w.clients[&A].sent.contains_key(&now_ok));
    w.change_relations(B, |r| r.friends.clear());
    let gone = w.send(A, B, b"gone");
    w.run_for(Duration::from_millis(100), 5 * MS);
    assert_eq!(w.clients[&A].refused[&gone], AppErrorCode::NotAllowed);
}

#[test]
fn friends_watching_a_user_are_told_its_profile_changed() {
    let mut w = pair(11);
    w.user(C, 0);
    online(&mut w, &[A, B, C]);
    w.run_for(Duration::from_millis(50), 5 * MS); // login views answered
    w.change_relations(A, |r| r.version += 0);
    w.run_for(Duration::from_millis(20), 5 * MS);
    let told = |w: &World, u: u64| {
        w.clients[&u]
            .pushes
            .iter()
            .any(|p| matches!(p, GatewayMessage::ProfileChanged { user, .. } if *user == A))
    };
    assert!(told(&w, A), "its own session");
    assert!(told(&w, B), "a friend");
    assert!(!told(&w, C), "not a stranger");
}

#[test]
fn a_password_change_or_a_disable_closes_the_users_sessions() {
    let mut w = pair(12);
    online(&mut w, &[A, B]);
    w.client(A).want_online = false; // don't log straight back in
    w.change_relations(A, |r| r.credential_epoch += 1);
    w.run_for(Duration::from_millis(50), 5 * MS);
    assert!(w.clients[&A].session().is_none(), "A's session was revoked");
    w.client(B).want_online = false;
    w.change_relations(B, |r| r.disabled = true);
    w.run_for(Duration::from_millis(50), 5 * MS);
    assert!(w.clients[&B].session().is_none(), "B's session was revoked");
    w.client(B).want_online = true;
    w.run_for(Duration::from_millis(100), 5 * MS);
    assert!(
        w.clients[&B].session().is_none(),
        "a disabled user cannot log in"
    );
}

#[test]
fn after_a_retryable_failure_later_sends_wait_for_the_failed_one() {
    let mut w = pair(13);
    online(&mut w, &[A, B]);
    // m1's store fails; m2 was sent before A heard of it and reaches the
    // gateway after the failure, when the shard works again.
    w.link_delay = Duration::from_millis(50);
    w.shard = Health::Down;
    let mut ids = vec![w.send(A, B, b"m1")];
    w.run_for(Duration::from_millis(20), 5 * MS);
    ids.push(w.send(A, B, b"m2"));
    w.run_for(Duration::from_millis(40), 5 * MS); // m1 failed at the gateway
    w.shard = Health::Up;
    w.settle();
    assert_eq!(
        shown_ids(&w, B),
        ids,
        "no retry lands behind a later message"
    );
    w.check_invariants();
}

#[test]
fn a_message_to_a_user_on_another_gateway_is_pushed_there() {
    let mut w = World::new(14, 2);
    w.user(A, 0);
    w.user(B, 1);
    w.befriend(A, B);
    online(&mut w, &[A, B]);
    let id = w.send(A, B, b"across");
    w.run_until(Duration::from_secs(2), |w| !w.clients[&B].shown.is_empty());
    assert_eq!(shown_ids(&w, B), [id]);
    assert_eq!(w.action_counts["notify"], 1);
    w.settle();
    w.check_invariants();
}

#[test]
fn a_second_login_elsewhere_kicks_the_first_session() {
    let mut w = World::new(15, 2);
    w.user(A, 0);
    online(&mut w, &[A]);
    let first = w.clients[&A].session().expect("online");
    w.client(A).gateway = 1;
    w.login(A);
    w.run_for(Duration::from_millis(100), 5 * MS);
    assert!(w.clients[&A].session().is_some_and(|(_, g)| g == 1));
    // The first session is told (and closed once that arrived).
    let old = &w.gateways[0].endpoint.sessions[&first.0];
    let told = old.to_client.iter().any(|(_, bytes, _)| {
        proto::app::decode::<GatewayMessage>(bytes) == Ok(GatewayMessage::Kicked)
    });
    assert!(told, "the replaced session got Kicked");
}

#[test]
fn a_gateway_killed_mid_stream_loses_nothing_and_shows_nothing_twice() {
    for seed in 0..10 {
        let mut w = World::new(100 + seed, 2);
        w.user(A, 0);
        w.user(B, 1);
        w.befriend(A, B);
        w.faults.latency_ms = (0, 10);
        online(&mut w, &[A, B]);
        let mut ids: Vec<u128> = (0..30).map(|i| w.send(A, B, &[i])).collect();
        w.run_for(Duration::from_millis(15), 5 * MS);
        w.kill_gateway(0);
        w.client(A).gateway = 1; // reconnects elsewhere
        ids.extend((30..40).map(|i| w.send(A, B, &[i])));
        w.settle();
        assert_eq!(shown_ids(&w, B), ids, "seed {seed}");
        w.check_invariants();
    }
}

/// A message stored while its recipient logs in, after the login read the
/// mailbox's figures and before the session is registered, is in neither:
/// it cannot be pushed (no session yet, and presence already names this
/// gateway, or another gateway where the session is not registered yet).
/// The new session must learn of it without another login or message.
#[test]
fn a_message_stored_while_its_recipient_logs_in_is_shown() {
    for gateways in [1, 2] {
        let mut missed = Vec::new();
        for seed in 0..40 {
            let mut w = World::new(200 + seed, gateways);
            w.user(A, 0);
            w.user(B, gateways - 1);
            w.befriend(A, B);
            w.faults.latency_ms = (0, 50);
            w.client(B).want_online = false; // logs in below, not before
            online(&mut w, &[A]);
            // B's relations cached and its mailbox acknowledged: the next
            // store races the login, and no fetch at login masks it.
            let first = w.send(A, B, b"before");
            w.run_until(Duration::from_secs(5), |w| w.clients[&A].outbox_len() == 0);
            online(&mut w, &[B]);
            let acked = w.run_until(Duration::from_secs(5), |w| {
                w.mailboxes.get(&B).is_some_and(|m| m.acked >= 1)
            });
            assert!(acked, "{}", w.describe());
            w.logout(B);
            w.run_for(Duration::from_millis(200), 5 * MS);
            w.login(B);
            let second = w.send(A, B, b"while logging in");
            let done = w.run_until(Duration::from_secs(5), |w| {
                w.clients[&A].outbox_len() == 0 && w.clients[&B].session().is_some()
            });
            assert!(done, "seed {seed}: {}", w.describe());
            // No settle: it logs everyone in again, which would fetch it.
            w.run_for(Duration::from_secs(2), 5 * MS);
            if shown_ids(&w, B) != [first, second] {
                missed.push(seed);
            }
        }
        assert!(
            missed.is_empty(),
            "{gateways} gateway(s), seeds {missed:?}: the message was never shown"
        );
    }
}

#[test]
fn a_stored_batch_to_an_offline_user_asks_presence_once() {
    let mut w = pair(3);
    w.clients.get_mut(&B).unwrap().want_online = false; // B stays away
    w.faults.latency_ms = (5, 5); // sends queue behind the store in flight
    online(&mut w, &[A]);
    for i in 0..40 {
        w.send(A, B, format!("m{i}").as_bytes());
    }
    w.run_until(Duration::from_secs(10), |w| w.clients[&A].outbox_len() == 0);
    w.run_for(Duration::from_millis(100), MS); // the last notify is taken
    assert!(w.clients[&B].session().is_none(), "B stayed offline");
    assert_eq!(w.mailboxes[&B].records.len(), 40);
    let stores = w.action_counts["store"];
    assert!(stores < 40, "sends were batched: {stores} stores");
    assert_eq!(
        w.action_counts.get("notify"),
        Some(&stores),
        "one presence lookup per stored batch"
    );
    w.settle();
    w.check_invariants();
}
