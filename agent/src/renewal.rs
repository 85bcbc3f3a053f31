//! Certificate renewal over the stream: at two thirds of its lifetime the
//! agent sends a CSR and installs the certificate that comes back.
//!
//! TLS keys are ECDSA P-256 (gRPC-core clients cannot use Ed25519 in a
//! handshake, and the whole fleet uses one kind). An agent that joined
//! with an Ed25519 key, before, renews into a new P-256 key: the key is
//! made when the renewal is due, kept in memory for the request's retries,
//! and written only together with the certificate issued for it
//! (`StateDir::replace_key_and_cert`). A certificate is installed only for
//! a key the agent holds, so a late answer to an earlier request cannot
//! pair a key with another key's certificate.

use rcgen::KeyPair;

use crate::state::{StateDir, StateError, write_atomic};

/// The algorithm of every TLS key the agent makes.
static TLS_KEY_ALG: &rcgen::SignatureAlgorithm = &rcgen::PKCS_ECDSA_P256_SHA256;

/// A new TLS key (at join, or when renewing out of an older kind).
pub fn new_tls_key() -> Result<KeyPair, rcgen::Error> {
    KeyPair::generate_for(TLS_KEY_ALG)
}

#[derive(Debug, thiserror::Error)]
pub enum RenewalError {
    #[error("{path}: {reason}")]
    Key {
        path: std::path::PathBuf,
        reason: String,
    },
    #[error("certificate signing request: {0}")]
    Csr(rcgen::Error),
    #[error("renewed certificate: {0}")]
    BadCertificate(String),
    #[error(
        "renewed certificate is for a key this agent does not hold (an answer to an earlier request?)"
    )]
    OtherKey,
    #[error(transparent)]
    State(#[from] StateError),
}

/// What a renewal installed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Installed {
    /// A new certificate for the key the agent already had.
    Certificate,
    /// A new P-256 key and its certificate, replacing a key of another
    /// kind.
    KeyAndCertificate,
}

/// The renewal state one connection loop keeps between a request and its
/// answer: the new key, when the renewal moves to one.
#[derive(Default)]
pub struct Renewal {
    next_key: Option<KeyPair>,
}

impl Renewal {
    /// The CSR to send: for the current key when it is P-256, else for a
    /// new P-256 key (the same one on every retry until it is installed).
    pub fn request(&mut self, dir: &StateDir) -> Result<Vec<u8>, RenewalError> {
        let current = current_key(dir)?;
        let key = if current.algorithm() == TLS_KEY_ALG {
            self.next_key = None;
            &current
        } else {
            if self.next_key.is_none() {
                self.next_key = Some(new_tls_key().map_err(RenewalError::Csr)?);
            }
            self.next_key.as_ref().expect("set just above")
        };
        let csr = rcgen::CertificateParams::new(Vec::<String>::new())
            .and_then(|p| p.serialize_request(key))
            .map_err(RenewalError::Csr)?;
        Ok(csr.der().to_vec())
    }

    /// Installs a certificate the controller issued: with the new key it
    /// was issued for, or alone when it is for the current key.
    pub fn install(&mut self, dir: &StateDir, cert_pem: &str) -> Result<Installed, RenewalError> {
        let certified = certified_key(cert_pem)?;
        if let Some(next) = &self.next_key
            && next.public_key_raw() == certified.as_slice()
        {
            dir.replace_key_and_cert(&next.serialize_pem(), cert_pem)?;
            self.next_key = None;
            return Ok(Installed::KeyAndCertificate);
        }
        if current_key(dir)?.public_key_raw() == certified.as_slice() {
            write_atomic(&dir.cert(), cert_pem.as_bytes(), 0o644)?;
            return Ok(Installed::Certificate);
        }
        Err(RenewalError::OtherKey)
    }
}

fn current_key(dir: &StateDir) -> Result<KeyPair, RenewalError> {
    let path = dir.key();
    let bad = |reason: String| RenewalError::Key {
        path: path.clone(),
        reason,
    };
    let pem = std::fs::read_to_string(&path).map_err(|e| bad(e.to_string()))?;
    KeyPair::from_pem(&pem).map_err(|e| bad(e.to_string()))
}

