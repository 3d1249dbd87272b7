//! Bucket files `buckets/XX/YY` and the bounded set of their memory maps.
//!
//! Records are written into a bucket's map only by checkpoints (the log is
//! the durability point), and read through the same maps by fetches. At most
//! `open_maps_max` files are mapped at once; the least recently used maps are
//! dropped when the set is full.

use super::{codec::le_u64, state::BUCKET_HEADER_BYTES};
use crate::Result;
use memmap2::{MmapMut, MmapOptions};
// Keys are user ids and bucket numbers: a seeded fast hash, not SipHash.
use foldhash::{HashMap, HashMapExt};
use std::{
    fs::{self, File, OpenOptions},
    io::Write,
    path::{Path, PathBuf},
};

const BUCKET_MAGIC: &[u8; 8] = b"IMBKT\0\0\x01";
/// Smallest size a bucket file grows to, and the block it grows by.
pub(crate) const BUCKET_FILE_BYTES_MIN: u64 = 4 * 1024;
/// A growing file gets room for this share of its length more (an
/// eighth: at most 12.5% of a file is unused room, where doubling left up
/// to half), rounded up to whole `BUCKET_FILE_BYTES_MIN` blocks.
const BUCKET_GROWTH_DIVISOR: u64 = 8;
/// A map reserves address space for this much growth of its file (and at
/// least `MAP_RESERVE_BYTES_MIN`), so a growing file is not remapped each
/// time it grows: an unmap costs every CPU running the process a TLB
/// flush. Only the file's bytes are ever touched through the map.
const MAP_RESERVE_GROWTH: u64 = 4;
const MAP_RESERVE_BYTES_MIN: u64 = 1024 * 1024;
/// `vm.max_map_count` entries the automatic map budget leaves for
/// everything else the process maps (libraries, thread stacks, the
/// allocator, LMDB): a loaded daemon was seen using about 100.
pub const MAP_COUNT_HEADROOM: usize = 2048;
/// The automatic map budget when `vm.max_map_count` cannot be read.
const OPEN_MAPS_FALLBACK: usize = 32_768;

/// The kernel's per-process limit on mappings, if it can be read.
pub fn max_map_count() -> Option<usize> {
    fs::read_to_string("/proc/sys/vm/max_map_count")
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// How many of `buckets` files one of `shards` shards in this process keeps
/// mapped when the config leaves it to us: all of them if the process may
/// map that many for each shard (with [`MAP_COUNT_HEADROOM`] to spare), else
/// its share of what the process may map. A checkpoint touches nearly every
/// bucket, so each bucket that does not fit costs an unmap (a TLB flush on
/// every CPU running the process) and a map per checkpoint.
pub fn auto_open_maps_max(buckets: usize, max_map_count: Option<usize>, shards: usize) -> usize {
    let budget = max_map_count.map_or(OPEN_MAPS_FALLBACK, |limit| {
        limit.saturating_sub(MAP_COUNT_HEADROOM)
    });
    (budget / shards.max(1)).min(buckets).max(1)
}

pub fn bucket_header(bucket: u32, gen: u64) -> [u8; BUCKET_HEADER_BYTES as usize] {
    let mut h = [0u8; BUCKET_HEADER_BYTES as usize];
    h[0..8].copy_from_slice(BUCKET_MAGIC);
    h[8..12].copy_from_slice(&bucket.to_le_bytes());
    h[16..24].copy_from_slice(&gen.to_le_bytes());
    let crc = crc32c::crc32c(&h[..60]);
    h[60..64].copy_from_slice(&crc.to_le_bytes());
    h
}

/// Generation recorded in a bucket file's header, if the header is valid.
pub fn header_gen(bytes: &[u8], bucket: u32) -> Option<u64> {
    let h = bytes.get(..BUCKET_HEADER_BYTES as usize)?;
    let gen = le_u64(&h[16..24]);
    (h == bucket_header(bucket, gen)).then_some(gen)
}

/// A mapped bucket file. The file descriptor is closed once mapped (the
/// map keeps the file alive), so open maps do not count against the
/// process's file-descriptor limit.
struct Mapped {
    /// Covers the file and address space reserved past its end.
    map: MmapMut,
    /// The file's length: the only bytes of `map` that may be touched
    /// (past the end of the file a page fault is SIGBUS).
    file_len: usize,
    last_use: u64,
}

impl Mapped {
    fn bytes(&self) -> &[u8] {
        &self.map[..self.file_len]
    }
}

pub struct Buckets {
    root: PathBuf,
    files_per_dir: u16,
    open_maps_max: usize,
    maps: HashMap<u32, Mapped>,
    clock: u64,
    /// Buckets whose files grew since they were last trimmed (see
    /// [`Buckets::trim`]); at most one entry per bucket.
    grown: foldhash::HashSet<u32>,
}

/// What one [`Buckets::trim`] call did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Trimmed {
    pub bytes: u64,
    /// Grown files are left for another call.
    pub more: bool,
}

