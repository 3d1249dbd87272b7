//! Which replica of a profile group a request goes to.
//!
//! A client made for several addresses (`"a,b,c"`, the replicas of a
//! profile group) keeps a connection to each. Reads and password checks
//! go round-robin to the connected replicas (each serves a read only once
//! it has applied what its leader had committed, so none is older than a
//! read answered before it; argon2 spreads over the group). A read that
//! finds its replica disconnected or unavailable, or gets no answer within
//! [`ClientConfig::replica_attempt_ms`](super::ClientConfig) (a paused
//! process keeps its connections open), is tried at the next: reads change
//! nothing. A replica that let a read time out is *stuck* for
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
//! claim with its own number) is not awaited that way: unanswered within
//! `replica_attempt_ms`, cut off in flight or answered `Unavailable`, it
//! marks the replica stuck and goes to the next one, so a login in flight
//! when its leader stops is claimed at the new leader.

use super::{Answer, ClientError, Inner};
use crate::service::Service;
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

    /// How long one replica has to answer one attempt
    /// (`replica_attempt_ms`).
    fn attempt_timeout(&self) -> Duration {
        Duration::from_millis(self.all[0].config.replica_attempt_ms.max(1))
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
        let n = self.all.len();
        let attempt_timeout = self.attempt_timeout();
        let mut last = Err(ClientError::Disconnected);
        let started = Instant::now();
        for attempt in 0.. {
            if !self.in_time(started) {
                break;
            }
            let at = self.next_read.fetch_add(1, Ordering::Relaxed) % n;
            if !self.usable(at) {
                self.pause_after_round(attempt).await;
                continue;
            }
            let replica = &self.all[at];
            last = match tokio::time::timeout(attempt_timeout, replica.call(body.clone())).await {
                Ok(answer) => answer,
                Err(_) => {
                    self.mark_stuck(at);
                    Err(ClientError::Timeout)
                }
            };
            match &last {
                Err(ClientError::Disconnected | ClientError::Timeout) => {}
                Ok(ResponseBody::Error(e)) if e.code == ErrorCode::Unavailable => {}
                _ => {
                    self.mark_answering(at);
                    return last;
                }
            }
            self.pause_after_round(attempt).await;
        }
        last
    }

    async fn write(&self, body: RequestBody) -> Answer {
        let n = self.all.len();
        let resend = resendable(&body);
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
            let answer = if resend {
                self.try_write(at, body.clone()).await?
            } else {
                Some(self.await_write(at, body.clone()).await?)
            };
            match answer {
                Some(ResponseBody::NotLeader { leader }) => {
                    let named = leader.and_then(|l| self.all.iter().position(|r| r.addr == l));
                    at = named.unwrap_or((at + 1) % n);
                    if named.is_none() {
                        self.pause_after_round(attempt).await;
                    }
                }
                // A leader that could not commit in time (cut off from
                // the others, say): the write may still be done, so it is
                // answered as it is (unless it may be sent again), but
                // the writes after it look for another leader first.
                Some(ResponseBody::Error(e)) if e.code == ErrorCode::Unavailable => {
                    self.mark_stuck(at);
                    if !resend {
                        return Ok(ResponseBody::Error(e));
                    }
                    at = (at + 1) % n;
                    self.pause_after_round(attempt).await;
                }
                Some(answer) => {
                    self.mark_answering(at);
                    self.leader.store(at, Ordering::Relaxed);
                    return Ok(answer);
                }
                None => {
                    at = (at + 1) % n;
                    self.pause_after_round(attempt).await;
                }
            }
        }
        Ok(ResponseBody::Error(ProfileError {
            code: ErrorCode::Unavailable,
            message: format!("no replica of {n} took the write as leader in time"),
        }))
    }

    /// Replica `at`'s answer to a [`resendable`] write; `None` if it gave
    /// none within `replica_attempt_ms` (the replica is then stuck) or the
    /// connection was down or broke: the write may go to the next one.
    async fn try_write(
        &self,
        at: usize,
        body: RequestBody,
    ) -> Result<Option<ResponseBody>, ClientError> {
        let attempt_timeout = self.attempt_timeout();
        match tokio::time::timeout(attempt_timeout, self.all[at].call(body)).await {
            Ok(Ok(answer)) => Ok(Some(answer)),
            Ok(Err(ClientError::Disconnected | ClientError::Timeout)) => Ok(None),
            Ok(Err(e)) => Err(e),
            Err(_) => {
                self.mark_stuck(at);
                Ok(None)
            }
        }
    }

    /// Replica `at`'s answer to a write. One not answered within
    /// `replica_attempt_ms` marks the replica stuck, so the writes after it
    /// look for another leader, but is still awaited: it may have been
    /// done, so it is never sent twice.
    async fn await_write(&self, at: usize, body: RequestBody) -> Answer {
        let attempt_timeout = self.attempt_timeout();
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
