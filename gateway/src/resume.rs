//! Resume tokens: a client that logged in once reconnects with a token any
//! gateway of the cluster checks by itself in microseconds (an HMAC under a
//! key the gateways share), so a reconnect storm never touches argon2.
//!
//! Layout (72 bytes, all integers little-endian): `version u8 (2) | key_id
//! u8 | reserved [u8; 2] (0) | user u64 | issued_at_s u64 | expires_at_s u64
//! | credential_epoch u32 | nonce [u8; 16] | mac [u8; 24]`, where `mac` =
//! the first 24 bytes of HMAC-SHA256(key, the 48 bytes before it). Times are
//! Unix seconds. The nonce is fresh randomness from the issuer, so no two
//! tokens are alike. `credential_epoch` is the account's epoch when the
//! token was issued: a password change or a disable moves the epoch on
//! (profile), and the gateway refuses a token of another epoch, so that
//! revokes every earlier token of the user. Two keys may be valid at once
//! (by `key_id`) so the cluster can rotate its key without logging everyone
//! out.

use hmac::{Hmac, Mac};
use sha2::Sha256;

pub const TOKEN_BYTES: usize = 72;
/// Bytes of fresh randomness in a token.
pub const NONCE_BYTES: usize = 16;
const VERSION: u8 = 2;
const MAC_BYTES: usize = 24;
const SIGNED_BYTES: usize = TOKEN_BYTES - MAC_BYTES;

/// A verified token's contents.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ResumeClaims {
    pub user: u64,
    pub issued_at_s: u64,
    pub expires_at_s: u64,
    /// The account's credential epoch when the token was issued.
    pub credential_epoch: u32,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    #[error("resume token has the wrong length or version")]
    Malformed,
    #[error("resume token signed with an unknown key")]
    UnknownKey,
    #[error("resume token does not verify")]
    BadMac,
    #[error("resume token expired")]
    Expired,
}

/// The cluster's token keys: one to sign with, and any still accepted.
#[derive(Clone)]
pub struct TokenKeys {
    keys: Vec<(u8, [u8; 32])>,
    signing: u8,
}

impl std::fmt::Debug for TokenKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenKeys")
            .field(
                "key_ids",
                &self.keys.iter().map(|(id, _)| id).collect::<Vec<_>>(),
            )
            .field("signing", &self.signing)
            .finish()
    }
}

/// The id of the token key a gateway signs with (`token.key`).
pub const TOKEN_KEY_ID: u8 = 1;

impl TokenKeys {
    /// The cluster's keys as a gateway loads them: `token` (its
    /// `token.key`) signs, as [`TOKEN_KEY_ID`].
    pub fn cluster(token: [u8; 32]) -> TokenKeys {
        TokenKeys::new((TOKEN_KEY_ID, token), &[])
    }

    /// Sign with `(id, key)`; also accept the other keys given.
    pub fn new(signing: (u8, [u8; 32]), also_accepted: &[(u8, [u8; 32])]) -> TokenKeys {
        let mut keys = vec![signing];
        keys.extend(
            also_accepted
                .iter()
                .copied()
                .filter(|(id, _)| *id != signing.0),
        );
        TokenKeys {
            keys,
            signing: signing.0,
        }
    }

    fn mac(key: &[u8; 32], signed: &[u8]) -> Hmac<Sha256> {
        let mut m = <Hmac<Sha256> as Mac>::new_from_slice(key).expect("any key length");
        m.update(signed);
        m
    }

    /// A token for `claims`; `nonce` must be fresh randomness.
    pub fn issue(&self, claims: ResumeClaims, nonce: [u8; NONCE_BYTES]) -> [u8; TOKEN_BYTES] {
        let key = &self.keys[0].1;
        let mut t = [0u8; TOKEN_BYTES];
        t[0] = VERSION;
        t[1] = self.signing;
        // bytes 2..4 reserved (zero), covered by the MAC
        t[4..12].copy_from_slice(&claims.user.to_le_bytes());
        t[12..20].copy_from_slice(&claims.issued_at_s.to_le_bytes());
        t[20..28].copy_from_slice(&claims.expires_at_s.to_le_bytes());
        t[28..32].copy_from_slice(&claims.credential_epoch.to_le_bytes());
        t[32..SIGNED_BYTES].copy_from_slice(&nonce);
        let tag = Self::mac(key, &t[..SIGNED_BYTES]).finalize().into_bytes();
        t[SIGNED_BYTES..].copy_from_slice(&tag[..MAC_BYTES]);
        t
    }

