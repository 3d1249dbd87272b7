//! The msgstore shards as the gateway sees them: which shard owns a user
//! (consistent hashing over the cluster map) and one pipelined connection
//! per shard, opened on first use and reopened after it breaks.

use msgstore::client::{ClientError, ShardClient};
use proto::{
    cluster::{ClusterMap, ShardRing},
    shard::{MailboxStats, ShardErrorCode, StoredRecord},
};
use std::collections::HashMap;
use tokio::sync::Mutex;

/// Why a shard call failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ShardCallError {
    #[error("mailbox full")]
    MailboxFull,
    #[error("message too large for the shard")]
    TooLarge,
    #[error("shard {shard} unavailable: {reason}")]
    Unavailable { shard: String, reason: String },
}

struct Link {
    addr: String,
    client: Mutex<Option<ShardClient>>,
}

pub struct Shards {
    ring: ShardRing,
    links: HashMap<String, Link>,
}

impl Shards {
    pub fn new(map: &ClusterMap) -> Shards {
        let links = map
            .shards
            .iter()
            .map(|s| {
                (
                    s.id.clone(),
                    Link {
                        addr: s.addr.clone(),
                        client: Mutex::new(None),
                    },
                )
            })
            .collect();
        Shards {
            ring: ShardRing::new(&map.shards),
            links,
        }
    }

    /// The owner of `user` and a connection to it.
    async fn client(&self, user: u64) -> Result<(String, ShardClient), ShardCallError> {
        let shard = self.ring.owner(user).to_string();
        let link = &self.links[&shard];
        let mut slot = link.client.lock().await;
        if let Some(c) = slot.as_ref() {
            return Ok((shard, c.clone()));
        }
        match ShardClient::connect(link.addr.as_str()).await {
            Ok(c) => {
                *slot = Some(c.clone());
                Ok((shard, c))
            }
            Err(e) => Err(ShardCallError::Unavailable {
                shard,
                reason: e.to_string(),
            }),
        }
    }

    /// Map a client error; forget a broken connection so the next call
    /// reconnects.
    async fn failed(&self, shard: &str, e: ClientError) -> ShardCallError {
        if let ClientError::Shard(err) = &e {
            match err.code {
                ShardErrorCode::MailboxFull => return ShardCallError::MailboxFull,
                ShardErrorCode::MessageTooLarge => return ShardCallError::TooLarge,
                _ => {}
            }
        } else {
            *self.links[shard].client.lock().await = None;
        }
        ShardCallError::Unavailable {
            shard: shard.to_string(),
            reason: e.to_string(),
        }
    }

    /// Store a message durably in `user`'s mailbox; its sequence number.
    pub async fn append(
        &self,
        user: u64,
        msg_id: u128,
        payload: Vec<u8>,
    ) -> Result<u64, ShardCallError> {
        let (shard, c) = self.client(user).await?;
        match c.append(user, msg_id, payload).await {
            Ok(seq) => Ok(seq),
            Err(e) => Err(self.failed(&shard, e).await),
        }
    }

    pub async fn fetch(
        &self,
        user: u64,
        after_seq: u64,
        max_count: u32,
        max_bytes: u32,
    ) -> Result<(Vec<StoredRecord>, bool), ShardCallError> {
        let (shard, c) = self.client(user).await?;
        match c.fetch(user, after_seq, max_count, max_bytes).await {
            Ok(page) => Ok(page),
            Err(e) => Err(self.failed(&shard, e).await),
        }
    }

    pub async fn ack(&self, user: u64, up_to_seq: u64) -> Result<u64, ShardCallError> {
        let (shard, c) = self.client(user).await?;
        match c.ack(user, up_to_seq).await {
            Ok(removed) => Ok(removed),
            Err(e) => Err(self.failed(&shard, e).await),
        }
    }

    pub async fn user_stats(&self, user: u64) -> Result<MailboxStats, ShardCallError> {
        let (shard, c) = self.client(user).await?;
        match c.user_stats(user).await {
            Ok(stats) => Ok(stats),
            Err(e) => Err(self.failed(&shard, e).await),
        }
    }
}
