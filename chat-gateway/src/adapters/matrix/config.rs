//! `[matrix]` in gateway.toml: the homeserver, the bot's account, how it
//! logs in, and the rooms it serves.
//!
//! ```toml
//! [matrix]
//! homeserver = "https://matrix.example.com"
//! user_id = "@fleetcmd:example.com"
//! access_token_file = "matrix-token"      # or password_file = "matrix-password"
//! rooms = ["#ops:example.com", "!AbCdEf:example.com"]
//! ```

use std::path::{Path, PathBuf};

use fleetcmd_core::crypto::Secret;
use serde::Deserialize;

use super::ids::{is_room_alias, is_room_id, is_user_id};
use crate::adapters::AdapterError;

/// Defaults, in one place.
pub mod defaults {
    /// How long one `/sync` long poll waits for news on the homeserver.
    pub const SYNC_TIMEOUT_SECS: u64 = 30;

    pub(super) fn sync_timeout_secs() -> u64 {
        SYNC_TIMEOUT_SECS
    }
}

/// `[matrix]` in gateway.toml.
#[derive(Deserialize, Debug, Clone, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct MatrixConfig {
    /// The client-server API base, `https://matrix.example.com` (`http://`
    /// only to a loopback host).
    pub homeserver: String,
    /// The bot's account, `@fleetcmd:example.com`.
    pub user_id: String,
    /// A file holding an access token of the bot's account, or
    #[serde(default)]
    pub access_token_file: Option<PathBuf>,
    /// a file holding its password (the gateway logs in at start).
    #[serde(default)]
    pub password_file: Option<PathBuf>,
    /// Rooms served, as room ids (`!id:server`) or aliases
    /// (`#name:server`). Invites to other rooms are declined (left alone).
    #[serde(default)]
    pub rooms: Vec<String>,
    #[serde(default = "defaults::sync_timeout_secs")]
    pub sync_timeout_secs: u64,
}

/// How the bot proves who it is.
#[derive(Debug, Clone)]
pub enum Login {
    Token(Secret<String>),
    Password(Secret<String>),
}

impl MatrixConfig {
    /// A config with defaults for everything but the account and login.
    pub fn new(homeserver: &str, user_id: &str, password_file: &Path) -> MatrixConfig {
        MatrixConfig {
            homeserver: homeserver.to_string(),
            user_id: user_id.to_string(),
            access_token_file: None,
            password_file: Some(password_file.to_path_buf()),
            rooms: Vec::new(),
            sync_timeout_secs: defaults::SYNC_TIMEOUT_SECS,
        }
    }

    /// Every problem with the values, each with its key (without the
    /// `matrix.` prefix).
    pub fn validate(&self) -> Vec<(String, String)> {
        let mut bad = Vec::new();
        match reqwest::Url::parse(&self.homeserver) {
            Ok(u) if u.scheme() == "https" && u.host().is_some() => {}
            Ok(u)
                if u.scheme() == "http"
                    && u.host_str()
                        .is_some_and(crate::adapters::xmpp::client::is_loopback_host) => {}
            Ok(u) if u.scheme() == "http" => bad.push((
                "homeserver".into(),
                "http:// is only allowed to a loopback host; use https://".into(),
            )),
            Ok(_) => bad.push((
                "homeserver".into(),
                "must be an https:// URL with a host".into(),
            )),
            Err(e) => bad.push(("homeserver".into(), format!("not a URL: {e}"))),
        }
        if !is_user_id(&self.user_id) {
            bad.push((
                "user_id".into(),
                format!(
                    "{:?} is not a Matrix user id, expected @name:server",
                    self.user_id
                ),
            ));
        }
        match (&self.access_token_file, &self.password_file) {
            (Some(_), Some(_)) => bad.push((
                "access_token_file".into(),
                "give either access_token_file or password_file, not both".into(),
            )),
            (None, None) => bad.push((
                "access_token_file".into(),
                "access_token_file or password_file is required".into(),
            )),
            (Some(f), None) | (None, Some(f)) if f.as_os_str().is_empty() => bad.push((
                if self.access_token_file.is_some() {
                    "access_token_file".into()
                } else {
                    "password_file".into()
                },
                "must name a file".into(),
            )),
            _ => {}
        }
        if self.rooms.is_empty() {
            bad.push((
                "rooms".into(),
                "name at least one room (#alias:server or !id:server) to serve".into(),
            ));
        }
        for (i, r) in self.rooms.iter().enumerate() {
            if !is_room_id(r) && !is_room_alias(r) {
                bad.push((
                    format!("rooms[{i}]"),
                    format!("{r:?} is neither a room id (!id:server) nor an alias (#name:server)"),
                ));
            }
        }
        if !(1..=300).contains(&self.sync_timeout_secs) {
            bad.push(("sync_timeout_secs".into(), "must be 1..=300".into()));
        }
        bad
    }

