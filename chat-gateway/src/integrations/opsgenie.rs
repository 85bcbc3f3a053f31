//! Opsgenie Alerts API: create (`POST /v2/alerts`, priority P3 when a
//! service is degraded, P1 when down) and close (`POST
//! /v2/alerts/{alias}/close?identifierType=alias`), with `alias =
//! "fleetcmd-<service>"` so Opsgenie de-duplicates repeated creates. A
//! service's `opsgenie` target, when set, is sent as a team responder.
//! Opsgenie answers 202 with a `requestId` and processes asynchronously.

use std::path::{Path, PathBuf};

use fleetcmd_core::crypto::Secret;
use fleetcmd_proto::v1;
use serde::{Deserialize, Serialize};

use super::{
    Action, GiveUp, Integration, Level, Retry, alert_key, attempts, check_retry, check_secret,
    check_url, classify, client, decide, defaults, instances, load_secret, one_line, resolve,
};
use crate::secret::SecretString;

/// The API (EU accounts use `https://api.eu.opsgenie.com`).
pub const API_URL: &str = "https://api.opsgenie.com";
/// Opsgenie's limit on `message`.
pub const MAX_MESSAGE_CHARS: usize = 130;

fn api_url() -> String {
    API_URL.to_string()
}

/// `[opsgenie]` in `gateway.toml`.
#[derive(Deserialize, Debug, Clone, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct OpsgenieConfig {
    /// An API integration's key (`GenieKey`).
    pub api_key: Option<SecretString>,
    pub api_key_file: Option<PathBuf>,
    #[serde(default = "api_url")]
    pub url: String,
    /// Extra tags on every alert (besides `fleetcmd`, the service and level).
    #[serde(default)]
    pub tags: Vec<String>,
    #[serde(default = "defaults::max_attempts")]
    pub max_attempts: u32,
    #[serde(default = "defaults::backoff_ms")]
    pub backoff_ms: u64,
    #[serde(default = "defaults::timeout_ms")]
    pub timeout_ms: u64,
}

impl OpsgenieConfig {
    /// Every problem, keyed `opsgenie.KEY`.
    pub fn validate(&self) -> Vec<(String, String)> {
        let mut p = Vec::new();
        if self.api_key.is_none() && self.api_key_file.is_none() {
            p.push((
                "opsgenie.api_key".into(),
                "an api_key (or api_key_file) is required".into(),
            ));
        }
        check_secret(
            &mut p,
            "opsgenie",
            "api_key",
            &self.api_key,
            &self.api_key_file,
        );
        check_url(&mut p, "opsgenie.url".into(), &self.url);
        check_retry(&mut p, "opsgenie", self.max_attempts, self.timeout_ms);
        p
    }

    pub fn resolve_paths(&mut self, base: &Path) {
        resolve(&mut self.api_key_file, base);
    }
}

/// A team responder.
#[derive(Serialize, Debug, Clone, PartialEq, Eq)]
pub struct Responder {
    pub name: String,
    #[serde(rename = "type")]
    pub kind: &'static str,
}

/// The create-alert request.
#[derive(Serialize, Debug, Clone, PartialEq, Eq)]
pub struct CreateAlert {
    pub message: String,
    pub alias: String,
    pub description: String,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub responders: Vec<Responder>,
    pub tags: Vec<String>,
    pub details: std::collections::BTreeMap<String, String>,
    pub entity: String,
    pub source: &'static str,
    pub priority: &'static str,
}

/// The close-alert request.
#[derive(Serialize, Debug, Clone, PartialEq, Eq)]
pub struct CloseAlert {
    pub source: &'static str,
    pub note: String,
}

/// Opsgenie's documented answer (202, and errors' `message`).
#[derive(Deserialize, Debug, Default)]
#[serde(default, rename_all = "camelCase")]
pub struct ApiResponse {
    pub result: String,
    pub message: String,
    pub request_id: String,
}

/// The Opsgenie integration.
pub struct Opsgenie {
    http: reqwest::Client,
    url: String,
    key: Secret<String>,
    tags: Vec<String>,
    retry: Retry,
}

impl std::fmt::Debug for Opsgenie {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Opsgenie")
            .field("url", &self.url)
            .finish_non_exhaustive()
    }
}

impl Opsgenie {
    pub fn new(cfg: &OpsgenieConfig) -> Result<Opsgenie, String> {
        let key = load_secret(&cfg.api_key, &cfg.api_key_file, "api_key")?
            .ok_or_else(|| "api_key is required".to_string())?;
        Ok(Opsgenie {
            http: client(cfg.timeout_ms)?,
            url: cfg.url.trim_end_matches('/').to_string(),
            key,
            tags: cfg.tags.clone(),
            retry: Retry::new(cfg.max_attempts, cfg.backoff_ms),
        })
    }

