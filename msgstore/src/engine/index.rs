//! The LMDB index: user -> [`UserState`], bucket -> [`BucketMeta`], and the
//! checkpoint record. Written only by checkpoints, in one large transaction
//! each (LMDB cannot take one random-key write per append: baselines.md).

use super::{
    state::{BucketMeta, UserState},
    wal::Position,
};
use crate::{Error, Result};
use heed::{
    byteorder::BigEndian,
    types::{Bytes, Str, U32, U64},
    CommitOrAbort, Database, Env, EnvOpenOptions,
};
use std::path::Path;

type UsersDb = Database<'static, U64<BigEndian>, Bytes>;
type BucketsDb = Database<'static, U32<BigEndian>, Bytes>;
type MetaDb = Database<'static, Str, Bytes>;

/// What a checkpoint records besides user and bucket states.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct CheckpointMeta {
    /// Where in the write-ahead log recovery must start replaying.
    pub wal_start: Position,
    /// Compacted bucket files to move into place: (bucket, generation).
    pub pending_swaps: Vec<(u32, u64)>,
    /// Totals as of this checkpoint.
    pub users_total: u64,
    pub live_messages: u64,
    pub live_bytes: u64,
}

const META_CHECKPOINT: &str = "checkpoint";
const META_FANOUT: &str = "fanout";
/// The applied marker ([`super::Engine::set_applied`]): opaque bytes.
pub const META_APPLIED: &str = "applied";
/// A replicated shard's frozen users (see `migrate::encode_frozen`).
pub const META_FROZEN: &str = "frozen";
/// A replicated shard's routing: the TOML text `routing.toml` would hold.
pub const META_ROUTING: &str = "routing";

