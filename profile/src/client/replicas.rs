//! Which replica of a profile group a request goes to.
//!
//! A client made for several addresses (`"a,b,c"`, the replicas of a
//! profile group) keeps a connection to each. Reads and password checks
//! go round-robin to the connected replicas (each serves a read only once
//! it has applied what its leader had committed, so none is older than a
//! read answered before it; argon2 spreads over the group); a read that
//! finds its replica disconnected or unavailable is tried at the next.
//! Writes go to the replica that led last; `NotLeader` names the leader,
//! which the write is sent to instead. A write is sent again only when it
//! was surely not done (`NotLeader`, or no connection to send it on);
//! one cut off in flight fails as it would with one replica.

use super::{Answer, ClientError, Inner};
use crate::service::Service;
use proto::profile::{ErrorCode, ProfileError, RequestBody, ResponseBody};
use std::{
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

/// Pause before trying again when no replica could take a request (an
/// election under way, every connection down).
const RETRY_PAUSE_MS: u64 = 50;

pub(super) struct Replicas {
    pub(super) all: Vec<Arc<Inner>>,
    /// The replica that led when last seen.
    leader: AtomicUsize,
    /// The replica the next read starts at.
    next_read: AtomicUsize,
}

impl Replicas {
    pub(super) fn new(all: Vec<Arc<Inner>>) -> Replicas {
        Replicas {
            all,
            leader: AtomicUsize::new(0),
            next_read: AtomicUsize::new(0),
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

    /// Whether a request that began at `started` may try another replica
    /// (within the client's `request_timeout_ms`).
    fn in_time(&self, started: Instant) -> bool {
        let timeout_ms = self.all[0].config.request_timeout_ms;
        started.elapsed() < Duration::from_millis(timeout_ms)
    }

    async fn read(&self, body: RequestBody) -> Answer {
        let n = self.all.len();
        let mut last = Err(ClientError::Disconnected);
        let started = Instant::now();
        for attempt in 0.. {
            if !self.in_time(started) {
                break;
            }
            let at = self.next_read.fetch_add(1, Ordering::Relaxed) % n;
            let replica = &self.all[at];
            if replica.current().is_none() {
                self.pause_after_round(attempt).await;
                continue;
            }
            last = replica.call(body.clone()).await;
            match &last {
                Err(ClientError::Disconnected | ClientError::Timeout) => {}
                Ok(ResponseBody::Error(e)) if e.code == ErrorCode::Unavailable => {}
                _ => return last,
            }
            self.pause_after_round(attempt).await;
        }
        last
    }

    async fn write(&self, body: RequestBody) -> Answer {
        let n = self.all.len();
        let mut at = self.leader.load(Ordering::Relaxed) % n;
        let started = Instant::now();
        for attempt in 0.. {
            if !self.in_time(started) {
                break;
            }
            let replica = &self.all[at];
            if replica.current().is_none() {
                at = (at + 1) % n;
                self.pause_after_round(attempt).await;
                continue;
            }
            match replica.call(body.clone()).await? {
                ResponseBody::NotLeader { leader } => {
                    let named = leader.and_then(|l| self.all.iter().position(|r| r.addr == l));
                    at = named.unwrap_or((at + 1) % n);
                    if named.is_none() {
                        self.pause_after_round(attempt).await;
                    }
                }
                answer => {
                    self.leader.store(at, Ordering::Relaxed);
                    return Ok(answer);
                }
            }
        }
        Ok(ResponseBody::Error(ProfileError {
            code: ErrorCode::Unavailable,
            message: format!("no replica of {n} took the write as leader in time"),
        }))
    }

    /// After every replica was tried once, wait a little (an election).
    async fn pause_after_round(&self, attempt: usize) {
        if (attempt + 1).is_multiple_of(self.all.len()) {
            tokio::time::sleep(Duration::from_millis(RETRY_PAUSE_MS)).await;
        }
    }
}
