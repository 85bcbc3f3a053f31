//! The outside attack on plugins, replayed through the real router: each
//! test performs one finding's attack and shows it now fails — refused
//! requests audited with the plugin named, `may_run` binding what a plugin
//! may ask for, approvals not hitting the call timeout, hidden verbs not
//! confirmed, clashing verbs and relative paths caught by `validate`.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use fleetcmd_core::job::JobSpec;
use fleetcmd_gateway::plugins::PluginHost;
use fleetcmd_gateway::plugins::config::{PluginConfig, PluginsConfig, load};
use fleetcmd_gateway::registry::Component;
use fleetcmd_gateway::router::Router;

use crate::plugins::{console, entry, reported, test_plugin};
use crate::support::{FakeController, POLICY_BODY, RecordingSender, Sent, msg, router_for};

const GRANTS: &str = r#"
[roles.plugins]
commands = []
may = ["plugin:probe.*", "plugin:limited.*", "plugin:gate.*", "plugin:rel.*", "plugin:early.*"]

[[bindings]]
subjects = ["console:alice", "console:carol"]
roles = ["plugins"]
"#;

/// A plugin body that sends `requests` (JSON params of `job.run`, or a
/// whole message when it has a `method`) in turn and answers with what
/// each got back. `CALL` is the id of the call being answered.
const ASKER: &str = r#"
def ask(m):
    if "method" not in m:
        m = {"jsonrpc": "2.0", "id": "j", "method": "job.run", "params": m}
    sys.stdout.write(json.dumps(m) + "\n"); sys.stdout.flush()
    r = json.loads(sys.stdin.readline())
    if "error" in r:
        return "error: " + r["error"]["message"]
    return "ok: " + json.dumps(r["result"])
def answer(p):
    return {"lines": [ask(m) for m in REQUESTS(CALL[0], p)]}
"#;

fn plugin(dir: &Path, name: &str, requests: &str) -> PathBuf {
    test_plugin(
        dir,
        name,
        &format!("def REQUESTS(call, p):\n    return {requests}\n{ASKER}"),
    )
}

fn router_with(entries: Vec<PluginConfig>) -> Arc<Router<FakeController>> {
    let specs = load(&entries).unwrap_or_else(|e| panic!("{e}"));
    let router = router_for(4, &format!("{POLICY_BODY}\n{GRANTS}"), |_| {});
    router
        .register_commands(Arc::new(PluginHost::new(specs)))
        .unwrap_or_else(|e| panic!("{e}"));
    router
}

/// F5: every refused request of a plugin is audited as `chat_denied` with
/// the caller, the plugin and its verb; a job it starts is audited as
/// started via the plugin, with its job id.
#[tokio::test]
async fn every_refused_plugin_request_is_audited_and_its_jobs_name_the_plugin() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let router = router_with(vec![entry(
        plugin(
            dir.path(),
            "probe",
            r#"[
        {"command": "uptime", "selector": "all"},
        {"call": call, "command": "uptime", "selector": "all", "requester": "console:carol"},
        {"call": call, "command": "uptime", "selector": "all --dry-run"},
        {"call": call + 7, "command": "uptime", "selector": "all"},
        {"jsonrpc": "2.0", "id": "s", "method": "gateway.sign", "params": {}},
        {"call": call, "command": "reboot2", "selector": "all"},
        {"call": call, "command": "uptime", "selector": "role=web"},
    ]"#,
        ),
        "",
    )]);
    let out = console(&router, "alice", &["probe"]).await;
    let denied = reported(&router, "chat_denied");
    let by_alice_via_probe = |part: &str| {
        denied
            .iter()
            .any(|d| d.1 == "console:alice" && d.3.contains("plugin probe") && d.3.contains(part))
    };
    for part in [
        "missing field `call`",
        "unknown field `requester`",
        "invalid selector",
        "names call",
        "unknown method",
        "reboot2",
    ] {
        assert!(
            by_alice_via_probe(part),
            "{part} not audited: {denied:#?}\n{out}"
        );
    }
    // The one valid request ran, as alice, and its record names the plugin.
    let submitted = router.controller().submitted();
    assert_eq!(submitted.len(), 1, "{out}");
    let spec = JobSpec::from_bytes(&submitted[0].spec).unwrap_or_else(|e| panic!("{e}"));
    let calls = reported(&router, "chat_command");
    assert!(
        calls.iter().any(|c| c.1 == "console:alice"
            && c.2 == "probe"
            && c.3.contains(spec.id.as_str())
            && c.3.contains("started via plugin probe")),
        "{calls:#?}"
    );
}

