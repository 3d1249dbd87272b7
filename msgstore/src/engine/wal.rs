//! The write-ahead log: the shard's durability point.
//!
//! A sequence of segment files `wal/<16 hex digits>.log`. Every segment is
//! created zero-filled to `wal_segment_bytes` (by a helper thread, ahead of
//! need) and then overwritten in place: syncing an overwrite of allocated
//! blocks needs no file-system journal commit, which halves the cost of a
//! durable write on ext4 (baselines.md; measured in `imbench storage`). A
//! segment is a 32-byte header, then checked frames (see codec.rs), then
//! zeros. Appends of a batch are written with one `pwrite`; under `always`
//! the segment is opened `O_DSYNC`, so that write is the batch's one
//! durable I/O (group commit). A checkpoint records the log position it
//! covers; segments wholly before it are deleted.

use super::codec::{
    begin_frame, finish_frame, le_u64, read_frame, FrameFault, MessageHeader, FRAME_HEADER_BYTES,
    MESSAGE_HEADER_BYTES,
};
use crate::Result;
use std::{
    fs::{self, File, OpenOptions},
    io::Write,
    os::unix::fs::{FileExt, OpenOptionsExt},
    path::{Path, PathBuf},
    sync::Arc,
    thread::JoinHandle,
};

pub const SEGMENT_HEADER_BYTES: u64 = 32;
const SEGMENT_MAGIC: &[u8; 8] = b"IMWAL\0\0\x02";
const SPARE_NAME: &str = "spare.tmp";
const KIND_APPEND: u8 = 1;
const KIND_ACK: u8 = 2;
const KIND_RESEQ: u8 = 3;
const KIND_MOVED: u8 = 4;

/// A point in the log: segment number and byte offset in it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Default)]
pub struct Position {
    pub segment: u64,
    pub offset: u64,
}

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
    /// A user with no live records continues at `next_seq` (and is no
    /// longer moved): the first step of importing a mailbox.
    Reseq {
        user: u64,
        next_seq: u64,
    },
    /// A user with no live records was moved to another shard.
    Moved {
        user: u64,
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

pub fn encode_reseq(user: u64, next_seq: u64, out: &mut Vec<u8>) {
    let at = begin_frame(out);
    out.push(KIND_RESEQ);
    out.extend_from_slice(&user.to_le_bytes());
    out.extend_from_slice(&next_seq.to_le_bytes());
    finish_frame(out, at);
}

pub fn encode_moved(user: u64, out: &mut Vec<u8>) {
    let at = begin_frame(out);
    out.push(KIND_MOVED);
    out.extend_from_slice(&user.to_le_bytes());
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
        KIND_RESEQ if rest.len() == 16 => Some(Entry::Reseq {
            user: le_u64(&rest[0..8]),
            next_seq: le_u64(&rest[8..16]),
        }),
        KIND_MOVED if rest.len() == 8 => Some(Entry::Moved {
            user: le_u64(&rest[0..8]),
        }),
        _ => None,
    }
}

fn segment_header(segment: u64) -> [u8; SEGMENT_HEADER_BYTES as usize] {
    let mut h = [0u8; SEGMENT_HEADER_BYTES as usize];
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
    /// The entries end where the zeros begin.
    Clean,
    /// The valid entries end at this offset; what followed was torn or
    /// corrupt and has been zeroed.
    Torn { valid_bytes: u64, fault: FrameFault },
}

