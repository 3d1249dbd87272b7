//! Snapshot archives: a round trip gives the same mailboxes; any damage is
//! refused with the target untouched; an interrupted swap is finished.

use super::{archive, receive, Siblings, COMPLETE_MARKER};
use crate::{
    engine::{
        replicated::tests::{append, apply, config, records},
        routing::tests::map,
        Engine,
    },
    Error,
};
use proto::shard::{RequestBody, ResponseBody, Routing, ShardErrorCode};
use std::{collections::BTreeMap, fs, path::Path};

/// Users the tests put mailboxes in.
const USERS: u64 = 24;

/// A replicated shard with some history: mailboxes in bucket files and in
/// memory, acks (and a compaction), a routing, a freeze and a marker.
fn build_source(dir: &Path) -> Engine {
    let mut e = Engine::open_replicated(dir, config()).unwrap();
    let routing = RequestBody::SetRouting(Routing {
        me: "a".into(),
        current: map(1, &["a"]),
        target: None,
    });
    apply(&mut e, 1_000, &[routing]);
    for round in 0..6u8 {
        let appends: Vec<_> = (0..USERS)
            .map(|u| append(u, round, 40 + u as usize))
            .collect();
        apply(&mut e, 2_000 + u64::from(round), &appends);
        if round % 2 == 1 {
            e.checkpoint_now().unwrap();
        }
    }
    let acks: Vec<_> = (0..USERS)
        .filter(|u| u % 3 != 1)
        .map(|user| RequestBody::Ack { user, up_to_seq: 5 })
        .collect();
    apply(&mut e, 3_000, &acks);
    e.checkpoint_now().unwrap(); // marks the buckets for compaction
    e.checkpoint_now().unwrap(); // compacts them
    assert!(e.counters.compactions_total > 0);
    apply(
        &mut e,
        4_000,
        &[append(1, 99, 7), RequestBody::Freeze { user: 2, token: 9 }],
    );
    e.set_applied(b"marker of entry 42".to_vec());
    e
}

/// Everything a replica must agree on: every user's records and stats,
/// the shard totals, the routing and the marker.
fn state(e: &mut Engine) -> String {
    let mut out = String::new();
    for user in 0..USERS {
        let recs: Vec<(u64, u128, u64, usize, u32)> = records(e, user)
            .unwrap()
            .into_iter()
            .map(|r| {
                let crc = crc32c::crc32c(&r.payload);
                (r.seq, r.msg_id, r.timestamp_ms, r.payload.len(), crc)
            })
            .collect();
        let stats = e.user_stats(user).unwrap();
        out += &format!("user {user}: {recs:?} {stats:?}\n");
    }
    let s = e.stats();
    out += &format!(
        "totals {} {} {} buckets {} {}\nrouting {:?}\nmarker {:?}\n",
        s.users,
        s.live_messages,
        s.live_bytes,
        s.bucket_bytes,
        s.dead_bytes,
        e.routing(),
        e.applied()
    );
    out
}

/// Every file and directory under `dir` with its contents (directories
/// empty), by relative path; `LOCK` left out (an open locks it).
fn tree(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    let mut out = BTreeMap::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        for entry in fs::read_dir(&d).unwrap() {
            let path = entry.unwrap().path();
            let name = path.strip_prefix(dir).unwrap().display().to_string();
            if path.is_dir() {
                todo.push(path);
                out.insert(name + "/", Vec::new());
            } else if name != "LOCK" {
                out.insert(name, fs::read(&path).unwrap());
            }
        }
    }
    out
}

/// A snapshot of a freshly built source, and the source's state.
fn snapshot() -> (Vec<u8>, String) {
    let src = tempfile::tempdir().unwrap();
    let mut e = build_source(src.path());
    let mut snap = Vec::new();
    let summary = e.write_snapshot(&mut snap).unwrap();
    assert_eq!(summary.bytes, snap.len() as u64);
    assert!(summary.files >= 2, "the index and some buckets");
    (snap, state(&mut e))
}

/// A shard directory (closed) with a state of its own, to install over.
fn existing_target(parent: &Path) -> std::path::PathBuf {
    let dir = parent.join("shard");
    let mut e = Engine::open_replicated(&dir, config()).unwrap();
    apply(&mut e, 1, &[append(7, 7, 70), append(8, 8, 80)]);
    e.set_applied(b"the target's own".to_vec());
    e.checkpoint_now().unwrap();
    dir
}

