//! The agent's life once joined: one outbound mTLS stream to the controller,
//! re-dialled with jittered exponential backoff (invariant 1 in ARCHITECTURE.md); heartbeats
//! with host metrics; policy bundles verified before use; every job checked
//! by `fleetcmd_core::authorize` before the executor sees it, and checked
//! again (`fleetcmd_core::authorize::recheck`) when its slot frees, right
//! before it starts; results kept until the controller acknowledges them
//! (sent again after a reconnect).
//!
//! A job waiting for a slot follows the agent's link to the controllers
//! (`crate::link`): the agent learns that it was revoked only from a
//! controller refusing it, so a job starts only while a controller accepts
//! the agent. When the stream that delivered it is lost (a controller
//! killed, the network) the job waits for the next welcome — from the same
//! controller or another of the list — and for that controller to send it
//! again (it does for every target still active: the job was not canceled
//! or ended meanwhile), and starts then; it is refused (`agent_revoked`)
//! if a controller refuses the agent first, and (`stream_ended`) if the
//! agent stops or it is not sent again before the job expires. A job
//! canceled before it started never starts. A job that waited for its slot
//! starts only after the controller it is connected to answers a start
//! check (`start_check`): one that is stopped cannot pass on a revocation
//! or a cancel, so after 5 s without an answer the agent leaves it for the
//! next. Jobs already running are not affected.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use fleetcmd_core::authorize::{
    AgentContext, AuthorizedCommand, Refusal, Stream, authorize, recheck,
};
use fleetcmd_core::job::{CLOCK_SKEW_SECS, JobSpec, SignedJob};
use fleetcmd_core::policy_bundle::PolicySignature;
use fleetcmd_proto::v1 as pb;
use pb::agent_message::Msg as Out;
use pb::controller_message::Msg as In;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;
use tokio_stream::wrappers::ReceiverStream;

use crate::config::AgentConfig;
use crate::controllers::Rotation;
use crate::exec::{ExecLimits, Termination, execute};
use crate::link::{LinkRx, LinkTx};
use crate::metrics::{Collector, HostMetrics};
use crate::renewal::{Installed, Renewal};
use crate::state::{PolicyStore, SeenSet, StateDir, StateError};

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error(transparent)]
    State(#[from] StateError),
    #[error("{0}")]
    Identity(String),
    #[error("metrics_listen {addr}: {source}")]
    MetricsListen {
        addr: std::net::SocketAddr,
        source: std::io::Error,
    },
}

/// Outbound queue of one stream. Bounded; results are never lost to it
/// because they also stay in `pending` until acknowledged.
const OUT_QUEUE: usize = 256;
/// Live output chunks buffered per running job before they are dropped.
const LIVE_QUEUE: usize = 64;
const BACKOFF_BASE: Duration = Duration::from_secs(1);
const BACKOFF_MAX: Duration = Duration::from_secs(60);

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

struct Inner {
    config: AgentConfig,
    dir: StateDir,
    agent_id: String,
    /// The labels this agent was granted when it joined (its join token's,
    /// in the state dir): the only ones its selector and `targets` checks
    /// use. agent.toml's facts grant nothing.
    labels: BTreeMap<String, String>,
    policy: Mutex<PolicyStore>,
    seen: Mutex<SeenSet>,
    /// Results not yet acknowledged by the controller.
    pending: Mutex<BTreeMap<String, pb::JobResult>>,
    /// The on-disk copy of `pending` (and started markers).
    spool: crate::spool::Spool,
    out: Mutex<Option<mpsc::Sender<pb::AgentMessage>>>,
    collector: Arc<Mutex<Collector>>,
    running: Mutex<HashMap<String, watch::Sender<bool>>>,
    /// Jobs admitted and not yet reported: from the moment their id is
    /// recorded as seen (under the `seen` lock) until their result is in
    /// `pending` — while they wait for a slot, are checked again, run, and
    /// while their result is made. A copy of such a job (sent again by a
    /// controller the agent reconnected to) is ignored: its result
    /// follows. Without it, a copy arriving in one of those windows was
    /// refused as `replayed`, a refusal the controller could store as the
    /// target's result.
    /// With each, the stream (`crate::link` generation) that last
    /// delivered it: a job that waited through a lost connection starts
    /// only once the current stream delivered it again.
    in_hand: Mutex<HashMap<String, u64>>,
    /// Told whenever a copy or a cancel of a job in hand arrives.
    job_news: tokio::sync::Notify,
    /// Questions before a start (`StartCheck`) waiting for their answer.
    start_answers: Mutex<HashMap<String, tokio::sync::oneshot::Sender<pb::StartAnswer>>>,
    /// Whether the controller of the stream up now answers them.
    answers_start_checks: std::sync::atomic::AtomicBool,
    /// Told to leave the controller of the stream up now (it did not
    /// answer a start check in time).
    leave: tokio::sync::Notify,
    /// Bounds the jobs running at once (`max_concurrent_jobs`); the others
    /// wait here, already authorized, in arrival order.
    slots: Arc<tokio::sync::Semaphore>,
    /// Cancels that arrived before their job started.
    canceled_early: Mutex<std::collections::HashSet<String>>,
    /// The last heartbeat sent and when, for `/metrics` (kept only when
    /// `metrics_listen` is set).
    last_heartbeat: Mutex<Option<(std::time::Instant, pb::Heartbeat)>>,
    /// Latest check results; the heartbeat copies them, never waits for a check.
    checks: crate::checks::Latest,
}

