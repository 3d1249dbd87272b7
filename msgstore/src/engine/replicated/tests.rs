//! Replicated mode: no log, checkpoints by the bytes batches would have
//! logged, determinism, the applied marker, snapshots.

use super::*;
use crate::FsyncPolicy;
use proto::shard::{RequestBody, ResponseBody, StoredRecord};
use std::path::PathBuf;

/// A small shard: 2 x 2 buckets, small log thresholds.
pub(in crate::engine) fn config() -> EngineConfig {
    EngineConfig {
        fsync: FsyncPolicy::Always,
        bucket_dirs: 2,
        bucket_files: 2,
        wal_segment_bytes: 256 * 1024,
        checkpoint_wal_bytes: 4096,
        checkpoint_stall_wal_bytes: 8192,
        wal_bytes_max: 16 * 1024,
        compact_min_bytes: 256,
        compact_dead_ratio: 0.3,
        ..EngineConfig::default()
    }
}

/// Apply `requests` as one batch at clock `now_ms`, the way the Raft glue
/// applies an entry; the answers.
pub(in crate::engine) fn apply(
    e: &mut Engine,
    now_ms: u64,
    requests: &[RequestBody],
) -> Vec<ResponseBody> {
    e.set_clock_ms(now_ms);
    e.begin_batch();
    let answers = requests.iter().map(|r| e.respond(r.clone())).collect();
    e.end_batch().unwrap();
    answers
}

/// An append of `len` bytes of `byte` to `user`.
pub(in crate::engine) fn append(user: u64, byte: u8, len: usize) -> RequestBody {
    RequestBody::Append {
        user,
        msg_id: u128::from(byte) << 8 | len as u128,
        payload: vec![byte; len],
    }
}

/// Every live record of `user` (or the error's text).
pub(in crate::engine) fn records(e: &mut Engine, user: u64) -> Result<Vec<StoredRecord>, String> {
    let mut out: Vec<StoredRecord> = Vec::new();
    loop {
        let after = out.last().map_or(0, |r| r.seq);
        let page = e
            .fetch(user, after, 1000, 1 << 20)
            .map_err(|e| e.to_string())?;
        out.extend(page.records);
        if !page.more {
            return Ok(out);
        }
    }
}

/// The names of the files in `dir` (empty if it does not exist).
fn names(dir: &Path) -> Vec<String> {
    match std::fs::read_dir(dir) {
        Ok(entries) => entries
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect(),
        Err(_) => Vec::new(),
    }
}

fn wal_dir(dir: &Path) -> PathBuf {
    dir.join("wal")
}

/// Batches of a replicated engine write no log (no segment, no spare,
/// not a byte), yet checkpoints come by the bytes they would have logged,
/// and the back-pressure rule still sees those bytes.
#[test]
fn a_replicated_engine_writes_no_log_and_checkpoints_by_the_bytes_it_would_have_logged() {
    let dir = tempfile::tempdir().unwrap();
    let mut e = Engine::open_replicated(dir.path(), config()).unwrap();
    assert_eq!(names(&wal_dir(dir.path())), Vec::<String>::new());
    let mut stalled = 0;
    for round in 0..200u64 {
        e.set_clock_ms(1_000 + round);
        e.begin_batch();
        for user in 0..5 {
            let r = e.respond(append(user, round as u8, 200));
            assert!(matches!(r, ResponseBody::Appended { .. }), "{r:?}");
        }
        assert!(e.end_batch_deferred().unwrap().is_none(), "no log write");
        if e.checkpoint_stalled() {
            stalled += 1;
            e.merge_checkpoint(true);
        }
        e.tick();
        assert_eq!(names(&wal_dir(dir.path())), Vec::<String>::new());
    }
    e.checkpoint_now().unwrap();
    // 200 batches of ~1.2 KB over a 4 KB threshold: about 60 due.
    assert!(
        e.counters.checkpoints_total >= 20,
        "{} checkpoints",
        e.counters.checkpoints_total
    );
    assert!(stalled > 0 || e.counters.checkpoints_total >= 50);
    assert_eq!(e.counters.syncs_total, 0, "nothing was synced");
    assert_eq!(e.stats().wal_bytes, 0, "everything checkpointed");
    drop(e);
    assert_eq!(names(&wal_dir(dir.path())), Vec::<String>::new());
    let mut e = Engine::open_replicated(dir.path(), config()).unwrap();
    for user in 0..5 {
        assert_eq!(records(&mut e, user).unwrap().len(), 200, "user {user}");
    }
}

