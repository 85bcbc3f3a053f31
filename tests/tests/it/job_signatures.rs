//! ARCHITECTURE.md invariants 4 and 5: a job runs only when a trusted signer signed exactly
//! these bytes, within their validity window, and only once. The controller
//! checks this at submit, and each agent checks it again on its own (shown
//! by injecting jobs as a compromised controller would).

use fleetcmd_proto::v1::{JobState, TargetState};
use std::time::Duration;

use fleetcmd_core::job::{JobSpec, SignedJob};
use fleetcmd_proto::v1 as pb;
use fleetcmd_tests::*;
use pb::jobs_client::JobsClient;
use tonic::Code;

use crate::support::*;

struct Forged {
    label: &'static str,
    job: SignedJob,
    id: String,
    /// Files the job would have created had it run.
    markers: Vec<std::path::PathBuf>,
    /// The agent's reason code.
    code: &'static str,
    /// What the controller's refusal says.
    message: &'static str,
}

/// Jobs that must never run: unsigned, tampered, wrongly keyed, from an
/// unknown signer, expired, not yet valid. `tag` keeps marker names apart.
fn forged_jobs(fleet: &TestFleet, tag: &str) -> Vec<Forged> {
    let path = |name: &str| marker(fleet, &format!("{tag}-{name}"));
    let mark = |name: &str| {
        let p = path(name);
        (
            spec(
                "mark",
                &[("path", p.to_str().expect("utf-8"))],
                "all",
                "cli:admin",
            ),
            p,
        )
    };
    let forged = |label, job: SignedJob, spec: &JobSpec, markers, code, message| Forged {
        label,
        id: spec.id.to_string(),
        job,
        markers,
        code,
        message,
    };
    let mut out = Vec::new();

    // A key the policy trusts, speaking for someone it does not vouch for:
    // the gateway's key (chat identities only) asking as the operator — or
    // any operator's key asking in another's name.
    let (s, p) = mark("other-key");
    let job = SignedJob::sign(&s, fleet::GATEWAY_SIGNER, &fleet.gateway_key);
    out.push(forged(
        "signed by a key that does not vouch for the requester",
        job,
        &s,
        vec![p],
        "signer_may_not_vouch",
        "may not sign for cli:admin",
    ));

    let (s, p) = mark("unsigned");
    let job = SignedJob {
        spec: s.to_bytes(),
        signature: Vec::new(),
        key_id: fleet::OPERATOR_SIGNER.into(),
    };
    out.push(forged(
        "unsigned",
        job,
        &s,
        vec![p],
        "bad_signature",
        "signature does not verify",
    ));

    // Signed for ".../tamper-aaaa", then the path is changed in the signed bytes.
    let (s, signed_path) = mark("tamper-aaaa");
    let mut job = sign_op(fleet, &s);
    let (from, to) = (format!("{tag}-tamper-aaaa"), format!("{tag}-tamper-bbbb"));
    let at = job
        .spec
        .windows(from.len())
        .position(|w| w == from.as_bytes())
        .expect("path in the spec bytes");
    job.spec[at..at + to.len()].copy_from_slice(to.as_bytes());
    let tampered = JobSpec::from_bytes(&job.spec).expect("still a well-formed spec");
    assert_eq!(
        tampered.args["path"],
        path("tamper-bbbb").to_str().expect("utf-8")
    );
    out.push(forged(
        "tampered",
        job,
        &s,
        vec![signed_path, path("tamper-bbbb")],
        "bad_signature",
        "signature does not verify",
    ));

    let (s, p) = mark("wrong-key");
    let job = SignedJob::sign(&s, fleet::OPERATOR_SIGNER, &stranger_key());
    out.push(forged(
        "wrong key",
        job,
        &s,
        vec![p],
        "bad_signature",
        "signature does not verify",
    ));

    let (s, p) = mark("unknown-signer");
    let job = SignedJob::sign(&s, "mallory", &stranger_key());
    out.push(forged(
        "unknown signer",
        job,
        &s,
        vec![p],
        "unknown_signer",
        "unknown signer",
    ));

    let (mut s, p) = mark("expired");
    s.not_before = now() - 900;
    s.expires_at = now() - 2 * fleetcmd_core::job::CLOCK_SKEW_SECS;
    let job = sign_op(fleet, &s);
    out.push(forged("expired", job, &s, vec![p], "expired", "expired"));

    let (mut s, p) = mark("not-yet-valid");
    s.not_before = now() + 5 * fleetcmd_core::job::CLOCK_SKEW_SECS;
    s.expires_at = s.not_before + 600;
    let job = sign_op(fleet, &s);
    out.push(forged(
        "not yet valid",
        job,
        &s,
        vec![p],
        "not_yet_valid",
        "not yet valid",
    ));
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn controller_refuses_forged_and_stale_jobs_at_submit() {
    let fleet = security_fleet(2).await;
    let mut jobs = JobsClient::new(fleet.operator().await);
    for f in forged_jobs(&fleet, "ctl") {
        let res = jobs.submit(to_pb(f.job)).await;
        let status = assert_status(res, Code::PermissionDenied, f.message);
        assert!(
            status.message().contains("refused"),
            "{}: {status:?}",
            f.label
        );
        assert_not_stored(&fleet, &f.id);
        f.markers.iter().for_each(|m| assert_absent(m));
    }
    // Control: a genuine job of the same shape runs.
    let ok = marker(&fleet, "ctl-genuine");
    let job = fleet
        .run("mark", &[("path", ok.to_str().expect("utf-8"))], "all")
        .await
        .expect("genuine job accepted");
    assert_eq!(job.job_state(), JobState::Succeeded, "{job:?}");
    assert!(ok.exists());
    fleet.fleet.shutdown().await.expect("shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn agents_refuse_forged_and_stale_jobs_on_their_own() {
    let fleet = security_fleet(2).await;
    for f in forged_jobs(&fleet, "agent") {
        let job = inject(&fleet, f.job, &f.id, &["dev-1", "dev-2"]).await;
        for agent in ["dev-1", "dev-2"] {
            assert_refused(&job, agent, f.code);
        }
        assert_eq!(job.job_state(), JobState::Failed, "{}: {job:?}", f.label);
        f.markers.iter().for_each(|m| assert_absent(m));
    }
    // A genuine job for dev-1, redirected by the controller to dev-2.
    let m = marker(&fleet, "agent-redirected");
    let (spec, job) = fleet.operator_job(
        "mark",
        &[("path", m.to_str().expect("utf-8"))],
        "name=dev-1",
    );
    let got = inject(&fleet, job, spec.id.as_str(), &["dev-2"]).await;
    assert_refused(&got, "dev-2", "not_targeted");
    assert_absent(&m);

    // Control: a genuine job injected the same way runs.
    let ok = marker(&fleet, "agent-genuine");
    let (spec, job) = fleet.operator_job("mark", &[("path", ok.to_str().expect("utf-8"))], "all");
    let job = inject(&fleet, job, spec.id.as_str(), &["dev-1", "dev-2"]).await;
    assert_eq!(job.job_state(), JobState::Succeeded, "{job:?}");
    assert!(ok.exists());
    fleet.fleet.shutdown().await.expect("shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn replayed_job_runs_once_even_across_an_agent_restart() {
    let mut fleet = security_fleet(2).await;
    let file = marker(&fleet, "replay-count");
    let (spec, job) = fleet.operator_job(
        "append",
        &[("path", file.to_str().expect("utf-8"))],
        "name=dev-1",
    );
    let id = spec.id.to_string();

    let first = fleet
        .submit_and_wait(job.clone())
        .await
        .expect("first submission");
    assert_eq!(
        target(&first, "dev-1").target_state(),
        TargetState::Ok,
        "{first:?}"
    );
    assert_eq!(lines(&file), 1);

    // The controller refuses the same job id again.
    let mut jobs = JobsClient::new(fleet.operator().await);
    assert_status(
        jobs.submit(to_pb(job.clone())).await,
        Code::AlreadyExists,
        "already submitted",
    );

    // A compromised controller replays it straight to the agent.
    let again = inject(&fleet, job.clone(), &id, &["dev-1"]).await;
    assert_refused(&again, "dev-1", "replayed");
    assert_eq!(lines(&file), 1, "the replay ran");

    // The seen-set survives a restart of the agent.
    fleet.stop_agent("dev-1").await;
    wait_offline(&fleet, "dev-1").await;
    fleet.start_agent("dev-1", None).expect("agent restarts");
    fleet
        .wait_online(Duration::from_secs(10))
        .await
        .expect("agent back online");
    let after_restart = inject(&fleet, job, &id, &["dev-1"]).await;
    assert_refused(&after_restart, "dev-1", "replayed");
    assert_eq!(lines(&file), 1, "the replay ran after the restart");

    // Control: the restarted agent still runs new jobs.
    let fresh = fleet
        .run(
            "append",
            &[("path", file.to_str().expect("utf-8"))],
            "name=dev-1",
        )
        .await
        .expect("fresh job");
    assert_eq!(
        target(&fresh, "dev-1").target_state(),
        TargetState::Ok,
        "{fresh:?}"
    );
    assert_eq!(lines(&file), 2);
    fleet.fleet.shutdown().await.expect("shutdown");
}

/// A signer that may sign every command still asks only within its
/// requester's roles: an operator bound to a role for `role=web` hosts has
/// a job on `all` refused by the controller and, forwarded anyway, by each
/// agent on its own; both are audited. On `role=web` it runs.
/// An operator's key signs the job's channel too: naming a chat channel
/// (to use a role scoped to it) is refused at submit and by every agent
/// (found by an outside test: channel-scoped roles worked from the CLI).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operator_job_that_names_a_chat_channel_is_refused() {
    let fleet = security_fleet(1).await;
    let m = marker(&fleet, "foreign-channel");
    let mut spec = fleetcmd_tests::spec(
        "mark",
        &[("path", m.to_str().expect("utf-8"))],
        "all",
        "cli:admin",
    );
    spec.channel = "console".into();
    let job = SignedJob::sign(
        &spec,
        fleetcmd_cli::fleet::OPERATOR_SIGNER,
        &fleet.operator_key,
    );
    let res = JobsClient::new(fleet.operator().await)
        .submit(to_pb(job.clone()))
        .await;
    assert_status(
        res,
        Code::PermissionDenied,
        "is not on cli:admin's platform",
    );
    let got = inject(&fleet, job, spec.id.as_str(), &["dev-1"]).await;
    assert_refused(&got, "dev-1", "requester_may_not_run");
    assert_absent(&m);
    fleet.fleet.shutdown().await.expect("shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_job_runs_only_within_its_requesters_roles() {
    let mut fleet = security_fleet(2).await;
    let text = security_policy(&fleet, fleet.policy_version + 1).replace(
        "[roles.admin]\ncommands = [\"*\"]",
        "[roles.admin]\ncommands = [\"*\"]\ntargets = \"role=web\"",
    );
    assert!(text.contains("targets = \"role=web\""), "{text}");
    fleet.push_policy(&text).await.expect("policy pushed");
    fleet
        .wait_online(Duration::from_secs(10))
        .await
        .expect("agents take the policy");
    let m = marker(&fleet, "beyond-roles");
    let (spec, job) = fleet.operator_job("mark", &[("path", m.to_str().expect("utf-8"))], "all");
    let res = JobsClient::new(fleet.operator().await)
        .submit(to_pb(job.clone()))
        .await;
    assert_status(res, Code::PermissionDenied, "may only target `role=web`");
    let refused_at_submit = audit_of(&fleet, spec.id.as_str()).await;
    assert!(
        refused_at_submit
            .iter()
            .any(|r| r["event"]["kind"] == "job_refused"),
        "{refused_at_submit:?}"
    );
    let got = inject(&fleet, job, spec.id.as_str(), &["dev-1", "dev-2"]).await;
    for agent in ["dev-1", "dev-2"] {
        assert_refused(&got, agent, "requester_may_not_run");
    }
    assert_absent(&m);
    let records = audit_of(&fleet, spec.id.as_str()).await;
    assert!(
        records
            .iter()
            .any(|r| r["event"]["kind"] == "job_refused_by_agent"),
        "{records:?}"
    );
    let ok = marker(&fleet, "within-roles");
    let job = fleet
        .run("mark", &[("path", ok.to_str().expect("utf-8"))], "role=web")
        .await
        .expect("within the role");
    assert_eq!(job.job_state(), JobState::Succeeded, "{job:?}");
    fleet.fleet.shutdown().await.expect("shutdown");
}

/// A job id dated far from when its job was made (1970, the year 10889)
/// is refused at submit and audited, so no one hides a job from `jobs` or
/// pins one on top (found by an outside test).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_id_dated_far_from_its_making_is_refused_at_submit() {
    let fleet = security_fleet(1).await;
    for ms in [0u64, 0xffff_ffff_ffff, now() * 1000 + 3_600_000] {
        let mut bytes = *uuid::Uuid::now_v7().as_bytes();
        bytes[..6].copy_from_slice(&ms.to_be_bytes()[2..]);
        let id = fleetcmd_core::ids::JobId::from_uuid_v7_bytes(bytes).expect("v7 id");
        let mut spec = fleetcmd_tests::spec("uptime", &[], "all", "cli:admin");
        spec.id = id.clone();
        let job = SignedJob::sign(
            &spec,
            fleetcmd_cli::fleet::OPERATOR_SIGNER,
            &fleet.operator_key,
        );
        let res = JobsClient::new(fleet.operator().await)
            .submit(to_pb(job))
            .await;
        assert_status(
            res,
            Code::PermissionDenied,
            "in the future or long before its not_before",
        );
        assert!(fleet.controller.shared().get_job(id.as_str()).is_err());
    }
    // Made now: runs.
    let job = fleet.run("uptime", &[], "all").await.expect("a fresh id");
    assert_eq!(job.job_state(), JobState::Succeeded, "{job:?}");
    fleet.fleet.shutdown().await.expect("shutdown");
}

/// Core has no list of chat platforms (each adapter checks its own form):
/// an agent built before a platform existed runs its users' jobs when the
/// policy grants them, and still refuses an identity that is malformed
/// whatever the platform.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_platform_core_never_heard_of_runs_jobs_and_malformed_identities_do_not() {
    let mut fleet = security_fleet(1).await;
    let text = security_policy(&fleet, fleet.policy_version + 1)
        .replace(
            "vouches_for = [\"console:*\"]",
            "vouches_for = [\"console:*\", \"zulip:chat.example.com:*\"]",
        )
        .replace(
            "subjects = [\"console:*\", \"cli:*\"]",
            "subjects = [\"console:*\", \"cli:*\", \"zulip:chat.example.com:*\"]",
        );
    assert!(
        text.contains("\"zulip:chat.example.com:*\"]\nroles"),
        "{text}"
    );
    fleet.push_policy(&text).await.expect("policy pushed");
    fleet
        .wait_online(Duration::from_secs(10))
        .await
        .expect("agents take the policy");

    let zulip_job = |name: &str| {
        let m = marker(&fleet, name);
        let mut s = spec(
            "mark",
            &[("path", m.to_str().expect("utf-8"))],
            "all",
            "zulip:chat.example.com:42",
        );
        s.channel = "zulip:chat.example.com:ops".into();
        (s, m)
    };

    // Well-formed: accepted at submit and run by the agent.
    let (s, m) = zulip_job("new-platform");
    let job = SignedJob::sign(&s, fleet::GATEWAY_SIGNER, &fleet.gateway_key);
    JobsClient::new(fleet.gateway().await)
        .submit(to_pb(job))
        .await
        .expect("a job from a new platform is accepted");
    let done = fleet.wait_job(s.id.as_str()).await;
    assert_eq!(target(&done, "dev-1").state, "ok", "{done:?}");
    assert!(m.exists(), "the new platform's job ran");

    // Malformed identities, signed by the same trusted key over exactly
    // these bytes: refused by the controller and, on its own, by the agent.
    for (i, bad) in [
        "Zulip:chat.example.com:42",
        "zulip:",
        "zulip:chat.example.com:",
        "zu lip:42",
        "zulip:chat.example.com:4\u{202e}2",
    ]
    .into_iter()
    .enumerate()
    {
        let (s, m) = zulip_job(&format!("malformed-{i}"));
        let text = String::from_utf8(s.to_bytes()).expect("a spec is JSON");
        let forged = text.replace(
            "\"zulip:chat.example.com:42\"",
            &serde_json::to_string(bad).expect("json string"),
        );
        assert_ne!(forged, text, "the requester is in the spec");
        let bytes = forged.into_bytes();
        let job = SignedJob {
            signature: fleet.gateway_key.sign(&bytes),
            spec: bytes,
            key_id: fleet::GATEWAY_SIGNER.into(),
        };
        let res = JobsClient::new(fleet.gateway().await)
            .submit(to_pb(job.clone()))
            .await;
        assert_status(
            res,
            Code::PermissionDenied,
            "malformed job spec: invalid identity",
        );
        let got = inject(&fleet, job, s.id.as_str(), &["dev-1"]).await;
        assert_refused(&got, "dev-1", "malformed");
        assert_absent(&m);
    }
    fleet.fleet.shutdown().await.expect("shutdown");
}
