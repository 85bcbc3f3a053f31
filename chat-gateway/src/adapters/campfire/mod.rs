//! The Campfire adapter (ONCE Campfire, 37signals' self-hosted chat), over
//! its bot API:
//!
//! * **In**: when the bot is mentioned, or messaged in a direct room,
//!   Campfire POSTs JSON to the bot's webhook URL:
//!   `{"user": {"id", "name"}, "room": {"id", "name", "path"},
//!   "message": {"id", "body": {"html", "plain"}, "path"}}` where
//!   `room.path` is the room's bot-key messages path
//!   (`/rooms/<room_id>/<bot_key>/messages`) and `body.plain` has the
//!   bot's own mentions removed. Campfire does not sign these requests, so
//!   the route carries an unguessable token (`POST /campfire/<path_token>`,
//!   compared in constant time) and the adapter also checks that
//!   `room.path` carries this bot's key, which only Campfire knows. A
//!   message id runs once: a second delivery (also after a gateway
//!   restart, for [`DEDUPE_SECS`]) is dropped and reported.
//! * **Out**: the answer to a webhook is its response body (`text/html`
//!   becomes a message in the room); Campfire waits 7 s for it. The first
//!   reply the router produces within `reply_wait_ms` goes there; later
//!   replies (a job's result) are POSTed as the body of a request to
//!   `<url>/rooms/<room_id>/<bot_key>/messages`. Campfire messages cannot
//!   be edited by bots, so [`ChatSender::can_edit`] is false and the final
//!   result is a new message.
//!
//! Identity `campfire:<server>:<user_id>` (Campfire's numeric user id; the
//! display name is never used), channel `campfire:<server>:<room_id>`.
//! Every webhook is addressed to the bot (Campfire sends only mentions and
//! direct-room messages), so `direct` is always true.

mod render;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Body;
use axum::extract::{Path as UrlPath, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use fleetcmd_core::crypto::Secret;
use fleetcmd_core::ids::Identity;
use serde::{Deserialize, Deserializer};
use tokio::sync::{mpsc, oneshot};

pub use self::render::{MAX_MESSAGE_BYTES, escape_html, inert, render};
use super::{
    AdapterError, AuthFailures, BoxFuture, ChatAdapter, ChatSender, Incoming, MessageRef, Reply,
};
use crate::body::read_request as read_limited;
use crate::http_client::http_client;
use crate::secret::SecretString;
use crate::store::{Refusal, ReplayGuard, ReplaySlot};
use crate::unix_now;

/// Route prefix; the webhook URL is `<gateway>/campfire/<path_token>`.
pub const ROUTE_PREFIX: &str = "/campfire";
/// Largest webhook body accepted (a message's HTML can be long).
pub const MAX_WEBHOOK_BYTES: usize = 256 * 1024;
/// Campfire gives up on a webhook after 7 s (`Webhook::ENDPOINT_TIMEOUT`).
pub const CAMPFIRE_WEBHOOK_TIMEOUT_MS: u64 = 7_000;
/// Webhook messages waiting for the router; when full, Campfire is
/// answered 503 and the message is dropped (logged), never queued forever.
pub const QUEUE: usize = 256;
/// Requests waiting for their first reply at once (bounded like the queue).
const MAX_PENDING: usize = 1024;
/// Attempts of one POST when Campfire says 429/503 or cannot be reached.
const POST_ATTEMPTS: u32 = 3;
/// Longest wait between two attempts, whatever Retry-After says.
const MAX_RETRY_WAIT: Duration = Duration::from_secs(30);

/// Defaults, in one place.
pub mod defaults {
    /// Long enough for the router's first answer (`job … submitted`),
    /// well inside Campfire's 7 s.
    pub const REPLY_WAIT_MS: u64 = 3_000;
    pub const TIMEOUT_MS: u64 = 10_000;

    pub(super) fn reply_wait_ms() -> u64 {
        REPLY_WAIT_MS
    }
    pub(super) fn timeout_ms() -> u64 {
        TIMEOUT_MS
    }
}

/// `[campfire]` in gateway.toml.
///
/// ```toml
/// [campfire]
/// url = "https://chat.example.com"
/// server = "acme"
/// bot_key = "7-kR3x9mP8qL2n"            # or bot_key_file
/// path_token = "b1f0…(32+ random chars)" # or path_token_file
/// reply_wait_ms = 3000
/// ```
#[derive(Deserialize, Debug, Clone, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct CampfireConfig {
    /// Campfire's base URL (`https://chat.example.com`, or with a path prefix).
    pub url: String,
    /// Short name used in identities and channels (`campfire:<server>:…`).
    pub server: String,
    /// The bot's key as Campfire shows it: `<bot-id>-<token>`.
    #[serde(default)]
    pub bot_key: Option<SecretString>,
    #[serde(default)]
    pub bot_key_file: Option<PathBuf>,
    /// The last segment of the webhook URL given to Campfire
    /// (`<gateway>/campfire/<path_token>`); Campfire does not sign webhooks.
    #[serde(default)]
    pub path_token: Option<SecretString>,
    #[serde(default)]
    pub path_token_file: Option<PathBuf>,
    /// How long a webhook waits for the router's first reply before it is
    /// answered with an empty 200 (the reply is then posted to the room).
    #[serde(default = "defaults::reply_wait_ms")]
    pub reply_wait_ms: u64,
    /// Timeout of each POST to Campfire.
    #[serde(default = "defaults::timeout_ms")]
    pub timeout_ms: u64,
    /// Campfire user ids of other bots: their messages are marked
    /// `from_bot` and ignored (Campfire's payload does not say).
    #[serde(default)]
    pub ignore_user_ids: Vec<String>,
}

