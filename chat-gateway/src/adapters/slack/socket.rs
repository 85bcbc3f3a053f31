//! Socket Mode: `apps.connections.open` (app token) gives a one-time
//! WebSocket URL; Slack sends `hello`, then envelopes (`events_api`,
//! `slash_commands`, `interactive`), each acknowledged at once with its
//! `envelope_id` before anything else is done with it. On a `disconnect`
//! message (`refresh_requested`, `warning`, `link_disabled`) or when the
//! socket drops, a new connection is opened (a new `apps.connections.open`),
//! with jittered exponential backoff after failures.

use std::sync::Arc;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio::net::TcpStream;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::{Connector, MaybeTlsStream, WebSocketStream};

use super::api::{Api, platform, tls_config};
use super::http::command_ack;
use super::inbound::{Inbound, Skip};
use crate::adapters::AdapterError;

pub type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// Largest WebSocket message accepted from Slack.
const MAX_MESSAGE_BYTES: usize = 1 << 20;
/// How long the WebSocket handshake may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(15);
/// Our own pings, so a dead link is noticed.
const PING_EVERY: Duration = Duration::from_secs(30);
/// No frame at all (not even a pong) for this long: reconnect.
const IDLE_LIMIT: Duration = Duration::from_secs(90);
/// Backoff after failures: 1 s × 1.6ⁿ, ±20 %, capped (the shape of ARCHITECTURE.md invariant 1).
const BACKOFF_BASE: Duration = Duration::from_secs(1);
const BACKOFF_CAP: Duration = Duration::from_secs(60);

/// Delay before reconnect attempt `failures` (1-based), jittered ±20 %.
pub fn backoff(failures: u32) -> Duration {
    crate::backoff::Backoff {
        first: BACKOFF_BASE,
        max: BACKOFF_CAP,
        ..crate::backoff::Backoff::RECONNECT
    }
    .delay(failures.saturating_sub(1))
}

fn acceptable_ws_url(url: &str) -> Result<(), String> {
    if url.starts_with("wss://") && url.len() > 6 {
        return Ok(());
    }
    match url.strip_prefix("ws://") {
        Some(rest) => super::config::acceptable_base(&format!("http://{rest}"))
            .map_err(|_| "must be wss:// (plain ws only to a loopback address)".to_string()),
        None => Err("must start with wss://".to_string()),
    }
}

/// Opens one Socket Mode connection.
pub async fn open(api: &Api) -> Result<Ws, AdapterError> {
    const WHAT: &str = "slack socket mode";
    let url = api.connections_open().await?;
    acceptable_ws_url(&url).map_err(|m| platform(WHAT, format!("connection url {m}")))?;
    let config = WebSocketConfig::default()
        .max_message_size(Some(MAX_MESSAGE_BYTES))
        .max_frame_size(Some(MAX_MESSAGE_BYTES));
    let connector = Connector::Rustls(Arc::new(tls_config()?));
    let connect = tokio_tungstenite::connect_async_tls_with_config(
        url.as_str(),
        Some(config),
        true,
        Some(connector),
    );
    // The URL carries a one-time ticket: it is not logged.
    match tokio::time::timeout(CONNECT_TIMEOUT, connect).await {
        Ok(Ok((ws, _))) => Ok(ws),
        Ok(Err(e)) => Err(platform(WHAT, format!("websocket handshake failed: {e}"))),
        Err(_) => Err(platform(WHAT, "websocket handshake timed out")),
    }
}

/// How a connection ended.
enum End {
    /// Slack asked us to reconnect (`disconnect` message).
    Disconnect(String),
    /// The link failed or closed.
    Lost(String),
}

/// Runs Socket Mode forever, starting with the already open `first`
/// connection. The adapter owns the task and aborts it when dropped.
pub async fn run(api: Arc<Api>, inbound: Arc<Inbound>, first: Ws) {
    let mut next = Some(first);
    let mut failures: u32 = 0;
    loop {
        let ws = match next.take() {
            Some(ws) => ws,
            None => match open(&api).await {
                Ok(ws) => ws,
                Err(e) => {
                    failures = failures.saturating_add(1);
                    let wait = backoff(failures);
                    tracing::warn!(error = %e, retry_in_ms = wait.as_millis() as u64, "slack: could not open a Socket Mode connection");
                    tokio::time::sleep(wait).await;
                    continue;
                }
            },
        };
        let (end, hello) = session(ws, &inbound).await;
        if hello {
            failures = 0;
        }
        match end {
            End::Disconnect(reason) if hello && reason != "link_disabled" => {
                tracing::info!(
                    reason,
                    "slack: asked to reconnect; opening a new connection"
                );
            }
            End::Disconnect(reason) | End::Lost(reason) => {
                failures = failures.saturating_add(1);
                let wait = backoff(failures);
                tracing::warn!(
                    reason,
                    retry_in_ms = wait.as_millis() as u64,
                    "slack: Socket Mode connection ended"
                );
                tokio::time::sleep(wait).await;
            }
        }
    }
}

