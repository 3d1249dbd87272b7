//! When storage runs out: the LMDB map is full, or a log write fails (here
//! through RLIMIT_FSIZE, which fails writes past a size the way a full disk
//! fails them). Each time the caller gets an error, nothing it was refused
//! is stored, and the shard stays consistent and usable.

use msgstore::{AppendRequest, EngineConfig, Error, FsyncPolicy, Shard};
use std::path::Path;

const CHILD_DIR: &str = "MSGSTORE_STORAGE_FULL_CHILD_DIR";

fn config(index_map_bytes: u64) -> EngineConfig {
    EngineConfig {
        fsync: FsyncPolicy::Never,
        bucket_dirs: 2,
        bucket_files: 2,
        wal_segment_bytes: 256 * 1024,
        checkpoint_wal_bytes: 64 * 1024,
        checkpoint_stall_wal_bytes: 2 * 1024 * 1024,
        wal_bytes_max: 4 * 1024 * 1024,
        index_map_bytes,
        ..EngineConfig::default()
    }
}

fn batch(first_user: u64, users: u64) -> Vec<AppendRequest> {
    (first_user..first_user + users)
        .map(|user| AppendRequest {
            user,
            msg_id: u128::from(user),
            payload: user.to_le_bytes().to_vec(),
        })
        .collect()
}

#[test]
fn a_full_index_map_fails_checkpoints_but_loses_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let small = config(1 << 20);
    let shard = Shard::open(dir.path(), small.clone()).unwrap();
    // One message each for many users: more user states than a 1 MiB map
    // holds. Appends keep succeeding (the log has them) until the log
    // reaches wal_bytes_max, then they are refused with Overloaded.
    let mut stored = 0u64;
    let mut refused = None;
    'fill: for round in 0..200u64 {
        let results = shard
            .append_batch(batch(round * 1000, 1000))
            .wait()
            .unwrap();
        for r in results {
            match r {
                Ok(seq) => {
                    assert_eq!(seq, 1);
                    stored += 1;
                }
                Err(e) => {
                    refused = Some(e);
                    break 'fill;
                }
            }
        }
    }
    assert!(
        matches!(refused, Some(Error::Overloaded(_))),
        "appends are refused once the log cannot be checkpointed: {refused:?}"
    );
    assert!(stored > 20_000, "{stored} appends were stored first");
    let err = shard.checkpoint().wait().expect_err("the map is full");
    assert!(matches!(err, Error::Index(_)), "{err}");
    // Everything acknowledged is readable while the index is full.
    for user in [0, stored / 2, stored - 1] {
        let page = shard.fetch(user, 0, 10, 1024).wait().unwrap();
        assert_eq!(page.records.len(), 1, "user {user}");
        assert_eq!(page.records[0].payload, user.to_le_bytes());
    }
    let stats = shard.stats().wait().unwrap();
    assert_eq!(stats.live_messages, stored);
    let _ = shard.close(); // the final checkpoint fails too; the log stays

    // With room in the index, everything comes back and checkpoints work.
    let shard = Shard::open(dir.path(), config(256 << 20)).unwrap();
    assert_eq!(shard.stats().wait().unwrap().live_messages, stored);
    shard.checkpoint().wait().unwrap();
    for user in (0..stored).step_by(997) {
        let page = shard.fetch(user, 0, 10, 1024).wait().unwrap();
        assert_eq!(page.records.len(), 1, "user {user}");
    }
    shard.close().unwrap();
}

#[test]
fn a_failed_log_write_answers_an_error_and_stores_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let stdout = run_child("log_write_failure_child", CHILD_DIR, dir.path());
    assert!(stdout.contains("BIG_BATCH_REFUSED"), "{stdout}");
    assert!(stdout.contains("SMALL_APPEND_SEQ 1"), "{stdout}");
    // After a restart without the limit: only the small append is there.
    let shard = Shard::open(dir.path(), config(16 << 20)).unwrap();
    let page = shard.fetch(7, 0, 100, 1 << 20).wait().unwrap();
    assert_eq!(page.records.len(), 1);
    assert_eq!(page.records[0].payload, b"small");
    assert_eq!(shard.stats().wait().unwrap().live_messages, 1);
    assert_eq!(shard.append(7, 2, b"next".to_vec()).wait().unwrap(), 2);
    shard.close().unwrap();
}

