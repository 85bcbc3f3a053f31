//! The chat-command interface: how an integration (or an out-of-process
//! plugin) adds verbs to the chat grammar without touching the router.
//!
//! A [`Commands`] implementation declares its verbs ([`CommandSpec`]) and
//! answers one [`Call`] at a time. The router does everything around the
//! call, the same way for every registered command:
//!
//! - a verb the core grammar knows (`run`, `help`, `job`, …) is never looked
//!   up here, and a registered verb may not shadow one ([`CommandTable::add`]
//!   refuses it, as it refuses two integrations claiming the same verb);
//! - the [`Guard`] is checked against the verified policy before the call;
//!   a refusal is answered and audited as `chat_denied`, like every other
//!   refusal;
//! - every admitted call is audited as `chat_command` (who, what, where and
//!   the outcome);
//! - `help` lists a registered verb only to those its guard admits, and
//!   `help VERB` shows its [`CommandSpec::help`];
//! - the [`Reply`] is rendered like any other reply: adapters escape every
//!   piece of it, so whatever an integration puts there stays inert text.
//!
//! An implementation never signs anything and never sees a key: to act on
//! hosts it asks [`CallContext::run_as_caller`], which submits the job as the
//! caller through exactly the path chat `run` takes (policy, approvals,
//! audit, live output in the channel).

use std::collections::BTreeMap;
use std::sync::Arc;

use fleetcmd_core::grammar::RunRequest;
use fleetcmd_core::ids::Identity;
use fleetcmd_core::policy::{Permission, PluginGrant, Policy};
use fleetcmd_core::rbac::{in_channel, may_action, roles_of};
use futures_util::future::BoxFuture;

use crate::adapters::{Incoming, Reply};

/// One verb an integration adds to the chat grammar.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CommandSpec {
    /// The first word of the command (`query`, `oncall`, `deploy`);
    /// lowercase ASCII letters, digits, `-` and `_`.
    pub verb: String,
    /// `query <promql>`: shown in `help` and in usage errors.
    pub usage: String,
    /// One line for the `help` list.
    pub summary: String,
    /// What `help VERB` shows beneath the usage (may be empty).
    pub help: String,
    /// What in the signed policy grants it.
    pub guard: Guard,
}

/// What in the signed policy grants a registered command.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Guard {
    /// Anyone with a role usable in the channel (the rule for the reads:
    /// `query`, `oncall`, `jobs`, …).
    AnyRoleHere,
    /// A role usable in the channel whose `may` lists this action name
    /// (e.g. `audit.read_all`, or a plugin's `plugin:deploy.status`), by
    /// the policy's one rule ([`may_action`]: `*` grants the built-in
    /// permissions, `plugin:NAME.*` every command of plugin NAME).
    Action(String),
}

impl Guard {
    /// Whether `who` may call a command so guarded in `channel`, by the
    /// verified `policy`.
    pub fn admits(&self, policy: &Policy, who: &Identity, channel: &str) -> bool {
        match self {
            Guard::AnyRoleHere => roles_of(policy, who)
                .into_iter()
                .any(|r| in_channel(r, channel)),
            Guard::Action(action) => may_action(policy, who, channel, action),
        }
    }

    /// What a caller the guard refused is told, and the reason audited as
    /// `chat_denied`. A refused action is answered exactly as an unknown
    /// verb: the verbs and plugin names a role may not use stay hidden from
    /// those without it, as in `help` (the audit record keeps the detail).
    pub fn refusal(&self, verb: &str, channel: &str) -> (String, String) {
        match self {
            Guard::AnyRoleHere => (
                "you have no roles in this channel".to_string(),
                format!("no role in {channel}"),
            ),
            Guard::Action(a) => (
                fleetcmd_core::grammar::GrammarError::UnknownCommand(verb.to_string()).to_string(),
                format!("`{verb}` needs {a} in {channel}; answered as an unknown command"),
            ),
        }
    }

    /// Whether a policy can grant this guard at all: an action is a
    /// built-in permission or one plugin command (`plugin:NAME.VERB`).
    fn grantable(&self) -> bool {
        match self {
            Guard::AnyRoleHere => true,
            Guard::Action(a) => {
                Permission::parse(a).is_some()
                    || PluginGrant::parse(a).is_ok_and(|g| g.command.is_some())
            }
        }
    }
}

/// One call of a registered command.
#[derive(Clone, Copy, Debug)]
pub struct Call<'a> {
    /// The verified message: identity, channel (and the platform, which is
    /// `msg.identity.scheme()`).
    pub msg: &'a Incoming,
    /// The verb as registered (lowercase).
    pub verb: &'a str,
    /// The text after the verb, trimmed; quotes are left as typed.
    pub args: &'a str,
}

