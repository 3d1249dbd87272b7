//! The gateway during and after a rebalance (issue 7): it follows `Moved`
//! to a shard its map does not know yet, waits out `Busy` while a user is
//! frozen, takes a newer cluster map pushed over the peer link (and keeps
//! it across a restart), and picks up the shards' newer map when it starts.
//! Users are moved here by hand with the shard calls the rebalance tool
//! uses (routing, freeze, fetch, import, release).

use crate::support;

use crate::support::{Cluster, WAIT};
use embedded::{Embedded, EmbeddedConfig};
use gateway::{
    map_push::{push_map, MapPushError},
    shards::{ShardCallError, Shards, SHARD_REDIRECTS_MAX},
};
use msgstore::client::ShardClient;
use proto::{
    app::{Reply, SendOutcome},
    cluster::{ClusterMap, ShardRing},
    shard::{Routing, FETCH_BYTES_MAX, FETCH_COUNT_MAX},
};

/// The gateway's map (epoch 1: shard s1 only) and the map after adding s2
/// (epoch 2: s1 and s2).
fn maps(c: &Cluster) -> (ClusterMap, ClusterMap) {
    let mut new = c.services.map.clone();
    new.epoch = 2;
    let mut old = c.services.map.clone();
    old.shards.truncate(1);
    (old, new)
}

/// A new user (password "pb") whom `map` places on shard `shard`, made a
/// friend of `friend` (who writes to it).
async fn user_on(c: &Cluster, map: &ClusterMap, shard: &str, name: &str, friend: u64) -> u64 {
    let ring = ShardRing::new(&map.shards);
    for i in 0..64 {
        let user = c.user(&format!("{name}{i}"), "pb").await;
        if ring.owner(user) == shard {
            c.befriend(friend, user).await;
            return user;
        }
    }
    panic!("no user on {shard} among 64");
}

async fn shard(c: &Cluster, id: &str) -> ShardClient {
    let addr = &c.services.map.shard(id).expect("shard in the map").addr;
    ShardClient::connect(addr.as_str()).await.unwrap()
}

/// Install on s1 and s2 the routing of a rebalance from `old` to `new`.
async fn start_rebalance(c: &Cluster, old: &ClusterMap, new: &ClusterMap) {
    for id in ["s1", "s2"] {
        let routing = Routing {
            me: id.into(),
            current: old.clone(),
            target: Some(new.clone()),
        };
        shard(c, id).await.set_routing(routing).await.unwrap();
    }
}

/// Copy frozen `user`'s mailbox from `from` to `to`, then release it on
/// `from` as moved.
async fn copy_and_release(from: &ShardClient, to: &ShardClient, user: u64, token: u64) {
    let stats = from.user_stats(user).await.unwrap();
    let (records, more) = from
        .fetch(user, 0, FETCH_COUNT_MAX, FETCH_BYTES_MAX)
        .await
        .unwrap();
    assert!(!more, "a small mailbox fits one page");
    to.import(user, stats.acked_seq, records).await.unwrap();
    from.release(user, token, true).await.unwrap();
}

async fn send(client: &mut support::TestClient, to: u64, id: u128, body: &str) -> u64 {
    match client.send(to, id, body.as_bytes()).await {
        Ok(Reply::Sent(SendOutcome { seq })) => seq,
        other => panic!("expected sent, got {other:?}"),
    }
}

/// Bob logs in and fetches everything: (seq, body) pairs.
async fn mailbox(c: &Cluster, bob: u64) -> Vec<(u64, String)> {
    let name = c.profile_client.get_profile(bob).await.unwrap().username;
    let mut client = c.login(&name, "pb").await.unwrap();
    let (messages, _, more) = client.fetch(0, 100).await;
    assert!(!more);
    messages
        .into_iter()
        .map(|m| (m.seq, String::from_utf8(m.body).unwrap()))
        .collect()
}

