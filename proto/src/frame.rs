//! Length-prefixed postcard frames for TCP links.
//!
//! A frame is a 4-byte little-endian body length followed by that many bytes
//! of postcard-encoded body. The decoder distinguishes a frame that is not
//! complete yet ([`Decoded::Incomplete`]) from bytes that can never become a
//! valid frame ([`FrameError`]): callers read more in the first case and close
//! the connection in the second.

use bytes::{Buf, BytesMut};
use serde::{de::DeserializeOwned, Serialize};

/// Bytes of the length prefix.
pub const FRAME_HEADER_BYTES: usize = 4;

/// Default largest frame body a link accepts (1 MiB + room for headers).
/// Links may configure a smaller or larger limit; see each daemon's config.
pub const FRAME_BODY_BYTES_MAX_DEFAULT: usize = 1024 * 1024 + 64 * 1024;

/// Why bytes cannot be decoded into a frame.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FrameError {
    #[error("frame body of {len} bytes exceeds the limit of {max} bytes")]
    TooLarge { len: usize, max: usize },
    #[error("frame body is empty")]
    Empty,
    #[error("frame body is not a valid message: {0}")]
    Malformed(String),
}

/// Result of one decode attempt.
#[derive(Debug, PartialEq, Eq)]
pub enum Decoded<T> {
    /// A whole frame was decoded and consumed from the buffer.
    Frame(T),
    /// More bytes are needed; nothing was consumed.
    Incomplete,
}

/// postcard output appended to a `Vec`: each field is a push or a slice
/// copy, without the `io::Write` layer per field of `postcard::to_io`.
struct AppendTo<'a>(&'a mut Vec<u8>);

impl postcard::ser_flavors::Flavor for AppendTo<'_> {
    type Output = ();

    fn try_push(&mut self, byte: u8) -> postcard::Result<()> {
        self.0.push(byte);
        Ok(())
    }

    fn try_extend(&mut self, bytes: &[u8]) -> postcard::Result<()> {
        self.0.extend_from_slice(bytes);
        Ok(())
    }

    fn finalize(self) -> postcard::Result<()> {
        Ok(())
    }
}

/// Encode `msg` as one frame appended to `out`.
///
/// Returns [`FrameError::TooLarge`] (and leaves `out` as it was) if the body
/// would exceed `body_bytes_max`.
pub fn encode<T: Serialize>(
    msg: &T,
    body_bytes_max: usize,
    out: &mut Vec<u8>,
) -> Result<(), FrameError> {
    let start = out.len();
    out.extend_from_slice(&[0u8; FRAME_HEADER_BYTES]);
    let result = postcard::serialize_with_flavor(msg, AppendTo(&mut *out));
    let len = out.len() - start - FRAME_HEADER_BYTES;
    if let Err(e) = result {
        out.truncate(start);
        return Err(FrameError::Malformed(e.to_string()));
    }
    if len > body_bytes_max {
        out.truncate(start);
        return Err(FrameError::TooLarge {
            len,
            max: body_bytes_max,
        });
    }
    out[start..start + FRAME_HEADER_BYTES].copy_from_slice(&(len as u32).to_le_bytes());
    Ok(())
}

/// Try to decode one frame from the front of `buf`.
///
/// On [`Decoded::Frame`] the frame's bytes are removed from `buf`. On
/// [`Decoded::Incomplete`] and on error `buf` is left untouched. A declared
/// length over `body_bytes_max` is rejected before any body byte arrives, so
/// a peer cannot make us buffer an oversized frame.
pub fn decode<T: DeserializeOwned>(
    buf: &mut BytesMut,
    body_bytes_max: usize,
) -> Result<Decoded<T>, FrameError> {
    if buf.len() < FRAME_HEADER_BYTES {
        return Ok(Decoded::Incomplete);
    }
    let len = u32::from_le_bytes([buf[0], buf[1], buf[2], buf[3]]) as usize;
    if len > body_bytes_max {
        return Err(FrameError::TooLarge {
            len,
            max: body_bytes_max,
        });
    }
    if len == 0 {
        return Err(FrameError::Empty);
    }
    if buf.len() < FRAME_HEADER_BYTES + len {
        return Ok(Decoded::Incomplete);
    }
    let body = &buf[FRAME_HEADER_BYTES..FRAME_HEADER_BYTES + len];
    let msg = decode_body(body)?;
    buf.advance(FRAME_HEADER_BYTES + len);
    Ok(Decoded::Frame(msg))
}

