//! argon2id hashing and checking on a bounded pool of threads, so a
//! password never stalls the event loop.
//!
//! The pool has a fixed number of threads and a bounded queue: a job
//! submitted while the queue is full is refused at once with
//! [`Error::Busy`] (counted in `profile_password_queue_full_total`), never
//! queued without bound. Passwords are never logged; comparison is the
//! argon2 crate's constant-time verify.

use crate::{config::PasswordConfig, error::Error, Result};
use argon2::{
    password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString},
    Algorithm, Argon2, Params, Version,
};
use tokio::sync::oneshot;

type Job = Box<dyn FnOnce() + Send>;

/// argon2id with the configured parameters.
#[derive(Clone)]
pub struct Hasher {
    argon2: Argon2<'static>,
    config: PasswordConfig,
}

impl Hasher {
    pub fn new(config: &PasswordConfig) -> Result<Self> {
        let params = Params::new(config.argon2_m_kib, config.argon2_t, config.argon2_p, None)
            .map_err(|e| Error::Config(format!("argon2 parameters: {e}")))?;
        Ok(Self {
            argon2: Argon2::new(Algorithm::Argon2id, Version::V0x13, params),
            config: config.clone(),
        })
    }

    /// A hasher with the parameters a service reported (`Info`), for
    /// hashing passwords outside it (bulk imports).
    pub fn for_service(info: &proto::profile::ServiceInfo) -> Result<Self> {
        Self::new(&PasswordConfig {
            argon2_m_kib: info.argon2_m_kib,
            argon2_t: info.argon2_t,
            argon2_p: info.argon2_p,
            ..PasswordConfig::default()
        })
    }

    /// A PHC string (`$argon2id$v=19$m=..,t=..,p=..$salt$hash`) of
    /// `password` with a fresh random salt.
    pub fn hash(&self, password: &[u8]) -> Result<String> {
        let salt = SaltString::encode_b64(&rand::random::<[u8; 16]>())
            .map_err(|e| Error::Config(format!("salt: {e}")))?;
        let hash = self
            .argon2
            .hash_password(password, &salt)
            .map_err(|e| Error::Config(format!("argon2: {e}")))?;
        Ok(hash.to_string())
    }

    /// Whether `password` matches `phc` (with the parameters `phc` names).
    pub fn verify(&self, phc: &str, password: &[u8]) -> bool {
        PasswordHash::new(phc)
            .is_ok_and(|parsed| self.argon2.verify_password(password, &parsed).is_ok())
    }

    /// Accept an imported PHC string only if it is argon2id, version 19,
    /// and at least as strong as the configured parameters.
    pub fn check_imported(&self, phc: &str) -> Result<()> {
        let bad = |reason: String| Error::InvalidField {
            field: "password hash",
            reason,
        };
        let parsed = PasswordHash::new(phc).map_err(|e| bad(format!("not a PHC string: {e}")))?;
        if parsed.algorithm.as_str() != "argon2id" || parsed.version != Some(0x13) {
            return Err(bad("must be argon2id version 19".into()));
        }
        if parsed.hash.is_none() || parsed.salt.is_none() {
            return Err(bad("salt or hash missing".into()));
        }
        let p = Params::try_from(&parsed).map_err(|e| bad(format!("parameters: {e}")))?;
        let c = &self.config;
        if p.m_cost() < c.argon2_m_kib || p.t_cost() < c.argon2_t || p.p_cost() < c.argon2_p {
            return Err(bad(format!(
                "m={},t={},p={} is weaker than the configured m={},t={},p={}",
                p.m_cost(),
                p.t_cost(),
                p.p_cost(),
                c.argon2_m_kib,
                c.argon2_t,
                c.argon2_p
            )));
        }
        Ok(())
    }
}

/// Put `job` on a bounded queue, or refuse it at once: [`Error::Busy`]
/// (counted in `counter`) if the queue is full, [`Error::Closed`] if its
/// consumers are gone.
pub(crate) fn try_submit<T>(
    queue: &flume::Sender<T>,
    job: T,
    full: &'static str,
    counter: &'static str,
) -> Result<()> {
    match queue.try_send(job) {
        Ok(()) => Ok(()),
        Err(flume::TrySendError::Full(_)) => {
            metrics::counter!(counter).increment(1);
            Err(Error::Busy(full))
        }
        Err(flume::TrySendError::Disconnected(_)) => Err(Error::Closed),
    }
}

/// A fixed set of threads running password jobs from a bounded queue.
pub struct PasswordPool {
    jobs: flume::Sender<Job>,
    hasher: Hasher,
    /// Checked for unknown usernames, so they take as long as known ones.
    dummy_phc: String,
}

