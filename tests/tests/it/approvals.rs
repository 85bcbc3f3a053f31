//! Two-person approval end to end: a chat request through the real router
//! and controller, approved by another user, runs on real agents with its
//! approver in the signed job; the audit trail records each step; and a job
//! signed without the approvals it needs (a gateway bug or a stolen gateway
//! key) is refused by the controller.

use fleetcmd_proto::v1::JobState;
use std::sync::Arc;
use std::time::Duration;

use crate::support::{Recorder, assert_refused, audit_of, inject, result_of, sign_op};
use fleetcmd_core::approval::GivenApproval;
use fleetcmd_core::audit::EventKind;
use fleetcmd_core::ids::Identity;
use fleetcmd_core::job::SignedJob;
use fleetcmd_gateway::adapters::Incoming;
use fleetcmd_gateway::controller::GrpcController;
use fleetcmd_gateway::router::Router;
use fleetcmd_proto::v1 as pb;
use fleetcmd_tests::*;

fn said(who: &str, text: &str) -> Incoming {
    // A channel of the speaker's own chat (`console` for console users).
    let channel = match who.split(':').next() {
        Some("console") | None => "console".to_string(),
        Some(scheme) => format!("{scheme}:T0001:C0OPS"),
    };
    Incoming {
        identity: Identity::parse(who).expect("identity"),
        channel,
        text: text.into(),
        thread: None,
        direct: true,
        from_bot: false,
    }
}

/// The dev policy plus `reboot-demo`, which needs one approval by carol.
async fn push_approval_policy(fleet: &mut TestFleet) {
    push_reboot_demo_policy(fleet, 1, &["console:carol"]).await;
}

/// The dev policy plus `reboot-demo`, which needs `approvals` approvals by
/// one of `approvers`.
pub(crate) async fn push_reboot_demo_policy(
    fleet: &mut TestFleet,
    approvals: u32,
    approvers: &[&str],
) {
    let base = fleetcmd_cli::fleet::example_policy(
        fleet.policy_version + 1,
        &fleet.gateway_key.public_key(),
        &fleet.operator_key.public_key(),
    );
    let text = base.replace(
        "[roles.admin]",
        &format!(
            "[commands.reboot-demo]\n\
             description = \"Pretend to reboot\"\n\
             argv = [\"/usr/bin/echo\", \"rebooting (demo)\"]\n\
             requires_approvals = {approvals}\n\n\
             [roles.admin]"
        ),
    ) + &format!("\n[approvers]\nreboot-demo = {approvers:?}\n");
    fleet.fleet.push_policy(&text).await.expect("policy pushed");
}

