//! The fleet CA: creates it on first start, issues role-bearing certificates,
//! and reads the role and name back out of a peer's certificate.
//!
//! What a certificate says is decided here, never by a CSR (invariant 10 in ARCHITECTURE.md):
//! only the CSR's public key is used; names, role, key usages and `CA:false`
//! come from the caller, who got them from the token and the registry.

use crate::keyfile::{Existing, write_private};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName,
    DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType, SerialNumber,
};
use time::OffsetDateTime;

/// The role a certificate grants; the service a caller may use follows from it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Role {
    Agent,
    Gateway,
    Operator,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Agent => "agent",
            Role::Gateway => "gateway",
            Role::Operator => "operator",
        }
    }

    pub fn parse(s: &str) -> Option<Role> {
        match s {
            "agent" => Some(Role::Agent),
            "gateway" => Some(Role::Gateway),
            "operator" => Some(Role::Operator),
            _ => None,
        }
    }
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Who is on the other end of an authenticated connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Peer {
    pub role: Role,
    pub name: String,
    /// The certificate's serial number, lowercase hex without leading
    /// zeros (empty for an in-process caller without a certificate).
    pub serial: String,
    /// When the certificate was issued (Unix seconds; see [`issued_at`]).
    pub issued_at: u64,
}

impl Peer {
    /// A caller inside the controller's process (`fleetcmd dev`), with no
    /// certificate of its own.
    pub fn in_process(role: Role, name: &str) -> Peer {
        Peer {
            role,
            name: name.to_owned(),
            serial: String::new(),
            issued_at: 0,
        }
    }
}

/// How far `leaf_params` back-dates `not_before` for a lifetime: 5 minutes
/// for clock skew, but never more than a quarter of the lifetime.
fn backdate(ttl: Duration) -> Duration {
    Duration::from_secs(300).min(ttl / 4)
}

/// When a certificate made by `leaf_params` was issued, from its validity
/// (Unix seconds): the inverse of `backdate`. The span is `ttl + backdate`,
/// so the back-dating is `min(300, span / 5)`. Revocation by name compares
/// this with the revocation time: certificates issued before it are
/// refused, one issued after it (a replacement) is not.
pub fn issued_at(not_before: u64, not_after: u64) -> u64 {
    let span = not_after.saturating_sub(not_before);
    not_before + (span / 5).min(300)
}

const URI_PREFIX: &str = "urn:fleetcmd:";

#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("certificate: {0}")]
    Rcgen(#[from] rcgen::Error),
    #[error("certificate signing request: {0}")]
    BadCsr(String),
    #[error("{path}: {reason}")]
    BadFile { path: PathBuf, reason: String },
    #[error(transparent)]
    KeyFile(#[from] crate::keyfile::KeyFileError),
    #[error("generating an Ed25519 signing key failed")]
    KeyGeneration,
}

/// A certificate and its private key, both PEM.
#[derive(Clone)]
pub struct IssuedIdentity {
    pub cert_pem: String,
    pub key_pem: fleetcmd_core::crypto::Secret<String>,
}

impl std::fmt::Debug for IssuedIdentity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IssuedIdentity")
            .field("key_pem", &"[redacted]")
            .finish()
    }
}

/// The fleet certificate authority, loaded from (or created in) a directory.
pub struct Ca {
    cert_pem: String,
    cert_der: Vec<u8>,
    issuer: Issuer<'static, KeyPair>,
}

impl std::fmt::Debug for Ca {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ca")
            .field("fingerprint", &self.fingerprint())
            .finish()
    }
}

fn read(path: &Path) -> Result<String, PkiError> {
    std::fs::read_to_string(path).map_err(|source| PkiError::Io {
        path: path.to_owned(),
        source,
    })
}

fn now() -> OffsetDateTime {
    OffsetDateTime::now_utc()
}

fn random_serial() -> SerialNumber {
    let mut bytes = [0u8; 16];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut bytes)
        .expect("the OS random source is available");
    bytes[0] &= 0x7f;
    SerialNumber::from_slice(&bytes)
}

/// A new ECDSA P-256 key pair, for every TLS identity: the CA, the
/// controller's server certificate and the agent, operator and gateway
/// client certificates. gRPC clients built on gRPC-core/BoringSSL (Python
/// grpcio, Ruby, C++, C#, PHP) offer no Ed25519 signature scheme in the
/// handshake and cannot load an Ed25519 client key, so an Ed25519 server
/// or client certificate shuts them out. Signatures over jobs, approvals,
/// policies and the audit trail stay Ed25519 ([`new_signing_key_pem`]).
pub fn new_key() -> Result<KeyPair, PkiError> {
    Ok(KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?)
}

