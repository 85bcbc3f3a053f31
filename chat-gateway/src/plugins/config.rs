//! `[[plugin]]` in `gateway.toml`: which plugins run, where the values of
//! their declared secrets come from, and their limits. The commands and the
//! secret *names* are the plugin's own, in its manifest.
//!
//! All `[[plugin]]` entries together are one registry component
//! ([`PluginsConfig`]): its build starts the plugin host and registers
//! every plugin's commands with the router.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use fleetcmd_core::crypto::Secret;
use serde::Deserialize;

use super::manifest::Manifest;
use super::sandbox::{self, Grants};
use crate::registry::Private;
use crate::registry::{BuildContext, Component};
use crate::secret::SecretSource;

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
    /// Stderr lines of a plugin logged per second (a token bucket); the
    /// rest are dropped and counted, so a plugin cannot flood the log.
    pub const STDERR_LINES_PER_SEC: u32 = 20;
    /// Stderr lines logged at once before the rate applies.
    pub const STDERR_BURST: u32 = 100;
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
    /// `false` runs the plugin without its sandbox, with every right of
    /// the gateway's user (it could read the gateway's keys).
    #[serde(default = "yes")]
    pub sandbox: bool,
    /// Paths the sandboxed plugin may read besides the system's share
    /// and its own folder.
    #[serde(default)]
    pub read: Vec<PathBuf>,
    /// Paths the sandboxed plugin may write (and read).
    #[serde(default)]
    pub write: Vec<PathBuf>,
    /// What is the gateway's own, which no grant may reach (set by
    /// `private_paths`).
    #[serde(skip)]
    pub private: Private,
    // What the operator lets the plugin ask for, whatever its manifest says.
    /// The policy commands its `job.run` may name (`["uptime", "df"]`);
    /// any other is refused and audited, even when the caller may run it.
    /// Absent: whatever the caller may run; empty: no job at all.
    pub may_run: Option<Vec<String>>,
}

fn yes() -> bool {
    true
}

/// Every `[[plugin]]` entry: the registry component named `plugin`.
#[derive(Deserialize, Debug, Clone, PartialEq, Eq, Default)]
#[serde(transparent)]
pub struct PluginsConfig(pub Vec<PluginConfig>);

impl Component for PluginsConfig {
    const NAME: &'static str = "plugin";

    fn resolve_paths(&mut self, base: &Path) {
        for e in &mut self.0 {
            if e.manifest.is_relative() {
                let joined = base.join(&e.manifest);
                // Absolute, so the plugin (started in its own folder) is
                // found whatever the gateway's working directory.
                e.manifest = std::path::absolute(&joined).unwrap_or(joined);
            }
            for p in e.read.iter_mut().chain(e.write.iter_mut()) {
                if p.is_relative() {
                    *p = base.join(&*p);
                }
            }
            for source in e.secrets.values_mut() {
                source.resolve_paths(base);
            }
        }
    }

    /// Every plugin's secret files are among them (`{ file = … }`), so
    /// no plugin may be granted another's.
    fn private_paths(&mut self, private: &Private) {
        for e in &mut self.0 {
            e.private = private.clone();
        }
    }

    /// Reads every manifest and secret: what is missing is said now, not
    /// on the first call.
    /// Also where what is allowed but dangerous is said, once per check
    /// (`validate`, and every start, which validates first).
    fn validate(&self) -> Vec<(String, String)> {
        // Once per process: a start validates more than once.
        static WARNED: std::sync::Once = std::sync::Once::new();
        WARNED.call_once(|| warn_dangerous(&self.0));
        load(&self.0).err().map(|e| e.problems).unwrap_or_default()
    }

    fn enabled(&self) -> bool {
        !self.0.is_empty()
    }

    async fn build(self, cx: &mut BuildContext) -> Result<(), String> {
        let specs = load(&self.0).map_err(|e| e.to_string())?;
        sandbox::remove_stale_scratch();
        cx.commands(Arc::new(super::PluginHost::new(specs)))
    }
}

/// What is allowed but dangerous, said: a plugin without its sandbox, and
/// a gateway run as root (whose plugins' process limit the kernel does not
/// enforce).
fn warn_dangerous(entries: &[PluginConfig]) {
    for e in entries.iter().filter(|e| !e.sandbox) {
        tracing::warn!(
            manifest = %e.manifest.display(),
            "sandbox = false: this plugin runs with every right of the gateway's user — it can read the gateway's signing key, TLS key and state"
        );
    }
    // SAFETY: geteuid has no preconditions.
    #[allow(unsafe_code)]
    let root = unsafe { libc::geteuid() } == 0;
    if root && entries.iter().any(|e| e.sandbox) {
        tracing::warn!(
            "the gateway runs as root: the kernel does not enforce a sandboxed plugin's process limit for root; run the gateway as its own user (the packages do)"
        );
    }
}

