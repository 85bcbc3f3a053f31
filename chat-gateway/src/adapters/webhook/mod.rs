//! Generic webhooks, for chats without an adapter.
//!
//! * **Incoming** (`[[webhook.incoming]]`): `POST /webhook/<name>` with
//!   `{"user": "...", "channel": "...", "text": "..."}`, signed with the
//!   hook's secret (see [`sign`]). The hook vouches for its user: the
//!   identity is `webhook:<name>:<user>`, so whoever holds the hook's
//!   secret can speak as any user of that hook — bind `webhook:<name>:*`
//!   or specific users accordingly. The channel is
//!   `webhook:<name>:<channel>` (`webhook:<name>` without one). The first
//!   reply within `reply_wait_ms` is the response body
//!   (`{"text": …, "reply": {…}}`); later replies (a job's result) are
//!   POSTed, signed the same way, to the hook's optional `reply_url`.
//! * **Outgoing** (`[[webhook.outgoing]]`): [`WebhookSender::notify`] (or
//!   `send` to channel `webhook-out:<name>`) POSTs
//!   `{"channel", "text", "reply"}` signed with the hook's secret, retrying
//!   with bounded backoff on 5xx, timeouts and 429 (honouring
//!   `Retry-After`), never on other 4xx.
//!
//! `reply` is the structured reply as data (header, lines, sections,
//! actions): raw text the receiver must escape for its platform. `text` is
//! a plain rendering already made inert: control characters replaced,
//! mentions broken (`@` is followed by U+2060), output lines prefixed with
//! `  | ` so none starts like a command.

pub mod sign;

use crate::unix_now;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Json;
use axum::body::Body;
use axum::extract::{Path as UrlPath, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use fleetcmd_core::crypto::Secret;
use fleetcmd_core::ids::Identity;
use serde::{Deserialize, Serialize};

use crate::secret::SecretString;
use tokio::sync::{mpsc, oneshot};

use super::{
    AdapterError, AuthFailures, BoxFuture, ChatAdapter, ChatSender, Incoming, MessageRef, Reply,
};
use crate::body::read_request as read_limited;
use crate::http_client::http_client;
use crate::render::sanitize;
use crate::store::{Refusal, ReplayGuard, ReplaySlot};

/// Route prefix: `POST /webhook/<name>`.
pub const ROUTE_PREFIX: &str = "/webhook";
/// Largest incoming body accepted; larger ones get 413.
pub const MAX_BODY_BYTES: usize = 64 * 1024;
/// Incoming messages waiting for the router; when full the hook is
/// answered 503 (nothing is queued without bound).
pub const QUEUE: usize = 256;
const MAX_PENDING: usize = 1024;
/// First retry delay; doubled per attempt up to [`MAX_BACKOFF`].
pub const BASE_BACKOFF: Duration = Duration::from_millis(250);
pub const MAX_BACKOFF: Duration = Duration::from_secs(5);
/// Longest `Retry-After` honoured; a longer one is cut to this.
pub const MAX_RETRY_AFTER: Duration = Duration::from_secs(30);
/// The channel prefix of outgoing hooks.
pub const OUT_PREFIX: &str = "webhook-out:";

/// Defaults, in one place.
pub mod defaults {
    pub const REPLY_WAIT_MS: u64 = 5_000;
    pub const TIMEOUT_MS: u64 = 10_000;
    pub const MAX_ATTEMPTS: u32 = 4;

    pub(super) fn reply_wait_ms() -> u64 {
        REPLY_WAIT_MS
    }
    pub(super) fn timeout_ms() -> u64 {
        TIMEOUT_MS
    }
    pub(super) fn max_attempts() -> u32 {
        MAX_ATTEMPTS
    }
}

/// `[webhook]` in gateway.toml.
///
/// ```toml
/// [[webhook.incoming]]
/// name = "ops-tool"
/// secret_file = "/etc/fleetcmd/webhook-ops-tool.secret"   # or secret = "…"
/// reply_wait_ms = 5000
/// reply_url = "https://ops-tool.example.com/fleetcmd/replies"   # optional
///
/// [[webhook.outgoing]]
/// name = "pager"
/// url = "https://pager.example.com/hooks/fleetcmd"
/// secret_file = "/etc/fleetcmd/webhook-pager.secret"
/// ```
#[derive(Deserialize, Debug, Clone, PartialEq, Eq, Default)]
#[serde(deny_unknown_fields)]
pub struct WebhookConfig {
    #[serde(default)]
    pub incoming: Vec<IncomingHookConfig>,
    #[serde(default)]
    pub outgoing: Vec<OutgoingHookConfig>,
}

/// One `[[webhook.incoming]]`.
#[derive(Deserialize, Debug, Clone, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct IncomingHookConfig {
    /// `POST /webhook/<name>`; also in identities (`webhook:<name>:<user>`).
    pub name: String,
    #[serde(default)]
    pub secret: Option<SecretString>,
    #[serde(default)]
    pub secret_file: Option<PathBuf>,
    /// How long a request waits for the first reply; then 202 and later
    /// replies go to `reply_url`.
    #[serde(default = "defaults::reply_wait_ms")]
    pub reply_wait_ms: u64,
    /// Where replies after the first are POSTed (signed); without it they
    /// are dropped with a log line.
    #[serde(default)]
    pub reply_url: Option<String>,
    #[serde(default = "defaults::timeout_ms")]
    pub timeout_ms: u64,
    #[serde(default = "defaults::max_attempts")]
    pub max_attempts: u32,
}

