//! Replicas fed the same entries (clock + write requests) give the same
//! answers and end with the same mailboxes, however their checkpoints are
//! timed, also when one restarts from its last checkpoint and applies the
//! entries after its marker again, and when one starts from a snapshot.

use super::tests::{append, apply, config, records};
use crate::{
    engine::{routing::tests::map, Engine},
    EngineConfig,
};
use proto::{
    cluster::ShardRing,
    shard::{MailboxStats, RequestBody, ResponseBody, Routing, StoredRecord},
};
use rand::{rngs::StdRng, Rng, SeedableRng};
use std::path::Path;

/// One Raft entry: the leader's clock and the write requests.
#[derive(Clone)]
struct Entry {
    now_ms: u64,
    requests: Vec<RequestBody>,
}

/// Users the requests name.
const USERS: u64 = 12;

/// Routing of shard "a": `current` at `epoch` holds only "a"; with
/// `moving`, a target at `epoch + 1` adds "b".
fn routing(epoch: u64, moving: bool) -> RequestBody {
    RequestBody::SetRouting(Routing {
        me: "a".into(),
        current: map(epoch, &["a"]),
        target: moving.then(|| map(epoch + 1, &["a", "b"])),
    })
}

/// A user (above `USERS`) that the map `map(2, ["a", "b"])` gives to "b".
fn user_of_b() -> u64 {
    let ring = ShardRing::new(&map(2, &["a", "b"]).shards);
    (1000..).find(|u| ring.owner(*u) == "b").expect("some user")
}

/// The scripted start: a freeze held across the restarting replica's
/// checkpoint (after entry 2) and crash (after entry 5); an append to a
/// user that a routing installed later (entry 5) sends away.
fn scripted(x: u64) -> Vec<Entry> {
    let at = |i: u64, requests| Entry {
        now_ms: 1_000_000 + i * 100,
        requests,
    };
    vec![
        at(0, vec![routing(1, false)]),
        at(1, vec![append(1, 1, 30), append(2, 2, 30)]),
        at(2, vec![RequestBody::Freeze { user: 1, token: 1 }]),
        at(3, vec![append(1, 3, 30)]),
        at(4, vec![append(x, 4, 30)]),
        at(5, vec![routing(1, true)]),
    ]
}

/// A random write request (edges included).
fn request(rng: &mut StdRng, epoch: &mut u64) -> RequestBody {
    let user = rng.gen_range(0..USERS);
    match rng.gen_range(0..100) {
        0..=39 => append(user, rng.gen(), rng.gen_range(0..200)),
        40..=59 => RequestBody::Ack {
            user,
            up_to_seq: rng.gen_range(0..30),
        },
        60..=67 => RequestBody::Freeze {
            user,
            token: rng.gen_range(0..3),
        },
        68..=77 => RequestBody::Release {
            user,
            token: rng.gen_range(0..3),
            moved: rng.gen_bool(0.3),
        },
        78..=88 => import(rng, user),
        89..=90 => RequestBody::Expire {
            user,
            before_ms: 1_000_000 + rng.gen_range(0..5_000),
            up_to_seq: rng.gen_range(0..30),
        },
        91..=92 => RequestBody::AppendBatchOnce {
            items: (0..rng.gen_range(0..4))
                .map(|i| proto::shard::AppendItem {
                    user: (user + i) % USERS,
                    msg_id: u128::from(rng.gen_range(0..8u8)),
                    payload: vec![i as u8; 20],
                })
                .collect(),
            since_ms: 1_000_000 + rng.gen_range(0..5_000),
        },
        93..=95 => RequestBody::AppendBatch {
            items: (0..rng.gen_range(0..4))
                .map(|i| proto::shard::AppendItem {
                    user: (user + i) % USERS,
                    msg_id: u128::from(i),
                    payload: vec![i as u8; 20],
                })
                .collect(),
        },
        _ => {
            // Mostly newer, sometimes older (refused).
            *epoch += 1;
            let e = if rng.gen_bool(0.2) { 1 } else { *epoch };
            routing(e, true)
        }
    }
}

/// An import of a few records after a random acknowledged seq (sometimes
/// with a gap: refused).
fn import(rng: &mut StdRng, user: u64) -> RequestBody {
    let acked_seq = rng.gen_range(0..20);
    let first = acked_seq + 1 + u64::from(rng.gen_bool(0.1));
    let records = (first..first + rng.gen_range(0..4))
        .map(|seq| StoredRecord {
            seq,
            msg_id: u128::from(seq),
            timestamp_ms: seq * 3,
            payload: vec![seq as u8; rng.gen_range(0..50)],
        })
        .collect();
    RequestBody::Import {
        user,
        acked_seq,
        records,
    }
}