/// A running agent. `shutdown` stops it.
pub struct AgentHandle {
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
    metrics: Option<tokio::task::JoinHandle<()>>,
    pub agent_id: String,
    /// Where `/metrics` is served (`metrics_listen`), if anywhere.
    pub metrics_addr: Option<std::net::SocketAddr>,
}

impl std::fmt::Debug for AgentHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AgentHandle")
            .field("agent_id", &self.agent_id)
            .finish()
    }
}

impl AgentHandle {
    pub async fn shutdown(self) {
        let _ = self.stop.send(true);
        let _ = self.task.await;
        if let Some(m) = self.metrics {
            let _ = m.await;
        }
    }

    /// Ends the agent at once, as a crash would: nothing more is sent
    /// (no refusal of its queued jobs, no goodbye). For tests of what a
    /// controller does with an agent that vanished.
    pub fn abort(self) {
        self.task.abort();
        if let Some(m) = self.metrics {
            m.abort();
        }
    }
}

/// Loads the joined state and starts the connection loop.
pub fn spawn(config: AgentConfig) -> Result<AgentHandle, AgentError> {
    let dir = StateDir::new(&config.state_dir);
    let identity = dir.load_identity()?;
    let roots = identity.roots().map_err(AgentError::Identity)?;
    let policy = PolicyStore::load(&dir, roots, identity.policy_threshold)?;
    let seen = SeenSet::load(&dir, now_secs())?;
    let spool = crate::spool::Spool::open(&dir.dir)?;
    let pending = spool.recover()?;
    if !pending.is_empty() {
        tracing::info!(
            results = pending.len(),
            "unacknowledged results recovered from the spool"
        );
    }
    dir.client_tls()?; // fail now, not in the loop, when files are missing
    let labels = identity.labels.clone();
    let runner = crate::checks::CheckRunner::start(config.checks.clone());
    let inner = Arc::new(Inner {
        checks: runner.latest(),
        agent_id: identity.agent_id.clone(),
        labels,
        policy: Mutex::new(policy),
        seen: Mutex::new(seen),
        pending: Mutex::new(pending),
        spool,
        out: Mutex::new(None),
        collector: Arc::new(Mutex::new(Collector::new())),
        running: Mutex::new(HashMap::new()),
        in_hand: Mutex::new(HashMap::new()),
        job_news: tokio::sync::Notify::new(),
        start_answers: Mutex::new(HashMap::new()),
        answers_start_checks: std::sync::atomic::AtomicBool::new(false),
        leave: tokio::sync::Notify::new(),
        canceled_early: Mutex::new(std::collections::HashSet::new()),
        slots: Arc::new(tokio::sync::Semaphore::new(config.max_concurrent_jobs)),
        last_heartbeat: Mutex::new(None),
        dir,
        config,
    });
    let listener = match inner.config.metrics_listen {
        Some(addr) => Some(
            crate::exporter::bind(addr)
                .and_then(|l| Ok((l.local_addr()?, l)))
                .map_err(|source| AgentError::MetricsListen { addr, source })?,
        ),
        None => None,
    };
    let (stop, stop_rx) = watch::channel(false);
    let metrics_addr = listener.as_ref().map(|(a, _)| *a);
    let metrics = listener.map(|(addr, listener)| {
        tracing::info!(%addr, "agent metrics listening (GET /metrics, loopback only)");
        let state = inner.clone();
        let source: crate::exporter::Source = Arc::new(move || figures(&state));
        tokio::spawn(crate::exporter::serve(listener, source, stop_rx.clone()))
    });
    let task = tokio::spawn(run(inner, stop_rx, runner));
    Ok(AgentHandle {
        stop,
        task,
        metrics,
        agent_id: identity.agent_id,
        metrics_addr,
    })
}

/// What `/metrics` shows, copied out under short locks.
fn figures(inner: &Inner) -> crate::exporter::AgentFigures {
    let last = lock(&inner.last_heartbeat).clone();
    crate::exporter::AgentFigures {
        heartbeat_age: last.as_ref().map(|(at, _)| at.elapsed()),
        heartbeat: last.map(|(_, hb)| hb),
        connected: lock(&inner.out).is_some(),
        jobs_running: lock(&inner.running).len(),
        results_unacknowledged: lock(&inner.pending).len(),
        process: Default::default(),
    }
}

