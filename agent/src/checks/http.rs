//! `http`: GET a URL; the status must be one of `expect_status` (200-399 by
//! default; redirects are not followed, so a 3xx is the answer), and the
//! body must contain `body_contains` and match `body_regex` when given.
//! TLS is verified: against the public roots (webpki-roots), or only against
//! the CAs in `ca_file` for a private CA. Perfdata: `time` and `size`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use fleetcmd_core::nagios::CheckState;

use super::config::HttpCheck;
use super::{Outcome, error_chain, humantime, perf};

/// Body bytes read for matching and `size`; the rest is not read.
const MAX_BODY: usize = 1024 * 1024;

#[derive(Debug)]
pub(super) struct Probe {
    client: reqwest::Client,
    check: HttpCheck,
}

impl Probe {
    /// Builds the client once per check (connection pool, TLS config).
    pub fn new(check: &HttpCheck, timeout: Duration) -> Result<Probe, String> {
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
            None => rustls::RootCertStore {
                roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
            },
        };
        let tls = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("tls: {e}"))?
        .with_root_certificates(roots)
        .with_no_client_auth();
        let client = reqwest::Client::builder()
            .use_preconfigured_tls(tls)
            .timeout(timeout)
            .redirect(reqwest::redirect::Policy::none())
            .user_agent(concat!(
                "fleetcmd-agent/",
                env!("CARGO_PKG_VERSION"),
                " (check)"
            ))
            .build()
            .map_err(|e| format!("http client: {}", error_chain(&e)))?;
        Ok(Probe {
            client,
            check: check.clone(),
        })
    }

    pub async fn run(&self, timeout: Duration) -> Outcome {
        let started = Instant::now();
        let url = &self.check.url;
        let failed = |e: reqwest::Error| {
            let reason = if e.is_timeout() {
                format!("timed out after {}", humantime(timeout))
            } else {
                error_chain(&e)
            };
            Outcome::new(
                CheckState::Critical,
                format!("HTTP CRITICAL - {url}: {reason}"),
            )
        };
        let mut response = match self.client.get(url.clone()).send().await {
            Ok(r) => r,
            Err(e) => return failed(e),
        };
        let status = response.status();
        let mut body = Vec::new();
        let mut truncated = false;
        loop {
            match response.chunk().await {
                Ok(Some(chunk)) => {
                    let room = MAX_BODY - body.len();
                    body.extend_from_slice(&chunk[..chunk.len().min(room)]);
                    if chunk.len() > room {
                        truncated = true;
                        break;
                    }
                }
                Ok(None) => break,
                Err(e) => return failed(e),
            }
        }
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
