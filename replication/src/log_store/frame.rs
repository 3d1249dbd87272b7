//! Checked frames (`u32 length | u32 CRC-32C | body`) and the small
//! single-frame files (`vote`, `committed`, `purged`), replaced atomically.

use super::LogStoreError;
use serde::{de::DeserializeOwned, Serialize};
use std::{
    fs::{self, File},
    io::{self, Write},
    path::Path,
};

/// Bytes of a frame header: body length, then CRC-32C of the body.
pub(super) const FRAME_HEADER_BYTES: usize = 8;

/// Largest body of a `vote`, `committed` or `purged` file.
pub(super) const META_BODY_BYTES_MAX: u32 = 4096;

/// Why bytes are not a valid frame.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(super) enum FrameError {
    #[error("frame header cut short ({available} of 8 bytes)")]
    ShortHeader { available: usize },
    #[error("frame body length {len} is 0 or over the maximum {max}")]
    BadLength { len: u32, max: u32 },
    #[error("frame body cut short ({available} of {len} bytes)")]
    ShortBody { len: u32, available: usize },
    #[error("frame CRC mismatch (stored {stored:#010x}, computed {computed:#010x})")]
    BadCrc { stored: u32, computed: u32 },
}

/// Decode the frame at the start of `buf`: its body and the frame's total
/// length. Never panics, whatever the bytes.
pub(super) fn decode_frame(buf: &[u8], body_bytes_max: u32) -> Result<(&[u8], usize), FrameError> {
    let Some((header, rest)) = buf.split_first_chunk::<FRAME_HEADER_BYTES>() else {
        return Err(FrameError::ShortHeader {
            available: buf.len(),
        });
    };
    let [l0, l1, l2, l3, c0, c1, c2, c3] = *header;
    let len = u32::from_le_bytes([l0, l1, l2, l3]);
    let stored = u32::from_le_bytes([c0, c1, c2, c3]);
    if len == 0 || len > body_bytes_max {
        return Err(FrameError::BadLength {
            len,
            max: body_bytes_max,
        });
    }
    let Some(body) = rest.get(..len as usize) else {
        return Err(FrameError::ShortBody {
            len,
            available: rest.len(),
        });
    };
    let computed = crc32c::crc32c(body);
    if computed != stored {
        return Err(FrameError::BadCrc { stored, computed });
    }
    Ok((body, FRAME_HEADER_BYTES + body.len()))
}

/// Append `value` as a frame to `out`; returns the body length. The
/// caller checks the length against its maximum.
pub(super) fn encode_frame_into<T: Serialize>(
    value: &T,
    out: Vec<u8>,
) -> Result<(Vec<u8>, usize), postcard::Error> {
    let start = out.len();
    let mut out = out;
    out.extend_from_slice(&[0; FRAME_HEADER_BYTES]);
    let mut out = postcard::to_extend(value, out)?;
    let body_start = start + FRAME_HEADER_BYTES;
    let len = out.len() - body_start;
    let crc = crc32c::crc32c(&out[body_start..]);
    // A body longer than u32::MAX cannot be framed; the caller refuses it
    // (its maximum is far below), so the truncated header is never written.
    let len32 = u32::try_from(len).unwrap_or(u32::MAX);
    out[start..start + 4].copy_from_slice(&len32.to_le_bytes());
    out[start + 4..body_start].copy_from_slice(&crc.to_le_bytes());
    Ok((out, len))
}

/// Why a single-frame file does not decode.
#[derive(Debug, thiserror::Error)]
pub(super) enum MetaError {
    #[error("{0}")]
    Frame(#[from] FrameError),
    #[error("{extra} bytes after the frame")]
    Trailing { extra: usize },
    #[error("body does not decode: {0}")]
    Decode(#[from] postcard::Error),
}

/// Encode `value` as a single-frame file.
pub(super) fn encode_meta<T: Serialize>(value: &T) -> Result<Vec<u8>, postcard::Error> {
    let (bytes, len) = encode_frame_into(value, Vec::new())?;
    if len > META_BODY_BYTES_MAX as usize {
        return Err(postcard::Error::SerializeBufferFull);
    }
    Ok(bytes)
}

/// Decode a single-frame file: exactly one valid frame whose body is a
/// `T`. Never panics, whatever the bytes.
pub(super) fn decode_meta<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, MetaError> {
    let (body, frame_len) = decode_frame(bytes, META_BODY_BYTES_MAX)?;
    if frame_len != bytes.len() {
        return Err(MetaError::Trailing {
            extra: bytes.len() - frame_len,
        });
    }
    Ok(postcard::from_bytes(body)?)
}

/// Read the single-frame file `dir/name`: `None` if it does not exist.
pub(super) fn read_meta<T: DeserializeOwned>(
    dir: &Path,
    name: &str,
) -> Result<Option<T>, LogStoreError> {
    let path = dir.join(name);
    let bytes = match fs::read(&path) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(LogStoreError::io("read", path, e)),
    };
    decode_meta(&bytes)
        .map(Some)
        .map_err(|e| LogStoreError::damaged(path, 0, e.to_string()))
}

/// Replace `dir/name` with `bytes` atomically: write `name.tmp`, fsync
/// it, rename it over `name`, fsync the directory.
pub(super) fn write_atomic(dir: &Path, name: &str, bytes: &[u8]) -> io::Result<()> {
    let tmp = dir.join(format!("{name}.tmp"));
    let mut file = File::create(&tmp)?;
    file.write_all(bytes)?;
    file.sync_all()?;
    drop(file);
    fs::rename(&tmp, dir.join(name))?;
    sync_dir(dir)
}

/// fsync a directory (its entries: created, renamed, removed files).
pub(super) fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;
    use openraft::{CommittedLeaderId, LogId, Vote};
    use proptest::prelude::*;

