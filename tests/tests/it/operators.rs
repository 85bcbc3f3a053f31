//! Operators are bounded by their policy roles and can be revoked: attacks
//! by an operator (`bob`) with separate `fleetcmd` processes against another
//! operator's (`alice`) jobs, and revocation of operator and gateway
//! certificates cutting off calls and open streams at once; an operator
//! cannot take over an enrolled agent with a named join token, and an
//! older certificate of a re-enrolled agent is refused.

use fleetcmd_proto::v1::{JobState, TargetState};
use std::path::{Path, PathBuf};
use std::time::Duration;

use fleetcmd_core::audit::{EventKind, Filter, Record};
use fleetcmd_core::crypto::SigningKey;
use fleetcmd_core::job::SignedJob;
use fleetcmd_proto::channel::ClientTls;
use fleetcmd_proto::v1 as pb;
use fleetcmd_tests::*;
use tokio_stream::StreamExt;

fn bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("test binary path");
    let p = exe
        .parent()
        .and_then(Path::parent)
        .expect("target dir")
        .join(name);
    assert!(
        p.exists(),
        "{} is missing: build the binaries first (`cargo build --workspace --bins`)",
        p.display()
    );
    p
}

/// An operator certificate issued by the fleet CA, written to files for
/// a `fleetcmd` process.
struct Operator {
    tls: ClientTls,
    key: SigningKey,
    cert_path: PathBuf,
    key_path: PathBuf,
}

fn issue_operator(fleet: &TestFleet, name: &str) -> Operator {
    let id = fleet
        .controller
        .shared()
        .ca
        .issue_identity(
            fleetcmd_controller::pki::Role::Operator,
            name,
            Duration::from_secs(3600),
        )
        .expect("issue");
    let dir = fleet.path().join("operators");
    std::fs::create_dir_all(&dir).expect("dir");
    let cert_path = dir.join(format!("{name}.crt"));
    let key_path = dir.join(format!("{name}.key"));
    std::fs::write(&cert_path, &id.cert_pem).expect("write cert");
    fleetcmd_controller::keyfile::write_private(
        &key_path,
        id.key_pem.expose().as_bytes(),
        fleetcmd_controller::keyfile::Existing::Refuse,
    )
    .expect("write key");
    // The job signing key beside the TLS key, as `issue-cert` writes it.
    let signing = fleetcmd_controller::pki::new_signing_key_pem().expect("signing key");
    fleetcmd_controller::keyfile::write_private(
        &dir.join(format!("{name}.sign.key")),
        signing.expose().as_bytes(),
        fleetcmd_controller::keyfile::Existing::Refuse,
    )
    .expect("write signing key");
    Operator {
        tls: ClientTls {
            ca_pem: fleet.operator_tls.ca_pem.clone(),
            cert_pem: id.cert_pem.clone(),
            key_pem: id.key_pem.expose().clone(),
        },
        key: SigningKey::from_pkcs8_pem(signing.expose()).expect("operator signing key"),
        cert_path,
        key_path,
    }
}

/// The dev policy with the admin alone bound to `admin` (every grant);
/// alice runs anything, bob runs uptime and sleep on `role=web` only and
/// may create tokens for `role=web` only.
fn operators_policy(fleet: &TestFleet, alice: &Operator) -> String {
    let base = fleetcmd_cli::fleet::example_policy(
        fleet.policy_version + 1,
        &fleet.gateway_key.public_key(),
        &fleet.operator_key.public_key(),
    )
    .replace(
        r#"subjects = ["console:*", "cli:*"]"#,
        r#"subjects = ["console:*", "cli:admin"]"#,
    );
    format!(
        r#"{base}
[[signers]]
id = "alice"
public_key = "{alice}"
may_sign = ["*"]
vouches_for = ["cli:alice"]

[roles.ops]
commands = ["*"]

[roles.web]
commands = ["uptime", "sleep"]
targets = "role=web"
may = ["tokens.create"]
token_labels = "role=web"

[[bindings]]
subjects = ["cli:alice"]
roles = ["ops"]

[[bindings]]
subjects = ["cli:bob"]
roles = ["web"]
"#,
        alice = alice.key.public_key()
    )
}