/// Replay the entries of one segment from `from` into `apply`. A torn or
/// corrupt tail is zeroed on disk so it is never read again.
pub fn replay_segment(
    dir: &Path,
    segment: u64,
    from: u64,
    entry_bytes_max: usize,
    cut_tail: bool,
    mut apply: impl FnMut(Entry<'_>) -> Result<()>,
) -> Result<SegmentEnd> {
    let path = segment_path(dir, segment);
    let bytes = fs::read(&path)?;
    let header_ok =
        bytes.get(..SEGMENT_HEADER_BYTES as usize) == Some(&segment_header(segment)[..]);
    let mut at = from.max(SEGMENT_HEADER_BYTES) as usize;
    let end = if !header_ok {
        at = 0;
        SegmentEnd::Torn {
            valid_bytes: 0,
            fault: FrameFault::BadChecksum,
        }
    } else {
        loop {
            if bytes[at.min(bytes.len())..].iter().all(|b| *b == 0) {
                break SegmentEnd::Clean;
            }
            let fault = match read_frame(&bytes, at, entry_bytes_max) {
                Ok(body) => match decode_entry(body) {
                    Some(entry) => {
                        apply(entry)?;
                        at += FRAME_HEADER_BYTES + body.len();
                        continue;
                    }
                    None => FrameFault::BadLength,
                },
                Err(fault) => fault,
            };
            break SegmentEnd::Torn {
                valid_bytes: at as u64,
                fault,
            };
        }
    };
    if let (SegmentEnd::Torn { .. }, true) = (end, cut_tail) {
        if at == 0 {
            fs::remove_file(&path)?;
        } else {
            let f = OpenOptions::new().write(true).open(&path)?;
            f.write_all_at(&vec![0u8; bytes.len() - at], at as u64)?;
            f.sync_all()?;
        }
    }
    Ok(end)
}

/// Smallest frame that can advance a seq: an Append with an empty payload.
pub const APPEND_FRAME_BYTES_MIN: u64 = (FRAME_HEADER_BYTES + 1 + MESSAGE_HEADER_BYTES) as u64;

/// What [`scan_log`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LogScan {
    /// Every segment's entries end where its zeros begin.
    Clean,
    /// Nothing valid follows the first bad byte: a torn tail (a crash
    /// mid-write), dropped at replay.
    TornTail { segment: u64, offset: u64 },
    /// Valid entries follow the damage: corruption.
    Corrupt(crate::error::LogDamage),
}

/// Per-user summary of the valid entries found after damage.
#[derive(Default)]
struct AfterDamage {
    valid: u64,
    appends: u64,
    unreadable: u64,
    ranges: Vec<(String, u64, u64)>,
    seqs: std::collections::BTreeMap<u64, (u64, u64)>,
}

impl AfterDamage {
    fn note(&mut self, entry: &Entry<'_>) {
        self.valid += 1;
        let (user, seq) = match entry {
            Entry::Append { header, .. } => {
                self.appends += 1;
                (header.user, header.seq)
            }
            Entry::Reseq { user, next_seq } => (*user, next_seq.saturating_sub(1)),
            _ => return,
        };
        let e = self.seqs.entry(user).or_insert((seq, seq));
        e.0 = e.0.min(seq);
        e.1 = e.1.max(seq);
    }

    /// Walk `bytes[at..]` after damage: chains of valid frames, and between
    /// them bytes no valid frame starts in (counted unreadable unless zero).
    fn walk(&mut self, bytes: &[u8], mut at: usize, entry_bytes_max: usize) {
        while at < bytes.len() {
            if bytes[at..].iter().all(|b| *b == 0) {
                return;
            }
            match valid_entry_at(bytes, at, entry_bytes_max) {
                Some((entry, len)) => {
                    self.note(&entry);
                    at += len;
                }
                None => {
                    if bytes[at] != 0 {
                        self.unreadable += 1;
                    }
                    at += 1;
                }
            }
        }
    }
}

/// The valid entry at `at` (checksum verified, known kind) and its frame
/// length.
fn valid_entry_at(bytes: &[u8], at: usize, entry_bytes_max: usize) -> Option<(Entry<'_>, usize)> {
    let body = read_frame(bytes, at, entry_bytes_max).ok()?;
    Some((decode_entry(body)?, FRAME_HEADER_BYTES + body.len()))
}

