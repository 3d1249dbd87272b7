//! The online table: user -> compact slot, in [`SHARDS`] open-addressing
//! hash tables with linear probing.
//!
//! Why not `std::collections::HashMap` or `hashbrown`: their capacities are
//! powers of two, so depending on the user count the table is 44% to 87%
//! full, and a resize doubles the whole table's memory at once. Here each
//! shard sizes itself on its own to any capacity (load 64% after a resize,
//! at most 80% before the next), so a resize moves 1/256 of the users and
//! the table averages about 24 / 0.72 = 33 bytes per user.
//!
//! A slot is 23 bytes, packed: user (8), session (8), since (4 seconds),
//! gateway index (2, into the server's gateway table), flags (1: status in
//! the low bits, the gateway's sync mark in the top bit). An empty slot has
//! user 0; user 0 itself lives outside the shards.
//!
//! Deletion shifts the following entries back (no tombstones), so a probe
//! never walks over dead slots and the load stays what `len` says.

/// Number of independent shards; a power of two, taken from the hash's top
/// bits.
pub const SHARDS: usize = 256;

/// Smallest allocated capacity of a shard.
const SHARD_CAPACITY_MIN: usize = 16;
/// A shard grows when an insert would make it fuller than this ...
const LOAD_MAX: f64 = 0.80;
/// ... to a capacity where it is this full; it shrinks back to that when it
/// falls below `LOAD_MIN`.
const LOAD_AFTER_RESIZE: f64 = 0.64;
const LOAD_MIN: f64 = 0.25;

/// Flags bit: the gateway's sync mark when the slot was written.
pub const FLAG_MARK: u8 = 0x80;
/// Flags bits holding the status code.
pub const FLAG_STATUS_MASK: u8 = 0x03;

/// One online user, as stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(C, packed)]
pub struct Slot {
    pub user: u64,
    pub session: u64,
    pub since_s: u32,
    pub gateway: u16,
    pub flags: u8,
}

const EMPTY: Slot = Slot {
    user: 0,
    session: 0,
    since_s: 0,
    gateway: 0,
    flags: 0,
};

/// Bytes of one slot (asserted at compile time: the memory target rests on
/// it).
pub const SLOT_BYTES: usize = std::mem::size_of::<Slot>();
const _: () = assert!(SLOT_BYTES == 23);

impl Slot {
    pub fn status_code(&self) -> u8 {
        self.flags & FLAG_STATUS_MASK
    }

    pub fn mark(&self) -> bool {
        self.flags & FLAG_MARK != 0
    }
}