/// A new Ed25519 signing key as a PKCS#8 PEM: an operator's key for
/// signing jobs and approvals (a `[[signers]]` entry of the policy), a
/// policy root or a gateway's signing key. Not a TLS key ([`new_key`]).
pub fn new_signing_key_pem() -> Result<fleetcmd_core::crypto::Secret<String>, PkiError> {
    use base64::Engine;
    let doc = ring::signature::Ed25519KeyPair::generate_pkcs8(&ring::rand::SystemRandom::new())
        .map_err(|_| PkiError::KeyGeneration)?;
    Ok(fleetcmd_core::crypto::Secret::new(format!(
        "-----BEGIN PRIVATE KEY-----\n{}\n-----END PRIVATE KEY-----\n",
        base64::engine::general_purpose::STANDARD.encode(doc.as_ref())
    )))
}

impl Ca {
    /// Loads `dir/ca.crt` + `dir/ca.key`, creating them on first start
    /// (with a P-256 key). A CA that exists is kept whatever its key, an
    /// Ed25519 one of an earlier version included: join tokens pin its
    /// SHA-256 and agents verify the controller against it, and gRPC-core
    /// clients verify a chain it signed with Ed25519 (what they cannot do
    /// is use an Ed25519 key in the handshake, so the controller's server
    /// certificate, issued at every start, is P-256 whatever the CA).
    pub fn load_or_create(dir: &Path) -> Result<Ca, PkiError> {
        let cert_path = dir.join("ca.crt");
        let key_path = dir.join("ca.key");
        if cert_path.exists() {
            let cert_pem = read(&cert_path)?;
            let key_pem = read(&key_path)?;
            let key = KeyPair::from_pem(&key_pem).map_err(|e| PkiError::BadFile {
                path: key_path.clone(),
                reason: e.to_string(),
            })?;
            let issuer =
                Issuer::from_ca_cert_pem(&cert_pem, key).map_err(|e| PkiError::BadFile {
                    path: cert_path.clone(),
                    reason: e.to_string(),
                })?;
            let cert_der = pem_to_der(&cert_pem).ok_or_else(|| PkiError::BadFile {
                path: cert_path,
                reason: "not a PEM certificate".into(),
            })?;
            return Ok(Ca {
                cert_pem,
                cert_der,
                issuer,
            });
        }
        std::fs::create_dir_all(dir).map_err(|source| PkiError::Io {
            path: dir.to_owned(),
            source,
        })?;
        let key = new_key()?;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, "fleetcmd fleet CA");
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        params.not_before = now() - Duration::from_secs(3600);
        params.not_after = now() + Duration::from_secs(10 * 365 * 86400);
        params.serial_number = Some(random_serial());
        let cert = params.self_signed(&key)?;
        write_private(&key_path, key.serialize_pem().as_bytes(), Existing::Refuse)?;
        write_private(&cert_path, cert.pem().as_bytes(), Existing::Refuse)?;
        let cert_pem = cert.pem();
        Ok(Ca {
            cert_der: cert.der().to_vec(),
            cert_pem,
            issuer: Issuer::new(params, key),
        })
    }

    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// SHA-256 of the CA certificate (DER), the value a join token pins.
    pub fn fingerprint(&self) -> [u8; 32] {
        fleetcmd_core::crypto::sha256(&self.cert_der)
    }

    fn leaf_params(
        &self,
        role: Role,
        name: &str,
        ttl: Duration,
    ) -> Result<CertificateParams, PkiError> {
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, name);
        dn.push(DnType::OrganizationalUnitName, role.as_str());
        params.distinguished_name = dn;
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        params.subject_alt_names = vec![SanType::URI(
            format!("{URI_PREFIX}{}:{name}", role.as_str())
                .try_into()
                .map_err(|_| {
                    PkiError::BadCsr(format!("name {name:?} is not valid in a certificate"))
                })?,
        )];
        // Back-dated for clock skew, but never by more than a quarter of the
        // lifetime: agents renew at 2/3 of not_before..not_after.
        params.not_before = now() - backdate(ttl);
        params.not_after = now() + ttl;
        params.serial_number = Some(random_serial());
        params.use_authority_key_identifier_extension = true;
        Ok(params)
    }

    /// Issues a certificate for the public key in `csr_der`. Everything else
    /// in the CSR (names, extensions, CA flag) is ignored.
    pub fn issue_from_csr(
        &self,
        csr_der: &[u8],
        role: Role,
        name: &str,
        ttl: Duration,
    ) -> Result<String, PkiError> {
        let der = rustls::pki_types::CertificateSigningRequestDer::from(csr_der);
        let csr = CertificateSigningRequestParams::from_der(&der)
            .map_err(|e| PkiError::BadCsr(e.to_string()))?;
        let params = self.leaf_params(role, name, ttl)?;
        Ok(params.signed_by(&csr.public_key, &self.issuer)?.pem())
    }

    /// Issues a fresh key and certificate (for operators and gateways, on the
    /// controller host or in `fleetcmd dev`).
    pub fn issue_identity(
        &self,
        role: Role,
        name: &str,
        ttl: Duration,
    ) -> Result<IssuedIdentity, PkiError> {
        let key = new_key()?;
        let params = self.leaf_params(role, name, ttl)?;
        let cert = params.signed_by(&key, &self.issuer)?;
        Ok(IssuedIdentity {
            cert_pem: cert.pem(),
            key_pem: fleetcmd_core::crypto::Secret::new(key.serialize_pem()),
        })
    }

    /// The controller's own server certificate, valid for `names` plus the
    /// loopback names. The returned chain includes the CA, so a joining agent
    /// can check the CA against its token's pin.
    pub fn issue_server(&self, names: &[String]) -> Result<IssuedIdentity, PkiError> {
        let key = new_key()?;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, "fleetcmd controller");
        params.distinguished_name = dn;
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let mut sans = vec![
            SanType::DnsName("localhost".try_into()?),
            SanType::IpAddress(IpAddr::V4(Ipv4Addr::LOCALHOST)),
            SanType::IpAddress(IpAddr::V6(Ipv6Addr::LOCALHOST)),
        ];
        for n in names {
            match n.parse::<IpAddr>() {
                Ok(ip) => sans.push(SanType::IpAddress(ip)),
                Err(_) => sans.push(SanType::DnsName(n.as_str().try_into()?)),
            }
        }
        params.subject_alt_names = sans;
        params.not_before = now() - Duration::from_secs(300);
        params.not_after = now() + Duration::from_secs(365 * 86400);
        params.serial_number = Some(random_serial());
        params.use_authority_key_identifier_extension = true;
        let cert = params.signed_by(&key, &self.issuer)?;
        Ok(IssuedIdentity {
            cert_pem: format!("{}{}", cert.pem(), self.cert_pem),
            key_pem: fleetcmd_core::crypto::Secret::new(key.serialize_pem()),
        })
    }
}

