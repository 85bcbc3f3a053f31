//! Starting and stopping the controller: CA, store, TLS, the gRPC services
//! with their interceptors, health, reflection and the deadline sweeper.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use fleetcmd_proto::v1 as pb;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::server::TcpIncoming;
use tonic::transport::{Certificate, Identity, Server, ServerTlsConfig};

use crate::auth::require;
use crate::config::ControllerConfig;
use crate::lease::{Leases, Singleton};
use crate::pki::{Ca, Role};
use crate::service::Svc;
use crate::state::Shared;
use crate::store::Store;
use crate::store::postgres::PostgresStore;

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("{path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error(transparent)]
    Pki(#[from] crate::pki::PkiError),
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
    #[error("{0}")]
    State(#[from] crate::error::ApiError),
    #[error("listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("tls: {0}")]
    Tls(#[from] tonic::transport::Error),
    #[error("reflection: {0}")]
    Reflection(String),
    #[error("audit export {name}: {reason}")]
    Export { name: String, reason: String },
    /// A setting that validated but could not be used at start (a
    /// password file that became unreadable).
    #[error("{0}")]
    Config(String),
}

/// A running controller. Dropping it does not stop it: call `shutdown`.
pub struct RunningController {
    addr: SocketAddr,
    shared: Arc<Shared>,
    stop: watch::Sender<bool>,
    server: Option<JoinHandle<Result<(), tonic::transport::Error>>>,
    sweeper: Option<JoinHandle<()>>,
    /// The singletons' leases; released at shutdown.
    leases: Leases,
    exporters: Vec<JoinHandle<()>>,
    dispatcher: Option<JoinHandle<()>>,
    ingester: Option<JoinHandle<()>>,
    /// The bus connection and the task following it (several controllers).
    bus_tasks: Vec<JoinHandle<()>>,
    metrics_addr: Option<SocketAddr>,
    metrics: Option<JoinHandle<std::io::Result<()>>>,
}

impl std::fmt::Debug for RunningController {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RunningController")
            .field("addr", &self.addr)
            .finish()
    }
}

const AGENT: &[Role] = &[Role::Agent];
const CLIENTS: &[Role] = &[Role::Gateway, Role::Operator];
const OPERATOR: &[Role] = &[Role::Operator];
/// The `Claims` service: only gateways act on chat events and alerts.
const GATEWAY: &[Role] = &[Role::Gateway];
/// The sweeper ticks every second; retention runs once a minute.
const RETENTION_EVERY_TICKS: u64 = 60;
/// Sweeper ticks (seconds) between returns of free heap memory to the OS
/// (`trim_heap`).
const TRIM_EVERY_TICKS: u64 = 30;

/// Returns the free memory of glibc's heaps to the OS. A connection storm
/// (10 000 TLS handshakes) or an ingest burst frees most of what it
/// allocated, but glibc only gives back the top of each heap, so the RSS
/// stayed at the high-water mark of the burst. Walking the heaps takes a
/// few milliseconds; run off the async threads.
fn trim_heap() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim has no preconditions; it only takes glibc's
    // arena locks like malloc does.
    #[allow(unsafe_code)]
    unsafe {
        libc::malloc_trim(0);
    }
}
const ANY: &[Role] = &[Role::Agent, Role::Gateway, Role::Operator];

// Transport limits. The listener faces the network before anyone has
// authenticated (Join needs no certificate), so every resource a peer can
// make the controller hold is capped here; `tests/tests/it/transport.rs`
// attacks each one (rapid reset, CONTINUATION flood, stalled handshakes,
// oversized and malformed messages, idle connections).
//
// - TLS handshake: `ServerTlsConfig::timeout` (10 s, above). tonic runs
//   handshakes concurrently, so a stalled peer costs one socket and one small
//   task until then and does not delay anybody else's handshake.
// - `MAX_CONCURRENT_STREAMS` (256): streams one connection may hold open.
//   An agent uses one, the gateway and the CLI a handful.
// - `CONCURRENCY_PER_CONNECTION` (64): requests one connection may have in
//   a handler (including reading a unary request's body) at once; the rest
//   wait. Bounds what one connection can make us buffer to 64 × the
//   service's decoding limit.
// - `REQUEST_TIMEOUT` (30 s): time for a handler to produce response
//   headers, so a request whose body trickles in (or an agent stream that
//   never says Hello) cannot hold its slot forever. Streams stay open after
//   their headers; every unary call here answers in milliseconds.
// - `MAX_HEADER_LIST_BYTES` (16 KiB, as hyper and gRPC-Go): gRPC metadata is
//   small. Larger header blocks get a 431; h2 also ends the connection
//   (GOAWAY) after a few CONTINUATION frames without END_HEADERS, so a
//   CONTINUATION flood is never buffered.
// - `MAX_PENDING_ACCEPT_RESETS` (20, the h2 default) and
//   `MAX_LOCAL_ERROR_RESETS` (1024): HTTP/2 rapid reset (CVE-2023-44487)
//   and "MadeYouReset" (CVE-2025-8671): a peer that makes us reset more
//   streams than that gets GOAWAY ENHANCE_YOUR_CALM.
// - `MAX_FRAME_BYTES` (64 KiB): largest frame we accept.
// - Dead peers (a host gone, agents behind a NAT that forgot them) are
//   noticed by the kernel: TCP keepalive after 60 s without traffic, probes
//   every 10 s, dropped after 6 unanswered (under 2 minutes). No HTTP/2
//   PINGs from this side: hyper's keepalive polls a timer on every
//   connection wake-up and re-arms it once per interval per connection even
//   when the peer is never pinged (agents send a heartbeat every 10 s), which
//   was 10–30 % of the controller's idle CPU with 10 000 agents (BENCHMARKS,
//   "Fleet scale", round 4). A peer whose kernel answers but whose process
//   hangs keeps its socket and one small task: an agent is `offline` after 3
//   missed heartbeats whatever its connection does, and a stalled watcher
//   only fills its own bounded buffer. Clients ping the controller
//   (`fleetcmd_proto::channel`).
// - Message sizes, per service, checked against the 5-byte gRPC prefix
//   before the body is buffered (`OutOfRange` when over): 64 KiB for Join,
//   health, reflection requests, tokens and agents (small requests, and Join
//   is reachable without a certificate); 256 KiB for jobs (a signed spec is at
//   most `MAX_SPEC_BYTES`, 64 KiB); 2 MiB for policy (a bundle is at most
//   `MAX_BUNDLE_BYTES`, 1 MiB, plus signatures); 4 MiB (tonic's default,
//   and what our clients decode) for the agent stream, whose results carry up
//   to 1 MiB of stdout and 1 MiB of stderr with the default
//   `max_output_bytes`, and for responses that list jobs or agents.
//
// tonic has no global connection limit: a peer that opens many connections
// costs a socket and a small task each (see the per-connection figure in the
// transport tests); put a connection limit in front (firewall, systemd
// socket `MaxConnections`) where that matters.
const MAX_CONCURRENT_STREAMS: u32 = 256;
const CONCURRENCY_PER_CONNECTION: usize = 64;
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
const MAX_HEADER_LIST_BYTES: u32 = 16 * 1024;
const MAX_PENDING_ACCEPT_RESETS: usize = 20;
const MAX_LOCAL_ERROR_RESETS: usize = 1024;
const MAX_FRAME_BYTES: u32 = 64 * 1024;
const TCP_KEEPALIVE: Duration = Duration::from_secs(60);
const TCP_KEEPALIVE_INTERVAL: Duration = Duration::from_secs(10);
const TCP_KEEPALIVE_RETRIES: u32 = 6;
const SMALL_MESSAGE_BYTES: usize = 64 * 1024;
const JOB_MESSAGE_BYTES: usize = 256 * 1024;
const POLICY_MESSAGE_BYTES: usize = 2 * 1024 * 1024;
const MAX_MESSAGE_BYTES: usize = 4 * 1024 * 1024;

pub async fn start(config: ControllerConfig) -> Result<RunningController, StartError> {
    let io = |path: &std::path::Path| {
        let path = path.display().to_string();
        move |source| StartError::Io { path, source }
    };
    std::fs::create_dir_all(&config.data_dir).map_err(io(&config.data_dir))?;
    // The CA key, the database (every job's output) and the audit key are
    // the controller's alone: its directory is 0700 whatever the umask
    // (an outside test read job output from a 0755 data_dir as nobody).
    {
        use std::os::unix::fs::PermissionsExt as _;
        std::fs::set_permissions(&config.data_dir, std::fs::Permissions::from_mode(0o700))
            .map_err(io(&config.data_dir))?;
    }
    let ca = Ca::load_or_create(&config.data_dir.join("pki"))?;
    let store: Arc<dyn Store> = match &config.postgres {
        None => {
            let (embedded, data_dir) = (config.embedded, config.data_dir.clone());
            let cache_bytes = config.store_cache_bytes;
            tokio::task::spawn_blocking(move || embedded.open(&data_dir, cache_bytes))
                .await
                .map_err(|e| crate::error::ApiError::Internal(e.to_string()))??
        }
        Some(pg) => {
            let opts = pg.options().map_err(StartError::Config)?;
            Arc::new(
                tokio::task::spawn_blocking(move || PostgresStore::open(&opts))
                    .await
                    .map_err(|e| crate::error::ApiError::Internal(e.to_string()))??,
            )
        }
    };
    let server_id = ca.issue_server(&config.tls_names)?;
    let tls = ServerTlsConfig::new()
        .identity(Identity::from_pem(
            &server_id.cert_pem,
            server_id.key_pem.expose(),
        ))
        .client_ca_root(Certificate::from_pem(ca.cert_pem()))
        // Join is the one call without a client certificate; the
        // interceptors refuse every other call that lacks one.
        .client_auth_optional(true)
        .timeout(Duration::from_secs(10));
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .map_err(|source| StartError::Bind {
            addr: config.listen,
            source,
        })?;
    let addr = listener.local_addr().map_err(|source| StartError::Bind {
        addr: config.listen,
        source,
    })?;
    // Bound before anything starts, so a taken port fails the start.
    let metrics_listener = match config.metrics_listen {
        Some(addr) => Some(
            tokio::net::TcpListener::bind(addr)
                .await
                .map_err(|source| StartError::Bind { addr, source })?,
        ),
        None => None,
    };
    let (stop, mut stop_sweeper) = watch::channel(false);
    // Several controllers on one database hear each other's changes over
    // the bus (`crate::bus`); with the embedded store there is none.
    let pg_bus = match &config.postgres {
        Some(pg) => Some(crate::bus::postgres::start(
            &pg.options().map_err(StartError::Config)?,
            stop.subscribe(),
        )?),
        None => None,
    };
    let mut shared = Shared::new(store, ca, config)?;
    let mut bus_tasks = Vec::new();
    let mut inbox = None;
    if let Some(b) = pg_bus {
        shared.health.forward_through(b.bus.clone());
        shared.bus = b.bus;
        bus_tasks.push(b.task);
        inbox = Some(b.inbox);
    }
    let shared = Arc::new(shared);
    if let Some(inbox) = inbox {
        let mut stop_follow = stop.subscribe();
        let follower = shared.clone();
        bus_tasks.push(tokio::spawn(async move {
            tokio::select! {
                _ = follower.follow(inbox) => {}
                _ = stopped(&mut stop_follow) => {}
            }
        }));
    }
    let svc = Svc(shared.clone());

    let (health, health_svc) = tonic_health::server::health_reporter();
    health
        .set_serving::<pb::agent_stream_server::AgentStreamServer<Svc>>()
        .await;
    health
        .set_serving::<pb::jobs_server::JobsServer<Svc>>()
        .await;
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(fleetcmd_proto::FILE_DESCRIPTOR_SET)
        .build_v1()
        .map_err(|e| StartError::Reflection(e.to_string()))?;

    let mut stop_server = stop.subscribe();
    let router = Server::builder()
        .tls_config(tls)?
        .max_concurrent_streams(Some(MAX_CONCURRENT_STREAMS))
        .concurrency_limit_per_connection(CONCURRENCY_PER_CONNECTION)
        .timeout(REQUEST_TIMEOUT)
        .http2_max_header_list_size(Some(MAX_HEADER_LIST_BYTES))
        .http2_max_pending_accept_reset_streams(Some(MAX_PENDING_ACCEPT_RESETS))
        .http2_max_local_error_reset_streams(Some(MAX_LOCAL_ERROR_RESETS))
        .max_frame_size(Some(MAX_FRAME_BYTES))
        .layer(crate::metrics::RpcMetricsLayer::new(shared.metrics.clone()))
        .add_service(InterceptedService::new(
            health_svc
                .max_decoding_message_size(SMALL_MESSAGE_BYTES)
                .max_encoding_message_size(SMALL_MESSAGE_BYTES),
            require(shared.clone(), ANY),
        ))
        .add_service(InterceptedService::new(
            reflection
                .max_decoding_message_size(SMALL_MESSAGE_BYTES)
                .max_encoding_message_size(MAX_MESSAGE_BYTES),
            require(shared.clone(), ANY),
        ))
        .add_service(
            pb::enrollment_server::EnrollmentServer::new(svc.clone())
                .max_decoding_message_size(SMALL_MESSAGE_BYTES)
                .max_encoding_message_size(SMALL_MESSAGE_BYTES),
        )
        .add_service(InterceptedService::new(
            pb::agent_stream_server::AgentStreamServer::new(svc.clone())
                .max_decoding_message_size(MAX_MESSAGE_BYTES)
                .max_encoding_message_size(MAX_MESSAGE_BYTES),
            require(shared.clone(), AGENT),
        ))
        .add_service(InterceptedService::new(
            pb::jobs_server::JobsServer::new(svc.clone())
                .max_decoding_message_size(JOB_MESSAGE_BYTES)
                .max_encoding_message_size(MAX_MESSAGE_BYTES),
            require(shared.clone(), CLIENTS),
        ))
        .add_service(InterceptedService::new(
            pb::agents_server::AgentsServer::new(svc.clone())
                .max_decoding_message_size(SMALL_MESSAGE_BYTES)
                .max_encoding_message_size(MAX_MESSAGE_BYTES),
            require(shared.clone(), CLIENTS),
        ))
        .add_service(InterceptedService::new(
            pb::tokens_server::TokensServer::new(svc.clone())
                .max_decoding_message_size(SMALL_MESSAGE_BYTES)
                .max_encoding_message_size(SMALL_MESSAGE_BYTES),
            require(shared.clone(), OPERATOR),
        ))
        .add_service(InterceptedService::new(
            pb::certs_server::CertsServer::new(svc.clone())
                .max_decoding_message_size(SMALL_MESSAGE_BYTES)
                .max_encoding_message_size(MAX_MESSAGE_BYTES),
            require(shared.clone(), OPERATOR),
        ))
        .add_service(InterceptedService::new(
            pb::policy_server::PolicyServer::new(svc)
                .max_decoding_message_size(POLICY_MESSAGE_BYTES)
                .max_encoding_message_size(POLICY_MESSAGE_BYTES),
            require(shared.clone(), ANY),
        ))
        // Search: operators and the gateway; export: operators; report: the
        // gateway (checked in the handlers).
        .add_service(InterceptedService::new(
            pb::audit_server::AuditServer::new(crate::audit::service::AuditSvc(shared.clone()))
                .max_decoding_message_size(SMALL_MESSAGE_BYTES)
                .max_encoding_message_size(MAX_MESSAGE_BYTES),
            require(shared.clone(), CLIENTS),
        ))
        .add_service(InterceptedService::new(
            pb::health_server::HealthServer::new(crate::health::service::HealthSvc(shared.clone()))
                .max_decoding_message_size(SMALL_MESSAGE_BYTES)
                .max_encoding_message_size(MAX_MESSAGE_BYTES),
            require(shared.clone(), CLIENTS),
        ))
        .add_service(InterceptedService::new(
            pb::claims_server::ClaimsServer::new(crate::claims::ClaimsSvc(shared.clone()))
                .max_decoding_message_size(SMALL_MESSAGE_BYTES)
                .max_encoding_message_size(SMALL_MESSAGE_BYTES),
            require(shared.clone(), GATEWAY),
        ));
    let incoming = TcpIncoming::from(listener)
        .with_nodelay(Some(true))
        .with_keepalive(Some(TCP_KEEPALIVE))
        .with_keepalive_interval(Some(TCP_KEEPALIVE_INTERVAL))
        .with_keepalive_retries(Some(TCP_KEEPALIVE_RETRIES));
    let server = tokio::spawn(router.serve_with_incoming_shutdown(incoming, async move {
        let _ = stopped(&mut stop_server).await;
    }));
    // Singletons run only while this controller holds their lease (see
    // `lease`); with one controller it always does.
    let mut leases = Leases::start(
        shared.store.clone(),
        crate::lease::holder_id(),
        crate::lease::LeaseTiming::default(),
    );
    let lead = |s| leases.of(s).clone();
    let (lead_sweep, lead_retention, lead_health, lead_audit) = (
        lead(Singleton::Sweeper),
        lead(Singleton::Retention),
        lead(Singleton::Health),
        lead(Singleton::AuditHeads),
    );
    let sweep_state = shared.clone();
    let me = leases.holder.clone();
    let sweeper = tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        let health_every = sweep_state.config.heartbeat_interval.as_secs().clamp(1, 5);
        let mut retention_ticks = 0u64;
        loop {
            tokio::select! {
                _ = tick.tick() => {
                    if lead_sweep.is_leader()
                        && let Err(e) = sweep_state.sweep().await
                    {
                        tracing::error!(error = %e, "sweeping overdue jobs");
                    }
                    // Every controller (not a singleton): which agents
                    // it has, and which the others have (`state::presence`).
                    if sweep_state.bus.is_shared()
                        && retention_ticks.is_multiple_of(crate::state::presence::INTERVAL.as_secs())
                    {
                        let (s, me) = (sweep_state.clone(), me.clone());
                        match tokio::task::spawn_blocking(move || s.presence_tick(&me)).await {
                            Ok(Err(e)) => tracing::warn!(error = %e, "presence"),
                            Err(e) => tracing::warn!(error = %e, "presence"),
                            Ok(Ok(())) => {}
                        }
                    }
                    if let Some(fence) = lead_audit.fence()
                        && let Err(e) = sweep_state.audit.tick(&fence).await
                    {
                        tracing::error!(error = %e, "signing the audit chain head");
                    }
                    // Services are evaluated about once per heartbeat
                    // interval (at most every 5 s), when there are any.
                    if !sweep_state.health.is_empty()
                        && retention_ticks.is_multiple_of(health_every)
                    {
                        // The holder judges; the others show what it
                        // stored (with several controllers).
                        let (s, judge) = (sweep_state.clone(), lead_health.is_leader());
                        let tick = move || if judge { s.health_tick() } else { s.health_follow() };
                        match tokio::task::spawn_blocking(tick).await {
                            Ok(Err(e)) => tracing::error!(error = %e, "evaluating services"),
                            Err(e) => tracing::error!(error = %e, "evaluating services"),
                            Ok(Ok(())) => {}
                        }
                    }
                    if retention_ticks.is_multiple_of(TRIM_EVERY_TICKS) {
                        let _ = tokio::task::spawn_blocking(trim_heap).await;
                    }
                    retention_ticks += 1;
                    if retention_ticks.is_multiple_of(RETENTION_EVERY_TICKS)
                        && lead_retention.is_leader()
                    {
                        if let Err(e) = sweep_state.enforce_retention().await {
                            tracing::error!(error = %e, "enforcing job retention");
                        }
                        if let Err(e) = prune_audit(&sweep_state).await {
                            tracing::error!(error = %e, "enforcing audit retention");
                        }
                    }
                }
                _ = stopped(&mut stop_sweeper) => break,
            }
        }
    });
    let mut exporters = Vec::new();
    for cfg in &shared.config.audit_export {
        // Each exporter under a lease of its own: with several controllers
        // configured alike, one exports and the next resumes after it.
        let lead = leases.keep_named(crate::audit::export::lease_name(&cfg.name));
        let exporter = crate::audit::export::Exporter::new(
            cfg,
            shared.audit.clone(),
            shared.store.clone(),
            lead,
        )
        .map_err(|reason| StartError::Export {
            name: cfg.name.clone(),
            reason,
        })?;
        exporters.push(tokio::spawn(exporter.run(stop.subscribe())));
    }
    // Jobs are dispatched off the request path (Submit answers once the job
    // is durable); see `Shared::dispatcher`.
    let queue = shared
        .take_dispatch_queue()
        .expect("a new Shared has its dispatch queue");
    let dispatcher = until_stopped(shared.clone().dispatcher(queue), &stop);
    // Agents' results, with several controllers, are stored in batches
    // (see `state::ingest`).
    let results = shared
        .take_result_queue()
        .expect("a new Shared has its result queue");
    let ingester = until_stopped(shared.clone().ingester(results), &stop);
    // `/metrics` on its own listener and task: scrapes never share the gRPC
    // server's connections or limits.
    let mut metrics_addr = None;
    let mut metrics = None;
    if let Some(listener) = metrics_listener {
        let local = listener.local_addr().map_err(|source| StartError::Bind {
            addr: shared.config.metrics_listen.unwrap_or(addr),
            source,
        })?;
        let mut stop_metrics = stop.subscribe();
        let app = metrics_app(
            shared.clone(),
            ScrapeIdentity {
                id: leases.holder.clone(),
                address: addr.to_string(),
                leases: Singleton::ALL
                    .iter()
                    .map(|s| (*s, leases.of(*s).clone()))
                    .collect(),
            },
        );
        metrics = Some(tokio::spawn(async move {
            axum::serve(listener, app)
                .with_graceful_shutdown(async move { stopped(&mut stop_metrics).await })
                .await
        }));
        metrics_addr = Some(local);
        tracing::info!(addr = %local, "metrics listening (GET /metrics)");
    }
    tracing::info!(%addr, "controller listening");
    Ok(RunningController {
        metrics_addr,
        metrics,
        addr,
        shared,
        stop,
        server: Some(server),
        sweeper: Some(sweeper),
        leases,
        exporters,
        dispatcher: Some(dispatcher),
        ingester: Some(ingester),
        bus_tasks,
    })
}

