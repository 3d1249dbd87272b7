//! Damage to the write-ahead log: a torn tail (nothing valid after the
//! first bad byte) is dropped; damage with valid entries after it is
//! corruption: the shard refuses to open (naming the file and offset) and
//! changes nothing, until `repair_log` cuts the log there, after which no
//! seq is ever given twice.

use crate::damage::{config, frames, wal_segments, WAL_HEADER};
use msgstore::{daemon::repair_log, Error, Shard};
use std::{
    collections::BTreeMap,
    fs,
    path::{Path, PathBuf},
};

const USERS: [u64; 3] = [1, 2, 3];

/// Every log file (segments, spare) with a hash of its bytes.
fn snapshot(dir: &Path) -> BTreeMap<PathBuf, u64> {
    use std::hash::{Hash, Hasher};
    let mut out = BTreeMap::new();
    for entry in fs::read_dir(dir.join("wal")).unwrap() {
        let path = entry.unwrap().path();
        let mut h = std::collections::hash_map::DefaultHasher::new();
        fs::read(&path).unwrap().hash(&mut h);
        out.insert(path, h.finish());
    }
    out
}

/// `n` acknowledged appends round-robin over USERS, left in the log (no
/// checkpoint: the shard is abandoned, as in a crash), copied to a fresh
/// directory. Returns it with every (user, seq) acknowledged, in order.
fn logged(n: usize) -> (tempfile::TempDir, Vec<(u64, u64)>) {
    let live = tempfile::tempdir().unwrap();
    let shard = Shard::open(live.path(), config()).unwrap();
    let mut acked = Vec::new();
    for i in 0..n {
        let user = USERS[i % USERS.len()];
        let seq = shard
            .append(
                user,
                i as u128 + 1,
                format!("message {i} of user {user}").into_bytes(),
            )
            .wait()
            .unwrap();
        acked.push((user, seq));
    }
    let copy = tempfile::tempdir().unwrap();
    daemon::testing::copy_dir_except(live.path(), copy.path(), "spare.tmp");
    // Never closed (closing checkpoints, emptying the log): a crash.
    std::mem::forget(shard);
    std::mem::forget(live);
    let segs = wal_segments(copy.path());
    let log = fs::read(&segs[0]).unwrap();
    assert_eq!(
        frames(&log, WAL_HEADER).len(),
        n,
        "all in the first segment"
    );
    (copy, acked)
}

fn flip(path: &Path, at: usize) {
    let mut bytes = fs::read(path).unwrap();
    bytes[at] ^= 0x5A;
    fs::write(path, bytes).unwrap();
}

fn refused(dir: &Path) -> msgstore::error::LogDamage {
    let before = snapshot(dir);
    let err = match Shard::open(dir, config()) {
        Ok(_) => panic!("a corrupt log must not open"),
        Err(e) => e,
    };
    let text = err.to_string();
    let Error::LogDamaged(damage) = err else {
        panic!("wrong error: {text}")
    };
    assert!(text.contains(&damage.file), "{text}");
    assert!(
        text.contains(&format!("offset {}", damage.offset)),
        "{text}"
    );
    assert_eq!(snapshot(dir), before, "nothing on disk changed");
    *damage
}

#[test]
fn flip_in_the_middle_refuses_then_repair_never_reuses_a_seq() {
    let (dir, acked) = logged(2000);
    let seg = wal_segments(dir.path()).remove(0);
    let log = fs::read(&seg).unwrap();
    let (at, len) = frames(&log, WAL_HEADER)[1000];
    flip(&seg, at + len - 3); // a payload byte of entry 1,000

    let damage = refused(dir.path());
    assert_eq!(damage.file, seg.display().to_string());
    assert_eq!(damage.offset, at as u64);
    assert_eq!(damage.valid_after, 999, "the entries after the damaged one");
    // A second refusal: still nothing changed.
    assert_eq!(refused(dir.path()), damage);

    let report = repair_log(dir.path(), config()).unwrap();
    let cut = report.damage.clone().expect("the damage is reported");
    assert_eq!((cut.offset, cut.valid_after), (at as u64, 999));
    let lines = msgstore::daemon::repair_summary(&report);
    assert!(lines[0].contains(&seg.display().to_string()), "{lines:?}");

    let shard = Shard::open(dir.path(), config()).expect("opens after repair");
    let mut highest: BTreeMap<u64, u64> = BTreeMap::new();
    for (user, seq) in &acked {
        let h = highest.entry(*user).or_default();
        *h = (*h).max(*seq);
    }
    for (i, (user, seq)) in acked[..1000].iter().enumerate() {
        let page = shard.fetch(*user, *seq - 1, 1, 1 << 20).wait().unwrap();
        assert_eq!(
            page.records.first().map(|r| r.seq),
            Some(*seq),
            "entry {i} survives"
        );
    }
    for user in USERS {
        let seq = shard.append(user, 9_999, b"after".to_vec()).wait().unwrap();
        assert!(
            seq > highest[&user],
            "user {user} got seq {seq}, but was given up to {}",
            highest[&user]
        );
    }
    shard.close().unwrap();
    // And after another restart, still above.
    let shard = Shard::open(dir.path(), config()).unwrap();
    for user in USERS {
        let seq = shard.append(user, 9_998, b"again".to_vec()).wait().unwrap();
        assert!(seq > highest[&user] + 1, "user {user} got {seq}");
    }
    shard.close().unwrap();
}

