//! The policy bundle: signers, the command allow-list with argv
//! templates and argument validators, roles, bindings and approvers.
//!
//! [`Policy::parse`] deserializes the TOML strictly (`deny_unknown_fields`)
//! and then validates it, returning every problem at once with its key path
//! and, where it can be found, its line.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::time::Duration;

use serde::Deserialize;

use crate::argv::{embedded_placeholders, validate_arg, whole_placeholder};
use crate::crypto::PublicKey;
use crate::duration::parse_duration;
use crate::ids::valid_platform;
use crate::selector::Selector;

/// Every default of the policy format, in one place.
pub mod defaults {
    use std::time::Duration;

    /// Command timeout when `timeout` is not given.
    pub const TIMEOUT: Duration = Duration::from_secs(60);
    /// Longest allowed command timeout.
    pub const MAX_TIMEOUT: Duration = Duration::from_secs(24 * 3600);
    /// `max_len` of a `text` argument when not given.
    pub const TEXT_MAX_LEN: usize = 256;
    /// `min` of an `int` argument when not given.
    pub const INT_MIN: i64 = i64::MIN;
    /// `max` of an `int` argument when not given.
    pub const INT_MAX: i64 = i64::MAX;
    /// `requires_approvals` when not given.
    pub const REQUIRES_APPROVALS: u32 = 0;
    /// Largest allowed `requires_approvals`.
    pub const MAX_APPROVALS: u32 = 10;
    /// `allow_dash` when not given.
    pub const ALLOW_DASH: bool = false;
    /// `allow_format_chars` when not given.
    pub const ALLOW_FORMAT_CHARS: bool = false;
    /// `create` of a `path` argument when not given.
    pub const CREATE: bool = false;
    /// `max_job_lifetime` when not given: the longest `expires_at -
    /// not_before` a job may be signed with.
    pub const MAX_JOB_LIFETIME: Duration = Duration::from_secs(24 * 3600);
    /// Largest allowed `max_job_lifetime`. Agents keep a job id in their
    /// seen-set for at most this long (plus the clock skew allowance).
    pub const MAX_JOB_LIFETIME_CEILING: Duration = Duration::from_secs(30 * 24 * 3600);
}

/// A validated policy.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Policy {
    pub version: u64,
    /// Unix seconds after which agents refuse every job.
    pub expires: Option<u64>,
    /// The longest validity window (`expires_at - not_before`) a job may be
    /// signed with; longer ones are refused by the controller and agents.
    pub max_job_lifetime: Duration,
    pub signers: Vec<Signer>,
    pub commands: BTreeMap<String, CommandDef>,
    pub roles: BTreeMap<String, Role>,
    pub bindings: Vec<Binding>,
    /// Command name -> identity patterns allowed to approve it.
    pub approvers: BTreeMap<String, Vec<String>>,
}

/// A key trusted to sign jobs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Signer {
    pub id: String,
    pub public_key: PublicKey,
    /// Command names, or `"*"` for all.
    pub may_sign: Vec<String>,
    /// Identity patterns whose approvals this signer may attest (a gateway:
    /// the chat identities it verifies, e.g. `slack:T0001:*`; an operator:
    /// only `cli:<name>`). Empty: its approvals never count.
    pub vouches_for: Vec<String>,
}

/// One allow-listed command.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CommandDef {
    pub name: String,
    pub description: String,
    /// `argv[0]` is an absolute path; other elements may be whole `{name}` placeholders.
    pub argv: Vec<String>,
    pub args: BTreeMap<String, ArgSpec>,
    pub run_as: Option<String>,
    pub timeout: Duration,
    /// Where this command may ever run.
    pub targets: Option<Selector>,
    pub requires_approvals: u32,
    pub env: BTreeMap<String, String>,
}

/// The validator of one argument.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ArgSpec {
    pub kind: ArgKind,
    pub default: Option<String>,
    pub allow_dash: bool,
    /// Lets Unicode format characters (category Cf: bidirectional controls,
    /// zero-width joiners, soft hyphen, BOM), line/paragraph separators,
    /// private-use and invisible filler characters through. Refused by
    /// default in every kind: they make chat and audit lines show something
    /// other than what runs. Control characters are refused regardless.
    pub allow_format_chars: bool,
}

/// Argument kinds.
#[derive(Clone, Debug)]
pub enum ArgKind {
    /// Any text without control characters, at most `max_len` characters.
    Text { max_len: usize },
    /// A decimal integer in `min..=max`.
    Int { min: i64, max: i64 },
    /// One of `values`, exactly.
    Enum { values: Vec<String> },
    /// A full match of `source`, with ASCII classes
    /// ([`crate::argv::compile_pattern`]).
    Pattern {
        regex: regex::bytes::Regex,
        source: String,
    },
    /// An RFC 1123 host name.
    Hostname,
    /// An absolute normalized path under one of `prefixes` (if any). With
    /// prefixes, the agent resolves it beneath its prefix without following
    /// symbolic links and hands the command the descriptor it checked;
    /// `create` lets a missing file be created (empty, as `run_as`).
    Path { prefixes: Vec<String>, create: bool },
    /// A duration such as `10s`, `5m`, `2h`, `1d`.
    Duration,
}

impl PartialEq for ArgKind {
    fn eq(&self, other: &Self) -> bool {
        use ArgKind::*;
        match (self, other) {
            (Text { max_len: a }, Text { max_len: b }) => a == b,
            (Int { min: a, max: b }, Int { min: c, max: d }) => a == c && b == d,
            (Enum { values: a }, Enum { values: b }) => a == b,
            (Pattern { source: a, .. }, Pattern { source: b, .. }) => a == b,
            (Hostname, Hostname) | (Duration, Duration) => true,
            (
                Path {
                    prefixes: a,
                    create: c,
                },
                Path {
                    prefixes: b,
                    create: d,
                },
            ) => a == b && c == d,
            _ => false,
        }
    }
}
impl Eq for ArgKind {}

impl ArgKind {
    /// The kind's name as written in TOML.
    pub fn name(&self) -> &'static str {
        match self {
            ArgKind::Text { .. } => "text",
            ArgKind::Int { .. } => "int",
            ArgKind::Enum { .. } => "enum",
            ArgKind::Pattern { .. } => "pattern",
            ArgKind::Hostname => "hostname",
            ArgKind::Path { .. } => "path",
            ArgKind::Duration => "duration",
        }
    }
}

/// A named set of permissions for chat users.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Role {
    pub name: String,
    /// Command names, or `"*"`.
    pub commands: Vec<String>,
    pub targets: Option<Selector>,
    /// Channels where the role applies; empty = everywhere.
    pub channels: Vec<String>,
    /// What the role may do besides running its commands (read every job,
    /// create tokens, revoke, …); empty = nothing more.
    pub may: Vec<Permission>,
    /// Plugin commands the role may use: `may` entries `plugin:NAME.COMMAND`
    /// or `plugin:NAME.*` (see [`PluginGrant`]). `*` in `may` does not
    /// include them: a plugin reaches outside the fleet with its own
    /// secrets, so each is granted by name.
    pub plugins: Vec<PluginGrant>,
    /// With `tokens.create`: join tokens only for label sets this selects
    /// (`None` = any labels).
    pub token_labels: Option<Selector>,
}