/// Not a test on its own: the child of the test above (it does nothing
/// unless `MSGSTORE_STORAGE_FULL_CHILD_DIR` is set). Files may not grow
/// past 512 KiB, so a batch bigger than that cannot be logged.
#[test]
fn log_write_failure_child() {
    let Ok(dir) = std::env::var(CHILD_DIR) else {
        return;
    };
    let limit = libc::rlimit {
        rlim_cur: 512 * 1024,
        rlim_max: 512 * 1024,
    };
    // SAFETY: plain syscalls; writes past the limit then fail with EFBIG
    // instead of killing the process with SIGXFSZ.
    unsafe {
        libc::signal(libc::SIGXFSZ, libc::SIG_IGN);
        assert_eq!(libc::setrlimit(libc::RLIMIT_FSIZE, &limit), 0);
    }
    let shard = Shard::open(Path::new(&dir), config(16 << 20)).unwrap();
    let big: Vec<AppendRequest> = (0..1000)
        .map(|i| AppendRequest {
            user: 7,
            msg_id: i,
            payload: vec![1u8; 1000],
        })
        .collect();
    let err = shard
        .append_batch(big)
        .wait()
        .expect_err("a 1 MB batch cannot be logged");
    println!("BIG_BATCH_REFUSED {err}");
    let stats = shard.user_stats(7).wait().unwrap();
    assert_eq!(
        (stats.live_count, stats.last_seq),
        (0, 0),
        "nothing of it is stored"
    );
    let seq = shard.append(7, 1000, b"small".to_vec()).wait().unwrap();
    println!("SMALL_APPEND_SEQ {seq}");
    let page = shard.fetch(7, 0, 100, 1 << 20).wait().unwrap();
    assert_eq!(page.records.len(), 1);
    shard.close().unwrap();
}

/// The same on a replicated shard (three real processes): an index too
/// small for the users fails every checkpoint, the unflushed state grows
/// to `wal_bytes_max`, and the leader then refuses new writes with
/// `Unavailable` instead of proposing them (a refusal made while applying
/// would differ between replicas). Everything acknowledged stays readable,
/// and with a larger index after a restart the group takes writes again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_index_on_a_replicated_shard_refuses_writes_and_loses_nothing() {
    use msgstore::raft::testing::{Group, GroupClient, Outcome};
    use proto::shard::{AppendItem, ShardErrorCode};
    use std::time::Duration;

    let engine = |index_map_bytes: u64| {
        format!(
            "[engine]\nbucket_dirs = 2\nbucket_files = 2\nwal_segment_bytes = 262144\n\
             index_map_bytes = {index_map_bytes}\ncheckpoint_wal_bytes = 65536\n\
             checkpoint_stall_wal_bytes = 2097152\nwal_bytes_max = 4194304\n"
        )
    };
    let dir = tempfile::tempdir().unwrap();
    let bin = Path::new(env!("CARGO_BIN_EXE_msgstore"));
    let mut group = Group::start(bin, dir.path(), 3, &engine(1 << 20)).await;
    let mut client = GroupClient::new(group.client_addrs());
    let mut stored = 0u64;
    for round in 0..300u64 {
        let items: Vec<AppendItem> = (round * 1000..(round + 1) * 1000)
            .map(|user| AppendItem {
                user,
                msg_id: u128::from(user),
                payload: user.to_le_bytes().to_vec(),
            })
            .collect();
        let outcome = client
            .call(false, |c| {
                let items = items.clone();
                async move { c.append_batch(items).await }
            })
            .await;
        match outcome {
            Outcome::Done(results) => {
                for r in results {
                    assert_eq!(r, Ok(1), "a new mailbox's first seq");
                    stored += 1;
                }
            }
            // `Unavailable` to a write is an unknown outcome to the group
            // client; the leader is asked directly below.
            Outcome::Unknown | Outcome::Refused(_) => break,
        }
    }
    let refused = {
        let leader = group.wait_for_leader(Duration::from_secs(10)).await;
        let c = msgstore::client::ShardClient::connect(group.replicas[leader].client)
            .await
            .unwrap();
        let item = AppendItem {
            user: u64::MAX,
            msg_id: 1,
            payload: vec![1],
        };
        match c.append_batch(vec![item]).await {
            Err(msgstore::client::ClientError::Shard(e)) => {
                assert_eq!(e.code, ShardErrorCode::Unavailable, "{e:?}");
                assert!(e.message.contains("checkpoints are failing"), "{e:?}");
                true
            }
            other => panic!("a write on a full index: {other:?}"),
        }
    };
    assert!(
        refused,
        "writes are refused once nothing can be checkpointed"
    );
    eprintln!("{stored} appends stored before writes were refused");
    assert!(stored > 10_000, "{stored} appends were stored first");
    for user in [0, stored / 2, stored - 1] {
        let records = client.fetch_all(user).await;
        assert_eq!(records.len(), 1, "user {user}");
        assert_eq!(records[0].payload, user.to_le_bytes());
    }

    // Room in the index: every replica restarts with it, nothing is lost
    // and writes are taken again.
    std::fs::write(dir.path().join("msgstore.toml"), engine(256 << 20)).unwrap();
    for r in &mut group.replicas {
        r.kill();
        r.start();
    }
    group.wait_for_leader(Duration::from_secs(30)).await;
    let mut client = GroupClient::new(group.client_addrs());
    for user in (0..stored).step_by(997) {
        assert_eq!(client.fetch_all(user).await.len(), 1, "user {user}");
    }
    let outcome = client
        .call(false, |c| async move {
            c.append(1, 77, b"again".to_vec()).await
        })
        .await;
    assert!(matches!(outcome, Outcome::Done(2)), "{outcome:?}");
}