/// A factor in 0.8..1.2.
pub(crate) fn jitter_factor() -> f64 {
    let mut b = [0u8; 4];
    let _ = ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut b);
    0.8 + 0.4 * (u32::from_le_bytes(b) as f64 / u32::MAX as f64)
}

/// gRPC connection-backoff shape: base × 1.6ⁿ, ±20 % jitter, capped.
pub fn backoff(attempt: u32) -> Duration {
    let raw = BACKOFF_BASE.as_secs_f64() * 1.6f64.powi(attempt.min(20) as i32);
    Duration::from_secs_f64(raw.min(BACKOFF_MAX.as_secs_f64()) * jitter_factor())
}

async fn run(
    inner: Arc<Inner>,
    mut stop: watch::Receiver<bool>,
    checks: crate::checks::CheckRunner,
) {
    let mut jobs = JoinSet::new();
    let mut attempt = 0u32;
    let mut controllers = Rotation::new(inner.config.controllers.clone(), &inner.agent_id);
    // Jobs waiting for a slot follow it: told here when a stream ends and
    // in `session` when a controller welcomes the agent.
    let (link, link_rx) = LinkTx::new();
    loop {
        let controller = controllers.current().to_owned();
        let ended = session(&inner, &controller, &mut stop, &mut jobs, &link, &link_rx).await;
        match &ended {
            Ok(()) => link.stopping(),
            Err(e) => link.ended(e.refused, &e.reason),
        }
        match ended {
            Ok(()) => break,
            Err(SessionEnd {
                welcomed, reason, ..
            }) => {
                *lock(&inner.out) = None;
                if welcomed {
                    attempt = 0;
                }
                let wait = backoff(attempt);
                attempt = attempt.saturating_add(1);
                // The next controller of the list (the same one when there
                // is one), after the same backoff: a fleet whose
                // controllers are all down is not dialled in a tight loop.
                controllers.advance();
                tracing::warn!(agent_id = %inner.agent_id, %controller, %reason, retry_in_ms = wait.as_millis() as u64, next = %controllers.current(), "controller connection lost");
                tokio::select! {
                    _ = tokio::time::sleep(wait) => {}
                    _ = stopped(&mut stop) => break,
                }
            }
        }
    }
    // Running commands are killed with their process groups when dropped.
    for tx in lock(&inner.running).values() {
        let _ = tx.send(true);
    }
    checks.shutdown().await;
    while jobs.join_next().await.is_some() {}
    tracing::info!(agent_id = %inner.agent_id, "agent stopped");
}

struct SessionEnd {
    welcomed: bool,
    reason: String,
    /// The controller refused this agent (what it answers a revoked one).
    refused: bool,
}

fn end(welcomed: bool, reason: impl std::fmt::Display) -> SessionEnd {
    SessionEnd {
        welcomed,
        reason: reason.to_string(),
        refused: false,
    }
}

/// The end of a stream by a gRPC status; permission denied and
/// unauthenticated mean the controller no longer accepts this agent.
fn end_by_status(welcomed: bool, s: &tonic::Status) -> SessionEnd {
    SessionEnd {
        refused: matches!(
            s.code(),
            tonic::Code::PermissionDenied | tonic::Code::Unauthenticated
        ),
        ..end(
            welcomed,
            format!("{}: {}", code_name(s.code()), s.message()),
        )
    }
}

fn msg(m: Out) -> pb::AgentMessage {
    pb::AgentMessage { msg: Some(m) }
}

