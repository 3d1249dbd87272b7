//! Per-user mailbox state and per-bucket state, with their fixed encodings
//! in the LMDB index.

use super::codec::{le_u32, le_u64, NO_PREV};

/// Bytes of the bucket file header; the first record starts here.
pub const BUCKET_HEADER_BYTES: u64 = 64;

/// One user's mailbox as of the latest applied operation.
///
/// Live records are exactly the seqs `acked_seq + 1 ..= next_seq - 1`
/// (sequence numbers are gap-free). Those `<= tail_seq` are in the user's
/// bucket, chained backwards from `tail_offset`; the rest are in the
/// memtable, not yet checkpointed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UserState {
    /// Bucket id: `dir * bucket_files + file`.
    pub bucket: u32,
    pub next_seq: u64,
    pub acked_seq: u64,
    /// Offset of the newest checkpointed record in the bucket, or NO_PREV.
    pub tail_offset: u64,
    /// Highest seq ever written to the bucket (0 if none).
    pub tail_seq: u64,
    /// Payload bytes of live records.
    pub live_bytes: u64,
    /// The mailbox was moved to another shard by a rebalance (it has no
    /// live records); requests for the user are answered `Moved`.
    pub moved: bool,
}

/// Encoded size of a state without the `moved` flag byte (written by
/// earlier versions, still read).
pub const USER_STATE_BYTES_V1: usize = 4 + 8 * 5;
pub const USER_STATE_BYTES: usize = USER_STATE_BYTES_V1 + 1;

impl UserState {
    pub fn new(bucket: u32) -> Self {
        Self {
            bucket,
            next_seq: 1,
            acked_seq: 0,
            tail_offset: NO_PREV,
            tail_seq: 0,
            live_bytes: 0,
            moved: false,
        }
    }

    pub fn last_seq(&self) -> u64 {
        self.next_seq - 1
    }

    pub fn live_count(&self) -> u64 {
        self.last_seq() - self.acked_seq
    }

    pub fn encode(&self) -> [u8; USER_STATE_BYTES] {
        let mut b = [0u8; USER_STATE_BYTES];
        b[0..4].copy_from_slice(&self.bucket.to_le_bytes());
        b[4..12].copy_from_slice(&self.next_seq.to_le_bytes());
        b[12..20].copy_from_slice(&self.acked_seq.to_le_bytes());
        b[20..28].copy_from_slice(&self.tail_offset.to_le_bytes());
        b[28..36].copy_from_slice(&self.tail_seq.to_le_bytes());
        b[36..44].copy_from_slice(&self.live_bytes.to_le_bytes());
        b[44] = u8::from(self.moved);
        b
    }

    /// Decode; `None` if the length is wrong or the fields contradict each
    /// other (the index is then corrupt).
    pub fn decode(b: &[u8]) -> Option<Self> {
        let moved = match b.len() {
            USER_STATE_BYTES_V1 => false,
            USER_STATE_BYTES if b[44] <= 1 => b[44] == 1,
            _ => return None,
        };
        let s = Self {
            bucket: le_u32(&b[0..4]),
            next_seq: le_u64(&b[4..12]),
            acked_seq: le_u64(&b[12..20]),
            tail_offset: le_u64(&b[20..28]),
            tail_seq: le_u64(&b[28..36]),
            live_bytes: le_u64(&b[36..44]),
            moved,
        };
        let moved_is_empty = !s.moved || s.acked_seq.checked_add(1) == Some(s.next_seq);
        (moved_is_empty && s.next_seq >= 1 && s.acked_seq < s.next_seq && s.tail_seq < s.next_seq)
            .then_some(s)
    }
}

/// State of one bucket file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BucketMeta {
    /// Incremented by every compaction; written in the file header.
    pub gen: u64,
    /// Bytes of the file that hold checkpointed records (header included).
    /// Anything after it is garbage from an interrupted checkpoint.
    pub len: u64,
    /// Bytes of records that were acknowledged (dead).
    pub dead_bytes: u64,
}

pub const BUCKET_META_BYTES: usize = 24;

impl Default for BucketMeta {
    fn default() -> Self {
        Self {
            gen: 0,
            len: BUCKET_HEADER_BYTES,
            dead_bytes: 0,
        }
    }
}

impl BucketMeta {
    pub fn encode(&self) -> [u8; BUCKET_META_BYTES] {
        let mut b = [0u8; BUCKET_META_BYTES];
        b[0..8].copy_from_slice(&self.gen.to_le_bytes());
        b[8..16].copy_from_slice(&self.len.to_le_bytes());
        b[16..24].copy_from_slice(&self.dead_bytes.to_le_bytes());
        b
    }

    pub fn decode(b: &[u8]) -> Option<Self> {
        if b.len() != BUCKET_META_BYTES {
            return None;
        }
        let m = Self {
            gen: le_u64(&b[0..8]),
            len: le_u64(&b[8..16]),
            dead_bytes: le_u64(&b[16..24]),
        };
        (m.len >= BUCKET_HEADER_BYTES).then_some(m)
    }

    pub fn record_bytes(&self) -> u64 {
        self.len - BUCKET_HEADER_BYTES
    }
}

/// Which bucket a new user goes to: a fixed mix of the user id (SplitMix64
/// finaliser), so every build and platform agrees.
pub fn bucket_for_user(user: u64, buckets: u32) -> u32 {
    let mut z = user.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^= z >> 31;
    (z % u64::from(buckets)) as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn states_round_trip_and_reject_garbage() {
        let s = UserState {
            bucket: 513,
            next_seq: 10,
            acked_seq: 4,
            tail_offset: 640,
            tail_seq: 8,
            live_bytes: 1234,
            moved: false,
        };
        assert_eq!(UserState::decode(&s.encode()), Some(s));
        assert_eq!(
            UserState::decode(&s.encode()[..USER_STATE_BYTES_V1]),
            Some(s)
        );
        let moved = UserState {
            acked_seq: 9,
            live_bytes: 0,
            moved: true,
            ..s
        };
        assert_eq!(UserState::decode(&moved.encode()), Some(moved));
        // A moved user with live records, or a flag byte other than 0/1.
        assert_eq!(
            UserState::decode(&UserState { moved: true, ..s }.encode()),
            None
        );
        let mut bad = s.encode();
        bad[44] = 2;
        assert_eq!(UserState::decode(&bad), None);
        assert_eq!(UserState::decode(&[0u8; 3]), None);
        assert_eq!(UserState::decode(&[0u8; USER_STATE_BYTES]), None);
        let m = BucketMeta {
            gen: 2,
            len: 4096,
            dead_bytes: 100,
        };
        assert_eq!(BucketMeta::decode(&m.encode()), Some(m));
        assert_eq!(BucketMeta::decode(&[0u8; BUCKET_META_BYTES]), None);
    }

    #[test]
    fn bucket_placement_is_pinned() {
        // These placements are part of the on-disk format: never change them.
        let got: Vec<u32> = (0..6).map(|u| bucket_for_user(u, 65_536)).collect();
        assert_eq!(got, vec![52655, 23745, 22222, 36845, 35530, 50010]);
        assert_eq!(
            bucket_for_user(u64::MAX, 16),
            bucket_for_user(u64::MAX, 65_536) % 16
        );
        assert!((0..10_000).all(|u| bucket_for_user(u, 16) < 16));
    }
}
