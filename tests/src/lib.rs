//! The end-to-end harness: a real fleet (controller, agents joined with real
//! tokens, the signed example policy) in-process on `127.0.0.1:0` with a
//! throwaway CA, plus helpers to act as an operator, a gateway, a client
//! without a certificate or an attacker. `assert_eventually` replaces sleeps.

use std::future::Future;
use std::path::PathBuf;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use fleetcmd_cli::fleet::{Fleet, FleetOptions};
use fleetcmd_core::crypto::SigningKey;
use fleetcmd_core::ids::{Identity, JobId};
use fleetcmd_core::job::{JobSpec, SignedJob};
use fleetcmd_proto::channel::ClientTls;
use fleetcmd_proto::v1 as pb;
use tonic::transport::Channel;

pub use fleetcmd_cli::fleet;
/// A throwaway PostgreSQL (`pg::PgCluster`) for tests of the PostgreSQL store.
pub use fleetcmd_pg_harness as pg;

pub fn init() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// A fleet in a temporary directory (kept alive by the returned guard).
pub struct TestFleet {
    pub fleet: Fleet,
    pub tmp: tempfile::TempDir,
}

impl std::ops::Deref for TestFleet {
    type Target = Fleet;
    fn deref(&self) -> &Fleet {
        &self.fleet
    }
}
impl std::ops::DerefMut for TestFleet {
    fn deref_mut(&mut self) -> &mut Fleet {
        &mut self.fleet
    }
}

pub async fn start_fleet(agents: usize) -> TestFleet {
    start_fleet_with(agents, |_| {}).await
}

pub async fn start_fleet_with(agents: usize, tweak: impl FnOnce(&mut FleetOptions)) -> TestFleet {
    init();
    let tmp = tempfile::tempdir().expect("temp dir");
    let mut opts = FleetOptions::new(tmp.path());
    opts.agents = agents;
    opts.heartbeat = Duration::from_secs(1);
    tweak(&mut opts);
    let fleet = Fleet::start(opts).await.expect("fleet starts");
    TestFleet { fleet, tmp }
}

impl TestFleet {
    pub fn path(&self) -> PathBuf {
        self.tmp.path().to_owned()
    }

    pub async fn operator(&self) -> Channel {
        fleetcmd_proto::channel::connect(&self.url, &self.operator_tls)
            .await
            .expect("operator connects")
    }

    pub async fn gateway(&self) -> Channel {
        fleetcmd_proto::channel::connect(&self.url, &self.gateway_tls)
            .await
            .expect("gateway connects")
    }

    /// TLS material of one agent (from its state directory).
    pub fn agent_tls(&self, name: &str) -> ClientTls {
        let dir = self.dir.join("agents").join(name);
        let read = |f: &str| std::fs::read_to_string(dir.join(f)).expect("agent state file");
        ClientTls {
            ca_pem: read("ca.crt"),
            cert_pem: read("agent.crt"),
            key_pem: read("agent.key"),
        }
    }

    /// A channel that verifies the controller but presents no certificate.
    pub async fn anonymous(&self) -> Channel {
        let ep = fleetcmd_proto::channel::endpoint(&self.url, &self.operator_tls.ca_pem, None)
            .expect("endpoint");
        fleetcmd_proto::channel::open(&ep)
            .await
            .expect("anonymous connects")
    }

    /// Signs a job as the operator (signer `operator-dev`).
    pub fn operator_job(
        &self,
        command: &str,
        args: &[(&str, &str)],
        selector: &str,
    ) -> (JobSpec, SignedJob) {
        let spec = spec(command, args, selector, "cli:admin");
        let job = SignedJob::sign(
            &spec,
            fleetcmd_cli::fleet::OPERATOR_SIGNER,
            &self.operator_key,
        );
        (spec, job)
    }

    /// Submits as the operator and waits for the job to finish.
    pub async fn run(
        &self,
        command: &str,
        args: &[(&str, &str)],
        selector: &str,
    ) -> Result<pb::Job, tonic::Status> {
        let (_, job) = self.operator_job(command, args, selector);
        self.submit_and_wait(job).await
    }

    pub async fn submit_and_wait(&self, job: SignedJob) -> Result<pb::Job, tonic::Status> {
        let mut c = pb::jobs_client::JobsClient::new(self.operator().await);
        let sub = c.submit(to_pb(job)).await?.into_inner();
        Ok(self.wait_job(&sub.job_id).await)
    }

    pub async fn wait_job(&self, id: &str) -> pb::Job {
        let shared = self.controller.shared().clone();
        let id = id.to_owned();
        assert_eventually(Duration::from_secs(30), || {
            let shared = shared.clone();
            let id = id.clone();
            async move {
                let j = shared.get_job(&id).ok()?;
                fleetcmd_cli::client::is_finished(&j).then_some(j)
            }
        })
        .await
    }
}

/// A hostile agent: a raw `AgentStream` connection with `name`'s real
/// certificate that sends whatever the test tells it to (it replaces the
/// real agent's stream until that one reconnects).
pub struct RawAgent {
    pub tx: tokio::sync::mpsc::Sender<pb::AgentMessage>,
    /// The controller's answer to the `Hello`: its stream, or the refusal.
    pub inbound: Result<tonic::Streaming<pb::ControllerMessage>, tonic::Status>,
}

