//! Byte layouts of the five datagram types and of the frames inside a
//! transport datagram's plaintext. Every parser checks exact lengths and
//! returns `None` for anything else; none of them panics.

use super::config::{DATAGRAM_BYTES_MAX, HANDSHAKE_INIT_BYTES};

pub const TYPE_INIT: u8 = 1;
pub const TYPE_RESPONSE: u8 = 2;
pub const TYPE_COOKIE: u8 = 3;
pub const TYPE_TRANSPORT: u8 = 4;
pub const TYPE_RESET: u8 = 5;

pub const MAC_BYTES: usize = 16;
pub const TAG_BYTES: usize = 16;
pub const DH_BYTES: usize = 32;

/// INIT: type | client_index u32 | noise msg1 | mac1 | mac2.
pub const INIT_NOISE_BYTES: usize = HANDSHAKE_INIT_BYTES - 1 - 4 - 2 * MAC_BYTES;
/// The padded plaintext block inside msg1: payload_len u16 | payload | zeros.
pub const INIT_BLOCK_BYTES: usize = INIT_NOISE_BYTES - DH_BYTES - TAG_BYTES;
/// Largest login payload a handshake initiation carries.
pub const INIT_PAYLOAD_MAX: usize = INIT_BLOCK_BYTES - 2;
/// Offset of mac1 (it covers every byte before it).
pub const INIT_MAC1_AT: usize = 5 + INIT_NOISE_BYTES;
/// Offset of mac2 (it covers every byte before it).
pub const INIT_MAC2_AT: usize = INIT_MAC1_AT + MAC_BYTES;

/// RESPONSE: type | client_index u32 | session_id u64 | noise msg2, where
/// msg2's plaintext block is status u8 | reset_token [16] | payload_len u16
/// | payload.
pub const RESPONSE_HEADER_BYTES: usize = 1 + 4 + 8;
/// A session's RESET token (`crypto::reset_token`), 16 bytes.
pub const RESET_TOKEN_BYTES: usize = MAC_BYTES;
pub const RESPONSE_BLOCK_HEADER_BYTES: usize = 1 + RESET_TOKEN_BYTES + 2;
/// Largest answer payload; with it the response is never larger than the
/// (always padded) initiation.
pub const RESPONSE_PAYLOAD_MAX: usize = HANDSHAKE_INIT_BYTES
    - RESPONSE_HEADER_BYTES
    - DH_BYTES
    - TAG_BYTES
    - RESPONSE_BLOCK_HEADER_BYTES;

/// COOKIE: type | client_index u32 | cookie.
pub const COOKIE_BYTES: usize = 1 + 4 + MAC_BYTES;

/// RESET: type | session_id u64 | reset_token [16]; smaller than the
/// smallest TRANSPORT datagram, the only thing it answers.
pub const RESET_BYTES: usize = 1 + 8 + RESET_TOKEN_BYTES;

/// TRANSPORT: type | session_id u64 | counter u64 | AEAD(plaintext).
pub const TRANSPORT_HEADER_BYTES: usize = 1 + 8 + 8;
/// Largest transport plaintext.
pub const PLAINTEXT_BYTES_MAX: usize = DATAGRAM_BYTES_MAX - TRANSPORT_HEADER_BYTES - TAG_BYTES;

pub const FRAME_ACK: u8 = 1;
pub const FRAME_FRAG: u8 = 2;
pub const FRAME_PING: u8 = 3;
pub const FRAME_CLOSE: u8 = 4;
pub const ACK_FRAME_BYTES: usize = 1 + 4 + 8 + 4;
pub const FRAG_HEADER_BYTES: usize = 1 + 4 + 1 + 2;
pub const CLOSE_FRAME_BYTES: usize = 2;
/// Largest fragment payload: a datagram carrying an ACK and one FRAG.
pub const FRAG_DATA_MAX: usize = PLAINTEXT_BYTES_MAX - ACK_FRAME_BYTES - FRAG_HEADER_BYTES;

/// Status byte of a handshake response.
pub const STATUS_ACCEPTED: u8 = 0;
pub const STATUS_REJECTED: u8 = 1;

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

/// A parsed handshake initiation (borrowing the datagram).
#[derive(Debug)]
pub struct Init<'a> {
    pub client_index: u32,
    pub noise: &'a [u8],
    pub mac1: &'a [u8],
    pub mac2: &'a [u8],
}

pub fn parse_init(d: &[u8]) -> Option<Init<'_>> {
    if d.len() != HANDSHAKE_INIT_BYTES || d[0] != TYPE_INIT {
        return None;
    }
    Some(Init {
        client_index: u32_at(d, 1),
        noise: &d[5..INIT_MAC1_AT],
        mac1: &d[INIT_MAC1_AT..INIT_MAC2_AT],
        mac2: &d[INIT_MAC2_AT..],
    })
}