/// One connection; returns Ok(()) only when asked to stop.
async fn session(
    inner: &Arc<Inner>,
    controller: &str,
    stop: &mut watch::Receiver<bool>,
    jobs: &mut JoinSet<()>,
    link: &LinkTx,
    link_rx: &LinkRx,
) -> Result<(), SessionEnd> {
    let tls = inner.dir.client_tls().map_err(|e| end(false, e))?;
    let channel = tokio::select! {
        c = fleetcmd_proto::channel::connect(controller, &tls) => c.map_err(|e| end(false, e))?,
        _ = stopped(stop) => return Ok(()),
    };
    let mut client = pb::agent_stream_client::AgentStreamClient::new(channel);
    let (tx, rx) = mpsc::channel(OUT_QUEUE);
    let hello = pb::Hello {
        version: env!("CARGO_PKG_VERSION").to_owned(),
        hostname: inner.agent_id.clone(),
        facts: inner.config.facts.clone().into_iter().collect(),
        policy_version: lock(&inner.policy).version(),
        allow: inner.config.allow.clone().unwrap_or_default(),
    };
    tx.try_send(msg(Out::Hello(hello)))
        .map_err(|e| end(false, e))?;
    let mut inbound = client
        .connect(ReceiverStream::new(rx))
        .await
        .map_err(|s| end_by_status(false, &s))?
        .into_inner();
    let mut welcomed = false;
    let mut heartbeat = tokio::time::interval(Duration::from_secs(10));
    // One timer for certificate renewal, set from the certificate itself
    // (it used to read and parse the file every second).
    let renew = tokio::time::sleep_until(renewal_check_at(renewal_due_at(&inner.dir)));
    tokio::pin!(renew);
    let mut renewal = Renewal::default();
    loop {
        tokio::select! {
            _ = stopped(stop) => return Ok(()),
            () = inner.leave.notified() => {
                return Err(end(welcomed, "the controller did not answer a start check in time; trying the next"));
            }
            // A check's first result or change of state goes out at once.
            () = inner.checks.changed(), if welcomed => {
                heartbeat.reset_immediately();
            }
            _ = heartbeat.tick(), if welcomed => {
                let hb = {
                    let metrics = Some(collect(inner).await);
                    let (policy_version, policy_expired) = {
                        let p = lock(&inner.policy);
                        (p.version(), p.current().and_then(|c| c.expires).is_some_and(|e| e < now_secs()))
                    };
                    pb::Heartbeat { metrics, policy_version, agent_time: now_secs(), policy_expired, checks: inner.checks.snapshot() }
                };
                if inner.config.metrics_listen.is_some() {
                    *lock(&inner.last_heartbeat) = Some((std::time::Instant::now(), hb.clone()));
                }
                // A full queue means the stream is stuck; drop this heartbeat.
                let _ = tx.try_send(msg(Out::Heartbeat(hb)));
            }
            _ = &mut renew, if welcomed => {
                let due_at = renewal_due_at(&inner.dir);
                let next = if due_at.is_some_and(|due| now_secs() as i64 >= due) {
                    match renewal.request(&inner.dir) {
                        Ok(csr) => {
                            let _ = tx.try_send(msg(Out::Renew(pb::RenewRequest { csr_der: csr })));
                        }
                        Err(e) => tracing::error!(error = %e, "building certificate renewal request"),
                    }
                    // Asked again if no new certificate arrives by then
                    // (no answer, a refusal, a failed write).
                    tokio::time::Instant::now() + RENEW_RETRY
                } else {
                    renewal_check_at(due_at)
                };
                renew.as_mut().reset(next);
            }
            m = inbound.message() => {
                let m = match m {
                    Ok(Some(m)) => m,
                    Ok(None) => return Err(end(welcomed, "controller closed the stream")),
                    Err(s) => return Err(end_by_status(welcomed, &s)),
                };
                match m.msg {
                    Some(In::Welcome(w)) => {
                        welcomed = true;
                        inner
                            .answers_start_checks
                            .store(w.answers_start_checks, std::sync::atomic::Ordering::SeqCst);
                        link.welcomed();
                        let granted: BTreeMap<String, String> = w.labels.into_iter().collect();
                        if granted != inner.labels {
                            // The controller's record changed since this
                            // agent joined; the agent keeps checking against
                            // what it was given at enrolment (a controller
                            // cannot widen a host's labels on its own).
                            tracing::warn!(
                                agent_id = %inner.agent_id,
                                enrolled = ?inner.labels,
                                controller = ?granted,
                                "the controller's labels for this agent differ from its enrolment labels; using the enrolment labels"
                            );
                        }
                        heartbeat = tokio::time::interval(Duration::from_secs(u64::from(w.heartbeat_secs.max(1))));
                        *lock(&inner.out) = Some(tx.clone());
                        let unacked: Vec<pb::JobResult> = lock(&inner.pending).values().cloned().collect();
                        for r in unacked {
                            let _ = tx.send(msg(Out::Result(r))).await;
                        }
                        tracing::info!(agent_id = %inner.agent_id, %controller, "connected to controller");
                    }
                    Some(In::Policy(p)) => {
                        let sigs: Vec<PolicySignature> = p.signatures.into_iter().map(|s| PolicySignature { key_id: s.key_id, signature: s.signature }).collect();
                        match lock(&inner.policy).offer(&p.bundle, &sigs) {
                            Ok(v) => tracing::info!(agent_id = %inner.agent_id, version = v, "policy accepted"),
                            Err(e) => tracing::warn!(target: "fleetcmd::security", agent_id = %inner.agent_id, error = %e, "policy bundle refused; keeping the last good one"),
                        }
                    }
                    Some(In::Job(j)) => {
                        let inner = inner.clone();
                        let link = link_rx.clone();
                        jobs.spawn(async move { handle_job(inner, j, link).await });
                    }
                    Some(In::Cancel(c)) => {
                        // Not running (yet, or any more): the controller's
                        // record already says canceled for pending targets.
                        match lock(&inner.running).get(&c.job_id) {
                            Some(tx) => {
                                let _ = tx.send(true);
                                tracing::info!(agent_id = %inner.agent_id, job_id = %c.job_id, "job canceled");
                            }
                            // It may be between its checks and its start.
                            None => {
                                lock(&inner.canceled_early).insert(c.job_id);
                                inner.job_news.notify_waiters();
                            }
                        }
                    }
                    Some(In::StartAnswer(a)) => {
                        if let Some(tx) = lock(&inner.start_answers).remove(&a.job_id) {
                            let _ = tx.send(a);
                        }
                    }
                    Some(In::Ack(a)) => {
                        lock(&inner.pending).remove(&a.job_id);
                        inner.spool.ack(&a.job_id);
                    }
                    Some(In::Renew(r)) => {
                        if r.error.is_empty() {
                            match renewal.install(&inner.dir, &r.cert_pem) {
                                Ok(installed) => {
                                    let new_key = installed == Installed::KeyAndCertificate;
                                    tracing::info!(agent_id = %inner.agent_id, new_key, "certificate renewed");
                                    renew.as_mut().reset(renewal_check_at(renewal_due_at(&inner.dir)));
                                }
                                Err(e) => tracing::error!(error = %e, "installing the renewed certificate"),
                            }
                        } else {
                            tracing::error!(error = %r.error, "certificate renewal refused");
                        }
                    }
                    None => {}
                }
            }
            Some(_) = jobs.join_next(), if !jobs.is_empty() => {}
        }
    }
}

