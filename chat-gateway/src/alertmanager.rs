//! Prometheus Alertmanager into chat (issue 7): `POST /alertmanager` on the
//! gateway's HTTP listener takes Alertmanager's webhook payload (version
//! "4"), authenticated by the bearer token Alertmanager sends from
//! `http_config.authorization.credentials`, and posts ONE chat message per
//! call — one Alertmanager group — to the channel of the first `[[routes]]`
//! entry whose labels all match the group's common labels, else the
//! default channel. Labels and annotations are untrusted text: adapters
//! render them inert, and every field is capped here so a huge group
//! cannot flood a channel.
//!
//! Status codes: 401 without the right token (reported as `auth_failed`),
//! 413 over [`MAX_BODY_BYTES`], 400 for malformed JSON or another payload
//! version, 502 when the chat platform refused the post (Alertmanager
//! retries 5xx).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::routing::post;
use futures_util::StreamExt;
use serde::Deserialize;

use crate::adapters::campfire::SecretMatcher;
use crate::adapters::{AuthFailures, ChatSender, Reply, Section};
use crate::secret::SecretString;

/// The route.
pub const ALERTMANAGER_PATH: &str = "/alertmanager";
/// Largest payload accepted (Alertmanager's `max_alerts` keeps real ones
/// far smaller).
pub const MAX_BODY_BYTES: usize = 1024 * 1024;
/// Alerts listed in one message; the rest are counted.
pub const MAX_ALERTS_SHOWN: usize = 10;
/// Characters kept of one label value, summary or description.
pub const MAX_FIELD_CHARS: usize = 300;
/// The payload version this receiver understands.
pub const PAYLOAD_VERSION: &str = "4";
/// Shortest bearer token accepted in the config.
pub const MIN_TOKEN_BYTES: usize = 16;

/// `[alertmanager]` in `gateway.toml`.
///
/// ```toml
/// [alertmanager]
/// token_file = "/etc/fleetcmd/alertmanager.token"   # or token = "…"
/// channel = "slack:T0123:C0ALERTS"                   # default channel
///
/// [[alertmanager.routes]]
/// match = { team = "db", severity = "critical" }
/// channel = "irc:libera:#db-oncall"
/// ```
#[derive(Deserialize, Debug, Clone, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct AlertmanagerConfig {
    pub token: Option<SecretString>,
    pub token_file: Option<PathBuf>,
    /// Where groups no route matches go (`scheme:channel`).
    pub channel: String,
    #[serde(default)]
    pub routes: Vec<AlertRoute>,
}

/// A group whose common labels include every `match` pair goes to `channel`.
#[derive(Deserialize, Debug, Clone, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct AlertRoute {
    #[serde(rename = "match")]
    pub matchers: BTreeMap<String, String>,
    pub channel: String,
}

fn check_channel(p: &mut Vec<(String, String)>, key: String, channel: &str) {
    match channel.split_once(':') {
        Some((scheme, rest)) if !scheme.is_empty() && !rest.is_empty() => {}
        _ => p.push((
            key,
            "expected SCHEME:CHANNEL, e.g. slack:T0123:C0456".into(),
        )),
    }
}

impl AlertmanagerConfig {
    /// Every problem, keyed `alertmanager.KEY`.
    pub fn validate(&self) -> Vec<(String, String)> {
        let mut p = Vec::new();
        match (&self.token, &self.token_file) {
            (Some(_), Some(_)) => p.push((
                "alertmanager.token".into(),
                "give either `token` or `token_file`, not both".into(),
            )),
            (None, None) => p.push((
                "alertmanager.token".into(),
                "a bearer token (or token_file) is required".into(),
            )),
            (Some(t), None) if t.expose().trim().len() < MIN_TOKEN_BYTES => p.push((
                "alertmanager.token".into(),
                format!("must be at least {MIN_TOKEN_BYTES} bytes (value not shown)"),
            )),
            (None, Some(f)) => match std::fs::read_to_string(f) {
                Ok(t) if t.trim().len() < MIN_TOKEN_BYTES => p.push((
                    "alertmanager.token_file".into(),
                    format!(
                        "{}: token must be at least {MIN_TOKEN_BYTES} bytes",
                        f.display()
                    ),
                )),
                Ok(_) => {}
                Err(e) => p.push((
                    "alertmanager.token_file".into(),
                    format!("{}: {e}", f.display()),
                )),
            },
            _ => {}
        }
        check_channel(&mut p, "alertmanager.channel".into(), &self.channel);
        for (i, r) in self.routes.iter().enumerate() {
            if r.matchers.is_empty() {
                p.push((
                    format!("alertmanager.routes[{i}].match"),
                    "needs at least one label = value".into(),
                ));
            }
            check_channel(
                &mut p,
                format!("alertmanager.routes[{i}].channel"),
                &r.channel,
            );
        }
        p
    }