#[derive(Debug)]
pub struct Response<'a> {
    pub client_index: u32,
    pub session_id: u64,
    pub noise: &'a [u8],
}

pub fn parse_response(d: &[u8]) -> Option<Response<'_>> {
    let min = RESPONSE_HEADER_BYTES + DH_BYTES + TAG_BYTES + RESPONSE_BLOCK_HEADER_BYTES;
    if d.len() < min || d.len() > HANDSHAKE_INIT_BYTES || d[0] != TYPE_RESPONSE {
        return None;
    }
    Some(Response {
        client_index: u32_at(d, 1),
        session_id: u64_at(d, 5),
        noise: &d[RESPONSE_HEADER_BYTES..],
    })
}

pub fn parse_cookie(d: &[u8]) -> Option<(u32, [u8; MAC_BYTES])> {
    if d.len() != COOKIE_BYTES || d[0] != TYPE_COOKIE {
        return None;
    }
    Some((u32_at(d, 1), d[5..].try_into().expect("16 bytes")))
}

pub fn write_cookie(client_index: u32, cookie: &[u8; MAC_BYTES]) -> Vec<u8> {
    let mut d = Vec::with_capacity(COOKIE_BYTES);
    d.push(TYPE_COOKIE);
    d.extend_from_slice(&client_index.to_le_bytes());
    d.extend_from_slice(cookie);
    d
}

/// The plaintext block of a RESPONSE: status | reset_token | payload_len
/// u16 | payload, exactly (the payload at most `RESPONSE_PAYLOAD_MAX`).
pub fn write_response_block(
    status: u8,
    reset_token: &[u8; RESET_TOKEN_BYTES],
    payload: &[u8],
) -> Vec<u8> {
    assert!(payload.len() <= RESPONSE_PAYLOAD_MAX);
    let mut block = Vec::with_capacity(RESPONSE_BLOCK_HEADER_BYTES + payload.len());
    block.push(status);
    block.extend_from_slice(reset_token);
    block.extend_from_slice(&(payload.len() as u16).to_le_bytes());
    block.extend_from_slice(payload);
    block
}

/// A RESPONSE's plaintext block: (status, reset_token, payload), or `None`
/// unless the status is known and the length field matches exactly.
pub fn parse_response_block(b: &[u8]) -> Option<(u8, [u8; RESET_TOKEN_BYTES], &[u8])> {
    if b.len() < RESPONSE_BLOCK_HEADER_BYTES {
        return None;
    }
    let token: [u8; RESET_TOKEN_BYTES] = b[1..1 + RESET_TOKEN_BYTES].try_into().ok()?;
    let at = 1 + RESET_TOKEN_BYTES;
    let len = u16::from_le_bytes([b[at], b[at + 1]]) as usize;
    let payload = &b[RESPONSE_BLOCK_HEADER_BYTES..];
    let status_ok = b[0] == STATUS_ACCEPTED || b[0] == STATUS_REJECTED;
    (status_ok && payload.len() == len).then_some((b[0], token, payload))
}

/// A RESET: (session_id, reset_token), exactly `RESET_BYTES` long.
pub fn parse_reset(d: &[u8]) -> Option<(u64, [u8; RESET_TOKEN_BYTES])> {
    if d.len() != RESET_BYTES || d[0] != TYPE_RESET {
        return None;
    }
    Some((u64_at(d, 1), d[9..].try_into().ok()?))
}

pub fn write_reset(session_id: u64, token: &[u8; RESET_TOKEN_BYTES]) -> Vec<u8> {
    let mut d = Vec::with_capacity(RESET_BYTES);
    d.push(TYPE_RESET);
    d.extend_from_slice(&session_id.to_le_bytes());
    d.extend_from_slice(token);
    d
}

#[derive(Debug)]
pub struct Transport<'a> {
    pub session_id: u64,
    pub counter: u64,
    pub sealed: &'a [u8],
}

pub fn parse_transport(d: &[u8]) -> Option<Transport<'_>> {
    // At least one byte of plaintext (one frame).
    if d.len() < TRANSPORT_HEADER_BYTES + TAG_BYTES + 1
        || d.len() > DATAGRAM_BYTES_MAX
        || d[0] != TYPE_TRANSPORT
    {
        return None;
    }
    Some(Transport {
        session_id: u64_at(d, 1),
        counter: u64_at(d, 9),
        sealed: &d[TRANSPORT_HEADER_BYTES..],
    })
}

pub fn write_transport_header(buf: &mut [u8], session_id: u64, counter: u64) {
    buf[0] = TYPE_TRANSPORT;
    buf[1..9].copy_from_slice(&session_id.to_le_bytes());
    buf[9..17].copy_from_slice(&counter.to_le_bytes());
}

