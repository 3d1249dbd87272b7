//! End-to-end tests of the `msgstore` binary over real sockets
//! (authenticated links: every daemon gets the test process's cluster key).

use daemon::testing::{idle_raw_connections, link, link_from};
use daemon::{secure::Link, testing::DaemonProcess as Daemon};

use msgstore::client::{ClientError, ShardClient};
use proto::shard::{AppendItem, ShardErrorCode, APPEND_BATCH_ITEMS_MAX};
use std::{
    collections::HashMap,
    net::{IpAddr, Ipv4Addr, SocketAddr},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};
use tokio::io::AsyncReadExt;

/// Guard against a hung test; never a performance assertion.
const HANG_LIMIT: Duration = Duration::from_secs(60);

fn start(data: &Path) -> Daemon {
    Daemon::start(daemon_command(data), "msgstore", HANG_LIMIT)
}

fn start_with(cmd: Command) -> Daemon {
    Daemon::start(cmd, "msgstore", HANG_LIMIT)
}

fn daemon_command(data: &Path) -> Command {
    daemon_command_with(data, "never")
}

fn daemon_command_with(data: &Path, fsync: &str) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_msgstore"));
    cmd.arg("--data")
        .arg(data)
        .args(["--listen", "127.0.0.1:0", "--fsync", fsync])
        .env("RUST_LOG", "warn");
    // Also for the runs that are not started through `Daemon::start`: a
    // daemon without a key would fail for that reason instead.
    daemon::testing::with_cluster_key(&mut cmd);
    cmd
}

/// Write `toml` as `dir/msgstore.toml` and start `cmd` with it; returns
/// the file's path.
fn with_config(cmd: &mut Command, dir: &Path, toml: &str) -> PathBuf {
    let config = dir.join("msgstore.toml");
    std::fs::write(&config, toml).unwrap();
    cmd.arg("--config").arg(&config);
    config
}

async fn connect(addr: SocketAddr) -> ShardClient {
    ShardClient::connect(addr)
        .await
        .expect("connect to msgstore")
}

fn payload(user: u64, i: u64) -> Vec<u8> {
    format!("user {user} message {i}").into_bytes()
}

