//! Chat groups in the router (docs/PROTOCOL.md §6.7, with §6.4's promises),
//! in the deterministic world of `sim`: a group message is stored once in
//! the group's mailbox, answered `Sent{seq}`, pushed to the members with a
//! session on the accepting router and forwarded once to each other router
//! with members online; members show every message once, in group seq
//! order, through faults, joins, removals and router deaths.
//!
//! A failing seed of the random schedules is replayed exactly by
//! `faults::run(seed)` (`ROUTER_SEED_FIRST=<seed> ROUTER_SEEDS=1`); pin it
//! in `faults::PINNED`.

use crate::sim;

use crate::sim::{World, MS};
use gateway::services::GROUP_RESEND_WINDOW_MS;
use proto::{
    app::{AppErrorCode, Call, GatewayMessage, Reply},
    groups::GROUP_ID_BASE,
};
use rand::Rng;
use std::{collections::BTreeSet, time::Duration};

/// How long a group keeps what every member read, and how far back a
/// re-sent message is looked for (§6.7).
const RESEND_WINDOW: Duration = Duration::from_millis(GROUP_RESEND_WINDOW_MS);

const A: u64 = 1;
const B: u64 = 2;
const C: u64 = 3;
const D: u64 = 4;
const E: u64 = 5;
const F: u64 = 6;

fn online(w: &mut World, users: &[u64]) {
    for &u in users {
        if w.clients[&u].session().is_none() {
            w.login(u);
        }
    }
    let ok = w.run_until(Duration::from_secs(5), |w| {
        users.iter().all(|u| {
            let c = &w.clients[u];
            // Logged in, and the inbox of each of its groups started from
            // `Groups`.
            c.session().is_some()
                && w.groups
                    .iter()
                    .filter(|(_, g)| g.members.contains_key(u))
                    .all(|(id, _)| c.groups.get(id).is_some_and(|g| g.started))
        })
    });
    assert!(ok, "logged in: {}", w.describe());
}

/// The group's messages as stored: (from, msg_id) in seq order.
fn stored(w: &World, group: u64) -> Vec<(u64, u128)> {
    w.mailboxes.get(&group).map_or(Vec::new(), |m| {
        m.records
            .iter()
            .map(|r| (r.envelope.from, r.msg_id))
            .collect()
    })
}

/// Seqs of `group` pushed (or forwarded) to `user`'s client.
fn pushed_seqs(w: &World, user: u64, group: u64) -> BTreeSet<u64> {
    w.clients[&user]
        .group_received
        .iter()
        .filter(|(g, _, _)| *g == group)
        .map(|(_, d, _)| d.seq)
        .collect()
}

/// The reply to a call the test made, once it came.
fn reply(w: &World, user: u64, id: u32) -> Option<Result<Reply, AppErrorCode>> {
    w.clients[&user]
        .replies
        .get(&id)
        .map(|r| r.clone().map_err(|e| e.code))
}

fn call(w: &mut World, user: u64, c: Call) -> Result<Reply, AppErrorCode> {
    let id = w.call(user, c).expect("online");
    let ok = w.run_until(Duration::from_secs(2), |w| {
        w.clients[&user].replies.contains_key(&id)
    });
    assert!(ok, "answered: {}", w.describe());
    reply(w, user, id).expect("answered")
}

fn fetch(group: u64) -> Call {
    Call::GroupFetch {
        group,
        after_seq: 0,
        max_count: 10,
        max_bytes: 4096,
    }
}

