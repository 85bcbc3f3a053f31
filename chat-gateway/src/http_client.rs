//! The one way the gateway builds an outgoing HTTP client: our rustls
//! config (ring provider, Mozilla roots), a user agent naming the gateway,
//! timeouts always set, and redirects refused unless a platform's API needs
//! them (a redirect is otherwise an error, never a silent re-POST
//! elsewhere).

use std::time::Duration;

use crate::adapters::AdapterError;

/// How an outgoing client behaves.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ClientOptions {
    /// Whole request, connect to last byte.
    pub timeout: Duration,
    /// Just the connection (default: `timeout`).
    pub connect_timeout: Option<Duration>,
    /// Follow up to 10 redirects (chat platform APIs); refuse them otherwise.
    pub follow_redirects: bool,
}

impl ClientOptions {
    /// `timeout`, no redirects.
    pub fn new(timeout: Duration) -> ClientOptions {
        ClientOptions {
            timeout,
            connect_timeout: None,
            follow_redirects: false,
        }
    }
}

/// A client for `what` (named in errors).
pub fn client(what: &str, o: ClientOptions) -> Result<reqwest::Client, AdapterError> {
    let tls = crate::adapters::public_tls_config(what)?;
    let mut b = reqwest::Client::builder()
        .use_preconfigured_tls(tls)
        .timeout(o.timeout)
        .user_agent(concat!("fleetcmd-gateway/", env!("CARGO_PKG_VERSION")));
    if let Some(c) = o.connect_timeout {
        b = b.connect_timeout(c);
    }
    if !o.follow_redirects {
        b = b.redirect(reqwest::redirect::Policy::none());
    }
    b.build().map_err(|e| AdapterError::Platform {
        what: what.to_string(),
        message: e.to_string(),
    })
}

/// A client with `timeout` that refuses redirects (webhooks, integrations).
pub fn http_client(timeout: Duration) -> Result<reqwest::Client, AdapterError> {
    client("http client", ClientOptions::new(timeout))
}