/// Session id of a datagram that claims to be a transport datagram (cheap
/// demultiplexing before any crypto).
pub fn transport_session_id(d: &[u8]) -> Option<u64> {
    parse_transport(d).map(|t| t.session_id)
}

/// One frame of a transport plaintext.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Frame<'a> {
    /// Cumulative ack `una` (every fragment below it received) plus a bitmap:
    /// bit i set = fragment `una + 1 + i` received.
    Ack {
        una: u32,
        sack: u64,
        ack_delay_us: u32,
    },
    /// A fragment: `rest` = fragments of the same message after this one.
    Frag {
        sn: u32,
        rest: u8,
        data: &'a [u8],
    },
    Ping,
    Close {
        reason: u8,
    },
}

impl Frame<'_> {
    pub fn is_ack_eliciting(&self) -> bool {
        matches!(self, Frame::Frag { .. } | Frame::Ping)
    }
}

/// Iterates the frames of a plaintext; yields `Err(())` once and stops on
/// the first malformed frame.
pub struct Frames<'a> {
    rest: &'a [u8],
    failed: bool,
}

pub fn frames(plaintext: &[u8]) -> Frames<'_> {
    Frames {
        rest: plaintext,
        failed: false,
    }
}

/// Whether every frame of `plaintext` parses and there is at least one.
pub fn frames_valid(plaintext: &[u8]) -> bool {
    !plaintext.is_empty() && frames(plaintext).all(|f| f.is_ok())
}

impl<'a> Iterator for Frames<'a> {
    type Item = Result<Frame<'a>, ()>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.failed || self.rest.is_empty() {
            return None;
        }
        let parsed = parse_frame(self.rest);
        match parsed {
            Some((frame, used)) => {
                self.rest = &self.rest[used..];
                Some(Ok(frame))
            }
            None => {
                self.failed = true;
                Some(Err(()))
            }
        }
    }
}

fn parse_frame(b: &[u8]) -> Option<(Frame<'_>, usize)> {
    match *b.first()? {
        FRAME_ACK if b.len() >= ACK_FRAME_BYTES => Some((
            Frame::Ack {
                una: u32_at(b, 1),
                sack: u64_at(b, 5),
                ack_delay_us: u32_at(b, 13),
            },
            ACK_FRAME_BYTES,
        )),
        FRAME_FRAG if b.len() >= FRAG_HEADER_BYTES => {
            let len = u16::from_le_bytes([b[6], b[7]]) as usize;
            let end = FRAG_HEADER_BYTES + len;
            if len == 0 || b.len() < end {
                return None;
            }
            let frame = Frame::Frag {
                sn: u32_at(b, 1),
                rest: b[5],
                data: &b[FRAG_HEADER_BYTES..end],
            };
            Some((frame, end))
        }
        FRAME_PING => Some((Frame::Ping, 1)),
        FRAME_CLOSE if b.len() >= CLOSE_FRAME_BYTES => {
            Some((Frame::Close { reason: b[1] }, CLOSE_FRAME_BYTES))
        }
        _ => None,
    }
}

/// Appends frames to a plaintext buffer of at most [`PLAINTEXT_BYTES_MAX`].
pub struct FrameWriter<'a> {
    buf: &'a mut [u8],
    len: usize,
}