/// A plugin ready to be supervised: its manifest, the secret values it
/// declared and its limits.
#[derive(Debug, Clone)]
pub struct PluginSpec {
    pub manifest: Manifest,
    pub secrets: Vec<(String, Secret<String>)>,
    pub limits: Limits,
    /// What it may reach when sandboxed; `None`: `sandbox = false`.
    pub sandbox: Option<sandbox::Spec>,
    /// `[[plugin]] may_run`: the only commands its `job.run` may name
    /// (`None`: any its caller may run).
    pub may_run: Option<Vec<String>>,
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
    pub stderr_lines_per_sec: u32,
    pub stderr_burst: u32,
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
            stderr_lines_per_sec: defaults::STDERR_LINES_PER_SEC,
            stderr_burst: defaults::STDERR_BURST,
        }
    }
}

/// Why `[[plugin]]` entries were refused: every problem with its key path
/// (`plugin[1].secrets.TOKEN`).
#[derive(thiserror::Error, Debug)]
#[error("{}", problems.iter().map(|(k, m)| format!("{k}: {m}")).collect::<Vec<_>>().join("; "))]
pub struct PluginConfigError {
    pub problems: Vec<(String, String)>,
}

/// Loads every `[[plugin]]` entry: manifests read and checked, secret
/// values read; plugin names and verbs unique across plugins, and no verb
/// another component registers (`query`, `oncall`: the gateway would
/// refuse to start on it, so `validate` names it first).
pub fn load(entries: &[PluginConfig]) -> Result<Vec<PluginSpec>, PluginConfigError> {
    let mut problems = Vec::new();
    let mut specs: Vec<PluginSpec> = Vec::new();
    for (i, e) in entries.iter().enumerate() {
        let key = format!("plugin[{i}]");
        match load_one(e, &key) {
            Ok(spec) => {
                if specs.iter().any(|s| s.manifest.name == spec.manifest.name) {
                    problems.push((
                        key.clone(),
                        format!(
                            "a plugin named \"{}\" is configured twice",
                            spec.manifest.name
                        ),
                    ));
                }
                for c in &spec.manifest.commands {
                    if let Some((component, _)) = crate::registry::registered_verbs()
                        .into_iter()
                        .find(|(_, v)| *v == c.verb)
                    {
                        problems.push((
                            key.clone(),
                            format!(
                                "verb \"{}\" of plugin \"{}\" is also the command of [{component}]",
                                c.verb, spec.manifest.name
                            ),
                        ));
                    }
                    if let Some(other) =
                        specs.iter().find(|s| s.manifest.command(&c.verb).is_some())
                    {
                        problems.push((
                            key.clone(),
                            format!(
                                "verb \"{}\" is also plugin \"{}\"'s",
                                c.verb, other.manifest.name
                            ),
                        ));
                    }
                }
                specs.push(spec);
            }
            Err(mut p) => problems.append(&mut p),
        }
    }
    problems.extend(one_plugin_over_another(&specs));
    if problems.is_empty() {
        Ok(specs)
    } else {
        Err(PluginConfigError { problems })
    }
}

type Problems = Vec<(String, String)>;

/// A plugin that may write where another plugin's folder or grants are
/// could replace its code (and so read its secrets) or its data: refused,
/// naming both (a `write` above another plugin's folder passed every
/// per-plugin check — found by the second outside attack).
fn one_plugin_over_another(specs: &[PluginSpec]) -> Problems {
    let resolved: Vec<(usize, &str, Grants)> = specs
        .iter()
        .enumerate()
        .filter_map(|(i, s)| {
            let sb = s.sandbox.as_ref()?;
            Some((
                i,
                s.manifest.name.as_str(),
                sb.grants.resolved(&sb.private).ok()?,
            ))
        })
        .collect();
    let mut problems = Vec::new();
    for (i, name, g) in &resolved {
        for (j, other, h) in &resolved {
            if i == j {
                continue;
            }
            let theirs = std::iter::once(&h.folder).chain(&h.read).chain(&h.write);
            for p in theirs {
                if let Some(w) = g
                    .write
                    .iter()
                    .find(|w| p.starts_with(w) || w.starts_with(p))
                {
                    problems.push((
                        format!("plugin[{i}].write"),
                        format!(
                            "plugin \"{name}\" may write {}, where plugin \"{other}\" has {}: it could change the other's code or data",
                            w.display(),
                            p.display()
                        ),
                    ));
                }
            }
        }
    }
    problems
}

