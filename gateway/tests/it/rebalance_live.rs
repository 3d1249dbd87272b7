//! A rebalance under live traffic (issue 7): SDK senders and receivers
//! (some online, most offline) keep messaging through a real gateway
//! process while a fourth shard is added to three and then one of the first
//! three is removed, with the rebalance library `imctl rebalance` runs on
//! and the new map pushed to the gateway. Afterwards every message
//! acknowledged to its sender arrives exactly once, nothing arrives twice,
//! and every shard holds only users it owns under the final map.

use crate::support;

use crate::support::{Cluster, Options};
use client::sdk::{Connection, ImEvent};
use msgstore::{
    client::ShardClient,
    rebalance::{Mover, Plan, Progress},
};
use proto::cluster::{ClusterMap, ShardRing};
use std::{
    collections::{HashMap, HashSet},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    time::Duration,
};
use tokio::sync::mpsc;

struct Quiet;

impl Progress for Quiet {
    fn planned(&self, _users: u64, _bytes: u64) {}
    fn moved(&self, _bytes: u64) {}
}

async fn connect(c: &Cluster, user: &str) -> (Connection, tokio::sync::mpsc::Receiver<ImEvent>) {
    c.sdk(user, "pw").await
}

/// The bodies `conn` shows until everything in its mailbox was shown and
/// acknowledged; closes it.
async fn drain(conn: &Connection, events: &mut mpsc::Receiver<ImEvent>) -> Vec<String> {
    let shown = support::messages_until_synced(conn, events).await;
    conn.close().await;
    shown
        .into_iter()
        .map(|d| String::from_utf8(d.body).unwrap())
        .collect()
}

/// Run the whole rebalance from `from` by `change`, as the tool does, and
/// push the new map to the gateway; the new map.
async fn rebalance(plan: Plan, gateway_peer: &str) -> ClusterMap {
    let mover = Mover::connect(plan.clone()).await.unwrap();
    mover.install_moving_routing().await.unwrap();
    let moved = mover.move_all(&Quiet).await.unwrap();
    assert!(moved.users > 0, "someone moved");
    mover.install_final_routing().await.unwrap();
    let epoch = gateway::map_push::push_map(gateway_peer, &plan.to)
        .await
        .unwrap();
    assert_eq!(epoch, plan.to.epoch);
    plan.to
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_survive_adding_and_removing_shards_under_traffic() {
    // Senders write to users who are not their friends: this test is about
    // the moves, not about who may write.
    let options = Options {
        shards: 3,
        spare_shards: 1,
        gateway_toml: Some("[limits]\nallow_strangers = true\n".into()),
        ..Options::default()
    };
    let c = Cluster::start_with(options).await.0;
    let mut receivers = Vec::new();
    for i in 0..24 {
        receivers.push(c.user(&format!("r{i}"), "pw").await);
    }
    let mut online = Vec::new();
    for i in 0..4 {
        let (conn, mut events) = connect(&c, &format!("r{i}")).await;
        // Shows everything while online, then until synced at the end.
        let (stop_tx, mut stop) = tokio::sync::oneshot::channel::<()>();
        let reader_conn = conn.clone();
        let got = tokio::spawn(async move {
            let mut bodies = Vec::new();
            loop {
                tokio::select! {
                    Some(event) = events.recv() => {
                        if let ImEvent::Message(d) = event {
                            bodies.push(String::from_utf8(d.body).unwrap());
                        }
                    }
                    _ = &mut stop => break,
                }
            }
            bodies.extend(drain(&reader_conn, &mut events).await);
            bodies
        });
        online.push((stop_tx, got));
    }
    let stop = Arc::new(AtomicBool::new(false));
    let mut senders = Vec::new();
    for w in 0..3 {
        c.user(&format!("w{w}"), "pw").await;
        let (conn, _events) = connect(&c, &format!("w{w}")).await;
        let (stop, receivers) = (stop.clone(), receivers.clone());
        senders.push(tokio::spawn(async move {
            let _events = _events;
            let mut acked = Vec::new();
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                n += 1;
                let to = receivers[rand::random::<usize>() % receivers.len()];
                let body = format!("w{w}-{n}");
                if conn.send(to, body.clone().into_bytes()).await.is_ok() {
                    acked.push(body);
                }
            }
            conn.close().await;
            (acked, n)
        }));
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let peer = c.peer_addr(1).await;
    let mut map = c.services.map.clone();
    map.shards.truncate(3);
    let spare = c.services.map.shards[3].clone();
    let plan = Plan::add_shard(&map, &spare.id, &spare.addr, 1).unwrap();
    let map = rebalance(plan, &peer).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let removed = map.shards[1].clone();
    let map = rebalance(Plan::remove_shard(&map, &removed.id).unwrap(), &peer).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.store(true, Ordering::Relaxed);
    let mut acked = Vec::new();
    let mut attempted = 0;
    for s in senders {
        let (bodies, n) = s.await.unwrap();
        acked.extend(bodies);
        attempted += n;
    }
    assert!(
        acked.len() > 100,
        "traffic flowed: {} of {attempted}",
        acked.len()
    );

    // Everything each receiver got: pushes while online, then its mailbox.
    let mut received: Vec<String> = Vec::new();
    for (stop, got) in online {
        let _ = stop.send(());
        received.extend(got.await.unwrap());
    }
    // Then every receiver logs in (again): what was not shown yet (a push
    // still on its way when the online ones synced) waits in its mailbox.
    for i in 0..receivers.len() {
        let (conn, mut events) = connect(&c, &format!("r{i}")).await;
        received.extend(drain(&conn, &mut events).await);
    }
    let mut seen = HashSet::new();
    for body in &received {
        assert!(seen.insert(body.as_str()), "{body} arrived twice");
    }
    for body in &acked {
        assert!(
            seen.contains(body.as_str()),
            "acknowledged {body} never arrived"
        );
    }

    // Every shard holds only users the final map gives it.
    let ring = ShardRing::new(&map.shards);
    let mut held: HashMap<String, usize> = HashMap::new();
    for shard in &c.services.map.shards {
        let client = ShardClient::connect(shard.addr.as_str()).await.unwrap();
        let (users, next) = client.list_users(0, 10_000).await.unwrap();
        assert_eq!(next, None);
        for u in &users {
            assert_eq!(
                ring.owner(u.user),
                shard.id,
                "{} holds {}",
                shard.id,
                u.user
            );
        }
        held.insert(shard.id.clone(), users.len());
    }
    assert_eq!(held[&removed.id], 0, "the removed shard is empty");
    assert!(held[&spare.id] > 0, "the added shard holds users");
}
