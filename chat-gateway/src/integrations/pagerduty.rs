//! PagerDuty Events API v2: `trigger` when a service turns degraded
//! (severity `warning`) or down (`critical`), `resolve` when it is ok
//! again, both with `dedup_key = "fleetcmd-<service>"` so PagerDuty keeps
//! one alert per service. The routing key is the service's own target
//! (`Service.pagerduty` names an entry of `routing_keys`), else an entry
//! named after the service, else the default `routing_key`.
//!
//! The same `[pagerduty]` section holds the REST API token the chat
//! `oncall` command uses ([`crate::oncall`]).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use fleetcmd_core::crypto::Secret;
use fleetcmd_proto::v1;
use serde::{Deserialize, Serialize};

use super::{
    Action, GiveUp, Integration, Level, Retry, alert_key, attempts, check_retry, check_secret,
    check_url, classify, client, decide, defaults, instances, load_secret, one_line, resolve,
};
use crate::secret::SecretString;

/// The Events API v2 endpoint.
pub const EVENTS_URL: &str = "https://events.pagerduty.com/v2/enqueue";
/// The REST API.
pub const API_URL: &str = "https://api.pagerduty.com";
/// PagerDuty's limit on `payload.summary`.
pub const MAX_SUMMARY_CHARS: usize = 1024;

fn events_url() -> String {
    EVENTS_URL.to_string()
}
fn api_url() -> String {
    API_URL.to_string()
}
fn source() -> String {
    "fleetcmd".to_string()
}

/// `[pagerduty]` in `gateway.toml`.
///
/// ```toml
/// [pagerduty]
/// routing_key_file = "/etc/fleetcmd/pagerduty.key"   # or routing_key = "…"
/// routing_keys = { api = "R0…", team-db = "R0…" }    # per service or Service.pagerduty target
/// api_token_file = "/etc/fleetcmd/pagerduty.token"   # for chat `oncall`
/// schedules = { primary = "PABC123" }
/// ```
#[derive(Deserialize, Debug, Clone, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct PagerDutyConfig {
    /// Integration key of an "Events API v2" integration, for services
    /// without their own.
    pub routing_key: Option<SecretString>,
    pub routing_key_file: Option<PathBuf>,
    /// Routing keys by service name or by the service's `pagerduty` target.
    #[serde(default)]
    pub routing_keys: BTreeMap<String, SecretString>,
    #[serde(default = "events_url")]
    pub url: String,
    /// `payload.source` of the events.
    #[serde(default = "source")]
    pub source: String,
    /// REST API token (read-only is enough) for chat `oncall`.
    pub api_token: Option<SecretString>,
    pub api_token_file: Option<PathBuf>,
    #[serde(default = "api_url")]
    pub api_url: String,
    /// Schedule ids by the name chat users type (`oncall primary`).
    #[serde(default)]
    pub schedules: BTreeMap<String, String>,
    #[serde(default = "defaults::max_attempts")]
    pub max_attempts: u32,
    #[serde(default = "defaults::backoff_ms")]
    pub backoff_ms: u64,
    #[serde(default = "defaults::timeout_ms")]
    pub timeout_ms: u64,
}

impl PagerDutyConfig {
    /// Every problem, keyed `pagerduty.KEY`.
    pub fn validate(&self) -> Vec<(String, String)> {
        let mut p = Vec::new();
        check_secret(
            &mut p,
            "pagerduty",
            "routing_key",
            &self.routing_key,
            &self.routing_key_file,
        );
        check_secret(
            &mut p,
            "pagerduty",
            "api_token",
            &self.api_token,
            &self.api_token_file,
        );
        let has_events = self.routing_key.is_some()
            || self.routing_key_file.is_some()
            || !self.routing_keys.is_empty();
        let has_api = self.api_token.is_some() || self.api_token_file.is_some();
        if !has_events && !has_api {
            p.push((
                "pagerduty.routing_key".into(),
                "give a routing_key (alerts) or an api_token (chat oncall), or both".into(),
            ));
        }
        for (name, key) in &self.routing_keys {
            if key.expose().trim().is_empty() {
                p.push((
                    format!("pagerduty.routing_keys.{name}"),
                    "must not be empty".into(),
                ));
            }
        }
        for (name, id) in &self.schedules {
            if !valid_id(id) {
                p.push((
                    format!("pagerduty.schedules.{name}"),
                    "expected a PagerDuty schedule id such as PABC123".into(),
                ));
            }
        }
        check_url(&mut p, "pagerduty.url".into(), &self.url);
        check_url(&mut p, "pagerduty.api_url".into(), &self.api_url);
        check_retry(&mut p, "pagerduty", self.max_attempts, self.timeout_ms);
        p
    }

