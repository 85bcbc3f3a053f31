//! `agent.toml`: loaded, then validated in one pass that names every problem
//! with its key.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::controllers::Controllers;

/// Largest `max_output_bytes`: stdout and stderr of one job, kept in full,
/// must fit one 4 MiB message to the controller.
pub const MAX_OUTPUT_BYTES: usize = 3 * 512 * 1024;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawConfig {
    /// `https://host:7443`: the one controller (or use `controllers`).
    pub controller: String,
    /// Several controllers of one fleet (one database, one CA), dialled in
    /// order: the next one when a connection is lost.
    pub controllers: Vec<String>,
    pub state_dir: PathBuf,
    /// Facts this host reports about itself (`os = "debian-12"`): shown in
    /// `fleetcmd agents`, never used for targeting or `targets` rules —
    /// labels that grant come only from the join token.
    pub facts: BTreeMap<String, String>,
    /// Deprecated: what older agent.toml files call `labels`; reported as
    /// facts, granting nothing.
    pub labels: BTreeMap<String, String>,
    /// Narrows the policy's allow-list on this host (absent = no narrowing).
    pub allow: Option<Vec<String>>,
    /// Output kept per stream of a command, in bytes.
    pub max_output_bytes: usize,
    /// Jobs this host runs at once; later ones wait their turn.
    pub max_concurrent_jobs: usize,
    /// Loopback address of the agent's own `/metrics`; empty: none (the
    /// agent then opens no port at all).
    pub metrics_listen: String,
    /// `[[check]]` tables: local health checks (docs/health/checks.md).
    pub check: Vec<crate::checks::config::RawCheck>,
}

impl Default for RawConfig {
    fn default() -> Self {
        RawConfig {
            controller: String::new(),
            controllers: Vec::new(),
            state_dir: "/var/lib/fleetcmd/agent".into(),
            facts: BTreeMap::new(),
            labels: BTreeMap::new(),
            allow: None,
            max_output_bytes: 1024 * 1024,
            max_concurrent_jobs: 16,
            metrics_listen: String::new(),
            check: Vec::new(),
        }
    }
}

/// A validated agent configuration.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    /// Where the agent connects: the first, and the next on a lost connection.
    pub controllers: crate::controllers::Controllers,
    pub state_dir: PathBuf,
    /// What the host reports about itself; grants nothing.
    pub facts: BTreeMap<String, String>,
    pub allow: Option<Vec<String>>,
    pub max_output_bytes: usize,
    pub max_concurrent_jobs: usize,
    /// Always a loopback address when set.
    pub metrics_listen: Option<std::net::SocketAddr>,
    /// Health checks run on their own intervals; results go out with every
    /// heartbeat.
    pub checks: Vec<crate::checks::CheckConfig>,
}

#[derive(Debug, thiserror::Error)]
#[error("{}", .problems.iter().map(|p| format!("{}: {p}", .file)).collect::<Vec<_>>().join("\n"))]
pub struct ConfigError {
    pub file: String,
    pub problems: Vec<String>,
}

