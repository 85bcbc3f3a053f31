//! Who may run what, where (RBAC for chat and CLI users): roles come from
//! bindings whose subject patterns match the stable identity.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;

use crate::audit::Event;
use crate::ids::Identity;
use crate::policy::{CommandDef, Permission, Policy, Role};
use crate::selector::Selector;
use crate::terminal::excerpt;

/// The channel of a `cli:` identity: what `fleetcmd` puts in the jobs it
/// signs, and where the controller places an operator certificate's reads.
pub const CLI_CHANNEL: &str = "cli";

/// Why a request was denied. The message names what is missing without
/// revealing other users' rights.
#[derive(thiserror::Error, Debug, Clone, PartialEq, Eq)]
pub enum Denied {
    #[error("you have no roles")]
    NoRoles,
    #[error("unknown command `{}`", excerpt(.0))]
    UnknownCommand(String),
    #[error("{}", needs_message(command, needed, have))]
    NeedsRole {
        command: String,
        needed: Vec<String>,
        have: Vec<String>,
    },
    #[error("role {role} may only target `{targets}`")]
    TargetOutsideRole { role: String, targets: String },
    #[error("none of your roles grants `{0}`")]
    Lacks(Permission),
    #[error("your roles may create tokens only for labels matching {}; `{labels}` does not", allowed.join(" or "))]
    TokenLabels {
        labels: String,
        allowed: Vec<String>,
    },
    #[error("agent {name} is enrolled with labels `{current}`: a token naming it re-enrols that host and needs a role whose `token_labels` select its current labels; yours select only {}", allowed.join(" or "))]
    ReEnrol {
        name: String,
        current: String,
        allowed: Vec<String>,
    },
    #[error("silencing alerts on `{}` needs a role that may run a command on those hosts", excerpt(.0))]
    Silence(String),
    #[error("channel `{channel}` is not on {who}'s platform")]
    ForeignChannel { who: String, channel: String },
}

fn needs_message(command: &str, needed: &[String], have: &[String]) -> String {
    let mut s = String::new();
    let command = excerpt(command);
    if needed.is_empty() {
        let _ = write!(s, "no role may run `{command}` in this channel");
    } else {
        let _ = write!(
            s,
            "`{command}` needs one of roles [{}] in this channel",
            needed.join(", ")
        );
    }
    let _ = write!(s, "; you have [{}]", have.join(", "));
    s
}

fn lists(role: &Role, command: &str) -> bool {
    role.commands.iter().any(|c| c == "*" || c == command)
}

/// Whether `role` applies in `channel` (a role without channels applies
/// everywhere).
pub fn in_channel(role: &Role, channel: &str) -> bool {
    role.channels.is_empty() || role.channels.iter().any(|c| c == channel)
}

/// Roles bound to `who`, deduplicated, in name order.
pub fn roles_of<'p>(policy: &'p Policy, who: &Identity) -> Vec<&'p Role> {
    let names: BTreeSet<&str> = policy
        .bindings
        .iter()
        .filter(|b| b.subjects.iter().any(|p| who.matches_pattern(p)))
        .flat_map(|b| b.roles.iter().map(String::as_str))
        .collect();
    names
        .into_iter()
        .filter_map(|n| policy.roles.get(n))
        .collect()
}

/// Whether `who` may run `command` on `selector` from `channel`. A role
/// with `targets` only allows requests whose selector contains every
/// requirement of those targets (a structural check; `all` never does).
pub fn check_run(
    policy: &Policy,
    who: &Identity,
    channel: &str,
    command: &str,
    selector: &Selector,
) -> Result<(), Denied> {
    if !on_own_platform(who, channel) {
        return Err(Denied::ForeignChannel {
            who: who.as_str().to_string(),
            channel: channel.to_string(),
        });
    }
    let roles = roles_of(policy, who);
    if roles.is_empty() {
        return Err(Denied::NoRoles);
    }
    if policy.command(command).is_none() {
        return Err(Denied::UnknownCommand(command.to_string()));
    }
    let usable: Vec<&Role> = roles
        .iter()
        .copied()
        .filter(|r| lists(r, command) && in_channel(r, channel))
        .collect();
    if usable.is_empty() {
        return Err(Denied::NeedsRole {
            command: command.to_string(),
            needed: policy
                .roles
                .values()
                .filter(|r| lists(r, command) && in_channel(r, channel))
                .map(|r| r.name.clone())
                .collect(),
            // A role scoped to other channels is named with where it
            // applies, so "you have [ops]" does not read as usable here.
            have: roles
                .iter()
                .map(|r| {
                    if in_channel(r, channel) {
                        r.name.clone()
                    } else {
                        format!("{} (only in {})", r.name, r.channels.join(", "))
                    }
                })
                .collect(),
        });
    }
    let mut narrowest: Option<(&Role, &Selector)> = None;
    for role in usable {
        match &role.targets {
            None => return Ok(()),
            Some(t) if selector.implies(t) => return Ok(()),
            Some(t) => {
                narrowest.get_or_insert((role, t));
            }
        }
    }
    match narrowest {
        Some((role, t)) => Err(Denied::TargetOutsideRole {
            role: role.name.clone(),
            targets: t.to_string(),
        }),
        None => Ok(()),
    }
}