    #[test]
    fn frame_round_trips_and_rejects_damage() {
        let (bytes, len) = encode_frame_into(&"hello".to_string(), Vec::new()).unwrap();
        assert_eq!(bytes.len(), FRAME_HEADER_BYTES + len);
        let (body, frame_len) = decode_frame(&bytes, 100).unwrap();
        assert_eq!(frame_len, bytes.len());
        assert_eq!(postcard::from_bytes::<String>(body).unwrap(), "hello");
        for i in 0..bytes.len() {
            let mut bad = bytes.clone();
            bad[i] ^= 0x10;
            assert!(decode_frame(&bad, 100).is_err(), "flip at {i}");
        }
        for cut in 0..bytes.len() {
            assert!(decode_frame(&bytes[..cut], 100).is_err(), "cut at {cut}");
        }
        assert!(matches!(
            decode_frame(&bytes, len as u32 - 1),
            Err(FrameError::BadLength { .. })
        ));
        assert!(decode_frame(&[0; 16], 100).is_err(), "zeros are no frame");
    }

    #[test]
    fn meta_round_trips_and_refuses_trailing_bytes() {
        let vote = Vote::<u64>::new(7, 3);
        let bytes = encode_meta(&vote).unwrap();
        assert_eq!(decode_meta::<Vote<u64>>(&bytes).unwrap(), vote);
        let mut longer = bytes.clone();
        longer.push(0);
        assert!(matches!(
            decode_meta::<Vote<u64>>(&longer),
            Err(MetaError::Trailing { extra: 1 })
        ));
    }

    #[test]
    fn write_atomic_replaces_the_file() {
        let dir = tempfile::tempdir().unwrap();
        write_atomic(dir.path(), "vote", b"one").unwrap();
        write_atomic(dir.path(), "vote", b"two").unwrap();
        assert_eq!(fs::read(dir.path().join("vote")).unwrap(), b"two");
        assert!(!dir.path().join("vote.tmp").exists());
    }

    proptest! {
        #[test]
        fn decode_frame_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..64),
                                     max in any::<u32>()) {
            if let Ok((body, len)) = decode_frame(&bytes, max) {
                prop_assert!(len <= bytes.len());
                prop_assert_eq!(body.len() + FRAME_HEADER_BYTES, len);
            }
        }

        #[test]
        fn decode_frame_of_a_valid_header_never_panics(body in proptest::collection::vec(any::<u8>(), 0..64),
                                                       len in 0u32..80, flip in any::<bool>()) {
            // Headers that claim plausible lengths over arbitrary bodies.
            let crc = crc32c::crc32c(&body) ^ u32::from(flip);
            let mut bytes = len.to_le_bytes().to_vec();
            bytes.extend_from_slice(&crc.to_le_bytes());
            bytes.extend_from_slice(&body);
            let ok = decode_frame(&bytes, 64).is_ok();
            prop_assert_eq!(ok, !flip && len as usize == body.len() && len > 0);
        }

        #[test]
        fn decode_meta_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..64)) {
            let _ = decode_meta::<Vote<u64>>(&bytes);
            let _ = decode_meta::<Option<LogId<u64>>>(&bytes);
            let _ = decode_meta::<LogId<u64>>(&bytes);
        }

        #[test]
        fn decode_meta_of_framed_garbage_never_panics(body in proptest::collection::vec(any::<u8>(), 1..64)) {
            // A valid frame around arbitrary bytes reaches the body decoder.
            let mut bytes = (body.len() as u32).to_le_bytes().to_vec();
            bytes.extend_from_slice(&crc32c::crc32c(&body).to_le_bytes());
            bytes.extend_from_slice(&body);
            let _ = decode_meta::<Vote<u64>>(&bytes);
            let _ = decode_meta::<Option<LogId<u64>>>(&bytes);
            let _ = decode_meta::<LogId<u64>>(&bytes);
        }

        #[test]
        fn meta_round_trips(term in any::<u64>(), node in any::<u64>(), index in any::<u64>()) {
            let id = LogId::new(CommittedLeaderId::new(term, node), index);
            let bytes = encode_meta(&Some(id)).unwrap();
            prop_assert_eq!(decode_meta::<Option<LogId<u64>>>(&bytes).unwrap(), Some(id));
        }
    }
}
