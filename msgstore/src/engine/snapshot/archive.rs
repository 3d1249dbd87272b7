//! The snapshot archive format (docs/STORAGE.md, "Snapshot archive"):
//!
//! ```text
//! header  magic "IMSNAP\0\x01" (8), version u32 = 1, zero u32
//! file    path_len u16 (>= 1), path (UTF-8), len u64, crc u32, len bytes
//! ...
//! end     0 u16, files u64, file_bytes u64, listing_crc u32
//! ```
//!
//! Little-endian; CRC-32C. `crc` covers a file's bytes; `listing_crc`
//! covers every archive byte before it but the files' bytes (the header,
//! every file's path_len, path, len and crc, and the end record's first
//! 18 bytes). Nothing follows the end record.
//!
//! The writer reads each file twice: once for its CRC (written before the
//! bytes), once to copy it, checking the CRC again (a file that changed in
//! between fails the write). The reader checks every CRC, every path and
//! length, the end record and the end of input.

use crate::{Error, Result};
use std::{
    fs::File,
    io::{BufReader, BufWriter, Read, Seek, SeekFrom, Write},
};

/// First 8 bytes of an archive.
pub(super) const MAGIC: &[u8; 8] = b"IMSNAP\0\x01";
/// The format version this code writes and reads.
pub(super) const FORMAT_VERSION: u32 = 1;
/// Bytes of the header: magic, version, zero.
pub(super) const HEADER_BYTES: usize = 16;
/// Longest path accepted.
pub(super) const PATH_BYTES_MAX: usize = 255;
/// Largest file accepted (the index copy is bounded by `index_map_bytes`).
pub(super) const FILE_BYTES_MAX: u64 = 1 << 40;
/// Most files accepted (65,536 buckets, as many pending swaps, a few more).
pub(super) const FILES_MAX: u64 = 1 << 18;
/// Bytes copied at a time.
const CHUNK_BYTES: usize = 1 << 20;

/// What an archive held, or what was written into one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) struct SnapshotSummary {
    /// Files in the archive.
    pub(crate) files: u64,
    /// Bytes of the whole archive (header, records, files, end record).
    pub(crate) bytes: u64,
}

/// A file record's fields before its bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct FileHeader {
    /// Relative path, `/`-separated (checked by [`check_path`]).
    pub(super) path: String,
    pub(super) len: u64,
    pub(super) crc: u32,
}

/// The error for a damaged or foreign archive.
fn bad(why: impl Into<String>) -> Error {
    Error::BadSnapshot(why.into())
}

/// Whether `path` may name a file of a shard directory in an archive:
/// relative, plain components (no `.`, `..`, empty ones, NUL or
/// backslash), and one of `index/data.mdb`, `routing.toml`,
/// `buckets/<2 hex>/<2 hex>`, `compact/<8 hex>.<16 hex>.next`.
pub(super) fn check_path(path: &str) -> Result<()> {
    let plain = !path.is_empty()
        && path.len() <= PATH_BYTES_MAX
        && !path.contains(['\0', '\\'])
        && path
            .split('/')
            .all(|c| !c.is_empty() && c != "." && c != "..");
    if !plain {
        return Err(bad(format!("unsafe path {path:?}")));
    }
    let hex = |c: &str, n: usize| c.len() == n && c.bytes().all(|b| b.is_ascii_hexdigit());
    let compacted = |name: &str| {
        let stem = name.strip_suffix(".next");
        let parts = stem.and_then(|s| s.split_once('.'));
        parts.is_some_and(|(bucket, gen)| hex(bucket, 8) && hex(gen, 16))
    };
    let parts: Vec<&str> = path.split('/').collect();
    let known = match parts.as_slice() {
        ["index", "data.mdb"] | ["routing.toml"] => true,
        ["buckets", d, f] => hex(d, 2) && hex(f, 2),
        ["compact", name] => compacted(name),
        _ => false,
    };
    if !known {
        return Err(bad(format!("path {path:?} is not a shard file")));
    }
    Ok(())
}

/// Writes an archive into `out`.
pub(super) struct ArchiveWriter<'a> {
    out: BufWriter<&'a mut dyn Write>,
    listing_crc: u32,
    files: u64,
    file_bytes: u64,
    bytes: u64,
}

