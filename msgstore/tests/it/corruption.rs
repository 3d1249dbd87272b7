//! Damaged files: the shard is stopped (killed or closed), a file is damaged
//! on purpose, and the shard is reopened. Damaged entries and records never
//! come back as messages, are counted in `corrupt_records_total`, and
//! everything undamaged is still there.
//!
//! A write-ahead log with entries in it only exists after a crash (closing
//! or dropping the shard checkpoints, which empties the log), so the WAL
//! tests re-run this test binary as a child process (`crash_writer_child`)
//! that appends with `fsync = always`, prints every acknowledged seq and
//! then kills itself with SIGKILL.

use crate::damage::{config, frames, open, wal_segments, FRAME_HEADER, WAL_HEADER};
use msgstore::{EngineConfig, Shard, StoredRecord};
use std::{
    fs,
    io::Write,
    os::unix::{fs::FileExt, process::ExitStatusExt},
    path::{Path, PathBuf},
};

const USER: u64 = 42;
const OTHER: u64 = 7;
const BUCKET_HEADER: usize = 64;
/// Body of a log append entry before the payload: kind + message header.
const WAL_APPEND_FIXED: usize = 1 + 40;
/// Body of a bucket record before the payload: message header + prev offset.
const RECORD_FIXED: usize = 40 + 8;

/// Set in the child process: the shard directory it writes.
const CHILD_DIR: &str = "MSGSTORE_CORRUPTION_CHILD_DIR";

fn msg_id(user: u64, seq: u64) -> u128 {
    (u128::from(user) << 64) | u128::from(seq) | (1 << 127)
}

/// Distinct payloads of different lengths: a mix-up never goes unnoticed.
fn payload(user: u64, seq: u64) -> Vec<u8> {
    format!("user {user} message {seq};")
        .repeat(1 + (seq % 3) as usize)
        .into_bytes()
}

fn all(shard: &Shard, user: u64) -> Vec<StoredRecord> {
    let page = shard.fetch(user, 0, 1000, 1 << 20).wait().unwrap();
    assert!(!page.more, "one page holds everything here");
    page.records
}

/// Every record returned is exactly what was appended with its seq, and the
/// seqs are the expected ones.
fn assert_records(shard: &Shard, user: u64, seqs: &[u64]) {
    let got = all(shard, user);
    let got_seqs: Vec<u64> = got.iter().map(|r| r.seq).collect();
    assert_eq!(got_seqs, seqs, "seqs of user {user}");
    for r in &got {
        assert_eq!(r.payload, payload(user, r.seq), "payload of seq {}", r.seq);
        assert_eq!(r.msg_id, msg_id(user, r.seq), "msg_id of seq {}", r.seq);
    }
}

fn corrupt_total(shard: &Shard) -> u64 {
    shard.stats().wait().unwrap().corrupt_records_total
}

fn flip(path: &Path, at: usize) {
    let mut bytes = fs::read(path).unwrap();
    bytes[at] ^= 0x5A;
    fs::write(path, bytes).unwrap();
}

/// A copy of a crashed shard's directory, without the preallocated, not
/// yet used log segment.
fn copy_dir(from: &Path, to: &Path) {
    daemon::testing::copy_dir_except(from, to, "spare.tmp");
}

/// What the child did before it was killed.
struct Crashed {
    dir: tempfile::TempDir,
    /// Seqs of USER whose appends were acknowledged, in order.
    acked_appends: Vec<u64>,
    /// The acknowledged ack of USER (0 if none).
    acked_up_to: u64,
}

