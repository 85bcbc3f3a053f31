//! `[[plugin]]` in `gateway.toml`: which plugins run, where the values of
//! their declared secrets come from, and their limits. The commands and the
//! secret *names* are the plugin's own, in its manifest.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use fleetcmd_core::crypto::Secret;
use serde::Deserialize;

use super::manifest::{Manifest, ManifestError};

/// Every default of `[[plugin]]`, in one place.
pub mod defaults {
    use std::time::Duration;

    /// How long one `command` (including the jobs it runs) may take.
    pub const CALL_TIMEOUT: Duration = Duration::from_secs(30);
    /// Address space of a plugin process (`RLIMIT_AS`), in MiB.
    pub const MEMORY_MB: u64 = 512;
    /// Bytes of reply text one call may post; more is cut and said so.
    pub const REPLY_BYTES: usize = 16 * 1024;
    /// Longest line a plugin may write on stdout; longer ones end it.
    pub const LINE_BYTES: usize = 256 * 1024;
    /// First wait before a crashed plugin is started again; doubled per
    /// crash in a row, up to [`RESTART_MAX`].
    pub const RESTART_MIN: Duration = Duration::from_secs(1);
    pub const RESTART_MAX: Duration = Duration::from_secs(60);
}

/// One `[[plugin]]` entry as written.
#[derive(Deserialize, Debug, Clone, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct PluginConfig {
    /// The plugin's `plugin.toml`.
    pub manifest: PathBuf,
    /// Where each secret the manifest declares gets its value.
    #[serde(default)]
    pub secrets: BTreeMap<String, SecretSource>,
    /// e.g. `30s`.
    pub call_timeout: Option<String>,
    pub memory_mb: Option<u64>,
    pub reply_bytes: Option<usize>,
    /// e.g. `1s`: the first wait before restarting a crashed plugin.
    pub restart_min: Option<String>,
}

/// Where a secret's value comes from.
#[derive(Deserialize, Debug, Clone, PartialEq, Eq)]
#[serde(deny_unknown_fields, rename_all = "lowercase")]
pub enum SecretSource {
    /// A file holding one line (trailing newline removed).
    File(PathBuf),
    /// An environment variable of the gateway.
    Env(String),
}

/// A plugin ready to be supervised: its manifest, the secret values it
/// declared and its limits.
#[derive(Debug, Clone)]
pub struct PluginSpec {
    pub manifest: Manifest,
    pub secrets: Vec<(String, Secret<String>)>,
    pub limits: Limits,
}

/// The limits one plugin runs under.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub call_timeout: Duration,
    pub memory_bytes: u64,
    pub reply_bytes: usize,
    pub line_bytes: usize,
    pub restart_min: Duration,
    pub restart_max: Duration,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            call_timeout: defaults::CALL_TIMEOUT,
            memory_bytes: defaults::MEMORY_MB * 1024 * 1024,
            reply_bytes: defaults::REPLY_BYTES,
            line_bytes: defaults::LINE_BYTES,
            restart_min: defaults::RESTART_MIN,
            restart_max: defaults::RESTART_MAX,
        }
    }
}

/// Why `[[plugin]]` entries were refused: every problem with its key.
#[derive(thiserror::Error, Debug)]
#[error("{}", problems.join("; "))]
pub struct PluginConfigError {
    pub problems: Vec<String>,
}

impl From<ManifestError> for PluginConfigError {
    fn from(e: ManifestError) -> PluginConfigError {
        PluginConfigError {
            problems: vec![e.to_string()],
        }
    }
}