    /// Makes a relative `token_file` relative to `base`.
    pub fn resolve_paths(&mut self, base: &Path) {
        if let Some(f) = &mut self.token_file
            && f.is_relative()
        {
            *f = base.join(&*f);
        }
    }

    /// The token (read from `token_file` when given), trimmed.
    pub fn token(&self) -> Result<String, String> {
        match (&self.token, &self.token_file) {
            (Some(t), _) => Ok(t.expose().trim().to_string()),
            (None, Some(f)) => std::fs::read_to_string(f)
                .map(|s| s.trim().to_string())
                .map_err(|e| format!("token_file: {}: {e}", f.display())),
            (None, None) => Err("no token".into()),
        }
    }

    /// The channel for a group with these common labels.
    pub fn channel_for(&self, common: &BTreeMap<String, String>) -> &str {
        self.routes
            .iter()
            .find(|r| r.matchers.iter().all(|(k, v)| common.get(k) == Some(v)))
            .map(|r| r.channel.as_str())
            .unwrap_or(&self.channel)
    }
}

/// Alertmanager's webhook payload (`version` "4"). Unknown fields are
/// ignored: Alertmanager may add some.
#[derive(Deserialize, Debug, Clone, Default)]
#[serde(rename_all = "camelCase", default)]
pub struct Payload {
    pub version: String,
    pub group_key: String,
    pub truncated_alerts: u64,
    pub status: String,
    pub receiver: String,
    pub group_labels: BTreeMap<String, String>,
    pub common_labels: BTreeMap<String, String>,
    pub common_annotations: BTreeMap<String, String>,
    #[serde(rename = "externalURL")]
    pub external_url: String,
    pub alerts: Vec<Alert>,
}

/// One alert of a group.
#[derive(Deserialize, Debug, Clone, Default)]
#[serde(rename_all = "camelCase", default)]
pub struct Alert {
    pub status: String,
    pub labels: BTreeMap<String, String>,
    pub annotations: BTreeMap<String, String>,
    pub starts_at: String,
    pub ends_at: String,
    #[serde(rename = "generatorURL")]
    pub generator_url: String,
    pub fingerprint: String,
}

/// Why a payload was refused (the 400 message).
#[derive(thiserror::Error, Debug, PartialEq, Eq)]
pub enum PayloadError {
    #[error("malformed Alertmanager payload: {0}")]
    Json(String),
    #[error("unsupported Alertmanager payload version {0:?}: expected \"4\"")]
    Version(String),
    #[error("unknown group status {0:?}: expected \"firing\" or \"resolved\"")]
    Status(String),
}

/// Parses and checks a webhook body.
pub fn parse(body: &[u8]) -> Result<Payload, PayloadError> {
    let p: Payload = serde_json::from_slice(body).map_err(|e| PayloadError::Json(e.to_string()))?;
    if p.version != PAYLOAD_VERSION {
        return Err(PayloadError::Version(p.version));
    }
    if p.status != "firing" && p.status != "resolved" {
        return Err(PayloadError::Status(p.status));
    }
    Ok(p)
}