/// Run the child writer on a fresh directory: it appends `before_ack`
/// messages to USER, acks up to `ack`, appends `after_ack` more, and is
/// killed with SIGKILL without any checkpoint.
fn crash_writer(before_ack: u64, ack: u64, after_ack: u64) -> Crashed {
    let dir = tempfile::tempdir().unwrap();
    let out = crate::child_test(module_path!(), "crash_writer_child")
        .env(CHILD_DIR, dir.path())
        .env("CHILD_PLAN", format!("{before_ack} {ack} {after_ack}"))
        .output()
        .expect("run the child writer");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        out.status.signal(),
        Some(libc::SIGKILL),
        "the child must die by SIGKILL: {:?}\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let mut acked_appends = Vec::new();
    let mut acked_up_to = 0;
    for line in stdout.lines() {
        // libtest may print "test crash_writer_child ... " before the first.
        if let Some((_, seq)) = line.split_once("APPENDED ") {
            acked_appends.push(seq.trim().parse().unwrap());
        } else if let Some((_, seq)) = line.split_once("ACKED ") {
            acked_up_to = seq.trim().parse().unwrap();
        }
    }
    let total = before_ack + after_ack;
    assert_eq!(acked_appends, (1..=total).collect::<Vec<_>>(), "{stdout}");
    assert_eq!(acked_up_to, ack, "{stdout}");
    // Nothing was checkpointed: everything is in the one log segment.
    let segs = wal_segments(dir.path());
    assert_eq!(segs.len(), 1, "{segs:?}");
    let log = fs::read(&segs[0]).unwrap();
    let entries = frames(&log, WAL_HEADER);
    assert_eq!(entries.len() as u64, total + u64::from(ack > 0));
    let (last_at, last_len) = *entries.last().unwrap();
    assert!(
        log[last_at + last_len..].iter().all(|b| *b == 0),
        "whole entries, then the end or zeros (a preallocated segment)"
    );
    Crashed {
        dir,
        acked_appends,
        acked_up_to,
    }
}

/// Not a test on its own: the child process of the WAL tests (it does
/// nothing unless `MSGSTORE_CORRUPTION_CHILD_DIR` is set).
#[test]
fn crash_writer_child() {
    let Ok(dir) = std::env::var(CHILD_DIR) else {
        return;
    };
    let plan: Vec<u64> = std::env::var("CHILD_PLAN")
        .unwrap()
        .split_whitespace()
        .map(|v| v.parse().unwrap())
        .collect();
    let (before_ack, ack, after_ack) = (plan[0], plan[1], plan[2]);
    let shard = open(Path::new(&dir));
    let mut stdout = std::io::stdout();
    let mut next = 1;
    let mut append = |n: u64, out: &mut std::io::Stdout| {
        for _ in 0..n {
            let seq = shard
                .append(USER, msg_id(USER, next), payload(USER, next))
                .wait()
                .unwrap();
            assert_eq!(seq, next);
            writeln!(out, "APPENDED {seq}").unwrap();
            next += 1;
        }
    };
    append(before_ack, &mut stdout);
    if ack > 0 {
        assert_eq!(shard.ack(USER, ack).wait().unwrap(), ack);
        writeln!(stdout, "ACKED {ack}").unwrap();
    }
    append(after_ack, &mut stdout);
    stdout.flush().unwrap();
    // SAFETY: plain syscall; the process ends here, like a crash.
    unsafe { libc::kill(libc::getpid(), libc::SIGKILL) };
    unreachable!("SIGKILL is not deliverable late");
}

/// Reopen after damage to the last log entry (an append of seq `lost`):
/// everything before it is there, it is not, new appends continue at
/// `lost`, the damage is counted, and a second restart is clean.
fn assert_last_entry_dropped(dir: &Path, acked_up_to: u64, lost: u64) {
    let shard = open(dir);
    assert!(corrupt_total(&shard) >= 1, "the damaged entry is counted");
    let present: Vec<u64> = (acked_up_to + 1..lost).collect();
    assert_records(&shard, USER, &present);
    let stats = shard.user_stats(USER).wait().unwrap();
    assert_eq!((stats.last_seq, stats.acked_seq), (lost - 1, acked_up_to));
    assert_eq!(stats.live_count, present.len() as u64);
    let bytes: usize = present.iter().map(|s| payload(USER, *s).len()).sum();
    assert_eq!(stats.live_bytes, bytes as u64);
    let totals = shard.stats().wait().unwrap();
    assert_eq!(
        (totals.users, totals.live_messages, totals.live_bytes),
        (1, present.len() as u64, bytes as u64)
    );
    assert_eq!(
        shard
            .append(USER, msg_id(USER, lost), payload(USER, lost))
            .wait()
            .unwrap(),
        lost,
        "the next append takes the next seq after what is present"
    );
    let mut with_new = present.clone();
    with_new.push(lost);
    assert_records(&shard, USER, &with_new);
    shard.close().unwrap();

    let shard = open(dir);
    assert_eq!(corrupt_total(&shard), 0, "the damage was cut off for good");
    assert_records(&shard, USER, &with_new);
    shard.close().unwrap();
}