impl<'a> ArchiveWriter<'a> {
    /// Start an archive: write its header.
    pub(super) fn start(out: &'a mut dyn Write) -> Result<Self> {
        let mut w = ArchiveWriter {
            out: BufWriter::with_capacity(CHUNK_BYTES, out),
            listing_crc: 0,
            files: 0,
            file_bytes: 0,
            bytes: 0,
        };
        let mut header = Vec::with_capacity(HEADER_BYTES);
        header.extend_from_slice(MAGIC);
        header.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
        header.extend_from_slice(&0u32.to_le_bytes());
        w.put_listed(&header)?;
        Ok(w)
    }

    /// Write bytes the listing CRC covers.
    fn put_listed(&mut self, bytes: &[u8]) -> Result<()> {
        self.listing_crc = crc32c::crc32c_append(self.listing_crc, bytes);
        self.put(bytes)
    }

    fn put(&mut self, bytes: &[u8]) -> Result<()> {
        self.out.write_all(bytes)?;
        self.bytes += bytes.len() as u64;
        Ok(())
    }

    /// Add the first `len` bytes of `file` under `path`.
    pub(super) fn file(&mut self, path: &str, file: &mut File, len: u64) -> Result<()> {
        check_path(path).map_err(|e| Error::Storage(format!("archiving: {e}")))?;
        let crc = crc_of(file, len)?;
        let mut fields = Vec::with_capacity(2 + path.len() + 12);
        fields.extend_from_slice(&(path.len() as u16).to_le_bytes());
        fields.extend_from_slice(path.as_bytes());
        fields.extend_from_slice(&len.to_le_bytes());
        fields.extend_from_slice(&crc.to_le_bytes());
        self.put_listed(&fields)?;
        let copied_crc = self.copy_from(file, len)?;
        if copied_crc != crc {
            return Err(Error::Storage(format!(
                "{path} changed while it was archived"
            )));
        }
        self.files += 1;
        self.file_bytes += len;
        Ok(())
    }

    /// Copy the first `len` bytes of `file` out; their CRC.
    fn copy_from(&mut self, file: &mut File, len: u64) -> Result<u32> {
        each_chunk(file, len, |chunk| self.put(chunk))
    }

    /// Write the end record and flush; what was written.
    pub(super) fn finish(mut self) -> Result<SnapshotSummary> {
        let mut end = Vec::with_capacity(18);
        end.extend_from_slice(&0u16.to_le_bytes());
        end.extend_from_slice(&self.files.to_le_bytes());
        end.extend_from_slice(&self.file_bytes.to_le_bytes());
        self.put_listed(&end)?;
        let crc = self.listing_crc;
        self.put(&crc.to_le_bytes())?;
        self.out.flush()?;
        Ok(SnapshotSummary {
            files: self.files,
            bytes: self.bytes,
        })
    }
}

/// CRC of the first `len` bytes of `file`.
fn crc_of(file: &mut File, len: u64) -> Result<u32> {
    each_chunk(file, len, |_| Ok(()))
}

/// Hand the first `len` bytes of `file` to `f`, a chunk at a time; their
/// CRC.
fn each_chunk(file: &mut File, len: u64, mut f: impl FnMut(&[u8]) -> Result<()>) -> Result<u32> {
    file.seek(SeekFrom::Start(0))?;
    let mut buf = vec![0u8; CHUNK_BYTES.min(len as usize)];
    let (mut left, mut crc) = (len, 0u32);
    while left > 0 {
        let n = left.min(buf.len() as u64) as usize;
        file.read_exact(&mut buf[..n])?;
        crc = crc32c::crc32c_append(crc, &buf[..n]);
        f(&buf[..n])?;
        left -= n as u64;
    }
    Ok(crc)
}

/// Reads and checks an archive from `input`.
pub(super) struct ArchiveReader<'a> {
    input: BufReader<&'a mut dyn Read>,
    listing_crc: u32,
    files: u64,
    file_bytes: u64,
    bytes: u64,
}

impl<'a> ArchiveReader<'a> {
    /// Read and check the header.
    pub(super) fn start(input: &'a mut dyn Read) -> Result<Self> {
        let mut r = ArchiveReader {
            input: BufReader::with_capacity(CHUNK_BYTES, input),
            listing_crc: 0,
            files: 0,
            file_bytes: 0,
            bytes: 0,
        };
        let mut header = [0u8; HEADER_BYTES];
        r.take_listed(&mut header)?;
        if &header[..8] != MAGIC {
            return Err(bad("not a snapshot archive (bad magic)"));
        }
        let version = u32::from_le_bytes(header[8..12].try_into().expect("4 bytes"));
        if version != FORMAT_VERSION || header[12..16] != [0; 4] {
            return Err(bad(format!(
                "format version {version} is not {FORMAT_VERSION}"
            )));
        }
        Ok(r)
    }

