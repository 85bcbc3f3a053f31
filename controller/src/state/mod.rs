//! The controller's composition root: `Shared` holds the parts, each in a
//! module with one job — `registry` (enrolled and connected agents),
//! `policy` (the current policy), `submission` (the submit checks, pure),
//! `dispatch` (the rollout/dispatch driver, results, cancel, sweep),
//! `runs` (a running job's cached state), `watch` (live events),
//! `retention`, `convert` (records to the API's messages), `join_limiter`
//! — and the operations that span parts (join, revoke, push a policy,
//! submit), which audit and flush before they acknowledge. The gRPC
//! services are thin adapters over these.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use fleetcmd_core::audit::{Event, EventKind};
use fleetcmd_core::ids::{AgentId, JobRef};
use fleetcmd_core::job::SignedJob;
use fleetcmd_core::join_token::{JoinToken, hex, roots_pin};
use fleetcmd_core::policy_bundle;
use fleetcmd_core::selector::Selector;
use fleetcmd_core::state::{JobState, TargetState};
use fleetcmd_proto::v1 as pb;
use tokio::sync::mpsc;
use tonic::Status;

use crate::config::ControllerConfig;
use crate::error::{ApiError, ApiResult};
use crate::pki::{Ca, Peer, Role};
pub mod convert;
mod dispatch;
mod follow;
pub mod ingest;
pub mod join_limiter;
pub mod policy;
pub mod presence;
mod registry;
mod retention;
pub use policy::CurrentPolicy;
mod runs;
pub use convert::{policy_message, signed_policy};
pub use join_limiter::{JOIN_FAILURES_PER_MINUTE, JoinLimiter};
use runs::Run;
pub mod submission;
pub mod watch;
pub use registry::Registry;

use crate::store::{
    AgentRecord, JobRecord, PolicyRecord, Store, StoreError, TargetRecord, TokenRecord,
};

/// Outbound messages queued for one agent's stream. Bounded: when an agent
/// does not drain its stream, dispatch to it fails fast (the target is marked
/// `offline`) instead of buffering without limit.
pub const AGENT_QUEUE: usize = 256;
/// Jobs waiting for the dispatcher. When full, a job is not lost: the
/// sweeper queues every running job each second.
const DISPATCH_QUEUE: usize = 1024;
pub const MAX_TOKEN_TTL: Duration = Duration::from_secs(30 * 86400);

/// One message for an agent's stream. Boxed: tokio's bounded channel
/// allocates its slots in blocks of 32, and a `Result<ControllerMessage,
/// Status>` is a few hundred bytes, so unboxed each connected agent's queue
/// kept several KiB allocated (RSS per connection, BENCHMARKS.md targets).
pub type AgentItem = Box<Result<pb::ControllerMessage, Status>>;
pub type AgentTx = mpsc::Sender<AgentItem>;

pub struct Shared {
    pub store: Arc<dyn Store>,
    pub ca: Ca,
    pub config: ControllerConfig,
    /// The current policy (`policy::Policies`).
    pub policy: policy::Policies,
    /// Enrolled and connected agents.
    pub registry: registry::Registry,
    /// Serializes read-modify-write of job records.
    /// Running jobs' rollout state (the job record and each target's state),
    /// so advancing a 10 000-target job after each result does not re-read
    /// every target from the store. The mutex also serializes every
    /// read-modify-write of job and target records.
    job_lock: Mutex<HashMap<String, Run>>,
    /// Live events of running jobs, for `Jobs.Watch`.
    pub watch: watch::WatchHub,
    /// Queue of flush waiters (see `flush`).
    flusher: tokio::sync::mpsc::UnboundedSender<tokio::sync::oneshot::Sender<Result<(), String>>>,
    /// Jobs that finished lately: late results for them skip the store
    /// lookup in `run_of` (a 10 000-target job would otherwise be decoded
    /// once per straggling result).
    finished: Mutex<(HashSet<String>, std::collections::VecDeque<String>)>,
    /// Whether the running jobs of a previous run were loaded (sweeper).
    runs_loaded: std::sync::atomic::AtomicBool,
    /// Jobs to advance off the request path (`kick`, `dispatcher`).
    dispatch_tx: mpsc::Sender<String>,
    dispatch_rx: Mutex<Option<mpsc::Receiver<String>>>,
    /// Results for the ingester (`ingest`), and whether it runs.
    results_tx: mpsc::Sender<ingest::Ingest>,
    results_rx: Mutex<Option<mpsc::Receiver<ingest::Ingest>>>,
    ingesting: std::sync::atomic::AtomicBool,
    pub join_limiter: JoinLimiter,
    /// Caps audit records of failed authentications per source address.
    pub auth_limiter: crate::auth::AuthFailureLimiter,
    /// The audit trail (its trees live in `store`; one flush covers both).
    pub audit: Arc<crate::audit::Audit>,
    /// Services and their alerts (`crate::health`).
    pub health: Arc<crate::health::Health>,
    /// Job and RPC counters for `/metrics` (fleet gauges are rendered from
    /// `list_agents` at scrape time).
    pub metrics: Arc<crate::metrics::Metrics>,
    /// Revoked operator and gateway certificates (`crate::revocation`).
    pub certs: Arc<crate::revocation::Revocations>,
    /// Wake-ups for the other controllers on the same database
    /// (`crate::bus`; `Bus::none()` with one controller). Set before the
    /// controller serves.
    pub bus: crate::bus::Bus,
    /// Which agents are connected to some controller (several controllers).
    pub presence: presence::PresenceView,
}

