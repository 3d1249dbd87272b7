//! Torn tails are cut; any other damage fails `open`, naming the file and
//! offset, with nothing on disk changed.

use super::{append_flushed, config, entry, open, runtime, LogStoreConfig, Store, TestConfig};
use crate::{log_store::LogStoreError, FsyncPolicy};
use openraft::Entry;
use proptest::prelude::*;
use std::{
    collections::BTreeMap,
    fs,
    path::{Path, PathBuf},
};

/// Segments of about three entries each.
fn small_segments() -> LogStoreConfig {
    config(FsyncPolicy::Always, 60, 0)
}

/// Write entries 1..=n (each `pad` bytes of padding) and close.
fn write_log(dir: &Path, n: u64, pad: usize, config: &LogStoreConfig) {
    runtime().block_on(async {
        let mut store = open(dir, config);
        for i in 1..=n {
            append_flushed(&mut store, vec![entry(1, i, pad)]).await;
        }
        store.close().await;
    });
}

/// Segment files in order.
fn segments(dir: &Path) -> Vec<PathBuf> {
    let mut out: Vec<PathBuf> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "seg"))
        .collect();
    out.sort();
    out
}

/// Every file's bytes.
fn snapshot(dir: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
    let files = fs::read_dir(dir).unwrap().map(|e| e.unwrap().path());
    files.map(|p| (p.clone(), fs::read(p).unwrap())).collect()
}

/// Offsets of the frames of a segment file.
fn frame_offsets(path: &Path) -> Vec<usize> {
    let data = fs::read(path).unwrap();
    let mut out = Vec::new();
    let mut at = 0;
    while at + 8 <= data.len() {
        out.push(at);
        let len = u32::from_le_bytes(data[at..at + 4].try_into().unwrap()) as usize;
        at += 8 + len;
    }
    out
}

fn flip(path: &Path, at: usize) {
    let mut data = fs::read(path).unwrap();
    data[at] ^= 0x40;
    fs::write(path, data).unwrap();
}

fn indexes(store: &Store) -> Vec<u64> {
    store
        .read(..)
        .unwrap()
        .iter()
        .map(|e| e.log_id.index)
        .collect()
}

/// Open, expecting damage in `file` at `offset`, with nothing changed.
fn assert_damaged(dir: &Path, config: &LogStoreConfig, file: &Path, offset: u64) {
    let before = snapshot(dir);
    match Store::open(dir, config.clone()) {
        Err(LogStoreError::Damaged {
            file: f, offset: o, ..
        }) => assert_eq!((f.as_path(), o), (file, offset)),
        Err(e) => panic!("expected damage, got {e}"),
        Ok(_) => panic!("expected damage, opened"),
    }
    assert_eq!(snapshot(dir), before, "files changed");
}

/// Reopen after tearing the last frame (of entry `n`): only it is gone,
/// its segment is cut (or removed if it held only that frame), the next
/// open finds nothing to cut, and appending goes on.
fn assert_only_last_dropped(dir: &Path, n: u64, last: &Path, frames: &[usize]) {
    let config = small_segments();
    let store = open(dir, &config);
    assert_eq!(store.torn_tails_total(), 1);
    assert_eq!(indexes(&store), (1..n).collect::<Vec<_>>());
    match frames {
        [_] => assert!(!last.exists(), "a segment left empty is removed"),
        _ => {
            let cut_at = *frames.last().unwrap() as u64;
            assert_eq!(
                fs::metadata(last).unwrap().len(),
                cut_at,
                "cut at the torn frame"
            );
        }
    }
    runtime().block_on(async move {
        let mut store = store;
        append_flushed(&mut store, vec![entry(2, n, 4)]).await;
        store.close().await;
    });
    let store = open(dir, &config);
    assert_eq!(store.torn_tails_total(), 0);
    assert_eq!(indexes(&store), (1..=n).collect::<Vec<_>>());
}

#[test]
fn a_last_frame_cut_short_is_dropped_alone() {
    // 10: the last segment holds only that frame; 11: two frames.
    for (n, cut) in [(10, 1), (11, 1), (11, 3), (11, 8), (10, 8)] {
        let dir = tempfile::tempdir().unwrap();
        write_log(dir.path(), n, 4, &small_segments());
        assert!(segments(dir.path()).len() >= 3, "several segments");
        let last = segments(dir.path()).pop().unwrap();
        let frames = frame_offsets(&last);
        let len = fs::metadata(&last).unwrap().len();
        let torn = *frames.last().unwrap() as u64;
        // Cut within the body (1, 3 bytes off) or leave part of the header.
        let keep = if cut == 8 { torn + 5 } else { len - cut };
        fs::File::options()
            .write(true)
            .open(&last)
            .unwrap()
            .set_len(keep)
            .unwrap();
        assert_only_last_dropped(dir.path(), n, &last, &frames);
    }
}

#[test]
fn a_flipped_byte_in_the_last_frame_drops_it_alone() {
    for (n, at_header) in [(11, false), (11, true), (10, false)] {
        let dir = tempfile::tempdir().unwrap();
        write_log(dir.path(), n, 4, &small_segments());
        let last = segments(dir.path()).pop().unwrap();
        let frames = frame_offsets(&last);
        let torn = *frames.last().unwrap();
        flip(&last, if at_header { torn + 1 } else { torn + 10 });
        assert_only_last_dropped(dir.path(), n, &last, &frames);
    }
}

