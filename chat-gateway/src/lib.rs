//! The fleetcmd chat gateway: reads commands from chat through an adapter
//! (see [`adapters`]), checks them against the signed policy, signs the
//! resulting jobs with the gateway's Ed25519 key, submits them to the
//! controller over mTLS gRPC and posts the results back, rendered so that
//! command output stays data (ARCHITECTURE.md invariants 4 and 11).
//!
//! The gateway never trusts the controller's policy blindly: every bundle
//! is verified against the configured root keys before it is used, and an
//! invalid or rolled-back bundle is refused (the last good one is kept).

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use fleetcmd_core::crypto::{PublicKey, SigningKey};
use fleetcmd_core::job::DEFAULT_EXPIRY_SECS;
use fleetcmd_proto::channel::{ChannelError, ClientTls};
use tokio::task::JoinSet;

pub mod adapters;
pub mod alertmanager;
pub mod alerts;
pub mod approvals;
pub mod audit_feed;
pub mod backoff;
pub mod body;
pub mod claims;
pub mod cli_args;
pub mod config;
pub mod controller;
pub mod http;
pub mod http_client;
pub mod integrations;
pub mod launch;
pub mod notify;
pub mod oncall;
pub mod owed;
pub mod plugins;
pub mod prometheus;
pub mod registry;
pub mod render;
pub mod resume;
pub mod router;
pub mod secret;
pub mod standby;
pub mod store;

use adapters::{AuthFailure, AuthFailures, ChatAdapter};
use controller::{ControllerApi, GrpcController};
use fleetcmd_core::ratelimit::WindowLimiter;
use router::{Router, RouterConfig};

/// Default lifetime of a signed job spec.
pub const DEFAULT_JOB_EXPIRY: Duration = Duration::from_secs(DEFAULT_EXPIRY_SECS);
/// Default lifetime of an approval request (15 minutes).
pub const DEFAULT_APPROVAL_WINDOW: Duration =
    Duration::from_secs(fleetcmd_core::approval::DEFAULT_APPROVAL_WINDOW_SECS);
/// Default interval between two polls of a running job.
pub const DEFAULT_POLL_INTERVAL: Duration = Duration::from_millis(100);
/// `run` commands handled at once per adapter; over it, a new one is
/// refused with a reply (reading goes on, so `cancel` still works).
pub const MAX_IN_FLIGHT: usize = 64;
/// `run` commands one user (chat identity) may have running at once per
/// adapter; over it, they are told how many they have running.
pub const MAX_RUNS_PER_USER: usize = 4;
/// Quick commands (everything but `run`) handled at once per adapter; when
/// reached, the gateway waits for one to finish before reading on.
pub const MAX_QUICK_IN_FLIGHT: usize = 16;

/// Everything the gateway runtime needs.
#[derive(Clone, Debug)]
pub struct GatewayOptions {
    pub controller_url: String,
    pub tls: ClientTls,
    pub signing_key: Arc<SigningKey>,
    /// The id of `signing_key` in the policy's `[[signers]]`.
    pub signer_id: String,
    pub policy_roots: Vec<PublicKey>,
    pub policy_threshold: usize,
    pub bot_name: String,
    /// Lifetime of signed jobs (default [`DEFAULT_JOB_EXPIRY`]).
    pub job_expiry: Duration,
    /// Poll interval while following a job (default [`DEFAULT_POLL_INTERVAL`]).
    pub poll_interval: Duration,
    /// How long an approval request waits (default [`DEFAULT_APPROVAL_WINDOW`]).
    pub approval_window: Duration,
}

impl GatewayOptions {
    /// The router part of the options.
    pub fn router_config(&self) -> RouterConfig {
        RouterConfig {
            signing_key: self.signing_key.clone(),
            signer_id: self.signer_id.clone(),
            policy_roots: self.policy_roots.clone(),
            policy_threshold: self.policy_threshold,
            bot_name: self.bot_name.clone(),
            job_expiry: self.job_expiry,
            poll_interval: self.poll_interval,
            approval_window: self.approval_window,
        }
    }
}

/// Why the gateway could not run.
#[derive(thiserror::Error, Debug)]
pub enum GatewayError {
    #[error(transparent)]
    Controller(#[from] ChannelError),
}

/// Several adapters served by one router (one gateway process can speak
/// Slack, IRC and the console at once), plus the HTTP routes of the
/// webhook-based ones on one listener.
pub struct Gateway<C: ControllerApi> {
    router: Arc<Router<C>>,
    tasks: JoinSet<()>,
    routes: axum::Router,
    has_routes: bool,
    auth_failures: AuthFailures,
    auth_rx: Option<tokio::sync::mpsc::Receiver<AuthFailure>>,
    /// Background work that lives as long as the adapters (audit channel).
    background: JoinSet<()>,
}

/// Queued auth-failure reports before the newest are dropped.
pub const AUTH_FAILURE_QUEUE: usize = 256;
/// Audit records of refused chat requests per adapter, source and minute.
pub const AUTH_FAILURES_RECORDED_PER_MINUTE: u32 = 10;

impl<C: ControllerApi> std::fmt::Debug for Gateway<C> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gateway")
            .field("adapters", &self.tasks.len())
            .field("has_routes", &self.has_routes)
            .finish()
    }
}

