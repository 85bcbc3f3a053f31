//! SASL client mechanisms: SCRAM-SHA-256 / SCRAM-SHA-1 (RFC 5802, 7677;
//! the server's signature is verified, so a server that does not know the
//! password cannot fake success) and PLAIN (RFC 4616; only over TLS or to a
//! loopback address, decided by the caller).

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use ring::{digest, hmac, pbkdf2};

/// Iteration counts outside this range are refused: too few is weak, too
/// many lets a server make us burn CPU.
pub const MIN_ITERATIONS: u32 = 1024;
pub const MAX_ITERATIONS: u32 = 600_000;

/// Why a SASL exchange failed (never contains the password).
#[derive(thiserror::Error, Debug, Clone, PartialEq, Eq)]
pub enum SaslError {
    #[error("malformed server message: {0}")]
    Malformed(&'static str),
    #[error("the server's nonce does not extend ours")]
    Nonce,
    #[error("iteration count {0} outside {MIN_ITERATIONS}..={MAX_ITERATIONS}")]
    Iterations(u32),
    #[error(
        "the server's signature is wrong: it does not know the password (or is not the server)"
    )]
    ServerSignature,
    #[error("the server reported: {0}")]
    ServerError(String),
}

/// A SCRAM hash.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ScramHash {
    Sha1,
    Sha256,
}

impl ScramHash {
    /// The SASL mechanism name.
    pub fn mechanism(self) -> &'static str {
        match self {
            ScramHash::Sha1 => "SCRAM-SHA-1",
            ScramHash::Sha256 => "SCRAM-SHA-256",
        }
    }

    fn hmac(self) -> hmac::Algorithm {
        match self {
            ScramHash::Sha1 => hmac::HMAC_SHA1_FOR_LEGACY_USE_ONLY,
            ScramHash::Sha256 => hmac::HMAC_SHA256,
        }
    }

    fn pbkdf2(self) -> pbkdf2::Algorithm {
        match self {
            ScramHash::Sha1 => pbkdf2::PBKDF2_HMAC_SHA1,
            ScramHash::Sha256 => pbkdf2::PBKDF2_HMAC_SHA256,
        }
    }

    fn digest(self) -> &'static digest::Algorithm {
        match self {
            ScramHash::Sha1 => &digest::SHA1_FOR_LEGACY_USE_ONLY,
            ScramHash::Sha256 => &digest::SHA256,
        }
    }

    fn len(self) -> usize {
        match self {
            ScramHash::Sha1 => 20,
            ScramHash::Sha256 => 32,
        }
    }
}

/// The PLAIN initial response: `\0user\0password`.
pub fn plain(user: &str, password: &str) -> Vec<u8> {
    let mut v = Vec::with_capacity(user.len() + password.len() + 2);
    v.push(0);
    v.extend_from_slice(user.as_bytes());
    v.push(0);
    v.extend_from_slice(password.as_bytes());
    v
}

/// A SCRAM exchange in progress.
#[derive(Debug)]
pub struct Scram {
    hash: ScramHash,
    client_first_bare: String,
    nonce: String,
    /// Set after the server-first message.
    server_signature: Option<Vec<u8>>,
}

/// `=` and `,` are escaped in SCRAM user names (RFC 5802 §5.1).
fn escape_user(user: &str) -> String {
    user.replace('=', "=3D").replace(',', "=2C")
}

impl Scram {
    /// Starts an exchange with client nonce `nonce` (random printable
    /// ASCII without `,`); returns the state and the client-first message.
    pub fn start(hash: ScramHash, user: &str, nonce: &str) -> (Scram, Vec<u8>) {
        let client_first_bare = format!("n={},r={nonce}", escape_user(user));
        let msg = format!("n,,{client_first_bare}").into_bytes();
        (
            Scram {
                hash,
                client_first_bare,
                nonce: nonce.to_string(),
                server_signature: None,
            },
            msg,
        )
    }

