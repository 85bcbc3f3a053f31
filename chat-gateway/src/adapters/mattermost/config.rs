//! `[mattermost]` in gateway.toml: shape, defaults, validation and the
//! secrets (inline or `*_file`).

use std::path::{Path, PathBuf};
use std::time::Duration;

use fleetcmd_core::crypto::Secret;
use fleetcmd_core::duration::parse_duration;
use fleetcmd_core::ids::Identity;
use serde::{Deserialize, Deserializer};

use crate::adapters::AdapterError;

/// How long a button click stays valid after the post was rendered: the
/// default approval window (issue 5: requests expire after 15 min).
pub const DEFAULT_BUTTON_MAX_AGE: Duration = Duration::from_secs(15 * 60);
/// Shortest HMAC key accepted for `action_secret`, in bytes.
pub const MIN_ACTION_SECRET_BYTES: usize = 16;

/// `[mattermost]`: a bot account on one Mattermost server.
#[derive(Deserialize, Debug, Clone)]
#[serde(deny_unknown_fields)]
pub struct MattermostConfig {
    /// Server base URL, e.g. `https://chat.example.com` (REST under
    /// `/api/v4`, WebSocket at `/api/v4/websocket`).
    pub url: String,
    /// Short server name used in identities and channels:
    /// `mattermost:<server>:<user_id>`.
    pub server: String,
    /// The bot's access token (bot account token or personal access token).
    #[serde(default, deserialize_with = "opt_secret")]
    pub token: Option<Secret<String>>,
    /// File holding the token instead (first line, trimmed).
    #[serde(default)]
    pub token_file: Option<PathBuf>,
    /// Tokens Mattermost sends with our slash command(s); one per command.
    #[serde(default, deserialize_with = "secrets")]
    pub slash_tokens: Vec<Secret<String>>,
    /// File with slash command tokens instead, one per line.
    #[serde(default)]
    pub slash_tokens_file: Option<PathBuf>,
    /// HMAC-SHA256 key for the context of interactive buttons.
    #[serde(default, deserialize_with = "opt_secret")]
    pub action_secret: Option<Secret<String>>,
    /// File holding the HMAC key instead (first line, trimmed).
    #[serde(default)]
    pub action_secret_file: Option<PathBuf>,
    /// Where Mattermost posts button clicks: this gateway's
    /// `/mattermost/actions` URL as the Mattermost server reaches it.
    pub callback_url: String,
    /// Only this team (name or id); direct messages are always accepted.
    #[serde(default)]
    pub team: Option<String>,
    /// How long a button stays valid, e.g. `15m` (default).
    #[serde(default)]
    pub button_max_age: Option<String>,
}

// Secrets are compared by value so the gateway config can keep deriving Eq.
impl PartialEq for MattermostConfig {
    fn eq(&self, o: &Self) -> bool {
        let s = |a: &Option<Secret<String>>| a.as_ref().map(|s| s.expose().clone());
        let v = |a: &[Secret<String>]| a.iter().map(|s| s.expose().clone()).collect::<Vec<_>>();
        self.url == o.url
            && self.server == o.server
            && s(&self.token) == s(&o.token)
            && self.token_file == o.token_file
            && v(&self.slash_tokens) == v(&o.slash_tokens)
            && self.slash_tokens_file == o.slash_tokens_file
            && s(&self.action_secret) == s(&o.action_secret)
            && self.action_secret_file == o.action_secret_file
            && self.callback_url == o.callback_url
            && self.team == o.team
            && self.button_max_age == o.button_max_age
    }
}

impl Eq for MattermostConfig {}

fn opt_secret<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Secret<String>>, D::Error> {
    Ok(Option::<String>::deserialize(d)?.map(Secret::new))
}

fn secrets<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<Secret<String>>, D::Error> {
    Ok(Vec::<String>::deserialize(d)?
        .into_iter()
        .map(Secret::new)
        .collect())
}

/// The secrets, read from the config or its files.
pub(crate) struct Secrets {
    pub token: Secret<String>,
    pub slash_tokens: Vec<Secret<String>>,
    pub action_secret: Secret<String>,
}

fn read_file(key: &str, file: &Path) -> Result<String, (String, String)> {
    crate::secret::read_private(file).map_err(|e| {
        (
            key.to_string(),
            format!("{}: cannot read: {e}", file.display()),
        )
    })
}

fn first_line(key: &str, file: &Path) -> Result<Secret<String>, (String, String)> {
    let text = read_file(key, file)?;
    let line = text.lines().next().unwrap_or("").trim().to_string();
    if line.is_empty() {
        return Err((key.to_string(), format!("{}: empty", file.display())));
    }
    Ok(Secret::new(line))
}

