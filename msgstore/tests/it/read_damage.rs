//! Damage that cuts a user's records off from the reader: a truncated
//! bucket file, a bad `tail_offset` or a bad bucket id in the user's index
//! entry. The shard is closed, a file or the index is damaged on purpose,
//! and the shard is reopened. Paging always ends (an empty page never says
//! more), the damage is counted, and an ack never deletes a record no fetch
//! could return: it is capped before the first record the shard cannot read
//! (docs/STORAGE.md, "Reading past damage").

use heed::{types::Bytes, CommitOrAbort, Database, EnvOpenOptions};

use crate::damage::{open, FRAME_HEADER};
use msgstore::Shard;
use std::{fs, path::Path};

const USER: u64 = 42;
const LIVE: u64 = 20;
const BUCKET_HEADER: usize = 64;

fn payload(seq: u64) -> Vec<u8> {
    format!("message {seq};")
        .repeat(1 + (seq % 3) as usize)
        .into_bytes()
}

fn bucket_file(dir: &Path) -> std::path::PathBuf {
    dir.join("buckets").join("00").join("00")
}

/// USER gets seqs 1..=LIVE, checkpointed, closed. Returns each record's
/// frame offset in the bucket, by seq (index 0 is seq 1).
fn write_user(dir: &Path) -> Vec<usize> {
    let shard = open(dir);
    for seq in 1..=LIVE {
        let got = shard.append(USER, u128::from(seq), payload(seq)).wait();
        assert_eq!(got.unwrap(), seq);
    }
    shard.checkpoint().wait().unwrap();
    shard.close().unwrap();
    let bytes = fs::read(bucket_file(dir)).unwrap();
    let mut offsets = Vec::new();
    let mut at = BUCKET_HEADER;
    for _ in 1..=LIVE {
        let len = u32::from_le_bytes(bytes[at..at + 4].try_into().unwrap()) as usize;
        offsets.push(at);
        at += FRAME_HEADER + len;
    }
    offsets
}

/// Rewrite USER's 45-byte entry in the index's `users` database.
fn edit_index_entry(dir: &Path, edit: impl FnOnce(&mut [u8])) {
    // SAFETY: the shard is closed; nothing else has the environment open.
    let env = unsafe {
        EnvOpenOptions::new()
            .map_size(16 << 20)
            .max_dbs(4)
            .open(dir.join("index"))
            .unwrap()
    };
    let wtxn = env.write_txn().unwrap();
    let users: Database<'static, Bytes, Bytes> = env
        .create_databases_and_commit(wtxn, |dbo, wtxn| {
            let users = dbo.create_database(wtxn, Some("users"))?;
            Ok::<_, heed::Error>(CommitOrAbort::<_, ()>::Commit(users))
        })
        .unwrap()
        .commit()
        .unwrap();
    let mut wtxn = env.write_txn().unwrap();
    let key = USER.to_be_bytes();
    let mut value = users.get(&wtxn, &key).unwrap().unwrap().to_vec();
    edit(&mut value);
    users.put(&mut wtxn, &key, &value).unwrap();
    wtxn.commit().unwrap();
}

fn corrupt_total(shard: &Shard) -> u64 {
    shard.stats().wait().unwrap().corrupt_records_total
}

/// Pages through USER's mailbox `max_count` records at a time the way a
/// client does; fails if a page is empty yet says more, or if paging does
/// not end.
fn page_through(shard: &Shard, max_count: u32) -> Vec<u64> {
    let mut seqs = Vec::new();
    let mut after = 0;
    for _ in 0..100 {
        let page = shard.fetch(USER, after, max_count, 1 << 20).wait().unwrap();
        assert!(
            !page.records.is_empty() || !page.more,
            "an empty page after seq {after} says more"
        );
        for r in &page.records {
            assert_eq!(r.payload, payload(r.seq), "payload of seq {}", r.seq);
        }
        seqs.extend(page.records.iter().map(|r| r.seq));
        after = seqs.last().copied().unwrap_or(after);
        if !page.more {
            return seqs;
        }
    }
    panic!("paging did not end: {seqs:?}");
}

