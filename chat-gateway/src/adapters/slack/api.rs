//! A small Slack Web API client: `POST {api_base}/{method}` with a Bearer
//! token, `{"ok": false, "error": …}` mapped to [`AdapterError::Platform`],
//! HTTP 429 answered by waiting `Retry-After` (bounded) and retrying, and
//! posts/edits spaced per channel (Slack allows about one message per
//! second per channel).

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use fleetcmd_core::crypto::Secret;
use serde_json::Value;
use tokio::time::Instant;

use crate::adapters::AdapterError;

/// Attempts of one call when Slack answers 429.
pub const MAX_ATTEMPTS: usize = 4;
/// Longest `Retry-After` the client waits; a longer one fails the call
/// instead of holding a command for minutes.
pub const MAX_RETRY_AFTER: Duration = Duration::from_secs(30);
/// Spacing of posts and edits in one channel.
pub const CHANNEL_INTERVAL: Duration = Duration::from_secs(1);
/// Largest Web API response read.
const MAX_RESPONSE_BYTES: usize = 4 << 20;
/// Channels remembered by the throttle before old entries are pruned.
const THROTTLE_ENTRIES: usize = 1024;

/// Which token a call uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Token {
    /// `xoxb-…`: everything but opening Socket Mode connections.
    Bot,
    /// `xapp-…`: only `apps.connections.open`.
    App,
}

/// A call's arguments.
pub enum Args {
    None,
    Json(Value),
    Form(Vec<(&'static str, String)>),
}

/// Who we are, from `auth.test`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Whoami {
    pub team_id: String,
    pub user_id: String,
    pub bot_id: Option<String>,
}

pub struct Api {
    http: reqwest::Client,
    base: String,
    bot_token: Secret<String>,
    app_token: Option<Secret<String>>,
    /// channel id → earliest time of its next post or edit.
    next_slot: Mutex<HashMap<String, Instant>>,
}

/// TLS for the Web API and the Socket Mode WebSocket: rustls with ring and
/// the Mozilla roots (no aws-lc, no system store).
pub fn tls_config() -> Result<rustls::ClientConfig, AdapterError> {
    crate::adapters::public_tls_config("slack tls")
}

pub fn platform(what: &str, message: impl Into<String>) -> AdapterError {
    AdapterError::Platform {
        what: what.to_string(),
        message: message.into(),
    }
}

/// Slack's `error` strings are short identifiers; keep whatever came back
/// printable and short before it reaches a log.
fn clean(s: &str) -> String {
    s.chars().filter(|c| !c.is_control()).take(200).collect()
}

impl Api {
    pub fn new(
        base: &str,
        bot_token: Secret<String>,
        app_token: Option<Secret<String>>,
    ) -> Result<Api, AdapterError> {
        let http = crate::http_client::client(
            "slack http client",
            crate::http_client::ClientOptions {
                timeout: Duration::from_secs(30),
                connect_timeout: Some(Duration::from_secs(10)),
                follow_redirects: true,
            },
        )?;
        Ok(Api {
            http,
            base: base.trim_end_matches('/').to_string(),
            bot_token,
            app_token,
            next_slot: Mutex::new(HashMap::new()),
        })
    }

    /// Calls `method`; `Ok` only when Slack said `"ok": true`.
    pub async fn call(
        &self,
        method: &str,
        token: Token,
        args: Args,
    ) -> Result<Value, AdapterError> {
        let what = format!("slack {method}");
        let token = match token {
            Token::Bot => &self.bot_token,
            Token::App => self
                .app_token
                .as_ref()
                .ok_or_else(|| platform(&what, "no app_token configured"))?,
        };
        let url = format!("{}/{method}", self.base);
        for attempt in 1..=MAX_ATTEMPTS {
            let req = self.http.post(&url).bearer_auth(token.expose());
            let req = match &args {
                Args::None => req,
                Args::Json(v) => req.json(v),
                Args::Form(f) => req.form(f),
            };
            let resp = req
                .send()
                .await
                .map_err(|e| platform(&what, format!("request failed: {}", e.without_url())))?;
            let status = resp.status();
            if status == reqwest::StatusCode::TOO_MANY_REQUESTS {
                let wait = retry_after(resp.headers());
                if wait > MAX_RETRY_AFTER {
                    return Err(platform(
                        &what,
                        format!(
                            "rate limited for {} s; not waiting that long",
                            wait.as_secs()
                        ),
                    ));
                }
                if attempt == MAX_ATTEMPTS {
                    break;
                }
                tracing::info!(
                    method,
                    wait_secs = wait.as_secs(),
                    attempt,
                    "slack rate limit; waiting Retry-After"
                );
                tokio::time::sleep(wait).await;
                continue;
            }
            let body = read_limited(resp, &what).await?;
            if !status.is_success() {
                return Err(platform(&what, format!("HTTP {status}")));
            }
            let v: Value = serde_json::from_slice(&body)
                .map_err(|e| platform(&what, format!("malformed JSON response: {e}")))?;
            if v.get("ok").and_then(Value::as_bool) != Some(true) {
                let error = v
                    .get("error")
                    .and_then(Value::as_str)
                    .unwrap_or("no error given");
                let mut message = clean(error);
                if let Some(needed) = v.get("needed").and_then(Value::as_str) {
                    message.push_str(&format!(" (needs scope {})", clean(needed)));
                }
                return Err(platform(&what, message));
            }
            return Ok(v);
        }
        Err(platform(
            &what,
            format!("still rate limited after {MAX_ATTEMPTS} attempts"),
        ))
    }

