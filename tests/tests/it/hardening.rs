//! Issue 9's attacks on signed metadata, enrollment and time that the other
//! modules do not already cover: rollback across an agent restart, freeze,
//! mix-and-match, M-of-N roots, size limits, concurrent token use, failed-join
//! rate limiting, renewal while the controller is down, clock skew.

use fleetcmd_proto::v1::JobState;
use std::time::Duration;

use fleetcmd_core::policy_bundle::sign_bundle;
use fleetcmd_proto::v1 as pb;
use fleetcmd_tests::*;

use crate::support::*;

fn signed(text: &str, keys: &[&fleetcmd_core::crypto::SigningKey]) -> pb::SignedPolicy {
    pb::SignedPolicy {
        bundle: text.as_bytes().to_vec(),
        signatures: keys
            .iter()
            .map(|k| {
                let s = sign_bundle(text.as_bytes(), k);
                pb::PolicySignature {
                    key_id: s.key_id,
                    signature: s.signature,
                }
            })
            .collect(),
    }
}

/// Waits until every agent reports `version` in a heartbeat after now.
async fn wait_versions(fleet: &TestFleet, version: u64) {
    let shared = fleet.controller.shared().clone();
    assert_eventually(Duration::from_secs(10), || {
        let shared = shared.clone();
        async move {
            let l = shared.registry.list_agents("").ok()?;
            l.iter()
                .filter(|a| !a.revoked)
                .all(|a| a.online && a.policy_version == version)
                .then_some(())
        }
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn rollback_is_refused_across_an_agent_restart() {
    let mut fleet = security_fleet(1).await; // version 2
    let v2 = security_policy(&fleet, 2);
    let v3 = security_policy(&fleet, 3);
    fleet.push_policy(&v3).await.expect("v3");
    fleet
        .wait_online(Duration::from_secs(10))
        .await
        .expect("v3 everywhere");
    fleet.stop_agent("dev-1").await;
    fleet.start_agent("dev-1", None).expect("restart");
    fleet
        .wait_online(Duration::from_secs(10))
        .await
        .expect("back with v3 from disk");
    // A genuinely signed but older bundle, offered by a compromised controller.
    fleet
        .controller
        .shared()
        .inject_policy_unchecked(signed(&v2, &[&fleet.admin_key]));
    // The agent keeps v3: a job for a command only v3... both have the same
    // commands, so check the reported version after fresh heartbeats.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    wait_versions(&fleet, 3).await;
    fleet.fleet.shutdown().await.expect("shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_expired_policy_freezes_nothing_agents_refuse_and_report_it() {
    let mut fleet = security_fleet(1).await;
    let expires = time::OffsetDateTime::now_utc() + time::Duration::seconds(2);
    let text = security_policy(&fleet, 3).replacen(
        "version = 3",
        &format!(
            "version = 3\nexpires = \"{}\"",
            expires
                .format(&time::format_description::well_known::Rfc3339)
                .expect("rfc3339")
        ),
        1,
    );
    fleet.push_policy(&text).await.expect("v3 with expiry");
    fleet
        .wait_online(Duration::from_secs(10))
        .await
        .expect("v3");
    tokio::time::sleep_until(tokio::time::Instant::now() + Duration::from_secs(3)).await;
    let m = marker(&fleet, "after-expiry");
    let (spec, job) = fleet.operator_job("mark", &[("path", m.to_str().expect("utf-8"))], "all");
    let done = inject(&fleet, job, spec.id.as_str(), &["dev-1"]).await;
    assert_refused(&done, "dev-1", "policy_expired");
    assert_absent(&m);
    // The agent says so in its health, where operators look.
    let shared = fleet.controller.shared().clone();
    let a = assert_eventually(Duration::from_secs(10), || {
        let shared = shared.clone();
        async move {
            shared
                .registry
                .list_agents("")
                .ok()?
                .into_iter()
                .find(|a| a.agent_id == "dev-1" && a.policy_expired)
        }
    })
    .await;
    assert!(
        a.problems.iter().any(|p| p.contains("policy expired")),
        "{a:?}"
    );
    // A newer policy thaws it.
    let v4 = security_policy(&fleet, 4);
    fleet.push_policy(&v4).await.expect("v4");
    fleet
        .wait_online(Duration::from_secs(10))
        .await
        .expect("v4");
    let ok = fleet
        .run("mark", &[("path", m.to_str().expect("utf-8"))], "all")
        .await
        .expect("job");
    assert_eq!(ok.job_state(), JobState::Succeeded, "{ok:?}");
    fleet.fleet.shutdown().await.expect("shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sections_of_two_signed_versions_cannot_be_mixed() {
    let fleet = security_fleet(1).await;
    let v3 = security_policy(&fleet, 3).replace("[commands.mark]", "[commands.evil]\ndescription = \"x\"\nargv = [\"/usr/bin/touch\", \"/tmp/evil\"]\n\n[commands.mark]");
    let v2 = security_policy(&fleet, 2);
    let s2 = signed(&v2, &[&fleet.admin_key]);
    let s3 = signed(&v3, &[&fleet.admin_key]);
    // v3's header (version) with v2's body, and v2's header with v3's body,
    // each with either signature.
    let split = |t: &str| t.find("[[signers]]").expect("signers section");
    let mixes = [
        format!("{}{}", &v3[..split(&v3)], &v2[split(&v2)..]),
        format!("{}{}", &v2[..split(&v2)], &v3[split(&v3)..]),
    ];
    for mix in &mixes {
        for sig in [&s2, &s3] {
            let forged = pb::SignedPolicy {
                bundle: mix.as_bytes().to_vec(),
                signatures: sig.signatures.clone(),
            };
            let mut c = pb::policy_client::PolicyClient::new(fleet.operator().await);
            assert_status(
                c.push(forged.clone()).await,
                tonic::Code::InvalidArgument,
                "signature",
            );
            fleet.controller.shared().inject_policy_unchecked(forged);
        }
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;
    wait_versions(&fleet, 2).await;
    fleet.fleet.shutdown().await.expect("shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn m_of_n_root_signatures_are_enforced_by_controller_and_agents() {
    let mut fleet = start_fleet_with(1, |o| {
        o.policy_roots = 3;
        o.policy_threshold = 2;
    })
    .await;
    assert_eq!(
        fleet.policy_version, 1,
        "the example policy went in with 2 of 3 signatures"
    );
    let v2 = security_policy(&fleet, 2);
    let one = signed(&v2, &[&fleet.more_admin_keys[1]]);
    let mut c = pb::policy_client::PolicyClient::new(fleet.operator().await);
    assert_status(
        c.push(one.clone()).await,
        tonic::Code::InvalidArgument,
        "signature",
    );
    // The same key twice is still one signer.
    let twice = signed(&v2, &[&fleet.admin_key, &fleet.admin_key]);
    assert_status(
        c.push(twice.clone()).await,
        tonic::Code::InvalidArgument,
        "signature",
    );
    fleet.controller.shared().inject_policy_unchecked(one);
    fleet.controller.shared().inject_policy_unchecked(twice);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    wait_versions(&fleet, 1).await;
    // Two distinct roots (not the first one) suffice.
    let two = signed(&v2, &[&fleet.more_admin_keys[0], &fleet.more_admin_keys[1]]);
    c.push(two).await.expect("2 of 3 accepted");
    wait_versions(&fleet, 2).await;
    fleet.policy_version = 2;
    fleet.fleet.shutdown().await.expect("shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn oversized_jobs_bundles_and_unknown_fields_are_refused() {
    let fleet = security_fleet(1).await;
    let mut c = pb::jobs_client::JobsClient::new(fleet.operator().await);
    let big = "a".repeat(70 * 1024);
    let (_, job) = fleet.operator_job("echo", &[("text", &big)], "all");
    assert_status(
        c.submit(to_pb(job)).await,
        tonic::Code::PermissionDenied,
        "exceeds the limit",
    );
    let mut p = pb::policy_client::PolicyClient::new(fleet.operator().await);
    let huge = format!(
        "{}\n#{}\n",
        security_policy(&fleet, 3),
        "x".repeat(1024 * 1024)
    );
    assert_status(
        p.push(signed(&huge, &[&fleet.admin_key])).await,
        tonic::Code::InvalidArgument,
        "size",
    );
    let unknown =
        security_policy(&fleet, 3).replacen("version = 3", "version = 3\nsurprise = true", 1);
    assert_status(
        p.push(signed(&unknown, &[&fleet.admin_key])).await,
        tonic::Code::InvalidArgument,
        "surprise",
    );
    assert_eq!(
        fleet
            .controller
            .shared()
            .policy
            .current()
            .expect("policy")
            .policy
            .version,
        2
    );
    fleet.fleet.shutdown().await.expect("shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn one_single_use_token_joined_concurrently_admits_exactly_one() {
    let fleet = start_fleet(0).await;
    let (token, _) = fleet
        .controller
        .shared()
        .create_token(
            Default::default(),
            Duration::from_secs(600),
            1,
            None,
            "test",
        )
        .await
        .expect("token");
    let mut set = tokio::task::JoinSet::new();
    for i in 0..8 {
        let opts = fleetcmd_agent::JoinOptions {
            controller: fleet.url.clone(),
            token: token.expose().clone(),
            name: format!("racer-{i}"),
            state_dir: fleet.path().join(format!("racer-{i}")),
        };
        set.spawn(async move {
            fleetcmd_agent::join(&opts, now())
                .await
                .map(|id| id.agent_id)
        });
    }
    let results: Vec<_> = set.join_all().await;
    let winners: Vec<_> = results.iter().filter_map(|r| r.as_ref().ok()).collect();
    assert_eq!(winners.len(), 1, "{results:?}");
    for r in results.iter().filter_map(|r| r.as_ref().err()) {
        assert!(r.to_string().contains("already used"), "{r}");
    }
    assert_eq!(
        fleet
            .controller
            .shared()
            .registry
            .list_agents("")
            .expect("list")
            .len(),
        1
    );
    fleet.fleet.shutdown().await.expect("shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn hostile_token_values_are_refused_before_use_and_failed_joins_are_rate_limited() {
    let fleet = start_fleet(0).await;
    let (good, _) = fleet
        .controller
        .shared()
        .create_token(
            Default::default(),
            Duration::from_secs(600),
            1,
            Some("late".into()),
            "test",
        )
        .await
        .expect("token");
    let mut c = pb::enrollment_client::EnrollmentClient::new(fleet.anonymous().await);
    let g = good.expose().clone();
    let hostile = [
        format!("{g}\r\nX-Injected: 1"),
        format!("{}$(id)", &g[..g.len() - 5]),
        format!("{}; rm -rf /", &g[..g.len() - 10]),
        "A".repeat(4 * 1024 * 1024 - 1024),
        String::new(),
    ];
    for t in &hostile {
        let r = c
            .join(pb::JoinRequest {
                token: t.clone(),
                csr_der: vec![],
                name: "x".into(),
            })
            .await;
        let s = r.expect_err("hostile token refused");
        assert!(
            matches!(
                s.code(),
                tonic::Code::InvalidArgument
                    | tonic::Code::ResourceExhausted
                    | tonic::Code::OutOfRange
            ),
            "{s:?}"
        );
    }
    // Keep failing until the limiter answers; it must, within the limit.
    let mut limited = false;
    for _ in 0..fleetcmd_controller::state::JOIN_FAILURES_PER_MINUTE + 1 {
        let s = c
            .join(pb::JoinRequest {
                token: "nope".into(),
                csr_der: vec![],
                name: "x".into(),
            })
            .await
            .expect_err("refused");
        if s.code() == tonic::Code::ResourceExhausted {
            assert!(s.message().contains("too many failed joins"), "{s:?}");
            limited = true;
            break;
        }
    }
    assert!(limited, "failed joins were never rate limited");
    // While limited, even the good token waits (and is not consumed).
    let opts = fleetcmd_agent::JoinOptions {
        controller: fleet.url.clone(),
        token: g.clone(),
        name: "late".into(),
        state_dir: fleet.path().join("late"),
    };
    let err = fleetcmd_agent::join(&opts, now())
        .await
        .expect_err("limited");
    assert!(err.to_string().contains("too many failed joins"), "{err}");
    fleet.fleet.shutdown().await.expect("shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn renewal_survives_the_controller_being_down_when_it_is_due() {
    let started = tokio::time::Instant::now();
    let mut fleet = start_fleet_with(1, |o| o.agent_cert_ttl = Duration::from_secs(20)).await;
    let cert_path = fleet.dir.join("agents/dev-1/agent.crt");
    let first = std::fs::read_to_string(&cert_path).expect("cert");
    // Renewal is due at 13.3 s; the controller is down from 10 s to 14 s.
    // The agent's reconnect backoff (1 s × 1.6ⁿ ± 20 %) brings it back by
    // about 16 s, well before the first certificate expires at 20 s.
    tokio::time::sleep_until(started + Duration::from_secs(10)).await;
    fleet
        .restart_controller(Duration::from_secs(4))
        .await
        .expect("restart");
    // The agent reconnects with its still-valid certificate and renews.
    let cp = cert_path.clone();
    assert_eventually(Duration::from_secs(12), || {
        let cp = cp.clone();
        let first = first.clone();
        async move {
            std::fs::read_to_string(&cp)
                .ok()
                .filter(|c| *c != first)
                .map(|_| ())
        }
    })
    .await;
    fleet
        .wait_online(Duration::from_secs(10))
        .await
        .expect("online");
    // Past the first certificate's expiry, still connected and working.
    tokio::time::sleep_until(started + Duration::from_secs(21)).await;
    let job = fleet
        .run("echo", &[("text", "renewed")], "all")
        .await
        .expect("job");
    assert_eq!(job.job_state(), JobState::Succeeded, "{job:?}");
    fleet.stop_agent("dev-1").await;
    fleet.start_agent("dev-1", None).expect("restart");
    fleet
        .wait_online(Duration::from_secs(10))
        .await
        .expect("reconnects with the renewed certificate");
    fleet.fleet.shutdown().await.expect("shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_agent_with_a_skewed_clock_shows_it_in_its_health() {
    let fleet = start_fleet(1).await;
    // Speak as dev-1 with a clock an hour fast (this replaces its stream).
    let ch = fleetcmd_proto::channel::connect(&fleet.url, &fleet.agent_tls("dev-1"))
        .await
        .expect("agent channel");
    let mut c = pb::agent_stream_client::AgentStreamClient::new(ch);
    let msgs = vec![
        pb::AgentMessage {
            msg: Some(pb::agent_message::Msg::Hello(pb::Hello {
                version: "t".into(),
                hostname: "dev-1".into(),
                ..Default::default()
            })),
        },
        pb::AgentMessage {
            msg: Some(pb::agent_message::Msg::Heartbeat(pb::Heartbeat {
                agent_time: now() + 3600,
                policy_version: 1,
                ..Default::default()
            })),
        },
    ];
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    for m in msgs {
        tx.send(m).await.expect("queue");
    }
    let _resp = c
        .connect(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .expect("connect");
    let shared = fleet.controller.shared().clone();
    let a = assert_eventually(Duration::from_secs(10), || {
        let shared = shared.clone();
        async move {
            shared
                .registry
                .list_agents("")
                .ok()?
                .into_iter()
                .find(|a| a.agent_id == "dev-1" && a.clock_skew_secs > 3500)
        }
    })
    .await;
    assert!(
        a.problems.iter().any(|p| p.contains("clock off by +36")),
        "{a:?}"
    );
    drop(tx);
    fleet.fleet.shutdown().await.expect("shutdown");
}

/// A caller that gives up mid-submit (a tiny deadline, a killed gateway)
/// does not leave its job stored but never dispatched: every job the
/// controller stored runs now, not at its next restart (found by an
/// outside test).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_submit_the_caller_abandons_is_dispatched_or_not_stored() {
    let fleet = start_fleet(1).await;
    let ch = fleet.operator().await;
    let mut ids = Vec::new();
    for i in 0..40u64 {
        let (spec, job) = fleet.operator_job("uptime", &[], "all");
        let mut req = tonic::Request::new(to_pb(job));
        // 1 ms to 20.5 ms: some calls end before, some during, some after
        // the submission.
        req.set_timeout(Duration::from_micros(1000 + i * 500));
        let _ = pb::jobs_client::JobsClient::new(ch.clone())
            .submit(req)
            .await;
        ids.push(spec.id.as_str().to_string());
    }
    let shared = fleet.controller.shared().clone();
    let mut stored = 0;
    for id in &ids {
        if shared.get_job(id).is_ok() {
            stored += 1;
            let job = fleet.wait_job(id).await;
            assert_eq!(job.job_state(), JobState::Succeeded, "{job:?}");
        }
    }
    assert!(
        stored > 0,
        "no submission got through: the deadlines were too short to test anything"
    );
    fleet.fleet.shutdown().await.expect("shutdown");
}