    /// Fill `buf` from the input; the end of input is truncation.
    fn take(&mut self, buf: &mut [u8]) -> Result<()> {
        self.input.read_exact(buf).map_err(|e| match e.kind() {
            std::io::ErrorKind::UnexpectedEof => bad("truncated"),
            _ => Error::Io(e),
        })?;
        self.bytes += buf.len() as u64;
        Ok(())
    }

    /// [`ArchiveReader::take`] bytes the listing CRC covers.
    fn take_listed(&mut self, buf: &mut [u8]) -> Result<()> {
        self.take(buf)?;
        self.listing_crc = crc32c::crc32c_append(self.listing_crc, buf);
        Ok(())
    }

    fn take_u16(&mut self) -> Result<u16> {
        let mut b = [0u8; 2];
        self.take_listed(&mut b)?;
        Ok(u16::from_le_bytes(b))
    }

    fn take_u32(&mut self) -> Result<u32> {
        let mut b = [0u8; 4];
        self.take_listed(&mut b)?;
        Ok(u32::from_le_bytes(b))
    }

    fn take_u64(&mut self) -> Result<u64> {
        let mut b = [0u8; 8];
        self.take_listed(&mut b)?;
        Ok(u64::from_le_bytes(b))
    }

    /// The next file's header, or `None` at the end record (whose path
    /// length was read).
    pub(super) fn next_file(&mut self) -> Result<Option<FileHeader>> {
        let path_len = usize::from(self.take_u16()?);
        if path_len == 0 {
            return Ok(None);
        }
        if path_len > PATH_BYTES_MAX {
            return Err(bad(format!("a path of {path_len} bytes")));
        }
        let mut path = vec![0u8; path_len];
        self.take_listed(&mut path)?;
        let path = String::from_utf8(path).map_err(|_| bad("a path that is not UTF-8"))?;
        check_path(&path)?;
        let len = self.take_u64()?;
        if len > FILE_BYTES_MAX {
            return Err(bad(format!("{path} claims {len} bytes")));
        }
        let crc = self.take_u32()?;
        self.files += 1;
        if self.files > FILES_MAX {
            return Err(bad(format!("more than {FILES_MAX} files")));
        }
        Ok(Some(FileHeader { path, len, crc }))
    }

    /// Copy the bytes of the file `header` describes into `out`, checking
    /// their CRC.
    pub(super) fn copy_file(&mut self, header: &FileHeader, out: &mut File) -> Result<()> {
        let mut buf = vec![0u8; CHUNK_BYTES.min(header.len as usize)];
        let (mut left, mut crc) = (header.len, 0u32);
        while left > 0 {
            let n = left.min(buf.len() as u64) as usize;
            self.take(&mut buf[..n])?;
            crc = crc32c::crc32c_append(crc, &buf[..n]);
            out.write_all(&buf[..n])?;
            left -= n as u64;
        }
        if crc != header.crc {
            return Err(bad(format!("{} fails its checksum", header.path)));
        }
        self.file_bytes += header.len;
        Ok(())
    }

    /// Check the end record (after [`ArchiveReader::next_file`] returned
    /// `None`) and that nothing follows it; what was read.
    pub(super) fn finish(mut self) -> Result<SnapshotSummary> {
        let files = self.take_u64()?;
        let file_bytes = self.take_u64()?;
        let want = self.listing_crc;
        let mut b = [0u8; 4];
        self.take(&mut b)?;
        if u32::from_le_bytes(b) != want {
            return Err(bad("the listing fails its checksum"));
        }
        if (files, file_bytes) != (self.files, self.file_bytes) {
            return Err(bad(format!(
                "the end record counts {files} files of {file_bytes} bytes, the archive held {} of {}",
                self.files, self.file_bytes
            )));
        }
        if self.input.read(&mut [0u8; 1])? != 0 {
            return Err(bad("bytes follow the end record"));
        }
        Ok(SnapshotSummary {
            files,
            bytes: self.bytes,
        })
    }
}