/// Paging ends with `readable`, the damage is counted, and an ack of
/// everything is capped at `ack_cap` (the seq before the first record the
/// shard cannot read): the records after it stay, across a restart.
fn check_damaged(dir: &Path, readable: &[u64], ack_cap: u64) {
    let shard = open(dir);
    let before = corrupt_total(&shard);
    for max_count in [1, 7, 1000] {
        assert_eq!(page_through(&shard, max_count), readable, "{max_count}");
    }
    assert!(corrupt_total(&shard) > before, "the damage is counted");
    let stats = shard.user_stats(USER).wait().unwrap();
    assert_eq!((stats.live_count, stats.last_seq), (LIVE, LIVE));

    // A client acks what it was shown and then some: nothing it could not
    // have been shown is deleted.
    let removed = shard.ack(USER, LIVE).wait().unwrap();
    assert_eq!(removed, ack_cap, "the ack is capped");
    let stats = shard.user_stats(USER).wait().unwrap();
    assert_eq!(stats.acked_seq, ack_cap);
    assert_eq!(stats.live_count, LIVE - ack_cap, "unreadable records stay");
    // Acking again changes nothing and does not fail.
    assert_eq!(shard.ack(USER, LIVE).wait().unwrap(), 0);
    // What the shard reads is still read after the ack.
    let left: Vec<u64> = readable.iter().copied().filter(|s| *s > ack_cap).collect();
    assert_eq!(page_through(&shard, 1000), left);
    shard.close().unwrap();

    let shard = open(dir);
    let stats = shard.user_stats(USER).wait().unwrap();
    assert_eq!(
        (stats.acked_seq, stats.live_count),
        (ack_cap, LIVE - ack_cap),
        "after a restart"
    );
    assert_eq!(page_through(&shard, 1000), left);
    shard.close().unwrap();
}

/// A bucket file cut short under a user with 20 live records: its tail is
/// gone, so the chain (which starts at the tail) reaches nothing. Fetch
/// says no more, the damage is counted, and an ack past the damaged range
/// deletes nothing: the intact records are still in the file.
#[test]
fn a_truncated_bucket_never_loops_and_an_ack_keeps_its_records() {
    let dir = tempfile::tempdir().unwrap();
    let offsets = write_user(dir.path());
    let path = bucket_file(dir.path());
    let cut = offsets[15]; // seq 16 onwards is gone
    let file = fs::OpenOptions::new().write(true).open(&path).unwrap();
    file.set_len(cut as u64).unwrap();
    drop(file);
    let intact = fs::read(&path).unwrap();

    check_damaged(dir.path(), &[], 0);

    let after = fs::read(&path).unwrap();
    assert_eq!(
        &after[..cut],
        &intact[..],
        "the records before the cut are still in the bucket file"
    );
    // A new record is readable after the damaged ones, and its ack is
    // capped the same way.
    let shard = open(dir.path());
    assert_eq!(shard.append(USER, 99, payload(21)).wait().unwrap(), 21);
    assert_eq!(page_through(&shard, 1000), [21]);
    assert_eq!(shard.ack(USER, 21).wait().unwrap(), 0);
    assert_eq!(shard.user_stats(USER).wait().unwrap().live_count, 21);
    shard.close().unwrap();
}

/// A bucket id past the fan-out in the user's index entry: no file to
/// read, so nothing is readable; counted, not a panic, and no ack deletes.
#[test]
fn a_bad_bucket_id_reads_nothing_counts_it_and_an_ack_deletes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    write_user(dir.path());
    edit_index_entry(dir.path(), |v| {
        v[0..4].copy_from_slice(&0xFFFF_FF00u32.to_le_bytes())
    });
    check_damaged(dir.path(), &[], 0);
    // A record appended now would land outside the user's bucket (here:
    // outside the fan-out): refused, typed, and nothing is written.
    let shard = open(dir.path());
    let refused = shard.append(USER, 99, payload(21)).wait();
    assert!(
        matches!(refused, Err(msgstore::Error::Corrupt(_))),
        "{refused:?}"
    );
    assert_eq!(shard.user_stats(USER).wait().unwrap().last_seq, LIVE);
    shard.close().unwrap();
}

/// A bad `tail_offset`: past the file, into the middle of a record, or at
/// an older record of the user (which silently hid the newer ones).
#[test]
fn a_bad_tail_offset_never_loops_and_an_ack_stops_before_the_damage() {
    let probe = tempfile::tempdir().unwrap();
    let offsets = write_user(probe.path());
    let all: Vec<u64> = (1..=LIVE).collect();
    for (tail, readable, cap) in [
        (1u64 << 40, &[][..], 0u64),
        (offsets[19] as u64 + 3, &[][..], 0),
        (offsets[14] as u64, &all[..15], 15),
    ] {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(write_user(dir.path()), offsets);
        edit_index_entry(dir.path(), |v| {
            v[20..28].copy_from_slice(&tail.to_le_bytes())
        });
        check_damaged(dir.path(), readable, cap);
    }
}

/// A record whose checksum fails is never shown, so an ack does not delete
/// it either: the ack stops before it, the records before it go.
#[test]
fn an_ack_stops_before_a_record_that_fails_its_checksum() {
    let dir = tempfile::tempdir().unwrap();
    let offsets = write_user(dir.path());
    let path = bucket_file(dir.path());
    let mut bytes = fs::read(&path).unwrap();
    // The payload of seq 8 (after the 48-byte record header).
    bytes[offsets[7] + FRAME_HEADER + 48 + 2] ^= 0x5A;
    fs::write(&path, bytes).unwrap();
    let readable: Vec<u64> = (1..=LIVE).filter(|s| *s != 8).collect();
    check_damaged(dir.path(), &readable, 7);
}
