//! One login: resolve the gateways' names and race handshakes to their
//! addresses in the style of happy eyeballs (RFC 8305): the first address
//! at once, the next one `gateway_stagger_ms` later while none has
//! answered (or at once when one fails), the first to accept wins and the
//! others are dropped. Every handshake of one round carries the same
//! `login_ns`, and the profile service accepts one `login_ns` once, so at
//! most one gateway can accept a round: the race never opens two sessions
//! that would kick each other. Addresses that failed are remembered for
//! `dead_gateway_memory_ms` and tried last. Once a gateway says another
//! one claimed the round, the winner's answer is awaited
//! `claimed_login_wait_ms` at most (it may have died after its claim);
//! then a new round goes above it. The first connect and every reconnect
//! go through here.

use super::{ConnectError, Credentials, SdkConfig};
use crate::{next_login_ns, Client, DriverConfig, DriverError};
use futures_util::stream::{FuturesUnordered, StreamExt};
use proto::{
    app::{decode, encode, Login, LoginAccepted, LoginAnswer, LoginError, LoginMethod},
    session::Event,
};
use rand::seq::SliceRandom;
use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};
use tokio::sync::mpsc;

/// Addresses of one gateway name tried per login at most.
pub const GATEWAY_ADDRS_MAX: usize = 64;
/// Rounds in a row refused as stale (another device's clock ahead) before
/// a login gives up; each retries above the `last_ns` it was told.
pub const STALE_ROUNDS_MAX: usize = 2;

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

/// Gateway addresses whose handshake (or session) failed recently, each
/// with the time until which it is tried last; shared by every login of
/// one connection. At most [`GATEWAY_ADDRS_MAX`] are remembered.
#[derive(Clone, Default)]
pub(crate) struct Dialer {
    dead: Arc<Mutex<HashMap<SocketAddr, Instant>>>,
}

impl Dialer {
    fn dead(&self) -> std::sync::MutexGuard<'_, HashMap<SocketAddr, Instant>> {
        self.dead.lock().expect("dialer mutex poisoned")
    }

    /// `addrs` in the order to try them: those not known to be dead first,
    /// each group shuffled.
    fn order(&self, mut addrs: Vec<SocketAddr>, now: Instant) -> Vec<SocketAddr> {
        addrs.shuffle(&mut rand::thread_rng());
        let mut dead = self.dead();
        dead.retain(|_, until| *until > now);
        addrs.sort_by_key(|a| dead.contains_key(a)); // stable: keeps the shuffle
        addrs
    }

    /// Try `addr` last until `memory` has passed.
    pub(crate) fn mark_dead(&self, addr: SocketAddr, now: Instant, memory: Duration) {
        let mut dead = self.dead();
        dead.retain(|_, until| *until > now);
        if dead.len() >= GATEWAY_ADDRS_MAX && !dead.contains_key(&addr) {
            let soonest = dead
                .iter()
                .min_by_key(|(_, until)| **until)
                .map(|(a, _)| *a);
            if let Some(a) = soonest {
                dead.remove(&a);
            }
        }
        dead.insert(addr, now + memory);
    }

    fn mark_alive(&self, addr: SocketAddr) {
        self.dead().remove(&addr);
    }

    /// Whether `addr` is remembered as dead now (tests).
    #[cfg(test)]
    fn is_dead(&self, addr: SocketAddr, now: Instant) -> bool {
        self.dead().get(&addr).is_some_and(|until| *until > now)
    }
}

/// Log in at one of the gateways: token first, the password when the token
/// is refused; a stale refusal (the user's last login carries a later
/// `login_ns`, from another device's clock) is retried above it.
pub(crate) async fn establish(
    config: &SdkConfig,
    secrets: &Secrets,
    dialer: &Dialer,
) -> Result<Established, ConnectError> {
    let addrs = dialer.order(resolve(&config.gateway).await?, Instant::now());
    let methods = secrets.methods();
    let (mut method, mut floor_ns, mut stale_rounds) = (0, 0, 0);
    loop {
        let login_ns = next_login_ns(floor_ns);
        match race(config, &addrs, &methods[method], login_ns, dialer).await {
            Err(ConnectError::Refused {
                code: LoginError::BadToken,
                ..
            }) if method + 1 < methods.len() => method += 1,
            Err(ConnectError::Stale { last_ns }) if stale_rounds < STALE_ROUNDS_MAX => {
                tracing::info!(
                    last_ns,
                    login_ns,
                    "login refused as stale; retrying above it"
                );
                floor_ns = last_ns;
                stale_rounds += 1;
            }
            other => return other,
        }
    }
}

