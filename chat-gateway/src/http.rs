//! The gateway's one HTTP listener (default `127.0.0.1:7081`): chat
//! webhooks (Slack Events API, Mattermost slash commands and buttons,
//! Campfire, generic webhooks, `/notify`, `/alertmanager`) mounted by their
//! adapters, plus `/healthz`. Each adapter verifies its own signatures.
//!
//! Nobody is authenticated before a request is read, so the listener bounds
//! what an unauthenticated client can hold ([`limits`]): the time to send
//! headers (also how long an idle keep-alive connection stays open), the
//! time to send a body, the body's size, and the connections served at
//! once. Idle or trickling connections are cut, so they cannot starve the
//! signed webhooks and `/healthz`.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::{DefaultBodyLimit, Request, State};
use axum::middleware::Next;
use axum::response::Response;
use axum::routing::get;
use futures_util::StreamExt;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::task::JoinSet;

/// Default listen address.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:7081";
/// Largest request body any webhook accepts (Slack and Mattermost payloads
/// are far smaller; adapters may cap lower).
pub const MAX_BODY_BYTES: usize = 1024 * 1024;

/// What one client may hold on the listener, in one place.
pub mod limits {
    use std::time::Duration;

    /// Time a client has to send a request's headers, counted from when
    /// the connection is accepted or the previous response was written:
    /// a slowloris (headers trickled) is cut after it, and so is an idle
    /// keep-alive connection. Chat platforms send a request in one go.
    pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
    /// Time a client has to send a whole body (at most
    /// [`super::MAX_BODY_BYTES`]) once its headers are in; after it, the
    /// body ends with an error and the request is refused.
    pub const BODY_READ_TIMEOUT: Duration = Duration::from_secs(10);
    /// Connections served at once. Beyond it, new connections wait in the
    /// kernel's backlog until one closes, which an idle one does within
    /// [`HEADER_READ_TIMEOUT`]; it keeps file descriptors for the chat
    /// connections (systemd unit: `LimitNOFILE=16384`).
    pub const MAX_CONNECTIONS: usize = 1024;
    /// On shutdown, how long connections have to finish their request.
    pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);
    /// Pause after a failed accept (out of file descriptors), so the loop
    /// does not spin while connections close.
    pub const ACCEPT_ERROR_PAUSE: Duration = Duration::from_millis(50);
}

/// The listener's limits; [`Limits::DEFAULT`] is what the gateway uses
/// (tests shorten the timeouts).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    pub header_read_timeout: Duration,
    pub body_read_timeout: Duration,
    pub max_connections: usize,
}

impl Limits {
    pub const DEFAULT: Limits = Limits {
        header_read_timeout: limits::HEADER_READ_TIMEOUT,
        body_read_timeout: limits::BODY_READ_TIMEOUT,
        max_connections: limits::MAX_CONNECTIONS,
    };
}

/// `routes` plus `/healthz`, with the body cap and the body read timeout.
pub fn app(routes: axum::Router) -> axum::Router {
    app_with(routes, Limits::DEFAULT)
}

/// [`app`] with `limits`.
pub fn app_with(routes: axum::Router, limits: Limits) -> axum::Router {
    routes
        .route("/healthz", get(|| async { "ok\n" }))
        .layer(axum::middleware::from_fn_with_state(
            limits.body_read_timeout,
            read_body_in_time,
        ))
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
}

/// Gives the whole body a deadline before any handler runs: a chunk that
/// arrives after it ends the body with an error, which the handler answers
/// as an unreadable body, so no handler waits on a trickling client.
async fn read_body_in_time(State(within): State<Duration>, req: Request, next: Next) -> Response {
    let deadline = tokio::time::Instant::now() + within;
    let (parts, body) = req.into_parts();
    let chunks = body.into_data_stream();
    let timed = futures_util::stream::unfold(Some(chunks), move |chunks| async move {
        let mut chunks = chunks?;
        match tokio::time::timeout_at(deadline, chunks.next()).await {
            Ok(Some(item)) => Some((item, Some(chunks))),
            Ok(None) => None,
            Err(_) => {
                tracing::warn!("http: request body not received in time");
                let late = std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    format!("request body not received within {} ms", within.as_millis()),
                );
                Some((Err(axum::Error::new(late)), None))
            }
        }
    });
    next.run(Request::from_parts(parts, Body::from_stream(timed)))
        .await
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

/// Serves `routes` on `listener` until `shutdown` completes, within
/// [`Limits::DEFAULT`]; then lets open requests finish (at most
/// [`limits::SHUTDOWN_GRACE`]).
pub async fn serve(
    listener: tokio::net::TcpListener,
    routes: axum::Router,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    serve_with(listener, routes, Limits::DEFAULT, shutdown).await
}

/// [`serve`] within `limits`.
pub async fn serve_with(
    listener: tokio::net::TcpListener,
    routes: axum::Router,
    limits: Limits,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let app = app_with(routes, limits);
    let slots = Arc::new(tokio::sync::Semaphore::new(limits.max_connections));
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let mut conns: JoinSet<()> = JoinSet::new();
    tokio::pin!(shutdown);
    loop {
        while conns.try_join_next().is_some() {}
        let permit = tokio::select! {
            p = slots.clone().acquire_owned() => p.expect("the connection semaphore is never closed"),
            () = &mut shutdown => break,
        };
        let stream = tokio::select! {
            r = listener.accept() => match r {
                Ok((stream, _)) => stream,
                Err(e) => {
                    tracing::warn!(error = %e, "http: accept failed");
                    tokio::time::sleep(self::limits::ACCEPT_ERROR_PAUSE).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        let service = TowerToHyperService::new(app.clone());
        let mut stop = stop_rx.clone();
        conns.spawn(async move {
            let _permit = permit;
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(limits.header_read_timeout)
                .serve_connection(TokioIo::new(stream), service);
            tokio::pin!(conn);
            tokio::select! {
                r = conn.as_mut() => {
                    if let Err(e) = r {
                        tracing::debug!(error = %e, "http: connection ended");
                    }
                }
                () = async { let _ = stop.wait_for(|s| *s).await; } => {
                    conn.as_mut().graceful_shutdown();
                    let _ = conn.await;
                }
            }
        });
    }
    let _ = stop_tx.send(true);
    let drain = async { while conns.join_next().await.is_some() {} };
    if tokio::time::timeout(self::limits::SHUTDOWN_GRACE, drain)
        .await
        .is_err()
    {
        conns.abort_all();
    }
    Ok(())
}