fn duration(
    key: String,
    v: &Option<String>,
    default: Duration,
    problems: &mut Problems,
) -> Duration {
    match v.as_deref().map(fleetcmd_core::duration::parse_duration) {
        None => default,
        Some(Ok(d)) if !d.is_zero() => d,
        Some(Ok(_)) => {
            problems.push((key, "must be more than 0s".to_string()));
            default
        }
        Some(Err(e)) => {
            problems.push((key, e));
            default
        }
    }
}

fn load_one(e: &PluginConfig, key: &str) -> Result<PluginSpec, Problems> {
    let manifest = Manifest::load(&e.manifest)
        .map_err(|m| vec![(format!("{key}.manifest"), m.to_string())])?;
    let mut problems = Vec::new();
    let mut secrets = Vec::new();
    for name in &manifest.secrets {
        let Some(source) = e.secrets.get(name) else {
            problems.push((
                format!("{key}.secrets"),
                format!(
                    "plugin \"{}\" declares secret {name}; give it as {name} = {{ file = \"…\" }} or {{ env = \"…\" }}",
                    manifest.name
                ),
            ));
            continue;
        };
        match source.load() {
            Ok(v) => secrets.push((name.clone(), v)),
            Err(err) => problems.push((format!("{key}.secrets.{name}"), err)),
        }
    }
    for name in e.secrets.keys() {
        if !manifest.secrets.contains(name) {
            problems.push((
                format!("{key}.secrets.{name}"),
                format!(
                    "plugin \"{}\" does not declare it in its manifest, so it is never passed",
                    manifest.name
                ),
            ));
        }
    }
    if let Some(names) = &e.may_run {
        let mut seen = std::collections::BTreeSet::new();
        for n in names {
            let ok = !n.is_empty()
                && n.len() <= 64
                && n.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.');
            if !ok {
                problems.push((
                    format!("{key}.may_run"),
                    format!(
                        "{:?} is not a command name of the policy",
                        fleetcmd_core::terminal::excerpt(n)
                    ),
                ));
            } else if !seen.insert(n) {
                problems.push((format!("{key}.may_run"), format!("{n:?} is listed twice")));
            }
        }
    }
    let defaults = Limits::default();
    let limits = Limits {
        call_timeout: duration(
            format!("{key}.call_timeout"),
            &e.call_timeout,
            defaults.call_timeout,
            &mut problems,
        ),
        restart_min: duration(
            format!("{key}.restart_min"),
            &e.restart_min,
            defaults.restart_min,
            &mut problems,
        ),
        memory_bytes: match e.memory_mb {
            Some(mb) if !(16..=1024 * 1024).contains(&mb) => {
                problems.push((
                    format!("{key}.memory_mb"),
                    format!("{mb} is not between 16 and 1048576"),
                ));
                0
            }
            Some(mb) => mb * 1024 * 1024,
            None => defaults.memory_bytes,
        },
        reply_bytes: match e.reply_bytes {
            Some(n) if !(256..=1024 * 1024).contains(&n) => {
                problems.push((
                    format!("{key}.reply_bytes"),
                    format!("{n} is not between 256 and 1048576"),
                ));
                0
            }
            Some(n) => n,
            None => defaults.reply_bytes,
        },
        ..defaults
    };
    let sandbox = sandbox_spec(e, &manifest, key, &mut problems);
    if problems.is_empty() {
        Ok(PluginSpec {
            manifest,
            secrets,
            limits,
            sandbox,
            may_run: e.may_run.clone(),
        })
    } else {
        Err(problems)
    }
}

/// The sandbox of one plugin: refused when this machine cannot sandbox,
/// or when a grant (resolved: links, `..`) would reach what is the
/// gateway's own. `sandbox = false` is said loudly, at `validate` and at
/// every start.
fn sandbox_spec(
    e: &PluginConfig,
    manifest: &Manifest,
    key: &str,
    problems: &mut Problems,
) -> Option<sandbox::Spec> {
    if !e.sandbox {
        if !e.read.is_empty() || !e.write.is_empty() {
            problems.push((
                format!("{key}.read"),
                "read and write grant paths to a sandbox; with sandbox = false the plugin can reach everything the gateway can".to_string(),
            ));
        }
        return None;
    }
    if let Err(why) = sandbox::available() {
        problems.push((
            format!("{key}.sandbox"),
            format!(
                "cannot sandbox plugin \"{}\": {why}; sandbox = false would run it with every right of the gateway's user, its keys included",
                manifest.name
            ),
        ));
    }
    let spec = sandbox::Spec {
        grants: Grants {
            folder: e
                .manifest
                .parent()
                .map(Path::to_path_buf)
                .unwrap_or_default(),
            read: e.read.clone(),
            write: e.write.clone(),
        },
        private: e.private.clone(),
    };
    if let Err(refused) = spec.grants.resolved(&spec.private) {
        problems.extend(refused.into_iter().map(|m| (key.to_string(), m)));
    }
    Some(spec)
}