/// The bytes counted toward the checkpoint thresholds are exactly those a
/// standalone engine logs for the same batches.
#[test]
fn a_replicated_engine_counts_exactly_the_bytes_a_standalone_one_logs() {
    let big = EngineConfig {
        checkpoint_wal_bytes: 1 << 30,
        checkpoint_stall_wal_bytes: 1 << 31,
        wal_bytes_max: 1 << 32,
        ..config()
    };
    let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let mut standalone = Engine::open(a.path(), big.clone()).unwrap();
    let mut replicated = Engine::open_replicated(b.path(), big).unwrap();
    let requests = [
        append(1, 1, 10),
        append(2, 2, 300),
        append(1, 3, 0),
        RequestBody::Ack {
            user: 1,
            up_to_seq: 1,
        },
        RequestBody::Import {
            user: 9,
            acked_seq: 4,
            records: vec![StoredRecord {
                seq: 5,
                msg_id: 5,
                timestamp_ms: 5,
                payload: vec![5; 50],
            }],
        },
    ];
    for e in [&mut standalone, &mut replicated] {
        apply(e, 7, &requests);
    }
    let logged = standalone.stats().wal_bytes;
    assert!(logged > 0);
    assert_eq!(replicated.stats().wal_bytes, logged);
}

/// A replicated engine applies every batch whatever its own checkpoints
/// do (a refusal would make replicas differ); `over_wal_bytes_max` tells
/// its owner to hold proposals back. A standalone one refuses.
#[test]
fn past_wal_bytes_max_a_replicated_engine_applies_and_a_standalone_one_refuses() {
    let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let mut standalone = Engine::open(a.path(), config()).unwrap();
    let mut replicated = Engine::open_replicated(b.path(), config()).unwrap();
    // No tick: no checkpoint runs, the bytes pile up past 16 KB.
    for round in 0..40u8 {
        for e in [&mut standalone, &mut replicated] {
            apply(e, 1, &[append(1, round, 1000)]);
        }
    }
    assert!(replicated.over_wal_bytes_max());
    let refused = apply(&mut standalone, 1, &[append(1, 0, 10)]);
    assert!(
        matches!(&refused[0], ResponseBody::Error(e) if e.message.contains("wal_bytes_max")),
        "{refused:?}"
    );
    let applied = apply(&mut replicated, 1, &[append(1, 0, 10)]);
    assert_eq!(applied, vec![ResponseBody::Appended { seq: 41 }]);
}

/// What a replicated engine applied after its last checkpoint is gone
/// after a restart (the Raft log applies it again); what a checkpoint
/// holds stays.
#[test]
fn a_replicated_engine_keeps_what_its_checkpoints_hold_and_only_that() {
    let dir = tempfile::tempdir().unwrap();
    let mut e = Engine::open_replicated(dir.path(), config()).unwrap();
    apply(&mut e, 1, &[append(1, 1, 10), append(1, 2, 10)]);
    e.checkpoint_now().unwrap();
    apply(&mut e, 2, &[append(1, 3, 10)]);
    drop(e); // a kill: no shutdown
    let mut e = Engine::open_replicated(dir.path(), config()).unwrap();
    let seqs: Vec<u64> = records(&mut e, 1).unwrap().iter().map(|r| r.seq).collect();
    assert_eq!(seqs, [1, 2]);
}