/// Alice starts `sleep 60` on `selector`; returns the job id once it runs.
async fn alice_sleeps(fleet: &TestFleet, alice: &Operator, selector: &str) -> String {
    let spec = spec("sleep", &[("seconds", "60")], selector, "cli:alice");
    let job = SignedJob::sign(&spec, "alice", &alice.key);
    let ch = fleetcmd_proto::channel::connect(&fleet.url, &alice.tls)
        .await
        .expect("alice connects");
    let id = pb::jobs_client::JobsClient::new(ch)
        .submit(to_pb(job))
        .await
        .expect("alice submits")
        .into_inner()
        .job_id;
    let shared = fleet.controller.shared().clone();
    assert_eventually(Duration::from_secs(10), || {
        let shared = shared.clone();
        let id = id.clone();
        async move {
            let j = shared.get_job(&id).ok()?;
            j.targets
                .iter()
                .any(|t| t.target_state() == TargetState::Running)
                .then_some(())
        }
    })
    .await;
    id
}

struct Run {
    ok: bool,
    stdout: String,
    stderr: String,
}

/// Runs `fleetcmd ARGS` as a separate process with `cert`/`key`.
async fn fleetcmd(fleet: &TestFleet, cert: &Path, key: &Path, args: &[&str]) -> Run {
    let out = tokio::process::Command::new(bin("fleetcmd"))
        .args(args)
        .env("FLEETCMD_CONTROLLER", &fleet.url)
        .env("FLEETCMD_CA", fleet.dir.join("ca.crt"))
        .env("FLEETCMD_CERT", cert)
        .env("FLEETCMD_KEY", key)
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(Duration::from_secs(30), out)
        .await
        .expect("fleetcmd finishes")
        .expect("fleetcmd runs");
    Run {
        ok: out.status.success(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

async fn as_op(fleet: &TestFleet, op: &Operator, args: &[&str]) -> Run {
    fleetcmd(fleet, &op.cert_path, &op.key_path, args).await
}

async fn as_admin(fleet: &TestFleet, args: &[&str]) -> Run {
    let dir = &fleet.dir;
    fleetcmd(
        fleet,
        &dir.join("operator.crt"),
        &dir.join("operator.key"),
        args,
    )
    .await
}

fn refused(run: &Run, needle: &str) {
    assert!(
        !run.ok,
        "expected a refusal ({needle}), got: {}",
        run.stdout
    );
    assert!(
        run.stderr.contains(needle),
        "expected {needle:?} in: {}",
        run.stderr
    );
}

fn records(fleet: &TestFleet, actor: &str, kind: EventKind) -> Vec<Record> {
    let f = Filter {
        actor: Some(actor.into()),
        kinds: vec![kind],
        ..Default::default()
    };
    fleet
        .controller
        .shared()
        .audit
        .search(&f, 100, None)
        .expect("search")
        .records
}

async fn operators_fleet() -> (TestFleet, Operator, Operator) {
    operators_fleet_with(|_| {}).await
}

async fn operators_fleet_with(
    tweak: impl FnOnce(&mut fleetcmd_cli::fleet::FleetOptions),
) -> (TestFleet, Operator, Operator) {
    let mut fleet = start_fleet_with(2, tweak).await;
    let alice = issue_operator(&fleet, "alice");
    let bob = issue_operator(&fleet, "bob");
    let text = operators_policy(&fleet, &alice);
    fleet.push_policy(&text).await.expect("policy pushed");
    fleet
        .wait_online(Duration::from_secs(10))
        .await
        .expect("agents take the policy");
    (fleet, alice, bob)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operator_reads_cancels_and_enrolls_only_what_its_roles_allow() {
    let (fleet, alice, bob) = operators_fleet().await;
    // dev-2 is role=db: bob's role may not run anything there.
    let web_job = alice_sleeps(&fleet, &alice, "role=web").await;
    let db_job = alice_sleeps(&fleet, &alice, "role=db").await;

    let hidden = as_op(&fleet, &bob, &["job", &db_job]).await;
    refused(&hidden, "may not read that job");
    // The refusal names nothing of the job: not its command, not its targets.
    assert!(
        !hidden.stderr.contains("sleep") && !hidden.stderr.contains("role=db"),
        "{}",
        hidden.stderr
    );
    refused(
        &as_op(&fleet, &bob, &["job", "output", &db_job]).await,
        "may not read that job",
    );
    // Nor does the audit record of that refusal, which bob may read as his
    // own action.
    let own = as_op(&fleet, &bob, &["audit", "search", "--job", &db_job]).await;
    assert!(own.ok, "{}", own.stderr);
    assert!(
        own.stdout.contains("may not read that job"),
        "{}",
        own.stdout
    );
    assert!(
        !own.stdout.contains("sleep") && !own.stdout.contains("role=db"),
        "{}",
        own.stdout
    );
    let shown = as_op(&fleet, &bob, &["job", &web_job]).await;
    assert!(shown.ok, "{}", shown.stderr);
    // `--limit 1` counts the jobs bob may read: the newest is alice's db job.
    let jobs = as_op(&fleet, &bob, &["jobs", "--limit", "1"]).await;
    assert!(jobs.ok, "{}", jobs.stderr);
    // `jobs` shows short ids.
    let short = fleetcmd_core::ids::short_form;
    assert!(!jobs.stdout.contains(short(&db_job)), "{}", jobs.stdout);
    assert!(jobs.stdout.contains(short(&web_job)), "{}", jobs.stdout);

    refused(
        &as_op(&fleet, &bob, &["cancel", &db_job]).await,
        "may not cancel that job",
    );
    assert_eq!(
        fleet
            .controller
            .shared()
            .get_job(&db_job)
            .expect("job")
            .job_state(),
        JobState::Running,
        "a refused cancel stopped nothing"
    );

    refused(
        &as_op(&fleet, &bob, &["token", "create", "--labels", "role=db"]).await,
        "only for labels matching `role=web`",
    );
    let token = as_op(&fleet, &bob, &["token", "create", "--labels", "role=web"]).await;
    assert!(token.ok, "{}", token.stderr);

    // Audit: bob's search about alice's db job shows only his own refused
    // attempts, none of the job's records; the admin's shows them.
    let bob_search = as_op(&fleet, &bob, &["audit", "search", "--job", &db_job]).await;
    assert!(bob_search.ok, "{}", bob_search.stderr);
    let about_job = |out: &str| -> Vec<String> {
        out.lines()
            .filter(|l| {
                l.contains(&format!("job={}", short(&db_job))) && !l.contains("permission_denied")
            })
            .map(str::to_owned)
            .collect()
    };
    assert!(
        about_job(&bob_search.stdout).is_empty(),
        "{}",
        bob_search.stdout
    );
    let admin_search = as_admin(&fleet, &["audit", "search", "--job", &db_job]).await;
    assert!(admin_search.ok, "{}", admin_search.stderr);
    assert!(
        admin_search.stdout.contains("job_submitted")
            && !about_job(&admin_search.stdout).is_empty(),
        "{}",
        admin_search.stdout
    );
    let export = fleet.path().join("bob-export.jsonl");
    refused(
        &as_op(
            &fleet,
            &bob,
            &["audit", "export", "--out", &export.display().to_string()],
        )
        .await,
        "may not export the audit trail",
    );

    // Each refusal is one audit record naming bob.
    let denied = records(&fleet, "cli:bob", EventKind::PermissionDenied);
    let about_db = denied.iter().filter(|r| r.event.job_id == db_job).count();
    assert!(
        about_db >= 3,
        "read, output and cancel refusals: {denied:#?}"
    );
    assert!(
        denied.iter().any(|r| r.event.detail.contains("role=db")),
        "token refusal: {denied:#?}"
    );
    assert!(
        denied.iter().any(|r| r.event.detail.contains("export")),
        "export refusal: {denied:#?}"
    );

    let done = as_admin(&fleet, &["cancel", &db_job]).await;
    assert!(done.ok, "{}", done.stderr);
    let done = as_op(&fleet, &alice, &["cancel", &web_job]).await;
    assert!(done.ok, "{}", done.stderr);
}

/// The token `fleetcmd token create ARGS` printed.
fn created_token(run: &Run) -> String {
    assert!(run.ok, "token create: {}", run.stderr);
    run.stdout.trim().to_owned()
}

/// Joins a host as `name` with `token` (state in DIR/`dir`).
async fn join(fleet: &TestFleet, token: &str, name: &str, dir: &str) -> Result<ClientTls, String> {
    let state_dir = fleet.path().join(dir);
    let opts = fleetcmd_agent::JoinOptions {
        controller: fleet.url.clone(),
        token: token.to_owned(),
        name: name.to_owned(),
        state_dir: state_dir.clone(),
    };
    fleetcmd_agent::join(&opts, now())
        .await
        .map_err(|e| e.to_string())?;
    let read = |f: &str| std::fs::read_to_string(state_dir.join(f)).expect("agent state file");
    Ok(ClientTls {
        ca_pem: read("ca.crt"),
        cert_pem: read("agent.crt"),
        key_pem: read("agent.key"),
    })
}

/// An agent stream opened with `tls` (the sender keeps it open), or the
/// controller's refusal.
async fn agent_stream(
    fleet: &TestFleet,
    tls: &ClientTls,
) -> (
    tokio::sync::mpsc::Sender<pb::AgentMessage>,
    Result<tonic::Streaming<pb::ControllerMessage>, tonic::Status>,
) {
    let ch = fleetcmd_proto::channel::connect(&fleet.url, tls)
        .await
        .expect("TLS completes");
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tx.try_send(pb::AgentMessage {
        msg: Some(pb::agent_message::Msg::Hello(pb::Hello {
            version: "probe".into(),
            hostname: "probe".into(),
            ..Default::default()
        })),
    })
    .expect("room");
    let res = pb::agent_stream_client::AgentStreamClient::new(ch)
        .connect(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .map(|r| r.into_inner());
    (tx, res)
}

/// The labels of the `Welcome` that opens an accepted agent stream.
async fn welcomed(stream: &mut tonic::Streaming<pb::ControllerMessage>) -> Vec<(String, String)> {
    let first = tokio::time::timeout(Duration::from_secs(10), stream.message())
        .await
        .expect("welcome in time")
        .expect("stream")
        .expect("a message");
    match first.msg {
        Some(pb::controller_message::Msg::Welcome(w)) => {
            let mut l: Vec<_> = w.labels.into_iter().collect();
            l.sort();
            l
        }
        other => panic!("expected a welcome, got {other:?}"),
    }
}

/// How an agent stream ends (bounded wait): its status.
async fn stream_end(mut stream: tonic::Streaming<pb::ControllerMessage>) -> tonic::Status {
    tokio::time::timeout(Duration::from_secs(20), async {
        loop {
            match stream.message().await {
                Ok(Some(_)) => continue,
                Ok(None) => panic!("the stream ended without a status"),
                Err(s) => return s,
            }
        }
    })
    .await
    .expect("the agent stream was not closed")
}

fn labels_of(fleet: &TestFleet, agent: &str) -> String {
    let a = fleet
        .controller
        .shared()
        .registry
        .list_agents(&format!("name={agent}"))
        .expect("list")
        .pop()
        .unwrap_or_else(|| panic!("{agent} is enrolled"));
    let mut l: Vec<_> = a.labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
    l.sort();
    l.join(",")
}

/// Bob (`tokens.create` for `role=web`) tries to take over dev-2 (an
/// enrolled `role=db` host) with a token naming it: refused and audited.
/// A token he made while a name was free does not take it once the admin
/// has enrolled it. And once a name he held is enrolled again by the
/// admin, his certificate for it is refused and his open stream closed,
/// while the new one is accepted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operator_cannot_take_over_an_enrolled_agent_with_a_named_token() {
    let (fleet, _alice, bob) = operators_fleet().await;
    refused(
        &as_op(
            &fleet,
            &bob,
            &["token", "create", "--labels", "role=web", "--name", "dev-2"],
        )
        .await,
        "agent dev-2 is enrolled with labels `env=dev,role=db`",
    );
    assert_eq!(labels_of(&fleet, "dev-2"), "env=dev,role=db");
    let denied = records(&fleet, "cli:bob", EventKind::PermissionDenied);
    assert!(
        denied
            .iter()
            .any(|r| r.event.detail.contains("agent dev-2 is enrolled")),
        "the refused takeover is audited: {denied:#?}"
    );
    // Control: re-enrolling one of the web hosts is within bob's rights.
    created_token(
        &as_op(
            &fleet,
            &bob,
            &["token", "create", "--labels", "role=web", "--name", "dev-1"],
        )
        .await,
    );

    // A token for a name that was free when it was made.
    let early = created_token(
        &as_op(
            &fleet,
            &bob,
            &["token", "create", "--labels", "role=web", "--name", "db9"],
        )
        .await,
    );
    let admins = created_token(
        &as_admin(
            &fleet,
            &["token", "create", "--labels", "role=db", "--name", "db9"],
        )
        .await,
    );
    join(&fleet, &admins, "db9", "db9")
        .await
        .expect("the admin enrols db9");
    let err = join(&fleet, &early, "db9", "bob-db9")
        .await
        .expect_err("bob's early token takes db9");
    assert!(
        err.contains("enrolled after this token was created"),
        "{err}"
    );
    assert_eq!(labels_of(&fleet, "db9"), "role=db");

    // Bob enrols web9, a web host of his own, and holds its stream.
    let own = created_token(
        &as_op(
            &fleet,
            &bob,
            &["token", "create", "--labels", "role=web", "--name", "web9"],
        )
        .await,
    );
    let bobs = join(&fleet, &own, "web9", "bob-web9")
        .await
        .expect("bob enrols web9");
    let (_bob_tx, bob_stream) = agent_stream(&fleet, &bobs).await;
    let mut bob_stream = bob_stream.expect("bob's web9 connects");
    assert_eq!(
        welcomed(&mut bob_stream).await,
        [("role".into(), "web".into())]
    );

    // The admin enrols web9 again, on another host, as a db host.
    let again = created_token(
        &as_admin(
            &fleet,
            &["token", "create", "--labels", "role=db", "--name", "web9"],
        )
        .await,
    );
    let real = join(&fleet, &again, "web9", "real-web9")
        .await
        .expect("the admin re-enrols web9");
    let end = stream_end(bob_stream).await;
    assert_eq!(end.code(), tonic::Code::PermissionDenied, "{end:?}");
    assert!(end.message().contains("enrolled again"), "{end:?}");
    // Bob's certificate (still within its lifetime) opens nothing now...
    let (_tx, res) = agent_stream(&fleet, &bobs).await;
    let status = res.expect_err("bob's old web9 certificate is refused");
    assert_eq!(status.code(), tonic::Code::PermissionDenied, "{status:?}");
    assert!(status.message().contains("enrolled again"), "{status:?}");
    let uses = records(&fleet, "agent:web9", EventKind::AuthFailed);
    assert!(
        uses.iter()
            .any(|r| r.event.detail.contains("before the name's last enrolment")),
        "{uses:#?}"
    );
    // ...and the new host's certificate is accepted, with the admin's labels.
    let (_real_tx, res) = agent_stream(&fleet, &real).await;
    let mut real_stream = res.expect("the re-enrolled web9 connects");
    assert_eq!(
        welcomed(&mut real_stream).await,
        [("role".into(), "db".into())]
    );
}

/// An agent whose stream another connection with its certificate replaced
/// is told so (its stream ends), and reconnects: before, the replaced
/// stream stayed open, looked healthy to the agent, and the agent never
/// came back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pushed_off_agent_is_told_and_reconnects() {
    let (fleet, _alice, _bob) = operators_fleet().await;
    // A second connection with dev-1's certificate replaces the running
    // agent's stream; the agent then reconnects and replaces it in turn.
    let (_tx, res) = agent_stream(&fleet, &fleet.agent_tls("dev-1")).await;
    let mut intruder = res.expect("a second dev-1 stream is accepted");
    welcomed(&mut intruder).await;
    let end = stream_end(intruder).await;
    assert_eq!(end.code(), tonic::Code::Aborted, "{end:?}");
    assert!(end.message().contains("replaced"), "{end:?}");
    fleet
        .wait_online(Duration::from_secs(10))
        .await
        .expect("dev-1 is back online");
}

/// `fleetcmd health silence`: an operator needs a role that may run a
/// command on the service's hosts (the rule chat's `silence` applies);
/// refusals are audited.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operator_silences_only_alerts_of_hosts_its_roles_act_on() {
    let text = "[db]\nselector = \"role=db\"\ncheck = \"app\"\nchannels = [\"rec:#ops\"]\n\
                [web]\nselector = \"role=web\"\ncheck = \"app\"\nchannels = [\"rec:#ops\"]\n";
    let raw: std::collections::BTreeMap<String, fleetcmd_controller::health::RawService> =
        toml::from_str(text).expect("services toml");
    let services = fleetcmd_controller::health::config::validate(&raw).expect("valid services");
    let (fleet, _alice, bob) = operators_fleet_with(|o| o.services = services).await;
    let carol = issue_operator(&fleet, "carol");

    refused(
        &as_op(&fleet, &carol, &["health", "silence", "db", "30d"]).await,
        "cli:carol may not silence db: silencing alerts on `role=db` needs a role that may run a command on those hosts",
    );
    refused(
        &as_op(&fleet, &bob, &["health", "silence", "db", "30d"]).await,
        "may not silence db",
    );
    let web = as_op(&fleet, &bob, &["health", "silence", "web", "1h"]).await;
    assert!(web.ok, "{}", web.stderr);
    let db = as_admin(&fleet, &["health", "silence", "db", "1h"]).await;
    assert!(db.ok, "{}", db.stderr);

    let services = fleet
        .controller
        .shared()
        .health
        .services("", 0)
        .expect("services");
    let silenced_by = |name: &str| {
        services
            .iter()
            .find(|s| s.name == name)
            .map(|s| s.silenced_by.clone())
            .expect("service")
    };
    assert_eq!(silenced_by("db"), "cli:admin");
    assert_eq!(silenced_by("web"), "cli:bob");
    for who in ["cli:carol", "cli:bob"] {
        let denied = records(&fleet, who, EventKind::PermissionDenied);
        assert!(
            denied
                .iter()
                .any(|r| r.event.detail.contains("may not silence db")),
            "{who}: {denied:#?}"
        );
        let done = records(&fleet, who, EventKind::ServiceSilenced);
        assert!(
            done.iter().all(|r| !r.event.detail.contains("service db")),
            "{who}: {done:#?}"
        );
    }
}

/// Opens `Jobs.Watch` on `job` and reads its first event.
async fn watching(tls: &ClientTls, url: &str, job: &str) -> tonic::Streaming<pb::JobEvent> {
    let ch = fleetcmd_proto::channel::connect(url, tls)
        .await
        .expect("connects");
    let mut stream = pb::jobs_client::JobsClient::new(ch)
        .watch(pb::WatchJobRequest {
            job_id: job.to_owned(),
        })
        .await
        .expect("watch")
        .into_inner();
    let first = stream.next().await.expect("first event").expect("event");
    assert!(matches!(first.event, Some(pb::job_event::Event::Job(_))));
    stream
}

/// The stream ends with PERMISSION_DENIED (the job itself runs on).
async fn assert_cut_off(mut stream: tonic::Streaming<pb::JobEvent>) {
    let end = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match stream.next().await {
                Some(Ok(_)) => continue,
                Some(Err(s)) => return Some(s),
                None => return None,
            }
        }
    })
    .await
    .expect("the open stream was not closed after the revocation");
    let status = end.expect("the stream ends with an error, not quietly");
    assert_eq!(status.code(), tonic::Code::PermissionDenied, "{status:?}");
    assert!(status.message().contains("revoked"), "{status:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoked_operator_and_gateway_certificates_are_cut_off_at_once() {
    let (fleet, alice, bob) = operators_fleet().await;
    let web_job = alice_sleeps(&fleet, &alice, "role=web").await;

    // bob may not revoke; the admin may.
    refused(
        &as_op(
            &fleet,
            &bob,
            &["certs", "revoke", "--role", "operator", "--name", "alice"],
        )
        .await,
        "none of its roles grants `certs.revoke`",
    );

    let bob_stream = watching(&bob.tls, &fleet.url, &web_job).await;
    let gw_stream = watching(&fleet.gateway_tls, &fleet.url, &web_job).await;

    let revoke = as_admin(
        &fleet,
        &[
            "certs",
            "revoke",
            "--role",
            "operator",
            "--name",
            "bob",
            "--reason",
            "left the team",
        ],
    )
    .await;
    assert!(revoke.ok, "{}", revoke.stderr);
    assert_cut_off(bob_stream).await;
    refused(&as_op(&fleet, &bob, &["jobs"]).await, "revoked");
    // Alice's certificate is untouched.
    let still = as_op(&fleet, &alice, &["job", &web_job]).await;
    assert!(still.ok, "{}", still.stderr);

    let revoke = as_admin(
        &fleet,
        &["certs", "revoke", "--role", "gateway", "--name", "dev"],
    )
    .await;
    assert!(revoke.ok, "{}", revoke.stderr);
    assert_cut_off(gw_stream).await;
    let ch = fleet.gateway().await;
    let res = pb::agents_client::AgentsClient::new(ch)
        .list(pb::ListAgentsRequest::default())
        .await;
    let status = res.expect_err("a revoked gateway is refused");
    assert_eq!(status.code(), tonic::Code::PermissionDenied, "{status:?}");

    // Listed, and audited: the revocations and the refused uses.
    let listed = as_admin(&fleet, &["certs", "revoked"]).await;
    assert!(listed.ok, "{}", listed.stderr);
    assert!(
        listed.stdout.contains("bob") && listed.stdout.contains("dev"),
        "{}",
        listed.stdout
    );
    let revoked = records(&fleet, "cli:admin", EventKind::CertRevoked);
    assert_eq!(revoked.len(), 2, "{revoked:#?}");
    assert!(
        revoked[1].event.detail.contains("left the team"),
        "{revoked:#?}"
    );
    let refused_uses = records(&fleet, "cli:bob", EventKind::AuthFailed);
    assert!(
        refused_uses
            .iter()
            .any(|r| r.event.detail.contains("revoked certificate")),
        "{refused_uses:#?}"
    );
    assert!(
        !records(&fleet, "gateway:dev", EventKind::AuthFailed).is_empty(),
        "the revoked gateway's call is audited"
    );

    let done = as_op(&fleet, &alice, &["cancel", &web_job]).await;
    assert!(done.ok, "{}", done.stderr);
}