#[test]
fn torn_wal_tail_loses_only_the_torn_entry() {
    let crashed = crash_writer(5, 2, 2);
    let seg = wal_segments(crashed.dir.path()).remove(0);
    let log = fs::read(&seg).unwrap();
    let (last_at, last_len) = *frames(&log, WAL_HEADER).last().unwrap();
    let end = last_at + last_len;
    let lost = *crashed.acked_appends.last().unwrap();
    // Only the first `keep` bytes of the last entry reached the disk: cut
    // inside the payload, inside the body header, and inside the frame
    // header (part of the length field). The rest of the entry is zeros (a
    // torn write into a preallocated segment) or the file ends there.
    for keep in [last_len - 3, FRAME_HEADER + 5, 2] {
        for truncate in [false, true] {
            let copy = tempfile::tempdir().unwrap();
            copy_dir(crashed.dir.path(), copy.path());
            let seg = wal_segments(copy.path()).remove(0);
            let f = fs::OpenOptions::new().write(true).open(&seg).unwrap();
            if truncate {
                f.set_len((last_at + keep) as u64).unwrap();
            } else {
                f.write_all_at(&vec![0; end - last_at - keep], (last_at + keep) as u64)
                    .unwrap();
            }
            drop(f);
            assert_last_entry_dropped(copy.path(), crashed.acked_up_to, lost);
        }
    }
}

#[test]
fn wal_without_damage_replays_everything_acknowledged() {
    // The control for the tests around it: the crash itself loses nothing.
    let crashed = crash_writer(5, 2, 2);
    let shard = open(crashed.dir.path());
    assert_eq!(corrupt_total(&shard), 0);
    assert_records(&shard, USER, &[3, 4, 5, 6, 7]);
    assert_eq!(shard.user_stats(USER).wait().unwrap().acked_seq, 2);
    assert_eq!(shard.append(USER, 1, b"x".to_vec()).wait().unwrap(), 8);
    shard.close().unwrap();
}

#[test]
fn bit_flip_in_the_wal_tail_drops_that_entry_only() {
    let crashed = crash_writer(5, 2, 2);
    let seg = wal_segments(crashed.dir.path()).remove(0);
    let log = fs::read(&seg).unwrap();
    let (last_at, last_len) = *frames(&log, WAL_HEADER).last().unwrap();
    let lost = *crashed.acked_appends.last().unwrap();
    let body = last_at + FRAME_HEADER;
    // A payload byte, the checksum, the seq field, the length field.
    for at in [
        body + WAL_APPEND_FIXED + 4,
        last_at + 5,
        body + 1 + 8,
        last_at,
    ] {
        assert!(at < last_at + last_len);
        let copy = tempfile::tempdir().unwrap();
        copy_dir(crashed.dir.path(), copy.path());
        flip(&wal_segments(copy.path())[0], at);
        assert_last_entry_dropped(copy.path(), crashed.acked_up_to, lost);
    }
}

#[test]
fn bit_flip_in_the_middle_of_the_wal_is_corruption_and_refused() {
    // Entries: appends 1..=5, ack 2, appends 6, 7. Damage append 4: valid
    // entries follow it, so this is corruption, not a torn tail: the open
    // is refused (nothing acknowledged is silently dropped).
    let crashed = crash_writer(5, 2, 2);
    let seg = wal_segments(crashed.dir.path()).remove(0);
    let log = fs::read(&seg).unwrap();
    let (at, _) = frames(&log, WAL_HEADER)[3];
    flip(&seg, at + FRAME_HEADER + WAL_APPEND_FIXED + 2);
    match Shard::open(crashed.dir.path(), config()) {
        Err(msgstore::Error::LogDamaged(d)) => {
            assert_eq!((d.offset, d.valid_after), (at as u64, 4));
        }
        Err(e) => panic!("wrong error {e}"),
        Ok(_) => panic!("a corrupt log must not open"),
    }
}