/// Append `count` messages to each of `users` concurrently on one client;
/// returns seq -> payload per user.
async fn append_concurrently(
    client: &ShardClient,
    users: &[u64],
    count: u64,
) -> HashMap<u64, HashMap<u64, Vec<u8>>> {
    let mut tasks = tokio::task::JoinSet::new();
    for &user in users {
        for i in 0..count {
            let client = client.clone();
            tasks.spawn(async move {
                let body = payload(user, i);
                let msg_id = (u128::from(user) << 64) | u128::from(i);
                let seq = client
                    .append(user, msg_id, body.clone())
                    .await
                    .expect("append");
                (user, seq, body)
            });
        }
    }
    let mut by_user: HashMap<u64, HashMap<u64, Vec<u8>>> = HashMap::new();
    while let Some(done) = tasks.join_next().await {
        let (user, seq, body) = done.expect("append task");
        let previous = by_user.entry(user).or_default().insert(seq, body);
        assert!(
            previous.is_none(),
            "seq {seq} of user {user} assigned twice"
        );
    }
    by_user
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelined_round_trip() {
    let dir = tempfile::tempdir().unwrap();
    let daemon = start(dir.path());
    let client = connect(daemon.addr).await;
    client.ping().await.expect("ping");

    let stored = tokio::time::timeout(HANG_LIMIT, append_concurrently(&client, &[7, 8], 1000))
        .await
        .expect("appends finished");
    for user in [7, 8] {
        let mut seqs: Vec<u64> = stored[&user].keys().copied().collect();
        seqs.sort_unstable();
        assert_eq!(seqs, (1..=1000).collect::<Vec<_>>(), "seqs of user {user}");
    }

    // Page through user 7's mailbox.
    let mut after = 0;
    let mut fetched = Vec::new();
    loop {
        let (records, more) = client.fetch(7, after, 300, u32::MAX).await.expect("fetch");
        assert!(
            !records.is_empty() || !more,
            "an empty page must say no more"
        );
        fetched.extend(records);
        after = fetched.last().map_or(after, |r| r.seq);
        if !more {
            break;
        }
    }
    assert_eq!(fetched.len(), 1000);
    for (i, record) in fetched.iter().enumerate() {
        assert_eq!(record.seq, i as u64 + 1, "records come oldest first");
        assert_eq!(record.payload, stored[&7][&record.seq]);
    }

    assert_eq!(client.ack(7, 500).await.expect("ack"), 500);
    let stats = client.user_stats(7).await.expect("user stats");
    assert_eq!(stats.live_count, 500);
    assert_eq!(stats.last_seq, 1000);
    assert_eq!(stats.acked_seq, 500);
    let (records, _) = client.fetch(7, 0, 10, u32::MAX).await.expect("fetch");
    assert_eq!(records.first().map(|r| r.seq), Some(501));

    let shard = client.stats().await.expect("stats");
    assert_eq!(shard.live_messages, 1500);
    assert!(shard.users >= 2, "{shard:?}");
    assert!(shard.appends_total >= 2000, "{shard:?}");

    assert_eq!(daemon.terminate().code(), Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batches_and_limits() {
    let dir = tempfile::tempdir().unwrap();
    let daemon = start(dir.path());
    let client = connect(daemon.addr).await;

    let items: Vec<AppendItem> = (0..3)
        .map(|i| AppendItem {
            user: 42,
            msg_id: i,
            payload: vec![b'x'; 10],
        })
        .collect();
    let results = client.append_batch(items).await.expect("batch");
    let seqs: Vec<u64> = results.into_iter().map(|r| r.expect("item")).collect();
    assert_eq!(seqs, vec![1, 2, 3]);

    let too_many: Vec<AppendItem> = (0..=APPEND_BATCH_ITEMS_MAX as u128)
        .map(|i| AppendItem {
            user: 43,
            msg_id: i,
            payload: Vec::new(),
        })
        .collect();
    match client.append_batch(too_many).await {
        Err(ClientError::Shard(e)) => assert_eq!(e.code, ShardErrorCode::BadRequest),
        other => panic!("oversized batch must be refused, got {other:?}"),
    }
    assert_eq!(client.user_stats(43).await.expect("stats").live_count, 0);

    // A message over the engine's default 64 KiB limit is refused by type.
    match client.append(44, 1, vec![0u8; 65 * 1024]).await {
        Err(ClientError::Shard(e)) => assert_eq!(e.code, ShardErrorCode::MessageTooLarge),
        other => panic!("oversized message must be refused, got {other:?}"),
    }
    // The connection still works after error responses.
    assert_eq!(
        client.append(44, 2, b"ok".to_vec()).await.expect("append"),
        1
    );
}

/// Send raw bytes inside an authenticated link (so the frame decoder sees
/// them) and read until the server closes the link.
async fn expect_closed_after(addr: SocketAddr, bytes: &[u8]) {
    let mut raw = link(addr).await;
    if !bytes.is_empty() {
        raw.writer.send(bytes).await.unwrap();
    }
    let mut sink = Vec::new();
    let read = tokio::time::timeout(HANG_LIMIT, raw.reader.read_to_end(&mut sink))
        .await
        .expect("server closes the connection");
    // EOF or a reset both mean closed; no response may have been sent.
    if read.is_ok() {
        assert!(sink.is_empty(), "no answer to a bad frame: {sink:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_frames_close_only_their_connection() {
    let dir = tempfile::tempdir().unwrap();
    let daemon = start(dir.path());
    let good = connect(daemon.addr).await;
    assert_eq!(good.append(1, 1, b"before".to_vec()).await.unwrap(), 1);

    // Malformed: a 5-byte body that is an unterminated varint.
    let mut malformed = 5u32.to_le_bytes().to_vec();
    malformed.extend_from_slice(&[0xff; 5]);
    expect_closed_after(daemon.addr, &malformed).await;

    // Oversized: a declared length far over the limit (no body needed).
    expect_closed_after(daemon.addr, &u32::MAX.to_le_bytes()).await;

    // Empty body.
    expect_closed_after(daemon.addr, &0u32.to_le_bytes()).await;

    good.ping().await.expect("the good connection survives");
    assert_eq!(good.append(1, 2, b"after".to_vec()).await.unwrap(), 2);
    let fresh = connect(daemon.addr).await;
    assert_eq!(fresh.user_stats(1).await.unwrap().live_count, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_exits_zero_and_data_survives_restart() {
    let dir = tempfile::tempdir().unwrap();
    let daemon = start(dir.path());
    let client = connect(daemon.addr).await;
    for i in 0..10u64 {
        assert_eq!(
            client.append(5, i.into(), payload(5, i)).await.unwrap(),
            i + 1
        );
    }
    let status = daemon.terminate();
    assert_eq!(status.code(), Some(0), "graceful shutdown exits 0");
    // The daemon closed our connection on its way out.
    assert!(matches!(
        client.ping().await,
        Err(ClientError::Disconnected | ClientError::Io(_))
    ));

    let daemon = start(dir.path());
    let client = connect(daemon.addr).await;
    let (records, more) = client.fetch(5, 0, 100, u32::MAX).await.unwrap();
    assert!(!more);
    let payloads: Vec<Vec<u8>> = records.into_iter().map(|r| r.payload).collect();
    assert_eq!(payloads, (0..10).map(|i| payload(5, i)).collect::<Vec<_>>());
    assert_eq!(client.append(5, 99, b"next".to_vec()).await.unwrap(), 11);
    assert_eq!(daemon.terminate().code(), Some(0));
}

#[test]
fn second_daemon_on_same_data_dir_fails_with_lock_message() {
    let dir = tempfile::tempdir().unwrap();
    let first = start(dir.path());
    let second = daemon_command(dir.path())
        .stdin(Stdio::null())
        .output()
        .expect("run second msgstore");
    assert!(!second.status.success(), "second daemon must fail");
    let stderr = String::from_utf8_lossy(&second.stderr);
    assert!(
        stderr.contains("lock"),
        "stderr must mention the lock: {stderr}"
    );
    assert!(
        !String::from_utf8_lossy(&second.stdout).contains("listening"),
        "second daemon must not listen"
    );
    assert_eq!(first.terminate().code(), Some(0));
}

#[test]
fn help_and_bad_config_are_reported() {
    let help = Command::new(env!("CARGO_BIN_EXE_msgstore"))
        .arg("--help")
        .output()
        .expect("run msgstore --help");
    assert!(help.status.success());
    let text = String::from_utf8_lossy(&help.stdout);
    for flag in [
        "--data",
        "--listen",
        "--fsync",
        "--metrics-addr",
        "--config",
    ] {
        assert!(text.contains(flag), "--help mentions {flag}: {text}");
    }

    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("bad.toml");
    std::fs::write(&config, "listen = \"127.0.0.1:0\"\nno_such_field = 1\n").unwrap();
    let out = daemon_command(&dir.path().join("data"))
        .arg("--config")
        .arg(&config)
        .output()
        .expect("run msgstore");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("no_such_field"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn config_file_limits_backpressure_and_connection_cap() {
    let dir = tempfile::tempdir().unwrap();
    let mut cmd = daemon_command(&dir.path().join("data"));
    // `listen` in the file is overridden by the --listen flag.
    with_config(
        &mut cmd,
        dir.path(),
        "listen = \"127.0.0.1:1\"\n[server]\ninflight_requests_max = 2\nconnections_max = 1\n",
    );
    let daemon = start_with(cmd);

    // Far more pipelined requests than the server lets one connection have
    // in flight: back-pressure slows the link but every request is answered.
    let client = connect(daemon.addr).await;
    let stored = tokio::time::timeout(HANG_LIMIT, append_concurrently(&client, &[3], 300))
        .await
        .expect("appends finished");
    let mut seqs: Vec<u64> = stored[&3].keys().copied().collect();
    seqs.sort_unstable();
    assert_eq!(seqs, (1..=300).collect::<Vec<_>>());

    // The single allowed connection is taken: another (authenticated) link
    // is closed at once.
    expect_closed_after(daemon.addr, &[]).await;
    client
        .ping()
        .await
        .expect("the admitted connection keeps working");
    drop(client);

    assert_eq!(daemon.terminate().code(), Some(0));
}

/// Connections that never prove the cluster key hold no connection slot
/// and lock no peer out: with `connections_max = 1` and 2,000 of them open
/// from 127.0.0.1, an authenticated peer from another address gets the one
/// slot and is answered, and one from 127.0.0.1 itself (the strangers' own
/// address) gets in and is answered too while they stay open.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unauthenticated_connections_lock_no_peer_out() {
    use proto::shard::{Request, RequestBody as B, ResponseBody as R};
    let dir = tempfile::tempdir().unwrap();
    let mut cmd = daemon_command(&dir.path().join("data"));
    with_config(&mut cmd, dir.path(), "[server]\nconnections_max = 1\n");
    let daemon = start_with(cmd);
    let raw = idle_raw_connections(daemon.addr, 2_000).await;

    let other = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2));
    let mut peer = tokio::time::timeout(HANG_LIMIT, link_from(other, daemon.addr))
        .await
        .expect("no hang")
        .expect("a peer from another address gets through");
    let ping = |id| Request { id, body: B::Ping };
    peer.writer.send(&frames(&[ping(1)])).await.unwrap();
    let got = responses(&mut peer, &[1]).await;
    assert_eq!(
        got.get(&1),
        Some(&R::Pong),
        "the strangers took no connection slot"
    );
    drop(peer);

    // From the strangers' own address. Retried (until a generous deadline,
    // no timing asserted): the gate may turn a peer away while their
    // handshakes are pending, and the daemon frees `peer`'s slot when it
    // sees it go.
    let deadline = Instant::now() + HANG_LIMIT;
    loop {
        if let Ok(Ok(client)) =
            tokio::time::timeout(HANG_LIMIT, ShardClient::connect(daemon.addr)).await
        {
            if client.ping().await.is_ok() {
                break;
            }
        }
        assert!(
            Instant::now() < deadline,
            "a peer on 127.0.0.1 was locked out"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    drop(raw);
    assert_eq!(daemon.terminate().code(), Some(0));
}

/// Under `always`, a log write that fails (files may not grow past 1 MiB,
/// as on a full disk) answers every request of that batch with a storage
/// error and stops the daemon with a failure status; after a restart
/// without the limit nothing of the failed batch is there and earlier
/// appends are.
#[tokio::test]
async fn a_failed_durable_write_answers_errors_and_stops_the_daemon() {
    let dir = tempfile::tempdir().unwrap();
    let mut cmd = daemon_command_with(&dir.path().join("shard"), "always");
    let config = with_config(
        &mut cmd,
        dir.path(),
        "[engine]\nwal_segment_bytes = 262144\nbucket_dirs = 2\nbucket_files = 2\n",
    );
    daemon::testing::limit_file_size(&mut cmd, 1 << 20);
    let mut daemon = start_with(cmd);
    let client = connect(daemon.addr).await;
    assert_eq!(client.append(1, 1, b"before".to_vec()).await.unwrap(), 1);
    // 1,000 x 1 KiB in one batch: its log write must pass the 1 MiB limit.
    let items: Vec<AppendItem> = (0..1000)
        .map(|i| AppendItem {
            user: 2,
            msg_id: i,
            payload: vec![7u8; 1024],
        })
        .collect();
    match client.append_batch(items).await {
        Err(ClientError::Shard(e)) => assert_eq!(e.code, ShardErrorCode::Storage, "{e:?}"),
        Err(ClientError::Disconnected) => {}
        other => panic!("the batch cannot have been stored: {other:?}"),
    }
    let status = daemon.child.wait().expect("the daemon stops by itself");
    assert!(!status.success(), "{status}");
    drop(client);

    let mut cmd = daemon_command_with(&dir.path().join("shard"), "always");
    cmd.arg("--config").arg(&config);
    let daemon = start_with(cmd);
    let client = connect(daemon.addr).await;
    let (records, _) = client.fetch(1, 0, 10, 1 << 20).await.unwrap();
    assert_eq!(records.len(), 1, "the acknowledged append survived");
    let (records, _) = client.fetch(2, 0, 10, 1 << 20).await.unwrap();
    assert!(records.is_empty(), "nothing of the failed batch is stored");
    assert_eq!(client.user_stats(2).await.unwrap().last_seq, 0);
}

/// Frames of `requests`, in one buffer (one write: one read on the server).
fn frames(requests: &[proto::shard::Request]) -> Vec<u8> {
    let mut out = Vec::new();
    for r in requests {
        proto::frame::encode(r, usize::MAX, &mut out).unwrap();
    }
    out
}

/// Every response on `raw` until `ids` are all answered or it closes.
async fn responses(raw: &mut Link, ids: &[u64]) -> HashMap<u64, proto::shard::ResponseBody> {
    use proto::frame::Decoded;
    let mut got = HashMap::new();
    let mut buf = bytes::BytesMut::new();
    while !ids.iter().all(|id| got.contains_key(id)) {
        while let Decoded::Frame(r) =
            proto::frame::decode::<proto::shard::Response>(&mut buf, usize::MAX).unwrap()
        {
            assert!(
                got.insert(r.id, r.body).is_none(),
                "id {} answered twice",
                r.id
            );
        }
        if ids.iter().all(|id| got.contains_key(id)) {
            break;
        }
        let read = tokio::time::timeout(HANG_LIMIT, raw.reader.read_buf(&mut buf)).await;
        if !matches!(read, Ok(Ok(n)) if n > 0) {
            break;
        }
    }
    got
}

/// A fetch pipelined behind an append of the same user sees it (it waits
/// for the append's batch); a fetch of durable records may be answered
/// before earlier requests, and every id is answered once.
#[tokio::test]
async fn pipelined_fetches_see_earlier_appends_and_only_durable_records() {
    use proto::shard::{Request, RequestBody as B, ResponseBody as R};
    let dir = tempfile::tempdir().unwrap();
    let daemon = start_with(daemon_command_with(dir.path(), "always"));
    let client = connect(daemon.addr).await;
    for i in 0..3 {
        client.append(7, i, payload(7, i as u64)).await.unwrap();
    }
    let fetch = |id, user| Request {
        id,
        body: B::Fetch {
            user,
            after_seq: 0,
            max_count: 100,
            max_bytes: 1 << 20,
        },
    };
    let append = |id, user: u64, i: u64| Request {
        id,
        body: B::Append {
            user,
            msg_id: u128::from(id),
            payload: payload(user, i),
        },
    };
    let mut raw = link(daemon.addr).await;
    let batch = [
        append(1, 8, 0),
        fetch(2, 8),
        fetch(3, 7),
        append(4, 7, 3),
        fetch(5, 7),
    ];
    raw.writer.send(&frames(&batch)).await.unwrap();
    let got = responses(&mut raw, &[1, 2, 3, 4, 5]).await;
    let seqs = |id: u64| match &got[&id] {
        R::Records { records, .. } => records.iter().map(|r| r.seq).collect::<Vec<_>>(),
        other => panic!("answer to {id}: {other:?}"),
    };
    assert_eq!(got[&1], R::Appended { seq: 1 });
    assert_eq!(seqs(2), [1], "the fetch sees the append before it");
    assert_eq!(seqs(3), [1, 2, 3]);
    assert_eq!(got[&4], R::Appended { seq: 4 });
    assert_eq!(seqs(5), [1, 2, 3, 4]);
}

/// A fetch that would show records of a batch whose log write then fails
/// answers the error, never the records (they were never stored).
#[tokio::test]
async fn a_fetch_never_shows_records_whose_write_failed() {
    use proto::shard::{AppendItem, Request, RequestBody as B, ResponseBody as R};
    let dir = tempfile::tempdir().unwrap();
    let mut cmd = daemon_command_with(dir.path(), "always");
    daemon::testing::limit_file_size(&mut cmd, 1 << 20);
    with_config(
        &mut cmd,
        dir.path(),
        "[engine]\nwal_segment_bytes = 262144\n",
    );
    let daemon = start_with(cmd);
    let items: Vec<AppendItem> = (0..1000)
        .map(|i| AppendItem {
            user: 2,
            msg_id: i,
            payload: vec![7u8; 1024],
        })
        .collect();
    let requests = [
        Request {
            id: 1,
            body: B::AppendBatch { items },
        },
        Request {
            id: 2,
            body: B::Fetch {
                user: 2,
                after_seq: 0,
                max_count: 10,
                max_bytes: 1 << 20,
            },
        },
    ];
    let mut raw = link(daemon.addr).await;
    raw.writer.send(&frames(&requests)).await.unwrap();
    let got = responses(&mut raw, &[1, 2]).await;
    match got.get(&2) {
        Some(R::Error(e)) => assert_eq!(e.code, ShardErrorCode::Storage, "{e:?}"),
        other => panic!("the fetch must answer the write's error: {other:?}"),
    }
}

/// Pages answered at once that fill a connection's outbox past what the
/// reader writes itself (64 KiB), pipelined with appends answered after
/// their batch, far more than the socket takes while the client does not
/// read: every answer arrives whole, once, with its records.
#[tokio::test]
async fn large_pipelined_pages_and_staged_answers_arrive_whole() {
    use proto::shard::{Request, RequestBody as B, ResponseBody as R};
    const MESSAGES: u64 = 32;
    const PAYLOAD_BYTES: usize = 8 * 1024;
    let dir = tempfile::tempdir().unwrap();
    let daemon = start_with(daemon_command_with(dir.path(), "always"));
    let client = connect(daemon.addr).await;
    let body = |i: u64| vec![i as u8; PAYLOAD_BYTES];
    for i in 1..=MESSAGES {
        client.append(9, u128::from(i), body(i)).await.unwrap();
    }
    let mut batch = Vec::new();
    for id in 0..60u64 {
        batch.push(Request {
            id,
            body: if id % 3 == 2 {
                B::Append {
                    user: 10,
                    msg_id: u128::from(id),
                    payload: vec![1; 100],
                }
            } else {
                B::Fetch {
                    user: 9,
                    after_seq: 0,
                    max_count: 100,
                    max_bytes: 1 << 20,
                }
            },
        });
    }
    let mut raw = link(daemon.addr).await;
    // In three reads, with nothing read back meanwhile: the later requests
    // come while the server's socket is full.
    for chunk in batch.chunks(20) {
        raw.writer.send(&frames(chunk)).await.unwrap();
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    let ids: Vec<u64> = batch.iter().map(|r| r.id).collect();
    let got = responses(&mut raw, &ids).await;
    assert_eq!(got.len(), ids.len(), "every request answered");
    let mut appended = Vec::new();
    for (id, answer) in &got {
        match answer {
            R::Records { records, more } => {
                assert!(!more);
                assert_eq!(records.len() as u64, MESSAGES, "answer {id}");
                for (i, r) in records.iter().enumerate() {
                    assert_eq!(r.seq, i as u64 + 1);
                    assert_eq!(r.payload, body(r.seq), "answer {id} seq {}", r.seq);
                }
            }
            R::Appended { seq } => appended.push(*seq),
            other => panic!("answer to {id}: {other:?}"),
        }
    }
    appended.sort_unstable();
    assert_eq!(appended, (1..=20).collect::<Vec<_>>());
}

/// Checkpoints that fall behind sustained load stop the server reading
/// (back-pressure, counted) until they catch up; reading resumes, and a
/// load many times `checkpoint_stall_wal_bytes` is acknowledged and stored
/// whole. (`wal_bytes_max` is far from reach here: one socket read may
/// bring more than the stall's margin; the engine test pins that appends
/// are not refused.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sustained_load_stalls_on_checkpoints_instead_of_refusing_appends() {
    const APPENDS: u64 = 3000;
    const USERS: u64 = 8;
    let dir = tempfile::tempdir().unwrap();
    let mut cmd = daemon_command_with(&dir.path().join("data"), "always");
    let metrics = daemon::testing::free_addr();
    cmd.arg("--metrics-addr").arg(metrics.to_string());
    with_config(
        &mut cmd,
        dir.path(),
        "[engine]\nbucket_dirs = 2\nbucket_files = 2\ncheckpoint_wal_bytes = 65536\n\
         checkpoint_stall_wal_bytes = 131072\nwal_bytes_max = 16777216\n",
    );
    let daemon = start_with(cmd);
    let client = connect(daemon.addr).await;
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..APPENDS {
        let client = client.clone();
        tasks.spawn(async move {
            let body = vec![(i % 251) as u8; 1024];
            client.append(i % USERS, u128::from(i), body).await
        });
    }
    let mut acked = 0;
    while let Some(done) = tokio::time::timeout(HANG_LIMIT, tasks.join_next())
        .await
        .expect("appends finished")
    {
        done.unwrap().expect("no append refused");
        acked += 1;
    }
    assert_eq!(acked, APPENDS);
    assert!(daemon::testing::metric(metrics, "msgstore_stalls_total").await >= 1.0);
    // Each user's state came from the index once, when the user was new;
    // across every checkpoint since, it stayed in memory.
    let index_reads = daemon::testing::metric(metrics, "msgstore_index_reads_total").await;
    assert_eq!(index_reads, USERS as f64);
    for user in 0..USERS {
        let mut seen = 0;
        loop {
            let (records, more) = client.fetch(user, seen, 1000, 1 << 22).await.unwrap();
            seen += records.len() as u64;
            if !more {
                break;
            }
        }
        assert_eq!(seen, APPENDS / USERS, "user {user}");
    }
    assert_eq!(daemon.terminate().code(), Some(0));
}