const TRIM_CHILD_DIR: &str = "MSGSTORE_TRIMMED_FULL_CHILD_DIR";

/// An idle shard cuts its bucket files back to their records; if the disk
/// is then full, the next checkpoint cannot grow them again. Appends are
/// still acknowledged (the log holds them), checkpoints fail and are
/// retried, and after a crash and a restart with room everything
/// acknowledged is there.
#[test]
fn a_trimmed_bucket_that_cannot_grow_again_loses_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let stdout = run_child("trimmed_bucket_full_disk_child", TRIM_CHILD_DIR, dir.path());
    assert!(stdout.contains("NOT_CHECKPOINTED"), "{stdout}");
    assert!(stdout.contains("ACKED 400"), "{stdout}");
    let shard = Shard::open(dir.path(), trim_config()).unwrap();
    let page = shard.fetch(7, 0, 1000, 1 << 20).wait().unwrap();
    let seqs: Vec<u64> = page.records.iter().map(|r| r.seq).collect();
    assert_eq!(seqs, (1..=400).collect::<Vec<u64>>());
    shard.close().unwrap();
}

fn trim_config() -> EngineConfig {
    EngineConfig {
        bucket_dirs: 1,
        bucket_files: 1,
        checkpoint_idle_ms: 20,
        ..config(16 << 20)
    }
}

/// Not a test on its own: the child of the test above (it does nothing
/// unless `MSGSTORE_TRIMMED_FULL_CHILD_DIR` is set).
#[test]
fn trimmed_bucket_full_disk_child() {
    let Ok(dir) = std::env::var(TRIM_CHILD_DIR) else {
        return;
    };
    let dir = Path::new(&dir);
    let shard = Shard::open(dir, trim_config()).unwrap();
    let append = |i: u64| shard.append(7, u128::from(i), vec![1u8; 1000]).wait();
    for i in 0..300 {
        append(i).unwrap();
    }
    // Idle: checkpointed, then cut back to its records (a file that grew
    // is a whole number of 4 KiB blocks; its records here are not).
    let bucket = dir.join("buckets").join("00").join("00");
    let size = || std::fs::metadata(&bucket).unwrap().len();
    let started = std::time::Instant::now();
    while size() % 4096 == 0 || shard.stats().wait().unwrap().wal_bytes > 0 {
        assert!(started.elapsed().as_secs() < 30, "never trimmed");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    // The disk is full: no file may grow past the bucket's size now (the
    // log's segments are smaller and already allocated).
    let limit = libc::rlimit {
        rlim_cur: size(),
        rlim_max: size(),
    };
    // SAFETY: plain syscalls; growing past the limit then fails with EFBIG
    // instead of killing the process with SIGXFSZ.
    unsafe {
        libc::signal(libc::SIGXFSZ, libc::SIG_IGN);
        assert_eq!(libc::setrlimit(libc::RLIMIT_FSIZE, &limit), 0);
    }
    for i in 300..400 {
        append(i).unwrap();
    }
    std::thread::sleep(std::time::Duration::from_millis(500));
    let stats = shard.stats().wait().unwrap();
    assert!(
        stats.wal_bytes > 0,
        "the checkpoints could not grow the bucket"
    );
    println!("NOT_CHECKPOINTED {}", stats.wal_bytes);
    let page = shard.fetch(7, 0, 1000, 1 << 20).wait().unwrap();
    println!("ACKED {}", page.records.len());
    // A crash: no shutdown (its checkpoint would fail too).
    std::process::exit(0);
}

/// Run child test `name` with its data directory `dir` in env var `key`;
/// its standard output, once it exited successfully.
fn run_child(name: &str, key: &str, dir: &Path) -> String {
    let out = crate::child_test(module_path!(), name)
        .env(key, dir)
        .output()
        .expect("run the child");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}