impl RunningController {
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Where `/metrics` is served (`metrics_listen`), if anywhere.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics_addr
    }

    /// The controller's state, for in-process use (`fleetcmd dev`, tests).
    pub fn shared(&self) -> &Arc<Shared> {
        &self.shared
    }

    /// Stops accepting calls, waits for the server to end, flushes the store.
    pub async fn shutdown(mut self) -> Result<(), StartError> {
        self.stop().await
    }

    /// `shutdown` in place (the value is spent afterwards; a restart makes a
    /// new one with `start`).
    pub async fn stop(&mut self) -> Result<(), StartError> {
        let _ = self.stop.send(true);
        // End the agents' long-lived streams, or the graceful shutdown would
        // wait for them; the agents reconnect with backoff.
        self.shared.registry.disconnect_all();
        self.shared.health.close();
        if let Some(sweeper) = self.sweeper.take() {
            let _ = sweeper.await;
        }
        for task in [self.dispatcher.take(), self.ingester.take()]
            .into_iter()
            .flatten()
        {
            let _ = task.await;
        }
        for task in self.bus_tasks.drain(..) {
            let _ = task.await;
        }
        if let Some(server) = self.server.take() {
            match tokio::time::timeout(Duration::from_secs(10), server).await {
                Ok(Ok(res)) => res?,
                Ok(Err(e)) => tracing::error!(error = %e, "controller server task"),
                Err(_) => tracing::warn!("controller server did not stop within 10 s"),
            }
        }
        if let Some(m) = self.metrics.take() {
            match tokio::time::timeout(Duration::from_secs(5), m).await {
                Ok(Ok(Ok(()))) => {}
                Ok(Ok(Err(e))) => tracing::error!(error = %e, "metrics listener"),
                Ok(Err(e)) => tracing::error!(error = %e, "metrics listener task"),
                Err(_) => tracing::warn!("metrics listener did not stop within 5 s"),
            }
        }
        // The last signed head covers everything recorded up to shutdown
        // (by the holder of the audit-heads lease — taken now if nobody
        // holds it yet, as after a stop right after start; then every lease
        // is released, so another controller takes over at once).
        if let Some(fence) = self.leases.fence_now(Singleton::AuditHeads).await
            && let Err(e) = self.shared.audit.sign_head_fenced(&fence)
        {
            tracing::error!(error = %e, "signing the audit chain head at shutdown");
        }
        // Exporters finish the batch in hand (storing its cursor under their
        // lease, so before the leases are released); the rest goes after a
        // restart, or to the controller that takes the lease. One stuck on
        // a slow sink is aborted: its batch was not acknowledged, so it is
        // sent again.
        for mut e in self.exporters.drain(..) {
            if tokio::time::timeout(Duration::from_secs(15), &mut e)
                .await
                .is_err()
            {
                tracing::warn!("an audit exporter did not stop within 15 s; aborting it");
                e.abort();
            }
        }
        self.leases.stop().await;
        let store = self.shared.store.clone();
        tokio::task::spawn_blocking(move || {
            let flushed = store.flush();
            store.close();
            flushed
        })
        .await
        .map_err(|e| crate::error::ApiError::Internal(e.to_string()))??;
        Ok(())
    }
}

