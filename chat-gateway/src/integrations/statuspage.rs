//! Statuspage (Atlassian) component status: `PATCH
//! /pages/{page_id}/components/{component_id}` with `{"component":
//! {"status": …}}` — degraded → `degraded_performance`, down →
//! `major_outage`, ok → `operational`; `unknown` leaves the component as
//! it is. Silences do not apply: the public status is the truth. The
//! component is the service's `statuspage_component`, else the
//! `components` entry named after the service; services with neither are
//! not on the status page.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use fleetcmd_core::crypto::Secret;
use fleetcmd_proto::v1;
use serde::{Deserialize, Serialize};

use super::{
    Action, GiveUp, Integration, Level, Retry, attempts, check_retry, check_secret, check_url,
    classify, client, decide, defaults, load_secret, one_line, resolve,
};
use crate::secret::SecretString;

/// The API.
pub const API_URL: &str = "https://api.statuspage.io/v1";

fn api_url() -> String {
    API_URL.to_string()
}

/// `[statuspage]` in `gateway.toml`.
#[derive(Deserialize, Debug, Clone, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct StatuspageConfig {
    pub api_key: Option<SecretString>,
    pub api_key_file: Option<PathBuf>,
    pub page_id: String,
    /// Component ids by service name (for services whose controller config
    /// has no `statuspage_component`).
    #[serde(default)]
    pub components: BTreeMap<String, String>,
    #[serde(default = "api_url")]
    pub url: String,
    #[serde(default = "defaults::max_attempts")]
    pub max_attempts: u32,
    #[serde(default = "defaults::backoff_ms")]
    pub backoff_ms: u64,
    #[serde(default = "defaults::timeout_ms")]
    pub timeout_ms: u64,
}

fn valid_id(s: &str) -> bool {
    !s.is_empty() && s.len() <= 64 && s.chars().all(|c| c.is_ascii_alphanumeric())
}

impl StatuspageConfig {
    /// Every problem, keyed `statuspage.KEY`.
    pub fn validate(&self) -> Vec<(String, String)> {
        let mut p = Vec::new();
        if self.api_key.is_none() && self.api_key_file.is_none() {
            p.push((
                "statuspage.api_key".into(),
                "an api_key (or api_key_file) is required".into(),
            ));
        }
        check_secret(
            &mut p,
            "statuspage",
            "api_key",
            &self.api_key,
            &self.api_key_file,
        );
        if !valid_id(&self.page_id) {
            p.push((
                "statuspage.page_id".into(),
                "expected the page id (letters and digits)".into(),
            ));
        }
        for (name, id) in &self.components {
            if !valid_id(id) {
                p.push((
                    format!("statuspage.components.{name}"),
                    "expected a component id (letters and digits)".into(),
                ));
            }
        }
        check_url(&mut p, "statuspage.url".into(), &self.url);
        check_retry(&mut p, "statuspage", self.max_attempts, self.timeout_ms);
        p
    }

    pub fn resolve_paths(&mut self, base: &Path) {
        resolve(&mut self.api_key_file, base);
    }
}

/// The request body.
#[derive(Serialize, Debug, Clone, PartialEq, Eq)]
pub struct Patch {
    pub component: ComponentStatus,
}

#[derive(Serialize, Debug, Clone, PartialEq, Eq)]
pub struct ComponentStatus {
    pub status: &'static str,
}

/// Statuspage's error body (`{"error": "…"}` or `{"message": "…"}`).
#[derive(Deserialize, Debug, Default)]
#[serde(default)]
struct ErrorBody {
    error: serde_json::Value,
    message: String,
}

/// The Statuspage integration.
pub struct Statuspage {
    http: reqwest::Client,
    url: String,
    page_id: String,
    key: Secret<String>,
    components: BTreeMap<String, String>,
    retry: Retry,
}

impl std::fmt::Debug for Statuspage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Statuspage")
            .field("url", &self.url)
            .field("page_id", &self.page_id)
            .finish_non_exhaustive()
    }
}

/// The component status for an action.
pub fn status_for(action: Action) -> &'static str {
    match action {
        Action::Open(Level::Down) => "major_outage",
        Action::Open(_) => "degraded_performance",
        Action::Close => "operational",
    }
}

impl Statuspage {
    pub fn new(cfg: &StatuspageConfig) -> Result<Statuspage, String> {
        let key = load_secret(&cfg.api_key, &cfg.api_key_file, "api_key")?
            .ok_or_else(|| "api_key is required".to_string())?;
        Ok(Statuspage {
            http: client(cfg.timeout_ms)?,
            url: cfg.url.trim_end_matches('/').to_string(),
            page_id: cfg.page_id.clone(),
            key,
            components: cfg.components.clone(),
            retry: Retry::new(cfg.max_attempts, cfg.backoff_ms),
        })
    }

    fn component<'a>(&'a self, s: &'a v1::Service) -> Option<&'a str> {
        if !s.statuspage_component.is_empty() {
            return Some(&s.statuspage_component);
        }
        self.components.get(&s.name).map(String::as_str)
    }

    /// Sends what `ev` calls for; the result is also logged.
    pub async fn send(&self, ev: &v1::AlertEvent) -> Option<Result<String, GiveUp>> {
        let action = decide(ev, false)?;
        let s = ev.service.as_ref()?;
        let component = self.component(s)?;
        if !valid_id(component) {
            tracing::error!(service = %s.name, component, "statuspage component id is not letters and digits; not sent");
            return None;
        }
        let url = format!("{}/pages/{}/components/{component}", self.url, self.page_id);
        let body = Patch {
            component: ComponentStatus {
                status: status_for(action),
            },
        };
        let auth = format!("OAuth {}", self.key.expose());
        let what = format!(
            "statuspage component {component} (service {}) to {}",
            s.name, body.component.status
        );
        Some(
            attempts(&what, self.retry, || {
                let req = self
                    .http
                    .patch(&url)
                    .header(reqwest::header::AUTHORIZATION, &auth)
                    .json(&body);
                classify(
                    req,
                    |_| "component updated".to_string(),
                    |status, text| {
                        let detail = match serde_json::from_str::<ErrorBody>(text) {
                            Ok(e) if e.error.is_string() => {
                                e.error.as_str().unwrap_or_default().to_string()
                            }
                            Ok(e) if !e.message.is_empty() => e.message,
                            _ => one_line(text),
                        };
                        let hint = match status.as_u16() {
                            401 | 403 => " (check [statuspage] api_key)",
                            404 => " (check [statuspage] page_id and the component id)",
                            _ => "",
                        };
                        format!(
                            "{status} for component {component} on page {}: {}{hint}",
                            self.page_id,
                            one_line(&detail)
                        )
                    },
                )
            })
            .await,
        )
    }
}

impl Integration for Statuspage {
    fn name(&self) -> &'static str {
        "statuspage"
    }
    async fn handle(&self, ev: &v1::AlertEvent) {
        let _ = self.send(ev).await;
    }
}

impl crate::registry::Component for StatuspageConfig {
    const NAME: &'static str = "statuspage";

    fn resolve_paths(&mut self, base: &Path) {
        StatuspageConfig::resolve_paths(self, base);
    }

    fn validate(&self) -> Vec<(String, String)> {
        StatuspageConfig::validate(self)
    }

    async fn build(self, cx: &mut crate::registry::BuildContext) -> Result<(), String> {
        cx.alert_hook(super::AlertHook::of(Statuspage::new(&self)?));
        Ok(())
    }
}