/// One round: handshakes carrying `method` and `login_ns` to `addrs`,
/// staggered; the first acceptance, else the most telling failure.
async fn race(
    config: &SdkConfig,
    addrs: &[SocketAddr],
    method: &LoginMethod,
    login_ns: u64,
    dialer: &Dialer,
) -> Result<Established, ConnectError> {
    let login = encode(&Login::new(method.clone(), login_ns));
    let timing = RoundTiming::of(config);
    race_with(addrs, login_ns, timing, dialer, |addr| {
        handshake(config, addr, login.clone())
    })
    .await
}

/// The timers of one round (from [`super::SdkLimits`]).
#[derive(Debug, Clone, Copy)]
struct RoundTiming {
    stagger: Duration,
    dead_memory: Duration,
    claimed_wait: Duration,
}

impl RoundTiming {
    fn of(config: &SdkConfig) -> RoundTiming {
        let ms = Duration::from_millis;
        RoundTiming {
            stagger: ms(config.limits.gateway_stagger_ms),
            dead_memory: ms(config.limits.dead_gateway_memory_ms),
            claimed_wait: ms(config.limits.claimed_login_wait_ms),
        }
    }
}

/// [`race`] with the handshake to one address as `attempt`.
async fn race_with<T, F, Fut>(
    addrs: &[SocketAddr],
    login_ns: u64,
    timing: RoundTiming,
    dialer: &Dialer,
    attempt: F,
) -> Result<T, ConnectError>
where
    F: Fn(SocketAddr) -> Fut,
    Fut: std::future::Future<Output = Result<T, ConnectError>>,
{
    let mut attempts = FuturesUnordered::new();
    let mut next = 0;
    let mut next_start = Instant::now();
    let mut failure = ConnectError::Unreachable { tried: addrs.len() };
    // When a gateway said another attempt of this round claimed it.
    let mut claimed_at: Option<Instant> = None;
    loop {
        if next < addrs.len() && Instant::now() >= next_start {
            let addr = addrs[next];
            let handshake = attempt(addr);
            attempts.push(async move { (addr, handshake.await) });
            next += 1;
            next_start = Instant::now() + timing.stagger;
        }
        if attempts.is_empty() {
            return Err(failure);
        }
        let more = next < addrs.len();
        let give_up_at = claimed_at.map(|at| at + timing.claimed_wait);
        tokio::select! {
            Some((addr, result)) = attempts.next() => match result {
                Ok(established) => {
                    dialer.mark_alive(addr);
                    return Ok(established); // the other attempts are dropped
                }
                Err(e @ (ConnectError::Unreachable { .. } | ConnectError::Io(_))) => {
                    tracing::debug!(%addr, error = %e, "gateway did not answer; trying the next");
                    dialer.mark_dead(addr, Instant::now(), timing.dead_memory);
                    next_start = Instant::now();
                }
                // Another attempt of this round claimed the login: its
                // answer is on its way, or its gateway died after the
                // claim (then the round ends at `claimed_wait`).
                Err(ConnectError::Stale { last_ns }) if last_ns == login_ns => {
                    claimed_at.get_or_insert_with(Instant::now);
                }
                Err(e) if e.is_transient() || matches!(e, ConnectError::Stale { .. }) => {
                    failure = e;
                }
                Err(refused) => return Err(refused),
            },
            () = tokio::time::sleep_until(next_start.into()), if more => {}
            () = sleep_until_some(give_up_at) => {
                tracing::info!(login_ns, "the login was claimed but its gateway never answered; a new round above it");
                return Err(ConnectError::Stale { last_ns: login_ns });
            }
        }
    }
}