/// One `[[webhook.outgoing]]`.
#[derive(Deserialize, Debug, Clone, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct OutgoingHookConfig {
    /// The channel `webhook-out:<name>`.
    pub name: String,
    pub url: String,
    #[serde(default)]
    pub secret: Option<SecretString>,
    #[serde(default)]
    pub secret_file: Option<PathBuf>,
    /// Timeout of each attempt.
    #[serde(default = "defaults::timeout_ms")]
    pub timeout_ms: u64,
    /// Attempts in all (the first one included).
    #[serde(default = "defaults::max_attempts")]
    pub max_attempts: u32,
}

/// Shortest secret accepted (bytes): HMAC keys should not be guessable.
pub const MIN_SECRET_BYTES: usize = 16;
/// Longest wait for a first reply.
pub const MAX_REPLY_WAIT_MS: u64 = 60_000;

fn valid_hook_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && s.chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '_')
}

/// Users named by a hook: no `:` (identities stay unambiguous), no spaces.
fn valid_user(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 128
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-' | '@' | '+'))
}

fn valid_channel(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 128
        && s.chars().all(|c| {
            c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-' | '@' | '+' | '#' | '/')
        })
}

fn check_url(p: &mut Vec<(String, String)>, key: String, url: &str) {
    match reqwest::Url::parse(url) {
        Ok(u) if matches!(u.scheme(), "http" | "https") && u.host().is_some() => {}
        Ok(_) => p.push((key, "must be an http(s) URL with a host".into())),
        Err(e) => p.push((key, format!("not a URL: {e}"))),
    }
}

fn check_secret(
    p: &mut Vec<(String, String)>,
    at: &str,
    inline: &Option<SecretString>,
    file: &Option<PathBuf>,
) {
    match (inline, file) {
        (Some(_), Some(_)) => p.push((
            format!("{at}.secret"),
            "give either secret or secret_file, not both".into(),
        )),
        (None, None) => p.push((format!("{at}.secret"), "required (or secret_file)".into())),
        (Some(s), None) if s.expose().trim().len() < MIN_SECRET_BYTES => p.push((
            format!("{at}.secret"),
            format!("at least {MIN_SECRET_BYTES} bytes (value not shown)"),
        )),
        _ => {}
    }
}

impl WebhookConfig {
    /// Every problem, with its key path (`webhook.incoming[0].secret`).
    pub fn validate(&self) -> Vec<(String, String)> {
        let mut p = Vec::new();
        let mut seen = std::collections::HashSet::new();
        for (i, h) in self.incoming.iter().enumerate() {
            let at = format!("webhook.incoming[{i}]");
            if !valid_hook_name(&h.name) {
                p.push((
                    format!("{at}.name"),
                    "1-64 characters of a-z, 0-9, '-' and '_'".into(),
                ));
            } else if !seen.insert(h.name.clone()) {
                p.push((format!("{at}.name"), format!("duplicate hook {:?}", h.name)));
            }
            check_secret(&mut p, &at, &h.secret, &h.secret_file);
            if h.reply_wait_ms > MAX_REPLY_WAIT_MS {
                p.push((
                    format!("{at}.reply_wait_ms"),
                    format!("at most {MAX_REPLY_WAIT_MS}"),
                ));
            }
            if let Some(u) = &h.reply_url {
                check_url(&mut p, format!("{at}.reply_url"), u);
            }
            if h.timeout_ms == 0 {
                p.push((format!("{at}.timeout_ms"), "must be positive".into()));
            }
            if !(1..=10).contains(&h.max_attempts) {
                p.push((format!("{at}.max_attempts"), "1 to 10".into()));
            }
        }
        let mut seen = std::collections::HashSet::new();
        for (i, h) in self.outgoing.iter().enumerate() {
            let at = format!("webhook.outgoing[{i}]");
            if !valid_hook_name(&h.name) {
                p.push((
                    format!("{at}.name"),
                    "1-64 characters of a-z, 0-9, '-' and '_'".into(),
                ));
            } else if !seen.insert(h.name.clone()) {
                p.push((format!("{at}.name"), format!("duplicate hook {:?}", h.name)));
            }
            check_url(&mut p, format!("{at}.url"), &h.url);
            check_secret(&mut p, &at, &h.secret, &h.secret_file);
            if h.timeout_ms == 0 {
                p.push((format!("{at}.timeout_ms"), "must be positive".into()));
            }
            if !(1..=10).contains(&h.max_attempts) {
                p.push((format!("{at}.max_attempts"), "1 to 10".into()));
            }
        }
        p
    }

