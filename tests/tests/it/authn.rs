//! ARCHITECTURE.md invariant 2: every RPC but Join needs a client certificate from the fleet
//! CA, and the certificate's role must match the service; §2.4/§2.8: a
//! caller may only submit jobs in the name it is entitled to.

use fleetcmd_proto::v1::JobState;
use std::collections::HashMap;

use fleetcmd_proto::v1 as pb;
use fleetcmd_tests::*;
use pb::agent_stream_client::AgentStreamClient;
use pb::agents_client::AgentsClient;
use pb::jobs_client::JobsClient;
use pb::policy_client::PolicyClient;
use pb::tokens_client::TokensClient;
use tonic::Code;
use tonic::codegen::tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;

use crate::support::*;

/// An agent stream request that stays open (the sender is returned with it).
fn hello_stream(
    name: &str,
) -> (
    tokio::sync::mpsc::Sender<pb::AgentMessage>,
    ReceiverStream<pb::AgentMessage>,
) {
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    let hello = pb::Hello {
        version: "test".into(),
        hostname: name.into(),
        facts: HashMap::new(),
        policy_version: 0,
        allow: Vec::new(),
    };
    tx.try_send(pb::AgentMessage {
        msg: Some(pb::agent_message::Msg::Hello(hello)),
    })
    .expect("room for hello");
    (tx, ReceiverStream::new(rx))
}

