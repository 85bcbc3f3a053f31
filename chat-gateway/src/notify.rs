//! Notifications into chat from monitoring — Nagios, Zabbix, Sensu, or
//! anything with a script hook (issue 7): `POST /notify` on the gateway's
//! HTTP listener, signed like the generic webhooks (headers
//! `X-Fleetcmd-Timestamp` and `X-Fleetcmd-Signature: v1=hex(HMAC-SHA256(
//! secret, "v1:" + timestamp + ":" + body))`, 5-minute window), with a JSON
//! body `{"channel", "severity", "text", "source"}`. `fleetcmd notify`
//! signs and sends one. The text is untrusted: adapters render it inert.
//! A signature is accepted once: replays inside the window, also after a
//! gateway restart, are refused (409) and reported as `auth_failed`.

use crate::unix_now;
use std::path::PathBuf;
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::routing::post;
use serde::Deserialize;

use crate::adapters::webhook::sign;
use crate::adapters::{AuthFailures, ChatSender, Reply};
use crate::secret::SecretString;
use crate::store::{Refusal, ReplayGuard};

/// The route.
pub const NOTIFY_PATH: &str = "/notify";
/// Largest body accepted.
pub const MAX_BODY_BYTES: usize = 64 * 1024;
/// Lines of text shown; the rest is counted.
pub const MAX_LINES: usize = 20;

/// `[notify]` in `gateway.toml`.
#[derive(Deserialize, Debug, Clone, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct NotifyConfig {
    pub secret: Option<SecretString>,
    pub secret_file: Option<PathBuf>,
    /// Channels notifications may go to (adapter channel forms); empty
    /// means any channel of an enabled adapter.
    #[serde(default)]
    pub channels: Vec<String>,
}

impl NotifyConfig {
    /// Every problem, keyed `notify.KEY`.
    pub fn validate(&self) -> Vec<(String, String)> {
        let mut p = Vec::new();
        match (&self.secret, &self.secret_file) {
            (Some(_), Some(_)) => p.push((
                "notify.secret".into(),
                "give either `secret` or `secret_file`, not both".into(),
            )),
            (None, None) => p.push((
                "notify.secret".into(),
                "a secret (or secret_file) is required".into(),
            )),
            (Some(s), None) if s.0.expose().len() < 16 => {
                p.push(("notify.secret".into(), "must be at least 16 bytes".into()))
            }
            (None, Some(f)) => {
                if let Err(e) = crate::secret::read_private(f) {
                    p.push(("notify.secret_file".into(), format!("{}: {e}", f.display())));
                }
            }
            _ => {}
        }
        for (i, c) in self.channels.iter().enumerate() {
            if c.trim().is_empty() {
                p.push((format!("notify.channels[{i}]"), "must not be empty".into()));
            }
        }
        p
    }

    /// The secret's bytes (read from `secret_file` when given).
    pub fn secret(&self) -> Result<Vec<u8>, String> {
        match (&self.secret, &self.secret_file) {
            (Some(s), _) => Ok(s.0.expose().as_bytes().to_vec()),
            (None, Some(f)) => crate::secret::read_private(f)
                .map(|s| s.trim().as_bytes().to_vec())
                .map_err(|e| format!("notify.secret_file: {}: {e}", f.display())),
            (None, None) => Err("notify: no secret".into()),
        }
    }
}

/// How bad it is; Nagios-style names are accepted too.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Severity {
    Ok,
    Info,
    Warning,
    Critical,
    Unknown,
}

impl Severity {
    pub fn parse(s: &str) -> Result<Severity, String> {
        Ok(match s.to_ascii_lowercase().as_str() {
            "ok" | "recovery" | "resolved" | "up" => Severity::Ok,
            "info" | "information" | "notice" => Severity::Info,
            "warning" | "warn" => Severity::Warning,
            "critical" | "crit" | "error" | "down" | "disaster" | "high" => Severity::Critical,
            "unknown" => Severity::Unknown,
            other => {
                return Err(format!(
                    "severity {other:?}: expected ok, info, warning, critical or unknown"
                ));
            }
        })
    }

    pub fn label(self) -> &'static str {
        match self {
            Severity::Ok => "OK",
            Severity::Info => "INFO",
            Severity::Warning => "WARNING",
            Severity::Critical => "CRITICAL",
            Severity::Unknown => "UNKNOWN",
        }
    }
}

/// The request body.
#[derive(Deserialize, Debug, Clone)]
pub struct Notification {
    pub channel: String,
    pub severity: String,
    pub text: String,
    #[serde(default)]
    pub source: String,
}

/// The chat message for a notification.
pub fn render(severity: Severity, source: &str, text: &str) -> Reply {
    let mut lines = text.lines();
    let first = lines.next().unwrap_or_default();
    let from = if source.is_empty() {
        String::new()
    } else {
        format!(" from {source}")
    };
    let mut reply = Reply::text(format!("[{}]{from}: {first}", severity.label()));
    let rest: Vec<&str> = lines.collect();
    reply
        .lines
        .extend(rest.iter().take(MAX_LINES).map(|l| l.to_string()));
    if rest.len() > MAX_LINES {
        reply
            .lines
            .push(format!("… {} more lines", rest.len() - MAX_LINES));
    }
    reply
}