#[test]
fn a_group_message_reaches_members_here_elsewhere_and_offline_exactly_once() {
    for seed in 0..6 {
        let mut w = World::new(seed, 3);
        // A and B on router 0, C and D on router 1, E on router 2, F
        // offline (router 2 once it logs in).
        for (u, g) in [(A, 0), (B, 0), (C, 1), (D, 1), (E, 2), (F, 2)] {
            w.user(u, g);
        }
        w.faults.latency_ms = (0, 10); // answers overtake each other
        let g = w.group(&[A, B, C, D, E, F]);
        w.client(F).want_online = false;
        online(&mut w, &[A, B, C, D, E]);
        let mut ids = Vec::new();
        for i in 0..24u8 {
            ids.push(w.send(A, g, &[b'a', i]));
            if i % 3 == 0 {
                ids.push(w.send(C, g, &[b'c', i]));
            }
        }
        let n = ids.len();
        let done = w.run_until(Duration::from_secs(5), |w| {
            [A, B, C, D, E]
                .iter()
                .all(|u| w.clients[u].group_shown(g).len() == n)
        });
        assert!(
            done,
            "seed {seed}: shown by the members online: {}",
            w.describe()
        );
        // Stored once each: one append per message.
        let in_mailbox = stored(&w, g);
        assert_eq!(in_mailbox.len(), n, "seed {seed}: one record per message");
        let distinct: BTreeSet<u128> = in_mailbox.iter().map(|(_, m)| *m).collect();
        assert_eq!(distinct, ids.iter().copied().collect(), "seed {seed}");
        // Every member online got every message pushed (the sender too),
        // and shows them in seq order.
        let seqs: BTreeSet<u64> = (1..=n as u64).collect();
        for u in [A, B, C, D, E] {
            assert_eq!(pushed_seqs(&w, u, g), seqs, "seed {seed}: pushed to {u}");
            assert_eq!(w.clients[&u].group_shown(g), in_mailbox, "seed {seed}: {u}");
        }
        assert!(w.clients[&F].group_received.is_empty(), "F is offline");
        // Exactly one forward per message to each other router with
        // members online: A's go to 1 and 2, C's to 0 and 2.
        let mb = &w.mailboxes[&g];
        for r in &mb.records {
            let to: Vec<usize> = w
                .group_forwards
                .iter()
                .filter(|((gr, seq, _), _)| *gr == g && *seq == r.seq)
                .map(|((_, _, to), count)| {
                    assert_eq!(*count, 1, "seed {seed}: one forward per router");
                    *to
                })
                .collect();
            let expected = if r.envelope.from == A { [1, 2] } else { [0, 2] };
            assert_eq!(to, expected, "seed {seed}: forwards of seq {}", r.seq);
        }
        // Membership comes from the cache: one read per router at most.
        assert!(w.action_counts["load_group"] <= 3, "seed {seed}");
        // F logs in and fetches everything, once, in seq order.
        w.client(F).want_online = true;
        let caught_up = w.run_until(Duration::from_secs(5), |w| {
            w.clients[&F].group_shown(g).len() == n
        });
        assert!(caught_up, "seed {seed}: {}", w.describe());
        assert_eq!(w.clients[&F].group_shown(g), in_mailbox, "seed {seed}");
        w.settle();
        w.check_invariants();
        assert_eq!(stored(&w, g).len(), n, "seed {seed}: nothing stored twice");
    }
}

