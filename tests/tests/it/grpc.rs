//! The gRPC surface: reflection only for authenticated clients, the standard
//! health service, and agent certificates renewed over the stream.

use fleetcmd_proto::v1::JobState;
use std::time::Duration;

use fleetcmd_tests::*;
use tonic_reflection::pb::v1 as refl;

async fn list_services(ch: tonic::transport::Channel) -> Result<Vec<String>, tonic::Status> {
    let mut c = refl::server_reflection_client::ServerReflectionClient::new(ch);
    let req = refl::ServerReflectionRequest {
        host: String::new(),
        message_request: Some(
            refl::server_reflection_request::MessageRequest::ListServices(String::new()),
        ),
    };
    let mut stream = c
        .server_reflection_info(tokio_stream::iter(vec![req]))
        .await?
        .into_inner();
    let resp = stream
        .message()
        .await?
        .ok_or_else(|| tonic::Status::unknown("no reflection response"))?;
    match resp.message_response {
        Some(refl::server_reflection_response::MessageResponse::ListServicesResponse(l)) => {
            Ok(l.service.into_iter().map(|s| s.name).collect())
        }
        other => Err(tonic::Status::unknown(format!(
            "unexpected reflection response {other:?}"
        ))),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn reflection_lists_services_to_authenticated_clients_only() {
    let fleet = start_fleet(1).await;
    let services = list_services(fleet.operator().await)
        .await
        .expect("operator may reflect");
    for s in [
        "fleetcmd.v1.Jobs",
        "fleetcmd.v1.AgentStream",
        "fleetcmd.v1.Enrollment",
        "fleetcmd.v1.Policy",
    ] {
        assert!(
            services.iter().any(|x| x == s),
            "{s} missing from {services:?}"
        );
    }
    let err = list_services(fleet.anonymous().await)
        .await
        .expect_err("anonymous reflection refused");
    assert_eq!(err.code(), tonic::Code::Unauthenticated, "{err:?}");
    fleet.fleet.shutdown().await.expect("shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn standard_health_service_reports_serving_to_authenticated_clients() {
    let fleet = start_fleet(1).await;
    let mut c = tonic_health::pb::health_client::HealthClient::new(fleet.gateway().await);
    for service in ["", "fleetcmd.v1.Jobs", "fleetcmd.v1.AgentStream"] {
        let resp = c
            .check(tonic_health::pb::HealthCheckRequest {
                service: service.into(),
            })
            .await
            .expect("health check")
            .into_inner();
        assert_eq!(
            resp.status,
            tonic_health::pb::health_check_response::ServingStatus::Serving as i32,
            "{service:?}"
        );
    }
    fleet.fleet.shutdown().await.expect("shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn agent_certificate_is_renewed_over_the_stream_and_used_after_a_restart() {
    let started = tokio::time::Instant::now();
    let mut fleet = start_fleet_with(1, |o| o.agent_cert_ttl = Duration::from_secs(3)).await;
    let cert_path = fleet.dir.join("agents/dev-1/agent.crt");
    let first = std::fs::read_to_string(&cert_path).expect("cert");
    // Renewal is due at 2/3 of the lifetime (2 s); the first cert expires at 3 s.
    let renewed = assert_eventually(Duration::from_secs(15), || {
        let p = cert_path.clone();
        let first = first.clone();
        async move { std::fs::read_to_string(&p).ok().filter(|c| *c != first) }
    })
    .await;
    assert!(renewed.contains("BEGIN CERTIFICATE"));
    // Once the first certificate has expired, restart the agent: it can only
    // connect with the renewed one.
    tokio::time::sleep_until(started + Duration::from_secs(4)).await;
    fleet.stop_agent("dev-1").await;
    fleet.start_agent("dev-1", None).expect("restart");
    fleet
        .wait_online(Duration::from_secs(10))
        .await
        .expect("online with the renewed certificate");
    let job = fleet
        .run("echo", &[("text", "still here")], "all")
        .await
        .expect("job");
    assert_eq!(job.job_state(), JobState::Succeeded, "{job:?}");
    fleet.fleet.shutdown().await.expect("shutdown");
}