    /// Makes the file paths relative to `base` (the config file's folder).
    pub fn resolve_paths(&mut self, base: &Path) {
        for f in [&mut self.access_token_file, &mut self.password_file]
            .into_iter()
            .flatten()
        {
            if f.is_relative() {
                *f = base.join(&*f);
            }
        }
    }

    /// Validates, then reads the secret file.
    pub fn login(&self) -> Result<Login, AdapterError> {
        let problems = self.validate();
        if !problems.is_empty() {
            return Err(AdapterError::Platform {
                what: "matrix config".into(),
                message: problems
                    .iter()
                    .map(|(k, p)| format!("{k}: {p}"))
                    .collect::<Vec<_>>()
                    .join("; "),
            });
        }
        let (file, key) = match (&self.access_token_file, &self.password_file) {
            (Some(f), _) => (f, "access_token_file"),
            (None, Some(f)) => (f, "password_file"),
            (None, None) => unreachable!("validate requires one of them"),
        };
        // The gateway's one secret reader (trimmed, the file named).
        let platform = |message: String| AdapterError::Platform {
            what: "matrix config".into(),
            message,
        };
        let value =
            crate::secret::load_secret(&None, &Some(file.clone()), key.trim_end_matches("_file"))
                .map_err(platform)?
                .filter(|v| !v.expose().is_empty())
                .ok_or_else(|| platform(format!("{key} {}: empty", file.display())))?;
        Ok(if self.access_token_file.is_some() {
            Login::Token(value)
        } else {
            Login::Password(value)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> MatrixConfig {
        let mut c = MatrixConfig::new(
            "https://matrix.example.com",
            "@bot:example.com",
            Path::new("pw"),
        );
        c.rooms = vec!["#ops:example.com".into(), "!abc:example.com".into()];
        c
    }

    #[test]
    fn validate_names_each_bad_key() {
        assert_eq!(cfg().validate(), vec![]);
        let check = |tweak: fn(&mut MatrixConfig), key: &str, needle: &str| {
            let mut c = cfg();
            tweak(&mut c);
            let p = c.validate();
            assert!(
                p.iter().any(|(k, m)| k == key && m.contains(needle)),
                "{key}: {p:?}"
            );
        };
        check(
            |c| c.homeserver = "http://matrix.example.com".into(),
            "homeserver",
            "loopback",
        );
        check(|c| c.homeserver = "nope".into(), "homeserver", "not a URL");
        check(|c| c.user_id = "bot".into(), "user_id", "@name:server");
        check(
            |c| c.access_token_file = Some("t".into()),
            "access_token_file",
            "not both",
        );
        check(
            |c| c.password_file = None,
            "access_token_file",
            "is required",
        );
        check(|c| c.rooms.clear(), "rooms", "at least one");
        check(
            |c| c.rooms.push("ops".into()),
            "rooms[2]",
            "neither a room id",
        );
        check(|c| c.sync_timeout_secs = 0, "sync_timeout_secs", "1..=300");
        let mut c = cfg();
        c.homeserver = "http://127.0.0.1:8008".into();
        assert_eq!(c.validate(), vec![]);
    }

    #[test]
    fn an_empty_or_missing_secret_file_is_named() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut c = cfg();
        c.password_file = Some(dir.path().join("missing"));
        let e = c.login().expect_err("missing file").to_string();
        assert!(
            e.contains("matrix config: password_file") && e.contains("missing"),
            "{e}"
        );
        std::fs::write(dir.path().join("empty"), "\n").expect("write");
        c.password_file = Some(dir.path().join("empty"));
        let e = c.login().expect_err("empty file").to_string();
        assert!(e.contains("empty"), "{e}");
        std::fs::write(dir.path().join("tok"), "syt_abc\n").expect("write");
        c.password_file = None;
        c.access_token_file = Some(dir.path().join("tok"));
        assert!(matches!(c.login(), Ok(Login::Token(t)) if t.expose() == "syt_abc"));
    }

    #[test]
    fn the_setup_guides_section_parses_and_validates() {
        let doc = include_str!("../../../../docs/chat/matrix.md");
        let section = doc
            .split("```toml\n")
            .filter_map(|b| b.split_once("```").map(|(toml, _)| toml))
            .find(|t| t.starts_with("[matrix]"))
            .expect("docs/chat/matrix.md has a [matrix] block");
        #[derive(Deserialize)]
        struct File {
            matrix: MatrixConfig,
        }
        let f: File = toml::from_str(section).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(f.matrix.validate(), vec![]);
        assert_eq!(f.matrix.rooms.len(), 2);
    }
}
