//! `imbench e2e`'s reconnect storm: many idle sessions on one gateway,
//! the gateway restarted, and the seconds until every session is logged in
//! again. Each user holds a resume token (minted with the gateway's token
//! key, as its earlier login would have been given one), logs in with it
//! and stays idle (`Role::Reconnecting`). The gateway then gets SIGTERM:
//! it closes every session (each client hears CLOSE) and exits; it starts
//! again on the same address with the same keys, and every client logs in
//! again with its newest token, retrying while the gateway is down, with
//! the client's own handshake back-off and the gateway's cookies under
//! load, as real clients would.

use crate::{
    e2e::{wait_for, Cluster, Plan, Running},
    e2e_fleet::{Counters, Log, Role},
};
use anyhow::Result;
use serde::Serialize;
use std::{
    sync::{atomic::Ordering, Arc},
    time::Instant,
};

#[derive(Debug, Clone, Serialize)]
pub struct StormResult {
    pub sessions: usize,
    /// The first logins of every session (resume tokens), seconds.
    pub login_secs: f64,
    /// From SIGTERM until the new gateway listened.
    pub restart_secs: f64,
    /// From SIGTERM until every session was logged in again.
    pub all_back_secs: f64,
    /// Logins per second from SIGTERM until all were back.
    pub relogins_per_sec: f64,
    /// Logins that did not get through and were tried again.
    pub retries: u64,
    /// Logins refused (none expected).
    pub failed: u64,
}

pub async fn run(cluster: &Cluster, plan: &Plan) -> Result<(StormResult, Vec<Log>)> {
    let n = plan.storm_sessions;
    let logins = cluster.resume_logins(n, Role::Reconnecting).await?;
    let counters = Arc::new(Counters::default());
    let t0 = Instant::now();
    let running = Running::storm(cluster, plan, logins, &counters)?;
    let logins = || counters.logins.load(Ordering::Relaxed);
    let failed = || counters.login_failures.load(Ordering::Relaxed);
    wait_for("the storm's first logins", || {
        logins() + failed() >= n as u64
    })
    .await?;
    let login_secs = t0.elapsed().as_secs_f64();
    let before = logins();
    let down = Instant::now();
    // It blocks until the new gateway listens; the clients' tasks go on
    // on the runtime's other threads meanwhile.
    let restart_secs = tokio::task::block_in_place(|| cluster.restart_gateway())?;
    wait_for("every session logged in again", || {
        logins() + failed() >= before + n as u64
    })
    .await?;
    let all_back_secs = down.elapsed().as_secs_f64();
    let result = StormResult {
        sessions: n,
        login_secs,
        restart_secs,
        all_back_secs,
        relogins_per_sec: n as f64 / all_back_secs,
        retries: counters.login_retries.load(Ordering::Relaxed),
        failed: failed(),
    };
    Ok((result, running.stop().await?))
}
