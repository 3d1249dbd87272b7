//! The write-ahead log: the shard's durability point.
//!
//! A sequence of segment files `wal/<16 hex digits>.log`, each a 32-byte
//! header followed by checked frames (see codec.rs). Appends of a batch are
//! written with one `write` and made durable with one `fdatasync` (group
//! commit). A checkpoint starts a new segment; once the checkpoint is in the
//! index, older segments are deleted.

use super::codec::{
    begin_frame, finish_frame, le_u64, read_frame, FrameFault, MessageHeader, MESSAGE_HEADER_BYTES,
};
use crate::Result;
use std::{
    fs::{self, File, OpenOptions},
    io::Write,
    path::{Path, PathBuf},
};

pub const SEGMENT_HEADER_BYTES: usize = 32;
const SEGMENT_MAGIC: &[u8; 8] = b"IMWAL\0\0\x01";
const KIND_APPEND: u8 = 1;
const KIND_ACK: u8 = 2;

/// One logged operation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Entry<'a> {
    Append {
        header: MessageHeader,
        payload: &'a [u8],
    },
    Ack {
        user: u64,
        up_to_seq: u64,
    },
}

pub fn encode_append(header: &MessageHeader, payload: &[u8], out: &mut Vec<u8>) {
    let at = begin_frame(out);
    out.push(KIND_APPEND);
    header.encode(out);
    out.extend_from_slice(payload);
    finish_frame(out, at);
}

pub fn encode_ack(user: u64, up_to_seq: u64, out: &mut Vec<u8>) {
    let at = begin_frame(out);
    out.push(KIND_ACK);
    out.extend_from_slice(&user.to_le_bytes());
    out.extend_from_slice(&up_to_seq.to_le_bytes());
    finish_frame(out, at);
}

/// Decode one entry body (after the checked frame header).
pub fn decode_entry(body: &[u8]) -> Option<Entry<'_>> {
    let (&kind, rest) = body.split_first()?;
    match kind {
        KIND_APPEND => Some(Entry::Append {
            header: MessageHeader::decode(rest)?,
            payload: &rest[MESSAGE_HEADER_BYTES..],
        }),
        KIND_ACK if rest.len() == 16 => Some(Entry::Ack {
            user: le_u64(&rest[0..8]),
            up_to_seq: le_u64(&rest[8..16]),
        }),
        _ => None,
    }
}

fn segment_header(segment: u64) -> [u8; SEGMENT_HEADER_BYTES] {
    let mut h = [0u8; SEGMENT_HEADER_BYTES];
    h[0..8].copy_from_slice(SEGMENT_MAGIC);
    h[8..16].copy_from_slice(&segment.to_le_bytes());
    let crc = crc32c::crc32c(&h[..28]);
    h[28..32].copy_from_slice(&crc.to_le_bytes());
    h
}

fn segment_path(dir: &Path, segment: u64) -> PathBuf {
    dir.join(format!("{segment:016x}.log"))
}

/// Segment numbers present in `dir`, ascending.
pub fn list_segments(dir: &Path) -> Result<Vec<u64>> {
    let mut out = Vec::new();
    for entry in fs::read_dir(dir)? {
        let name = entry?.file_name();
        let name = name.to_string_lossy();
        if let Some(hex) = name.strip_suffix(".log") {
            if let Ok(n) = u64::from_str_radix(hex, 16) {
                out.push(n);
            }
        }
    }
    out.sort_unstable();
    Ok(out)
}

pub fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir)?.sync_all()?;
    Ok(())
}

/// How a segment's replay ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SegmentEnd {
    /// Every byte was a valid entry.
    Clean,
    /// The valid entries end at this offset; the rest was cut off.
    Torn { valid_bytes: u64, fault: FrameFault },
}