/// A right beyond running commands, granted by a role's `may` list.
/// Without it an identity reads only the jobs it requested or could run
/// (and the audit records about them), cancels only those, and manages
/// nothing. Pushing a policy needs none: the root signature is the
/// authority, so a policy that forgot a grant can always be replaced.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Permission {
    /// Read every job and its output (`jobs.read_all`).
    ReadAllJobs,
    /// Cancel any job (`jobs.cancel_any`).
    CancelAnyJob,
    /// Search every audit record (`audit.read_all`).
    ReadAllAudit,
    /// Export the whole audit trail with its signed heads (`audit.export`).
    ExportAudit,
    /// Create join tokens, for the labels `token_labels` allows (`tokens.create`).
    CreateTokens,
    /// Revoke agents (`agents.revoke`).
    RevokeAgents,
    /// Revoke operator and gateway certificates (`certs.revoke`).
    RevokeCerts,
}

impl Permission {
    pub const ALL: [Permission; 7] = [
        Permission::ReadAllJobs,
        Permission::CancelAnyJob,
        Permission::ReadAllAudit,
        Permission::ExportAudit,
        Permission::CreateTokens,
        Permission::RevokeAgents,
        Permission::RevokeCerts,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Permission::ReadAllJobs => "jobs.read_all",
            Permission::CancelAnyJob => "jobs.cancel_any",
            Permission::ReadAllAudit => "audit.read_all",
            Permission::ExportAudit => "audit.export",
            Permission::CreateTokens => "tokens.create",
            Permission::RevokeAgents => "agents.revoke",
            Permission::RevokeCerts => "certs.revoke",
        }
    }

    /// Parses one `may` entry; `*` is expanded by the policy parser.
    pub fn parse(s: &str) -> Option<Permission> {
        Permission::ALL.into_iter().find(|p| p.as_str() == s)
    }
}

/// The prefix of a plugin action in a role's `may` list.
pub const PLUGIN_ACTION_PREFIX: &str = "plugin:";

/// A grant of plugin commands: `plugin:NAME.COMMAND`, or `plugin:NAME.*`
/// for every command of plugin NAME.
///
/// ```
/// use fleetcmd_core::policy::PluginGrant;
/// let g = PluginGrant::parse("plugin:deploy.*").unwrap();
/// assert!(g.allows("plugin:deploy.rollback"));
/// assert!(!g.allows("plugin:deployer.status"));
/// ```
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PluginGrant {
    pub plugin: String,
    /// `None`: every command of the plugin.
    pub command: Option<String>,
}

impl PluginGrant {
    /// Parses a `may` entry that starts with `plugin:`; the error says
    /// what is wrong with it.
    pub fn parse(s: &str) -> Result<PluginGrant, String> {
        let rest = s
            .strip_prefix(PLUGIN_ACTION_PREFIX)
            .ok_or_else(|| format!("a plugin action starts with \"{PLUGIN_ACTION_PREFIX}\""))?;
        let (plugin, command) = rest.split_once('.').ok_or_else(|| {
            format!("plugin action \"{s}\" must be plugin:NAME.COMMAND or plugin:NAME.*")
        })?;
        if !valid_plugin_part(plugin) {
            return Err(format!(
                "plugin action \"{s}\": plugin name \"{plugin}\" must be 1-64 of a-z, 0-9, _ and -, starting with a letter or digit"
            ));
        }
        if command == "*" {
            return Ok(PluginGrant {
                plugin: plugin.to_string(),
                command: None,
            });
        }
        if !valid_plugin_part(command) {
            return Err(format!(
                "plugin action \"{s}\": command \"{command}\" must be * or 1-64 of a-z, 0-9, _ and -, starting with a letter or digit"
            ));
        }
        Ok(PluginGrant {
            plugin: plugin.to_string(),
            command: Some(command.to_string()),
        })
    }

    /// Whether this grant covers `action` (`plugin:NAME.COMMAND`).
    pub fn allows(&self, action: &str) -> bool {
        let Some((plugin, command)) = action
            .strip_prefix(PLUGIN_ACTION_PREFIX)
            .and_then(|r| r.split_once('.'))
        else {
            return false;
        };
        plugin == self.plugin && self.command.as_deref().is_none_or(|c| c == command)
    }
}

impl fmt::Display for PluginGrant {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{PLUGIN_ACTION_PREFIX}{}.{}",
            self.plugin,
            self.command.as_deref().unwrap_or("*")
        )
    }
}

/// A plugin or plugin command name: lowercase so that the action a policy
/// names and the verb typed in chat cannot differ by case.
pub fn valid_plugin_part(s: &str) -> bool {
    let b = s.as_bytes();
    !b.is_empty()
        && b.len() <= 64
        && (b[0].is_ascii_lowercase() || b[0].is_ascii_digit())
        && b.iter()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, b'_' | b'-'))
}

impl fmt::Display for Permission {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Grants roles to identities matching any of `subjects` (glob patterns).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Binding {
    pub subjects: Vec<String>,
    pub roles: Vec<String>,
}

/// One problem in a policy file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PolicyError {
    /// 1-based line, when known.
    pub line: Option<usize>,
    /// Key path such as `commands.restart.args.unit` (empty when unknown).
    pub key: String,
    pub message: String,
}

impl fmt::Display for PolicyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(line) = self.line {
            write!(f, "line {line}: ")?;
        }
        if !self.key.is_empty() {
            write!(f, "{}: ", self.key)?;
        }
        f.write_str(&self.message)
    }
}

impl std::error::Error for PolicyError {}

/// Every problem found in a policy file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PolicyErrors(pub Vec<PolicyError>);

impl fmt::Display for PolicyErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("\n")?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

impl std::error::Error for PolicyErrors {}

impl Policy {
    /// Parses and validates a policy.
    pub fn parse(text: &str) -> Result<Policy, PolicyErrors> {
        let raw: RawPolicy = toml::from_str(text).map_err(|e| {
            let line = e.span().map(|s| line_of_offset(text, s.start));
            PolicyErrors(vec![PolicyError {
                line,
                key: String::new(),
                message: e.message().trim().to_string(),
            }])
        })?;
        let mut v = Validator {
            index: LineIndex::new(text),
            errors: Vec::new(),
        };
        let policy = v.policy(raw);
        if v.errors.is_empty() {
            Ok(policy)
        } else {
            let mut errors = v.errors;
            errors.sort_by_key(|e| e.line.unwrap_or(usize::MAX));
            Err(PolicyErrors(errors))
        }
    }

    /// The allow-listed command `name`.
    pub fn command(&self, name: &str) -> Option<&CommandDef> {
        self.commands.get(name)
    }

    /// The signer with id `id`.
    pub fn signer(&self, id: &str) -> Option<&Signer> {
        self.signers.iter().find(|s| s.id == id)
    }
}

impl Signer {
    /// Whether this signer may sign jobs for `command`.
    pub fn may_sign(&self, command: &str) -> bool {
        self.may_sign.iter().any(|c| c == "*" || c == command)
    }

    /// Whether this signer may attest an approval given by `who`.
    pub fn vouches_for(&self, who: &crate::ids::Identity) -> bool {
        self.vouches_for.iter().any(|p| who.matches_pattern(p))
    }
}