fn code_name(c: tonic::Code) -> &'static str {
    match c {
        tonic::Code::PermissionDenied => "permission denied",
        tonic::Code::Unauthenticated => "unauthenticated",
        tonic::Code::Unavailable => "unavailable",
        _ => "error",
    }
}

async fn collect(inner: &Arc<Inner>) -> pb::HostMetrics {
    let c = inner.collector.clone();
    let m: HostMetrics = tokio::task::spawn_blocking(move || lock(&c).collect())
        .await
        .unwrap_or_default();
    pb::HostMetrics {
        cpu_percent: m.cpu_percent,
        load1: m.load1,
        load5: m.load5,
        load15: m.load15,
        mem_total_bytes: m.mem_total_bytes,
        mem_used_bytes: m.mem_used_bytes,
        swap_total_bytes: m.swap_total_bytes,
        swap_used_bytes: m.swap_used_bytes,
        uptime_secs: m.uptime_secs,
        process_count: m.process_count,
        disks: m
            .disks
            .into_iter()
            .map(|d| pb::DiskUsage {
                mount: d.mount,
                total_bytes: d.total_bytes,
                available_bytes: d.available_bytes,
            })
            .collect(),
    }
}

/// True once 2/3 of the current certificate's lifetime has passed.
/// How long after a renewal request without a new certificate the agent
/// asks again.
const RENEW_RETRY: Duration = Duration::from_secs(30);
/// Longest sleep before looking at the certificate again (a clock that
/// jumped, a certificate replaced on disk, one that cannot be read).
const RENEW_RECHECK: Duration = Duration::from_secs(3600);

/// When the certificate in `dir` is due for renewal (two thirds of its
/// lifetime), in unix seconds; `None` when it cannot be read.
fn renewal_due_at(dir: &StateDir) -> Option<i64> {
    let pem = std::fs::read_to_string(dir.cert()).ok()?;
    let (_, p) = x509_parser::pem::parse_x509_pem(pem.as_bytes()).ok()?;
    let cert = p.parse_x509().ok()?;
    let nb = cert.validity().not_before.timestamp();
    let na = cert.validity().not_after.timestamp();
    Some(nb + (na - nb) * 2 / 3)
}

/// When to look at the certificate next, given when it is due
/// (`renewal_due_at`): then, at most an hour from now.
fn renewal_check_at(due_at: Option<i64>) -> tokio::time::Instant {
    let wait = match due_at {
        Some(due) => Duration::from_secs(u64::try_from(due - now_secs() as i64).unwrap_or(0)),
        None => RENEW_RECHECK,
    };
    tokio::time::Instant::now() + wait.min(RENEW_RECHECK)
}

fn refused(job_id: String, code: &str, reason: String) -> pb::JobResult {
    pb::JobResult {
        job_id,
        outcome: pb::Outcome::Refused as i32,
        reason_code: code.to_owned(),
        reason,
        ..Default::default()
    }
}

/// How long a job that waited through a lost connection waits, once the
/// agent is welcomed again, for that controller to send it again.
const DELIVERED_AGAIN_WAIT: Duration = Duration::from_secs(15);