    /// A fresh random client nonce.
    pub fn new_nonce() -> String {
        let mut b = [0u8; 24];
        // SystemRandom only fails if the OS has no randomness source; a
        // zero nonce then still completes (the server adds its own part).
        let _ = ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut b);
        B64.encode(b)
    }

    /// Answers the server-first message with the client-final message.
    /// PBKDF2 is deliberately slow: call this off the async workers.
    pub fn respond(&mut self, server_first: &[u8], password: &str) -> Result<Vec<u8>, SaslError> {
        let sf =
            std::str::from_utf8(server_first).map_err(|_| SaslError::Malformed("not UTF-8"))?;
        let mut nonce = None;
        let mut salt = None;
        let mut iterations = None;
        for part in sf.split(',') {
            match part.split_at_checked(2) {
                Some(("r=", v)) => nonce = Some(v),
                Some(("s=", v)) => salt = Some(v),
                Some(("i=", v)) => iterations = Some(v),
                Some(("e=", v)) => {
                    return Err(SaslError::ServerError(v.chars().take(100).collect()));
                }
                Some(("m=", _)) => return Err(SaslError::Malformed("mandatory extension")),
                _ => {}
            }
        }
        let nonce = nonce.ok_or(SaslError::Malformed("no nonce"))?;
        if !nonce.starts_with(&self.nonce) || nonce.len() == self.nonce.len() {
            return Err(SaslError::Nonce);
        }
        let salt = B64
            .decode(salt.ok_or(SaslError::Malformed("no salt"))?)
            .map_err(|_| SaslError::Malformed("salt is not base64"))?;
        let iterations: u32 = iterations
            .ok_or(SaslError::Malformed("no iteration count"))?
            .parse()
            .map_err(|_| SaslError::Malformed("iteration count is not a number"))?;
        if !(MIN_ITERATIONS..=MAX_ITERATIONS).contains(&iterations) {
            return Err(SaslError::Iterations(iterations));
        }
        let iters = std::num::NonZeroU32::new(iterations).ok_or(SaslError::Iterations(0))?;
        let h = self.hash;
        let mut salted = vec![0u8; h.len()];
        pbkdf2::derive(h.pbkdf2(), iters, &salt, password.as_bytes(), &mut salted);
        let salted_key = hmac::Key::new(h.hmac(), &salted);
        let client_key = hmac::sign(&salted_key, b"Client Key");
        let stored_key = digest::digest(h.digest(), client_key.as_ref());
        let without_proof = format!("c=biws,r={nonce}");
        let auth_message = format!("{},{sf},{without_proof}", self.client_first_bare);
        let client_sig = hmac::sign(
            &hmac::Key::new(h.hmac(), stored_key.as_ref()),
            auth_message.as_bytes(),
        );
        let proof: Vec<u8> = client_key
            .as_ref()
            .iter()
            .zip(client_sig.as_ref())
            .map(|(a, b)| a ^ b)
            .collect();
        let server_key = hmac::sign(&salted_key, b"Server Key");
        self.server_signature = Some(
            hmac::sign(
                &hmac::Key::new(h.hmac(), server_key.as_ref()),
                auth_message.as_bytes(),
            )
            .as_ref()
            .to_vec(),
        );
        Ok(format!("{without_proof},p={}", B64.encode(proof)).into_bytes())
    }

    /// Checks the server-final message (`v=…`).
    pub fn verify(&self, server_final: &[u8]) -> Result<(), SaslError> {
        let sf =
            std::str::from_utf8(server_final).map_err(|_| SaslError::Malformed("not UTF-8"))?;
        if let Some(e) = sf.strip_prefix("e=") {
            return Err(SaslError::ServerError(e.chars().take(100).collect()));
        }
        let v = sf
            .split(',')
            .find_map(|p| p.strip_prefix("v="))
            .ok_or(SaslError::Malformed("no verifier"))?;
        let v = B64
            .decode(v)
            .map_err(|_| SaslError::Malformed("verifier is not base64"))?;
        let expected = self
            .server_signature
            .as_ref()
            .ok_or(SaslError::Malformed("final message before the first"))?;
        // Both are public at this point; compare in constant time anyway.
        if v.len() == expected.len()
            && v.iter()
                .zip(expected)
                .fold(0u8, |acc, (a, b)| acc | (a ^ b))
                == 0
        {
            Ok(())
        } else {
            Err(SaslError::ServerSignature)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// RFC 5802 §5 (iteration count 4096).
    #[test]
    fn scram_sha1_rfc5802_vector() {
        let (mut s, first) = Scram::start(ScramHash::Sha1, "user", "fyko+d2lbbFgONRv9qkxdawL");
        assert_eq!(first, b"n,,n=user,r=fyko+d2lbbFgONRv9qkxdawL");
        let fin = s
            .respond(
                b"r=fyko+d2lbbFgONRv9qkxdawL3rfcNHYJY1ZVvWVs7j,s=QSXCR+Q6sek8bf92,i=4096",
                "pencil",
            )
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            String::from_utf8_lossy(&fin),
            "c=biws,r=fyko+d2lbbFgONRv9qkxdawL3rfcNHYJY1ZVvWVs7j,p=v0X8v3Bz2T0CJGbJQyF0X+HI4Ts="
        );
        assert_eq!(s.verify(b"v=rmF9pqV8S7suAoZWja4dJRkFsKQ="), Ok(()));
        assert_eq!(
            s.verify(b"v=AAAApqV8S7suAoZWja4dJRkFsKQ="),
            Err(SaslError::ServerSignature)
        );
    }

    /// RFC 7677 §3.
    #[test]
    fn scram_sha256_rfc7677_vector() {
        let (mut s, _) = Scram::start(ScramHash::Sha256, "user", "rOprNGfwEbeRWgbNEkqO");
        let fin = s
            .respond(
                b"r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096",
                "pencil",
            )
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            String::from_utf8_lossy(&fin),
            "c=biws,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,p=dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ="
        );
        assert_eq!(
            s.verify(b"v=6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4="),
            Ok(())
        );
    }

    #[test]
    fn hostile_server_messages_are_refused() {
        for (msg, want) in [
            (
                &b"r=othernonce,s=QSXCR+Q6sek8bf92,i=4096"[..],
                SaslError::Nonce,
            ),
            (b"r=abc,s=QSXCR+Q6sek8bf92,i=4096", SaslError::Nonce),
            (b"r=abcdef,s=QSXCR+Q6sek8bf92,i=1", SaslError::Iterations(1)),
            (
                b"r=abcdef,s=QSXCR+Q6sek8bf92,i=4000000000",
                SaslError::Iterations(4_000_000_000),
            ),
            (
                b"r=abcdef,s=!!,i=4096",
                SaslError::Malformed("salt is not base64"),
            ),
            (b"r=abcdef,i=4096", SaslError::Malformed("no salt")),
            (
                b"e=unknown-user",
                SaslError::ServerError("unknown-user".into()),
            ),
            (b"\xff", SaslError::Malformed("not UTF-8")),
        ] {
            let (mut s, _) = Scram::start(ScramHash::Sha1, "u", "abc");
            assert_eq!(
                s.respond(msg, "pw"),
                Err(want),
                "{}",
                String::from_utf8_lossy(msg)
            );
        }
        let (s, _) = Scram::start(ScramHash::Sha1, "u,=", "abc");
        assert_eq!(s.client_first_bare, "n=u=2C=3D,r=abc");
        assert!(s.verify(b"v=AAAA").is_err(), "verify before respond");
        assert_eq!(plain("alice", "pw"), b"\0alice\0pw");
    }
}