fn valid_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && s.chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '.')
}

/// Campfire record ids (integers upstream; accept id-like strings too).
fn valid_id(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
}

/// `<bot-id>-<token>` → the bot id, if well formed (both parts alphanumeric,
/// as Campfire generates them; they go into a URL path).
fn bot_id_of(key: &str) -> Option<&str> {
    let (id, token) = key.split_once('-')?;
    let ok = |s: &str| !s.is_empty() && s.chars().all(|c| c.is_ascii_alphanumeric());
    (ok(id) && ok(token)).then_some(id)
}

fn one_of(problems: &mut Vec<(String, String)>, key: &str, inline: bool, file: bool) {
    match (inline, file) {
        (true, true) => problems.push((
            key.to_string(),
            format!("give either {key} or {key}_file, not both"),
        )),
        (false, false) => problems.push((key.to_string(), format!("required (or {key}_file)"))),
        _ => {}
    }
}

/// Minimum length of a path token: it is the only thing guarding the route.
pub const MIN_PATH_TOKEN_CHARS: usize = 24;

impl CampfireConfig {
    /// Every problem, with the key it is about (`campfire.<key>`).
    pub fn validate(&self) -> Vec<(String, String)> {
        let mut p = Vec::new();
        match reqwest::Url::parse(&self.url) {
            Ok(u) if matches!(u.scheme(), "http" | "https") && u.host().is_some() => {}
            Ok(_) => p.push(("url".into(), "must be an http(s) URL with a host".into())),
            Err(e) => p.push(("url".into(), format!("not a URL: {e}"))),
        }
        if !valid_name(&self.server) {
            p.push((
                "server".into(),
                "1-64 characters of a-z, 0-9, '-' and '.'".into(),
            ));
        }
        one_of(
            &mut p,
            "bot_key",
            self.bot_key.is_some(),
            self.bot_key_file.is_some(),
        );
        if let Some(k) = &self.bot_key
            && bot_id_of(k.expose().trim()).is_none()
        {
            p.push((
                "bot_key".into(),
                "expected <bot-id>-<token> as Campfire shows it (value not shown)".into(),
            ));
        }
        one_of(
            &mut p,
            "path_token",
            self.path_token.is_some(),
            self.path_token_file.is_some(),
        );
        if let Some(t) = &self.path_token
            && !valid_path_token(t.expose())
        {
            p.push((
                "path_token".into(),
                format!(
                    "at least {MIN_PATH_TOKEN_CHARS} characters of A-Z, a-z, 0-9, '-' and '_' (value not shown)"
                ),
            ));
        }
        if self.reply_wait_ms >= CAMPFIRE_WEBHOOK_TIMEOUT_MS {
            p.push((
                "reply_wait_ms".into(),
                format!(
                    "must be below {CAMPFIRE_WEBHOOK_TIMEOUT_MS} (Campfire stops waiting after 7 s)"
                ),
            ));
        }
        if self.timeout_ms == 0 {
            p.push(("timeout_ms".into(), "must be positive".into()));
        }
        for (i, id) in self.ignore_user_ids.iter().enumerate() {
            if !valid_id(id) {
                p.push((
                    format!("ignore_user_ids[{i}]"),
                    "not a Campfire user id".into(),
                ));
            }
        }
        p.into_iter()
            .map(|(k, m)| (format!("campfire.{k}"), m))
            .collect()
    }

