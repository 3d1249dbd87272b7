//! Group chat end to end with real processes (docs/PROTOCOL.md §6.7): a
//! group whose members are on two gateways, half of them offline; two
//! senders on different gateways send at once. Every member ends with
//! every message exactly once and in group seq order, each sender's in the
//! order sent, and each message went at most once to the other gateway.

use crate::support;

use crate::support::{Cluster, WAIT};
use client::sdk::{Connection, ImEvent};
use proto::app::Delivery;
use std::collections::BTreeMap;
use tokio::sync::mpsc;

const MEMBERS: usize = 8;
const PER_SENDER: usize = 20;

/// Group messages shown by `conn` until `count` were shown and it is synced.
async fn group_messages(
    conn: &Connection,
    events: &mut mpsc::Receiver<ImEvent>,
    count: usize,
) -> Vec<(u64, Delivery)> {
    let mut shown = Vec::new();
    let deadline = tokio::time::Instant::now() + WAIT;
    let take = |event, shown: &mut Vec<(u64, Delivery)>| {
        if let ImEvent::GroupMessage { group, delivery } = event {
            shown.push((group, delivery));
        }
    };
    while shown.len() < count {
        match tokio::time::timeout_at(deadline, events.recv()).await {
            Ok(Some(event)) => take(event, &mut shown),
            Ok(None) => panic!("the connection ended: {} of {count} shown", shown.len()),
            Err(_) => panic!("{} of {count} shown within {WAIT:?}", shown.len()),
        }
    }
    tokio::time::timeout_at(deadline, conn.synced())
        .await
        .expect("synced in time")
        .expect("synced");
    while let Ok(event) = events.try_recv() {
        take(event, &mut shown);
    }
    shown
}

/// Every message once, in seq order, each sender's in the order sent:
/// `total` messages shown, seqs rising, every (sender, number) once. A
/// retry after a store whose answer was lost (a leader killed after it
/// committed) may have stored a second copy under a later seq, which the
/// client drops by (from, msg_id) (docs/PROTOCOL.md §6.4): so seqs rise but
/// may skip; without faults they are exactly 1..=total ([`check_exact`]).
fn check(member: usize, shown: &[(u64, Delivery)], total: usize) {
    let seqs: Vec<u64> = shown.iter().map(|(_, d)| d.seq).collect();
    assert!(
        seqs.windows(2).all(|w| w[0] < w[1]),
        "member {member}: seqs shown out of order: {seqs:?}"
    );
    assert_eq!(shown.len(), total, "member {member}: messages shown");
    let mut last: BTreeMap<u64, usize> = BTreeMap::new();
    for (_, d) in shown {
        let text = String::from_utf8(d.body.clone()).unwrap();
        let n: usize = text.rsplit(' ').next().unwrap().parse().unwrap();
        let prev = last.insert(d.from, n);
        assert_eq!(
            prev.map_or(0, |p| p + 1),
            n,
            "member {member}: sender {} order",
            d.from
        );
    }
}