/// Written, installed over another shard and opened, a snapshot gives a
/// shard equal to the source in every mailbox, the totals, the routing,
/// the marker and the frozen users; both then answer new entries alike.
#[test]
fn a_snapshot_installed_elsewhere_opens_as_the_same_shard() {
    let src = tempfile::tempdir().unwrap();
    let mut source = build_source(src.path());
    let mut snap = Vec::new();
    let written = source.write_snapshot(&mut snap).unwrap();
    assert!(src.path().join("wal").read_dir().unwrap().next().is_none());
    assert!(!src.path().join(super::INDEX_COPY_TMP).exists());

    let parent = tempfile::tempdir().unwrap();
    let dir = existing_target(parent.path());
    let installed = Engine::install_snapshot(&dir, &mut &snap[..]).unwrap();
    assert_eq!(installed, written);
    let sides = Siblings::of(&dir).unwrap();
    assert!(!sides.incoming.exists() && !sides.old.exists());
    assert!(!dir.join(COMPLETE_MARKER).exists());
    let mut target = Engine::open_replicated(&dir, config()).unwrap();
    let want = state(&mut source);
    assert_eq!(state(&mut target), want);
    assert!(want.contains("marker Some"), "{want}");

    // The freeze came along; new entries are answered alike.
    let next = [append(2, 1, 5), append(1, 2, 5), append(USERS + 1, 3, 5)];
    let answers = apply(&mut source, 5_000, &next);
    assert!(
        matches!(&answers[0], ResponseBody::Error(e) if e.code == ShardErrorCode::Busy),
        "{answers:?}"
    );
    assert_eq!(apply(&mut target, 5_000, &next), answers);
    // And after a restart of the installed copy (both checkpointed: the
    // bucket bytes count only what checkpoints wrote).
    source.checkpoint_now().unwrap();
    target.checkpoint_now().unwrap();
    drop(target);
    let mut target = Engine::open_replicated(&dir, config()).unwrap();
    assert_eq!(state(&mut target), state(&mut source));
}

/// A standalone shard's snapshot works too (its routing file comes along
/// and moves into the installed copy's index).
#[test]
fn a_standalone_shards_snapshot_carries_its_routing_file() {
    let src = tempfile::tempdir().unwrap();
    let mut e = Engine::open(src.path(), config()).unwrap();
    let routing = Routing {
        me: "a".into(),
        current: map(3, &["a"]),
        target: None,
    };
    apply(
        &mut e,
        1,
        &[RequestBody::SetRouting(routing.clone()), append(1, 1, 10)],
    );
    let mut snap = Vec::new();
    e.write_snapshot(&mut snap).unwrap();
    let parent = tempfile::tempdir().unwrap();
    let dir = parent.path().join("new");
    Engine::install_snapshot(&dir, &mut &snap[..]).unwrap();
    assert!(dir.join("routing.toml").exists());
    let mut t = Engine::open_replicated(&dir, config()).unwrap();
    assert!(!dir.join("routing.toml").exists(), "moved into the index");
    assert_eq!(t.routing(), Some(routing.clone()));
    assert_eq!(records(&mut t, 1).unwrap().len(), 1);
    drop(t);
    let t = Engine::open_replicated(&dir, config()).unwrap();
    assert_eq!(t.routing(), Some(routing));
}

/// Where the fields of `snap` are: (what, offset) for a byte of each.
fn landmarks(snap: &[u8]) -> Vec<(String, usize)> {
    let mut out = vec![
        ("magic".into(), 0),
        ("version".into(), 8),
        ("zero".into(), 12),
    ];
    let mut at = archive::HEADER_BYTES;
    loop {
        let path_len = u16::from_le_bytes([snap[at], snap[at + 1]]) as usize;
        if path_len == 0 {
            break;
        }
        let path = String::from_utf8_lossy(&snap[at + 2..at + 2 + path_len]).into_owned();
        let len_at = at + 2 + path_len;
        let len = u64::from_le_bytes(snap[len_at..len_at + 8].try_into().unwrap()) as usize;
        let bytes_at = len_at + 12;
        out.push((format!("{path}: path length"), at));
        out.push((format!("{path}: path"), at + 2 + path_len - 1));
        out.push((format!("{path}: length"), len_at));
        out.push((format!("{path}: crc"), len_at + 8));
        if len > 0 {
            out.push((format!("{path}: first byte"), bytes_at));
            out.push((format!("{path}: last byte"), bytes_at + len - 1));
        }
        at = bytes_at + len;
    }
    for (what, off) in [
        ("end marker", 0),
        ("end files", 2),
        ("end bytes", 10),
        ("end crc", 18),
    ] {
        out.push((what.into(), at + off));
    }
    assert_eq!(at + 22, snap.len(), "the end record closes the archive");
    out
}

