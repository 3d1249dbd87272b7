//! [`PresenceReplicas`]: a gateway's link to every presence replica.
//!
//! Presence needs no consensus: what it holds (who is online, on which
//! gateway, who watches whom) belongs to the gateways, and each gateway
//! knows its own part. So a gateway reports to **every** replica, each
//! through its own [`PresenceClient`] (which tracks the gateway's sessions
//! and watches and re-sends all of them whenever its link comes back: a
//! restarted replica is rebuilt by the gateways' syncs within a reconnect
//! backoff), and reads from any healthy one:
//!
//! * **Writes** (`online`, `offline`, `watch`, `unwatch`, `resync`) go to
//!   all replicas at once and return with the first success (a stalled
//!   replica does not hold a login); a replica that is down gets the change
//!   with its next sync.
//! * **Reads** (`lookup`, `gateways`, `stats`) ask the primary replica
//!   (the first connected one, in the configured order), then the others.
//! * **Events**: status changes come from the primary only (every replica
//!   sees the same changes; forwarding them all would repeat each one);
//!   kicks come from any replica (closing a session twice is harmless).
//!   A change from another replica while the primary's link is down makes
//!   that replica the primary at once. When the primary changes, every
//!   watched user is looked up on the new one and each whose status differs
//!   from the last one passed on is passed on as a change (so a change the
//!   old primary never sent is not lost, and none is repeated); then the
//!   receiver gets [`PresenceEvent::Reconnected`].
//!
//! A gateway that dies goes offline on each replica on its own, after that
//! replica's lease and `grace_ms`, and each tells its watchers.

use crate::client::{ClientConfig, ClientError, PresenceClient, PresenceEvent};
use proto::presence::{Entry, GatewayInfo, PresenceStats, SessionInfo, Status};
use std::{
    collections::HashMap,
    future::Future,
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc, Mutex,
    },
    time::Duration,
};
use tokio::{sync::mpsc, task::AbortHandle};

/// How often the primary is chosen again.
pub const PRIMARY_CHECK_MS: u64 = 250;
/// Most replicas of one presence service.
pub const REPLICAS_MAX: usize = 8;

/// Links to every replica. Clones share them.
#[derive(Clone)]
pub struct PresenceReplicas {
    inner: Arc<Inner>,
}