/// `certs revoke --name` of a name `issue-cert` never recorded (a typo)
/// warns, and revokes all the same; a recorded name does not warn.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoking_a_certificate_never_issued_warns() {
    let (fleet, _alice, bob) = operators_fleet().await;
    let pki = fleet.controller.shared().config.data_dir.join("pki");
    std::fs::create_dir_all(&pki).expect("pki dir");
    let bob_serial = fleetcmd_controller::pki::pem_to_der(&bob.tls.cert_pem)
        .and_then(|der| fleetcmd_controller::pki::peer_from_cert(&der))
        .expect("bob's certificate reads back")
        .serial;
    std::fs::write(
        pki.join("issued.jsonl"),
        format!(
            "{}\n",
            serde_json::json!({"role": "operator", "name": "bob", "serial": bob_serial, "issued_at": 1, "ttl_secs": 3600})
        ),
    )
    .expect("issued.jsonl");
    let typo = as_admin(
        &fleet,
        &["certs", "revoke", "--role", "operator", "--name", "bbo"],
    )
    .await;
    assert!(typo.ok, "{}", typo.stderr);
    assert!(
        typo.stderr
            .contains("warning: no operator certificate named bbo is recorded in"),
        "{}",
        typo.stderr
    );
    let real = as_admin(
        &fleet,
        &["certs", "revoke", "--role", "operator", "--name", "bob"],
    )
    .await;
    assert!(real.ok, "{}", real.stderr);
    assert!(!real.stderr.contains("warning"), "{}", real.stderr);
    refused(&as_op(&fleet, &bob, &["jobs"]).await, "revoked");
}

