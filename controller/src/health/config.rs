//! `[services.NAME]` in controller.toml: which hosts make up a service,
//! which of their checks says an instance is healthy, the thresholds, and
//! where its alerts go.

use std::collections::BTreeMap;
use std::time::Duration;

use fleetcmd_core::duration::parse_duration;
use fleetcmd_core::health::{Damping, Percent, Thresholds};
use fleetcmd_core::selector::Selector;
use serde::Deserialize;

/// One service as written.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawService {
    /// Which agents are its instances, e.g. `role=api`.
    pub selector: String,
    /// The name of the agents' check (`[[check]] name` in agent.toml) whose
    /// state decides whether an instance passes (OK or WARNING).
    pub check: String,
    pub degraded_below: String,
    pub down_below: String,
    /// Chat channels (`scheme:channel`, e.g. `irc:#ops`) for its alerts.
    pub channels: Vec<String>,
    pub confirm: String,
    pub flap_window: String,
    pub flap_threshold: u32,
    /// `0` = no reminders.
    pub remind: String,
    /// Integrations the gateway drives from this service's state (names
    /// or ids in the gateway's `[pagerduty]`/`[opsgenie]`/`[statuspage]`).
    pub pagerduty: String,
    pub opsgenie: String,
    pub statuspage_component: String,
}

impl Default for RawService {
    fn default() -> Self {
        let d = Damping::default();
        let t = Thresholds::default();
        RawService {
            selector: String::new(),
            check: String::new(),
            degraded_below: format!("{}%", t.degraded_below.get()),
            down_below: format!("{}%", t.down_below.get()),
            channels: Vec::new(),
            confirm: format!("{}s", d.confirm.as_secs()),
            flap_window: format!("{}s", d.flap_window.as_secs()),
            flap_threshold: d.flap_threshold,
            remind: format!("{}s", d.remind.as_secs()),
            pagerduty: String::new(),
            opsgenie: String::new(),
            statuspage_component: String::new(),
        }
    }
}

/// A validated service.
#[derive(Debug, Clone)]
pub struct ServiceConfig {
    pub name: String,
    pub selector: Selector,
    pub selector_text: String,
    pub check: String,
    pub thresholds: Thresholds,
    pub damping: Damping,
    pub channels: Vec<String>,
    pub pagerduty: String,
    pub opsgenie: String,
    pub statuspage_component: String,
}

/// `[host_alerts]`: alerts on individual hosts' checks (a full disk on one
/// machine), besides services. Each (host, check) is alerted on its own:
/// WARNING is `degraded`, CRITICAL `down`, UNKNOWN `unknown`, OK `ok`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawHostAlerts {
    /// Which agents (default: all).
    pub selector: String,
    /// Names of the agents' checks to alert on, e.g. `["disk", "memory"]`.
    pub checks: Vec<String>,
    pub channels: Vec<String>,
    pub confirm: String,
    pub flap_window: String,
    pub flap_threshold: u32,
    pub remind: String,
}

impl Default for RawHostAlerts {
    fn default() -> Self {
        let s = RawService::default();
        RawHostAlerts {
            selector: "all".into(),
            checks: Vec::new(),
            channels: Vec::new(),
            confirm: s.confirm,
            flap_window: s.flap_window,
            flap_threshold: s.flap_threshold,
            remind: s.remind,
        }
    }
}

/// Validated `[host_alerts]`.
#[derive(Debug, Clone)]
pub struct HostAlertsConfig {
    pub selector: Selector,
    pub checks: Vec<String>,
    pub channels: Vec<String>,
    pub damping: Damping,
}

/// Validates `[host_alerts]` with the same rules as a service's keys.
pub fn validate_host_alerts(raw: &RawHostAlerts) -> Result<HostAlertsConfig, Vec<String>> {
    // Reuse the service rules for selector, damping and channels.
    let as_service = RawService {
        selector: raw.selector.clone(),
        check: raw.checks.first().cloned().unwrap_or_else(|| "-".into()),
        channels: raw.channels.clone(),
        confirm: raw.confirm.clone(),
        flap_window: raw.flap_window.clone(),
        flap_threshold: raw.flap_threshold,
        remind: raw.remind.clone(),
        ..RawService::default()
    };
    let mut problems = Vec::new();
    let svc = match validate(&BTreeMap::from([("host_alerts".to_string(), as_service)])) {
        Ok(mut v) => v.pop(),
        Err(p) => {
            problems.extend(
                p.into_iter()
                    .map(|p| p.replacen("services.host_alerts", "host_alerts", 1)),
            );
            None
        }
    };
    if raw.checks.is_empty() {
        problems.push("host_alerts.checks: name at least one check (e.g. [\"disk\"])".into());
    }
    for (i, c) in raw.checks.iter().enumerate() {
        if c.trim().is_empty() {
            problems.push(format!("host_alerts.checks[{i}]: must not be empty"));
        }
    }
    match svc {
        Some(s) if problems.is_empty() => Ok(HostAlertsConfig {
            selector: s.selector,
            checks: raw.checks.clone(),
            channels: s.channels,
            damping: s.damping,
        }),
        _ => Err(problems),
    }
}

fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