/// The certificate an agent was last (re-)enrolled with. Enrolling a name
/// again hands it to another key: every agent certificate for that name
/// issued before the new enrolment is refused from then on (an operator
/// who once held the name keeps nothing), while the enrolment certificate
/// and renewals issued after it are accepted.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct EnrolmentCert {
    /// Its serial, as [`Peer::serial`].
    pub serial: String,
    /// When it was issued, as [`Peer::issued_at`].
    pub issued_at: u64,
}

impl EnrolmentCert {
    /// Of a certificate just issued (PEM).
    pub fn of(cert_pem: &str) -> Option<EnrolmentCert> {
        let peer = peer_from_cert(&pem_to_der(cert_pem)?)?;
        Some(EnrolmentCert {
            serial: peer.serial,
            issued_at: peer.issued_at,
        })
    }

    /// Whether an agent certificate with `serial`, issued at `issued_at`,
    /// is still accepted: the enrolment certificate itself, or one issued
    /// in a later second (a renewal). Times have whole seconds: one issued
    /// in the same second as the enrolment certificate is refused (fail
    /// closed; renewals come at two thirds of the lifetime).
    pub fn admits(&self, serial: &str, issued_at: u64) -> bool {
        serial == self.serial || issued_at > self.issued_at
    }
}

/// Checks an operator's or gateway's certificate name (`issue-cert
/// --name`): 1 to 64 ASCII letters, digits, `.`, `_`, `-` and `@`,
/// starting with a letter or digit. The name becomes file names in the
/// `--out` directory (`NAME.crt`, `NAME.key`) and the identity `cli:NAME`
/// in policies: a path separator or `..` would write outside that directory
/// (found by an outside test: `--name ../evil`), and a `*` would read as a
/// pattern.
pub fn check_cert_name(name: &str) -> Result<(), String> {
    let b = name.as_bytes();
    let ok = !b.is_empty()
        && b.len() <= 64
        && b[0].is_ascii_alphanumeric()
        && b.iter()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'.' | b'_' | b'-' | b'@'));
    if name == "ca" {
        // NAME.crt would be the fleet CA file written beside it.
        return Err(
            "--name \"ca\" is taken: ca.crt is the fleet CA written beside NAME.crt".into(),
        );
    }
    if ok {
        Ok(())
    } else {
        Err(format!(
            "--name {:?} must be 1 to 64 ASCII letters, digits, `.`, `_`, `-` or `@`, starting with a letter or digit",
            name.chars().take(80).collect::<String>()
        ))
    }
}

