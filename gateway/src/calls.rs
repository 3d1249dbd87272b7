//! Client calls answered by the services behind the gateway, run in tasks
//! off the event loop. Each returns the reply for the client.

use crate::{services::Services, shards::ShardCallError};
use presence::client::ClientError as PresenceError;
use profile::client::ClientError as ProfileError;
use proto::{
    app::{
        self, AppError, AppErrorCode, Delivery, Reply, SendOutcome, StoredEnvelope,
        FETCH_BYTES_MAX, FETCH_COUNT_MAX, PROFILES_MAX,
    },
    presence::Status,
    profile::AVATAR_RANGE_BYTES_MAX,
};

pub type CallResult = Result<Reply, AppError>;

pub fn error(code: AppErrorCode, message: impl Into<String>) -> AppError {
    AppError {
        code,
        message: message.into(),
    }
}

fn from_profile(e: ProfileError) -> AppError {
    match e {
        ProfileError::Service(err) => match err.code {
            proto::profile::ErrorCode::NotFound => error(AppErrorCode::UnknownUser, err.message),
            proto::profile::ErrorCode::Busy => error(AppErrorCode::Unavailable, err.message),
            proto::profile::ErrorCode::Storage => error(AppErrorCode::Unavailable, err.message),
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

/// Deliver to a recipient not online on this gateway: forward to the
/// gateway presence says it is on, else (offline, or the forward failed or
/// was given up) store it in its mailbox.
pub async fn deliver_elsewhere(
    services: &Services,
    to: u64,
    msg_id: u128,
    envelope: &StoredEnvelope,
) -> Result<SendOutcome, AppError> {
    if let Some(gateway) = remote_gateway(services, to).await {
        let forward = proto::peer::Forward {
            to,
            from: envelope.from,
            msg_id,
            sent_at_ms: envelope.sent_at_ms,
            body: envelope.body.clone(),
        };
        let outcome = services
            .peers
            .forward(&services.presence, gateway, forward)
            .await;
        if outcome == Some(proto::peer::PeerOutcome::Delivered) {
            return Ok(SendOutcome::Delivered);
        }
    }
    store(services, to, msg_id, envelope).await
}

/// The other gateway `to` is online on, if any (per presence).
async fn remote_gateway(services: &Services, to: u64) -> Option<u32> {
    let entry = services
        .presence
        .lookup(&[to])
        .await
        .ok()?
        .pop()
        .flatten()?;
    (entry.gateway != services.gateway_id).then_some(entry.gateway)
}

/// Store a message in the recipient's mailbox (durably, per the shard's
/// policy) after checking the recipient exists.
pub async fn store(
    services: &Services,
    to: u64,
    msg_id: u128,
    envelope: &StoredEnvelope,
) -> Result<SendOutcome, AppError> {
    services
        .profile
        .get_profile(to)
        .await
        .map_err(from_profile)?;
    let seq = services
        .shards
        .append(to, msg_id, app::encode(envelope))
        .await
        .map_err(from_shard)?;
    Ok(SendOutcome::Stored { seq })
}

pub async fn fetch(
    services: &Services,
    user: u64,
    after_seq: u64,
    max_count: u32,
    max_bytes: u32,
) -> CallResult {
    let count = max_count.clamp(1, FETCH_COUNT_MAX);
    let bytes = max_bytes.clamp(1, FETCH_BYTES_MAX);
    let (records, more) = services
        .shards
        .fetch(user, after_seq, count, bytes)
        .await
        .map_err(from_shard)?;
    let mut messages = Vec::with_capacity(records.len());
    for r in records {
        match app::decode::<StoredEnvelope>(&r.payload) {
            Ok(env) => messages.push(Delivery {
                from: env.from,
                msg_id: r.msg_id,
                sent_at_ms: env.sent_at_ms,
                body: env.body,
                seq: Some(r.seq),
            }),
            // Not ours (written by another tool): skip it, never crash.
            Err(e) => {
                tracing::warn!(user, seq = r.seq, error = %e, "undecodable stored message skipped")
            }
        }
    }
    Ok(Reply::Mailbox { messages, more })
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
/// status changes are pushed.
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

pub async fn profiles(services: &Services, users: Vec<u64>) -> CallResult {
    if users.len() > PROFILES_MAX {
        return Err(error(
            AppErrorCode::BadRequest,
            format!("at most {PROFILES_MAX} users"),
        ));
    }
    Ok(Reply::Profiles(
        services
            .profile
            .get_profiles(users)
            .await
            .map_err(from_profile)?,
    ))
}

pub async fn avatar_range(
    services: &Services,
    hash: [u8; 32],
    offset: u32,
    len: u32,
) -> CallResult {
    let len = len.clamp(1, AVATAR_RANGE_BYTES_MAX);
    let (total_len, bytes) = services
        .profile
        .avatar_range(hash, offset, len)
        .await
        .map_err(from_profile)?;
    Ok(Reply::AvatarBytes { total_len, bytes })
}

pub async fn set_profile(
    services: &Services,
    user: u64,
    nickname: Option<String>,
    signature: Option<String>,
) -> CallResult {
    services
        .profile
        .set_profile(user, nickname.as_deref(), signature.as_deref())
        .await
        .map_err(from_profile)?;
    Ok(Reply::Done)
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

pub async fn friend_request(
    services: &Services,
    user: u64,
    to_username: &str,
    group: &str,
) -> CallResult {
    let to = services
        .profile
        .lookup(to_username)
        .await
        .map_err(from_profile)?;
    services
        .profile
        .friend_request(user, to, group)
        .await
        .map_err(from_profile)?;
    Ok(Reply::Done)
}

pub async fn friend_accept(services: &Services, user: u64, from: u64, group: &str) -> CallResult {
    services
        .profile
        .friend_accept(user, from, group)
        .await
        .map_err(from_profile)?;
    Ok(Reply::Done)
}

pub async fn friend_reject(services: &Services, user: u64, from: u64) -> CallResult {
    services
        .profile
        .friend_reject(user, from)
        .await
        .map_err(from_profile)?;
    Ok(Reply::Done)
}

pub async fn friend_remove(services: &Services, user: u64, friend: u64) -> CallResult {
    services
        .profile
        .friend_remove(user, friend)
        .await
        .map_err(from_profile)?;
    Ok(Reply::Done)
}