/// Validates every service, returning every problem with its key path.
pub fn validate(raw: &BTreeMap<String, RawService>) -> Result<Vec<ServiceConfig>, Vec<String>> {
    let mut problems = Vec::new();
    let mut out = Vec::new();
    for (name, s) in raw {
        let at = format!("services.{name}");
        if !valid_name(name) {
            problems.push(format!(
                "{at}: service names are 1-64 letters, digits, '-', '_' or '.'"
            ));
        }
        let selector = if s.selector.trim().is_empty() {
            problems.push(format!("{at}.selector: required (e.g. \"role=api\")"));
            None
        } else {
            Selector::parse(&s.selector)
                .map_err(|e| problems.push(format!("{at}.selector: {e}")))
                .ok()
        };
        if s.check.trim().is_empty() {
            problems.push(format!(
                "{at}.check: required: the name of the agents' check ([[check]] name in agent.toml)"
            ));
        }
        let mut pct = |key: &str, v: &str| {
            Percent::parse(v)
                .map_err(|e| problems.push(format!("{at}.{key}: {e}")))
                .ok()
        };
        let degraded_below = pct("degraded_below", &s.degraded_below);
        let down_below = pct("down_below", &s.down_below);
        if let (Some(dg), Some(dn)) = (degraded_below, down_below)
            && dn.get() > dg.get()
        {
            problems.push(format!(
                "{at}.down_below: {} is above degraded_below ({})",
                s.down_below, s.degraded_below
            ));
        }
        let mut dur = |key: &str, v: &str, min: Duration| -> Duration {
            match parse_duration(v) {
                Ok(d) if d >= min || d.is_zero() && key == "remind" => d,
                Ok(_) => {
                    problems.push(format!("{at}.{key}: {v:?} must be at least {min:?}"));
                    min
                }
                Err(e) => {
                    problems.push(format!("{at}.{key}: {e}"));
                    min
                }
            }
        };
        let confirm = dur("confirm", &s.confirm, Duration::ZERO);
        let flap_window = dur("flap_window", &s.flap_window, Duration::from_secs(1));
        let remind = dur("remind", &s.remind, Duration::from_secs(60));
        if s.flap_threshold == 1 {
            problems.push(format!(
                "{at}.flap_threshold: 1 would call every change flapping; use 0 (off) or at least 2"
            ));
        }
        for (i, c) in s.channels.iter().enumerate() {
            match c.split_once(':') {
                Some((scheme, ch)) if !scheme.is_empty() && !ch.is_empty() => {}
                _ => problems.push(format!(
                    "{at}.channels[{i}]: {c:?} is not `scheme:channel` (e.g. \"irc:#ops\", \"slack:C0123\")"
                )),
            }
        }
        if let (Some(selector), Some(dg), Some(dn)) = (selector, degraded_below, down_below) {
            out.push(ServiceConfig {
                name: name.clone(),
                selector,
                selector_text: s.selector.clone(),
                check: s.check.trim().to_string(),
                thresholds: Thresholds {
                    degraded_below: dg,
                    down_below: dn,
                },
                damping: Damping {
                    confirm,
                    flap_window,
                    flap_threshold: s.flap_threshold,
                    remind,
                },
                channels: s.channels.clone(),
                pagerduty: s.pagerduty.clone(),
                opsgenie: s.opsgenie.clone(),
                statuspage_component: s.statuspage_component.clone(),
            });
        }
    }
    if problems.is_empty() {
        Ok(out)
    } else {
        Err(problems)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Vec<ServiceConfig>, Vec<String>> {
        #[derive(Deserialize)]
        struct F {
            services: BTreeMap<String, RawService>,
        }
        let f: F = toml::from_str(text).expect("toml");
        validate(&f.services)
    }

    #[test]
    fn a_service_with_defaults() {
        let s = parse("[services.api]\nselector = \"role=api\"\ncheck = \"http\"\nchannels = [\"irc:#ops\"]\n")
            .expect("valid");
        assert_eq!(s.len(), 1);
        assert_eq!(s[0].thresholds, Thresholds::default());
        assert_eq!(s[0].damping, Damping::default());
        assert_eq!(s[0].channels, ["irc:#ops"]);
    }

    #[test]
    fn every_problem_is_named_with_its_key() {
        let err = parse(
            "[services.\"bad name\"]\nselector = \"role in (\"\ncheck = \"\"\ndegraded_below = \"50%\"\ndown_below = \"90%\"\nchannels = [\"ops\"]\nconfirm = \"soon\"\nflap_threshold = 1\nremind = \"5s\"\n",
        )
        .expect_err("invalid");
        let text = err.join("\n");
        for want in [
            "services.bad name: service names",
            "services.bad name.selector:",
            "services.bad name.check: required",
            "services.bad name.down_below: 90% is above degraded_below (50%)",
            "services.bad name.channels[0]: \"ops\" is not `scheme:channel`",
            "services.bad name.confirm: invalid duration",
            "services.bad name.flap_threshold:",
            "services.bad name.remind: \"5s\" must be at least 60s",
        ] {
            assert!(text.contains(want), "{want:?} missing from:\n{text}");
        }
        let err = parse("[services.api]\ncheck = \"http\"\n").expect_err("no selector");
        assert!(
            err[0].contains("services.api.selector: required"),
            "{err:?}"
        );
    }

    #[test]
    fn host_alerts_validate_like_services() {
        let raw: RawHostAlerts =
            toml::from_str("checks = [\"disk\"]\nchannels = [\"irc:#ops\"]\n").expect("toml");
        let h = validate_host_alerts(&raw).expect("valid");
        assert_eq!(h.checks, ["disk"]);
        let raw: RawHostAlerts =
            toml::from_str("channels = [\"ops\"]\nconfirm = \"soon\"\n").expect("toml");
        let text = validate_host_alerts(&raw).expect_err("invalid").join("\n");
        for want in [
            "host_alerts.checks: name at least one check",
            "host_alerts.channels[0]:",
            "host_alerts.confirm:",
        ] {
            assert!(text.contains(want), "{want:?} missing from:\n{text}");
        }
    }

    #[test]
    fn reminders_can_be_off() {
        let s = parse("[services.api]\nselector = \"all\"\ncheck = \"x\"\nremind = \"0\"\n")
            .expect("valid");
        assert!(s[0].damping.remind.is_zero());
    }
}