async fn router(fleet: &TestFleet) -> Arc<Router<GrpcController>> {
    let ctl = GrpcController::from_channel(fleet.gateway().await);
    Arc::new(Router::new(fleet.gateway_options().router_config(), ctl))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_approved_chat_request_runs_on_the_agents_and_every_step_is_audited() {
    let mut fleet = start_fleet(2).await;
    push_approval_policy(&mut fleet).await;
    let router = router(&fleet).await;
    let out = Arc::new(Recorder::default());
    let task = {
        let (router, out) = (router.clone(), out.clone());
        tokio::spawn(async move {
            router
                .handle(
                    said("console:alice", "run reboot-demo on all"),
                    out.as_ref(),
                )
                .await;
        })
    };
    let short = assert_eventually(Duration::from_secs(10), || {
        let out = out.clone();
        async move {
            let first = out.texts().first().cloned()?;
            first.split_whitespace().nth(1).map(str::to_string)
        }
    })
    .await;
    assert!(
        out.texts()[0].contains("needs 1 approval"),
        "{:?}",
        out.texts()
    );

    // Another admin who is not listed in [approvers] cannot approve.
    let bob = Recorder::default();
    router
        .handle(said("console:bob", &format!("approve {short}")), &bob)
        .await;
    assert!(
        bob.texts()[0].contains("may not approve"),
        "{:?}",
        bob.texts()
    );
    assert_eq!(router.pending_approvals(), 1);

    let carol = Recorder::default();
    router
        .handle(said("console:carol", &format!("approve {short}")), &carol)
        .await;
    assert!(carol.texts()[0].contains("approved"), "{:?}", carol.texts());
    tokio::time::timeout(Duration::from_secs(30), task)
        .await
        .expect("the run finished")
        .expect("run task");
    let texts = out.texts();
    let last = texts.last().cloned().unwrap_or_default();
    assert!(last.contains("succeeded (2/2 ok)"), "{texts:#?}");
    assert!(last.contains("rebooting (demo)"), "{last}");

    // The controller's record of the job names its approver, and the
    // trail has each step under the job id.
    let jobs = fleet
        .controller
        .shared()
        .list_jobs(10, "", "")
        .expect("jobs");
    let job = jobs
        .iter()
        .find(|j| fleetcmd_core::ids::short_form(&j.job_id) == short)
        .expect("the job");
    let mut audit = pb::audit_client::AuditClient::new(fleet.operator().await);
    let records = audit
        .search(pb::AuditSearchRequest {
            job_id: job.job_id.clone(),
            limit: 100,
            ..Default::default()
        })
        .await
        .expect("audit search")
        .into_inner()
        .records;
    let kinds: Vec<String> = records
        .iter()
        .map(|r| {
            let v: serde_json::Value = serde_json::from_str(r).expect("json record");
            v["event"]["kind"].as_str().unwrap_or_default().to_string()
        })
        .collect();
    for kind in ["approval_requested", "approval_given", "job_submitted"] {
        assert!(kinds.iter().any(|k| k == kind), "{kind} missing: {kinds:?}");
    }
    fleet.fleet.shutdown().await.expect("shutdown");
}

/// The audit records of `job_id`, as (kind, whole record text).
async fn records_of(fleet: &TestFleet, job_id: &str) -> Vec<(String, String)> {
    audit_of(fleet, job_id)
        .await
        .into_iter()
        .map(|v| {
            (
                v["event"]["kind"].as_str().unwrap_or_default().to_string(),
                v.to_string(),
            )
        })
        .collect()
}

/// The insider attack: an operator whose key may sign every command signs
/// a job that needs an approval and puts approvals in it herself — the
/// approver's name as a bare list (how jobs carried approvers before), or
/// as approvals her own key attests. Neither counts: the controller refuses
/// at submit, each agent refuses on its own when a compromised controller
/// forwards the job anyway, and every refusal is in the audit trail. Only
/// an approval attested by the gateway, which vouches for chat identities,
/// makes the job run.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn approvals_cannot_be_forged_by_a_signer_that_does_not_vouch_for_the_approver() {
    let mut fleet = start_fleet(1).await;
    push_approval_policy(&mut fleet).await;
    let mut op = pb::jobs_client::JobsClient::new(fleet.operator().await);
    let carol = GivenApproval {
        approver: Identity::parse("console:carol").expect("identity"),
        channel: "console".into(),
        approved_at: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .expect("clock after 1970")
            .as_secs(),
    };
    // 1. A bare approver list, signed by the operator.
    let mut listed = spec("reboot-demo", &[], "all", "cli:admin");
    listed.unattested_approvers = vec![carol.approver.clone()];
    // 2. Carol's approval attested by the operator's own key.
    let mut self_attested = spec("reboot-demo", &[], "all", "cli:admin");
    self_attested.approvals = vec![carol.attest(
        &self_attested,
        fleetcmd_cli::fleet::OPERATOR_SIGNER,
        &fleet.operator_key,
    )];
    // 3. The gateway's genuine attestation of carol's approval, lifted onto
    //    another job by the operator (it signs that job's digest, not this one).
    let approved_elsewhere = spec("reboot-demo", &[], "all", "cli:admin");
    let mut lifted = spec("reboot-demo", &[], "all", "cli:admin");
    lifted.approvals = vec![carol.attest(
        &approved_elsewhere,
        fleetcmd_cli::fleet::GATEWAY_SIGNER,
        &fleet.gateway_key,
    )];
    for (what, s, why) in [
        (
            "a bare approver list",
            &listed,
            "needs 1 approval(s), got 0",
        ),
        (
            "an approval attested by the operator's key",
            &self_attested,
            "may not vouch for console:carol",
        ),
        (
            "another job's approval",
            &lifted,
            "signature of console:carol's approval does not verify",
        ),
    ] {
        let job = sign_op(&fleet, s);
        let err = op
            .submit(to_pb(job.clone()))
            .await
            .expect_err("a job with forged approvals is refused at submit");
        assert!(err.message().contains(why), "{what}: {err:?}");
        let records = records_of(&fleet, s.id.as_str()).await;
        assert!(
            records
                .iter()
                .any(|(k, r)| k == "job_refused" && r.contains("needs 1 approval")),
            "{what}: refusal not audited: {records:?}"
        );
        // A compromised controller forwards it anyway: the agent refuses.
        let got = inject(&fleet, job, s.id.as_str(), &["dev-1"]).await;
        assert_refused(&got, "dev-1", "missing_approvals");
        let reason = result_of(&got, "dev-1").reason;
        assert!(reason.contains(why), "{what}: {reason}");
        let records = records_of(&fleet, s.id.as_str()).await;
        assert!(
            records.iter().any(|(k, _)| k == "job_refused_by_agent"),
            "{what}: agent refusal not audited: {records:?}"
        );
    }
    // The requester approving her own job through the gateway does not count.
    let mut own = spec("reboot-demo", &[], "all", "console:carol");
    own.approvals = vec![carol.attest(
        &own,
        fleetcmd_cli::fleet::GATEWAY_SIGNER,
        &fleet.gateway_key,
    )];
    let mut gw = pb::jobs_client::JobsClient::new(fleet.gateway().await);
    let err = gw
        .submit(to_pb(SignedJob::sign(
            &own,
            fleetcmd_cli::fleet::GATEWAY_SIGNER,
            &fleet.gateway_key,
        )))
        .await
        .expect_err("own approval refused");
    assert!(
        err.message().contains("console:carol requested the job"),
        "{err:?}"
    );

    // Control: the gateway attests carol's approval of alice's job: it runs,
    // and the job's audit record names the approval.
    let mut good = spec("reboot-demo", &[], "all", "console:alice");
    good.approvals = vec![carol.attest(
        &good,
        fleetcmd_cli::fleet::GATEWAY_SIGNER,
        &fleet.gateway_key,
    )];
    let ok = gw
        .submit(to_pb(SignedJob::sign(
            &good,
            fleetcmd_cli::fleet::GATEWAY_SIGNER,
            &fleet.gateway_key,
        )))
        .await
        .expect("approved by carol, attested by the gateway")
        .into_inner();
    let job = fleet.wait_job(&ok.job_id).await;
    assert_eq!(job.job_state(), JobState::Succeeded, "{job:?}");
    let records = records_of(&fleet, &ok.job_id).await;
    assert!(
        records
            .iter()
            .any(|(k, r)| k == "job_submitted"
                && r.contains("console:carol in console via gateway-dev")),
        "{records:?}"
    );
    fleet.fleet.shutdown().await.expect("shutdown");
}