/// What a job admitted earlier may start under now (`crate::link`): the
/// link settled, and — when the stream up now is not the one that last
/// delivered the job — a copy of it sent on the current stream, the
/// controller's word that its target is still active (not canceled or
/// ended while the agent was away).
async fn settle_delivered(
    inner: &Inner,
    job_id: &str,
    link: &mut LinkRx,
    refusals: u64,
    until_expiry: Duration,
    waited: bool,
) -> Stream {
    let deadline = tokio::time::Instant::now() + until_expiry;
    let admitted_on = lock(&inner.in_hand).get(job_id).copied();
    loop {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        let stream = crate::link::settle(link, refusals, left).await;
        if stream != Stream::Up {
            return stream;
        }
        let again = inner.job_news.notified();
        tokio::pin!(again);
        again.as_mut().enable();
        let now = crate::link::generation(link);
        // Canceled: it then ends unstarted.
        if lock(&inner.canceled_early).contains(job_id) {
            return Stream::Up;
        }
        // Sent again on this stream (or never lost): ask first when it
        // waited, or came through a lost connection.
        if lock(&inner.in_hand).get(job_id) == Some(&now) {
            if !waited && admitted_on == Some(now) {
                return Stream::Up;
            }
            match start_check(inner, job_id, link).await {
                StartCheck::Go => return Stream::Up,
                StartCheck::NoGo(why) => {
                    if lock(&inner.canceled_early).contains(job_id) {
                        return Stream::Up;
                    }
                    return Stream::Ended(format!("the controller said not to start it: {why}"));
                }
                // Left that controller: wait for the next one.
                StartCheck::NoAnswer => {
                    let left = deadline.saturating_duration_since(tokio::time::Instant::now());
                    let _ = tokio::time::timeout(left, link.changed()).await;
                    continue;
                }
            }
        }
        let wait = DELIVERED_AGAIN_WAIT
            .min(deadline.saturating_duration_since(tokio::time::Instant::now()));
        tokio::select! {
            () = &mut again => {}
            _ = link.changed() => {}
            () = tokio::time::sleep(wait) => {
                return Stream::Ended(
                    "the stream that delivered it ended, and the controller the agent reconnected to did not send it again (canceled or ended meanwhile)".into(),
                );
            }
        }
    }
}

/// How long an agent waits for the answer to a start check before it
/// leaves that controller.
const START_CHECK_WAIT: Duration = Duration::from_secs(5);

enum StartCheck {
    Go,
    NoGo(String),
    /// No answer in time: the stream is being left.
    NoAnswer,
}

/// Asks the controller of the stream up now whether `job_id` is still to
/// run (`pb::StartCheck`): it may have been canceled, or the agent
/// revoked, through another controller while that one could not pass it
/// on (stopped, cut off). One that does not answer in time is left: the
/// next one refuses a revoked agent, or sends the job (or its cancel)
/// again. A controller that does not answer start checks at all (an
/// earlier version) is not asked.
async fn start_check(inner: &Inner, job_id: &str, link: &mut LinkRx) -> StartCheck {
    if !inner
        .answers_start_checks
        .load(std::sync::atomic::Ordering::SeqCst)
    {
        return StartCheck::Go;
    }
    let (tx, rx) = tokio::sync::oneshot::channel();
    lock(&inner.start_answers).insert(job_id.to_owned(), tx);
    send(
        inner,
        msg(Out::StartCheck(pb::StartCheck {
            job_id: job_id.to_owned(),
        })),
    );
    let answer = tokio::select! {
        a = tokio::time::timeout(START_CHECK_WAIT, rx) => a.ok().and_then(Result::ok),
        // The stream ended meanwhile: ask again on the next.
        _ = link.changed() => {
            lock(&inner.start_answers).remove(job_id);
            return StartCheck::NoAnswer;
        }
    };
    lock(&inner.start_answers).remove(job_id);
    match answer {
        Some(a) if a.go => StartCheck::Go,
        Some(a) => StartCheck::NoGo(a.reason),
        None => {
            tracing::warn!(agent_id = %inner.agent_id, job_id, "the controller did not answer a start check within 5 s; leaving it");
            inner.leave.notify_waiters();
            StartCheck::NoAnswer
        }
    }
}

/// [`recheck`] against the agent's current policy, labels and clock.
fn check_at_start(
    inner: &Inner,
    cmd: &AuthorizedCommand,
    stream: &Stream,
) -> Result<AuthorizedCommand, Refusal> {
    let policy = lock(&inner.policy);
    // The agent always has a policy once it authorized a job: a stored
    // one is only ever replaced by a newer one.
    let Some(p) = policy.current() else {
        return Err(Refusal::PolicyExpired);
    };
    let ctx = AgentContext {
        policy: p,
        name: &inner.agent_id,
        labels: &inner.labels,
        allow: inner.config.allow.as_deref(),
    };
    recheck(cmd, &ctx, now_secs(), stream)
}