struct Inner {
    replicas: Vec<PresenceClient>,
    routing: Arc<Routing>,
    tasks: Vec<AbortHandle>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

struct Routing {
    replicas: Vec<PresenceClient>,
    primary: AtomicUsize,
    events: mpsc::Sender<PresenceEvent>,
    /// The last status passed on per watched user (what a gateway shows:
    /// a replica rebuilt by a sync may differ in `since_s`).
    last: Mutex<HashMap<u64, Option<Status>>>,
    /// Serialises primary changes (and their refresh).
    switching: tokio::sync::Mutex<()>,
}

impl Routing {
    fn lock_last(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Option<Status>>> {
        self.last.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Pass a status change on unless it repeats the last one passed on
    /// for `user` (a replica rebuilt by a sync announces everyone again);
    /// `false` if the receiver is gone.
    async fn pass(&self, user: u64, entry: Option<Entry>, sessions: Vec<u64>) -> bool {
        {
            let mut last = self.lock_last();
            let status = entry.map(|e| e.status);
            if last.get(&user) == Some(&status) {
                return true;
            }
            if last.len() >= LAST_ENTRIES_MAX {
                last.clear(); // then a change may be repeated, never lost
            }
            last.insert(user, status);
        }
        let event = PresenceEvent::StatusChanged {
            user,
            entry,
            sessions,
        };
        self.events.send(event).await.is_ok()
    }

    /// The statuses a watch answered (what the gateway showed first) are
    /// the last passed on for users with none yet: a refresh after a
    /// primary change then repeats none of them (an "offline" for a user
    /// never shown online, say).
    fn note_known(&self, users: &[u64], entries: &[Option<Entry>]) {
        let mut last = self.lock_last();
        for (user, entry) in users.iter().zip(entries) {
            if last.len() >= LAST_ENTRIES_MAX {
                break;
            }
            last.entry(*user).or_insert(entry.map(|e| e.status));
        }
    }

    /// Make the first connected replica the primary; on a change, pass on
    /// what the new one knows differently, then `Reconnected`.
    async fn choose_primary(&self) {
        let _one_at_a_time = self.switching.lock().await;
        let Some(first_up) = self.replicas.iter().position(PresenceClient::is_connected) else {
            return; // none is up: keep the current one
        };
        let before = self.primary.swap(first_up, Ordering::Relaxed);
        if before == first_up {
            return;
        }
        metrics::counter!("presence_client_primary_switches_total").increment(1);
        tracing::info!(
            from = self.replicas[before].addr(),
            to = self.replicas[first_up].addr(),
            "presence reads and events now come from another replica"
        );
        self.refresh(first_up).await;
        let _ = self.events.send(PresenceEvent::Reconnected).await;
    }

    /// Look every watched user up on replica `index`; pass on each entry
    /// that differs from the last one passed on.
    async fn refresh(&self, index: usize) {
        let replica = &self.replicas[index];
        let watchers = replica.watchers();
        let users: Vec<u64> = watchers.keys().copied().collect();
        let Ok(entries) = replica.lookup(&users).await else {
            return; // it went away too: the next primary refreshes
        };
        self.lock_last()
            .retain(|user, _| watchers.contains_key(user));
        for (user, entry) in users.into_iter().zip(entries) {
            let sessions = watchers.get(&user).cloned().unwrap_or_default();
            if !self.pass(user, entry, sessions).await {
                return;
            }
        }
    }
}

/// Most watched users whose last entry is remembered.
pub const LAST_ENTRIES_MAX: usize = 1 << 20;

impl PresenceReplicas {
    /// Connect to every replica in `addrs` as gateway `gateway`. One
    /// address: it must answer now, as with [`PresenceClient::connect`].
    /// Several: those down now are retried in the background, but at least
    /// one must be up.
    pub async fn connect(
        addrs: &[String],
        gateway: u32,
        config: ClientConfig,
    ) -> Result<(PresenceReplicas, mpsc::Receiver<PresenceEvent>), ClientError> {
        if addrs.is_empty() || addrs.len() > REPLICAS_MAX {
            return Err(ClientError::Protocol(format!(
                "a presence service has 1 to {REPLICAS_MAX} replicas, not {}",
                addrs.len()
            )));
        }
        let (events, events_rx) = mpsc::channel(config.events_queue_max.max(1));
        let mut replicas = Vec::with_capacity(addrs.len());
        let mut receivers = Vec::with_capacity(addrs.len());
        for addr in addrs {
            let (client, rx) = if addrs.len() == 1 {
                PresenceClient::connect(addr.clone(), gateway, config.clone()).await?
            } else {
                PresenceClient::start(addr.clone(), gateway, config.clone()).await?
            };
            replicas.push(client);
            receivers.push(rx);
        }
        if !replicas.iter().any(PresenceClient::is_connected) {
            return Err(ClientError::Disconnected);
        }
        let routing = Arc::new(Routing {
            replicas: replicas.clone(),
            primary: AtomicUsize::new(0),
            events,
            last: Mutex::default(),
            switching: tokio::sync::Mutex::new(()),
        });
        routing.choose_primary().await;
        let mut tasks: Vec<AbortHandle> = receivers
            .into_iter()
            .enumerate()
            .map(|(index, rx)| tokio::spawn(forward(index, rx, routing.clone())).abort_handle())
            .collect();
        tasks.push(tokio::spawn(watch_primary(routing.clone())).abort_handle());
        let inner = Arc::new(Inner {
            replicas,
            routing,
            tasks,
        });
        Ok((PresenceReplicas { inner }, events_rx))
    }

    /// The replicas, in the configured order.
    pub fn replicas(&self) -> &[PresenceClient] {
        &self.inner.replicas
    }

    /// The index of the replica reads go to first.
    pub fn primary(&self) -> usize {
        self.inner.routing.primary.load(Ordering::Relaxed)
    }

    /// Send a write to every replica at once; the first success, else the
    /// primary's error. The others finish in the background: a replica that
    /// is alive but stalled (paused, partitioned) must not hold the caller
    /// for its request timeout, and one that fails gets the change with its
    /// next sync (its client tracked it before sending).
    async fn ask_all<T, F, Fut>(&self, call: F) -> Result<T, ClientError>
    where
        T: Send + 'static,
        F: Fn(PresenceClient) -> Fut,
        Fut: Future<Output = Result<T, ClientError>> + Send + 'static,
    {
        let primary = self.primary();
        let mut calls = tokio::task::JoinSet::new();
        for (i, replica) in self.inner.replicas.iter().enumerate() {
            let answer = call(replica.clone());
            calls.spawn(async move { (i, answer.await) });
        }
        let mut primary_error = None;
        let mut other_error = None;
        while let Some(joined) = calls.join_next().await {
            match joined {
                Ok((_, Ok(answer))) => {
                    calls.detach_all();
                    return Ok(answer);
                }
                Ok((i, Err(e))) if i == primary => primary_error = Some(e),
                Ok((_, Err(e))) => other_error = Some(e),
                Err(_) => {}
            }
        }
        Err(primary_error
            .or(other_error)
            .unwrap_or(ClientError::Disconnected))
    }

    /// The primary's answer, or the next replica's if it could not answer
    /// (an answer that is an error from the server is final).
    async fn ask_one<'a, T, F, Fut>(&'a self, call: F) -> Result<T, ClientError>
    where
        F: Fn(&'a PresenceClient) -> Fut,
        Fut: Future<Output = Result<T, ClientError>>,
    {
        let replicas = &self.inner.replicas;
        let primary = self.primary();
        let mut last = Err(ClientError::Disconnected);
        for i in (0..replicas.len()).map(|k| (primary + k) % replicas.len()) {
            last = call(&replicas[i]).await;
            if matches!(last, Ok(_) | Err(ClientError::Presence(_))) {
                return last;
            }
        }
        last
    }

    /// See [`PresenceClient::online`].
    pub async fn online(
        &self,
        user: u64,
        session: u64,
        status: Status,
    ) -> Result<Option<Entry>, ClientError> {
        self.ask_all(move |r| async move { r.online(user, session, status).await })
            .await
    }

    /// See [`PresenceClient::offline`].
    pub async fn offline(&self, user: u64, session: u64) -> Result<bool, ClientError> {
        self.ask_all(move |r| async move { r.offline(user, session).await })
            .await
    }

    /// See [`PresenceClient::watch`].
    pub async fn watch(
        &self,
        session: u64,
        users: &[u64],
    ) -> Result<Vec<Option<Entry>>, ClientError> {
        let watched = Arc::new(users.to_vec());
        let entries = self
            .ask_all(move |r| {
                let users = watched.clone();
                async move { r.watch(session, &users).await }
            })
            .await?;
        self.inner.routing.note_known(users, &entries);
        Ok(entries)
    }

    /// See [`PresenceClient::unwatch`].
    pub async fn unwatch(&self, session: u64, users: &[u64]) -> Result<u32, ClientError> {
        let users = Arc::new(users.to_vec());
        self.ask_all(move |r| {
            let users = users.clone();
            async move { r.unwatch(session, &users).await }
        })
        .await
    }

    /// See [`PresenceClient::resync`].
    pub async fn resync(&self, sessions: Vec<SessionInfo>) -> Result<u32, ClientError> {
        self.ask_all(move |r| {
            let sessions = sessions.clone();
            async move { r.resync(sessions).await }
        })
        .await
    }

    /// See [`PresenceClient::lookup`].
    pub async fn lookup(&self, users: &[u64]) -> Result<Vec<Option<Entry>>, ClientError> {
        self.ask_one(|r| r.lookup(users)).await
    }

    /// See [`PresenceClient::gateways`].
    pub async fn gateways(&self) -> Result<Vec<GatewayInfo>, ClientError> {
        self.ask_one(PresenceClient::gateways).await
    }

    /// See [`PresenceClient::stats`] (the primary's).
    pub async fn stats(&self) -> Result<PresenceStats, ClientError> {
        self.ask_one(PresenceClient::stats).await
    }

    /// The sessions the gateway reported (every replica tracks the same).
    pub fn tracked_sessions(&self) -> Vec<SessionInfo> {
        self.inner.replicas[0].tracked_sessions()
    }
}

/// Pass one replica's events on: kicks always, the rest from the primary.
async fn forward(index: usize, mut rx: mpsc::Receiver<PresenceEvent>, routing: Arc<Routing>) {
    while let Some(event) = rx.recv().await {
        let primary = routing.primary.load(Ordering::Relaxed);
        if primary != index && !routing.replicas[primary].is_connected() {
            routing.choose_primary().await;
        }
        let from_primary = routing.primary.load(Ordering::Relaxed) == index;
        let open = match event {
            PresenceEvent::Kicked { .. } => routing.events.send(event).await.is_ok(),
            PresenceEvent::StatusChanged {
                user,
                entry,
                sessions,
            } if from_primary => routing.pass(user, entry, sessions).await,
            PresenceEvent::Reconnected if from_primary => routing.events.send(event).await.is_ok(),
            _ => true,
        };
        if !open {
            return;
        }
    }
}

/// Keep the primary the first connected replica.
async fn watch_primary(routing: Arc<Routing>) {
    loop {
        tokio::time::sleep(Duration::from_millis(PRIMARY_CHECK_MS)).await;
        routing.choose_primary().await;
    }
}
