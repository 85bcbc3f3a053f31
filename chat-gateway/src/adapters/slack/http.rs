//! Slack over HTTP: the Events API (`/slack/events`), slash commands
//! (`/slack/commands`) and interactivity (`/slack/actions`).
//!
//! Every request must carry `X-Slack-Signature: v0=<hex HMAC-SHA256>` of
//! `v0:<X-Slack-Request-Timestamp>:<raw body>` under the signing secret,
//! with a timestamp within five minutes of now; anything else is answered
//! 401 and never routed. Accepted requests are answered at once (Slack
//! wants 200 within 3 s) and routed through the adapter's queue.

use crate::unix_now;
use std::sync::Arc;

use axum::Json;
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use fleetcmd_core::crypto::Secret;
use ring::hmac;
use serde_json::{Value, json};

use super::inbound::{Inbound, Skip};

/// Largest request body accepted.
pub const MAX_BODY_BYTES: usize = 1 << 20;
/// Largest distance between a request's timestamp and now.
pub const MAX_SKEW_SECS: u64 = 5 * 60;

/// State of the HTTP routes.
pub struct HttpState {
    pub inbound: Arc<Inbound>,
    pub signing_secret: Option<Secret<String>>,
    /// Where refused requests are reported (the gateway's audit reporter).
    pub auth_failures: std::sync::OnceLock<crate::adapters::AuthFailures>,
}

/// `v0=` + hex HMAC-SHA256(secret, `v0:{timestamp}:{body}`).
pub fn signature(secret: &str, timestamp: &str, body: &[u8]) -> String {
    let key = hmac::Key::new(hmac::HMAC_SHA256, secret.as_bytes());
    let tag = hmac::sign(&key, &base_string(timestamp, body));
    let mut s = String::from("v0=");
    for b in tag.as_ref() {
        s.push_str(&format!("{b:02x}"));
    }
    s
}

fn base_string(timestamp: &str, body: &[u8]) -> Vec<u8> {
    let mut msg = Vec::with_capacity(body.len() + timestamp.len() + 4);
    msg.extend_from_slice(b"v0:");
    msg.extend_from_slice(timestamp.as_bytes());
    msg.push(b':');
    msg.extend_from_slice(body);
    msg
}

fn unhex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| s.get(i..i + 2).and_then(|h| u8::from_str_radix(h, 16).ok()))
        .collect()
}

/// Why a request was refused.
#[derive(Debug, PartialEq, Eq)]
pub enum BadRequest {
    NoSecret,
    MissingHeader(&'static str),
    BadTimestamp,
    Stale { skew_secs: u64 },
    BadSignature,
}

impl std::fmt::Display for BadRequest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            BadRequest::NoSecret => f.write_str("no signing_secret configured"),
            BadRequest::MissingHeader(h) => write!(f, "missing {h} header"),
            BadRequest::BadTimestamp => f.write_str("X-Slack-Request-Timestamp is not a number"),
            BadRequest::Stale { skew_secs } => write!(
                f,
                "timestamp {skew_secs} s away from now (more than {MAX_SKEW_SECS} s: stale or replayed)"
            ),
            BadRequest::BadSignature => f.write_str("X-Slack-Signature does not match"),
        }
    }
}

/// Checks the `v0` signature and the timestamp window, at `now` (unix
/// seconds). The comparison is constant-time (`ring::hmac::verify`).
pub fn verify(
    secret: &str,
    timestamp: Option<&str>,
    sig: Option<&str>,
    body: &[u8],
    now: u64,
) -> Result<(), BadRequest> {
    let timestamp = timestamp.ok_or(BadRequest::MissingHeader("X-Slack-Request-Timestamp"))?;
    let sig = sig.ok_or(BadRequest::MissingHeader("X-Slack-Signature"))?;
    let ts: u64 = timestamp
        .trim()
        .parse()
        .map_err(|_| BadRequest::BadTimestamp)?;
    let skew_secs = now.abs_diff(ts);
    if skew_secs > MAX_SKEW_SECS {
        return Err(BadRequest::Stale { skew_secs });
    }
    let tag = sig
        .strip_prefix("v0=")
        .and_then(unhex)
        .ok_or(BadRequest::BadSignature)?;
    let key = hmac::Key::new(hmac::HMAC_SHA256, secret.as_bytes());
    hmac::verify(&key, &base_string(timestamp, body), &tag).map_err(|_| BadRequest::BadSignature)
}

