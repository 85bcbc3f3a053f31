//! Agents that know several controllers (`controllers = [...]` in
//! agent.toml): two `fleetcmd-controller` processes share one PostgreSQL
//! database and one CA; the agent (a real `fleetcmd-agent` process) is
//! `kill -9`ed out from under its controller and must be online on the
//! other within 10 s, with the identity and pinned CA it joined with, and
//! run a job submitted there.
//!
//! What the second controller shares with the first is what an operator
//! copies (docs/install.md, "Several controllers"): `pki/ca.crt` and
//! `pki/ca.key` (the fleet CA: agents pin it and every controller issues
//! its own server certificate from it), `audit/audit.key` (one key signs
//! the trail's heads), and the same `policy_roots`; the database holds
//! the rest.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use fleetcmd_proto::channel::ClientTls;
use fleetcmd_proto::v1 as pb;
use fleetcmd_proto::v1::{JobState, TargetState};
use fleetcmd_tests::workspace_bin as bin;
use fleetcmd_tests::*;

use crate::crash::Proc;

pub(crate) fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port()
}

/// A real process whose output goes to `log` (read when a test fails).
pub(crate) fn spawn(cmd: &mut Command, log: &Path) -> Proc {
    let log = std::fs::File::create(log).expect("log file");
    // The binaries log to stdout (and errors to stderr): both go to `log`.
    let out = log.try_clone().expect("log file");
    Proc(
        cmd.stdin(Stdio::null())
            .stdout(out)
            .stderr(log)
            .env("RUST_LOG", "info")
            .spawn()
            .expect("process starts"),
    )
}

pub(crate) fn controller(config: &Path, log: &Path) -> Proc {
    spawn(
        Command::new(bin("fleetcmd-controller"))
            .arg("-c")
            .arg(config)
            .arg("run"),
        log,
    )
}

/// Copies what a second controller must share with the first (the same
/// copy `fleetcmd dev --controllers N` makes).
pub(crate) fn share_ca_and_audit_key(from: &Path, to: &Path) {
    fleetcmd_cli::dev_cluster::share_keys(from, to).expect("CA and audit key copied");
}

/// The config of a controller named `name` on the PostgreSQL database
/// `db` of `cluster`: listening on `port`, its data in `d/NAME`, `admin`
/// its policy root, heartbeats every second.
pub(crate) fn postgres_controller_config(
    d: &Path,
    name: &str,
    port: u16,
    admin: &fleetcmd_core::crypto::SigningKey,
    cluster: &pg::PgCluster,
    db: &pg::Database,
) -> std::path::PathBuf {
    let path = d.join(format!("{name}.toml"));
    std::fs::write(
        &path,
        format!(
            "listen = \"127.0.0.1:{port}\"\ndata_dir = \"{}\"\npolicy_roots = [\"{}\"]\nheartbeat_interval = \"1s\"\n\
             store = \"postgres\"\npostgres_url = \"{}\"\npostgres_password_file = \"{}\"\n",
            d.join(name).display(),
            admin.public_key(),
            db.url,
            cluster.password_file().display(),
        ),
    )
    .expect("controller config");
    path
}

/// A policy bundle signed by the policy root `admin`.
pub(crate) fn signed_policy(
    text: &str,
    admin: &fleetcmd_core::crypto::SigningKey,
) -> pb::SignedPolicy {
    let sig = fleetcmd_core::policy_bundle::sign_bundle(text.as_bytes(), admin);
    pb::SignedPolicy {
        bundle: text.as_bytes().to_vec(),
        signatures: vec![pb::PolicySignature {
            key_id: sig.key_id,
            signature: sig.signature,
        }],
    }
}

/// A one-use join token for the agent `name`, made through `ch`.
pub(crate) async fn join_token(ch: tonic::transport::Channel, name: &str) -> String {
    pb::tokens_client::TokensClient::new(ch)
        .create(pb::CreateTokenRequest {
            ttl_secs: 600,
            uses: 1,
            name: name.into(),
            ..Default::default()
        })
        .await
        .expect("token")
        .into_inner()
        .token
}

/// `fleetcmd-agent -c CFG join --no-start --token TOKEN`; whether it joined.
pub(crate) fn join_agent(cfg: &Path, token: &str) -> bool {
    Command::new(bin("fleetcmd-agent"))
        .arg("-c")
        .arg(cfg)
        .args(["join", "--no-start", "--token", token])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .expect("join")
        .success()
}

pub(crate) async fn online_agents(url: &str, op: &ClientTls) -> Option<Vec<pb::Agent>> {
    let ch = fleetcmd_proto::channel::connect(url, op).await.ok()?;
    Some(
        pb::agents_client::AgentsClient::new(ch)
            .list(pb::ListAgentsRequest::default())
            .await
            .ok()?
            .into_inner()
            .agents
            .into_iter()
            .filter(|a| a.online)
            .collect(),
    )
}