impl Buckets {
    pub fn new(root: &Path, files_per_dir: u16, open_maps_max: usize) -> Result<Buckets> {
        fs::create_dir_all(root)?;
        Ok(Buckets {
            root: root.to_path_buf(),
            files_per_dir,
            open_maps_max,
            maps: HashMap::new(),
            clock: 0,
            grown: foldhash::HashSet::default(),
        })
    }

    pub fn path(&self, bucket: u32) -> PathBuf {
        let files = u32::from(self.files_per_dir);
        self.root
            .join(format!("{:02x}", bucket / files))
            .join(format!("{:02x}", bucket % files))
    }

    pub fn open_maps(&self) -> usize {
        self.maps.len()
    }

    /// Drop the map of `bucket` (before its file is replaced).
    pub fn close(&mut self, bucket: u32) {
        self.maps.remove(&bucket);
    }

    /// The mapped bytes of `bucket`, or `None` if it has no file yet.
    pub fn view(&mut self, bucket: u32) -> Result<Option<&[u8]>> {
        if !self.maps.contains_key(&bucket) {
            let path = self.path(bucket);
            let file = match OpenOptions::new().read(true).write(true).open(&path) {
                Ok(f) => f,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
                Err(e) => return Err(e.into()),
            };
            self.insert(bucket, file)?;
        }
        Ok(self.touch(bucket).map(Mapped::bytes))
    }

    /// Write `bytes` at `offset` of `bucket`'s file (creating the file with
    /// generation `gen` if it does not exist), growing it as needed.
    pub fn write(&mut self, bucket: u32, gen: u64, offset: u64, bytes: &[u8]) -> Result<()> {
        if self.view(bucket)?.is_none() {
            let file = self.create(bucket, gen)?;
            self.insert(bucket, file)?;
        }
        let end = offset + bytes.len() as u64;
        if self
            .maps
            .get(&bucket)
            .is_none_or(|m| (m.file_len as u64) < end)
        {
            self.grow(bucket, end)?;
        }
        let m = self.maps.get_mut(&bucket).expect("mapped above");
        m.map[offset as usize..end as usize].copy_from_slice(bytes);
        Ok(())
    }

    /// Grow `bucket`'s file to hold `end` bytes, and map it again if that
    /// is past the room its map reserved.
    fn grow(&mut self, bucket: u32, end: u64) -> Result<()> {
        let size = grown_len(end);
        let file_len =
            usize::try_from(size).map_err(|_| std::io::Error::other("bucket too large"))?;
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(self.path(bucket))?;
        allocate(&file, size)?;
        self.grown.insert(bucket);
        match self.maps.get_mut(&bucket) {
            Some(m) if m.map.len() as u64 >= size => m.file_len = file_len,
            _ => {
                // Unmapped first: the replacement needs no extra map-count
                // entry.
                self.maps.remove(&bucket);
                let map = self.map_or_evict(|| map_file(&file, size))?;
                let last_use = self.clock;
                let mapped = Mapped {
                    map,
                    file_len,
                    last_use,
                };
                self.maps.insert(bucket, mapped);
            }
        }
        Ok(())
    }