/// Audit records pruned per retention pass.
const AUDIT_PRUNE_BATCH: usize = 10_000;

/// Audit retention: removes records older than `audit_retention` that every
/// exporter has already sent.
async fn prune_audit(shared: &Arc<Shared>) -> Result<u64, StartError> {
    let Some(retention) = shared.config.audit_retention else {
        return Ok(0);
    };
    let before_ms = crate::audit::now_ms()
        .saturating_sub(u64::try_from(retention.as_millis()).unwrap_or(u64::MAX));
    let dir = crate::audit::export::Exporter::cursor_dir(&shared.audit);
    let mut max_seq = u64::MAX;
    for e in &shared.config.audit_export {
        let (store, dir, name) = (shared.store.clone(), dir.clone(), e.name.clone());
        let c = tokio::task::spawn_blocking(move || {
            crate::audit::export::cursor_of(store.as_ref(), &dir, &name)
        })
        .await
        .map_err(|e| crate::error::ApiError::Internal(e.to_string()))?
        .map_err(|reason| StartError::Export {
            name: e.name.clone(),
            reason,
        })?;
        max_seq = max_seq.min(c.records);
    }
    let audit = shared.audit.clone();
    let removed =
        tokio::task::spawn_blocking(move || audit.prune(before_ms, max_seq, AUDIT_PRUNE_BATCH))
            .await
            .map_err(|e| crate::error::ApiError::Internal(e.to_string()))??;
    Ok(removed)
}