/// One flipped bit anywhere (header, a path, a length, a checksum, file
/// bytes, the end record), a cut at any field, or a byte too many: the
/// install is refused with a typed error and the target is untouched.
#[test]
fn a_damaged_or_truncated_snapshot_is_refused_and_the_target_left_untouched() {
    let (snap, _) = snapshot();
    let parent = tempfile::tempdir().unwrap();
    let dir = existing_target(parent.path());
    let before = tree(&dir);
    let sides = Siblings::of(&dir).unwrap();
    let mut cases: Vec<(String, Vec<u8>)> = Vec::new();
    for (what, at) in landmarks(&snap) {
        for bit in [0x01u8, 0x80] {
            let mut bad = snap.clone();
            bad[at] ^= bit;
            cases.push((format!("{what} ^ {bit:#x} at {at}"), bad));
        }
        cases.push((format!("cut before {what}"), snap[..at].to_vec()));
    }
    let mut longer = snap.clone();
    longer.push(0);
    cases.push(("a byte too many".into(), longer));
    for (what, bad) in cases {
        let got = Engine::install_snapshot(&dir, &mut &bad[..]);
        assert!(matches!(got, Err(Error::BadSnapshot(_))), "{what}: {got:?}");
        assert!(tree(&dir) == before, "{what}: the target changed");
        assert!(!sides.incoming.exists() && !sides.old.exists(), "{what}");
    }
    // Still the target's own state, and a good archive still installs.
    let e = Engine::open_replicated(&dir, config()).unwrap();
    assert_eq!(e.applied(), Some(&b"the target's own"[..]));
    drop(e);
    Engine::install_snapshot(&dir, &mut &snap[..]).unwrap();
}

/// An archive (correct checksums) holding one file `path` with a length
/// field of `len` and the bytes `bytes`.
fn crafted(path: &str, len: u64, bytes: &[u8]) -> Vec<u8> {
    let mut b = Vec::new();
    b.extend_from_slice(archive::MAGIC);
    b.extend_from_slice(&archive::FORMAT_VERSION.to_le_bytes());
    b.extend_from_slice(&[0; 4]);
    let mut listing = b.clone();
    let mut fields = (path.len() as u16).to_le_bytes().to_vec();
    fields.extend_from_slice(path.as_bytes());
    fields.extend_from_slice(&len.to_le_bytes());
    fields.extend_from_slice(&crc32c::crc32c(bytes).to_le_bytes());
    listing.extend_from_slice(&fields);
    b.extend_from_slice(&fields);
    b.extend_from_slice(bytes);
    let mut end = 0u16.to_le_bytes().to_vec();
    end.extend_from_slice(&1u64.to_le_bytes());
    end.extend_from_slice(&(bytes.len() as u64).to_le_bytes());
    listing.extend_from_slice(&end);
    b.extend_from_slice(&end);
    b.extend_from_slice(&crc32c::crc32c(&listing).to_le_bytes());
    b
}

/// Paths that leave the directory or name no shard file, a length past the
/// limit, an archive without the index: refused, nothing written anywhere.
#[test]
fn unsafe_paths_absurd_lengths_and_archives_without_an_index_are_refused() {
    let parent = tempfile::tempdir().unwrap();
    let dir = parent.path().join("shard");
    let cases = [
        crafted("../evil", 3, b"bad"),
        crafted("/tmp/evil", 3, b"bad"),
        crafted("buckets/../../evil", 3, b"bad"),
        crafted("buckets/00/./01", 3, b"bad"),
        crafted("wal/0000000000000001.log", 3, b"bad"),
        crafted("LOCK", 3, b"bad"),
        crafted("compact/1.2.next", 3, b"bad"),
        crafted("buckets/000/01", 3, b"bad"),
        crafted("buckets/00/01", archive::FILE_BYTES_MAX + 1, b""),
        crafted("buckets/00/01", 3, b"bkt"),
    ];
    for (i, bad) in cases.iter().enumerate() {
        let got = Engine::install_snapshot(&dir, &mut &bad[..]);
        assert!(
            matches!(got, Err(Error::BadSnapshot(_))),
            "case {i}: {got:?}"
        );
        assert!(!dir.exists(), "case {i}: a missing target stays missing");
        let names: Vec<_> = fs::read_dir(parent.path()).unwrap().collect();
        assert!(names.is_empty(), "case {i}: {names:?}");
    }
    // The control: the same crafting with a good index path is accepted
    // as an archive (its content is not an LMDB file, which the open
    // would find out).
    let good = crafted("index/data.mdb", 3, b"mdb");
    Engine::install_snapshot(&dir, &mut &good[..]).unwrap();
    assert_eq!(fs::read(dir.join("index/data.mdb")).unwrap(), b"mdb");
}

