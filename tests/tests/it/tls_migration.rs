//! Fleets from before TLS keys were ECDSA P-256 keep working: a
//! controller whose CA is Ed25519 keeps that CA (join tokens pin its
//! SHA-256; agents verify the controller against it), serves a P-256
//! server certificate issued at start, and an agent that joined with an
//! Ed25519 key (as earlier versions made it) runs jobs and moves to a new
//! P-256 key at its next certificate renewal.

use fleetcmd_proto::v1::{JobState, TargetState};
use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use fleetcmd_agent::state::{Identity, StateDir, write_atomic};
use fleetcmd_core::crypto::sha256;
use fleetcmd_core::join_token::JoinToken;
use fleetcmd_proto::v1 as pb;
use fleetcmd_tests::*;

/// Writes an Ed25519 CA as earlier versions created it into the
/// controller's `pki` directory; returns its certificate (PEM).
fn write_ed25519_ca(pki: &Path) -> String {
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519).expect("key");
    let mut params = rcgen::CertificateParams::default();
    let mut dn = rcgen::DistinguishedName::new();
    dn.push(rcgen::DnType::CommonName, "fleetcmd fleet CA");
    params.distinguished_name = dn;
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Constrained(0));
    params.key_usages = vec![
        rcgen::KeyUsagePurpose::KeyCertSign,
        rcgen::KeyUsagePurpose::CrlSign,
        rcgen::KeyUsagePurpose::DigitalSignature,
    ];
    let cert = params.self_signed(&key).expect("CA certificate");
    std::fs::create_dir_all(pki).expect("pki dir");
    write_atomic(&pki.join("ca.key"), key.serialize_pem().as_bytes(), 0o600).expect("ca.key");
    write_atomic(&pki.join("ca.crt"), cert.pem().as_bytes(), 0o644).expect("ca.crt");
    cert.pem()
}

/// Joins `name` through the real Join RPC with an Ed25519 key and writes
/// its state directory as `fleetcmd-agent join` of earlier versions did.
async fn join_with_ed25519_key(fleet: &TestFleet, name: &str, ca_pem: &str) {
    let (token, _) = fleet
        .controller
        .shared()
        .create_token(
            BTreeMap::from([("role".to_owned(), "web".to_owned())]),
            Duration::from_secs(600),
            1,
            Some(name.to_owned()),
            fleet::OPERATOR_NAME,
        )
        .await
        .expect("token");
    let parsed = JoinToken::parse(token.expose()).expect("token parses");
    let ca_der = fleetcmd_controller::pki::pem_to_der(ca_pem).expect("CA DER");
    assert_eq!(
        parsed.ca_sha256,
        sha256(&ca_der),
        "the token pins the Ed25519 CA"
    );
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519).expect("key");
    let csr = rcgen::CertificateParams::new(Vec::<String>::new())
        .and_then(|p| p.serialize_request(&key))
        .expect("csr");
    let ep = fleetcmd_proto::channel::endpoint(&fleet.url, ca_pem, None).expect("endpoint");
    let ch = fleetcmd_proto::channel::open(&ep).await.expect("connects");
    let resp = pb::enrollment_client::EnrollmentClient::new(ch)
        .join(pb::JoinRequest {
            token: token.expose().clone(),
            csr_der: csr.der().to_vec(),
            name: name.to_owned(),
        })
        .await
        .expect("joined")
        .into_inner();
    let dir = StateDir::new(&fleet.dir.join("agents").join(name));
    dir.create().expect("state dir");
    write_atomic(&dir.key(), key.serialize_pem().as_bytes(), 0o600).expect("key");
    write_atomic(&dir.cert(), resp.cert_pem.as_bytes(), 0o644).expect("cert");
    write_atomic(&dir.ca(), ca_pem.as_bytes(), 0o644).expect("ca");
    dir.save_identity(&Identity {
        agent_id: resp.agent_id,
        labels: resp.labels.into_iter().collect(),
        policy_roots: vec![fleet.admin_key.public_key().to_string()],
        policy_threshold: 1,
    })
    .expect("identity");
}

/// The key algorithm OIDs of a PEM certificate: (its key, its signature).
fn algorithms(pem: &str) -> (String, String) {
    let der = fleetcmd_controller::pki::pem_to_der(pem).expect("DER");
    let (_, cert) = x509_parser::parse_x509_certificate(&der).expect("certificate");
    (
        cert.public_key().algorithm.algorithm.to_id_string(),
        cert.signature_algorithm.algorithm.to_id_string(),
    )
}

const EC_PUBLIC_KEY: &str = "1.2.840.10045.2.1";
const ED25519: &str = "1.3.101.112";