/// Opened replicated over a standalone past, the engine replays the log,
/// checkpoints it and deletes it.
#[test]
fn a_standalone_past_is_replayed_checkpointed_and_its_log_deleted() {
    let dir = tempfile::tempdir().unwrap();
    let mut e = Engine::open(dir.path(), config()).unwrap();
    apply(&mut e, 1, &[append(1, 1, 10)]);
    e.checkpoint_now().unwrap();
    apply(&mut e, 1, &[append(2, 9, 10)]);
    drop(e); // user 2's append is only in the log
    assert!(!names(&wal_dir(dir.path())).is_empty());

    let mut e = Engine::open_replicated(dir.path(), config()).unwrap();
    assert_eq!(records(&mut e, 2).unwrap().len(), 1, "replayed");
    assert_eq!(names(&wal_dir(dir.path())), Vec::<String>::new());
    drop(e);
    let mut e = Engine::open_replicated(dir.path(), config()).unwrap();
    assert_eq!(records(&mut e, 2).unwrap().len(), 1, "checkpointed");
    assert_eq!(records(&mut e, 1).unwrap().len(), 1);
}

/// A replicated open moves the index's log start to the (never written)
/// segment it stands at even with nothing to replay, so a standalone open
/// afterwards starts a log its own restarts replay whole (the old log
/// start lay far into a segment number the new log reuses).
#[test]
fn a_standalone_open_after_a_replicated_one_replays_its_new_log_whole() {
    let dir = tempfile::tempdir().unwrap();
    let mut e = Engine::open(dir.path(), config()).unwrap();
    for n in 0..3u8 {
        apply(&mut e, 1, &[append(1, n, 1000)]);
    }
    e.checkpoint_now().unwrap();
    drop(e); // the log start is ~3 KB into segment 1; nothing to replay
    drop(Engine::open_replicated(dir.path(), config()).unwrap());
    assert_eq!(names(&wal_dir(dir.path())), Vec::<String>::new());

    let mut e = Engine::open(dir.path(), config()).unwrap();
    apply(&mut e, 1, &[append(3, 1, 10)]);
    drop(e); // only in the new log, at its very start
    let mut e = Engine::open(dir.path(), config()).unwrap();
    assert_eq!(records(&mut e, 3).unwrap().len(), 1, "the new log replayed");
    assert_eq!(records(&mut e, 1).unwrap().len(), 3);
}

/// Appends are stamped with the engine clock; freezes lapse by it.
#[test]
fn appends_and_freezes_follow_the_engine_clock() {
    let dir = tempfile::tempdir().unwrap();
    let mut e = Engine::open_replicated(dir.path(), config()).unwrap();
    apply(&mut e, 123_456, &[append(1, 1, 5)]);
    assert_eq!(records(&mut e, 1).unwrap()[0].timestamp_ms, 123_456);
    let t0 = 5_000_000;
    apply(&mut e, t0, &[RequestBody::Freeze { user: 1, token: 4 }]);
    let hold = proto::shard::FREEZE_HOLD_MS;
    let busy = apply(&mut e, t0 + hold - 1, &[append(1, 2, 5)]);
    assert!(
        matches!(&busy[0], ResponseBody::Error(e) if e.code == proto::shard::ShardErrorCode::Busy),
        "{busy:?}"
    );
    let lapsed = apply(&mut e, t0 + hold, &[append(1, 2, 5)]);
    assert_eq!(lapsed, vec![ResponseBody::Appended { seq: 2 }]);
}

