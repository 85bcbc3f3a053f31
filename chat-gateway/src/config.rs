//! `gateway.toml`: shape (serde, unknown keys refused), then values
//! ([`GatewayConfig::validate`], every problem with its key path), then the
//! files it names ([`GatewayConfig::options`]).
//!
//! ```toml
//! controller = "https://controller.example.com:7443"
//! ca = "/etc/fleetcmd/gateway/ca.pem"
//! cert = "/etc/fleetcmd/gateway/cert.pem"
//! key = "/etc/fleetcmd/gateway/key.pem"
//! signing_key = "/etc/fleetcmd/gateway/signing-key.pem"   # PKCS#8 Ed25519
//! signer_id = "gateway-main"
//! policy_roots = ["ed25519:MCowBQYDK2VwAyEA..."]
//! policy_threshold = 1     # default 1
//! bot_name = "fleetcmd"    # default "fleetcmd"
//!
//! [console]
//! enabled = true           # default false
//! ```
//!
//! Relative paths are resolved against the directory of the config file.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use fleetcmd_core::crypto::{PublicKey, SigningKey};
use fleetcmd_core::duration::parse_duration;
use fleetcmd_proto::channel::{ClientTls, controller_url, endpoint};
use serde::Deserialize;

use crate::{DEFAULT_APPROVAL_WINDOW, DEFAULT_JOB_EXPIRY, DEFAULT_POLL_INTERVAL, GatewayOptions};

/// Where the gateway looks for its config by default.
pub const DEFAULT_PATH: &str = "/etc/fleetcmd/gateway.toml";

/// Defaults, in one place.
pub mod defaults {
    pub const POLICY_THRESHOLD: usize = 1;
    pub const BOT_NAME: &str = "fleetcmd";

    pub(super) fn policy_threshold() -> usize {
        POLICY_THRESHOLD
    }
    pub const APPROVAL_TIMEOUT: &str = "15m";
    pub(super) fn approval_timeout() -> String {
        APPROVAL_TIMEOUT.to_string()
    }
    pub const CHAT_LEASE: &str = "30s";
    pub(super) fn chat_lease() -> String {
        CHAT_LEASE.to_string()
    }
    pub(super) fn state_dir() -> std::path::PathBuf {
        crate::store::DEFAULT_STATE_DIR.into()
    }
    pub(super) fn http_listen() -> String {
        crate::http::DEFAULT_LISTEN.to_string()
    }
    pub(super) fn bot_name() -> String {
        BOT_NAME.to_string()
    }
}

/// The gateway configuration file. Its own keys are parsed here; every
/// section beyond `[http]` belongs to a registered component (unknown keys
/// are refused there, and unknown sections here).
#[derive(Deserialize, Debug, Clone, PartialEq)]
pub struct GatewayConfig {
    /// Controller gRPC address, `https://host:port` or `host:port`.
    pub controller: String,
    /// Fleet CA certificate (PEM).
    pub ca: PathBuf,
    /// The gateway's client certificate (PEM), issued by the fleet CA.
    pub cert: PathBuf,
    /// Its private key (PEM).
    pub key: PathBuf,
    /// Ed25519 job-signing key, PKCS#8 PEM.
    pub signing_key: PathBuf,
    /// The signing key's id in the policy's `[[signers]]`.
    pub signer_id: String,
    /// Policy root public keys (`ed25519:…`).
    pub policy_roots: Vec<String>,
    #[serde(default = "defaults::policy_threshold")]
    pub policy_threshold: usize,
    #[serde(default = "defaults::bot_name")]
    pub bot_name: String,
    /// How long an approval request waits, e.g. `15m`.
    #[serde(default = "defaults::approval_timeout")]
    pub approval_timeout: String,
    /// How long a gateway's hold on an IRC, XMPP or Matrix chat account
    /// runs without a renewal (`crate::standby`), e.g. `30s`: a standby
    /// gateway takes over a crashed one's chat within about 4/3 of it.
    #[serde(default = "defaults::chat_lease")]
    pub chat_lease: String,
    /// Where the gateway keeps its state (replay records of every inbound
    /// path), default [`crate::store::DEFAULT_STATE_DIR`]; created 0700.
    #[serde(default = "defaults::state_dir")]
    pub state_dir: PathBuf,
    #[serde(default)]
    pub http: HttpConfig,
    /// Every other section (`[slack]`, `[pagerduty]`, …): a chat platform
    /// or an integration, selected by its name in the registry
    /// ([`crate::registry::components`]); a name no component claims is
    /// refused by [`GatewayConfig::parse`].
    #[serde(flatten)]
    pub sections: BTreeMap<String, toml::Value>,
    /// The config file's directory: relative paths in sections are
    /// resolved against it.
    #[serde(skip)]
    pub base: PathBuf,
    /// The config file itself: inline secrets are refused when others may
    /// read it.
    #[serde(skip)]
    pub file: PathBuf,
}

