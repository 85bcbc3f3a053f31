//! Join tokens (invariant 3 in ARCHITECTURE.md): `fct1_` followed by the unpadded base64url of
//! id (8 bytes) ‖ secret (32) ‖ expiry (u64 BE unix seconds) ‖ SHA-256 of the
//! CA certificate (32) ‖ SHA-256 of the policy root keys (32).
//!
//! The format is strict and checked before anything else touches the value:
//! exactly 155 characters of a fixed charset, so a token carrying shell
//! metacharacters, CRLF or a megabyte of junk is refused by its length or
//! charset, never parsed further.

use base64::Engine;

use crate::crypto::{Secret, sha256};

const PREFIX: &str = "fct1_";
const RAW_LEN: usize = 8 + 32 + 8 + 32 + 32;
/// Length of an encoded token, prefix included.
pub const TOKEN_LEN: usize = PREFIX.len() + 150;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    #[error("join token must be {TOKEN_LEN} characters, got {0}")]
    Length(usize),
    #[error("join token must start with `{PREFIX}`")]
    Prefix,
    #[error("join token contains a character outside [A-Za-z0-9_-]")]
    Charset,
}

/// A decoded join token. The secret is redacted in `Debug`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JoinToken {
    /// Public id under which the controller stores the secret's hash.
    pub id: [u8; 8],
    pub secret: Secret<[u8; 32]>,
    pub expires_at: u64,
    pub ca_sha256: [u8; 32],
    pub roots_sha256: [u8; 32],
}

impl<T: PartialEq> PartialEq for Secret<T> {
    fn eq(&self, other: &Self) -> bool {
        self.expose() == other.expose()
    }
}
impl<T: Eq> Eq for Secret<T> {}

impl JoinToken {
    /// Checks length and charset first, then decodes.
    pub fn parse(s: &str) -> Result<JoinToken, TokenError> {
        if s.len() != TOKEN_LEN {
            return Err(TokenError::Length(s.len()));
        }
        let body = s.strip_prefix(PREFIX).ok_or(TokenError::Prefix)?;
        if !body
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
        {
            return Err(TokenError::Charset);
        }
        let raw = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(body)
            .map_err(|_| TokenError::Charset)?;
        if raw.len() != RAW_LEN {
            return Err(TokenError::Length(s.len()));
        }
        let mut id = [0u8; 8];
        let mut secret = [0u8; 32];
        let mut exp = [0u8; 8];
        let mut ca = [0u8; 32];
        let mut roots = [0u8; 32];
        id.copy_from_slice(&raw[0..8]);
        secret.copy_from_slice(&raw[8..40]);
        exp.copy_from_slice(&raw[40..48]);
        ca.copy_from_slice(&raw[48..80]);
        roots.copy_from_slice(&raw[80..112]);
        Ok(JoinToken {
            id,
            secret: Secret::new(secret),
            expires_at: u64::from_be_bytes(exp),
            ca_sha256: ca,
            roots_sha256: roots,
        })
    }

    /// The encoded token; only the token's creator prints it, once.
    pub fn encode(&self) -> Secret<String> {
        let mut raw = Vec::with_capacity(RAW_LEN);
        raw.extend_from_slice(&self.id);
        raw.extend_from_slice(self.secret.expose());
        raw.extend_from_slice(&self.expires_at.to_be_bytes());
        raw.extend_from_slice(&self.ca_sha256);
        raw.extend_from_slice(&self.roots_sha256);
        Secret::new(format!(
            "{PREFIX}{}",
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(raw)
        ))
    }

    /// Lowercase hex of the id, the store key.
    pub fn id_hex(&self) -> String {
        hex(&self.id)
    }

    /// What the controller stores instead of the secret.
    pub fn secret_hash(&self) -> [u8; 32] {
        sha256(self.secret.expose())
    }
}

/// The pin of a set of policy root keys: SHA-256 over their raw bytes, sorted.
pub fn roots_pin(roots: &[crate::crypto::PublicKey]) -> [u8; 32] {
    let mut keys: Vec<[u8; 32]> = roots.iter().map(|k| *k.as_bytes()).collect();
    keys.sort_unstable();
    sha256(&keys.concat())
}

/// Lowercase hex (every audit record's hashes go through this).
pub fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(char::from(DIGITS[usize::from(b >> 4)]));
        s.push(char::from(DIGITS[usize::from(b & 15)]));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_is_two_lowercase_digits_per_byte() {
        assert_eq!(hex(&[0x00, 0x0f, 0xa5, 0xff, 0x10]), "000fa5ff10");
        assert_eq!(hex(&[]), "");
    }

    fn sample() -> JoinToken {
        JoinToken {
            id: [1; 8],
            secret: Secret::new([2; 32]),
            expires_at: 1_900_000_000,
            ca_sha256: [3; 32],
            roots_sha256: [4; 32],
        }
    }

    #[test]
    fn round_trips() {
        let t = sample();
        let s = t.encode();
        assert_eq!(s.expose().len(), TOKEN_LEN);
        assert_eq!(JoinToken::parse(s.expose()), Ok(t));
    }

    #[test]
    fn hostile_values_are_refused_before_decoding() {
        let good = sample().encode().expose().clone();
        let check = |input: String, want: TokenError| {
            assert_eq!(JoinToken::parse(&input), Err(want), "{input:?}")
        };
        check(format!("{good}\r\n"), TokenError::Length(TOKEN_LEN + 2));
        check("x".repeat(1 << 20), TokenError::Length(1 << 20));
        check(String::new(), TokenError::Length(0));
        check(
            format!("{}$(id)", &good[..TOKEN_LEN - 5]),
            TokenError::Charset,
        );
        check(
            format!("{};rm -", &good[..TOKEN_LEN - 5]),
            TokenError::Charset,
        );
        check(format!("fct2_{}", &good[5..]), TokenError::Prefix);
    }

    #[test]
    fn debug_does_not_show_the_secret() {
        let dbg = format!("{:?}", sample());
        assert!(dbg.contains("[redacted]"), "{dbg}");
    }
}
