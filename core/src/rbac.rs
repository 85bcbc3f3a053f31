//! Who may run what, where (RBAC for chat and CLI users): roles come from
//! bindings whose subject patterns match the stable identity.

use std::collections::BTreeSet;
use std::fmt::Write as _;

use crate::ids::Identity;
use crate::policy::{CommandDef, Policy, Role};
use crate::selector::Selector;

/// Why a request was denied. The message names what is missing without
/// revealing other users' rights.
#[derive(thiserror::Error, Debug, Clone, PartialEq, Eq)]
pub enum Denied {
    #[error("you have no roles")]
    NoRoles,
    #[error("unknown command `{0}`")]
    UnknownCommand(String),
    #[error("{}", needs_message(command, needed, have))]
    NeedsRole {
        command: String,
        needed: Vec<String>,
        have: Vec<String>,
    },
    #[error("role {role} may only target `{targets}`")]
    TargetOutsideRole { role: String, targets: String },
}

fn needs_message(command: &str, needed: &[String], have: &[String]) -> String {
    let mut s = String::new();
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

fn in_channel(role: &Role, channel: &str) -> bool {
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
            have: roles.iter().map(|r| r.name.clone()).collect(),
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

/// Whether `who` may approve jobs of `command` from `channel`: the
/// `[approvers]` patterns when the command is listed there, else anyone
/// whose roles include the command. Approver rights honour channel scope:
/// without an `[approvers]` entry the approval must come from a channel of
/// a role that lists the command; with one, an approver who has roles must
/// give it from a channel one of those roles allows (an approver listed
/// there and bound to no role at all is scoped by nothing but the list).
pub fn may_approve(policy: &Policy, who: &Identity, command: &str, channel: &str) -> bool {
    let roles = roles_of(policy, who);
    match policy.approvers.get(command) {
        Some(patterns) => {
            patterns.iter().any(|p| who.matches_pattern(p))
                && (roles.is_empty() || roles.iter().any(|r| in_channel(r, channel)))
        }
        None => roles
            .iter()
            .any(|r| lists(r, command) && in_channel(r, channel)),
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
            Err("no role may run `restart` in this channel; you have [oncall, viewer]"),
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
            ONCALL,
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
            ONCALL,
            "uptime",
            "all",
            Err("you have no roles"),
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
commands = []
channels = ["irc:net:#leads"]
[[bindings]]
subjects = ["irc:net:carol!*@*"]
roles = ["oncall"]
[[bindings]]
subjects = ["irc:net:lead!*@*"]
roles = ["leads"]
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
            // Listed approver with a scoped role: that role's channels.
            ("irc:net:lead!l@h", "deploy", "irc:net:#leads", true),
            ("irc:net:lead!l@h", "deploy", "irc:net:#ops", false),
            // A role listing the command does not make carol a listed approver.
            ("irc:net:carol!c@h", "deploy", "irc:net:#ops", false),
            // Listed and bound to no role: scoped by the list alone.
            ("irc:net:dave!d@h", "deploy", "irc:net:#anywhere", true),
        ] {
            assert_eq!(
                may_approve(&p, &id(who), command, channel),
                expected,
                "{who} {command} {channel}"
            );
        }
    }
}
