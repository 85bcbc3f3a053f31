//! "Nothing lost" with real processes: the installed-style
//! binaries `fleetcmd-controller` and `fleetcmd-agent` run as separate
//! processes; the controller is `kill -9`ed mid-job and restarted, and every
//! agent's result still arrives; an agent `kill -9`ed mid-job is restarted
//! and its target ends `failed` with a clear reason instead of `running`.

use fleetcmd_proto::v1::{JobState, TargetState};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use fleetcmd_core::job::SignedJob;
use fleetcmd_proto::channel::ClientTls;
use fleetcmd_proto::v1 as pb;
use fleetcmd_tests::*;

use fleetcmd_tests::workspace_bin as bin;

pub(crate) struct Proc(pub(crate) Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Proc {
    fn spawn(cmd: &mut Command) -> Proc {
        Proc(
            cmd.stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .env("RUST_LOG", "warn")
                .spawn()
                .expect("process starts"),
        )
    }

    /// SIGKILL: no shutdown, no flush.
    pub(crate) fn kill9(mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A fleet of the real binaries: the controller, `issue-cert`'s operator
/// `admin` in `dir/op/` and two agents `a-1`, `a-2` (`setup`).
pub(crate) struct World {
    pub(crate) dir: tempfile::TempDir,
    pub(crate) url: String,
    controller_cfg: PathBuf,
    op: ClientTls,
    op_key: fleetcmd_core::crypto::SigningKey,
}

impl World {
    fn controller(&self) -> Proc {
        Proc::spawn(
            Command::new(bin("fleetcmd-controller"))
                .arg("-c")
                .arg(&self.controller_cfg)
                .arg("run"),
        )
    }

    fn agent_cfg(&self, name: &str) -> PathBuf {
        self.dir.path().join(format!("{name}.toml"))
    }

    fn agent(&self, name: &str) -> Proc {
        Proc::spawn(
            Command::new(bin("fleetcmd-agent"))
                .arg("-c")
                .arg(self.agent_cfg(name))
                .arg("run"),
        )
    }

    async fn channel(&self) -> tonic::transport::Channel {
        assert_eventually(Duration::from_secs(20), || async {
            fleetcmd_proto::channel::connect(&self.url, &self.op)
                .await
                .ok()
        })
        .await
    }

    pub(crate) async fn job(&self, id: &str) -> Option<pb::Job> {
        let ch = fleetcmd_proto::channel::connect(&self.url, &self.op)
            .await
            .ok()?;
        let r = pb::jobs_client::JobsClient::new(ch)
            .get(pb::GetJobRequest { job_id: id.into() })
            .await;
        r.ok().map(|r| r.into_inner())
    }

    async fn submit_sleep(&self) -> String {
        let s = spec("sleep", &[("seconds", "3")], "all", "cli:admin");
        let job = SignedJob::sign(&s, fleetcmd_cli::fleet::OPERATOR_SIGNER, &self.op_key);
        let mut c = pb::jobs_client::JobsClient::new(self.channel().await);
        c.submit(to_pb(job))
            .await
            .expect("submit")
            .into_inner()
            .job_id
    }

    async fn wait_state(&self, id: &str, want: impl Fn(&pb::Job) -> bool) -> pb::Job {
        assert_eventually(Duration::from_secs(40), || async {
            self.job(id).await.filter(|j| want(j))
        })
        .await
    }
}

pub(crate) async fn setup() -> (World, Proc, Vec<Proc>) {
    init();
    let dir = tempfile::tempdir().expect("tempdir");
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port();
    let admin = fleetcmd_cli::policy_cmd::keygen(&dir.path().join("admin.key"))
        .map_err(|f| f.error)
        .expect("admin key");
    let controller_cfg = dir.path().join("controller.toml");
    std::fs::write(
        &controller_cfg,
        format!(
            "listen = \"127.0.0.1:{port}\"\ndata_dir = \"{}\"\npolicy_roots = [\"{}\"]\nheartbeat_interval = \"1s\"\n",
            dir.path().join("ctl").display(),
            admin.public_key()
        ),
    )
    .expect("config");
    let mut world = World {
        url: format!("https://127.0.0.1:{port}"),
        controller_cfg,
        op: ClientTls {
            ca_pem: String::new(),
            cert_pem: String::new(),
            key_pem: String::new(),
        },
        op_key: stranger_key(),
        dir,
    };
    let ctl = world.controller();
    let ca = world.dir.path().join("ctl/pki/ca.crt");
    assert_eventually(Duration::from_secs(20), || async {
        ca.exists().then_some(())
    })
    .await;
    (world.op, world.op_key) = issue_operator(&world.controller_cfg, &world.dir.path().join("op"));
    let policy = fleetcmd_cli::fleet::example_policy(
        1,
        &world.op_key.public_key(),
        &world.op_key.public_key(),
    );
    let sig = fleetcmd_core::policy_bundle::sign_bundle(policy.as_bytes(), &admin);
    pb::policy_client::PolicyClient::new(world.channel().await)
        .push(pb::SignedPolicy {
            bundle: policy.into_bytes(),
            signatures: vec![pb::PolicySignature {
                key_id: sig.key_id,
                signature: sig.signature,
            }],
        })
        .await
        .expect("policy pushed");
    let mut agents = Vec::new();
    for name in ["a-1", "a-2"] {
        let token = crate::failover::join_token(world.channel().await, name).await;
        std::fs::write(
            world.agent_cfg(name),
            format!(
                "controller = \"{}\"\nstate_dir = \"{}\"\n",
                world.url,
                world.dir.path().join(name).display()
            ),
        )
        .expect("agent config");
        let st = Command::new(bin("fleetcmd-agent"))
            .arg("-c")
            .arg(world.agent_cfg(name))
            .args(["join", "--token", &token])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .expect("join");
        assert!(st.success(), "{name} joins");
        agents.push(world.agent(name));
    }
    assert_eventually(Duration::from_secs(20), || async {
        let ch = fleetcmd_proto::channel::connect(&world.url, &world.op)
            .await
            .ok()?;
        let l = pb::agents_client::AgentsClient::new(ch)
            .list(pb::ListAgentsRequest::default())
            .await
            .ok()?
            .into_inner()
            .agents;
        (l.len() == 2 && l.iter().all(|a| a.online && a.policy_version == 1)).then_some(())
    })
    .await;
    (world, ctl, agents)
}

/// `issue-cert --role operator --name admin` into `out`: the operator's
/// TLS identity and its signing key.
pub(crate) fn issue_operator(
    controller_cfg: &std::path::Path,
    out: &std::path::Path,
) -> (ClientTls, fleetcmd_core::crypto::SigningKey) {
    let st = Command::new(bin("fleetcmd-controller"))
        .arg("-c")
        .arg(controller_cfg)
        .args([
            "issue-cert",
            "--role",
            "operator",
            "--name",
            "admin",
            "--out",
        ])
        .arg(out)
        .stdout(Stdio::null())
        .status()
        .expect("issue-cert");
    assert!(st.success());
    let read = |f: &str| std::fs::read_to_string(out.join(f)).expect("operator file");
    let op = ClientTls {
        ca_pem: read("ca.crt"),
        cert_pem: read("admin.crt"),
        key_pem: read("admin.key"),
    };
    let key = fleetcmd_core::crypto::SigningKey::from_pkcs8_pem(&read("admin.sign.key"))
        .expect("operator signing key");
    (op, key)
}

fn all_running(j: &pb::Job) -> bool {
    j.targets.len() == 2
        && j.targets
            .iter()
            .all(|t| t.target_state() == TargetState::Running)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn kill_9_of_the_controller_mid_job_loses_no_result() {
    let (world, ctl, _agents) = setup().await;
    let id = world.submit_sleep().await;
    world.wait_state(&id, all_running).await;
    ctl.kill9();
    let _ctl = world.controller();
    let done = world
        .wait_state(&id, |j| j.job_state() != JobState::Running)
        .await;
    assert_eq!(done.job_state(), JobState::Succeeded, "{done:?}");
    assert!(
        done.targets
            .iter()
            .all(|t| t.target_state() == TargetState::Ok
                && t.result.as_ref().is_some_and(|r| r.exit_code == Some(0))),
        "{done:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_agent_killed_mid_job_reports_it_after_restart() {
    let (world, _ctl, mut agents) = setup().await;
    let id = world.submit_sleep().await;
    world.wait_state(&id, all_running).await;
    agents.remove(0).kill9();
    let _a1 = world.agent("a-1");
    let done = world
        .wait_state(&id, |j| j.job_state() != JobState::Running)
        .await;
    assert_eq!(done.job_state(), JobState::Failed, "{done:?}");
    let t = done
        .targets
        .iter()
        .find(|t| t.agent_id == "a-1")
        .expect("a-1");
    assert_eq!(t.target_state(), TargetState::Failed, "{done:?}");
    let r = t.result.clone().unwrap_or_default();
    assert_eq!(r.reason_code, "agent_restarted", "{r:?}");
    assert!(
        r.reason.contains("stopped while the job was running"),
        "{r:?}"
    );
    let t2 = done
        .targets
        .iter()
        .find(|t| t.agent_id == "a-2")
        .expect("a-2");
    assert_eq!(t2.target_state(), TargetState::Ok, "{done:?}");
}