    /// Resolves relative `secret_file` paths against `dir` (the config file's).
    pub fn resolve_paths(&mut self, dir: &Path) {
        let files = self
            .incoming
            .iter_mut()
            .map(|h| &mut h.secret_file)
            .chain(self.outgoing.iter_mut().map(|h| &mut h.secret_file));
        for f in files.flatten() {
            if f.is_relative() {
                *f = dir.join(&*f);
            }
        }
    }
}

fn load_secret(
    inline: &Option<SecretString>,
    file: &Option<PathBuf>,
    what: &str,
) -> Result<Secret<String>, AdapterError> {
    let value = crate::secret::load_secret(inline, file, "secret").map_err(|message| {
        AdapterError::Platform {
            what: what.to_string(),
            message,
        }
    })?;
    match value {
        Some(v) if v.expose().len() >= MIN_SECRET_BYTES => Ok(v),
        _ => Err(AdapterError::Platform {
            what: what.to_string(),
            message: format!("secret shorter than {MIN_SECRET_BYTES} bytes"),
        }),
    }
}

fn status(code: StatusCode, text: &'static str) -> Response {
    (code, text).into_response()
}

/// The structured reply in JSON (raw data; the receiver escapes it).
#[derive(Serialize, Debug, Clone, PartialEq, Eq)]
pub struct ReplyJson {
    pub header: String,
    pub lines: Vec<String>,
    pub sections: Vec<SectionJson>,
    pub actions: Vec<ActionJson>,
}

#[derive(Serialize, Debug, Clone, PartialEq, Eq)]
pub struct SectionJson {
    pub title: String,
    pub notes: Vec<String>,
    pub blocks: Vec<BlockJson>,
}

#[derive(Serialize, Debug, Clone, PartialEq, Eq)]
pub struct BlockJson {
    pub label: String,
    pub text: String,
}

#[derive(Serialize, Debug, Clone, PartialEq, Eq)]
pub struct ActionJson {
    pub label: String,
    pub command: String,
    pub danger: bool,
}

impl From<&Reply> for ReplyJson {
    fn from(r: &Reply) -> ReplyJson {
        ReplyJson {
            header: r.header.clone(),
            lines: r.lines.clone(),
            sections: r
                .sections
                .iter()
                .map(|s| SectionJson {
                    title: s.title.clone(),
                    notes: s.notes.clone(),
                    blocks: s
                        .blocks
                        .iter()
                        .map(|b| BlockJson {
                            label: b.label.clone(),
                            text: b.text.clone(),
                        })
                        .collect(),
                })
                .collect(),
            actions: r
                .actions
                .iter()
                .map(|a| ActionJson {
                    label: a.label.clone(),
                    command: a.command.clone(),
                    danger: a.danger,
                })
                .collect(),
        }
    }
}

/// The body of the first reply (HTTP response) and of every POST we send.
#[derive(Serialize, Debug, Clone, PartialEq, Eq)]
pub struct Envelope {
    /// Absent in the HTTP response (the caller knows where it asked).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub channel: Option<String>,
    pub text: Option<String>,
    pub reply: Option<ReplyJson>,
}

impl Envelope {
    pub fn of(channel: Option<&str>, reply: &Reply) -> Envelope {
        Envelope {
            channel: channel.map(str::to_string),
            text: Some(render_text(reply)),
            reply: Some(ReplyJson::from(reply)),
        }
    }
}

/// `@name` and Slack-style `<!here>` / `<@U1>` no longer mention anyone.
fn break_mentions(s: &str) -> String {
    s.replace('@', "@\u{2060}").replace("<!", "<\u{200B}!")
}

/// One line of untrusted text, inert: control characters replaced,
/// mentions broken, no leading command prefix.
fn inert(s: &str) -> String {
    let s = break_mentions(&sanitize(s));
    if s.trim_start().starts_with(['!', '/']) {
        format!("\u{200B}{s}")
    } else {
        s
    }
}

/// Plain-text rendering, every line inert; output lines start with `  | `.
pub fn render_text(reply: &Reply) -> String {
    let mut s = inert(&reply.header);
    for l in &reply.lines {
        s.push_str("\n  ");
        s.push_str(&inert(l));
    }
    for sec in &reply.sections {
        if !sec.title.is_empty() {
            s.push_str("\n  ");
            s.push_str(&inert(&sec.title));
        }
        for n in &sec.notes {
            s.push_str("\n    (");
            s.push_str(&inert(n));
            s.push(')');
        }
        for b in &sec.blocks {
            if !b.label.is_empty() {
                s.push_str("\n    ");
                s.push_str(&inert(&b.label));
                s.push(':');
            }
            for line in b.text.split('\n') {
                s.push_str("\n  | ");
                s.push_str(&break_mentions(&sanitize(line)));
            }
        }
    }
    for a in &reply.actions {
        s.push_str("\n  ");
        s.push_str(&inert(&a.label));
        s.push_str(": type `");
        s.push_str(&inert(&a.command));
        s.push('`');
    }
    s
}