fn expect(pairs: &[(u64, &str)]) -> Vec<(u64, String)> {
    pairs.iter().map(|(s, b)| (*s, b.to_string())).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_moved_users_messages_follow_it_to_a_shard_the_gateway_does_not_know() {
    let c = Cluster::start_with_spare_shards(2, 1).await;
    let (old, new) = maps(&c);
    let a = c.user("alice", "pa").await;
    let bob = user_on(&c, &new, "s2", "bob", a).await;
    let mut alice = c.login("alice", "pa").await.unwrap();
    assert_eq!(send(&mut alice, bob, 1, "m1").await, 1);
    assert_eq!(send(&mut alice, bob, 2, "m2").await, 2);

    start_rebalance(&c, &old, &new).await;
    let (s1, s2) = (shard(&c, "s1").await, shard(&c, "s2").await);
    s1.freeze(bob, 7).await.unwrap();
    copy_and_release(&s1, &s2, bob, 7).await;

    // The gateway still routes by epoch 1, where s2 does not exist.
    assert_eq!(send(&mut alice, bob, 3, "m3").await, 3);
    assert_eq!(s2.user_stats(bob).await.unwrap().live_count, 3);
    assert!(s1.user_stats(bob).await.is_err(), "s1 answers Moved");
    let got = mailbox(&c, bob).await;
    assert_eq!(got, expect(&[(1, "m1"), (2, "m2"), (3, "m3")]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_users_message_waits_and_is_stored_once_moved() {
    let mut c = Cluster::start_with_spare_shards(2, 1).await;
    let metrics = support::free_addr();
    // A long budget, so the wait outlasts any slowness of this machine;
    // the send's answer waits as long (an `Unavailable` at the answer bound
    // would be right too, but this test is about the store).
    let config = c.dir.path().join("patient.toml");
    std::fs::write(
        &config,
        "[timers]\nshard_busy_wait_ms_max = 60000\nsend_answer_ms_max = 60000\nretry_hold_ms = 60000\n",
    )
    .unwrap();
    let config = config.to_str().unwrap().to_string();
    let metrics_arg = metrics.to_string();
    c.restart_gateway(&["--config", &config, "--metrics-addr", &metrics_arg]);
    let (old, new) = maps(&c);
    let a = c.user("alice", "pa").await;
    let bob = user_on(&c, &new, "s2", "bob", a).await;
    let mut alice = c.login("alice", "pa").await.unwrap();
    assert_eq!(send(&mut alice, bob, 1, "m1").await, 1);

    start_rebalance(&c, &old, &new).await;
    let (s1, s2) = (shard(&c, "s1").await, shard(&c, "s2").await);
    s1.freeze(bob, 9).await.unwrap();
    let sending = tokio::spawn(async move {
        let seq = send(&mut alice, bob, 2, "m2").await;
        (alice, seq)
    });
    let deadline = tokio::time::Instant::now() + WAIT;
    while support::metric(metrics, "gateway_shard_busy_retries_total").await < 1.0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "a Busy answer in time"
        );
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    assert!(!sending.is_finished(), "the send waits while bob is frozen");
    assert_eq!(s1.user_stats(bob).await.unwrap().live_count, 1);
    copy_and_release(&s1, &s2, bob, 9).await;

    let (_alice, seq) = tokio::time::timeout(WAIT, sending).await.unwrap().unwrap();
    assert_eq!(seq, 2, "stored once released, after m1");
    assert!(support::metric(metrics, "gateway_shard_moved_total").await >= 1.0);
    assert_eq!(mailbox(&c, bob).await, expect(&[(1, "m1"), (2, "m2")]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pushed_map_is_adopted_if_newer_and_kept_across_a_restart() {
    let mut c = Cluster::start_with_spare_shards(2, 1).await;
    let (old, new) = maps(&c);
    let a = c.user("alice", "pa").await;
    let bob = user_on(&c, &new, "s2", "bob", a).await;
    let peer = c.peer_addr(1).await;
    assert_eq!(push_map(&peer, &new).await.unwrap(), 2);
    assert_eq!(push_map(&peer, &new).await.unwrap(), 2, "again: the same");
    let refused = push_map(&peer, &old).await;
    assert!(matches!(refused, Err(MapPushError::Older { in_use: 2 })));

    // No shard has a routing, so only the gateway's map can put bob's
    // message on s2.
    let (s1, s2) = (shard(&c, "s1").await, shard(&c, "s2").await);
    let mut alice = c.login("alice", "pa").await.unwrap();
    assert_eq!(send(&mut alice, bob, 1, "m1").await, 1);
    assert_eq!(s2.user_stats(bob).await.unwrap().live_count, 1);
    assert_eq!(s1.user_stats(bob).await.unwrap().live_count, 0);

    drop(alice);
    c.restart_gateway(&[]);
    let peer = c.peer_addr(1).await;
    let refused = push_map(&peer, &old).await;
    assert!(matches!(refused, Err(MapPushError::Older { in_use: 2 })));
    let mut alice = c.login("alice", "pa").await.unwrap();
    assert_eq!(send(&mut alice, bob, 2, "m2").await, 2);
    assert_eq!(s2.user_stats(bob).await.unwrap().live_count, 2);
    assert_eq!(mailbox(&c, bob).await, expect(&[(1, "m1"), (2, "m2")]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_gateway_adopts_the_newer_map_the_shards_route_by() {
    let mut c = Cluster::start_with_spare_shards(2, 1).await;
    let (_old, new) = maps(&c);
    for id in ["s1", "s2"] {
        let routing = Routing {
            me: id.into(),
            current: new.clone(),
            target: None,
        };
        shard(&c, id).await.set_routing(routing).await.unwrap();
    }
    c.restart_gateway(&[]);
    let peer = c.peer_addr(1).await;
    let mut older = new.clone();
    older.epoch = 1;
    let refused = push_map(&peer, &older).await;
    assert!(matches!(refused, Err(MapPushError::Older { in_use: 2 })));
    let saved = std::fs::read_to_string(c.dir.path().join("gateway/cluster-map.toml")).unwrap();
    assert_eq!(ClusterMap::from_toml(&saved).unwrap(), new);
}

/// Shards that point at each other for a user make a call fail after
/// `SHARD_REDIRECTS_MAX` redirects; a user frozen for longer than the
/// busy budget makes it fail too, with nothing stored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redirect_loops_and_long_freezes_fail_as_unavailable() {
    let dir = tempfile::tempdir().unwrap();
    let services = Embedded::start(EmbeddedConfig::ephemeral(dir.path().to_path_buf(), 2))
        .await
        .unwrap();
    let both = services.map.clone();
    let mut only_s1 = both.clone();
    only_s1.shards.truncate(1);
    let client = |i: usize| ShardClient::connect(services.shards[i].local_addr());
    let (s1, s2) = (client(0).await.unwrap(), client(1).await.unwrap());
    let mut newer_both = both.clone();
    newer_both.epoch = 2;
    let routing = |me: &str, current: &ClusterMap, target: &ClusterMap| Routing {
        me: me.into(),
        current: current.clone(),
        target: Some(target.clone()),
    };
    // s1 sends s2's users to s2; s2 sends them back to s1.
    let mut newer_s1 = only_s1.clone();
    newer_s1.epoch = 2;
    s1.set_routing(routing("s1", &only_s1, &newer_both))
        .await
        .unwrap();
    s2.set_routing(routing("s2", &both, &newer_s1))
        .await
        .unwrap();
    let ring = ShardRing::new(&both.shards);
    let on = |shard: &str| (1u64..).find(|&u| ring.owner(u) == shard).unwrap();
    let shards = Shards::new(both, 300);

    let looping = shards.append(on("s2"), 1, b"x".to_vec()).await;
    match looping {
        Err(ShardCallError::Unavailable { reason, .. }) => assert!(
            reason.contains(&format!("more than {SHARD_REDIRECTS_MAX} moved")),
            "{reason}"
        ),
        other => panic!("expected unavailable, got {other:?}"),
    }

    let frozen = on("s1");
    s1.freeze(frozen, 3).await.unwrap();
    let waited = shards.append(frozen, 2, b"y".to_vec()).await;
    match waited {
        Err(ShardCallError::Unavailable { reason, .. }) => {
            assert!(reason.contains("busy"), "{reason}")
        }
        other => panic!("expected unavailable, got {other:?}"),
    }
    assert_eq!(s1.user_stats(frozen).await.unwrap().live_count, 0);
    s1.release(frozen, 3, false).await.unwrap();
    assert_eq!(shards.append(frozen, 2, b"y".to_vec()).await, Ok(1));
    services.shutdown().await;
}
