//! The controller's shared state and its operations: enrollment, the live
//! agent registry, policy, job submission, dispatch and results. The gRPC
//! services in `service/` are thin adapters over these methods.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use fleetcmd_core::authorize::Refusal;
use fleetcmd_core::crypto::PublicKey;
use fleetcmd_core::ids::{AgentId, Identity};
use fleetcmd_core::job::SignedJob;
use fleetcmd_core::join_token::{JoinToken, hex, roots_pin};
use fleetcmd_core::policy::Policy;
use fleetcmd_core::policy_bundle::{self, PolicySignature};
use fleetcmd_core::selector::Selector;
use fleetcmd_proto::v1 as pb;
use prost::Message;
use tokio::sync::mpsc;
use tonic::Status;

use crate::config::ControllerConfig;
use crate::error::{ApiError, ApiResult};
use crate::pki::{Ca, Peer, Role};
use crate::store::{AgentRecord, JobRecord, PolicyRecord, Store, TargetRecord, TokenRecord};

/// Outbound messages queued for one agent's stream. Bounded: when an agent
/// does not drain its stream, dispatch to it fails fast (the target is marked
/// `offline`) instead of buffering without limit.
pub const AGENT_QUEUE: usize = 256;
/// Grace after a job's timeout before its silent targets are failed.
const RESULT_GRACE: Duration = Duration::from_secs(30);
/// How many recent jobs a suffix lookup scans.
const SUFFIX_SCAN: usize = 10_000;
pub const MAX_TOKEN_TTL: Duration = Duration::from_secs(30 * 86400);

pub type AgentTx = mpsc::Sender<Result<pb::ControllerMessage, Status>>;

pub struct CurrentPolicy {
    pub policy: Policy,
    pub record: PolicyRecord,
    pub hash: String,
}

struct Live {
    conn: u64,
    tx: AgentTx,
    labels: BTreeMap<String, String>,
    version: String,
    last_heartbeat: Instant,
    metrics: Option<pb::HostMetrics>,
    policy_version: u64,
    clock_skew_secs: i64,
    policy_expired: bool,
}

pub struct Shared {
    pub store: Arc<dyn Store>,
    pub ca: Ca,
    pub config: ControllerConfig,
    policy: RwLock<Option<Arc<CurrentPolicy>>>,
    agents: Mutex<HashMap<String, Live>>,
    revoked: RwLock<HashSet<String>>,
    /// Serializes read-modify-write of job records.
    job_lock: Mutex<()>,
    next_conn: AtomicU64,
    pub join_limiter: JoinLimiter,
}

pub fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Terminal target states; a job is finished when all its targets are.
pub fn is_terminal(state: &str) -> bool {
    matches!(
        state,
        "ok" | "failed" | "timed_out" | "refused" | "offline" | "canceled" | "skipped"
    )
}

fn outcome_state(o: i32) -> &'static str {
    match pb::Outcome::try_from(o) {
        Ok(pb::Outcome::Ok) => "ok",
        Ok(pb::Outcome::TimedOut) => "timed_out",
        Ok(pb::Outcome::Refused) => "refused",
        Ok(pb::Outcome::Canceled) => "canceled",
        _ => "failed",
    }
}

impl Shared {
    pub fn new(store: Arc<dyn Store>, ca: Ca, config: ControllerConfig) -> ApiResult<Shared> {
        let mut revoked = HashSet::new();
        for a in store.list_agents()? {
            if a.revoked {
                revoked.insert(a.id);
            }
        }
        let shared = Shared {
            store,
            ca,
            config,
            policy: RwLock::new(None),
            agents: Mutex::new(HashMap::new()),
            revoked: RwLock::new(revoked),
            job_lock: Mutex::new(()),
            next_conn: AtomicU64::new(1),
            join_limiter: JoinLimiter::default(),
        };
        if let Some(rec) = shared.store.get_policy()? {
            // The stored bundle was verified when pushed; verify again so a
            // tampered database cannot smuggle in a policy.
            let cur = shared
                .verify_policy(rec)
                .map_err(|e| ApiError::Internal(format!("stored policy: {e}")))?;
            *shared.policy.write().unwrap_or_else(|p| p.into_inner()) = Some(Arc::new(cur));
        }
        Ok(shared)
    }

