//! The WebSocket event stream (`/api/v4/websocket`): authenticate with an
//! `authentication_challenge`, follow `hello` and the event sequence
//! numbers, turn `posted` events into [`Incoming`] messages, keep the
//! connection alive with pings, and reconnect with jittered exponential
//! backoff (resuming the same connection where the server allows).

use std::collections::{HashSet, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use fleetcmd_core::crypto::Secret;
use fleetcmd_core::ids::Identity;
use futures_util::{SinkExt, StreamExt};
use serde::Deserialize;
use serde_json::{Value, json};
use tokio::sync::mpsc;
use tokio::time::{Instant, sleep, timeout};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::{Connector, connect_async_tls_with_config};

use crate::adapters::Incoming;
use crate::store::Refusal;

/// First reconnect delay; multiplied by 1.6 per failed attempt, ±20 %
/// jitter, capped (the backoff shape of ARCHITECTURE.md invariant 1).
pub const BACKOFF_BASE: Duration = Duration::from_secs(1);
pub const BACKOFF_MAX: Duration = Duration::from_secs(60);
/// A WebSocket ping this often…
const PING_EVERY: Duration = Duration::from_secs(30);
/// …and the connection is given up when nothing arrived for this long.
const READ_TIMEOUT: Duration = Duration::from_secs(75);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(15);
/// Largest event accepted (a post is at most 16383 runes plus props).
const MAX_MESSAGE_BYTES: usize = 4 << 20;
/// Post ids remembered to drop events replayed after a resume.
const SEEN_POSTS: usize = 512;

/// What the event loop needs.
pub(crate) struct WsCtx {
    pub base: String,
    pub token: Secret<String>,
    pub server: String,
    pub bot_id: String,
    pub bot_username: String,
    pub team_id: Option<String>,
    pub tls: Arc<rustls::ClientConfig>,
    /// The gateway's replay records: a post is routed once, also across
    /// restarts and among several gateways on one team (every gateway's
    /// WebSocket gets every post; `crate::claims`).
    pub replay: Arc<crate::store::ReplaySlot>,
}

/// State kept across reconnects.
#[derive(Default)]
struct Resume {
    connection_id: String,
    /// The sequence number expected next.
    next_seq: i64,
    seen: HashSet<String>,
    seen_order: VecDeque<String>,
}

impl Resume {
    /// Whether `post_id` is new (and remembers it).
    fn first_time(&mut self, post_id: &str) -> bool {
        if !self.seen.insert(post_id.to_string()) {
            return false;
        }
        self.seen_order.push_back(post_id.to_string());
        if self.seen_order.len() > SEEN_POSTS
            && let Some(old) = self.seen_order.pop_front()
        {
            self.seen.remove(&old);
        }
        true
    }
}

/// The delay before reconnect attempt `n` (0-based), with `unit` in [0, 1)
/// choosing the jitter.
pub fn backoff(n: u32, unit: f64) -> Duration {
    crate::backoff::Backoff {
        first: BACKOFF_BASE,
        max: BACKOFF_MAX,
        ..crate::backoff::Backoff::RECONNECT
    }
    .delay_with(n, unit)
}

/// Runs until the receiving half is gone.
pub(crate) async fn run(ctx: WsCtx, tx: mpsc::Sender<Incoming>) {
    let mut resume = Resume::default();
    let mut failures = 0u32;
    loop {
        match session(&ctx, &mut resume, &tx, &mut failures).await {
            Ok(()) => tracing::info!("mattermost websocket closed; reconnecting"),
            Err(e) => tracing::warn!(error = %e, "mattermost websocket failed; reconnecting"),
        }
        if tx.is_closed() {
            return;
        }
        let wait = backoff(failures, crate::backoff::random_unit());
        failures = failures.saturating_add(1);
        sleep(wait).await;
    }
}

fn ws_url(base: &str, resume: &Resume) -> String {
    let url = if let Some(rest) = base.strip_prefix("https://") {
        format!("wss://{rest}/api/v4/websocket")
    } else if let Some(rest) = base.strip_prefix("http://") {
        format!("ws://{rest}/api/v4/websocket")
    } else {
        format!("{base}/api/v4/websocket")
    };
    if resume.connection_id.is_empty() {
        url
    } else {
        format!(
            "{url}?connection_id={}&sequence_number={}",
            resume.connection_id, resume.next_seq
        )
    }
}

/// One connection, until it closes or fails.
async fn session(
    ctx: &WsCtx,
    resume: &mut Resume,
    tx: &mpsc::Sender<Incoming>,
    failures: &mut u32,
) -> Result<(), String> {
    let url = ws_url(&ctx.base, resume);
    let mut config = WebSocketConfig::default();
    config.max_message_size = Some(MAX_MESSAGE_BYTES);
    config.max_frame_size = Some(MAX_MESSAGE_BYTES);
    let (mut ws, _) = timeout(
        CONNECT_TIMEOUT,
        connect_async_tls_with_config(
            url.as_str(),
            Some(config),
            true,
            Some(Connector::Rustls(ctx.tls.clone())),
        ),
    )
    .await
    .map_err(|_| "connect timed out".to_string())?
    .map_err(|e| format!("connect: {e}"))?;
    let challenge = json!({
        "seq": 1,
        "action": "authentication_challenge",
        "data": { "token": ctx.token.expose() },
    });
    ws.send(Message::text(challenge.to_string()))
        .await
        .map_err(|e| format!("sending the authentication challenge: {e}"))?;

    let mut ping = tokio::time::interval_at(Instant::now() + PING_EVERY, PING_EVERY);
    let mut last_read = Instant::now();
    loop {
        let deadline = last_read + READ_TIMEOUT;
        let msg = tokio::select! {
            m = ws.next() => m,
            _ = ping.tick() => {
                ws.send(Message::Ping(Vec::new().into())).await.map_err(|e| format!("ping: {e}"))?;
                continue;
            }
            _ = tokio::time::sleep_until(deadline) => {
                return Err(format!("nothing received for {} s", READ_TIMEOUT.as_secs()));
            }
        };
        last_read = Instant::now();
        let text = match msg {
            None => return Ok(()),
            Some(Err(e)) => return Err(format!("read: {e}")),
            Some(Ok(Message::Text(t))) => t,
            Some(Ok(Message::Close(_))) => return Ok(()),
            Some(Ok(_)) => continue, // pings are answered by tungstenite; pongs and binary ignored
        };
        let v: Value = match serde_json::from_str(text.as_str()) {
            Ok(v) => v,
            Err(e) => {
                tracing::warn!(error = %e, "mattermost websocket: malformed JSON event ignored");
                continue;
            }
        };
        if let Some(reply_to) = v.get("seq_reply").and_then(Value::as_i64) {
            if reply_to == 1 && v.get("status").and_then(Value::as_str) != Some("OK") {
                let why = v
                    .pointer("/error/id")
                    .and_then(Value::as_str)
                    .unwrap_or("refused");
                return Err(format!("authentication failed: {why}"));
            }
            continue;
        }
        let Some(event) = v.get("event").and_then(Value::as_str) else {
            tracing::debug!("mattermost websocket: message without event ignored");
            continue;
        };
        let seq = v.get("seq").and_then(Value::as_i64).unwrap_or(-1);
        if event == "hello" {
            let id = v
                .pointer("/data/connection_id")
                .and_then(Value::as_str)
                .unwrap_or("");
            if !resume.connection_id.is_empty() && id != resume.connection_id {
                tracing::warn!(
                    "mattermost websocket: new connection; events sent while away are lost"
                );
                resume.next_seq = seq.max(0);
            } else if resume.connection_id.is_empty() {
                resume.next_seq = seq.max(0);
            }
            resume.connection_id = id.to_string();
            *failures = 0;
            tracing::info!(server = %ctx.server, "mattermost websocket connected");
        }
        if seq >= 0 {
            if seq < resume.next_seq {
                tracing::debug!(
                    seq,
                    expected = resume.next_seq,
                    "mattermost websocket: replayed event skipped"
                );
                continue;
            }
            if seq > resume.next_seq {
                tracing::warn!(
                    missed = seq - resume.next_seq,
                    "mattermost websocket: events were missed"
                );
            }
            resume.next_seq = seq + 1;
        }
        if event != "posted" {
            continue;
        }
        match posted(ctx, &v) {
            Ok(Some((post_id, msg))) => {
                if !resume.first_time(&post_id) {
                    continue;
                }
                let until = crate::unix_now().saturating_add(super::http::DEDUPE_SECS);
                match ctx
                    .replay
                    .get()
                    .admit("mattermost-post", &post_id, until)
                    .await
                {
                    Ok(()) => {}
                    // Seen before a restart, or taken by another gateway.
                    Err(Refusal::Replay | Refusal::Elsewhere) => continue,
                    // Not recorded, or not decided among the gateways: a
                    // WebSocket does not deliver it again, so it is
                    // dropped (logged) rather than risk running it twice.
                    Err(Refusal::Unavailable) => {
                        tracing::error!(
                            post_id,
                            "mattermost websocket: post not routed; it cannot be recorded or claimed now"
                        );
                        continue;
                    }
                }
                if tx.send(msg).await.is_err() {
                    return Ok(());
                }
            }
            Ok(None) => {}
            Err(e) => tracing::warn!(error = %e, "mattermost websocket: bad posted event ignored"),
        }
    }
}

#[derive(Deserialize, Debug, Default)]
struct Post {
    #[serde(default)]
    id: String,
    #[serde(default)]
    user_id: String,
    #[serde(default)]
    channel_id: String,
    #[serde(default)]
    root_id: String,
    #[serde(default)]
    message: String,
    #[serde(default, rename = "type")]
    kind: String,
    #[serde(default)]
    props: Value,
}

/// A prop that Mattermost writes as `"true"` (or a JSON bool).
fn prop_true(props: &Value, name: &str) -> bool {
    match props.get(name) {
        Some(Value::String(s)) => s == "true",
        Some(Value::Bool(b)) => *b,
        _ => false,
    }
}

/// `@<bot username>` at the start of `text`: the rest, trimmed.
fn strip_mention<'a>(text: &'a str, username: &str) -> Option<&'a str> {
    if username.is_empty() {
        return None;
    }
    let rest = text.trim_start().strip_prefix('@')?;
    let head = rest.get(..username.len())?;
    if !head.eq_ignore_ascii_case(username) {
        return None;
    }
    let after = &rest[username.len()..];
    if after.is_empty() || after.starts_with(char::is_whitespace) || after.starts_with([':', ',']) {
        Some(after.strip_prefix([':', ',']).unwrap_or(after).trim())
    } else {
        None
    }
}