/// F5: a plugin that breaks the protocol is stopped, and that is audited
/// with the caller whose call it broke.
#[tokio::test]
async fn a_protocol_break_is_audited_with_the_caller() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let router = router_with(vec![entry(
        plugin(
            dir.path(),
            "probe",
            r#"[{"jsonrpc": "2.0", "method": "job.run", "params": {}}]"#,
        ),
        "",
    )]);
    let out = console(&router, "alice", &["probe"]).await;
    assert!(out.contains("takes no notifications"), "{out}");
    let denied = reported(&router, "chat_denied");
    assert!(
        denied.iter().any(|d| d.1 == "console:alice"
            && d.2 == "probe"
            && d.3.contains("plugin probe: it was stopped")
            && d.3.contains("notification")),
        "{denied:#?}"
    );
}

/// F5: a `job.run` sent while the plugin is being started (answering
/// `initialize`, before any call is its) runs nothing and is audited with
/// the caller whose call started it.
#[tokio::test]
async fn a_job_run_during_initialize_is_refused_and_audited() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let early = r#"
_loads = json.loads
def hooked(s):
    m = _loads(s)
    if m.get("method") == "initialize":
        sys.stdout.write(json.dumps({"jsonrpc": "2.0", "id": "early", "method": "job.run", "params": {"call": m["id"], "command": "uptime", "selector": "all"}}) + "\n"); sys.stdout.flush()
        sys.stdin.readline()
    return m
json.loads = hooked
def answer(p):
    return {"lines": ["answered"]}
"#;
    let router = router_with(vec![entry(test_plugin(dir.path(), "early", early), "")]);
    let out = console(&router, "alice", &["early"]).await;
    assert!(out.contains("answered"), "{out}");
    assert!(router.controller().submitted().is_empty(), "{out}");
    let denied = reported(&router, "chat_denied");
    assert!(
        denied.iter().any(|d| d.1 == "console:alice"
            && d.2 == "early"
            && d.3 == "plugin early: job.run refused: job.run is only allowed while answering a command"),
        "{denied:#?}"
    );
}

/// F12: `[[plugin]] may_run` binds the plugin: a `job.run` for another
/// command is refused and audited even though the caller may run it.
#[tokio::test]
async fn may_run_limits_the_commands_a_plugin_may_ask_for_whatever_the_caller_may() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let router = router_with(vec![entry(
        plugin(
            dir.path(),
            "limited",
            r#"[{"call": call, "command": p["args"][0] if p["args"] else "logs", "args": [] if p["args"] else ["nginx.service"], "selector": "all"}]"#,
        ),
        r#"may_run = ["uptime"]"#,
    )]);
    // alice may run logs (role oncall), but the plugin may not ask for it.
    let out = console(&router, "alice", &["limited"]).await;
    assert!(
        out.contains("plugin limited may not run `logs` (its [[plugin]] may_run: uptime)"),
        "{out}"
    );
    assert!(router.controller().submitted().is_empty(), "{out}");
    let denied = reported(&router, "chat_denied");
    assert!(
        denied.iter().any(|d| d.1 == "console:alice"
            && d.2 == "logs"
            && d.3.contains("via plugin limited (limited)")
            && d.3.contains("may_run")),
        "{denied:#?}"
    );
    // What it may run still runs.
    let out = console(&router, "alice", &["limited uptime"]).await;
    assert_eq!(router.controller().submitted().len(), 1, "{out}");
    // Names that cannot be policy commands are refused by validate.
    let bad = load(&[entry(
        plugin(dir.path(), "other", "[]"),
        r#"may_run = ["uptime", "uptime", "rm -rf"]"#,
    )])
    .err()
    .map(|e| e.to_string())
    .unwrap_or_default();
    assert!(
        bad.contains("plugin[0].may_run: \"uptime\" is listed twice")
            && bad.contains("\"rm -rf\" is not a command name of the policy"),
        "{bad}"
    );
}