    /// Security-relevant refusals, in one place (the audit trail hooks in here).
    pub fn security_event(&self, kind: &str, detail: &str) {
        tracing::warn!(target: "fleetcmd::security", kind, detail, "security event");
    }

    pub fn is_revoked(&self, agent: &str) -> bool {
        self.revoked
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .contains(agent)
    }

    async fn flush(&self) -> ApiResult<()> {
        let store = self.store.clone();
        tokio::task::spawn_blocking(move || store.flush())
            .await
            .map_err(|e| ApiError::Internal(format!("flush task: {e}")))??;
        Ok(())
    }

    // ------------------------------------------------------------ policy

    pub fn current_policy(&self) -> Option<Arc<CurrentPolicy>> {
        self.policy
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    fn verify_policy(&self, record: PolicyRecord) -> ApiResult<CurrentPolicy> {
        let sigs: Vec<PolicySignature> = record
            .signatures
            .iter()
            .map(|(key_id, signature)| PolicySignature {
                key_id: key_id.clone(),
                signature: signature.clone(),
            })
            .collect();
        let policy = policy_bundle::verify_bundle(
            &record.bundle,
            &sigs,
            &self.config.policy_roots,
            self.config.policy_threshold,
        )
        .map_err(|e| ApiError::InvalidArgument(format!("policy bundle refused: {e}")))?;
        let hash = policy_bundle::bundle_hash(&record.bundle);
        Ok(CurrentPolicy {
            policy,
            record,
            hash,
        })
    }

    pub async fn push_policy(
        &self,
        signed: pb::SignedPolicy,
        by: &Peer,
    ) -> ApiResult<Arc<CurrentPolicy>> {
        let record = PolicyRecord {
            version: 0,
            bundle: signed.bundle,
            signatures: signed
                .signatures
                .into_iter()
                .map(|s| (s.key_id, s.signature))
                .collect(),
        };
        let mut cur = self.verify_policy(record).inspect_err(|e| {
            self.security_event("policy_refused", &format!("{} {}: {e}", by.role, by.name));
        })?;
        cur.record.version = cur.policy.version;
        if let Some(old) = self.current_policy() {
            policy_bundle::check_rollback(Some(old.policy.version), &cur.policy).map_err(|e| {
                self.security_event("policy_refused", &format!("{} {}: {e}", by.role, by.name));
                ApiError::FailedPrecondition(e.to_string())
            })?;
        }
        self.store.put_policy(&cur.record)?;
        self.flush().await?;
        let cur = Arc::new(cur);
        *self.policy.write().unwrap_or_else(|p| p.into_inner()) = Some(cur.clone());
        tracing::info!(version = cur.policy.version, hash = %cur.hash, by = %by.name, "policy pushed");
        let msg = policy_message(&cur);
        for live in lock(&self.agents).values() {
            let _ = live.tx.try_send(Ok(msg.clone()));
        }
        Ok(cur)
    }

    // ------------------------------------------------------------ tokens and joining

    pub async fn create_token(
        &self,
        labels: BTreeMap<String, String>,
        ttl: Duration,
        uses: u32,
        name: Option<String>,
        by: &str,
    ) -> ApiResult<(fleetcmd_core::crypto::Secret<String>, u64)> {
        if ttl.is_zero() || ttl > MAX_TOKEN_TTL {
            return Err(ApiError::InvalidArgument(format!(
                "token ttl must be between 1s and {}s",
                MAX_TOKEN_TTL.as_secs()
            )));
        }
        if let Some(n) = &name {
            AgentId::parse(n).map_err(|e| ApiError::InvalidArgument(format!("token name: {e}")))?;
        }
        let rng = ring::rand::SystemRandom::new();
        let mut id = [0u8; 8];
        let mut secret = [0u8; 32];
        ring::rand::SecureRandom::fill(&rng, &mut id)
            .map_err(|_| ApiError::Internal("random source failed".into()))?;
        ring::rand::SecureRandom::fill(&rng, &mut secret)
            .map_err(|_| ApiError::Internal("random source failed".into()))?;
        let expires_at = now_secs() + ttl.as_secs();
        let token = JoinToken {
            id,
            secret: fleetcmd_core::crypto::Secret::new(secret),
            expires_at,
            ca_sha256: self.ca.fingerprint(),
            roots_sha256: roots_pin(&self.config.policy_roots),
        };
        let rec = TokenRecord {
            secret_hash: hex(&token.secret_hash()),
            expires_at,
            uses_left: uses.max(1),
            labels,
            name,
            created_by: by.to_owned(),
        };
        self.store.put_token(&token.id_hex(), &rec)?;
        self.flush().await?;
        tracing::info!(token_id = %token.id_hex(), by, "join token created");
        Ok((token.encode(), expires_at))
    }

    pub async fn join(&self, req: pb::JoinRequest) -> ApiResult<pb::JoinResponse> {
        let token = JoinToken::parse(&req.token).map_err(|e| {
            self.security_event("join_refused", &format!("malformed token: {e}"));
            ApiError::InvalidArgument(format!("malformed join token: {e}"))
        })?;
        if token.ca_sha256 != self.ca.fingerprint() {
            self.security_event("join_refused", "token pins another CA");
            return Err(ApiError::PermissionDenied(
                "join token was issued for another fleet CA".into(),
            ));
        }
        if token.roots_sha256 != roots_pin(&self.config.policy_roots) {
            self.security_event("join_refused", "token pins other policy roots");
            return Err(ApiError::PermissionDenied(
                "join token pins other policy root keys".into(),
            ));
        }
        let rec = self
            .store
            .consume_token(&token.id_hex(), &hex(&token.secret_hash()), now_secs())?
            .map_err(|r| {
                self.security_event("join_refused", &format!("token {}: {r}", token.id_hex()));
                ApiError::PermissionDenied(r.to_string())
            })?;
        // A token that names the agent may re-enrol that name (a reinstalled
        // host); a token without a name may only take a name nobody holds.
        let named_by_token = rec.name.is_some();
        let name = rec.name.clone().unwrap_or(req.name);
        let id = AgentId::parse(&name)
            .map_err(|e| ApiError::InvalidArgument(format!("agent name: {e}")))?;
        match self.store.get_agent(id.as_str())? {
            Some(a) if a.revoked => {
                self.security_event("join_refused", &format!("agent {id} is revoked"));
                return Err(ApiError::PermissionDenied(format!(
                    "agent {id} is revoked; pick another name"
                )));
            }
            Some(_) if !named_by_token => {
                self.security_event(
                    "join_refused",
                    &format!("token {} tried to take enrolled name {id}", token.id_hex()),
                );
                return Err(ApiError::PermissionDenied(format!(
                    "agent name {id} is already enrolled; re-enrol it with a token created with `--name {id}`"
                )));
            }
            _ => {}
        }
        let cert_pem = self
            .ca
            .issue_from_csr(
                &req.csr_der,
                Role::Agent,
                id.as_str(),
                self.config.agent_cert_ttl,
            )
            .map_err(|e| ApiError::InvalidArgument(e.to_string()))?;
        let agent = AgentRecord {
            id: id.to_string(),
            labels: rec.labels.clone(),
            revoked: false,
            joined_at: now_secs(),
            version: String::new(),
        };
        self.store.put_agent(&agent)?;
        self.flush().await?;
        tracing::info!(agent_id = %id, "agent joined");
        Ok(pb::JoinResponse {
            agent_id: id.to_string(),
            cert_pem,
            ca_pem: self.ca.cert_pem().to_owned(),
            policy_roots: self
                .config
                .policy_roots
                .iter()
                .map(|k| k.as_bytes().to_vec())
                .collect(),
            policy_threshold: self.config.policy_threshold as u32,
            labels: rec.labels.into_iter().collect(),
        })
    }

    pub fn renew(&self, agent: &str, csr_der: &[u8]) -> ApiResult<String> {
        self.ca
            .issue_from_csr(csr_der, Role::Agent, agent, self.config.agent_cert_ttl)
            .map_err(|e| ApiError::InvalidArgument(e.to_string()))
    }

    // ------------------------------------------------------------ live agents

    /// Registers a connected agent; returns its connection number.
    pub fn register(&self, agent: &str, hello: &pb::Hello, tx: AgentTx) -> ApiResult<u64> {
        let mut rec = self
            .store
            .get_agent(agent)?
            .ok_or_else(|| ApiError::PermissionDenied(format!("agent {agent} is not enrolled")))?;
        // The controller's labels (from the token) win over the agent's own.
        let mut labels: BTreeMap<String, String> = hello
            .labels
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        labels.extend(rec.labels.clone());
        rec.version = hello.version.clone();
        self.store.put_agent(&rec)?;
        let conn = self.next_conn.fetch_add(1, Ordering::Relaxed);
        if let Some(cur) = self.current_policy() {
            let _ = tx.try_send(Ok(policy_message(&cur)));
        }
        let old = lock(&self.agents).insert(
            agent.to_owned(),
            Live {
                conn,
                tx,
                labels,
                version: hello.version.clone(),
                last_heartbeat: Instant::now(),
                metrics: None,
                policy_version: hello.policy_version,
                clock_skew_secs: 0,
                policy_expired: false,
            },
        );
        if old.is_some() {
            tracing::info!(
                agent_id = agent,
                "agent reconnected; previous stream replaced"
            );
        }
        tracing::info!(agent_id = agent, conn, "agent connected");
        Ok(conn)
    }

    /// Drops every live agent stream (controller shutdown).
    pub fn disconnect_all(&self) {
        for (_, live) in lock(&self.agents).drain() {
            // An error item ends the response stream with this status.
            let _ = live
                .tx
                .try_send(Err(Status::unavailable("controller shutting down")));
        }
    }

    pub fn unregister(&self, agent: &str, conn: u64) {
        let mut agents = lock(&self.agents);
        if agents.get(agent).is_some_and(|l| l.conn == conn) {
            agents.remove(agent);
            tracing::info!(agent_id = agent, conn, "agent disconnected");
        }
    }

    pub fn heartbeat(&self, agent: &str, conn: u64, hb: pb::Heartbeat) {
        if let Some(live) = lock(&self.agents).get_mut(agent).filter(|l| l.conn == conn) {
            live.last_heartbeat = Instant::now();
            live.policy_version = hb.policy_version;
            live.metrics = hb.metrics;
            live.policy_expired = hb.policy_expired;
            live.clock_skew_secs = if hb.agent_time == 0 {
                0
            } else {
                hb.agent_time as i64 - now_secs() as i64
            };
        }
    }

    fn online(&self, live: &Live) -> bool {
        live.last_heartbeat.elapsed() < self.config.heartbeat_interval * 3 && !live.tx.is_closed()
    }

    pub fn list_agents(&self, selector: &str) -> ApiResult<Vec<pb::Agent>> {
        let sel = if selector.trim().is_empty() {
            Selector::all()
        } else {
            parse_selector(selector)?
        };
        let agents = lock(&self.agents);
        let mut out = Vec::new();
        for rec in self.store.list_agents()? {
            let live = agents.get(&rec.id);
            let labels = live
                .map(|l| l.labels.clone())
                .unwrap_or_else(|| rec.labels.clone());
            if !sel.matches(&rec.id, &labels) {
                continue;
            }
            out.push(pb::Agent {
                agent_id: rec.id.clone(),
                labels: labels.into_iter().collect(),
                online: live.is_some_and(|l| self.online(l)) && !rec.revoked,
                revoked: rec.revoked,
                version: live.map(|l| l.version.clone()).unwrap_or(rec.version),
                last_seen_ms: live
                    .map(|l| now_ms().saturating_sub(l.last_heartbeat.elapsed().as_millis() as u64))
                    .unwrap_or(0),
                metrics: live.and_then(|l| l.metrics.clone()),
                policy_version: live.map(|l| l.policy_version).unwrap_or(0),
                clock_skew_secs: live.map(|l| l.clock_skew_secs).unwrap_or(0),
                policy_expired: live.is_some_and(|l| l.policy_expired),
                problems: live.map(health_problems).unwrap_or_default(),
            });
        }
        Ok(out)
    }

    /// Revokes an agent: durable first, then its stream is closed and every
    /// later call with its certificate is refused.
    pub async fn revoke(&self, agent: &str, by: &Peer) -> ApiResult<()> {
        let mut rec = self
            .store
            .get_agent(agent)?
            .ok_or_else(|| ApiError::NotFound(format!("no agent {agent:?}")))?;
        rec.revoked = true;
        self.store.put_agent(&rec)?;
        self.flush().await?;
        self.revoked
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert(agent.to_owned());
        if let Some(live) = lock(&self.agents).remove(agent) {
            let _ = live.tx.try_send(Err(Status::permission_denied(format!(
                "agent {agent} was revoked"
            ))));
        }
        self.security_event(
            "agent_revoked",
            &format!("{agent} revoked by {} {}", by.role, by.name),
        );
        Ok(())
    }

    // ------------------------------------------------------------ jobs

    /// Checks a signed job as the agents will (defence in depth; the agents
    /// still decide), stores it durably, then dispatches it.
    pub async fn submit(
        &self,
        peer: &Peer,
        signed: pb::SignedJob,
    ) -> ApiResult<pb::SubmitResponse> {
        let cur = self.current_policy().ok_or_else(|| {
            ApiError::FailedPrecondition(
                "no policy has been pushed yet (`fleetcmd policy push`)".into(),
            )
        })?;
        let job = SignedJob {
            spec: signed.spec,
            signature: signed.signature,
            key_id: signed.key_id,
        };
        let spec = job.verify(&cur.policy, now_secs()).inspect_err(|r| {
            self.security_event("job_refused", &format!("{} {}: {r}", peer.role, peer.name));
        })?;
        let cmd = cur
            .policy
            .command(&spec.command)
            .ok_or_else(|| Refusal::NotAllowed(spec.command.clone()))?;
        fleetcmd_core::argv::build_argv(cmd, &spec.args)
            .map_err(|e| Refusal::BadArgument(e.to_string()))?;
        check_requester(peer, &spec.requester)?;
        let selector = parse_selector(&spec.selector)?;
        let id = spec.id.to_string();
        if self.store.get_job(&id)?.is_some() {
            self.security_event(
                "job_refused",
                &format!("replayed job id {id} from {} {}", peer.role, peer.name),
            );
            return Err(ApiError::AlreadyExists(format!(
                "job {id} was already submitted"
            )));
        }
        // Resolve targets against the registry (the agents re-check their own labels).
        let mut targets: Vec<(String, bool)> = Vec::new();
        {
            let agents = lock(&self.agents);
            for rec in self.store.list_agents()? {
                if rec.revoked {
                    continue;
                }
                let live = agents.get(&rec.id);
                let labels = live
                    .map(|l| l.labels.clone())
                    .unwrap_or_else(|| rec.labels.clone());
                let for_host = cmd
                    .targets
                    .as_ref()
                    .is_none_or(|t| t.matches(&rec.id, &labels));
                if selector.matches(&rec.id, &labels) && for_host {
                    targets.push((rec.id.clone(), live.is_some_and(|l| self.online(l))));
                }
            }
        }
        if targets.is_empty() {
            return Err(ApiError::NotFound(format!(
                "no agent matches `{}` for command `{}`",
                spec.selector, spec.command
            )));
        }
        let record = JobRecord {
            id: id.clone(),
            spec: job.spec.clone(),
            signature: job.signature.clone(),
            key_id: job.key_id.clone(),
            command: spec.command.clone(),
            args: spec.args.clone(),
            selector: spec.selector.clone(),
            requester: spec.requester.to_string(),
            channel: spec.channel.clone(),
            created_at_ms: now_ms(),
            deadline: now_secs()
                + cmd.timeout.as_secs().max(spec.timeout_secs)
                + RESULT_GRACE.as_secs(),
            state: "running".into(),
            targets: targets.iter().map(|(a, _)| a.clone()).collect(),
        };
        for (agent, online) in &targets {
            let state = if *online { "pending" } else { "offline" };
            let reason = if *online {
                ""
            } else {
                "agent offline when the job was dispatched"
            };
            self.store.put_target(
                &id,
                agent,
                &TargetRecord {
                    state: state.into(),
                    result: None,
                    reason: reason.into(),
                },
            )?;
        }
        self.store.put_job(&record)?;
        self.flush().await?;
        tracing::info!(job_id = %id, command = %spec.command, requester = %spec.requester, targets = targets.len(), "job submitted");
        let msg = pb::ControllerMessage {
            msg: Some(pb::controller_message::Msg::Job(pb::SignedJob {
                spec: job.spec,
                signature: job.signature,
                key_id: job.key_id,
            })),
        };
        for (agent, online) in &targets {
            if !online {
                continue;
            }
            let sent = lock(&self.agents)
                .get(agent)
                .map(|l| l.tx.try_send(Ok(msg.clone())).is_ok())
                .unwrap_or(false);
            let rec = if sent {
                TargetRecord {
                    state: "dispatched".into(),
                    result: None,
                    reason: String::new(),
                }
            } else {
                TargetRecord {
                    state: "offline".into(),
                    result: None,
                    reason: "agent stream unavailable at dispatch".into(),
                }
            };
            self.update_target(&id, agent, rec, false)?;
        }
        self.finish_if_done(&id)?;
        Ok(pb::SubmitResponse {
            job_id: id,
            targets: targets.into_iter().map(|(a, _)| a).collect(),
        })
    }

    /// Stores and dispatches a job WITHOUT any of the controller's checks, to
    /// every named agent that is connected. This is what a compromised
    /// controller could do; the tests use it to show that agents refuse such
    /// jobs on their own. It adds no power: the controller is not trusted.
    #[doc(hidden)]
    pub async fn inject_job_unchecked(
        &self,
        signed: pb::SignedJob,
        job_id: &str,
        agents: &[&str],
    ) -> ApiResult<()> {
        let record = JobRecord {
            id: job_id.to_owned(),
            spec: signed.spec.clone(),
            signature: signed.signature.clone(),
            key_id: signed.key_id.clone(),
            command: String::new(),
            args: BTreeMap::new(),
            selector: String::new(),
            requester: String::new(),
            channel: String::new(),
            created_at_ms: now_ms(),
            deadline: now_secs() + 60,
            state: "running".into(),
            targets: agents.iter().map(|a| a.to_string()).collect(),
        };
        for a in agents {
            self.store.put_target(
                job_id,
                a,
                &TargetRecord {
                    state: "dispatched".into(),
                    result: None,
                    reason: String::new(),
                },
            )?;
        }
        self.store.put_job(&record)?;
        let msg = pb::ControllerMessage {
            msg: Some(pb::controller_message::Msg::Job(signed)),
        };
        for a in agents {
            if let Some(l) = lock(&self.agents).get(*a) {
                let _ = l.tx.try_send(Ok(msg.clone()));
            }
        }
        Ok(())
    }

    /// Sends a policy bundle to every connected agent WITHOUT verifying it
    /// (a compromised controller's move; tests show agents refuse it).
    #[doc(hidden)]
    pub fn inject_policy_unchecked(&self, signed: pb::SignedPolicy) {
        let msg = pb::ControllerMessage {
            msg: Some(pb::controller_message::Msg::Policy(signed)),
        };
        for live in lock(&self.agents).values() {
            let _ = live.tx.try_send(Ok(msg.clone()));
        }
    }

    /// Writes a target's state unless it is already terminal (at most one
    /// result per job and agent). Returns whether it was written.
    fn update_target(
        &self,
        job: &str,
        agent: &str,
        rec: TargetRecord,
        allow_from_terminal: bool,
    ) -> ApiResult<bool> {
        let _g = lock(&self.job_lock);
        match self.store.get_target(job, agent)? {
            None => Ok(false),
            Some(old) if is_terminal(&old.state) && !allow_from_terminal => Ok(false),
            Some(_) => {
                self.store.put_target(job, agent, &rec)?;
                Ok(true)
            }
        }
    }

    fn finish_if_done(&self, job: &str) -> ApiResult<()> {
        let _g = lock(&self.job_lock);
        let Some(mut rec) = self.store.get_job(job)? else {
            return Ok(());
        };
        if rec.state != "running" {
            return Ok(());
        }
        let targets = self.store.targets(job)?;
        if targets.iter().all(|(_, t)| is_terminal(&t.state)) {
            rec.state = if targets.iter().all(|(_, t)| t.state == "ok") {
                "succeeded"
            } else {
                "failed"
            }
            .into();
            tracing::info!(job_id = job, state = %rec.state, "job finished");
            self.store.put_job(&rec)?;
        }
        Ok(())
    }

    pub fn record_started(&self, agent: &str, job: &str) -> ApiResult<()> {
        self.update_target(
            job,
            agent,
            TargetRecord {
                state: "running".into(),
                result: None,
                reason: String::new(),
            },
            false,
        )?;
        Ok(())
    }

    /// Stores a result durably; the caller acknowledges it only after this
    /// returns.
    pub async fn record_result(&self, agent: &str, result: pb::JobResult) -> ApiResult<()> {
        let job = result.job_id.clone();
        let state = outcome_state(result.outcome);
        let rec = TargetRecord {
            state: state.into(),
            reason: result.reason.clone(),
            result: Some(result.encode_to_vec()),
        };
        if !self.update_target(&job, agent, rec, false)? {
            tracing::debug!(job_id = %job, agent_id = agent, "result for an unknown or finished target ignored");
            return Ok(());
        }
        self.flush().await?;
        if state == "refused" {
            self.security_event(
                "job_refused_by_agent",
                &format!("agent {agent} refused job {job}: {}", result.reason),
            );
        }
        self.finish_if_done(&job)?;
        Ok(())
    }

    /// Fails targets that never reported within their job's deadline.
    pub async fn sweep(&self) -> ApiResult<()> {
        let now = now_secs();
        let mut changed = false;
        for job in self.store.list_jobs(1000)? {
            if job.state != "running" || now <= job.deadline {
                continue;
            }
            for (agent, t) in self.store.targets(&job.id)? {
                if !is_terminal(&t.state) {
                    let rec = TargetRecord {
                        state: "failed".into(),
                        result: None,
                        reason: "no result from the agent before the job's deadline".into(),
                    };
                    changed |= self.update_target(&job.id, &agent, rec, false)?;
                }
            }
            self.finish_if_done(&job.id)?;
        }
        if changed {
            self.flush().await?;
        }
        Ok(())
    }

    /// Resolves a full id, a unique prefix, or a unique suffix (the random
    /// tail that chat shows: UUIDv7 prefixes are timestamps, so jobs started
    /// close together share them).
    pub fn resolve_job_id(&self, id: &str) -> ApiResult<String> {
        let id = id.trim().to_ascii_lowercase();
        if id.len() < 4 || id.len() > 36 || !id.chars().all(|c| c.is_ascii_hexdigit() || c == '-') {
            return Err(ApiError::InvalidArgument(format!(
                "job id {id:?}: give at least 4 hex digits of it"
            )));
        }
        let mut ids = self.store.job_ids_with_prefix(&id, 2)?;
        if ids.is_empty() {
            ids = self
                .store
                .list_jobs(SUFFIX_SCAN)?
                .into_iter()
                .map(|j| j.id)
                .filter(|j| j.ends_with(&id))
                .take(2)
                .collect();
        }
        match ids.as_slice() {
            [one] => Ok(one.clone()),
            [] => Err(ApiError::NotFound(format!("no job {id}"))),
            _ => Err(ApiError::InvalidArgument(format!(
                "job id {id} is ambiguous; give more of it"
            ))),
        }
    }

    pub fn get_job(&self, id: &str) -> ApiResult<pb::Job> {
        let id = self.resolve_job_id(id)?;
        let rec = self
            .store
            .get_job(&id)?
            .ok_or_else(|| ApiError::NotFound(format!("no job {id}")))?;
        self.job_to_proto(rec)
    }

    pub fn list_jobs(&self, limit: u32, requester: &str) -> ApiResult<Vec<pb::Job>> {
        let limit = if limit == 0 { 20 } else { limit.min(500) } as usize;
        let mut out = Vec::new();
        for rec in self
            .store
            .list_jobs(if requester.is_empty() { limit } else { 10_000 })?
        {
            if !requester.is_empty() && rec.requester != requester {
                continue;
            }
            out.push(self.job_to_proto(rec)?);
            if out.len() >= limit {
                break;
            }
        }
        Ok(out)
    }

    fn job_to_proto(&self, rec: JobRecord) -> ApiResult<pb::Job> {
        let targets = self
            .store
            .targets(&rec.id)?
            .into_iter()
            .map(|(agent, t)| {
                let mut result = t
                    .result
                    .as_deref()
                    .and_then(|b| pb::JobResult::decode(b).ok());
                if result.is_none() && !t.reason.is_empty() {
                    result = Some(pb::JobResult {
                        job_id: rec.id.clone(),
                        reason: t.reason.clone(),
                        ..Default::default()
                    });
                }
                pb::Target {
                    agent_id: agent,
                    state: t.state,
                    result,
                }
            })
            .collect();
        Ok(pb::Job {
            job_id: rec.id,
            command: rec.command,
            args: rec.args.into_iter().collect(),
            selector: rec.selector,
            requester: rec.requester,
            channel: rec.channel,
            state: rec.state,
            created_at_ms: rec.created_at_ms,
            targets,
        })
    }
}

/// What an operator should know about a connected agent's health.
fn health_problems(live: &Live) -> Vec<String> {
    let mut out = Vec::new();
    let skew = live.clock_skew_secs;
    if skew.unsigned_abs() > fleetcmd_core::job::CLOCK_SKEW_SECS {
        out.push(format!(
            "clock off by {skew:+}s (allowance {}s): jobs will be refused as expired or not yet valid",
            fleetcmd_core::job::CLOCK_SKEW_SECS
        ));
    }
    if live.policy_expired {
        out.push(
            "policy expired: the agent refuses every job until a newer policy is pushed".into(),
        );
    }
    out
}

/// Failed joins allowed per source address and minute, so a token cannot be
/// guessed by hammering `Join` (it could not anyway: 256-bit secrets), and a
/// broken installer cannot flood the audit trail.
pub const JOIN_FAILURES_PER_MINUTE: u32 = 10;

/// Counts failed joins per source address in one-minute windows.
#[derive(Default)]
pub struct JoinLimiter {
    failures: Mutex<HashMap<std::net::IpAddr, (u32, Instant)>>,
}

impl JoinLimiter {
    /// Refuses a join from `ip` that has failed too often in the window.
    pub fn check(&self, ip: std::net::IpAddr) -> ApiResult<()> {
        let mut map = lock(&self.failures);
        map.retain(|_, (_, since)| since.elapsed() < Duration::from_secs(60));
        match map.get(&ip) {
            Some((n, since)) if *n >= JOIN_FAILURES_PER_MINUTE => {
                Err(ApiError::ResourceExhausted(format!(
                    "too many failed joins from {ip}; retry in {}s",
                    60u64.saturating_sub(since.elapsed().as_secs())
                )))
            }
            _ => Ok(()),
        }
    }