    /// Resolves relative `*_file` paths against `dir` (the config file's).
    pub fn resolve_paths(&mut self, dir: &Path) {
        for f in [&mut self.bot_key_file, &mut self.path_token_file]
            .into_iter()
            .flatten()
        {
            if f.is_relative() {
                *f = dir.join(&*f);
            }
        }
    }
}

fn valid_path_token(t: &str) -> bool {
    t.chars().count() >= MIN_PATH_TOKEN_CHARS
        && t.chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
}

fn read_secret(
    inline: &Option<SecretString>,
    file: &Option<PathBuf>,
    key: &str,
) -> Result<Secret<String>, AdapterError> {
    if let Some(s) = inline {
        return Ok(Secret::new(s.expose().trim().to_string()));
    }
    let Some(path) = file else {
        return Err(AdapterError::Platform {
            what: "campfire".into(),
            message: format!("{key} is not configured"),
        });
    };
    crate::secret::read_private(path)
        .map(|s| Secret::new(s.trim().to_string()))
        .map_err(|source| AdapterError::Io {
            what: format!("campfire {key}_file {}", path.display()),
            source,
        })
}

/// Constant-time equality of a presented secret and the expected one: both
/// are HMACed under a per-process random key and the tags are compared by
/// `ring::hmac::verify`, so timing says nothing about the expected value.
pub(crate) struct SecretMatcher {
    key: ring::hmac::Key,
    expected: ring::hmac::Tag,
}

impl SecretMatcher {
    pub(crate) fn new(expected: &str) -> Result<SecretMatcher, AdapterError> {
        let rng = ring::rand::SystemRandom::new();
        let key = ring::hmac::Key::generate(ring::hmac::HMAC_SHA256, &rng).map_err(|_| {
            AdapterError::Platform {
                what: "campfire".into(),
                message: "no randomness for the path token check".into(),
            }
        })?;
        let expected = ring::hmac::sign(&key, expected.as_bytes());
        Ok(SecretMatcher { key, expected })
    }

    pub(crate) fn matches(&self, presented: &str) -> bool {
        ring::hmac::verify(&self.key, presented.as_bytes(), self.expected.as_ref()).is_ok()
    }
}

/// State shared by the routes and the sender.
struct Shared {
    server: String,
    base_url: String,
    bot_key: Secret<String>,
    bot_id: String,
    ignore: Vec<String>,
    token: SecretMatcher,
    /// Suffix every genuine `room.path` ends with, checked per room id.
    key_check: ring::hmac::Key,
    reply_wait: Duration,
    tx: Mutex<Option<mpsc::Sender<Incoming>>>,
    /// Webhook requests still waiting for their first reply, by the
    /// correlation token carried in `Incoming::thread`.
    pending: Mutex<HashMap<String, oneshot::Sender<String>>>,
    next: AtomicU64,
    http: reqwest::Client,
    /// Where refused requests are reported (the gateway's audit reporter).
    auth_failures: std::sync::OnceLock<AuthFailures>,
    /// Message ids already routed (the gateway's persisted replay records).
    replay: ReplaySlot,
}

/// How long a message id is remembered: Campfire does not sign its
/// webhooks, so this bounds re-deliveries, not a token holder.
pub const DEDUPE_SECS: u64 = 24 * 60 * 60;

/// The receiving half: webhook messages arrive through [`CampfireAdapter::routes`].
pub struct CampfireAdapter {
    rx: mpsc::Receiver<Incoming>,
    shared: Arc<Shared>,
    sender: Arc<CampfireSender>,
}

impl std::fmt::Debug for CampfireAdapter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CampfireAdapter")
            .field("server", &self.shared.server)
            .field("url", &self.shared.base_url)
            .finish_non_exhaustive()
    }
}

