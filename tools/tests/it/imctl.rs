//! `imctl shard` and `imctl presence` against real daemons (run in-process
//! on port 0).

use msgstore::daemon::{self, DaemonConfig};

use crate::common;

fn imctl(addr: &str, args: &[&str]) -> (bool, String, String) {
    imctl_group("shard", addr, args)
}

/// Run `imctl GROUP --addr ADDR ARGS...`: (success, stdout, stderr).
fn imctl_group(group: &str, addr: &str, args: &[&str]) -> (bool, String, String) {
    let mut all = vec![group, "--addr", addr];
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

    // A group's mailbox (bit 63 set) beside the user's.
    let group = (1u64 << 63) | 5;
    json(&addr, &["append", &group.to_string(), "to the group"]);
    let all = json(&addr, &["mailboxes"]);
    let ids: Vec<(u64, bool, u64)> = all
        .as_array()
        .unwrap()
        .iter()
        .map(|m| {
            (
                m["id"].as_u64().unwrap(),
                m["group"].as_bool().unwrap(),
                m["live_count"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(ids, [(7, false, 1), (group, true, 1)]);
    let groups = json(&addr, &["mailboxes", "--only", "groups"]);
    assert_eq!(groups.as_array().unwrap().len(), 1);
    let (ok, stdout, _) = imctl(&addr, &["mailboxes", "--only", "users"]);
    assert!(
        ok && stdout.trim() == "user 7: 1 messages, 1 bytes",
        "{stdout}"
    );

    runtime
        .block_on(running.shutdown())
        .expect("clean shutdown");
    let (ok, _, stderr) = imctl(&addr, &["stats"]);
    assert!(!ok, "imctl must fail once the shard is gone");
    assert!(stderr.contains("imctl: error"), "{stderr}");
}

/// `imctl presence` with one gateway online.
#[test]
fn presence_stats_lookup_and_gateways() {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let config = presence::daemon::DaemonConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        ..presence::daemon::DaemonConfig::default()
    };
    let running = presence::daemon::start(config).expect("start presence");
    let addr = running.local_addr().to_string();
    let (gw, _events) = runtime
        .block_on(presence::PresenceClient::connect(
            addr.as_str(),
            4,
            presence::ClientConfig::default(),
        ))
        .expect("connect a gateway");
    runtime
        .block_on(gw.online(42, 4200, presence::Status::Away))
        .expect("online");

    let (ok, stdout, stderr) = imctl_group("presence", &addr, &["--json", "lookup", "42", "43"]);
    assert!(ok, "{stderr}");
    let rows: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(rows[0]["user"], 42);
    assert_eq!(rows[0]["entry"]["gateway"], 4);
    assert_eq!(rows[0]["entry"]["session"], 4200);
    assert_eq!(rows[0]["entry"]["status"], "Away");
    assert!(rows[1]["entry"].is_null());

    let (ok, stdout, stderr) = imctl_group("presence", &addr, &["lookup", "42", "43"]);
    assert!(ok, "{stderr}");
    assert!(
        stdout.contains("42: Away on gateway 4 session 4200"),
        "{stdout}"
    );
    assert!(stdout.contains("43: offline"), "{stdout}");

    let (ok, stdout, stderr) = imctl_group("presence", &addr, &["--json", "stats"]);
    assert!(ok, "{stderr}");
    let stats: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(stats["users_online"], 1);
    assert_eq!(stats["gateways_connected"], 1);

    let (ok, stdout, stderr) = imctl_group("presence", &addr, &["gateways"]);
    assert!(ok, "{stderr}");
    assert!(stdout.contains("gateway 4"), "{stdout}");
    assert!(stdout.contains("connected, 1 users"), "{stdout}");

    let (ok, _, stderr) = imctl_group("presence", "127.0.0.1:1", &["stats"]);
    assert!(!ok, "no server at port 1");
    assert!(stderr.contains("presence server"), "{stderr}");
    drop(gw);
    runtime.block_on(running.shutdown()).expect("shutdown");
}

/// `imctl shard repair`: a standalone shard whose log is damaged in the
/// middle refuses to open; the command cuts the log there, says what was
/// dropped, and the shard opens again.
#[test]
fn shard_repair_cuts_a_damaged_log_and_says_what_was_lost() {
    use msgstore::{EngineConfig, Error, Shard};
    let dir = tempfile::tempdir().unwrap();
    let toml = dir.path().join("msgstore.toml");
    std::fs::write(
        &toml,
        "[engine]\nbucket_dirs = 1\nbucket_files = 1\nwal_segment_bytes = 1048576\n\
         index_map_bytes = 16777216\n",
    )
    .unwrap();
    // Every append synced, and no checkpoint (which would empty the log).
    let config = || EngineConfig {
        bucket_dirs: 1,
        bucket_files: 1,
        wal_segment_bytes: 1 << 20,
        index_map_bytes: 16 << 20,
        fsync: msgstore::FsyncPolicy::Always,
        checkpoint_wal_bytes: 1 << 30,
        checkpoint_stall_wal_bytes: 1 << 30,
        wal_bytes_max: 1 << 30,
        checkpoint_interval_ms: 1 << 40,
        checkpoint_idle_ms: 1 << 40,
        ..EngineConfig::default()
    };
    let live = dir.path().join("live");
    let shard = Shard::open(&live, config()).unwrap();
    for i in 0..200u64 {
        shard
            .append(7, u128::from(i + 1), vec![b'x'; 100])
            .wait()
            .unwrap();
    }
    // A crash: the files as they are, never closed (closing would
    // checkpoint and empty the log).
    let data = dir.path().join("data");
    ::daemon::testing::copy_dir_except(&live, &data, "spare.tmp");
    std::mem::forget(shard);
    let mut segs: Vec<std::path::PathBuf> = std::fs::read_dir(data.join("wal"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "log"))
        .collect();
    segs.sort();
    // The log's frames (docs/STORAGE.md): a 32-byte segment header, then
    // length u32, checksum u32, body. Flip a byte in the 100th's body.
    let mut bytes = std::fs::read(&segs[0]).unwrap();
    let mut at = 32;
    for _ in 0..100 {
        let len = u32::from_le_bytes(bytes[at..at + 4].try_into().unwrap()) as usize;
        at += 8 + len;
    }
    bytes[at + 10] ^= 0x5A;
    std::fs::write(&segs[0], bytes).unwrap();
    match Shard::open(&data, config()) {
        Err(Error::LogDamaged(_)) => {}
        Err(e) => panic!("refused for another reason: {e}"),
        Ok(_) => panic!("a damaged log opened"),
    }

    let data_arg = data.display().to_string();
    let toml_arg = toml.display().to_string();
    let (ok, stdout, stderr) = common::run(
        &[
            "shard", "repair", "--data", &data_arg, "--config", &toml_arg,
        ],
        None,
    );
    assert!(ok, "{stderr}");
    assert!(stdout.contains("cut the log at"), "{stdout}");
    assert!(stdout.contains("dropped 99 valid entries"), "{stdout}");
    let shard = Shard::open(&data, config()).expect("opens after the repair");
    let seq = shard.append(7, 1_000, b"after".to_vec()).wait().unwrap();
    assert!(seq > 200, "a seq once given is never given again: {seq}");
}