/// First certificate of a PEM text, as DER.
pub fn pem_to_der(pem: &str) -> Option<Vec<u8>> {
    use base64::Engine;
    let start = pem.find("-----BEGIN CERTIFICATE-----")? + "-----BEGIN CERTIFICATE-----".len();
    let end = pem[start..].find("-----END CERTIFICATE-----")? + start;
    let body: String = pem[start..end]
        .chars()
        .filter(|c| !c.is_whitespace())
        .collect();
    base64::engine::general_purpose::STANDARD.decode(body).ok()
}

/// Reads role and name from a certificate the TLS layer already verified
/// against the fleet CA.
pub fn peer_from_cert(der: &[u8]) -> Option<Peer> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    let san = cert.subject_alternative_name().ok()??;
    san.value.general_names.iter().find_map(|gn| match gn {
        x509_parser::extensions::GeneralName::URI(uri) => {
            let rest = uri.strip_prefix(URI_PREFIX)?;
            let (role, name) = rest.split_once(':')?;
            Some(Peer {
                role: Role::parse(role)?,
                name: name.to_owned(),
                serial: serial_hex(cert.raw_serial()),
                issued_at: issued_at(
                    u64::try_from(cert.validity().not_before.timestamp()).unwrap_or(0),
                    u64::try_from(cert.validity().not_after.timestamp()).unwrap_or(0),
                ),
            })
        }
        _ => None,
    })
}