/// A minimal controller.toml in `dir` for running `issue-cert` (data in
/// `dir/data`); its path.
fn issue_cert_config(dir: &std::path::Path) -> std::path::PathBuf {
    let cfg = dir.join("controller.toml");
    std::fs::write(
        &cfg,
        format!(
            "listen = \"127.0.0.1:0\"\ndata_dir = \"{}\"\npolicy_roots = [\"{}\"]\n",
            dir.join("data").display(),
            stranger_key().public_key()
        ),
    )
    .expect("config");
    cfg
}

/// `issue-cert --days` is capped at a year: a refused lifetime issues,
/// writes and records nothing.
#[test]
fn issue_cert_refuses_lifetimes_over_a_year() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = issue_cert_config(dir.path());
    let issue = |days: &str, name: &str| {
        std::process::Command::new(bin("fleetcmd-controller"))
            .arg("-c")
            .arg(&cfg)
            .args(["issue-cert", "--role", "operator", "--name", name])
            .args(["--days", days, "--out"])
            .arg(dir.path().join(name))
            .output()
            .expect("issue-cert runs")
    };
    let out = issue("36500", "century");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "a 100-year certificate was issued");
    assert!(
        stderr.contains("--days must be at most 365, got 36500"),
        "{stderr}"
    );
    assert!(!dir.path().join("century/century.crt").exists());
    assert!(!dir.path().join("data/pki/issued.jsonl").exists());
    let out = issue("365", "year");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("valid 365 days"));
}