fn online(fleet: &TestFleet, name: &str) -> bool {
    fleet
        .controller
        .shared()
        .registry
        .list_agents("")
        .expect("agents")
        .iter()
        .any(|a| a.agent_id == name && a.online)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_ed25519_fleet_keeps_its_ca_and_its_agents_renew_into_p256_keys() {
    let mut ca_pem = String::new();
    // dev-1 joins as today (P-256); the CA is the old one.
    let mut fleet = start_fleet_with(1, |o| {
        ca_pem = write_ed25519_ca(&o.data_dir.join("controller/pki"));
        // Renewal at two thirds: after 4 s.
        o.agent_cert_ttl = Duration::from_secs(6);
    })
    .await;
    assert_eq!(
        fleet.controller.shared().ca.cert_pem(),
        ca_pem,
        "the Ed25519 CA is kept"
    );
    // What the controller serves: a P-256 key, certified by the Ed25519 CA.
    let server = fleet
        .controller
        .shared()
        .ca
        .issue_server(&[])
        .expect("server certificate");
    assert_eq!(
        algorithms(&server.cert_pem),
        (EC_PUBLIC_KEY.to_owned(), ED25519.to_owned())
    );

    join_with_ed25519_key(&fleet, "old-1", &ca_pem).await;
    let dir = StateDir::new(&fleet.dir.join("agents/old-1"));
    let enrolment_cert = std::fs::read_to_string(dir.cert()).expect("cert");
    assert_eq!(algorithms(&enrolment_cert).0, ED25519, "an Ed25519 agent");
    fleet.start_agent("old-1", None).expect("old-1 starts");
    assert_eventually(Duration::from_secs(20), || async {
        online(&fleet, "old-1").then_some(())
    })
    .await;
    let job = fleet
        .run("echo", &[("text", "ed25519 agent")], "all")
        .await
        .expect("job");
    assert_eq!(job.job_state(), JobState::Succeeded, "{job:?}");
    assert_eq!(job.targets.len(), 2, "{job:?}");

    // The renewal moves old-1 to a new P-256 key, written with its
    // certificate.
    let renewed = assert_eventually(Duration::from_secs(30), || {
        let dir = dir.clone();
        async move {
            let cert = std::fs::read_to_string(dir.cert()).ok()?;
            (algorithms(&cert).0 == EC_PUBLIC_KEY).then_some(cert)
        }
    })
    .await;
    let key_pem = std::fs::read_to_string(dir.key()).expect("key");
    let key = rcgen::KeyPair::from_pem(&key_pem).expect("key parses");
    assert_eq!(key.algorithm(), &rcgen::PKCS_ECDSA_P256_SHA256);
    let der = fleetcmd_controller::pki::pem_to_der(&renewed).expect("DER");
    let (_, cert) = x509_parser::parse_x509_certificate(&der).expect("certificate");
    assert_eq!(
        &*cert.public_key().subject_public_key.data,
        key.public_key_raw(),
        "the certificate is for the key on disk"
    );

    // Once the Ed25519 certificate has expired, restart the agent and the
    // controller (which issues its server certificate again): old-1 can
    // only connect with the P-256 key and certificate.
    let expires = {
        let der = fleetcmd_controller::pki::pem_to_der(&enrolment_cert).expect("DER");
        let (_, cert) = x509_parser::parse_x509_certificate(&der).expect("certificate");
        cert.validity().not_after.timestamp()
    };
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock after 1970")
        .as_secs_f64();
    tokio::time::sleep(Duration::from_secs_f64(
        (expires as f64 + 1.0 - now).max(0.0),
    ))
    .await;
    fleet.stop_agent("old-1").await;
    fleet
        .restart_controller(Duration::ZERO)
        .await
        .expect("controller restarts");
    assert_eq!(
        fleet.controller.shared().ca.cert_pem(),
        ca_pem,
        "the Ed25519 CA is kept across restarts"
    );
    fleet.start_agent("old-1", None).expect("old-1 restarts");
    assert_eventually(Duration::from_secs(20), || async {
        (online(&fleet, "old-1") && online(&fleet, "dev-1")).then_some(())
    })
    .await;
    let job = fleet
        .run("echo", &[("text", "p-256 agent")], "all")
        .await
        .expect("job");
    assert_eq!(job.job_state(), JobState::Succeeded, "{job:?}");
    assert!(
        job.targets
            .iter()
            .any(|t| t.agent_id == "old-1" && t.target_state() == TargetState::Ok),
        "{job:?}"
    );

    // A token made now still pins the same CA: a new agent joins.
    fleet
        .add_agent("new-1", fleet::dev_labels(1), None)
        .await
        .expect("a new agent joins against the Ed25519 CA");
    fleet.fleet.shutdown().await.expect("shutdown");
}