/// Ends [`CampfireAdapter::recv`] (after queued messages) for a graceful stop.
#[derive(Clone)]
pub struct Closer(Arc<Shared>);

impl std::fmt::Debug for Closer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("campfire::Closer")
    }
}

impl Closer {
    /// New webhooks are answered 503 from now on.
    pub fn close(&self) {
        self.0.tx.lock().unwrap_or_else(|p| p.into_inner()).take();
    }
}

impl CampfireAdapter {
    /// Reads the secrets (inline or from their files) and builds the
    /// adapter. Nothing is sent until a reply is.
    pub fn new(cfg: &CampfireConfig) -> Result<CampfireAdapter, AdapterError> {
        let problems = cfg.validate();
        if let Some((key, msg)) = problems.first() {
            return Err(AdapterError::Platform {
                what: "campfire config".into(),
                message: format!("{key}: {msg}"),
            });
        }
        let bot_key = read_secret(&cfg.bot_key, &cfg.bot_key_file, "bot_key")?;
        let bot_id = bot_id_of(bot_key.expose())
            .ok_or_else(|| AdapterError::Platform {
                what: "campfire config".into(),
                message: "bot_key: expected <bot-id>-<token> (value not shown)".into(),
            })?
            .to_string();
        let token = read_secret(&cfg.path_token, &cfg.path_token_file, "path_token")?;
        if !valid_path_token(token.expose()) {
            return Err(AdapterError::Platform {
                what: "campfire config".into(),
                message: format!(
                    "path_token: at least {MIN_PATH_TOKEN_CHARS} characters of A-Z, a-z, 0-9, '-' and '_'"
                ),
            });
        }
        let rng = ring::rand::SystemRandom::new();
        let key_check = ring::hmac::Key::generate(ring::hmac::HMAC_SHA256, &rng).map_err(|_| {
            AdapterError::Platform {
                what: "campfire".into(),
                message: "no randomness for the bot key check".into(),
            }
        })?;
        let (tx, rx) = mpsc::channel(QUEUE);
        let shared = Arc::new(Shared {
            server: cfg.server.clone(),
            base_url: cfg.url.trim_end_matches('/').to_string(),
            bot_key,
            bot_id,
            ignore: cfg.ignore_user_ids.clone(),
            token: SecretMatcher::new(token.expose())?,
            key_check,
            reply_wait: Duration::from_millis(cfg.reply_wait_ms),
            tx: Mutex::new(Some(tx)),
            pending: Mutex::new(HashMap::new()),
            next: AtomicU64::new(1),
            http: http_client(Duration::from_millis(cfg.timeout_ms))?,
            auth_failures: std::sync::OnceLock::new(),
            replay: ReplaySlot::default(),
        });
        Ok(CampfireAdapter {
            rx,
            sender: Arc::new(CampfireSender {
                shared: shared.clone(),
            }),
            shared,
        })
    }

    /// A handle that ends `recv` for a graceful shutdown.
    pub fn closer(&self) -> Closer {
        Closer(self.shared.clone())
    }

    /// The channel string of a Campfire room.
    pub fn channel_of(&self, room_id: &str) -> String {
        format!("campfire:{}:{room_id}", self.shared.server)
    }
}

impl ChatAdapter for CampfireAdapter {
    async fn recv(&mut self) -> Option<Incoming> {
        self.rx.recv().await
    }

    fn sender(&self) -> Arc<dyn ChatSender> {
        self.sender.clone()
    }
}

/// A Campfire record id, sent as a JSON number upstream.
#[derive(Debug)]
struct RecordId(String);

impl<'de> Deserialize<'de> for RecordId {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<RecordId, D::Error> {
        match serde_json::Value::deserialize(d)? {
            serde_json::Value::Number(n) if n.is_u64() => Ok(RecordId(n.to_string())),
            serde_json::Value::String(s) if valid_id(&s) => Ok(RecordId(s)),
            _ => Err(serde::de::Error::custom("expected a record id")),
        }
    }
}

/// The webhook body (`Webhook#payload` in Campfire); unknown fields are
/// ignored so newer Campfire versions keep working.
#[derive(Deserialize, Debug)]
struct Payload {
    /// Absent upstream; `"message"` or `"action"` in some versions.
    #[serde(rename = "type", default)]
    kind: Option<String>,
    user: PayloadUser,
    room: PayloadRoom,
    message: PayloadMessage,
}

