//! `imctl shard` against a real shard daemon (run in-process on port 0).

use msgstore::daemon::{self, DaemonConfig};

mod common;

fn imctl(addr: &str, args: &[&str]) -> (bool, String, String) {
    let mut all = vec!["shard", "--addr", addr];
    all.extend_from_slice(args);
    common::run(&all, None)
}

fn json(addr: &str, args: &[&str]) -> serde_json::Value {
    let mut all = vec!["shard", "--addr", addr];
    all.extend_from_slice(args);
    common::json(&all)
}

#[test]
fn shard_round_trip() {
    let dir = tempfile::tempdir().unwrap();
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let config = DaemonConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        data: Some(dir.path().to_owned()),
        ..DaemonConfig::default()
    };
    let running = runtime
        .block_on(daemon::start(config))
        .expect("start shard");
    let addr = running.local_addr().to_string();

    let first = json(&addr, &["append", "7", "hello"]);
    assert_eq!(first["seq"], 1);
    assert_eq!(first["msg_id"].as_str().map(str::len), Some(32));
    let (ok, stdout, stderr) = imctl(&addr, &["append", "7", "second message"]);
    assert!(ok, "{stderr}");
    assert!(stdout.contains("seq=2"), "{stdout}");
    assert_ne!(
        json(&addr, &["append", "7", "x"])["msg_id"],
        first["msg_id"]
    );

    let page = json(&addr, &["fetch", "7"]);
    let texts: Vec<&str> = page["records"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["text"].as_str().unwrap())
        .collect();
    assert_eq!(texts, ["hello", "second message", "x"]);
    assert_eq!(page["more"], false);
    let page = json(&addr, &["fetch", "7", "--after", "1", "--max", "1"]);
    assert_eq!(page["records"][0]["text"], "second message");
    assert_eq!(page["more"], true);
    let (ok, stdout, _) = imctl(&addr, &["fetch", "7"]);
    assert!(ok && stdout.contains("second message"), "{stdout}");

    assert_eq!(json(&addr, &["ack", "7", "2"])["removed"], 2);
    let user = json(&addr, &["stats", "--user", "7"]);
    assert_eq!(user["live_count"], 1);
    assert_eq!(user["acked_seq"], 2);
    assert_eq!(user["last_seq"], 3);
    let shard = json(&addr, &["stats"]);
    assert_eq!(shard["live_messages"], 1);
    let (ok, stdout, _) = imctl(&addr, &["stats"]);
    assert!(ok && stdout.contains("live_messages:"), "{stdout}");

    runtime
        .block_on(running.shutdown())
        .expect("clean shutdown");
    let (ok, _, stderr) = imctl(&addr, &["stats"]);
    assert!(!ok, "imctl must fail once the shard is gone");
    assert!(stderr.contains("imctl: error"), "{stderr}");
}