/// `[http]`: the listener for chat webhooks (used only when an adapter
/// that receives HTTP is enabled).
#[derive(Deserialize, Debug, Clone, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct HttpConfig {
    #[serde(default = "defaults::http_listen")]
    pub listen: String,
}

impl Default for HttpConfig {
    fn default() -> HttpConfig {
        HttpConfig {
            listen: crate::http::DEFAULT_LISTEN.to_string(),
        }
    }
}

/// One configuration problem, with the key it is about.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub key: String,
    pub message: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.key, self.message)
    }
}

/// Why a configuration could not be used; always names the file.
#[derive(thiserror::Error, Debug)]
pub enum ConfigError {
    #[error("{}: cannot read: {source}", file.display())]
    Read {
        file: PathBuf,
        source: std::io::Error,
    },
    #[error("{}: {message}", file.display())]
    Parse { file: PathBuf, message: String },
    #[error("{}: invalid configuration:\n{}", file.display(), list(problems))]
    Invalid {
        file: PathBuf,
        problems: Vec<Problem>,
    },
}

/// `line N: ` of the first `[name]` or `[[name]]` header in `text` (a
/// section's own errors come from its parsed value, which has no
/// positions), or nothing when the section is written inline.
fn section_line(text: &str, name: &str) -> String {
    text.lines()
        .position(|l| {
            let l = l.trim();
            l == format!("[{name}]") || l == format!("[[{name}]]")
        })
        .map(|i| format!("line {}: ", i + 1))
        .unwrap_or_default()
}

/// Every string under a key that names a secret or key file, at any depth.
fn files_named_in(value: &toml::Value, out: &mut Vec<PathBuf>) {
    let names_a_file = |k: &str| {
        ["file", "key", "cert", "ca"].contains(&k) || k.ends_with("_file") || k.ends_with("_key")
    };
    match value {
        toml::Value::Table(t) => {
            for (k, v) in t {
                match v {
                    toml::Value::String(s) if names_a_file(k) => out.push(PathBuf::from(s)),
                    _ => files_named_in(v, out),
                }
            }
        }
        toml::Value::Array(a) => a.iter().for_each(|v| files_named_in(v, out)),
        _ => {}
    }
}

fn list(problems: &[Problem]) -> String {
    problems
        .iter()
        .map(|p| format!("  {p}"))
        .collect::<Vec<_>>()
        .join("\n")
}

impl GatewayConfig {
    /// `chat_lease` as a duration, within what the controller grants.
    pub fn chat_lease_ttl(&self) -> Result<std::time::Duration, String> {
        let (min, max) = (crate::standby::MIN_TTL, crate::standby::MAX_TTL);
        match parse_duration(&self.chat_lease) {
            Ok(d) if (min..=max).contains(&d) => Ok(d),
            Ok(_) => Err(format!(
                "must be between {}s and {}s",
                min.as_secs(),
                max.as_secs()
            )),
            Err(e) => Err(e),
        }
    }

