//! Operators are bounded by their policy roles and can be revoked: attacks
//! by an operator (`bob`) with separate `fleetcmd` processes against another
//! operator's (`alice`) jobs, and revocation of operator and gateway
//! certificates cutting off calls and open streams at once.

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
    Operator {
        tls: ClientTls {
            ca_pem: fleet.operator_tls.ca_pem.clone(),
            cert_pem: id.cert_pem.clone(),
            key_pem: id.key_pem.expose().clone(),
        },
        key: SigningKey::from_pkcs8_pem(id.key_pem.expose()).expect("operator key"),
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
            j.targets.iter().any(|t| t.state == "running").then_some(())
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
    let mut fleet = start_fleet(2).await;
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

    refused(
        &as_op(&fleet, &bob, &["job", &db_job]).await,
        "may not read job",
    );
    refused(
        &as_op(&fleet, &bob, &["job", "output", &db_job]).await,
        "may not read job",
    );
    let shown = as_op(&fleet, &bob, &["job", &web_job]).await;
    assert!(shown.ok, "{}", shown.stderr);
    // `--limit 1` counts the jobs bob may read: the newest is alice's db job.
    let jobs = as_op(&fleet, &bob, &["jobs", "--limit", "1"]).await;
    assert!(jobs.ok, "{}", jobs.stderr);
    assert!(!jobs.stdout.contains(&db_job), "{}", jobs.stdout);
    assert!(jobs.stdout.contains(&web_job), "{}", jobs.stdout);

    refused(
        &as_op(&fleet, &bob, &["cancel", &db_job]).await,
        "may not cancel job",
    );
    assert_eq!(
        fleet
            .controller
            .shared()
            .get_job(&db_job)
            .expect("job")
            .state,
        "running",
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
            .filter(|l| l.contains(&db_job) && !l.contains("permission_denied"))
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

/// `issue-cert` gives operators 7 days and gateways 30 by default, prints
/// the serial, and appends what it issued to `pki/issued.jsonl`.
#[test]
fn issue_cert_defaults_to_short_lifetimes_and_records_what_it_issued() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = dir.path().join("controller.toml");
    std::fs::write(
        &cfg,
        format!(
            "listen = \"127.0.0.1:0\"\ndata_dir = \"{}\"\npolicy_roots = [\"{}\"]\n",
            dir.path().join("data").display(),
            stranger_key().public_key()
        ),
    )
    .expect("config");
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
