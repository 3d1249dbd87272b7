//! Group chat end to end with real processes (docs/PROTOCOL.md §6.7): a
//! group whose members are on two gateways, half of them offline; two
//! senders on different gateways send at once. Every member ends with
//! every message exactly once and in group seq order, each sender's in the
//! order sent, and each message went at most once to the other gateway.

mod support;

use client::sdk::{Connection, ImEvent};
use proto::app::Delivery;
use std::collections::BTreeMap;
use support::{Cluster, WAIT};
use tokio::sync::mpsc;

const MEMBERS: usize = 8;
const PER_SENDER: usize = 20;

/// Group messages shown by `conn` until `count` were shown and it is synced.
async fn group_messages(
    conn: &Connection,
    events: &mut mpsc::Receiver<ImEvent>,
    count: usize,
) -> Vec<Delivery> {
    let mut shown = Vec::new();
    let deadline = tokio::time::Instant::now() + WAIT;
    let take = |event, shown: &mut Vec<Delivery>| {
        if let ImEvent::GroupMessage { delivery, .. } = event {
            shown.push(delivery);
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

/// Every message once, in seq order 1..=total, each sender's in its order.
fn check(member: usize, shown: &[Delivery], total: usize) {
    let seqs: Vec<u64> = shown.iter().map(|d| d.seq).collect();
    let want: Vec<u64> = (1..=total as u64).collect();
    assert_eq!(seqs, want, "member {member}: seqs shown");
    let mut last: BTreeMap<u64, usize> = BTreeMap::new();
    for d in shown {
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
        check(i, &shown, total);
    }
    for i in MEMBERS / 2..MEMBERS {
        let (conn, mut events) = connect(i).await;
        let shown = group_messages(&conn, &mut events, total).await;
        check(i, &shown, total);
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