impl HttpState {
    /// The 401 answer when the request is not signed by Slack.
    fn refuse(&self, path: &str, headers: &HeaderMap, body: &[u8]) -> Option<Response> {
        let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
        let result = match &self.signing_secret {
            None => Err(BadRequest::NoSecret),
            Some(secret) => verify(
                secret.expose(),
                header("x-slack-request-timestamp"),
                header("x-slack-signature"),
                body,
                unix_now(),
            ),
        };
        result.err().map(|why| {
            tracing::warn!(path, reason = %why, "slack: request refused (401)");
            if let Some(a) = self.auth_failures.get() {
                a.report("slack", path, format!("request refused: {why}"));
            }
            (StatusCode::UNAUTHORIZED, format!("refused: {why}\n")).into_response()
        })
    }
}

impl HttpState {
    /// Logs why a payload was not routed. A duplicate that Slack did not
    /// mark as a retry is a replayed request (its ids were handled before,
    /// perhaps before a restart): it is reported as well.
    fn skipped(&self, path: &str, what: &str, headers: &HeaderMap, skip: &Skip) {
        log_skip(what, skip);
        if *skip == Skip::Duplicate && headers.get("x-slack-retry-num").is_none() {
            tracing::warn!(path, what, "slack: replayed request not routed");
            if let Some(a) = self.auth_failures.get() {
                a.report(
                    "slack",
                    path,
                    format!("request refused: replayed {what} (already handled)"),
                );
            }
        }
    }
}

/// Parses `application/x-www-form-urlencoded` into a JSON object of strings.
pub fn parse_form(body: &[u8]) -> Option<Value> {
    let text = std::str::from_utf8(body).ok()?;
    let mut map = serde_json::Map::new();
    for pair in text.split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        map.insert(percent_decode(k)?, Value::String(percent_decode(v)?));
    }
    Some(Value::Object(map))
}

fn percent_decode(s: &str) -> Option<String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' => {
                let h = s.get(i + 1..i + 3)?;
                out.push(u8::from_str_radix(h, 16).ok()?);
                i += 2;
            }
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8(out).ok()
}

fn log_skip(what: &str, skip: &Skip) {
    match skip {
        Skip::Refused(_) => tracing::warn!(what, reason = %skip, "slack: not routed"),
        _ => tracing::debug!(what, reason = %skip, "slack: not routed"),
    }
}

fn bad_request(path: &str, why: &str) -> Response {
    tracing::warn!(path, reason = why, "slack: bad request (400)");
    (StatusCode::BAD_REQUEST, format!("{why}\n")).into_response()
}

async fn events(State(s): State<Arc<HttpState>>, headers: HeaderMap, body: Bytes) -> Response {
    const PATH: &str = "/slack/events";
    if let Some(r) = s.refuse(PATH, &headers, &body) {
        return r;
    }

    let Ok(v) = serde_json::from_slice::<Value>(&body) else {
        return bad_request(PATH, "malformed JSON");
    };
    match v.get("type").and_then(Value::as_str) {
        Some("url_verification") => {
            let challenge = v
                .get("challenge")
                .and_then(Value::as_str)
                .unwrap_or_default();
            Json(json!({ "challenge": challenge })).into_response()
        }
        Some("event_callback") => {
            if let Some(n) = headers
                .get("x-slack-retry-num")
                .and_then(|v| v.to_str().ok())
            {
                let reason = headers
                    .get("x-slack-retry-reason")
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("");
                tracing::debug!(retry = n, reason, "slack: event delivery retried");
            }
            if let Err(skip) = s.inbound.event_callback(&v).await {
                s.skipped(PATH, "event", &headers, &skip);
            }
            StatusCode::OK.into_response()
        }
        other => {
            tracing::debug!(kind = ?other, "slack: events request ignored");
            StatusCode::OK.into_response()
        }
    }
}

async fn commands(State(s): State<Arc<HttpState>>, headers: HeaderMap, body: Bytes) -> Response {
    const PATH: &str = "/slack/commands";
    if let Some(r) = s.refuse(PATH, &headers, &body) {
        return r;
    }

    let Some(form) = parse_form(&body) else {
        return bad_request(PATH, "malformed form body");
    };
    match s.inbound.slash_command(&form).await {
        Ok(()) => Json(command_ack(&form)).into_response(),
        Err(skip) => {
            s.skipped(PATH, "slash command", &headers, &skip);
            StatusCode::OK.into_response()
        }
    }
}

/// The immediate answer to a slash command, shown only to its user.
pub fn command_ack(fields: &Value) -> Value {
    let cmd = fields.get("command").and_then(Value::as_str).unwrap_or("");
    let text = fields.get("text").and_then(Value::as_str).unwrap_or("");
    let shown: String = format!("{cmd} {text}").chars().take(200).collect();
    json!({
        "response_type": "ephemeral",
        "text": format!("received `{}`", super::blocks::code(shown.trim()).replace('`', "'")),
    })
}

