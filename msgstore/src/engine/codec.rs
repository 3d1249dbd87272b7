//! Byte layouts shared by the write-ahead log and the bucket files.
//!
//! Both are sequences of checked frames: `len: u32 LE`, `crc32c: u32 LE` of
//! the `len` body bytes that follow, then the body. A frame whose length runs
//! past the end of the valid region, or whose checksum does not match, is
//! never returned as data. See docs/STORAGE.md for every layout.

/// Bytes before a checked frame's body (length + checksum).
pub const FRAME_HEADER_BYTES: usize = 8;

/// Sentinel `prev_offset` of a user's first record in a bucket.
pub const NO_PREV: u64 = u64::MAX;

/// Fields every stored message carries, in the log and in its bucket.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MessageHeader {
    pub user: u64,
    pub seq: u64,
    pub timestamp_ms: u64,
    pub msg_id: u128,
}

/// Encoded size of a [`MessageHeader`].
pub const MESSAGE_HEADER_BYTES: usize = 8 + 8 + 8 + 16;

/// Body bytes of a bucket record before its payload (header + prev offset).
pub const RECORD_FIXED_BYTES: usize = MESSAGE_HEADER_BYTES + 8;

/// Why a checked frame could not be read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FrameFault {
    /// The region ends inside the frame (a torn tail).
    Truncated,
    /// The length field is impossible (zero, or larger than allowed).
    BadLength,
    /// The body does not match its checksum.
    BadChecksum,
}

impl MessageHeader {
    pub fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.user.to_le_bytes());
        out.extend_from_slice(&self.seq.to_le_bytes());
        out.extend_from_slice(&self.timestamp_ms.to_le_bytes());
        out.extend_from_slice(&self.msg_id.to_le_bytes());
    }

    /// Decode from exactly [`MESSAGE_HEADER_BYTES`] or more bytes.
    pub fn decode(b: &[u8]) -> Option<MessageHeader> {
        if b.len() < MESSAGE_HEADER_BYTES {
            return None;
        }
        Some(MessageHeader {
            user: le_u64(&b[0..8]),
            seq: le_u64(&b[8..16]),
            timestamp_ms: le_u64(&b[16..24]),
            msg_id: u128::from_le_bytes(b[24..40].try_into().ok()?),
        })
    }
}

pub fn le_u64(b: &[u8]) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[..8]);
    u64::from_le_bytes(a)
}

pub fn le_u32(b: &[u8]) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[..4]);
    u32::from_le_bytes(a)
}

/// Start a checked frame in `out`; returns the position to pass to
/// [`finish_frame`] once the body has been appended.
pub fn begin_frame(out: &mut Vec<u8>) -> usize {
    let at = out.len();
    out.extend_from_slice(&[0u8; FRAME_HEADER_BYTES]);
    at
}

/// Fill in the length and checksum of the frame begun at `at`.
pub fn finish_frame(out: &mut [u8], at: usize) {
    let body = &out[at + FRAME_HEADER_BYTES..];
    let len = body.len() as u32;
    let crc = crc32c::crc32c(body);
    out[at..at + 4].copy_from_slice(&len.to_le_bytes());
    out[at + 4..at + 8].copy_from_slice(&crc.to_le_bytes());
}

/// Read the checked frame at `at` in `region`; returns its body.
pub fn read_frame(region: &[u8], at: usize, body_bytes_max: usize) -> Result<&[u8], FrameFault> {
    let header = region
        .get(at..at + FRAME_HEADER_BYTES)
        .ok_or(FrameFault::Truncated)?;
    let len = le_u32(&header[0..4]) as usize;
    let crc = le_u32(&header[4..8]);
    if len == 0 || len > body_bytes_max {
        return Err(FrameFault::BadLength);
    }
    let start = at + FRAME_HEADER_BYTES;
    let body = region
        .get(start..start + len)
        .ok_or(FrameFault::Truncated)?;
    if crc32c::crc32c(body) != crc {
        return Err(FrameFault::BadChecksum);
    }
    Ok(body)
}