async fn handle_job(inner: Arc<Inner>, signed: pb::SignedJob, mut link: LinkRx) {
    let job = SignedJob {
        spec: signed.spec,
        signature: signed.signature,
        key_id: signed.key_id,
    };
    // Only to label the result; nothing in an unverified spec is trusted.
    // A spec that does not parse (a malformed requester, say) is still
    // answered under its id, so the refusal reaches the job it belongs to.
    let job_id = JobSpec::from_bytes(&job.spec)
        .map(|s| s.id.to_string())
        .or_else(|_| JobSpec::id_of_unparsed(&job.spec).ok_or(()))
        .unwrap_or_default();
    let now = now_secs();
    // Refusals of the agent counted before this job was admitted: one
    // after it means the job never starts (`crate::link`).
    let refusals = crate::link::refusals(&link);
    let decision = {
        let policy = lock(&inner.policy);
        match policy.current() {
            None => Err(refused(
                job_id.clone(),
                "no_policy",
                "the agent has no policy yet".into(),
            )),
            Some(p) => {
                let allow = inner.config.allow.as_deref();
                let ctx = AgentContext {
                    policy: p,
                    name: &inner.agent_id,
                    labels: &inner.labels,
                    allow,
                };
                let mut seen = lock(&inner.seen);
                match authorize(&job, &ctx, now, &|id| seen.contains(id.as_str())) {
                    Err(r) => Err(refused(job_id.clone(), r.code(), r.to_string())),
                    // Recorded durably before anything runs: a restart cannot reopen replay.
                    Ok(cmd) => match seen.insert(
                        cmd.job_id().as_str(),
                        cmd.expires_at(),
                        now,
                        p.max_job_lifetime.as_secs(),
                    ) {
                        Ok(()) => {
                            lock(&inner.in_hand)
                                .insert(job_id.clone(), crate::link::generation(&link));
                            Ok(cmd)
                        }
                        Err(e) => Err(refused(
                            job_id.clone(),
                            "state_error",
                            format!("cannot record the job id: {e}"),
                        )),
                    },
                }
            }
        }
    };
    let result = match decision {
        // A redelivered job (e.g. after a controller restart) is answered
        // with the result this agent still holds: at most once per agent.
        // Still in hand here (waiting, running, or its result being
        // made): its result will follow; nothing to answer. `in_hand` is
        // asked before `pending`: `report` fills `pending` before it
        // empties `in_hand`, so a copy always finds one of them.
        Err(r)
            if r.reason_code == "replayed"
                && let Some(by) = lock(&inner.in_hand).get_mut(&job_id) =>
        {
            // Delivered again on the stream up now: a job that waits
            // through a lost connection may start (`settle_delivered`).
            *by = crate::link::generation(&link);
            inner.job_news.notify_waiters();
            tracing::debug!(agent_id = %inner.agent_id, job_id = %job_id, "redelivered job is still in hand");
            return;
        }
        Err(r) if r.reason_code == "replayed" && lock(&inner.pending).contains_key(&job_id) => {
            if let Some(stored) = lock(&inner.pending).get(&job_id).cloned() {
                send(&inner, msg(Out::Result(stored)));
            }
            return;
        }
        Err(r) => {
            tracing::warn!(target: "fleetcmd::security", agent_id = %inner.agent_id, job_id = %job_id, reason = %r.reason, "job refused");
            r
        }
        Ok(admitted) => {
            // Wait for a slot; a cancel meanwhile still reaches the job (it
            // is marked canceled early and ends as soon as it starts). A
            // refusal of the agent or its stopping ends the wait: the job
            // will be refused. A lost stream does not: the job waits for
            // the slot, then for the next welcome (`crate::link`). (The
            // semaphore is closed only at shutdown.)
            let (_slot, waited) = match inner.slots.clone().try_acquire_owned() {
                Ok(slot) => (Some(slot), false),
                Err(_) => {
                    let slot = tokio::select! {
                        slot = inner.slots.clone().acquire_owned() => slot.ok(),
                        () = crate::link::doomed(&mut link, refusals) => None,
                    };
                    (slot, true)
                }
            };
            let until_expiry = Duration::from_secs(
                admitted
                    .expires_at()
                    .saturating_add(CLOCK_SKEW_SECS)
                    .saturating_sub(now_secs())
                    + 1,
            );
            let stream =
                settle_delivered(&inner, &job_id, &mut link, refusals, until_expiry, waited).await;
            // Canceled while it waited: it never starts.
            if lock(&inner.canceled_early).remove(&job_id) {
                tracing::info!(agent_id = %inner.agent_id, job_id = %job_id, "job canceled before it started");
                report(
                    &inner,
                    pb::JobResult {
                        job_id: job_id.clone(),
                        outcome: pb::Outcome::Canceled as i32,
                        reason: "canceled before it started".into(),
                        ..Default::default()
                    },
                );
                return;
            }
            // Everything that authorized the job, again, now.
            let cmd = match check_at_start(&inner, &admitted, &stream) {
                Ok(cmd) => cmd,
                Err(r) => {
                    tracing::warn!(target: "fleetcmd::security", agent_id = %inner.agent_id, job_id = %job_id, reason = %r, "queued job refused at the moment of use");
                    lock(&inner.canceled_early).remove(&job_id);
                    let result = refused(job_id.clone(), r.code(), r.to_string());
                    report(&inner, result);
                    return;
                }
            };
            // The host's own record of what ran, and for whom.
            tracing::info!(agent_id = %inner.agent_id, job_id = %job_id, command = %cmd.spec().command, requester = %cmd.spec().requester, "job starting");
            if let Err(e) = inner.spool.started(&job_id) {
                tracing::error!(agent_id = %inner.agent_id, job_id = %job_id, error = %e, "spooling a start marker");
            }
            send(
                &inner,
                msg(Out::Started(pb::JobStarted {
                    job_id: job_id.clone(),
                })),
            );
            let canceled_early = lock(&inner.canceled_early).remove(&job_id);
            let (cancel_tx, cancel_rx) = watch::channel(canceled_early);
            lock(&inner.running).insert(job_id.clone(), cancel_tx);
            // Live output: chunks go out as they are produced, numbered, on
            // the bounded stream queue (dropped when it is full; the full
            // output still comes with the result).
            let (live_tx, mut live_rx) = mpsc::channel::<crate::exec::LiveChunk>(LIVE_QUEUE);
            let forward = {
                let inner = inner.clone();
                let job_id = job_id.clone();
                tokio::spawn(async move {
                    let mut seq = 0u64;
                    while let Some(c) = live_rx.recv().await {
                        seq += 1;
                        let chunk = pb::OutputChunk {
                            job_id: job_id.clone(),
                            stream: u32::from(c.stream),
                            seq,
                            data: c.data,
                            agent_id: String::new(),
                        };
                        send(&inner, msg(Out::Chunk(chunk)));
                    }
                })
            };
            let limits = ExecLimits {
                max_output: inner.config.max_output_bytes,
                live: Some(crate::exec::LiveSink {
                    tx: live_tx,
                    dropped: Default::default(),
                }),
                ..ExecLimits::default()
            };
            let out = execute(&cmd, &limits, cancel_rx).await;
            drop(limits);
            let _ = forward.await; // chunks before the result
            lock(&inner.running).remove(&job_id);
            let mut r = pb::JobResult {
                job_id: job_id.clone(),
                stdout: out.stdout,
                stderr: out.stderr,
                stdout_dropped: out.stdout_dropped,
                stderr_dropped: out.stderr_dropped,
                duration_ms: out.duration.as_millis() as u64,
                ..Default::default()
            };
            match out.termination {
                Termination::Exited(0) => {
                    r.outcome = pb::Outcome::Ok as i32;
                    r.exit_code = Some(0);
                }
                Termination::Exited(code) => {
                    r.outcome = pb::Outcome::Failed as i32;
                    r.exit_code = Some(code);
                    r.reason = format!("exit status {code}");
                }
                Termination::Signaled(sig) => {
                    r.outcome = pb::Outcome::Failed as i32;
                    r.signal = Some(sig);
                    r.reason = format!("killed by signal {sig}");
                }
                Termination::TimedOut => {
                    r.outcome = pb::Outcome::TimedOut as i32;
                    r.reason = format!(
                        "timed out after {}s; process group killed",
                        cmd.timeout().as_secs()
                    );
                }
                Termination::Canceled => {
                    r.outcome = pb::Outcome::Canceled as i32;
                    r.reason = "canceled".into();
                }
                // Nothing ran: a refusal, audited as one.
                Termination::PathRefused(e) => {
                    r.outcome = pb::Outcome::Refused as i32;
                    r.reason_code = "path_refused".into();
                    r.reason = e;
                }
                Termination::SpawnFailed(e) => {
                    r.outcome = pb::Outcome::Failed as i32;
                    r.reason_code = "spawn_failed".into();
                    r.reason = e;
                }
            }
            r
        }
    };
    report(&inner, result);
}

