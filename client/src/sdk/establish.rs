//! One login: resolve the gateway's name, try its addresses in random
//! order (failing over to the next when a handshake times out), and run
//! the handshake that carries the login. The first connect and every
//! reconnect go through here.

use super::{ConnectError, Credentials, SdkConfig};
use crate::{Client, DriverConfig, DriverError};
use proto::{
    app::APP_PROTOCOL_VERSION,
    app::{decode, encode, Login, LoginAccepted, LoginAnswer, LoginError, LoginMethod},
    session::Event,
};
use rand::seq::SliceRandom;
use std::net::SocketAddr;
use tokio::sync::mpsc;

/// Addresses of one gateway name tried per login at most.
pub const GATEWAY_ADDRS_MAX: usize = 64;

/// A live session with a gateway.
pub(crate) struct Link {
    pub(crate) client: Client,
    pub(crate) events: mpsc::Receiver<Event>,
    pub(crate) addr: SocketAddr,
}

pub(crate) struct Established {
    pub(crate) link: Link,
    pub(crate) accepted: LoginAccepted,
}

/// What the SDK can log in with: the latest resume token first, the
/// password (if it was given one) when the token is refused.
#[derive(Clone)]
pub(crate) struct Secrets {
    pub(crate) token: Option<Vec<u8>>,
    pub(crate) password: Option<(String, String)>,
}

impl Secrets {
    pub(crate) fn new(credentials: &Credentials) -> Self {
        match credentials {
            Credentials::Password { username, password } => Secrets {
                token: None,
                password: Some((username.clone(), password.clone())),
            },
            Credentials::ResumeToken(token) => Secrets {
                token: Some(token.clone()),
                password: None,
            },
        }
    }

    fn methods(&self) -> Vec<LoginMethod> {
        let token = self
            .token
            .iter()
            .map(|t| LoginMethod::Resume { token: t.clone() });
        let password = self
            .password
            .iter()
            .map(|(username, password)| LoginMethod::Password {
                username: username.clone(),
                password: password.clone(),
            });
        token.chain(password).collect()
    }
}

/// Log in at one of the gateway's addresses, in random order; an address
/// that does not answer the handshake (or whose socket fails) passes the
/// turn to the next.
pub(crate) async fn establish(
    config: &SdkConfig,
    secrets: &Secrets,
) -> Result<Established, ConnectError> {
    let mut addrs = resolve(&config.gateway).await?;
    addrs.shuffle(&mut rand::thread_rng());
    let mut last = ConnectError::Unreachable { tried: addrs.len() };
    for &addr in &addrs {
        match login_at(config, addr, secrets).await {
            Err(ConnectError::Unreachable { .. }) => {
                tracing::debug!(%addr, "gateway handshake timed out; trying the next address");
            }
            Err(e @ ConnectError::Io(_)) => {
                tracing::debug!(%addr, error = %e, "socket failed; trying the next address");
                last = e;
            }
            other => return other,
        }
    }
    Err(last)
}

/// Every address of every comma-separated `host:port` in `gateway`, each
/// once, at most `GATEWAY_ADDRS_MAX`.
async fn resolve(gateway: &str) -> Result<Vec<SocketAddr>, ConnectError> {
    let mut addrs: Vec<SocketAddr> = Vec::new();
    for name in gateway.split(',').map(str::trim).filter(|n| !n.is_empty()) {
        let found = tokio::net::lookup_host(name)
            .await
            .map_err(|e| ConnectError::Resolve {
                addr: name.to_string(),
                message: e.to_string(),
            })?;
        for addr in found {
            if !addrs.contains(&addr) && addrs.len() < GATEWAY_ADDRS_MAX {
                addrs.push(addr);
            }
        }
    }
    if addrs.is_empty() {
        return Err(ConnectError::NoAddress(gateway.to_string()));
    }
    Ok(addrs)
}

/// Try each login method in turn; a refused token falls back to the
/// password.
async fn login_at(
    config: &SdkConfig,
    addr: SocketAddr,
    secrets: &Secrets,
) -> Result<Established, ConnectError> {
    let methods = secrets.methods();
    let last = methods.len().saturating_sub(1);
    for (i, method) in methods.into_iter().enumerate() {
        match handshake(config, addr, method).await {
            Err(ConnectError::Refused {
                code: LoginError::BadToken,
                ..
            }) if i < last => {}
            other => return other,
        }
    }
    unreachable!("credentials always hold a token or a password")
}

async fn handshake(
    config: &SdkConfig,
    addr: SocketAddr,
    method: LoginMethod,
) -> Result<Established, ConnectError> {
    let login = encode(&Login {
        version: APP_PROTOCOL_VERSION,
        method,
    });
    let mut driver = DriverConfig::new(addr, config.gateway_public, login);
    driver.session = config.session.clone();
    driver.events_max = config.limits.session_events_max;
    let (client, mut events) = Client::connect(driver).await.map_err(|e| match e {
        DriverError::Io(e) => ConnectError::Io(e.to_string()),
        DriverError::Connect(e) => ConnectError::LoginTooLarge(e.to_string()),
    })?;
    // The session's first event is the handshake's outcome.
    match events.recv().await {
        Some(Event::Connected { payload, .. }) => match decode::<LoginAnswer>(&payload) {
            Ok(LoginAnswer::Accepted(accepted)) => {
                // Heartbeats at least as often as the gateway asked.
                let asked = std::time::Duration::from_secs(accepted.heartbeat_s.max(1).into());
                let configured = config.session.session.keepalive;
                if configured.is_zero() || asked < configured {
                    client.set_keepalive(asked);
                }
                Ok(Established {
                    link: Link {
                        client,
                        events,
                        addr,
                    },
                    accepted,
                })
            }
            other => {
                client.close();
                Err(ConnectError::BadAnswer(format!(
                    "accepted handshake without an acceptance: {other:?}"
                )))
            }
        },
        Some(Event::Rejected { payload }) => match decode::<LoginAnswer>(&payload) {
            Ok(LoginAnswer::Refused { code, message }) => {
                Err(ConnectError::Refused { code, message })
            }
            other => Err(ConnectError::BadAnswer(format!(
                "rejected handshake without a refusal: {other:?}"
            ))),
        },
        Some(Event::Closed(_)) | None => Err(ConnectError::Unreachable { tried: 1 }),
        Some(other) => Err(ConnectError::BadAnswer(format!(
            "unexpected first session event {other:?}"
        ))),
    }
}
