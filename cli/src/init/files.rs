//! The text of the files `fleetcmd init` writes: pure functions of the
//! choices, so each one is tested against the real parser that will read it.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::Path;

use fleetcmd_core::crypto::PublicKey;

/// The IRC network a gateway joins.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Irc {
    /// Host name or address.
    pub server: String,
    pub port: u16,
    pub tls: bool,
    /// The network's name in identities (`irc:NETWORK:nick!user@host`).
    pub network: String,
    pub channels: Vec<String>,
    pub nick: String,
}

/// Everything the files depend on.
#[derive(Debug, Clone)]
pub struct Plan {
    /// Where agents, operators and the gateway reach the controller.
    pub url: String,
    pub listen: SocketAddr,
    /// Extra names for the controller's TLS certificate (the URL's host).
    pub tls_names: Vec<String>,
    pub operator: String,
    /// Chat identities (or patterns) bound to the `ops` role.
    pub chat_admins: Vec<String>,
    pub console: bool,
    pub irc: Option<Irc>,
    /// Host name → labels, one join token each.
    pub hosts: BTreeMap<String, BTreeMap<String, String>>,
}

/// The gateway's signer id in the policy and gateway.toml.
pub const GATEWAY_SIGNER: &str = "gateway-main";
/// The gateway certificate's name.
pub const GATEWAY_NAME: &str = "main";

impl Plan {
    /// The operator's signer id in the policy.
    pub fn operator_signer(&self) -> String {
        format!("operator-{}", self.operator)
    }

    /// The chat identities the gateway vouches for: every user of the
    /// chats it serves (each adapter verifies its users itself).
    pub fn gateway_vouches_for(&self) -> Vec<String> {
        let mut v = Vec::new();
        if self.console {
            v.push("console:*".to_string());
        }
        if let Some(irc) = &self.irc {
            v.push(format!("irc:{}:*", irc.network));
        }
        v
    }

    /// Whether two different people can be chat admins, so that one can
    /// approve what the other asks: an approver is never the requester
    /// (the same IRC nick under another user name is the same person), and
    /// only chat users can approve. A pattern with `*` in its person part
    /// (`irc:net:*!*@ops.example.com`) may match many people.
    pub fn two_approvers_possible(&self) -> bool {
        let mut people = std::collections::BTreeSet::new();
        for admin in &self.chat_admins {
            let person = fleetcmd_core::ids::Identity::parse(admin)
                .map_or_else(|_| admin.clone(), |id| id.person());
            if person.contains('*') {
                return true;
            }
            people.insert(person);
        }
        people.len() >= 2
    }
}

/// The line `restart` gets: one approval by someone else when two chat
/// admins exist; otherwise commented out, since nobody could ever approve
/// (and the restart would be unusable rather than guarded).
fn restart_approvals(plan: &Plan) -> &'static str {
    if plan.two_approvers_possible() {
        "requires_approvals = 1          # by another chat admin (never the requester)\n"
    } else {
        "# One approval by someone else: enable it (and push the policy) once a\n\
         # second chat admin is bound to `ops`; with one, nobody could approve.\n\
         # requires_approvals = 1\n"
    }
}

/// What init says about `restart` when it wrote no approval for it.
pub const RESTART_APPROVAL_NOTE: &str = "restart runs without approval: an approver must be \
     someone other than the requester, and fewer than two --chat-admin people exist; add a \
     second to the policy's `ops` binding and uncomment `requires_approvals = 1` in \
     policy.toml (then sign and push it)";

fn toml_str(s: &str) -> String {
    // TOML basic strings take JSON's escapes for everything we write.
    serde_json::to_string(s).unwrap_or_else(|_| "\"\"".into())
}

fn toml_list(items: &[String]) -> String {
    let quoted: Vec<String> = items.iter().map(|s| toml_str(s)).collect();
    format!("[{}]", quoted.join(", "))
}

fn labels_text(labels: &BTreeMap<String, String>) -> String {
    labels
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(",")
}