/// The scripted start, then `n` random entries; the clock moves 0..4 s
/// per entry, so freezes (10 s) lapse now and then.
fn entries(x: u64, n: usize) -> Vec<Entry> {
    let mut rng = StdRng::seed_from_u64(19);
    let mut out = scripted(x);
    let mut now_ms = out.last().expect("scripted").now_ms;
    let mut epoch = 1;
    for _ in 0..n {
        now_ms += rng.gen_range(0..4_000);
        let requests = (0..rng.gen_range(1..6))
            .map(|_| request(&mut rng, &mut epoch))
            .collect();
        out.push(Entry { now_ms, requests });
    }
    out
}

/// Apply entry `i` and note it applied (the marker is its index).
fn apply_entry(e: &mut Engine, entries: &[Entry], i: usize) -> Vec<ResponseBody> {
    let answers = apply(e, entries[i].now_ms, &entries[i].requests);
    e.set_applied((i as u64).to_le_bytes().to_vec());
    answers
}

/// The entry after the one a reopened engine's marker names.
fn resume_at(e: &Engine) -> usize {
    e.applied().map_or(0, |m| {
        let index = u64::from_le_bytes(m.try_into().expect("8 bytes"));
        index as usize + 1
    })
}

/// One record, briefly: seq, msg id, timestamp, payload length and CRC.
type Brief = (u64, u128, u64, usize, u32);

/// What a replica ends with for one user: its records (or the error a
/// fetch gets) and its stats.
type UserOutcome = (Result<Vec<Brief>, String>, Option<MailboxStats>);

fn user_outcome(e: &mut Engine, user: u64) -> UserOutcome {
    let brief = |r: &StoredRecord| {
        let crc = crc32c::crc32c(&r.payload);
        (r.seq, r.msg_id, r.timestamp_ms, r.payload.len(), crc)
    };
    let records = records(e, user).map(|rs| rs.iter().map(brief).collect());
    (records, e.user_stats(user).ok())
}

/// Every user of `users` and the routing end alike on `e` and `want`.
fn assert_same_end(e: &mut Engine, want: &mut Engine, users: &[u64], name: &str) {
    for &u in users {
        assert_eq!(
            user_outcome(e, u),
            user_outcome(want, u),
            "{name}, user {u}"
        );
    }
    assert_eq!(e.routing(), want.routing(), "{name}, routing");
}

/// Replica A: ticks after every entry (checkpoints by its thresholds).
fn run_ticking(dir: &Path, entries: &[Entry]) -> (Vec<Vec<ResponseBody>>, Engine) {
    let mut e = Engine::open_replicated(dir, config()).unwrap();
    let mut answers = Vec::new();
    for i in 0..entries.len() {
        answers.push(apply_entry(&mut e, entries, i));
        if e.checkpoint_stalled() {
            e.merge_checkpoint(true);
        }
        e.tick();
    }
    (answers, e)
}

/// Replica B: never ticks; a whole checkpoint every 11 entries.
fn run_checkpointing(dir: &Path, entries: &[Entry]) -> (Vec<Vec<ResponseBody>>, Engine) {
    let quiet = EngineConfig {
        checkpoint_wal_bytes: 1 << 30,
        checkpoint_stall_wal_bytes: 1 << 31,
        wal_bytes_max: 1 << 32,
        ..config()
    };
    let mut e = Engine::open_replicated(dir, quiet).unwrap();
    let mut answers = Vec::new();
    for i in 0..entries.len() {
        answers.push(apply_entry(&mut e, entries, i));
        if i % 11 == 10 {
            e.checkpoint_now().unwrap();
        }
    }
    (answers, e)
}

