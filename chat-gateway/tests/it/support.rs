//! Keys, a signed test policy, a fake controller and a recording sender.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use fleetcmd_core::crypto::SigningKey;
use fleetcmd_core::ids::{Identity, JobRef};
use fleetcmd_core::job::{JobSpec, SignedJob};
use fleetcmd_core::policy::Policy;
use fleetcmd_core::policy_bundle::sign_bundle;
use fleetcmd_gateway::adapters::{
    AdapterError, BoxFuture, ChatSender, Incoming, MessageRef, Reply,
};
use fleetcmd_gateway::controller::{ControllerApi, ControllerError, JobEvents};
use fleetcmd_gateway::router::{Router, RouterConfig};
use fleetcmd_proto::v1;

/// Writes a secret file as its owner alone may read it (0600): the
/// gateway refuses secret files other local users can read.
pub fn write_private(path: impl AsRef<std::path::Path>, text: impl AsRef<[u8]>) {
    use std::os::unix::fs::PermissionsExt as _;
    let path = path.as_ref();
    std::fs::write(path, text).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
}

pub fn new_key() -> SigningKey {
    let rng = ring::rand::SystemRandom::new();
    let pkcs8 = ring::signature::Ed25519KeyPair::generate_pkcs8(&rng)
        .unwrap_or_else(|e| panic!("keygen: {e}"));
    SigningKey::from_pkcs8_der(pkcs8.as_ref()).unwrap_or_else(|e| panic!("{e}"))
}

pub fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .unwrap_or_else(|e| panic!("no free port: {e}"))
}

/// Serves `app` on a loopback port; returns its base URL and the serving
/// task (dropping the handle leaves it running).
pub async fn serve_http(app: axum::Router) -> (String, tokio::task::JoinHandle<()>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .unwrap_or_else(|e| panic!("bind: {e}"));
    let addr = listener
        .local_addr()
        .unwrap_or_else(|e| panic!("addr: {e}"));
    let task = tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    (format!("http://{addr}"), task)
}

/// The support test policy after its `[[signers]]` block: commands, roles
/// and the console users' bindings.
pub const POLICY_BODY: &str = r#"
[commands.uptime]
description = "Load average and uptime"
argv = ["/usr/bin/uptime"]

[commands.restart]
description = "Restart an app service"
argv = ["/usr/bin/systemctl", "restart", "{unit}"]
args.unit = { kind = "enum", values = ["nginx.service", "app.service"] }

[commands.logs]
argv = ["/usr/bin/journalctl", "-u", "{unit}", "-n", "{lines}"]
args.unit = { kind = "pattern", pattern = "^[a-z0-9@._-]+\\.service$" }
args.lines = { kind = "int", min = 1, max = 500, default = 50 }

[commands.reboot]
argv = ["/usr/sbin/reboot"]
requires_approvals = 1

[roles.oncall]
commands = ["uptime", "restart", "logs", "reboot"]

[roles.viewer]
commands = ["uptime", "logs"]

[[bindings]]
subjects = ["console:alice"]
roles = ["oncall"]

[[bindings]]
subjects = ["console:bob"]
roles = ["viewer"]

[[bindings]]
subjects = ["console:carol", "console:dave"]
roles = ["oncall"]
"#;

/// A policy text: `version`, the `[[signers]]` entry `gw` for `signer`
/// (the gateway's key), then `body` (commands, roles, bindings).
pub fn policy_text(version: u64, signer: &SigningKey, body: &str) -> String {
    format!(
        r#"
version = {version}

[[signers]]
id = "gw"
public_key = "{key}"
may_sign = ["*"]
vouches_for = ["console:*", "slack:*", "mattermost:*", "irc:*", "xmpp:*", "matrix:*", "campfire:*", "webhook:*"]
{body}"#,
        key = signer.public_key()
    )
}

/// Everything a router test needs.
pub struct World {
    pub signer: Arc<SigningKey>,
    pub root: SigningKey,
    pub policy: Policy,
    pub router: Arc<Router<FakeController>>,
}

pub fn world() -> World {
    world_with(|_| {})
}