/// F10: a `job.run` of a job that needs approval waits for the approval
/// without the call timing out (the clock stops while the gateway serves
/// it), and the plugin learns the job id.
#[tokio::test]
async fn a_plugin_job_waiting_for_approval_does_not_hit_the_call_timeout() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let router = router_with(vec![entry(
        plugin(
            dir.path(),
            "gate",
            r#"[{"call": call, "command": "reboot", "selector": "all"}]"#,
        ),
        r#"call_timeout = "1s""#,
    )]);
    let out = Arc::new(RecordingSender::default());
    let task = {
        let (router, out) = (router.clone(), out.clone());
        tokio::spawn(async move {
            router
                .handle(msg("console:alice", "!gate"), out.as_ref())
                .await
        })
    };
    let short = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            let asked = out.all().iter().find_map(|s| match s {
                Sent::Send { reply, .. } if reply.header.contains("needs 1 approval") => {
                    reply.header.split_whitespace().nth(1).map(str::to_string)
                }
                _ => None,
            });
            if let Some(short) = asked {
                return short;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .unwrap_or_else(|_| panic!("no approval request posted: {:#?}", out.all()));
    // Longer than the plugin's call timeout passes before anyone approves:
    // another call meanwhile waits its own timeout for its turn and is told
    // the plugin is busy (the plugin is not stopped for it).
    let waited = std::time::Instant::now();
    let busy = console(&router, "carol", &["gate"]).await;
    assert!(
        busy.contains("plugin gate is busy answering another call"),
        "{busy}"
    );
    tokio::time::sleep(Duration::from_millis(1500).saturating_sub(waited.elapsed())).await;
    let approved = RecordingSender::default();
    router
        .handle(
            msg("console:carol", &format!("!approve {short}")),
            &approved,
        )
        .await;
    tokio::time::timeout(Duration::from_secs(10), task)
        .await
        .unwrap_or_else(|_| panic!("the call did not end"))
        .unwrap_or_else(|e| panic!("{e}"));
    let texts: Vec<String> = out.all().iter().map(Sent::text).collect();
    let all = texts.join("\n");
    assert!(!all.contains("did not answer"), "{all}");
    let submitted = router.controller().submitted();
    assert_eq!(submitted.len(), 1, "{all}");
    let spec = JobSpec::from_bytes(&submitted[0].spec).unwrap_or_else(|e| panic!("{e}"));
    assert!(
        all.contains(&format!("\"job_id\": \"{}\"", spec.id.as_str()))
            && all.contains("\"outcome\": \"submitted\""),
        "the plugin got the job id: {texts:#?}"
    );
}

/// F11: a user without the grant is answered as for an unknown verb (the
/// plugin's name and its action stay hidden); the audit keeps the detail.
#[tokio::test]
async fn a_refused_plugin_verb_reads_as_an_unknown_command() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let router = router_with(vec![entry(plugin(dir.path(), "probe", "[]"), "")]);
    let hidden = console(&router, "bob", &["probe"]).await;
    let unknown = console(&router, "bob", &["nosuchverb"]).await;
    assert!(
        hidden.contains("unknown command `probe`; try `help`"),
        "{hidden}"
    );
    assert_eq!(
        hidden.replace("probe", "X"),
        unknown.replace("nosuchverb", "X"),
        "a hidden verb answers exactly as an unknown one"
    );
    assert!(!hidden.contains("plugin:"), "{hidden}");
    let denied = reported(&router, "chat_denied");
    assert!(
        denied
            .iter()
            .any(|d| d.1 == "console:bob" && d.2 == "probe" && d.3.contains("plugin:probe.probe")),
        "{denied:#?}"
    );
}