impl RawConfig {
    pub fn validate(&self, file: &str) -> Result<AgentConfig, ConfigError> {
        let mut problems = Vec::new();
        let controllers = match (self.controller.is_empty(), self.controllers.is_empty()) {
            (true, true) => {
                problems.push(
                    "controller: required, e.g. \"https://ctl.example.com:7443\" (or `controllers = [...]` for several)"
                        .to_string(),
                );
                None
            }
            (false, false) => {
                problems.push(
                    "controller, controllers: give one of them (put every address in `controllers`)"
                        .to_string(),
                );
                None
            }
            (false, true) => Controllers::one(&self.controller)
                .map_err(|p| problems.extend(p))
                .ok(),
            (true, false) => Controllers::parse("controllers", &self.controllers)
                .map_err(|p| problems.extend(p))
                .ok(),
        };
        if self.state_dir.as_os_str().is_empty() || !self.state_dir.is_absolute() {
            problems.push(format!(
                "state_dir: must be an absolute path, got {:?}",
                self.state_dir
            ));
        }
        if !self.labels.is_empty() {
            tracing::warn!(
                "{file}: `labels` is deprecated and grants nothing: a host's labels come only from its join token; \
                 these are reported as facts (rename the key to `facts`)"
            );
        }
        let mut facts = self.labels.clone();
        facts.extend(self.facts.clone());
        if facts.len() > fleetcmd_core::host::MAX_FACTS {
            problems.push(format!(
                "facts: {} facts, at most {}",
                facts.len(),
                fleetcmd_core::host::MAX_FACTS
            ));
        }
        if !facts.is_empty() {
            let text = facts
                .iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect::<Vec<_>>()
                .join(",");
            if let Err(e) = fleetcmd_core::selector::parse_labels(&text) {
                problems.push(format!("facts: {e}"));
            }
        }
        if let Some(allow) = &self.allow {
            if allow.len() > fleetcmd_core::host::MAX_ALLOW {
                problems.push(format!(
                    "allow: {} entries, at most {}",
                    allow.len(),
                    fleetcmd_core::host::MAX_ALLOW
                ));
            }
            for (i, name) in allow.iter().enumerate() {
                if !fleetcmd_core::host::is_allow_entry(name) {
                    problems.push(format!("allow[{i}]: {name:?} is not a command name"));
                }
            }
        }
        // Both streams travel in one result message on the agent stream,
        // whose limit is 4 MiB: keep two full streams well under it.
        if !(1024..=MAX_OUTPUT_BYTES).contains(&self.max_output_bytes) {
            problems.push(format!(
                "max_output_bytes: must be between 1024 and {MAX_OUTPUT_BYTES}, got {}",
                self.max_output_bytes
            ));
        }
        if !(1..=1024).contains(&self.max_concurrent_jobs) {
            problems.push(format!(
                "max_concurrent_jobs: must be between 1 and 1024, got {}",
                self.max_concurrent_jobs
            ));
        }
        let metrics_listen = match self.metrics_listen.trim() {
            "" => None,
            text => match text.parse::<std::net::SocketAddr>() {
                Ok(a) if a.ip().is_loopback() => Some(a),
                Ok(a) => {
                    problems.push(format!(
                        "metrics_listen: {a} is not a loopback address; the agent serves metrics only to this host (use 127.0.0.1:PORT or [::1]:PORT)"
                    ));
                    None
                }
                Err(e) => {
                    problems.push(format!(
                        "metrics_listen: {text:?} is not an address (e.g. \"127.0.0.1:9465\", or empty for none): {e}"
                    ));
                    None
                }
            },
        };
        let checks = crate::checks::config::validate_checks(&self.check, &mut problems);
        let (Some(controllers), true) = (controllers, problems.is_empty()) else {
            return Err(ConfigError {
                file: file.to_owned(),
                problems,
            });
        };
        Ok(AgentConfig {
            controllers,
            state_dir: self.state_dir.clone(),
            facts,
            allow: self.allow.clone(),
            max_output_bytes: self.max_output_bytes,
            max_concurrent_jobs: self.max_concurrent_jobs,
            metrics_listen,
            checks,
        })
    }
}