struct NotifyState {
    secret: Vec<u8>,
    channels: Vec<String>,
    senders: Vec<(String, Arc<dyn ChatSender>)>,
    auth_failures: AuthFailures,
    replay: ReplayGuard,
}

async fn notify(
    State(st): State<Arc<NotifyState>>,
    headers: HeaderMap,
    body: Bytes,
) -> (StatusCode, String) {
    let header = |n: &str| headers.get(n).and_then(|v| v.to_str().ok());
    if let Err(e) = sign::verify(
        &st.secret,
        header(sign::TIMESTAMP_HEADER),
        header(sign::SIGNATURE_HEADER),
        &body,
        unix_now(),
    ) {
        st.auth_failures
            .report("notify", NOTIFY_PATH, format!("notification refused: {e}"));
        return (StatusCode::UNAUTHORIZED, format!("refused: {e}\n"));
    }
    // Recorded (durably) before anything is posted, kept until the
    // signature can no longer verify: a captured notification replayed,
    // also after a restart, is refused.
    let ts: u64 = header(sign::TIMESTAMP_HEADER)
        .and_then(|t| t.trim().parse().ok())
        .unwrap_or_else(unix_now);
    let sig = header(sign::SIGNATURE_HEADER)
        .unwrap_or_default()
        .trim()
        .to_ascii_lowercase();
    match st
        .replay
        .admit("notify", &sig, ts.saturating_add(sign::MAX_SKEW_SECS))
        .await
    {
        Ok(()) => {}
        Err(Refusal::Replay) => {
            st.auth_failures.report(
                "notify",
                NOTIFY_PATH,
                "notification refused: replayed request (409)".to_string(),
            );
            return (StatusCode::CONFLICT, "replayed request\n".into());
        }
        Err(Refusal::Unavailable) => return (StatusCode::SERVICE_UNAVAILABLE, "busy\n".into()),
        Err(Refusal::Elsewhere) => {
            return (StatusCode::OK, "posted by another gateway\n".into());
        }
    }
    let n: Notification = match serde_json::from_slice(&body) {
        Ok(n) => n,
        Err(e) => return (StatusCode::BAD_REQUEST, format!("bad notification: {e}\n")),
    };
    let severity = match Severity::parse(&n.severity) {
        Ok(s) => s,
        Err(e) => return (StatusCode::BAD_REQUEST, format!("{e}\n")),
    };
    if !st.channels.is_empty() && !st.channels.contains(&n.channel) {
        return (
            StatusCode::FORBIDDEN,
            format!("channel {:?} is not in [notify] channels\n", n.channel),
        );
    }
    let scheme = n.channel.split(':').next().unwrap_or_default();
    let Some((_, out)) = st.senders.iter().find(|(s, _)| s == scheme) else {
        return (
            StatusCode::NOT_FOUND,
            format!("no enabled adapter posts to {scheme:?} channels\n"),
        );
    };
    match out
        .send(&n.channel, render(severity, &n.source, &n.text))
        .await
    {
        Ok(m) => (StatusCode::OK, format!("{{\"posted\":{:?}}}\n", m.id)),
        Err(e) => (StatusCode::BAD_GATEWAY, format!("posting failed: {e}\n")),
    }
}

/// The `/notify` route, posting through `senders` (by channel scheme);
/// accepted signatures are kept in `replay` (the gateway's, persisted).
pub fn routes(
    cfg: &NotifyConfig,
    senders: Vec<(String, Arc<dyn ChatSender>)>,
    auth_failures: AuthFailures,
    replay: ReplayGuard,
) -> Result<axum::Router, String> {
    let state = Arc::new(NotifyState {
        secret: cfg.secret()?,
        channels: cfg.channels.clone(),
        senders,
        auth_failures,
        replay,
    });
    Ok(axum::Router::new()
        .route(NOTIFY_PATH, post(notify))
        .layer(axum::extract::DefaultBodyLimit::max(MAX_BODY_BYTES))
        .with_state(state))
}

impl crate::registry::Component for NotifyConfig {
    const NAME: &'static str = "notify";

    fn resolve_paths(&mut self, base: &std::path::Path) {
        if let Some(f) = self.secret_file.as_mut()
            && f.is_relative()
        {
            *f = base.join(&*f);
        }
    }

    fn validate(&self) -> Vec<(String, String)> {
        NotifyConfig::validate(self)
    }

    async fn build(self, cx: &mut crate::registry::BuildContext) -> Result<(), String> {
        let r = routes(&self, cx.senders(), cx.auth_failures(), cx.replay_guard())?;
        cx.routes(r);
        Ok(())
    }
}