/// F9: `validate` refuses a plugin verb another component registers,
/// naming both (the gateway refused to start on it after `validate` said
/// ok).
#[test]
fn validate_refuses_a_plugin_verb_that_another_component_registers() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let config = PluginsConfig(vec![
        entry(
            test_plugin(dir.path(), "query", "def answer(p):\n    return {}\n"),
            "",
        ),
        entry(
            test_plugin(dir.path(), "oncall", "def answer(p):\n    return {}\n"),
            "",
        ),
    ]);
    let problems = config.validate();
    let text = format!("{problems:?}");
    assert!(
        problems.iter().any(|(k, m)| k == "plugin[0]"
            && m == "verb \"query\" of plugin \"query\" is also the command of [prometheus]"),
        "{text}"
    );
    assert!(
        problems.iter().any(|(k, m)| k == "plugin[1]"
            && m.contains("\"oncall\"")
            && m.contains("[pagerduty]")),
        "{text}"
    );
}

/// F8: a `[[plugin]] manifest` relative to a gateway.toml given by a
/// relative path (`-c gateway.toml`) starts, wherever the plugin runs.
#[tokio::test]
async fn a_plugin_from_a_relative_config_path_starts() {
    let cwd = std::env::current_dir().unwrap_or_else(|e| panic!("{e}"));
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap_or_else(|e| panic!("{e}"));
    plugin(dir.path(), "rel", "[]");
    // The config's folder as the gateway sees it after `-c` with a
    // relative path: relative to the working directory.
    let base = pathdiff(dir.path(), &cwd);
    assert!(base.is_relative(), "{}", base.display());
    let section: toml::Value =
        toml::from_str("manifest = \"rel/plugin.toml\"\nwrite = [\"rel/state\"]")
            .unwrap_or_else(|e| panic!("{e}"));
    let section = toml::Value::Array(vec![section]);
    let config: PluginsConfig = fleetcmd_gateway::registry::typed(
        &section,
        &fleetcmd_gateway::registry::Paths::base(&base),
    )
    .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(config.validate(), Vec::<(String, String)>::new());
    let router = router_with(config.0);
    let out = console(&router, "alice", &["rel"]).await;
    assert!(out.contains("rel: answered by plugin rel"), "{out}");
}

/// `to` relative to `from` (both absolute).
fn pathdiff(to: &Path, from: &Path) -> PathBuf {
    let common = to
        .ancestors()
        .find(|a| from.starts_with(a))
        .unwrap_or(Path::new("/"));
    let ups = from
        .strip_prefix(common)
        .map(|p| p.components().count())
        .unwrap_or(0);
    let mut p = PathBuf::new();
    for _ in 0..ups {
        p.push("..");
    }
    p.join(to.strip_prefix(common).unwrap_or(to))
}

/// `help` offers only what is configured: without a `[prometheus]` or
/// `[pagerduty]` section, `query` and `oncall` are not listed (found by an
/// outside test), and calling one still says what to configure.
#[tokio::test]
async fn help_lists_no_command_of_an_unconfigured_integration() {
    let router = router_for(4, POLICY_BODY, |_| {});
    for unconfigured in [
        fleetcmd_gateway::prometheus::not_configured(),
        fleetcmd_gateway::oncall::not_configured(),
    ] {
        router
            .register_commands(Arc::new(unconfigured))
            .unwrap_or_else(|e| panic!("{e}"));
    }
    let help = console(&router, "alice", &["help"]).await;
    assert!(help.contains("run "), "{help}");
    assert!(
        !help.contains("query <promql>") && !help.contains("oncall"),
        "{help}"
    );
    let call = console(&router, "alice", &["oncall"]).await;
    assert!(call.contains("[pagerduty]"), "{call}");
}