#[test]
fn non_members_wrong_ids_and_unknown_groups_get_typed_errors() {
    let mut w = World::new(1, 1);
    w.user(A, 0);
    w.user(B, 0);
    w.befriend(A, B);
    let g = w.group(&[A]);
    online(&mut w, &[A, B]);
    let by_stranger = w.send(B, g, b"let me in");
    let unknown = w.send(A, GROUP_ID_BASE + 999, b"anyone?");
    w.run_for(Duration::from_millis(100), 5 * MS);
    assert_eq!(
        w.clients[&B].refused[&by_stranger],
        AppErrorCode::NotAllowed
    );
    assert_eq!(w.clients[&A].refused[&unknown], AppErrorCode::UnknownUser);
    let bad = |w: &mut World, u: u64, c: Call| {
        assert_eq!(
            call(w, u, c.clone()),
            Err(AppErrorCode::BadRequest),
            "{c:?}"
        );
    };
    bad(
        &mut w,
        A,
        Call::GroupSend {
            group: B,
            msg_id: 77,
            body: b"x".to_vec(),
            resend: false,
        },
    );
    bad(
        &mut w,
        A,
        Call::Send {
            to: g,
            msg_id: 78,
            body: b"x".to_vec(),
        },
    );
    bad(&mut w, A, fetch(B));
    bad(&mut w, A, Call::GroupInfo { group: A });
    // A non-member may not read the group, move a cursor or see it.
    for c in [
        fetch(g),
        Call::GroupAck {
            group: g,
            up_to_seq: 1,
        },
        Call::GroupInfo { group: g },
    ] {
        assert_eq!(
            call(&mut w, B, c.clone()),
            Err(AppErrorCode::NotAllowed),
            "{c:?}"
        );
    }
    // Nothing was stored anywhere; the member's calls work.
    assert!(stored(&w, g).is_empty());
    assert!(!w.mailboxes.contains_key(&(GROUP_ID_BASE + 999)));
    assert!(w.mailboxes.get(&B).is_none_or(|m| m.records.is_empty()));
    let mine = w.send(A, g, b"mine");
    w.run_for(Duration::from_millis(100), 5 * MS);
    assert_eq!(w.clients[&A].sent[&mine], 1);
    match call(&mut w, A, Call::GroupInfo { group: g }) {
        Ok(Reply::Group(info)) => {
            let members: Vec<u64> = info.members.iter().map(|m| m.user).collect();
            assert_eq!(members, [A]);
        }
        other => panic!("GroupInfo answered {other:?}"),
    }
    // A, the only member, read it: the group keeps it all the same for the
    // resend window (a re-send within it is answered from it, §6.7)...
    let read = w.run_until(Duration::from_secs(2), |w| w.groups[&g].members[&A] >= 1);
    assert!(read, "{}", w.describe());
    match call(&mut w, A, fetch(g)) {
        Ok(Reply::GroupMailbox {
            messages,
            more: false,
            dropped: 0,
            ..
        }) => assert_eq!(messages.len(), 1),
        other => panic!("GroupFetch answered {other:?}"),
    }
    assert_eq!(w.clients[&A].group_shown(g), [(A, mine)]);
    // An unknown group is remembered as such: no profile read per message.
    let loads = w.action_counts["load_group"];
    for i in 0..5u8 {
        w.send(A, GROUP_ID_BASE + 999, &[i]);
    }
    w.run_for(Duration::from_millis(100), 5 * MS);
    assert_eq!(w.action_counts["load_group"], loads);
    // ... then nothing below the lowest cursor: a fetch from 0 says one
    // seq is gone.
    w.run_for(RESEND_WINDOW, Duration::from_secs(1));
    match call(&mut w, A, fetch(g)) {
        Ok(Reply::GroupMailbox {
            messages,
            more: false,
            dropped: 1,
            ..
        }) => assert!(messages.is_empty()),
        other => panic!("GroupFetch answered {other:?}"),
    }
    w.settle();
    w.check_invariants();
}

#[test]
fn a_member_added_mid_stream_gets_what_is_sent_after_the_change_reached_its_router() {
    for seed in 0..8 {
        let mut w = World::new(40 + seed, 2);
        // A sends on router 0; B is a member on router 1; C (router 1) and
        // D (router 0) join mid-stream.
        for (u, g) in [(A, 0), (B, 1), (C, 1), (D, 0)] {
            w.user(u, g);
        }
        w.faults.latency_ms = (0, 15);
        let g = w.group(&[A, B]);
        online(&mut w, &[A, B, C, D]);
        let delays = [
            MS * w.rng.gen_range(0..200u32),
            MS * w.rng.gen_range(0..200u32),
        ];
        for i in 0..100u8 {
            if i == 30 {
                let start = w.mailboxes.get(&g).map_or(0, |m| m.last_seq());
                w.change_group_with_delays(
                    g,
                    |m| {
                        for u in [C, D] {
                            m.members.insert(u, start);
                            m.joined_at.insert(u, start);
                        }
                    },
                    &delays,
                );
            }
            w.send(A, g, &[i]);
            w.run_for(Duration::from_millis(10), 5 * MS);
        }
        w.run_until(Duration::from_secs(5), |w| w.clients[&A].outbox_len() == 0);
        w.run_for(Duration::from_millis(300), 5 * MS);
        let version = w.groups[&g].version;
        let t0 = w.group_change_seen(0, g, version).expect("router 0 got it");
        // Every message that reached router 0 after the change did was
        // pushed (or forwarded) to both newcomers.
        let mb = &w.mailboxes[&g];
        let after: Vec<u64> = mb
            .records
            .iter()
            .filter(|r| w.send_arrivals[&r.msg_id].1 > t0)
            .map(|r| r.seq)
            .collect();
        assert!(after.len() > 30, "seed {seed}: the stream went on");
        for u in [C, D] {
            let pushed = pushed_seqs(&w, u, g);
            let missing: Vec<u64> = after
                .iter()
                .filter(|s| !pushed.contains(s))
                .copied()
                .collect();
            assert!(
                missing.is_empty(),
                "seed {seed}: {u} was not pushed {missing:?}"
            );
            // It heard of the change, and may write to the group.
            assert!(w.clients[&u]
                .pushes
                .iter()
                .any(|p| matches!(p, GatewayMessage::GroupChanged { group, .. } if *group == g)));
        }
        let hello = w.send(C, g, b"hello");
        w.settle();
        assert!(w.clients[&C].sent.contains_key(&hello), "seed {seed}");
        // What they show: everything stored after they joined, nothing
        // before (check_group_invariants), each once in seq order.
        w.check_invariants();
        let start = w.groups[&g].joined_at[&C];
        assert!(start > 0, "seed {seed}: joined mid-stream");
        let first = w.clients[&C].groups[&g].shown[0].seq;
        assert_eq!(first, start + 1, "seed {seed}: reads from its cursor on");
    }
}

