//! ARCHITECTURE.md invariant 6: a policy bundle is accepted only when the admin root key
//! signed exactly its bytes and its version is newer than the current one —
//! by the controller, and by every agent on its own (a compromised controller
//! cannot widen the allow-list or roll it back).

use fleetcmd_proto::v1::JobState;
use std::time::Duration;

use fleetcmd_core::policy_bundle::sign_bundle;
use fleetcmd_proto::v1 as pb;
use fleetcmd_tests::*;
use pb::policy_client::PolicyClient;
use tonic::Code;

use crate::support::*;

/// The security policy at `version` plus an `evil` command that creates a
/// file anywhere under the fleet directory.
fn widened(fleet: &TestFleet, version: u64) -> String {
    let dir = fleet.path().display().to_string();
    format!(
        "{}\n[commands.evil]\nargv = [\"/usr/bin/touch\", \"{{path}}\"]\nargs.path = {{ kind = \"path\", prefixes = [\"{dir}\"], create = true }}\n",
        security_policy(fleet, version)
    )
}

fn signed(
    text: &str,
    key: &fleetcmd_core::crypto::SigningKey,
    key_id: Option<String>,
) -> pb::SignedPolicy {
    let sig = sign_bundle(text.as_bytes(), key);
    pb::SignedPolicy {
        bundle: text.as_bytes().to_vec(),
        signatures: vec![pb::PolicySignature {
            key_id: key_id.unwrap_or(sig.key_id),
            signature: sig.signature,
        }],
    }
}

/// Bundles that must be refused, each trying to add `evil`.
fn bad_bundles(fleet: &TestFleet) -> Vec<(&'static str, pb::SignedPolicy, Code)> {
    let v = fleet.policy_version;
    let admin_id = fleet.admin_key.public_key().fingerprint();
    let stranger = stranger_key();
    let mut tampered = signed(&widened(fleet, v + 1), &fleet.admin_key, None);
    tampered.bundle = widened(fleet, v + 2).into_bytes();
    let mut unsigned = signed(&widened(fleet, v + 1), &fleet.admin_key, None);
    unsigned.signatures.clear();
    vec![
        (
            "older version, admin-signed",
            signed(&widened(fleet, v - 1), &fleet.admin_key, None),
            Code::FailedPrecondition,
        ),
        (
            "same version, admin-signed",
            signed(&widened(fleet, v), &fleet.admin_key, None),
            Code::FailedPrecondition,
        ),
        (
            "newer, signed by a stranger",
            signed(&widened(fleet, v + 1), &stranger, None),
            Code::InvalidArgument,
        ),
        (
            "newer, stranger posing as admin",
            signed(&widened(fleet, v + 1), &stranger, Some(admin_id)),
            Code::InvalidArgument,
        ),
        (
            "newer, changed after signing",
            tampered,
            Code::InvalidArgument,
        ),
        ("newer, unsigned", unsigned, Code::InvalidArgument),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn controller_refuses_rollback_and_forged_policies() {
    let fleet = security_fleet(1).await;
    let before = fleet.controller.shared().policy.current().expect("policy");
    let mut policy = PolicyClient::new(fleet.operator().await);
    for (label, bundle, code) in bad_bundles(&fleet) {
        let needle = if code == Code::FailedPrecondition {
            "rollback refused"
        } else {
            "policy bundle"
        };
        let status = assert_status(policy.push(bundle).await, code, needle);
        let cur = fleet.controller.shared().policy.current().expect("policy");
        assert_eq!(
            cur.policy.version, fleet.policy_version,
            "{label}: {status:?}"
        );
        assert_eq!(cur.hash, before.hash, "{label}");
        assert!(cur.policy.command("evil").is_none(), "{label}");
    }
    let got = policy
        .get(pb::GetPolicyRequest {})
        .await
        .expect("get")
        .into_inner();
    assert_eq!(
        (got.version, got.hash),
        (fleet.policy_version, before.hash.clone())
    );
    // The agents were not offered anything new, and `evil` is refused at submit.
    let m = marker(&fleet, "ctl-evil");
    let res = fleet
        .run("evil", &[("path", m.to_str().expect("utf-8"))], "all")
        .await;
    assert_status(res, Code::PermissionDenied, "not in the allow-list");
    assert_absent(&m);
    assert_eq!(
        agent_info(&fleet, "dev-1").policy_version,
        fleet.policy_version
    );
    fleet.fleet.shutdown().await.expect("shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn agents_refuse_rollback_and_forged_policies_from_the_controller() {
    let fleet = security_fleet(2).await;
    let agents = ["dev-1", "dev-2"];
    for (i, (label, bundle, _)) in bad_bundles(&fleet).into_iter().enumerate() {
        fleet.controller.shared().inject_policy_unchecked(bundle);
        // Jobs follow the bundle on the same stream, so the agent has decided
        // on the bundle before it sees this job.
        let m = marker(&fleet, &format!("agent-evil-{i}"));
        let (spec, job) =
            fleet.operator_job("evil", &[("path", m.to_str().expect("utf-8"))], "all");
        let got = inject(&fleet, job, spec.id.as_str(), &agents).await;
        for agent in agents {
            let r = result_of(&got, agent);
            assert_eq!(
                r.reason_code, "not_allowed",
                "{label}: the agent took the bundle: {r:?}"
            );
        }
        assert_absent(&m);
    }
    // Jobs keep running under the last good policy.
    let ok = marker(&fleet, "still-works");
    let job = fleet
        .run("mark", &[("path", ok.to_str().expect("utf-8"))], "all")
        .await
        .expect("submitted");
    assert_eq!(job.job_state(), JobState::Succeeded, "{job:?}");
    assert!(ok.exists());
    // And the agents report the old version in their next heartbeats.
    let since = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_millis() as u64;
    let shared = fleet.controller.shared().clone();
    let list = assert_eventually(Duration::from_secs(10), || {
        let shared = shared.clone();
        async move {
            let list = shared.registry.list_agents("").ok()?;
            list.iter().all(|a| a.last_seen_ms >= since).then_some(list)
        }
    })
    .await;
    for a in list {
        assert_eq!(a.policy_version, fleet.policy_version, "{a:?}");
    }
    fleet.fleet.shutdown().await.expect("shutdown");
}
