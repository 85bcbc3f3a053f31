//! Plugins through the real launcher: the `fleetcmd-gateway` binary reads
//! `[[plugin]]` from gateway.toml (the registry component `plugin`), starts
//! the example plugins, and serves their commands on its console, against a
//! real controller and agent: a plugin's job runs as the caller, one the
//! caller may not run is refused and audited with nothing submitted, and
//! every call is audited as `chat_command` in the controller's trail; its
//! plugins die with it when it is killed.

use std::path::Path;
use std::time::Duration;

use fleetcmd_proto::v1 as pb;
use fleetcmd_tests::*;

use crate::gateway_restart::{Gateway, gateway_config};

const WAIT: Duration = Duration::from_secs(30);

/// The dev policy with alice (everything, and both example plugins) and
/// erin (the `greet` plugin only, no command).
async fn push_plugin_policy(fleet: &mut TestFleet) {
    let base = fleetcmd_cli::fleet::example_policy(
        fleet.policy_version + 1,
        &fleet.gateway_key.public_key(),
        &fleet.operator_key.public_key(),
    );
    let text =
        base.replace(
            "may = [\"*\"]",
            "may = [\"*\", \"plugin:greet.*\", \"plugin:clock.clock\", \"plugin:stay.*\"]",
        )
        .replace(
            "subjects = [\"console:*\", \"cli:*\"]",
            "subjects = [\"console:alice\", \"cli:*\"]",
        ) + "\n[roles.greeter]\ncommands = []\nmay = [\"plugin:greet.*\"]\n\n\
           [[bindings]]\nsubjects = [\"console:erin\"]\nroles = [\"greeter\"]\n";
    fleet.fleet.push_policy(&text).await.expect("policy pushed");
}

/// A plugin that will not go: it ignores SIGTERM and SIGHUP, keeps running
/// after its stdin ends, and leaves a daemon (own session) behind on its
/// first call — what a killed gateway must still take down with it.
fn stubborn_plugin(dir: &Path) -> std::path::PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let d = dir.join("plugins/stay");
    std::fs::create_dir_all(&d).expect("plugin folder");
    std::fs::write(
        d.join("plugin.toml"),
        "name = \"stay\"\nprotocol = 1\nexecutable = \"stay.py\"\n[[commands]]\nverb = \"stay\"\nsummary = \"stays\"\n",
    )
    .expect("manifest");
    std::fs::write(
        d.join("stay.py"),
        r#"#!/usr/bin/env python3
import json, os, signal, sys, time
signal.signal(signal.SIGTERM, signal.SIG_IGN)
signal.signal(signal.SIGHUP, signal.SIG_IGN)
for line in sys.stdin:
    msg = json.loads(line)
    if msg["method"] == "initialize":
        result = {"protocol_version": 1, "commands": ["stay"]}
    else:
        if os.fork() == 0:
            os.setsid()
            while True:
                time.sleep(1)
        result = {"lines": ["staying"]}
    sys.stdout.write(json.dumps({"jsonrpc": "2.0", "id": msg["id"], "result": result}) + "\n")
    sys.stdout.flush()
while True:
    time.sleep(1)
"#,
    )
    .expect("plugin");
    for (p, mode) in [
        (&d, 0o700),
        (&d.join("plugin.toml"), 0o600),
        (&d.join("stay.py"), 0o700),
    ] {
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).expect("modes");
    }
    d.join("plugin.toml")
}