fn cap(s: &str) -> String {
    let one_line = s.split_whitespace().collect::<Vec<_>>().join(" ");
    if one_line.chars().count() <= MAX_FIELD_CHARS {
        one_line
    } else {
        let mut t: String = one_line.chars().take(MAX_FIELD_CHARS).collect();
        t.push('…');
        t
    }
}

fn labels_text<'a>(labels: impl Iterator<Item = (&'a String, &'a String)>) -> String {
    labels
        .map(|(k, v)| format!("{}={}", cap(k), cap(v)))
        .collect::<Vec<_>>()
        .join(" ")
}

/// The chat message for one group: header `[FIRING:2] alertname=X
/// service=api` (or `[RESOLVED] …`, or `[FIRING:1, RESOLVED:1] …` when part
/// of the group recovered), then one section per alert (at most
/// [`MAX_ALERTS_SHOWN`]) with its summary, description and the labels not
/// already in the header.
pub fn render(p: &Payload) -> Reply {
    let firing = p.alerts.iter().filter(|a| a.status == "firing").count();
    let resolved = p.alerts.len() - firing;
    let state = match (p.status.as_str(), firing, resolved) {
        ("resolved", _, _) => "RESOLVED".to_string(),
        (_, f, 0) => format!("FIRING:{f}"),
        (_, f, r) => format!("FIRING:{f}, RESOLVED:{r}"),
    };
    let group = if p.group_labels.is_empty() {
        labels_text(p.common_labels.iter())
    } else {
        labels_text(p.group_labels.iter())
    };
    let mut reply = Reply::text(format!("[{state}] {group}").trim_end().to_string());
    let total = p.alerts.len() as u64 + p.truncated_alerts;
    reply.lines.push(format!(
        "{total} alert{} in this group",
        if total == 1 { "" } else { "s" }
    ));
    if let Some(s) = p.common_annotations.get("summary") {
        reply.lines.push(cap(s));
    }
    for a in p.alerts.iter().take(MAX_ALERTS_SHOWN) {
        let title = a
            .annotations
            .get("summary")
            .or_else(|| a.labels.get("alertname"))
            .map(|s| cap(s))
            .unwrap_or_else(|| "(no summary)".to_string());
        let mut sec = Section {
            title: format!("{}: {title}", a.status),
            ..Section::default()
        };
        if let Some(d) = a.annotations.get("description") {
            sec.notes.push(cap(d));
        }
        let own = labels_text(
            a.labels
                .iter()
                .filter(|(k, _)| !p.group_labels.contains_key(*k)),
        );
        if !own.is_empty() {
            sec.notes.push(format!("labels: {own}"));
        }
        if !a.starts_at.is_empty() {
            sec.notes.push(format!("since {}", cap(&a.starts_at)));
        }
        reply.sections.push(sec);
    }
    let hidden = total.saturating_sub(MAX_ALERTS_SHOWN.min(p.alerts.len()) as u64);
    if hidden > 0 {
        reply.lines.push(format!("… {hidden} more not shown"));
    }
    reply
}

struct AmState {
    cfg: AlertmanagerConfig,
    token: SecretMatcher,
    senders: Vec<(String, Arc<dyn ChatSender>)>,
    auth_failures: AuthFailures,
}

fn refuse(st: &AmState, detail: &str) -> (StatusCode, String) {
    st.auth_failures
        .report("alertmanager", ALERTMANAGER_PATH, detail.to_string());
    (StatusCode::UNAUTHORIZED, format!("refused: {detail}\n"))
}