#[derive(Deserialize, Debug)]
struct PayloadUser {
    id: RecordId,
}

#[derive(Deserialize, Debug)]
struct PayloadRoom {
    id: RecordId,
    /// `/rooms/<id>/<bot_key>/messages` (with any path prefix before it).
    path: String,
}

#[derive(Deserialize, Debug)]
struct PayloadMessage {
    id: RecordId,
    body: PayloadBody,
}

#[derive(Deserialize, Debug)]
struct PayloadBody {
    /// The message as plain text, the bot's own mentions already removed.
    plain: String,
}

fn status(code: StatusCode, text: &'static str) -> Response {
    (code, text).into_response()
}

/// An empty 200 without a content type: Campfire posts nothing for it.
fn no_reply() -> Response {
    StatusCode::OK.into_response()
}

impl Shared {
    fn refused(&self, source: &str, detail: &str) {
        match self.auth_failures.get() {
            Some(a) => a.report("campfire", source, detail),
            None => tracing::warn!(adapter = "campfire", source, detail, "chat request refused"),
        }
    }

    /// Whether `path` is this bot's messages path for `room_id`: Campfire
    /// builds it with the bot's key, so a request without the key is not
    /// from Campfire. Compared in constant time.
    fn room_path_ok(&self, path: &str, room_id: &str) -> bool {
        let expected = format!("/rooms/{room_id}/{}/messages", self.bot_key.expose());
        let start = path.len().saturating_sub(expected.len());
        let tail = path.get(start..).unwrap_or("");
        let tag = ring::hmac::sign(&self.key_check, expected.as_bytes());
        ring::hmac::verify(&self.key_check, tail.as_bytes(), tag.as_ref()).is_ok()
    }

    fn send_incoming(&self, msg: Incoming) -> Result<(), &'static str> {
        let tx = self.tx.lock().unwrap_or_else(|p| p.into_inner()).clone();
        match tx {
            None => Err("shutting down"),
            Some(tx) => tx.try_send(msg).map_err(|_| "queue full"),
        }
    }
}