/// What one attempt of a POST came to, for [`retry_wait`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Attempt {
    /// An HTTP status, with `Retry-After` in seconds when the server sent one.
    Status(u16, Option<u64>),
    Timeout,
    Connect,
    /// Anything else (TLS, a body error): not retried.
    Other,
}

/// How long to wait before attempt `attempt + 1`, or `None` to stop.
/// Retried: 5xx, 429 (after `Retry-After`, at most [`MAX_RETRY_AFTER`]),
/// timeouts and refused connections, with backoff doubling from
/// [`BASE_BACKOFF`] to [`MAX_BACKOFF`], jittered down to half
/// (`unit` in [0, 1] picks where; 1: the full wait) so that many gateways
/// do not retry in step. Never retried: 2xx, 3xx, other 4xx.
pub fn retry_wait(
    outcome: &Attempt,
    attempt: u32,
    max_attempts: u32,
    unit: f64,
) -> Option<Duration> {
    if attempt >= max_attempts {
        return None;
    }
    let backoff = crate::backoff::Backoff {
        first: BASE_BACKOFF,
        factor: 2.0,
        max: MAX_BACKOFF,
        jitter: crate::backoff::Jitter::HalfToFull,
    }
    .delay_with(attempt.saturating_sub(1), unit);
    match outcome {
        Attempt::Status(429, after) => Some(
            after
                .map(Duration::from_secs)
                .unwrap_or(backoff)
                .min(MAX_RETRY_AFTER),
        ),
        Attempt::Status(s, _) if (500..600).contains(s) => Some(backoff),
        Attempt::Timeout | Attempt::Connect => Some(backoff),
        _ => None,
    }
}

/// A destination for signed POSTs.
struct Target {
    what: String,
    url: String,
    secret: Secret<String>,
    max_attempts: u32,
    http: reqwest::Client,
}

impl Target {
    /// POSTs `body` signed (a fresh timestamp per attempt), with retries.
    async fn post(&self, body: &[u8]) -> Result<(), AdapterError> {
        let fail = |message: String| AdapterError::Platform {
            what: self.what.clone(),
            message,
        };
        let mut attempt = 0u32;
        loop {
            attempt += 1;
            let ts = unix_now();
            let sig = sign::sign(self.secret.expose().as_bytes(), ts, body);
            let res = self
                .http
                .post(&self.url)
                .header(header::CONTENT_TYPE, "application/json")
                .header(sign::TIMESTAMP_HEADER, ts.to_string())
                .header(sign::SIGNATURE_HEADER, sig)
                .body(body.to_vec())
                .send()
                .await;
            let outcome = match res {
                Ok(r) if r.status().is_success() => return Ok(()),
                Ok(r) => Attempt::Status(
                    r.status().as_u16(),
                    r.headers()
                        .get(header::RETRY_AFTER)
                        .and_then(|v| v.to_str().ok())
                        .and_then(|v| v.trim().parse::<u64>().ok()),
                ),
                Err(e) if e.is_timeout() => Attempt::Timeout,
                Err(e) if e.is_connect() => Attempt::Connect,
                Err(_) => Attempt::Other,
            };
            let why = match &outcome {
                Attempt::Status(s, _) => format!("HTTP {s}"),
                Attempt::Timeout => "timed out".into(),
                Attempt::Connect => "cannot connect".into(),
                Attempt::Other => "request failed".into(),
            };
            match retry_wait(
                &outcome,
                attempt,
                self.max_attempts,
                crate::backoff::random_unit(),
            ) {
                Some(wait) => {
                    tracing::debug!(target_hook = %self.what, why, attempt, wait_ms = wait.as_millis() as u64, "retrying webhook post");
                    tokio::time::sleep(wait).await;
                }
                None => {
                    return Err(fail(format!(
                        "{why} (attempt {attempt} of {})",
                        self.max_attempts
                    )));
                }
            }
        }
    }
}

struct InHook {
    secret: Secret<String>,
    reply_wait: Duration,
    reply_to: Option<Target>,
}

struct Shared {
    incoming: HashMap<String, InHook>,
    outgoing: HashMap<String, Target>,
    tx: Mutex<Option<mpsc::Sender<Incoming>>>,
    pending: Mutex<HashMap<String, oneshot::Sender<Envelope>>>,
    /// Signatures accepted inside their window (persisted by the gateway):
    /// a captured request replayed inside the window is refused.
    replay: ReplaySlot,
    /// Where refused requests are reported (the gateway's audit reporter).
    auth_failures: std::sync::OnceLock<AuthFailures>,
    next: AtomicU64,
}