/// [`check`], and the seqs are exactly 1..=total: nothing stored twice.
fn check_exact(member: usize, shown: &[(u64, Delivery)], total: usize) {
    check(member, shown, total);
    let seqs: Vec<u64> = shown.iter().map(|(_, d)| d.seq).collect();
    assert_eq!(
        seqs,
        (1..=total as u64).collect::<Vec<_>>(),
        "member {member}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_group_on_two_gateways_half_offline_shows_every_message_once_in_order() {
    let c = Cluster::metered("").await;
    let second = c.second_gateway(2);
    let mut users = Vec::new();
    for i in 0..MEMBERS {
        users.push(c.user(&format!("member{i}"), "pw").await);
    }
    let p = &c.profile_client;
    let group = p.group_create(users[0], "crew", "").await.unwrap().group;
    for &u in &users[1..] {
        p.group_invite(users[0], group, u).await.unwrap();
        p.group_answer_invite(u, group, true, 0).await.unwrap();
    }
    let gateways = [c.gateway.addr.to_string(), second.addr.to_string()];
    let connect = |i: usize| {
        let config = c.sdk_config(&gateways[i % 2], &format!("member{i}"), "pw");
        async move { client::sdk::connect(config).await.expect("login") }
    };
    // Members 0..4 online (two per gateway), 4..8 offline.
    let mut online = Vec::new();
    for i in 0..MEMBERS / 2 {
        online.push(connect(i).await);
    }
    for (conn, events) in &mut online {
        conn.synced().await.unwrap();
        while events.try_recv().is_ok() {}
    }
    let send_all = |s: usize| {
        let conn = online[s].0.clone();
        async move {
            for n in 0..PER_SENDER {
                let body = format!("from sender {s} number {n}").into_bytes();
                conn.group_send(group, body).await.expect("group send");
            }
        }
    };
    // Member 0 sends through gateway 1, member 1 through gateway 2.
    tokio::join!(send_all(0), send_all(1));
    let total = 2 * PER_SENDER;
    for (i, (conn, events)) in online.iter_mut().enumerate() {
        let shown = group_messages(conn, events, total).await;
        check_exact(i, &shown, total);
    }
    for i in MEMBERS / 2..MEMBERS {
        let (conn, mut events) = connect(i).await;
        let shown = group_messages(&conn, &mut events, total).await;
        check_exact(i, &shown, total);
        conn.close().await;
    }
    // Gateway 1 took sender 0's messages: each went at most once to
    // gateway 2 (members 1 and 3 are there), so at most PER_SENDER forwards.
    let forwards = c.metric("gateway_group_forwards_total").await;
    assert!(
        forwards >= 1.0 && forwards <= PER_SENDER as f64,
        "gateway 1 forwarded {forwards} times for {PER_SENDER} messages"
    );
    assert_eq!(
        c.metric("gateway_group_messages_total").await,
        PER_SENDER as f64,
        "gateway 1 fanned out each of its messages once"
    );
}

/// A member offline while messages pass the group's retention is told how
/// many it missed (never a silent gap), then gets what came after.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_behind_retention_is_told_how_many_it_missed() {
    let c = Cluster::start(2).await;
    let owner = c.user("owner", "pw").await;
    let late = c.user("late", "pw").await;
    let p = &c.profile_client;
    let group = p.group_create(owner, "slow", "").await.unwrap().group;
    p.group_invite(owner, group, late).await.unwrap();
    p.group_answer_invite(late, group, true, 0).await.unwrap();
    let (sender, _events) = c.sdk("owner", "pw").await;
    for n in 0..5 {
        sender
            .group_send(group, format!("old {n}").into_bytes())
            .await
            .unwrap();
    }
    // What retention does, now: the group's shard expires everything
    // stored so far (the other shard answers Moved: not its mailbox).
    let now_ms = gateway::services::now_ms();
    let mut expired = 0;
    for shard in &c.services.shards {
        let client = msgstore::client::ShardClient::connect(shard.local_addr())
            .await
            .unwrap();
        expired += client
            .expire(group, now_ms + 1, u64::MAX)
            .await
            .unwrap_or(0);
    }
    assert_eq!(expired, 5);
    for n in 0..2 {
        sender
            .group_send(group, format!("new {n}").into_bytes())
            .await
            .unwrap();
    }
    let (conn, mut events) = c.sdk("late", "pw").await;
    let mut dropped = Vec::new();
    let mut shown = Vec::new();
    let synced = conn.synced();
    tokio::pin!(synced);
    let deadline = tokio::time::sleep(WAIT);
    tokio::pin!(deadline);
    loop {
        tokio::select! {
            r = &mut synced => { r.unwrap(); break; }
            Some(event) = events.recv() => match event {
                ImEvent::GroupDropped { group: g, count } => dropped.push((g, count)),
                ImEvent::GroupMessage { delivery, .. } => shown.push(delivery),
                _ => {}
            },
            () = &mut deadline => panic!("not synced in time"),
        }
    }
    while let Ok(event) = events.try_recv() {
        if let ImEvent::GroupMessage { delivery, .. } = event {
            shown.push(delivery);
        }
    }
    assert_eq!(dropped, [(group, 5)], "told once, with the count");
    let got: Vec<(u64, Vec<u8>)> = shown.iter().map(|d| (d.seq, d.body.clone())).collect();
    assert_eq!(got, [(6, b"new 0".to_vec()), (7, b"new 1".to_vec())]);
}