    /// `auth.test` with the bot token.
    pub async fn auth_test(&self) -> Result<Whoami, AdapterError> {
        let v = self.call("auth.test", Token::Bot, Args::None).await?;
        let field = |k: &str| v.get(k).and_then(Value::as_str).map(str::to_string);
        match (field("team_id"), field("user_id")) {
            (Some(team_id), Some(user_id)) => Ok(Whoami {
                team_id,
                user_id,
                bot_id: field("bot_id"),
            }),
            _ => Err(platform(
                "slack auth.test",
                "response lacks team_id or user_id",
            )),
        }
    }

    /// `apps.connections.open` with the app token: a one-time `wss://` URL.
    pub async fn connections_open(&self) -> Result<String, AdapterError> {
        let v = self
            .call("apps.connections.open", Token::App, Args::None)
            .await?;
        v.get("url")
            .and_then(Value::as_str)
            .map(str::to_string)
            .ok_or_else(|| platform("slack apps.connections.open", "response lacks url"))
    }

    /// Waits for `channel`'s next slot (about one post or edit per second).
    pub async fn wait_turn(&self, channel: &str) {
        let slot = {
            let mut slots = self.next_slot.lock().unwrap_or_else(|p| p.into_inner());
            let now = Instant::now();
            if slots.len() > THROTTLE_ENTRIES {
                slots.retain(|_, t| *t > now);
            }
            let slot = slots.get(channel).copied().unwrap_or(now).max(now);
            slots.insert(channel.to_string(), slot + CHANNEL_INTERVAL);
            slot
        };
        tokio::time::sleep_until(slot).await;
    }

    /// Uploads `content` as a file shared in `channel`'s thread `thread_ts`
    /// (files.getUploadURLExternal → POST the bytes → files.completeUploadExternal).
    pub async fn upload(
        &self,
        channel: &str,
        thread_ts: &str,
        filename: &str,
        title: &str,
        content: &str,
    ) -> Result<(), AdapterError> {
        let v = self
            .call(
                "files.getUploadURLExternal",
                Token::Bot,
                Args::Form(vec![
                    ("filename", filename.to_string()),
                    ("length", content.len().to_string()),
                ]),
            )
            .await?;
        let what = "slack files.getUploadURLExternal";
        let upload_url = v
            .get("upload_url")
            .and_then(Value::as_str)
            .ok_or_else(|| platform(what, "response lacks upload_url"))?;
        let file_id = v
            .get("file_id")
            .and_then(Value::as_str)
            .ok_or_else(|| platform(what, "response lacks file_id"))?
            .to_string();
        // The upload URL is pre-authorised: the bot token is not sent there.
        acceptable_upload_url(upload_url).map_err(|m| platform(what, m))?;
        let resp = self
            .http
            .post(upload_url)
            .header(reqwest::header::CONTENT_TYPE, "application/octet-stream")
            .body(content.as_bytes().to_vec())
            .send()
            .await
            .map_err(|e| {
                platform(
                    "slack file upload",
                    format!("request failed: {}", e.without_url()),
                )
            })?;
        if !resp.status().is_success() {
            return Err(platform(
                "slack file upload",
                format!("HTTP {}", resp.status()),
            ));
        }
        let files = serde_json::json!([{ "id": file_id, "title": title }]).to_string();
        self.call(
            "files.completeUploadExternal",
            Token::Bot,
            Args::Form(vec![
                ("files", files),
                ("channel_id", channel.to_string()),
                ("thread_ts", thread_ts.to_string()),
            ]),
        )
        .await?;
        Ok(())
    }
}

fn acceptable_upload_url(url: &str) -> Result<(), String> {
    super::config::acceptable_base(url).map_err(|m| format!("upload_url {m}"))
}

/// `Retry-After` in seconds (Slack sends whole seconds); 1 s when missing
/// or unreadable.
fn retry_after(headers: &reqwest::header::HeaderMap) -> Duration {
    headers
        .get(reqwest::header::RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok())
        .map_or(Duration::from_secs(1), Duration::from_secs)
}

async fn read_limited(mut resp: reqwest::Response, what: &str) -> Result<Vec<u8>, AdapterError> {
    crate::body::read_response(&mut resp, MAX_RESPONSE_BYTES)
        .await
        .map_err(|e| match e {
            crate::body::BodyError::TooLarge(_) => platform(what, "response too large"),
            e => platform(what, e.to_string()),
        })
}
