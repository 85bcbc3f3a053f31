//! The few REST API v4 calls the adapter makes, with `Authorization:
//! Bearer`, Mattermost's error JSON mapped to [`AdapterError::Platform`]
//! and `429 Too Many Requests` honoured with bounded retries.

use crate::unix_now;
use std::sync::Arc;
use std::time::Duration;

use fleetcmd_core::crypto::Secret;
use reqwest::{Method, RequestBuilder, Response, StatusCode};
use serde::Deserialize;
use serde_json::Value;

use crate::adapters::AdapterError;
use crate::render::sanitize;

/// Retries after a 429 before giving up.
pub const MAX_RATE_LIMIT_RETRIES: u32 = 3;
/// Longest wait for a rate limit; a longer one fails the request instead.
pub const MAX_RATE_LIMIT_WAIT: Duration = Duration::from_secs(30);
/// Wait when a 429 names no time.
const DEFAULT_RATE_LIMIT_WAIT: Duration = Duration::from_secs(1);
/// Whole-request timeout (uploads included).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// Largest error body read into a message.
const MAX_ERROR_CHARS: usize = 300;

/// The rustls client config shared by REST and WebSocket: ring provider,
/// Mozilla's root list, HTTP/1.1 only.
pub fn tls_config() -> Result<Arc<rustls::ClientConfig>, AdapterError> {
    crate::adapters::public_tls_config("mattermost tls").map(Arc::new)
}

/// Mattermost's error body: `{id, message, status_code, …}`.
#[derive(Deserialize, Debug, Default)]
struct ApiError {
    #[serde(default)]
    id: String,
    #[serde(default)]
    message: String,
}

/// The bot's own account.
#[derive(Deserialize, Debug, Clone)]
pub struct Me {
    pub id: String,
    #[serde(default)]
    pub username: String,
    #[serde(default)]
    pub is_bot: bool,
}

/// A REST client for one server and token.
pub struct Api {
    http: reqwest::Client,
    base: String,
    token: Secret<String>,
}

impl std::fmt::Debug for Api {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Api")
            .field("base", &self.base)
            .finish_non_exhaustive()
    }
}

fn platform(what: &str, message: impl Into<String>) -> AdapterError {
    AdapterError::Platform {
        what: what.to_string(),
        message: message.into(),
    }
}

/// How long a 429 asks us to wait: `Retry-After` (seconds), else
/// `X-Ratelimit-Reset` (seconds until the window resets; a value that
/// looks like a unix time is taken as one).
pub fn rate_limit_wait(resp: &Response, now_unix: u64) -> Duration {
    let header = |name: &str| {
        resp.headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<f64>().ok())
            .filter(|v| v.is_finite() && *v >= 0.0)
    };
    let secs = header("retry-after").or_else(|| {
        header("x-ratelimit-reset").map(|v| {
            if v > 1_000_000_000.0 {
                (v - now_unix as f64).max(0.0)
            } else {
                v
            }
        })
    });
    match secs {
        Some(s) => Duration::from_secs_f64(s.min(86_400.0)),
        None => DEFAULT_RATE_LIMIT_WAIT,
    }
}

impl Api {
    /// A client for the server at `base` (e.g. `https://chat.example.com`).
    pub fn new(base: &str, token: Secret<String>) -> Result<Api, AdapterError> {
        let http = crate::http_client::client(
            "mattermost http client",
            crate::http_client::ClientOptions {
                timeout: REQUEST_TIMEOUT,
                connect_timeout: Some(Duration::from_secs(10)),
                follow_redirects: true,
            },
        )?;
        Ok(Api {
            http,
            base: base.trim_end_matches('/').to_string(),
            token,
        })
    }

    pub fn base(&self) -> &str {
        &self.base
    }

    pub fn token(&self) -> &Secret<String> {
        &self.token
    }

    fn builder(&self, method: Method, path: &str) -> RequestBuilder {
        self.http
            .request(method, format!("{}/api/v4{path}", self.base))
            .bearer_auth(self.token.expose())
    }