pub fn load(path: &Path) -> Result<AgentConfig, ConfigError> {
    let file = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
        file: file.clone(),
        problems: vec![e.to_string()],
    })?;
    let raw: RawConfig = toml::from_str(&text).map_err(|e| ConfigError {
        file: file.clone(),
        problems: vec![e.to_string().trim_end().to_string()],
    })?;
    raw.validate(&file)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(metrics_listen: &str) -> Result<AgentConfig, ConfigError> {
        RawConfig {
            controller: "https://ctl.example.com:7443".into(),
            metrics_listen: metrics_listen.into(),
            ..RawConfig::default()
        }
        .validate("agent.toml")
    }

    #[test]
    fn metrics_listen_is_loopback_only() {
        assert_eq!(check("").expect("valid").metrics_listen, None);
        for ok in ["127.0.0.1:9465", "[::1]:9465", "127.0.0.2:0"] {
            assert!(check(ok).expect(ok).metrics_listen.is_some(), "{ok}");
        }
        for bad in ["0.0.0.0:9465", "10.0.0.5:9465", "[::]:9465"] {
            let e = check(bad).expect_err(bad).to_string();
            assert!(
                e.contains("agent.toml: metrics_listen:") && e.contains("not a loopback address"),
                "{bad}: {e}"
            );
        }
        let e = check("localhost:9465").expect_err("a name").to_string();
        assert!(
            e.contains("metrics_listen: \"localhost:9465\" is not an address"),
            "{e}"
        );
    }

    #[test]
    fn labels_in_agent_toml_are_only_facts() {
        let load = |text: &str| -> Result<AgentConfig, ConfigError> {
            let raw: RawConfig = toml::from_str(&format!(
                "controller = \"https://ctl.example.com:7443\"\n{text}"
            ))
            .expect("toml");
            raw.validate("agent.toml")
        };
        let pairs =
            |c: &AgentConfig| -> Vec<(String, String)> { c.facts.clone().into_iter().collect() };
        // (agent.toml lines, the facts or a piece of the error)
        type Case<'a> = (&'a str, Result<&'a [(&'a str, &'a str)], &'a str>);
        let cases: &[Case] = &[
            ("", Ok(&[])),
            ("facts = { os = \"debian-12\" }", Ok(&[("os", "debian-12")])),
            // The deprecated key is read as facts; `facts` wins on a clash.
            (
                "labels = { role = \"db\", os = \"x\" }\nfacts = { os = \"debian-12\" }",
                Ok(&[("os", "debian-12"), ("role", "db")]),
            ),
            ("facts = { os = \"deb ian\" }", Err("facts: invalid labels")),
            (
                "labels = { \"ro le\" = \"db\" }",
                Err("facts: invalid labels"),
            ),
        ];
        for (text, want) in cases {
            match (load(text), want) {
                (Ok(c), Ok(want)) => {
                    let want: Vec<(String, String)> = want
                        .iter()
                        .map(|(k, v)| (k.to_string(), v.to_string()))
                        .collect();
                    assert_eq!(pairs(&c), want, "{text}");
                }
                (Err(e), Err(needle)) => {
                    assert!(e.to_string().contains(needle), "{text}: {e}")
                }
                (got, want) => panic!("{text}: got {got:?}, want {want:?}"),
            }
        }
    }

    #[test]
    fn one_controller_or_several_each_named_in_errors() {
        let load = |text: &str| -> Result<AgentConfig, ConfigError> {
            let raw: RawConfig = toml::from_str(text).expect("toml");
            raw.validate("agent.toml")
        };
        let urls = |c: &AgentConfig| c.controllers.urls().to_vec();
        let one = load("controller = \"https://a:7443\"").expect("one controller");
        assert_eq!(urls(&one), ["https://a:7443"]);
        let two = load("controllers = [\"https://a:7443\", \"https://b:7443\"]").expect("two");
        assert_eq!(urls(&two), ["https://a:7443", "https://b:7443"]);
        for (text, needle) in [
            ("", "agent.toml: controller: required"),
            (
                "controller = \"https://a:7443\"\ncontrollers = [\"https://b:7443\"]",
                "agent.toml: controller, controllers: give one of them",
            ),
            ("controllers = []", "agent.toml: controller: required"),
            (
                "controllers = [\"https://a:7443\", \"http://b:7443\"]",
                "agent.toml: controllers[1]: ",
            ),
            (
                "controllers = [\"https://a:7443\", \"https://a:7443\"]",
                "agent.toml: controllers[1]: \"https://a:7443\" repeats controllers[0]",
            ),
            ("controller = \"http://a:7443\"", "agent.toml: controller: "),
        ] {
            let e = load(text).expect_err(text).to_string();
            assert!(e.contains(needle), "{text}: {e}");
        }
    }
}
