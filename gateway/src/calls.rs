//! The service work the router asks for, run in tasks off the event loop:
//! client calls answered by presence, profile and the shards, stores,
//! notifying the gateway a recipient is on, and reading relations. Every
//! wait is bounded by `timers.service_timeout_ms`.

use crate::{
    router::{CallEffects, StoreItem},
    services::Services,
    shards::ShardCallError,
};
use presence::client::ClientError as PresenceError;
use profile::client::ClientError as ProfileError;
use proto::{
    app::{
        self, AppError, AppErrorCode, Call, Delivery, Reply, StoredEnvelope, FETCH_BYTES_MAX,
        FETCH_COUNT_MAX, PROFILES_MAX,
    },
    peer::Forward,
    presence::Status,
    profile::{Relations, AVATAR_RANGE_BYTES_MAX},
    shard::StoredRecord,
};
use std::{future::Future, time::Duration};

pub type CallResult = Result<Reply, AppError>;

pub fn error(code: AppErrorCode, message: impl Into<String>) -> AppError {
    AppError {
        code,
        message: message.into(),
    }
}

/// `fut`, given up after `timers.service_timeout_ms`.
///
/// A plain function, not an `async fn`: an `async fn` would keep `fut` both
/// as its argument and inside the timeout, twice its size in every
/// caller's future (a store's was 3.7 KiB, moved into place per store).
pub fn with_timeout<T>(
    services: &Services,
    fut: impl Future<Output = T>,
) -> impl Future<Output = Result<T, AppError>> {
    use futures_util::FutureExt;
    let limit = Duration::from_millis(services.config.timers.service_timeout_ms);
    tokio::time::timeout(limit, fut).map(move |r| {
        r.map_err(|_| {
            error(
                AppErrorCode::Unavailable,
                format!("no answer within {} ms", limit.as_millis()),
            )
        })
    })
}

pub(crate) fn from_profile(e: ProfileError) -> AppError {
    use proto::profile::ErrorCode;
    match e {
        ProfileError::Service(err) => match err.code {
            ErrorCode::NotFound => error(AppErrorCode::UnknownUser, err.message),
            ErrorCode::NotMember | ErrorCode::NotPermitted => {
                error(AppErrorCode::NotAllowed, err.message)
            }
            ErrorCode::Busy | ErrorCode::Storage => error(AppErrorCode::Unavailable, err.message),
            _ => error(AppErrorCode::Refused, err.message),
        },
        other => error(AppErrorCode::Unavailable, other.to_string()),
    }
}

fn from_presence(e: PresenceError) -> AppError {
    error(AppErrorCode::Unavailable, format!("presence: {e}"))
}

pub fn from_shard(e: ShardCallError) -> AppError {
    match e {
        ShardCallError::MailboxFull => {
            error(AppErrorCode::MailboxFull, "the recipient's mailbox is full")
        }
        ShardCallError::TooLarge => error(AppErrorCode::MessageTooLarge, "message too large"),
        ShardCallError::Unavailable { .. } => error(AppErrorCode::Unavailable, e.to_string()),
    }
}

/// Append `items` to `to`'s mailbox, in order: per item its seq or why not
/// (with `once_since_ms`, the seq of a copy stored since then, if any).
pub async fn store(
    services: &Services,
    to: u64,
    items: Vec<StoreItem>,
    once_since_ms: Option<u64>,
) -> Result<Vec<Result<u64, AppError>>, AppError> {
    let payloads: Vec<(u128, Vec<u8>)> = items
        .into_iter()
        .map(|i| (i.msg_id, app::encode(&i.envelope)))
        .collect();
    let results = with_timeout(
        services,
        services.shards.append_batch(to, payloads, once_since_ms),
    )
    .await?
    .map_err(from_shard)?;
    Ok(results.into_iter().map(|r| r.map_err(from_shard)).collect())
}