/// A job `store_submission` wrote (not yet flushed).
struct Submitted {
    id: String,
    command: String,
    requester: String,
    targets: Vec<String>,
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

impl Shared {
    pub fn new(store: Arc<dyn Store>, ca: Ca, config: ControllerConfig) -> ApiResult<Shared> {
        let registry = registry::Registry::new(store.list_agents()?, config.heartbeat_interval);
        let audit = crate::audit::Audit::open(store.clone(), &config.data_dir.join("audit"))
            .map_err(|e| ApiError::Internal(format!("audit trail: {e}")))?;
        let (flusher, mut waiters) = tokio::sync::mpsc::unbounded_channel::<
            tokio::sync::oneshot::Sender<Result<(), String>>,
        >();
        let flush_store = store.clone();
        // Ends when `Shared` (the only sender) is dropped.
        tokio::spawn(async move {
            while let Some(first) = waiters.recv().await {
                let mut batch = vec![first];
                while let Ok(more) = waiters.try_recv() {
                    batch.push(more);
                }
                let s = flush_store.clone();
                let result = match tokio::task::spawn_blocking(move || s.flush()).await {
                    Ok(r) => r.map_err(|e| e.to_string()),
                    Err(e) => Err(format!("flush task: {e}")),
                };
                for w in batch {
                    let _ = w.send(result.clone());
                }
            }
        });
        let (dispatch_tx, dispatch_rx) = mpsc::channel(DISPATCH_QUEUE);
        let (results_tx, results_rx) = mpsc::channel(ingest::QUEUE);
        let health = Arc::new(crate::health::Health::open(
            store.clone(),
            config.services.clone(),
            config.host_alerts.clone(),
        )?);
        let certs = Arc::new(crate::revocation::Revocations::load(store.as_ref())?);
        let policy = policy::Policies::new(config.policy_roots.clone(), config.policy_threshold);
        let shared = Shared {
            certs,
            health,
            flusher,
            dispatch_tx,
            dispatch_rx: Mutex::new(Some(dispatch_rx)),
            results_tx,
            results_rx: Mutex::new(Some(results_rx)),
            ingesting: std::sync::atomic::AtomicBool::new(false),
            finished: Mutex::new((HashSet::new(), std::collections::VecDeque::new())),
            audit: Arc::new(audit),
            store,
            ca,
            config,
            policy,
            registry,
            job_lock: Mutex::new(HashMap::new()),
            runs_loaded: std::sync::atomic::AtomicBool::new(false),
            watch: watch::WatchHub::default(),
            join_limiter: JoinLimiter::default(),
            auth_limiter: crate::auth::AuthFailureLimiter::default(),
            metrics: Arc::new(crate::metrics::Metrics::new()),
            bus: crate::bus::Bus::none(),
            presence: presence::PresenceView::default(),
        };
        if let Some(rec) = shared.store.get_policy()? {
            // The stored bundle was verified when pushed; verify again so a
            // tampered database cannot smuggle in a policy.
            let cur = shared
                .policy
                .verify(rec)
                .map_err(|e| ApiError::Internal(format!("stored policy: {e}")))?;
            shared.policy.set(Arc::new(cur));
        }
        Ok(shared)
    }

    /// Audit events (refusals and everything else that need not be durable
    /// before an acknowledgement), in one place: logged and appended to the
    /// audit trail by `Audit::record`, so logs and trail cannot disagree.
    /// Durable with the next flush.
    pub fn security_event(&self, event: Event) {
        if let Err(e) = self.audit.record(event) {
            tracing::error!(error = %e, "appending to the audit trail");
        }
    }

    /// Appends an event that must be durable with the action it records:
    /// the caller flushes after this and before acknowledging (fails closed).
    fn audit_durable(&self, event: Event) -> ApiResult<()> {
        self.audit.record(event)?;
        Ok(())
    }

    /// Makes everything written so far durable. Group commit: callers
    /// queue up while a flush runs, and the next flush answers all of them,
    /// so many concurrent results cost one fsync, not one each.
    /// Makes everything written so far durable (for subsystems outside
    /// this module that acknowledge an action, such as a silence).
    pub async fn flush_now(&self) -> ApiResult<()> {
        self.flush().await
    }

