//! Chat `oncall [schedule]`: who is on call now, from the PagerDuty REST
//! API (`GET /oncalls?earliest=true&include[]=users`, limited to the named
//! schedule, or to every schedule `[pagerduty] schedules` lists). Anyone
//! with a role in the channel may ask (a read, ARCHITECTURE.md invariant 12); the router
//! checks that before calling [`Oncall::reply`].

use std::collections::BTreeMap;
use std::fmt::Write as _;

use fleetcmd_core::crypto::Secret;
use serde::Deserialize;

use crate::adapters::{CodeBlock, Reply, Section};
use crate::integrations::one_line;
use crate::integrations::pagerduty::{PagerDutyConfig, valid_id};
use crate::registry::{Call, CallContext, CommandSpec, Commands, Guard};
use crate::render::asked_by;
use futures_util::future::BoxFuture;

/// Entries shown; the rest are counted.
pub const MAX_ROWS: usize = 25;

/// Why the on-call list could not be read (shown in chat; never a token).
#[derive(thiserror::Error, Debug, PartialEq, Eq)]
pub enum OncallError {
    #[error("unknown schedule {name:?}; configured: {known}")]
    UnknownSchedule { name: String, known: String },
    #[error("PagerDuty refused the API token (401): check [pagerduty] api_token")]
    Unauthorized,
    #[error("PagerDuty answered {status}: {message}")]
    Api { status: u16, message: String },
    #[error("PagerDuty could not be reached: {0}")]
    Transport(String),
    #[error("unexpected answer from PagerDuty: {0}")]
    Body(String),
}

/// The PagerDuty REST client behind `oncall`.
pub struct Oncall {
    http: reqwest::Client,
    api_url: String,
    token: Secret<String>,
    schedules: BTreeMap<String, String>,
}

impl std::fmt::Debug for Oncall {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Oncall")
            .field("api_url", &self.api_url)
            .field("schedules", &self.schedules)
            .finish_non_exhaustive()
    }
}

/// One on-call entry, as shown.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub escalation_policy: String,
    pub schedule: String,
    pub level: u32,
    pub user: String,
    pub email: String,
    /// RFC 3339, or empty for "permanently" (no end).
    pub until: String,
}

#[derive(Deserialize, Debug, Default)]
#[serde(default)]
struct Reference {
    summary: String,
    name: String,
    email: String,
}

#[derive(Deserialize, Debug)]
struct OncallJson {
    #[serde(default)]
    escalation_policy: Option<Reference>,
    #[serde(default)]
    escalation_level: u32,
    #[serde(default)]
    schedule: Option<Reference>,
    #[serde(default)]
    user: Option<Reference>,
    #[serde(default)]
    end: Option<String>,
}

#[derive(Deserialize, Debug)]
struct OncallsJson {
    oncalls: Vec<OncallJson>,
}

#[derive(Deserialize, Debug, Default)]
#[serde(default)]
struct ErrorJson {
    error: ErrorInner,
}

#[derive(Deserialize, Debug, Default)]
#[serde(default)]
struct ErrorInner {
    message: String,
    errors: Vec<String>,
}

impl Oncall {
    /// `Ok(None)` when `[pagerduty]` has no `api_token`.
    pub fn from_config(cfg: &PagerDutyConfig) -> Result<Option<Oncall>, String> {
        let Some(token) = cfg.api_token()? else {
            return Ok(None);
        };
        Ok(Some(Oncall {
            http: crate::integrations::client(cfg.timeout_ms)?,
            api_url: cfg.api_url.trim_end_matches('/').to_string(),
            token,
            schedules: cfg.schedules.clone(),
        }))
    }

    /// The schedule ids to ask about: the named one, or every configured
    /// one (none: all of the account's on-calls).
    fn schedule_ids(&self, name: Option<&str>) -> Result<Vec<String>, OncallError> {
        match name {
            None => Ok(self.schedules.values().cloned().collect()),
            Some(n) => match self.schedules.get(n) {
                Some(id) => Ok(vec![id.clone()]),
                // Without configured names, a schedule id may be typed.
                None if self.schedules.is_empty() && valid_id(n) => Ok(vec![n.to_string()]),
                None => Err(OncallError::UnknownSchedule {
                    name: n.chars().take(40).collect(),
                    known: if self.schedules.is_empty() {
                        "none (give a schedule id such as PABC123)".into()
                    } else {
                        self.schedules
                            .keys()
                            .cloned()
                            .collect::<Vec<_>>()
                            .join(", ")
                    },
                }),
            },
        }
    }

