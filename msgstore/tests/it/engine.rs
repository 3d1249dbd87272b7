//! The engine in-process: the API contract, limits, restart, compaction.

use msgstore::{AppendRequest, EngineConfig, Error, FsyncPolicy, Shard};
use std::path::Path;

fn small_config() -> EngineConfig {
    EngineConfig {
        bucket_dirs: 4,
        bucket_files: 4,
        wal_segment_bytes: 256 * 1024,
        ..EngineConfig::default()
    }
}

fn open(dir: &Path, config: &EngineConfig) -> Shard {
    Shard::open(dir, config.clone()).expect("open shard")
}

fn payloads(shard: &Shard, user: u64, after: u64) -> Vec<(u64, Vec<u8>)> {
    let page = shard.fetch(user, after, 1000, 1 << 20).wait().unwrap();
    page.records
        .into_iter()
        .map(|r| (r.seq, r.payload))
        .collect()
}

#[test]
fn append_fetch_ack_round_trip_with_gap_free_seqs() {
    let dir = tempfile::tempdir().unwrap();
    let shard = open(dir.path(), &small_config());
    for i in 1..=5u64 {
        assert_eq!(
            shard.append(7, i.into(), vec![i as u8; 3]).wait().unwrap(),
            i
        );
    }
    assert_eq!(shard.append(8, 1, b"other".to_vec()).wait().unwrap(), 1);
    let got = payloads(&shard, 7, 0);
    assert_eq!(got.len(), 5);
    assert_eq!(got[2], (3, vec![3u8; 3]));
    assert_eq!(payloads(&shard, 7, 3).len(), 2);
    assert_eq!(shard.ack(7, 3).wait().unwrap(), 3);
    assert_eq!(
        shard.ack(7, 3).wait().unwrap(),
        0,
        "acking again removes nothing"
    );
    assert_eq!(
        payloads(&shard, 7, 0)
            .iter()
            .map(|r| r.0)
            .collect::<Vec<_>>(),
        vec![4, 5]
    );
    let stats = shard.user_stats(7).wait().unwrap();
    assert_eq!(
        (
            stats.live_count,
            stats.last_seq,
            stats.acked_seq,
            stats.live_bytes
        ),
        (2, 5, 3, 6)
    );
    // Acking past the end clamps to the last seq.
    assert_eq!(shard.ack(7, 99).wait().unwrap(), 2);
    assert_eq!(
        shard.append(7, 6, b"x".to_vec()).wait().unwrap(),
        6,
        "seqs are never reused"
    );
    shard.close().unwrap();
}

#[test]
fn pages_respect_count_and_byte_limits() {
    let dir = tempfile::tempdir().unwrap();
    let shard = open(dir.path(), &small_config());
    for i in 0..10u64 {
        shard.append(1, i.into(), vec![0u8; 100]).wait().unwrap();
    }
    shard.checkpoint().wait().unwrap();
    for i in 10..20u64 {
        shard.append(1, i.into(), vec![0u8; 100]).wait().unwrap();
    }
    let page = shard.fetch(1, 0, 4, 1 << 20).wait().unwrap();
    assert_eq!(
        page.records.iter().map(|r| r.seq).collect::<Vec<_>>(),
        vec![1, 2, 3, 4]
    );
    assert!(page.more);
    let page = shard.fetch(1, 8, 100, 350).wait().unwrap();
    assert_eq!(
        page.records.iter().map(|r| r.seq).collect::<Vec<_>>(),
        vec![9, 10, 11]
    );
    let page = shard.fetch(1, 0, 100, 10).wait().unwrap();
    assert_eq!(
        page.records.len(),
        1,
        "the first record is returned even over the byte budget"
    );
    let page = shard.fetch(1, 15, 100, 1 << 20).wait().unwrap();
    assert_eq!(page.records.len(), 5);
    assert!(!page.more);
    shard.close().unwrap();
}

#[test]
fn limits_refuse_and_store_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let config = EngineConfig {
        message_bytes_max: 100,
        mailbox_messages_max: 3,
        mailbox_bytes_max: 250,
        ..small_config()
    };
    let shard = open(dir.path(), &config);
    assert!(matches!(
        shard.append(1, 1, vec![0; 101]).wait(),
        Err(Error::MessageTooLarge { len: 101, max: 100 })
    ));
    for i in 0..3 {
        shard.append(1, i, vec![0; 10]).wait().unwrap();
    }
    assert!(matches!(
        shard.append(1, 9, vec![0; 10]).wait(),
        Err(Error::MailboxFull { .. })
    ));
    shard.append(2, 1, vec![0; 100]).wait().unwrap();
    shard.append(2, 2, vec![0; 100]).wait().unwrap();
    assert!(matches!(
        shard.append(2, 3, vec![0; 100]).wait(),
        Err(Error::MailboxFull { .. })
    ));
    let stats = shard.user_stats(1).wait().unwrap();
    assert_eq!(
        (stats.live_count, stats.last_seq),
        (3, 3),
        "refused appends store nothing"
    );
    // Acking makes room again, and seqs continue without a gap.
    shard.ack(1, 1).wait().unwrap();
    assert_eq!(shard.append(1, 10, vec![0; 10]).wait().unwrap(), 4);
    // A batch: each item succeeds or fails on its own.
    let results = shard
        .append_batch(vec![
            AppendRequest {
                user: 3,
                msg_id: 1,
                payload: vec![1],
            },
            AppendRequest {
                user: 3,
                msg_id: 2,
                payload: vec![0; 500],
            },
            AppendRequest {
                user: 3,
                msg_id: 3,
                payload: vec![3],
            },
        ])
        .wait()
        .unwrap();
    assert_eq!(results[0].as_ref().unwrap(), &1);
    assert!(matches!(results[1], Err(Error::MessageTooLarge { .. })));
    assert_eq!(results[2].as_ref().unwrap(), &2);
    shard.close().unwrap();
}

