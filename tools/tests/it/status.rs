//! `imctl status` against a whole cluster run in this process
//! (`embedded`): every process up and "all good" (exit 0), then a shard
//! stopped and named among the problems (exit 1); a replicated group with
//! one leader and its followers' lag.

use embedded::{Embedded, EmbeddedConfig};
use serde_json::Value;
use std::{
    path::Path,
    process::Command,
    time::{Duration, Instant},
};

const WAIT: Duration = Duration::from_secs(30);

/// `imctl [--json] status --cluster MAP`: (exit code, stdout, stderr).
async fn status(map: &Path, json: bool) -> (i32, String, String) {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_imctl"));
    if json {
        cmd.arg("--json");
    }
    cmd.arg("status").arg("--cluster").arg(map);
    daemon::testing::with_cluster_key(&mut cmd);
    let out = tokio::task::spawn_blocking(move || cmd.output().expect("run imctl"))
        .await
        .unwrap();
    (
        out.status.code().expect("imctl exited"),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

async fn status_json(map: &Path) -> (i32, Value) {
    let (code, stdout, stderr) = status(map, true).await;
    let value = serde_json::from_str(&stdout)
        .unwrap_or_else(|e| panic!("bad JSON {stdout:?} ({e}); stderr: {stderr}"));
    (code, value)
}

/// Run `imctl --json status` until `done` holds for its exit code and
/// output (a gateway registers, a group elects its leader); that answer.
async fn until(map: &Path, done: impl Fn(i32, &Value) -> bool) -> (i32, Value) {
    let deadline = Instant::now() + WAIT;
    loop {
        let (code, s) = status_json(map).await;
        if done(code, &s) {
            return (code, s);
        }
        assert!(Instant::now() < deadline, "exit code {code}: {s:#}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn until_all_good(map: &Path) -> Value {
    until(map, |code, _| code == 0).await.1
}

/// A cluster with a gateway, on free ports.
async fn start(dir: &Path, shards: usize, replicas: usize) -> Embedded {
    let mut config = EmbeddedConfig::ephemeral(dir.to_path_buf(), shards);
    config.gateway = Some("127.0.0.1:0".parse().unwrap());
    config.replicas = replicas;
    Embedded::start(config).await.expect("start the cluster")
}

fn problems(s: &Value) -> Vec<String> {
    s["problems"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p.as_str().unwrap().to_string())
        .collect()
}

/// Every process up; `replicas` profile replicas (one standalone, or a
/// group with one leader).
fn assert_all_up(s: &Value, replicas: usize) {
    for p in s["presence"].as_array().unwrap() {
        assert_eq!(p["up"], true, "{p}");
    }
    let profile = s["profile"].as_array().unwrap();
    assert_eq!(profile.len(), replicas, "{profile:?}");
    let roles: Vec<&str> = profile
        .iter()
        .map(|p| {
            assert_eq!(p["up"], true, "{p}");
            p["stats"]["role"].as_str().unwrap()
        })
        .collect();
    match replicas {
        1 => assert_eq!(roles, ["standalone"]),
        _ => assert_eq!(
            roles.iter().filter(|r| **r == "leader").count(),
            1,
            "{roles:?}"
        ),
    }
    for shard in s["shards"].as_array().unwrap() {
        for r in shard["replicas"].as_array().unwrap() {
            assert_eq!(r["up"], true, "{r}");
        }
    }
    let gateways = s["gateways"].as_array().unwrap();
    assert_eq!(gateways.len(), 1, "{gateways:?}");
    assert_eq!(gateways[0]["connected"], true);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn all_good_then_a_stopped_shard_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let mut cluster = start(dir.path(), 2, 1).await;
    let map = cluster.cluster_path();

    let s = until_all_good(&map).await;
    assert_all_up(&s, 1);
    assert_eq!(s["all_good"], true);
    assert_eq!(problems(&s), Vec::<String>::new());
    assert_eq!(s["map_epoch"], 1);
    assert_eq!(s["shards"].as_array().unwrap().len(), 2);
    assert_eq!(s["shards"][0]["replicas"][0]["stats"]["role"], "standalone");
    assert_eq!(s["totals"]["complete"], true);
    let (code, text, _) = status(&map, false).await;
    assert_eq!(code, 0, "{text}");
    assert!(text.contains("all good"), "{text}");

    let stopped = cluster.shards.pop().unwrap();
    let addr = stopped.local_addr().to_string();
    stopped.shutdown().await.unwrap();
    let (code, s) = status_json(&map).await;
    assert_eq!(code, 1, "{s:#}");
    assert_eq!(s["all_good"], false);
    let down = format!("shard s2 {addr} is down");
    assert!(
        problems(&s).iter().any(|p| p.starts_with(&down)),
        "{:?}",
        problems(&s)
    );
    let (code, text, stderr) = status(&map, false).await;
    assert_eq!(code, 1);
    assert!(text.contains(&down), "{text}");
    assert!(stderr.is_empty(), "nothing but the exit code: {stderr}");
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_group_has_one_leader_and_its_followers_lag() {
    let dir = tempfile::tempdir().unwrap();
    let mut cluster = start(dir.path(), 1, 3).await;
    let map = cluster.cluster_path();

    let s = until_all_good(&map).await;
    assert_all_up(&s, 3);
    let shard = &s["shards"][0];
    assert_eq!(shard["replicated"], true);
    let replicas = shard["replicas"].as_array().unwrap();
    assert_eq!(replicas.len(), 3);
    let leaders: Vec<&Value> = replicas
        .iter()
        .filter(|r| r["stats"]["role"] == "leader")
        .collect();
    assert_eq!(leaders.len(), 1, "{replicas:#?}");
    assert_eq!(shard["leader"], leaders[0]["addr"]);
    let raft = &leaders[0]["stats"]["raft"];
    assert!(raft["term"].as_u64().unwrap() >= 1, "{raft}");
    assert!(raft["committed_index"].as_u64().is_some(), "{raft}");
    let lags = shard["replication"].as_array().unwrap();
    assert_eq!(lags.len(), 2, "two followers: {lags:?}");
    for f in lags {
        assert!(f["lag"].as_u64().unwrap() <= 1000, "{f}");
        assert!(f["addr"].is_string(), "{f}");
    }

    let follower = replicas
        .iter()
        .find(|r| r["stats"]["role"] == "follower")
        .expect("a follower");
    let addr = follower["addr"].as_str().unwrap().to_string();
    let i = cluster
        .shards
        .iter()
        .position(|d| d.local_addr().to_string() == addr)
        .unwrap();
    cluster.shards.remove(i).shutdown().await.unwrap();
    let down = format!("shard s1 replica {addr} is down");
    // Two of three still have a leader (perhaps after an election).
    let (code, s) = until(&map, |_, s| s["shards"][0]["leader"].is_string()).await;
    assert_eq!(code, 1, "{s:#}");
    let found = problems(&s);
    assert!(found.iter().any(|p| p.starts_with(&down)), "{found:?}");
    assert!(!found.iter().any(|p| p.contains("no leader")), "{found:?}");

    // A profile replica stopped is named too; the other two keep a leader.
    let stopped = cluster.profile.pop().unwrap();
    let addr = stopped.local_addr().to_string();
    stopped.shutdown().await;
    let (code, s) = until(&map, |_, s| {
        let profile = s["profile"].as_array().unwrap();
        profile.iter().any(|p| p["up"] == false)
            && profile.iter().any(|p| p["stats"]["role"] == "leader")
    })
    .await;
    assert_eq!(code, 1, "{s:#}");
    let found = problems(&s);
    assert!(
        found
            .iter()
            .any(|p| p.contains(&addr) && p.contains("down")),
        "{found:?}"
    );
    assert!(
        !found
            .iter()
            .any(|p| p.contains("profile group has no leader")),
        "{found:?}"
    );
    cluster.shutdown().await;
}