/// Decode a complete frame body. Trailing bytes are an error: a body must be
/// exactly one message.
pub fn decode_body<T: DeserializeOwned>(body: &[u8]) -> Result<T, FrameError> {
    let (msg, rest) =
        postcard::take_from_bytes(body).map_err(|e| FrameError::Malformed(e.to_string()))?;
    if !rest.is_empty() {
        return Err(FrameError::Malformed(format!(
            "{} trailing bytes after the message",
            rest.len()
        )));
    }
    Ok(msg)
}

/// Test helper: decoding `bytes` as a `T` frame never panics, consumes
/// exactly one frame when it decodes one, and nothing otherwise.
#[cfg(test)]
pub(crate) fn decode_keeps_buffer_consistent<T: DeserializeOwned>(bytes: &[u8]) -> bool {
    let mut buf = BytesMut::from(bytes);
    match decode::<T>(&mut buf, 4096) {
        Ok(Decoded::Frame(_)) => buf.len() < bytes.len(),
        Ok(Decoded::Incomplete) | Err(_) => buf.len() == bytes.len(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::shard::{Request, RequestBody};
    use proptest::prelude::*;

    #[test]
    fn round_trip_and_incomplete() {
        let req = Request {
            id: 7,
            body: RequestBody::Ping,
        };
        let mut out = Vec::new();
        encode(&req, 1024, &mut out).unwrap();
        for cut in 0..out.len() {
            let mut partial = BytesMut::from(&out[..cut]);
            assert_eq!(
                decode::<Request>(&mut partial, 1024).unwrap(),
                Decoded::Incomplete
            );
            assert_eq!(partial.len(), cut, "incomplete must consume nothing");
        }
        let mut whole = BytesMut::from(&out[..]);
        assert_eq!(
            decode::<Request>(&mut whole, 1024).unwrap(),
            Decoded::Frame(req)
        );
        assert!(whole.is_empty());
    }

    #[test]
    fn oversized_declared_length_is_rejected_early() {
        let mut buf = BytesMut::from(&(10_000u32).to_le_bytes()[..]);
        assert_eq!(
            decode::<Request>(&mut buf, 1024),
            Err(FrameError::TooLarge {
                len: 10_000,
                max: 1024
            })
        );
    }

    #[test]
    fn encode_refuses_oversized_body() {
        let req = Request {
            id: 1,
            body: RequestBody::Append {
                user: 1,
                msg_id: 2,
                payload: vec![0u8; 2000],
            },
        };
        let mut out = vec![9u8];
        assert!(matches!(
            encode(&req, 1024, &mut out),
            Err(FrameError::TooLarge { .. })
        ));
        assert_eq!(
            out,
            vec![9u8],
            "a refused frame leaves the buffer as it was"
        );
    }

    #[test]
    fn trailing_bytes_are_malformed() {
        let mut body = postcard::to_stdvec(&Request {
            id: 1,
            body: RequestBody::Ping,
        })
        .unwrap();
        body.push(0);
        assert!(matches!(
            decode_body::<Request>(&body),
            Err(FrameError::Malformed(_))
        ));
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            prop_assert!(decode_keeps_buffer_consistent::<Request>(&bytes));
            prop_assert!(decode_keeps_buffer_consistent::<crate::shard::Response>(&bytes));
        }
    }
}