/// Resolves once the watch turns true (or its sender is gone).
async fn stopped(rx: &mut tokio::sync::watch::Receiver<bool>) {
    let _ = rx.wait_for(|s| *s).await;
}

/// Who answers a scrape: what `fleetcmd_controller_info` and the lease
/// gauges say.
struct ScrapeIdentity {
    id: String,
    address: String,
    leases: Vec<(Singleton, crate::lease::Leadership)>,
}

/// How long a scrape waits for the store (probe, agents, services) before
/// it answers without the fleet gauges and with `fleetcmd_store_up 0`: a
/// database that is away must not take `/metrics` with it.
const SCRAPE_STORE_WAIT: Duration = Duration::from_secs(2);

/// `GET /metrics`. One scrape is rendered at a time (each is one blocking
/// task: a copy of the registry, then text for every host); others wait.
fn metrics_app(shared: Arc<Shared>, me: ScrapeIdentity) -> axum::Router {
    let gate = Arc::new(tokio::sync::Semaphore::new(1));
    let me = Arc::new(me);
    let store_busy = Arc::new(std::sync::atomic::AtomicBool::new(false));
    axum::Router::new().route(
        "/metrics",
        axum::routing::get(move || {
            scrape(shared.clone(), me.clone(), gate.clone(), store_busy.clone())
        }),
    )
}