impl<C: ControllerApi> Gateway<C> {
    pub fn new(router: Arc<Router<C>>) -> Gateway<C> {
        let (auth_failures, auth_rx) = AuthFailures::channel(AUTH_FAILURE_QUEUE);
        Gateway {
            router,
            tasks: JoinSet::new(),
            routes: axum::Router::new(),
            has_routes: false,
            auth_failures,
            auth_rx: Some(auth_rx),
            background: JoinSet::new(),
        }
    }

    /// Runs `task` alongside the adapters; it is stopped when they end.
    pub fn spawn_background(&mut self, task: impl Future<Output = ()> + Send + 'static) {
        self.background.spawn(task);
    }

    /// The reporter adapters use for requests they refuse; reports become
    /// `auth_failed` audit records (at most
    /// [`AUTH_FAILURES_RECORDED_PER_MINUTE`] per adapter and source, the
    /// rest counted).
    pub fn auth_failures(&self) -> AuthFailures {
        self.auth_failures.clone()
    }

    /// The shared router.
    pub fn router(&self) -> &Arc<Router<C>> {
        &self.router
    }

    /// Starts serving `adapter` (its own task; the router is shared).
    pub fn add(&mut self, adapter: impl ChatAdapter) {
        self.tasks.spawn(serve(self.router.clone(), adapter));
    }

    /// Mounts an adapter's webhook routes on the gateway's HTTP listener.
    pub fn add_routes(&mut self, routes: axum::Router) {
        self.routes = std::mem::take(&mut self.routes).merge(routes);
        self.has_routes = true;
    }

    /// Whether any adapter needs the HTTP listener.
    pub fn needs_http(&self) -> bool {
        self.has_routes
    }

    /// Serves until every adapter's input has ended (the HTTP listener, if
    /// given, is stopped then).
    pub async fn run(mut self, http: Option<tokio::net::TcpListener>) -> std::io::Result<()> {
        let reporter = self.auth_rx.take().map(|mut rx| {
            let router = self.router.clone();
            tokio::spawn(async move {
                let mut limiter =
                    WindowLimiter::new(AUTH_FAILURES_RECORDED_PER_MINUTE, 60_000, 10_000);
                while let Some(f) = rx.recv().await {
                    let now = std::time::SystemTime::now()
                        .duration_since(std::time::UNIX_EPOCH)
                        .map(|d| d.as_millis() as u64)
                        .unwrap_or(0);
                    let key = (f.adapter.clone(), f.source.clone());
                    if let Some(suppressed) = limiter.admit(key, now) {
                        router.report_auth_failure(&f, suppressed).await;
                    }
                }
            })
        });
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let server = http.map(|listener| {
            tokio::spawn(http::serve(listener, self.routes, async move {
                let _ = stop_rx.await;
            }))
        });
        while let Some(done) = self.tasks.join_next().await {
            log_task_end(done);
        }
        let _ = stop_tx.send(());
        self.background.abort_all();
        if let Some(r) = reporter {
            r.abort();
        }
        match server {
            Some(s) => s.await.map_err(std::io::Error::other)?,
            None => Ok(()),
        }
    }
}

/// Unix seconds now (signature windows, approval and button expiry).
pub fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Runs the gateway on `adapter` against the controller at
/// `opts.controller_url` until the adapter's input ends, then waits for
/// every command still running (including followed jobs) and returns.
pub async fn run(opts: GatewayOptions, adapter: impl ChatAdapter) -> Result<(), GatewayError> {
    // Lazy: an unreachable controller is reported per command, not fatal.
    let ctl = GrpcController::connect_lazy(&opts.controller_url, &opts.tls)?;
    serve(Arc::new(Router::new(opts.router_config(), ctl)), adapter).await;
    Ok(())
}

