//! Building an mTLS channel to the controller, shared by the agent, the
//! gateway and the CLI so all three pin the fleet CA the same way.

use std::time::Duration;

use hyper_util::client::legacy::connect::HttpConnector;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

// How a client notices a controller that went away, cheapest first. An
// agent writes a heartbeat every 10 s (the default), so the kernel does most
// of the work and the controller answers nothing extra:
// - `TCP_USER_TIMEOUT` (30 s): data sent (a heartbeat, a result, a request)
//   and not acknowledged within 30 s closes the connection — a crashed or
//   powered-off controller host, a dropped route, a NAT that forgot us.
// - TCP keepalive after 30 s without traffic either way (a client that sends
//   nothing, such as a CLI watching a quiet job), probes every 10 s; the
//   user timeout above also bounds how long unanswered probes last.
// - An HTTP/2 PING only after 5 minutes with nothing received from the
//   controller: a controller whose kernel still acknowledges but whose
//   process hangs. (It was every 30 s: at 10 000 agents, 333 PINGs a second
//   for the controller to answer, about 0.5 % of its core when idle.)
pub const TCP_USER_TIMEOUT: Duration = Duration::from_secs(30);
pub const TCP_KEEPALIVE: Duration = Duration::from_secs(30);
pub const TCP_KEEPALIVE_INTERVAL: Duration = Duration::from_secs(10);
pub const HTTP2_PING_AFTER: Duration = Duration::from_secs(300);
pub const HTTP2_PING_TIMEOUT: Duration = Duration::from_secs(20);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

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
            e.connect_timeout(CONNECT_TIMEOUT)
                .http2_keep_alive_interval(HTTP2_PING_AFTER)
                .keep_alive_timeout(HTTP2_PING_TIMEOUT)
        })
}

/// The TCP side of every client connection: no Nagle delay, keepalive and
/// the user timeout above. (tonic's own connector cannot set the latter.)
pub fn tcp_connector() -> HttpConnector {
    let mut tcp = HttpConnector::new();
    // The scheme is https; TLS is layered on by tonic.
    tcp.enforce_http(false);
    tcp.set_nodelay(true);
    tcp.set_connect_timeout(Some(CONNECT_TIMEOUT));
    tcp.set_keepalive(Some(TCP_KEEPALIVE));
    tcp.set_keepalive_interval(Some(TCP_KEEPALIVE_INTERVAL));
    tcp.set_tcp_user_timeout(Some(TCP_USER_TIMEOUT));
    tcp
}

/// Opens a channel on an endpoint from [`endpoint`] over [`tcp_connector`].
pub async fn open(ep: &Endpoint) -> Result<Channel, tonic::transport::Error> {
    ep.connect_with_connector(tcp_connector()).await
}

/// Connects with a client certificate.
pub async fn connect(url: &str, tls: &ClientTls) -> Result<Channel, ChannelError> {
    let ep = endpoint(url, &tls.ca_pem, Some((&tls.cert_pem, &tls.key_pem)))?;
    open(&ep).await.map_err(|source| ChannelError::Connect {
        url: url.to_owned(),
        source,
    })
}