#[test]
fn wal_segment_with_a_garbage_header_is_dropped_and_counted() {
    let crashed = crash_writer(4, 0, 0);
    let good = wal_segments(crashed.dir.path()).remove(0);

    // (a) A later segment whose header is garbage (its entries are valid
    // frames copied from the good segment, but nothing vouches for them).
    let copy = tempfile::tempdir().unwrap();
    copy_dir(crashed.dir.path(), copy.path());
    let mut bytes = fs::read(&good).unwrap();
    let (last_at, last_len) = *frames(&bytes, WAL_HEADER).last().unwrap();
    bytes.truncate(last_at + last_len);
    bytes[..WAL_HEADER].copy_from_slice(&[0xA5; WAL_HEADER]);
    let bad = copy.path().join("wal").join(format!("{:016x}.log", 2));
    fs::write(&bad, &bytes).unwrap();
    // Valid entries after a bad header: corruption, refused until repaired.
    assert!(matches!(
        Shard::open(copy.path(), config()),
        Err(msgstore::Error::LogDamaged(_))
    ));
    msgstore::daemon::repair_log(copy.path(), config()).unwrap();
    let shard = open(copy.path());
    assert!(!bad.exists(), "the garbage segment is removed");
    assert_records(&shard, USER, &[1, 2, 3, 4]);
    assert_eq!(
        shard
            .append(USER, msg_id(USER, 5), payload(USER, 5))
            .wait()
            .unwrap(),
        5
    );
    shard.close().unwrap();
    let shard = open(copy.path());
    assert_eq!(corrupt_total(&shard), 0);
    assert_records(&shard, USER, &[1, 2, 3, 4, 5]);
    shard.close().unwrap();

    // (b) The only segment's header damaged (one byte, or cut short as by
    // a crash while the segment was created): its entries cannot be
    // trusted and are dropped; nothing comes back as garbage.
    for damage in [Damage::Flip(12), Damage::Flip(30)] {
        let copy = tempfile::tempdir().unwrap();
        copy_dir(crashed.dir.path(), copy.path());
        let seg = wal_segments(copy.path()).remove(0);
        if let Damage::Flip(at) = damage {
            flip(&seg, at);
        }
        assert!(
            matches!(
                Shard::open(copy.path(), config()),
                Err(msgstore::Error::LogDamaged(_))
            ),
            "{damage:?}: valid entries after a bad header are refused"
        );
    }
    #[allow(clippy::single_element_loop)]
    for damage in [Damage::CutTo(10)] {
        let copy = tempfile::tempdir().unwrap();
        copy_dir(crashed.dir.path(), copy.path());
        let seg = wal_segments(copy.path()).remove(0);
        match damage {
            Damage::Flip(at) => flip(&seg, at),
            Damage::CutTo(len) => {
                let f = fs::OpenOptions::new().write(true).open(&seg).unwrap();
                f.set_len(len).unwrap();
            }
        }
        let shard = open(copy.path());
        assert!(corrupt_total(&shard) >= 1, "{damage:?}");
        assert!(!seg.exists(), "{damage:?}: the damaged segment is removed");
        assert_records(&shard, USER, &[]);
        let stats = shard.user_stats(USER).wait().unwrap();
        assert_eq!((stats.last_seq, stats.live_count), (0, 0), "{damage:?}");
        assert_eq!(shard.stats().wait().unwrap().live_messages, 0);
        assert_eq!(
            shard
                .append(USER, msg_id(USER, 1), payload(USER, 1))
                .wait()
                .unwrap(),
            1
        );
        shard.close().unwrap();
        let shard = open(copy.path());
        assert_records(&shard, USER, &[1]);
        shard.close().unwrap();
    }
}

#[derive(Debug, Clone, Copy)]
enum Damage {
    Flip(usize),
    CutTo(u64),
}

fn bucket_file(dir: &Path) -> PathBuf {
    dir.join("buckets").join("00").join("00")
}

