//! Ed25519 keys and signatures, SHA-256 hashing and the `Secret` wrapper.
//!
//! Public keys are accepted in the forms admins paste into policies
//! (`ed25519:<base64 SPKI DER>`, `ed25519:<base64 raw>` or raw base64) and
//! always printed as `ed25519:<base64 SPKI DER>`.

use std::fmt;

use base64::Engine;
use base64::engine::DecodePaddingMode;
use base64::engine::general_purpose::{GeneralPurpose, GeneralPurposeConfig, STANDARD};
use ring::signature::{self, Ed25519KeyPair, KeyPair};

/// DER prefix of an Ed25519 SubjectPublicKeyInfo; the 32 key bytes follow.
const SPKI_PREFIX: [u8; 12] = [
    0x30, 0x2a, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x03, 0x21, 0x00,
];

/// Standard alphabet, padding optional: keys pasted from tools differ.
const LENIENT: GeneralPurpose = GeneralPurpose::new(
    &base64::alphabet::STANDARD,
    GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent),
);

/// Why a key could not be read. Private key material is never echoed.
#[derive(thiserror::Error, Debug, Clone, PartialEq, Eq)]
pub enum KeyError {
    /// A public key string was malformed.
    #[error("public key \"{input}\": {reason}")]
    PublicKey { input: String, reason: String },
    /// A private key was malformed (its bytes are not shown).
    #[error("private key: {0}")]
    PrivateKey(String),
}

/// An Ed25519 public key.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Hash)]
pub struct PublicKey([u8; 32]);

impl PublicKey {
    /// Parses `ed25519:<base64 SPKI DER>`, `ed25519:<base64 raw 32 bytes>` or
    /// plain base64 of the raw 32 bytes.
    pub fn parse(s: &str) -> Result<PublicKey, KeyError> {
        let shown: String = s.chars().take(100).collect();
        let err = |reason: String| KeyError::PublicKey {
            input: shown.clone(),
            reason,
        };
        let trimmed = s.trim();
        let b64 = trimmed.strip_prefix("ed25519:").unwrap_or(trimmed);
        let bytes = LENIENT
            .decode(b64)
            .map_err(|e| err(format!("invalid base64: {e}")))?;
        let raw: &[u8] = match bytes.len() {
            32 => &bytes,
            44 if bytes[..12] == SPKI_PREFIX => &bytes[12..],
            44 => return Err(err("not an Ed25519 SubjectPublicKeyInfo".to_string())),
            n => {
                return Err(err(format!(
                    "expected 32 raw key bytes or a 44-byte SubjectPublicKeyInfo, got {n} bytes"
                )));
            }
        };
        let mut out = [0u8; 32];
        out.copy_from_slice(raw);
        Ok(PublicKey(out))
    }

    /// Wraps raw key bytes.
    pub fn from_bytes(bytes: [u8; 32]) -> PublicKey {
        PublicKey(bytes)
    }

    /// The raw 32 key bytes.
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// Lowercase hex SHA-256 of the raw key bytes; used as a key id.
    pub fn fingerprint(&self) -> String {
        sha256_hex(&self.0)
    }

    fn spki_der(&self) -> Vec<u8> {
        let mut der = SPKI_PREFIX.to_vec();
        der.extend_from_slice(&self.0);
        der
    }
}

impl fmt::Display for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ed25519:{}", STANDARD.encode(self.spki_der()))
    }
}

impl std::str::FromStr for PublicKey {
    type Err = KeyError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        PublicKey::parse(s)
    }
}

/// An Ed25519 private key. Its `Debug` never shows key material.
pub struct SigningKey(Ed25519KeyPair);

impl SigningKey {
    /// Reads a PKCS#8 (v1 or v2) DER-encoded Ed25519 private key.
    pub fn from_pkcs8_der(der: &[u8]) -> Result<SigningKey, KeyError> {
        Ed25519KeyPair::from_pkcs8_maybe_unchecked(der)
            .map(SigningKey)
            .map_err(|e| KeyError::PrivateKey(format!("not an Ed25519 PKCS#8 key: {e}")))
    }

    /// Reads the first `-----BEGIN PRIVATE KEY-----` block of a PEM text.
    pub fn from_pkcs8_pem(pem: &str) -> Result<SigningKey, KeyError> {
        const BEGIN: &str = "-----BEGIN PRIVATE KEY-----";
        const END: &str = "-----END PRIVATE KEY-----";
        let start = pem
            .find(BEGIN)
            .ok_or_else(|| KeyError::PrivateKey(format!("no `{BEGIN}` block found")))?
            + BEGIN.len();
        let len = pem[start..]
            .find(END)
            .ok_or_else(|| KeyError::PrivateKey(format!("no `{END}` line found")))?;
        let body: String = pem[start..start + len]
            .chars()
            .filter(|c| !c.is_whitespace())
            .collect();
        let der = STANDARD
            .decode(body)
            .map_err(|e| KeyError::PrivateKey(format!("invalid base64 in PEM block: {e}")))?;
        SigningKey::from_pkcs8_der(&der)
    }

    /// The matching public key.
    pub fn public_key(&self) -> PublicKey {
        let mut out = [0u8; 32];
        out.copy_from_slice(self.0.public_key().as_ref());
        PublicKey(out)
    }