struct Quiet;

impl msgstore::rebalance::Progress for Quiet {
    fn planned(&self, _users: u64, _bytes: u64) {}
    fn moved(&self, _bytes: u64) {}
}

/// Group mailboxes move with a rebalance like users' mailboxes: messages
/// stored before and after a shard is added all reach an offline member,
/// once each and in order, and the moved groups live where the new map
/// puts them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn group_mailboxes_move_with_a_rebalance() {
    use msgstore::rebalance::{Mover, Plan};
    use proto::cluster::ShardRing;
    let options = support::Options {
        shards: 2,
        spare_shards: 1,
        ..support::Options::default()
    };
    let c = Cluster::start_with(options).await.0;
    let owner = c.user("owner", "pw").await;
    let reader = c.user("reader", "pw").await;
    let p = &c.profile_client;
    let mut groups = Vec::new();
    for i in 0..8 {
        let group = p
            .group_create(owner, &format!("g{i}"), "")
            .await
            .unwrap()
            .group;
        p.group_invite(owner, group, reader).await.unwrap();
        p.group_answer_invite(reader, group, true, 0).await.unwrap();
        groups.push(group);
    }
    let (sender, _events) = c.sdk("owner", "pw").await;
    let send_round = |round: &'static str| {
        let (sender, groups) = (sender.clone(), groups.clone());
        async move {
            for &g in &groups {
                for n in 0..5 {
                    let body = format!("{round} {n}").into_bytes();
                    sender.group_send(g, body).await.expect("group send");
                }
            }
        }
    };
    send_round("before").await;
    let mut map = c.services.map.clone();
    map.shards.truncate(2);
    let spare = c.services.map.shards[2].clone();
    let plan = Plan::add_shard(&map, &spare.id, &spare.addr, 1).unwrap();
    let (old_ring, new_ring) = (ShardRing::new(&map.shards), plan.target_ring());
    let moving = groups
        .iter()
        .filter(|g| old_ring.owner(**g) != new_ring.owner(**g))
        .count();
    assert!(moving > 0, "some of the 8 groups change shards");
    let mover = Mover::connect(plan.clone()).await.unwrap();
    mover.install_moving_routing().await.unwrap();
    let moved = mover.move_all(&Quiet).await.unwrap();
    assert!(moved.users as usize >= moving, "every moving group moved");
    mover.install_final_routing().await.unwrap();
    gateway::map_push::push_map(&c.peer_addr(1).await, &plan.to)
        .await
        .unwrap();
    send_round("after").await;
    let (conn, mut events) = c.sdk("reader", "pw").await;
    let shown = group_messages(&conn, &mut events, 8 * 10).await;
    assert_eq!(shown.len(), 80, "every message once");
    let mut by_group: BTreeMap<u64, Vec<(u64, String)>> = BTreeMap::new();
    for (g, d) in &shown {
        let body = String::from_utf8(d.body.clone()).unwrap();
        by_group.entry(*g).or_default().push((d.seq, body));
    }
    // Each group's messages in seq order 1..=10: five before, five after.
    let want: Vec<(u64, String)> = (0..10u64)
        .map(|i| {
            let round = if i < 5 { "before" } else { "after" };
            (i + 1, format!("{round} {}", i % 5))
        })
        .collect();
    assert_eq!(by_group.len(), 8);
    for (g, got) in &by_group {
        assert_eq!(got, &want, "group {g}");
    }
    // Every group's mailbox is on the shard the new map names.
    for shard in &c.services.map.shards {
        let client = msgstore::client::ShardClient::connect(shard.addr.as_str())
            .await
            .unwrap();
        let (held, _) = client.list_users(0, 10_000).await.unwrap();
        for u in held.iter().filter(|u| proto::groups::is_group(u.user)) {
            assert_eq!(new_ring.owner(u.user), shard.id, "group {}", u.user);
        }
    }
}