async fn webhook(
    State(shared): State<Arc<Shared>>,
    UrlPath(token): UrlPath<String>,
    body: Body,
) -> Response {
    if !shared.token.matches(&token) {
        // The token itself is never reported.
        shared.refused("webhook route", "wrong path token (404)");
        return status(StatusCode::NOT_FOUND, "not found\n");
    }
    let bytes = match read_limited(body, MAX_WEBHOOK_BYTES).await {
        Ok(b) => b,
        Err(r) => {
            tracing::warn!(adapter = "campfire", status = %r.status(), "webhook body refused");
            return r;
        }
    };
    let payload: Payload = match serde_json::from_slice(&bytes) {
        Ok(p) => p,
        Err(e) => {
            tracing::warn!(adapter = "campfire", error = %e, "malformed webhook JSON");
            return status(StatusCode::BAD_REQUEST, "malformed JSON\n");
        }
    };
    if payload.kind.as_deref().is_some_and(|k| k != "message") {
        tracing::info!(adapter = "campfire", kind = ?payload.kind, "webhook event type not handled; ignored");
        return no_reply();
    }
    let room_id = payload.room.id.0;
    if !shared.room_path_ok(&payload.room.path, &room_id) {
        shared.refused(
            &format!("user {} in room {room_id}", payload.user.id.0),
            "room path without this bot's key (401)",
        );
        return status(StatusCode::UNAUTHORIZED, "not from this Campfire bot\n");
    }
    let user_id = payload.user.id.0;
    let identity = match Identity::parse(&format!("campfire:{}:{user_id}", shared.server)) {
        Ok(i) => i,
        Err(e) => {
            tracing::warn!(adapter = "campfire", error = %e, "webhook user id refused");
            return status(StatusCode::BAD_REQUEST, "bad user id\n");
        }
    };
    let from_bot = user_id == shared.bot_id || shared.ignore.contains(&user_id);
    let text = payload.message.body.plain.trim().to_string();
    if text.is_empty() {
        return no_reply();
    }
    // Each message runs once: its id is recorded (durably, in the
    // gateway's replay records) before it is routed, so the same message
    // delivered again, also after a restart, is dropped and reported.
    let message_id = &payload.message.id.0;
    let until = unix_now().saturating_add(DEDUPE_SECS);
    match shared
        .replay
        .get()
        .admit("campfire", &format!("{room_id}:{message_id}"), until)
        .await
    {
        Ok(()) => {}
        Err(Refusal::Replay) => {
            shared.refused(
                &format!("user {user_id} in room {room_id}"),
                &format!("message {message_id} delivered again; not run twice"),
            );
            return no_reply();
        }
        Err(Refusal::Unavailable) => return status(StatusCode::SERVICE_UNAVAILABLE, "busy\n"),
        // Another gateway of this server answers it.
        Err(Refusal::Elsewhere) => return no_reply(),
    }
    let channel = format!("campfire:{}:{room_id}", shared.server);
    // The correlation token travels as the message's thread: the router
    // copies it into every reply, so the sender knows which request a
    // reply answers.
    let thread = format!(
        "{}.{}",
        payload.message.id.0,
        shared.next.fetch_add(1, Ordering::Relaxed)
    );
    let msg = Incoming {
        identity,
        channel,
        text,
        thread: Some(thread.clone()),
        direct: true,
        from_bot,
    };
    if from_bot {
        let _ = shared.send_incoming(msg);
        return no_reply();
    }
    let (reply_tx, reply_rx) = oneshot::channel();
    {
        let mut pending = shared.pending.lock().unwrap_or_else(|p| p.into_inner());
        if pending.len() >= MAX_PENDING {
            tracing::warn!(adapter = "campfire", "too many webhooks waiting; refused");
            return status(StatusCode::SERVICE_UNAVAILABLE, "busy\n");
        }
        pending.insert(thread.clone(), reply_tx);
    }
    // Whatever happens to this request (answered, timed out, or the client
    // went away and the future is dropped), its entry does not outlive it.
    let _guard = PendingGuard {
        shared: &shared,
        thread: &thread,
    };
    if let Err(why) = shared.send_incoming(msg) {
        tracing::warn!(adapter = "campfire", why, "webhook message dropped");
        return status(StatusCode::SERVICE_UNAVAILABLE, "busy\n");
    }
    match tokio::time::timeout(shared.reply_wait, reply_rx).await {
        Ok(Ok(html)) => {
            let mut r = Response::new(Body::from(html));
            r.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("text/html; charset=utf-8"),
            );
            r
        }
        _ => {
            // No reply in time: later replies go to the room's bot URL.
            no_reply()
        }
    }
}

impl Shared {
    fn take_pending(&self, thread: &str) -> Option<oneshot::Sender<String>> {
        self.pending
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(thread)
    }

