//! `http`: GET a URL; the status must be one of `expect_status` (200-399 by
//! default; redirects are not followed, so a 3xx is the answer), and the
//! body must contain `body_contains` and match `body_regex` when given.
//! TLS is verified: against the host's CA bundle (the `ca-certificates`
//! file), or only against the CAs in `ca_file` for a private CA. Perfdata:
//! `time` and `size`.
//!
//! One HTTP/1.1 request on a fresh connection, with hyper's client
//! connection (already in the agent through tonic) rather than a full HTTP
//! client library: the agent's binary size is a target in BENCHMARKS.md, and a
//! check needs no pool, redirects, cookies or proxies.

use std::sync::Arc;
use std::time::{Duration, Instant};

use fleetcmd_core::error_chain::error_chain;
use fleetcmd_core::nagios::CheckState;
use http_body_util::{BodyExt, Empty};
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;
use rustls::pki_types::pem::PemObject as _;
use tokio::io::{AsyncRead, AsyncWrite};

use super::config::HttpCheck;
use super::{Outcome, humantime, perf};

/// Body bytes read for matching and `size`; the rest is not read.
const MAX_BODY: usize = 1024 * 1024;
/// Where distributions keep the system's trusted CAs, first found wins.
const CA_BUNDLES: [&str; 3] = [
    "/etc/ssl/certs/ca-certificates.crt",
    "/etc/pki/tls/certs/ca-bundle.crt",
    "/etc/ssl/cert.pem",
];
const USER_AGENT: &str = concat!("fleetcmd-agent/", env!("CARGO_PKG_VERSION"), " (check)");

pub(super) struct Probe {
    /// For https URLs.
    tls: Option<tokio_rustls::TlsConnector>,
    check: HttpCheck,
}

impl std::fmt::Debug for Probe {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Probe")
            .field("url", &self.check.url)
            .field("tls", &self.tls.is_some())
            .finish()
    }
}

/// The system CA bundle, for https checks without a `ca_file`.
fn system_roots() -> Result<rustls::RootCertStore, String> {
    let path = CA_BUNDLES
        .iter()
        .find(|p| std::path::Path::new(p).exists())
        .ok_or_else(|| {
            format!(
                "no system CA bundle ({}); install ca-certificates or set ca_file",
                CA_BUNDLES.join(", ")
            )
        })?;
    let mut roots = rustls::RootCertStore::empty();
    let certs = rustls::pki_types::CertificateDer::pem_file_iter(path)
        .map_err(|e| format!("{path}: {e}"))?;
    for cert in certs.flatten() {
        // Bundles carry the odd certificate rustls cannot use; skip those.
        let _ = roots.add(cert);
    }
    if roots.is_empty() {
        return Err(format!("{path}: no usable CA certificate"));
    }
    Ok(roots)
}