#[test]
fn flip_in_a_segment_header_with_entries_after_is_refused() {
    let (dir, _) = logged(50);
    let seg = wal_segments(dir.path()).remove(0);
    flip(&seg, 12);
    let damage = refused(dir.path());
    assert_eq!(damage.file, seg.display().to_string());
    assert_eq!((damage.offset, damage.valid_after), (0, 50));
}

#[test]
fn torn_tail_is_dropped_and_nothing_before_it_is_lost() {
    let (dir, acked) = logged(300);
    let seg = wal_segments(dir.path()).remove(0);
    let log = fs::read(&seg).unwrap();
    let (at, len) = *frames(&log, WAL_HEADER).last().unwrap();
    // The last write reached the disk only in part (it was never answered).
    let f = fs::OpenOptions::new().write(true).open(&seg).unwrap();
    f.set_len((at + len / 2) as u64).unwrap();
    drop(f);
    let shard = Shard::open(dir.path(), config()).expect("a torn tail opens");
    assert!(shard.stats().wait().unwrap().corrupt_records_total >= 1);
    for (user, seq) in &acked[..acked.len() - 1] {
        let page = shard.fetch(*user, *seq - 1, 1, 1 << 20).wait().unwrap();
        assert_eq!(page.records.first().map(|r| r.seq), Some(*seq));
    }
    let (user, lost) = *acked.last().unwrap();
    assert_eq!(shard.append(user, 1, b"x".to_vec()).wait().unwrap(), lost);
    shard.close().unwrap();
}

/// The same rules through the `msgstore` binary, as an operator meets
/// them: a daemon on a log damaged in the middle exits with an error that
/// names the file and the offset and tells how to repair; `--repair` cuts
/// the log and says what was lost; then the daemon starts and serves.
#[test]
fn the_daemon_refuses_a_damaged_log_and_repair_lets_it_start() {
    let (dir, _) = logged(200);
    let seg = wal_segments(dir.path()).remove(0);
    let log = fs::read(&seg).unwrap();
    let (at, len) = frames(&log, WAL_HEADER)[100];
    flip(&seg, at + len - 3);
    let toml = dir.path().join("msgstore.toml");
    // The engine settings `config()` made the shard with (its fan-out
    // cannot change).
    fs::write(
        &toml,
        "[engine]\nbucket_dirs = 1\nbucket_files = 1\nwal_segment_bytes = 1048576\n\
         index_map_bytes = 16777216\n",
    )
    .unwrap();
    let run = |extra: &[&str]| {
        let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_msgstore"));
        cmd.arg("--data")
            .arg(dir.path())
            .arg("--config")
            .arg(&toml)
            .args(["--listen", "127.0.0.1:0"])
            .args(extra)
            .env("RUST_LOG", "error");
        // With the key, so it is the damaged log that stops it.
        daemon::testing::with_cluster_key(&mut cmd);
        let out = cmd.output().expect("run msgstore");
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        (out.status, text)
    };
    let before = snapshot(dir.path());
    let (status, text) = run(&[]);
    assert!(!status.success(), "a damaged log must not start: {text}");
    assert!(text.contains(&seg.display().to_string()), "{text}");
    assert!(text.contains(&format!("offset {at}")), "{text}");
    assert!(text.contains("--repair"), "{text}");
    assert_eq!(snapshot(dir.path()), before, "nothing on disk changed");

    let (status, text) = run(&["--repair"]);
    assert!(status.success(), "{text}");
    assert!(text.contains("cut the log at"), "{text}");
    assert!(text.contains("dropped 99 valid entries"), "{text}");

    let mut daemon = daemon::testing::DaemonProcess::start(
        {
            let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_msgstore"));
            cmd.arg("--data")
                .arg(dir.path())
                .arg("--config")
                .arg(&toml)
                .args(["--listen", "127.0.0.1:0"])
                .env("RUST_LOG", "error");
            cmd
        },
        "msgstore",
        std::time::Duration::from_secs(60),
    );
    daemon.signal(libc::SIGTERM);
    assert!(
        daemon.child.wait().unwrap().success(),
        "serves, stops cleanly"
    );
}