    /// Evaluates the services (`crate::health`) from the agents' latest
    /// check results; audits announced changes. Blocking: reads the agent
    /// list from the store.
    pub fn health_tick(&self) -> ApiResult<()> {
        if self.health.is_empty() {
            return Ok(());
        }
        // Fleet-wide: agents connected to other controllers count with
        // their controllers' last word (`presence`).
        let agents = self.health_agents()?;
        if self.registry.settling() {
            // Shown, not judged: nothing is announced while agents reconnect.
            self.health.refresh(&agents);
            return Ok(());
        }
        for event in self.health.evaluate(&agents, now_ms())? {
            self.security_event(event);
        }
        Ok(())
    }

    /// With several controllers, on those that do not hold the `health`
    /// lease: services as the holder stored them (`Health::follow_store`).
    /// Blocking.
    pub fn health_follow(&self) -> ApiResult<()> {
        if self.health.is_empty() || !self.bus.is_shared() {
            return Ok(());
        }
        let agents = self.health_agents()?;
        Ok(self.health.follow_store(&agents)?)
    }

    async fn flush(&self) -> ApiResult<()> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.flusher
            .send(tx)
            .map_err(|_| ApiError::Internal("the flusher has stopped".into()))?;
        rx.await
            .map_err(|_| ApiError::Internal("the flusher has stopped".into()))?
            .map_err(|e| ApiError::Store(crate::store::StoreError::Backend(e)))
    }