/// The raw public key a PEM certificate certifies.
fn certified_key(cert_pem: &str) -> Result<Vec<u8>, RenewalError> {
    let bad = |e: String| RenewalError::BadCertificate(e);
    let (_, pem) = x509_parser::pem::parse_x509_pem(cert_pem.as_bytes())
        .map_err(|e| bad(format!("not PEM: {e}")))?;
    let cert = pem.parse_x509().map_err(|e| bad(e.to_string()))?;
    Ok(cert.public_key().subject_public_key.data.to_vec())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A state dir holding `key` and a certificate for it, from a
    /// throwaway CA; returns the CA's issuer to certify CSRs with.
    fn state_with(key: &KeyPair) -> (tempfile::TempDir, StateDir, rcgen::Issuer<'static, KeyPair>) {
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = StateDir::new(tmp.path());
        let ca_key = new_tls_key().expect("ca key");
        let mut ca = rcgen::CertificateParams::new(Vec::<String>::new()).expect("params");
        ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let issuer = rcgen::Issuer::new(ca, ca_key);
        let cert = rcgen::CertificateParams::new(Vec::<String>::new())
            .and_then(|p| p.signed_by(key, &issuer))
            .expect("cert");
        write_atomic(&dir.key(), key.serialize_pem().as_bytes(), 0o600).expect("key");
        write_atomic(&dir.cert(), cert.pem().as_bytes(), 0o644).expect("cert");
        write_atomic(&dir.ca(), b"ca", 0o644).expect("ca");
        (tmp, dir, issuer)
    }

    fn answer(csr_der: &[u8], issuer: &rcgen::Issuer<'static, KeyPair>) -> String {
        let der = rustls::pki_types::CertificateSigningRequestDer::from(csr_der);
        let csr = rcgen::CertificateSigningRequestParams::from_der(&der).expect("csr");
        csr.params
            .signed_by(&csr.public_key, issuer)
            .expect("sign")
            .pem()
    }

    fn key_alg(dir: &StateDir) -> &'static rcgen::SignatureAlgorithm {
        current_key(dir).expect("key").algorithm()
    }

    #[test]
    fn an_ed25519_agent_renews_into_a_p256_key_and_a_p256_agent_keeps_its_key() {
        // (key the agent holds, what a renewal installs)
        for (alg, want) in [
            (&rcgen::PKCS_ED25519, Installed::KeyAndCertificate),
            (TLS_KEY_ALG, Installed::Certificate),
        ] {
            let key = KeyPair::generate_for(alg).expect("key");
            let (_tmp, dir, issuer) = state_with(&key);
            let mut renewal = Renewal::default();
            let first = renewal.request(&dir).expect("request");
            // A retry asks for the same key.
            let retry = renewal.request(&dir).expect("retry");
            assert_eq!(
                certified_key(&answer(&first, &issuer)).expect("first"),
                certified_key(&answer(&retry, &issuer)).expect("retry"),
                "{alg:?}: a retry asks for the same key"
            );
            let cert = answer(&retry, &issuer);
            let got = renewal.install(&dir, &cert).expect("installed");
            assert_eq!(got, want, "{alg:?}");
            assert_eq!(key_alg(&dir), TLS_KEY_ALG, "{alg:?}");
            assert_eq!(
                std::fs::read_to_string(dir.cert()).expect("cert"),
                cert,
                "{alg:?}"
            );
            assert_eq!(
                certified_key(&cert).expect("certified"),
                current_key(&dir).expect("key").public_key_raw(),
                "{alg:?}: the key on disk is the certified one"
            );
            let held = std::fs::read_to_string(dir.key()).expect("key");
            if want == Installed::Certificate {
                assert_eq!(held, key.serialize_pem(), "the P-256 key is kept");
            }
        }
    }

    #[test]
    fn a_certificate_for_a_key_the_agent_does_not_hold_is_refused_and_changes_nothing() {
        let key = KeyPair::generate_for(&rcgen::PKCS_ED25519).expect("key");
        let (_tmp, dir, issuer) = state_with(&key);
        let before = (
            std::fs::read_to_string(dir.key()).expect("key"),
            std::fs::read_to_string(dir.cert()).expect("cert"),
        );
        let mut renewal = Renewal::default();
        renewal.request(&dir).expect("request");
        let stranger = new_tls_key().expect("key");
        let csr = rcgen::CertificateParams::new(Vec::<String>::new())
            .and_then(|p| p.serialize_request(&stranger))
            .expect("csr");
        let err = renewal
            .install(&dir, &answer(csr.der(), &issuer))
            .expect_err("another key's certificate");
        assert!(matches!(err, RenewalError::OtherKey), "{err}");
        let err = renewal
            .install(&dir, "not a certificate")
            .expect_err("garbage");
        assert!(
            err.to_string().starts_with("renewed certificate: "),
            "{err}"
        );
        let after = (
            std::fs::read_to_string(dir.key()).expect("key"),
            std::fs::read_to_string(dir.cert()).expect("cert"),
        );
        assert_eq!(before, after);
    }

    #[test]
    fn a_key_replacement_interrupted_at_any_step_is_completed_or_undone() {
        let old = KeyPair::generate_for(&rcgen::PKCS_ED25519).expect("key");
        let new = new_tls_key().expect("key");
        let next = |p: std::path::PathBuf| {
            let mut s = p.into_os_string();
            s.push(".next");
            std::path::PathBuf::from(s)
        };
        // Steps done before the crash: 1 new key written, 2 new certificate
        // written, 3 key renamed into place; (step, the key that holds).
        for (steps, new_holds) in [(0, false), (1, false), (2, true), (3, true)] {
            let (_tmp, dir, _) = state_with(&old);
            let new_cert = "-----BEGIN CERTIFICATE-----
new
-----END CERTIFICATE-----
";
            if steps >= 1 {
                write_atomic(&next(dir.key()), new.serialize_pem().as_bytes(), 0o600)
                    .expect("step 1");
            }
            if steps >= 2 {
                write_atomic(&next(dir.cert()), new_cert.as_bytes(), 0o644).expect("step 2");
            }
            if steps >= 3 {
                std::fs::rename(next(dir.key()), dir.key()).expect("step 3");
            }
            let tls = dir.client_tls().expect("client tls");
            let want_key = if new_holds { &new } else { &old };
            assert_eq!(tls.key_pem, want_key.serialize_pem(), "after {steps} steps");
            assert_eq!(
                tls.cert_pem.contains(
                    "
new
"
                ),
                new_holds,
                "after {steps} steps: key and certificate belong together"
            );
            assert!(!next(dir.key()).exists() && !next(dir.cert()).exists());
        }
    }
}
