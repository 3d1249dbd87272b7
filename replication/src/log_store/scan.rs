//! Opening a log directory: read the small files, check every segment
//! frame by frame, and only if all is well cut a torn tail and remove the
//! segments a purge left behind.

use super::{
    frame::{decode_frame, read_meta, sync_dir, FRAME_HEADER_BYTES},
    metric,
    state::{Loc, State},
    LogStoreConfig, LogStoreError, METRIC_TORN_TAILS,
};
use openraft::{CommittedLeaderId, LogId, RaftLogId, RaftTypeConfig};
use serde::de::DeserializeOwned;
use std::{
    fs::{self, File, OpenOptions},
    path::{Path, PathBuf},
    sync::Arc,
};

type NodeIdOf<C> = <C as RaftTypeConfig>::NodeId;

/// Digits of a segment's first index in its file name.
const SEGMENT_NAME_DIGITS: usize = 20;

/// A segment file's name: its first index, 20 digits, `.seg`.
pub(super) fn segment_name(first: u64) -> String {
    format!("{first:0SEGMENT_NAME_DIGITS$}.seg")
}

/// A valid frame found in a segment.
struct Frame<NID: openraft::NodeId> {
    index: u64,
    leader: CommittedLeaderId<NID>,
    offset: u64,
    frame_bytes: u32,
}

/// A segment as read: its frames, and where a torn tail starts.
struct Segment<NID: openraft::NodeId> {
    first: u64,
    path: PathBuf,
    frames: Vec<Frame<NID>>,
    torn_at: Option<u64>,
}

impl<NID: openraft::NodeId> Segment<NID> {
    /// Bytes of valid frames.
    fn valid_bytes(&self) -> u64 {
        self.frames
            .last()
            .map_or(0, |f| f.offset + u64::from(f.frame_bytes))
    }
}

/// A log read from disk.
pub(super) struct Opened<C: RaftTypeConfig> {
    pub state: State<C>,
    /// Torn tails cut off (0 or 1).
    pub torn_tails: u64,
}

/// Open the log in `dir` (created if missing).
pub(super) fn open_dir<C>(dir: &Path, config: &LogStoreConfig) -> Result<Opened<C>, LogStoreError>
where
    C: RaftTypeConfig,
    C::Entry: DeserializeOwned,
{
    fs::create_dir_all(dir).map_err(|e| LogStoreError::io("create", dir, e))?;
    let purged: Option<LogId<NodeIdOf<C>>> = read_meta(dir, "purged")?;
    let vote = read_meta(dir, "vote")?;
    // A hint written without a sync (see the writer): a torn one is no id.
    let committed: Option<LogId<NodeIdOf<C>>> = match read_meta(dir, "committed") {
        Ok(c) => c.flatten(),
        Err(e) => {
            tracing::warn!(error = %e, "Raft log: the committed hint is unreadable; ignoring it");
            None
        }
    };
    let mut segments = scan_segments::<C>(&list_segments(dir)?, config.entry_bytes_max)?;
    check_purged_gap(&segments, purged.as_ref())?;
    // Nothing was changed on disk up to here.
    let torn_tails = repair(dir, &mut segments, purged.as_ref())?;
    metrics::counter!(metric(config, METRIC_TORN_TAILS)).increment(torn_tails);
    let mut state = State::new(purged.clone(), vote, committed, config);
    for seg in segments {
        add_segment(&mut state, seg, purged.as_ref())?;
    }
    clamp_committed(&mut state);
    Ok(Opened { state, torn_tails })
}

/// The segment files of `dir` by first index.
fn list_segments(dir: &Path) -> Result<Vec<(u64, PathBuf)>, LogStoreError> {
    let mut out = Vec::new();
    let entries = fs::read_dir(dir).map_err(|e| LogStoreError::io("list", dir, e))?;
    for entry in entries {
        let entry = entry.map_err(|e| LogStoreError::io("list", dir, e))?;
        let name = entry.file_name();
        let Some(stem) = name.to_str().and_then(|n| n.strip_suffix(".seg")) else {
            continue;
        };
        let first = (stem.len() == SEGMENT_NAME_DIGITS && stem.bytes().all(|b| b.is_ascii_digit()))
            .then(|| stem.parse::<u64>().ok())
            .flatten();
        let Some(first) = first else {
            let why = "segment file name is not <20 digits>.seg";
            return Err(LogStoreError::damaged(entry.path(), 0, why));
        };
        out.push((first, entry.path()));
    }
    out.sort_unstable_by_key(|(first, _)| *first);
    Ok(out)
}