/// The last `lines` lines of each log file in `dir`, for a failing test.
pub(crate) fn log_tails(dir: &Path, files: &[&str], lines: usize) -> String {
    files
        .iter()
        .map(|f| {
            let text = std::fs::read_to_string(dir.join(f)).unwrap_or_default();
            let tail: Vec<&str> = text.lines().rev().take(lines).collect();
            format!(
                "--- {f}\n{}",
                tail.into_iter().rev().collect::<Vec<_>>().join("\n")
            )
        })
        .collect::<Vec<_>>()
        .join("\n")
}

fn dump_logs(dir: &Path) -> String {
    log_tails(dir, &["ctl-a.log", "ctl-b.log", "agent.log"], 30)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_agent_fails_over_to_the_second_controller_when_its_own_is_killed() {
    init();
    let (cluster, db) = crate::postgres::fresh_database().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let admin = fleetcmd_cli::policy_cmd::keygen(&d.join("admin.key"))
        .map_err(|f| f.error)
        .expect("admin key");
    let (port_a, port_b) = (free_port(), free_port());
    let (url_a, url_b) = (
        format!("https://127.0.0.1:{port_a}"),
        format!("https://127.0.0.1:{port_b}"),
    );
    let (cfg_a, cfg_b) = (
        postgres_controller_config(d, "ctl-a", port_a, &admin, cluster, &db),
        postgres_controller_config(d, "ctl-b", port_b, &admin, cluster, &db),
    );

    // Controller A makes the fleet: CA, operator certificate, policy, token.
    let ctl_a = controller(&cfg_a, &d.join("ctl-a.log"));
    let ca = d.join("ctl-a/pki/ca.crt");
    assert_eventually(Duration::from_secs(20), || async {
        ca.exists().then_some(())
    })
    .await;
    let (op, op_key) = crate::crash::issue_operator(&cfg_a, &d.join("op"));
    let channel = |url: String| {
        let op = op.clone();
        async move {
            assert_eventually(Duration::from_secs(20), || async {
                fleetcmd_proto::channel::connect(&url, &op).await.ok()
            })
            .await
        }
    };
    let policy = fleetcmd_cli::fleet::example_policy(1, &op_key.public_key(), &op_key.public_key());
    pb::policy_client::PolicyClient::new(channel(url_a.clone()).await)
        .push(signed_policy(&policy, &admin))
        .await
        .expect("policy pushed");
    let token = join_token(channel(url_a.clone()).await, "a-1").await;

    // The agent knows both; it joins through the first reachable (A).
    let agent_cfg = d.join("agent.toml");
    std::fs::write(
        &agent_cfg,
        format!(
            "controllers = [\"{url_a}\", \"{url_b}\"]\nstate_dir = \"{}\"\n",
            d.join("a-1").display()
        ),
    )
    .expect("agent config");
    assert!(join_agent(&agent_cfg, &token), "a-1 joins");
    let cert_before = std::fs::read(d.join("a-1/agent.crt")).expect("the joined certificate");
    let _agent = spawn(
        Command::new(bin("fleetcmd-agent"))
            .arg("-c")
            .arg(&agent_cfg)
            .arg("run"),
        &d.join("agent.log"),
    );
    assert_eventually(Duration::from_secs(20), || async {
        let online = online_agents(&url_a, &op).await?;
        (online.len() == 1 && online[0].agent_id == "a-1" && online[0].policy_version == 1)
            .then_some(())
    })
    .await;

    // Controller B: same database, same CA and audit key, same roots.
    share_ca_and_audit_key(&d.join("ctl-a"), &d.join("ctl-b"));
    let _ctl_b = controller(&cfg_b, &d.join("ctl-b.log"));
    let before = assert_eventually(Duration::from_secs(20), || async {
        online_agents(&url_b, &op).await
    })
    .await;
    assert!(before.is_empty(), "a-1 is on A, not B: {before:?}");

    let killed = Instant::now();
    ctl_a.kill9();
    let moved = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            if let Some(online) = online_agents(&url_b, &op).await
                && online.iter().any(|a| a.agent_id == "a-1")
            {
                return online;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
    .unwrap_or_else(|_| panic!("a-1 not online on B within 10 s\n{}", dump_logs(d)));
    let took = killed.elapsed();
    eprintln!("a-1 online on controller B {took:?} after kill -9 of A");
    assert_eq!(moved[0].policy_version, 1, "{moved:?}");
    // The same identity: no new key or certificate was made for B.
    assert_eq!(
        std::fs::read(d.join("a-1/agent.crt")).expect("certificate"),
        cert_before
    );

    // A job submitted on the survivor runs on the agent.
    let done = crate::dev_ha::uptime_on(&url_b, &op, &op_key, "all").await;
    assert_eq!(done.job_state(), JobState::Succeeded, "{done:?}");
    let t = target(&done, "a-1");
    assert_eq!(t.target_state(), TargetState::Ok, "{done:?}");
    assert!(stdout(t).contains("load average"), "{}", stdout(t));
}