    /// Parses TOML text (shape only).
    /// Relative paths in adapter sections are made relative to `file`'s
    /// directory here, so `validate`, `options` and the adapters agree.
    pub fn parse(text: &str, file: &Path) -> Result<GatewayConfig, ConfigError> {
        let mut cfg: GatewayConfig = toml::from_str(text).map_err(|e| ConfigError::Parse {
            file: file.to_path_buf(),
            message: e.to_string().trim_end().to_string(),
        })?;
        cfg.base = file.parent().unwrap_or(Path::new(".")).to_path_buf();
        cfg.file = file.to_path_buf();
        if !cfg.state_dir.as_os_str().is_empty() && cfg.state_dir.is_relative() {
            cfg.state_dir = cfg.base.join(&cfg.state_dir);
        }
        // Each section's shape, by the component that claims its name.
        for (name, section) in &cfg.sections {
            let parse_error = |message: String| ConfigError::Parse {
                file: file.to_path_buf(),
                message,
            };
            let Some(entry) = crate::registry::find(name) else {
                return Err(parse_error(format!(
                    "unknown key or section `{}`: not a gateway setting, and no chat platform or integration is named so (known sections: http, {})",
                    fleetcmd_core::terminal::excerpt(name),
                    crate::registry::components()
                        .iter()
                        .map(|e| e.name)
                        .collect::<Vec<_>>()
                        .join(", ")
                )));
            };
            entry
                .parse(section, &crate::registry::Paths::base(&cfg.base))
                .map_err(|e| parse_error(format!("{}[{name}]: {e}", section_line(text, name))))?;
        }
        Ok(cfg)
    }

    /// The section of component `T`, typed, when the file has one.
    pub fn section<T: crate::registry::Component>(&self) -> Option<T> {
        let raw = self.sections.get(T::NAME)?;
        match crate::registry::typed(raw, &self.paths()) {
            Ok(c) => Some(c),
            Err(e) => {
                tracing::warn!(section = T::NAME, error = %e, "section does not parse");
                None
            }
        }
    }

    /// Where sections resolve relative paths, and what is the gateway's
    /// own: its configuration directory and file, TLS and signing keys,
    /// certificates, state directory, and every file a section names
    /// under a key called `file`, `*_file`, `key`, `*_key`, `cert` or
    /// `ca` (secret files, client keys).
    pub fn paths(&self) -> crate::registry::Paths {
        let mut paths = vec![
            self.file.clone(),
            self.ca.clone(),
            self.cert.clone(),
            self.key.clone(),
            self.signing_key.clone(),
            self.state_dir.clone(),
        ];
        for section in self.sections.values() {
            files_named_in(section, &mut paths);
        }
        let paths = paths
            .into_iter()
            .filter(|p| !p.as_os_str().is_empty())
            .map(|p| {
                if p.is_relative() {
                    self.base.join(p)
                } else {
                    p
                }
            })
            .collect();
        crate::registry::Paths {
            base: self.base.clone(),
            private: crate::registry::Private {
                config_dir: self.base.clone(),
                paths,
            },
        }
    }

    /// Reads and parses a file (shape only; call [`GatewayConfig::validate`]).
    pub fn load(file: &Path) -> Result<GatewayConfig, ConfigError> {
        let text = std::fs::read_to_string(file).map_err(|source| ConfigError::Read {
            file: file.to_path_buf(),
            source,
        })?;
        GatewayConfig::parse(&text, file)
    }