/// What a scrape reads from the store, after one probe (a lease read: one
/// round trip, no table scan) whose latency or failure is recorded.
fn read_store(shared: &Shared) -> Option<(Vec<pb::Agent>, Vec<pb::Service>)> {
    let started = std::time::Instant::now();
    let probe = shared.store.lease_holder(Singleton::Sweeper.lease_name());
    shared
        .metrics
        .store_probe(probe.as_ref().map(|_| started.elapsed()).map_err(|_| ()));
    let read = probe.map_err(crate::error::ApiError::from).and_then(|_| {
        Ok((
            shared.registry.list_agents("")?,
            shared.health.services("", 0)?,
        ))
    });
    match read {
        Ok(r) => Some(r),
        Err(e) => {
            tracing::warn!(error = %e, "metrics scrape: reading the store");
            None
        }
    }
}

async fn scrape(
    shared: Arc<Shared>,
    me: Arc<ScrapeIdentity>,
    gate: Arc<tokio::sync::Semaphore>,
    store_busy: Arc<std::sync::atomic::AtomicBool>,
) -> axum::response::Response {
    use axum::response::IntoResponse;
    use std::sync::atomic::Ordering;
    let _permit = gate.acquire_owned().await;
    // The store is read on the blocking pool with a deadline; a read that
    // outlives it keeps `store_busy` set, so a hung database holds one
    // blocking thread, not one per scrape.
    let fleet = if store_busy.swap(true, Ordering::AcqRel) {
        shared.metrics.store_probe(Err(()));
        None
    } else {
        let (s, busy) = (shared.clone(), store_busy.clone());
        let read = tokio::task::spawn_blocking(move || {
            let r = read_store(&s);
            busy.store(false, Ordering::Release);
            r
        });
        match tokio::time::timeout(SCRAPE_STORE_WAIT, read).await {
            Ok(Ok(r)) => r,
            Ok(Err(e)) => {
                tracing::error!(error = %e, "metrics scrape: the store read task");
                None
            }
            Err(_) => {
                tracing::warn!(
                    "metrics scrape: the store did not answer within {SCRAPE_STORE_WAIT:?}"
                );
                shared.metrics.store_probe(Err(()));
                None
            }
        }
    };
    let controller = crate::controller_metrics::ControllerSnapshot {
        id: me.id.clone(),
        address: me.address.clone(),
        store: if shared.config.postgres.is_some() {
            "postgres"
        } else {
            shared.config.embedded.name()
        },
        leases: me
            .leases
            .iter()
            .map(|(s, l)| crate::controller_metrics::LeaseState {
                name: s.lease_name(),
                term: l.fence().map(|f| f.term),
            })
            .collect(),
        store_up: fleet.is_some(),
    };
    // Rendering 10 000 hosts takes milliseconds: off the async workers.
    let rendered = tokio::task::spawn_blocking(move || {
        let store_read = fleet.is_some();
        let (agents, services) = fleet.unwrap_or_default();
        shared.metrics.render(crate::metrics::FleetSnapshot {
            controller,
            agents,
            services,
            now_ms: crate::audit::now_ms(),
            fleet_unread: !store_read,
        })
    })
    .await;
    match rendered {
        Ok(text) => (
            [(
                axum::http::header::CONTENT_TYPE,
                crate::metrics::CONTENT_TYPE,
            )],
            text,
        )
            .into_response(),
        Err(e) => {
            tracing::error!(error = %e, "metrics scrape task");
            axum::http::StatusCode::INTERNAL_SERVER_ERROR.into_response()
        }
    }
}

/// Spawns `task`, ended when `stop` turns true.
fn until_stopped(
    task: impl std::future::Future<Output = ()> + Send + 'static,
    stop: &watch::Sender<bool>,
) -> JoinHandle<()> {
    let mut stop = stop.subscribe();
    tokio::spawn(async move {
        tokio::select! {
            () = task => {}
            _ = stopped(&mut stop) => {}
        }
    })
}