    /// Give back the room grown files keep past their records: cut up to
    /// `files_max` of them to `committed(bucket)`'s length (`(gen, len)`:
    /// the index's), where the file's header has that generation. Only
    /// while no checkpoint writes (the engine is idle): a checkpoint grows
    /// a cut file again as it needs, by an eighth, with `posix_fallocate`.
    pub fn trim(
        &mut self,
        files_max: usize,
        committed: impl Fn(u32) -> Option<(u64, u64)>,
    ) -> Result<Trimmed> {
        let mut done = Trimmed::default();
        let batch: Vec<u32> = self.grown.iter().copied().take(files_max).collect();
        for bucket in batch {
            self.grown.remove(&bucket);
            let Some((gen, len)) = committed(bucket) else {
                continue;
            };
            let Some(view) = self.view(bucket)? else {
                continue;
            };
            let file_len = view.len() as u64;
            if header_gen(view, bucket) != Some(gen) || file_len <= len {
                continue; // not the file the index describes, or no room
            }
            let new_len = usize::try_from(len).expect("shorter than a mapped file");
            // Nothing past `len` is touched from here on (SIGBUS).
            self.maps.get_mut(&bucket).expect("viewed").file_len = new_len;
            let file = OpenOptions::new().write(true).open(self.path(bucket))?;
            file.set_len(len)?;
            done.bytes += file_len - len;
        }
        done.more = !self.grown.is_empty();
        Ok(done)
    }

    fn create(&self, bucket: u32, gen: u64) -> Result<File> {
        let path = self.path(bucket);
        if let Some(parent) = path.parent() {
            fs::create_dir_all(parent)?;
        }
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)?;
        file.write_all(&bucket_header(bucket, gen))?;
        allocate(&file, BUCKET_FILE_BYTES_MIN)?;
        Ok(file)
    }

    /// Create every bucket file of `0..buckets` that does not exist yet
    /// (generation 0, empty); returns how many were created. Creating
    /// 65,536 files costs the file system tens of seconds of inode
    /// allocation; doing it once up front keeps that out of the first
    /// checkpoints under traffic.
    pub fn create_missing(&self, buckets: u32) -> Result<u32> {
        let mut created = 0;
        for bucket in 0..buckets {
            if !self.path(bucket).exists() {
                self.create(bucket, 0)?;
                created += 1;
            }
        }
        Ok(created)
    }

    fn insert(&mut self, bucket: u32, file: File) -> Result<()> {
        if self.maps.len() >= self.open_maps_max {
            self.evict();
        }
        let file_len = file.metadata()?.len();
        let map = self.map_or_evict(|| map_file(&file, file_len))?;
        drop(file);
        let file_len =
            usize::try_from(file_len).map_err(|_| std::io::Error::other("bucket too large"))?;
        self.maps.insert(
            bucket,
            Mapped {
                map,
                file_len,
                last_use: 0,
            },
        );
        metrics::gauge!("msgstore_open_maps").set(self.maps.len() as f64);
        Ok(())
    }

    fn touch(&mut self, bucket: u32) -> Option<&Mapped> {
        self.clock += 1;
        let m = self.maps.get_mut(&bucket)?;
        m.last_use = self.clock;
        Some(m)
    }

    /// Run `map`; if the process may not map more (`ENOMEM`: the kernel's
    /// `vm.max_map_count`, or address space), drop the least recently used
    /// eighth of the maps and try once more. The error stands if that fails
    /// too (the checkpoint or read needing the map fails and is retried).
    fn map_or_evict(&mut self, map: impl Fn() -> std::io::Result<MmapMut>) -> Result<MmapMut> {
        match map() {
            Err(e) if e.raw_os_error() == Some(libc::ENOMEM) && !self.maps.is_empty() => {
                tracing::warn!(
                    open_maps = self.maps.len(),
                    "the process may not map more files; unmapping the least recently used"
                );
                metrics::counter!("msgstore_map_failures_total").increment(1);
                self.evict();
                Ok(map()?)
            }
            other => Ok(other?),
        }
    }

    /// Drop the least recently used eighth of the maps (at least one), so
    /// eviction costs O(log n) per map on average.
    fn evict(&mut self) {
        let mut uses: Vec<(u64, u32)> = self.maps.iter().map(|(b, m)| (m.last_use, *b)).collect();
        let n = (uses.len() / 8).max(1);
        uses.select_nth_unstable(n - 1);
        for (_, b) in &uses[..n] {
            self.maps.remove(b);
        }
    }

    /// Write a compacted file for `bucket` under `compact_dir`, synced;
    /// returns its path.
    pub fn write_compacted(
        &self,
        compact_dir: &Path,
        bucket: u32,
        gen: u64,
        records: &[u8],
    ) -> Result<PathBuf> {
        fs::create_dir_all(compact_dir)?;
        let path = compacted_path(compact_dir, bucket, gen);
        let mut file = File::create(&path)?;
        file.write_all(&bucket_header(bucket, gen))?;
        file.write_all(records)?;
        file.sync_all()?;
        Ok(path)
    }

    /// Move a compacted file into place (the atomic swap) and drop the old
    /// map.
    pub fn install_compacted(&mut self, compact_dir: &Path, bucket: u32, gen: u64) -> Result<()> {
        self.close(bucket);
        let to = self.path(bucket);
        if let Some(parent) = to.parent() {
            fs::create_dir_all(parent)?;
        }
        fs::rename(compacted_path(compact_dir, bucket, gen), &to)?;
        Ok(())
    }
}