#[test]
fn everything_survives_restart_with_and_without_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let config = small_config();
    {
        let shard = open(dir.path(), &config);
        for i in 1..=50u64 {
            shard
                .append(i % 5, i.into(), format!("m{i}").into_bytes())
                .wait()
                .unwrap();
        }
        shard.checkpoint().wait().unwrap();
        for i in 51..=80u64 {
            shard
                .append(i % 5, i.into(), format!("m{i}").into_bytes())
                .wait()
                .unwrap();
        }
        shard.ack(0, 4).wait().unwrap();
        // Drop without close: the log alone must bring back the last 30.
        drop(shard);
    }
    // `drop` of the last handle lets the writer finish; wait for the lock.
    let shard = loop {
        match Shard::open(dir.path(), config.clone()) {
            Err(Error::Locked { .. }) => std::thread::sleep(std::time::Duration::from_millis(10)),
            other => break other.unwrap(),
        }
    };
    for user in 0..5u64 {
        let got = payloads(&shard, user, 0);
        let expected: Vec<u64> = (1..=80u64).filter(|i| i % 5 == user).collect();
        let skip = if user == 0 { 4 } else { 0 };
        assert_eq!(got.len(), expected.len() - skip, "user {user}");
        for (k, (seq, payload)) in got.iter().enumerate() {
            let i = expected[k + skip];
            assert_eq!(*seq, (k + skip + 1) as u64);
            assert_eq!(payload, &format!("m{i}").into_bytes());
        }
    }
    let stats = shard.stats().wait().unwrap();
    assert_eq!(stats.users, 5);
    assert_eq!(stats.live_messages, 76);
    shard.close().unwrap();
}

#[test]
fn second_open_of_a_locked_directory_fails_clearly() {
    let dir = tempfile::tempdir().unwrap();
    let shard = open(dir.path(), &small_config());
    let err = Shard::open(dir.path(), small_config())
        .err()
        .expect("must fail");
    assert!(matches!(err, Error::Locked { .. }), "{err}");
    assert!(err.to_string().contains("locked"));
    shard.close().unwrap();
}

#[test]
fn compaction_reclaims_dead_records_and_keeps_live_ones() {
    let dir = tempfile::tempdir().unwrap();
    let config = EngineConfig {
        bucket_dirs: 1,
        bucket_files: 1,
        compact_min_bytes: 1024,
        ..small_config()
    };
    let shard = open(dir.path(), &config);
    for i in 0..200u64 {
        shard
            .append(i % 4, i.into(), vec![i as u8; 64])
            .wait()
            .unwrap();
    }
    shard.checkpoint().wait().unwrap();
    let before = shard.stats().wait().unwrap();
    for user in 0..4u64 {
        shard.ack(user, 40).wait().unwrap();
    }
    shard.checkpoint().wait().unwrap();
    let after = shard.stats().wait().unwrap();
    assert_eq!(after.compactions_total, 1);
    assert!(
        after.bucket_bytes < before.bucket_bytes / 4,
        "{before:?} {after:?}"
    );
    assert_eq!(after.dead_bytes, 0);
    for user in 0..4u64 {
        let got = payloads(&shard, user, 0);
        assert_eq!(
            got.iter().map(|r| r.0).collect::<Vec<_>>(),
            (41..=50).collect::<Vec<_>>()
        );
        assert_eq!(got[0].1, vec![(40 * 4 + user) as u8; 64]);
    }
    shard.close().unwrap();
    let shard = open(dir.path(), &config);
    assert_eq!(
        payloads(&shard, 3, 0).len(),
        10,
        "the compacted bucket survives a restart"
    );
    shard.close().unwrap();
}

#[test]
fn fsync_policies_all_store_and_reopen() {
    for fsync in [
        FsyncPolicy::Always,
        FsyncPolicy::IntervalMs(5),
        FsyncPolicy::Never,
    ] {
        let dir = tempfile::tempdir().unwrap();
        let config = EngineConfig {
            fsync,
            ..small_config()
        };
        let shard = open(dir.path(), &config);
        for i in 0..20u64 {
            shard.append(1, i.into(), b"x".to_vec()).wait().unwrap();
        }
        shard.close().unwrap();
        let shard = open(dir.path(), &config);
        assert_eq!(payloads(&shard, 1, 0).len(), 20, "{fsync}");
        shard.close().unwrap();
    }
}