#[test]
fn a_removed_member_gets_nothing_stored_after_the_sending_router_knew() {
    for seed in 0..8 {
        let mut w = World::new(60 + seed, 2);
        // A sends on router 0, B on router 1; D (router 0) and E (router 1)
        // are removed mid-stream; F (router 1) stays.
        for (u, g) in [(A, 0), (B, 1), (D, 0), (E, 1), (F, 1)] {
            w.user(u, g);
        }
        w.faults.latency_ms = (0, 15);
        let g = w.group(&[A, B, D, E, F]);
        online(&mut w, &[A, B, D, E, F]);
        let delays = [
            MS * w.rng.gen_range(0..300u32),
            MS * w.rng.gen_range(0..300u32),
        ];
        for i in 0..150u8 {
            if i == 40 {
                w.change_group_with_delays(
                    g,
                    |m| {
                        for u in [D, E] {
                            m.members.remove(&u);
                            m.removed.insert(u);
                        }
                    },
                    &delays,
                );
            }
            w.send(A, g, &[b'a', i]);
            if i % 3 == 0 {
                w.send(B, g, &[b'b', i]);
            }
            w.run_for(Duration::from_millis(10), 5 * MS);
        }
        w.run_until(Duration::from_secs(5), |w| {
            w.clients[&A].outbox_len() == 0 && w.clients[&B].outbox_len() == 0
        });
        w.run_for(Duration::from_millis(300), 5 * MS);
        let version = w.groups[&g].version;
        let seen = [
            w.group_change_seen(0, g, version).expect("router 0 got it"),
            w.group_change_seen(1, g, version).expect("router 1 got it"),
        ];
        let mb = &w.mailboxes[&g];
        let late: Vec<u64> = mb
            .records
            .iter()
            .filter(|r| r.at > seen[r.by])
            .map(|r| r.seq)
            .collect();
        assert!(late.len() > 50, "seed {seed}: the stream went on");
        for u in [D, E] {
            let pushed = pushed_seqs(&w, u, g);
            assert!(!pushed.is_empty(), "seed {seed}: {u} got messages before");
            let wrong: Vec<u64> = late
                .iter()
                .filter(|s| pushed.contains(s))
                .copied()
                .collect();
            assert!(
                wrong.is_empty(),
                "seed {seed}: removed member {u} was pushed seqs {wrong:?} stored after the \
                 sending router processed its removal"
            );
            // It may not read or write the group any more.
            assert_eq!(call(&mut w, u, fetch(g)), Err(AppErrorCode::NotAllowed));
            let after = w.send(u, g, b"still here?");
            w.run_for(Duration::from_millis(100), 5 * MS);
            assert_eq!(w.clients[&u].refused[&after], AppErrorCode::NotAllowed);
        }
        w.settle();
        w.check_invariants();
        for u in [D, E] {
            assert!(
                !w.clients[&u].groups[&g].started,
                "seed {seed}: {u}'s client stopped reading the group"
            );
        }
    }
}