/// `issue-cert --name` is a file name in `--out`, never a path: a name
/// that climbs out of it or is absolute issues, writes and records
/// nothing (found by an outside test: `--name ../evil`).
#[test]
fn issue_cert_refuses_a_name_that_is_a_path() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = issue_cert_config(dir.path());
    let out_dir = dir.path().join("out");
    let absolute = dir.path().join("elsewhere");
    for name in [
        "../evil".to_string(),
        format!("{}", absolute.display()),
        ".hidden".into(),
        "a*".into(),
    ] {
        let out = std::process::Command::new(bin("fleetcmd-controller"))
            .arg("-c")
            .arg(&cfg)
            .args(["issue-cert", "--role", "operator", "--name", &name, "--out"])
            .arg(&out_dir)
            .output()
            .expect("issue-cert runs");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{name}: issued");
        assert!(stderr.contains("--name"), "{name}: {stderr}");
        assert!(!dir.path().join("evil.key").exists(), "{name}");
        assert!(!dir.path().join("elsewhere.key").exists(), "{name}");
        assert!(!out_dir.exists(), "{name}: --out created");
        assert!(!dir.path().join("data/pki/issued.jsonl").exists(), "{name}");
    }
}

/// `issue-cert` gives operators 7 days and gateways 30 by default, prints
/// the serial, and appends what it issued to `pki/issued.jsonl`.
#[test]
fn issue_cert_defaults_to_short_lifetimes_and_records_what_it_issued() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = issue_cert_config(dir.path());
    let mut serials = Vec::new();
    for (role, name, days) in [("operator", "alice", 7), ("gateway", "main", 30)] {
        let out = std::process::Command::new(bin("fleetcmd-controller"))
            .arg("-c")
            .arg(&cfg)
            .args(["issue-cert", "--role", role, "--name", name, "--out"])
            .arg(dir.path().join(name))
            .output()
            .expect("issue-cert runs");
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(stdout.contains(&format!("valid {days} days")), "{stdout}");
        let pem = std::fs::read_to_string(dir.path().join(name).join(format!("{name}.crt")))
            .expect("certificate written");
        let peer = fleetcmd_controller::pki::pem_to_der(&pem)
            .and_then(|der| fleetcmd_controller::pki::peer_from_cert(&der))
            .expect("certificate reads back");
        assert!(stdout.contains(&peer.serial), "{stdout}");
        serials.push((role, name, days, peer.serial));
    }
    let log = std::fs::read_to_string(dir.path().join("data/pki/issued.jsonl")).expect("log");
    let lines: Vec<serde_json::Value> = log
        .lines()
        .map(|l| serde_json::from_str(l).expect("json line"))
        .collect();
    assert_eq!(lines.len(), 2, "{log}");
    for (line, (role, name, days, serial)) in lines.iter().zip(&serials) {
        assert_eq!(line["role"], *role, "{line}");
        assert_eq!(line["name"], *name, "{line}");
        assert_eq!(line["serial"], serial.as_str(), "{line}");
        assert_eq!(line["ttl_secs"], days * 86400, "{line}");
    }
}