pub fn world_with(tweak: impl FnOnce(&mut FakeController)) -> World {
    world_with_config(tweak, |_| {})
}

/// A world with both the fake controller and the router config adjusted.
pub fn world_with_config(
    tweak: impl FnOnce(&mut FakeController),
    tweak_cfg: impl FnOnce(&mut RouterConfig),
) -> World {
    world_for(4, POLICY_BODY, tweak, tweak_cfg)
}

/// A world whose policy is `version` and `body` (see [`policy_text`]),
/// signed by a fresh root key for a fresh gateway key, served by the fake
/// controller (adjusted by `tweak`) to a router (config adjusted by
/// `tweak_cfg`).
pub fn world_for(
    version: u64,
    body: &str,
    tweak: impl FnOnce(&mut FakeController),
    tweak_cfg: impl FnOnce(&mut RouterConfig),
) -> World {
    let signer = Arc::new(new_key());
    let root = new_key();
    let text = policy_text(version, &signer, body);
    let policy = Policy::parse(&text).unwrap_or_else(|e| panic!("{e}"));
    let sig = sign_bundle(text.as_bytes(), &root);
    let mut fake = FakeController::new(v1::PolicyInfo {
        version: policy.version,
        hash: String::new(),
        policy: Some(v1::SignedPolicy {
            bundle: text.into_bytes(),
            signatures: vec![v1::PolicySignature {
                key_id: sig.key_id,
                signature: sig.signature,
            }],
        }),
    });
    tweak(&mut fake);
    let mut cfg = RouterConfig {
        signing_key: signer.clone(),
        signer_id: "gw".to_string(),
        policy_roots: vec![root.public_key()],
        policy_threshold: 1,
        bot_name: "fleetcmd".to_string(),
        job_expiry: Duration::from_secs(600),
        poll_interval: Duration::from_millis(5),
        approval_window: Duration::from_secs(60),
    };
    tweak_cfg(&mut cfg);
    World {
        signer,
        root,
        policy,
        router: Arc::new(Router::new(cfg, fake)),
    }
}

/// The router of [`world_for`] with the default config.
pub fn router_for(
    version: u64,
    body: &str,
    tweak: impl FnOnce(&mut FakeController),
) -> Arc<Router<FakeController>> {
    world_for(version, body, tweak, |_| {}).router
}

/// A router over the support policy with `extra` appended (e.g. bindings
/// for a platform's identities).
pub fn router_with_extra(
    extra: &str,
    tweak: impl FnOnce(&mut FakeController),
) -> Arc<Router<FakeController>> {
    router_for(4, &format!("{POLICY_BODY}\n{extra}\n"), tweak)
}

/// A job that failed on one of two web hosts, as the rendering snapshots
/// show it: web-1 ok with `stdout`, web-2 failed with `code` and `stderr`.
pub fn failed_job(
    command: &str,
    requester: &str,
    stdout: &[u8],
    code: i32,
    stderr: &[u8],
) -> v1::Job {
    v1::Job {
        job_id: "01890a5d-ac96-774b-bcce-b302099a8057".into(),
        command: command.into(),
        selector: "role=web".into(),
        requester: requester.into(),
        state: "failed".into(),
        targets: vec![
            v1::Target {
                agent_id: "web-1".into(),
                state: "ok".into(),
                result: Some(v1::JobResult {
                    exit_code: Some(0),
                    stdout: stdout.to_vec(),
                    duration_ms: 12,
                    ..Default::default()
                }),
                ..Default::default()
            },
            v1::Target {
                agent_id: "web-2".into(),
                state: "failed".into(),
                result: Some(v1::JobResult {
                    exit_code: Some(code),
                    stderr: stderr.to_vec(),
                    duration_ms: 1500,
                    ..Default::default()
                }),
                ..Default::default()
            },
        ],
        ..Default::default()
    }
}

