//! Everything that authorized a job is checked again immediately before the
//! process starts. An agent with one job slot is kept busy by a long job
//! while a second job waits for the slot; meanwhile the second job expires,
//! a newer policy removes its command, or the agent is revoked. It never
//! starts, it is reported refused with its reason, and the refusal is in
//! the audit trail. Also: the longest validity a job may be signed with
//! (`max_job_lifetime`), and the canonical argument values reaching argv.

use fleetcmd_proto::v1::TargetState;
use std::path::PathBuf;
use std::time::Duration;

use fleetcmd_core::job::{CLOCK_SKEW_SECS, JobSpec, SignedJob};
use fleetcmd_proto::v1 as pb;
use fleetcmd_tests::*;
use pb::jobs_client::JobsClient;
use tonic::Code;

use crate::support::*;

/// Commands added to the security policy for these tests.
const HOLD: &str = r#"
[commands.hold]
description = "Hold the agent's only job slot"
argv = ["/bin/sleep", "{secs}"]
args.secs = { kind = "int", min = 1, max = 60 }
timeout = "60s"

[commands.echo_int]
description = "Print an integer argument as the command receives it"
argv = ["/bin/echo", "{n}"]
args.n = { kind = "int", min = 0, max = 100 }
timeout = "10s"
"#;

const AGENT: &str = "dev-1";

fn policy_text(fleet: &TestFleet, version: u64) -> String {
    format!("{}{HOLD}", security_policy(fleet, version))
}

/// One agent with a single job slot, running the security policy plus `HOLD`.
async fn one_slot_fleet() -> TestFleet {
    let mut fleet = start_fleet_with(1, |o| o.agent_max_concurrent_jobs = 1).await;
    let text = policy_text(&fleet, fleet.policy_version + 1);
    fleet.push_policy(&text).await.expect("policy pushed");
    wait_agent_policy(&fleet, fleet.policy_version).await;
    fleet
}

/// Waits until the agent reports running policy `version`.
async fn wait_agent_policy(fleet: &TestFleet, version: u64) {
    let shared = fleet.controller.shared().clone();
    assert_eventually(Duration::from_secs(15), || {
        let shared = shared.clone();
        async move {
            let list = shared.registry.list_agents("").ok()?;
            list.iter()
                .find(|a| a.agent_id == AGENT && a.online && a.policy_version == version)
                .map(|_| ())
        }
    })
    .await
}

async fn submit(fleet: &TestFleet, job: SignedJob) -> String {
    let mut jobs = JobsClient::new(fleet.operator().await);
    jobs.submit(to_pb(job))
        .await
        .expect("job accepted")
        .into_inner()
        .job_id
}

/// Starts a job that holds the agent's only slot and waits until it runs.
async fn hold_the_slot(fleet: &TestFleet) -> String {
    let (_, job) = fleet.operator_job("hold", &[("secs", "30")], "all");
    let id = submit(fleet, job).await;
    let shared = fleet.controller.shared().clone();
    let wait = id.clone();
    assert_eventually(Duration::from_secs(15), || {
        let shared = shared.clone();
        let id = wait.clone();
        async move {
            let j = shared.get_job(&id).ok()?;
            (target(&j, AGENT).target_state() == TargetState::Running).then_some(())
        }
    })
    .await;
    id
}

fn agent_dir(fleet: &TestFleet) -> PathBuf {
    fleet.dir.join("agents").join(AGENT)
}

/// Waits until the agent has authorized job `id` (its id is in the
/// agent's seen-set, written before the job waits for a slot).
async fn wait_queued(fleet: &TestFleet, id: &str) {
    let seen = agent_dir(fleet).join("seen.json");
    assert_eventually(Duration::from_secs(15), || {
        let seen = seen.clone();
        async move {
            let text = std::fs::read_to_string(&seen).ok()?;
            text.contains(id).then_some(())
        }
    })
    .await
}