/// Replica C: checkpoints at `checkpoints`, is killed right after the
/// entries in `kills` and reopened, then applies again from its marker.
/// The answers are those of each entry's last application.
fn run_restarting(
    dir: &Path,
    entries: &[Entry],
    checkpoints: &[usize],
    kills: &[usize],
) -> (Vec<Vec<ResponseBody>>, Engine) {
    let mut e = Engine::open_replicated(dir, config()).unwrap();
    let mut answers = vec![Vec::new(); entries.len()];
    let mut killed = Vec::new();
    let mut i = 0;
    while i < entries.len() {
        answers[i] = apply_entry(&mut e, entries, i);
        if checkpoints.contains(&i) {
            e.checkpoint_now().unwrap();
        }
        if kills.contains(&i) && !killed.contains(&i) {
            killed.push(i);
            drop(e);
            e = Engine::open_replicated(dir, config()).unwrap();
            i = resume_at(&e);
            assert!(i <= killed[killed.len() - 1], "the marker is not ahead");
            continue;
        }
        i += 1;
    }
    (answers, e)
}

/// Replica D: a replica run up to entry `at` writes a snapshot, which is
/// installed into `dir`; the installed copy applies from its marker on.
/// Answers before that are left empty.
fn run_from_snapshot(dir: &Path, entries: &[Entry], at: usize) -> (Vec<Vec<ResponseBody>>, Engine) {
    let leader = tempfile::tempdir().unwrap();
    let mut e = Engine::open_replicated(leader.path(), config()).unwrap();
    for i in 0..=at {
        apply_entry(&mut e, entries, i);
    }
    let mut snap = Vec::new();
    e.write_snapshot(&mut snap).unwrap();
    drop(e);
    Engine::install_snapshot(dir, &mut &snap[..]).unwrap();
    let mut e = Engine::open_replicated(dir, config()).unwrap();
    let mut answers = vec![Vec::new(); entries.len()];
    let from = resume_at(&e);
    assert_eq!(from, at + 1, "the snapshot's marker is its last entry");
    for (i, slot) in answers.iter_mut().enumerate().skip(from) {
        *slot = apply_entry(&mut e, entries, i);
    }
    (answers, e)
}

#[test]
fn replicas_fed_the_same_entries_answer_alike_and_end_alike() {
    let x = user_of_b();
    let entries = entries(x, 150);
    let users: Vec<u64> = (0..USERS).chain([x]).collect();
    let dirs: Vec<_> = (0..4).map(|_| tempfile::tempdir().unwrap()).collect();
    let (a_answers, mut a) = run_ticking(dirs[0].path(), &entries);
    let (b_answers, mut b) = run_checkpointing(dirs[1].path(), &entries);
    let (c_answers, mut c) = run_restarting(dirs[2].path(), &entries, &[2, 60], &[5, 80]);
    let d_dir = dirs[3].path().join("shard");
    let (d_answers, mut d) = run_from_snapshot(&d_dir, &entries, 3);

    // The script did what it is there for.
    let busy = |r: &ResponseBody| matches!(r, ResponseBody::Error(e) if e.code == proto::shard::ShardErrorCode::Busy);
    assert!(busy(&a_answers[3][0]), "{:?}", a_answers[3]);
    assert_eq!(a_answers[4], vec![ResponseBody::Appended { seq: 1 }]);
    for (i, want) in a_answers.iter().enumerate() {
        assert_eq!(&b_answers[i], want, "replica B, entry {i}");
        assert_eq!(&c_answers[i], want, "replica C, entry {i}");
        if i > 3 {
            assert_eq!(&d_answers[i], want, "replica D, entry {i}");
        }
    }
    assert_same_end(&mut b, &mut a, &users, "replica B");
    assert_same_end(&mut c, &mut a, &users, "replica C");
    assert_same_end(&mut d, &mut a, &users, "replica D");
    // Every kind of answer happened, so the comparison covered them.
    let all: Vec<&ResponseBody> = a_answers.iter().flatten().collect();
    let kinds = [
        all.iter().any(|r| matches!(r, ResponseBody::Appended { .. })),
        all.iter().any(|r| matches!(r, ResponseBody::Acked { removed } if *removed > 0)),
        all.iter().any(|r| matches!(r, ResponseBody::Frozen(_))),
        all.iter().any(|r| matches!(r, ResponseBody::Released { .. })),
        all.iter().any(|r| matches!(r, ResponseBody::Imported(_))),
        all.iter().any(|r| matches!(r, ResponseBody::RoutingSet)),
        all.iter().any(|r| busy(r)),
        all.iter().any(|r| {
            matches!(r, ResponseBody::Error(e) if matches!(e.code, proto::shard::ShardErrorCode::Moved { .. }))
        }),
    ];
    assert_eq!(
        kinds, [true; 8],
        "appended acked frozen released imported routed busy moved"
    );
    assert!(a.counters.checkpoints_total > 0);
}