impl<'a> FrameWriter<'a> {
    pub fn new(buf: &'a mut [u8]) -> Self {
        let cap = buf.len().min(PLAINTEXT_BYTES_MAX);
        FrameWriter {
            buf: &mut buf[..cap],
            len: 0,
        }
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn room(&self) -> usize {
        self.buf.len() - self.len
    }

    fn put(&mut self, bytes: &[u8]) {
        self.buf[self.len..self.len + bytes.len()].copy_from_slice(bytes);
        self.len += bytes.len();
    }

    /// False (and nothing written) if the frame does not fit.
    pub fn ack(&mut self, una: u32, sack: u64, ack_delay_us: u32) -> bool {
        if self.room() < ACK_FRAME_BYTES {
            return false;
        }
        self.put(&[FRAME_ACK]);
        self.put(&una.to_le_bytes());
        self.put(&sack.to_le_bytes());
        self.put(&ack_delay_us.to_le_bytes());
        true
    }

    pub fn frag(&mut self, sn: u32, rest: u8, data: &[u8]) -> bool {
        assert!(!data.is_empty() && data.len() <= FRAG_DATA_MAX);
        if self.room() < FRAG_HEADER_BYTES + data.len() {
            return false;
        }
        self.put(&[FRAME_FRAG]);
        self.put(&sn.to_le_bytes());
        self.put(&[rest]);
        self.put(&(data.len() as u16).to_le_bytes());
        self.put(data);
        true
    }

    pub fn ping(&mut self) -> bool {
        if self.room() < 1 {
            return false;
        }
        self.put(&[FRAME_PING]);
        true
    }

    pub fn close(&mut self, reason: u8) -> bool {
        if self.room() < CLOSE_FRAME_BYTES {
            return false;
        }
        self.put(&[FRAME_CLOSE, reason]);
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn layout_constants_add_up() {
        assert_eq!(INIT_MAC2_AT + MAC_BYTES, HANDSHAKE_INIT_BYTES);
        assert_eq!(INIT_PAYLOAD_MAX, 1113);
        assert_eq!(RESPONSE_PAYLOAD_MAX, 1120);
        const { assert!(RESET_BYTES < TRANSPORT_HEADER_BYTES + TAG_BYTES + 1) };
        assert_eq!(RESET_BYTES, 25);
        assert_eq!(PLAINTEXT_BYTES_MAX, 1167);
        assert_eq!(FRAG_DATA_MAX, 1142);
        let response_max = RESPONSE_HEADER_BYTES
            + DH_BYTES
            + RESPONSE_BLOCK_HEADER_BYTES
            + RESPONSE_PAYLOAD_MAX
            + TAG_BYTES;
        assert!(response_max <= HANDSHAKE_INIT_BYTES);
        const { assert!(COOKIE_BYTES < HANDSHAKE_INIT_BYTES) };
    }

    #[test]
    fn reset_and_response_block_round_trip_and_refuse_other_lengths() {
        let token = [9u8; RESET_TOKEN_BYTES];
        let d = write_reset(0x0102_0304_0506_0708, &token);
        assert_eq!(d.len(), RESET_BYTES);
        assert_eq!(parse_reset(&d), Some((0x0102_0304_0506_0708, token)));
        assert_eq!(parse_reset(&d[..24]), None);
        let mut long = d.clone();
        long.push(0);
        assert_eq!(parse_reset(&long), None);
        let mut other = d.clone();
        other[0] = TYPE_TRANSPORT;
        assert_eq!(parse_reset(&other), None);

        let b = write_response_block(STATUS_ACCEPTED, &token, b"hi");
        assert_eq!(b.len(), RESPONSE_BLOCK_HEADER_BYTES + 2);
        assert_eq!(
            parse_response_block(&b),
            Some((STATUS_ACCEPTED, token, &b"hi"[..]))
        );
        assert_eq!(parse_response_block(&b[..b.len() - 1]), None);
        let mut bad = b.clone();
        bad[0] = 7;
        assert_eq!(parse_response_block(&bad), None);
    }

    #[test]
    fn frames_round_trip() {
        let mut buf = [0u8; PLAINTEXT_BYTES_MAX];
        let mut w = FrameWriter::new(&mut buf);
        assert!(w.ack(7, 0b101, 300));
        assert!(w.frag(9, 2, b"hello"));
        assert!(w.ping());
        assert!(w.close(3));
        let n = w.len();
        let got: Vec<_> = frames(&buf[..n]).map(|f| f.unwrap()).collect();
        assert_eq!(
            got,
            vec![
                Frame::Ack {
                    una: 7,
                    sack: 0b101,
                    ack_delay_us: 300
                },
                Frame::Frag {
                    sn: 9,
                    rest: 2,
                    data: b"hello"
                },
                Frame::Ping,
                Frame::Close { reason: 3 },
            ]
        );
        assert!(frames_valid(&buf[..n]));
        assert!(!frames_valid(&buf[..n - 1]), "a cut CLOSE frame is invalid");
        assert!(!frames_valid(&[]), "an empty plaintext is invalid");
    }

    #[test]
    fn a_full_fragment_fits_with_an_ack() {
        let mut buf = [0u8; PLAINTEXT_BYTES_MAX];
        let mut w = FrameWriter::new(&mut buf);
        assert!(w.ack(0, 0, 0));
        assert!(w.frag(0, 0, &[1u8; FRAG_DATA_MAX]));
        assert_eq!(w.room(), 0);
        assert!(!w.ping(), "a full writer refuses more");
    }

    proptest! {
        #[test]
        fn datagram_parsers_never_panic(d in proptest::collection::vec(any::<u8>(), 0..1300)) {
            let _ = parse_init(&d);
            let _ = parse_response(&d);
            let _ = parse_cookie(&d);
            let _ = parse_transport(&d);
            let _ = parse_reset(&d);
            let _ = parse_response_block(&d);
            let _ = frames_valid(&d);
            let _ = frames(&d).count();
        }

        #[test]
        fn frame_parser_never_panics_on_typed_prefixes(
            kind in 0u8..6, d in proptest::collection::vec(any::<u8>(), 0..64)
        ) {
            let mut b = vec![kind];
            b.extend_from_slice(&d);
            let _ = frames(&b).count();
        }
    }
}