/// Kinds `audit::real_flows_produce_their_audit_events` produces.
const KINDS_FROM_THE_MAIN_AUDIT_FLOW: [EventKind; 12] = [
    EventKind::TokenCreated,
    EventKind::TokenUsed,
    EventKind::AgentJoined,
    EventKind::PolicyPushed,
    EventKind::PolicyRefused,
    EventKind::JobSubmitted,
    EventKind::JobDispatched,
    EventKind::JobFinished,
    EventKind::JobRefusedByAgent,
    EventKind::AuthFailed,
    EventKind::AgentRevoked,
    EventKind::ChatDenied,
];

/// Kinds `health::a_service_goes_degraded_down_and_ok_with_one_chat_message_per_change`
/// produces (and asserts) from real agents' checks and a chat silence.
const KINDS_FROM_THE_HEALTH_FLOW: [EventKind; 2] =
    [EventKind::ServiceChanged, EventKind::ServiceSilenced];

/// Kinds the `operators::*` tests produce (and assert) with separate
/// `fleetcmd` processes: refused operator actions and certificate revocations.
const KINDS_FROM_THE_OPERATORS_FLOW: [EventKind; 2] =
    [EventKind::PermissionDenied, EventKind::CertRevoked];

/// Kinds the `gateway_restart::*` tests produce (and assert) with the real
/// `fleetcmd-gateway` killed and restarted: approvals dropped after a restart.
const KINDS_FROM_THE_GATEWAY_RESTART_FLOW: [EventKind; 1] = [EventKind::ApprovalDropped];