impl Shared {
    fn refused(&self, hook: &str, detail: &str) {
        let adapter = format!("webhook:{hook}");
        let source = format!("{ROUTE_PREFIX}/{hook}");
        match self.auth_failures.get() {
            Some(a) => a.report(&adapter, source, detail),
            None => tracing::warn!(adapter, source, detail, "chat request refused"),
        }
    }

    /// Records an accepted signature (persisted, until it can no longer
    /// verify); a second use, also after a restart, is a replay (409).
    async fn first_use(
        &self,
        hook: &str,
        sig: &str,
        ts: &str,
    ) -> Result<(), (StatusCode, &'static str)> {
        let ts: u64 = ts.trim().parse().unwrap_or_else(|_| unix_now());
        // A timestamp is accepted up to MAX_SKEW_SECS either side of now,
        // so keep each signature until it can no longer verify.
        let key = format!("{hook} {}", sig.trim().to_ascii_lowercase());
        match self
            .replay
            .get()
            .admit("webhook", &key, ts.saturating_add(sign::MAX_SKEW_SECS))
            .await
        {
            Ok(()) => Ok(()),
            Err(Refusal::Replay) => {
                self.refused(hook, "replayed request (409)");
                Err((StatusCode::CONFLICT, "replayed request\n"))
            }
            Err(Refusal::Unavailable) => Err((StatusCode::SERVICE_UNAVAILABLE, "busy\n")),
            // Another gateway of this chat answers it.
            Err(Refusal::Elsewhere) => Err((StatusCode::OK, "handled by another gateway\n")),
        }
    }

    fn take_pending(&self, thread: &str) -> Option<oneshot::Sender<Envelope>> {
        self.pending
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(thread)
    }
}

/// The receiving half; messages arrive through [`WebhookAdapter::routes`].
pub struct WebhookAdapter {
    rx: mpsc::Receiver<Incoming>,
    shared: Arc<Shared>,
    sender: Arc<WebhookSender>,
}

impl std::fmt::Debug for WebhookAdapter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut inc: Vec<_> = self.shared.incoming.keys().collect();
        inc.sort();
        let mut out: Vec<_> = self.shared.outgoing.keys().collect();
        out.sort();
        f.debug_struct("WebhookAdapter")
            .field("incoming", &inc)
            .field("outgoing", &out)
            .finish_non_exhaustive()
    }
}

/// Ends [`WebhookAdapter::recv`] (after queued messages) for a graceful stop.
#[derive(Clone)]
pub struct Closer(Arc<Shared>);

impl std::fmt::Debug for Closer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("webhook::Closer")
    }
}

impl Closer {
    /// New requests are answered 503 from now on.
    pub fn close(&self) {
        self.0.tx.lock().unwrap_or_else(|p| p.into_inner()).take();
    }
}

impl WebhookAdapter {
    /// Validates `cfg`, reads the secrets (inline or from their files) and
    /// builds the adapter.
    pub fn new(cfg: &WebhookConfig) -> Result<WebhookAdapter, AdapterError> {
        if let Some((key, msg)) = cfg.validate().into_iter().next() {
            return Err(AdapterError::Platform {
                what: "webhook config".into(),
                message: format!("{key}: {msg}"),
            });
        }
        let mut incoming = HashMap::new();
        for h in &cfg.incoming {
            let what = format!("webhook {}", h.name);
            let secret = load_secret(&h.secret, &h.secret_file, &what)?;
            let reply_to = match &h.reply_url {
                Some(url) => Some(Target {
                    what: format!("webhook {} reply_url", h.name),
                    url: url.clone(),
                    secret: Secret::new(secret.expose().clone()),
                    max_attempts: h.max_attempts,
                    http: http_client(Duration::from_millis(h.timeout_ms))?,
                }),
                None => None,
            };
            incoming.insert(
                h.name.clone(),
                InHook {
                    secret,
                    reply_wait: Duration::from_millis(h.reply_wait_ms),
                    reply_to,
                },
            );
        }
        let mut outgoing = HashMap::new();
        for h in &cfg.outgoing {
            let what = format!("webhook-out {}", h.name);
            outgoing.insert(
                h.name.clone(),
                Target {
                    secret: load_secret(&h.secret, &h.secret_file, &what)?,
                    what,
                    url: h.url.clone(),
                    max_attempts: h.max_attempts,
                    http: http_client(Duration::from_millis(h.timeout_ms))?,
                },
            );
        }
        let (tx, rx) = mpsc::channel(QUEUE);
        let shared = Arc::new(Shared {
            incoming,
            outgoing,
            tx: Mutex::new(Some(tx)),
            pending: Mutex::new(HashMap::new()),
            replay: ReplaySlot::default(),
            auth_failures: std::sync::OnceLock::new(),
            next: AtomicU64::new(1),
        });
        Ok(WebhookAdapter {
            rx,
            sender: Arc::new(WebhookSender {
                shared: shared.clone(),
            }),
            shared,
        })
    }

    /// A handle that ends `recv` for a graceful shutdown.
    pub fn closer(&self) -> Closer {
        Closer(self.shared.clone())
    }

