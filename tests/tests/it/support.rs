//! Helpers shared by the security tests: a policy with commands whose side
//! effects are easy to observe (a marker file, an appended line, a pid file),
//! and shortcuts for the "compromised controller" injections.

use fleetcmd_proto::v1::TargetState;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use fleetcmd_core::job::{JobSpec, SignedJob};
use fleetcmd_proto::v1 as pb;
use fleetcmd_tests::*;

/// Commands appended to the example policy. `@DIR@` is the fleet's temporary
/// directory: the only place the path arguments may point to.
const SECURITY_COMMANDS: &str = r#"
[commands.mark]
description = "Create a marker file"
argv = ["/usr/bin/touch", "{path}"]
args.path = { kind = "path", prefixes = ["@DIR@"], create = true }
timeout = "10s"

[commands.append]
description = "Append one line to a file"
argv = ["/bin/sh", "-c", "echo x >> \"$1\"", "sh", "{path}"]
args.path = { kind = "path", prefixes = ["@DIR@"], create = true }
timeout = "10s"

[commands.sh_tree]
description = "A shell with a grandchild that outlives the timeout"
argv = ["/bin/sh", "-c", "sleep 30 & echo $! > \"$1\"; wait", "sh", "{pidfile}"]
args.pidfile = { kind = "path", prefixes = ["@DIR@"], create = true }
timeout = "1s"

[commands.flood]
description = "Three million bytes of output"
argv = ["/usr/bin/head", "-c", "3000000", "/dev/zero"]
timeout = "10s"
"#;

/// The example policy at `version` plus the security test commands.
pub fn security_policy(fleet: &TestFleet, version: u64) -> String {
    let base = fleet::example_policy(
        version,
        &fleet.gateway_key.public_key(),
        &fleet.operator_key.public_key(),
    );
    let dir = fleet.path().display().to_string();
    format!("{base}{}", SECURITY_COMMANDS.replace("@DIR@", &dir))
}

/// A fleet of `agents` running the security policy (version 2).
pub async fn security_fleet(agents: usize) -> TestFleet {
    let mut fleet = start_fleet(agents).await;
    let text = security_policy(&fleet, fleet.policy_version + 1);
    fleet
        .push_policy(&text)
        .await
        .expect("security policy pushed");
    fleet
        .wait_online(Duration::from_secs(10))
        .await
        .expect("agents take the security policy");
    fleet
}

/// The audit records about job `id`, as JSON.
pub async fn audit_of(fleet: &TestFleet, id: &str) -> Vec<serde_json::Value> {
    let mut audit = pb::audit_client::AuditClient::new(fleet.operator().await);
    audit
        .search(pb::AuditSearchRequest {
            job_id: id.to_owned(),
            limit: 100,
            ..Default::default()
        })
        .await
        .expect("audit search")
        .into_inner()
        .records
        .iter()
        .map(|r| serde_json::from_str(r).expect("json record"))
        .collect()
}

/// A fresh path inside the fleet's directory (not created).
pub fn marker(fleet: &TestFleet, name: &str) -> PathBuf {
    fleet.path().join(name)
}

/// Lines in `p` (0 when it does not exist): what the `append` command
/// counts runs with.
pub fn lines(p: &Path) -> usize {
    std::fs::read_to_string(p)
        .map(|s| s.lines().count())
        .unwrap_or(0)
}

pub fn assert_absent(p: &Path) {
    assert!(
        !p.exists(),
        "{} exists: a refused job had an effect",
        p.display()
    );
}

/// Signs `spec` as the operator.
pub fn sign_op(fleet: &TestFleet, spec: &JobSpec) -> SignedJob {
    SignedJob::sign(spec, fleet::OPERATOR_SIGNER, &fleet.operator_key)
}

/// Sends `job` straight to `agents` as a compromised controller would (none
/// of the controller's checks) and waits for every agent's answer.
pub async fn inject(fleet: &TestFleet, job: SignedJob, id: &str, agents: &[&str]) -> pb::Job {
    fleet
        .controller
        .shared()
        .inject_job_unchecked(to_pb(job), id, agents)
        .await
        .expect("job injected");
    fleet.wait_job(id).await
}

/// The agent's result for `agent` in `job`.
pub fn result_of(job: &pb::Job, agent: &str) -> pb::JobResult {
    target(job, agent)
        .result
        .clone()
        .unwrap_or_else(|| panic!("no result from {agent} in {job:?}"))
}

/// Asserts that `agent` refused `job` with reason code `code`.
pub fn assert_refused(job: &pb::Job, agent: &str, code: &str) {
    let t = target(job, agent);
    assert_eq!(
        t.target_state(),
        TargetState::Refused,
        "{agent} should have refused with {code}: {t:?}"
    );
    let r = result_of(job, agent);
    assert_eq!(r.outcome, pb::Outcome::Refused as i32, "{r:?}");
    assert_eq!(r.reason_code, code, "{r:?}");
    assert!(!r.reason.is_empty(), "a refusal carries a reason: {r:?}");
    assert_eq!(
        r.exit_code, None,
        "nothing ran, so there is no exit code: {r:?}"
    );
}