    pub fn failed(&self, ip: std::net::IpAddr) {
        let mut map = lock(&self.failures);
        let e = map.entry(ip).or_insert((0, Instant::now()));
        e.0 += 1;
    }
}

/// An operator may only submit jobs in its own name; a gateway only for chat
/// identities (never posing as a CLI user).
fn check_requester(peer: &Peer, requester: &Identity) -> ApiResult<()> {
    let ok = match peer.role {
        Role::Operator => requester.as_str() == format!("cli:{}", peer.name),
        Role::Gateway => requester.scheme() != "cli",
        Role::Agent => false,
    };
    if ok {
        Ok(())
    } else {
        Err(ApiError::PermissionDenied(format!(
            "{} {} may not submit jobs as {requester}",
            peer.role, peer.name
        )))
    }
}

fn parse_selector(s: &str) -> ApiResult<Selector> {
    Selector::parse(s).map_err(|e| ApiError::InvalidArgument(format!("selector `{s}`: {e}")))
}

pub fn policy_message(cur: &CurrentPolicy) -> pb::ControllerMessage {
    pb::ControllerMessage {
        msg: Some(pb::controller_message::Msg::Policy(signed_policy(
            &cur.record,
        ))),
    }
}

pub fn signed_policy(rec: &PolicyRecord) -> pb::SignedPolicy {
    pb::SignedPolicy {
        bundle: rec.bundle.clone(),
        signatures: rec
            .signatures
            .iter()
            .map(|(key_id, signature)| pb::PolicySignature {
                key_id: key_id.clone(),
                signature: signature.clone(),
            })
            .collect(),
    }
}

/// The pin of the configured roots, as join tokens carry it.
pub fn roots_fingerprint(roots: &[PublicKey]) -> String {
    hex(&roots_pin(roots))
}
