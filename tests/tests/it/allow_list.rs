//! ARCHITECTURE.md invariants 5 and 7: only allow-listed commands run, the host may narrow the
//! list further, argument values are single argv elements (never a shell),
//! and values starting with `-` or escaping their path prefix are refused.

use fleetcmd_proto::v1::TargetState;
use std::time::Duration;

use fleetcmd_proto::v1 as pb;
use fleetcmd_tests::*;
use pb::jobs_client::JobsClient;
use tonic::Code;

use crate::support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn commands_outside_the_allow_list_are_refused() {
    let fleet = security_fleet(2).await;
    let victim = marker(&fleet, "victim");
    std::fs::write(&victim, "keep me").expect("victim file");
    let victim_arg = victim.to_str().expect("utf-8");

    // At the controller.
    let (spec, job) = fleet.operator_job("rm", &[("path", victim_arg)], "all");
    let mut jobs = JobsClient::new(fleet.operator().await);
    assert_status(
        jobs.submit(to_pb(job)).await,
        Code::PermissionDenied,
        "\"rm\" is not in the allow-list",
    );
    assert_not_stored(&fleet, spec.id.as_str());

    // At the agents, validly signed and sent by a compromised controller.
    let (spec, job) = fleet.operator_job("rm", &[("path", victim_arg)], "all");
    let got = inject(&fleet, job, spec.id.as_str(), &["dev-1", "dev-2"]).await;
    for agent in ["dev-1", "dev-2"] {
        assert_refused(&got, agent, "not_allowed");
        assert!(result_of(&got, agent).reason.contains("rm"), "{got:?}");
    }
    assert!(victim.exists(), "the victim file was removed");
    fleet.fleet.shutdown().await.expect("shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_host_narrowing_is_enforced_by_its_agent() {
    let mut fleet = security_fleet(1).await;
    fleet
        .add_agent(
            "narrow-1",
            fleet::dev_labels(1),
            Some(vec!["uptime".into()]),
        )
        .await
        .expect("narrow agent joins");
    fleet
        .wait_online(Duration::from_secs(10))
        .await
        .expect("online");

    // The controller dispatches (the policy allows echo); the host refuses.
    let job = fleet
        .run("echo", &[("text", "narrowed")], "name=narrow-1")
        .await
        .expect("submitted");
    assert_refused(&job, "narrow-1", "narrowed_by_host");
    assert_eq!(stdout(target(&job, "narrow-1")), "");

    let m = marker(&fleet, "narrowed-mark");
    let job = fleet
        .run("mark", &[("path", m.to_str().expect("utf-8"))], "all")
        .await
        .expect("submitted");
    assert_refused(&job, "narrow-1", "narrowed_by_host");
    assert_eq!(
        target(&job, "dev-1").target_state(),
        TargetState::Ok,
        "dev-1 does not narrow: {job:?}"
    );
    assert!(m.exists(), "dev-1 created the marker");
    std::fs::remove_file(&m).expect("remove");
    let job = fleet
        .run(
            "mark",
            &[("path", m.to_str().expect("utf-8"))],
            "name=narrow-1",
        )
        .await
        .expect("submitted");
    assert_refused(&job, "narrow-1", "narrowed_by_host");
    assert_absent(&m);

    // Control: the command the host allows runs there.
    let job = fleet
        .run("uptime", &[], "name=narrow-1")
        .await
        .expect("submitted");
    assert_eq!(
        target(&job, "narrow-1").target_state(),
        TargetState::Ok,
        "{job:?}"
    );
    fleet.fleet.shutdown().await.expect("shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn shell_metacharacters_stay_literal_text() {
    let fleet = security_fleet(1).await;
    let dir = fleet.path().display().to_string();
    let payloads: Vec<(String, std::path::PathBuf)> = [
        ("subst", "$(touch @)"),
        ("semicolon", "; touch @"),
        ("backtick", "`touch @`"),
        ("and", "a b && touch @"),
        ("pipe", "x | touch @"),
        ("redirect", "x > @"),
        ("newline-free-or", "false || touch @"),
    ]
    .iter()
    .map(|(name, tpl)| {
        let p = std::path::PathBuf::from(format!("{dir}/inj-{name}"));
        (tpl.replace('@', p.to_str().expect("utf-8")), p)
    })
    .collect();
    for (value, created) in &payloads {
        let job = fleet
            .run("echo", &[("text", value)], "all")
            .await
            .expect("submitted");
        let t = target(&job, "dev-1");
        assert_eq!(t.target_state(), TargetState::Ok, "{job:?}");
        assert_eq!(
            stdout(t),
            format!("{value}\n"),
            "the value was not passed as one literal argument"
        );
        assert_absent(created);
    }
    fleet.fleet.shutdown().await.expect("shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn option_like_and_escaping_arguments_are_refused() {
    let fleet = security_fleet(2).await;
    let mut jobs = JobsClient::new(fleet.operator().await);
    for value in ["-e", "--help", "-n", "--version"] {
        // At the controller.
        let (spec, job) = fleet.operator_job("echo", &[("text", value)], "all");
        let status = assert_status(
            jobs.submit(to_pb(job)).await,
            Code::PermissionDenied,
            "must not start with `-`",
        );
        assert!(
            status.message().contains("`text`"),
            "the refusal names the argument: {status:?}"
        );
        assert_not_stored(&fleet, spec.id.as_str());
        // At the agents.
        let (spec, job) = fleet.operator_job("echo", &[("text", value)], "all");
        let got = inject(&fleet, job, spec.id.as_str(), &["dev-1", "dev-2"]).await;
        for agent in ["dev-1", "dev-2"] {
            assert_refused(&got, agent, "bad_argument");
            let r = result_of(&got, agent);
            assert!(r.reason.contains("must not start with `-`"), "{r:?}");
            assert!(r.stdout.is_empty(), "{r:?}");
        }
    }

    // A path that climbs out of its prefix, or lies outside it.
    let dir = fleet.path();
    let escaped = dir
        .parent()
        .expect("temp dir has a parent")
        .join(format!("escaped-{}", new_job_id().as_str()));
    let climbing = format!(
        "{}/sub/../../{}",
        dir.display(),
        escaped.file_name().and_then(|n| n.to_str()).expect("name")
    );
    for value in [climbing, escaped.display().to_string()] {
        let (spec, job) = fleet.operator_job("mark", &[("path", &value)], "all");
        assert_status(
            jobs.submit(to_pb(job)).await,
            Code::PermissionDenied,
            "`path`",
        );
        assert_not_stored(&fleet, spec.id.as_str());
        let (spec, job) = fleet.operator_job("mark", &[("path", &value)], "all");
        let got = inject(&fleet, job, spec.id.as_str(), &["dev-1", "dev-2"]).await;
        for agent in ["dev-1", "dev-2"] {
            assert_refused(&got, agent, "bad_argument");
        }
        assert_absent(&escaped);
    }
    fleet.fleet.shutdown().await.expect("shutdown");
}