    /// The sender, for notifications outside the router.
    pub fn webhook_sender(&self) -> Arc<WebhookSender> {
        self.sender.clone()
    }

    /// Posts `reply` to the outgoing hook `name` (see [`WebhookSender::notify`]).
    pub async fn notify(&self, name: &str, reply: Reply) -> Result<(), AdapterError> {
        self.sender.notify(name, reply).await
    }
}

impl ChatAdapter for WebhookAdapter {
    async fn recv(&mut self) -> Option<Incoming> {
        self.rx.recv().await
    }

    fn sender(&self) -> Arc<dyn ChatSender> {
        self.sender.clone()
    }
}

/// The incoming body. Unknown fields are ignored.
#[derive(Deserialize, Debug)]
struct InBody {
    user: String,
    #[serde(default)]
    channel: Option<String>,
    text: String,
}

fn header_str<'h>(h: &'h HeaderMap, name: &str) -> Option<&'h str> {
    h.get(name).and_then(|v| v.to_str().ok())
}

async fn incoming(
    State(shared): State<Arc<Shared>>,
    UrlPath(name): UrlPath<String>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let Some(hook) = shared.incoming.get(&name) else {
        let shown: String = sanitize(&name).chars().take(64).collect();
        shared.refused(&shown, "unknown hook (404)");
        return status(StatusCode::NOT_FOUND, "unknown hook\n");
    };
    let ts = header_str(&headers, sign::TIMESTAMP_HEADER);
    let sig = header_str(&headers, sign::SIGNATURE_HEADER);
    if ts.is_none() || sig.is_none() {
        shared.refused(&name, "missing signature headers (401)");
        return status(StatusCode::UNAUTHORIZED, "missing signature headers\n");
    }
    let bytes = match read_limited(body, MAX_BODY_BYTES).await {
        Ok(b) => b,
        Err(r) => {
            tracing::warn!(adapter = "webhook", hook = %name, status = %r.status(), "request body refused");
            return r;
        }
    };
    if let Err(e) = sign::verify(hook.secret.expose().as_bytes(), ts, sig, &bytes, unix_now()) {
        shared.refused(&name, &format!("{e} (401)"));
        return status(StatusCode::UNAUTHORIZED, "bad signature\n");
    }
    if let Err((code, text)) = shared
        .first_use(&name, sig.unwrap_or_default(), ts.unwrap_or_default())
        .await
    {
        return status(code, text);
    }
    let body: InBody = match serde_json::from_slice(&bytes) {
        Ok(b) => b,
        Err(e) => {
            tracing::warn!(adapter = "webhook", hook = %name, error = %e, "malformed JSON");
            return status(StatusCode::BAD_REQUEST, "malformed JSON\n");
        }
    };
    if !valid_user(&body.user) {
        return status(
            StatusCode::BAD_REQUEST,
            "user: 1-128 characters of A-Z a-z 0-9 . _ - @ +\n",
        );
    }
    let channel = match body.channel.as_deref() {
        None | Some("") => format!("webhook:{name}"),
        Some(c) if valid_channel(c) => format!("webhook:{name}:{c}"),
        Some(_) => {
            return status(
                StatusCode::BAD_REQUEST,
                "channel: 1-128 characters of A-Z a-z 0-9 . _ - @ + # /\n",
            );
        }
    };
    let identity = match Identity::parse(&format!("webhook:{name}:{}", body.user)) {
        Ok(i) => i,
        Err(_) => return status(StatusCode::BAD_REQUEST, "bad user\n"),
    };
    let text = body.text.trim().to_string();
    if text.is_empty() {
        return status(StatusCode::BAD_REQUEST, "empty text\n");
    }
    let thread = format!("{name}.{}", shared.next.fetch_add(1, Ordering::Relaxed));
    let (reply_tx, reply_rx) = oneshot::channel();
    {
        let mut pending = shared.pending.lock().unwrap_or_else(|p| p.into_inner());
        if pending.len() >= MAX_PENDING {
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
    let msg = Incoming {
        identity,
        channel,
        text,
        thread: Some(thread.clone()),
        direct: true,
        from_bot: false,
    };
    let queued = {
        let tx = shared.tx.lock().unwrap_or_else(|p| p.into_inner()).clone();
        tx.map(|tx| tx.try_send(msg).is_ok()).unwrap_or(false)
    };
    if !queued {
        tracing::warn!(adapter = "webhook", hook = %name, "queue full or shutting down; request refused");
        return status(StatusCode::SERVICE_UNAVAILABLE, "busy\n");
    }
    match tokio::time::timeout(hook.reply_wait, reply_rx).await {
        Ok(Ok(env)) => (StatusCode::OK, Json(env)).into_response(),
        _ => (
            StatusCode::ACCEPTED,
            Json(Envelope {
                channel: None,
                text: None,
                reply: None,
            }),
        )
            .into_response(),
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

/// The sending half: the HTTP response of a waiting request, a signed POST
/// to an incoming hook's `reply_url`, or to an outgoing hook.
pub struct WebhookSender {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for WebhookSender {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("WebhookSender")
    }
}

fn json_bytes(env: &Envelope) -> Vec<u8> {
    // Serializing plain strings and vectors cannot fail.
    serde_json::to_vec(env).unwrap_or_default()
}

impl WebhookSender {
    /// POSTs `reply` to the outgoing hook `name` as
    /// `{"channel": "webhook-out:<name>", "text", "reply"}`, signed, with
    /// retries (see [`retry_wait`]).
    pub async fn notify(&self, name: &str, reply: Reply) -> Result<(), AdapterError> {
        let target = self
            .shared
            .outgoing
            .get(name)
            .ok_or_else(|| AdapterError::Platform {
                what: "webhook".into(),
                message: format!("no outgoing hook named {:?}", sanitize(name)),
            })?;
        let env = Envelope::of(Some(&format!("{OUT_PREFIX}{name}")), &reply);
        target.post(&json_bytes(&env)).await
    }

    async fn send_to(&self, channel: &str, reply: Reply) -> Result<MessageRef, AdapterError> {
        let n = self.shared.next.fetch_add(1, Ordering::Relaxed);
        if let Some(name) = channel.strip_prefix(OUT_PREFIX) {
            self.notify(name, reply).await?;
            return Ok(MessageRef {
                channel: channel.to_string(),
                id: format!("out.{n}"),
            });
        }
        let name = channel
            .strip_prefix("webhook:")
            .map(|r| r.split_once(':').map_or(r, |(n, _)| n))
            .filter(|n| self.shared.incoming.contains_key(*n))
            .ok_or_else(|| AdapterError::Platform {
                what: "webhook".into(),
                message: format!(
                    "channel {:?} is neither webhook:<incoming hook>[:<channel>] nor {OUT_PREFIX}<outgoing hook>",
                    sanitize(channel)
                ),
            })?;
        let mut env = Envelope::of(None, &reply);
        if let Some(thread) = reply.thread.as_deref()
            && let Some(waiting) = self.shared.take_pending(thread)
        {
            match waiting.send(env) {
                Ok(()) => {
                    return Ok(MessageRef {
                        channel: channel.to_string(),
                        id: format!("response:{thread}"),
                    });
                }
                // The request stopped waiting just now: use reply_url.
                Err(back) => env = back,
            }
        }
        let hook = self
            .shared
            .incoming
            .get(name)
            .ok_or_else(|| AdapterError::Platform {
                what: "webhook".into(),
                message: format!("no incoming hook named {name:?}"),
            })?;
        let Some(target) = &hook.reply_to else {
            return Err(AdapterError::Platform {
                what: format!("webhook {name}"),
                message: "no reply_url configured; reply dropped".into(),
            });
        };
        env.channel = Some(channel.to_string());
        target.post(&json_bytes(&env)).await?;
        Ok(MessageRef {
            channel: channel.to_string(),
            id: format!("posted.{n}"),
        })
    }
}

impl ChatSender for WebhookSender {
    fn send<'a>(
        &'a self,
        channel: &'a str,
        reply: Reply,
    ) -> BoxFuture<'a, Result<MessageRef, AdapterError>> {
        Box::pin(self.send_to(channel, reply))
    }

    fn edit<'a>(
        &'a self,
        msg: &'a MessageRef,
        _reply: Reply,
    ) -> BoxFuture<'a, Result<(), AdapterError>> {
        Box::pin(async move {
            Err(AdapterError::Platform {
                what: "webhook".into(),
                message: format!("message {} cannot be edited; post a new one", msg.id),
            })
        })
    }

    fn can_edit(&self) -> bool {
        false
    }
}