/// `(kind, actor, command, detail)` of the audit records of `kinds`.
async fn audited(fleet: &TestFleet, kinds: &[&str]) -> Vec<(String, String, String, String)> {
    let mut audit = pb::audit_client::AuditClient::new(fleet.operator().await);
    let records = audit
        .search(pb::AuditSearchRequest {
            kinds: kinds.iter().map(|k| k.to_string()).collect(),
            limit: 200,
            ..Default::default()
        })
        .await
        .expect("audit search")
        .into_inner()
        .records;
    records
        .iter()
        .filter_map(|r| serde_json::from_str::<serde_json::Value>(r).ok())
        .map(|v| {
            let f = |k: &str| v["event"][k].as_str().unwrap_or_default().to_string();
            (f("kind"), f("actor"), f("command"), f("detail"))
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn plugins_in_gateway_toml_serve_the_console_of_the_real_gateway_binary() {
    let mut fleet = start_fleet(1).await;
    push_plugin_policy(&mut fleet).await;
    let state = fleet.path().join("gateway-state");
    let config = gateway_config(&fleet, &state, "15m");
    let examples = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/plugins");
    let token = fleet.path().join("greet.token");
    std::fs::write(&token, "s3cret\n").expect("token written");
    // Secret files are refused when other local users may read them.
    std::fs::set_permissions(&token, std::os::unix::fs::PermissionsExt::from_mode(0o600))
        .expect("token kept private");
    let stay = stubborn_plugin(&fleet.path());
    let plugins = format!(
        "\n[[plugin]]\nmanifest = {:?}\nsecrets.GREET_TOKEN = {{ file = {:?} }}\n\n\
         [[plugin]]\nmanifest = {:?}\ncall_timeout = \"20s\"\n\n\
         [[plugin]]\nmanifest = {:?}\n",
        examples.join("python/plugin.toml").display().to_string(),
        token.display().to_string(),
        examples.join("shell/plugin.toml").display().to_string(),
        stay.display().to_string(),
    );
    let mut text = std::fs::read_to_string(&config).expect("gateway.toml");
    text.push_str(&plugins);
    std::fs::write(&config, text).expect("gateway.toml written");

    // alice: both plugins, and a plugin's job runs on the agent as her.
    let mut alice = Gateway::start(&config, "alice");
    alice.say("clock");
    alice
        .line("the shell plugin's answer", |l| {
            l.contains("on the gateway").then_some(())
        })
        .await;
    alice.say("greet");
    alice
        .line("the python plugin's answer", |l| {
            l.contains("token configured: yes").then_some(())
        })
        .await;
    alice.say("loadcheck all");
    let job = alice
        .line("the job id the plugin was given", |l| {
            let rest = l.split("job ").nth(1)?;
            let (id, after) = rest.split_once(' ')?;
            after
                .starts_with("submitted as you")
                .then(|| id.to_string())
        })
        .await;
    let done = fleet.wait_job(&job).await;
    assert_eq!(done.requester, "console:alice", "{done:?}");
    assert_eq!(done.command, "uptime", "{done:?}");
    assert_eq!(done.job_state(), pb::JobState::Succeeded, "{done:?}");
    // Its plugins (HOME is their scratch directory, named after the
    // gateway's pid) run while it does, and die with it: kill -9 leaves
    // nothing that could stop them.
    alice.say("stay");
    alice
        .line("the stubborn plugin's answer", |l| {
            l.contains("staying").then_some(())
        })
        .await;
    let scratch = format!("fleetcmd-plugin-{}-", alice.pid());
    let plugins_of = |scratch: &str| -> Vec<String> {
        std::fs::read_dir("/proc")
            .map(|d| {
                d.flatten()
                    .filter(|e| {
                        std::fs::read(e.path().join("environ"))
                            .is_ok_and(|env| String::from_utf8_lossy(&env).contains(scratch))
                    })
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default()
    };
    assert!(
        plugins_of(&format!("{scratch}stay-")).len() >= 2,
        "the stubborn plugin and its daemon run under {scratch}"
    );
    alice.kill9();
    assert_eventually(Duration::from_secs(5), || async {
        plugins_of(&scratch).is_empty().then_some(())
    })
    .await;

    // erin may use `greet` but run no command: refused, nothing submitted.
    let mut erin = Gateway::start(&config, "erin");
    erin.say("loadcheck all");
    let told = erin
        .line("the refusal the plugin passed on", |l| {
            l.contains("job not run: refused").then(|| l.to_string())
        })
        .await;
    assert!(told.contains("nothing was submitted"), "{told}");
    erin.say("clock");
    // Answered as an unknown verb: a plugin erin may not use stays hidden.
    erin.line("the plugin grant refusal", |l| {
        l.contains("unknown command `clock`; try `help`")
            .then_some(())
    })
    .await;
    erin.kill9();

    let records = assert_eventually(WAIT, || async {
        let r = audited(&fleet, &["chat_command", "chat_denied"]).await;
        let erin_denied = r
            .iter()
            .filter(|(k, who, _, _)| k == "chat_denied" && who == "console:erin")
            .count();
        (erin_denied >= 2).then_some(r)
    })
    .await;
    let has = |kind: &str, who: &str, command: &str| {
        records
            .iter()
            .any(|(k, w, c, _)| k == kind && w == who && c == command)
    };
    for command in ["clock", "greet", "loadcheck"] {
        assert!(has("chat_command", "console:alice", command), "{records:?}");
    }
    assert!(
        has("chat_command", "console:erin", "loadcheck"),
        "{records:?}"
    );
    assert!(has("chat_denied", "console:erin", "uptime"), "{records:?}");
    assert!(has("chat_denied", "console:erin", "clock"), "{records:?}");
    assert!(!has("chat_command", "console:erin", "clock"), "{records:?}");
    // erin's refused job never reached the controller.
    let mut jobs = pb::jobs_client::JobsClient::new(fleet.operator().await);
    let listed = jobs
        .list(pb::ListJobsRequest::default())
        .await
        .expect("jobs listed")
        .into_inner()
        .jobs;
    assert!(
        listed.iter().all(|j| j.requester != "console:erin"),
        "{listed:?}"
    );
    fleet.fleet.shutdown().await.expect("shutdown");
}