/// Keeps a result until acknowledged and sends it.
fn report(inner: &Inner, result: pb::JobResult) {
    if result.job_id.is_empty() {
        return; // not even a parseable spec: nothing to report against
    }
    // Durable before it is sent: it survives a restart until acknowledged.
    if let Err(e) = inner.spool.put(&result) {
        tracing::error!(agent_id = %inner.agent_id, job_id = %result.job_id, error = %e, "spooling a result");
    }
    lock(&inner.pending).insert(result.job_id.clone(), result.clone());
    lock(&inner.in_hand).remove(&result.job_id);
    send(inner, msg(Out::Result(result)));
}

/// Sends on the current stream if there is one; results stay in `pending`
/// and are sent again on the next connection otherwise.
fn send(inner: &Inner, m: pb::AgentMessage) {
    if let Some(tx) = lock(&inner.out).as_ref()
        && tx.try_send(m).is_err()
    {
        tracing::debug!(agent_id = %inner.agent_id, "outbound queue full; message will be resent");
    }
}

/// Resolves once the watch turns true (or its sender is gone).
async fn stopped(rx: &mut tokio::sync::watch::Receiver<bool>) {
    let _ = rx.wait_for(|s| *s).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_with_jitter_and_is_capped() {
        for attempt in 0..30 {
            let nominal = (1.6f64.powi(attempt.min(20) as i32)).min(60.0);
            let d = backoff(attempt).as_secs_f64();
            assert!(
                d >= nominal * 0.8 - 1e-9 && d <= nominal * 1.2 + 1e-9,
                "attempt {attempt}: {d} vs {nominal}"
            );
        }
    }
}