/// USER and OTHER interleaved in the one bucket: USER gets seqs 1..=5,
/// OTHER seqs 1..=3; checkpointed, closed cleanly. Returns the bucket's
/// frames as (offset, length, user, seq).
fn write_bucket(dir: &Path) -> Vec<(usize, usize, u64, u64)> {
    let shard = open(dir);
    let mut order = Vec::new();
    for seq in 1..=5u64 {
        assert_eq!(
            shard
                .append(USER, msg_id(USER, seq), payload(USER, seq))
                .wait()
                .unwrap(),
            seq
        );
        order.push((USER, seq));
        if seq <= 3 {
            assert_eq!(
                shard
                    .append(OTHER, msg_id(OTHER, seq), payload(OTHER, seq))
                    .wait()
                    .unwrap(),
                seq
            );
            order.push((OTHER, seq));
        }
    }
    shard.checkpoint().wait().unwrap();
    shard.close().unwrap();
    let bytes = fs::read(bucket_file(dir)).unwrap();
    let found = frames(&bytes, BUCKET_HEADER);
    assert_eq!(found.len(), order.len(), "every record is in the bucket");
    found
        .into_iter()
        .map(|(at, len)| {
            let body = &bytes[at + FRAME_HEADER..at + len];
            let user = u64::from_le_bytes(body[0..8].try_into().unwrap());
            let seq = u64::from_le_bytes(body[8..16].try_into().unwrap());
            (at, len, user, seq)
        })
        .collect()
}

#[test]
fn bit_flip_in_a_bucket_record_is_never_returned() {
    let probe = tempfile::tempdir().unwrap();
    let records = write_bucket(probe.path());
    let (at, len, _, _) = *records
        .iter()
        .find(|r| r.2 == USER && r.3 == 3)
        .expect("USER's seq 3 is in the bucket");
    let body = at + FRAME_HEADER;
    // Damage to the payload or the checksum leaves the chain intact: only
    // seq 3 is skipped. Damage to the seq or the prev-offset field breaks
    // the chain there: 1 and 2 become unreachable.
    let intact: &[u64] = &[1, 2, 4, 5];
    let broken: &[u64] = &[4, 5];
    for (flip_at, reachable) in [
        (body + RECORD_FIXED + 3, intact),
        (at + 6, intact),
        (body + 8, broken),
        (body + 40, broken),
    ] {
        assert!(flip_at < at + len);
        let dir = tempfile::tempdir().unwrap();
        let records_again = write_bucket(dir.path());
        assert_eq!(records_again, records, "the layout is deterministic");
        flip(&bucket_file(dir.path()), flip_at);

        let shard = open(dir.path());
        let corrupt_before = corrupt_total(&shard);
        // The damaged seq 3 is never returned.
        assert_records(&shard, USER, reachable);
        assert!(
            corrupt_total(&shard) > corrupt_before,
            "the damaged record is counted"
        );
        let page = shard.fetch(USER, 3, 1000, 1 << 20).wait().unwrap();
        assert_eq!(
            page.records.iter().map(|r| r.seq).collect::<Vec<_>>(),
            [4, 5]
        );
        // The other user's chain in the same file does not pass through it.
        assert_records(&shard, OTHER, &[1, 2, 3]);
        // The mailbox keeps working: appends continue, survive a
        // checkpoint, and are chained behind the reachable records.
        assert_eq!(
            shard
                .append(USER, msg_id(USER, 6), payload(USER, 6))
                .wait()
                .unwrap(),
            6
        );
        shard.checkpoint().wait().unwrap();
        let with_6 = [reachable, &[6]].concat();
        assert_records(&shard, USER, &with_6);
        shard.close().unwrap();
        let shard = open(dir.path());
        assert_records(&shard, USER, &with_6);
        assert_records(&shard, OTHER, &[1, 2, 3]);
        shard.close().unwrap();
    }
}