enum Step {
    Frame(Option<Result<Message, tokio_tungstenite::tungstenite::Error>>),
    Tick,
}

/// One connection, until it ends; also says whether `hello` was seen.
async fn session(mut ws: Ws, inbound: &Inbound) -> (End, bool) {
    let mut hello = false;
    let mut ping = tokio::time::interval_at(Instant::now() + PING_EVERY, PING_EVERY);
    let mut last_seen = Instant::now();
    loop {
        let step = tokio::select! {
            m = ws.next() => Step::Frame(m),
            _ = ping.tick() => Step::Tick,
        };
        let msg = match step {
            Step::Tick => {
                if last_seen.elapsed() > IDLE_LIMIT {
                    return (End::Lost("no traffic from Slack".to_string()), hello);
                }
                if let Err(e) = ws.send(Message::Ping(Vec::new().into())).await {
                    return (End::Lost(format!("ping failed: {e}")), hello);
                }
                continue;
            }
            Step::Frame(None) => return (End::Lost("socket closed".to_string()), hello),
            Step::Frame(Some(Err(e))) => return (End::Lost(format!("socket error: {e}")), hello),
            Step::Frame(Some(Ok(m))) => m,
        };
        last_seen = Instant::now();
        let text = match msg {
            Message::Text(t) => t,
            Message::Close(_) => return (End::Lost("closed by Slack".to_string()), hello),
            _ => continue,
        };
        let Ok(v) = serde_json::from_str::<Value>(text.as_str()) else {
            tracing::warn!(
                bytes = text.len(),
                "slack: malformed Socket Mode frame ignored"
            );
            continue;
        };
        let kind = v.get("type").and_then(Value::as_str).unwrap_or_default();
        if let Some(envelope) = v.get("envelope_id").and_then(Value::as_str) {
            // Ack first, before any routing: Slack retries after 3 s.
            let mut ack = json!({ "envelope_id": envelope });
            if kind == "slash_commands"
                && v.get("accepts_response_payload").and_then(Value::as_bool) == Some(true)
                && let Some(p) = v.get("payload")
            {
                ack["payload"] = command_ack(p);
            }
            if let Err(e) = ws.send(Message::text(ack.to_string())).await {
                return (End::Lost(format!("ack failed: {e}")), hello);
            }
            if let Err(skip) = inbound.first(format!("envelope:{envelope}")).await {
                tracing::debug!(envelope, reason = %skip, "slack: envelope not routed");
                continue;
            }
        }
        let empty = Value::Null;
        let payload = v.get("payload").unwrap_or(&empty);
        let result = match kind {
            "hello" => {
                hello = true;
                tracing::info!("slack: Socket Mode connected");
                Ok(())
            }
            "disconnect" => {
                let reason = v
                    .get("reason")
                    .and_then(Value::as_str)
                    .unwrap_or("unspecified")
                    .chars()
                    .take(64)
                    .collect();
                let _ = ws.close(None).await;
                return (End::Disconnect(reason), hello);
            }
            "events_api" => inbound.event_callback(payload).await,
            "slash_commands" => inbound.slash_command(payload).await,
            "interactive" => inbound.interaction(payload).await,
            _ => Err(Skip::Ignored("envelope type")),
        };
        if let Err(skip) = result {
            match skip {
                Skip::Refused(_) => tracing::warn!(kind, reason = %skip, "slack: not routed"),
                _ => tracing::debug!(kind, reason = %skip, "slack: not routed"),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_with_jitter_and_a_cap() {
        for _ in 0..20 {
            let d = backoff(1).as_secs_f64();
            assert!((0.8..=1.2).contains(&d), "{d}");
            let d = backoff(3).as_secs_f64();
            assert!((2.56 * 0.8..=2.56 * 1.2).contains(&d), "{d}");
            let d = backoff(100).as_secs_f64();
            assert!((48.0..=72.0).contains(&d), "{d}");
        }
    }

    #[test]
    fn socket_urls() {
        assert!(acceptable_ws_url("wss://wss-primary.slack.com/link/?ticket=1").is_ok());
        assert!(acceptable_ws_url("ws://127.0.0.1:9/link").is_ok());
        assert!(acceptable_ws_url("ws://evil.example.com/link").is_err());
        assert!(acceptable_ws_url("https://x").is_err());
    }
}
