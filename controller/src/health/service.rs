//! The `Health` gRPC service: service states (chat `health`, `fleetcmd
//! health`), the alert stream the gateway turns into chat messages and
//! pages, and silences (audited).

use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use fleetcmd_core::audit::{Event, EventKind};
use fleetcmd_proto::v1 as pb;
use tokio::sync::broadcast::error::RecvError;
use tokio::sync::mpsc;
use tokio_stream::Stream;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use crate::audit::{now_ms, peer_actor};
use crate::auth::admitted;
use crate::error::ApiError;
use crate::pki::Role;
use crate::state::Shared;

/// Longest silence: a forgotten silence should not hide an outage for ever.
const MAX_SILENCE: Duration = Duration::from_secs(30 * 86400);
/// History entries a caller may ask for per service.
const MAX_HISTORY: u32 = 100;

#[derive(Clone)]
pub struct HealthSvc(pub Arc<Shared>);

type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send + 'static>>;

fn blocking_err(e: tokio::task::JoinError) -> ApiError {
    ApiError::Internal(format!("health task: {e}"))
}

#[tonic::async_trait]
impl pb::health_server::Health for HealthSvc {
    async fn services(
        &self,
        req: Request<pb::ServicesRequest>,
    ) -> Result<Response<pb::ServicesResponse>, Status> {
        let req = req.into_inner();
        let shared = self.0.clone();
        let name = req.name.clone();
        let services = tokio::task::spawn_blocking(move || {
            // While agents reconnect after a start, show the instances as
            // they are now rather than as of the last tick.
            if shared.registry.settling() {
                shared.health.refresh(&shared.health_agents()?);
            }
            shared
                .health
                .services(&name, req.history.min(MAX_HISTORY))
                .map_err(ApiError::from)
        })
        .await
        .map_err(blocking_err)??;
        if !req.name.is_empty() && services.is_empty() {
            return Err(ApiError::NotFound(format!(
                "no service named {:?}; configured: {}",
                req.name,
                known(&self.0)
            ))
            .into());
        }
        Ok(Response::new(pb::ServicesResponse { services }))
    }

    type WatchStream = BoxStream<pb::AlertEvent>;

    async fn watch(
        &self,
        req: Request<pb::HealthWatchRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        let peer = admitted(&req)?;
        let health = self.0.health.clone();
        // Subscribe before the snapshot so nothing falls between them.
        let mut rx = health.subscribe();
        let (tx, out) = mpsc::channel(64);
        let closed = health.closed();
        tokio::spawn(async move {
            tokio::pin!(closed);
            let mut pending = health.snapshot(now_ms());
            loop {
                for ev in pending.drain(..) {
                    if tx.send(Ok(ev)).await.is_err() {
                        return;
                    }
                }
                tokio::select! {
                    r = rx.recv() => match r {
                        Ok(ev) => pending.push(ev),
                        // Fell behind: the current state of every service
                        // replaces what was missed (snapshots are levels,
                        // so the gateway's integrations converge).
                        Err(RecvError::Lagged(_)) => pending = health.snapshot(now_ms()),
                        Err(RecvError::Closed) => return,
                    },
                    _ = tx.closed() => return,
                    () = &mut closed => return,
                }
            }
        });
        let out = self.0.certs.cut_off(peer, ReceiverStream::new(out));
        Ok(Response::new(Box::pin(out)))
    }

    async fn silence(
        &self,
        req: Request<pb::SilenceRequest>,
    ) -> Result<Response<pb::SilenceResponse>, Status> {
        let peer = admitted(&req)?;
        let req = req.into_inner();
        // The gateway speaks for a chat user (it checked their rights, as
        // for jobs); an operator speaks for themself.
        let actor = match peer.role {
            Role::Gateway if !req.actor.trim().is_empty() => req.actor.clone(),
            Role::Gateway => {
                return Err(ApiError::InvalidArgument(
                    "silence from the gateway must name the chat user (actor)".into(),
                )
                .into());
            }
            _ => peer_actor(&peer),
        };
        if !self.0.health.knows(&req.service) {
            return Err(ApiError::NotFound(format!(
                "no service named {:?}; configured: {}",
                req.service,
                known(&self.0)
            ))
            .into());
        }
        let selector = self
            .0
            .health
            .selector_of(&req.service)
            .ok_or_else(|| ApiError::NotFound(format!("no service named {:?}", req.service)))?;
        crate::access::check_silence(&self.0, &peer, &req.service, &selector)?;
        let dur = Duration::from_secs(req.duration_secs);
        if dur > MAX_SILENCE {
            return Err(ApiError::InvalidArgument(format!(
                "a silence lasts at most {} days",
                MAX_SILENCE.as_secs() / 86400
            ))
            .into());
        }
        let until_ms = if dur.is_zero() {
            0
        } else {
            now_ms() + dur.as_millis() as u64
        };
        let reason = req.reason.trim().chars().take(500).collect::<String>();
        let event = Event::new(EventKind::ServiceSilenced, actor.clone())
            .source(req.channel.clone())
            .detail(if until_ms == 0 {
                format!("alerts of service {} un-silenced", req.service)
            } else {
                format!(
                    "alerts of service {} silenced for {}: {}",
                    req.service,
                    fleetcmd_core::duration::format_duration(dur),
                    if reason.is_empty() {
                        "no reason given"
                    } else {
                        &reason
                    }
                )
            })
            .field("service", &req.service)
            .field("until_ms", until_ms)
            .field("reported_by", peer_actor(&peer));
        let shared = self.0.clone();
        let service = req.service.clone();
        tokio::task::spawn_blocking(move || {
            shared.health.silence(&service, until_ms, &reason, &actor)?;
            shared.audit.record(event)
        })
        .await
        .map_err(blocking_err)?
        .map_err(ApiError::from)?;
        // The silence and its audit record are on disk before we say so.
        self.0.flush_now().await?;
        Ok(Response::new(pb::SilenceResponse { until_ms }))
    }
}

fn known(shared: &Shared) -> String {
    let names = shared.health.names();
    if names.is_empty() {
        "none ([services.NAME] in controller.toml)".into()
    } else {
        names.join(", ")
    }
}
