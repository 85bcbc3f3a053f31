//! The gateway's one HTTP listener (default `127.0.0.1:7081`, DESIGN §1):
//! chat webhooks (Slack Events API, Mattermost slash commands and buttons,
//! Campfire, generic webhooks) mounted by their adapters, plus `/healthz`.
//! Request bodies are capped; each adapter verifies its own signatures.

use std::future::Future;
use std::net::SocketAddr;

use axum::extract::DefaultBodyLimit;
use axum::routing::get;

/// Default listen address.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:7081";
/// Largest request body any webhook accepts (Slack and Mattermost payloads
/// are far smaller; adapters may cap lower).
pub const MAX_BODY_BYTES: usize = 1024 * 1024;

/// `routes` plus `/healthz`, with the body cap.
pub fn app(routes: axum::Router) -> axum::Router {
    routes
        .route("/healthz", get(|| async { "ok\n" }))
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
}

/// Binds `addr`; the error names the address.
pub async fn bind(addr: SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
    tokio::net::TcpListener::bind(addr).await.map_err(|e| {
        std::io::Error::new(
            e.kind(),
            format!("binding the HTTP listener on {addr}: {e}"),
        )
    })
}

/// Serves `routes` on `listener` until `shutdown` completes.
pub async fn serve(
    listener: tokio::net::TcpListener,
    routes: axum::Router,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    axum::serve(listener, app(routes))
        .with_graceful_shutdown(shutdown)
        .await
}