async fn receive(
    State(st): State<Arc<AmState>>,
    headers: HeaderMap,
    body: Body,
) -> (StatusCode, String) {
    let auth = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok());
    match auth.map(|a| a.split_once(' ')) {
        None => return refuse(&st, "missing bearer token"),
        Some(Some((scheme, token))) if scheme.eq_ignore_ascii_case("bearer") => {
            if !st.token.matches(token.trim()) {
                return refuse(&st, "wrong bearer token");
            }
        }
        Some(_) => return refuse(&st, "authorization is not a bearer token"),
    }
    let mut stream = body.into_data_stream();
    let mut buf = Vec::new();
    while let Some(chunk) = stream.next().await {
        let Ok(chunk) = chunk else {
            return (StatusCode::BAD_REQUEST, "unreadable body\n".into());
        };
        if buf.len() + chunk.len() > MAX_BODY_BYTES {
            return (
                StatusCode::PAYLOAD_TOO_LARGE,
                format!("payload larger than {MAX_BODY_BYTES} bytes\n"),
            );
        }
        buf.extend_from_slice(&chunk);
    }
    let payload = match parse(&buf) {
        Ok(p) => p,
        Err(e) => {
            tracing::warn!(error = %e, "alertmanager payload refused");
            return (StatusCode::BAD_REQUEST, format!("{e}\n"));
        }
    };
    let channel = st.cfg.channel_for(&payload.common_labels).to_string();
    let scheme = channel.split(':').next().unwrap_or_default();
    let Some((_, out)) = st.senders.iter().find(|(s, _)| s == scheme) else {
        // `routes` checked every channel; kept for safety.
        return (
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("no enabled adapter posts to {scheme:?} channels\n"),
        );
    };
    match out.send(&channel, render(&payload)).await {
        Ok(m) => {
            tracing::info!(group = %payload.group_key, status = %payload.status, alerts = payload.alerts.len(), %channel, "alertmanager group posted");
            (StatusCode::OK, format!("{{\"posted\":{:?}}}\n", m.id))
        }
        Err(e) => {
            tracing::warn!(error = %e, %channel, "alertmanager group not posted");
            (StatusCode::BAD_GATEWAY, format!("posting failed: {e}\n"))
        }
    }
}

/// The `/alertmanager` route, posting through `senders` (by channel
/// scheme). Fails when the token cannot be read or a configured channel has
/// no enabled adapter.
pub fn routes(
    cfg: &AlertmanagerConfig,
    senders: Vec<(String, Arc<dyn ChatSender>)>,
    auth_failures: AuthFailures,
) -> Result<axum::Router, String> {
    let token = cfg.token()?;
    if token.len() < MIN_TOKEN_BYTES {
        return Err(format!("token must be at least {MIN_TOKEN_BYTES} bytes"));
    }
    for c in std::iter::once(&cfg.channel).chain(cfg.routes.iter().map(|r| &r.channel)) {
        let scheme = c.split(':').next().unwrap_or_default();
        if !senders.iter().any(|(s, _)| s == scheme) {
            return Err(format!(
                "{c}: no enabled adapter posts to `{scheme}:` channels"
            ));
        }
    }
    let state = Arc::new(AmState {
        cfg: cfg.clone(),
        token: SecretMatcher::new(&token).map_err(|e| e.to_string())?,
        senders,
        auth_failures,
    });
    Ok(axum::Router::new()
        .route(ALERTMANAGER_PATH, post(receive))
        .with_state(state))
}

impl crate::registry::Component for AlertmanagerConfig {
    const NAME: &'static str = "alertmanager";

    fn resolve_paths(&mut self, base: &Path) {
        AlertmanagerConfig::resolve_paths(self, base);
    }

    fn validate(&self) -> Vec<(String, String)> {
        AlertmanagerConfig::validate(self)
    }