/// A group's mailbox on a replicated shard losing its leader mid-stream:
/// every group send ends `Sent`, members online and offline show each
/// message once, in order, and nothing is stored twice: a send refused
/// when the leader died (perhaps after committing it) is re-sent through
/// the same gateway, which stores it with `AppendBatchOnce`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_group_on_a_shard_group_losing_its_leader_loses_nothing() {
    let options = support::Options {
        shards: 1,
        shard_group: true,
        ..support::Options::default()
    };
    let (mut c, _) = Cluster::start_with(options).await;
    let users = [
        c.user("owner", "pw").await,
        c.user("online", "pw").await,
        c.user("offline", "pw").await,
    ];
    let p = &c.profile_client;
    let group = p.group_create(users[0], "ha", "").await.unwrap().group;
    for &u in &users[1..] {
        p.group_invite(users[0], group, u).await.unwrap();
        p.group_answer_invite(u, group, true, 0).await.unwrap();
    }
    let (sender, _sender_events) = c.sdk("owner", "pw").await;
    let (online, mut online_events) = c.sdk("online", "pw").await;
    let send_range = |r: std::ops::Range<usize>| {
        let sender = sender.clone();
        async move {
            for n in r {
                let body = format!("from sender 0 number {n}").into_bytes();
                sender.group_send(group, body).await.expect("group send");
            }
        }
    };
    send_range(0..50).await;
    let replicas = c.group.as_mut().expect("a shard group");
    let leader = replicas.wait_for_leader(WAIT).await;
    replicas.replicas[leader].kill();
    let restart = async {
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
        replicas.replicas[leader].start();
    };
    tokio::join!(send_range(50..100), restart);
    let shown = group_messages(&online, &mut online_events, 100).await;
    check_exact(1, &shown, 100);
    let (conn, mut events) = c.sdk("offline", "pw").await;
    let shown = group_messages(&conn, &mut events, 100).await;
    check_exact(2, &shown, 100);
}

/// The gateway a sender is on is SIGKILLed with many group sends in
/// flight: the SDK logs in at the other gateway and re-sends each
/// unanswered message with `resend`, which the gateway stores with
/// `AppendBatchOnce`. Every send ends `Sent`, and the group's mailbox holds
/// each message once: seqs 1..=count, each shown once, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_killed_under_group_sends_stores_each_message_once() {
    use std::{future::Future, pin::Pin, task::Poll, time::Duration};
    let c = Cluster::start(2).await;
    let second = c.second_gateway(2);
    let owner = c.user("owner", "pw").await;
    let reader = c.user("reader", "pw").await;
    let p = &c.profile_client;
    let group = p.group_create(owner, "tough", "").await.unwrap().group;
    p.group_invite(owner, group, reader).await.unwrap();
    p.group_answer_invite(reader, group, true, 0).await.unwrap();
    let both = format!("{},{}", c.gateway.addr, second.addr);
    let mut config = c.sdk_config(&both, "owner", "pw");
    // Notice the dead gateway in about a second.
    config.session.session.keepalive = Duration::from_millis(200);
    config.session.session.idle_timeout = Duration::from_millis(1500);
    config.session.handshake_timeout = Duration::from_secs(1);
    let (sender, _events) = client::sdk::connect(config).await.unwrap();
    let (doomed, other) = if sender.gateway() == c.gateway.addr {
        (&c.gateway, &second)
    } else {
        (&second, &c.gateway)
    };
    let count = 200;
    type Send<'a> =
        Pin<Box<dyn Future<Output = Result<proto::app::SendOutcome, client::sdk::SdkError>> + 'a>>;
    let mut sends: Vec<Send<'_>> = (0..count)
        .map(|n| {
            let body = format!("from sender 0 number {n}").into_bytes();
            Box::pin(sender.group_send(group, body)) as Send<'_>
        })
        .collect();
    let mut answers: Vec<Option<_>> = vec![None; count];
    let mut answered = 0;
    // The gateway dies the moment the tenth answer arrives, the other
    // sends in flight.
    let all = std::future::poll_fn(|cx| {
        let mut waiting = false;
        for (send, answer) in sends.iter_mut().zip(answers.iter_mut()) {
            if answer.is_some() {
                continue;
            }
            match send.as_mut().poll(cx) {
                Poll::Ready(r) => {
                    *answer = Some(r);
                    answered += 1;
                    if answered == 10 {
                        doomed.signal(libc::SIGKILL);
                    }
                }
                Poll::Pending => waiting = true,
            }
        }
        if waiting {
            Poll::Pending
        } else {
            Poll::Ready(())
        }
    });
    tokio::time::timeout(WAIT * 2, all)
        .await
        .expect("every send answered");
    for (n, answer) in answers.iter().enumerate() {
        assert!(matches!(answer, Some(Ok(_))), "send {n}: {answer:?}");
    }
    assert!(sender.stats().reconnects >= 1, "the sender moved");
    let config = c.sdk_config(&other.addr.to_string(), "reader", "pw");
    let (conn, mut events) = client::sdk::connect(config).await.unwrap();
    let shown = group_messages(&conn, &mut events, count).await;
    check_exact(1, &shown, count);
}