/// A `mark` job for a fresh marker file; the marker exists only if it ran.
fn mark_job(
    fleet: &TestFleet,
    name: &str,
    edit: impl FnOnce(&mut JobSpec),
) -> (String, SignedJob, PathBuf) {
    let path = marker(fleet, name);
    let mut s = spec(
        "mark",
        &[("path", path.to_str().expect("utf-8"))],
        "all",
        "cli:admin",
    );
    edit(&mut s);
    (s.id.to_string(), sign_op(fleet, &s), path)
}

async fn cancel(fleet: &TestFleet, id: &str) {
    let mut jobs = JobsClient::new(fleet.operator().await);
    jobs.cancel(pb::CancelJobRequest {
        job_id: id.to_owned(),
        requested_by: String::new(),
    })
    .await
    .expect("cancel");
}

/// Asserts the trail holds a record of `kind` about `id` on the agent
/// whose text mentions `needle`.
async fn assert_audited(fleet: &TestFleet, id: &str, kind: &str, needle: &str) {
    let records = audit_of(fleet, id).await;
    assert!(
        records.iter().any(|r| r["event"]["kind"] == kind
            && r.to_string().contains(AGENT)
            && r.to_string().contains(needle)),
        "no {kind} record mentioning {needle:?} for {id}: {records:#?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_queued_job_that_expired_while_waiting_never_starts() {
    let fleet = one_slot_fleet().await;
    let hold = hold_the_slot(&fleet).await;
    // Valid for a few more seconds only (its expiry plus the skew allowance).
    let (id, job, path) = mark_job(&fleet, "expired-in-queue", |s| {
        s.not_before = now() - 100;
        s.expires_at = now() + 4 - CLOCK_SKEW_SECS;
    });
    let expires_at = JobSpec::from_bytes(&job.spec).expect("spec").expires_at;
    submit(&fleet, job).await;
    wait_queued(&fleet, &id).await;
    assert_eventually(Duration::from_secs(15), || async {
        (now() > expires_at + CLOCK_SKEW_SECS).then_some(())
    })
    .await;
    cancel(&fleet, &hold).await; // frees the slot
    let got = fleet.wait_job(&id).await;
    assert_refused(&got, AGENT, "expired");
    assert_absent(&path);
    assert_audited(&fleet, &id, "job_refused_by_agent", "expired").await;
    fleet.fleet.shutdown().await.expect("shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_queued_job_whose_command_a_newer_policy_removed_never_starts() {
    let mut fleet = one_slot_fleet().await;
    let hold = hold_the_slot(&fleet).await;
    let (id, job, path) = mark_job(&fleet, "removed-in-queue", |_| {});
    submit(&fleet, job).await;
    wait_queued(&fleet, &id).await;
    let version = fleet.policy_version + 1;
    let without_mark =
        policy_text(&fleet, version).replace("[commands.mark]", "[commands.mark_v2]");
    fleet
        .push_policy(&without_mark)
        .await
        .expect("newer policy");
    wait_agent_policy(&fleet, version).await;
    cancel(&fleet, &hold).await;
    let got = fleet.wait_job(&id).await;
    assert_refused(&got, AGENT, "not_allowed");
    assert_absent(&path);
    assert_audited(&fleet, &id, "job_refused_by_agent", "not in the allow-list").await;
    fleet.fleet.shutdown().await.expect("shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_queued_job_on_a_revoked_agent_never_starts() {
    let fleet = one_slot_fleet().await;
    let _hold = hold_the_slot(&fleet).await;
    let (id, job, path) = mark_job(&fleet, "revoked-in-queue", |_| {});
    submit(&fleet, job).await;
    wait_queued(&fleet, &id).await;
    let mut agents = pb::agents_client::AgentsClient::new(fleet.operator().await);
    agents
        .revoke(pb::RevokeRequest {
            agent_id: AGENT.into(),
        })
        .await
        .expect("operator revokes");
    // The agent refuses the queued job as soon as its stream is closed, and
    // keeps the refusal (it can no longer deliver it: it is revoked).
    let spooled = agent_dir(&fleet).join("spool").join(format!("{id}.result"));
    let result = assert_eventually(Duration::from_secs(15), || {
        let spooled = spooled.clone();
        async move { std::fs::read(&spooled).ok() }
    })
    .await;
    // The spooled result is a protobuf `JobResult`: its strings are verbatim.
    let has = |needle: &str| result.windows(needle.len()).any(|w| w == needle.as_bytes());
    assert!(has("agent_revoked"), "{}", String::from_utf8_lossy(&result));
    assert!(has("was revoked"), "{}", String::from_utf8_lossy(&result));
    // The controller records and audits the refusal it can no longer receive.
    let got = fleet.wait_job(&id).await;
    let t = target(&got, AGENT);
    assert_eq!(t.target_state(), TargetState::Refused, "{t:?}");
    assert_audited(&fleet, &id, "job_refused", "agent_revoked").await;
    // The slot frees only when the long job ends; the queued job is over
    // already and never starts.
    assert!(
        !agent_dir(&fleet)
            .join("spool")
            .join(format!("{id}.started"))
            .exists(),
        "the refused job was marked started"
    );
    assert_absent(&path);
    fleet.fleet.shutdown().await.expect("shutdown");
    assert_absent(&path);
}

/// An agent revoked while connected to no controller cannot hear of it,
/// and no controller is left to hear from it: its active targets end at
/// the next sweep — the queued job as refused (it had not reported
/// starting, and a refused agent starts nothing), the running one as
/// failed — not at their deadline (found by an outside test: they showed
/// `running` for up to an hour).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_revoked_agent_connected_nowhere_has_its_targets_ended() {
    let mut fleet = one_slot_fleet().await;
    let hold = hold_the_slot(&fleet).await;
    let (id, job, path) = mark_job(&fleet, "revoked-offline", |_| {});
    submit(&fleet, job).await;
    wait_queued(&fleet, &id).await;
    fleet.kill_agent(AGENT);
    let mut agents = pb::agents_client::AgentsClient::new(fleet.operator().await);
    agents
        .revoke(pb::RevokeRequest {
            agent_id: AGENT.into(),
        })
        .await
        .expect("operator revokes");
    for (job, want, why) in [
        (
            &id,
            TargetState::Refused,
            "revoked before it reported starting",
        ),
        (&hold, TargetState::Failed, "revoked while the job ran"),
    ] {
        let got = fleet.wait_job(job).await;
        let t = target(&got, AGENT);
        let reason = t.result.as_ref().map(|r| r.reason.as_str()).unwrap_or("");
        assert_eq!(t.target_state(), want, "{t:?}");
        assert!(reason.contains(why), "{t:?}");
    }
    assert_absent(&path);
    fleet.fleet.shutdown().await.expect("shutdown");
}

/// A controller an agent reconnects to sends it the jobs it is a target of
/// again (several controllers: the one that sent it may have died). A copy
/// that arrives while the job waits for its slot is ignored: the job runs
/// once and its result, not a `replayed` refusal of the copy, is the
/// target's (found in CI: a copy in that window was refused, and the
/// refusal could be stored as the target's result).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_copy_of_a_job_waiting_for_its_slot_is_ignored_and_it_runs_once() {
    let fleet = one_slot_fleet().await;
    let hold = hold_the_slot(&fleet).await;
    let file = marker(&fleet, "copy-in-queue");
    let s = spec(
        "append",
        &[("path", file.to_str().expect("utf-8"))],
        "all",
        "cli:admin",
    );
    let (id, job) = (s.id.to_string(), sign_op(&fleet, &s));
    submit(&fleet, job.clone()).await;
    wait_queued(&fleet, &id).await;
    // The copy, as a controller's redelivery sends it.
    fleet
        .controller
        .shared()
        .inject_job_unchecked(to_pb(job), &id, &[AGENT])
        .await
        .expect("copy sent");
    tokio::time::sleep(Duration::from_secs(1)).await;
    let waiting = fleet.controller.shared().get_job(&id).expect("job");
    assert_eq!(
        target(&waiting, AGENT).target_state(),
        TargetState::Dispatched,
        "the copy was answered while the job waited: {waiting:?}"
    );
    cancel(&fleet, &hold).await; // frees the slot
    let got = fleet.wait_job(&id).await;
    assert_eq!(
        target(&got, AGENT).target_state(),
        TargetState::Ok,
        "{got:?}"
    );
    assert_eq!(lines(&file), 1, "the job ran once");
    fleet.fleet.shutdown().await.expect("shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_job_signed_for_ten_years_is_refused_by_controller_and_agents() {
    let fleet = security_fleet(1).await;
    let ten_years = 10 * 365 * 24 * 3600;
    let (id, job, path) = mark_job(&fleet, "ten-years", |s| {
        s.expires_at = s.not_before + ten_years
    });
    let mut jobs = JobsClient::new(fleet.operator().await);
    assert_status(
        jobs.submit(to_pb(job.clone())).await,
        Code::PermissionDenied,
        "max_job_lifetime",
    );
    assert_not_stored(&fleet, &id);
    let records = audit_of(&fleet, "").await;
    let refused_at_submit = |r: &serde_json::Value| {
        r["event"]["kind"] == "job_refused" && r.to_string().contains("max_job_lifetime")
    };
    // Searched without a job id: the refusal at submit names no job.
    assert!(
        records.iter().any(refused_at_submit),
        "the refusal at submit is not audited"
    );
    // A compromised controller sends it anyway: the agent refuses on its own
    // and does not remember the id for ten years.
    let got = inject(&fleet, job, &id, &[AGENT]).await;
    assert_refused(&got, AGENT, "lifetime_too_long");
    assert_absent(&path);
    assert_audited(&fleet, &id, "job_refused_by_agent", "max_job_lifetime").await;
    let seen = std::fs::read_to_string(agent_dir(&fleet).join("seen.json")).unwrap_or_default();
    assert!(
        !seen.contains(&id),
        "the agent remembers a refused id: {seen}"
    );
    // Control: the longest lifetime the default policy allows is accepted.
    let (_, ok, ok_path) = mark_job(&fleet, "one-day", |s| {
        s.expires_at = s.not_before + 24 * 3600
    });
    let done = fleet.submit_and_wait(ok).await.expect("a day is allowed");
    assert_eq!(
        target(&done, AGENT).target_state(),
        TargetState::Ok,
        "{done:?}"
    );
    assert!(ok_path.exists());
    fleet.fleet.shutdown().await.expect("shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_validated_value_is_the_value_passed() {
    let fleet = one_slot_fleet().await;
    // `tail -n +1` prints everything: `+1` must never reach argv as `+1`.
    for (given, passed) in [("+1", "1\n"), ("007", "7\n"), ("+0", "0\n")] {
        let job = fleet
            .run("echo_int", &[("n", given)], "all")
            .await
            .expect("submitted");
        assert_eq!(
            target(&job, AGENT).target_state(),
            TargetState::Ok,
            "{job:?}"
        );
        assert_eq!(stdout(target(&job, AGENT)), passed, "{given}");
    }
    // Non-ASCII digits and bidi controls: refused by the controller and, when
    // a compromised controller sends them anyway, by the agent.
    for (arg, value) in [("n", "\u{661}"), ("n", "1\u{202e}")] {
        let (spec, job) = fleet.operator_job("echo_int", &[(arg, value)], "all");
        let mut jobs = JobsClient::new(fleet.operator().await);
        assert_status(
            jobs.submit(to_pb(job.clone())).await,
            Code::PermissionDenied,
            "argument `n`",
        );
        let got = inject(&fleet, job, spec.id.as_str(), &[AGENT]).await;
        assert_refused(&got, AGENT, "bad_argument");
    }
    let (spec, job) = fleet.operator_job(
        "mark",
        &[(
            "path",
            &format!("{}/x\u{202e}gol.txt", fleet.path().display()),
        )],
        "all",
    );
    let got = inject(&fleet, job, spec.id.as_str(), &[AGENT]).await;
    assert_refused(&got, AGENT, "bad_argument");
    assert!(result_of(&got, AGENT).reason.contains("U+202E"));
    fleet.fleet.shutdown().await.expect("shutdown");
}