/// `to` has no session on this gateway: push `deliveries` (already
/// stored, in seq order) through the gateway presence says it is on; one
/// lookup for all of them. Best effort: a recipient that misses a push
/// finds the message by seq (a later push reveals the gap, and every login
/// fetches).
pub async fn notify(services: &Services, to: u64, deliveries: Vec<Delivery>) {
    let lookup = with_timeout(services, services.presence.lookup(&[to])).await;
    let gateway = match lookup {
        Ok(Ok(mut entries)) => match entries.pop().flatten() {
            Some(entry) if entry.gateway != services.gateway_id => entry.gateway,
            // Offline, or here between login and register: the router
            // tells that session `MailboxChanged` when it registers.
            _ => return,
        },
        _ => {
            metrics::counter!("gateway_notify_failed_total", "why" => "presence").increment(1);
            return;
        }
    };
    for delivery in deliveries {
        let forward = Forward::new(to, delivery);
        let sent = services.peers.forward(&services.presence, gateway, forward);
        if with_timeout(services, sent).await.ok().flatten().is_none() {
            metrics::counter!("gateway_notify_failed_total", "why" => "peer").increment(1);
        }
    }
}

/// Relations of those of `users` that exist.
pub async fn relations(services: &Services, users: Vec<u64>) -> Result<Vec<Relations>, AppError> {
    with_timeout(services, services.profile.relations(users))
        .await?
        .map_err(from_profile)
}

/// A group's members (`None`: no such group, or dissolved).
pub async fn group(
    services: &Services,
    group: u64,
) -> Result<Option<proto::groups::GroupInfo>, AppError> {
    match with_timeout(services, services.profile.get_group(group)).await? {
        Ok(info) => Ok(Some(info)),
        Err(ProfileError::Service(e)) if e.code == proto::profile::ErrorCode::NotFound => Ok(None),
        Err(e) => Err(from_profile(e)),
    }
}

/// Serve one client call; its reply and what it changed.
pub async fn run(
    services: &Services,
    session: u64,
    user: u64,
    call: Call,
) -> (CallResult, CallEffects) {
    let mut effects = CallEffects::default();
    let changed = match &call {
        Call::FriendAccept { from, .. } => vec![user, *from],
        Call::FriendRemove { friend } => vec![user, *friend],
        Call::Block { .. } | Call::Unblock { .. } => vec![user],
        _ => Vec::new(),
    };
    let result =
        match with_timeout(services, serve(services, session, user, call, &mut effects)).await {
            Ok(r) => r,
            Err(e) => Err(e),
        };
    if result.is_ok() {
        effects.changed = changed;
    }
    (result, effects)
}

async fn serve(
    services: &Services,
    session: u64,
    user: u64,
    call: Call,
    effects: &mut CallEffects,
) -> CallResult {
    let call = match crate::group_calls::serve(services, user, call, effects).await {
        Ok(result) => return result,
        Err(call) => call,
    };
    match call {
        Call::Fetch {
            after_seq,
            max_count,
            max_bytes,
        } => fetch(services, user, after_seq, max_count, max_bytes).await,
        Call::Ack { up_to_seq } => ack(services, user, up_to_seq).await,
        Call::LoginView => {
            let (reply, friends) = login_view(services, user, session).await?;
            effects.watching = Some(friends);
            Ok(reply)
        }
        Call::Profiles { users } => profiles(services, users).await,
        Call::AvatarRange { hash, offset, len } => {
            let len = len.clamp(1, AVATAR_RANGE_BYTES_MAX);
            let (total_len, bytes) = services
                .profile
                .avatar_range(hash, offset, len)
                .await
                .map_err(from_profile)?;
            Ok(Reply::AvatarBytes { total_len, bytes })
        }
        Call::SetProfile {
            nickname,
            signature,
        } => done(
            services
                .profile
                .set_profile(user, nickname.as_deref(), signature.as_deref())
                .await,
        ),
        Call::SetStatus(status) => set_status(services, user, session, status).await,
        Call::FriendRequest { to_username, group } => {
            let to = services
                .profile
                .lookup(&to_username)
                .await
                .map_err(from_profile)?;
            done(services.profile.friend_request(user, to, &group).await)
        }
        Call::FriendAccept { from, group } => {
            done(services.profile.friend_accept(user, from, &group).await)
        }
        Call::FriendReject { from } => done(services.profile.friend_reject(user, from).await),
        Call::FriendRemove { friend } => done(services.profile.friend_remove(user, friend).await),
        Call::Block { user: other } => done(services.profile.block(user, other).await),
        Call::Unblock { user: other } => done(services.profile.unblock(user, other).await),
        _ => Err(error(AppErrorCode::BadRequest, "handled by the router")),
    }
}

