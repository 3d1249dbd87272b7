//! Which replica of a profile group a request goes to.
//!
//! A client made for several addresses (`"a,b,c"`, the replicas of a
//! profile group) keeps a connection to each. Reads and password checks
//! go round-robin to the connected replicas (each serves a read only once
//! it has applied what its leader had committed, so none is older than a
//! read answered before it; argon2 spreads over the group). Reads change
//! nothing, so they are *hedged*: one that gets no answer within a
//! quarter of [`ClientConfig::replica_attempt_ms`](super::ClientConfig)
//! ([`HEDGE_DIVISOR`]; a paused process keeps its connections open) is
//! also sent to the next replica, the first attempt staying in flight, and
//! the first answer wins; one whose replica is disconnected, or answers
//! `Unavailable`, goes to the next at once. A replica that leaves an
//! attempt unanswered for the whole `replica_attempt_ms` is *stuck* for
//! [`STUCK_MS`]: nothing is sent to it while another replica is not.
//!
//! Writes go to the replica that led last (unless stuck); `NotLeader`
//! names the leader, which the write is sent to instead. A write is sent
//! again only when it was surely not done (`NotLeader`, or no connection
//! to send it on); one cut off in flight fails as it would with one
//! replica. A write not answered within `replica_attempt_ms` is still
//! awaited (it may be done), but marks its replica stuck, so the writes
//! after it find the next leader instead of queueing on a paused one; so
//! does a write answered `Unavailable` (a leader that could not commit in
//! time), which is answered as it is (it may still be done).
//!
//! A write that is the same done once or twice ([`resendable`]: a login
//! claim with its own number) is hedged as reads are, following
//! `NotLeader`, and one answered `Unavailable` marks its replica stuck and
//! goes to the next. So a login in flight when its leader stops is claimed
//! at the new leader, and one at a leader that is only slow still gets
//! that leader's answer.