/// Replay the entries of one segment into `apply`, then cut off a torn or
/// corrupt tail so new entries never follow garbage.
pub fn replay_segment(
    dir: &Path,
    segment: u64,
    entry_bytes_max: usize,
    mut apply: impl FnMut(Entry<'_>) -> Result<()>,
) -> Result<SegmentEnd> {
    let path = segment_path(dir, segment);
    let bytes = fs::read(&path)?;
    let mut at = SEGMENT_HEADER_BYTES;
    let end = if bytes.get(..SEGMENT_HEADER_BYTES) != Some(&segment_header(segment)[..]) {
        at = 0;
        SegmentEnd::Torn {
            valid_bytes: 0,
            fault: FrameFault::BadChecksum,
        }
    } else {
        loop {
            if at == bytes.len() {
                break SegmentEnd::Clean;
            }
            match read_frame(&bytes, at, entry_bytes_max) {
                Ok(body) => match decode_entry(body) {
                    Some(entry) => {
                        apply(entry)?;
                        at += super::codec::FRAME_HEADER_BYTES + body.len();
                    }
                    None => {
                        break SegmentEnd::Torn {
                            valid_bytes: at as u64,
                            fault: FrameFault::BadLength,
                        }
                    }
                },
                Err(fault) => {
                    break SegmentEnd::Torn {
                        valid_bytes: at as u64,
                        fault,
                    }
                }
            }
        }
    };
    if let SegmentEnd::Torn { .. } = end {
        if at == 0 {
            fs::remove_file(&path)?;
        } else {
            let f = OpenOptions::new().write(true).open(&path)?;
            f.set_len(at as u64)?;
            f.sync_all()?;
        }
    }
    Ok(end)
}

/// A failed log write.
#[derive(Debug)]
pub struct WriteFailed {
    pub error: std::io::Error,
    /// The segment was cut back to its last whole entry.
    pub log_intact: bool,
}

/// The segment being appended to.
pub struct Wal {
    dir: PathBuf,
    segment: u64,
    file: File,
    /// Bytes in the current segment, header included.
    segment_bytes: u64,
    /// Entry bytes written since the last successful checkpoint.
    pub bytes_since_checkpoint: u64,
}

impl Wal {
    /// Start a new segment numbered `segment` (creating `dir` if needed).
    pub fn create(dir: &Path, segment: u64) -> Result<Wal> {
        fs::create_dir_all(dir)?;
        let file = new_segment(dir, segment)?;
        Ok(Wal {
            dir: dir.to_path_buf(),
            segment,
            file,
            segment_bytes: SEGMENT_HEADER_BYTES as u64,
            bytes_since_checkpoint: 0,
        })
    }

    /// Append `bytes` (whole entries). On failure the segment is cut back to
    /// where it was, so a later append never follows a partial entry; if
    /// even that fails, `log_intact` is false and the caller must stop
    /// writing.
    pub fn write(&mut self, bytes: &[u8]) -> Result<(), WriteFailed> {
        if let Err(error) = self.file.write_all(bytes) {
            let log_intact = self.file.set_len(self.segment_bytes).is_ok();
            return Err(WriteFailed { error, log_intact });
        }
        self.segment_bytes += bytes.len() as u64;
        self.bytes_since_checkpoint += bytes.len() as u64;
        Ok(())
    }

    pub fn sync(&mut self) -> std::io::Result<()> {
        self.file.sync_data()
    }

    /// Sync the current segment and continue in a new one; returns the new
    /// segment's number.
    pub fn rotate(&mut self) -> Result<u64> {
        self.file.sync_data()?;
        let next = self.segment + 1;
        self.file = new_segment(&self.dir, next)?;
        self.segment = next;
        self.segment_bytes = SEGMENT_HEADER_BYTES as u64;
        Ok(next)
    }

    /// Delete every segment older than `keep_from`.
    pub fn remove_before(&self, keep_from: u64) -> Result<()> {
        for seg in list_segments(&self.dir)? {
            if seg < keep_from {
                fs::remove_file(segment_path(&self.dir, seg))?;
            }
        }
        Ok(())
    }
}

fn new_segment(dir: &Path, segment: u64) -> Result<File> {
    let path = segment_path(dir, segment);
    let mut file = OpenOptions::new()
        .create(true)
        .truncate(true)
        .write(true)
        .open(&path)?;
    file.write_all(&segment_header(segment))?;
    file.sync_all()?;
    sync_dir(dir)?;
    let file = OpenOptions::new().append(true).open(&path)?;
    Ok(file)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn header(seq: u64) -> MessageHeader {
        MessageHeader {
            user: 5,
            seq,
            timestamp_ms: 9,
            msg_id: 77,
        }
    }

    fn collect(dir: &Path, seg: u64) -> (Vec<(u64, Vec<u8>)>, SegmentEnd) {
        let mut got = Vec::new();
        let end = replay_segment(dir, seg, 1 << 20, |e| {
            match e {
                Entry::Append { header, payload } => got.push((header.seq, payload.to_vec())),
                Entry::Ack { up_to_seq, .. } => got.push((up_to_seq, b"ack".to_vec())),
            }
            Ok(())
        })
        .unwrap();
        (got, end)
    }

    #[test]
    fn torn_tail_is_cut_and_never_replayed() {
        let dir = tempfile::tempdir().unwrap();
        let mut wal = Wal::create(dir.path(), 1).unwrap();
        let mut buf = Vec::new();
        encode_append(&header(1), b"one", &mut buf);
        encode_ack(5, 1, &mut buf);
        encode_append(&header(2), b"two", &mut buf);
        let whole = buf.len();
        wal.write(&buf[..whole - 2]).unwrap(); // the last entry is torn
        drop(wal);
        let (got, end) = collect(dir.path(), 1);
        assert_eq!(got, vec![(1, b"one".to_vec()), (1, b"ack".to_vec())]);
        assert!(matches!(
            end,
            SegmentEnd::Torn {
                fault: FrameFault::Truncated,
                ..
            }
        ));
        // The cut is persistent: a second replay is clean.
        let (again, end) = collect(dir.path(), 1);
        assert_eq!(again, got);
        assert_eq!(end, SegmentEnd::Clean);
    }

    #[test]
    fn bit_flip_in_the_tail_stops_replay_there() {
        let dir = tempfile::tempdir().unwrap();
        let mut wal = Wal::create(dir.path(), 3).unwrap();
        let mut buf = Vec::new();
        encode_append(&header(1), b"one", &mut buf);
        let first = buf.len();
        encode_append(&header(2), b"two", &mut buf);
        buf[first + 12] ^= 0x10;
        wal.write(&buf).unwrap();
        drop(wal);
        let (got, end) = collect(dir.path(), 3);
        assert_eq!(got, vec![(1, b"one".to_vec())]);
        assert!(matches!(
            end,
            SegmentEnd::Torn {
                fault: FrameFault::BadChecksum,
                ..
            }
        ));
    }

    proptest! {
        #[test]
        fn arbitrary_entry_bodies_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..128)) {
            let _ = decode_entry(&bytes);
        }
    }
}