/// A bucket record: header, offset of the same user's previous record in
/// the same bucket file, payload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RecordView<'a> {
    pub header: MessageHeader,
    pub prev_offset: u64,
    pub payload: &'a [u8],
}

impl RecordView<'_> {
    /// Total bytes the record takes in its bucket file.
    pub fn stored_bytes(&self) -> u64 {
        record_stored_bytes(self.payload.len())
    }
}

pub fn record_stored_bytes(payload_bytes: usize) -> u64 {
    (FRAME_HEADER_BYTES + RECORD_FIXED_BYTES + payload_bytes) as u64
}

pub fn encode_record(header: &MessageHeader, prev_offset: u64, payload: &[u8], out: &mut Vec<u8>) {
    let at = begin_frame(out);
    header.encode(out);
    out.extend_from_slice(&prev_offset.to_le_bytes());
    out.extend_from_slice(payload);
    finish_frame(out, at);
}

/// Read the bucket record at `offset` of `region`.
pub fn read_record(
    region: &[u8],
    offset: u64,
    payload_bytes_max: usize,
) -> Result<RecordView<'_>, FrameFault> {
    let at = usize::try_from(offset).map_err(|_| FrameFault::Truncated)?;
    let body = read_frame(region, at, RECORD_FIXED_BYTES + payload_bytes_max)?;
    if body.len() < RECORD_FIXED_BYTES {
        return Err(FrameFault::BadLength);
    }
    let header = MessageHeader::decode(body).ok_or(FrameFault::BadLength)?;
    Ok(RecordView {
        header,
        prev_offset: le_u64(&body[MESSAGE_HEADER_BYTES..RECORD_FIXED_BYTES]),
        payload: &body[RECORD_FIXED_BYTES..],
    })
}

/// The record at `offset`, parsed without checking its checksum (for
/// walks that only follow or count records; whatever is shown to a reader
/// goes through [`read_record`]). Bounds are still checked: `None` if it
/// does not fit.
pub fn parse_record(region: &[u8], offset: u64) -> Option<RecordView<'_>> {
    let at = usize::try_from(offset).ok()?;
    let len = le_u32(region.get(at..at + 4)?) as usize;
    let start = at + FRAME_HEADER_BYTES;
    let body = region.get(start..start.checked_add(len)?)?;
    let header = MessageHeader::decode(body)?;
    Some(RecordView {
        header,
        prev_offset: le_u64(body.get(MESSAGE_HEADER_BYTES..RECORD_FIXED_BYTES)?),
        payload: body.get(RECORD_FIXED_BYTES..)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn header() -> MessageHeader {
        MessageHeader {
            user: 42,
            seq: 7,
            timestamp_ms: 1_700_000_000_000,
            msg_id: u128::MAX - 3,
        }
    }

    #[test]
    fn record_round_trip_and_every_truncation_is_detected() {
        let mut out = vec![0u8; 3];
        encode_record(&header(), 99, b"hello", &mut out);
        let rec = read_record(&out, 3, 1024).unwrap();
        assert_eq!(rec.header, header());
        assert_eq!(rec.prev_offset, 99);
        assert_eq!(rec.payload, b"hello");
        assert_eq!(rec.stored_bytes() as usize, out.len() - 3);
        for cut in 3..out.len() {
            assert!(read_record(&out[..cut], 3, 1024).is_err(), "cut at {cut}");
            assert!(parse_record(&out[..cut], 3).is_none(), "cut at {cut}");
        }
        assert_eq!(parse_record(&out, 3), Some(rec));
    }

    #[test]
    fn every_bit_flip_is_detected() {
        let mut out = Vec::new();
        encode_record(&header(), NO_PREV, b"payload bytes", &mut out);
        for bit in 0..out.len() * 8 {
            let mut flipped = out.clone();
            flipped[bit / 8] ^= 1 << (bit % 8);
            assert!(read_record(&flipped, 0, 1024).is_err(), "bit {bit}");
        }
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..256), at in 0u64..300) {
            let _ = read_record(&bytes, at, 128);
            let _ = read_frame(&bytes, at as usize, 128);
            let _ = parse_record(&bytes, at);
        }
    }
}