/// How a job asked for through [`CallContext::run_as_caller`] ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RunOutcome {
    /// Signed and submitted as the caller; its result was posted in the
    /// channel as for `run`.
    Submitted { job_id: String },
    /// `--dry-run`: the plan was posted, nothing submitted.
    DryRun,
    /// Not submitted (refused by the policy, bad arguments, approval denied
    /// or expired, the controller refused it); the channel was told why.
    NotSubmitted { reason: String },
}

/// What a command may ask of the gateway while it handles a call.
pub trait CallContext: Send + Sync {
    /// Submits `run` as the caller, through exactly the path chat `run`
    /// takes: the caller's rights in this channel, approvals, audit, the
    /// live job message. Nothing is signed unless the caller could have
    /// typed the same `run` themselves.
    fn run_as_caller<'a>(&'a self, run: RunRequest) -> BoxFuture<'a, RunOutcome>;
    /// Records an event of this call in the audit trail as the caller, in
    /// this channel: `kind` is `chat_denied` (a refused request of the
    /// integration) or `chat_command` (a job it started: `job_id` set).
    fn audit<'a>(
        &'a self,
        kind: AuditKind,
        command: &'a str,
        job_id: &'a str,
        detail: String,
    ) -> BoxFuture<'a, ()>;
}

/// The audit records a registered command may add to its call's.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AuditKind {
    /// `chat_denied`: something it asked for on the caller's behalf was
    /// refused.
    Denied,
    /// `chat_command`: something it did for the caller (a job started).
    Command,
}

impl AuditKind {
    pub fn as_str(self) -> &'static str {
        match self {
            AuditKind::Denied => "chat_denied",
            AuditKind::Command => "chat_command",
        }
    }
}

/// A set of chat commands contributed by one integration or plugin.
pub trait Commands: Send + Sync {
    /// The verbs it answers; asked once, when it is registered.
    fn commands(&self) -> Vec<CommandSpec>;
    /// Answers one admitted call of one of its verbs.
    fn call<'a>(&'a self, call: Call<'a>, ctx: &'a dyn CallContext) -> BoxFuture<'a, Reply>;
    /// Whether `help` lists its verbs (those of an unconfigured integration
    /// are not: only what is configured is offered).
    fn listed(&self) -> bool {
        true
    }
}

/// The verbs of an integration whose section is missing or incomplete:
/// each call says what to configure (and nothing else happens).
#[derive(Clone, Debug)]
pub struct Unconfigured {
    pub specs: Vec<CommandSpec>,
    /// `oncall needs [pagerduty] api_token in gateway.toml`.
    pub message: String,
}

impl Commands for Unconfigured {
    fn commands(&self) -> Vec<CommandSpec> {
        self.specs.clone()
    }

    fn call<'a>(&'a self, call: Call<'a>, _: &'a dyn CallContext) -> BoxFuture<'a, Reply> {
        let reply = Reply::text(format!(
            "{}{}",
            self.message,
            crate::render::asked_by(call.msg.identity.as_str())
        ));
        Box::pin(async move { reply })
    }

    fn listed(&self) -> bool {
        false
    }
}

/// Why a set of commands could not be registered.
#[derive(thiserror::Error, Debug, Clone, PartialEq, Eq)]
pub enum CommandError {
    #[error("command `{0}`: a verb is lowercase ASCII letters, digits, `-` or `_`")]
    BadVerb(String),
    #[error("command `{0}` is a built-in verb of the chat grammar")]
    BuiltIn(String),
    #[error("command `{0}` is registered twice")]
    Duplicate(String),
    #[error(
        "command `{verb}`: no policy can grant `{action}` (a built-in permission or plugin:NAME.VERB)"
    )]
    BadGuard { verb: String, action: String },
}

/// A registered verb: its spec and who answers it.
#[derive(Clone)]
pub struct Registered {
    pub spec: CommandSpec,
    pub by: Arc<dyn Commands>,
}

/// Every registered verb, by name.
#[derive(Clone, Default)]
pub struct CommandTable {
    verbs: BTreeMap<String, Registered>,
}

impl std::fmt::Debug for CommandTable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list().entries(self.verbs.keys()).finish()
    }
}

