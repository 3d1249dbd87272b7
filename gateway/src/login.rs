//! Checking a login (the handshake payload) off the event loop: a password
//! goes to the profile service (argon2id on its pool), a resume token is
//! checked here in microseconds and must carry the account's current
//! credential epoch (a password change or a disable revokes every earlier
//! token). The answer carries a fresh token and the user's offline-mailbox
//! figures.

use crate::{
    calls::with_timeout,
    resume::{ResumeClaims, NONCE_BYTES},
    router::{LoginOk, LoginOutcome},
    services::Services,
};
use presence::Status;
use profile::client::LoginClaim;
use proto::{
    app::{self, Login, LoginAccepted, LoginAnswer, LoginError, LoginMethod, APP_PROTOCOL_VERSION},
    profile::{ErrorCode, Relations},
};
use rand::RngCore;

fn refuse(code: LoginError, message: impl Into<String>) -> Vec<u8> {
    app::encode(&LoginAnswer::Refused {
        code,
        message: message.into(),
    })
}

/// Check the login in `payload`; if it is good, record `session` (the id the
/// router will accept it as) with presence before answering, so nobody sees
/// the user offline after the client heard it is logged in.
pub async fn check(services: &Services, payload: &[u8], session: u64) -> LoginOutcome {
    match checked(services, payload, session).await {
        Ok(ok) => LoginOutcome::Accepted(ok),
        Err(refusal) => LoginOutcome::Refused(refusal),
    }
}

async fn checked(services: &Services, payload: &[u8], session: u64) -> Result<LoginOk, Vec<u8>> {
    let version = Login::version_of(payload);
    if version.is_some_and(|v| v != APP_PROTOCOL_VERSION) {
        return Err(refuse(
            LoginError::BadRequest,
            format!(
                "protocol version {} not supported (this gateway speaks {APP_PROTOCOL_VERSION})",
                version.unwrap_or_default()
            ),
        ));
    }
    let login: Login =
        app::decode(payload).map_err(|e| refuse(LoginError::BadRequest, e.to_string()))?;
    let now_s = crate::services::now_ms() / 1000;
    let (user, token_epoch) = match login.method {
        LoginMethod::Password { username, password } => {
            (password_login(services, &username, &password).await?, None)
        }
        LoginMethod::Resume { token } => {
            let claims = services
                .tokens
                .verify(&token, now_s)
                .map_err(|e| refuse(LoginError::BadToken, e.to_string()))?;
            (claims.user, Some(claims.credential_epoch))
        }
    };
    let relations = account_state(services, user, login.login_ns, token_epoch).await?;
    let go_online = services.presence.online(user, session, Status::Online);
    if let Err(e) | Ok(Err(e)) = with_timeout(services, go_online).await.map(|r| {
        r.map_err(|e| crate::calls::error(proto::app::AppErrorCode::Unavailable, e.to_string()))
    }) {
        // The presence client keeps the change and sends it when its link
        // is back; the login goes on.
        tracing::warn!(user, error = %e.message, "presence did not record a login yet");
    }
    let stats = with_timeout(services, services.shards.user_stats(user)).await;
    let (mailbox_count, mailbox_high_seq) = match stats {
        Ok(Ok(s)) => (s.live_count, s.last_seq),
        failed => {
            // The mailbox stays safe on its shard; the client learns the
            // figures when it fetches.
            tracing::warn!(user, ?failed, "mailbox stats unavailable at login");
            (0, 0)
        }
    };
    let ttl = services.config.timers.resume_token_ttl_s;
    let mut nonce = [0u8; NONCE_BYTES];
    rand::rngs::OsRng.fill_bytes(&mut nonce);
    let claims = ResumeClaims {
        user,
        issued_at_s: now_s,
        expires_at_s: now_s + ttl,
        credential_epoch: relations.credential_epoch,
    };
    let answer = LoginAnswer::Accepted(LoginAccepted {
        user,
        resume_token: services.tokens.issue(claims, nonce).to_vec(),
        mailbox_count,
        mailbox_high_seq,
        heartbeat_s: services.config.timers.heartbeat_s,
    });
    Ok(LoginOk {
        user,
        answer: app::encode(&answer),
        relations,
    })
}

/// Claim the login's freshness with profile (refused if `login_ns` is not
/// newer than the user's last accepted login: a replayed handshake), and
/// check the account as profile has it then: enabled, and (for a token)
/// still at the token's credential epoch.
async fn account_state(
    services: &Services,
    user: u64,
    login_ns: u64,
    token_epoch: Option<u32>,
) -> Result<Relations, Vec<u8>> {
    let claim = with_timeout(services, services.profile.claim_login(user, login_ns)).await;
    let relations = match claim {
        Ok(Ok(LoginClaim::Fresh(relations))) => relations,
        Ok(Ok(LoginClaim::Stale { last_ns })) => {
            metrics::counter!("gateway_logins_stale_total").increment(1);
            return Err(app::encode(&LoginAnswer::Stale { last_ns }));
        }
        Ok(Err(e)) if e.code() == Some(ErrorCode::NotFound) => {
            return Err(refuse(LoginError::WrongCredentials, "no such user"));
        }
        failed => {
            tracing::warn!(user, ?failed, "cannot read the account at login");
            return Err(refuse(
                LoginError::Unavailable,
                "profile service unavailable",
            ));
        }
    };
    if relations.disabled {
        return Err(refuse(LoginError::AccountDisabled, "account disabled"));
    }
    if token_epoch.is_some_and(|e| e != relations.credential_epoch) {
        return Err(refuse(
            LoginError::BadToken,
            "the password changed since this token was issued",
        ));
    }
    Ok(relations)
}

async fn password_login(
    services: &Services,
    username: &str,
    password: &str,
) -> Result<u64, Vec<u8>> {
    match services
        .profile
        .check_password(username, password.as_bytes())
        .await
    {
        Ok(user) => Ok(user),
        Err(e) => Err(match e.code() {
            Some(
                ErrorCode::WrongCredentials
                | ErrorCode::NotFound
                | ErrorCode::InvalidUtf8
                | ErrorCode::FieldTooLong
                | ErrorCode::InvalidField,
            ) => refuse(LoginError::WrongCredentials, "wrong username or password"),
            Some(ErrorCode::AccountDisabled) => {
                refuse(LoginError::AccountDisabled, "account disabled")
            }
            Some(ErrorCode::Busy) => refuse(LoginError::Busy, "too many logins; retry shortly"),
            _ => refuse(LoginError::Unavailable, format!("profile service: {e}")),
        }),
    }
}