/// Commands `who` may run in `channel`, in name order (for `help`).
pub fn commands_for<'p>(policy: &'p Policy, who: &Identity, channel: &str) -> Vec<&'p CommandDef> {
    let roles: Vec<&Role> = roles_of(policy, who)
        .into_iter()
        .filter(|r| in_channel(r, channel))
        .collect();
    policy
        .commands
        .values()
        .filter(|c| roles.iter().any(|r| lists(r, &c.name)))
        .collect()
}

/// Whether `channel` is on `who`'s own platform: its scheme (the part
/// before the first `:`, or all of it) is `who`'s, and where `who` names a
/// place ([`Identity::place`]: a network, workspace or server, as in
/// `irc:NET:…`, `slack:TEAM:…`, `mattermost:SERVER:…`, `webhook:NAME:…`),
/// the channel names the same one. Platforms with global user ids
/// (`matrix:@alice:example.org`) have no place. An operator (`cli:NAME`)
/// acts from the channel `cli`, a chat user from a channel of their chat
/// (`irc:libera:#ops` or the private `irc:libera:alice` for
/// `irc:libera:alice!…`). The signer names both requester and channel, so
/// without this an operator's key could claim a chat channel and use that
/// channel's roles from the CLI, and a gateway could move its users into
/// another network's channels (found by outside tests); checked for jobs
/// and approvals alike.
pub fn on_own_platform(who: &Identity, channel: &str) -> bool {
    // Operators act from the one channel `cli`: a `cli:x` channel would let
    // an operator's key claim a role scoped to it (found by an outside test).
    if who.scheme() == CLI_CHANNEL {
        return channel == CLI_CHANNEL;
    }
    let scheme = channel.split_once(':').map_or(channel, |(s, _)| s);
    if scheme != who.scheme() {
        return false;
    }
    match who.place() {
        Some(place) => channel.starts_with(&format!("{scheme}:{place}:")),
        None => true,
    }
}

/// Whether `who` may approve jobs of `command` from `channel`: one of
/// `who`'s roles lists the command and applies in `channel`, and, when the
/// command has an `[approvers]` entry, `who` matches one of its patterns
/// (the entry narrows who among them approves; it grants nothing alone).
/// Approver rights are the rights of a role, with its channel scope: an
/// unrelated unscoped role (everyone's `viewer`) does not carry an approval
/// out of the approving role's channels, and a listed approver bound to no
/// role listing the command approves nothing (an outside test approved from
/// a private message both ways).
pub fn may_approve(policy: &Policy, who: &Identity, command: &str, channel: &str) -> bool {
    if !on_own_platform(who, channel) {
        return false;
    }
    let listed = policy
        .approvers
        .get(command)
        .is_none_or(|patterns| patterns.iter().any(|p| who.matches_pattern(p)));
    listed
        && roles_of(policy, who)
            .iter()
            .any(|r| lists(r, command) && in_channel(r, channel))
}

/// Whether `who` may see an approval request for `command` at all: one
/// of their roles lists it, in any channel (they are then told why they may
/// not approve, e.g. `[approvers]` or the channel). Others are told no
/// request is waiting, as for an id that names none, so `approve`/`deny`
/// reveal no one else's requests (found by an outside test).
pub fn may_see_approval(policy: &Policy, who: &Identity, command: &str) -> bool {
    roles_of(policy, who).iter().any(|r| lists(r, command))
}

/// Whether one of `who`'s roles that applies in `channel` grants `perm`.
pub fn may(policy: &Policy, who: &Identity, channel: &str, perm: Permission) -> bool {
    roles_of(policy, who)
        .iter()
        .any(|r| in_channel(r, channel) && r.may.contains(&perm))
}

/// Whether one of `who`'s roles that applies in `channel` grants the
/// action named `action` in its `may` list: a built-in permission
/// (`audit.read_all`, also through `*`) or a plugin action
/// (`plugin:NAME.COMMAND`, granted by `plugin:NAME.COMMAND` or
/// `plugin:NAME.*`; `*` does not include plugins). The one rule for every
/// chat command guarded by an action name, built-in or plugin. A channel of
/// another platform than `who`'s grants nothing. Agents never ask this:
/// such commands run in the gateway.
pub fn may_action(policy: &Policy, who: &Identity, channel: &str, action: &str) -> bool {
    let grants = |r: &Role| match Permission::parse(action) {
        Some(perm) => r.may.contains(&perm),
        None => r.plugins.iter().any(|g| g.allows(action)),
    };
    on_own_platform(who, channel)
        && roles_of(policy, who)
            .iter()
            .any(|r| in_channel(r, channel) && grants(r))
}

/// What a read or cancel decision needs to know about a job.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct JobFacts<'a> {
    pub requester: &'a str,
    pub command: &'a str,
    /// The job's target selector, as submitted.
    pub selector: &'a str,
}

