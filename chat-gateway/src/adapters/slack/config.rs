//! `[slack]` in `gateway.toml`: shape (serde, unknown keys refused), then
//! values ([`SlackConfig::validate`]), then the secret files it names
//! ([`SlackConfig::secrets`]).

use std::path::{Path, PathBuf};

use fleetcmd_core::crypto::Secret;
use serde::Deserialize;

use crate::adapters::AdapterError;

/// Where the Web API lives unless `api_base` says otherwise.
pub const DEFAULT_API_BASE: &str = "https://slack.com/api";

/// How events reach the gateway.
#[derive(Deserialize, Debug, Clone, Copy, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum SlackMode {
    /// Socket Mode: the gateway dials out to Slack over a WebSocket (no
    /// public URL needed). Needs `app_token`.
    #[default]
    Socket,
    /// Events API over HTTP: Slack POSTs to `/slack/events`,
    /// `/slack/commands` and `/slack/actions`. Needs `signing_secret`.
    Events,
}

/// A secret given inline in the config file (the one secret type of the
/// gateway's config).
pub use crate::secret::SecretString as ConfigSecret;

fn default_api_base() -> String {
    DEFAULT_API_BASE.to_string()
}

/// `[slack]`: one Slack workspace.
///
/// ```toml
/// [slack]
/// mode = "socket"                       # or "events"
/// bot_token_file = "/etc/fleetcmd/slack-bot-token"     # xoxb-…
/// app_token_file = "/etc/fleetcmd/slack-app-token"     # xapp-… (socket mode)
/// signing_secret_file = "/etc/fleetcmd/slack-signing-secret"  # events mode
/// # team_id = "T0123ABCD"               # default: from auth.test
/// ```
#[derive(Deserialize, Debug, Clone, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct SlackConfig {
    #[serde(default)]
    pub mode: SlackMode,
    /// Bot user OAuth token (`xoxb-…`) for the Web API.
    #[serde(default)]
    pub bot_token: Option<ConfigSecret>,
    #[serde(default)]
    pub bot_token_file: Option<PathBuf>,
    /// App-level token (`xapp-…`, scope `connections:write`) for Socket Mode.
    #[serde(default)]
    pub app_token: Option<ConfigSecret>,
    #[serde(default)]
    pub app_token_file: Option<PathBuf>,
    /// Signing secret, for requests Slack sends over HTTP.
    #[serde(default)]
    pub signing_secret: Option<ConfigSecret>,
    #[serde(default)]
    pub signing_secret_file: Option<PathBuf>,
    /// Web API base URL (tests point it at a local fake).
    #[serde(default = "default_api_base")]
    pub api_base: String,
    /// The workspace id; when set, `auth.test` must agree.
    #[serde(default)]
    pub team_id: Option<String>,
}

impl Default for SlackConfig {
    fn default() -> SlackConfig {
        SlackConfig {
            mode: SlackMode::default(),
            bot_token: None,
            bot_token_file: None,
            app_token: None,
            app_token_file: None,
            signing_secret: None,
            signing_secret_file: None,
            api_base: default_api_base(),
            team_id: None,
        }
    }
}

/// The secrets of a [`SlackConfig`], read from the config or their files.
#[derive(Clone, Debug)]
pub struct SlackSecrets {
    pub bot_token: Secret<String>,
    pub app_token: Option<Secret<String>>,
    pub signing_secret: Option<Secret<String>>,
}

/// Whether `s` looks like a Slack object id (`T0123ABCD`, `U024BE7LH`, …).
pub(crate) fn is_slack_id(s: &str) -> bool {
    (2..=32).contains(&s.len())
        && s.bytes()
            .all(|b| b.is_ascii_uppercase() || b.is_ascii_digit())
}

/// Whether `url` may carry tokens: https, or http to a loopback address.
pub(crate) fn acceptable_base(url: &str) -> Result<(), String> {
    if let Some(rest) = url.strip_prefix("https://") {
        return if rest.is_empty() {
            Err("has no host".to_string())
        } else {
            Ok(())
        };
    }
    if let Some(rest) = url.strip_prefix("http://") {
        let host = rest.split(['/', '?']).next().unwrap_or_default();
        let host = host
            .rsplit_once(':')
            .filter(|(_, port)| port.bytes().all(|b| b.is_ascii_digit()))
            .map_or(host, |(h, _)| h);
        return if matches!(host, "127.0.0.1" | "localhost" | "[::1]") {
            Ok(())
        } else {
            Err("must be https:// (plain http only to a loopback address)".to_string())
        };
    }
    Err("must start with https://".to_string())
}

impl SlackConfig {
    /// Checks the values; returns every problem with its key.
    pub fn validate(&self) -> Vec<(String, String)> {
        let mut problems = Vec::new();
        let mut bad = |key: &str, msg: &str| problems.push((key.to_string(), msg.to_string()));
        let pairs = [
            (
                "bot_token",
                &self.bot_token,
                &self.bot_token_file,
                Some("xoxb-"),
                true,
            ),
            (
                "app_token",
                &self.app_token,
                &self.app_token_file,
                Some("xapp-"),
                self.mode == SlackMode::Socket,
            ),
            (
                "signing_secret",
                &self.signing_secret,
                &self.signing_secret_file,
                None,
                self.mode == SlackMode::Events,
            ),
        ];
        for (key, inline, file, prefix, required) in pairs {
            match (inline, file) {
                (Some(_), Some(_)) => {
                    bad(key, &format!("give either {key} or {key}_file, not both"))
                }
                (None, None) if required => bad(
                    key,
                    &format!(
                        "required in {} mode ({key} or {key}_file)",
                        match self.mode {
                            SlackMode::Socket => "socket",
                            SlackMode::Events => "events",
                        }
                    ),
                ),
                (Some(s), None) => {
                    if let Err(m) = check_secret(s.expose(), prefix) {
                        bad(key, &m);
                    }
                }
                (None, Some(path)) if path.as_os_str().is_empty() => {
                    bad(&format!("{key}_file"), "must name a file")
                }
                _ => {}
            }
        }
        if let Err(m) = acceptable_base(&self.api_base) {
            bad("api_base", &m);
        }
        if let Some(team) = &self.team_id
            && !is_slack_id(team)
        {
            bad("team_id", "expected a Slack team id such as T0123ABCD");
        }
        problems
    }