/// A crash after `dir` became `<dir>.old` and before `<dir>.incoming`
/// became `dir`: the open finishes the swap. A crash before the swap (dir
/// still there): the open keeps `dir` and drops the leftovers. A missing
/// `dir` with only `<dir>.old`: the open puts it back.
#[test]
fn an_interrupted_swap_is_finished_or_undone_by_the_open() {
    let (snap, source_state) = snapshot();
    let parent = tempfile::tempdir().unwrap();
    let dir = existing_target(parent.path());
    let sides = Siblings::of(&dir).unwrap();

    // Crashed mid-swap.
    receive(&sides.incoming, &mut &snap[..]).unwrap();
    fs::rename(&dir, &sides.old).unwrap();
    let mut e = Engine::open_replicated(&dir, config()).unwrap();
    assert_eq!(state(&mut e), source_state);
    assert!(!sides.incoming.exists() && !sides.old.exists());
    assert!(!dir.join(COMPLETE_MARKER).exists());
    drop(e);

    // Crashed before the swap: the complete copy is dropped.
    let mut e = Engine::open_replicated(&dir, config()).unwrap();
    apply(&mut e, 9, &[append(3, 3, 3)]);
    e.set_applied(b"after the install".to_vec());
    e.checkpoint_now().unwrap();
    drop(e);
    receive(&sides.incoming, &mut &snap[..]).unwrap();
    fs::create_dir_all(sides.old.join("junk")).unwrap();
    let e = Engine::open_replicated(&dir, config()).unwrap();
    assert_eq!(e.applied(), Some(&b"after the install"[..]));
    assert!(!sides.incoming.exists() && !sides.old.exists());
    drop(e);

    // Crashed mid-swap with an incomplete copy (no marker): undone.
    receive(&sides.incoming, &mut &snap[..]).unwrap();
    fs::remove_file(sides.incoming.join(COMPLETE_MARKER)).unwrap();
    fs::rename(&dir, &sides.old).unwrap();
    let e = Engine::open_replicated(&dir, config()).unwrap();
    assert_eq!(e.applied(), Some(&b"after the install"[..]));
    assert!(!sides.incoming.exists() && !sides.old.exists());
}

/// An engine that has the directory open keeps it: the install is refused
/// before anything is written.
#[test]
fn a_snapshot_is_not_installed_over_an_open_shard() {
    let (snap, _) = snapshot();
    let parent = tempfile::tempdir().unwrap();
    let dir = existing_target(parent.path());
    let e = Engine::open_replicated(&dir, config()).unwrap();
    let got = Engine::install_snapshot(&dir, &mut &snap[..]);
    assert!(matches!(got, Err(Error::Locked { .. })), "{got:?}");
    assert_eq!(e.applied(), Some(&b"the target's own"[..]));
    assert!(!Siblings::of(&dir).unwrap().incoming.exists());
}

/// A compacted file still awaiting its swap (as a crash between a commit
/// and its merge's rename leaves it) goes into the archive, and the open of
/// the installed copy swaps it in.
#[test]
fn a_compacted_file_awaiting_its_swap_travels_and_is_swapped_in() {
    let src = tempfile::tempdir().unwrap();
    let mut e = Engine::open_replicated(src.path(), config()).unwrap();
    for round in 0..4u8 {
        let appends: Vec<_> = (0..USERS).map(|u| append(u, round, 60)).collect();
        apply(&mut e, 1, &appends);
    }
    e.checkpoint_now().unwrap();
    let acks: Vec<_> = (0..USERS)
        .map(|user| RequestBody::Ack { user, up_to_seq: 3 })
        .collect();
    apply(&mut e, 2, &acks);
    e.checkpoint_now().unwrap(); // compacts and lists the swaps
    let pending = e.index.checkpoint_meta().unwrap().pending_swaps;
    let &(bucket, gen) = pending.first().expect("a compaction is listed");
    // The merge renamed it into place; put a copy back where a lost
    // rename would have left it.
    let placed = super::lock(&e.buckets).path(bucket);
    let compact = src.path().join("compact");
    fs::create_dir_all(&compact).unwrap();
    let name = format!("{bucket:08x}.{gen:016x}.next");
    fs::copy(&placed, compact.join(&name)).unwrap();
    let mut snap = Vec::new();
    e.write_snapshot(&mut snap).unwrap();
    let paths: Vec<String> = landmarks(&snap)
        .into_iter()
        .filter_map(|(what, _)| what.strip_suffix(": path").map(str::to_owned))
        .collect();
    assert!(paths.contains(&format!("compact/{name}")), "{paths:?}");

    let parent = tempfile::tempdir().unwrap();
    let dir = parent.path().join("shard");
    Engine::install_snapshot(&dir, &mut &snap[..]).unwrap();
    let mut t = Engine::open_replicated(&dir, config()).unwrap();
    assert!(!dir.join("compact").join(&name).exists(), "swapped in");
    assert_eq!(state(&mut t), state(&mut e));
}