/// The gateway loop over any controller: each addressed message is handled
/// in its own task, so several commands (and running jobs) proceed at once.
/// Returns when the input has ended and every task has finished.
///
/// `run` commands (which follow a job, and may wait for approvals) are
/// limited per user ([`MAX_RUNS_PER_USER`]) and per adapter
/// ([`MAX_IN_FLIGHT`]); over either, the user is told so at once and the
/// command is not run. Everything else (`cancel`, `job`, `approve`, …) is
/// quick and has its own slots ([`MAX_QUICK_IN_FLIGHT`]), so a flood of
/// long commands never keeps anyone from cancelling one.
pub async fn serve<C: ControllerApi>(router: Arc<Router<C>>, mut adapter: impl ChatAdapter) {
    let sender = adapter.sender();
    let mut runs: JoinSet<()> = JoinSet::new();
    let per_user = RunsPerUser::default();
    let mut quick: JoinSet<()> = JoinSet::new();
    let mut busy_replies: JoinSet<()> = JoinSet::new();
    let mut busy_dropped: u64 = 0;
    while let Some(msg) = adapter.recv().await {
        while let Some(done) = runs.try_join_next() {
            log_task_end(done);
        }
        while let Some(done) = quick.try_join_next() {
            log_task_end(done);
        }
        while let Some(done) = busy_replies.try_join_next() {
            log_task_end(done);
        }
        let Some(text) = router.command_text(&msg) else {
            continue;
        };
        // Registered commands may submit and follow a job as the caller,
        // so they are limited like `run`.
        let is_run = matches!(
            fleetcmd_core::grammar::parse(text),
            Ok(fleetcmd_core::grammar::ChatCommand::Run(_))
        ) || router.is_registered_command(text);
        if !is_run {
            // Quick commands wait for a quick slot (backpressure), never
            // for a running job.
            if quick.len() >= MAX_QUICK_IN_FLIGHT
                && let Some(done) = quick.join_next().await
            {
                log_task_end(done);
            }
            let router = router.clone();
            let sender = sender.clone();
            quick.spawn(async move { router.handle(msg, sender.as_ref()).await });
            continue;
        }
        let who = msg.identity.as_str().to_string();
        let mine = per_user.running(&who);
        let refusal = if mine >= MAX_RUNS_PER_USER {
            Some(format!(
                "you have {mine} commands running (at most {MAX_RUNS_PER_USER} at once); wait for one to finish or cancel one"
            ))
        } else if runs.len() >= MAX_IN_FLIGHT {
            Some(format!(
                "the gateway is running {} commands on this chat (its limit); try again when one has finished",
                runs.len()
            ))
        } else {
            None
        };
        if let Some(text) = refusal {
            tracing::warn!(identity = %who, channel = %msg.channel, mine, total = runs.len(), "command refused: too many running");
            if busy_replies.len() >= MAX_QUICK_IN_FLIGHT {
                busy_dropped += 1;
                tracing::warn!(busy_dropped, "busy reply not sent: too many pending");
                continue;
            }
            let sender = sender.clone();
            busy_replies.spawn(async move {
                let mut reply =
                    adapters::Reply::text(format!("{text} (asked by {})", msg.identity.as_str()));
                reply.thread = msg.thread.clone();
                if let Err(e) = sender.send(&msg.channel, reply).await {
                    tracing::warn!(error = %e, channel = %msg.channel, "reply not sent");
                }
            });
            continue;
        }
        let slot = per_user.take(who);
        let router = router.clone();
        let sender = sender.clone();
        runs.spawn(async move {
            let _slot = slot;
            router.handle(msg, sender.as_ref()).await;
        });
    }
    tracing::debug!(
        outstanding = runs.len() + quick.len(),
        "input ended; waiting for running commands"
    );
    while let Some(done) = runs.join_next().await {
        log_task_end(done);
    }
    while let Some(done) = quick.join_next().await {
        log_task_end(done);
    }
    while let Some(done) = busy_replies.join_next().await {
        log_task_end(done);
    }
}

/// `run` commands running per user on one adapter.
#[derive(Default, Clone)]
struct RunsPerUser(Arc<std::sync::Mutex<std::collections::HashMap<String, usize>>>);

/// One running command's slot; given back when dropped (also when the
/// task panics or is aborted).
struct RunSlot {
    of: RunsPerUser,
    who: String,
}

impl RunsPerUser {
    fn lock(&self) -> std::sync::MutexGuard<'_, std::collections::HashMap<String, usize>> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn running(&self, who: &str) -> usize {
        self.lock().get(who).copied().unwrap_or(0)
    }

    fn take(&self, who: String) -> RunSlot {
        *self.lock().entry(who.clone()).or_default() += 1;
        RunSlot {
            of: self.clone(),
            who,
        }
    }
}

impl Drop for RunSlot {
    fn drop(&mut self) {
        let mut map = self.of.lock();
        if let Some(n) = map.get_mut(&self.who) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                map.remove(&self.who);
            }
        }
    }
}

fn log_task_end(r: Result<(), tokio::task::JoinError>) {
    if let Err(e) = r {
        tracing::error!(error = %e, "command task failed");
    }
}