    async fn build(self, cx: &mut crate::registry::BuildContext) -> Result<(), String> {
        let r = routes(&self, cx.senders(), cx.auth_failures())?;
        cx.routes(r);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn group(status: &str, alerts: &[(&str, &str)]) -> Payload {
        let mut p = Payload {
            version: "4".into(),
            status: status.into(),
            ..Payload::default()
        };
        p.group_labels
            .insert("alertname".into(), "HighErrorRate".into());
        p.group_labels.insert("service".into(), "api".into());
        for (instance, st) in alerts {
            let mut a = Alert {
                status: st.to_string(),
                ..Alert::default()
            };
            a.labels = p.group_labels.clone();
            a.labels.insert("instance".into(), instance.to_string());
            a.annotations
                .insert("summary".into(), format!("errors on {instance}"));
            p.alerts.push(a);
        }
        p
    }

    #[test]
    fn headers_count_and_list_alerts() {
        let r = render(&group(
            "firing",
            &[("web-1", "firing"), ("web-2", "firing")],
        ));
        assert_eq!(r.header, "[FIRING:2] alertname=HighErrorRate service=api");
        assert_eq!(r.sections.len(), 2);
        assert_eq!(r.sections[0].title, "firing: errors on web-1");
        assert_eq!(r.sections[0].notes, ["labels: instance=web-1"]);
        let r = render(&group(
            "firing",
            &[("web-1", "firing"), ("web-2", "resolved")],
        ));
        assert!(
            r.header.starts_with("[FIRING:1, RESOLVED:1] "),
            "{}",
            r.header
        );
        let r = render(&group("resolved", &[("web-1", "resolved")]));
        assert!(r.header.starts_with("[RESOLVED] "), "{}", r.header);
        assert_eq!(r.lines[0], "1 alert in this group");
    }

    #[test]
    fn long_groups_and_fields_are_capped() {
        let many: Vec<(String, &str)> = (0..25).map(|i| (format!("web-{i}"), "firing")).collect();
        let refs: Vec<(&str, &str)> = many.iter().map(|(a, b)| (a.as_str(), *b)).collect();
        let mut p = group("firing", &refs);
        p.truncated_alerts = 5;
        p.alerts[0]
            .annotations
            .insert("description".into(), "x".repeat(5000));
        let r = render(&p);
        assert_eq!(r.sections.len(), MAX_ALERTS_SHOWN);
        assert_eq!(r.lines[0], "30 alerts in this group");
        assert_eq!(
            r.lines.last().map(String::as_str),
            Some("… 20 more not shown")
        );
        assert_eq!(r.sections[0].notes[0].chars().count(), MAX_FIELD_CHARS + 1);
    }

    #[test]
    fn payload_errors_name_the_problem() {
        assert!(matches!(parse(b"{"), Err(PayloadError::Json(_))));
        assert_eq!(
            parse(br#"{"version":"3","status":"firing"}"#).err(),
            Some(PayloadError::Version("3".into()))
        );
        assert_eq!(
            parse(br#"{"version":"4","status":"odd"}"#).err(),
            Some(PayloadError::Status("odd".into()))
        );
    }

    #[test]
    fn routes_match_common_labels_in_order() {
        let cfg: AlertmanagerConfig = toml::from_str(
            r#"
token = "0123456789abcdef"
channel = "console:default"
[[routes]]
match = { team = "db", severity = "critical" }
channel = "console:db-pager"
[[routes]]
match = { team = "db" }
channel = "console:db"
"#,
        )
        .unwrap_or_else(|e| panic!("{e}"));
        assert!(cfg.validate().is_empty(), "{:?}", cfg.validate());
        let labels = |kv: &[(&str, &str)]| -> BTreeMap<String, String> {
            kv.iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect()
        };
        assert_eq!(
            cfg.channel_for(&labels(&[("team", "db"), ("severity", "critical")])),
            "console:db-pager"
        );
        assert_eq!(cfg.channel_for(&labels(&[("team", "db")])), "console:db");
        assert_eq!(cfg.channel_for(&labels(&[])), "console:default");
    }

    #[test]
    fn validation_names_every_key() {
        let cfg: AlertmanagerConfig = toml::from_str(
            "token = \"short\"\nchannel = \"nochannel\"\n[[routes]]\nmatch = {}\nchannel = \"x\"\n",
        )
        .unwrap_or_else(|e| panic!("{e}"));
        let keys: Vec<String> = cfg.validate().into_iter().map(|(k, _)| k).collect();
        assert_eq!(
            keys,
            [
                "alertmanager.token",
                "alertmanager.channel",
                "alertmanager.routes[0].match",
                "alertmanager.routes[0].channel"
            ]
        );
        assert!(
            toml::from_str::<AlertmanagerConfig>("channel = \"a:b\"\nchanel = 1").is_err(),
            "unknown keys are refused"
        );
    }
}
