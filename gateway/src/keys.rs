//! The gateway's key files: the static X25519 key clients authenticate it
//! by, the resume-token key the cluster's gateways share, and the secret
//! its session RESET key is derived from (`reset.key`; the endpoint's key is
//! `proto::session::crypto::reset_key(secret, listen address)`, so it
//! survives restarts and differs between gateways sharing a directory).

use proto::session::StaticKeypair;
use rand::RngCore;
use std::{
    io::Write,
    os::unix::fs::OpenOptionsExt,
    path::{Path, PathBuf},
};

pub const STATIC_KEY_FILE: &str = "gateway.key";
pub const PUBLIC_KEY_FILE: &str = "gateway.pub";
pub const TOKEN_KEY_FILE: &str = "token.key";
pub const RESET_KEY_FILE: &str = "reset.key";

/// The keys [`load_dir`] reads (or creates).
#[derive(Debug, Clone)]
pub struct GatewayKeys {
    pub keypair: StaticKeypair,
    /// The resume-token key.
    pub token: [u8; 32],
    /// The secret of the session RESET key (see the module doc).
    pub reset_secret: [u8; 32],
}

#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("key file {path}: {error}")]
    Io {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("key file {path} must hold exactly 32 bytes, not {len}")]
    BadLength { path: PathBuf, len: usize },
}

/// 32 bytes from `path`, or fresh random ones written there (mode 0600).
pub fn load_or_create(path: &Path) -> Result<[u8; 32], KeyError> {
    let io = |error| KeyError::Io {
        path: path.to_owned(),
        error,
    };
    match std::fs::read(path) {
        Ok(bytes) => bytes
            .as_slice()
            .try_into()
            .map_err(|_| KeyError::BadLength {
                path: path.to_owned(),
                len: bytes.len(),
            }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            if let Some(dir) = path.parent() {
                std::fs::create_dir_all(dir).map_err(io)?;
            }
            let mut key = [0u8; 32];
            rand::rngs::OsRng.fill_bytes(&mut key);
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(path)
                .map_err(io)?;
            f.write_all(&key).and_then(|()| f.sync_all()).map_err(io)?;
            Ok(key)
        }
        Err(e) => Err(io(e)),
    }
}

/// Lower-case hex.
pub fn to_hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// 32 bytes from 64 hex digits.
pub fn from_hex(text: &str) -> Option<[u8; 32]> {
    let text = text.trim();
    if text.len() != 64 || !text.is_ascii() {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(&text[2 * i..2 * i + 2], 16).ok()?;
    }
    Some(out)
}

/// The gateway's keys from `dir`, creating missing ones (mode 0600);
/// writes `gateway.pub` (hex) for clients.
pub fn load_dir(dir: &Path) -> Result<GatewayKeys, KeyError> {
    let keypair = StaticKeypair::from_private(load_or_create(&dir.join(STATIC_KEY_FILE))?);
    let token = load_or_create(&dir.join(TOKEN_KEY_FILE))?;
    let reset_secret = load_or_create(&dir.join(RESET_KEY_FILE))?;
    let public = dir.join(PUBLIC_KEY_FILE);
    std::fs::write(&public, format!("{}\n", to_hex(&keypair.public))).map_err(|error| {
        KeyError::Io {
            path: public,
            error,
        }
    })?;
    Ok(GatewayKeys {
        keypair,
        token,
        reset_secret,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn keys_persist_and_hex_round_trips() {
        let dir = tempfile::tempdir().unwrap();
        let a = load_dir(dir.path()).unwrap();
        let b = load_dir(dir.path()).unwrap();
        assert_eq!(a.keypair.public, b.keypair.public);
        assert_eq!(a.token, b.token);
        assert_eq!(
            a.reset_secret, b.reset_secret,
            "the reset secret survives restarts"
        );
        assert_ne!(a.reset_secret, a.token, "separate secrets");
        let mode = std::fs::metadata(dir.path().join(RESET_KEY_FILE))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        let text = std::fs::read_to_string(dir.path().join(PUBLIC_KEY_FILE)).unwrap();
        assert_eq!(from_hex(&text), Some(a.keypair.public));
        assert_eq!(from_hex("zz"), None);
        std::fs::write(dir.path().join(TOKEN_KEY_FILE), b"short").unwrap();
        assert!(matches!(
            load_dir(dir.path()),
            Err(KeyError::BadLength { .. })
        ));
    }
}