    // ------------------------------------------------------------ policy

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
        let mut cur = self.policy.verify(record).inspect_err(|e| {
            self.security_event(
                Event::new(EventKind::PolicyRefused, crate::audit::peer_actor(by))
                    .detail(e.to_string()),
            );
        })?;
        cur.record.version = cur.policy.version;
        if let Some(old) = self.policy.current() {
            policy_bundle::check_rollback(Some(old.policy.version), &cur.policy).map_err(|e| {
                self.security_event(
                    Event::new(EventKind::PolicyRefused, crate::audit::peer_actor(by))
                        .detail(e.to_string())
                        .field("version", cur.policy.version)
                        .field("current_version", old.policy.version)
                        .field("hash", &cur.hash),
                );
                ApiError::FailedPrecondition(e.to_string())
            })?;
        }
        if !self.store.put_policy(&cur.record)? {
            // Another controller stored this version or a newer one first.
            let stored = self.store.get_policy()?.map_or(0, |p| p.version);
            let why = format!(
                "policy version {} is not newer than the stored version {stored} (pushed through another controller)",
                cur.policy.version
            );
            self.security_event(
                Event::new(EventKind::PolicyRefused, crate::audit::peer_actor(by))
                    .detail(&why)
                    .field("version", cur.policy.version)
                    .field("current_version", stored)
                    .field("hash", &cur.hash),
            );
            self.bus.publish(crate::bus::Signal::Policy);
            return Err(ApiError::FailedPrecondition(why));
        }
        self.audit_durable(
            Event::new(EventKind::PolicyPushed, crate::audit::peer_actor(by))
                .field("version", cur.policy.version)
                .field(
                    "previous_version",
                    self.policy.current().map_or(0, |p| p.policy.version),
                )
                .field("hash", &cur.hash),
        )?;
        self.flush().await?;
        let cur = Arc::new(cur);
        self.policy.set(cur.clone());
        tracing::info!(version = cur.policy.version, hash = %cur.hash, by = %by.name, "policy pushed");
        let msg = policy_message(&cur);
        self.registry.send_all(&msg);
        self.bus.publish(crate::bus::Signal::Policy);
        Ok(cur)
    }

    // ------------------------------------------------------------ tokens and joining

    /// A join token; one naming an enrolled agent re-enrols that
    /// enrolment (see [`TokenRecord::replaces`]).
    pub async fn create_token(
        &self,
        labels: BTreeMap<String, String>,
        ttl: Duration,
        uses: u32,
        name: Option<String>,
        by: &str,
    ) -> ApiResult<(fleetcmd_core::crypto::Secret<String>, u64)> {
        let replaces = name
            .as_deref()
            .and_then(|n| self.registry.enrolment_of(n))
            .map(|(_, joined_at)| joined_at);
        self.create_token_for(labels, ttl, uses, name, by, replaces)
            .await
    }

    /// [`Shared::create_token`] for the enrolment the caller's rights were
    /// checked against (`replaces`: its `joined_at`, `None` for a free name).
    pub async fn create_token_for(
        &self,
        labels: BTreeMap<String, String>,
        ttl: Duration,
        uses: u32,
        name: Option<String>,
        by: &str,
        replaces: Option<u64>,
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
            replaces: replaces.filter(|_| name.is_some()),
            name,
            created_by: by.to_owned(),
        };
        self.store.put_token(&token.id_hex(), &rec)?;
        self.audit_durable(
            Event::new(EventKind::TokenCreated, format!("cli:{by}"))
                .field("token_id", token.id_hex())
                .field("uses", rec.uses_left)
                .field("expires_at", expires_at)
                .field("name", rec.name.as_deref().unwrap_or(""))
                .field(
                    "labels",
                    rec.labels
                        .iter()
                        .map(|(k, v)| format!("{k}={v}"))
                        .collect::<Vec<_>>()
                        .join(","),
                ),
        )?;
        self.flush().await?;
        tracing::info!(token_id = %token.id_hex(), by, "join token created");
        Ok((token.encode(), expires_at))
    }

    pub async fn join(&self, req: pb::JoinRequest) -> ApiResult<pb::JoinResponse> {
        let token = JoinToken::parse(&req.token).map_err(|e| {
            self.security_event(
                Event::new(EventKind::TokenRefused, "anonymous")
                    .detail(format!("malformed token: {e}")),
            );
            ApiError::InvalidArgument(format!("malformed join token: {e}"))
        })?;
        // Every refusal of the token: recorded (with the host it named, once
        // known) and answered PERMISSION_DENIED.
        let refused = |host: Option<&AgentId>, detail: String, message: String| {
            let mut event =
                Event::new(EventKind::TokenRefused, "anonymous").field("token_id", token.id_hex());
            if let Some(h) = host {
                event = event.host(h.as_str());
            }
            self.security_event(event.detail(detail));
            ApiError::PermissionDenied(message)
        };
        if token.ca_sha256 != self.ca.fingerprint() {
            return Err(refused(
                None,
                "token pins another CA".into(),
                "join token was issued for another fleet CA".into(),
            ));
        }
        if token.roots_sha256 != roots_pin(&self.config.policy_roots) {
            return Err(refused(
                None,
                "token pins other policy roots".into(),
                "join token pins other policy root keys".into(),
            ));
        }
        let rec = self
            .store
            .consume_token(&token.id_hex(), &hex(&token.secret_hash()), now_secs())?
            .map_err(|r| refused(None, r.to_string(), r.to_string()))?;
        // A token that names the agent may re-enrol that name (a reinstalled
        // host); a token without a name may only take a name nobody holds.
        let named_by_token = rec.name.is_some();
        let name = rec.name.clone().unwrap_or(req.name);
        let id = AgentId::parse(&name)
            .map_err(|e| ApiError::InvalidArgument(format!("agent name: {e}")))?;
        let current = self.store.get_agent(id.as_str())?;
        if named_by_token && current.as_ref().map(|a| a.joined_at) != rec.replaces {
            // The name was enrolled (again) after the token was made: its
            // creator's rights were checked against another enrolment.
            return Err(refused(
                Some(&id),
                format!("token was created for another enrolment of {id} than the current one"),
                format!(
                    "agent name {id} was enrolled after this token was created; create a new token with `--name {id}`"
                ),
            ));
        }
        match current {
            Some(a) if a.revoked => {
                return Err(refused(
                    Some(&id),
                    format!("agent {id} is revoked"),
                    format!("agent {id} is revoked; pick another name"),
                ));
            }
            Some(_) if !named_by_token => {
                return Err(refused(
                    Some(&id),
                    format!("token tried to take enrolled name {id}"),
                    format!(
                        "agent name {id} is already enrolled; re-enrol it with a token created with `--name {id}`"
                    ),
                ));
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
        let enrolment_cert = crate::pki::EnrolmentCert::of(&cert_pem)
            .ok_or_else(|| ApiError::Internal("reading back an issued certificate".into()))?;
        let agent = AgentRecord {
            id: id.to_string(),
            labels: rec.labels.clone(),
            revoked: false,
            joined_at: now_secs(),
            version: String::new(),
            enrolment_cert: Some(enrolment_cert),
        };
        self.registry.save(self.store.as_ref(), agent)?;
        self.audit_durable(
            Event::new(EventKind::TokenUsed, format!("agent:{id}"))
                .field("token_id", token.id_hex())
                .field("uses_left", rec.uses_left.saturating_sub(1))
                .host(id.as_str()),
        )?;
        self.audit_durable(
            Event::new(EventKind::AgentJoined, format!("agent:{id}"))
                .field("token_id", token.id_hex())
                .field(
                    "labels",
                    rec.labels
                        .iter()
                        .map(|(k, v)| format!("{k}={v}"))
                        .collect::<Vec<_>>()
                        .join(","),
                )
                .host(id.as_str()),
        )?;
        self.flush().await?;
        // A re-enrolment: the previous holder's stream ends now (its
        // certificates are refused from here on, see `agent_cert_current`).
        self.registry.end_stream(
            id.as_str(),
            Status::permission_denied(format!(
                "agent {id} was enrolled again; this certificate is no longer accepted"
            )),
        );
        self.bus.publish(crate::bus::Signal::Agent(id.to_string()));
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
        let cert = self
            .ca
            .issue_from_csr(csr_der, Role::Agent, agent, self.config.agent_cert_ttl)
            .map_err(|e| ApiError::InvalidArgument(e.to_string()))?;
        self.security_event(
            Event::new(EventKind::AgentRenewed, format!("agent:{agent}"))
                .host(agent)
                .field("ttl_secs", self.config.agent_cert_ttl.as_secs()),
        );
        Ok(cert)
    }

    // ------------------------------------------------------------ live agents

    /// Registers a connected agent (`Registry::register`) and queues the
    /// current policy on its stream first.
    pub fn register(
        &self,
        agent: &str,
        hello: fleetcmd_core::host::HostReport,
        policy_version: u64,
        tx: AgentTx,
    ) -> ApiResult<u64> {
        let first = self.policy.current().map(|cur| policy_message(&cur));
        let conn =
            self.registry
                .register(self.store.as_ref(), agent, hello, policy_version, tx, first)?;
        if let Err(e) = self.redeliver(agent) {
            tracing::warn!(agent_id = agent, error = %e, "looking for jobs to send again");
        }
        Ok(conn)
    }

    /// Revokes an agent: durable first, then its stream is closed and every
    /// later call with its certificate is refused.
    pub async fn revoke(&self, agent: &str, by: &Peer) -> ApiResult<()> {
        let mut rec = self
            .registry
            .record(agent)
            .ok_or_else(|| ApiError::NotFound(format!("no agent {agent:?}")))?;
        rec.revoked = true;
        self.registry.save(self.store.as_ref(), rec)?;
        self.audit_durable(
            Event::new(EventKind::AgentRevoked, crate::audit::peer_actor(by))
                .host(agent)
                .detail(format!("{agent} revoked")),
        )?;
        self.flush().await?;
        self.bus
            .publish(crate::bus::Signal::Agent(agent.to_owned()));
        let here = self.registry.online_now([agent]).first() == Some(&true);
        self.registry.mark_revoked(agent);
        self.registry.end_stream(
            agent,
            Status::permission_denied(format!("agent {agent} was revoked")),
        );
        if here {
            self.refuse_queued_on_revoked(agent, true).await?;
        }
        Ok(())
    }

    /// The jobs a revoked agent, whose stream this controller just closed,
    /// was sent but had not reported starting: it starts none of them (a
    /// controller refused it: `agent::link`), and it cannot report that
    /// any more, so they are recorded and audited as refused here. Only the
    /// controller the agent was connected to knows which of its targets
    /// had started (`running` is known there alone): another leaves them
    /// to that one, or to their deadline (found by an outside test: a
    /// target that ran was recorded refused, "before it reported
    /// starting", by a controller the agent was not connected to).
    ///
    /// With `knows_starts` false (several controllers, and the agent was
    /// not connected here: the sweeper's call for an agent connected to
    /// none), a target not known to have started may have started on the
    /// controller the agent was connected to, so it is recorded failed
    /// with that said, not refused.
    pub(super) async fn refuse_queued_on_revoked(
        &self,
        agent: &str,
        knows_starts: bool,
    ) -> ApiResult<()> {
        const REASON: &str = "agent revoked before it reported starting the job; an agent starts no job after a controller refuses it";
        const RAN: &str = "agent revoked while the job ran; its result cannot be received";
        const UNKNOWN: &str = "agent revoked while connected to no controller; whether it had started the job is not known, and its result cannot be received";
        let active: Vec<(String, TargetState)> = {
            let runs = lock(&self.job_lock);
            runs.iter()
                .filter_map(|(id, run)| {
                    let &i = run.index.get(agent)?;
                    let state = run.states[i].0;
                    state.is_active().then(|| (id.clone(), state))
                })
                .collect()
        };
        let mut refused = Vec::new();
        for (job, state) in active {
            // Started (it reported so): it ran, or runs; its end is unknown.
            let failed = |why: &str| {
                (
                    TargetRecord::new(TargetState::Failed, why),
                    Event::new(EventKind::JobFinished, "controller")
                        .job(&job)
                        .host(agent)
                        .field("outcome", "failed")
                        .detail(why),
                )
            };
            let (rec, event) = if state == TargetState::Running {
                failed(RAN)
            } else if !knows_starts {
                failed(UNKNOWN)
            } else {
                (
                    TargetRecord::new(TargetState::Refused, REASON),
                    Event::new(EventKind::JobRefused, "controller")
                        .job(&job)
                        .host(agent)
                        .field("reason_code", "agent_revoked")
                        .detail(REASON),
                )
            };
            if self.update_target(&job, agent, rec, None)? {
                self.audit_durable(event)?;
                refused.push(job);
            }
        }
        if !refused.is_empty() {
            self.flush().await?;
            for job in &refused {
                self.kick(job);
                self.bus.publish(crate::bus::Signal::Target {
                    job: job.clone(),
                    agent: agent.to_owned(),
                });
            }
        }
        Ok(())
    }

    // ------------------------------------------------------------ jobs

    /// Checks a signed job as the agents will (defence in depth; the agents
    /// still decide), stores it durably, answers, and has the dispatcher
    /// start it.
    pub async fn submit(
        self: &Arc<Self>,
        peer: &Peer,
        signed: pb::SignedJob,
    ) -> ApiResult<pb::SubmitResponse> {
        // Resolving the targets and writing a record per target take
        // milliseconds at fleet scale: not on an async worker.
        let this = self.clone();
        let by = peer.clone();
        let stored = tokio::task::spawn_blocking(move || this.store_submission(&by, signed))
            .await
            .map_err(|e| ApiError::Internal(format!("submit task: {e}")))??;
        // Nothing is dispatched before the job's record is durable.
        self.flush().await?;
        tracing::info!(job_id = %stored.id, command = %stored.command, requester = %stored.requester, targets = stored.targets.len(), "job submitted");
        self.metrics.job_submitted();
        // Durable: answer now, dispatch off the request path — here, and
        // on every other controller for the agents connected there.
        self.kick(&stored.id);
        self.bus.publish(crate::bus::Signal::Job(stored.id.clone()));
        Ok(pb::SubmitResponse {
            job_id: stored.id,
            targets: stored.targets,
        })
    }

    /// The checks and writes of `submit`, up to its flush (blocking).
    fn store_submission(&self, peer: &Peer, signed: pb::SignedJob) -> ApiResult<Submitted> {
        let cur = self.policy.current().ok_or_else(|| {
            ApiError::FailedPrecondition(
                "no policy has been pushed yet (`fleetcmd policy push`)".into(),
            )
        })?;
        let job = SignedJob {
            spec: signed.spec,
            signature: signed.signature,
            key_id: signed.key_id,
        };
        let accepted =
            submission::check(&cur.policy, peer, &job, now_secs()).map_err(|refused| {
                match &refused {
                    submission::Refused::Unverified(r) => self.security_event(
                        Event::new(EventKind::JobRefused, crate::audit::peer_actor(peer))
                            .detail(r.to_string())
                            .field("key_id", &job.key_id),
                    ),
                    // Every refusal of a job that verified: audited with who
                    // asked, through which peer, which job and command, and why.
                    submission::Refused::Audited { spec, why, .. } => self.security_event(
                        Event::new(EventKind::JobRefused, spec.requester.to_string())
                            .source(crate::audit::peer_actor(peer))
                            .job(spec.id.to_string())
                            .command(&spec.command)
                            .detail(why),
                    ),
                    submission::Refused::Unaudited(_) => {}
                }
                refused.into_error()
            })?;
        let spec = &accepted.spec;
        let id = spec.id.to_string();
        // Resolve targets against the enrolment records' labels, never what
        // agents report about themselves (the agents re-check their own
        // granted labels).
        let targets = self
            .registry
            .matching(&accepted.selector, accepted.command.targets.as_ref());
        if targets.is_empty() {
            return Err(ApiError::NotFound(format!(
                "no agent matches `{}` for command `{}`",
                spec.selector, spec.command
            )));
        }
        // Every target starts `pending`, which is not stored: a target of
        // the job record without a target record is pending (`run_of`,
        // `job_to_proto`). `advance` dispatches them as the rollout allows
        // and marks one that is offline when its turn comes. (Stores of
        // earlier versions have `pending` records; they read the same.)
        let record = accepted.record(
            &job,
            targets.iter().map(|(a, _)| a.clone()).collect(),
            now_ms(),
        );
        // One transaction stores the job and claims its short id: a replayed
        // id is refused (ALREADY_EXISTS), and a short id names one job (the
        // submitter picks a new id and signs again: `ShortIdTaken` is
        // ABORTED, which says so). Last, so a refusal above leaves nothing
        // behind.
        let short = spec.id.short();
        match self.store.create_job(short.as_str(), &record, &[])? {
            Ok(()) => {}
            Err(crate::store::JobClash::IdExists) => {
                self.security_event(
                    Event::new(EventKind::JobRefused, spec.requester.to_string())
                        .source(crate::audit::peer_actor(peer))
                        .job(&id)
                        .command(&spec.command)
                        .detail("replayed job id"),
                );
                return Err(ApiError::AlreadyExists(format!(
                    "job {id} was already submitted"
                )));
            }
            Err(crate::store::JobClash::ShortIdTaken { holder }) => {
                tracing::info!(job_id = %id, holder = %holder, short_id = %short, "short id taken; job refused");
                return Err(ApiError::ShortIdTaken {
                    job: id,
                    short: short.to_string(),
                });
            }
        }
        // Nothing runs without its audit record: same flush, before dispatch.
        let mut submitted = Event::new(EventKind::JobSubmitted, spec.requester.to_string())
            .source(crate::audit::peer_actor(peer))
            .job(&id)
            .command(&spec.command)
            .hosts(targets.iter().map(|(a, _)| a.clone()))
            .field(
                "args",
                spec.args
                    .iter()
                    .map(|(k, v)| format!("{k}={v}"))
                    .collect::<Vec<_>>()
                    .join(" "),
            )
            .field("selector", &spec.selector)
            .field("channel", &spec.channel)
            .field("target_count", targets.len())
            .field("key_id", &job.key_id);
        if !spec.approvals.is_empty() {
            submitted = submitted.field("approved_by", submission::approved_by(spec));
        }
        self.audit_durable(submitted)?;
        Ok(Submitted {
            id,
            command: spec.command.clone(),
            requester: spec.requester.to_string(),
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
        // The hook may reuse a finished job's id (replay tests).
        {
            let mut f = lock(&self.finished);
            f.0.remove(job_id);
            f.1.retain(|x| x != job_id);
        }
        lock(&self.job_lock).remove(job_id);
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
            state: JobState::Running,
            targets: agents.iter().map(|a| a.to_string()).collect(),
            rollout: Default::default(),
            needs_approval: false,
            target_deadline_secs: 60,
            expires_at: now_secs() + 60,
            stopped: None,
        };
        for a in agents {
            self.store.put_target(
                job_id,
                a,
                &TargetRecord {
                    dispatched_at: now_secs(),
                    ..TargetRecord::new(TargetState::Dispatched, "")
                },
            )?;
        }
        self.store.put_job(&record)?;
        let msg = pb::ControllerMessage {
            msg: Some(pb::controller_message::Msg::Job(signed)),
        };
        for a in agents {
            self.registry.send(a, msg.clone());
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
        self.registry.send_all(&msg);
    }

    /// Retention (`retention::delete_old`), then one flush for all it
    /// deleted, then expired claims and long-ended gateway leases pruned. Returns how many jobs were
    /// deleted.
    pub async fn enforce_retention(&self) -> ApiResult<usize> {
        let deleted = retention::delete_old(
            self.store.as_ref(),
            self.config.job_retention,
            self.config.job_store_max_bytes,
            now_ms(),
        )?;
        if deleted > 0 {
            self.flush().await?;
            tracing::info!(deleted, "retention: old jobs deleted");
        }
        // Expired gateway claims (`claims.rs`): nobody can lose to them any
        // more; gateway chat leases that ended an hour ago, likewise.
        self.prune_quietly("expired claims", |s| s.prune_claims())
            .await;
        self.prune_quietly("ended gateway leases", |s| {
            s.prune_leases(
                crate::claims::GATEWAY_LEASE_PREFIX,
                crate::claims::GATEWAY_LEASE_KEPT,
            )
        })
        .await;
        Ok(deleted)
    }

    /// One of retention's pruning steps, off the runtime. A failure here
    /// costs space, never a job: it is logged, not returned.
    async fn prune_quietly(
        &self,
        what: &'static str,
        step: impl FnOnce(&dyn Store) -> Result<u64, StoreError> + Send + 'static,
    ) {
        let store = self.store.clone();
        match tokio::task::spawn_blocking(move || step(store.as_ref())).await {
            Ok(Ok(0)) => {}
            Ok(Ok(n)) => tracing::debug!(pruned = n, "retention: {what} removed"),
            Ok(Err(e)) => tracing::warn!(error = %e, "retention: pruning {what}"),
            Err(e) => tracing::warn!(error = %e, "retention: pruning {what} (task)"),
        }
    }

    /// Forwards a chunk of live output from `agent` to the job's watchers,
    /// if `agent` is a dispatched, unfinished target of that job: no agent
    /// can put lines into another host's job.
    pub fn live_chunk(&self, agent: &str, mut chunk: pb::OutputChunk) {
        // A watcher may be on another controller: with a shared store every
        // chunk of an active target goes on the bus too.
        if !self.watch.is_watched(&chunk.job_id) && !self.bus.is_shared() {
            return;
        }
        match self.is_active_target(&chunk.job_id, agent) {
            Ok(true) => {}
            Ok(false) => {
                tracing::debug!(
                    agent_id = agent,
                    "live output for a job not dispatched to this agent dropped"
                );
                return;
            }
            Err(e) => {
                tracing::warn!(agent_id = agent, error = %e, "checking a live output chunk's target");
                return;
            }
        }
        chunk.agent_id = agent.to_owned();
        let job = chunk.job_id.clone();
        if self.bus.is_shared() {
            // Every controller's watchers get it from the bus (this one's
            // too: the bus delivers to its sender).
            self.bus.publish(crate::bus::Signal::Output(chunk));
            return;
        }
        self.watch.publish(&job, pb::job_event::Event::Chunk(chunk));
    }

    /// Subscribes to a job's events; returns the job as it is now (taken
    /// after subscribing, so nothing falls between the two).
    pub fn watch(
        &self,
        id: &str,
    ) -> ApiResult<(pb::Job, tokio::sync::broadcast::Receiver<pb::JobEvent>)> {
        let id = self.resolve_job_id(id)?;
        let rx = self.watch.subscribe(&id);
        let job = self.get_job(&id)?;
        if job.job_state() != pb::JobState::Running {
            self.watch.forget(&id);
        }
        Ok((job, rx))
    }

    /// Resolves what a person typed (`JobRef`): a full id, a short id (an
    /// index lookup: a short id names one job, submit sees to it), or a
    /// prefix of the full id that only one job has.
    pub fn resolve_job_id(&self, id: &str) -> ApiResult<String> {
        let named = JobRef::parse(id).map_err(|e| ApiError::InvalidArgument(e.to_string()))?;
        let ids = match &named {
            JobRef::Short(short) => self
                .store
                .job_id_by_short(short.as_str())?
                .into_iter()
                .collect(),
            JobRef::Full(full) => self.store.job_ids_with_prefix(full.as_str(), 1)?,
            JobRef::Prefix(prefix) => self.store.job_ids_with_prefix(prefix, 2)?,
        };
        match ids.as_slice() {
            [one] => Ok(one.clone()),
            // A prefix is read from the start of the full id, which jobs of
            // one moment share; someone who typed the first digits of a
            // short id (its end) is told so.
            [] if matches!(named, JobRef::Prefix(_)) => Err(ApiError::NotFound(format!(
                "no job whose full id starts with {named}: 8 to 11 characters are the start of the full id; the short id `jobs` shows is its last 12 hex digits"
            ))),
            [] => Err(ApiError::NotFound(format!("no job {named}"))),
            _ => Err(ApiError::InvalidArgument(format!(
                "job id {named} is the start of several jobs' ids; give its 12-digit short id"
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

    /// Newest first, optionally only one requester's and/or one state.
    pub fn list_jobs(&self, limit: u32, requester: &str, state: &str) -> ApiResult<Vec<pb::Job>> {
        self.list_jobs_where(limit, requester, state, None)
    }

    /// [`Shared::list_jobs`] keeping only the jobs `keep` accepts (those the
    /// asker may read), so `limit` counts readable jobs.
    pub fn list_jobs_where(
        &self,
        limit: u32,
        requester: &str,
        state: &str,
        keep: Option<&dyn Fn(fleetcmd_core::rbac::JobFacts<'_>) -> bool>,
    ) -> ApiResult<Vec<pb::Job>> {
        let limit = if limit == 0 { 20 } else { limit.min(500) } as usize;
        let state: Option<JobState> = if state.is_empty() {
            None
        } else {
            Some(
                state
                    .parse()
                    .map_err(|e| ApiError::InvalidArgument(format!("state filter: {e}")))?,
            )
        };
        // The backend filters by requester and state; what the asker may
        // read is checked here, page by page, so `limit` counts readable
        // jobs.
        let mut q = crate::store::JobQuery {
            requester: (!requester.is_empty()).then(|| requester.to_owned()),
            state,
            limit: if keep.is_some() { LIST_PAGE } else { limit },
            ..Default::default()
        };
        let mut out = Vec::new();
        let mut scanned = 0usize;
        loop {
            let page = self.store.list_jobs(&q)?;
            let full = page.len() >= q.limit;
            scanned += page.len();
            q.after = page.last().map(|j| j.id.clone());
            for rec in page {
                if let Some(keep) = keep {
                    let facts = fleetcmd_core::rbac::JobFacts {
                        requester: &rec.requester,
                        command: &rec.command,
                        selector: &rec.selector,
                    };
                    if !keep(facts) {
                        continue;
                    }
                }
                out.push(self.job_to_proto(rec)?);
                if out.len() >= limit {
                    return Ok(out);
                }
            }
            if !full || scanned >= LIST_SCAN {
                return Ok(out);
            }
        }
    }

    fn job_to_proto(&self, rec: JobRecord) -> ApiResult<pb::Job> {
        let stored: HashMap<String, TargetRecord> =
            self.store.targets(&rec.id)?.into_iter().collect();
        // `running` is kept in memory only (`record_started`).
        let runs = lock(&self.job_lock);
        let run = runs.get(&rec.id);
        Ok(convert::job(rec, stored, |agent| {
            run.is_some_and(|run| {
                run.index
                    .get(agent)
                    .is_some_and(|&i| run.states[i].0 == TargetState::Running)
            })
        }))
    }
}

/// Jobs read per page when the asker's rights filter them.
const LIST_PAGE: usize = 200;
/// Jobs one listing reads at most, so one query cannot pin the controller.
const LIST_SCAN: usize = 10_000;

fn parse_selector(s: &str) -> ApiResult<Selector> {
    Selector::parse(s).map_err(|e| ApiError::InvalidArgument(format!("selector `{s}`: {e}")))
}
