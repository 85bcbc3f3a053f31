//! The `Audit` gRPC service: search (operators and the gateway), export of
//! records with the signed heads and the public key so the caller verifies
//! the chain itself (operators), and events only the gateway sees.

use std::pin::Pin;
use std::sync::Arc;

use fleetcmd_core::audit::{Event, EventKind, ExportLine, Filter};
use fleetcmd_core::ids::JobRef;
use fleetcmd_proto::v1 as pb;
use tokio_stream::Stream;
use tonic::{Request, Response, Status};

use crate::auth::admitted;
use crate::error::ApiError;
use crate::pki::Role;
use crate::state::Shared;

/// Records per export chunk (well under the 4 MiB message limit for the
/// event sizes the controller writes).
const EXPORT_CHUNK: usize = 500;

#[derive(Clone)]
pub struct AuditSvc(pub Arc<Shared>);

fn text(s: String) -> Option<String> {
    Some(s).filter(|s| !s.trim().is_empty())
}

/// Converts a search request into a filter, refusing unknown kinds.
pub fn filter_of(req: pb::AuditSearchRequest) -> Result<Filter, ApiError> {
    let kinds = req
        .kinds
        .iter()
        .map(|k| EventKind::parse(k))
        .collect::<Result<Vec<_>, _>>()
        .map_err(ApiError::InvalidArgument)?;
    Ok(Filter {
        text: text(req.text),
        actor: text(req.actor),
        command: text(req.command),
        host: text(req.host),
        job_id: text(req.job_id)
            .map(|j| JobRef::parse(&j))
            .transpose()
            .map_err(|e| ApiError::InvalidArgument(e.to_string()))?,
        kinds,
        since_ms: Some(req.since_ms).filter(|t| *t > 0),
        until_ms: Some(req.until_ms).filter(|t| *t > 0),
    })
}

fn json<T: serde::Serialize>(v: &T) -> String {
    serde_json::to_string(v).expect("audit records serialize to JSON")
}

type ExportStream = Pin<Box<dyn Stream<Item = Result<pb::AuditExportChunk, Status>> + Send>>;

#[tonic::async_trait]
impl pb::audit_server::Audit for AuditSvc {
    async fn search(
        &self,
        req: Request<pb::AuditSearchRequest>,
    ) -> Result<Response<pb::AuditSearchResponse>, Status> {
        let peer = admitted(&req)?;
        let req = req.into_inner();
        let limit = if req.limit == 0 {
            50
        } else {
            req.limit as usize
        };
        let before = Some(req.before_seq).filter(|s| *s > 0);
        let filter = filter_of(req)?;
        let audit = self.0.audit.clone();
        let reader = crate::access::audit_reader(&self.0, &peer)?;
        let page = tokio::task::spawn_blocking(move || match reader {
            None => audit.search(&filter, limit, before),
            Some(mut keep) => audit.search_where(&filter, limit, before, &mut keep),
        })
        .await
        .map_err(|e| ApiError::Internal(format!("search task: {e}")))?
        .map_err(ApiError::from)?;
        Ok(Response::new(pb::AuditSearchResponse {
            records: page
                .records
                .iter()
                .map(|r| json(&ExportLine::Record(r.clone())))
                .collect(),
            next_before_seq: page.next_before.unwrap_or(0),
        }))
    }

    type ExportStream = ExportStream;

    async fn verify(
        &self,
        req: Request<pb::AuditVerifyRequest>,
    ) -> Result<Response<pb::AuditVerifyResponse>, Status> {
        let from = Some(req.into_inner().from_seq).filter(|s| *s > 0);
        let audit = self.0.audit.clone();
        let result = tokio::task::spawn_blocking(move || audit.verify(from))
            .await
            .map_err(|e| ApiError::Internal(format!("verify task: {e}")))?
            .map_err(ApiError::from)?;
        Ok(Response::new(match result {
            Ok(v) => pb::AuditVerifyResponse {
                ok: true,
                first: v.first,
                last: v.last,
                records: v.records,
                heads: v.heads,
                signed_up_to: v.signed_up_to,
                broken_seq: 0,
                reason: String::new(),
            },
            Err(broken) => pb::AuditVerifyResponse {
                ok: false,
                broken_seq: broken.seq(),
                reason: broken.to_string(),
                ..Default::default()
            },
        }))
    }