#[test]
fn zeros_after_the_last_frame_are_a_torn_tail() {
    let dir = tempfile::tempdir().unwrap();
    write_log(dir.path(), 10, 4, &small_segments());
    let last = segments(dir.path()).pop().unwrap();
    let mut data = fs::read(&last).unwrap();
    let len = data.len() as u64;
    data.extend_from_slice(&[0; 100]);
    fs::write(&last, data).unwrap();
    let store = open(dir.path(), &small_segments());
    assert_eq!(indexes(&store), (1..=10).collect::<Vec<_>>());
    assert_eq!(fs::metadata(&last).unwrap().len(), len);
}

#[test]
fn a_last_frame_over_entry_bytes_max_is_a_torn_tail() {
    let dir = tempfile::tempdir().unwrap();
    let config = small_segments();
    write_log(dir.path(), 9, 4, &config);
    runtime().block_on(async {
        let mut store = open(dir.path(), &config);
        append_flushed(&mut store, vec![entry(1, 10, 500)]).await;
        store.close().await;
    });
    let strict = LogStoreConfig {
        entry_bytes_max: 100,
        ..config
    };
    let store = open(dir.path(), &strict);
    assert_eq!(indexes(&store), (1..=9).collect::<Vec<_>>());
}

#[test]
fn a_flipped_byte_before_valid_frames_fails_open_and_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let config = config(FsyncPolicy::Always, 200, 0);
    write_log(dir.path(), 16, 4, &config);
    let segs = segments(dir.path());
    assert!(segs.len() >= 2);
    // In the last segment, with valid frames after it.
    let last = segs.last().unwrap();
    let offsets = frame_offsets(last);
    assert!(offsets.len() >= 3);
    flip(last, offsets[1] + 9);
    assert_damaged(dir.path(), &config, last, offsets[1] as u64);
    flip(last, offsets[1] + 9);
    // In a segment before the last: its last frame.
    let first = &segs[0];
    let offsets = frame_offsets(first);
    let at = *offsets.last().unwrap();
    flip(first, at + 3);
    assert_damaged(dir.path(), &config, first, at as u64);
}

#[test]
fn a_missing_segment_fails_open() {
    let dir = tempfile::tempdir().unwrap();
    write_log(dir.path(), 10, 4, &small_segments());
    let segs = segments(dir.path());
    fs::remove_file(&segs[1]).unwrap();
    assert_damaged(dir.path(), &small_segments(), &segs[2], 0);
}

#[test]
fn an_index_going_backwards_fails_open() {
    let dir = tempfile::tempdir().unwrap();
    write_log(dir.path(), 9, 4, &small_segments());
    let segs = segments(dir.path());
    let last = segs.last().unwrap();
    let data = fs::read(last).unwrap();
    let offsets = frame_offsets(last);
    // Repeat the segment's first frame after its last: a valid frame.
    let mut bad = data.clone();
    bad.extend_from_slice(&data[..offsets[1]]);
    fs::write(last, bad).unwrap();
    assert_damaged(dir.path(), &small_segments(), last, data.len() as u64);
}

#[test]
fn a_damaged_vote_file_fails_open() {
    let dir = tempfile::tempdir().unwrap();
    runtime().block_on(async {
        let mut store = open(dir.path(), &small_segments());
        store.write_vote(&openraft::Vote::new(3, 1)).await.unwrap();
        store.close().await;
    });
    let vote = dir.path().join("vote");
    flip(&vote, 9);
    assert_damaged(dir.path(), &small_segments(), &vote, 0);
}

/// Entries 1..=n as written by `write_log`.
fn written(n: u64) -> Vec<Entry<TestConfig>> {
    (1..=n).map(|i| entry(1, i, 4)).collect()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    /// Whatever happens to the last segment's bytes, opening never panics;
    /// it either fails with nothing changed, or reads back a prefix of
    /// what was written (never an entry that was not).
    #[test]
    fn arbitrary_damage_never_panics_nor_invents_entries(
        n in 0u64..8,
        flips in proptest::collection::vec((any::<prop::sample::Index>(), 1u8..=255), 0..3),
        tail in proptest::collection::vec(any::<u8>(), 0..40),
        cut in any::<prop::sample::Index>(),
        do_cut in any::<bool>(),
    ) {
        let dir = tempfile::tempdir().unwrap();
        let config = config(FsyncPolicy::Never, 1 << 20, 0);
        write_log(dir.path(), n, 4, &config);
        let path = segments(dir.path()).pop()
            .unwrap_or_else(|| dir.path().join("00000000000000000001.seg"));
        let mut data = fs::read(&path).unwrap_or_default();
        data.extend_from_slice(&tail);
        for (at, mask) in &flips {
            if !data.is_empty() {
                let i = at.index(data.len());
                data[i] ^= mask;
            }
        }
        if do_cut && !data.is_empty() {
            data.truncate(cut.index(data.len()));
        }
        fs::write(&path, &data).unwrap();
        let before = snapshot(dir.path());
        match Store::open(dir.path(), config) {
            Ok(store) => {
                let got = store.read(..).unwrap();
                let want = written(n);
                prop_assert!(got.len() <= want.len());
                prop_assert_eq!(&got[..], &want[..got.len()]);
            }
            Err(LogStoreError::Damaged { .. }) => prop_assert_eq!(snapshot(dir.path()), before),
            Err(e) => prop_assert!(false, "unexpected error {e}"),
        }
    }
}