    /// Who is on call now.
    pub async fn lookup(&self, schedule: Option<&str>) -> Result<Vec<Entry>, OncallError> {
        let ids = self.schedule_ids(schedule)?;
        let mut query: Vec<(&str, &str)> = vec![("earliest", "true"), ("include[]", "users")];
        query.extend(ids.iter().map(|id| ("schedule_ids[]", id.as_str())));
        let resp = self
            .http
            .get(format!("{}/oncalls", self.api_url))
            .query(&query)
            .header(
                reqwest::header::AUTHORIZATION,
                format!("Token token={}", self.token.expose()),
            )
            .header(
                reqwest::header::ACCEPT,
                "application/vnd.pagerduty+json;version=2",
            )
            .send()
            .await
            .map_err(|e| OncallError::Transport(e.without_url().to_string()))?;
        let status = resp.status();
        let body = resp
            .text()
            .await
            .map_err(|e| OncallError::Transport(e.without_url().to_string()))?;
        if status.as_u16() == 401 {
            return Err(OncallError::Unauthorized);
        }
        if !status.is_success() {
            let e: ErrorJson = serde_json::from_str(&body).unwrap_or_default();
            let mut message = if e.error.message.is_empty() {
                one_line(&body)
            } else {
                e.error.message
            };
            if !e.error.errors.is_empty() {
                message.push_str(&format!(" ({})", e.error.errors.join("; ")));
            }
            return Err(OncallError::Api {
                status: status.as_u16(),
                message: one_line(&message),
            });
        }
        let parsed: OncallsJson =
            serde_json::from_str(&body).map_err(|e| OncallError::Body(e.to_string()))?;
        let name = |r: &Option<Reference>| {
            r.as_ref()
                .map(|r| {
                    if r.name.is_empty() {
                        r.summary.clone()
                    } else {
                        r.name.clone()
                    }
                })
                .unwrap_or_default()
        };
        let mut entries: Vec<Entry> = parsed
            .oncalls
            .iter()
            .map(|o| Entry {
                escalation_policy: name(&o.escalation_policy),
                schedule: name(&o.schedule),
                level: o.escalation_level,
                user: name(&o.user),
                email: o.user.as_ref().map(|u| u.email.clone()).unwrap_or_default(),
                until: o.end.clone().unwrap_or_default(),
            })
            .collect();
        entries.sort_by(|a, b| {
            (&a.escalation_policy, a.level, &a.schedule).cmp(&(
                &b.escalation_policy,
                b.level,
                &b.schedule,
            ))
        });
        Ok(entries)
    }

    /// The chat answer for `oncall [schedule]`.
    pub async fn reply(&self, schedule: Option<&str>, who: &str) -> Reply {
        match self.lookup(schedule).await {
            Ok(entries) => render(&entries, schedule, who),
            Err(e) => {
                tracing::warn!(error = %e, "oncall lookup failed");
                Reply::text(format!("oncall: {e}{}", asked_by(who)))
            }
        }
    }
}

/// A table: escalation policy / schedule, level, user, until.
pub fn render(entries: &[Entry], schedule: Option<&str>, who: &str) -> Reply {
    let header = format!(
        "on call{}: {} entr{}{}",
        schedule.map(|s| format!(" ({s})")).unwrap_or_default(),
        entries.len(),
        if entries.len() == 1 { "y" } else { "ies" },
        asked_by(who)
    );
    if entries.is_empty() {
        return Reply::text(header);
    }
    let mut text = format!(
        "{:<40} {:>5}  {:<40} {}\n",
        "POLICY / SCHEDULE", "LEVEL", "USER", "UNTIL"
    );
    for e in entries.iter().take(MAX_ROWS) {
        let place = if e.schedule.is_empty() {
            e.escalation_policy.clone()
        } else {
            format!("{} / {}", e.escalation_policy, e.schedule)
        };
        let user = if e.email.is_empty() {
            e.user.clone()
        } else {
            format!("{} <{}>", e.user, e.email)
        };
        let until = if e.until.is_empty() {
            "-"
        } else {
            e.until.as_str()
        };
        let _ = writeln!(
            text,
            "{:<40} {:>5}  {:<40} {}",
            one_line(&place),
            e.level,
            one_line(&user),
            one_line(until)
        );
    }
    let mut reply = Reply::text(header);
    reply.sections.push(Section {
        title: "PagerDuty".into(),
        notes: if entries.len() > MAX_ROWS {
            vec![format!("… {} more not shown", entries.len() - MAX_ROWS)]
        } else {
            Vec::new()
        },
        blocks: vec![CodeBlock {
            label: String::new(),
            text,
            omitted_lines: 0,
        }],
    });
    reply
}

fn spec() -> Vec<CommandSpec> {
    vec![CommandSpec {
        verb: "oncall".into(),
        usage: USAGE.into(),
        summary: "who is on call (PagerDuty)".into(),
        help: "without a schedule: every schedule in [pagerduty.schedules]".into(),
        guard: Guard::AnyRoleHere,
    }]
}

impl Commands for Oncall {
    fn commands(&self) -> Vec<CommandSpec> {
        spec()
    }

    fn call<'a>(&'a self, call: Call<'a>, _: &'a dyn CallContext) -> BoxFuture<'a, Reply> {
        let who = call.msg.identity.as_str();
        Box::pin(async move {
            match call.args.split_whitespace().collect::<Vec<_>>().as_slice() {
                [] => self.reply(None, who).await,
                [s] => self.reply(Some(s), who).await,
                _ => Reply::text(format!("usage: {USAGE}{}", asked_by(who))),
            }
        })
    }
}

const USAGE: &str = "oncall [schedule]";

/// `oncall` when `[pagerduty] api_token` is not set: says what to configure.
pub fn not_configured() -> crate::registry::Unconfigured {
    crate::registry::Unconfigured {
        specs: spec(),
        message: "oncall needs [pagerduty] api_token in gateway.toml".into(),
    }
}
