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
use crate::pki::{Ca, Role};
use crate::service::Svc;
use crate::state::Shared;
use crate::store::SledStore;

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
}

/// A running controller. Dropping it does not stop it: call `shutdown`.
pub struct RunningController {
    addr: SocketAddr,
    shared: Arc<Shared>,
    stop: watch::Sender<bool>,
    server: JoinHandle<Result<(), tonic::transport::Error>>,
    sweeper: JoinHandle<()>,
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
const ANY: &[Role] = &[Role::Agent, Role::Gateway, Role::Operator];

pub async fn start(config: ControllerConfig) -> Result<RunningController, StartError> {
    let io = |path: &std::path::Path| {
        let path = path.display().to_string();
        move |source| StartError::Io { path, source }
    };
    std::fs::create_dir_all(&config.data_dir).map_err(io(&config.data_dir))?;
    let ca = Ca::load_or_create(&config.data_dir.join("pki"))?;
    let db_path = config.data_dir.join("db");
    let store = tokio::task::spawn_blocking(move || SledStore::open(&db_path))
        .await
        .map_err(|e| crate::error::ApiError::Internal(e.to_string()))??;
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
    let shared = Arc::new(Shared::new(Arc::new(store), ca, config)?);
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

    let (stop, mut stop_sweeper) = watch::channel(false);
    let mut stop_server = stop.subscribe();
    let router = Server::builder()
        .tls_config(tls)?
        .max_concurrent_streams(Some(256))
        .http2_keepalive_interval(Some(Duration::from_secs(30)))
        .http2_keepalive_timeout(Some(Duration::from_secs(10)))
        .http2_max_pending_accept_reset_streams(Some(64))
        .max_frame_size(Some(64 * 1024))
        .add_service(health_svc)
        .add_service(InterceptedService::new(
            reflection,
            require(shared.clone(), ANY),
        ))
        .add_service(pb::enrollment_server::EnrollmentServer::new(svc.clone()))
        .add_service(
            pb::agent_stream_server::AgentStreamServer::with_interceptor(
                svc.clone(),
                require(shared.clone(), AGENT),
            ),
        )
        .add_service(pb::jobs_server::JobsServer::with_interceptor(
            svc.clone(),
            require(shared.clone(), CLIENTS),
        ))
        .add_service(pb::agents_server::AgentsServer::with_interceptor(
            svc.clone(),
            require(shared.clone(), CLIENTS),
        ))
        .add_service(pb::tokens_server::TokensServer::with_interceptor(
            svc.clone(),
            require(shared.clone(), OPERATOR),
        ))
        .add_service(pb::policy_server::PolicyServer::with_interceptor(
            svc,
            require(shared.clone(), ANY),
        ));
    let incoming = TcpIncoming::from(listener).with_nodelay(Some(true));
    let server = tokio::spawn(router.serve_with_incoming_shutdown(incoming, async move {
        let _ = stopped(&mut stop_server).await;
    }));
    let sweep_state = shared.clone();
    let sweeper = tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        loop {
            tokio::select! {
                _ = tick.tick() => {
                    if let Err(e) = sweep_state.sweep().await {
                        tracing::error!(error = %e, "sweeping overdue jobs");
                    }
                }
                _ = stopped(&mut stop_sweeper) => break,
            }
        }
    });
    tracing::info!(%addr, "controller listening");
    Ok(RunningController {
        addr,
        shared,
        stop,
        server,
        sweeper,
    })
}

impl RunningController {
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The controller's state, for in-process use (`fleetcmd dev`, tests).
    pub fn shared(&self) -> &Arc<Shared> {
        &self.shared
    }

    /// Stops accepting calls, waits for the server to end, flushes the store.
    pub async fn shutdown(self) -> Result<(), StartError> {
        let _ = self.stop.send(true);
        let _ = self.sweeper.await;
        match tokio::time::timeout(Duration::from_secs(10), self.server).await {
            Ok(Ok(res)) => res?,
            Ok(Err(e)) => tracing::error!(error = %e, "controller server task"),
            Err(_) => tracing::warn!("controller server did not stop within 10 s"),
        }
        let store = self.shared.store.clone();
        tokio::task::spawn_blocking(move || store.flush())
            .await
            .map_err(|e| crate::error::ApiError::Internal(e.to_string()))??;
        Ok(())
    }
}

/// Resolves once the watch turns true (or its sender is gone).
async fn stopped(rx: &mut tokio::sync::watch::Receiver<bool>) {
    let _ = rx.wait_for(|s| *s).await;
}
