//! The few client-server API calls the adapter makes (login, whoami, room
//! joins, alias lookup, sending, `/sync`), over the gateway's shared HTTP
//! client. A 429 `M_LIMIT_EXCEEDED` is waited out for as long as the
//! homeserver asks (`retry_after_ms`, bounded); a refused token is an
//! [`MatrixError::Auth`] that says so.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use fleetcmd_core::crypto::Secret;
use reqwest::{Method, RequestBuilder, Url};
use serde_json::{Value, json};

use super::config::Login;
use crate::adapters::AdapterError;

/// One request, `/sync` excepted.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// Rate-limited retries of one request before it fails.
const MAX_RATE_LIMIT_RETRIES: u32 = 5;
/// Longest wait the homeserver may ask for before a retry; longer and the
/// request fails (a message hours late is worse than an error).
const MAX_RATE_LIMIT_WAIT: Duration = Duration::from_secs(60);
/// Wait after a 429 that names none.
const DEFAULT_RATE_LIMIT_WAIT: Duration = Duration::from_secs(1);
/// Largest answer read (a `/sync` of a busy account included).
const MAX_BODY_BYTES: usize = 8 * 1024 * 1024;
/// Characters of a homeserver's error message kept in ours.
const MAX_ERROR_CHARS: usize = 200;

/// Why a call failed. Never holds the token or password.
#[derive(thiserror::Error, Debug)]
pub enum MatrixError {
    #[error(
        "{what}: the homeserver refused the bot's credentials ({errcode}: {message}); check access_token_file / password_file"
    )]
    Auth {
        what: String,
        errcode: String,
        message: String,
    },
    #[error(
        "{what}: still rate limited (M_LIMIT_EXCEEDED) after {retries} retries; last asked to wait {wait_ms} ms"
    )]
    RateLimited {
        what: String,
        retries: u32,
        wait_ms: u64,
    },
    #[error("{what}: HTTP {status} {errcode}: {message}")]
    Refused {
        what: String,
        status: u16,
        errcode: String,
        message: String,
    },
    #[error("{what}: {message}")]
    Transport { what: String, message: String },
}

impl MatrixError {
    /// The homeserver's `errcode` (`M_FORBIDDEN`, …), if it answered one.
    pub fn errcode(&self) -> Option<&str> {
        match self {
            MatrixError::Auth { errcode, .. } | MatrixError::Refused { errcode, .. } => {
                Some(errcode)
            }
            _ => None,
        }
    }
}

impl From<MatrixError> for AdapterError {
    fn from(e: MatrixError) -> AdapterError {
        AdapterError::Platform {
            what: "matrix".into(),
            message: e.to_string(),
        }
    }
}

/// What a non-2xx answer means.
#[derive(Debug, PartialEq, Eq)]
pub enum Failure {
    /// Wait this long, then try again.
    RateLimited(Duration),
    /// The token or password is not (or no longer) accepted.
    Auth {
        errcode: String,
        message: String,
    },
    Refused {
        errcode: String,
        message: String,
    },
}

/// Classifies an error answer from its status, body and `Retry-After`
/// header (seconds).
pub fn classify(status: u16, body: &[u8], retry_after_header: Option<&str>) -> Failure {
    let v: Value = serde_json::from_slice(body).unwrap_or(Value::Null);
    let errcode = v["errcode"].as_str().unwrap_or("").to_string();
    let message: String = v["error"]
        .as_str()
        .map(str::to_string)
        .unwrap_or_else(|| String::from_utf8_lossy(body).into_owned())
        .chars()
        .take(MAX_ERROR_CHARS)
        .collect();
    let message = crate::render::sanitize(message.trim());
    if status == 429 || errcode == "M_LIMIT_EXCEEDED" {
        let wait = v["retry_after_ms"]
            .as_u64()
            .map(Duration::from_millis)
            .or_else(|| {
                retry_after_header
                    .and_then(|h| h.trim().parse::<u64>().ok())
                    .map(Duration::from_secs)
            })
            .unwrap_or(DEFAULT_RATE_LIMIT_WAIT);
        return Failure::RateLimited(wait);
    }
    if matches!(
        errcode.as_str(),
        "M_UNKNOWN_TOKEN" | "M_MISSING_TOKEN" | "M_USER_DEACTIVATED"
    ) || (status == 403
        && errcode == "M_FORBIDDEN"
        && v["error"].as_str().is_some_and(|e| e.contains("password")))
        || status == 401
    {
        return Failure::Auth {
            errcode: if errcode.is_empty() {
                format!("HTTP {status}")
            } else {
                errcode
            },
            message,
        };
    }
    Failure::Refused {
        errcode: if errcode.is_empty() {
            "(no errcode)".into()
        } else {
            errcode
        },
        message,
    }
}

/// A logged-in client of one homeserver.
pub struct Api {
    http: reqwest::Client,
    base: Url,
    token: Secret<String>,
    user_id: String,
    /// Transaction ids: unique per token for this process's life
    /// (the start time keeps them unique across restarts).
    txn_prefix: u64,
    txn: AtomicU64,
}