/// Whether `who` may see a job and its output: they requested it, they
/// could run its command on its targets from `channel`, or a role grants
/// `jobs.read_all`. The one rule for chat (`job`, `jobs`, `output`) and for
/// operator certificates (`Jobs.Get`/`List`/`Watch`).
pub fn may_see_job(policy: &Policy, who: &Identity, channel: &str, job: JobFacts<'_>) -> bool {
    job.requester == who.as_str()
        || could_run(policy, who, channel, job)
        || may(policy, who, channel, Permission::ReadAllJobs)
}

/// Whether `who` may cancel a job: its requester, anyone who could run its
/// command on its targets from `channel`, or a role with `jobs.cancel_any`.
/// Reading every job (`jobs.read_all`) grants no cancel.
pub fn may_cancel_job(policy: &Policy, who: &Identity, channel: &str, job: JobFacts<'_>) -> bool {
    job.requester == who.as_str()
        || could_run(policy, who, channel, job)
        || may(policy, who, channel, Permission::CancelAnyJob)
}

fn could_run(policy: &Policy, who: &Identity, channel: &str, job: JobFacts<'_>) -> bool {
    Selector::parse(job.selector)
        .is_ok_and(|sel| check_run(policy, who, channel, job.command, &sel).is_ok())
}

/// Whether `who` may read an audit record: `audit.read_all`, or their own
/// action, or — for a record about a job — exactly when they may see that
/// job (`job` is `None` when it is not known, e.g. refused at submit or
/// removed by retention: then only the first two rules apply); a record
/// about no job is readable when it names a command one of their roles in
/// `channel` includes. So a search never shows what `job`/`output` hide.
pub fn may_read_record(
    policy: &Policy,
    who: &Identity,
    channel: &str,
    event: &Event,
    job: Option<JobFacts<'_>>,
) -> bool {
    if event.actor == who.as_str() || may(policy, who, channel, Permission::ReadAllAudit) {
        return true;
    }
    if !event.job_id.is_empty() {
        return job.is_some_and(|j| may_see_job(policy, who, channel, j));
    }
    !event.command.is_empty()
        && roles_of(policy, who)
            .iter()
            .any(|r| in_channel(r, channel) && lists(r, &event.command))
}

/// Whether `who` may create a join token for `name` (empty: the joining
/// host picks its name) with `labels`: a role with `tokens.create` whose
/// `token_labels` select the new labels. A token naming an agent that is
/// already enrolled (`enrolled`: its current enrolment labels) re-enrols
/// that host, which takes it over: the same role's `token_labels` must
/// also select the host as it is enrolled now, so an operator limited to
/// `role=web` cannot turn a `role=db` host into its own.
pub fn check_token(
    policy: &Policy,
    who: &Identity,
    channel: &str,
    name: &str,
    labels: &BTreeMap<String, String>,
    enrolled: Option<&BTreeMap<String, String>>,
) -> Result<(), Denied> {
    let granting: Vec<&Role> = roles_of(policy, who)
        .into_iter()
        .filter(|r| in_channel(r, channel) && r.may.contains(&Permission::CreateTokens))
        .collect();
    if granting.is_empty() {
        return Err(Denied::Lacks(Permission::CreateTokens));
    }
    let mut allowed = Vec::new();
    let mut selects_new = false;
    for role in granting {
        match &role.token_labels {
            None => return Ok(()),
            Some(sel) if sel.matches(name, labels) => {
                selects_new = true;
                if enrolled.is_none_or(|cur| sel.matches(name, cur)) {
                    return Ok(());
                }
                allowed.push(format!("`{sel}`"));
            }
            Some(sel) => allowed.push(format!("`{sel}`")),
        }
    }
    match enrolled {
        Some(cur) if selects_new => Err(Denied::ReEnrol {
            name: name.to_string(),
            current: label_text(cur),
            allowed,
        }),
        _ => Err(Denied::TokenLabels {
            labels: label_text(labels),
            allowed,
        }),
    }
}

fn label_text(labels: &BTreeMap<String, String>) -> String {
    labels
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(",")
}