/// Find the first damage in the log from `start` without changing anything,
/// and decide whether it is a torn tail or corruption.
///
/// The rule (docs/STORAGE.md, "Recovery"): the *bad point* is the first
/// segment header that is wrong, or the first frame (in a segment with a
/// good header) that is truncated, fails its checksum or is of unknown kind,
/// unless its 8 header bytes are all zero (an unwritten range: a deferred
/// write that never reached the disk while a later one did; the entries
/// after it were never acknowledged). If any *valid entry* (a frame whose
/// checksum verifies and whose body decodes as a known entry kind) starts
/// at any byte offset after the bad point, in that segment or any later
/// one, the log is corrupt; otherwise the bad point starts a torn tail.
pub fn scan_log(
    dir: &Path,
    start: Position,
    segments: &[u64],
    entry_bytes_max: usize,
) -> Result<LogScan> {
    let mut bad: Option<(u64, u64, String, bool)> = None; // (seg, offset, fault, hole)
    let mut after = AfterDamage::default();
    for &seg in segments.iter().filter(|s| **s >= start.segment) {
        let path = segment_path(dir, seg);
        let name = path.display().to_string();
        let bytes = fs::read(&path)?;
        let header_ok =
            bytes.get(..SEGMENT_HEADER_BYTES as usize) == Some(&segment_header(seg)[..]);
        let first = SEGMENT_HEADER_BYTES as usize;
        if bad.is_some() {
            let before = (after.valid, after.unreadable);
            after.walk(&bytes, first.min(bytes.len()), entry_bytes_max);
            if (after.valid, after.unreadable) != before {
                after.ranges.push((name, 0, bytes.len() as u64));
            }
            continue;
        }
        if !header_ok {
            bad = Some((seg, 0, "bad segment header".into(), false));
            after.walk(&bytes, first.min(bytes.len()), entry_bytes_max);
            after.ranges.push((name, 0, bytes.len() as u64));
            continue;
        }
        let mut at = if seg == start.segment {
            start.offset.max(SEGMENT_HEADER_BYTES) as usize
        } else {
            first
        };
        loop {
            if bytes[at.min(bytes.len())..].iter().all(|b| *b == 0) {
                break;
            }
            match read_frame(&bytes, at, entry_bytes_max) {
                Ok(body) if decode_entry(body).is_some() => {
                    at += FRAME_HEADER_BYTES + body.len();
                    continue;
                }
                result => {
                    let fault = match result {
                        Ok(_) => "unknown entry kind".to_string(),
                        Err(f) => format!("{f:?}"),
                    };
                    let hole = bytes
                        .get(at..at + FRAME_HEADER_BYTES)
                        .is_some_and(|h| h.iter().all(|b| *b == 0));
                    bad = Some((seg, at as u64, fault, hole));
                    after.walk(&bytes, at + 1, entry_bytes_max);
                    if !hole && bytes[at] != 0 {
                        after.unreadable += 1; // the bad frame's first byte
                    }
                    after
                        .ranges
                        .push((name.clone(), at as u64, bytes.len() as u64));
                    break;
                }
            }
        }
    }
    let Some((segment, offset, fault, hole)) = bad else {
        return Ok(LogScan::Clean);
    };
    if after.valid == 0 || hole {
        return Ok(LogScan::TornTail { segment, offset });
    }
    Ok(LogScan::Corrupt(crate::error::LogDamage {
        file: segment_path(dir, segment).display().to_string(),
        offset,
        fault,
        valid_after: after.valid,
        appends_after: after.appends,
        unreadable_bytes: after.unreadable,
        dropped_ranges: after.ranges,
        dropped_seqs: after
            .seqs
            .into_iter()
            .map(|(u, (lo, hi))| (u, lo, hi))
            .collect(),
    }))
}

/// Create `path` zero-filled to `bytes` and make it durable.
fn zero_filled(path: &Path, bytes: u64) -> std::io::Result<()> {
    let mut f = File::create(path)?;
    let chunk = vec![0u8; 1 << 20];
    let mut left = bytes;
    while left > 0 {
        let n = left.min(chunk.len() as u64) as usize;
        f.write_all(&chunk[..n])?;
        left -= n as u64;
    }
    f.sync_all()
}

/// A failed log write.
#[derive(Debug)]
pub struct WriteFailed {
    pub error: std::io::Error,
    /// The partial write was zeroed again, so it can never be replayed.
    pub log_intact: bool,
}

/// A claimed range of the log, to be written by whoever holds it.
pub struct LogWrite {
    file: Arc<File>,
    offset: u64,
}