    fn room_of<'c>(&self, channel: &'c str) -> Result<&'c str, AdapterError> {
        channel
            .strip_prefix("campfire:")
            .and_then(|r| r.strip_prefix(self.server.as_str()))
            .and_then(|r| r.strip_prefix(':'))
            .filter(|id| valid_id(id))
            .ok_or_else(|| AdapterError::Platform {
                what: "campfire".into(),
                message: format!(
                    "channel {channel:?} is not campfire:{}:<room_id>",
                    self.server
                ),
            })
    }

    /// POSTs `html` as a new message in `room`; retries only where no
    /// message can have been created (429, 503, connection refused).
    async fn post(&self, room: &str, html: String) -> Result<String, AdapterError> {
        let url = format!(
            "{}/rooms/{room}/{}/messages",
            self.base_url,
            self.bot_key.expose()
        );
        // The URL holds the bot key: errors name the room, never the URL.
        let fail = |message: String| AdapterError::Platform {
            what: format!("campfire room {room}"),
            message,
        };
        let mut attempt = 0;
        loop {
            attempt += 1;
            let res = self
                .http
                .post(&url)
                .header(header::CONTENT_TYPE, "text/html; charset=utf-8")
                .body(html.clone())
                .send()
                .await;
            let wait = match res {
                Ok(r) if r.status().is_success() => {
                    let id = r
                        .headers()
                        .get(header::LOCATION)
                        .and_then(|l| l.to_str().ok())
                        .and_then(|l| l.trim_end_matches('/').rsplit('/').next())
                        .map(|s| s.trim_start_matches('@').to_string())
                        .unwrap_or_default();
                    return Ok(id);
                }
                Ok(r) if r.status().is_redirection() => {
                    return Err(fail(
                        "the bot key was refused (redirected to sign-in)".into(),
                    ));
                }
                Ok(r) if r.status() == StatusCode::NOT_FOUND => {
                    return Err(fail("room not found, or the bot is not a member".into()));
                }
                Ok(r)
                    if r.status() == StatusCode::TOO_MANY_REQUESTS
                        || r.status() == StatusCode::SERVICE_UNAVAILABLE =>
                {
                    let after = r
                        .headers()
                        .get(header::RETRY_AFTER)
                        .and_then(|v| v.to_str().ok())
                        .and_then(|v| v.trim().parse::<u64>().ok())
                        .map(Duration::from_secs);
                    (format!("HTTP {}", r.status().as_u16()), after)
                }
                Ok(r) => return Err(fail(format!("HTTP {}", r.status().as_u16()))),
                Err(e) if e.is_connect() => ("cannot connect".to_string(), None),
                Err(e) if e.is_timeout() => return Err(fail("timed out".into())),
                Err(_) => return Err(fail("request failed".into())),
            };
            let (why, after) = wait;
            if attempt >= POST_ATTEMPTS {
                return Err(fail(format!("{why} after {attempt} attempts")));
            }
            let backoff = crate::backoff::Backoff {
                first: Duration::from_millis(500),
                factor: 2.0,
                max: MAX_RETRY_WAIT,
                jitter: crate::backoff::Jitter::HalfToFull,
            }
            .delay(attempt - 1);
            let d = after.unwrap_or(backoff).min(MAX_RETRY_WAIT);
            tracing::debug!(
                adapter = "campfire",
                room,
                why,
                wait_ms = d.as_millis() as u64,
                "retrying post"
            );
            tokio::time::sleep(d).await;
        }
    }
}

/// Removes a request's pending entry when the request ends.
struct PendingGuard<'a> {
    shared: &'a Shared,
    thread: &'a str,
}

impl Drop for PendingGuard<'_> {
    fn drop(&mut self) {
        self.shared.take_pending(self.thread);
    }
}

/// The sending half: the HTTP response of a waiting webhook, or a POST to
/// the room's bot-key messages URL.
pub struct CampfireSender {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for CampfireSender {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CampfireSender")
            .field("server", &self.shared.server)
            .finish_non_exhaustive()
    }
}

impl ChatSender for CampfireSender {
    fn send<'a>(
        &'a self,
        channel: &'a str,
        reply: Reply,
    ) -> BoxFuture<'a, Result<MessageRef, AdapterError>> {
        Box::pin(async move {
            let room = self.shared.room_of(channel)?;
            let mut html = render(&reply);
            if let Some(thread) = reply.thread.as_deref()
                && let Some(waiting) = self.shared.take_pending(thread)
            {
                match waiting.send(html) {
                    Ok(()) => {
                        return Ok(MessageRef {
                            channel: channel.to_string(),
                            id: format!("response:{thread}"),
                        });
                    }
                    // The request timed out just now: post instead.
                    Err(back) => html = back,
                }
            }
            let id = self.shared.post(room, html).await?;
            Ok(MessageRef {
                channel: channel.to_string(),
                id,
            })
        })
    }

    fn edit<'a>(
        &'a self,
        msg: &'a MessageRef,
        _reply: Reply,
    ) -> BoxFuture<'a, Result<(), AdapterError>> {
        Box::pin(async move {
            Err(AdapterError::Platform {
                what: "campfire".into(),
                message: format!(
                    "message {} cannot be edited by a bot; post a new one",
                    msg.id
                ),
            })
        })
    }

    fn can_edit(&self) -> bool {
        false
    }
}

impl crate::adapters::HttpInbound for CampfireAdapter {
    /// `POST /campfire/{path_token}`, to be mounted on the gateway's HTTP
    /// listener. Give Campfire `<gateway URL>/campfire/<path_token>` as the
    /// bot's webhook URL.
    fn routes(&self) -> axum::Router {
        axum::Router::new()
            .route(
                &format!("{ROUTE_PREFIX}/{{token}}"),
                axum::routing::post(webhook),
            )
            .with_state(self.shared.clone())
    }