/// Read and check every segment, in order.
fn scan_segments<C>(
    names: &[(u64, PathBuf)],
    entry_bytes_max: u32,
) -> Result<Vec<Segment<NodeIdOf<C>>>, LogStoreError>
where
    C: RaftTypeConfig,
    C::Entry: DeserializeOwned,
{
    let mut out: Vec<Segment<NodeIdOf<C>>> = Vec::with_capacity(names.len());
    for (k, (first, path)) in names.iter().enumerate() {
        if let Some(prev) = out.last() {
            let Some(last) = prev.frames.last() else {
                let why = "segment without entries before the last segment";
                return Err(LogStoreError::damaged(&prev.path, 0, why));
            };
            if *first != last.index + 1 {
                let why = format!(
                    "segment starts at index {first} but the one before ends at {}",
                    last.index
                );
                return Err(LogStoreError::damaged(path, 0, why));
            }
        }
        let data = fs::read(path).map_err(|e| LogStoreError::io("read", path, e))?;
        let is_last = k + 1 == names.len();
        out.push(scan_segment::<C>(
            path,
            *first,
            &data,
            entry_bytes_max,
            is_last,
        )?);
    }
    Ok(out)
}

/// Read and check one segment's frames.
fn scan_segment<C>(
    path: &Path,
    first: u64,
    data: &[u8],
    entry_bytes_max: u32,
    is_last: bool,
) -> Result<Segment<NodeIdOf<C>>, LogStoreError>
where
    C: RaftTypeConfig,
    C::Entry: DeserializeOwned,
{
    let mut seg = Segment {
        first,
        path: path.to_path_buf(),
        frames: Vec::new(),
        torn_at: None,
    };
    let mut offset = 0;
    while offset < data.len() {
        let bad = match decode_frame(&data[offset..], entry_bytes_max) {
            Ok((body, frame_bytes)) => {
                let frame = check_entry::<C>(&seg, body, offset as u64, frame_bytes)?;
                seg.frames.push(frame);
                offset += frame_bytes;
                continue;
            }
            Err(bad) => bad,
        };
        if is_last && !valid_frame_after(data, offset + 1, entry_bytes_max) {
            seg.torn_at = Some(offset as u64);
            break;
        }
        let why = if is_last {
            format!("{bad}, with a valid frame after it")
        } else {
            format!("{bad}, in a segment before the last")
        };
        return Err(LogStoreError::damaged(path, offset as u64, why));
    }
    Ok(seg)
}

/// Decode a frame's entry and check it follows the segment's last.
fn check_entry<C>(
    seg: &Segment<NodeIdOf<C>>,
    body: &[u8],
    offset: u64,
    frame_bytes: usize,
) -> Result<Frame<NodeIdOf<C>>, LogStoreError>
where
    C: RaftTypeConfig,
    C::Entry: DeserializeOwned,
{
    let entry: C::Entry = postcard::from_bytes(body).map_err(|e| {
        let why = format!("frame's CRC holds but its entry does not decode: {e}");
        LogStoreError::damaged(&seg.path, offset, why)
    })?;
    let id = entry.get_log_id();
    let want = seg.frames.last().map_or(seg.first, |f| f.index + 1);
    if id.index != want {
        let why = format!("entry has index {}, expected {want}", id.index);
        return Err(LogStoreError::damaged(&seg.path, offset, why));
    }
    Ok(Frame {
        index: id.index,
        leader: id.leader_id.clone(),
        offset,
        frame_bytes: frame_bytes as u32,
    })
}

/// Whether a valid frame starts anywhere in `data` from `from` on.
fn valid_frame_after(data: &[u8], from: usize, entry_bytes_max: u32) -> bool {
    let end = data.len().saturating_sub(FRAME_HEADER_BYTES);
    (from..=end).any(|o| decode_frame(&data[o..], entry_bytes_max).is_ok())
}

