//! Only the controller's enrolment grants labels: a host that writes
//! `role=db` into its own agent.toml is still the web host its join token
//! made it. The controller does not target it for `role=db`, and its agent
//! refuses a db-only command even when a compromised controller hands it
//! one signed for it directly.

use fleetcmd_proto::v1::JobState;
use std::time::Duration;

use fleetcmd_proto::v1 as pb;
use fleetcmd_tests::*;

use crate::support::*;

const DB_ONLY: &str = r#"
[commands.db_dump]
description = "A command only db hosts may run"
argv = ["/usr/bin/echo", "db-only", "{text}"]
args.text = { kind = "text", max_len = 200 }
targets = "role=db"
timeout = "10s"
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_host_that_labels_itself_role_db_gets_no_db_jobs_and_runs_no_db_command() {
    // dev-1 joined with role=web, dev-2 with role=db (their tokens).
    let mut fleet = start_fleet(2).await;
    let text = format!(
        "{}{DB_ONLY}",
        security_policy(&fleet, fleet.policy_version + 1)
    );
    fleet.push_policy(&text).await.expect("policy");

    // dev-1 restarts with a hostile agent.toml that claims role=db.
    fleet.stop_agent("dev-1").await;
    let toml = fleet.path().join("dev-1.toml");
    std::fs::write(
        &toml,
        format!(
            "controller = \"{}\"\nstate_dir = \"{}\"\nlabels = {{ role = \"db\" }}\nfacts = {{ os = \"debian-12\" }}\n",
            fleet.url,
            fleet.dir.join("agents").join("dev-1").display()
        ),
    )
    .expect("agent.toml");
    let config =
        fleetcmd_agent::config::load(&toml).expect("a deprecated `labels` key still loads");
    assert_eq!(config.facts.get("role").map(String::as_str), Some("db"));
    fleet
        .agents
        .push(fleetcmd_agent::spawn(config).expect("agent starts"));
    fleet
        .wait_online(Duration::from_secs(20))
        .await
        .expect("online");

    // The claim is shown as a fact, apart from the granted labels.
    let a = agent_info(&fleet, "dev-1");
    assert_eq!(
        a.labels.get("role").map(String::as_str),
        Some("web"),
        "{a:?}"
    );
    assert_eq!(a.facts.get("role").map(String::as_str), Some("db"), "{a:?}");
    assert_eq!(
        a.facts.get("os").map(String::as_str),
        Some("debian-12"),
        "{a:?}"
    );
    let db: Vec<String> = fleet
        .controller
        .shared()
        .registry
        .list_agents("role=db")
        .expect("list")
        .into_iter()
        .map(|a| a.agent_id)
        .collect();
    assert_eq!(db, ["dev-2"], "facts are not selectable");

    // Targeting: a role=db job, and a db-only command on every host, reach
    // dev-2 only.
    let job = fleet
        .run("echo", &[("text", "db arguments")], "role=db")
        .await
        .expect("submit");
    let targets: Vec<&str> = job.targets.iter().map(|t| t.agent_id.as_str()).collect();
    assert_eq!(targets, ["dev-2"], "{job:?}");
    let job = fleet
        .run("db_dump", &[("text", "x")], "all")
        .await
        .expect("submit");
    let targets: Vec<&str> = job.targets.iter().map(|t| t.agent_id.as_str()).collect();
    assert_eq!(targets, ["dev-2"], "{job:?}");
    assert_eq!(job.job_state(), JobState::Succeeded, "{job:?}");

    // A compromised controller hands dev-1 the db-only command, signed by
    // an operator for dev-1 by name, and a job whose selector is role=db:
    // the agent checks against the labels it was enrolled with, refuses,
    // and the refusals are audited.
    let s = spec("db_dump", &[("text", "x")], "name=dev-1", "cli:admin");
    let id = s.id.to_string();
    let job = inject(&fleet, sign_op(&fleet, &s), &id, &["dev-1"]).await;
    assert_refused(&job, "dev-1", "command_not_for_this_host");
    assert_refusal_audited(&fleet, &id).await;
    let s = spec("echo", &[("text", "db arguments")], "role=db", "cli:admin");
    let id = s.id.to_string();
    let job = inject(&fleet, sign_op(&fleet, &s), &id, &["dev-1"]).await;
    assert_refused(&job, "dev-1", "not_targeted");
    assert_refusal_audited(&fleet, &id).await;
    fleet.fleet.shutdown().await.expect("shutdown");
}

async fn assert_refusal_audited(fleet: &TestFleet, job_id: &str) {
    let ch = fleet.operator().await;
    assert_eventually(Duration::from_secs(10), || {
        let mut audit = pb::audit_client::AuditClient::new(ch.clone());
        async move {
            let records = audit
                .search(pb::AuditSearchRequest {
                    job_id: job_id.to_owned(),
                    limit: 100,
                    ..Default::default()
                })
                .await
                .ok()?
                .into_inner()
                .records;
            records
                .iter()
                .any(|r| r.contains("\"job_refused_by_agent\""))
                .then_some(())
        }
    })
    .await
}