/// The other kinds, each from a real flow against a real controller and
/// agents: certificate renewal, a refused token, a job refused at submit,
/// a cancel, and every approval outcome through the real router. Together
/// with the main audit flow this covers every kind there is.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_event_kind_is_recorded_from_a_real_flow() {
    let mut fleet = start_fleet_with(1, |o| o.agent_cert_ttl = Duration::from_secs(3)).await;
    push_approval_policy(&mut fleet).await;

    // A malformed join token.
    let _ = pb::enrollment_client::EnrollmentClient::new(fleet.anonymous().await)
        .join(pb::JoinRequest {
            token: "fct1_not-a-token".into(),
            csr_der: Vec::new(),
            name: "intruder".into(),
        })
        .await
        .expect_err("refused");
    // A job signed by a key the policy does not know, refused at submit.
    let forged = SignedJob::sign(
        &spec("uptime", &[], "all", "cli:admin"),
        fleetcmd_cli::fleet::OPERATOR_SIGNER,
        &stranger_key(),
    );
    let _ = pb::jobs_client::JobsClient::new(fleet.operator().await)
        .submit(to_pb(forged))
        .await
        .expect_err("forged job refused");
    // A long job, canceled.
    let (_, sleeper) = fleet.operator_job("sleep", &[("seconds", "600")], "all");
    let mut jobs = pb::jobs_client::JobsClient::new(fleet.operator().await);
    let sub = jobs
        .submit(to_pb(sleeper))
        .await
        .expect("submitted")
        .into_inner();
    jobs.cancel(pb::CancelJobRequest {
        job_id: sub.job_id.clone(),
        requested_by: "cli:admin".into(),
    })
    .await
    .expect("canceled");
    fleet.wait_job(&sub.job_id).await;

    // Approvals: one approved, one denied, one left to expire.
    let ctl = GrpcController::from_channel(fleet.gateway().await);
    // A short approval window only where the request is left to expire:
    // an `approve` or `deny` that comes late on a loaded machine would
    // otherwise find it expired (seen once in CI).
    let router_with = |window| {
        let mut cfg = fleet.gateway_options().router_config();
        cfg.approval_window = window;
        Arc::new(Router::new(cfg, ctl.clone()))
    };
    let (decided, expiring) = (
        router_with(Duration::from_secs(60)),
        router_with(Duration::from_millis(1500)),
    );
    for decision in ["approve", "deny", "expire"] {
        let router = if decision == "expire" {
            &expiring
        } else {
            &decided
        };
        let out = Arc::new(Recorder::default());
        let task = {
            let (router, out) = (router.clone(), out.clone());
            tokio::spawn(async move {
                router
                    .handle(
                        said("console:alice", "run reboot-demo on all"),
                        out.as_ref(),
                    )
                    .await;
            })
        };
        let short = assert_eventually(Duration::from_secs(10), || {
            let out = out.clone();
            async move {
                let first = out.texts().first().cloned()?;
                first.split_whitespace().nth(1).map(str::to_string)
            }
        })
        .await;
        let carol = Recorder::default();
        match decision {
            "approve" => {
                router
                    .handle(said("console:carol", &format!("approve {short}")), &carol)
                    .await
            }
            "deny" => {
                router
                    .handle(
                        said("console:carol", &format!("deny {short} not now")),
                        &carol,
                    )
                    .await
            }
            _ => {}
        }
        tokio::time::timeout(Duration::from_secs(30), task)
            .await
            .expect("the run finished")
            .expect("run task");
    }
    let router = decided;
    // A registered command's call is reported and recorded (`chat_command`).
    router
        .register_commands(Arc::new(fleetcmd_gateway::prometheus::not_configured()))
        .expect("query registered");
    let out = Recorder::default();
    router.handle(said("console:alice", "query up"), &out).await;
    assert!(
        out.texts()
            .iter()
            .any(|t| t.contains("needs a Prometheus server")),
        "{:?}",
        out.texts()
    );

    // The agent's certificate (3 s) has been renewed at least once by now.
    let audit = pb::audit_client::AuditClient::new(fleet.operator().await);
    let seen = assert_eventually(Duration::from_secs(20), || {
        let mut audit = audit.clone();
        async move {
            let records = audit
                .search(pb::AuditSearchRequest {
                    limit: 1000,
                    ..Default::default()
                })
                .await
                .ok()?
                .into_inner()
                .records;
            let seen: std::collections::BTreeSet<String> = records
                .iter()
                .filter_map(|r| serde_json::from_str::<serde_json::Value>(r).ok())
                .filter_map(|v| v["event"]["kind"].as_str().map(str::to_string))
                .collect();
            seen.contains("agent_renewed").then_some(seen)
        }
    })
    .await;
    let mut missing = Vec::new();
    for kind in EventKind::ALL {
        if !seen.contains(kind.as_str())
            && !KINDS_FROM_THE_MAIN_AUDIT_FLOW.contains(kind)
            && !KINDS_FROM_THE_HEALTH_FLOW.contains(kind)
            && !KINDS_FROM_THE_OPERATORS_FLOW.contains(kind)
            && !KINDS_FROM_THE_GATEWAY_RESTART_FLOW.contains(kind)
        {
            missing.push(kind.as_str());
        }
    }
    assert!(
        missing.is_empty(),
        "no real flow produced {missing:?}; seen {seen:?}"
    );
    for kind in [
        "agent_renewed",
        "token_refused",
        "job_refused",
        "job_canceled",
        "approval_requested",
        "approval_given",
        "approval_denied",
        "approval_expired",
    ] {
        assert!(seen.contains(kind), "{kind} missing: {seen:?}");
    }
    fleet.fleet.shutdown().await.expect("shutdown");
}

