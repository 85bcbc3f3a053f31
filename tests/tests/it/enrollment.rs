//! ARCHITECTURE.md invariants 2 and 3: join tokens are single-use and pinned to one fleet CA;
//! a revoked agent loses its live stream at once and every later call with
//! its certificate is refused.

use fleetcmd_proto::v1::JobState;
use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use fleetcmd_agent::JoinOptions;
use fleetcmd_proto::v1 as pb;
use fleetcmd_tests::*;
use pb::agent_stream_client::AgentStreamClient;
use pb::agents_client::AgentsClient;
use pb::enrollment_client::EnrollmentClient;
use tonic::Code;
use tonic::codegen::tokio_stream::wrappers::ReceiverStream;

use crate::support::*;

async fn token(fleet: &TestFleet, name: &str) -> String {
    let (token, _) = fleet
        .controller
        .shared()
        .create_token(
            fleet::dev_labels(1),
            Duration::from_secs(600),
            1,
            Some(name.to_owned()),
            "admin",
        )
        .await
        .expect("token created");
    token.expose().clone()
}

fn join_opts(fleet: &TestFleet, token: &str, name: &str, dir: &str) -> JoinOptions {
    JoinOptions {
        controller: fleet.url.clone(),
        token: token.to_owned(),
        name: name.to_owned(),
        state_dir: fleet.path().join(dir),
    }
}

fn csr() -> Vec<u8> {
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519).expect("key");
    let csr = rcgen::CertificateParams::new(Vec::<String>::new())
        .and_then(|p| p.serialize_request(&key))
        .expect("csr");
    csr.der().to_vec()
}