    /// Checks the values; returns every problem at once.
    pub fn validate(&self) -> Result<(), Vec<Problem>> {
        let mut problems = Vec::new();
        let mut bad = |key: &str, message: String| {
            problems.push(Problem {
                key: key.to_string(),
                message,
            })
        };
        if let Err(e) = controller_url(&self.controller) {
            bad("controller", e.to_string());
        }
        for (key, path) in [
            ("ca", &self.ca),
            ("cert", &self.cert),
            ("key", &self.key),
            ("signing_key", &self.signing_key),
        ] {
            if path.as_os_str().is_empty() {
                bad(key, "must name a file".to_string());
            }
        }
        if self.signer_id.trim().is_empty() {
            bad("signer_id", "must not be empty".to_string());
        }
        if self.policy_roots.is_empty() {
            bad(
                "policy_roots",
                "at least one policy root public key is required".to_string(),
            );
        }
        for (i, root) in self.policy_roots.iter().enumerate() {
            if let Err(e) = PublicKey::parse(root) {
                bad(&format!("policy_roots[{i}]"), e.to_string());
            }
        }
        if self.policy_threshold == 0 || self.policy_threshold > self.policy_roots.len().max(1) {
            bad(
                "policy_threshold",
                format!(
                    "must be between 1 and the number of policy_roots ({})",
                    self.policy_roots.len()
                ),
            );
        }
        if self.bot_name.is_empty()
            || self
                .bot_name
                .chars()
                .any(|c| c.is_whitespace() || c.is_control())
        {
            bad(
                "bot_name",
                "must be a non-empty name without spaces".to_string(),
            );
        }
        if self.state_dir.as_os_str().is_empty() {
            bad("state_dir", "must not be empty".to_string());
        } else if self.state_dir.exists() && !self.state_dir.is_dir() {
            bad(
                "state_dir",
                format!(
                    "{}: exists and is not a directory",
                    self.state_dir.display()
                ),
            );
        }
        if let Err(e) = self.http.listen.parse::<std::net::SocketAddr>() {
            bad(
                "http.listen",
                format!("expected ADDRESS:PORT, e.g. 127.0.0.1:7081: {e}"),
            );
        }
        match parse_duration(&self.approval_timeout) {
            Ok(d) if d.as_secs() >= 10 && d.as_secs() <= 24 * 3600 => {}
            Ok(_) => bad(
                "approval_timeout",
                "must be between 10s and 24h".to_string(),
            ),
            Err(e) => bad("approval_timeout", e),
        }
        if let Err(e) = self.chat_lease_ttl() {
            bad("chat_lease", e);
        }
        let mut adapter_problems: Vec<Problem> = Vec::new();
        let mut chat_enabled = false;
        let paths = self.paths();
        let (parsed, inline_secrets) = crate::secret::counting_inline(|| {
            crate::registry::components()
                .into_iter()
                .filter_map(|entry| {
                    let section = self.sections.get(entry.name)?;
                    let parsed = entry.parse(section, &paths);
                    Some((entry, parsed))
                })
                .collect::<Vec<_>>()
        });
        if let Err(e) = crate::secret::check_inline_allowed(&self.file, inline_secrets) {
            bad("secrets", e);
        }
        for (entry, parsed) in parsed {
            match parsed {
                Ok(parsed) => {
                    chat_enabled |= entry.chat && parsed.enabled;
                    adapter_problems.extend(
                        parsed
                            .problems
                            .into_iter()
                            .map(|(key, message)| Problem { key, message }),
                    );
                }
                Err(message) => adapter_problems.push(Problem {
                    key: entry.name.to_string(),
                    message,
                }),
            }
        }
        if !chat_enabled {
            let chats: Vec<String> = crate::registry::components()
                .iter()
                .filter(|e| e.chat && e.name != "console")
                .map(|e| format!("[{}]", e.name))
                .collect();
            bad(
                "console.enabled",
                format!(
                    "no chat adapter is enabled: enable [console] or configure one of {}",
                    chats.join(", ")
                ),
            );
        }
        problems.extend(adapter_problems);
        if problems.is_empty() {
            Ok(())
        } else {
            Err(problems)
        }
    }