/// Sender and readers each behind 30% loss both ways (with duplication and
/// reordering): every group send ends `Sent`, stored once, and each member
/// shows every message once, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn group_messages_over_a_lossy_path_are_stored_and_shown_once_in_order() {
    use std::time::Duration;
    let c = Cluster::start(2).await;
    let names = ["sender", "online", "later"];
    let mut users = Vec::new();
    for name in names {
        users.push(c.user(name, "pw").await);
    }
    let p = &c.profile_client;
    let group = p.group_create(users[0], "lossy", "").await.unwrap().group;
    for &u in &users[1..] {
        p.group_invite(users[0], group, u).await.unwrap();
        p.group_answer_invite(u, group, true, 0).await.unwrap();
    }
    let jitter = Duration::from_millis(20);
    let mut paths = Vec::new();
    for seed in 0..3 {
        paths.push(support::lossy_proxy(c.gateway.addr, 40 + seed, 0.3, 0.1, jitter).await);
    }
    let connect = |i: usize| {
        let config = c.sdk_config(&paths[i].to_string(), names[i], "pw");
        async move { client::sdk::connect(config).await.expect("login") }
    };
    let (sender, _sender_events) = connect(0).await;
    let (online, mut online_events) = connect(1).await;
    let count = 30;
    for n in 0..count {
        let body = format!("from sender 0 number {n}").into_bytes();
        sender.group_send(group, body).await.expect("group send");
    }
    let shown = group_messages(&online, &mut online_events, count).await;
    check_exact(1, &shown, count);
    let (later, mut later_events) = connect(2).await;
    let shown = group_messages(&later, &mut later_events, count).await;
    check_exact(2, &shown, count);
}

/// The group's shard stopped (SIGSTOP) for two seconds under group sends
/// and continued: every send ends `Sent` (the SDK re-sends what was
/// answered `Unavailable`), nothing is stored twice, and every member
/// shows each message once, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_group_shard_loses_nothing_and_stores_nothing_twice() {
    use std::time::Duration;
    let options = support::Options {
        shards: 1,
        shard_processes: true,
        gateway_toml: Some("[timers]\nsend_answer_ms_max = 1000\n".into()),
        ..support::Options::default()
    };
    let (c, shards) = Cluster::start_with(options).await;
    let owner = c.user("owner", "pw").await;
    let reader = c.user("reader", "pw").await;
    let p = &c.profile_client;
    let group = p.group_create(owner, "paused", "").await.unwrap().group;
    p.group_invite(owner, group, reader).await.unwrap();
    p.group_answer_invite(reader, group, true, 0).await.unwrap();
    let (sender, _events) = c.sdk("owner", "pw").await;
    let count = 60;
    let send_range = |r: std::ops::Range<usize>| {
        let sender = sender.clone();
        async move {
            for n in r {
                let body = format!("from sender 0 number {n}").into_bytes();
                sender.group_send(group, body).await.expect("group send");
            }
        }
    };
    send_range(0..20).await;
    shards[0].pause(); // SIGSTOP: the next sends meet a stopped shard
    let resume = async {
        tokio::time::sleep(Duration::from_secs(2)).await;
        shards[0].resume(); // SIGCONT
    };
    let rest = async { tokio::join!(send_range(20..count), resume) };
    tokio::time::timeout(WAIT * 2, rest)
        .await
        .expect("every send answered");
    let (conn, mut events) = c.sdk("reader", "pw").await;
    let shown = group_messages(&conn, &mut events, count).await;
    check_exact(1, &shown, count);
}