fn agent_names(fleet: &TestFleet) -> Vec<String> {
    fleet
        .controller
        .shared()
        .registry
        .list_agents("")
        .expect("list")
        .into_iter()
        .map(|a| a.agent_id)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_join_token_is_used_once() {
    let fleet = start_fleet(0).await;
    let token = token(&fleet, "once-1").await;
    fleetcmd_agent::join(&join_opts(&fleet, &token, "once-1", "once-a"), now())
        .await
        .expect("first join");
    assert!(fleet.path().join("once-a/agent.crt").exists());

    // The same token again, through the agent's join and through the raw RPC.
    let err = fleetcmd_agent::join(&join_opts(&fleet, &token, "once-2", "once-b"), now())
        .await
        .expect_err("second join refused");
    assert!(err.to_string().contains("already used"), "{err}");
    assert!(
        !fleet.path().join("once-b/agent.crt").exists(),
        "a refused join wrote a certificate"
    );
    let mut enroll = EnrollmentClient::new(fleet.anonymous().await);
    let res = enroll
        .join(pb::JoinRequest {
            token: token.clone(),
            csr_der: csr(),
            name: "once-3".into(),
        })
        .await;
    assert_status(res, Code::PermissionDenied, "already used");
    assert_eq!(agent_names(&fleet), ["once-1"]);
    fleet.fleet.shutdown().await.expect("shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_join_token_of_another_fleet_is_refused() {
    let fleet = start_fleet(0).await;
    let other = start_fleet(0).await;
    let foreign = token(&other, "stray-1").await;

    // The agent notices the controller does not present the pinned CA, and
    // so never sends the token's secret to it.
    let err = fleetcmd_agent::join(&join_opts(&fleet, &foreign, "stray-1", "stray"), now())
        .await
        .expect_err("join refused");
    let msg = err.to_string();
    assert!(
        msg.contains("CA pinned by the token") && msg.contains("another fleet"),
        "{msg}"
    );
    assert!(!fleet.path().join("stray/agent.crt").exists());

    // Sent to the controller anyway, the controller refuses it too.
    let mut enroll = EnrollmentClient::new(fleet.anonymous().await);
    let res = enroll
        .join(pb::JoinRequest {
            token: foreign.clone(),
            csr_der: csr(),
            name: "stray-1".into(),
        })
        .await;
    assert_status(res, Code::PermissionDenied, "another fleet CA");
    assert!(agent_names(&fleet).is_empty(), "{:?}", agent_names(&fleet));

    // Control: the token still works where it belongs (it was not consumed).
    let at_home = join_opts(&other, &foreign, "stray-1", "stray-home");
    fleetcmd_agent::join(&at_home, now())
        .await
        .expect("joins its own fleet");
    fleet.fleet.shutdown().await.expect("shutdown");
    other.fleet.shutdown().await.expect("shutdown");
}

/// ARCHITECTURE.md invariant 10: the controller, not the joiner, decides names. A token that
/// names no agent (the CLI default, and the usual reusable fleet token) must
/// not let its holder take over the name of an enrolled, live agent: jobs
/// signed for `name=dev-1` would then run on (and report from) the intruder.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_unnamed_token_cannot_take_over_an_enrolled_name() {
    let fleet = security_fleet(1).await;
    let labels = BTreeMap::from([("role".to_string(), "db".to_string())]);
    let (token, _) = fleet
        .controller
        .shared()
        .create_token(labels, Duration::from_secs(600), 1, None, "admin")
        .await
        .expect("token");
    let opts = join_opts(&fleet, token.expose(), "dev-1", "intruder");
    let res = fleetcmd_agent::join(&opts, now()).await;
    let dev1 = agent_info(&fleet, "dev-1");
    let stored = fleet
        .controller
        .shared()
        .store
        .get_agent("dev-1")
        .expect("store");
    assert!(
        res.is_err(),
        "a new host joined as the enrolled, live agent dev-1 and got its certificate (stored record now: {stored:?})"
    );
    assert!(
        !fleet.path().join("intruder/agent.crt").exists(),
        "the intruder got a certificate"
    );
    assert_eq!(
        dev1.labels.get("role").map(String::as_str),
        Some("web"),
        "dev-1's labels were replaced: {dev1:?}"
    );
    fleet.fleet.shutdown().await.expect("shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_revoked_agent_is_cut_off_at_once() {
    let mut fleet = start_fleet(3).await;
    // A probe that holds a live agent stream itself, to watch it being closed.
    let probe_token = token(&fleet, "probe-1").await;
    fleetcmd_agent::join(
        &join_opts(&fleet, &probe_token, "probe-1", "agents/probe-1"),
        now(),
    )
    .await
    .expect("probe joins");
    let probe_ch = fleetcmd_proto::channel::connect(&fleet.url, &fleet.agent_tls("probe-1"))
        .await
        .expect("probe channel");
    let (probe_tx, rx) = tokio::sync::mpsc::channel(4);
    let hello = pb::Hello {
        version: "probe".into(),
        hostname: "probe-1".into(),
        facts: HashMap::new(),
        policy_version: 0,
        allow: Vec::new(),
    };
    probe_tx
        .try_send(pb::AgentMessage {
            msg: Some(pb::agent_message::Msg::Hello(hello)),
        })
        .expect("room");
    let mut probe = AgentStreamClient::new(probe_ch)
        .connect(ReceiverStream::new(rx))
        .await
        .expect("probe connects")
        .into_inner();
    let first = probe.message().await.expect("welcome").expect("a message");
    assert!(
        matches!(first.msg, Some(pb::controller_message::Msg::Welcome(_))),
        "{first:?}"
    );

    let mut agents = AgentsClient::new(fleet.operator().await);
    for name in ["dev-2", "probe-1"] {
        agents
            .revoke(pb::RevokeRequest {
                agent_id: name.into(),
            })
            .await
            .expect("operator revokes");
    }

    // The probe's live stream ends with PermissionDenied.
    let ended = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            match probe.message().await {
                Ok(Some(_)) => continue,
                Ok(None) => break None,
                Err(s) => break Some(s),
            }
        }
    })
    .await
    .expect("the revoked agent's stream was not closed");
    let status = ended.expect("the stream ended without a status");
    assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
    assert!(status.message().contains("revoked"), "{status:?}");
    drop(probe_tx);

    // dev-2 is listed as revoked and offline, and its connection is gone
    // (no live stream: no policy version reported) — also after the other
    // agents have sent fresh heartbeats.
    let since = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_millis() as u64;
    let shared = fleet.controller.shared().clone();
    assert_eventually(Duration::from_secs(10), || {
        let shared = shared.clone();
        async move {
            let list = shared.registry.list_agents("").ok()?;
            list.iter()
                .filter(|a| a.agent_id == "dev-1" || a.agent_id == "dev-3")
                .all(|a| a.last_seen_ms >= since)
                .then_some(())
        }
    })
    .await;
    for name in ["dev-2", "probe-1"] {
        let a = agent_info(&fleet, name);
        assert!(a.revoked && !a.online, "{a:?}");
        assert_eq!(
            (a.policy_version, a.last_seen_ms),
            (0, 0),
            "{name} still has a live stream: {a:?}"
        );
    }

    // A job for everyone no longer targets dev-2.
    let job = fleet.run("uptime", &[], "all").await.expect("submitted");
    let mut names: Vec<_> = job.targets.iter().map(|t| t.agent_id.as_str()).collect();
    names.sort();
    assert_eq!(names, ["dev-1", "dev-3"], "{job:?}");
    assert_eq!(job.job_state(), JobState::Succeeded, "{job:?}");

    // dev-2's certificate no longer opens a stream.
    let ch = fleetcmd_proto::channel::connect(&fleet.url, &fleet.agent_tls("dev-2"))
        .await
        .expect("TLS still completes");
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    let hello = pb::Hello {
        version: "x".into(),
        hostname: "dev-2".into(),
        facts: HashMap::new(),
        policy_version: 0,
        allow: Vec::new(),
    };
    tx.try_send(pb::AgentMessage {
        msg: Some(pb::agent_message::Msg::Hello(hello)),
    })
    .expect("room");
    let res = AgentStreamClient::new(ch)
        .connect(ReceiverStream::new(rx))
        .await;
    assert_status(res, Code::PermissionDenied, "agent dev-2 is revoked");

    // Nor can it come back under its name with a fresh token.
    let fresh = token(&fleet, "dev-2").await;
    let err = fleetcmd_agent::join(&join_opts(&fleet, &fresh, "dev-2", "dev-2-again"), now())
        .await
        .expect_err("rejoin refused");
    assert!(err.to_string().contains("revoked"), "{err}");
    fleet.stop_agent("dev-2").await;
    fleet.fleet.shutdown().await.expect("shutdown");
}