/// `Done` for any successful profile write.
fn done<T>(result: Result<T, ProfileError>) -> CallResult {
    result.map(|_| Reply::Done).map_err(from_profile)
}

pub async fn fetch(
    services: &Services,
    user: u64,
    after_seq: u64,
    max_count: u32,
    max_bytes: u32,
) -> CallResult {
    let (records, more) = fetch_records(services, user, after_seq, max_count, max_bytes).await?;
    let (messages, last_seq) = page(user, records);
    Ok(Reply::Mailbox {
        messages,
        last_seq,
        more,
    })
}

/// A page of `mailbox` (a user's or a group's) after `after_seq`, with the
/// client's limits clamped (§6.2), and whether more follow.
pub(crate) async fn fetch_records(
    services: &Services,
    mailbox: u64,
    after_seq: u64,
    max_count: u32,
    max_bytes: u32,
) -> Result<(Vec<StoredRecord>, bool), AppError> {
    let count = max_count.clamp(1, FETCH_COUNT_MAX);
    let bytes = max_bytes.clamp(1, FETCH_BYTES_MAX);
    services
        .shards
        .fetch(mailbox, after_seq, count, bytes)
        .await
        .map_err(from_shard)
}

/// A page's records as deliveries, and the seq of its last record. A
/// record whose payload is not a `StoredEnvelope` (written by another
/// tool) is skipped and counted, never a crash; `last_seq` moves the
/// client past it. `mailbox`: a user or group id, for the log.
pub(crate) fn page(mailbox: u64, records: Vec<StoredRecord>) -> (Vec<Delivery>, u64) {
    /// One warning per interval at most: a damaged mailbox is read again
    /// at every fetch (`gateway_undecodable_records_total` counts them all).
    static UNDECODABLE_RECORD_WARNINGS: daemon::SharedLogLimiter =
        daemon::SharedLogLimiter::new(daemon::accept::WARN_INTERVAL);
    let last_seq = records.last().map_or(0, |r| r.seq);
    let mut messages = Vec::with_capacity(records.len());
    for r in records {
        match app::decode::<StoredEnvelope>(&r.payload) {
            Ok(env) => messages.push(Delivery {
                from: env.from,
                msg_id: r.msg_id,
                sent_at_ms: env.sent_at_ms,
                body: env.body,
                seq: r.seq,
            }),
            Err(e) => {
                metrics::counter!("gateway_undecodable_records_total").increment(1);
                if let Some(held_back) = UNDECODABLE_RECORD_WARNINGS.check() {
                    tracing::warn!(mailbox, seq = r.seq, error = %e, held_back, "undecodable stored message skipped");
                }
            }
        }
    }
    (messages, last_seq)
}

pub async fn ack(services: &Services, user: u64, up_to_seq: u64) -> CallResult {
    let removed = services
        .shards
        .ack(user, up_to_seq)
        .await
        .map_err(from_shard)?;
    Ok(Reply::Acked { removed })
}

/// The login view, and a watch on every friend for `session` so their
/// status changes are pushed; the friends.
pub async fn login_view(
    services: &Services,
    user: u64,
    session: u64,
) -> Result<(Reply, Vec<u64>), AppError> {
    let view = services.profile.friends(user).await.map_err(from_profile)?;
    let friends: Vec<u64> = view
        .groups
        .iter()
        .flat_map(|g| g.friends.iter().map(|p| p.user))
        .collect();
    let entries = services
        .presence
        .watch(session, &friends)
        .await
        .map_err(from_presence)?;
    let online = friends
        .iter()
        .zip(entries)
        .filter_map(|(f, e)| e.map(|e| (*f, e.status)))
        .collect();
    Ok((Reply::LoginView { view, online }, friends))
}

/// Profiles, from the gateway's cache where it has them.
pub async fn profiles(services: &Services, users: Vec<u64>) -> CallResult {
    if users.len() > PROFILES_MAX {
        return Err(error(
            AppErrorCode::BadRequest,
            format!("at most {PROFILES_MAX} users"),
        ));
    }
    Ok(Reply::Profiles(
        services.profiles(&users).await.map_err(from_profile)?,
    ))
}

pub async fn set_status(
    services: &Services,
    user: u64,
    session: u64,
    status: Status,
) -> CallResult {
    services
        .presence
        .online(user, session, status)
        .await
        .map_err(from_presence)?;
    Ok(Reply::Done)
}