    /// Sends the request `build` makes (once per attempt), retrying on 429;
    /// returns the JSON body of a 2xx answer.
    async fn call(
        &self,
        what: &str,
        build: impl Fn() -> RequestBuilder,
    ) -> Result<Value, AdapterError> {
        let mut attempt = 0u32;
        loop {
            let resp = build()
                .send()
                .await
                .map_err(|e| platform(what, format!("request failed: {}", e.without_url())))?;
            let status = resp.status();
            if status == StatusCode::TOO_MANY_REQUESTS {
                let wait = rate_limit_wait(&resp, unix_now());
                if attempt >= MAX_RATE_LIMIT_RETRIES || wait > MAX_RATE_LIMIT_WAIT {
                    return Err(platform(
                        what,
                        format!(
                            "rate limited (429), asked to wait {} s after {attempt} retries",
                            wait.as_secs_f64().ceil()
                        ),
                    ));
                }
                attempt += 1;
                tracing::info!(
                    what,
                    wait_ms = wait.as_millis() as u64,
                    attempt,
                    "mattermost rate limit; waiting"
                );
                tokio::time::sleep(wait).await;
                continue;
            }
            let bytes = resp
                .bytes()
                .await
                .map_err(|e| platform(what, format!("reading the answer: {}", e.without_url())))?;
            if !status.is_success() {
                let err: ApiError = serde_json::from_slice(&bytes).unwrap_or_default();
                let detail = if err.id.is_empty() && err.message.is_empty() {
                    String::from_utf8_lossy(&bytes)
                        .chars()
                        .take(MAX_ERROR_CHARS)
                        .collect()
                } else {
                    format!("{}: {}", err.id, err.message)
                };
                return Err(platform(
                    what,
                    format!("HTTP {}: {}", status.as_u16(), sanitize(detail.trim())),
                ));
            }
            if bytes.is_empty() {
                return Ok(Value::Null);
            }
            return serde_json::from_slice(&bytes)
                .map_err(|e| platform(what, format!("answer is not JSON: {e}")));
        }
    }

    /// `GET /users/me`.
    pub async fn me(&self) -> Result<Me, AdapterError> {
        let v = self
            .call("GET /api/v4/users/me", || {
                self.builder(Method::GET, "/users/me")
            })
            .await?;
        let me: Me = serde_json::from_value(v)
            .map_err(|e| platform("GET /api/v4/users/me", format!("unexpected answer: {e}")))?;
        if me.id.is_empty() {
            return Err(platform("GET /api/v4/users/me", "no user id in the answer"));
        }
        Ok(me)
    }

    /// The id of team `name_or_id`: by name first, then as an id.
    pub async fn team_id(&self, name_or_id: &str) -> Result<String, AdapterError> {
        let id_of = |v: Value| v.get("id").and_then(Value::as_str).map(str::to_string);
        let by_name = format!("/teams/name/{name_or_id}");
        match self
            .call("GET /api/v4/teams/name", || {
                self.builder(Method::GET, &by_name)
            })
            .await
        {
            Ok(v) => id_of(v).ok_or_else(|| platform("GET /api/v4/teams/name", "no team id")),
            Err(first) => {
                let by_id = format!("/teams/{name_or_id}");
                match self
                    .call("GET /api/v4/teams", || self.builder(Method::GET, &by_id))
                    .await
                {
                    Ok(v) => id_of(v).ok_or(first),
                    Err(_) => Err(first),
                }
            }
        }
    }

    /// `POST /posts`; returns the new post's id.
    pub async fn create_post(&self, body: &Value) -> Result<String, AdapterError> {
        let v = self
            .call("POST /api/v4/posts", || {
                self.builder(Method::POST, "/posts").json(body)
            })
            .await?;
        v.get("id")
            .and_then(Value::as_str)
            .filter(|id| !id.is_empty())
            .map(str::to_string)
            .ok_or_else(|| platform("POST /api/v4/posts", "no post id in the answer"))
    }

    /// `PUT /posts/{id}/patch`.
    pub async fn patch_post(&self, id: &str, body: &Value) -> Result<(), AdapterError> {
        let path = format!("/posts/{id}/patch");
        self.call("PUT /api/v4/posts/{id}/patch", || {
            self.builder(Method::PUT, &path).json(body)
        })
        .await
        .map(|_| ())
    }

    /// `POST /files` (multipart: `channel_id`, `files`); returns the file id.
    pub async fn upload_file(
        &self,
        channel_id: &str,
        name: &str,
        data: Vec<u8>,
    ) -> Result<String, AdapterError> {
        let v = self
            .call("POST /api/v4/files", || {
                let part = reqwest::multipart::Part::bytes(data.clone())
                    .file_name(name.to_string())
                    .mime_str("text/plain; charset=utf-8")
                    .unwrap_or_else(|_| reqwest::multipart::Part::bytes(data.clone()));
                let form = reqwest::multipart::Form::new()
                    .text("channel_id", channel_id.to_string())
                    .part("files", part);
                self.builder(Method::POST, "/files").multipart(form)
            })
            .await?;
        v.get("file_infos")
            .and_then(|f| f.get(0))
            .and_then(|f| f.get("id"))
            .and_then(Value::as_str)
            .map(str::to_string)
            .ok_or_else(|| platform("POST /api/v4/files", "no file id in the answer"))
    }
}