impl Probe {
    /// Builds the TLS config once per check.
    pub fn new(check: &HttpCheck, _timeout: Duration) -> Result<Probe, String> {
        if check.url.scheme_str() != Some("https") {
            return Ok(Probe {
                tls: None,
                check: check.clone(),
            });
        }
        let roots = match &check.ca_certs {
            Some(certs) => {
                let mut roots = rustls::RootCertStore::empty();
                for cert in certs {
                    roots.add(cert.clone()).map_err(|e| {
                        format!(
                            "ca_file {}: {e}",
                            check
                                .ca_file
                                .as_deref()
                                .unwrap_or(std::path::Path::new(""))
                                .display()
                        )
                    })?;
                }
                roots
            }
            None => system_roots()?,
        };
        let mut tls = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("tls: {e}"))?
        .with_root_certificates(roots)
        .with_no_client_auth();
        tls.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(Probe {
            tls: Some(tokio_rustls::TlsConnector::from(Arc::new(tls))),
            check: check.clone(),
        })
    }

    /// Connects, sends the GET and reads the status and up to `MAX_BODY`
    /// bytes of the body: (status, body, truncated).
    async fn fetch(&self) -> Result<(hyper::StatusCode, Vec<u8>, bool), String> {
        let uri = &self.check.url;
        let authority = uri
            .authority()
            .ok_or_else(|| "the url has no host".to_string())?;
        let host = authority
            .host()
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_string();
        let port = authority
            .port_u16()
            .unwrap_or(if self.tls.is_some() { 443 } else { 80 });
        let path = uri.path_and_query().map_or("/", |p| p.as_str());
        let request = hyper::Request::get(path)
            .header(hyper::header::HOST, authority.as_str())
            .header(hyper::header::USER_AGENT, USER_AGENT)
            .header(hyper::header::ACCEPT, "*/*")
            .body(Empty::<Bytes>::new())
            .map_err(|e| format!("request: {e}"))?;
        let tcp = tokio::net::TcpStream::connect((host.as_str(), port))
            .await
            .map_err(|e| format!("connecting to {host}:{port}: {e}"))?;
        let _ = tcp.set_nodelay(true);
        match &self.tls {
            None => exchange(tcp, request).await,
            Some(tls) => {
                let name = rustls::pki_types::ServerName::try_from(host.clone())
                    .map_err(|e| format!("{host}: {e}"))?;
                let stream = tls
                    .connect(name, tcp)
                    .await
                    .map_err(|e| format!("TLS with {host}: {}", error_chain(&e)))?;
                exchange(stream, request).await
            }
        }
    }

    pub async fn run(&self, timeout: Duration) -> Outcome {
        let started = Instant::now();
        let url = &self.check.url;
        let (status, body, truncated) = match tokio::time::timeout(timeout, self.fetch()).await {
            Ok(Ok(r)) => r,
            Ok(Err(reason)) => {
                return Outcome::new(
                    CheckState::Critical,
                    format!("HTTP CRITICAL - {url}: {reason}"),
                );
            }
            Err(_) => {
                return Outcome::new(
                    CheckState::Critical,
                    format!(
                        "HTTP CRITICAL - {url}: timed out after {}",
                        humantime(timeout)
                    ),
                );
            }
        };
        let took = started.elapsed().as_secs_f64();
        let text = String::from_utf8_lossy(&body);
        let code = status.as_u16();
        let mut problems = Vec::new();
        if !self
            .check
            .expect_status
            .iter()
            .any(|(a, b)| (*a..=*b).contains(&code))
        {
            problems.push(format!(
                "status {status}, expected {}",
                expected(&self.check.expect_status)
            ));
        }
        if let Some(needle) = &self.check.body_contains
            && !text.contains(needle.as_str())
        {
            problems.push(format!("body does not contain {needle:?}"));
        }
        if let Some(re) = &self.check.body_regex
            && !re.is_match(&text)
        {
            problems.push(format!("body does not match /{}/", re.as_str()));
        }
        let size = if truncated {
            format!("more than {} bytes", body.len())
        } else {
            format!("{} bytes", body.len())
        };
        let mut out = if problems.is_empty() {
            Outcome::new(
                CheckState::Ok,
                format!("HTTP OK - {status} - {size} in {took:.3} s"),
            )
        } else {
            Outcome::new(
                CheckState::Critical,
                format!(
                    "HTTP CRITICAL - {}; {size} in {took:.3} s",
                    problems.join("; ")
                ),
            )
        };
        out.perfdata = vec![
            perf(
                "time",
                took,
                "s",
                "",
                "",
                Some(0.0),
                Some(timeout.as_secs_f64()),
            ),
            perf("size", body.len() as f64, "B", "", "", Some(0.0), None),
        ];
        out
    }
}

fn expected(ranges: &[(u16, u16)]) -> String {
    ranges
        .iter()
        .map(|(a, b)| {
            if a == b {
                a.to_string()
            } else {
                format!("{a}-{b}")
            }
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// One HTTP/1.1 exchange on `io`; the connection ends with the call.
async fn exchange<S>(
    io: S,
    request: hyper::Request<Empty<Bytes>>,
) -> Result<(hyper::StatusCode, Vec<u8>, bool), String>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io))
        .await
        .map_err(|e| error_chain(&e))?;
    // Drives the connection; aborted when this exchange is done or dropped
    // (timeout), so nothing outlives the check.
    struct AbortOnDrop(tokio::task::JoinHandle<()>);
    impl Drop for AbortOnDrop {
        fn drop(&mut self) {
            self.0.abort();
        }
    }
    let _conn = AbortOnDrop(tokio::spawn(async move {
        let _ = conn.await;
    }));
    let response = sender
        .send_request(request)
        .await
        .map_err(|e| error_chain(&e))?;
    let status = response.status();
    let mut body = response.into_body();
    let mut bytes = Vec::new();
    let mut truncated = false;
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| format!("reading the body: {}", error_chain(&e)))?;
        if let Some(chunk) = frame.data_ref() {
            let room = MAX_BODY - bytes.len();
            bytes.extend_from_slice(&chunk[..chunk.len().min(room)]);
            if chunk.len() > room {
                truncated = true;
                break;
            }
        }
    }
    Ok((status, bytes, truncated))
}