/// The first signed policy: the operator administers everything, the chat
/// admins run every command from their chats, a restart needs one
/// approval when someone can give it ([`restart_approvals`]).
pub fn policy(plan: &Plan, gateway: &PublicKey, operator: &PublicKey) -> String {
    let mut s = String::new();
    let _ = write!(
        s,
        r#"# The fleet's policy: the allow-list and who may use it. Written by
# `fleetcmd init`; change it, then sign and push it as the operator:
#   fleetcmd policy check policy.toml
#   fleetcmd policy sign policy.toml --key admin/policy-root.key
#   fleetcmd policy push policy.toml
# (every push needs a higher `version`). deploy/policy.toml in the
# project shows every option.
version = 1

# Keys that sign jobs, and the identities each signs for.
[[signers]]
id = "{gw_id}"
public_key = "{gateway}"
may_sign = ["*"]
vouches_for = {gw_vouches}     # the chat users the gateway verifies

[[signers]]
id = "{op_id}"
public_key = "{operator}"
may_sign = ["*"]
vouches_for = [{op_identity}]  # an operator's key speaks for that operator only

{basic}
[commands.free]
description = "Memory in use"
argv = ["/usr/bin/free", "-m"]
timeout = "10s"

[commands.status]
description = "Whether a systemd unit is active"
argv = ["/usr/bin/systemctl", "is-active", "{{unit}}"]
args.unit = {{ kind = "pattern", pattern = "^[a-z0-9@._-]+\\.(service|timer|socket)$" }}
timeout = "10s"

[commands.restart]
description = "Restart a systemd service"
argv = ["/usr/bin/systemctl", "restart", "{{unit}}"]
args.unit = {{ kind = "pattern", pattern = "^[a-z0-9@._-]+\\.service$" }}
timeout = "2m"
{restart_approvals}
[roles.admin]
commands = ["*"]
may = ["*"]                     # read and cancel every job, audit, tokens, revocations

[roles.ops]
commands = ["*"]
{ops_channels}
[[bindings]]
subjects = [{op_identity}]
roles = ["admin"]
"#,
        basic = crate::fleet::BASIC_COMMANDS,
        ops_channels = ops_channels(plan),
        restart_approvals = restart_approvals(plan),
        gw_id = GATEWAY_SIGNER,
        gateway = gateway,
        gw_vouches = toml_list(&plan.gateway_vouches_for()),
        op_id = plan.operator_signer(),
        operator = operator,
        op_identity = toml_str(&format!("cli:{}", plan.operator)),
    );
    if plan.chat_admins.is_empty() {
        s.push_str(
            "\n# Chat users: bind their stable ids (see docs/chat/) to a role, e.g.\n\
             # [[bindings]]\n\
             # subjects = [\"irc:libera:alice!*@ops.example.com\"]\n\
             # roles = [\"ops\"]\n",
        );
    } else {
        let _ = write!(
            s,
            "\n[[bindings]]\nsubjects = {}\nroles = [\"ops\"]\n",
            toml_list(&plan.chat_admins)
        );
    }
    s
}

/// The chat admins act where the team sees them: the IRC channels the
/// bot joins and the console (not private messages, where one person could
/// ask and approve out of everyone's sight).
fn ops_channels(plan: &Plan) -> String {
    let mut channels = Vec::new();
    if plan.console {
        channels.push("console".to_string());
    }
    if let Some(irc) = &plan.irc {
        channels.extend(
            irc.channels
                .iter()
                .map(|c| format!("irc:{}:{c}", irc.network)),
        );
    }
    if channels.is_empty() {
        return String::new();
    }
    format!(
        "channels = {}          # where the team sees what is asked and approved\n",
        toml_list(&channels)
    )
}