#[test]
fn a_member_who_leaves_through_the_router_gets_nothing_more_before_profiles_push() {
    let mut w = World::new(7, 1);
    w.user(A, 0);
    w.user(B, 0);
    let g = w.group(&[A, B]);
    // Profile's push is slow: only the call's effect can drop the cache.
    w.group_event_delay = Duration::from_secs(5);
    online(&mut w, &[A, B]);
    let first = w.send(A, g, b"first");
    let got = w.run_until(Duration::from_secs(2), |w| {
        w.clients[&B].group_shown(g) == [(A, first)]
    });
    assert!(got, "{}", w.describe());
    assert_eq!(
        call(&mut w, B, Call::GroupLeave { group: g }),
        Ok(Reply::Done)
    );
    let second = w.send(A, g, b"second");
    w.run_until(Duration::from_secs(2), |w| w.clients[&A].outbox_len() == 0);
    w.run_for(Duration::from_millis(200), 5 * MS);
    let seq = w.clients[&A].sent[&second];
    assert!(
        !pushed_seqs(&w, B, g).contains(&seq),
        "pushed to a member who left"
    );
    assert_eq!(call(&mut w, B, fetch(g)), Err(AppErrorCode::NotAllowed));
    assert!(
        w.group_events_seen.is_empty(),
        "all of this before profile's push"
    );
    w.settle();
    w.check_invariants();
}

#[test]
fn a_router_killed_mid_stream_loses_nothing_and_shows_nothing_twice() {
    for seed in 0..10 {
        let mut w = World::new(300 + seed, 2);
        // A and C on router 0 (killed), B and E on router 1.
        for (u, g) in [(A, 0), (B, 1), (C, 0), (E, 1)] {
            w.user(u, g);
        }
        w.faults.latency_ms = (0, 10);
        let g = w.group(&[A, B, C, E]);
        online(&mut w, &[A, B, C, E]);
        for i in 0..30u8 {
            w.send(A, g, &[b'a', i]);
            if i % 3 == 0 {
                w.send(B, g, &[b'b', i]);
            }
        }
        w.run_for(MS * (5 + 5 * seed as u32), 5 * MS);
        w.kill_gateway(0);
        // A and C reconnect to router 1; A re-sends what was unanswered,
        // same msg_ids, in order, then goes on.
        w.client(A).gateway = 1;
        w.client(C).gateway = 1;
        for i in 30..40u8 {
            w.send(A, g, &[b'a', i]);
            w.send(B, g, &[b'b', i]);
        }
        w.settle();
        w.check_invariants();
        assert_eq!(w.clients[&A].sent.len(), 40, "seed {seed}");
        assert_eq!(w.clients[&B].sent.len(), 20, "seed {seed}");
        // Every member shows all 60 messages (copies of a retry dropped).
        for u in [A, B, C, E] {
            assert_eq!(w.clients[&u].group_shown(g).len(), 60, "seed {seed}: {u}");
        }
    }
}

/// The group's records of `msg_id`: their seqs.
fn copies(w: &World, group: u64, msg_id: u128) -> Vec<u64> {
    w.mailboxes.get(&group).map_or(Vec::new(), |m| {
        m.records
            .iter()
            .filter(|r| r.msg_id == msg_id)
            .map(|r| r.seq)
            .collect()
    })
}