/// Whether `who` may silence (or un-silence) the alerts of a service whose
/// hosts `selector` selects: whoever may run some command of the policy on
/// those hosts from `channel` (the people who would act on its alerts).
/// The one rule for chat `silence` and operators' `Health.Silence`.
pub fn check_silence(
    policy: &Policy,
    who: &Identity,
    channel: &str,
    selector: &str,
) -> Result<(), Denied> {
    let allowed = Selector::parse(selector).is_ok_and(|sel| {
        policy
            .commands
            .keys()
            .any(|c| check_run(policy, who, channel, c, &sel).is_ok())
    });
    if allowed {
        Ok(())
    } else {
        Err(Denied::Silence(selector.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::tests::example_policy;

    fn id(s: &str) -> Identity {
        Identity::parse(s).unwrap_or_else(|e| panic!("{e}"))
    }

    const ONCALL: &str = "slack:T0001:C0ONCALL";
    const ALICE: &str = "slack:T0001:U024BE7LH";

    fn check(who: &str, channel: &str, command: &str, selector: &str, expected: Result<(), &str>) {
        let p = example_policy();
        let sel = Selector::parse(selector).unwrap_or_else(|e| panic!("{e}"));
        let got = check_run(&p, &id(who), channel, command, &sel).map_err(|e| e.to_string());
        assert_eq!(
            got,
            expected.map_err(str::to_string),
            "{who} {channel} {command} {selector}"
        );
    }

    #[test]
    fn run_table() {
        check(ALICE, ONCALL, "restart", "env=prod,role=web", Ok(()));
        check(ALICE, ONCALL, "restart", "env==prod", Ok(()));
        check(
            ALICE,
            ONCALL,
            "restart",
            "role=web",
            Err("role oncall may only target `env=prod`"),
        );
        check(
            ALICE,
            ONCALL,
            "restart",
            "all",
            Err("role oncall may only target `env=prod`"),
        );
        check(
            ALICE,
            ONCALL,
            "restart",
            "env!=prod",
            Err("role oncall may only target `env=prod`"),
        );
        // viewer (no targets) covers uptime anywhere, oncall is channel-bound.
        check(ALICE, "slack:T0001:CRANDOM", "uptime", "all", Ok(()));
        check(
            ALICE,
            "slack:T0001:CRANDOM",
            "restart",
            "env=prod",
            Err(
                "no role may run `restart` in this channel; you have [oncall (only in slack:T0001:C0ONCALL, irc:libera:#ops), viewer]",
            ),
        );
        check(
            "irc:libera:alice!al@ops.example.com",
            "irc:libera:#ops",
            "restart",
            "env=prod",
            Ok(()),
        );
        check(
            "irc:libera:alice!al@evil.example.com",
            "irc:libera:#ops",
            "restart",
            "env=prod",
            Err("you have no roles"),
        );
        check(
            "slack:T0001:UBOB",
            ONCALL,
            "restart",
            "env=prod",
            Err("`restart` needs one of roles [oncall] in this channel; you have [viewer]"),
        );
        check("slack:T0001:UBOB", ONCALL, "logs", "all", Ok(()));
        check(
            "slack:T0001:UBOB",
            ONCALL,
            "rm",
            "all",
            Err("unknown command `rm`"),
        );
        check(
            "slack:T0002:U024BE7LH",
            "slack:T0002:C0OPS",
            "uptime",
            "all",
            Err("you have no roles"),
        );
        // A user id that merely contains the lead's id is not the lead.
        check(
            "slack:T0001:U024BE7LHX",
            ONCALL,
            "restart",
            "env=prod",
            Err("`restart` needs one of roles [oncall] in this channel; you have [viewer]"),
        );
        check(
            "mattermost:chat:U024BE7LH",
            "mattermost:chat:C0OPS",
            "uptime",
            "all",
            Err("you have no roles"),
        );
        // Another platform's channel: refused before any role is looked at.
        check(
            "mattermost:chat:U024BE7LH",
            ONCALL,
            "uptime",
            "all",
            Err("channel `slack:T0001:C0ONCALL` is not on mattermost:chat:U024BE7LH's platform"),
        );
    }

    #[test]
    fn roles_and_help() {
        let p = example_policy();
        let names = |who: &str| {
            roles_of(&p, &id(who))
                .iter()
                .map(|r| r.name.as_str())
                .collect::<Vec<_>>()
        };
        assert_eq!(names(ALICE), ["oncall", "viewer"]);
        assert_eq!(names("slack:T0001:UBOB"), ["viewer"]);
        assert!(names("console:root").is_empty());
        let cmds = |who: &str, ch: &str| {
            commands_for(&p, &id(who), ch)
                .iter()
                .map(|c| c.name.as_str())
                .collect::<Vec<_>>()
        };
        assert_eq!(cmds(ALICE, ONCALL), ["logs", "restart", "uptime"]);
        assert_eq!(cmds(ALICE, "slack:T0001:CRANDOM"), ["logs", "uptime"]);
        assert!(cmds("console:root", ONCALL).is_empty());
    }

    #[test]
    fn jobs_and_approvals_come_from_a_channel_of_the_requesters_platform() {
        let p = Policy::parse(
            r#"
version = 1
[commands.echo]
argv = ["/usr/bin/echo"]
[roles.oncall]
commands = ["echo"]
channels = ["webhook:ops:#ops"]
[[bindings]]
subjects = ["cli:carol", "webhook:ops:carol"]
roles = ["oncall"]
"#,
        )
        .unwrap_or_else(|e| panic!("{e}"));
        let all = Selector::parse("all").unwrap_or_else(|e| panic!("{e}"));
        let carol_chat = id("webhook:ops:carol");
        let carol_cli = id("cli:carol");
        assert_eq!(
            check_run(&p, &carol_chat, "webhook:ops:#ops", "echo", &all),
            Ok(())
        );
        // Her operator key names the chat channel: refused, whatever the roles.
        assert_eq!(
            check_run(&p, &carol_cli, "webhook:ops:#ops", "echo", &all),
            Err(Denied::ForeignChannel {
                who: "cli:carol".into(),
                channel: "webhook:ops:#ops".into()
            })
        );
        assert!(!may_approve(&p, &carol_cli, "echo", "webhook:ops:#ops"));
        assert!(may_approve(&p, &carol_chat, "echo", "webhook:ops:#ops"));
        // A chat user in the CLI's channel, or another chat's.
        assert!(check_run(&p, &carol_chat, CLI_CHANNEL, "echo", &all).is_err());
        assert!(check_run(&p, &carol_chat, "irc:net:#ops", "echo", &all).is_err());
        for (who, channel, own) in [
            ("cli:a", "cli", true),
            ("cli:a", "cli:x", false),
            ("console:root", "console", true),
            ("irc:n:a!u@h", "irc:n:#ops", true),
            ("irc:n:a!u@h", "irc:n:a", true),
            ("irc:n:a!u@h", "ircx:n:#ops", false),
            // Another network, workspace or webhook than the user's own.
            ("irc:n:a!u@h", "irc:other:#ops", false),
            ("irc:n:a!u@h", "irc:n", false),
            ("slack:T1:U1", "slack:T2:C1", false),
            ("webhook:ops:carol", "webhook:other:#ops", false),
            (
                "xmpp:a@example.com",
                "xmpp:ops@conference.example.com",
                true,
            ),
            ("slack:T1:U1", "slack:T1:C1", true),
            ("slack:T1:U1", "cli", false),
            ("cli:a", "console", false),
            ("cli:a", "", false),
        ] {
            assert_eq!(on_own_platform(&id(who), channel), own, "{who} {channel}");
        }
    }

    #[test]
    fn approvers() {
        let p = example_policy();
        for (who, command, expected) in [
            ("slack:T0001:U0LEAD1", "restart", true),
            ("slack:T0001:U0LEADX", "restart", true),
            // Alice has the command but is not a listed approver for it.
            (ALICE, "restart", false),
            // A display name that looks like the lead is not their id.
            ("slack:T0001:UXU0LEAD1", "restart", false),
            ("slack:T0002:U0LEAD1", "restart", false),
            // No approvers list for logs: anyone whose roles include it.
            ("slack:T0001:UBOB", "logs", true),
            ("console:root", "logs", false),
        ] {
            assert_eq!(
                may_approve(&p, &id(who), command, ONCALL),
                expected,
                "{who} {command}"
            );
        }
    }

    #[test]
    fn approver_rights_honour_channel_scope() {
        let p = Policy::parse(
            r#"
version = 1
[commands.restart]
argv = ["/usr/bin/true"]
[commands.deploy]
argv = ["/usr/bin/true"]
[roles.oncall]
commands = ["restart", "deploy"]
channels = ["irc:net:#ops"]
[roles.leads]
commands = ["deploy"]
channels = ["irc:net:#leads"]
[roles.viewer]
commands = ["uptime"]
[commands.uptime]
argv = ["/usr/bin/true"]
[[bindings]]
subjects = ["irc:net:carol!*@*"]
roles = ["oncall"]
[[bindings]]
subjects = ["irc:net:lead!*@*"]
roles = ["leads"]
[[bindings]]
subjects = ["irc:net:*"]
roles = ["viewer"]
[approvers]
deploy = ["irc:net:lead!*@*", "irc:net:dave!*@*"]
"#,
        )
        .unwrap_or_else(|e| panic!("{e}"));
        for (who, command, channel, expected) in [
            // Role-based approver: only from a channel of a role listing the command.
            ("irc:net:carol!c@h", "restart", "irc:net:#ops", true),
            ("irc:net:carol!c@h", "restart", "irc:net:#random", false),
            // A private message is no channel of the role.
            ("irc:net:carol!c@h", "restart", "irc:net:carol", false),
            ("irc:net:carol!c@h", "restart", "slack:T1:C1", false),
            // Listed approver: the channels of the role listing the command.
            ("irc:net:lead!l@h", "deploy", "irc:net:#leads", true),
            ("irc:net:lead!l@h", "deploy", "irc:net:#ops", false),
            // Everyone's unscoped viewer role does not carry the lead's
            // approval out of #leads, into a private message or elsewhere.
            ("irc:net:lead!l@h", "deploy", "irc:net:lead", false),
            ("irc:net:lead!l@h", "deploy", "irc:net:#random", false),
            // A role listing the command does not make carol a listed approver.
            ("irc:net:carol!c@h", "deploy", "irc:net:#ops", false),
            // Listed, but no role lists the command: approves nothing.
            ("irc:net:dave!d@h", "deploy", "irc:net:#anywhere", false),
            ("irc:net:dave!d@h", "deploy", "irc:net:#leads", false),
        ] {
            assert_eq!(
                may_approve(&p, &id(who), command, channel),
                expected,
                "{who} {command} {channel}"
            );
        }
    }

    /// A role scoped to other channels is named with where it applies (an
    /// outside test read "you have [ops]" in a private message as usable).
    #[test]
    fn a_refusal_says_where_a_scoped_role_applies() {
        let p = operators_policy();
        let sel = Selector::parse("env=staging").unwrap_or_else(|e| panic!("{e}"));
        let err = check_run(
            &p,
            &id("slack:T1:UALICE"),
            "slack:T1:DALICE",
            "uptime",
            &sel,
        )
        .expect_err("not usable in a private message");
        assert_eq!(
            err.to_string(),
            "`uptime` needs one of roles [admin, web] in this channel; you have [staging (only in slack:T1:COPS)]"
        );
        assert!(check_run(&p, &id("slack:T1:UALICE"), "slack:T1:COPS", "uptime", &sel).is_ok());
    }

    /// Operators and a staging-scoped chat role, for the read, cancel,
    /// audit and token decisions.
    fn operators_policy() -> Policy {
        Policy::parse(
            r#"version = 1
[commands.uptime]
argv = ["/usr/bin/uptime"]
[commands.restart]
argv = ["/usr/bin/systemctl", "restart", "nginx"]

[roles.web]
commands = ["uptime"]
targets = "role=web"
may = ["tokens.create"]
token_labels = "role=web"

[roles.auditor]
commands = []
may = ["jobs.read_all", "audit.read_all"]

[roles.canceller]
commands = []
may = ["jobs.cancel_any"]

[roles.admin]
commands = ["*"]
may = ["*"]

[roles.staging]
commands = ["uptime", "restart"]
targets = "env=staging"
channels = ["slack:T1:COPS"]

[[bindings]]
subjects = ["cli:bob"]
roles = ["web"]
[[bindings]]
subjects = ["cli:carol"]
roles = ["auditor"]
[[bindings]]
subjects = ["cli:dave"]
roles = ["canceller"]
[[bindings]]
subjects = ["cli:admin"]
roles = ["admin"]
[[bindings]]
subjects = ["slack:T1:*"]
roles = ["staging"]
"#,
        )
        .unwrap_or_else(|e| panic!("{e}"))
    }

    const ALICES_DB_JOB: JobFacts<'static> = JobFacts {
        requester: "cli:alice",
        command: "uptime",
        selector: "role=db",
    };
    const ALICES_WEB_JOB: JobFacts<'static> = JobFacts {
        requester: "cli:alice",
        command: "uptime",
        selector: "role=web,env=prod",
    };
    const PROD_RESTART: JobFacts<'static> = JobFacts {
        requester: "slack:T1:UALICE",
        command: "restart",
        selector: "env=prod",
    };
    const STAGING_RESTART: JobFacts<'static> = JobFacts {
        requester: "slack:T1:UALICE",
        command: "restart",
        selector: "env=staging,role=web",
    };

    #[test]
    fn job_reads_and_cancels() {
        let p = operators_policy();
        // (who, channel, job, may see, may cancel)
        let table: &[(&str, &str, JobFacts<'_>, bool, bool)] = &[
            ("cli:alice", CLI_CHANNEL, ALICES_DB_JOB, true, true),
            // bob's role runs uptime on role=web only.
            ("cli:bob", CLI_CHANNEL, ALICES_DB_JOB, false, false),
            ("cli:bob", CLI_CHANNEL, ALICES_WEB_JOB, true, true),
            // Reading everything grants no cancel; cancelling anything
            // grants no read.
            ("cli:carol", CLI_CHANNEL, ALICES_DB_JOB, true, false),
            ("cli:dave", CLI_CHANNEL, ALICES_DB_JOB, false, true),
            ("cli:admin", CLI_CHANNEL, ALICES_DB_JOB, true, true),
            ("cli:mallory", CLI_CHANNEL, ALICES_DB_JOB, false, false),
            // A bad stored selector grants nothing but the requester's own.
            (
                "cli:bob",
                CLI_CHANNEL,
                JobFacts {
                    selector: "role=(",
                    ..ALICES_WEB_JOB
                },
                false,
                false,
            ),
            // Chat: scoped to env=staging, in its channel only.
            (
                "slack:T1:UBOB",
                "slack:T1:COPS",
                STAGING_RESTART,
                true,
                true,
            ),
            ("slack:T1:UBOB", "slack:T1:COPS", PROD_RESTART, false, false),
            (
                "slack:T1:UBOB",
                "slack:T1:CRANDOM",
                STAGING_RESTART,
                false,
                false,
            ),
            (
                "slack:T1:UALICE",
                "slack:T1:CRANDOM",
                PROD_RESTART,
                true,
                true,
            ),
        ];
        for (who, channel, job, see, cancel) in table {
            let w = id(who);
            assert_eq!(
                may_see_job(&p, &w, channel, *job),
                *see,
                "see: {who} {channel} {job:?}"
            );
            assert_eq!(
                may_cancel_job(&p, &w, channel, *job),
                *cancel,
                "cancel: {who} {channel} {job:?}"
            );
        }
    }

    #[test]
    fn audit_records_follow_job_visibility() {
        use crate::audit::EventKind;
        let p = operators_policy();
        let about = |job: &str, command: &str| {
            Event::new(EventKind::JobFinished, "agent:db-1")
                .job(job)
                .command(command)
        };
        let own = Event::new(EventKind::TokenCreated, "cli:bob");
        let join = Event::new(EventKind::AgentJoined, "agent:web-1");
        let denied = Event::new(EventKind::ChatDenied, "slack:T1:UEVE").command("restart");
        // (who, channel, event, job, readable)
        let table: &[(&str, &str, &Event, Option<JobFacts<'_>>, bool)] = &[
            (
                "cli:bob",
                CLI_CHANNEL,
                &about("j1", "uptime"),
                Some(ALICES_DB_JOB),
                false,
            ),
            (
                "cli:bob",
                CLI_CHANNEL,
                &about("j2", "uptime"),
                Some(ALICES_WEB_JOB),
                true,
            ),
            // An unknown job is not readable through its command name.
            ("cli:bob", CLI_CHANNEL, &about("j3", "uptime"), None, false),
            ("cli:bob", CLI_CHANNEL, &own, None, true),
            ("cli:bob", CLI_CHANNEL, &join, None, false),
            (
                "cli:carol",
                CLI_CHANNEL,
                &about("j1", "uptime"),
                Some(ALICES_DB_JOB),
                true,
            ),
            ("cli:carol", CLI_CHANNEL, &join, None, true),
            ("cli:admin", CLI_CHANNEL, &join, None, true),
            // Chat scoped to env=staging: a prod job's records stay hidden
            // even though the role includes the command.
            (
                "slack:T1:UBOB",
                "slack:T1:COPS",
                &about("j4", "restart"),
                Some(PROD_RESTART),
                false,
            ),
            (
                "slack:T1:UBOB",
                "slack:T1:COPS",
                &about("j5", "restart"),
                Some(STAGING_RESTART),
                true,
            ),
            ("slack:T1:UBOB", "slack:T1:COPS", &denied, None, true),
            ("slack:T1:UBOB", "slack:T1:CRANDOM", &denied, None, false),
        ];
        for (who, channel, event, job, readable) in table {
            assert_eq!(
                may_read_record(&p, &id(who), channel, event, *job),
                *readable,
                "{who} {channel} {event:?}"
            );
        }
    }

    #[test]
    fn token_labels_are_limited_by_role() {
        let p = operators_policy();
        let labels = |s: &str| crate::selector::parse_labels(s).unwrap_or_else(|e| panic!("{e}"));
        // (who, name, labels, expected)
        let table: &[(&str, &str, &str, Result<(), &str>)] = &[
            ("cli:bob", "", "role=web,env=prod", Ok(())),
            (
                "cli:bob",
                "",
                "role=db",
                Err(
                    "your roles may create tokens only for labels matching `role=web`; `role=db` does not",
                ),
            ),
            (
                "cli:bob",
                "db-1",
                "env=prod",
                Err(
                    "your roles may create tokens only for labels matching `role=web`; `env=prod` does not",
                ),
            ),
            (
                "cli:carol",
                "",
                "role=web",
                Err("none of your roles grants `tokens.create`"),
            ),
            (
                "cli:mallory",
                "",
                "role=web",
                Err("none of your roles grants `tokens.create`"),
            ),
            ("cli:admin", "", "role=db", Ok(())),
        ];
        for (who, name, l, expected) in table {
            let got = if l.is_empty() {
                check_token(&p, &id(who), CLI_CHANNEL, name, &BTreeMap::new(), None)
            } else {
                check_token(&p, &id(who), CLI_CHANNEL, name, &labels(l), None)
            }
            .map_err(|e| e.to_string());
            assert_eq!(got, expected.map_err(str::to_string), "{who} {name} {l}");
        }
    }

    #[test]
    fn a_token_naming_an_enrolled_agent_needs_the_right_to_enrol_it_as_it_is() {
        let p = operators_policy();
        let labels = |s: &str| crate::selector::parse_labels(s).unwrap_or_else(|e| panic!("{e}"));
        // (who, name, new labels, current enrolment labels, expected)
        type Row<'a> = (&'a str, &'a str, &'a str, &'a str, Result<(), &'a str>);
        let table: &[Row<'_>] = &[
            // Taking over a role=db host as role=web: refused.
            (
                "cli:bob",
                "db1",
                "role=web",
                "role=db",
                Err(
                    "agent db1 is enrolled with labels `role=db`: a token naming it re-enrols that host and needs a role whose `token_labels` select its current labels; yours select only `role=web`",
                ),
            ),
            // An enrolled host without labels is not in role=web either.
            (
                "cli:bob",
                "bare",
                "role=web",
                "",
                Err(
                    "agent bare is enrolled with labels ``: a token naming it re-enrols that host and needs a role whose `token_labels` select its current labels; yours select only `role=web`",
                ),
            ),
            // Re-enrolling one of its own web hosts: allowed.
            ("cli:bob", "web1", "role=web,env=prod", "role=web", Ok(())),
            // The new labels are checked as well.
            (
                "cli:bob",
                "web1",
                "role=db",
                "role=web",
                Err(
                    "your roles may create tokens only for labels matching `role=web`; `role=db` does not",
                ),
            ),
            // Without `token_labels` a role enrols anything.
            ("cli:admin", "db1", "role=web", "role=db", Ok(())),
            (
                "cli:carol",
                "db1",
                "role=db",
                "role=db",
                Err("none of your roles grants `tokens.create`"),
            ),
        ];
        for (who, name, new, cur, expected) in table {
            let cur = if cur.is_empty() {
                BTreeMap::new()
            } else {
                labels(cur)
            };
            let got = check_token(&p, &id(who), CLI_CHANNEL, name, &labels(new), Some(&cur))
                .map_err(|e| e.to_string());
            assert_eq!(
                got,
                expected.map_err(str::to_string),
                "{who} {name} {new} {cur:?}"
            );
        }
    }

    #[test]
    fn silencing_needs_a_role_that_may_run_a_command_on_the_service_hosts() {
        let p = operators_policy();
        // (who, channel, service selector, allowed)
        for (who, channel, selector, allowed) in [
            ("cli:bob", CLI_CHANNEL, "role=web", true),
            ("cli:bob", CLI_CHANNEL, "role=web,env=prod", true),
            ("cli:bob", CLI_CHANNEL, "role=db", false),
            ("cli:bob", CLI_CHANNEL, "name=db1", false),
            // Roles without commands (reading every job) silence nothing.
            ("cli:carol", CLI_CHANNEL, "role=db", false),
            ("cli:mallory", CLI_CHANNEL, "role=web", false),
            ("cli:admin", CLI_CHANNEL, "role=db", true),
            // A chat role counts only in its channels.
            ("slack:T1:U1", "slack:T1:COPS", "env=staging", true),
            ("slack:T1:U1", "slack:T1:COTHER", "env=staging", false),
            // A selector that does not parse grants nothing.
            ("cli:admin", CLI_CHANNEL, "role=web,,env=prod", false),
        ] {
            let got = check_silence(&p, &id(who), channel, selector);
            assert_eq!(got.is_ok(), allowed, "{who} {channel} {selector}: {got:?}");
            if let Err(e) = got {
                assert_eq!(
                    e.to_string(),
                    format!(
                        "silencing alerts on `{selector}` needs a role that may run a command on those hosts"
                    )
                );
            }
        }
    }

    #[test]
    fn permissions_come_from_roles_in_their_channel() {
        let p = operators_policy();
        for (who, perm, expected) in [
            ("cli:admin", Permission::RevokeCerts, true),
            ("cli:admin", Permission::ExportAudit, true),
            ("cli:carol", Permission::ReadAllAudit, true),
            ("cli:carol", Permission::ExportAudit, false),
            ("cli:bob", Permission::CreateTokens, true),
            ("cli:bob", Permission::RevokeAgents, false),
            ("cli:mallory", Permission::ReadAllJobs, false),
            // A look-alike of the admin's id is not the admin.
            ("cli:admin2", Permission::RevokeCerts, false),
        ] {
            assert_eq!(
                may(&p, &id(who), CLI_CHANNEL, perm),
                expected,
                "{who} {perm}"
            );
        }
    }

    #[test]
    fn plugin_actions_are_granted_by_name_or_wildcard_in_their_channel_only() {
        let p = Policy::parse(
            r#"version = 1
[roles.deployer]
commands = []
may = ["plugin:deploy.*", "plugin:tickets.show"]
channels = ["slack:T1:COPS"]

[roles.admin]
commands = []
may = ["*"]

[[bindings]]
subjects = ["slack:T1:U1"]
roles = ["deployer"]
[[bindings]]
subjects = ["slack:T1:U2"]
roles = ["admin"]
"#,
        )
        .unwrap_or_else(|e| panic!("{e}"));
        let ops = "slack:T1:COPS";
        for (who, channel, action, expected) in [
            ("slack:T1:U1", ops, "plugin:deploy.rollback", true),
            ("slack:T1:U1", ops, "plugin:deploy.status", true),
            ("slack:T1:U1", ops, "plugin:tickets.show", true),
            ("slack:T1:U1", ops, "plugin:tickets.close", false),
            // A name that merely starts like a granted plugin is another plugin.
            ("slack:T1:U1", ops, "plugin:deployer.status", false),
            // The role applies only in its channel.
            (
                "slack:T1:U1",
                "slack:T1:CRANDOM",
                "plugin:deploy.rollback",
                false,
            ),
            // `*` grants the built-in permissions, not plugins.
            ("slack:T1:U2", ops, "plugin:deploy.rollback", false),
            ("slack:T1:U3", ops, "plugin:deploy.rollback", false),
            ("slack:T1:U1", ops, "deploy.rollback", false),
            // Built-in permissions by the same rule, `*` included.
            ("slack:T1:U2", ops, "audit.read_all", true),
            ("slack:T1:U1", ops, "audit.read_all", false),
            // Another platform's channel grants nothing.
            ("slack:T1:U2", "irc:libera:#ops", "audit.read_all", false),
        ] {
            assert_eq!(
                may_action(&p, &id(who), channel, action),
                expected,
                "{who} {channel} {action}"
            );
        }
    }
}