/// The marker a checkpoint stores is the one current when it captured its
/// state; an open restores the last committed checkpoint's.
#[test]
fn the_applied_marker_is_the_last_committed_checkpoints() {
    let dir = tempfile::tempdir().unwrap();
    let mut e = Engine::open_replicated(dir.path(), config()).unwrap();
    assert_eq!(e.applied(), None);
    apply(&mut e, 1, &[append(1, 1, 10)]);
    e.set_applied(b"one".to_vec());
    e.checkpoint_now().unwrap();
    drop(e);
    let mut e = Engine::open_replicated(dir.path(), config()).unwrap();
    assert_eq!(e.applied(), Some(&b"one"[..]));

    // Set after the last checkpoint: lost with the state it describes.
    apply(&mut e, 2, &[append(1, 2, 10)]);
    e.set_applied(b"two".to_vec());
    assert_eq!(e.applied(), Some(&b"two"[..]));
    drop(e);
    let mut e = Engine::open_replicated(dir.path(), config()).unwrap();
    assert_eq!(e.applied(), Some(&b"one"[..]));
    assert_eq!(records(&mut e, 1).unwrap().len(), 1);

    // Set while a checkpoint runs: that checkpoint has the marker of the
    // state it captured, not the later one.
    apply(&mut e, 3, &[append(1, 3, 10)]);
    e.set_applied(b"three".to_vec());
    e.start_checkpoint().unwrap();
    assert!(e.checkpoint_running());
    apply(&mut e, 4, &[append(1, 4, 10)]);
    e.set_applied(b"four".to_vec());
    e.poll_checkpoint(true).unwrap().unwrap();
    drop(e);
    let mut e = Engine::open_replicated(dir.path(), config()).unwrap();
    assert_eq!(e.applied(), Some(&b"three"[..]));
    assert_eq!(records(&mut e, 1).unwrap().len(), 2);

    // A marker alone (no user changed) is checkpointed too, and a
    // standalone open reads it as well.
    e.set_applied(b"five".to_vec());
    e.checkpoint_now().unwrap();
    drop(e);
    let e = Engine::open(dir.path(), config()).unwrap();
    assert_eq!(e.applied(), Some(&b"five"[..]));
}

/// A replicated shard's frozen users are checkpointed state: after a
/// restart the same writes are refused and the same token releases.
/// (A standalone shard's are not: documented in STORAGE.md.)
#[test]
fn a_replicated_shards_freezes_survive_a_restart_and_a_standalone_shards_do_not() {
    let freeze = RequestBody::Freeze { user: 1, token: 5 };
    let busy = |answers: &[ResponseBody]| matches!(&answers[0], ResponseBody::Error(e) if e.code == proto::shard::ShardErrorCode::Busy);
    let dir = tempfile::tempdir().unwrap();
    let mut e = Engine::open_replicated(dir.path(), config()).unwrap();
    apply(&mut e, 1_000, &[append(1, 1, 10), freeze.clone()]);
    e.checkpoint_now().unwrap();
    drop(e);
    let mut e = Engine::open_replicated(dir.path(), config()).unwrap();
    assert!(busy(&apply(&mut e, 2_000, &[append(1, 2, 10)])));
    let released = RequestBody::Release {
        user: 1,
        token: 5,
        moved: false,
    };
    assert_eq!(
        apply(&mut e, 2_000, &[released]),
        vec![ResponseBody::Released { removed: 0 }]
    );
    e.checkpoint_now().unwrap();
    drop(e);
    let mut e = Engine::open_replicated(dir.path(), config()).unwrap();
    assert_eq!(
        apply(&mut e, 2_000, &[append(1, 2, 10)]),
        vec![ResponseBody::Appended { seq: 2 }]
    );

    let dir = tempfile::tempdir().unwrap();
    let mut e = Engine::open(dir.path(), config()).unwrap();
    apply(&mut e, 1_000, &[append(1, 1, 10), freeze]);
    assert!(busy(&apply(&mut e, 2_000, &[append(1, 2, 10)])));
    e.checkpoint_now().unwrap();
    drop(e);
    let mut e = Engine::open(dir.path(), config()).unwrap();
    assert!(!busy(&apply(&mut e, 2_000, &[append(1, 2, 10)])));
}

#[test]
fn frozen_users_round_trip_and_garbage_is_refused() {
    use super::super::migrate::{decode_frozen, encode_frozen, Freeze};
    let mut frozen = foldhash::HashMap::default();
    for user in [9u64, 1, u64::MAX] {
        let f = Freeze {
            token: user ^ 3,
            until_ms: user.wrapping_mul(7),
        };
        frozen.insert(user, f);
    }
    let b = encode_frozen(&frozen);
    assert_eq!(b.len(), 8 + 3 * 24);
    assert_eq!(decode_frozen(&b), Some(frozen));
    for cut in 0..b.len() {
        assert_eq!(decode_frozen(&b[..cut]), None, "cut at {cut}");
    }
    let mut long = b.clone();
    long.push(0);
    assert_eq!(decode_frozen(&long), None);
    assert_eq!(decode_frozen(&[0xff; 8]), None);
}