impl crate::adapters::HttpInbound for WebhookAdapter {
    /// `POST /webhook/{name}`, to be mounted on the gateway's HTTP listener.
    fn routes(&self) -> axum::Router {
        axum::Router::new()
            .route(
                &format!("{ROUTE_PREFIX}/{{name}}"),
                axum::routing::post(incoming),
            )
            .with_state(self.shared.clone())
    }

    /// Reports refused requests (unknown hook, missing/bad/stale signature,
    /// replay) to `to` (the gateway records them as `auth_failed`). Set
    /// once; later calls are ignored.
    fn report_auth_failures(&self, to: AuthFailures) {
        let _ = self.shared.auth_failures.set(to);
    }

    /// Keeps accepted signatures in `guard` (the gateway's, persisted in
    /// its state directory) instead of for this process only. Set once.
    fn use_replay_guard(&self, guard: ReplayGuard) {
        self.shared.replay.set(guard);
    }
}

impl crate::registry::Component for WebhookConfig {
    const NAME: &'static str = "webhook";
    const CHAT: bool = true;

    fn resolve_paths(&mut self, base: &Path) {
        WebhookConfig::resolve_paths(self, base);
    }

    fn validate(&self) -> Vec<(String, String)> {
        WebhookConfig::validate(self)
    }