/// controller.toml: `data_dir` is absolute, so it runs from anywhere.
pub fn controller_toml(plan: &Plan, data_dir: &Path, root: &PublicKey) -> String {
    format!(
        r#"# The controller, written by `fleetcmd init` (every key: deploy/controller.toml).
# Check with `fleetcmd-controller -c THIS validate`, start with `... run`.
listen = {listen}
# Database, fleet CA and keys.
data_dir = {data_dir}
# Names in the controller's TLS certificate besides localhost, 127.0.0.1
# and ::1: agents, operators and the gateway reach it by one of them.
tls_names = {tls_names}
# The admin's policy root key (admin/policy-root.key: keep it offline).
policy_roots = [{root}]
policy_threshold = 1
operator_cert_ttl = "7d"
gateway_cert_ttl = "30d"
"#,
        listen = toml_str(&plan.listen.to_string()),
        data_dir = toml_str(&data_dir.display().to_string()),
        tls_names = toml_list(&plan.tls_names),
        root = toml_str(&root.to_string()),
    )
}

/// The operator's environment for `fleetcmd`.
pub fn operator_env(plan: &Plan, dir: &Path) -> String {
    let p = |f: &str| dir.join(f).display().to_string();
    format!(
        "# `source` this file to act as {op}: fleetcmd agents, fleetcmd run ...\n\
         export FLEETCMD_CONTROLLER={url}\n\
         export FLEETCMD_CA={ca}\n\
         export FLEETCMD_CERT={cert}\n\
         export FLEETCMD_KEY={key}\n\
         export FLEETCMD_SIGNING_KEY={sign}\n",
        op = plan.operator,
        url = shell_word(&plan.url),
        ca = shell_word(&p("ca.crt")),
        cert = shell_word(&p(&format!("{}.crt", plan.operator))),
        key = shell_word(&p(&format!("{}.key", plan.operator))),
        sign = shell_word(&p(&format!("{}.sign.key", plan.operator))),
    )
}

/// gateway.toml with the chosen chats; the others are commented out with
/// the guide to follow.
pub fn gateway_toml(plan: &Plan, root: &PublicKey) -> String {
    let mut s = format!(
        r#"# The chat gateway, written by `fleetcmd init` (every key:
# deploy/gateway.toml; each chat's setup: docs/chat/).
# Check with `fleetcmd-gateway -c THIS validate`, start with `... run`.
# Relative paths are resolved against this file's directory.
controller = {url}
ca = "ca.crt"
cert = "{gw}.crt"
key = "{gw}.key"
# Signs the chat users' jobs: the policy's [[signers]] "{signer}".
signing_key = "sign.key"
signer_id = "{signer}"
policy_roots = [{root}]
policy_threshold = 1
bot_name = "fleetcmd"
# What the gateway must remember across restarts.
state_dir = "state"
"#,
        url = toml_str(&plan.url),
        gw = GATEWAY_NAME,
        signer = GATEWAY_SIGNER,
        root = toml_str(&root.to_string()),
    );
    if plan.console {
        s.push_str("\n# Chat on the gateway's own stdin/stdout.\n[console]\nenabled = true\n");
    }
    match &plan.irc {
        Some(irc) => {
            let _ = write!(
                s,
                "\n# IRC (docs/chat/irc.md). Users are `irc:{net}:nick!user@host`.\n\
                 [irc]\nserver = {server}\nport = {port}\ntls = {tls}\nnick = {nick}\n\
                 network = {net_q}\nchannels = {channels}\n",
                net = irc.network,
                server = toml_str(&irc.server),
                port = irc.port,
                tls = irc.tls,
                nick = toml_str(&irc.nick),
                net_q = toml_str(&irc.network),
                channels = toml_list(&irc.channels),
            );
        }
        None => s.push_str(
            "\n# IRC (docs/chat/irc.md).\n# [irc]\n# server = \"irc.libera.chat\"\n\
             # nick = \"fleetcmd\"\n# network = \"libera\"\n# channels = [\"#ops\"]\n",
        ),
    }
    s.push_str(
        "\n# XMPP (docs/chat/xmpp.md).\n# [xmpp]\n# jid = \"fleetcmd@example.com\"\n\
         # password_file = \"xmpp-password\"\n# rooms = [\"ops@conference.example.com\"]\n\
         \n# Slack (docs/chat/slack.md).\n# [slack]\n# mode = \"socket\"\n\
         # bot_token_file = \"slack-bot-token\"\n# app_token_file = \"slack-app-token\"\n\
         \n# Mattermost (docs/chat/mattermost.md).\n# [mattermost]\n\
         # url = \"https://chat.example.com\"\n# server = \"chat\"\n\
         # token_file = \"mattermost.token\"\n",
    );
    s
}

