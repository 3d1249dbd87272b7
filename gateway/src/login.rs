//! Checking a login (the handshake payload) off the event loop: a password
//! goes to the profile service (argon2id on its pool), a resume token is
//! checked here in microseconds. The answer carries a fresh token and the
//! user's offline-mailbox count.

use crate::{resume::ResumeClaims, services::Services};
use presence::Status;
use proto::{
    app::{self, Login, LoginAccepted, LoginAnswer, LoginError, LoginMethod, APP_PROTOCOL_VERSION},
    profile::ErrorCode,
};

/// The outcome of one login: the user and the encoded answer, or the
/// encoded refusal.
pub type LoginOutcome = Result<(u64, Vec<u8>), Vec<u8>>;

fn refuse(code: LoginError, message: impl Into<String>) -> Vec<u8> {
    app::encode(&LoginAnswer::Refused {
        code,
        message: message.into(),
    })
}

/// Check the login in `payload`; if it is good, record `session` (the id the
/// loop will accept it as) with presence before answering, so nobody sees
/// the user offline after the client heard it is logged in.
pub async fn check(services: &Services, payload: &[u8], session: u64) -> LoginOutcome {
    let login: Login =
        app::decode(payload).map_err(|e| refuse(LoginError::BadRequest, e.to_string()))?;
    if login.version != APP_PROTOCOL_VERSION {
        return Err(refuse(
            LoginError::BadRequest,
            format!("protocol version {} not supported", login.version),
        ));
    }
    let now_s = crate::services::now_ms() / 1000;
    let user = match login.method {
        LoginMethod::Password { username, password } => {
            password_login(services, &username, &password).await?
        }
        LoginMethod::Resume { token } => {
            services
                .tokens
                .verify(&token, now_s)
                .map_err(|e| refuse(LoginError::BadToken, e.to_string()))?
                .user
        }
    };
    if let Err(e) = services
        .presence
        .online(user, session, Status::Online)
        .await
    {
        // The presence client keeps the change and sends it when its link
        // is back; the login goes on.
        tracing::warn!(user, error = %e, "presence did not record a login yet");
    }
    let (mailbox_count, mailbox_high_seq) = match services.shards.user_stats(user).await {
        Ok(s) => (s.live_count, s.last_seq),
        Err(e) => {
            // The mailbox stays safe on its shard; the client learns the
            // count when it fetches.
            tracing::warn!(user, error = %e, "mailbox stats unavailable at login");
            (0, 0)
        }
    };
    let ttl = services.config.timers.resume_token_ttl_s;
    let token = services.tokens.issue(ResumeClaims {
        user,
        issued_at_s: now_s,
        expires_at_s: now_s + ttl,
    });
    let answer = LoginAnswer::Accepted(LoginAccepted {
        user,
        resume_token: token.to_vec(),
        mailbox_count,
        mailbox_high_seq,
        heartbeat_s: services.config.timers.heartbeat_s,
    });
    Ok((user, app::encode(&answer)))
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