/// The length a bucket file grows to so that it holds `end` bytes: `end`
/// and an eighth more, in whole blocks, at least one block.
fn grown_len(end: u64) -> u64 {
    let wanted = end.saturating_add(end / BUCKET_GROWTH_DIVISOR);
    wanted
        .div_ceil(BUCKET_FILE_BYTES_MIN)
        .saturating_mul(BUCKET_FILE_BYTES_MIN)
        .max(BUCKET_FILE_BYTES_MIN)
}

/// Map `file` (`file_len` bytes long) with room to grow.
fn map_file(file: &File, file_len: u64) -> std::io::Result<MmapMut> {
    let reserve = file_len
        .saturating_mul(MAP_RESERVE_GROWTH)
        .max(MAP_RESERVE_BYTES_MIN);
    let reserve =
        usize::try_from(reserve).map_err(|_| std::io::Error::other("bucket too large"))?;
    // SAFETY: bucket files are only modified through this process's maps
    // (the directory is locked) and never shrink while mapped; callers only
    // touch the first `file_len` bytes (see `Mapped`), which the file has.
    unsafe { MmapOptions::new().len(reserve).map_mut(file) }
}

/// Grow `file` to `size` bytes with real blocks behind them, so a full disk
/// is an error here and never a SIGBUS when the map is written.
fn allocate(file: &File, size: u64) -> Result<()> {
    use std::os::fd::AsRawFd;
    let len = libc::off_t::try_from(size).map_err(|_| std::io::Error::other("bucket too large"))?;
    // SAFETY: plain syscall on a file descriptor we own.
    let rc = unsafe { libc::posix_fallocate(file.as_raw_fd(), 0, len) };
    if rc != 0 {
        return Err(std::io::Error::from_raw_os_error(rc).into());
    }
    Ok(())
}

pub fn compacted_path(compact_dir: &Path, bucket: u32, gen: u64) -> PathBuf {
    compact_dir.join(format!("{bucket:08x}.{gen:016x}.next"))
}