    /// Reports webhooks refused for a wrong path token or a room path
    /// without this bot's key to `to` (the gateway records them as
    /// `auth_failed`). Set once; later calls are ignored.
    fn report_auth_failures(&self, to: AuthFailures) {
        let _ = self.shared.auth_failures.set(to);
    }

    /// Keeps routed message ids in `guard` (the gateway's, persisted in
    /// its state directory) from now on.
    fn use_replay_guard(&self, guard: ReplayGuard) {
        self.shared.replay.set(guard);
    }
}

impl crate::registry::Component for CampfireConfig {
    const NAME: &'static str = "campfire";
    const CHAT: bool = true;

    fn resolve_paths(&mut self, base: &Path) {
        CampfireConfig::resolve_paths(self, base);
    }

    fn validate(&self) -> Vec<(String, String)> {
        CampfireConfig::validate(self)
    }

    async fn build(self, cx: &mut crate::registry::BuildContext) -> Result<(), String> {
        let a = CampfireAdapter::new(&self).map_err(|e| e.to_string())?;
        cx.serve_http(Self::NAME, a);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> CampfireConfig {
        CampfireConfig {
            url: "https://chat.example.com".into(),
            server: "acme".into(),
            bot_key: Some(SecretString::new("7-kR3x9mP8qL2n")),
            bot_key_file: None,
            path_token: Some(SecretString::new("abcdefghijklmnopqrstuvwxyz012345")),
            path_token_file: None,
            reply_wait_ms: 3000,
            timeout_ms: 1000,
            ignore_user_ids: vec![],
        }
    }

    #[test]
    fn validate_names_each_bad_key() {
        assert_eq!(cfg().validate(), vec![]);
        let mut c = cfg();
        c.url = "ftp://x".into();
        c.server = "Acme Corp".into();
        c.bot_key = Some(SecretString::new("nokey"));
        c.path_token = Some(SecretString::new("short"));
        c.reply_wait_ms = 7000;
        c.ignore_user_ids = vec!["a b".into()];
        let keys: Vec<String> = c.validate().into_iter().map(|(k, _)| k).collect();
        assert_eq!(
            keys,
            [
                "campfire.url",
                "campfire.server",
                "campfire.bot_key",
                "campfire.path_token",
                "campfire.reply_wait_ms",
                "campfire.ignore_user_ids[0]"
            ]
        );
        let mut c = cfg();
        c.bot_key_file = Some("/k".into());
        c.path_token = None;
        let problems = c.validate();
        assert_eq!(problems.len(), 2, "{problems:?}");
        assert!(
            !format!("{problems:?}").contains("kR3x9mP8qL2n"),
            "secrets never in problems"
        );
    }

    #[test]
    fn bot_ids() {
        assert_eq!(bot_id_of("7-kR3x9mP8qL2n"), Some("7"));
        assert_eq!(bot_id_of("7-"), None);
        assert_eq!(bot_id_of("7-a/b"), None);
        assert_eq!(bot_id_of("x"), None);
    }

    #[test]
    fn room_path_must_carry_the_bot_key() {
        let a = CampfireAdapter::new(&cfg()).unwrap_or_else(|e| panic!("{e}"));
        let s = &a.shared;
        assert!(s.room_path_ok("/rooms/12/7-kR3x9mP8qL2n/messages", "12"));
        assert!(s.room_path_ok("/chat/rooms/12/7-kR3x9mP8qL2n/messages", "12"));
        assert!(!s.room_path_ok("/rooms/12/7-wrong/messages", "12"));
        assert!(!s.room_path_ok("/rooms/13/7-kR3x9mP8qL2n/messages", "12"));
        assert!(!s.room_path_ok("", "12"));
    }

    #[test]
    fn path_tokens_compare_exactly() {
        let m = SecretMatcher::new("abcdefghijklmnopqrstuvwxyz012345")
            .unwrap_or_else(|e| panic!("{e}"));
        assert!(m.matches("abcdefghijklmnopqrstuvwxyz012345"));
        assert!(!m.matches("abcdefghijklmnopqrstuvwxyz01234"));
        assert!(!m.matches(""));
    }

    #[test]
    fn config_debug_redacts_secrets() {
        let text = format!("{:?}", cfg());
        assert!(
            !text.contains("kR3x9mP8qL2n") && !text.contains("abcdefghij"),
            "{text}"
        );
    }
}
