//! Building an mTLS channel to the controller, shared by the agent, the
//! gateway and the CLI so all three pin the fleet CA the same way.

use std::time::Duration;

use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

/// PEM material of a client identity issued by the fleet CA.
#[derive(Clone)]
pub struct ClientTls {
    pub ca_pem: String,
    pub cert_pem: String,
    pub key_pem: String,
}

impl std::fmt::Debug for ClientTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientTls")
            .field("key_pem", &"[redacted]")
            .finish_non_exhaustive()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ChannelError {
    #[error("controller address {url:?}: {reason}")]
    Url { url: String, reason: String },
    #[error("connecting to {url}: {source}")]
    Connect {
        url: String,
        source: tonic::transport::Error,
    },
}

/// Normalizes `host:port` to `https://host:port` and checks the scheme.
pub fn controller_url(url: &str) -> Result<String, ChannelError> {
    let url = url.trim();
    let full = if url.contains("://") {
        url.to_owned()
    } else {
        format!("https://{url}")
    };
    if !full.starts_with("https://") {
        return Err(ChannelError::Url {
            url: url.to_owned(),
            reason: "only https:// is supported (mTLS)".into(),
        });
    }
    Ok(full)
}

/// An endpoint with the fleet CA pinned and, when given, a client identity.
pub fn endpoint(
    url: &str,
    ca_pem: &str,
    identity: Option<(&str, &str)>,
) -> Result<Endpoint, ChannelError> {
    let url = controller_url(url)?;
    let mut tls = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(ca_pem));
    if let Some((cert, key)) = identity {
        tls = tls.identity(Identity::from_pem(cert, key));
    }
    Endpoint::from_shared(url.clone())
        .map_err(|e| ChannelError::Url {
            url: url.clone(),
            reason: e.to_string(),
        })?
        .tls_config(tls)
        .map_err(|e| ChannelError::Url {
            url: url.clone(),
            reason: e.to_string(),
        })
        .map(|e| {
            e.connect_timeout(Duration::from_secs(10))
                .tcp_nodelay(true)
                .http2_keep_alive_interval(Duration::from_secs(30))
                .keep_alive_timeout(Duration::from_secs(10))
        })
}

/// Connects with a client certificate.
pub async fn connect(url: &str, tls: &ClientTls) -> Result<Channel, ChannelError> {
    let ep = endpoint(url, &tls.ca_pem, Some((&tls.cert_pem, &tls.key_pem)))?;
    ep.connect().await.map_err(|source| ChannelError::Connect {
        url: url.to_owned(),
        source,
    })
}