    async fn export(
        &self,
        req: Request<pb::AuditExportRequest>,
    ) -> Result<Response<ExportStream>, Status> {
        let peer = admitted(&req)?;
        if peer.role != Role::Operator {
            return Err(ApiError::PermissionDenied(
                "only operators may export the audit trail".into(),
            )
            .into());
        }
        // The whole trail or nothing: a chain with records left out cannot
        // be verified, so export is its own grant rather than a filter.
        crate::access::check_operator(
            &self.0,
            &peer,
            fleetcmd_core::policy::Permission::ExportAudit,
            "export the audit trail",
        )?;
        let from = req.into_inner().from_seq.max(1);
        let audit = self.0.audit.clone();
        let heads: Vec<String> = audit
            .heads_from(from)
            .map_err(ApiError::from)?
            .iter()
            .map(|h| {
                json(&ExportLine::Head {
                    signed_head: h.clone(),
                })
            })
            .collect();
        let public_key = audit.public_key().to_string();
        // Bounded: the producer waits while the client is slow.
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        tokio::spawn(async move {
            let mut next = from;
            let mut first = Some((heads, public_key));
            loop {
                let a = audit.clone();
                let chunk =
                    match tokio::task::spawn_blocking(move || a.records_from(next, EXPORT_CHUNK))
                        .await
                    {
                        Ok(Ok(c)) => c,
                        Ok(Err(e)) => {
                            let _ = tx.send(Err(Status::from(ApiError::from(e)))).await;
                            return;
                        }
                        Err(e) => {
                            let _ = tx
                                .send(Err(Status::from(ApiError::Internal(e.to_string()))))
                                .await;
                            return;
                        }
                    };
                let done = chunk.len() < EXPORT_CHUNK;
                if let Some(last) = chunk.last() {
                    next = last.seq + 1;
                }
                let (heads, public_key) = first.take().unwrap_or_default();
                let msg = pb::AuditExportChunk {
                    records: chunk
                        .into_iter()
                        .map(|r| json(&ExportLine::Record(r)))
                        .collect(),
                    heads,
                    public_key,
                };
                if tx.send(Ok(msg)).await.is_err() || done {
                    return;
                }
            }
        });
        Ok(Response::new(Box::pin(self.0.certs.cut_off(
            peer,
            tokio_stream::wrappers::ReceiverStream::new(rx),
        ))))
    }

    async fn report(
        &self,
        req: Request<pb::AuditReportRequest>,
    ) -> Result<Response<pb::AuditReportResponse>, Status> {
        let peer = admitted(&req)?;
        if peer.role != Role::Gateway {
            return Err(
                ApiError::PermissionDenied("only the gateway reports audit events".into()).into(),
            );
        }
        let req = req.into_inner();
        let kind = EventKind::parse(&req.kind).map_err(ApiError::InvalidArgument)?;
        if !super::reportable(kind) {
            return Err(ApiError::InvalidArgument(format!(
                "event kind {kind} is recorded by the controller, not reported"
            ))
            .into());
        }
        let too_long = [
            &req.actor,
            &req.source,
            &req.command,
            &req.detail,
            &req.job_id,
        ]
        .iter()
        .any(|s| s.len() > 4096);
        if too_long {
            return Err(ApiError::InvalidArgument("audit report field over 4 KiB".into()).into());
        }
        let event = Event::new(kind, req.actor)
            .source(req.source)
            .command(req.command)
            .job(req.job_id)
            .detail(req.detail);
        let seq = self
            .0
            .audit
            .report(event, &crate::audit::peer_actor(&peer))
            .map_err(ApiError::from)?;
        // Reported events are acknowledged durably, as the controller's own.
        let store = self.0.store.clone();
        tokio::task::spawn_blocking(move || store.flush())
            .await
            .map_err(|e| ApiError::Internal(format!("flush task: {e}")))?
            .map_err(ApiError::from)?;
        Ok(Response::new(pb::AuditReportResponse { seq }))
    }
}