impl LogWrite {
    /// Write `bytes` at the claimed offset; durable on return when the log
    /// is opened `O_DSYNC`. On failure the range is zeroed again so a
    /// partial write is never replayed (`log_intact` says whether that
    /// worked).
    pub fn perform(&self, bytes: &[u8]) -> Result<(), WriteFailed> {
        if let Err(error) = self.file.write_all_at(bytes, self.offset) {
            let log_intact = self.zero_partial(bytes.len() as u64).is_ok();
            return Err(WriteFailed { error, log_intact });
        }
        Ok(())
    }

    /// Zero whatever part of the claimed range exists in the file (a failed
    /// write may have written some of it; bytes past the end of the file
    /// were never written).
    fn zero_partial(&self, len: u64) -> std::io::Result<()> {
        let end = (self.offset + len).min(self.file.metadata()?.len());
        if end > self.offset {
            let zeros = vec![0u8; (end - self.offset) as usize];
            self.file.write_all_at(&zeros, self.offset)?;
        }
        self.file.sync_data()
    }
}

/// The segment being appended to.
pub struct Wal {
    dir: PathBuf,
    segment_bytes: u64,
    dsync: bool,
    segment: u64,
    file: Arc<File>,
    /// Where the next entry goes in the current segment.
    offset: u64,
    /// The zero-filled spare segment being prepared in the background.
    spare: Option<JoinHandle<std::io::Result<()>>>,
    /// The helper deleting and freeing checkpointed log, if one ran.
    trim: Option<JoinHandle<()>>,
    /// Entry bytes written since the last successful checkpoint (for a
    /// detached log: the bytes batches would have written).
    pub bytes_since_checkpoint: u64,
    /// A log of a replicated shard ([`Wal::detached`]): no segment file,
    /// nothing is ever written.
    detached: bool,
}

impl Wal {
    /// Start writing at a new segment numbered `segment`. With `dsync`, every
    /// write is durable when it returns (`O_DSYNC`).
    pub fn create(dir: &Path, segment: u64, segment_bytes: u64, dsync: bool) -> Result<Wal> {
        fs::create_dir_all(dir)?;
        zero_filled(&dir.join(SPARE_NAME), segment_bytes)?;
        let mut wal = Wal {
            dir: dir.to_path_buf(),
            segment_bytes,
            dsync,
            segment,
            // Replaced by install_spare below.
            file: Arc::new(File::open(dir)?),
            offset: SEGMENT_HEADER_BYTES,
            spare: None,
            trim: None,
            bytes_since_checkpoint: 0,
            detached: false,
        };
        wal.install_spare(segment)?;
        Ok(wal)
    }

    /// A log that writes nothing, for a replicated shard (its Raft log is
    /// the durability point): it creates no segment and no spare, stays at
    /// the start of segment `segment`, and refuses [`Wal::reserve`] and
    /// [`Wal::write`]. The engine counts what batches would have written
    /// in `bytes_since_checkpoint`.
    pub fn detached(dir: &Path, segment: u64, segment_bytes: u64) -> Result<Wal> {
        fs::create_dir_all(dir)?;
        Ok(Wal {
            dir: dir.to_path_buf(),
            segment_bytes,
            dsync: false,
            segment,
            // Never written: no segment file exists.
            file: Arc::new(File::open(dir)?),
            offset: SEGMENT_HEADER_BYTES,
            spare: None,
            trim: None,
            bytes_since_checkpoint: 0,
            detached: true,
        })
    }

