//! Secrets from `gateway.toml`: given inline or as a file, redacted in
//! `Debug`, never logged. Every component reads its tokens, keys and
//! webhook secrets through this module.

use std::path::PathBuf;

use fleetcmd_core::crypto::Secret;
use serde::{Deserialize, Deserializer};

/// A secret from the config file: redacted in `Debug`, comparable so the
/// config structs can derive `PartialEq`.
#[derive(Clone, Debug)]
pub struct SecretString(pub Secret<String>);

impl SecretString {
    pub fn new(s: impl Into<String>) -> SecretString {
        SecretString(Secret::new(s.into()))
    }
    pub fn expose(&self) -> &str {
        self.0.expose()
    }
}

impl PartialEq for SecretString {
    fn eq(&self, other: &SecretString) -> bool {
        self.expose() == other.expose()
    }
}
impl Eq for SecretString {}

impl<'de> Deserialize<'de> for SecretString {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<SecretString, D::Error> {
        String::deserialize(d).map(SecretString::new)
    }
}

/// A secret given inline or as a file: every problem, keyed `at.name`.
pub fn check_secret(
    p: &mut Vec<(String, String)>,
    at: &str,
    name: &str,
    inline: &Option<SecretString>,
    file: &Option<PathBuf>,
) {
    match (inline, file) {
        (Some(_), Some(_)) => p.push((
            format!("{at}.{name}"),
            format!("give either `{name}` or `{name}_file`, not both"),
        )),
        (Some(s), None) if s.expose().trim().is_empty() => {
            p.push((format!("{at}.{name}"), "must not be empty".into()))
        }
        (None, Some(f)) => match std::fs::read_to_string(f) {
            Ok(s) if s.trim().is_empty() => p.push((
                format!("{at}.{name}_file"),
                format!("{}: empty", f.display()),
            )),
            Ok(_) => {}
            Err(e) => p.push((format!("{at}.{name}_file"), format!("{}: {e}", f.display()))),
        },
        _ => {}
    }
}

/// The secret's value (read from the file when given), if any.
pub fn load_secret(
    inline: &Option<SecretString>,
    file: &Option<PathBuf>,
    key: &str,
) -> Result<Option<Secret<String>>, String> {
    match (inline, file) {
        (Some(s), _) => Ok(Some(Secret::new(s.expose().trim().to_string()))),
        (None, Some(f)) => std::fs::read_to_string(f)
            .map(|s| Some(Secret::new(s.trim().to_string())))
            .map_err(|e| format!("{key}_file: {}: {e}", f.display())),
        (None, None) => Ok(None),
    }
}