impl PasswordPool {
    pub fn start(config: &PasswordConfig, threads: usize) -> Result<Self> {
        let hasher = Hasher::new(config)?;
        let (jobs, rx) = flume::bounded::<Job>(config.queue_max);
        for i in 0..threads.max(1) {
            let rx = rx.clone();
            std::thread::Builder::new()
                .name(format!("profile-pw-{i}"))
                .spawn(move || {
                    while let Ok(job) = rx.recv() {
                        job();
                    }
                })?;
        }
        let dummy_phc = hasher.hash(&rand::random::<[u8; 16]>())?;
        Ok(Self {
            jobs,
            hasher,
            dummy_phc,
        })
    }

    pub fn hasher(&self) -> &Hasher {
        &self.hasher
    }

    /// Run `f` on a pool thread; [`Error::Busy`] at once if the queue is full.
    async fn run<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Hasher) -> T + Send + 'static,
    ) -> Result<T> {
        let (tx, rx) = oneshot::channel();
        let hasher = self.hasher.clone();
        let job: Job = Box::new(move || {
            let _ = tx.send(f(&hasher));
        });
        try_submit(
            &self.jobs,
            job,
            "password queue full",
            "profile_password_queue_full_total",
        )?;
        rx.await.map_err(|_| Error::Closed)
    }

    /// Hash a new password on the pool.
    pub async fn hash(&self, password: Vec<u8>) -> Result<String> {
        self.run(move |h| h.hash(&password)).await?
    }

    /// Check `password` against `phc` on the pool; `None` checks against a
    /// dummy hash (an unknown user) and is always false.
    pub async fn verify(&self, phc: Option<String>, password: Vec<u8>) -> Result<bool> {
        let known = phc.is_some();
        let phc = phc.unwrap_or_else(|| self.dummy_phc.clone());
        let ok = self.run(move |h| h.verify(&phc, &password)).await?;
        let result = if ok && known { "ok" } else { "wrong" };
        metrics::counter!("profile_password_checks_total", "result" => result).increment(1);
        Ok(ok && known)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proto::profile::ErrorCode;

    #[test]
    fn hash_verify_and_import_checks() {
        let h = Hasher::new(&PasswordConfig::default()).unwrap();
        let phc = h.hash(b"secret").unwrap();
        assert!(phc.starts_with("$argon2id$v=19$m=19456,t=2,p=1$"), "{phc}");
        assert!(h.verify(&phc, b"secret"));
        assert!(!h.verify(&phc, b"Secret"));
        assert!(!h.verify("garbage", b"secret"));
        h.check_imported(&phc).unwrap();
        let weak_phc = "$argon2id$v=19$m=1024,t=1,p=1$c29tZXNhbHRzb21lc2FsdA$\
                        AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA";
        let err = h.check_imported(weak_phc).unwrap_err();
        assert_eq!(err.code(), ErrorCode::InvalidField, "{err}");
        assert!(h
            .check_imported("$argon2i$v=19$m=19456,t=2,p=1$x$y")
            .is_err());
        assert!(h.check_imported("not a hash").is_err());
    }

    #[tokio::test]
    async fn a_full_queue_is_busy_not_queued() {
        let config = PasswordConfig {
            queue_max: 1,
            ..PasswordConfig::default()
        };
        let pool = std::sync::Arc::new(PasswordPool::start(&config, 1).unwrap());
        // Block the only thread, fill the one queue slot, then one more.
        let (release_tx, release_rx) = std::sync::mpsc::channel::<()>();
        let (started_tx, started_rx) = oneshot::channel();
        let blocker = {
            let pool = pool.clone();
            tokio::spawn(async move {
                pool.run(move |_| {
                    let _ = started_tx.send(());
                    let _ = release_rx.recv();
                })
                .await
            })
        };
        started_rx.await.unwrap();
        let queued = {
            let pool = pool.clone();
            tokio::spawn(async move { pool.hash(b"x".to_vec()).await })
        };
        // Wait until the queued job sits in the queue.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        while pool.jobs.is_empty() {
            assert!(std::time::Instant::now() < deadline, "job never queued");
            tokio::task::yield_now().await;
        }
        let err = pool.verify(None, b"y".to_vec()).await.unwrap_err();
        assert!(matches!(err, Error::Busy(_)), "{err}");
        assert_eq!(err.code(), ErrorCode::Busy);
        release_tx.send(()).unwrap();
        blocker.await.unwrap().unwrap();
        assert!(queued.await.unwrap().unwrap().starts_with("$argon2id$"));
    }
}
