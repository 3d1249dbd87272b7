//! The secure link between two processes of one cluster (gateway, presence,
//! profile, msgstore, imctl), sans-IO: the handshake that proves both ends
//! hold the cluster key, and the record layer that encrypts the stream
//! after it. `daemon::secure` runs it over TCP. PROTOCOL.md §8.
//!
//! * Handshake: `Noise_NNpsk0_25519_ChaChaPoly_BLAKE2s` (snow), prologue
//!   [`PROLOGUE`], the 32-byte cluster key as the pre-shared key. Two
//!   messages of exactly [`HELLO_BYTES`] each: the dialer's `psk, e`, the
//!   listener's `e, ee`. A dialer without the key cannot produce a first
//!   message the listener accepts, and cannot read anything after it; the
//!   ephemeral exchange gives each link keys of its own (forward secrecy).
//!   Noise's `psk` modifier is the pattern made for one shared secret
//!   (WireGuard's `IKpsk2` uses it the same way).
//! * Records: a 2-byte big-endian length, then that many bytes of
//!   ChaCha20-Poly1305 ciphertext and tag (ring), nonce = Noise's layout of
//!   a per-direction counter from 0. At most [`RECORD_PLAINTEXT_BYTES_MAX`]
//!   bytes of plaintext per record; an empty record is allowed.
//!
//! Randomness comes in as a seed, so the core is deterministic in tests.

use crate::session::{
    crypto::{SeededResolver, TransportKeys},
    wire::{DH_BYTES, TAG_BYTES},
};
use ring::aead::{Aad, LessSafeKey, Tag};
use snow::{Builder, HandshakeState};
use std::ops::Range;

/// The Noise protocol name of a link handshake.
pub const NOISE_PARAMS: &str = "Noise_NNpsk0_25519_ChaChaPoly_BLAKE2s";
/// Mixed into the handshake: a peer speaking another version fails it.
pub const PROLOGUE: &[u8] = b"im-link-v1";
/// Bytes of a cluster key.
pub const CLUSTER_KEY_BYTES: usize = 32;
/// Bytes of each handshake message: an ephemeral key and an empty
/// encrypted payload's tag.
pub const HELLO_BYTES: usize = DH_BYTES + TAG_BYTES;
/// Bytes of a record's length prefix.
pub const RECORD_HEADER_BYTES: usize = 2;
/// Most bytes of ciphertext and tag in one record (what the prefix holds).
pub const RECORD_SEALED_BYTES_MAX: usize = u16::MAX as usize;
/// Most bytes of plaintext in one record.
pub const RECORD_PLAINTEXT_BYTES_MAX: usize = RECORD_SEALED_BYTES_MAX - TAG_BYTES;

/// The secret every process of one cluster holds.
#[derive(Clone, PartialEq, Eq)]
pub struct ClusterKey([u8; CLUSTER_KEY_BYTES]);

impl std::fmt::Debug for ClusterKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ClusterKey(..)")
    }
}

impl ClusterKey {
    pub fn from_bytes(bytes: [u8; CLUSTER_KEY_BYTES]) -> ClusterKey {
        ClusterKey(bytes)
    }

    /// The key written as 64 lowercase hex digits (a key file's content).
    pub fn to_hex(&self) -> String {
        self.0.iter().map(|b| format!("{b:02x}")).collect()
    }

    /// A key from its hex form; surrounding whitespace is ignored.
    pub fn from_hex(text: &str) -> Result<ClusterKey, LinkError> {
        let text = text.trim();
        if text.len() != CLUSTER_KEY_BYTES * 2 || !text.is_ascii() {
            return Err(LinkError::KeyFormat);
        }
        let mut key = [0u8; CLUSTER_KEY_BYTES];
        for (i, byte) in key.iter_mut().enumerate() {
            *byte = u8::from_str_radix(&text[2 * i..2 * i + 2], 16)
                .map_err(|_| LinkError::KeyFormat)?;
        }
        Ok(ClusterKey(key))
    }
}

/// Why a link failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LinkError {
    #[error("a cluster key is 64 hex digits")]
    KeyFormat,
    #[error(
        "handshake failed: the peer does not hold this cluster's key (or is no cluster process)"
    )]
    Handshake,
    #[error("a record failed authentication: the link was tampered with or is no cluster link")]
    BadRecord,
    #[error("a record of {0} bytes is shorter than its tag")]
    ShortRecord(usize),
    #[error("the link sent 2^64 records; it must be reopened")]
    Exhausted,
}

fn builder<'a>(key: &'a ClusterKey, seed: [u8; 32]) -> Builder<'a> {
    Builder::with_resolver(
        NOISE_PARAMS.parse().expect("valid noise params"),
        Box::new(SeededResolver::new(seed)),
    )
    .psk(0, &key.0)
    .expect("psk location 0 exists in NNpsk0")
    .prologue(PROLOGUE)
    .expect("prologue set once")
}

/// The dialing side of a handshake.
pub struct Dialer {
    hs: HandshakeState,
}

impl Dialer {
    /// Start a handshake; the first message, to send at once.
    pub fn new(key: &ClusterKey, seed: [u8; 32]) -> (Dialer, [u8; HELLO_BYTES]) {
        let mut hs = builder(key, seed)
            .build_initiator()
            .expect("valid initiator");
        let mut hello = [0u8; HELLO_BYTES];
        let n = hs
            .write_message(&[], &mut hello)
            .expect("first message fits");
        debug_assert_eq!(n, HELLO_BYTES);
        (Dialer { hs }, hello)
    }