/// Parse a compacted file name back into (bucket, gen).
pub fn parse_compacted_name(name: &str) -> Option<(u32, u64)> {
    let stem = name.strip_suffix(".next")?;
    let (b, g) = stem.split_once('.')?;
    Some((
        u32::from_str_radix(b, 16).ok()?,
        u64::from_str_radix(g, 16).ok()?,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Buckets 0..16 in `dir`, each holding its number after the header,
    /// with at most `maps_max` mapped (checked after every write).
    fn sixteen_buckets(dir: &Path, maps_max: usize) -> Buckets {
        let mut b = Buckets::new(dir, 4, maps_max).unwrap();
        for id in 0..16u32 {
            b.write(id, 0, BUCKET_HEADER_BYTES, &id.to_le_bytes())
                .unwrap();
            assert!(b.open_maps() <= maps_max);
        }
        b
    }

    /// Every bucket of [`sixteen_buckets`] reads back as written.
    fn assert_sixteen_intact(b: &mut Buckets) {
        for id in 0..16u32 {
            let v = b.view(id).unwrap().unwrap();
            assert_eq!(header_gen(v, id), Some(0));
            let at = BUCKET_HEADER_BYTES as usize;
            assert_eq!(&v[at..at + 4], &id.to_le_bytes());
        }
    }

    #[test]
    fn files_grow_by_an_eighth_in_whole_blocks() {
        assert_eq!(grown_len(0), 4096);
        assert_eq!(grown_len(1), 4096);
        assert_eq!(grown_len(4096), 8192);
        assert_eq!(grown_len(1 << 20), (1 << 20) + (1 << 17));
        for end in [1, 4095, 4097, 100_000, 3 << 20, (1 << 30) + 7] {
            let len = grown_len(end);
            assert!(len >= end && len.is_multiple_of(4096), "{end} -> {len}");
            assert!(len - end <= end / 8 + 4096, "{end} -> {len}");
        }
    }

    #[test]
    fn maps_stay_bounded_and_data_survives_eviction() {
        let dir = tempfile::tempdir().unwrap();
        let mut b = sixteen_buckets(dir.path(), 3);
        assert_sixteen_intact(&mut b);
        assert!(b.view(99).unwrap().is_none());
    }

    /// A file grows within its map's reserved room and past it; the view is
    /// always exactly the file, and what was written stays.
    #[test]
    fn growing_files_keep_their_bytes_and_views_match_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let mut b = Buckets::new(dir.path(), 4, 2).unwrap();
        let chunk: Vec<u8> = (0..64 * 1024u32).map(|i| (i % 251) as u8).collect();
        let mut end = BUCKET_HEADER_BYTES;
        while end < 5 * MAP_RESERVE_BYTES_MIN {
            b.write(3, 0, end, &chunk).unwrap();
            end += chunk.len() as u64;
            let file_len = std::fs::metadata(b.path(3)).unwrap().len();
            let view = b.view(3).unwrap().unwrap();
            assert_eq!(view.len() as u64, file_len);
            assert!(file_len >= end);
            assert_eq!(&view[end as usize - chunk.len()..end as usize], &chunk[..]);
        }
        // Evicted and mapped again from the file: the same bytes.
        for other in 0..4 {
            b.write(other + 4, 0, BUCKET_HEADER_BYTES, b"x").unwrap();
        }
        let view = b.view(3).unwrap().unwrap();
        let first = BUCKET_HEADER_BYTES as usize;
        assert_eq!(&view[first..first + chunk.len()], &chunk[..]);
        assert_eq!(header_gen(view, 3), Some(0));
    }

    #[test]
    fn the_automatic_map_budget_keeps_headroom_and_never_exceeds_the_buckets() {
        // The kernel default leaves room for 63,482 of 65,536 buckets.
        assert_eq!(auto_open_maps_max(65_536, Some(65_530), 1), 63_482);
        assert_eq!(auto_open_maps_max(65_536, Some(262_144), 1), 65_536);
        assert_eq!(auto_open_maps_max(16, Some(65_530), 1), 16);
        assert_eq!(auto_open_maps_max(65_536, None, 1), OPEN_MAPS_FALLBACK);
        assert_eq!(auto_open_maps_max(65_536, Some(100), 1), 1);
        // Shards sharing one process share its limit.
        assert_eq!(auto_open_maps_max(65_536, Some(65_530), 2), 31_741);
        assert_eq!(auto_open_maps_max(65_536, Some(262_144), 2), 65_536);
    }

    /// A map refused for lack of map-count entries (`ENOMEM`) costs the
    /// least recently used maps and is tried once more; a second refusal
    /// is the caller's error, and the set stays usable.
    #[test]
    fn a_refused_map_evicts_and_retries_once() {
        let dir = tempfile::tempdir().unwrap();
        let mut b = sixteen_buckets(dir.path(), 16);
        assert_eq!(b.open_maps(), 16);
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(b.path(0))
            .unwrap();
        let enomem = || std::io::Error::from_raw_os_error(libc::ENOMEM);

        let tries = std::cell::Cell::new(0);
        let map = b.map_or_evict(|| {
            tries.set(tries.get() + 1);
            if tries.get() == 1 {
                Err(enomem())
            } else {
                map_file(&file, 4096)
            }
        });
        assert!(map.is_ok());
        assert_eq!(tries.get(), 2);
        assert_eq!(b.open_maps(), 14, "an eighth of the maps went");

        tries.set(0);
        let refused = b.map_or_evict(|| {
            tries.set(tries.get() + 1);
            Err(enomem())
        });
        assert!(refused.is_err());
        assert_eq!(tries.get(), 2, "tried once more, not again");
        // Another error is not retried.
        tries.set(0);
        let other = b.map_or_evict(|| {
            tries.set(tries.get() + 1);
            Err(std::io::Error::other("no"))
        });
        assert!(other.is_err());
        assert_eq!(tries.get(), 1);
        assert_sixteen_intact(&mut b);
    }

    #[test]
    fn compacted_names_round_trip() {
        let p = compacted_path(Path::new("/x"), 0xabcd, 7);
        let name = p.file_name().unwrap().to_str().unwrap();
        assert_eq!(parse_compacted_name(name), Some((0xabcd, 7)));
        assert_eq!(parse_compacted_name("junk"), None);
    }
}