/// Loads every `[[plugin]]` entry: manifests read and checked, secret
/// values read; plugin names and verbs unique across plugins.
pub fn load(entries: &[PluginConfig]) -> Result<Vec<PluginSpec>, PluginConfigError> {
    let mut problems = Vec::new();
    let mut specs: Vec<PluginSpec> = Vec::new();
    for (i, e) in entries.iter().enumerate() {
        let key = format!("plugin[{i}]");
        match load_one(e, &key) {
            Ok(spec) => {
                if specs.iter().any(|s| s.manifest.name == spec.manifest.name) {
                    problems.push(format!(
                        "{key}: a plugin named \"{}\" is configured twice",
                        spec.manifest.name
                    ));
                }
                for c in &spec.manifest.commands {
                    if let Some(other) =
                        specs.iter().find(|s| s.manifest.command(&c.verb).is_some())
                    {
                        problems.push(format!(
                            "{key}: verb \"{}\" is also plugin \"{}\"'s",
                            c.verb, other.manifest.name
                        ));
                    }
                }
                specs.push(spec);
            }
            Err(mut p) => problems.append(&mut p),
        }
    }
    if problems.is_empty() {
        Ok(specs)
    } else {
        Err(PluginConfigError { problems })
    }
}

fn duration(
    key: &str,
    v: &Option<String>,
    default: Duration,
    problems: &mut Vec<String>,
) -> Duration {
    match v.as_deref().map(fleetcmd_core::duration::parse_duration) {
        None => default,
        Some(Ok(d)) if !d.is_zero() => d,
        Some(Ok(_)) => {
            problems.push(format!("{key}: must be more than 0s"));
            default
        }
        Some(Err(e)) => {
            problems.push(format!("{key}: {e}"));
            default
        }
    }
}

fn load_one(e: &PluginConfig, key: &str) -> Result<PluginSpec, Vec<String>> {
    let manifest = Manifest::load(&e.manifest).map_err(|m| vec![format!("{key}.manifest: {m}")])?;
    let mut problems = Vec::new();
    let mut secrets = Vec::new();
    for name in &manifest.secrets {
        let Some(source) = e.secrets.get(name) else {
            problems.push(format!(
                "{key}.secrets: plugin \"{}\" declares secret {name}; give it as {name} = {{ file = \"…\" }} or {{ env = \"…\" }}",
                manifest.name
            ));
            continue;
        };
        match read(source) {
            Ok(v) => secrets.push((name.clone(), v)),
            Err(err) => problems.push(format!("{key}.secrets.{name}: {err}")),
        }
    }
    for name in e.secrets.keys() {
        if !manifest.secrets.contains(name) {
            problems.push(format!(
                "{key}.secrets.{name}: plugin \"{}\" does not declare it in its manifest, so it is never passed",
                manifest.name
            ));
        }
    }
    let defaults = Limits::default();
    let limits = Limits {
        call_timeout: duration(
            &format!("{key}.call_timeout"),
            &e.call_timeout,
            defaults.call_timeout,
            &mut problems,
        ),
        restart_min: duration(
            &format!("{key}.restart_min"),
            &e.restart_min,
            defaults.restart_min,
            &mut problems,
        ),
        memory_bytes: match e.memory_mb {
            Some(mb) if !(16..=1024 * 1024).contains(&mb) => {
                problems.push(format!(
                    "{key}.memory_mb: {mb} is not between 16 and 1048576"
                ));
                0
            }
            Some(mb) => mb * 1024 * 1024,
            None => defaults.memory_bytes,
        },
        reply_bytes: match e.reply_bytes {
            Some(n) if !(256..=1024 * 1024).contains(&n) => {
                problems.push(format!(
                    "{key}.reply_bytes: {n} is not between 256 and 1048576"
                ));
                0
            }
            Some(n) => n,
            None => defaults.reply_bytes,
        },
        ..defaults
    };
    if problems.is_empty() {
        Ok(PluginSpec {
            manifest,
            secrets,
            limits,
        })
    } else {
        Err(problems)
    }
}

fn read(source: &SecretSource) -> Result<Secret<String>, String> {
    let (value, from) = match source {
        SecretSource::File(path) => (
            std::fs::read_to_string(path)
                .map_err(|e| format!("cannot read {}: {e}", path.display()))?,
            path.display().to_string(),
        ),
        SecretSource::Env(var) => (
            std::env::var(var).map_err(|_| format!("environment variable {var} is not set"))?,
            format!("${var}"),
        ),
    };
    let value = value.trim_end_matches(['\r', '\n']).to_string();
    if value.is_empty() || value.contains(['\r', '\n', '\0']) {
        return Err(format!("{from} must hold one non-empty line"));
    }
    Ok(Secret::new(value))
}