impl TestFleet {
    /// Connects as agent `name` and sends `hello` first.
    pub async fn raw_agent(&self, name: &str, hello: pb::Hello) -> RawAgent {
        let ch = fleetcmd_proto::channel::connect(&self.url, &self.agent_tls(name))
            .await
            .expect("agent channel");
        let mut c = pb::agent_stream_client::AgentStreamClient::new(ch)
            .max_encoding_message_size(16 * 1024 * 1024);
        let (tx, rx) = tokio::sync::mpsc::channel(16);
        tx.send(pb::AgentMessage {
            msg: Some(pb::agent_message::Msg::Hello(hello)),
        })
        .await
        .expect("queue hello");
        let inbound = c
            .connect(tokio_stream::wrappers::ReceiverStream::new(rx))
            .await
            .map(|r| r.into_inner());
        RawAgent { tx, inbound }
    }
}

impl RawAgent {
    pub async fn send(&self, msg: pb::agent_message::Msg) {
        self.tx
            .send(pb::AgentMessage { msg: Some(msg) })
            .await
            .expect("raw agent stream open");
    }

    /// Waits (bounded) for the controller's acknowledgement of a result for
    /// `job_id`: everything sent before that result has been handled.
    pub async fn acked(&mut self, job_id: &str) {
        let inbound = self.inbound.as_mut().expect("the stream was accepted");
        tokio::time::timeout(Duration::from_secs(20), async {
            loop {
                let m = inbound.message().await.expect("stream").expect("open");
                if let Some(pb::controller_message::Msg::Ack(a)) = m.msg
                    && a.job_id == job_id
                {
                    return;
                }
            }
        })
        .await
        .expect("the result was acknowledged in time");
    }
}

/// A workspace binary next to this test's deps directory (built by
/// `cargo build --workspace --bins`; scripts/test does).
pub fn workspace_bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("test binary path");
    let dir = exe
        .parent()
        .and_then(std::path::Path::parent)
        .expect("target dir");
    let p = dir.join(name);
    assert!(
        p.exists(),
        "{} is missing: build the binaries first (`cargo build --workspace --bins`; scripts/test does)",
        p.display()
    );
    p
}

pub fn to_pb(job: SignedJob) -> pb::SignedJob {
    pb::SignedJob {
        spec: job.spec,
        signature: job.signature,
        key_id: job.key_id,
    }
}

pub fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

pub fn new_job_id() -> JobId {
    JobId::from_uuid_v7_bytes(*uuid::Uuid::now_v7().as_bytes()).expect("v7 uuid")
}

/// A job spec valid for 10 minutes from now.
pub fn spec(command: &str, args: &[(&str, &str)], selector: &str, requester: &str) -> JobSpec {
    JobSpec {
        id: new_job_id(),
        command: command.into(),
        args: args
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        selector: selector.into(),
        // A channel of the requester's platform (`cli` for operators).
        channel: requester.split(':').next().unwrap_or_default().into(),
        requester: Identity::parse(requester).expect("identity"),
        approvals: Vec::new(),
        unattested_approvers: Vec::new(),
        timeout_secs: 0,
        not_before: now(),
        expires_at: now() + 600,
        rollout: Default::default(),
    }
}

/// A fresh Ed25519 key that no policy trusts.
pub fn stranger_key() -> SigningKey {
    let doc = ring::signature::Ed25519KeyPair::generate_pkcs8(&ring::rand::SystemRandom::new())
        .expect("keygen");
    SigningKey::from_pkcs8_der(doc.as_ref()).expect("key")
}

/// Polls `check` until it returns `Some`, or panics after `limit`.
pub async fn assert_eventually<T, F, Fut>(limit: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let start = Instant::now();
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(
            start.elapsed() < limit,
            "condition not met within {limit:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The target of `agent` in `job`.
pub fn target<'a>(job: &'a pb::Job, agent: &str) -> &'a pb::Target {
    job.targets
        .iter()
        .find(|t| t.agent_id == agent)
        .unwrap_or_else(|| panic!("no target {agent} in {job:?}"))
}

pub fn stdout(t: &pb::Target) -> String {
    String::from_utf8_lossy(&t.result.clone().unwrap_or_default().stdout).into_owned()
}

/// Records written by the `store-writer` crash-loop helper, so the checker
/// can tell an intact record from a torn one.
pub mod crash {
    use fleetcmd_controller::store::TargetRecord;

    pub fn job_key(i: u64) -> String {
        format!("crash-{i:012}")
    }

    pub fn record(i: u64) -> TargetRecord {
        let payload: Vec<u8> = (0..256u64)
            .map(|j| (i.wrapping_mul(31).wrapping_add(j * 7) % 251) as u8)
            .collect();
        TargetRecord {
            result: Some(payload),
            ..TargetRecord::new(
                fleetcmd_core::state::TargetState::Ok,
                &format!("record {i}"),
            )
        }
    }
}
