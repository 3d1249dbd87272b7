//! The rebalance calls of [`ShardClient`]: routing, user listing, and the
//! freeze / import / release steps that move one user between shards
//! (`docs/PROTOCOL.md` section 1, "Rebalance").

use crate::client::{unexpected, ClientError, ShardClient};
use proto::shard::{MailboxStats, RequestBody, ResponseBody, Routing, StoredRecord, UserEntry};

impl ShardClient {
    /// Install the maps this shard routes by.
    pub async fn set_routing(&self, routing: Routing) -> Result<(), ClientError> {
        match self.call(RequestBody::SetRouting(routing)).await? {
            ResponseBody::RoutingSet => Ok(()),
            other => Err(unexpected("RoutingSet", &other)),
        }
    }

    /// The routing the shard has installed, if any.
    pub async fn get_routing(&self) -> Result<Option<Routing>, ClientError> {
        match self.call(RequestBody::GetRouting).await? {
            ResponseBody::Routing(r) => Ok(r),
            other => Err(unexpected("Routing", &other)),
        }
    }

    /// Users with a mailbox here with ids from `start` on, and where the
    /// next page starts if more may follow.
    pub async fn list_users(
        &self,
        start: u64,
        limit: u32,
    ) -> Result<(Vec<UserEntry>, Option<u64>), ClientError> {
        match self.call(RequestBody::ListUsers { start, limit }).await? {
            ResponseBody::Users { users, next } => Ok((users, next)),
            other => Err(unexpected("Users", &other)),
        }
    }

    /// Refuse writes to `user` until released under `token`.
    pub async fn freeze(&self, user: u64, token: u64) -> Result<MailboxStats, ClientError> {
        match self.call(RequestBody::Freeze { user, token }).await? {
            ResponseBody::Frozen(stats) => Ok(stats),
            other => Err(unexpected("Frozen", &other)),
        }
    }

    /// Bring `user`'s mailbox here up to a copy of its old shard's.
    pub async fn import(
        &self,
        user: u64,
        acked_seq: u64,
        records: Vec<StoredRecord>,
    ) -> Result<MailboxStats, ClientError> {
        let body = RequestBody::Import {
            user,
            acked_seq,
            records,
        };
        match self.call(body).await? {
            ResponseBody::Imported(stats) => Ok(stats),
            other => Err(unexpected("Imported", &other)),
        }
    }

    /// End a freeze; with `moved`, delete the mailbox and answer `Moved`
    /// for the user from now on. Returns how many records were deleted.
    pub async fn release(&self, user: u64, token: u64, moved: bool) -> Result<u64, ClientError> {
        match self
            .call(RequestBody::Release { user, token, moved })
            .await?
        {
            ResponseBody::Released { removed } => Ok(removed),
            other => Err(unexpected("Released", &other)),
        }
    }
}