    /// Delete every segment and the spare: a replicated shard's checkpoint
    /// covers all they held.
    pub fn remove_all(&self) -> Result<()> {
        let segments = list_segments(&self.dir)?.into_iter();
        let paths = segments.map(|seg| segment_path(&self.dir, seg));
        for path in paths.chain([self.dir.join(SPARE_NAME)]) {
            match fs::remove_file(path) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e.into()),
                _ => {}
            }
        }
        sync_dir(&self.dir)
    }

    /// The position the next entry will be written at.
    pub fn position(&self) -> Position {
        Position {
            segment: self.segment,
            offset: self.offset,
        }
    }

    /// Append `bytes` (whole entries), moving to the next segment first if
    /// they do not fit. On failure the written range is zeroed again so a
    /// partial batch is never replayed; if even that fails, `log_intact` is
    /// false and the caller must stop writing.
    pub fn write(&mut self, bytes: &[u8]) -> Result<(), WriteFailed> {
        let write = self.reserve(bytes.len() as u64).map_err(|e| WriteFailed {
            error: std::io::Error::other(e.to_string()),
            log_intact: true,
        })?;
        let len = bytes.len() as u64;
        write.perform(bytes).inspect_err(|_| {
            // The range was never written: hand it out again.
            self.offset -= len;
            self.bytes_since_checkpoint -= len;
        })
    }

    /// Claim the next `len` bytes of the log (moving to the next segment
    /// first if they do not fit) for a write another thread performs.
    /// Writes must complete in the order they were reserved before any of
    /// them is acknowledged: replay stops at the first gap within a
    /// segment, but takes a segment's zeros for its end, so the first write
    /// into a new segment may start only once those into the old one are
    /// durable ([`Wal::rotates_for`] tells the caller when that is).
    pub fn reserve(&mut self, len: u64) -> Result<LogWrite> {
        if self.detached {
            return Err(crate::Error::Storage(
                "a replicated shard writes no log of its own".into(),
            ));
        }
        if self.rotates_for(len) {
            self.rotate()?;
        }
        let write = LogWrite {
            file: Arc::clone(&self.file),
            offset: self.offset,
        };
        self.offset += len;
        self.bytes_since_checkpoint += len;
        Ok(write)
    }

    /// Whether the next `len` bytes go to a new segment (they do not fit
    /// in the rest of this one, and this one holds something).
    pub fn rotates_for(&self, len: u64) -> bool {
        self.offset + len > self.segment_bytes && self.offset > SEGMENT_HEADER_BYTES
    }

    /// Make every written entry durable (already done under `O_DSYNC`).
    pub fn sync(&mut self) -> std::io::Result<()> {
        if self.dsync || self.detached {
            return Ok(());
        }
        self.file.sync_data()
    }

    /// Continue in the next segment.
    fn rotate(&mut self) -> Result<()> {
        self.file.sync_data()?;
        match self.spare.take().map(|h| h.join()) {
            Some(Ok(Ok(()))) => {}
            other => {
                if let Some(Ok(Err(e))) = other {
                    tracing::warn!(error = %e, "preparing the spare log segment failed; retrying inline");
                }
                zero_filled(&self.dir.join(SPARE_NAME), self.segment_bytes)?;
            }
        }
        self.install_spare(self.segment + 1)
    }

    /// Turn the prepared spare into segment `segment` and start preparing
    /// the next spare.
    fn install_spare(&mut self, segment: u64) -> Result<()> {
        let path = segment_path(&self.dir, segment);
        fs::rename(self.dir.join(SPARE_NAME), &path)?;
        sync_dir(&self.dir)?;
        let mut opts = OpenOptions::new();
        opts.write(true);
        if self.dsync {
            opts.custom_flags(libc::O_DSYNC);
        }
        let file = opts.open(&path)?;
        file.write_all_at(&segment_header(segment), 0)?;
        file.sync_data()?;
        self.file = Arc::new(file);
        self.segment = segment;
        self.offset = SEGMENT_HEADER_BYTES;
        let (spare, bytes) = (self.dir.join(SPARE_NAME), self.segment_bytes);
        self.spare = Some(
            std::thread::Builder::new()
                .name("msgstore-wal-spare".into())
                .spawn(move || zero_filled(&spare, bytes))?,
        );
        Ok(())
    }

    /// Delete every segment wholly before `keep_from`.
    pub fn remove_before(&self, keep_from: Position) -> Result<()> {
        for path in self.paths_before(keep_from)? {
            fs::remove_file(path)?;
        }
        Ok(())
    }

    /// Like [`Wal::remove_before`], but unlinking (which frees the blocks
    /// of large files and can take milliseconds each) happens on a helper
    /// thread, which then also frees the blocks of `keep_from`'s own
    /// segment wholly before it ([`punch_before`]). Safe to lose: recovery
    /// deletes segments before `wal_start` and never reads before it.
    pub fn remove_before_in_background(&mut self, keep_from: Position) -> Result<()> {
        let paths = self.paths_before(keep_from)?;
        let current = segment_path(&self.dir, keep_from.segment);
        if paths.is_empty() && punch_range(keep_from.offset).is_none() {
            return Ok(());
        }
        // The last one is long done (a checkpoint ran since it started).
        self.join_trim();
        let trim = std::thread::Builder::new()
            .name("msgstore-wal-trim".into())
            .spawn(move || {
                for path in paths {
                    if let Err(e) = fs::remove_file(&path) {
                        tracing::warn!(path = %path.display(), error = %e, "cannot remove an old log segment");
                    }
                }
                if let Err(e) = punch_before(&current, keep_from.offset) {
                    tracing::debug!(path = %current.display(), error = %e, "cannot free checkpointed log blocks");
                }
            })?;
        self.trim = Some(trim);
        Ok(())
    }

    fn join_trim(&mut self) {
        if let Some(h) = self.trim.take() {
            let _ = h.join();
        }
    }

    fn paths_before(&self, keep_from: Position) -> Result<Vec<PathBuf>> {
        Ok(list_segments(&self.dir)?
            .into_iter()
            .filter(|seg| *seg < keep_from.segment)
            .map(|seg| segment_path(&self.dir, seg))
            .collect())
    }
}