/// The audit channel: selected events reach one chat channel as they
/// happen, each once, and other kinds do not.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_audit_channel_posts_selected_events_once_as_they_happen() {
    let mut fleet = start_fleet(1).await;
    let router = router(&fleet).await;
    let out = Arc::new(Recorder::default());
    let feed = tokio::spawn(fleetcmd_gateway::audit_feed::run(
        router.clone(),
        out.clone(),
        "console".to_string(),
        fleetcmd_gateway::audit_feed::DEFAULT_KINDS.to_vec(),
        Duration::from_millis(100),
    ));
    // Let the feed find the end of the trail: nothing before it is posted.
    tokio::time::sleep(Duration::from_millis(300)).await;
    push_approval_policy(&mut fleet).await;
    // A refused chat command (a Slack user the dev policy does not bind),
    // and a job (job events are not selected).
    let mallory = Recorder::default();
    router
        .handle(said("slack:T0001:U0MALLORY", "run uptime on all"), &mallory)
        .await;
    assert!(
        mallory.texts()[0].contains("no roles"),
        "{:?}",
        mallory.texts()
    );
    fleet.run("uptime", &[], "all").await.expect("job");
    let posted = assert_eventually(Duration::from_secs(10), || {
        let out = out.clone();
        async move {
            let all = out.texts().join("\n");
            (all.contains("policy_pushed") && all.contains("chat_denied")).then_some(all)
        }
    })
    .await;
    // One more poll, to catch repeats.
    tokio::time::sleep(Duration::from_millis(400)).await;
    let all = out.texts().join("\n");
    assert_eq!(all.matches("policy_pushed").count(), 1, "{all}");
    assert!(
        !all.contains("job_submitted") && !all.contains("job_finished"),
        "{all}"
    );
    assert!(
        !all.contains("agent_joined"),
        "history is not replayed: {posted}"
    );
    feed.abort();
    fleet.fleet.shutdown().await.expect("shutdown");
}

/// `audit verify` from chat: the controller verifies its stored chain and
/// the router answers with the span it checked.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn audit_verify_from_chat_reports_the_verified_span() {
    let fleet = start_fleet(1).await;
    fleet.run("uptime", &[], "all").await.expect("job");
    let router = router(&fleet).await;
    let out = Recorder::default();
    router
        .handle(said("console:alice", "audit verify"), &out)
        .await;
    let text = out.texts().join("\n");
    assert!(text.contains("audit trail ok: records 1.."), "{text}");
    // Someone without a role in the channel gets nothing.
    let stranger = Recorder::default();
    router
        .handle(said("slack:T0001:U0NOBODY", "audit verify"), &stranger)
        .await;
    let text = stranger.texts().join("\n");
    assert!(text.contains("no roles"), "{text}");
    fleet.fleet.shutdown().await.expect("shutdown");
}
