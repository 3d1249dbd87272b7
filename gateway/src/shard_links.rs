//! The gateway's connections to shards, one per shard address: those of
//! the cluster map in use and those `Moved` answers pointed at (a shard
//! being added by a rebalance is not in the map gateways route by yet).

use msgstore::client::ShardClient;
use proto::cluster::SHARDS_MAX;
use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::Duration,
};

/// Shard connections kept at most. Reaching it closes every connection to
/// an address outside the map in use (calls in flight on them finish; the
/// next use reconnects), which always makes room: a map holds at most
/// [`SHARDS_MAX`] shards.
pub const SHARD_LINKS_MAX: usize = 2 * SHARDS_MAX;
/// Opening a connection to a shard gives up after this long.
pub const SHARD_CONNECT_TIMEOUT_MS: u64 = 3000;

/// One shard address and its connection, if open.
pub struct Link {
    addr: String,
    client: tokio::sync::Mutex<Option<ShardClient>>,
}

impl Link {
    /// The open connection, or a new one.
    pub async fn client(&self) -> Result<ShardClient, String> {
        let mut slot = self.client.lock().await;
        if let Some(c) = slot.as_ref() {
            return Ok(c.clone());
        }
        let timeout = Duration::from_millis(SHARD_CONNECT_TIMEOUT_MS);
        // Boxed: a connection's handshake is a large future, and every
        // call on the shard (most find the link connected) would otherwise
        // carry its size, moved into place once per call.
        let connect = Box::pin(ShardClient::connect(self.addr.as_str()));
        match tokio::time::timeout(timeout, connect).await {
            Ok(Ok(c)) => {
                *slot = Some(c.clone());
                Ok(c)
            }
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err(format!(
                "no connection to {} within {SHARD_CONNECT_TIMEOUT_MS} ms",
                self.addr
            )),
        }
    }

    /// Drop the connection (it broke); the next call reconnects.
    pub async fn forget(&self) {
        *self.client.lock().await = None;
    }
}

pub struct ShardLinks {
    max: usize,
    links: Mutex<HashMap<String, Arc<Link>>>,
}

impl Default for ShardLinks {
    fn default() -> Self {
        ShardLinks::with_max(SHARD_LINKS_MAX)
    }
}

impl ShardLinks {
    pub fn with_max(max: usize) -> ShardLinks {
        assert!(max > SHARDS_MAX, "room for a whole map and more");
        ShardLinks {
            max,
            links: Mutex::new(HashMap::new()),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Arc<Link>>> {
        self.links.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The link to `addr`, made if new; `in_map` says which addresses the
    /// map in use holds (kept when the table is full).
    pub fn get(&self, addr: &str, in_map: impl Fn(&str) -> bool) -> Arc<Link> {
        let mut links = self.lock();
        if let Some(l) = links.get(addr) {
            return l.clone();
        }
        if links.len() >= self.max {
            links.retain(|a, _| in_map(a));
            metrics::counter!("gateway_shard_links_pruned_total").increment(1);
        }
        assert!(links.len() < self.max, "a map never fills the link table");
        let link = Arc::new(Link {
            addr: addr.to_string(),
            client: tokio::sync::Mutex::new(None),
        });
        links.insert(addr.to_string(), link.clone());
        link
    }

    /// Keep only the links whose address `keep` accepts.
    pub fn retain(&self, keep: impl Fn(&str) -> bool) {
        self.lock().retain(|a, _| keep(a));
    }

    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_table_drops_the_links_outside_the_map() {
        let links = ShardLinks::with_max(SHARDS_MAX + 2);
        let in_map = |a: &str| a.starts_with("map-");
        for i in 0..SHARDS_MAX {
            links.get(&format!("map-{i}"), in_map);
        }
        let moved = links.get("moved-1", in_map);
        assert!(Arc::ptr_eq(&moved, &links.get("moved-1", in_map)), "reused");
        links.get("moved-2", in_map);
        assert_eq!(links.len(), SHARDS_MAX + 2);
        links.get("moved-3", in_map);
        assert_eq!(links.len(), SHARDS_MAX + 1, "moved-1 and -2 went");
        let again = links.get("moved-1", in_map);
        assert!(!Arc::ptr_eq(&moved, &again), "a fresh link");
        links.retain(in_map);
        assert_eq!(links.len(), SHARDS_MAX);
    }
}
