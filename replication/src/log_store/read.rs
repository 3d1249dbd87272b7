//! Reading entries: from the cache, or from the segments at the offsets
//! the index keeps, outside the lock (consecutive frames with one
//! `pread`), checking each frame is the entry asked for.

use super::{
    frame::decode_frame,
    state::{Shared, Slot},
    LogStoreError,
};
use openraft::{RaftLogId, RaftTypeConfig};
use serde::de::DeserializeOwned;
use std::{
    fs::File,
    ops::{Bound, RangeBounds},
    os::unix::fs::FileExt,
    sync::Arc,
};

/// Most bytes read from a segment with one `pread`.
const READ_SPAN_BYTES_MAX: u64 = 4 * 1024 * 1024;

/// Most times a read is retried because a truncation or purge moved the
/// entries it was reading.
const READ_ATTEMPTS_MAX: usize = 8;

/// `range` as `start..end`.
fn bounds(range: &impl RangeBounds<u64>) -> (u64, u64) {
    let start = match range.start_bound() {
        Bound::Included(&s) => s,
        Bound::Excluded(&s) => s.saturating_add(1),
        Bound::Unbounded => 0,
    };
    let end = match range.end_bound() {
        Bound::Included(&e) => e.saturating_add(1),
        Bound::Excluded(&e) => e,
        Bound::Unbounded => u64::MAX,
    };
    (start, end)
}

/// Read the entries of `range` that exist: from the cache, else from the
/// segments (outside the lock). A read during which a truncation or purge
/// moved the entries is done again.
pub(super) fn read_entries<C>(
    shared: &Shared<C>,
    range: impl RangeBounds<u64>,
) -> Result<Vec<C::Entry>, LogStoreError>
where
    C: RaftTypeConfig,
    C::Entry: DeserializeOwned + Clone,
{
    let (start, end) = bounds(&range);
    let mut attempt = 0;
    loop {
        let (slots, generation) = {
            let state = shared.lock();
            let slots = state
                .collect(start, end)
                .map_err(|index| LogStoreError::BadRead {
                    index,
                    reason: "its segment file is not open".into(),
                })?;
            (slots, state.generation)
        };
        let result = resolve::<C>(slots, shared.config.entry_bytes_max);
        attempt += 1;
        // Unmoved meanwhile: the entries are those of one moment (or the
        // error is real). Moved: read again, a few times at most.
        if shared.lock().generation == generation || attempt >= READ_ATTEMPTS_MAX {
            return result;
        }
    }
}

/// Turn slots into entries, reading disk slots in spans.
fn resolve<C>(
    slots: Vec<Slot<C::Entry>>,
    entry_bytes_max: u32,
) -> Result<Vec<C::Entry>, LogStoreError>
where
    C: RaftTypeConfig,
    C::Entry: DeserializeOwned,
{
    let mut out = Vec::with_capacity(slots.len());
    let mut span: Vec<(u64, u32)> = Vec::new(); // (index, frame bytes)
    let mut span_file: Option<(Arc<File>, u64)> = None; // file, start offset
    for slot in slots {
        match slot {
            Slot::Ready(entry) => {
                flush_span::<C>(&mut span, &mut span_file, entry_bytes_max, &mut out)?;
                out.push(entry);
            }
            Slot::Disk {
                index,
                file,
                offset,
                frame_bytes,
            } => {
                let joins = span_file.as_ref().is_some_and(|(f, s)| {
                    let len: u64 = span.iter().map(|&(_, b)| u64::from(b)).sum();
                    Arc::ptr_eq(f, &file)
                        && s + len == offset
                        && len + u64::from(frame_bytes) <= READ_SPAN_BYTES_MAX
                });
                if !joins {
                    flush_span::<C>(&mut span, &mut span_file, entry_bytes_max, &mut out)?;
                    span_file = Some((file, offset));
                }
                span.push((index, frame_bytes));
            }
        }
    }
    flush_span::<C>(&mut span, &mut span_file, entry_bytes_max, &mut out)?;
    Ok(out)
}

/// Read a span of consecutive frames with one `pread` and decode them.
fn flush_span<C>(
    span: &mut Vec<(u64, u32)>,
    span_file: &mut Option<(Arc<File>, u64)>,
    entry_bytes_max: u32,
    out: &mut Vec<C::Entry>,
) -> Result<(), LogStoreError>
where
    C: RaftTypeConfig,
    C::Entry: DeserializeOwned,
{
    let Some((file, start)) = span_file.take() else {
        return Ok(());
    };
    let len: u64 = span.iter().map(|&(_, b)| u64::from(b)).sum();
    let mut buf = vec![0; len as usize];
    let first = span.first().map_or(0, |&(i, _)| i);
    file.read_exact_at(&mut buf, start)
        .map_err(|e| LogStoreError::BadRead {
            index: first,
            reason: e.to_string(),
        })?;
    let mut at = 0;
    for (index, frame_bytes) in span.drain(..) {
        let frame = &buf[at..at + frame_bytes as usize];
        out.push(decode_entry::<C>(index, frame, entry_bytes_max)?);
        at += frame_bytes as usize;
    }
    Ok(())
}

/// Decode the frame of entry `index`, checking it is that entry.
fn decode_entry<C>(
    index: u64,
    frame: &[u8],
    entry_bytes_max: u32,
) -> Result<C::Entry, LogStoreError>
where
    C: RaftTypeConfig,
    C::Entry: DeserializeOwned,
{
    let bad = |reason: String| LogStoreError::BadRead { index, reason };
    let (body, len) = decode_frame(frame, entry_bytes_max).map_err(|e| bad(e.to_string()))?;
    if len != frame.len() {
        return Err(bad(format!(
            "frame is {len} bytes, expected {}",
            frame.len()
        )));
    }
    let entry: C::Entry = postcard::from_bytes(body).map_err(|e| bad(e.to_string()))?;
    let got = entry.get_log_id().index;
    if got != index {
        return Err(bad(format!("found entry {got} instead")));
    }
    Ok(entry)
}