fn transport(what: &str, e: reqwest::Error) -> MatrixError {
    MatrixError::Transport {
        what: what.to_string(),
        message: format!("request failed: {}", e.without_url()),
    }
}

/// Builds `base` + `/_matrix/client/v3/` + the segments, each
/// percent-encoded (`#alias:server` and `!id:server` are path segments).
fn url(base: &Url, segments: &[&str]) -> Url {
    let mut u = base.clone();
    if let Ok(mut p) = u.path_segments_mut() {
        p.pop_if_empty();
        p.extend(["_matrix", "client", "v3"]);
        p.extend(segments);
    }
    u
}

/// Sends what `build` makes (once per attempt), waiting out rate limits;
/// returns the JSON body of a 2xx answer.
async fn call(what: &str, build: impl Fn() -> RequestBuilder) -> Result<Value, MatrixError> {
    let mut retries = 0u32;
    loop {
        let mut resp = build().send().await.map_err(|e| transport(what, e))?;
        let status = resp.status();
        let retry_after = resp
            .headers()
            .get(reqwest::header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        let mut body = Vec::new();
        while let Some(chunk) = resp.chunk().await.map_err(|e| transport(what, e))? {
            if body.len() + chunk.len() > MAX_BODY_BYTES {
                return Err(MatrixError::Transport {
                    what: what.to_string(),
                    message: format!("answer larger than {MAX_BODY_BYTES} bytes"),
                });
            }
            body.extend_from_slice(&chunk);
        }
        if status.is_success() {
            if body.is_empty() {
                return Ok(Value::Null);
            }
            return serde_json::from_slice(&body).map_err(|e| MatrixError::Transport {
                what: what.to_string(),
                message: format!("answer is not JSON: {e}"),
            });
        }
        match classify(status.as_u16(), &body, retry_after.as_deref()) {
            Failure::RateLimited(wait)
                if retries < MAX_RATE_LIMIT_RETRIES && wait <= MAX_RATE_LIMIT_WAIT =>
            {
                retries += 1;
                tracing::info!(
                    what,
                    wait_ms = wait.as_millis() as u64,
                    retries,
                    "[matrix] rate limited by the homeserver; waiting"
                );
                tokio::time::sleep(wait).await;
            }
            Failure::RateLimited(wait) => {
                return Err(MatrixError::RateLimited {
                    what: what.to_string(),
                    retries,
                    wait_ms: wait.as_millis() as u64,
                });
            }
            Failure::Auth { errcode, message } => {
                return Err(MatrixError::Auth {
                    what: what.to_string(),
                    errcode,
                    message,
                });
            }
            Failure::Refused { errcode, message } => {
                return Err(MatrixError::Refused {
                    what: what.to_string(),
                    status: status.as_u16(),
                    errcode,
                    message,
                });
            }
        }
    }
}

impl Api {
    /// Logs in (password) or checks the token (`whoami`), and that the
    /// account is `user_id`.
    pub async fn login(homeserver: &str, user_id: &str, login: Login) -> Result<Api, AdapterError> {
        let base = Url::parse(homeserver).map_err(|e| AdapterError::Platform {
            what: "matrix homeserver".into(),
            message: e.to_string(),
        })?;
        let http = crate::http_client::http_client(REQUEST_TIMEOUT)?;
        let token = match login {
            Login::Token(t) => t,
            Login::Password(pw) => {
                let what = "POST /login";
                let v = call(what, || {
                    http.post(url(&base, &["login"])).json(&json!({
                        "type": "m.login.password",
                        "identifier": {"type": "m.id.user", "user": user_id},
                        "password": pw.expose(),
                        "initial_device_display_name": "fleetcmd-gateway",
                    }))
                })
                .await?;
                let t = v["access_token"]
                    .as_str()
                    .ok_or_else(|| MatrixError::Transport {
                        what: what.into(),
                        message: "no access_token in the answer".into(),
                    })?;
                Secret::new(t.to_string())
            }
        };
        let mut api = Api {
            http,
            base,
            token,
            user_id: user_id.to_string(),
            txn_prefix: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_millis() as u64)
                .unwrap_or(0),
            txn: AtomicU64::new(0),
        };
        let me = api
            .get("GET /account/whoami", &["account", "whoami"], &[])
            .await?;
        let who = me["user_id"].as_str().unwrap_or("");
        if who != user_id {
            return Err(AdapterError::Platform {
                what: "matrix".into(),
                message: format!(
                    "the credentials are those of {:?}, not of user_id {user_id:?}",
                    fleetcmd_core::terminal::excerpt(who)
                ),
            });
        }
        api.user_id = who.to_string();
        Ok(api)
    }

    /// The bot's own user id.
    pub fn user_id(&self) -> &str {
        &self.user_id
    }

    fn request(&self, method: Method, segments: &[&str]) -> RequestBuilder {
        self.http
            .request(method, url(&self.base, segments))
            .bearer_auth(self.token.expose())
    }

    async fn get(
        &self,
        what: &str,
        segments: &[&str],
        query: &[(&str, String)],
    ) -> Result<Value, MatrixError> {
        call(what, || self.request(Method::GET, segments).query(query)).await
    }

    /// The room id an alias names.
    pub async fn resolve_alias(&self, alias: &str) -> Result<String, MatrixError> {
        let what = format!("GET /directory/room/{alias}");
        let v = self.get(&what, &["directory", "room", alias], &[]).await?;
        v["room_id"]
            .as_str()
            .filter(|r| super::ids::is_room_id(r))
            .map(str::to_string)
            .ok_or(MatrixError::Transport {
                what,
                message: "no room_id in the answer".into(),
            })
    }

    /// Joins (or accepts the invite to) a room.
    pub async fn join(&self, room: &str) -> Result<(), MatrixError> {
        let what = format!("POST /join/{room}");
        call(&what, || {
            self.request(Method::POST, &["join", room]).json(&json!({}))
        })
        .await
        .map(|_| ())
    }

    /// Sends one event; returns its event id.
    pub async fn send(
        &self,
        room: &str,
        event_type: &str,
        content: &Value,
    ) -> Result<String, MatrixError> {
        let txn = format!(
            "fc{}-{}",
            self.txn_prefix,
            self.txn.fetch_add(1, Ordering::Relaxed)
        );
        let what = format!("PUT /rooms/{room}/send/{event_type}");
        // The same transaction id on every retry: the homeserver sends the
        // event once however often we ask.
        let v = call(&what, || {
            self.request(Method::PUT, &["rooms", room, "send", event_type, &txn])
                .json(content)
        })
        .await?;
        v["event_id"]
            .as_str()
            .map(str::to_string)
            .ok_or(MatrixError::Transport {
                what,
                message: "no event_id in the answer".into(),
            })
    }

    /// One `/sync`: waits up to `timeout` for news after `since`.
    pub async fn sync(
        &self,
        since: Option<&str>,
        timeout: Duration,
        filter: &str,
    ) -> Result<Value, MatrixError> {
        let mut query = vec![
            ("timeout", timeout.as_millis().to_string()),
            ("filter", filter.to_string()),
        ];
        if let Some(s) = since {
            query.push(("since", s.to_string()));
        }
        call("GET /sync", || {
            self.request(Method::GET, &["sync"])
                .query(&query)
                .timeout(timeout + REQUEST_TIMEOUT)
        })
        .await
    }
}

