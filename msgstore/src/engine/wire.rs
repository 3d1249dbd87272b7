//! Requests of the shard protocol answered by the engine directly: the
//! daemon's event loop (`server.rs`) owns the engine and answers every
//! decoded request inside the open batch, with no queue in between.

use super::Engine;
use crate::{handle::AppendRequest, Error};
use proto::shard::{
    AppendItem, RequestBody, ResponseBody, ShardError, ShardErrorCode, APPEND_BATCH_ITEMS_MAX,
    FETCH_BYTES_MAX, FETCH_COUNT_MAX, IMPORT_RECORDS_MAX,
};

impl Engine {
    /// Answer one request inside the open batch.
    pub(crate) fn respond(&mut self, body: RequestBody) -> ResponseBody {
        let error = |e: Error| ResponseBody::Error(e.to_wire());
        match body {
            RequestBody::Append {
                user,
                msg_id,
                payload,
            } => match self.append(AppendRequest {
                user,
                msg_id,
                payload,
            }) {
                Ok(seq) => ResponseBody::Appended { seq },
                Err(e) => error(e),
            },
            RequestBody::AppendBatch { items } => self.append_batch(items, None),
            RequestBody::AppendBatchOnce { items, since_ms } => {
                self.append_batch(items, Some(since_ms))
            }
            RequestBody::Fetch {
                user,
                after_seq,
                max_count,
                max_bytes,
            } => match self.fetch(
                user,
                after_seq,
                max_count.min(FETCH_COUNT_MAX),
                max_bytes.min(FETCH_BYTES_MAX),
            ) {
                Ok(page) => ResponseBody::Records {
                    records: page.records,
                    more: page.more,
                },
                Err(e) => error(e),
            },
            RequestBody::Ack { user, up_to_seq } => match self.ack(user, up_to_seq) {
                Ok(removed) => ResponseBody::Acked { removed },
                Err(e) => error(e),
            },
            RequestBody::Expire {
                user,
                before_ms,
                up_to_seq,
            } => match self.expire(user, before_ms, up_to_seq) {
                Ok(removed) => ResponseBody::Acked { removed },
                Err(e) => error(e),
            },
            RequestBody::UserStats { user } => match self.user_stats(user) {
                Ok(stats) => ResponseBody::UserStats(stats),
                Err(e) => error(e),
            },
            RequestBody::Stats => ResponseBody::Stats(self.stats()),
            RequestBody::Ping => ResponseBody::Pong,
            RequestBody::SetRouting(routing) => match self.set_routing(routing) {
                Ok(()) => ResponseBody::RoutingSet,
                Err(e) => error(e),
            },
            RequestBody::GetRouting => ResponseBody::Routing(self.routing()),
            RequestBody::ListUsers { start, limit } => match self.list_users(start, limit) {
                Ok((users, next)) => ResponseBody::Users { users, next },
                Err(e) => error(e),
            },
            RequestBody::Freeze { user, token } => match self.freeze(user, token) {
                Ok(stats) => ResponseBody::Frozen(stats),
                Err(e) => error(e),
            },
            RequestBody::Import { records, .. } if records.len() > IMPORT_RECORDS_MAX => {
                ResponseBody::Error(ShardError {
                    code: ShardErrorCode::BadRequest,
                    message: format!(
                        "import of {} records exceeds the limit of {IMPORT_RECORDS_MAX}",
                        records.len()
                    ),
                })
            }
            RequestBody::Import {
                user,
                acked_seq,
                records,
            } => match self.import(user, acked_seq, &records) {
                Ok(stats) => ResponseBody::Imported(stats),
                Err(e) => error(e),
            },
            RequestBody::Release { user, token, moved } => match self.release(user, token, moved) {
                Ok(removed) => ResponseBody::Released { removed },
                Err(e) => error(e),
            },
        }
    }

    /// An `AppendBatch` (or, with `once_since_ms`, an `AppendBatchOnce`):
    /// each item's seq or why it was not stored, in item order.
    fn append_batch(&mut self, items: Vec<AppendItem>, once_since_ms: Option<u64>) -> ResponseBody {
        if items.len() > APPEND_BATCH_ITEMS_MAX {
            return ResponseBody::Error(ShardError {
                code: ShardErrorCode::BadRequest,
                message: format!(
                    "append batch of {} items exceeds the limit of {APPEND_BATCH_ITEMS_MAX}",
                    items.len()
                ),
            });
        }
        let results = items
            .into_iter()
            .map(|i| {
                let req = AppendRequest {
                    user: i.user,
                    msg_id: i.msg_id,
                    payload: i.payload,
                };
                match once_since_ms {
                    Some(since_ms) => self.append_once(req, since_ms),
                    None => self.append(req),
                }
                .map_err(|e| e.to_wire())
            })
            .collect();
        ResponseBody::AppendedBatch { results }
    }
}

/// The answer a request gets when its batch could not be made durable:
/// the error for everything but the answers that changed nothing.
pub(crate) fn failed(response: ResponseBody, e: &Error) -> ResponseBody {
    match response {
        r @ (ResponseBody::Stats(_)
        | ResponseBody::Pong
        | ResponseBody::Routing(_)
        | ResponseBody::RoutingSet) => r,
        _ => ResponseBody::Error(e.to_wire()),
    }
}
