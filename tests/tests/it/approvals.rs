//! Two-person approval end to end: a chat request through the real router
//! and controller, approved by another user, runs on real agents with its
//! approver in the signed job; the audit trail records each step; and a job
//! signed without the approvals it needs (a gateway bug or a stolen gateway
//! key) is refused by the controller.

use std::sync::Arc;
use std::time::Duration;

use crate::support::Recorder;
use fleetcmd_core::audit::EventKind;
use fleetcmd_core::ids::Identity;
use fleetcmd_core::job::SignedJob;
use fleetcmd_gateway::adapters::Incoming;
use fleetcmd_gateway::controller::GrpcController;
use fleetcmd_gateway::router::Router;
use fleetcmd_proto::v1 as pb;
use fleetcmd_tests::*;

fn said(who: &str, text: &str) -> Incoming {
    Incoming {
        identity: Identity::parse(who).expect("identity"),
        channel: "console".into(),
        text: text.into(),
        thread: None,
        direct: true,
        from_bot: false,
    }
}

/// The dev policy plus `reboot-demo`, which needs one approval by carol.
async fn push_approval_policy(fleet: &mut TestFleet) {
    let base = fleetcmd_cli::fleet::example_policy(
        fleet.policy_version + 1,
        &fleet.gateway_key.public_key(),
        &fleet.operator_key.public_key(),
    );
    let text = base.replace(
        "[roles.admin]",
        "[commands.reboot-demo]\n\
         description = \"Pretend to reboot\"\n\
         argv = [\"/usr/bin/echo\", \"rebooting (demo)\"]\n\
         requires_approvals = 1\n\n\
         [roles.admin]",
    ) + "\n[approvers]\nreboot-demo = [\"console:carol\"]\n";
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
        .find(|j| j.job_id.starts_with(&short))
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

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_job_signed_without_its_approvals_is_refused_by_the_controller() {
    let mut fleet = start_fleet(1).await;
    push_approval_policy(&mut fleet).await;
    let mut jobs = pb::jobs_client::JobsClient::new(fleet.gateway().await);
    let sign = |approvers: &[&str]| {
        let mut s = spec("reboot-demo", &[], "all", "console:alice");
        s.approvers = approvers
            .iter()
            .map(|a| Identity::parse(a).expect("identity"))
            .collect();
        to_pb(SignedJob::sign(
            &s,
            fleetcmd_cli::fleet::GATEWAY_SIGNER,
            &fleet.gateway_key,
        ))
    };
    // None; the requester approving herself; someone [approvers] does not name.
    for approvers in [&[][..], &["console:alice"], &["console:mallory"]] {
        let err = jobs
            .submit(sign(approvers))
            .await
            .expect_err("an unapproved job is refused");
        assert!(
            err.message().contains("needs 1 approval(s), got 0"),
            "{approvers:?}: {err:?}"
        );
    }
    let ok = jobs
        .submit(sign(&["console:carol"]))
        .await
        .expect("approved by carol")
        .into_inner();
    let job = fleet.wait_job(&ok.job_id).await;
    assert_eq!(job.state, "succeeded", "{job:?}");
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
    let mut cfg = fleet.gateway_options().router_config();
    cfg.approval_window = Duration::from_millis(1500);
    let router = Arc::new(Router::new(cfg, ctl));
    for decision in ["approve", "deny", "expire"] {
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