fn one_of(
    key: &str,
    inline: &Option<Secret<String>>,
    file: &Option<PathBuf>,
) -> Result<Secret<String>, (String, String)> {
    match (inline, file) {
        (Some(_), Some(_)) => Err((
            key.to_string(),
            format!("give either `{key}` or `{key}_file`, not both"),
        )),
        (None, None) => Err((
            key.to_string(),
            format!("`{key}` or `{key}_file` is required"),
        )),
        (Some(s), None) if s.expose().trim().is_empty() => {
            Err((key.to_string(), "empty".to_string()))
        }
        (Some(s), None) => Ok(Secret::new(s.expose().trim().to_string())),
        (None, Some(f)) => first_line(&format!("{key}_file"), f),
    }
}

fn http_url(key: &str, value: &str, problems: &mut Vec<(String, String)>) {
    match reqwest::Url::parse(value) {
        Ok(u) if matches!(u.scheme(), "http" | "https") && u.host().is_some() => {
            if u.query().is_some() || u.fragment().is_some() {
                problems.push((key.to_string(), "must not have a query or fragment".into()));
            }
        }
        Ok(_) => problems.push((key.to_string(), "must be an http:// or https:// URL".into())),
        Err(e) => problems.push((key.to_string(), format!("not a URL: {e}"))),
    }
}

impl MattermostConfig {
    /// Every problem at once, each with its key (relative to `[mattermost]`).
    /// Reads the `*_file` secrets to check them.
    pub fn validate(&self) -> Vec<(String, String)> {
        let mut problems = Vec::new();
        http_url("url", &self.url, &mut problems);
        http_url("callback_url", &self.callback_url, &mut problems);
        if self.server.is_empty()
            || self.server.contains('/')
            || Identity::parse(&format!("mattermost:{}:x", self.server)).is_err()
        {
            problems.push((
                "server".to_string(),
                "must be a short name without spaces or `/`, e.g. `chat`".to_string(),
            ));
        }
        if let Some(t) = &self.team
            && (t.is_empty() || t.contains(|c: char| c == '/' || c.is_whitespace()))
        {
            problems.push(("team".to_string(), "must be a team name or id".to_string()));
        }
        if let Err(e) = self.button_max_age() {
            problems.push(("button_max_age".to_string(), e));
        }
        if let Err(p) = self.secrets() {
            problems.extend(p);
        }
        problems
    }

    /// `button_max_age`, or the default.
    pub fn button_max_age(&self) -> Result<Duration, String> {
        let Some(s) = &self.button_max_age else {
            return Ok(DEFAULT_BUTTON_MAX_AGE);
        };
        let d = parse_duration(s)?;
        if d < Duration::from_secs(60) || d > Duration::from_secs(86_400) {
            return Err(format!("{s}: must be between 1m and 1d"));
        }
        Ok(d)
    }

    /// The secrets, reading `*_file`s; every problem names its key and file.
    pub(crate) fn secrets(&self) -> Result<Secrets, Vec<(String, String)>> {
        let mut problems = Vec::new();
        let token = one_of("token", &self.token, &self.token_file)
            .map_err(|p| problems.push(p))
            .ok();
        let action_secret = one_of(
            "action_secret",
            &self.action_secret,
            &self.action_secret_file,
        )
        .and_then(|s| {
            if s.expose().len() < MIN_ACTION_SECRET_BYTES {
                Err((
                    "action_secret".to_string(),
                    format!("too short: use at least {MIN_ACTION_SECRET_BYTES} random bytes"),
                ))
            } else {
                Ok(s)
            }
        })
        .map_err(|p| problems.push(p))
        .ok();
        let mut slash_tokens: Vec<Secret<String>> = self
            .slash_tokens
            .iter()
            .map(|s| Secret::new(s.expose().trim().to_string()))
            .collect();
        if let Some(f) = &self.slash_tokens_file {
            match read_file("slash_tokens_file", f) {
                Ok(text) => slash_tokens.extend(
                    text.lines()
                        .map(str::trim)
                        .filter(|l| !l.is_empty())
                        .map(|l| Secret::new(l.to_string())),
                ),
                Err(p) => problems.push(p),
            }
        }
        if slash_tokens.iter().any(|t| t.expose().is_empty()) {
            problems.push(("slash_tokens".to_string(), "an empty token".to_string()));
        }
        match (token, action_secret) {
            (Some(token), Some(action_secret)) if problems.is_empty() => Ok(Secrets {
                token,
                slash_tokens,
                action_secret,
            }),
            _ => Err(problems),
        }
    }

    /// The secrets, or one error listing every problem.
    pub(crate) fn load_secrets(&self) -> Result<Secrets, AdapterError> {
        self.secrets().map_err(|p| AdapterError::Platform {
            what: "mattermost config".to_string(),
            message: p
                .iter()
                .map(|(k, m)| format!("{k}: {m}"))
                .collect::<Vec<_>>()
                .join("; "),
        })
    }
}