// ---- raw TOML shape ----

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPolicy {
    version: Option<i64>,
    expires: Option<toml::Value>,
    max_job_lifetime: Option<toml::Value>,
    #[serde(default)]
    signers: Vec<RawSigner>,
    #[serde(default)]
    commands: BTreeMap<String, RawCommand>,
    #[serde(default)]
    roles: BTreeMap<String, RawRole>,
    #[serde(default)]
    bindings: Vec<RawBinding>,
    #[serde(default)]
    approvers: BTreeMap<String, Vec<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSigner {
    #[serde(default)]
    id: String,
    #[serde(default)]
    public_key: String,
    #[serde(default)]
    may_sign: Vec<String>,
    #[serde(default)]
    vouches_for: Vec<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCommand {
    #[serde(default)]
    description: String,
    #[serde(default)]
    argv: Vec<String>,
    #[serde(default)]
    args: BTreeMap<String, RawArg>,
    run_as: Option<String>,
    timeout: Option<toml::Value>,
    targets: Option<String>,
    requires_approvals: Option<i64>,
    #[serde(default)]
    env: BTreeMap<String, String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawArg {
    kind: String,
    max_len: Option<i64>,
    min: Option<i64>,
    max: Option<i64>,
    values: Option<Vec<String>>,
    pattern: Option<String>,
    prefixes: Option<Vec<String>>,
    default: Option<toml::Value>,
    allow_dash: Option<bool>,
    allow_format_chars: Option<bool>,
    create: Option<bool>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRole {
    #[serde(default)]
    commands: Vec<String>,
    targets: Option<String>,
    #[serde(default)]
    channels: Vec<String>,
    #[serde(default)]
    may: Vec<String>,
    token_labels: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawBinding {
    #[serde(default)]
    subjects: Vec<String>,
    #[serde(default)]
    roles: Vec<String>,
}

// ---- validation ----

struct Validator {
    index: LineIndex,
    errors: Vec<PolicyError>,
}

pub(crate) fn valid_name(s: &str) -> bool {
    let b = s.as_bytes();
    !b.is_empty()
        && b.len() <= 64
        && b[0].is_ascii_alphanumeric()
        && b.iter()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'_' | b'-' | b'.'))
}

pub(crate) fn valid_arg_name(s: &str) -> bool {
    let b = s.as_bytes();
    !b.is_empty()
        && b.len() <= 64
        && (b[0].is_ascii_alphabetic() || b[0] == b'_')
        && b.iter()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'_' | b'-'))
}

fn valid_env_name(s: &str) -> bool {
    let b = s.as_bytes();
    !b.is_empty()
        && (b[0].is_ascii_alphabetic() || b[0] == b'_')
        && b.iter().all(|c| c.is_ascii_alphanumeric() || *c == b'_')
}

/// An identity pattern starts with a platform name and `:` (`slack:T1:*`,
/// `matrix:@alice:example.org`); any platform, as for identities.
fn has_platform(pattern: &str) -> bool {
    pattern
        .split_once(':')
        .is_some_and(|(platform, _)| valid_platform(platform))
}

const PLATFORM_HINT: &str = "a platform name and `:` (e.g. `slack:`, `irc:`, `matrix:`)";

impl Validator {
    fn err(&mut self, path: &[&str], message: impl Into<String>) {
        self.errors.push(PolicyError {
            line: self.index.find(path),
            key: path.join("."),
            message: message.into(),
        });
    }

    fn policy(&mut self, raw: RawPolicy) -> Policy {
        let version = match raw.version {
            None => {
                self.err(&["version"], "`version` is required (an integer >= 1)");
                0
            }
            Some(v) if v < 1 => {
                self.err(&["version"], format!("version must be >= 1, got {v}"));
                0
            }
            Some(v) => v.unsigned_abs(),
        };
        let expires = raw.expires.and_then(|v| self.expires(v));
        let max_job_lifetime = raw
            .max_job_lifetime
            .map_or(defaults::MAX_JOB_LIFETIME, |v| self.max_job_lifetime(v));
        let command_names: BTreeSet<String> = raw.commands.keys().cloned().collect();

        let mut signers: Vec<Signer> = Vec::new();
        for (i, s) in raw.signers.into_iter().enumerate() {
            let entry = format!("signers[{i}]");
            if s.id.trim().is_empty() {
                self.err(&[&entry, "id"], "signer id is required");
            } else if signers.iter().any(|o| o.id == s.id) {
                self.err(&[&entry, "id"], format!("duplicate signer id \"{}\"", s.id));
            }
            let public_key = match PublicKey::parse(&s.public_key) {
                Ok(k) => k,
                Err(e) => {
                    self.err(&[&entry, "public_key"], e.to_string());
                    PublicKey::from_bytes([0; 32])
                }
            };
            for c in &s.may_sign {
                if c != "*" && !command_names.contains(c) {
                    self.err(&[&entry, "may_sign"], format!("unknown command \"{c}\""));
                }
            }
            for p in &s.vouches_for {
                if !has_platform(p) {
                    self.err(
                        &[&entry, "vouches_for"],
                        format!("identity pattern \"{p}\" must start with {PLATFORM_HINT}"),
                    );
                }
            }
            signers.push(Signer {
                id: s.id,
                public_key,
                may_sign: s.may_sign,
                vouches_for: s.vouches_for,
            });
        }

        let mut commands = BTreeMap::new();
        for (name, c) in raw.commands {
            let def = self.command(&name, c);
            commands.insert(name, def);
        }

        let mut roles = BTreeMap::new();
        for (name, r) in raw.roles {
            let path = ["roles", name.as_str()];
            for c in &r.commands {
                if c != "*" && !command_names.contains(c) {
                    self.err(
                        &[&path[..], &["commands"]].concat(),
                        format!("unknown command \"{c}\""),
                    );
                }
            }
            let targets = r
                .targets
                .as_deref()
                .and_then(|t| self.selector(&[&path[..], &["targets"]].concat(), t));
            if r.channels.iter().any(|c| c.trim().is_empty()) {
                self.err(
                    &[&path[..], &["channels"]].concat(),
                    "channel entries must not be empty",
                );
            }
            let mut may = BTreeSet::new();
            let mut plugins = BTreeSet::new();
            for m in &r.may {
                if m == "*" {
                    may.extend(Permission::ALL);
                } else if let Some(p) = Permission::parse(m) {
                    may.insert(p);
                } else if m.starts_with(PLUGIN_ACTION_PREFIX) {
                    match PluginGrant::parse(m) {
                        Ok(g) => {
                            plugins.insert(g);
                        }
                        Err(e) => self.err(&[&path[..], &["may"]].concat(), e),
                    }
                } else {
                    self.err(
                        &[&path[..], &["may"]].concat(),
                        format!(
                            "unknown permission \"{m}\"; known: *, {}, plugin:NAME.COMMAND, plugin:NAME.*",
                            Permission::ALL.map(Permission::as_str).join(", ")
                        ),
                    );
                }
            }
            let token_labels = r
                .token_labels
                .as_deref()
                .and_then(|t| self.selector(&[&path[..], &["token_labels"]].concat(), t));
            if r.token_labels.is_some() && !may.contains(&Permission::CreateTokens) {
                self.err(
                    &[&path[..], &["token_labels"]].concat(),
                    "token_labels needs \"tokens.create\" in may",
                );
            }
            roles.insert(
                name.clone(),
                Role {
                    name,
                    commands: r.commands,
                    targets,
                    channels: r.channels,
                    may: may.into_iter().collect(),
                    plugins: plugins.into_iter().collect(),
                    token_labels,
                },
            );
        }

        let mut bindings = Vec::new();
        for (i, b) in raw.bindings.into_iter().enumerate() {
            let entry = format!("bindings[{i}]");
            if b.subjects.is_empty() {
                self.err(
                    &[&entry, "subjects"],
                    "a binding needs at least one subject",
                );
            }
            for s in &b.subjects {
                if !has_platform(s) {
                    self.err(
                        &[&entry, "subjects"],
                        format!("subject pattern \"{s}\" must start with {PLATFORM_HINT}"),
                    );
                }
            }
            if b.roles.is_empty() {
                self.err(&[&entry, "roles"], "a binding needs at least one role");
            }
            for r in &b.roles {
                if !roles.contains_key(r) {
                    self.err(&[&entry, "roles"], format!("unknown role \"{r}\""));
                }
            }
            bindings.push(Binding {
                subjects: b.subjects,
                roles: b.roles,
            });
        }

        for (command, patterns) in &raw.approvers {
            if !command_names.contains(command) {
                self.err(
                    &["approvers", command],
                    format!("unknown command \"{command}\""),
                );
            }
            for p in patterns {
                if !has_platform(p) {
                    self.err(
                        &["approvers", command],
                        format!("approver pattern \"{p}\" must start with {PLATFORM_HINT}"),
                    );
                }
            }
        }

        Policy {
            version,
            expires,
            max_job_lifetime,
            signers,
            commands,
            roles,
            bindings,
            approvers: raw.approvers,
        }
    }

    fn expires(&mut self, v: toml::Value) -> Option<u64> {
        let text = match v {
            toml::Value::String(s) => s,
            toml::Value::Datetime(d) => d.to_string(),
            other => {
                self.err(
                    &["expires"],
                    format!(
                        "expected an RFC 3339 date-time string, got {}",
                        other.type_str()
                    ),
                );
                return None;
            }
        };
        match time::OffsetDateTime::parse(&text, &time::format_description::well_known::Rfc3339) {
            Ok(t) if t.unix_timestamp() >= 0 => Some(t.unix_timestamp().unsigned_abs()),
            Ok(_) => {
                self.err(&["expires"], format!("\"{text}\" is before 1970"));
                None
            }
            Err(e) => {
                self.err(
                    &["expires"],
                    format!("\"{text}\" is not an RFC 3339 date-time with offset (e.g. 2027-03-01T00:00:00Z): {e}"),
                );
                None
            }
        }
    }

    fn max_job_lifetime(&mut self, v: toml::Value) -> Duration {
        let parsed = match &v {
            toml::Value::String(s) => parse_duration(s),
            other => Err(format!(
                "expected a duration such as \"24h\", got {}",
                other.type_str()
            )),
        };
        let ceiling = defaults::MAX_JOB_LIFETIME_CEILING;
        match parsed {
            Ok(d) if d < Duration::from_secs(1) => {
                self.err(
                    &["max_job_lifetime"],
                    "max_job_lifetime must be at least 1s",
                );
                defaults::MAX_JOB_LIFETIME
            }
            Ok(d) if d > ceiling => {
                self.err(
                    &["max_job_lifetime"],
                    format!(
                        "max_job_lifetime must be at most {}",
                        crate::duration::format_duration(ceiling)
                    ),
                );
                defaults::MAX_JOB_LIFETIME
            }
            Ok(d) => d,
            Err(e) => {
                self.err(&["max_job_lifetime"], e);
                defaults::MAX_JOB_LIFETIME
            }
        }
    }

    fn selector(&mut self, path: &[&str], s: &str) -> Option<Selector> {
        match Selector::parse(s) {
            Ok(sel) => Some(sel),
            Err(e) => {
                self.err(path, e.to_string());
                None
            }
        }
    }

    fn command(&mut self, name: &str, c: RawCommand) -> CommandDef {
        let base = ["commands", name];
        let at = |k: &'static str| -> Vec<&str> { vec!["commands", name, k] };
        if name == "*" || !valid_name(name) {
            self.err(
                &base,
                format!(
                    "invalid command name \"{name}\": use 1-64 letters, digits, `_`, `-` or `.`"
                ),
            );
        }

        // argv and placeholders
        let mut used: BTreeSet<String> = BTreeSet::new();
        match c.argv.first() {
            None => self.err(
                &base,
                "argv is empty; give the absolute path of the program and its arguments",
            ),
            Some(first) => {
                if whole_placeholder(first).is_some() || !embedded_placeholders(first).is_empty() {
                    self.err(
                        &at("argv"),
                        "argv[0] must be a fixed absolute path, not a placeholder",
                    );
                } else if !first.starts_with('/') {
                    self.err(
                        &at("argv"),
                        format!("argv[0] \"{first}\" must be an absolute path"),
                    );
                }
            }
        }
        for elem in c.argv.iter().skip(1) {
            if let Some(p) = whole_placeholder(elem) {
                used.insert(p.to_string());
                if !c.args.contains_key(p) {
                    self.err(
                        &at("argv"),
                        format!("placeholder `{{{p}}}` has no `args.{p}` entry"),
                    );
                }
                continue;
            }
            for p in embedded_placeholders(elem) {
                used.insert(p.to_string());
                self.err(
                    &at("argv"),
                    format!(
                        "placeholder `{{{p}}}` in \"{elem}\" must be a whole argv element; put it in an element of its own"
                    ),
                );
            }
        }

        let mut args = BTreeMap::new();
        for (arg, raw) in c.args {
            let path = ["commands", name, "args", arg.as_str()];
            if !valid_arg_name(&arg) {
                self.err(
                    &path,
                    format!("invalid argument name \"{arg}\": use letters, digits, `_` or `-`"),
                );
            }
            if !used.contains(&arg) {
                self.err(&path, format!("argument `{arg}` is never used in argv"));
            }
            if let Some(spec) = self.arg_spec(&path, &arg, raw) {
                args.insert(arg, spec);
            }
        }

        let timeout = match c.timeout {
            None => defaults::TIMEOUT,
            Some(v) => {
                let parsed = match &v {
                    toml::Value::String(s) => parse_duration(s),
                    toml::Value::Integer(i) if *i >= 0 => Ok(Duration::from_secs(i.unsigned_abs())),
                    other => Err(format!(
                        "expected a duration such as \"10s\", got {}",
                        other.type_str()
                    )),
                };
                match parsed {
                    Ok(d) if d.is_zero() => {
                        self.err(&at("timeout"), "timeout must be greater than zero");
                        defaults::TIMEOUT
                    }
                    Ok(d) if d > defaults::MAX_TIMEOUT => {
                        self.err(&at("timeout"), "timeout must be at most 24h");
                        defaults::TIMEOUT
                    }
                    Ok(d) => d,
                    Err(e) => {
                        self.err(&at("timeout"), e);
                        defaults::TIMEOUT
                    }
                }
            }
        };

        let targets = c
            .targets
            .as_deref()
            .and_then(|t| self.selector(&at("targets"), t));

        let requires_approvals = match c.requires_approvals {
            None => defaults::REQUIRES_APPROVALS,
            Some(n) if (0..=i64::from(defaults::MAX_APPROVALS)).contains(&n) => {
                u32::try_from(n).unwrap_or(defaults::MAX_APPROVALS)
            }
            Some(n) => {
                self.err(
                    &at("requires_approvals"),
                    format!(
                        "requires_approvals must be between 0 and {}, got {n}",
                        defaults::MAX_APPROVALS
                    ),
                );
                defaults::REQUIRES_APPROVALS
            }
        };

        if let Some(u) = &c.run_as
            && (u.is_empty() || u.chars().any(|ch| ch.is_whitespace() || ch.is_control()))
        {
            self.err(&at("run_as"), format!("invalid user name \"{u}\""));
        }
        for (k, val) in &c.env {
            if !valid_env_name(k) {
                self.err(
                    &at("env"),
                    format!("invalid environment variable name \"{k}\""),
                );
            }
            if val.contains('\0') {
                self.err(&at("env"), format!("value of {k} contains a NUL byte"));
            }
        }

        CommandDef {
            name: name.to_string(),
            description: c.description,
            argv: c.argv,
            args,
            run_as: c.run_as,
            timeout,
            targets,
            requires_approvals,
            env: c.env,
        }
    }

    fn arg_spec(&mut self, path: &[&str], name: &str, raw: RawArg) -> Option<ArgSpec> {
        let allowed: &[&str] = match raw.kind.as_str() {
            "text" => &["max_len"],
            "int" => &["min", "max"],
            "enum" => &["values"],
            "pattern" => &["pattern"],
            "path" => &["prefixes", "create"],
            "hostname" | "duration" => &[],
            other => {
                self.err(
                    path,
                    format!(
                        "unknown kind \"{other}\"; expected one of text, int, enum, pattern, hostname, path, duration"
                    ),
                );
                return None;
            }
        };
        for (field, present) in [
            ("max_len", raw.max_len.is_some()),
            ("min", raw.min.is_some()),
            ("max", raw.max.is_some()),
            ("values", raw.values.is_some()),
            ("pattern", raw.pattern.is_some()),
            ("prefixes", raw.prefixes.is_some()),
            ("create", raw.create.is_some()),
        ] {
            if present && !allowed.contains(&field) {
                self.err(
                    path,
                    format!("`{field}` does not apply to kind \"{}\"", raw.kind),
                );
            }
        }
        let kind = match raw.kind.as_str() {
            "text" => match raw.max_len {
                None => ArgKind::Text {
                    max_len: defaults::TEXT_MAX_LEN,
                },
                Some(n) if n >= 1 => ArgKind::Text {
                    max_len: usize::try_from(n).unwrap_or(usize::MAX),
                },
                Some(n) => {
                    self.err(path, format!("max_len must be at least 1, got {n}"));
                    return None;
                }
            },
            "int" => {
                let min = raw.min.unwrap_or(defaults::INT_MIN);
                let max = raw.max.unwrap_or(defaults::INT_MAX);
                if min > max {
                    self.err(path, format!("min {min} is greater than max {max}"));
                    return None;
                }
                ArgKind::Int { min, max }
            }
            "enum" => {
                let values = raw.values.unwrap_or_default();
                if values.is_empty() {
                    self.err(path, "enum needs at least one entry in `values`");
                    return None;
                }
                ArgKind::Enum { values }
            }
            "pattern" => {
                let Some(source) = raw.pattern else {
                    self.err(path, "kind \"pattern\" needs `pattern`");
                    return None;
                };
                match crate::argv::compile_pattern(&source) {
                    Ok(regex) => ArgKind::Pattern { regex, source },
                    Err(e) => {
                        let reason = e
                            .to_string()
                            .lines()
                            .last()
                            .unwrap_or_default()
                            .trim()
                            .to_string();
                        self.err(path, format!("invalid regex \"{source}\": {reason}"));
                        return None;
                    }
                }
            }
            "hostname" => ArgKind::Hostname,
            "path" => {
                let prefixes = raw.prefixes.unwrap_or_default();
                for p in &prefixes {
                    if !crate::argv::normalized_absolute_path(p) {
                        self.err(
                            path,
                            format!("prefix \"{p}\" must be an absolute normalized path"),
                        );
                    }
                }
                let create = raw.create.unwrap_or(defaults::CREATE);
                if create && prefixes.is_empty() {
                    self.err(
                        path,
                        "`create` needs `prefixes`: a file is created only beneath one",
                    );
                }
                ArgKind::Path { prefixes, create }
            }
            _ => ArgKind::Duration,
        };
        let default = match raw.default {
            None => None,
            Some(toml::Value::String(s)) => Some(s),
            Some(toml::Value::Integer(i)) => Some(i.to_string()),
            Some(other) => {
                self.err(
                    path,
                    format!(
                        "default must be a string or an integer, got {}",
                        other.type_str()
                    ),
                );
                None
            }
        };
        let spec = ArgSpec {
            kind,
            default,
            allow_dash: raw.allow_dash.unwrap_or(defaults::ALLOW_DASH),
            allow_format_chars: raw
                .allow_format_chars
                .unwrap_or(defaults::ALLOW_FORMAT_CHARS),
        };
        if spec.allow_format_chars
            && matches!(
                spec.kind,
                ArgKind::Int { .. } | ArgKind::Hostname | ArgKind::Duration
            )
        {
            self.err(
                path,
                format!(
                    "`allow_format_chars` does not apply to kind \"{}\" (its values are ASCII)",
                    spec.kind.name()
                ),
            );
        }
        if let Some(d) = &spec.default
            && let Err(e) = validate_arg(name, &spec, d)
        {
            self.err(path, format!("default \"{d}\" is invalid: {e}"));
        }
        Some(spec)
    }
}

// ---- best-effort line lookup ----

fn line_of_offset(text: &str, offset: usize) -> usize {
    text.as_bytes()[..offset.min(text.len())]
        .iter()
        .filter(|b| **b == b'\n')
        .count()
        + 1
}

/// Key paths of table headers and `key =` lines with their line numbers.
/// Arrays of tables get indexed segments (`signers[1]`).
struct LineIndex {
    entries: Vec<(Vec<String>, usize)>,
}

impl LineIndex {
    fn new(text: &str) -> LineIndex {
        let mut entries = Vec::new();
        let mut current: Vec<String> = Vec::new();
        let mut array_counts: BTreeMap<Vec<String>, usize> = BTreeMap::new();
        for (i, line) in text.lines().enumerate() {
            let line_no = i + 1;
            let t = line.trim_start();
            if let Some(rest) = t.strip_prefix("[[") {
                if let Some((mut segs, _)) = parse_dotted_key(rest) {
                    let n = array_counts.entry(segs.clone()).or_insert(0);
                    if let Some(last) = segs.last_mut() {
                        *last = format!("{last}[{n}]");
                    }
                    *n += 1;
                    current = segs.clone();
                    entries.push((segs, line_no));
                }
            } else if let Some(rest) = t.strip_prefix('[') {
                if let Some((segs, _)) = parse_dotted_key(rest) {
                    current = segs.clone();
                    entries.push((segs, line_no));
                }
            } else if let Some((segs, rest)) = parse_dotted_key(t)
                && rest.trim_start().starts_with('=')
            {
                let mut path = current.clone();
                path.extend(segs);
                entries.push((path, line_no));
            }
        }
        LineIndex { entries }
    }

    /// The line of the longest recorded prefix of `path`.
    fn find(&self, path: &[&str]) -> Option<usize> {
        let mut best: Option<(usize, usize)> = None;
        for (segs, line) in &self.entries {
            if segs.len() <= path.len()
                && segs.iter().zip(path).all(|(a, b)| a == b)
                && best.is_none_or(|(len, _)| segs.len() > len)
            {
                best = Some((segs.len(), *line));
            }
        }
        best.map(|(_, line)| line)
    }
}

/// Parses a TOML dotted key (bare or quoted segments) at the start of `s`;
/// returns the segments and the rest of the line.
fn parse_dotted_key(s: &str) -> Option<(Vec<String>, &str)> {
    let mut segs = Vec::new();
    let mut rest = s.trim_start();
    loop {
        let (seg, after) = if let Some(r) = rest.strip_prefix('"') {
            let end = r.find('"')?;
            (r[..end].to_string(), &r[end + 1..])
        } else if let Some(r) = rest.strip_prefix('\'') {
            let end = r.find('\'')?;
            (r[..end].to_string(), &r[end + 1..])
        } else {
            let end = rest
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == '-'))
                .unwrap_or(rest.len());
            if end == 0 {
                return None;
            }
            (rest[..end].to_string(), &rest[end..])
        };
        segs.push(seg);
        let after = after.trim_start();
        match after.strip_prefix('.') {
            Some(r) => rest = r.trim_start(),
            None => return Some((segs, after)),
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::crypto::test_keys::key;

    /// The example policy (as in deploy/policy.toml) with a real signer key.
    pub(crate) fn design_example() -> String {
        r#"version = 7                       # strictly increasing
expires = "2027-03-01T00:00:00Z"  # optional; agents refuse jobs after it

[[signers]]                       # who may sign jobs
id = "gateway-main"
public_key = "PUBKEY"
may_sign = ["*"]                  # command names, or "*"

[commands.uptime]
description = "Load average and uptime"
argv = ["/usr/bin/uptime"]
timeout = "10s"

[commands.restart]
description = "Restart an app service"
argv = ["/usr/bin/systemctl", "restart", "{unit}"]
args.unit = { kind = "enum", values = ["nginx.service", "app.service"] }
run_as = "root"
timeout = "2m"
targets = "role in (web,api)"     # where this command may ever run
requires_approvals = 1            # distinct approvers, never the requester

[commands.logs]
argv = ["/usr/bin/journalctl", "-u", "{unit}", "-n", "{lines}", "--no-pager"]
args.unit = { kind = "pattern", pattern = "^[a-z0-9@._-]+\\.service$" }
args.lines = { kind = "int", min = 1, max = 500, default = 50 }

[roles.oncall]
commands = ["uptime", "restart", "logs"]
targets = "env=prod"              # optional narrowing
channels = ["slack:T0001:C0ONCALL", "irc:libera:#ops"]   # optional

[roles.viewer]
commands = ["uptime", "logs"]

[[bindings]]
subjects = ["slack:T0001:U024BE7LH", "irc:libera:alice!*@ops.example.com"]
roles = ["oncall"]

[[bindings]]
subjects = ["slack:T0001:*"]      # everyone in the workspace
roles = ["viewer"]

[[bindings]]
subjects = ["slack:T0001:U0LEAD*"]  # the leads: on call, and approve restarts
roles = ["oncall"]

[approvers]                       # narrows who, among those whose roles list it
restart = ["slack:T0001:U0LEAD*"] # (default: anyone whose roles list the command)
"#
        .replace("PUBKEY", &key(1).public_key().to_string())
    }

    pub(crate) fn example_policy() -> Policy {
        Policy::parse(&design_example()).unwrap_or_else(|e| panic!("{e}"))
    }

    #[test]
    fn design_example_parses() {
        let p = example_policy();
        assert_eq!(p.version, 7);
        assert_eq!(p.expires, Some(1_803_859_200));
        assert_eq!(
            p.signer("gateway-main").map(|s| s.public_key),
            Some(key(1).public_key())
        );
        assert!(
            p.signer("gateway-main")
                .is_some_and(|s| s.may_sign("anything"))
        );
        let restart = p.command("restart").unwrap_or_else(|| panic!("restart"));
        assert_eq!(restart.timeout, Duration::from_secs(120));
        assert_eq!(restart.requires_approvals, 1);
        assert_eq!(restart.run_as.as_deref(), Some("root"));
        assert_eq!(
            restart.targets.as_ref().map(|t| t.to_string()).as_deref(),
            Some("role in (api,web)")
        );
        let logs = p.command("logs").unwrap_or_else(|| panic!("logs"));
        assert_eq!(logs.timeout, defaults::TIMEOUT);
        assert_eq!(logs.args["lines"].default.as_deref(), Some("50"));
        assert_eq!(logs.args["lines"].kind, ArgKind::Int { min: 1, max: 500 });
        assert_eq!(p.roles["oncall"].channels.len(), 2);
        assert_eq!(p.bindings.len(), 3);
        assert_eq!(p.approvers["restart"], ["slack:T0001:U0LEAD*"]);
        assert!(p.command("nope").is_none());
    }

    #[test]
    fn native_toml_datetime_and_raw_key() {
        let raw = base64::Engine::encode(
            &base64::engine::general_purpose::STANDARD,
            key(1).public_key().as_bytes(),
        );
        let text = format!(
            "version = 1\nexpires = 2027-03-01T00:00:00Z\n[[signers]]\nid = \"a\"\npublic_key = \"{raw}\"\nmay_sign = []\n"
        );
        let p = Policy::parse(&text).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(p.expires, Some(1_803_859_200));
        assert!(p.signers[0].may_sign.is_empty() && !p.signers[0].may_sign("x"));
    }

    const BASE: &str = r#"version = 1

[commands.ok]
argv = ["/bin/true"]
"#;

    /// Parses `BASE` + `extra` and expects an error at `line` with `key`
    /// whose message contains `part`.
    fn check(extra: &str, line: Option<usize>, key: &str, part: &str) {
        let text = format!("{BASE}{extra}");
        let errors = match Policy::parse(&text) {
            Ok(_) => panic!("expected an error for:\n{text}"),
            Err(e) => e,
        };
        assert!(
            errors
                .0
                .iter()
                .any(|e| e.line == line && e.key == key && e.message.contains(part)),
            "expected line {line:?} key {key:?} message containing {part:?}, got:\n{errors}\nfor:\n{text}"
        );
    }

    #[test]
    fn validation_errors() {
        // BASE has 4 lines; `extra` starts at line 5.
        check(
            "[commands.r]\nargv = [\"/bin/x\", \"{unit}\"]\n",
            Some(6),
            "commands.r.argv",
            "placeholder `{unit}` has no `args.unit` entry",
        );
        check(
            "[commands.r]\nargv = [\"/bin/x\"]\nargs.unit = { kind = \"text\" }\n",
            Some(7),
            "commands.r.args.unit",
            "argument `unit` is never used in argv",
        );
        check(
            "[commands.r]\nargv = [\"/bin/x\", \"--unit={unit}\"]\nargs.unit = { kind = \"text\" }\n",
            Some(6),
            "commands.r.argv",
            "must be a whole argv element",
        );
        check(
            "[commands.r]\nargv = []\n",
            Some(5),
            "commands.r",
            "argv is empty",
        );
        check(
            "[commands.r]\ndescription = \"x\"\n",
            Some(5),
            "commands.r",
            "argv is empty",
        );
        check(
            "[commands.r]\nargv = [\"systemctl\"]\n",
            Some(6),
            "commands.r.argv",
            "must be an absolute path",
        );
        check(
            "[commands.r]\nargv = [\"{prog}\"]\nargs.prog = { kind = \"text\" }\n",
            Some(6),
            "commands.r.argv",
            "argv[0] must be a fixed absolute path",
        );
        check(
            "[commands.r]\nargv = [\"/bin/x\", \"{n}\"]\nargs.n = { kind = \"int\", min = 1, max = 5, default = 9 }\n",
            Some(7),
            "commands.r.args.n",
            "default \"9\" is invalid",
        );
        check(
            "[commands.r]\nargv = [\"/bin/x\", \"{n}\"]\nargs.n = { kind = \"text\", default = \"-x\" }\n",
            Some(7),
            "commands.r.args.n",
            "must not start with `-`",
        );
        check(
            "[commands.r]\nargv = [\"/bin/x\", \"{n}\"]\nargs.n = { kind = \"enum\", values = [] }\n",
            Some(7),
            "commands.r.args.n",
            "enum needs at least one",
        );
        check(
            "[commands.r]\nargv = [\"/bin/x\", \"{n}\"]\nargs.n = { kind = \"enum\" }\n",
            Some(7),
            "commands.r.args.n",
            "enum needs at least one",
        );
        check(
            "[commands.r]\nargv = [\"/bin/x\", \"{n}\"]\nargs.n = { kind = \"int\", min = 5, max = 1 }\n",
            Some(7),
            "commands.r.args.n",
            "min 5 is greater than max 1",
        );
        check(
            "[commands.r]\nargv = [\"/bin/x\", \"{n}\"]\nargs.n = { kind = \"pattern\", pattern = \"(\" }\n",
            Some(7),
            "commands.r.args.n",
            "invalid regex \"(\"",
        );
        check(
            "[commands.r]\nargv = [\"/bin/x\", \"{n}\"]\nargs.n = { kind = \"foo\" }\n",
            Some(7),
            "commands.r.args.n",
            "unknown kind \"foo\"",
        );
        check(
            "[commands.r]\nargv = [\"/bin/x\", \"{n}\"]\nargs.n = { kind = \"text\", min = 1 }\n",
            Some(7),
            "commands.r.args.n",
            "`min` does not apply to kind \"text\"",
        );
        check(
            "[commands.r]\nargv = [\"/bin/x\", \"{n}\"]\nargs.n = { kind = \"path\", prefixes = [\"var/log\"] }\n",
            Some(7),
            "commands.r.args.n",
            "prefix \"var/log\"",
        );
        check(
            "[commands.r]\nargv = [\"/bin/x\"]\ntimeout = \"25h\"\n",
            Some(7),
            "commands.r.timeout",
            "at most 24h",
        );
        check(
            "[commands.r]\nargv = [\"/bin/x\"]\ntimeout = \"soon\"\n",
            Some(7),
            "commands.r.timeout",
            "invalid duration \"soon\"",
        );
        check(
            "[commands.r]\nargv = [\"/bin/x\"]\ntargets = \"role=\"\nrequires_approvals = 11\n",
            Some(8),
            "commands.r.requires_approvals",
            "between 0 and 10",
        );
        check(
            "[commands.r]\nargv = [\"/bin/x\"]\ntargets = \"role in (a\"\n",
            Some(7),
            "commands.r.targets",
            "unbalanced",
        );
        check(
            "[commands.\"bad name\"]\nargv = [\"/bin/x\"]\n",
            Some(5),
            "commands.bad name",
            "invalid command name",
        );
        check(
            "[roles.r]\ncommands = [\"ok\", \"nope\"]\n",
            Some(6),
            "roles.r.commands",
            "unknown command \"nope\"",
        );
        check(
            "[roles.r]\ncommands = [\"*\"]\ntargets = \"\"\n",
            Some(7),
            "roles.r.targets",
            "empty selector",
        );
        check(
            "[roles.r]\ncommands = [\"*\"]\nchannels = [\"\"]\n",
            Some(7),
            "roles.r.channels",
            "must not be empty",
        );
        check(
            "[roles.r]\ncommands = []\nmay = [\"jobs.read_all\", \"root\"]\n",
            Some(7),
            "roles.r.may",
            "unknown permission \"root\"; known: *, jobs.read_all,",
        );
        check(
            "[roles.r]\ncommands = []\nmay = [\"plugin:Deploy.run\"]\n",
            Some(7),
            "roles.r.may",
            "plugin name \"Deploy\" must be 1-64 of a-z",
        );
        check(
            "[roles.r]\ncommands = []\nmay = [\"plugin:deploy\"]\n",
            Some(7),
            "roles.r.may",
            "must be plugin:NAME.COMMAND or plugin:NAME.*",
        );
        check(
            "[roles.r]\ncommands = []\nmay = [\"plugin:deploy.a.b\"]\n",
            Some(7),
            "roles.r.may",
            "command \"a.b\" must be * or 1-64",
        );
        check(
            "[roles.r]\ncommands = []\nmay = [\"jobs.read_all\"]\ntoken_labels = \"role=web\"\n",
            Some(8),
            "roles.r.token_labels",
            "token_labels needs \"tokens.create\" in may",
        );
        check(
            "[roles.r]\ncommands = []\nmay = [\"tokens.create\"]\ntoken_labels = \"role=(\"\n",
            Some(8),
            "roles.r.token_labels",
            "",
        );
        check(
            "[roles.r]\ncommands = [\"ok\"]\n[[bindings]]\nsubjects = [\"slack:T1:*\"]\nroles = [\"r\"]\n[[bindings]]\nsubjects = [\"slack:T1:*\"]\nroles = [\"nope\"]\n",
            Some(12),
            "bindings[1].roles",
            "unknown role \"nope\"",
        );
        check(
            "[roles.r]\ncommands = [\"ok\"]\n[[bindings]]\nsubjects = [\"U024BE7LH\"]\nroles = [\"r\"]\n",
            Some(8),
            "bindings[0].subjects",
            "must start with a platform name",
        );
        check(
            "[roles.r]\ncommands = [\"ok\"]\n[[bindings]]\nsubjects = [\"Slack:x\"]\nroles = [\"r\"]\n",
            Some(8),
            "bindings[0].subjects",
            "must start with a platform name",
        );
        check(
            "[approvers]\nnope = [\"slack:T1:*\"]\n",
            Some(6),
            "approvers.nope",
            "unknown command \"nope\"",
        );
        check(
            "[approvers]\nok = [\"*\"]\n",
            Some(6),
            "approvers.ok",
            "approver pattern \"*\"",
        );
        let pk = key(1).public_key().to_string();
        check(
            &format!(
                "[[signers]]\nid = \"a\"\npublic_key = \"{pk}\"\nmay_sign = [\"*\"]\n[[signers]]\nid = \"a\"\npublic_key = \"{pk}\"\n"
            ),
            Some(10),
            "signers[1].id",
            "duplicate signer id \"a\"",
        );
        check(
            "[[signers]]\nid = \"a\"\npublic_key = \"ed25519:AAAA\"\n",
            Some(7),
            "signers[0].public_key",
            "public key \"ed25519:AAAA\"",
        );
        check(
            &format!("[[signers]]\nid = \"a\"\npublic_key = \"{pk}\"\nmay_sign = [\"nope\"]\n"),
            Some(8),
            "signers[0].may_sign",
            "unknown command \"nope\"",
        );
    }

    #[test]
    fn argument_options_of_path_and_format_characters() {
        let cmd =
            |arg: &str| format!("[commands.r]\nargv = [\"/bin/x\", \"{{a}}\"]\nargs.a = {arg}\n");
        check(
            &cmd(r#"{ kind = "path", create = true }"#),
            Some(7),
            "commands.r.args.a",
            "`create` needs `prefixes`",
        );
        check(
            &cmd(r#"{ kind = "text", create = true }"#),
            Some(7),
            "commands.r.args.a",
            "`create` does not apply to kind \"text\"",
        );
        for kind in ["int", "hostname", "duration"] {
            check(
                &cmd(&format!(
                    "{{ kind = \"{kind}\", allow_format_chars = true }}"
                )),
                Some(7),
                "commands.r.args.a",
                "`allow_format_chars` does not apply",
            );
        }
        check(
            &cmd(r#"{ kind = "text", default = "a\u202eb" }"#),
            Some(7),
            "commands.r.args.a",
            "U+202E",
        );
        let text = format!(
            "{BASE}{}",
            cmd(r#"{ kind = "path", prefixes = ["/var/log"], create = true }"#)
        );
        let p = Policy::parse(&text).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            p.commands["r"].args["a"].kind,
            ArgKind::Path {
                prefixes: vec!["/var/log".into()],
                create: true
            }
        );
        let text = format!(
            "{BASE}{}",
            cmd(r#"{ kind = "text", allow_format_chars = true }"#)
        );
        let p = Policy::parse(&text).unwrap_or_else(|e| panic!("{e}"));
        assert!(p.commands["r"].args["a"].allow_format_chars);
    }

    #[test]
    fn max_job_lifetime_setting() {
        let parse = |extra: &str| Policy::parse(&format!("version = 1\n{extra}"));
        assert_eq!(
            parse("").map(|p| p.max_job_lifetime),
            Ok(defaults::MAX_JOB_LIFETIME)
        );
        assert_eq!(
            parse("max_job_lifetime = \"2h\"").map(|p| p.max_job_lifetime),
            Ok(Duration::from_secs(7200))
        );
        assert_eq!(
            parse("max_job_lifetime = \"30d\"").map(|p| p.max_job_lifetime),
            Ok(defaults::MAX_JOB_LIFETIME_CEILING)
        );
        for (value, part) in [
            ("\"31d\"", "must be at most 30d"),
            ("\"0s\"", "must be at least 1s"),
            ("\"10 years\"", "invalid duration"),
            ("86400", "expected a duration such as \"24h\", got integer"),
        ] {
            let text = format!("max_job_lifetime = {value}");
            let err = parse(&text).expect_err(&text).to_string();
            assert!(
                err.contains("line 2: max_job_lifetime: ") && err.contains(part),
                "{text}: {err}"
            );
        }
    }

    #[test]
    fn version_errors() {
        for (text, line, part) in [
            (
                "[commands.ok]\nargv = [\"/bin/true\"]\n",
                None,
                "`version` is required",
            ),
            ("version = 0\n", Some(1), "version must be >= 1, got 0"),
            ("version = -3\n", Some(1), "version must be >= 1"),
            (
                "version = 1\nexpires = \"tomorrow\"\n",
                Some(2),
                "not an RFC 3339 date-time",
            ),
            (
                "version = 1\nexpires = 2027-03-01T00:00:00\n",
                Some(2),
                "not an RFC 3339 date-time",
            ),
            (
                "version = 1\nexpires = 5\n",
                Some(2),
                "expected an RFC 3339 date-time string",
            ),
        ] {
            let e = Policy::parse(text)
                .err()
                .unwrap_or_else(|| panic!("{text}"));
            assert_eq!(e.0[0].line, line, "{e}");
            assert!(e.0[0].message.contains(part), "{e}");
        }
    }

    #[test]
    fn syntax_and_unknown_fields() {
        for (text, line, part) in [
            (
                "version = 1\n[commands.x]\nargv = [\"/bin/x\"\n",
                Some(3),
                "",
            ),
            (
                "version = 1\n\n[commands.x]\nargv = [\"/bin/x\"]\nrunas = \"root\"\n",
                Some(5),
                "unknown field `runas`",
            ),
            ("version = 1\nbogus = 1\n", Some(2), "unknown field `bogus`"),
            (
                "version = 1\n[commands.x]\nargv = [\"/bin/x\", \"{a}\"]\nargs.a = { kind = \"text\", maxlen = 3 }\n",
                Some(4),
                "unknown field `maxlen`",
            ),
        ] {
            let e = Policy::parse(text)
                .err()
                .unwrap_or_else(|| panic!("{text}"));
            assert_eq!(e.0.len(), 1, "{e}");
            assert_eq!(e.0[0].line, line, "{e}");
            assert!(e.0[0].message.contains(part), "{e}");
        }
    }

    #[test]
    fn every_error_is_reported_at_once_with_display() {
        let text = "version = 0\n[commands.a]\nargv = [\"a\"]\n[roles.r]\ncommands = [\"b\"]\n";
        let e = Policy::parse(text)
            .err()
            .unwrap_or_else(|| panic!("should fail"));
        assert_eq!(
            e.to_string(),
            "line 1: version: version must be >= 1, got 0\n\
             line 3: commands.a.argv: argv[0] \"a\" must be an absolute path\n\
             line 5: roles.r.commands: unknown command \"b\""
        );
        let unknown_line = PolicyError {
            line: None,
            key: "version".into(),
            message: "m".into(),
        };
        assert_eq!(unknown_line.to_string(), "version: m");
    }

    #[test]
    fn line_index_handles_dotted_and_quoted_keys() {
        let text = "version = 1\n[commands]\nx.argv = [\"a\"]\n[commands.\"y.z\"]\nargv = []\n";
        let idx = LineIndex::new(text);
        assert_eq!(idx.find(&["commands", "x", "argv"]), Some(3));
        assert_eq!(idx.find(&["commands", "y.z"]), Some(4));
        assert_eq!(idx.find(&["commands", "y.z", "args", "q"]), Some(4));
        assert_eq!(idx.find(&["nothing"]), None);
    }
}