    async fn build(self, cx: &mut crate::registry::BuildContext) -> Result<(), String> {
        let a = WebhookAdapter::new(&self).map_err(|e| e.to_string())?;
        cx.serve_http(Self::NAME, a);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn incoming_hook(name: &str) -> IncomingHookConfig {
        IncomingHookConfig {
            name: name.into(),
            secret: Some(SecretString::new("0123456789abcdef0123")),
            secret_file: None,
            reply_wait_ms: 1000,
            reply_url: None,
            timeout_ms: 1000,
            max_attempts: 3,
        }
    }

    #[test]
    fn retry_table() {
        let ms = Duration::from_millis;
        for (outcome, attempt, expected) in [
            (Attempt::Status(500, None), 1, Some(ms(250))),
            (Attempt::Status(502, None), 2, Some(ms(500))),
            (Attempt::Status(503, None), 3, Some(ms(1000))),
            (Attempt::Status(503, None), 4, None),
            (Attempt::Status(429, Some(2)), 1, Some(ms(2000))),
            (Attempt::Status(429, Some(3600)), 1, Some(MAX_RETRY_AFTER)),
            (Attempt::Status(429, None), 2, Some(ms(500))),
            (Attempt::Status(400, None), 1, None),
            (Attempt::Status(401, None), 1, None),
            (Attempt::Status(404, None), 1, None),
            (Attempt::Status(302, None), 1, None),
            (Attempt::Timeout, 1, Some(ms(250))),
            (Attempt::Connect, 1, Some(ms(250))),
            (Attempt::Other, 1, None),
        ] {
            assert_eq!(
                retry_wait(&outcome, attempt, 4, 1.0),
                expected,
                "{outcome:?} #{attempt}"
            );
        }
        assert_eq!(
            retry_wait(&Attempt::Status(500, None), 9, 20, 1.0),
            Some(MAX_BACKOFF)
        );
        // Jittered down to half, never more than the full wait; a
        // server's Retry-After is not jittered.
        assert_eq!(
            retry_wait(&Attempt::Status(500, None), 3, 4, 0.0),
            Some(ms(500))
        );
        assert_eq!(
            retry_wait(&Attempt::Status(429, Some(2)), 1, 4, 0.0),
            Some(ms(2000))
        );
    }

    #[test]
    fn validate_names_each_bad_key() {
        let good = WebhookConfig {
            incoming: vec![incoming_hook("ops")],
            outgoing: vec![OutgoingHookConfig {
                name: "pager".into(),
                url: "https://pager.example.com/x".into(),
                secret: None,
                secret_file: Some("/etc/s".into()),
                timeout_ms: 1000,
                max_attempts: 4,
            }],
        };
        assert_eq!(good.validate(), vec![]);
        let mut bad = good.clone();
        bad.incoming.push(incoming_hook("ops"));
        bad.incoming.push(IncomingHookConfig {
            name: "Bad Name".into(),
            secret: Some(SecretString::new("short")),
            reply_url: Some("ftp://x".into()),
            reply_wait_ms: 100_000,
            ..incoming_hook("x")
        });
        bad.outgoing[0].url = "not a url".into();
        bad.outgoing[0].secret = Some(SecretString::new("0123456789abcdef0123"));
        bad.outgoing[0].max_attempts = 0;
        let keys: Vec<String> = bad.validate().into_iter().map(|(k, _)| k).collect();
        assert_eq!(
            keys,
            [
                "webhook.incoming[1].name",
                "webhook.incoming[2].name",
                "webhook.incoming[2].secret",
                "webhook.incoming[2].reply_wait_ms",
                "webhook.incoming[2].reply_url",
                "webhook.outgoing[0].url",
                "webhook.outgoing[0].secret",
                "webhook.outgoing[0].max_attempts",
            ]
        );
        assert!(!format!("{:?}", bad).contains("0123456789abcdef"));
    }

    #[test]
    fn text_rendering_is_inert() {
        let r = Reply {
            header: "!run x @channel".into(),
            sections: vec![crate::adapters::Section {
                title: "web-1".into(),
                blocks: vec![crate::adapters::CodeBlock {
                    label: "stdout".into(),
                    text: "!run reboot\n<!here>\x1b[2J".into(),
                    omitted_lines: 0,
                }],
                ..Default::default()
            }],
            ..Reply::default()
        };
        assert_eq!(
            render_text(&r),
            "\u{200B}!run x @\u{2060}channel\n  web-1\n    stdout:\n  | !run reboot\n  | <\u{200B}!here>\u{FFFD}[2J"
        );
    }

    #[test]
    fn user_and_channel_charsets() {
        assert!(valid_user("alice@example.com"));
        assert!(!valid_user("alice:admin"));
        assert!(!valid_user("a b"));
        assert!(!valid_user(""));
        assert!(valid_channel("#ops"));
        assert!(!valid_channel("ops:x"));
    }
}