#[test]
fn closed_shard_answers_closed() {
    let dir = tempfile::tempdir().unwrap();
    let shard = open(dir.path(), &small_config());
    let other = shard.clone();
    shard.close().unwrap();
    assert!(matches!(
        other.append(1, 1, vec![1]).wait(),
        Err(Error::Closed)
    ));
}

#[test]
fn a_different_fanout_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    open(dir.path(), &small_config()).close().unwrap();
    let err = Shard::open(dir.path(), EngineConfig::default())
        .err()
        .expect("must fail");
    assert!(err.to_string().contains("fan-out"), "{err}");
}

#[test]
fn precreated_bucket_files_hold_data_like_lazily_created_ones() {
    let dir = tempfile::tempdir().unwrap();
    let config = EngineConfig {
        precreate_buckets: true,
        ..small_config()
    };
    let shard = open(dir.path(), &config);
    let files = |d: &Path| {
        walk(&d.join("buckets"))
            .into_iter()
            .filter(|p| p.is_file())
            .count()
    };
    assert_eq!(
        files(dir.path()),
        16,
        "4 x 4 bucket files exist before any write"
    );
    for i in 1..=40u64 {
        shard.append(i, i.into(), vec![i as u8; 10]).wait().unwrap();
    }
    shard.checkpoint().wait().unwrap();
    shard.close().unwrap();
    let shard = open(dir.path(), &config);
    for user in [1u64, 17, 40] {
        assert_eq!(payloads(&shard, user, 0), vec![(1, vec![user as u8; 10])]);
    }
    shard.close().unwrap();
    assert_eq!(files(dir.path()), 16);
}

fn walk(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            out.extend(walk(&path));
        }
        out.push(path);
    }
    out
}

/// In-process callers get the same back-pressure as the daemon's clients:
/// while a checkpoint runs with more than `checkpoint_stall_wal_bytes` of
/// log behind it, the engine takes no new requests until it is done. A
/// stream of appends many times `wal_bytes_max` is never refused.
#[test]
fn checkpoints_that_fall_behind_slow_appends_instead_of_refusing_them() {
    let dir = tempfile::tempdir().unwrap();
    let config = EngineConfig {
        fsync: FsyncPolicy::Never,
        checkpoint_wal_bytes: 4096,
        checkpoint_stall_wal_bytes: 8192,
        wal_bytes_max: 32 * 1024,
        batch_requests_max: 4,
        ..small_config()
    };
    let shard = open(dir.path(), &config);
    let tickets: Vec<_> = (0..2000u64)
        .map(|i| shard.append(i % 16, i.into(), vec![i as u8; 1000]))
        .collect();
    for (i, ticket) in tickets.into_iter().enumerate() {
        ticket
            .wait()
            .unwrap_or_else(|e| panic!("append {i} refused: {e}"));
    }
    let stats = shard.stats().wait().unwrap();
    assert_eq!(stats.live_messages, 2000);
    assert!(stats.checkpoints_total > 10, "{stats:?}");
}

/// A checkpoint frees the log blocks before its position in the current
/// segment (punched holes read as zeros); a crash after that still brings
/// back everything: the checkpointed records from the buckets, the rest
/// from the log after the checkpoint.
#[test]
fn the_log_freed_by_a_checkpoint_is_not_needed_after_a_crash() {
    use std::os::unix::fs::MetadataExt;
    let dir = tempfile::tempdir().unwrap();
    let config = small_config();
    let payload = |i: u64| format!("m{i}-{}", "x".repeat(500)).into_bytes();
    {
        let shard = open(dir.path(), &config);
        for i in 1..=200u64 {
            shard.append(i % 7, i.into(), payload(i)).wait().unwrap();
        }
        shard.checkpoint().wait().unwrap();
        for i in 201..=230u64 {
            shard.append(i % 7, i.into(), payload(i)).wait().unwrap();
        }
        drop(shard); // no close: a crash, as far as the files go
    }
    // The crash left the checkpointed head of the segment freed.
    let segment = dir.path().join("wal/0000000000000001.log");
    let meta = std::fs::metadata(&segment).unwrap();
    assert!(
        meta.blocks() * 512 < meta.len(),
        "the checkpointed blocks were freed: {} of {} bytes allocated",
        meta.blocks() * 512,
        meta.len()
    );
    let shard = loop {
        match Shard::open(dir.path(), config.clone()) {
            Err(Error::Locked { .. }) => std::thread::sleep(std::time::Duration::from_millis(10)),
            other => break other.unwrap(),
        }
    };
    for user in 0..7u64 {
        let got: Vec<Vec<u8>> = payloads(&shard, user, 0).into_iter().map(|r| r.1).collect();
        let expected: Vec<Vec<u8>> = (1..=230u64)
            .filter(|i| i % 7 == user)
            .map(payload)
            .collect();
        assert_eq!(got, expected, "user {user}");
    }
    shard.close().unwrap();
}
