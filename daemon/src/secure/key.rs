//! The cluster key of this process, and key files.
//!
//! A process belongs to one cluster, so its key is process-wide: a daemon
//! installs it from its key file at start ([`install_key`]) before it
//! listens or dials. A process that installed none (a test, a benchmark
//! that runs everything in one process) gets a random key of its own on
//! first use: it can talk to itself and to nothing else, so forgetting the
//! key fails closed.
//!
//! A key file holds the key as 64 hex digits and must not be readable by
//! group or others (as ssh refuses such private keys).

use proto::link::{ClusterKey, LinkError, CLUSTER_KEY_BYTES};
use std::{
    io::Write,
    os::unix::fs::{OpenOptionsExt, PermissionsExt},
    path::{Path, PathBuf},
    sync::OnceLock,
};

static KEY: OnceLock<ClusterKey> = OnceLock::new();

/// A key that cannot be loaded, written or installed.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("cannot read cluster key file {path}: {error}")]
    Read {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("cannot write cluster key file {path}: {error}")]
    Write {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("cluster key file {path}: {error}")]
    Format { path: PathBuf, error: LinkError },
    #[error("cluster key file {path} is readable by others (mode {mode:o}); run chmod 600 on it")]
    Exposed { path: PathBuf, mode: u32 },
    #[error("this process already uses another cluster key")]
    Conflict,
}

/// The command-line option every daemon and `imctl` take for the key.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct KeyArgs {
    /// The cluster key file: 64 hex digits, mode 0600 (`imctl keygen FILE`
    /// writes one). Every link between the cluster's processes proves it.
    #[arg(long, env = "IM_CLUSTER_KEY_FILE", value_name = "FILE")]
    pub cluster_key_file: Option<PathBuf>,
}

impl KeyArgs {
    /// Load the key file and make it this process's key; a daemon refuses
    /// to start without one.
    pub fn install(&self) -> anyhow::Result<()> {
        let Some(path) = &self.cluster_key_file else {
            anyhow::bail!(
                "no cluster key: pass --cluster-key-file FILE or set IM_CLUSTER_KEY_FILE \
                 (`imctl keygen FILE` writes a new key; every process of a cluster needs the same one)"
            );
        };
        install_key(load_key_file(path)?)?;
        Ok(())
    }
}

/// Make `key` this process's cluster key. Installing the same key again is
/// fine; another one is [`KeyError::Conflict`].
pub fn install_key(key: ClusterKey) -> Result<(), KeyError> {
    let installed = KEY.get_or_init(|| key.clone());
    if *installed == key {
        Ok(())
    } else {
        Err(KeyError::Conflict)
    }
}

/// This process's cluster key (a random one if none was installed).
pub fn key() -> &'static ClusterKey {
    KEY.get_or_init(|| {
        tracing::debug!("no cluster key installed; this process uses a random one");
        generate()
    })
}

/// A new random key.
pub fn generate() -> ClusterKey {
    ClusterKey::from_bytes(random_seed())
}

/// 32 bytes from the operating system's generator.
pub(crate) fn random_seed() -> [u8; CLUSTER_KEY_BYTES] {
    use ring::rand::SecureRandom;
    let mut seed = [0u8; CLUSTER_KEY_BYTES];
    ring::rand::SystemRandom::new()
        .fill(&mut seed)
        .expect("the OS random generator works");
    seed
}

/// Read the key file at `path`.
pub fn load_key_file(path: &Path) -> Result<ClusterKey, KeyError> {
    let read = |error| KeyError::Read {
        path: path.to_owned(),
        error,
    };
    let mode = std::fs::metadata(path).map_err(read)?.permissions().mode();
    if mode & 0o077 != 0 {
        return Err(KeyError::Exposed {
            path: path.to_owned(),
            mode: mode & 0o777,
        });
    }
    let text = std::fs::read_to_string(path).map_err(read)?;
    ClusterKey::from_hex(&text).map_err(|error| KeyError::Format {
        path: path.to_owned(),
        error,
    })
}

/// Write `key` to a new file at `path` (mode 0600); an existing file is
/// never overwritten.
pub fn write_key_file(path: &Path, key: &ClusterKey) -> Result<(), KeyError> {
    let write = |error| KeyError::Write {
        path: path.to_owned(),
        error,
    };
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(write)?;
    writeln!(file, "{}", key.to_hex()).map_err(write)?;
    file.sync_all().map_err(write)
}

/// The key file at `path`, created with a new key if there is none.
pub fn load_or_create_key_file(path: &Path) -> Result<ClusterKey, KeyError> {
    match write_key_file(path, &generate()) {
        Ok(()) => {}
        Err(KeyError::Write { error, .. }) if error.kind() == std::io::ErrorKind::AlreadyExists => {
        }
        Err(e) => return Err(e),
    }
    load_key_file(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_files_round_trip_and_exposed_ones_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("cluster.key");
        let key = generate();
        write_key_file(&path, &key).unwrap();
        assert_eq!(load_key_file(&path).unwrap(), key);
        assert!(matches!(
            write_key_file(&path, &generate()),
            Err(KeyError::Write { .. })
        ));
        assert_eq!(load_or_create_key_file(&path).unwrap(), key);
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert!(matches!(
            load_key_file(&path),
            Err(KeyError::Exposed { mode: 0o644, .. })
        ));
        let garbage = dir.path().join("garbage.key");
        write_key_file(&garbage, &key).unwrap();
        std::fs::write(&garbage, "not a key").unwrap();
        assert!(matches!(
            load_key_file(&garbage),
            Err(KeyError::Format { .. })
        ));
    }
}