    /// Reads the secrets (inline, or from their `*_file`; relative paths
    /// are resolved against `base`). Errors name the key and the file,
    /// never the secret.
    pub fn secrets(&self, base: &Path) -> Result<SlackSecrets, AdapterError> {
        let read = |key: &str,
                    inline: &Option<ConfigSecret>,
                    file: &Option<PathBuf>,
                    prefix: Option<&str>|
         -> Result<Option<Secret<String>>, AdapterError> {
            let (value, source) = match (inline, file) {
                (Some(s), _) => (s.expose().to_string(), key.to_string()),
                (None, Some(path)) => {
                    let path = base.join(path);
                    let text = std::fs::read_to_string(&path).map_err(|e| {
                        config_error(format!("{key}_file {}: cannot read: {e}", path.display()))
                    })?;
                    (
                        text.trim().to_string(),
                        format!("{key}_file {}", path.display()),
                    )
                }
                (None, None) => return Ok(None),
            };
            check_secret(&value, prefix).map_err(|m| config_error(format!("{source}: {m}")))?;
            Ok(Some(Secret::new(value)))
        };
        let bot_token = read(
            "bot_token",
            &self.bot_token,
            &self.bot_token_file,
            Some("xoxb-"),
        )?
        .ok_or_else(|| config_error("bot_token: required".to_string()))?;
        let app_token = read(
            "app_token",
            &self.app_token,
            &self.app_token_file,
            Some("xapp-"),
        )?;
        if self.mode == SlackMode::Socket && app_token.is_none() {
            return Err(config_error(
                "app_token: required in socket mode".to_string(),
            ));
        }
        let signing_secret = read(
            "signing_secret",
            &self.signing_secret,
            &self.signing_secret_file,
            None,
        )?;
        if self.mode == SlackMode::Events && signing_secret.is_none() {
            return Err(config_error(
                "signing_secret: required in events mode".to_string(),
            ));
        }
        Ok(SlackSecrets {
            bot_token,
            app_token,
            signing_secret,
        })
    }
}

fn config_error(message: String) -> AdapterError {
    AdapterError::Platform {
        what: "slack config".to_string(),
        message,
    }
}

/// Format checks that never echo the value.
fn check_secret(value: &str, prefix: Option<&str>) -> Result<(), String> {
    if value.is_empty() {
        return Err("is empty".to_string());
    }
    if value.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err("contains whitespace or control characters".to_string());
    }
    if let Some(p) = prefix
        && !value.starts_with(p)
    {
        return Err(format!("expected a token starting with {p}"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> SlackConfig {
        toml::from_str(text).unwrap_or_else(|e| panic!("{e}"))
    }

    #[test]
    fn validate_names_each_bad_key() {
        let c = parse(
            "mode = \"events\"\nbot_token = \"xoxp-user\"\napi_base = \"http://slack.example.com/api\"\nteam_id = \"t-1\"",
        );
        let keys: Vec<String> = c.validate().into_iter().map(|(k, _)| k).collect();
        assert_eq!(keys, ["bot_token", "signing_secret", "api_base", "team_id"]);

        let c = parse("bot_token = \"xoxb-1\"\nbot_token_file = \"/x\"");
        let problems = c.validate();
        assert_eq!(
            problems,
            [
                (
                    "bot_token".to_string(),
                    "give either bot_token or bot_token_file, not both".to_string()
                ),
                (
                    "app_token".to_string(),
                    "required in socket mode (app_token or app_token_file)".to_string()
                ),
            ]
        );

        let ok = parse(
            "bot_token = \"xoxb-1\"\napp_token = \"xapp-1\"\napi_base = \"http://127.0.0.1:9/api\"",
        );
        assert_eq!(ok.validate(), []);
        assert!(toml::from_str::<SlackConfig>("bot_tokn = \"x\"").is_err());
        assert!(toml::from_str::<SlackConfig>("mode = \"rtm\"").is_err());
    }

    #[test]
    fn secrets_come_from_files_and_never_print() {
        let dir = std::env::temp_dir().join(format!("fleetcmd-slack-{}", std::process::id()));
        let _ = std::fs::create_dir_all(&dir);
        let _ = std::fs::write(dir.join("bot"), "xoxb-from-file\n");
        let c = SlackConfig {
            bot_token_file: Some(PathBuf::from("bot")),
            app_token: Some(ConfigSecret::new("xapp-inline")),
            ..SlackConfig::default()
        };
        let s = c.secrets(&dir).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(s.bot_token.expose(), "xoxb-from-file");
        assert_eq!(format!("{s:?} {c:?}").matches("xoxb").count(), 0);
        assert_eq!(format!("{c:?}").matches("xapp").count(), 0);

        let missing = SlackConfig {
            bot_token_file: Some(PathBuf::from("nope")),
            ..c.clone()
        };
        let e = match missing.secrets(&dir) {
            Ok(_) => panic!("a missing file is an error"),
            Err(e) => e.to_string(),
        };
        assert!(e.contains("bot_token_file") && e.contains("nope"), "{e}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