/// A `posted` event as an [`Incoming`] (with the post id), `None` for
/// posts that are not chat messages or not for this gateway.
fn posted(ctx: &WsCtx, v: &Value) -> Result<Option<(String, Incoming)>, String> {
    let raw = v
        .pointer("/data/post")
        .and_then(Value::as_str)
        .ok_or("no data.post")?;
    let post: Post = serde_json::from_str(raw).map_err(|e| format!("data.post: {e}"))?;
    if post.id.is_empty() || post.user_id.is_empty() || post.channel_id.is_empty() {
        return Err("post without id, user_id or channel_id".to_string());
    }
    if !post.kind.is_empty() {
        return Ok(None); // system messages (joins, header changes…)
    }
    let channel_type = v
        .pointer("/data/channel_type")
        .and_then(Value::as_str)
        .unwrap_or("");
    let team = v
        .pointer("/data/team_id")
        .and_then(Value::as_str)
        .unwrap_or("");
    if let Some(want) = &ctx.team_id
        && !team.is_empty()
        && team != want
    {
        return Ok(None);
    }
    let from_bot = post.user_id == ctx.bot_id
        || prop_true(&post.props, "from_bot")
        || prop_true(&post.props, "from_webhook")
        || prop_true(&post.props, "from_plugin");
    let mut direct = channel_type == "D";
    let mut text = post.message.clone();
    if let Some(rest) = strip_mention(&post.message, &ctx.bot_username) {
        direct = true;
        text = rest.to_string();
    }
    let identity = Identity::parse(&format!("mattermost:{}:{}", ctx.server, post.user_id))
        .map_err(|e| e.to_string())?;
    let msg = Incoming {
        identity,
        channel: format!("mattermost:{}:{}", ctx.server, post.channel_id),
        text,
        thread: (!post.root_id.is_empty()).then(|| post.root_id.clone()),
        direct,
        from_bot,
    };
    Ok(Some((post.id, msg)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_with_jitter_and_is_capped() {
        assert_eq!(backoff(0, 0.5), Duration::from_secs(1));
        assert_eq!(backoff(0, 0.0), Duration::from_millis(800));
        assert!(backoff(1, 0.5) > Duration::from_millis(1590));
        assert!(backoff(50, 0.99) <= Duration::from_secs(72));
        assert!(backoff(50, 0.0) >= Duration::from_secs(48));
    }

    #[test]
    fn mentions_of_the_bot_are_stripped() {
        for (text, expected) in [
            ("@fleetbot whoami", Some("whoami")),
            ("@FleetBot: run x", Some("run x")),
            ("@fleetbot", Some("")),
            ("@fleetbotx whoami", None),
            ("hi @fleetbot", None),
        ] {
            assert_eq!(strip_mention(text, "fleetbot"), expected, "{text}");
        }
    }

    #[test]
    fn urls_follow_the_base_and_resume() {
        let mut r = Resume::default();
        assert_eq!(
            ws_url("https://chat.x", &r),
            "wss://chat.x/api/v4/websocket"
        );
        r.connection_id = "abc".into();
        r.next_seq = 7;
        assert_eq!(
            ws_url("http://127.0.0.1:1", &r),
            "ws://127.0.0.1:1/api/v4/websocket?connection_id=abc&sequence_number=7"
        );
    }
}