/// A 64-bit mixer (the splitmix64 finaliser): sequential user ids spread
/// over every shard and slot.
fn mix(user: u64) -> u64 {
    let mut z = user.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

fn shard_of(hash: u64) -> usize {
    (hash >> (64 - SHARDS.trailing_zeros())) as usize
}

/// Home position of `hash` in a shard of `capacity` slots: the low bits
/// (the top ones chose the shard) scaled onto the range, so any capacity
/// works, not only powers of two.
fn home(hash: u64, capacity: usize) -> usize {
    let low = hash << SHARDS.trailing_zeros();
    ((u128::from(low) * capacity as u128) >> 64) as usize
}

#[derive(Default)]
struct Shard {
    slots: Box<[Slot]>,
    len: usize,
}

impl Shard {
    /// Position of `user`, or of the empty slot where it would go.
    fn probe(&self, user: u64, hash: u64) -> (usize, bool) {
        let cap = self.slots.len();
        debug_assert!(self.len < cap, "a shard always keeps an empty slot");
        let mut i = home(hash, cap);
        loop {
            let slot_user = self.slots[i].user;
            if slot_user == user {
                return (i, true);
            }
            if slot_user == 0 {
                return (i, false);
            }
            i += 1;
            if i == cap {
                i = 0;
            }
        }
    }

    fn get(&self, user: u64, hash: u64) -> Option<&Slot> {
        if self.slots.is_empty() {
            return None;
        }
        match self.probe(user, hash) {
            (i, true) => Some(&self.slots[i]),
            _ => None,
        }
    }

    /// Capacity for `len` users right after a resize.
    fn capacity_for(len: usize) -> usize {
        ((len as f64 / LOAD_AFTER_RESIZE) as usize + 1).max(SHARD_CAPACITY_MIN)
    }

    fn resize(&mut self, capacity: usize) {
        assert!(capacity > self.len, "a resize keeps every user");
        let old = std::mem::replace(&mut self.slots, vec![EMPTY; capacity].into_boxed_slice());
        for slot in old.iter().filter(|s| s.user != 0) {
            let (i, found) = self.probe(slot.user, mix(slot.user));
            debug_assert!(!found, "users are unique");
            self.slots[i] = *slot;
        }
    }

    /// Insert or overwrite; returns the previous slot of the user.
    fn put(&mut self, slot: Slot, hash: u64) -> Option<Slot> {
        if (self.len + 1) as f64 > self.slots.len() as f64 * LOAD_MAX {
            self.resize(Self::capacity_for(self.len + 1));
        }
        let (i, found) = self.probe(slot.user, hash);
        let previous = found.then(|| self.slots[i]);
        if !found {
            self.len += 1;
        }
        self.slots[i] = slot;
        previous
    }

    fn remove(&mut self, user: u64, hash: u64) -> Option<Slot> {
        if self.slots.is_empty() {
            return None;
        }
        let (mut hole, found) = self.probe(user, hash);
        if !found {
            return None;
        }
        let removed = self.slots[hole];
        let cap = self.slots.len();
        // Backward-shift: move later entries of the run into the hole when
        // the hole lies between their home and where they are.
        let mut j = hole;
        loop {
            j = if j + 1 == cap { 0 } else { j + 1 };
            let next = self.slots[j];
            if next.user == 0 {
                break;
            }
            let h = home(mix(next.user), cap);
            let dist_home = (j + cap - h) % cap;
            let dist_hole = (j + cap - hole) % cap;
            if dist_hole <= dist_home {
                self.slots[hole] = next;
                hole = j;
            }
        }
        self.slots[hole] = EMPTY;
        self.len -= 1;
        if cap > SHARD_CAPACITY_MIN && (self.len as f64) < cap as f64 * LOAD_MIN {
            self.resize(Self::capacity_for(self.len));
        }
        Some(removed)
    }
}

/// The whole table. `users_max` is enforced by the caller (the state),
/// which knows what to answer.
pub struct Table {
    shards: Vec<Shard>,
    /// User 0 (the empty-slot marker inside shards).
    zero: Option<Slot>,
    len: usize,
}

impl Default for Table {
    fn default() -> Self {
        Self::new()
    }
}

impl Table {
    pub fn new() -> Self {
        Self {
            shards: (0..SHARDS).map(|_| Shard::default()).collect(),
            zero: None,
            len: 0,
        }
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Slots allocated across all shards.
    pub fn capacity(&self) -> usize {
        self.shards.iter().map(|s| s.slots.len()).sum()
    }

    /// Bytes the slots occupy.
    pub fn bytes(&self) -> usize {
        self.capacity() * SLOT_BYTES
    }

    pub fn get(&self, user: u64) -> Option<Slot> {
        if user == 0 {
            return self.zero;
        }
        let hash = mix(user);
        self.shards[shard_of(hash)].get(user, hash).copied()
    }

    /// Insert or overwrite `slot.user`; the previous slot if there was one.
    pub fn put(&mut self, slot: Slot) -> Option<Slot> {
        let previous = if slot.user == 0 {
            self.zero.replace(slot)
        } else {
            let hash = mix(slot.user);
            self.shards[shard_of(hash)].put(slot, hash)
        };
        if previous.is_none() {
            self.len += 1;
        }
        previous
    }

    pub fn remove(&mut self, user: u64) -> Option<Slot> {
        let removed = if user == 0 {
            self.zero.take()
        } else {
            let hash = mix(user);
            self.shards[shard_of(hash)].remove(user, hash)
        };
        if removed.is_some() {
            self.len -= 1;
        }
        removed
    }

    /// Users of shard `shard` (0..[`SHARDS`]) for which `pred` holds; user 0
    /// counts as part of shard 0. Used to scan the table a shard at a time.
    pub fn users_in_shard(&self, shard: usize, mut pred: impl FnMut(&Slot) -> bool) -> Vec<u64> {
        let mut users: Vec<u64> = self.shards[shard]
            .slots
            .iter()
            .filter(|s| s.user != 0 && pred(s))
            .map(|s| s.user)
            .collect();
        if shard == 0 {
            users.extend(self.zero.filter(|s| pred(s)).map(|s| s.user));
        }
        users
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::HashMap;

    fn slot(user: u64, session: u64) -> Slot {
        Slot {
            user,
            session,
            since_s: 7,
            gateway: 1,
            flags: 0,
        }
    }

    #[derive(Debug, Clone)]
    enum Op {
        Put(u64, u64),
        Remove(u64),
    }

    fn op() -> impl Strategy<Value = Op> {
        // A small user range so puts collide with removes; user 0 included.
        prop_oneof![
            (0u64..300, any::<u64>()).prop_map(|(u, s)| Op::Put(u, s)),
            (0u64..300).prop_map(Op::Remove),
        ]
    }

    proptest! {
        #[test]
        fn agrees_with_a_hash_map(ops in proptest::collection::vec(op(), 0..2000)) {
            let mut table = Table::new();
            let mut model: HashMap<u64, Slot> = HashMap::new();
            for op in ops {
                match op {
                    Op::Put(u, s) => prop_assert_eq!(table.put(slot(u, s)), model.insert(u, slot(u, s))),
                    Op::Remove(u) => prop_assert_eq!(table.remove(u), model.remove(&u)),
                }
                prop_assert_eq!(table.len(), model.len());
            }
            for u in 0..300 {
                prop_assert_eq!(table.get(u), model.get(&u).copied());
            }
            let mut scanned: Vec<u64> = (0..SHARDS).flat_map(|s| table.users_in_shard(s, |_| true)).collect();
            scanned.sort_unstable();
            let mut expected: Vec<u64> = model.keys().copied().collect();
            expected.sort_unstable();
            prop_assert_eq!(scanned, expected);
        }
    }

    #[test]
    fn grows_and_shrinks_within_the_load_bounds() {
        let mut table = Table::new();
        let n = 200_000u64;
        for u in 1..=n {
            table.put(slot(u, u));
        }
        let load = table.len() as f64 / table.capacity() as f64;
        assert!((0.5..=LOAD_MAX).contains(&load), "load {load}");
        for u in 1..=n {
            assert_eq!(table.get(u).map(|s| s.session), Some(u));
        }
        for u in 1..=n - 100 {
            assert!(table.remove(u).is_some());
        }
        assert_eq!(table.len(), 100);
        assert!(table.capacity() <= SHARDS * SHARD_CAPACITY_MIN * 2);
        for u in n - 99..=n {
            assert_eq!(table.get(u).map(|s| s.session), Some(u));
        }
    }
}