    pub fn resolve_paths(&mut self, base: &Path) {
        resolve(&mut self.routing_key_file, base);
        resolve(&mut self.api_token_file, base);
    }

    /// The REST API token, if configured.
    pub fn api_token(&self) -> Result<Option<Secret<String>>, String> {
        load_secret(&self.api_token, &self.api_token_file, "api_token")
    }
}

/// A PagerDuty object id (`PABC123`): letters and digits.
pub fn valid_id(s: &str) -> bool {
    !s.is_empty() && s.len() <= 32 && s.chars().all(|c| c.is_ascii_alphanumeric())
}

/// An Events API v2 event.
#[derive(Serialize, Debug, Clone, PartialEq)]
pub struct Event<'a> {
    pub routing_key: &'a str,
    pub event_action: &'static str,
    pub dedup_key: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub payload: Option<Payload>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub client: Option<&'static str>,
}

/// `payload` of a trigger.
#[derive(Serialize, Debug, Clone, PartialEq)]
pub struct Payload {
    pub summary: String,
    pub source: String,
    pub severity: &'static str,
    pub component: String,
    pub custom_details: serde_json::Value,
}

/// PagerDuty's documented answer (202 and 400).
#[derive(Deserialize, Debug, Default)]
#[serde(default)]
pub struct EventResponse {
    pub status: String,
    pub message: String,
    pub dedup_key: String,
    pub errors: Vec<String>,
}

/// The PagerDuty Events API v2 integration.
pub struct PagerDuty {
    http: reqwest::Client,
    url: String,
    source: String,
    default_key: Option<Secret<String>>,
    keys: BTreeMap<String, Secret<String>>,
    retry: Retry,
}

impl std::fmt::Debug for PagerDuty {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PagerDuty")
            .field("url", &self.url)
            .field("routing_keys", &self.keys.keys().collect::<Vec<_>>())
            .finish_non_exhaustive()
    }
}

fn summary(ev: &v1::AlertEvent, s: &v1::Service) -> String {
    let text = if ev.summary.trim().is_empty() {
        format!(
            "{} is {}: {} of {} instances pass",
            s.name, s.state, s.passing, s.total
        )
    } else {
        one_line(&ev.summary)
    };
    text.chars().take(MAX_SUMMARY_CHARS).collect()
}

impl PagerDuty {
    /// `Ok(None)` when the section has no routing key (only `oncall`).
    pub fn new(cfg: &PagerDutyConfig) -> Result<Option<PagerDuty>, String> {
        let default_key = load_secret(&cfg.routing_key, &cfg.routing_key_file, "routing_key")?;
        if default_key.is_none() && cfg.routing_keys.is_empty() {
            return Ok(None);
        }
        Ok(Some(PagerDuty {
            http: client(cfg.timeout_ms)?,
            url: cfg.url.clone(),
            source: cfg.source.clone(),
            default_key,
            keys: cfg
                .routing_keys
                .iter()
                .map(|(k, v)| (k.clone(), Secret::new(v.expose().trim().to_string())))
                .collect(),
            retry: Retry::new(cfg.max_attempts, cfg.backoff_ms),
        }))
    }