#[test]
fn stray_compaction_files_are_removed_at_open() {
    let dir = tempfile::tempdir().unwrap();
    write_bucket(dir.path());
    let before = fs::read(bucket_file(dir.path())).unwrap();
    let compact = dir.path().join("compact");
    fs::create_dir_all(&compact).unwrap();
    // Named like the next compaction of bucket 0 (generation 1), but no
    // checkpoint refers to it: installing it would replace the bucket.
    let strays = [
        "00000000.0000000000000001.next",
        "00000000.0000000000000000.next",
        "junk.next",
        "leftover.tmp",
    ];
    for name in strays {
        fs::write(compact.join(name), vec![0xEE; 300]).unwrap();
    }
    let shard = open(dir.path());
    let left: Vec<_> = fs::read_dir(&compact).unwrap().collect();
    assert!(left.is_empty(), "stray files remain: {left:?}");
    assert_eq!(
        fs::read(bucket_file(dir.path())).unwrap(),
        before,
        "the bucket is untouched"
    );
    assert_records(&shard, USER, &[1, 2, 3, 4, 5]);
    assert_records(&shard, OTHER, &[1, 2, 3]);
    assert_eq!(corrupt_total(&shard), 0);
    shard.close().unwrap();
}

#[test]
fn a_real_compaction_after_stray_files_still_works() {
    let dir = tempfile::tempdir().unwrap();
    write_bucket(dir.path());
    let compact = dir.path().join("compact");
    fs::create_dir_all(&compact).unwrap();
    fs::write(compact.join("00000000.0000000000000001.next"), [1u8; 99]).unwrap();
    let config = EngineConfig {
        compact_dead_ratio: 0.1,
        compact_min_bytes: 64,
        ..config()
    };
    let shard = Shard::open(dir.path(), config.clone()).unwrap();
    assert_eq!(shard.ack(USER, 3).wait().unwrap(), 3);
    shard.checkpoint().wait().unwrap();
    let stats = shard.stats().wait().unwrap();
    assert_eq!(stats.compactions_total, 1, "{stats:?}");
    assert_records(&shard, USER, &[4, 5]);
    assert_records(&shard, OTHER, &[1, 2, 3]);
    shard.close().unwrap();
    let shard = Shard::open(dir.path(), config).unwrap();
    assert_records(&shard, USER, &[4, 5]);
    assert_records(&shard, OTHER, &[1, 2, 3]);
    assert_eq!(corrupt_total(&shard), 0);
    shard.close().unwrap();
}

#[test]
fn garbage_past_a_buckets_committed_length_is_ignored_and_overwritten() {
    // An interrupted checkpoint leaves bytes past the length the index
    // records for the bucket, even well-formed frames. They are never read,
    // and the next checkpoint writes over them.
    let dir = tempfile::tempdir().unwrap();
    let records = write_bucket(dir.path());
    let (at, len, _, _) = *records.last().unwrap();
    let end = at + len;
    let path = bucket_file(dir.path());
    let mut bytes = fs::read(&path).unwrap();
    // A copy of USER's seq 5 record (valid checksum) then junk.
    let (at5, len5, _, _) = *records.iter().find(|r| r.2 == USER && r.3 == 5).unwrap();
    let copy = bytes[at5..at5 + len5].to_vec();
    bytes[end..end + len5].copy_from_slice(&copy);
    bytes[end + len5..end + len5 + 100].fill(0xC3);
    fs::write(&path, &bytes).unwrap();

    let shard = open(dir.path());
    assert_records(&shard, USER, &[1, 2, 3, 4, 5]);
    assert_records(&shard, OTHER, &[1, 2, 3]);
    assert_eq!(
        shard
            .append(USER, msg_id(USER, 6), payload(USER, 6))
            .wait()
            .unwrap(),
        6
    );
    shard.checkpoint().wait().unwrap();
    assert_records(&shard, USER, &[1, 2, 3, 4, 5, 6]);
    shard.close().unwrap();
    let shard = open(dir.path());
    assert_records(&shard, USER, &[1, 2, 3, 4, 5, 6]);
    assert_records(&shard, OTHER, &[1, 2, 3]);
    assert_eq!(corrupt_total(&shard), 0);
    shard.close().unwrap();
}