    /// Validates, then reads the files the config names and builds the
    /// gateway options. `file` is the config's own path: relative paths are
    /// resolved against its directory, and errors name it.
    pub fn options(&self, file: &Path) -> Result<GatewayOptions, ConfigError> {
        let mut problems = self.validate().err().unwrap_or_default();
        let base = file.parent().unwrap_or(Path::new("."));
        // The two private keys must be kept from other local users.
        for (key, path) in [("key", &self.key), ("signing_key", &self.signing_key)] {
            let full = base.join(path);
            if !path.as_os_str().is_empty()
                && full.exists()
                && let Err(message) = crate::secret::check_private_file(&full)
            {
                problems.push(Problem {
                    key: key.to_string(),
                    message,
                });
            }
        }
        let mut read = |key: &str, path: &Path, marker: &str| -> Option<String> {
            if path.as_os_str().is_empty() {
                return None;
            }
            let full = base.join(path);
            let problem = |message: String| Problem {
                key: key.to_string(),
                message: format!("{}: {message}", full.display()),
            };
            match std::fs::read_to_string(&full) {
                Ok(text) if text.contains(marker) => Some(text),
                Ok(_) => {
                    problems.push(problem(format!("no `{marker}` PEM block found")));
                    None
                }
                Err(e) => {
                    problems.push(problem(e.to_string()));
                    None
                }
            }
        };
        let ca_pem = read("ca", &self.ca, "-----BEGIN CERTIFICATE-----");
        let cert_pem = read("cert", &self.cert, "-----BEGIN CERTIFICATE-----");
        let key_pem = read("key", &self.key, "PRIVATE KEY-----");
        let signing_pem = read(
            "signing_key",
            &self.signing_key,
            "-----BEGIN PRIVATE KEY-----",
        );
        let signing_key = signing_pem.and_then(|pem| match SigningKey::from_pkcs8_pem(&pem) {
            Ok(k) => Some(k),
            Err(e) => {
                let full = base.join(&self.signing_key);
                problems.push(Problem {
                    key: "signing_key".to_string(),
                    message: format!("{}: {e}", full.display()),
                });
                None
            }
        });
        let tls = match (ca_pem, cert_pem, key_pem) {
            (Some(ca_pem), Some(cert_pem), Some(key_pem)) => {
                let tls = ClientTls {
                    ca_pem,
                    cert_pem,
                    key_pem,
                };
                // Builds (without connecting) what `run` will use, so
                // `validate` catches TLS material the client library refuses.
                if controller_url(&self.controller).is_ok()
                    && let Err(e) = endpoint(
                        &self.controller,
                        &tls.ca_pem,
                        Some((&tls.cert_pem, &tls.key_pem)),
                    )
                {
                    problems.push(Problem {
                        key: "ca/cert/key".to_string(),
                        message: format!("TLS setup refused: {e}"),
                    });
                }
                Some(tls)
            }
            _ => None,
        };
        let roots: Vec<PublicKey> = self
            .policy_roots
            .iter()
            .filter_map(|r| PublicKey::parse(r).ok())
            .collect();
        match (signing_key, tls) {
            (Some(signing_key), Some(tls)) if problems.is_empty() => Ok(GatewayOptions {
                controller_url: self.controller.clone(),
                tls,
                signing_key: Arc::new(signing_key),
                signer_id: self.signer_id.clone(),
                policy_roots: roots,
                policy_threshold: self.policy_threshold,
                bot_name: self.bot_name.clone(),
                job_expiry: DEFAULT_JOB_EXPIRY,
                poll_interval: DEFAULT_POLL_INTERVAL,
                approval_window: parse_duration(&self.approval_timeout)
                    .unwrap_or(DEFAULT_APPROVAL_WINDOW),
            }),
            _ => Err(ConfigError::Invalid {
                file: file.to_path_buf(),
                problems,
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ROOT: &str = "ed25519:MCowBQYDK2VwAyEAGb9ECWmEzf6FQbrBZ9w7lshQhqowtrbLDFw4rXAxZuE=";

    fn text(extra: &str) -> String {
        format!(
            "controller = \"controller.example.com:7443\"\nca = \"ca.pem\"\ncert = \"cert.pem\"\nkey = \"key.pem\"\n\
             signing_key = \"sign.pem\"\nsigner_id = \"gw\"\npolicy_roots = [\"{ROOT}\"]\n{extra}"
        )
    }

    fn check(extra: &str, expected_keys: &[&str]) {
        let cfg = GatewayConfig::parse(&text(extra), Path::new("gateway.toml"));
        let cfg = match cfg {
            Ok(c) => c,
            Err(e) => panic!("{extra:?}: {e}"),
        };
        let keys: Vec<String> = cfg
            .validate()
            .err()
            .unwrap_or_default()
            .into_iter()
            .map(|p| p.key)
            .collect();
        assert_eq!(keys, expected_keys, "{extra:?}");
    }

    #[test]
    fn validation_table() {
        check("[console]\nenabled = true", &[]);
        check("", &["console.enabled"]);
        check(
            "policy_threshold = 2\n[console]\nenabled = true",
            &["policy_threshold"],
        );
        check(
            "bot_name = \"fleet cmd\"\n[console]\nenabled = true",
            &["bot_name"],
        );
        check(
            "state_dir = \"/dev/null\"\n[console]\nenabled = true",
            &["state_dir"],
        );
        check(
            "state_dir = \"\"\n[console]\nenabled = true",
            &["state_dir"],
        );
        for bad in ["4s", "301s", "soon"] {
            check(
                &format!("chat_lease = \"{bad}\"\n[console]\nenabled = true"),
                &["chat_lease"],
            );
        }
        check("chat_lease = \"5m\"\n[console]\nenabled = true", &[]);
    }

    #[test]
    fn chat_lease_defaults_to_thirty_seconds_and_says_its_bounds() {
        let cfg =
            GatewayConfig::parse(&text(""), Path::new("g.toml")).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(cfg.chat_lease_ttl(), Ok(std::time::Duration::from_secs(30)));
        let cfg = GatewayConfig::parse(&text("chat_lease = \"2s\""), Path::new("g.toml"))
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            cfg.chat_lease_ttl(),
            Err("must be between 5s and 300s".to_string())
        );
    }

    #[test]
    fn every_problem_is_reported_with_its_key() {
        let bad = "controller = \"http://x\"\nca = \"\"\ncert = \"c\"\nkey = \"k\"\nsigning_key = \"s\"\n\
                   signer_id = \"\"\npolicy_roots = [\"nope\"]\npolicy_threshold = 0\n";
        let cfg = GatewayConfig::parse(bad, Path::new("g.toml")).unwrap_or_else(|e| panic!("{e}"));
        let keys: Vec<String> = cfg
            .validate()
            .err()
            .unwrap_or_default()
            .into_iter()
            .map(|p| p.key)
            .collect();
        assert_eq!(
            keys,
            [
                "controller",
                "ca",
                "signer_id",
                "policy_roots[0]",
                "policy_threshold",
                "console.enabled"
            ]
        );
    }

    #[test]
    fn unknown_keys_and_defaults() {
        let err = GatewayConfig::parse(&text("colour = 1"), Path::new("/etc/g.toml"))
            .err()
            .map(|e| e.to_string());
        let err = err.unwrap_or_default();
        assert!(
            err.starts_with("/etc/g.toml: ") && err.contains("colour"),
            "{err}"
        );
        let cfg =
            GatewayConfig::parse(&text(""), Path::new("g.toml")).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            (
                cfg.policy_threshold,
                cfg.bot_name.as_str(),
                cfg.section::<crate::adapters::console::ConsoleConfig>()
                    .is_some_and(|c| c.enabled)
            ),
            (1, "fleetcmd", false)
        );
        assert_eq!(
            cfg.state_dir,
            Path::new(crate::store::DEFAULT_STATE_DIR),
            "state_dir default"
        );
    }
}