    /// The create request for a degraded or down service.
    pub fn create(&self, level: Level, ev: &v1::AlertEvent, s: &v1::Service) -> CreateAlert {
        let state = if level == Level::Down {
            "down"
        } else {
            "degraded"
        };
        let message = if ev.summary.trim().is_empty() {
            format!("{} is {state}", s.name)
        } else {
            one_line(&ev.summary)
        };
        let mut details: std::collections::BTreeMap<String, String> = instances(s)
            .into_iter()
            .map(|(k, v)| (format!("instance {k}"), v))
            .collect();
        details.insert("passing".into(), s.passing.to_string());
        details.insert("total".into(), s.total.to_string());
        details.insert("state".into(), state.into());
        let mut tags = vec![
            "fleetcmd".to_string(),
            format!("service:{}", s.name),
            state.into(),
        ];
        tags.extend(self.tags.iter().cloned());
        CreateAlert {
            message: message.chars().take(MAX_MESSAGE_CHARS).collect(),
            alias: alert_key(&s.name),
            description: format!(
                "{message}\n{} of {} instances pass (selector {})",
                s.passing, s.total, s.selector
            ),
            responders: if s.opsgenie.is_empty() {
                Vec::new()
            } else {
                vec![Responder {
                    name: s.opsgenie.clone(),
                    kind: "team",
                }]
            },
            tags,
            details,
            entity: s.name.clone(),
            source: "fleetcmd",
            priority: if level == Level::Down { "P1" } else { "P3" },
        }
    }

    fn close_url(&self, service: &str) -> Result<reqwest::Url, String> {
        let mut u = reqwest::Url::parse(&self.url).map_err(|e| format!("opsgenie url: {e}"))?;
        u.path_segments_mut()
            .map_err(|()| "opsgenie url cannot have a path".to_string())?
            .pop_if_empty()
            .extend(["v2", "alerts", &alert_key(service), "close"]);
        u.query_pairs_mut().append_pair("identifierType", "alias");
        Ok(u)
    }

    /// Sends what `ev` calls for; the result is also logged.
    pub async fn send(&self, ev: &v1::AlertEvent) -> Option<Result<String, GiveUp>> {
        let action = decide(ev, true)?;
        let s = ev.service.as_ref()?;
        let auth = format!("GenieKey {}", self.key.expose());
        let ok = |body: &str| {
            let r: ApiResponse = serde_json::from_str(body).unwrap_or_default();
            format!("{} requestId={}", r.result, r.request_id)
        };
        let refused = |status: reqwest::StatusCode, body: &str| match serde_json::from_str::<
            ApiResponse,
        >(body)
        {
            Ok(r) if !r.message.is_empty() => format!("{status}: {}", one_line(&r.message)),
            _ => format!("{status}: {}", one_line(body)),
        };
        Some(match action {
            Action::Open(level) => {
                let body = self.create(level, ev, s);
                let url = format!("{}/v2/alerts", self.url);
                attempts(&format!("opsgenie create {}", s.name), self.retry, || {
                    let req = self
                        .http
                        .post(&url)
                        .header(reqwest::header::AUTHORIZATION, &auth)
                        .json(&body);
                    classify(req, ok, refused)
                })
                .await
            }
            Action::Close => {
                let url = match self.close_url(&s.name) {
                    Ok(u) => u,
                    Err(e) => {
                        tracing::error!(service = %s.name, error = %e, "opsgenie close not sent");
                        return None;
                    }
                };
                let body = CloseAlert {
                    source: "fleetcmd",
                    note: format!("{} is ok again", s.name),
                };
                attempts(&format!("opsgenie close {}", s.name), self.retry, || {
                    let req = self
                        .http
                        .post(url.clone())
                        .header(reqwest::header::AUTHORIZATION, &auth)
                        .json(&body);
                    classify(req, ok, refused)
                })
                .await
            }
        })
    }
}

impl Integration for Opsgenie {
    fn name(&self) -> &'static str {
        "opsgenie"
    }
    async fn handle(&self, ev: &v1::AlertEvent) {
        let _ = self.send(ev).await;
    }
}

impl crate::registry::Component for OpsgenieConfig {
    const NAME: &'static str = "opsgenie";

    fn resolve_paths(&mut self, base: &Path) {
        OpsgenieConfig::resolve_paths(self, base);
    }

    fn validate(&self) -> Vec<(String, String)> {
        OpsgenieConfig::validate(self)
    }

    async fn build(self, cx: &mut crate::registry::BuildContext) -> Result<(), String> {
        cx.alert_hook(super::AlertHook::of(Opsgenie::new(&self)?));
        Ok(())
    }
}