    /// Signs `msg`; the result is the 64-byte Ed25519 signature.
    pub fn sign(&self, msg: &[u8]) -> Vec<u8> {
        self.0.sign(msg).as_ref().to_vec()
    }
}

impl fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SigningKey([redacted])")
    }
}

/// Whether `sig` is a valid Ed25519 signature of `msg` by `key`.
pub fn verify(key: &PublicKey, msg: &[u8], sig: &[u8]) -> bool {
    signature::UnparsedPublicKey::new(&signature::ED25519, key.as_bytes())
        .verify(msg, sig)
        .is_ok()
}

/// SHA-256 of `data`.
pub fn sha256(data: &[u8]) -> [u8; 32] {
    let digest = ring::digest::digest(&ring::digest::SHA256, data);
    let mut out = [0u8; 32];
    out.copy_from_slice(digest.as_ref());
    out
}

/// Lowercase hex SHA-256 of `data`.
pub fn sha256_hex(data: &[u8]) -> String {
    hex(&sha256(data))
}

pub(crate) fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(DIGITS[usize::from(b >> 4)] as char);
        s.push(DIGITS[usize::from(b & 0x0f)] as char);
    }
    s
}

/// A value that must never reach logs or chat: `Debug` and `Display` print
/// `[redacted]`; the value is read only through [`Secret::expose`].
#[derive(Clone)]
pub struct Secret<T>(T);

impl<T> Secret<T> {
    /// Wraps a secret value.
    pub fn new(value: T) -> Secret<T> {
        Secret(value)
    }

    /// The secret value; call this only where it is used, never to log it.
    pub fn expose(&self) -> &T {
        &self.0
    }
}

impl<T> fmt::Debug for Secret<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[redacted]")
    }
}

impl<T> fmt::Display for Secret<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[redacted]")
    }
}

#[cfg(test)]
pub(crate) mod test_keys {
    use super::SigningKey;

    /// PKCS#8 v1 DER of an Ed25519 key with the given seed.
    pub(crate) fn pkcs8_v1(seed: [u8; 32]) -> Vec<u8> {
        let mut der = vec![
            0x30, 0x2e, 0x02, 0x01, 0x00, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x04, 0x22,
            0x04, 0x20,
        ];
        der.extend_from_slice(&seed);
        der
    }

    /// A deterministic test key.
    pub(crate) fn key(seed_byte: u8) -> SigningKey {
        match SigningKey::from_pkcs8_der(&pkcs8_v1([seed_byte; 32])) {
            Ok(k) => k,
            Err(e) => panic!("test key: {e}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::test_keys::{key, pkcs8_v1};
    use super::*;

    #[test]
    fn public_key_forms() {
        let pk = key(1).public_key();
        let raw = STANDARD.encode(pk.as_bytes());
        let spki = pk.to_string();
        assert!(spki.starts_with("ed25519:MCowBQYDK2VwAyEA"), "{spki}");
        for (input, ok) in [
            (spki.clone(), true),
            (format!("ed25519:{raw}"), true),
            (raw.clone(), true),
            (raw.trim_end_matches('=').to_string(), true),
            (format!(" {spki} "), true),
            ("ed25519:!!!".to_string(), false),
            ("ed25519:AAAA".to_string(), false),
            (STANDARD.encode([0u8; 44]), false),
            (String::new(), false),
        ] {
            let got = PublicKey::parse(&input);
            assert_eq!(got.is_ok(), ok, "{input:?}: {got:?}");
            if ok {
                assert_eq!(got.ok(), Some(pk));
            }
        }
    }

    #[test]
    fn sign_and_verify() {
        let k = key(2);
        let sig = k.sign(b"hello");
        assert_eq!(sig.len(), 64);
        assert!(verify(&k.public_key(), b"hello", &sig));
        assert!(!verify(&k.public_key(), b"hellO", &sig));
        assert!(!verify(&key(3).public_key(), b"hello", &sig));
        assert!(!verify(&k.public_key(), b"hello", &sig[..63]));
    }

    #[test]
    fn pem_round_trip() {
        let der = pkcs8_v1([4; 32]);
        let pem = format!(
            "junk\n-----BEGIN PRIVATE KEY-----\n{}\n-----END PRIVATE KEY-----\n",
            STANDARD.encode(&der)
        );
        let k = SigningKey::from_pkcs8_pem(&pem);
        assert_eq!(k.map(|k| k.public_key()).ok(), Some(key(4).public_key()));
        assert!(SigningKey::from_pkcs8_pem("nothing").is_err());
        assert!(SigningKey::from_pkcs8_der(&[1, 2, 3]).is_err());
    }

    #[test]
    fn hashes_and_redaction() {
        assert_eq!(
            sha256_hex(b"abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        assert_eq!(key(1).public_key().fingerprint().len(), 64);
        let s = Secret::new("hunter2".to_string());
        assert_eq!(format!("{s:?} {s}"), "[redacted] [redacted]");
        assert_eq!(s.expose(), "hunter2");
        assert_eq!(format!("{:?}", key(1)), "SigningKey([redacted])");
    }
}