    /// The listener's answer (exactly [`HELLO_BYTES`]): the link's keys.
    pub fn finish(mut self, answer: &[u8]) -> Result<LinkKeys, LinkError> {
        read_hello(&mut self.hs, answer)?;
        Ok(LinkKeys::split(&mut self.hs))
    }
}

/// The listening side: the dialer's first message in, the answer to send
/// and the link's keys out.
pub fn accept(
    key: &ClusterKey,
    seed: [u8; 32],
    hello: &[u8],
) -> Result<([u8; HELLO_BYTES], LinkKeys), LinkError> {
    let mut hs = builder(key, seed)
        .build_responder()
        .expect("valid responder");
    read_hello(&mut hs, hello)?;
    let mut answer = [0u8; HELLO_BYTES];
    let n = hs
        .write_message(&[], &mut answer)
        .expect("second message fits");
    debug_assert_eq!(n, HELLO_BYTES);
    Ok((answer, LinkKeys::split(&mut hs)))
}

fn read_hello(hs: &mut HandshakeState, hello: &[u8]) -> Result<(), LinkError> {
    if hello.len() != HELLO_BYTES {
        return Err(LinkError::Handshake);
    }
    let mut payload = [0u8; HELLO_BYTES];
    match hs.read_message(hello, &mut payload) {
        Ok(0) => Ok(()),
        _ => Err(LinkError::Handshake),
    }
}

/// The keys of a finished handshake, one per direction.
pub struct LinkKeys {
    pub sealer: Sealer,
    pub opener: Opener,
}

impl LinkKeys {
    fn split(hs: &mut HandshakeState) -> LinkKeys {
        debug_assert!(hs.is_handshake_finished());
        let keys = TransportKeys::split(hs);
        LinkKeys {
            sealer: Sealer {
                key: TransportKeys::cipher(&keys.send),
                counter: 0,
            },
            opener: Opener {
                key: TransportKeys::cipher(&keys.recv),
                counter: 0,
            },
        }
    }
}

/// Encrypts one direction of a link.
pub struct Sealer {
    key: LessSafeKey,
    counter: u64,
}

impl Sealer {
    /// Append `plain` to `out` as records of at most
    /// [`RECORD_PLAINTEXT_BYTES_MAX`] bytes each (one empty record if
    /// `plain` is empty).
    pub fn seal(&mut self, plain: &[u8], out: &mut Vec<u8>) -> Result<(), LinkError> {
        let mut chunks = plain.chunks(RECORD_PLAINTEXT_BYTES_MAX);
        let first = chunks.next().unwrap_or(&[]);
        for chunk in std::iter::once(first).chain(chunks) {
            self.seal_record(chunk, out)?;
        }
        Ok(())
    }

    fn seal_record(&mut self, chunk: &[u8], out: &mut Vec<u8>) -> Result<(), LinkError> {
        assert!(chunk.len() <= RECORD_PLAINTEXT_BYTES_MAX);
        let counter = self.counter;
        self.counter = counter.checked_add(1).ok_or(LinkError::Exhausted)?;
        let sealed_len = chunk.len() + TAG_BYTES;
        out.extend_from_slice(&(sealed_len as u16).to_be_bytes());
        let start = out.len();
        out.extend_from_slice(chunk);
        let tag = self
            .key
            .seal_in_place_separate_tag(
                TransportKeys::nonce(counter),
                Aad::empty(),
                &mut out[start..],
            )
            .expect("a record is within the AEAD's limits");
        out.extend_from_slice(tag.as_ref());
        Ok(())
    }

    /// Records sealed so far.
    pub fn records(&self) -> u64 {
        self.counter
    }
}

/// One record opened in place by [`Opener::open_in_place`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Opened {
    /// Bytes of the input the record took (header, ciphertext, tag).
    pub consumed: usize,
    /// Where its plaintext now lies in the input.
    pub plain: Range<usize>,
}

/// Decrypts one direction of a link.
pub struct Opener {
    key: LessSafeKey,
    counter: u64,
}

impl Opener {
    /// Open the record at the front of `input`, decrypting it in place.
    /// `Ok(None)`: the record is not complete yet (read more). An error
    /// ends the link: nothing after it can be trusted.
    pub fn open_in_place(&mut self, input: &mut [u8]) -> Result<Option<Opened>, LinkError> {
        let Some(header) = input.get(..RECORD_HEADER_BYTES) else {
            return Ok(None);
        };
        let sealed_len = u16::from_be_bytes([header[0], header[1]]) as usize;
        if sealed_len < TAG_BYTES {
            return Err(LinkError::ShortRecord(sealed_len));
        }
        let consumed = RECORD_HEADER_BYTES + sealed_len;
        let Some(record) = input.get_mut(RECORD_HEADER_BYTES..consumed) else {
            return Ok(None);
        };
        let plain_len = sealed_len - TAG_BYTES;
        let (body, tag) = record.split_at_mut(plain_len);
        let tag = Tag::try_from(&tag[..]).map_err(|_| LinkError::BadRecord)?;
        let counter = self.counter;
        self.key
            .open_in_place_separate_tag(TransportKeys::nonce(counter), Aad::empty(), tag, body, 0..)
            .map_err(|_| LinkError::BadRecord)?;
        self.counter = counter.checked_add(1).ok_or(LinkError::Exhausted)?;
        Ok(Some(Opened {
            consumed,
            plain: RECORD_HEADER_BYTES..RECORD_HEADER_BYTES + plain_len,
        }))
    }

    /// Records opened so far.
    pub fn records(&self) -> u64 {
        self.counter
    }
}

#[cfg(test)]
mod tests;