impl std::fmt::Debug for Api {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Api")
            .field("base", &self.base.as_str())
            .field("user_id", &self.user_id)
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_answers_are_classified() {
        let rl =
            br#"{"errcode":"M_LIMIT_EXCEEDED","error":"Too many requests","retry_after_ms":1500}"#;
        assert_eq!(
            classify(429, rl, None),
            Failure::RateLimited(Duration::from_millis(1500))
        );
        assert_eq!(
            classify(429, b"", Some("3")),
            Failure::RateLimited(Duration::from_secs(3))
        );
        assert_eq!(
            classify(429, b"", None),
            Failure::RateLimited(DEFAULT_RATE_LIMIT_WAIT)
        );
        let tok = br#"{"errcode":"M_UNKNOWN_TOKEN","error":"Invalid access token passed."}"#;
        assert_eq!(
            classify(401, tok, None),
            Failure::Auth {
                errcode: "M_UNKNOWN_TOKEN".into(),
                message: "Invalid access token passed.".into()
            }
        );
        let pw = br#"{"errcode":"M_FORBIDDEN","error":"Invalid username or password"}"#;
        assert!(matches!(classify(403, pw, None), Failure::Auth { .. }));
        let nf = br#"{"errcode":"M_NOT_FOUND","error":"Room alias #x:hs not found"}"#;
        assert_eq!(
            classify(404, nf, None),
            Failure::Refused {
                errcode: "M_NOT_FOUND".into(),
                message: "Room alias #x:hs not found".into()
            }
        );
        // A hostile error text stays one inert line.
        let evil = b"{\"errcode\":\"M_X\",\"error\":\"a\\nb\\u001b[31m\"}";
        match classify(400, evil, None) {
            Failure::Refused { message, .. } => {
                assert!(
                    !message.contains('\n') && !message.contains('\u{1b}'),
                    "{message:?}"
                )
            }
            f => panic!("{f:?}"),
        }
    }

    #[test]
    fn ids_are_percent_encoded_path_segments() {
        let base = Url::parse("https://hs.example.com/").expect("url");
        assert_eq!(
            url(&base, &["directory", "room", "#ops:hs"]).as_str(),
            "https://hs.example.com/_matrix/client/v3/directory/room/%23ops:hs"
        );
        assert_eq!(
            url(&base, &["rooms", "!a/b?c:hs", "send"]).as_str(),
            "https://hs.example.com/_matrix/client/v3/rooms/!a%2Fb%3Fc:hs/send"
        );
    }
}