#[test]
fn a_group_message_whose_store_answer_was_lost_is_stored_once_whichever_router_it_is_resent_to() {
    // 0: re-sent through the same router (a hold waits for it, and the
    // client says `resend`); 1: the same with a client that does not say
    // it (the router knows an attempt failed here); 2: through the other
    // router, which knows only what the client says.
    for case in 0..3 {
        let mut w = World::new(500 + case, 2);
        for (u, g) in [(A, 0), (B, 0), (C, 1)] {
            w.user(u, g);
        }
        let g = w.group(&[A, B, C]);
        online(&mut w, &[A, B, C]);
        w.client(A).says_resend = case != 1;
        w.faults.store_answer_lost = 1.0;
        let m = w.send(A, g, b"once");
        let applied = w.run_until(Duration::from_secs(1), |w| !copies(w, g, m).is_empty());
        assert!(applied, "case {case}: {}", w.describe());
        w.faults.store_answer_lost = 0.0;
        if case == 2 {
            w.client(A).gateway = 1;
            w.logout(A);
            w.client(A).want_online = true;
        }
        let sent = w.run_until(Duration::from_secs(10), |w| {
            w.clients[&A].sent.contains_key(&m)
        });
        assert!(sent, "case {case}: {}", w.describe());
        assert_eq!(w.clients[&A].sent[&m], 1, "case {case}: its first seq");
        assert_eq!(copies(&w, g, m), [1], "case {case}: stored once");
        assert_eq!(w.stored_once_into(g), 1, "case {case}: found, not stored");
        // The re-send's router pushes it (it cannot tell whether the lost
        // attempt's router did): every member shows it once.
        w.settle();
        w.check_invariants();
        for u in [A, B, C] {
            assert_eq!(w.clients[&u].group_shown(g), [(A, m)], "case {case}: {u}");
        }
    }
}

#[test]
fn a_group_message_resent_past_the_window_is_stored_again_and_shown_once() {
    let mut w = World::new(520, 1);
    w.user(A, 0);
    w.user(B, 0);
    let g = w.group(&[A, B]);
    online(&mut w, &[A, B]);
    w.faults.store_answer_lost = 1.0;
    let m = w.send(A, g, b"late");
    let applied = w.run_until(Duration::from_secs(1), |w| !copies(w, g, m).is_empty());
    assert!(applied, "{}", w.describe());
    w.faults.store_answer_lost = 0.0;
    // A's client goes away unanswered and comes back with the message
    // only once its first copy is older than the look-back.
    w.logout(A);
    w.run_for(
        RESEND_WINDOW + Duration::from_secs(1),
        Duration::from_secs(1),
    );
    assert_eq!(w.mailboxes[&g].acked, 0, "the first copy is there, unread");
    w.client(A).want_online = true;
    let sent = w.run_until(Duration::from_secs(5), |w| {
        w.clients[&A].sent.contains_key(&m)
    });
    assert!(sent, "{}", w.describe());
    assert_eq!(w.clients[&A].sent[&m], 2, "stored again");
    assert_eq!(copies(&w, g, m), [1, 2]);
    assert_eq!(w.stored_once_into(g), 0);
    // The invariants allow that second copy (re-sent past the window),
    // and the members drop it.
    w.settle();
    w.check_invariants();
    for u in [A, B] {
        assert_eq!(w.clients[&u].group_shown(g), [(A, m)], "{u}");
    }
}

mod faults {
    //! Seeded random fault schedules with groups: several senders at once,
    //! pipelined, into two groups and to each other, while receivers pause
    //! (pushes given up, sessions timing out), users log out and in and
    //! move between routers, a router dies, the shard goes down or hangs,
    //! profile hangs, store answers are lost and reads fail. Then the world
    //! heals and settles, and the promises of §6.4 and §6.7 must hold.

    use super::*;
    use sim::Repeat;

    /// Seeds that once failed, kept as regression tests. 140: a hold made
    /// after the sender's session here had ended (a store that failed late)
    /// waited for messages its client had settled through the other
    /// router, refused it for the whole `retry_hold`, and a message whose
    /// refusal reply was dropped (session queue full) was overtaken when
    /// the hold ran out; 1603: the same with the sender back on that
    /// router in a new session; 2429: a refusal by the hold whose reply
    /// was dropped did not make the hold last until the client's request
    /// timeout re-sent it, and a later message went first; 5369: a first
    /// attempt through one router reached the shard after its re-send
    /// through the other had been stored, as two connections may (the
    /// "stored once" check must allow that copy, and only that); 5478:
    /// the same, both stores asked for at the same moment.
    pub const PINNED: &[u64] = &[140, 1603, 2429, 5369, 5478];