/// The entries after the last purged id must start right after it.
fn check_purged_gap<NID: openraft::NodeId>(
    segments: &[Segment<NID>],
    purged: Option<&LogId<NID>>,
) -> Result<(), LogStoreError> {
    let (Some(purged), Some(seg)) = (purged, segments.first()) else {
        return Ok(());
    };
    match seg.frames.first() {
        Some(f) if f.index > purged.index.saturating_add(1) => {
            let why = format!(
                "entries start at index {} but only up to {} were purged",
                f.index, purged.index
            );
            Err(LogStoreError::damaged(&seg.path, 0, why))
        }
        _ => Ok(()),
    }
}

/// Cut a torn tail (or remove a last segment left without entries) and
/// remove the segments wholly at or below `purged`. Returns the torn
/// tails cut (0 or 1).
fn repair<NID: openraft::NodeId>(
    dir: &Path,
    segments: &mut Vec<Segment<NID>>,
    purged: Option<&LogId<NID>>,
) -> Result<u64, LogStoreError> {
    let mut removed = false;
    let mut torn_tails = 0;
    if let Some(seg) = segments.last() {
        if let Some(at) = seg.torn_at {
            tracing::warn!(file = %seg.path.display(), offset = at, "Raft log: cutting a torn last write");
            torn_tails = 1;
        }
        if seg.frames.is_empty() {
            remove(&seg.path)?;
            segments.pop();
            removed = true;
        } else if seg.torn_at.is_some() {
            cut(&seg.path, seg.valid_bytes())?;
        }
    }
    while let Some(seg) = segments.first() {
        let next_first = segments.get(1).map(|s| s.first);
        let last_index = seg.frames.last().map_or(0, |f| f.index);
        let wholly = match (purged, next_first) {
            (None, _) => false,
            (Some(p), Some(next)) => next <= p.index.saturating_add(1),
            (Some(p), None) => last_index <= p.index,
        };
        if !wholly {
            break;
        }
        remove(&seg.path)?;
        segments.remove(0);
        removed = true;
    }
    if removed {
        sync_dir(dir).map_err(|e| LogStoreError::io("sync", dir, e))?;
    }
    Ok(torn_tails)
}

fn remove(path: &Path) -> Result<(), LogStoreError> {
    fs::remove_file(path).map_err(|e| LogStoreError::io("remove", path, e))
}

/// Cut `path` to `len` bytes, durably.
fn cut(path: &Path, len: u64) -> Result<(), LogStoreError> {
    let file = OpenOptions::new()
        .write(true)
        .open(path)
        .map_err(|e| LogStoreError::io("open", path, e))?;
    file.set_len(len)
        .and_then(|()| file.sync_data())
        .map_err(|e| LogStoreError::io("cut", path, e))
}

/// Open a checked segment and add it and its entries above `purged`.
fn add_segment<C: RaftTypeConfig>(
    state: &mut State<C>,
    seg: Segment<NodeIdOf<C>>,
    purged: Option<&LogId<NodeIdOf<C>>>,
) -> Result<(), LogStoreError> {
    let file = File::options()
        .read(true)
        .write(true)
        .open(&seg.path)
        .map_err(|e| LogStoreError::io("open", &seg.path, e))?;
    let id = state.add_segment(seg.first, seg.valid_bytes(), Arc::new(file));
    for f in seg.frames {
        if purged.is_some_and(|p| f.index <= p.index) {
            continue;
        }
        let loc = Loc {
            seg: id,
            offset: f.offset,
            frame_bytes: f.frame_bytes,
        };
        state.push_loc(LogId::new(f.leader, f.index), loc);
    }
    Ok(())
}

/// A committed id past the last entry (its entries were lost with an
/// unsynced tail, under a relaxed fsync policy) is lowered to the last
/// entry: every entry up to it was committed, and a lower committed id
/// only means fewer entries re-applied at start.
fn clamp_committed<C: RaftTypeConfig>(state: &mut State<C>) {
    let last = state.last_log_id();
    let Some(committed) = state.committed.clone() else {
        return;
    };
    if last.as_ref().is_none_or(|l| committed.index > l.index) {
        tracing::warn!(
            committed = %committed,
            last = ?last,
            "Raft log: the saved committed id is past the last entry; lowering it"
        );
        state.committed = last;
    }
}