/// The line that joins a host under its name with its token.
pub fn join_line(plan: &Plan, host: &str, token: &str) -> String {
    join_command(&plan.url, Some(host), token)
}

/// `fleetcmd-agent join` for a token, as `init`'s join files and `token
/// create`'s hint write it. The token goes in the environment, not argv:
/// another local user reads a process's arguments in /proc but not its
/// environment (an outside test stole a token from the command line and
/// joined first).
pub fn join_command(url: &str, name: Option<&str>, token: &str) -> String {
    let mut line = format!(
        "FLEETCMD_JOIN_TOKEN={} fleetcmd-agent join --controller {}",
        shell_word(token),
        shell_word(url),
    );
    if let Some(name) = name {
        let _ = write!(line, " --name {}", shell_word(name));
    }
    line
}

/// `s` as one word for a POSIX shell (quoted only when it needs it).
pub fn shell_word(s: &str) -> String {
    let plain = !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_./:=@,+%".contains(&b));
    if plain {
        s.to_string()
    } else {
        format!("'{}'", s.replace('\'', "'\\''"))
    }
}

/// `k=v,k=v` for the README of the directory.
pub fn describe_hosts(plan: &Plan) -> String {
    plan.hosts
        .iter()
        .map(|(h, l)| format!("  {h}: {}\n", labels_text(l)))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A distinct public key per `n` (only its bytes matter here).
    fn key(n: u8) -> Key {
        Key(PublicKey::from_bytes([n; 32]))
    }

    struct Key(PublicKey);

    impl Key {
        fn public_key(&self) -> PublicKey {
            self.0
        }
    }

    fn plan() -> Plan {
        Plan {
            url: "https://ctl.example.com:7443".into(),
            listen: "0.0.0.0:7443".parse().expect("addr"),
            tls_names: vec!["ctl.example.com".into()],
            operator: "alice".into(),
            chat_admins: vec![
                "irc:libera:alice!*@ops.example.com".into(),
                "irc:libera:bob!*@ops.example.com".into(),
            ],
            console: true,
            irc: Some(Irc {
                server: "irc.example.com".into(),
                port: 6697,
                tls: true,
                network: "libera".into(),
                channels: vec!["#ops".into()],
                nick: "fleetcmd".into(),
            }),
            hosts: BTreeMap::from([(
                "web-1".to_string(),
                BTreeMap::from([("role".to_string(), "web".to_string())]),
            )]),
        }
    }

    #[test]
    fn the_policy_parses_and_binds_what_was_asked() {
        let p = plan();
        let text = policy(&p, &key(1).public_key(), &key(2).public_key());
        let parsed = fleetcmd_core::policy::Policy::parse(&text).unwrap_or_else(|e| panic!("{e}"));
        let gw = parsed.signer(GATEWAY_SIGNER).expect("gateway signer");
        assert_eq!(gw.public_key, key(1).public_key());
        let op = parsed.signer("operator-alice").expect("operator signer");
        assert_eq!(op.public_key, key(2).public_key());
        assert_eq!(
            parsed.command("restart").map(|c| c.requires_approvals),
            Some(1)
        );
        let alice = fleetcmd_core::ids::Identity::parse("irc:libera:alice!a@ops.example.com")
            .expect("identity");
        let sel = fleetcmd_core::selector::Selector::parse("all").expect("selector");
        assert!(
            fleetcmd_core::rbac::check_run(&parsed, &alice, "irc:libera:#ops", "uptime", &sel)
                .is_ok()
        );
        // Not from a private message: the team sees what admins do.
        assert!(
            fleetcmd_core::rbac::check_run(&parsed, &alice, "irc:libera:alice", "uptime", &sel)
                .is_err()
        );
        let stranger =
            fleetcmd_core::ids::Identity::parse("irc:libera:eve!e@evil.example").expect("id");
        assert!(
            fleetcmd_core::rbac::check_run(&parsed, &stranger, "irc:libera:#ops", "uptime", &sel)
                .is_err()
        );
        // No chat admins: a commented example, still a valid policy.
        let mut none = p.clone();
        none.chat_admins.clear();
        let text = policy(&none, &key(1).public_key(), &key(2).public_key());
        fleetcmd_core::policy::Policy::parse(&text).unwrap_or_else(|e| panic!("{e}"));
    }

    /// `restart` needs an approval only when someone other than the
    /// requester can give it; otherwise the line is there, commented out.
    #[test]
    fn restart_needs_an_approval_only_when_two_people_can_give_it() {
        let check = |admins: &[&str], approvals: u32| {
            let mut p = plan();
            p.chat_admins = admins.iter().map(|a| a.to_string()).collect();
            let text = policy(&p, &key(1).public_key(), &key(2).public_key());
            let parsed =
                fleetcmd_core::policy::Policy::parse(&text).unwrap_or_else(|e| panic!("{e}"));
            assert_eq!(
                parsed.command("restart").map(|c| c.requires_approvals),
                Some(approvals),
                "{admins:?}"
            );
            assert_eq!(p.two_approvers_possible(), approvals == 1, "{admins:?}");
            if approvals == 0 {
                assert!(
                    text.contains("\n# requires_approvals = 1\n")
                        && text.contains("second chat admin"),
                    "{text}"
                );
            }
        };
        check(&[], 0);
        check(&["irc:libera:alice!*@ops.example.com"], 0);
        // One person under two user names and hosts is still one person.
        check(
            &[
                "irc:libera:alice!*@ops.example.com",
                "irc:libera:ALICE!~a@home.example.com",
            ],
            0,
        );
        check(
            &[
                "irc:libera:alice!*@ops.example.com",
                "irc:libera:bob!*@ops.example.com",
            ],
            1,
        );
        check(&["slack:T1:U1", "slack:T1:U2"], 1);
        // A pattern over nicks is anyone from that host.
        check(&["irc:libera:*!*@ops.example.com"], 1);
    }

    #[test]
    fn the_configs_pass_their_own_validation() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = plan();
        let ctl = dir.path().join("controller.toml");
        std::fs::write(
            &ctl,
            controller_toml(&p, &dir.path().join("data"), &key(3).public_key()),
        )
        .expect("write");
        let cfg = fleetcmd_controller::config::load(&ctl).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(cfg.listen, p.listen);
        let gw = dir.path().join("gateway.toml");
        std::fs::write(&gw, gateway_toml(&p, &key(3).public_key())).expect("write");
        let cfg = fleetcmd_gateway::config::GatewayConfig::parse(
            &std::fs::read_to_string(&gw).expect("read"),
            &gw,
        )
        .unwrap_or_else(|e| panic!("{e}"));
        use fleetcmd_gateway::adapters::{console::ConsoleConfig, irc::IrcConfig};
        assert_eq!(
            cfg.section::<IrcConfig>().map(|i| i.channels),
            Some(vec!["#ops".to_string()])
        );
        assert!(cfg.section::<ConsoleConfig>().is_some_and(|c| c.enabled));
    }

    #[test]
    fn shell_words_survive_a_shell() {
        assert_eq!(shell_word("fct1_abc"), "fct1_abc");
        assert_eq!(shell_word("https://h:1"), "https://h:1");
        assert_eq!(shell_word("a b"), "'a b'");
        assert_eq!(shell_word("it's"), "'it'\\''s'");
        assert_eq!(shell_word(""), "''");
        let line = join_line(&plan(), "web-1", "fct1_x");
        assert_eq!(
            line,
            "FLEETCMD_JOIN_TOKEN=fct1_x fleetcmd-agent join --controller https://ctl.example.com:7443 --name web-1"
        );
        assert_eq!(
            join_command("https://h:1", None, "fct1_y"),
            "FLEETCMD_JOIN_TOKEN=fct1_y fleetcmd-agent join --controller https://h:1"
        );
    }
}