use super::{Answer, ClientError, Inner};
use crate::service::Service;
use futures_util::stream::{FuturesUnordered, StreamExt};
use proto::profile::{ErrorCode, ProfileError, RequestBody, ResponseBody};
use std::{
    sync::{
        atomic::{AtomicU64, AtomicUsize, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

/// Pause before trying again when no replica could take a request (an
/// election under way, every connection down).
const RETRY_PAUSE_MS: u64 = 50;

/// How long a replica that let a read time out is avoided.
pub const STUCK_MS: u64 = 5_000;

/// A read or a [`resendable`] write unanswered for `replica_attempt_ms`
/// divided by this is also sent to the next replica.
pub const HEDGE_DIVISOR: u32 = 4;

/// What [`Replicas::hedged`] asks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// Any replica answers it.
    Read,
    /// Only the leader does; doing it twice is doing it once.
    ResendableWrite,
}

pub(super) struct Replicas {
    pub(super) all: Vec<Arc<Inner>>,
    /// The replica that led when last seen.
    leader: AtomicUsize,
    /// The replica the next read starts at.
    next_read: AtomicUsize,
    /// Per replica: avoided until this many ms after `epoch` (0: not).
    stuck_until_ms: Vec<AtomicU64>,
    epoch: Instant,
}

impl Replicas {
    pub(super) fn new(all: Vec<Arc<Inner>>) -> Replicas {
        let stuck_until_ms = all.iter().map(|_| AtomicU64::new(0)).collect();
        Replicas {
            all,
            leader: AtomicUsize::new(0),
            next_read: AtomicUsize::new(0),
            stuck_until_ms,
            epoch: Instant::now(),
        }
    }

    pub(super) fn is_connected(&self) -> bool {
        self.all.iter().any(|r| r.current().is_some())
    }

    /// Send `body` to the right replica and wait for its answer.
    pub(super) async fn call(&self, body: RequestBody) -> Answer {
        if let [only] = &self.all[..] {
            return only.call(body).await;
        }
        let anywhere = matches!(body, RequestBody::CheckPassword { .. } | RequestBody::Stats);
        if Service::is_read(&body) || anywhere {
            self.read(body).await
        } else {
            self.write(body).await
        }
    }

    fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    /// Whether replica `at` may be sent a request now: connected, and not
    /// stuck unless every connected replica is.
    fn usable(&self, at: usize) -> bool {
        let up = |i: usize| self.all[i].current().is_some();
        let fresh = |i: usize| self.stuck_until_ms[i].load(Ordering::Relaxed) <= self.now_ms();
        up(at) && (fresh(at) || !(0..self.all.len()).any(|i| up(i) && fresh(i)))
    }

    fn mark_stuck(&self, at: usize) {
        let until = self.now_ms() + STUCK_MS;
        self.stuck_until_ms[at].store(until, Ordering::Relaxed);
    }

    fn mark_answering(&self, at: usize) {
        self.stuck_until_ms[at].store(0, Ordering::Relaxed);
    }

    /// Whether a request that began at `started` may try another replica
    /// (within the client's `request_timeout_ms`).
    fn in_time(&self, started: Instant) -> bool {
        let timeout_ms = self.all[0].config.request_timeout_ms;
        started.elapsed() < Duration::from_millis(timeout_ms)
    }

    async fn read(&self, body: RequestBody) -> Answer {
        let at = self.next_read.fetch_add(1, Ordering::Relaxed) % self.all.len();
        self.hedged(body, at, Kind::Read).await
    }

    async fn write(&self, body: RequestBody) -> Answer {
        if resendable(&body) {
            let at = self.leader.load(Ordering::Relaxed) % self.all.len();
            return self.hedged(body, at, Kind::ResendableWrite).await;
        }
        let n = self.all.len();
        let mut at = self.leader.load(Ordering::Relaxed) % n;
        let started = Instant::now();
        for attempt in 0.. {
            if !self.in_time(started) {
                break;
            }
            if !self.usable(at) {
                at = (at + 1) % n;
                self.pause_after_round(attempt).await;
                continue;
            }
            match self.await_write(at, body.clone()).await? {
                ResponseBody::NotLeader { leader } => {
                    let named = self.named(leader);
                    at = named.unwrap_or((at + 1) % n);
                    if named.is_none() {
                        self.pause_after_round(attempt).await;
                    }
                }
                // A leader that could not commit in time (cut off from
                // the others, say): the write may still be done, so it is
                // answered as it is, but the writes after it look for
                // another leader first.
                ResponseBody::Error(e) if e.code == ErrorCode::Unavailable => {
                    self.mark_stuck(at);
                    return Ok(ResponseBody::Error(e));
                }
                answer => return Ok(self.led(at, answer)),
            }
        }
        Ok(no_leader_in_time(n))
    }

    /// The index of the replica `leader` names, if it is one of ours.
    fn named(&self, leader: Option<String>) -> Option<usize> {
        leader.and_then(|l| self.all.iter().position(|r| r.addr == l))
    }

    /// Replica `at` took a write as leader: remember it.
    fn led(&self, at: usize, answer: ResponseBody) -> ResponseBody {
        self.mark_answering(at);
        self.leader.store(at, Ordering::Relaxed);
        answer
    }

    /// A read or a [`resendable`] write, hedged (see the module's doc),
    /// starting at replica `at`: at most one attempt in flight per
    /// replica, the first answer wins. A write follows `NotLeader` and
    /// remembers who answered as the leader; out of time, it is answered
    /// `Unavailable`, a read with what its last attempt got.
    async fn hedged(&self, body: RequestBody, mut at: usize, kind: Kind) -> Answer {
        let n = self.all.len();
        let attempt_timeout = Duration::from_millis(self.all[0].config.replica_attempt_ms.max(1));
        let hedge = attempt_timeout / HEDGE_DIVISOR;
        let write = kind == Kind::ResendableWrite;
        let mut in_flight = vec![false; n];
        let mut attempts = FuturesUnordered::new();
        let mut last: Answer = Err(ClientError::Disconnected);
        let started = Instant::now();
        for round in 0.. {
            if !self.in_time(started) {
                break;
            }
            if !in_flight[at] && self.usable(at) {
                in_flight[at] = true;
                let call = self.all[at].call(body.clone());
                attempts
                    .push(async move { (at, tokio::time::timeout(attempt_timeout, call).await) });
            } else if attempts.is_empty() {
                at = (at + 1) % n;
                self.pause_after_round(round).await;
                continue;
            }
            let (i, outcome) = tokio::select! {
                Some(done) = attempts.next() => done,
                () = tokio::time::sleep(hedge) => {
                    at = (at + 1) % n; // also ask the next one
                    continue;
                }
            };
            in_flight[i] = false;
            at = (i + 1) % n;
            last = match outcome {
                Err(_elapsed) => {
                    self.mark_stuck(i);
                    Err(ClientError::Timeout)
                }
                Ok(Err(e @ (ClientError::Disconnected | ClientError::Timeout))) => Err(e),
                Ok(Err(e)) => return Err(e),
                Ok(Ok(ResponseBody::NotLeader { leader })) if write => {
                    let named = self.named(leader);
                    if named.is_none() {
                        self.pause_after_round(round).await;
                    }
                    at = named.unwrap_or(at);
                    continue;
                }
                Ok(Ok(ResponseBody::Error(e))) if e.code == ErrorCode::Unavailable => {
                    if write {
                        self.mark_stuck(i); // a leader that could not commit
                    }
                    self.pause_after_round(round).await;
                    Ok(ResponseBody::Error(e))
                }
                Ok(Ok(answer)) if write => return Ok(self.led(i, answer)),
                Ok(Ok(answer)) => {
                    self.mark_answering(i);
                    return Ok(answer);
                }
            };
        }
        if write {
            return Ok(no_leader_in_time(n));
        }
        last
    }

    /// Replica `at`'s answer to a write. One not answered within
    /// `replica_attempt_ms` marks the replica stuck, so the writes after it
    /// look for another leader, but is still awaited: it may have been
    /// done, so it is never sent twice.
    async fn await_write(&self, at: usize, body: RequestBody) -> Answer {
        let attempt_timeout = Duration::from_millis(self.all[0].config.replica_attempt_ms.max(1));
        let call = self.all[at].call(body);
        tokio::pin!(call);
        match tokio::time::timeout(attempt_timeout, &mut call).await {
            Ok(answer) => answer,
            Err(_) => {
                self.mark_stuck(at);
                call.await
            }
        }
    }

    /// After every replica was tried once, wait a little (an election).
    async fn pause_after_round(&self, attempt: usize) {
        if (attempt + 1).is_multiple_of(self.all.len()) {
            tokio::time::sleep(Duration::from_millis(RETRY_PAUSE_MS)).await;
        }
    }
}

/// Whether a write may be sent again after no answer: doing it twice is
/// doing it once ([`RequestBody::ClaimLoginOnce`]).
fn resendable(body: &RequestBody) -> bool {
    matches!(body, RequestBody::ClaimLoginOnce { .. })
}

fn no_leader_in_time(replicas: usize) -> ResponseBody {
    ResponseBody::Error(ProfileError {
        code: ErrorCode::Unavailable,
        message: format!("no replica of {replicas} took the write as leader in time"),
    })
}