/// Calls a method by path with an empty body (for services the test crate
/// has no generated client for, e.g. gRPC reflection) and returns the status.
/// `None` when the call was accepted (its status comes later, in trailers).
async fn raw_call(channel: Channel, url: &str, path: &str) -> Option<tonic::Status> {
    use tonic::codegen::{Service, http};
    let mut channel = channel;
    std::future::poll_fn(|cx| channel.poll_ready(cx))
        .await
        .expect("channel ready");
    let req = http::Request::builder()
        .method("POST")
        .uri(format!("{url}{path}"))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(tonic::body::Body::empty())
        .expect("request");
    let resp = channel.call(req).await.expect("http response");
    tonic::Status::from_header_map(resp.headers())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_rpc_but_join_requires_a_client_certificate() {
    let fleet = security_fleet(1).await;
    let anon = fleet.anonymous().await;
    let mark = marker(&fleet, "anonymous-mark");
    let (_, job) = fleet.operator_job("mark", &[("path", mark.to_str().expect("utf-8"))], "all");
    let id = fleetcmd_core::job::JobSpec::from_bytes(&job.spec)
        .expect("spec")
        .id
        .to_string();
    let unauth = "client certificate";

    let mut jobs = JobsClient::new(anon.clone());
    assert_status(jobs.submit(to_pb(job)).await, Code::Unauthenticated, unauth);
    assert_status(
        jobs.get(pb::GetJobRequest { job_id: id.clone() }).await,
        Code::Unauthenticated,
        unauth,
    );
    assert_status(
        jobs.list(pb::ListJobsRequest {
            limit: 10,
            requester: String::new(),
            state: String::new(),
        })
        .await,
        Code::Unauthenticated,
        unauth,
    );

    let mut agents = AgentsClient::new(anon.clone());
    assert_status(
        agents
            .list(pb::ListAgentsRequest {
                selector: String::new(),
            })
            .await,
        Code::Unauthenticated,
        unauth,
    );
    assert_status(
        agents
            .revoke(pb::RevokeRequest {
                agent_id: "dev-1".into(),
            })
            .await,
        Code::Unauthenticated,
        unauth,
    );

    let mut tokens = TokensClient::new(anon.clone());
    let req = pb::CreateTokenRequest {
        labels: HashMap::new(),
        ttl_secs: 600,
        uses: 1,
        name: "intruder".into(),
    };
    assert_status(tokens.create(req).await, Code::Unauthenticated, unauth);

    let mut policy = PolicyClient::new(anon.clone());
    let text = security_policy(&fleet, fleet.policy_version + 1);
    let sig = fleetcmd_core::policy_bundle::sign_bundle(text.as_bytes(), &fleet.admin_key);
    let bundle = pb::SignedPolicy {
        bundle: text.into_bytes(),
        signatures: vec![pb::PolicySignature {
            key_id: sig.key_id,
            signature: sig.signature,
        }],
    };
    assert_status(policy.push(bundle).await, Code::Unauthenticated, unauth);
    assert_status(
        policy.get(pb::GetPolicyRequest {}).await,
        Code::Unauthenticated,
        unauth,
    );

    let mut audit = pb::audit_client::AuditClient::new(anon.clone());
    assert_status(
        audit.search(pb::AuditSearchRequest::default()).await,
        Code::Unauthenticated,
        unauth,
    );
    assert_status(
        audit.export(pb::AuditExportRequest { from_seq: 1 }).await,
        Code::Unauthenticated,
        unauth,
    );
    assert_status(
        audit
            .report(pb::AuditReportRequest {
                kind: "chat_denied".into(),
                ..Default::default()
            })
            .await,
        Code::Unauthenticated,
        unauth,
    );
    assert_status(
        audit.verify(pb::AuditVerifyRequest { from_seq: 0 }).await,
        Code::Unauthenticated,
        unauth,
    );

    let mut stream = AgentStreamClient::new(anon.clone());
    let (_tx, hello) = hello_stream("dev-1");
    assert_status(stream.connect(hello).await, Code::Unauthenticated, unauth);

    for path in [
        "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
        "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
    ] {
        let status = raw_call(anon.clone(), &fleet.url, path)
            .await
            .unwrap_or_else(|| panic!("{path}: call accepted without a certificate"));
        assert!(
            status.code() == Code::Unauthenticated
                || (path.contains("v1alpha") && status.code() == Code::Unimplemented),
            "{path}: {status:?}"
        );
    }

    // Nothing happened: no job stored or run, dev-1 not revoked, policy unchanged.
    tokio::task::yield_now().await;
    assert_not_stored(&fleet, &id);
    assert_absent(&mark);
    let dev1 = agent_info(&fleet, "dev-1");
    assert!(!dev1.revoked && dev1.online, "{dev1:?}");
    assert_eq!(
        fleet
            .controller
            .shared()
            .policy
            .current()
            .expect("policy")
            .policy
            .version,
        fleet.policy_version
    );
    fleet.fleet.shutdown().await.expect("shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn certificates_are_confined_to_their_role() {
    let fleet = security_fleet(2).await;
    let agent_ch = fleetcmd_proto::channel::connect(&fleet.url, &fleet.agent_tls("dev-1"))
        .await
        .expect("agent channel");

    // An agent certificate submitting a (validly signed) job.
    let mark = marker(&fleet, "agent-submitted");
    let (spec, job) = fleet.operator_job("mark", &[("path", mark.to_str().expect("utf-8"))], "all");
    let mut jobs = JobsClient::new(agent_ch.clone());
    assert_status(
        jobs.submit(to_pb(job)).await,
        Code::PermissionDenied,
        "agent certificate",
    );
    let mut tokens = TokensClient::new(agent_ch.clone());
    let req = || pb::CreateTokenRequest {
        labels: HashMap::new(),
        ttl_secs: 600,
        uses: 1,
        name: "sneaky".into(),
    };
    assert_status(
        tokens.create(req()).await,
        Code::PermissionDenied,
        "agent certificate",
    );
    let mut agents = AgentsClient::new(agent_ch.clone());
    assert_status(
        agents
            .revoke(pb::RevokeRequest {
                agent_id: "dev-2".into(),
            })
            .await,
        Code::PermissionDenied,
        "agent certificate",
    );
    let signed_next = || {
        let text = security_policy(&fleet, fleet.policy_version + 1)
            + "\n[commands.agent_pushed]\nargv = [\"/usr/bin/true\"]\n";
        let sig = fleetcmd_core::policy_bundle::sign_bundle(text.as_bytes(), &fleet.admin_key);
        pb::SignedPolicy {
            bundle: text.into_bytes(),
            signatures: vec![pb::PolicySignature {
                key_id: sig.key_id,
                signature: sig.signature,
            }],
        }
    };
    let mut policy = PolicyClient::new(agent_ch.clone());
    assert_status(
        policy.push(signed_next()).await,
        Code::PermissionDenied,
        "operators",
    );

    // A gateway certificate doing operator things, with otherwise valid requests.
    let gw = fleet.gateway().await;
    let mut tokens = TokensClient::new(gw.clone());
    assert_status(
        tokens.create(req()).await,
        Code::PermissionDenied,
        "gateway certificate",
    );
    let mut policy = PolicyClient::new(gw.clone());
    assert_status(
        policy.push(signed_next()).await,
        Code::PermissionDenied,
        "operators",
    );
    let mut agents = AgentsClient::new(gw.clone());
    assert_status(
        agents
            .revoke(pb::RevokeRequest {
                agent_id: "dev-2".into(),
            })
            .await,
        Code::PermissionDenied,
        "operators",
    );

    tokio::task::yield_now().await;
    assert_not_stored(&fleet, spec.id.as_str());
    assert_absent(&mark);
    let dev2 = agent_info(&fleet, "dev-2");
    assert!(!dev2.revoked && dev2.online, "{dev2:?}");
    assert_eq!(
        fleet
            .controller
            .shared()
            .policy
            .current()
            .expect("policy")
            .policy
            .version,
        fleet.policy_version
    );
    // Control: the same channels work for what their roles may do.
    let mut policy = PolicyClient::new(agent_ch);
    let got = policy
        .get(pb::GetPolicyRequest {})
        .await
        .expect("agents may read the policy");
    assert_eq!(got.into_inner().version, fleet.policy_version);
    let mut agents = AgentsClient::new(gw);
    assert!(
        !agents
            .list(pb::ListAgentsRequest {
                selector: String::new()
            })
            .await
            .expect("gateways may list agents")
            .into_inner()
            .agents
            .is_empty()
    );
    fleet.fleet.shutdown().await.expect("shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn requesters_cannot_be_spoofed() {
    let fleet = security_fleet(1).await;
    let path = |name: &str| marker(&fleet, name).to_str().expect("utf-8").to_owned();

    // The gateway (validly signing with its own key) claims to be a CLI operator.
    let as_admin = marker(&fleet, "gateway-as-admin");
    let s = spec(
        "mark",
        &[("path", &path("gateway-as-admin"))],
        "all",
        "cli:admin",
    );
    let job = fleetcmd_core::job::SignedJob::sign(&s, fleet::GATEWAY_SIGNER, &fleet.gateway_key);
    let mut gw = JobsClient::new(fleet.gateway().await);
    // Refused twice over: the gateway's key does not vouch for CLI
    // identities (what agents check too), and a gateway certificate may not
    // submit as one (the controller's own check, behind it).
    assert_status(
        gw.submit(to_pb(job)).await,
        Code::PermissionDenied,
        "may not sign for cli:admin",
    );
    assert_not_stored(&fleet, s.id.as_str());

    // The operator submits in somebody else's name (another CLI user, a chat user).
    let mut op = JobsClient::new(fleet.operator().await);
    for (i, requester) in ["cli:mallory", "slack:T0001:U024BE7LH"]
        .into_iter()
        .enumerate()
    {
        let name = format!("operator-as-other-{i}");
        let s = spec("mark", &[("path", &path(&name))], "all", requester);
        let job = sign_op(&fleet, &s);
        assert_status(
            op.submit(to_pb(job)).await,
            Code::PermissionDenied,
            &format!("may not sign for {requester}"),
        );
        assert_not_stored(&fleet, s.id.as_str());
        assert_absent(&marker(&fleet, &name));
    }
    assert_absent(&as_admin);

    // Control: the same shape in the caller's own name runs.
    let ok = marker(&fleet, "operator-as-self");
    let s = spec(
        "mark",
        &[("path", &path("operator-as-self"))],
        "all",
        "cli:admin",
    );
    let job = fleet
        .submit_and_wait(sign_op(&fleet, &s))
        .await
        .expect("own name accepted");
    assert_eq!(job.job_state(), JobState::Succeeded, "{job:?}");
    assert!(ok.exists());
    fleet.fleet.shutdown().await.expect("shutdown");
}

/// ARCHITECTURE.md invariant 2 names one exception, Join; the standard gRPC health service
/// on the same port is not one (the unauthenticated probes are the HTTP
/// `/healthz` and `/readyz` endpoints).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn grpc_health_requires_a_client_certificate_too() {
    let fleet = start_fleet(0).await;
    for path in [
        "/grpc.health.v1.Health/Check",
        "/grpc.health.v1.Health/Watch",
    ] {
        let status = raw_call(fleet.anonymous().await, &fleet.url, path).await;
        let code = status.as_ref().map(|s| s.code());
        assert_eq!(
            code,
            Some(Code::Unauthenticated),
            "{path} answered a caller without a certificate: {status:?}"
        );
    }
    fleet.fleet.shutdown().await.expect("shutdown");
}