    /// What a run went through, to check the schedules reach the paths
    /// they are for.
    #[derive(Default, Debug)]
    pub struct Exercised {
        /// Re-sent group messages the shard answered with their first
        /// copy's seq (`AppendBatchOnce`) instead of storing them again.
        pub stored_once: u64,
        /// Group messages stored twice all the same: an earlier attempt
        /// that reached the shard after its re-send through another
        /// connection (`sim::legit_repeat`).
        pub overtaken: usize,
        /// `GroupMailboxChanged` pushes (pushes a full session could not
        /// take).
        pub mailbox_changed: usize,
        /// Group forwards to another router.
        pub forwards: usize,
    }

    const USERS: u64 = 6;

    pub fn run(seed: u64) -> Exercised {
        let mut w = World::new(seed, 2);
        for u in 1..=USERS {
            w.user(u, (u % 2) as usize);
        }
        for a in 1..=USERS {
            for b in a + 1..=USERS {
                w.befriend(a, b);
            }
        }
        let all: Vec<u64> = (1..=USERS).collect();
        let groups = [w.group(&all), w.group(&[1, 2, 3])];
        w.faults.store_answer_lost = 0.05;
        w.faults.read_failure = 0.05;
        w.faults.relations_failure = 0.05;
        w.faults.group_failure = 0.05;
        w.faults.latency_ms = (0, 15);
        w.link_delay = MS * w.rng.gen_range(0..30);
        for u in 1..=USERS {
            w.login(u);
        }
        for step in 0..1500 {
            if step % 10 == 0 {
                w.random_fault(USERS);
            }
            if w.rng.gen_bool(0.4) {
                let from = w.rng.gen_range(1..=USERS);
                let to = match w.rng.gen_range(0..5) {
                    0 => w.rng.gen_range(1..=USERS),
                    1 if from <= 3 => groups[1],
                    _ => groups[0],
                };
                if from != to {
                    for _ in 0..w.rng.gen_range(1..4) {
                        let body = vec![b'x'; w.rng.gen_range(1..300)];
                        w.send(from, to, &body);
                    }
                }
            }
            w.now += 5 * MS;
            w.tick();
        }
        w.settle();
        w.check_invariants();
        let twice = w.forwards_beyond_stores();
        assert!(
            twice.is_empty(),
            "seed {seed}: one forward per message and router it was answered by: {twice:?}"
        );
        let group_sent = w
            .clients
            .values()
            .flat_map(|c| c.sent.keys())
            .filter(|m| {
                w.clients.values().any(|c| {
                    c.app_sends
                        .iter()
                        .any(|(t, id)| id == *m && groups.contains(t))
                })
            })
            .count();
        assert!(
            group_sent > 200,
            "seed {seed}: group messages sent ({group_sent})"
        );
        let overtaken = groups
            .iter()
            .flat_map(|g| w.mailboxes[g].second_copies())
            .filter(|(first, again)| sim::legit_repeat(first, again) == Some(Repeat::Plain))
            .count();
        Exercised {
            overtaken,
            stored_once: groups
                .iter()
                .map(|&g| u64::from(w.stored_once_into(g)))
                .sum(),
            mailbox_changed: w
                .clients
                .values()
                .flat_map(|c| &c.pushes)
                .filter(|p| matches!(p, GatewayMessage::GroupMailboxChanged { .. }))
                .count(),
            forwards: w.group_forwards.len(),
        }
    }

    #[test]
    fn pinned_seeds() {
        for &seed in PINNED {
            run(seed);
        }
    }

    #[test]
    fn random_fault_schedules_keep_the_group_promises() {
        let mut total = Exercised::default();
        let seeds = sim::seeds(12);
        let many = seeds.end - seeds.start >= 12;
        for seed in seeds {
            eprintln!("seed {seed}");
            let e = run(seed);
            total.stored_once += e.stored_once;
            total.overtaken += e.overtaken;
            total.mailbox_changed += e.mailbox_changed;
            total.forwards += e.forwards;
        }
        eprintln!("{total:?}");
        if many {
            assert!(total.stored_once > 0, "re-sends found stored: {total:?}");
            assert!(total.mailbox_changed > 0, "full sessions: {total:?}");
            assert!(total.forwards > 0, "forwards: {total:?}");
        }
    }
}