/// Asserts a gRPC call failed with `code` and a message containing `needle`.
#[track_caller]
pub fn assert_status<T: std::fmt::Debug>(
    res: Result<T, tonic::Status>,
    code: tonic::Code,
    needle: &str,
) -> tonic::Status {
    let status = match res {
        Ok(v) => panic!("expected {code:?} ({needle}), got success: {v:?}"),
        Err(s) => s,
    };
    assert_eq!(status.code(), code, "{status:?}");
    assert!(
        status
            .message()
            .to_lowercase()
            .contains(&needle.to_lowercase()),
        "message of {status:?} should mention {needle:?}"
    );
    status
}

/// Asserts the controller stored nothing under `id`.
pub fn assert_not_stored(fleet: &TestFleet, id: &str) {
    let got = fleet.controller.shared().get_job(id);
    assert!(got.is_err(), "a refused job was stored: {got:?}");
}

/// Waits until the controller shows `name` offline (its stream is gone).
pub async fn wait_offline(fleet: &TestFleet, name: &str) {
    let shared = fleet.controller.shared().clone();
    assert_eventually(Duration::from_secs(10), || {
        let shared = shared.clone();
        async move {
            let list = shared.registry.list_agents("").ok()?;
            list.iter()
                .find(|a| a.agent_id == name)
                .filter(|a| !a.online)
                .map(|_| ())
        }
    })
    .await
}

/// The agent `name` as the controller lists it.
pub fn agent_info(fleet: &TestFleet, name: &str) -> pb::Agent {
    let list = fleet
        .controller
        .shared()
        .registry
        .list_agents("")
        .expect("list agents");
    list.into_iter()
        .find(|a| a.agent_id == name)
        .unwrap_or_else(|| panic!("no agent {name}"))
}

/// A chat sender that records what was posted (and edits, as new
/// entries): the plain text of each reply, in order.
#[derive(Default)]
pub struct Recorder(std::sync::Mutex<Vec<String>>);

impl Recorder {
    pub fn texts(&self) -> Vec<String> {
        self.0.lock().map(|v| v.clone()).unwrap_or_default()
    }

    fn push(&self, text: String) -> usize {
        let mut v = self.0.lock().unwrap_or_else(|p| p.into_inner());
        v.push(text);
        v.len()
    }
}

impl fleetcmd_gateway::adapters::ChatSender for Recorder {
    fn send<'a>(
        &'a self,
        channel: &'a str,
        reply: fleetcmd_gateway::adapters::Reply,
    ) -> fleetcmd_gateway::adapters::BoxFuture<
        'a,
        Result<fleetcmd_gateway::adapters::MessageRef, fleetcmd_gateway::adapters::AdapterError>,
    > {
        Box::pin(async move {
            let n = self.push(reply.plain());
            Ok(fleetcmd_gateway::adapters::MessageRef {
                channel: channel.to_string(),
                id: n.to_string(),
            })
        })
    }

    fn edit<'a>(
        &'a self,
        _msg: &'a fleetcmd_gateway::adapters::MessageRef,
        reply: fleetcmd_gateway::adapters::Reply,
    ) -> fleetcmd_gateway::adapters::BoxFuture<
        'a,
        Result<(), fleetcmd_gateway::adapters::AdapterError>,
    > {
        Box::pin(async move {
            self.push(reply.plain());
            Ok(())
        })
    }
}

/// How to run the real `fleetcmd` binary against the fleet as its operator.
#[derive(Clone)]
pub struct Cli {
    env: Vec<(&'static str, std::ffi::OsString)>,
}

impl Cli {
    pub fn new(fleet: &TestFleet) -> Cli {
        Cli {
            env: vec![
                ("FLEETCMD_CONTROLLER", fleet.url.clone().into()),
                ("FLEETCMD_CA", fleet.dir.join("ca.crt").into()),
                ("FLEETCMD_CERT", fleet.dir.join("operator.crt").into()),
                ("FLEETCMD_KEY", fleet.dir.join("operator.key").into()),
            ],
        }
    }

    /// Runs it as a separate process, stdout and stderr captured (pipes,
    /// not a terminal), off the async threads.
    pub async fn run(&self, args: &[&str]) -> std::process::Output {
        let env = self.env.clone();
        let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
        tokio::task::spawn_blocking(move || {
            Command::new(workspace_bin("fleetcmd"))
                .args(&args)
                .envs(env)
                .stdin(Stdio::null())
                .output()
                .expect("fleetcmd runs")
        })
        .await
        .expect("fleetcmd task")
    }
}
