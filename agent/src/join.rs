//! Joining the fleet (invariant 3 in ARCHITECTURE.md): the token pins the CA and the policy
//! roots, so nothing is trusted on first use. A first TLS handshake only
//! fetches the controller's chain and keeps the certificate whose SHA-256 is
//! the pin; the token's secret then travels over a second connection that
//! verifies the controller against that CA. The private key is generated
//! here and never leaves the host.

use std::sync::{Arc, Mutex};

use base64::Engine;
use fleetcmd_core::crypto::{PublicKey, sha256};
use fleetcmd_core::join_token::{JoinToken, roots_pin};
use fleetcmd_proto::v1 as pb;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};

use crate::state::{Identity, StateDir, StateError, write_atomic};

#[derive(Debug, thiserror::Error)]
pub enum JoinError {
    /// The token's own message names it ("join token must …"); a prefix
    /// here would say it twice, and `{:#}` would add the source a third time.
    #[error(transparent)]
    Token(#[from] fleetcmd_core::join_token::TokenError),
    #[error("join token expired")]
    Expired,
    #[error("controller {0}: {1}")]
    Connect(String, String),
    #[error(
        "controller {0} does not present the CA pinned by the token (wrong controller, or a token for another fleet)"
    )]
    PinMismatch(String),
    #[error("controller refused the join: {0}")]
    Refused(String),
    #[error("controller answered with policy roots that do not match the token's pin")]
    RootsMismatch,
    #[error("{0}")]
    Key(String),
    #[error(transparent)]
    State(#[from] StateError),
    #[error(transparent)]
    Url(#[from] fleetcmd_proto::channel::ChannelError),
}

/// Captures the certificate in the presented chain that matches the pin.
#[derive(Debug)]
struct PinProbe {
    pin: [u8; 32],
    found: Mutex<Option<Vec<u8>>>,
    provider: Arc<rustls::crypto::CryptoProvider>,
}

impl ServerCertVerifier for PinProbe {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        for c in intermediates.iter().chain(std::iter::once(end_entity)) {
            if sha256(c.as_ref()) == self.pin {
                *self.found.lock().unwrap_or_else(|p| p.into_inner()) = Some(c.to_vec());
                // Nothing is sent on this connection; it is closed at once.
                return Ok(ServerCertVerified::assertion());
            }
        }
        Err(rustls::Error::General(
            "no certificate in the chain matches the pinned CA".into(),
        ))
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

fn der_to_pem(der: &[u8]) -> String {
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    let mut pem = String::from("-----BEGIN CERTIFICATE-----\n");
    for chunk in b64.as_bytes().chunks(64) {
        pem.push_str(std::str::from_utf8(chunk).expect("base64 is ASCII"));
        pem.push('\n');
    }
    pem.push_str("-----END CERTIFICATE-----\n");
    pem
}

/// Fetches the CA certificate matching `pin` from the controller's TLS chain.
async fn fetch_pinned_ca(url: &str, pin: [u8; 32]) -> Result<String, JoinError> {
    let uri: tonic::transport::Uri = url
        .parse()
        .map_err(|e| JoinError::Connect(url.into(), format!("{e}")))?;
    let host = uri
        .host()
        .ok_or_else(|| JoinError::Connect(url.into(), "no host".into()))?
        .trim_matches(['[', ']'])
        .to_owned();
    let port = uri.port_u16().unwrap_or(7443);
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let probe = Arc::new(PinProbe {
        pin,
        found: Mutex::new(None),
        provider: provider.clone(),
    });
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| JoinError::Connect(url.into(), e.to_string()))?
        .dangerous()
        .with_custom_certificate_verifier(probe.clone())
        .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let server_name = ServerName::try_from(host.clone())
        .map_err(|e| JoinError::Connect(url.into(), e.to_string()))?;
    let io = async {
        let tcp = tokio::net::TcpStream::connect((host.as_str(), port)).await?;
        let _tls = connector.connect(server_name, tcp).await?;
        Ok::<_, std::io::Error>(())
    };
    let res = tokio::time::timeout(std::time::Duration::from_secs(10), io).await;
    let found = probe.found.lock().unwrap_or_else(|p| p.into_inner()).take();
    match (found, res) {
        (Some(der), _) => Ok(der_to_pem(&der)),
        (None, Err(_)) => Err(JoinError::Connect(
            url.into(),
            "TLS handshake timed out".into(),
        )),
        (None, Ok(Err(e))) if !e.to_string().contains("pinned CA") => {
            Err(JoinError::Connect(url.into(), e.to_string()))
        }
        (None, _) => Err(JoinError::PinMismatch(url.into())),
    }
}

/// What `join` needs.
#[derive(Debug, Clone)]
pub struct JoinOptions {
    pub controller: String,
    pub token: String,
    /// Name to ask for (the token's name wins); defaults to the host name.
    pub name: String,
    pub state_dir: std::path::PathBuf,
}

/// Joins through the first of `controllers` that can be reached (`join
/// --controller` given once per controller of the fleet): a controller
/// that cannot be connected to is skipped, any other failure (a refused
/// token, a pin mismatch) ends the join.
pub async fn join_any(
    opts: &JoinOptions,
    controllers: &crate::controllers::Controllers,
    now: u64,
) -> Result<Identity, JoinError> {
    let mut last = None;
    for url in controllers.urls() {
        let opts = JoinOptions {
            controller: url.clone(),
            ..opts.clone()
        };
        match join(&opts, now).await {
            Err(e @ JoinError::Connect(..)) => {
                tracing::warn!(controller = %url, error = %e, "controller unreachable; trying the next");
                last = Some(e);
            }
            done => return done,
        }
    }
    Err(last.expect("controllers is not empty, so the loop ran at least once"))
}

/// Joins the fleet and writes key, certificate, CA and pinned roots into the
/// state directory.
pub async fn join(opts: &JoinOptions, now: u64) -> Result<Identity, JoinError> {
    let token = JoinToken::parse(opts.token.trim())?;
    if now > token.expires_at {
        return Err(JoinError::Expired);
    }
    let url = fleetcmd_proto::channel::controller_url(&opts.controller)?;
    let ca_pem = fetch_pinned_ca(&url, token.ca_sha256).await?;
    let key = crate::renewal::new_tls_key().map_err(|e| JoinError::Key(e.to_string()))?;
    let csr = rcgen::CertificateParams::new(Vec::<String>::new())
        .and_then(|p| p.serialize_request(&key))
        .map_err(|e| JoinError::Key(e.to_string()))?;
    let endpoint = fleetcmd_proto::channel::endpoint(&url, &ca_pem, None)?;
    let channel = fleetcmd_proto::channel::open(&endpoint)
        .await
        .map_err(|e| JoinError::Connect(url.clone(), e.to_string()))?;
    let mut client = pb::enrollment_client::EnrollmentClient::new(channel);
    let resp = client
        .join(pb::JoinRequest {
            token: opts.token.trim().to_owned(),
            csr_der: csr.der().to_vec(),
            name: opts.name.clone(),
        })
        .await
        .map_err(|s| JoinError::Refused(s.message().to_owned()))?
        .into_inner();
    let roots: Vec<PublicKey> = resp
        .policy_roots
        .iter()
        .map(|r| <[u8; 32]>::try_from(r.as_slice()).map(PublicKey::from_bytes))
        .collect::<Result<_, _>>()
        .map_err(|_| JoinError::RootsMismatch)?;
    if roots_pin(&roots) != token.roots_sha256 {
        return Err(JoinError::RootsMismatch);
    }
    let dir = StateDir::new(&opts.state_dir);
    dir.create()?;
    write_atomic(&dir.key(), key.serialize_pem().as_bytes(), 0o600)?;
    write_atomic(&dir.cert(), resp.cert_pem.as_bytes(), 0o644)?;
    write_atomic(&dir.ca(), ca_pem.as_bytes(), 0o644)?;
    let identity = Identity {
        agent_id: resp.agent_id,
        labels: resp.labels.into_iter().collect(),
        policy_roots: roots.iter().map(|k| k.to_string()).collect(),
        policy_threshold: (resp.policy_threshold as usize).max(1),
    };
    dir.save_identity(&identity)?;
    tracing::info!(agent_id = %identity.agent_id, "joined the fleet");
    Ok(identity)
}