impl CommandTable {
    /// Adds every verb of `commands`, or none of them when one is refused.
    pub fn add(&mut self, commands: Arc<dyn Commands>) -> Result<(), CommandError> {
        let specs = commands.commands();
        let mut seen = std::collections::BTreeSet::new();
        for s in &specs {
            let ok = !s.verb.is_empty()
                && s.verb.bytes().all(|b| {
                    b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_'
                });
            if !ok {
                return Err(CommandError::BadVerb(fleetcmd_core::terminal::excerpt(
                    &s.verb,
                )));
            }
            if fleetcmd_core::grammar::verb_help(&s.verb).is_some() {
                return Err(CommandError::BuiltIn(s.verb.clone()));
            }
            if self.verbs.contains_key(&s.verb) || !seen.insert(s.verb.clone()) {
                return Err(CommandError::Duplicate(s.verb.clone()));
            }
            if let Guard::Action(action) = &s.guard
                && !s.guard.grantable()
            {
                return Err(CommandError::BadGuard {
                    verb: s.verb.clone(),
                    action: fleetcmd_core::terminal::excerpt(action),
                });
            }
        }
        for spec in specs {
            self.verbs.insert(
                spec.verb.clone(),
                Registered {
                    spec,
                    by: commands.clone(),
                },
            );
        }
        Ok(())
    }

    /// The registered verb `verb` (any case).
    pub fn get(&self, verb: &str) -> Option<&Registered> {
        self.verbs.get(&verb.to_ascii_lowercase())
    }

    /// Every registered verb `help` offers, in name order (not those of
    /// an unconfigured integration: they only say what to configure).
    pub fn specs(&self) -> impl Iterator<Item = &CommandSpec> {
        self.verbs
            .values()
            .filter(|r| r.by.listed())
            .map(|r| &r.spec)
    }

    pub fn is_empty(&self) -> bool {
        self.verbs.is_empty()
    }
}

/// The verb and the rest of a command text (`query up == 0` →
/// `("query", "up == 0")`).
pub fn split_verb(text: &str) -> (&str, &str) {
    let t = text.trim();
    match t.split_once(char::is_whitespace) {
        Some((verb, rest)) => (verb, rest.trim()),
        None => (t, ""),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Fixed(Vec<&'static str>, Guard);

    impl Commands for Fixed {
        fn commands(&self) -> Vec<CommandSpec> {
            self.0
                .iter()
                .map(|v| CommandSpec {
                    verb: v.to_string(),
                    usage: v.to_string(),
                    summary: String::new(),
                    help: String::new(),
                    guard: self.1.clone(),
                })
                .collect()
        }
        fn call<'a>(&'a self, _: Call<'a>, _: &'a dyn CallContext) -> BoxFuture<'a, Reply> {
            Box::pin(async { Reply::text("x") })
        }
    }

    fn add(t: &mut CommandTable, verbs: Vec<&'static str>) -> Result<(), CommandError> {
        t.add(Arc::new(Fixed(verbs, Guard::AnyRoleHere)))
    }

    #[test]
    fn table_refuses_guards_no_policy_can_grant() {
        let mut t = CommandTable::default();
        let guarded = |action: &str| Arc::new(Fixed(vec!["v"], Guard::Action(action.into())));
        for bad in [
            "audit.read_everything",
            "plugin:deploy.*",
            "plugin:Deploy.x",
            "",
        ] {
            assert_eq!(
                t.add(guarded(bad)),
                Err(CommandError::BadGuard {
                    verb: "v".into(),
                    action: bad.into()
                }),
                "{bad}"
            );
        }
        assert_eq!(t.add(guarded("plugin:deploy.status")), Ok(()));
        let mut t = CommandTable::default();
        assert_eq!(t.add(guarded("audit.read_all")), Ok(()));
    }

    #[test]
    fn table_refuses_built_ins_duplicates_and_bad_verbs_whole() {
        let mut t = CommandTable::default();
        assert_eq!(add(&mut t, vec!["query", "oncall"]), Ok(()));
        assert_eq!(
            add(&mut t, vec!["deploy", "run"]),
            Err(CommandError::BuiltIn("run".into()))
        );
        assert_eq!(
            add(&mut t, vec!["deploy", "query"]),
            Err(CommandError::Duplicate("query".into()))
        );
        assert_eq!(
            add(&mut t, vec!["x", "x"]),
            Err(CommandError::Duplicate("x".into()))
        );
        assert_eq!(
            add(&mut t, vec!["Deploy"]),
            Err(CommandError::BadVerb("Deploy".into()))
        );
        assert_eq!(add(&mut t, vec![""]), Err(CommandError::BadVerb("".into())));
        // Nothing of a refused set was added.
        assert!(t.get("deploy").is_none() && t.get("x").is_none());
        assert_eq!(t.get("QUERY").map(|r| r.spec.verb.as_str()), Some("query"));
    }

    #[test]
    fn split_verb_keeps_the_rest_as_typed() {
        assert_eq!(
            split_verb("  query up{a=\"b\"}  == 0 "),
            ("query", "up{a=\"b\"}  == 0")
        );
        assert_eq!(split_verb("oncall"), ("oncall", ""));
    }
}