    fn routing_key(&self, s: &v1::Service) -> Option<&Secret<String>> {
        if !s.pagerduty.is_empty() {
            let k = self.keys.get(&s.pagerduty);
            if k.is_none() {
                tracing::error!(service = %s.name, target = %s.pagerduty, "no [pagerduty] routing_keys entry for this service's target; not sent");
            }
            return k;
        }
        self.keys.get(&s.name).or(self.default_key.as_ref())
    }

    /// The event for `action` on `s` (public for tests and docs).
    pub fn event<'a>(
        &self,
        routing_key: &'a str,
        action: Action,
        ev: &v1::AlertEvent,
        s: &v1::Service,
    ) -> Event<'a> {
        let payload = |severity| Payload {
            summary: summary(ev, s),
            source: self.source.clone(),
            severity,
            component: s.name.clone(),
            custom_details: serde_json::json!({
                "passing": s.passing,
                "total": s.total,
                "instances": instances(s),
            }),
        };
        let (event_action, payload) = match action {
            Action::Open(Level::Down) => ("trigger", Some(payload("critical"))),
            Action::Open(_) => ("trigger", Some(payload("warning"))),
            Action::Close => ("resolve", None),
        };
        Event {
            routing_key,
            event_action,
            dedup_key: alert_key(&s.name),
            payload,
            client: Some("fleetcmd"),
        }
    }

    /// Sends what `ev` calls for; the result is also logged.
    pub async fn send(&self, ev: &v1::AlertEvent) -> Option<Result<String, GiveUp>> {
        let action = decide(ev, true)?;
        let s = ev.service.as_ref()?;
        let key = self.routing_key(s)?;
        let event = self.event(key.expose(), action, ev, s);
        let what = format!("pagerduty {} {}", event.event_action, s.name);
        Some(
            attempts(&what, self.retry, || {
                let req = self.http.post(&self.url).json(&event);
                classify(
                    req,
                    |body| {
                        let r: EventResponse = serde_json::from_str(body).unwrap_or_default();
                        format!("{} {} dedup_key={}", r.status, r.message, r.dedup_key)
                    },
                    |status, body| match serde_json::from_str::<EventResponse>(body) {
                        Ok(r) if !r.status.is_empty() => format!(
                            "{status}: {}: {}{}",
                            r.status,
                            r.message,
                            if r.errors.is_empty() {
                                String::new()
                            } else {
                                format!(" ({})", r.errors.join("; "))
                            }
                        ),
                        _ => format!("{status}: {}", one_line(body)),
                    },
                )
            })
            .await,
        )
    }
}

impl Integration for PagerDuty {
    fn name(&self) -> &'static str {
        "pagerduty"
    }
    async fn handle(&self, ev: &v1::AlertEvent) {
        let _ = self.send(ev).await;
    }
}

/// `[pagerduty]`: service alerts to the Events API v2 (with a
/// `routing_key`) and chat `oncall` (with an `api_token`).
impl crate::registry::Component for PagerDutyConfig {
    const NAME: &'static str = "pagerduty";
    const VERBS: &'static [&'static str] = &["oncall"];

    fn resolve_paths(&mut self, base: &Path) {
        PagerDutyConfig::resolve_paths(self, base);
    }

    fn validate(&self) -> Vec<(String, String)> {
        PagerDutyConfig::validate(self)
    }

    async fn build(self, cx: &mut crate::registry::BuildContext) -> Result<(), String> {
        if let Some(pd) = PagerDuty::new(&self)? {
            cx.alert_hook(super::AlertHook::of(pd));
        }
        match crate::oncall::Oncall::from_config(&self)? {
            Some(o) => cx.commands(std::sync::Arc::new(o)),
            None => cx.commands(std::sync::Arc::new(crate::oncall::not_configured())),
        }
    }

    fn absent(cx: &mut crate::registry::BuildContext) -> Result<(), String> {
        cx.commands(std::sync::Arc::new(crate::oncall::not_configured()))
    }
}