pub fn agent(id: &str, role: &str, online: bool) -> v1::Agent {
    v1::Agent {
        agent_id: id.to_string(),
        labels: HashMap::from([("role".to_string(), role.to_string())])
            .into_iter()
            .collect(),
        online,
        version: "0.1.0".to_string(),
        metrics: Some(v1::HostMetrics {
            load1: 0.5,
            mem_total_bytes: 1000,
            mem_used_bytes: 250,
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// A controller that records submissions and reports each job as running
/// for `running_polls` polls, then succeeded on every agent.
pub struct FakeController {
    pub policy: v1::PolicyInfo,
    pub agents: Vec<v1::Agent>,
    pub submitted: Mutex<Vec<SignedJob>>,
    pub running_polls: AtomicUsize,
    pub unreachable: bool,
    pub output: Vec<u8>,
    /// (job id, requested_by) of every cancel.
    pub canceled: Mutex<Vec<(String, String)>>,
    /// Audit events the gateway reported.
    pub reports: Mutex<Vec<v1::AuditReportRequest>>,
    /// What `audit_search` answers (JSON lines), and the last request.
    pub audit_records: Vec<String>,
    pub audit_requests: Mutex<Vec<v1::AuditSearchRequest>>,
    pub services: Vec<v1::Service>,
    pub silences: Mutex<Vec<v1::SilenceRequest>>,
    /// How many of the next submissions are refused as the controller
    /// refuses a job whose short id a stored job has (ABORTED); those jobs
    /// are kept in `short_id_refused`.
    pub short_ids_taken: AtomicUsize,
    pub short_id_refused: Mutex<Vec<SignedJob>>,
    /// Whether `watch` answers (with the job as `get_job` shows it, then
    /// the end of the stream); without it the router polls.
    pub watch: bool,
    /// Keys claimed (`Claims.Claim`): the first claim of a key wins.
    pub claims: Mutex<std::collections::HashSet<String>>,
}

impl FakeController {
    pub fn new(policy: v1::PolicyInfo) -> FakeController {
        FakeController {
            policy,
            agents: vec![agent("web-1", "web", true), agent("web-2", "web", true)],
            submitted: Mutex::new(Vec::new()),
            running_polls: AtomicUsize::new(0),
            unreachable: false,
            output: b"up 3 days, load 0.5".to_vec(),
            canceled: Mutex::new(Vec::new()),
            reports: Mutex::new(Vec::new()),
            audit_records: Vec::new(),
            audit_requests: Mutex::new(Vec::new()),
            services: Vec::new(),
            silences: Mutex::new(Vec::new()),
            claims: Mutex::default(),
            short_ids_taken: AtomicUsize::new(0),
            short_id_refused: Mutex::new(Vec::new()),
            watch: false,
        }
    }

    pub fn silences(&self) -> Vec<v1::SilenceRequest> {
        self.silences.lock().map(|s| s.clone()).unwrap_or_default()
    }

    /// (kind, actor, command, detail) of every reported audit event.
    pub fn reported(&self) -> Vec<(String, String, String, String)> {
        self.reports
            .lock()
            .map(|r| {
                r.iter()
                    .map(|e| {
                        (
                            e.kind.clone(),
                            e.actor.clone(),
                            e.command.clone(),
                            e.detail.clone(),
                        )
                    })
                    .collect()
            })
            .unwrap_or_default()
    }

    pub fn submitted(&self) -> Vec<SignedJob> {
        self.submitted.lock().map(|s| s.clone()).unwrap_or_default()
    }

    fn check(&self) -> Result<(), ControllerError> {
        if self.unreachable {
            Err(ControllerError {
                code: tonic::Code::Unavailable,
                message: "connection refused".to_string(),
            })
        } else {
            Ok(())
        }
    }

    fn spec(&self, id: &str) -> Option<JobSpec> {
        let subs = self.submitted();
        subs.iter()
            .filter_map(|j| JobSpec::from_bytes(&j.spec).ok())
            .find(|s| JobRef::parse(id).is_ok_and(|r| r.matches(s.id.as_str())))
    }
}

impl ControllerApi for FakeController {
    async fn submit(&self, job: SignedJob) -> Result<v1::SubmitResponse, ControllerError> {
        self.check()?;
        let spec = JobSpec::from_bytes(&job.spec).map_err(|e| ControllerError {
            code: tonic::Code::InvalidArgument,
            message: e.to_string(),
        })?;
        if self
            .short_ids_taken
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok()
        {
            if let Ok(mut r) = self.short_id_refused.lock() {
                r.push(job);
            }
            return Err(ControllerError {
                code: tonic::Code::Aborted,
                message: format!(
                    "job {}: its short id {} already names another job; submit it again with a new job id",
                    spec.id,
                    spec.id.short()
                ),
            });
        }
        if let Ok(mut s) = self.submitted.lock() {
            s.push(job);
        }
        Ok(v1::SubmitResponse {
            job_id: spec.id.as_str().to_string(),
            targets: self.agents.iter().map(|a| a.agent_id.clone()).collect(),
        })
    }

    async fn get_job(&self, id: String) -> Result<v1::Job, ControllerError> {
        self.check()?;
        let spec = self.spec(&id).ok_or_else(|| ControllerError {
            code: tonic::Code::NotFound,
            message: format!("job {id} not found"),
        })?;
        let running = self
            .running_polls
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok();
        let targets = self
            .agents
            .iter()
            .map(|a| v1::Target {
                agent_id: a.agent_id.clone(),
                state: if running { "running" } else { "ok" }.to_string(),
                result: (!running).then(|| v1::JobResult {
                    job_id: spec.id.as_str().to_string(),
                    outcome: v1::Outcome::Ok as i32,
                    exit_code: Some(0),
                    stdout: self.output.clone(),
                    duration_ms: 7,
                    ..Default::default()
                }),
                ..Default::default()
            })
            .collect();
        Ok(v1::Job {
            job_id: spec.id.as_str().to_string(),
            command: spec.command.clone(),
            args: spec.args.clone().into_iter().collect(),
            selector: spec.selector.clone(),
            requester: spec.requester.as_str().to_string(),
            channel: spec.channel.clone(),
            state: if running { "running" } else { "succeeded" }.to_string(),
            created_at_ms: 0,
            targets,
            reason: String::new(),
            ..Default::default()
        })
    }

    /// Newest first, at most `limit`, like the controller.
    async fn list_jobs(
        &self,
        limit: u32,
        requester: Option<String>,
    ) -> Result<Vec<v1::Job>, ControllerError> {
        self.check()?;
        let mut out = Vec::new();
        for j in self.submitted().iter().rev() {
            if out.len() >= limit as usize {
                break;
            }
            let Ok(spec) = JobSpec::from_bytes(&j.spec) else {
                continue;
            };
            if requester
                .as_deref()
                .is_some_and(|r| r != spec.requester.as_str())
            {
                continue;
            }
            out.push(self.get_job(spec.id.as_str().to_string()).await?);
        }
        Ok(out)
    }

    async fn list_agents(&self, _selector: String) -> Result<Vec<v1::Agent>, ControllerError> {
        self.check()?;
        Ok(self.agents.clone())
    }

    async fn get_policy(&self) -> Result<v1::PolicyInfo, ControllerError> {
        self.check()?;
        Ok(self.policy.clone())
    }

    /// Unless `watch` is set, no live events here: the router falls back
    /// to polling `get_job`.
    async fn watch(&self, id: String) -> Result<JobEvents, ControllerError> {
        if !self.watch {
            return Err(ControllerError {
                code: tonic::Code::Unimplemented,
                message: "the fake controller has no Watch".to_string(),
            });
        }
        let job = self.get_job(id).await?;
        let first = v1::JobEvent {
            event: Some(v1::job_event::Event::Job(job)),
        };
        Ok(Box::pin(futures_util::stream::iter([Ok(first)])))
    }

    async fn report(&self, event: v1::AuditReportRequest) -> Result<u64, ControllerError> {
        self.check()?;
        let mut r = self.reports.lock().unwrap_or_else(|p| p.into_inner());
        r.push(event);
        Ok(r.len() as u64)
    }

    async fn audit_search(
        &self,
        req: v1::AuditSearchRequest,
    ) -> Result<v1::AuditSearchResponse, ControllerError> {
        self.check()?;
        self.audit_requests
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(req);
        Ok(v1::AuditSearchResponse {
            records: self.audit_records.clone(),
            next_before_seq: 0,
        })
    }

    async fn health_services(
        &self,
        name: String,
        _history: u32,
    ) -> Result<Vec<v1::Service>, ControllerError> {
        self.check()?;
        Ok(self
            .services
            .iter()
            .filter(|s| name.is_empty() || s.name == name)
            .cloned()
            .collect())
    }

    async fn health_watch(
        &self,
    ) -> Result<fleetcmd_gateway::controller::AlertEvents, ControllerError> {
        self.check()?;
        Ok(Box::pin(futures_util::stream::empty()))
    }

    async fn claim(&self, key: String, _ttl_secs: u32) -> Result<bool, ControllerError> {
        self.check()?;
        Ok(self.claims.lock().expect("claims").insert(key))
    }

    async fn silence(&self, req: v1::SilenceRequest) -> Result<u64, ControllerError> {
        self.check()?;
        let until = if req.duration_secs == 0 {
            0
        } else {
            1_000 + req.duration_secs * 1000
        };
        if let Ok(mut s) = self.silences.lock() {
            s.push(req);
        }
        Ok(until)
    }

    async fn audit_verify(&self) -> Result<v1::AuditVerifyResponse, ControllerError> {
        self.check()?;
        Ok(v1::AuditVerifyResponse {
            ok: true,
            first: 1,
            last: 42,
            records: 42,
            heads: 3,
            signed_up_to: 40,
            ..Default::default()
        })
    }

    async fn cancel(&self, id: String, requested_by: String) -> Result<v1::Job, ControllerError> {
        self.check()?;
        if let Ok(mut c) = self.canceled.lock() {
            c.push((id.clone(), requested_by));
        }
        let mut job = self.get_job(id).await?;
        job.state = "canceled".into();
        Ok(job)
    }
}

/// What a sender was asked to do.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Sent {
    Send { channel: String, reply: Reply },
    Edit { id: String, reply: Reply },
}

impl Sent {
    pub fn text(&self) -> String {
        match self {
            Sent::Send { reply, .. } | Sent::Edit { reply, .. } => reply.plain(),
        }
    }
}

#[derive(Default)]
pub struct RecordingSender {
    pub sent: Mutex<Vec<Sent>>,
}

impl RecordingSender {
    pub fn all(&self) -> Vec<Sent> {
        self.sent.lock().map(|s| s.clone()).unwrap_or_default()
    }
}

impl ChatSender for RecordingSender {
    fn send<'a>(
        &'a self,
        channel: &'a str,
        reply: Reply,
    ) -> BoxFuture<'a, Result<MessageRef, AdapterError>> {
        Box::pin(async move {
            let mut s = self.sent.lock().unwrap_or_else(|p| p.into_inner());
            s.push(Sent::Send {
                channel: channel.to_string(),
                reply,
            });
            Ok(MessageRef {
                channel: channel.to_string(),
                id: s.len().to_string(),
            })
        })
    }

    fn edit<'a>(
        &'a self,
        msg: &'a MessageRef,
        reply: Reply,
    ) -> BoxFuture<'a, Result<(), AdapterError>> {
        Box::pin(async move {
            let mut s = self.sent.lock().unwrap_or_else(|p| p.into_inner());
            s.push(Sent::Edit {
                id: msg.id.clone(),
                reply,
            });
            Ok(())
        })
    }
}

pub fn msg(who: &str, text: &str) -> Incoming {
    Incoming {
        identity: Identity::parse(who).unwrap_or_else(|e| panic!("{e}")),
        channel: "console".to_string(),
        text: text.to_string(),
        thread: None,
        direct: false,
        from_bot: false,
    }
}

/// Runs one message through the router and returns what it sent.
pub async fn ask(w: &World, who: &str, text: &str) -> Vec<Sent> {
    let out = RecordingSender::default();
    w.router.handle(msg(who, text), &out).await;
    out.all()
}