/// A serial number as `fleetcmd` shows and accepts it: lowercase hex of
/// its bytes without leading zero bytes.
pub fn serial_hex(raw: &[u8]) -> String {
    let start = raw.iter().position(|b| *b != 0).unwrap_or(raw.len());
    fleetcmd_core::join_token::hex(&raw[start..])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn certificate_names_are_plain_file_names() {
        for ok in [
            "alice",
            "gw-main",
            "a",
            "alice.smith@example.com",
            "0ps_2",
            &"a".repeat(64),
        ] {
            assert_eq!(check_cert_name(ok), Ok(()), "{ok}");
        }
        for bad in [
            "",
            "ca",
            "../evil",
            "/tmp/x",
            "a/b",
            ".hidden",
            "-rf",
            "..",
            "al ice",
            "a*",
            "a\nb",
            "ålice",
            "a\\b",
            &"a".repeat(65),
        ] {
            let err = check_cert_name(bad).expect_err(bad);
            assert!(err.starts_with("--name"), "{err}");
        }
    }

    #[test]
    fn an_enrolment_refuses_the_certificates_issued_before_it() {
        let enrolment = EnrolmentCert {
            serial: "0a1b".into(),
            issued_at: 1_000,
        };
        // (serial, issued_at, admitted)
        for (serial, issued_at, admitted) in [
            // The enrolment certificate itself.
            ("0a1b", 1_000, true),
            // A renewal, issued later.
            ("77", 1_001, true),
            ("77", 50_000, true),
            // The previous holder's certificates: earlier, or in the same
            // second (fail closed).
            ("77", 999, false),
            ("77", 0, false),
            ("77", 1_000, false),
            // A serial is compared whole.
            ("0a1", 1_000, false),
            ("", 1_000, false),
        ] {
            assert_eq!(
                enrolment.admits(serial, issued_at),
                admitted,
                "{serial} {issued_at}"
            );
        }
    }

    #[test]
    fn issued_certificate_ignores_what_the_csr_asks_for() {
        let dir = tempfile::tempdir().expect("tempdir");
        let ca = Ca::load_or_create(dir.path()).expect("ca");
        // A CSR asking to be a CA, named "admin", with a server-auth usage.
        let key = new_key().expect("key");
        let mut asked = CertificateParams::new(vec!["evil.example".to_string()]).expect("params");
        asked.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        asked.subject_alt_names.push(SanType::URI(
            "urn:fleetcmd:operator:admin".try_into().expect("uri"),
        ));
        let csr = asked.serialize_request(&key).expect("csr");
        let pem = ca
            .issue_from_csr(csr.der(), Role::Agent, "web-1", Duration::from_secs(60))
            .expect("issue");
        let der = pem_to_der(&pem).expect("der");
        assert_eq!(
            peer_from_cert(&der),
            Some(Peer {
                role: Role::Agent,
                name: "web-1".into(),
                serial: peer_from_cert(&der).expect("peer").serial,
                issued_at: peer_from_cert(&der).expect("peer").issued_at,
            })
        );
        let (_, cert) = x509_parser::parse_x509_certificate(&der).expect("parse");
        let bc = cert.basic_constraints().expect("ext").expect("present");
        assert!(!bc.value.ca, "issued certificate must not be a CA");
        let names: Vec<String> = cert
            .subject_alternative_name()
            .expect("ext")
            .expect("present")
            .value
            .general_names
            .iter()
            .map(|g| g.to_string())
            .collect();
        assert_eq!(names.len(), 1, "only the controller's SAN: {names:?}");
    }

    #[test]
    fn issue_time_is_read_back_from_any_lifetime() {
        let dir = tempfile::tempdir().expect("tempdir");
        let ca = Ca::load_or_create(dir.path()).expect("ca");
        for ttl in [60, 1199, 1200, 3600, 7 * 86400, 30 * 86400, 400 * 86400] {
            let before = now().unix_timestamp() as u64;
            let id = ca
                .issue_identity(Role::Operator, "alice", Duration::from_secs(ttl))
                .expect("issue");
            let after = now().unix_timestamp() as u64;
            let peer = peer_from_cert(&pem_to_der(&id.cert_pem).expect("der")).expect("peer");
            // Whole seconds in the certificate: at most one second early.
            assert!(
                peer.issued_at + 1 >= before && peer.issued_at <= after,
                "ttl {ttl}: issued_at {} not in {before}..={after}",
                peer.issued_at
            );
            assert_eq!(peer.serial.len() % 2, 0, "{}", peer.serial);
            assert!(!peer.serial.starts_with("00"), "{}", peer.serial);
        }
    }

    #[test]
    fn ca_is_reloaded_with_the_same_fingerprint() {
        let dir = tempfile::tempdir().expect("tempdir");
        let a = Ca::load_or_create(dir.path()).expect("create");
        let b = Ca::load_or_create(dir.path()).expect("load");
        assert_eq!(a.fingerprint(), b.fingerprint());
        let mode = std::os::unix::fs::PermissionsExt::mode(
            &std::fs::metadata(dir.path().join("ca.key"))
                .expect("meta")
                .permissions(),
        );
        assert_eq!(mode & 0o777, 0o600);
    }

    /// The OIDs of a certificate's key and of the signature over it.
    fn algorithms(pem: &str) -> (String, String) {
        let der = pem_to_der(pem).expect("der");
        let (_, cert) = x509_parser::parse_x509_certificate(&der).expect("parse");
        (
            cert.public_key().algorithm.algorithm.to_id_string(),
            cert.signature_algorithm.algorithm.to_id_string(),
        )
    }

    const EC_PUBLIC_KEY: &str = "1.2.840.10045.2.1";
    const ECDSA_SHA256: &str = "1.2.840.10045.4.3.2";

    #[test]
    fn every_tls_identity_of_a_new_fleet_is_p256_and_signing_keys_are_ed25519() {
        let dir = tempfile::tempdir().expect("tempdir");
        let ca = Ca::load_or_create(dir.path()).expect("ca");
        let want = (EC_PUBLIC_KEY.to_owned(), ECDSA_SHA256.to_owned());
        assert_eq!(algorithms(ca.cert_pem()), want, "CA");
        let server = ca.issue_server(&["ctl.example".into()]).expect("server");
        assert_eq!(algorithms(&server.cert_pem), want, "server certificate");
        for role in [Role::Operator, Role::Gateway] {
            let id = ca
                .issue_identity(role, "alice", Duration::from_secs(60))
                .expect("issue");
            assert_eq!(algorithms(&id.cert_pem), want, "{role}");
            assert!(
                fleetcmd_core::crypto::SigningKey::from_pkcs8_pem(id.key_pem.expose()).is_err(),
                "{role}: a TLS key is not an Ed25519 key"
            );
        }
        let agent_key = new_key().expect("key");
        let csr = CertificateParams::new(Vec::<String>::new())
            .and_then(|p| p.serialize_request(&agent_key))
            .expect("csr");
        let agent = ca
            .issue_from_csr(csr.der(), Role::Agent, "web-1", Duration::from_secs(60))
            .expect("agent");
        assert_eq!(algorithms(&agent), want, "agent");
        let signing = new_signing_key_pem().expect("signing key");
        let key = fleetcmd_core::crypto::SigningKey::from_pkcs8_pem(signing.expose())
            .expect("an Ed25519 signing key");
        assert!(key.public_key().to_string().starts_with("ed25519:"));
    }
}