/// Regression (was an engine bug): acking across a record that fails its
/// checksum left the payload bytes of unreachable records counted as live
/// for ever. Since an ack never deletes a record no fetch could return, it
/// now stops before the damaged seq 3 (which stays for a repair); the byte
/// counts are exactly those of the records left, in `user_stats`, in the
/// shard totals and across restarts.
#[test]
fn acking_across_a_damaged_record_leaves_no_phantom_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let records = write_bucket(dir.path());
    let (at, _, _, _) = *records.iter().find(|r| r.2 == USER && r.3 == 3).unwrap();
    flip(
        &bucket_file(dir.path()),
        at + FRAME_HEADER + RECORD_FIXED + 3,
    );
    let other_bytes: usize = (1..=3).map(|s| payload(OTHER, s).len()).sum();
    let user_bytes: usize = (3..=5).map(|s| payload(USER, s).len()).sum();
    let shard = open(dir.path());
    assert_eq!(shard.ack(USER, 5).wait().unwrap(), 2, "capped before seq 3");
    let check = |shard: &Shard, when: &str| {
        let user = shard.user_stats(USER).wait().unwrap();
        assert_eq!(
            (user.live_count, user.live_bytes, user.acked_seq),
            (3, user_bytes as u64, 2),
            "{when}"
        );
        let totals = shard.stats().wait().unwrap();
        assert_eq!(
            (totals.live_messages, totals.live_bytes),
            (6, (other_bytes + user_bytes) as u64),
            "{when}"
        );
    };
    check(&shard, "after the ack");
    shard.close().unwrap();
    let shard = open(dir.path());
    check(&shard, "after a restart");
    shard.close().unwrap();
}

/// Pages through USER's mailbox `max_count` records at a time the way a
/// client does (after the last seq seen, while `more`); returns the seqs.
/// A page that is empty yet says `more` would make a client ask for the
/// same page forever.
fn page_through(shard: &Shard, max_count: u32) -> Vec<u64> {
    let mut seqs = Vec::new();
    let mut after = 0;
    loop {
        let page = shard.fetch(USER, after, max_count, 1 << 20).wait().unwrap();
        assert!(
            !page.records.is_empty() || !page.more,
            "an empty page after seq {after} says more"
        );
        seqs.extend(page.records.iter().map(|r| r.seq));
        after = seqs.last().copied().unwrap_or(after);
        if !page.more {
            return seqs;
        }
    }
}

/// A record that cannot be shown (its checksum fails, or a damaged link
/// cut it off from the chain) is not a reason for `more`: a page says more
/// only if a record the next page can show remains, so paging ends, and an
/// empty page says more only when `max_count` is 0.
#[test]
fn a_page_says_more_only_while_readable_records_remain() {
    let probe = tempfile::tempdir().unwrap();
    let records = write_bucket(probe.path());
    let (at, _, _, _) = *records
        .iter()
        .find(|r| r.2 == USER && r.3 == 5)
        .expect("USER's seq 5, its newest, is in the bucket");
    let body = at + FRAME_HEADER;
    // A flipped payload: seq 5 fails its checksum, 1..=4 stay readable.
    // A flipped seq field: the chain breaks at its start, nothing of USER
    // is reachable.
    for (flip_at, readable) in [
        (body + RECORD_FIXED + 3, &[1u64, 2, 3, 4][..]),
        (body + 8, &[][..]),
    ] {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(write_bucket(dir.path()), records);
        flip(&bucket_file(dir.path()), flip_at);
        let shard = open(dir.path());
        assert_eq!(
            shard.user_stats(USER).wait().unwrap().last_seq,
            5,
            "the state still counts seq 5"
        );
        for max_count in [1, 2, 1000] {
            assert_eq!(page_through(&shard, max_count), readable, "{max_count}");
        }
        let last = shard.fetch(USER, 4, 1000, 1 << 20).wait().unwrap();
        assert!(last.records.is_empty() && !last.more, "after seq 4");
        let none = shard.fetch(USER, 0, 0, 1 << 20).wait().unwrap();
        assert!(none.records.is_empty());
        assert_eq!(none.more, !readable.is_empty(), "max_count 0");
        // Records appended since are readable, after what is not.
        assert_eq!(
            shard
                .append(USER, msg_id(USER, 6), payload(USER, 6))
                .wait()
                .unwrap(),
            6
        );
        let with_6 = [readable, &[6]].concat();
        assert_eq!(page_through(&shard, 1), with_6);
        shard.checkpoint().wait().unwrap();
        assert_eq!(page_through(&shard, 1), with_6);
        assert_records(&shard, OTHER, &[1, 2, 3]);
        shard.close().unwrap();
    }
}