/// `meta` entries a checkpoint writes besides `checkpoint`, in its
/// transaction: (key, value).
pub type ExtraMeta = Vec<(&'static str, Vec<u8>)>;

impl CheckpointMeta {
    fn encode(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(48 + self.pending_swaps.len() * 12);
        for v in [
            self.wal_start.segment,
            self.wal_start.offset,
            self.users_total,
            self.live_messages,
            self.live_bytes,
        ] {
            b.extend_from_slice(&v.to_le_bytes());
        }
        b.extend_from_slice(&(self.pending_swaps.len() as u64).to_le_bytes());
        for (bucket, gen) in &self.pending_swaps {
            b.extend_from_slice(&bucket.to_le_bytes());
            b.extend_from_slice(&gen.to_le_bytes());
        }
        b
    }

    fn decode(b: &[u8]) -> Option<Self> {
        use super::codec::{le_u32, le_u64};
        let word = |i: usize| b.get(i * 8..i * 8 + 8).map(le_u64);
        let swaps = usize::try_from(word(5)?).ok()?;
        let rest = b.get(48..)?;
        if rest.len() != swaps.checked_mul(12)? {
            return None;
        }
        Some(Self {
            wal_start: Position {
                segment: word(0)?,
                offset: word(1)?,
            },
            users_total: word(2)?,
            live_messages: word(3)?,
            live_bytes: word(4)?,
            pending_swaps: rest
                .chunks_exact(12)
                .map(|c| (le_u32(&c[0..4]), le_u64(&c[4..12])))
                .collect(),
        })
    }
}

pub struct Index {
    env: Env,
    users: UsersDb,
    buckets: BucketsDb,
    meta: MetaDb,
}

impl Index {
    pub fn open(path: &Path, map_bytes: u64) -> Result<Index> {
        std::fs::create_dir_all(path)?;
        let map_bytes =
            usize::try_from(map_bytes).map_err(|_| Error::Config("index_map_bytes".into()))?;
        // SAFETY: the shard directory is locked by this process, so nothing
        // else opens this environment; we never open it twice ourselves.
        let env = unsafe {
            EnvOpenOptions::new()
                .map_size(map_bytes)
                .max_dbs(4)
                .open(path)?
        };
        let wtxn = env.write_txn()?;
        let (users, buckets, meta) = env
            .create_databases_and_commit(wtxn, |dbo, wtxn| {
                let users = dbo.create_database(wtxn, Some("users"))?;
                let buckets = dbo.create_database(wtxn, Some("buckets"))?;
                let meta = dbo.create_database(wtxn, Some("meta"))?;
                Ok::<_, heed::Error>(CommitOrAbort::<_, ()>::Commit((users, buckets, meta)))
            })?
            .commit()
            .ok_or_else(|| Error::Storage("index creation aborted".into()))?;
        Ok(Index {
            env,
            users,
            buckets,
            meta,
        })
    }

    /// The bucket fan-out recorded at creation; records it if new.
    pub fn check_fanout(&self, dirs: u16, files: u16) -> Result<()> {
        let want = [dirs.to_le_bytes(), files.to_le_bytes()].concat();
        let rtxn = self.env.read_txn()?;
        match self.meta.get(&rtxn, META_FANOUT)? {
            Some(have) if have == want.as_slice() => Ok(()),
            Some(have) => {
                let [a, b, c, d] = <[u8; 4]>::try_from(have).unwrap_or_default();
                Err(Error::Config(format!(
                    "the shard was created with bucket fan-out {} x {}, not {dirs} x {files} \
                     (bucket_dirs and bucket_files cannot change)",
                    u16::from_le_bytes([a, b]),
                    u16::from_le_bytes([c, d]),
                )))
            }
            None => {
                drop(rtxn);
                let mut wtxn = self.env.write_txn()?;
                self.meta.put(&mut wtxn, META_FANOUT, &want)?;
                wtxn.commit()?;
                Ok(())
            }
        }
    }

    pub fn user(&self, user: u64) -> Result<Option<UserState>> {
        let rtxn = self.env.read_txn()?;
        match self.users.get(&rtxn, &user)? {
            None => Ok(None),
            Some(b) => UserState::decode(b)
                .map(Some)
                .ok_or_else(|| Error::Corrupt(format!("index entry of user {user}"))),
        }
    }

    /// Up to `limit` user ids from `start` on that the index holds, ascending.
    pub fn users_from(&self, start: u64, limit: usize) -> Result<Vec<u64>> {
        let rtxn = self.env.read_txn()?;
        let mut out = Vec::with_capacity(limit.min(4096));
        for item in self.users.range(&rtxn, &(start..))?.take(limit) {
            out.push(item?.0);
        }
        Ok(out)
    }

    /// Every bucket's state; buckets never written are absent.
    pub fn buckets(&self) -> Result<Vec<(u32, BucketMeta)>> {
        let rtxn = self.env.read_txn()?;
        let mut out = Vec::new();
        for item in self.buckets.iter(&rtxn)? {
            let (id, b) = item?;
            let m = BucketMeta::decode(b)
                .ok_or_else(|| Error::Corrupt(format!("index entry of bucket {id}")))?;
            out.push((id, m));
        }
        Ok(out)
    }

    pub fn checkpoint_meta(&self) -> Result<CheckpointMeta> {
        let rtxn = self.env.read_txn()?;
        match self.meta.get(&rtxn, META_CHECKPOINT)? {
            None => Ok(CheckpointMeta::default()),
            Some(b) => CheckpointMeta::decode(b)
                .ok_or_else(|| Error::Corrupt("index checkpoint record".into())),
        }
    }

    /// The `meta` entry `key`, if any.
    pub fn meta_value(&self, key: &str) -> Result<Option<Vec<u8>>> {
        let rtxn = self.env.read_txn()?;
        Ok(self.meta.get(&rtxn, key)?.map(<[u8]>::to_vec))
    }

    /// Write one checkpoint in one durable transaction, with the `extra`
    /// meta entries. On error nothing of it is visible (LMDB aborts the
    /// transaction).
    pub fn commit_checkpoint<'a>(
        &self,
        users: impl Iterator<Item = (u64, &'a UserState)>,
        buckets: impl Iterator<Item = (u32, BucketMeta)>,
        meta: &CheckpointMeta,
        extra: &ExtraMeta,
    ) -> Result<()> {
        let mut wtxn = self.env.write_txn()?;
        for (user, state) in users {
            self.users.put(&mut wtxn, &user, &state.encode())?;
        }
        for (id, m) in buckets {
            self.buckets.put(&mut wtxn, &id, &m.encode())?;
        }
        self.meta.put(&mut wtxn, META_CHECKPOINT, &meta.encode())?;
        for (key, value) in extra {
            self.meta.put(&mut wtxn, key, value)?;
        }
        wtxn.commit()?;
        Ok(())
    }

    /// Copy the environment, compacted, into `file` (consistent: as of one
    /// read transaction; `file` must be open for writing).
    pub fn copy_to(&self, file: &mut std::fs::File) -> Result<()> {
        self.env
            .copy_to_file(file, heed::CompactionOption::Enabled)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checkpoint_meta_round_trips_and_rejects_garbage() {
        let m = CheckpointMeta {
            wal_start: Position {
                segment: 3,
                offset: 4096,
            },
            pending_swaps: vec![(1, 2), (65_535, 9)],
            users_total: 10,
            live_messages: 20,
            live_bytes: 30,
        };
        assert_eq!(CheckpointMeta::decode(&m.encode()), Some(m.clone()));
        let enc = m.encode();
        for cut in 0..enc.len() {
            assert_eq!(CheckpointMeta::decode(&enc[..cut]), None);
        }
    }
}