/// Sleep until `at`; never, for `None`.
async fn sleep_until_some(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at.into()).await,
        None => std::future::pending().await,
    }
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

async fn handshake(
    config: &SdkConfig,
    addr: SocketAddr,
    login: Vec<u8>,
) -> Result<Established, ConnectError> {
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
            Ok(LoginAnswer::Stale { last_ns }) => Err(ConnectError::Stale { last_ns }),
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

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(port: u16) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], port))
    }

    #[test]
    fn dead_addresses_go_last_until_their_memory_passes() {
        let dialer = Dialer::default();
        let now = Instant::now();
        let memory = Duration::from_secs(30);
        dialer.mark_dead(addr(1), now, memory);
        for _ in 0..20 {
            let order = dialer.order(vec![addr(1), addr(2), addr(3)], now);
            assert_eq!(order[2], addr(1), "{order:?}");
        }
        assert!(dialer.is_dead(addr(1), now + memory - Duration::from_millis(1)));
        assert!(!dialer.is_dead(addr(1), now + memory));
        dialer.mark_alive(addr(1));
        assert!(!dialer.is_dead(addr(1), now));
    }

    type Attempt =
        std::pin::Pin<Box<dyn std::future::Future<Output = Result<SocketAddr, ConnectError>>>>;

    const TIMING: RoundTiming = RoundTiming {
        stagger: Duration::from_millis(5),
        dead_memory: Duration::from_secs(1),
        claimed_wait: Duration::from_millis(50),
    };

    /// Address 1 claims the round and then never answers (its gateway died
    /// or was cut off between the claim and the answer); address 2 says so
    /// (`Stale` with the round's `login_ns`). Waiting for 1's answer would
    /// last until its handshake timed out: the round ends `Stale` at the
    /// claimed wait instead, and the login goes on above it.
    #[tokio::test]
    async fn a_round_whose_claimed_winner_never_answers_ends_stale() {
        let dialer = Dialer::default();
        let attempt = |a: SocketAddr| -> Attempt {
            if a == addr(1) {
                Box::pin(std::future::pending())
            } else {
                Box::pin(async { Err(ConnectError::Stale { last_ns: 7 }) })
            }
        };
        let addrs = [addr(1), addr(2)];
        let round = race_with(&addrs, 7, TIMING, &dialer, attempt);
        let ended = tokio::time::timeout(Duration::from_secs(10), round).await;
        assert_eq!(
            ended.expect("the round ended").unwrap_err().to_string(),
            ConnectError::Stale { last_ns: 7 }.to_string()
        );
    }

    /// The winner's answer comes within the claimed wait: it wins.
    #[tokio::test]
    async fn a_claimed_winner_that_answers_in_time_wins() {
        let dialer = Dialer::default();
        let attempt = |a: SocketAddr| -> Attempt {
            if a == addr(1) {
                Box::pin(async move {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    Ok(a)
                })
            } else {
                Box::pin(async { Err(ConnectError::Stale { last_ns: 7 }) })
            }
        };
        let timing = RoundTiming {
            claimed_wait: Duration::from_secs(30),
            ..TIMING
        };
        let addrs = [addr(1), addr(2)];
        let round = race_with(&addrs, 7, timing, &dialer, attempt);
        assert_eq!(round.await.unwrap(), addr(1));
    }

    #[test]
    fn the_dead_list_is_bounded() {
        let dialer = Dialer::default();
        let now = Instant::now();
        for port in 0..(GATEWAY_ADDRS_MAX as u16 + 10) {
            let memory = Duration::from_secs(100 + u64::from(port));
            dialer.mark_dead(addr(port), now, memory);
        }
        assert_eq!(dialer.dead().len(), GATEWAY_ADDRS_MAX);
        assert!(
            !dialer.is_dead(addr(0), now),
            "the soonest to expire went first"
        );
        assert!(dialer.is_dead(addr(GATEWAY_ADDRS_MAX as u16 + 9), now));
    }
}