async fn actions(State(s): State<Arc<HttpState>>, headers: HeaderMap, body: Bytes) -> Response {
    const PATH: &str = "/slack/actions";
    if let Some(r) = s.refuse(PATH, &headers, &body) {
        return r;
    }

    let payload = parse_form(&body)
        .and_then(|f| f.get("payload").and_then(Value::as_str).map(str::to_string))
        .and_then(|p| serde_json::from_str::<Value>(&p).ok());
    let Some(payload) = payload else {
        return bad_request(PATH, "malformed interactivity payload");
    };
    if let Err(skip) = s.inbound.interaction(&payload).await {
        s.skipped(PATH, "interaction", &headers, &skip);
    }
    StatusCode::OK.into_response()
}

/// The routes, to mount at the root of the gateway's HTTP listener.
pub fn routes(state: Arc<HttpState>) -> axum::Router {
    axum::Router::new()
        .route("/slack/events", post(events))
        .route("/slack/commands", post(commands))
        .route("/slack/actions", post(actions))
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .with_state(state)
}

#[cfg(test)]
mod tests {
    use super::*;

    const DOC_SECRET: &str = "8f742231b10e8888abcd99yyyzzz85a5";
    const DOC_TS: &str = "1531420618";
    const DOC_BODY: &str = "token=xyzz0WbapA4vBCDEFasx0q6G&team_id=T1DC2JH3J&team_domain=testteamnow&channel_id=G8PSS9T3V&channel_name=foobar&user_id=U2CERLKJA&user_name=roadrunner&command=%2Fwebhook-collect&text=&response_url=https%3A%2F%2Fhooks.slack.com%2Fcommands%2FT1DC2JH3J%2F397700885554%2F96rGlfmibIGlgcZRskXaIFfN&trigger_id=398738663015.47445629121.803a0bc887a14d10d2c447fce8b6703c";
    const DOC_SIG: &str = "v0=a2114d57b48eac39b9ad189dd8316235a7b4a8d21a10bd27519666489c69b503";

    #[test]
    fn slack_documentation_test_vector() {
        assert_eq!(signature(DOC_SECRET, DOC_TS, DOC_BODY.as_bytes()), DOC_SIG);
        let at = 1_531_420_618 + 60;
        assert_eq!(
            verify(
                DOC_SECRET,
                Some(DOC_TS),
                Some(DOC_SIG),
                DOC_BODY.as_bytes(),
                at
            ),
            Ok(())
        );
    }

    #[test]
    fn verification_failures() {
        let body = DOC_BODY.as_bytes();
        let at = 1_531_420_618;
        for (ts, sig, body, now, expected) in [
            (
                None,
                Some(DOC_SIG),
                body,
                at,
                BadRequest::MissingHeader("X-Slack-Request-Timestamp"),
            ),
            (
                Some(DOC_TS),
                None,
                body,
                at,
                BadRequest::MissingHeader("X-Slack-Signature"),
            ),
            (
                Some("soon"),
                Some(DOC_SIG),
                body,
                at,
                BadRequest::BadTimestamp,
            ),
            (
                Some(DOC_TS),
                Some(DOC_SIG),
                body,
                at + 301,
                BadRequest::Stale { skew_secs: 301 },
            ),
            (
                Some(DOC_TS),
                Some(DOC_SIG),
                body,
                at - 301,
                BadRequest::Stale { skew_secs: 301 },
            ),
            (
                Some(DOC_TS),
                Some("a2114d57"),
                body,
                at,
                BadRequest::BadSignature,
            ),
            (
                Some(DOC_TS),
                Some("v0=zz"),
                body,
                at,
                BadRequest::BadSignature,
            ),
            (
                Some(DOC_TS),
                Some(DOC_SIG),
                &body[1..],
                at,
                BadRequest::BadSignature,
            ),
            (
                Some("1531420619"),
                Some(DOC_SIG),
                body,
                at,
                BadRequest::BadSignature,
            ),
        ] {
            assert_eq!(verify(DOC_SECRET, ts, sig, body, now), Err(expected));
        }
        assert_eq!(
            verify("other", Some(DOC_TS), Some(DOC_SIG), body, at),
            Err(BadRequest::BadSignature)
        );
    }

    #[test]
    fn forms_decode() {
        let f = parse_form(DOC_BODY.as_bytes()).unwrap_or_default();
        assert_eq!(f["command"], "/webhook-collect");
        assert_eq!(f["text"], "");
        assert_eq!(
            f["response_url"],
            "https://hooks.slack.com/commands/T1DC2JH3J/397700885554/96rGlfmibIGlgcZRskXaIFfN"
        );
        let f = parse_form(b"text=run+uptime+on+all%21&x").unwrap_or_default();
        assert_eq!(f["text"], "run uptime on all!");
        assert_eq!(f["x"], "");
        assert!(parse_form(b"text=%zz").is_none());
        assert!(parse_form(b"text=%ff").is_none());
    }
}