/// Blocks of a segment freed by [`punch_before`].
const PUNCH_BLOCK_BYTES: u64 = 4096;

/// The whole blocks of a segment after its header's block and before
/// `offset`, as (start, length); `None` if there are none.
fn punch_range(offset: u64) -> Option<(u64, u64)> {
    let end = offset / PUNCH_BLOCK_BYTES * PUNCH_BLOCK_BYTES;
    (end > PUNCH_BLOCK_BYTES).then(|| (PUNCH_BLOCK_BYTES, end - PUNCH_BLOCK_BYTES))
}

/// Give the file system back the blocks of segment `path` wholly before
/// `offset`, the checkpointed part of the log's current segment (it is
/// deleted only once the log has moved past it): they read as zeros
/// afterwards, and nothing reads or writes there again (replay starts at
/// the checkpoint's position; writes go after it). The header's block
/// stays. A missing segment (a replicated shard's detached log) is fine.
fn punch_before(path: &Path, offset: u64) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    let Some((start, len)) = punch_range(offset) else {
        return Ok(());
    };
    let file = match OpenOptions::new().write(true).open(path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        other => other?,
    };
    let (start, len) = (start as libc::off_t, len as libc::off_t);
    let mode = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
    // SAFETY: plain syscall on a descriptor we own.
    if unsafe { libc::fallocate(file.as_raw_fd(), mode, start, len) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

impl Drop for Wal {
    fn drop(&mut self) {
        // The spare thread must never outlive the log: a later open renames
        // the spare into a live segment.
        if let Some(h) = self.spare.take() {
            let _ = h.join();
        }
        // Nor the trim thread: a later open lists and deletes segments.
        self.join_trim();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const SEGMENT_BYTES: u64 = 64 * 1024;

    fn header(seq: u64) -> MessageHeader {
        MessageHeader {
            user: 5,
            seq,
            timestamp_ms: 9,
            msg_id: 77,
        }
    }

    #[test]
    fn the_checkpointed_blocks_of_a_segment_are_freed_and_nothing_else() {
        assert_eq!(punch_range(32), None);
        assert_eq!(punch_range(8191), None);
        assert_eq!(punch_range(8192), Some((4096, 4096)));
        assert_eq!(punch_range(20_000), Some((4096, 12_288)));
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("seg");
        fs::write(&path, vec![7u8; 64 * 1024]).unwrap();
        punch_before(&path, 20_000).unwrap();
        let bytes = fs::read(&path).unwrap();
        assert_eq!(bytes.len(), 64 * 1024, "the size is kept");
        assert!(
            bytes[..4096].iter().all(|b| *b == 7),
            "the header block stays"
        );
        assert!(bytes[4096..16_384].iter().all(|b| *b == 0));
        assert!(
            bytes[16_384..].iter().all(|b| *b == 7),
            "from the block of the offset on"
        );
        punch_before(&dir.path().join("missing"), 20_000).unwrap();
    }

    fn collect(dir: &Path, seg: u64) -> (Vec<(u64, Vec<u8>)>, SegmentEnd) {
        let mut got = Vec::new();
        let end = replay_segment(dir, seg, 0, 1 << 20, true, |e| {
            match e {
                Entry::Append { header, payload } => got.push((header.seq, payload.to_vec())),
                Entry::Ack { up_to_seq, .. } => got.push((up_to_seq, b"ack".to_vec())),
                Entry::Reseq { next_seq, .. } => got.push((next_seq, b"reseq".to_vec())),
                Entry::Moved { user } => got.push((user, b"moved".to_vec())),
            }
            Ok(())
        })
        .unwrap();
        (got, end)
    }

    #[test]
    fn torn_tail_is_zeroed_and_never_replayed() {
        let dir = tempfile::tempdir().unwrap();
        let mut wal = Wal::create(dir.path(), 1, SEGMENT_BYTES, true).unwrap();
        let mut buf = Vec::new();
        encode_append(&header(1), b"one", &mut buf);
        encode_ack(5, 1, &mut buf);
        encode_reseq(5, 9, &mut buf);
        encode_moved(5, &mut buf);
        encode_append(&header(2), b"two", &mut buf);
        let whole = buf.len();
        wal.write(&buf[..whole - 2]).unwrap(); // the last entry is torn
        drop(wal);
        let (got, end) = collect(dir.path(), 1);
        let want = [(1, "one"), (1, "ack"), (9, "reseq"), (5, "moved")];
        let want: Vec<_> = want
            .iter()
            .map(|(n, s)| (*n, s.as_bytes().to_vec()))
            .collect();
        assert_eq!(got, want);
        assert!(matches!(
            end,
            SegmentEnd::Torn {
                fault: FrameFault::Truncated | FrameFault::BadChecksum,
                ..
            }
        ));
        // The torn bytes were zeroed: a second replay is clean.
        let (again, end) = collect(dir.path(), 1);
        assert_eq!(again, got);
        assert_eq!(end, SegmentEnd::Clean);
    }

    #[test]
    fn bit_flip_in_the_tail_stops_replay_there() {
        let dir = tempfile::tempdir().unwrap();
        let mut wal = Wal::create(dir.path(), 3, SEGMENT_BYTES, false).unwrap();
        let mut buf = Vec::new();
        encode_append(&header(1), b"one", &mut buf);
        let first = buf.len();
        encode_append(&header(2), b"two", &mut buf);
        buf[first + 12] ^= 0x10;
        wal.write(&buf).unwrap();
        wal.sync().unwrap();
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

    #[test]
    fn writes_roll_over_into_new_segments_and_replay_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let mut wal = Wal::create(dir.path(), 1, SEGMENT_BYTES, false).unwrap();
        let payload = vec![7u8; 1000];
        for seq in 1..=200 {
            let mut buf = Vec::new();
            encode_append(&header(seq), &payload, &mut buf);
            wal.write(&buf).unwrap();
        }
        wal.sync().unwrap();
        let segments = list_segments(dir.path()).unwrap();
        assert!(segments.len() >= 3, "{segments:?}");
        let mut seqs = Vec::new();
        for seg in segments {
            let (got, end) = collect(dir.path(), seg);
            assert_eq!(end, SegmentEnd::Clean);
            seqs.extend(got.into_iter().map(|g| g.0));
        }
        assert_eq!(seqs, (1..=200).collect::<Vec<_>>());
        wal.remove_before(wal.position()).unwrap();
        assert_eq!(
            list_segments(dir.path()).unwrap(),
            vec![wal.position().segment]
        );
    }

    proptest! {
        #[test]
        fn arbitrary_entry_bodies_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..128)) {
            let _ = decode_entry(&bytes);
        }
    }
}