    /// Check a token (constant-time MAC comparison) and its expiry.
    pub fn verify(&self, token: &[u8], now_s: u64) -> Result<ResumeClaims, TokenError> {
        if token.len() != TOKEN_BYTES || token[0] != VERSION || token[2..4] != [0, 0] {
            return Err(TokenError::Malformed);
        }
        let key = self
            .keys
            .iter()
            .find(|(id, _)| *id == token[1])
            .map(|(_, k)| k)
            .ok_or(TokenError::UnknownKey)?;
        Self::mac(key, &token[..SIGNED_BYTES])
            .verify_truncated_left(&token[SIGNED_BYTES..])
            .map_err(|_| TokenError::BadMac)?;
        let u64_at = |at: usize| u64::from_le_bytes(token[at..at + 8].try_into().expect("8 bytes"));
        let epoch = u32::from_le_bytes(token[28..32].try_into().expect("4 bytes"));
        let claims = ResumeClaims {
            user: u64_at(4),
            issued_at_s: u64_at(12),
            expires_at_s: u64_at(20),
            credential_epoch: epoch,
        };
        if now_s >= claims.expires_at_s {
            return Err(TokenError::Expired);
        }
        Ok(claims)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn claims() -> ResumeClaims {
        ResumeClaims {
            user: 42,
            issued_at_s: 1_000,
            expires_at_s: 2_000,
            credential_epoch: 3,
        }
    }

    #[test]
    fn a_token_verifies_until_it_expires() {
        let keys = TokenKeys::new((1, [7; 32]), &[]);
        let t = keys.issue(claims(), [5; NONCE_BYTES]);
        assert_eq!(keys.verify(&t, 1_500), Ok(claims()));
        assert_eq!(keys.verify(&t, 2_000), Err(TokenError::Expired));
    }

    #[test]
    fn tokens_of_the_same_claims_differ_by_their_nonce() {
        let keys = TokenKeys::new((1, [7; 32]), &[]);
        let a = keys.issue(claims(), [1; NONCE_BYTES]);
        let b = keys.issue(claims(), [2; NONCE_BYTES]);
        assert_ne!(a, b, "two logins in the same second get different tokens");
        assert_eq!(keys.verify(&a, 1_500), keys.verify(&b, 1_500));
    }

    #[test]
    fn tampering_and_foreign_keys_are_refused() {
        let keys = TokenKeys::new((1, [7; 32]), &[]);
        let t = keys.issue(claims(), [5; NONCE_BYTES]);
        for i in 0..TOKEN_BYTES {
            let mut bad = t;
            bad[i] ^= 1;
            assert!(
                keys.verify(&bad, 1_500).is_err(),
                "flipped byte {i} accepted"
            );
        }
        let other = TokenKeys::new((1, [8; 32]), &[]);
        assert_eq!(other.verify(&t, 1_500), Err(TokenError::BadMac));
        let unknown = TokenKeys::new((2, [7; 32]), &[]);
        assert_eq!(unknown.verify(&t, 1_500), Err(TokenError::UnknownKey));
        assert_eq!(keys.verify(&t[..10], 1_500), Err(TokenError::Malformed));
    }

    #[test]
    fn rotation_keeps_old_tokens_valid_while_their_key_is_accepted() {
        let old = TokenKeys::new((1, [7; 32]), &[]);
        let t = old.issue(claims(), [5; NONCE_BYTES]);
        let rotated = TokenKeys::new((2, [9; 32]), &[(1, [7; 32])]);
        assert_eq!(rotated.verify(&t, 1_500), Ok(claims()));
        let fresh = rotated.issue(claims(), [6; NONCE_BYTES]);
        assert_eq!(fresh[1], 2);
        assert_eq!(old.verify(&fresh, 1_500), Err(TokenError::UnknownKey));
    }

    proptest! {
        #[test]
        fn verify_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..80)) {
            let keys = TokenKeys::new((1, [7; 32]), &[]);
            let _ = keys.verify(&bytes, 0);
        }
    }
}
