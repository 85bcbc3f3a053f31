//! gRPC services: thin adapters from protobuf to `Shared`'s operations.
//! Authentication happens in the interceptors of `auth`; each handler reads
//! the admitted `Peer` and converts bad input to `ApiError` at this boundary.

use std::collections::BTreeMap;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use fleetcmd_proto::v1 as pb;
use pb::agent_message::Msg as AgentMsg;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::{Stream, StreamExt};
use tonic::{Request, Response, Status, Streaming};

use crate::auth::admitted;
use crate::error::ApiError;
use crate::pki::Role;
use crate::state::{Shared, signed_policy};
use fleetcmd_core::policy::Permission;

#[derive(Clone)]
pub struct Svc(pub Arc<Shared>);

#[tonic::async_trait]
impl pb::enrollment_server::Enrollment for Svc {
    async fn join(
        &self,
        req: Request<pb::JoinRequest>,
    ) -> Result<Response<pb::JoinResponse>, Status> {
        let ip = req
            .remote_addr()
            .map(|a| a.ip())
            .unwrap_or(std::net::Ipv4Addr::UNSPECIFIED.into());
        self.0.join_limiter.check(ip)?;
        let result = self.join_checked(req.into_inner()).await;
        if result.is_err() {
            self.0.join_limiter.failed(ip);
        }
        result
    }
}

impl Svc {
    async fn join_checked(
        &self,
        req: pb::JoinRequest,
    ) -> Result<Response<pb::JoinResponse>, Status> {
        if req.csr_der.len() > 16 * 1024 {
            return Err(ApiError::InvalidArgument(
                "certificate signing request over 16 KiB".into(),
            )
            .into());
        }
        Ok(Response::new(self.0.join(req).await?))
    }
}

/// What an agent says about itself, checked before anything keeps it
/// (charset, length and count of every field); a bad `Hello` refuses the
/// stream with the reason.
fn host_report(hello: pb::Hello) -> Result<fleetcmd_core::host::HostReport, ApiError> {
    fleetcmd_core::host::HostReport::new(
        &hello.version,
        &hello.hostname,
        hello.facts.into_iter().collect(),
        hello.allow,
    )
    .map_err(|e| ApiError::InvalidArgument(e.to_string()))
}

/// The bounds of a heartbeat (`core::host::check_heartbeat`), checked
/// before the controller keeps anything of it.
fn heartbeat_report(hb: &pb::Heartbeat) -> Result<(), fleetcmd_core::host::HeartbeatError> {
    let perfdata: Vec<Vec<[&str; 4]>> = hb
        .checks
        .iter()
        .map(|c| {
            c.perfdata
                .iter()
                .map(|p| {
                    [
                        p.label.as_str(),
                        p.unit.as_str(),
                        p.warn.as_str(),
                        p.crit.as_str(),
                    ]
                })
                .collect()
        })
        .collect();
    let checks: Vec<fleetcmd_core::host::CheckFields<'_>> = hb
        .checks
        .iter()
        .zip(&perfdata)
        .map(|(c, p)| fleetcmd_core::host::CheckFields {
            name: &c.name,
            kind: &c.kind,
            summary: &c.summary,
            perfdata: p,
        })
        .collect();
    let mounts: Vec<&str> = hb
        .metrics
        .iter()
        .flat_map(|m| m.disks.iter().map(|d| d.mount.as_str()))
        .collect();
    fleetcmd_core::host::check_heartbeat(&checks, &mounts)
}

type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send + 'static>>;

#[tonic::async_trait]
impl pb::agent_stream_server::AgentStream for Svc {
    type ConnectStream = BoxStream<pb::ControllerMessage>;

    async fn connect(
        &self,
        req: Request<Streaming<pb::AgentMessage>>,
    ) -> Result<Response<Self::ConnectStream>, Status> {
        let peer = admitted(&req)?;
        let agent = peer.name.clone();
        let mut inbound = req.into_inner();
        let current = move |shared: &crate::state::Shared| {
            !shared.registry.is_revoked(&peer.name) && shared.registry.agent_cert_current(&peer)
        };
        let hello = match inbound.message().await? {
            Some(pb::AgentMessage {
                msg: Some(AgentMsg::Hello(h)),
            }) => h,
            _ => {
                return Err(ApiError::InvalidArgument(
                    "the first message on the agent stream must be Hello".into(),
                )
                .into());
            }
        };
        let policy_version = hello.policy_version;
        let report = host_report(hello).inspect_err(|e| {
            tracing::warn!(agent_id = %agent, error = %e, "agent hello refused");
        })?;
        let labels = self.0.registry.granted_labels(&agent)?;
        let (tx, rx) = mpsc::channel(crate::state::AGENT_QUEUE);
        let welcome = pb::ControllerMessage {
            msg: Some(pb::controller_message::Msg::Welcome(pb::Welcome {
                agent_id: agent.clone(),
                heartbeat_secs: self.0.config.heartbeat_interval.as_secs().max(1) as u32,
                labels: labels.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
                answers_start_checks: true,
            })),
        };
        tx.try_send(Box::new(Ok(welcome)))
            .map_err(|_| Status::internal("agent queue"))?;
        if !current(&self.0) {
            return Err(ApiError::PermissionDenied(format!(
                "agent {agent} was enrolled again; this certificate is no longer accepted"
            ))
            .into());
        }
        let conn = self
            .0
            .register(&agent, report, policy_version, tx.clone())?;
        let shared = self.0.clone();
        tokio::spawn(async move {
            let reason = loop {
                let msg = match inbound.message().await {
                    Ok(Some(m)) => m,
                    Ok(None) => break "stream closed".to_string(),
                    Err(e) => break e.to_string(),
                };
                // Also after the name was enrolled again (the holder of an
                // older certificate neither reports nor renews).
                if !current(&shared) {
                    break "agent revoked or enrolled again".to_string();
                }
                match msg.msg {
                    Some(AgentMsg::Heartbeat(hb)) => {
                        // Unbounded check results poisoned the audit trail
                        // (service records of megabytes) and every listing.
                        if let Err(e) = heartbeat_report(&hb) {
                            tracing::warn!(agent_id = %agent, error = %e, "heartbeat refused; closing the stream");
                            break e.to_string();
                        }
                        shared.registry.heartbeat(&agent, conn, hb)
                    }
                    Some(AgentMsg::Chunk(c)) => shared.live_chunk(&agent, c),
                    // Answered off this loop (a store read), on the stream.
                    Some(AgentMsg::StartCheck(c)) => {
                        let (shared, agent, tx) = (shared.clone(), agent.clone(), tx.clone());
                        tokio::spawn(async move {
                            let answer = tokio::task::spawn_blocking(move || {
                                shared.start_answer(&agent, c.job_id)
                            })
                            .await;
                            if let Ok(msgs) = answer {
                                for m in msgs {
                                    let _ = tx.send(Box::new(Ok(m))).await;
                                }
                            }
                        });
                    }
                    Some(AgentMsg::Started(s)) => {
                        if let Err(e) = shared.record_started(&agent, &s.job_id) {
                            tracing::warn!(agent_id = %agent, error = %e, "recording job start");
                        }
                    }
                    Some(AgentMsg::Result(r)) => {
                        let job_id = r.job_id.clone();
                        // Boxed: this task lives as long as the agent's
                        // connection, and the store-and-flush future would
                        // otherwise make every idle agent's task that big.
                        match Box::pin(shared.record_result(&agent, r)).await {
                            Ok(()) => {
                                let ack = pb::ControllerMessage {
                                    msg: Some(pb::controller_message::Msg::Ack(pb::ResultAck {
                                        job_id,
                                    })),
                                };
                                // Backpressure: the ack waits for room rather than being dropped.
                                if tx.send(Box::new(Ok(ack))).await.is_err() {
                                    break "stream closed".to_string();
                                }
                            }
                            // Not acknowledged: the agent keeps it, and sends
                            // every result it holds again when it reconnects —
                            // so the stream is closed, or the result would wait
                            // for a reconnect that might never come (found with
                            // PostgreSQL restarted under load: targets stayed
                            // `running` for good).
                            Err(e) => {
                                tracing::error!(agent_id = %agent, %job_id, error = %e, "storing result; closing the stream so the agent sends it again");
                                break format!("storing a result failed: {e}");
                            }
                        }
                    }
                    Some(AgentMsg::Renew(r)) => {
                        let renew = match shared.renew(&agent, &r.csr_der) {
                            Ok(cert_pem) => pb::RenewResponse {
                                cert_pem,
                                error: String::new(),
                            },
                            Err(e) => pb::RenewResponse {
                                cert_pem: String::new(),
                                error: e.to_string(),
                            },
                        };
                        let msg = pb::ControllerMessage {
                            msg: Some(pb::controller_message::Msg::Renew(renew)),
                        };
                        if tx.send(Box::new(Ok(msg))).await.is_err() {
                            break "stream closed".to_string();
                        }
                    }
                    Some(AgentMsg::Hello(_)) | None => {
                        tracing::warn!(agent_id = %agent, "unexpected message on agent stream");
                    }
                }
            };
            tracing::debug!(agent_id = %agent, %reason, "agent stream ended");
            shared.registry.unregister(&agent, conn);
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx).map(|m| *m))))
    }
}

#[tonic::async_trait]
impl pb::jobs_server::Jobs for Svc {
    type WatchStream = BoxStream<pb::JobEvent>;

    async fn watch(
        &self,
        req: Request<pb::WatchJobRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        let peer = admitted(&req)?;
        let (job, mut rx) = self.0.watch(&req.into_inner().job_id)?;
        crate::access::check_read(&self.0, &peer, &job)?;
        // Bounded both ways: a slow client fills this channel, the task
        // stops reading the broadcast, and the lag is reported as `missed`.
        let (tx, out) = mpsc::channel(64);
        tokio::spawn(async move {
            use pb::job_event::Event;
            use tokio::sync::broadcast::error::RecvError;
            let ended = job.job_state() != pb::JobState::Running;
            let first = pb::JobEvent {
                event: Some(Event::Job(job)),
            };
            if tx.send(Ok(first)).await.is_err() || ended {
                return;
            }
            loop {
                let ev = match rx.recv().await {
                    Ok(ev) => ev,
                    Err(RecvError::Lagged(n)) => pb::JobEvent {
                        event: Some(Event::Missed(n)),
                    },
                    Err(RecvError::Closed) => return,
                };
                let last = matches!(ev.event, Some(Event::Job(_)));
                if tx.send(Ok(ev)).await.is_err() || last {
                    return;
                }
            }
        });
        let out = self.0.certs.cut_off(peer, ReceiverStream::new(out));
        Ok(Response::new(Box::pin(out)))
    }

    async fn submit(
        &self,
        req: Request<pb::SignedJob>,
    ) -> Result<Response<pb::SubmitResponse>, Status> {
        let peer = admitted(&req)?;
        // Its own task: a caller that goes away mid-call (a deadline, a
        // killed gateway) must not cut a submission off between storing
        // the job and handing it to the dispatcher (an outside test left
        // jobs stored as running, to run at the next restart).
        let shared = self.0.clone();
        let job = req.into_inner();
        let res = tokio::spawn(async move { shared.submit(&peer, job).await })
            .await
            .map_err(|e| Status::internal(format!("submitting: {e}")))?;
        Ok(Response::new(res?))
    }

    async fn get(&self, req: Request<pb::GetJobRequest>) -> Result<Response<pb::Job>, Status> {
        let peer = admitted(&req)?;
        let job = self.0.get_job(&req.into_inner().job_id)?;
        crate::access::check_read(&self.0, &peer, &job)?;
        Ok(Response::new(job))
    }

    async fn list(
        &self,
        req: Request<pb::ListJobsRequest>,
    ) -> Result<Response<pb::ListJobsResponse>, Status> {
        let peer = admitted(&req)?;
        let req = req.into_inner();
        Ok(Response::new(pb::ListJobsResponse {
            jobs: crate::access::list_jobs(&self.0, &peer, req.limit, &req.requester, &req.state)?,
        }))
    }

    async fn cancel(
        &self,
        req: Request<pb::CancelJobRequest>,
    ) -> Result<Response<pb::Job>, Status> {
        let peer = admitted(&req)?;
        let req = req.into_inner();
        let job = self.0.get_job(&req.job_id)?;
        crate::access::check_cancel(&self.0, &peer, &job)?;
        // Operators cancel in their own name; a gateway names the chat user
        // it checked (it enforces who may cancel what in chat).
        let by = match peer.role {
            Role::Gateway if !req.requested_by.is_empty() => {
                format!("{} via gateway {}", req.requested_by, peer.name)
            }
            _ => format!("{} {}", peer.role, peer.name),
        };
        Ok(Response::new(self.0.cancel(&job.job_id, &by).await?))
    }
}

#[tonic::async_trait]
impl pb::agents_server::Agents for Svc {
    async fn list(
        &self,
        req: Request<pb::ListAgentsRequest>,
    ) -> Result<Response<pb::ListAgentsResponse>, Status> {
        Ok(Response::new(pb::ListAgentsResponse {
            agents: self.0.fleet_agents(&req.into_inner().selector)?,
        }))
    }

    async fn revoke(
        &self,
        req: Request<pb::RevokeRequest>,
    ) -> Result<Response<pb::RevokeResponse>, Status> {
        let peer = admitted(&req)?;
        if peer.role != Role::Operator {
            return Err(
                ApiError::PermissionDenied("only operators may revoke agents".into()).into(),
            );
        }
        crate::access::check_operator(&self.0, &peer, Permission::RevokeAgents, "revoke agents")?;
        self.0.revoke(&req.into_inner().agent_id, &peer).await?;
        Ok(Response::new(pb::RevokeResponse {}))
    }
}

#[tonic::async_trait]
impl pb::tokens_server::Tokens for Svc {
    async fn create(
        &self,
        req: Request<pb::CreateTokenRequest>,
    ) -> Result<Response<pb::CreateTokenResponse>, Status> {
        let peer = admitted(&req)?;
        let req = req.into_inner();
        let labels: BTreeMap<String, String> = req.labels.into_iter().collect();
        let text = labels
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join(",");
        if !text.is_empty() {
            fleetcmd_core::selector::parse_labels(&text)
                .map_err(|e| ApiError::InvalidArgument(format!("labels: {e}")))?;
        }
        // A token naming an enrolled agent re-enrols it: checked against
        // that enrolment, and bound to it.
        let enrolled = Some(req.name.as_str())
            .filter(|n| !n.is_empty())
            .and_then(|n| self.0.registry.enrolment_of(n));
        crate::access::check_token(
            &self.0,
            &peer,
            &req.name,
            &labels,
            enrolled.as_ref().map(|(current, _)| current),
        )?;
        let ttl = Duration::from_secs(if req.ttl_secs == 0 {
            3600
        } else {
            req.ttl_secs
        });
        let name = Some(req.name).filter(|n| !n.is_empty());
        let (token, expires_at) = self
            .0
            .create_token_for(
                labels,
                ttl,
                req.uses,
                name,
                &peer.name,
                enrolled.map(|(_, joined_at)| joined_at),
            )
            .await?;
        Ok(Response::new(pb::CreateTokenResponse {
            token: token.expose().clone(),
            expires_at,
        }))
    }
}

#[tonic::async_trait]
impl pb::policy_server::Policy for Svc {
    async fn push(
        &self,
        req: Request<pb::SignedPolicy>,
    ) -> Result<Response<pb::PolicyInfo>, Status> {
        let peer = admitted(&req)?;
        if peer.role != Role::Operator {
            return Err(
                ApiError::PermissionDenied("only operators may push a policy".into()).into(),
            );
        }
        let req = req.into_inner();
        if req.bundle.len() > fleetcmd_core::policy_bundle::MAX_BUNDLE_BYTES {
            return Err(
                ApiError::InvalidArgument("policy bundle over the size limit".into()).into(),
            );
        }
        let cur = self.0.push_policy(req, &peer).await?;
        Ok(Response::new(pb::PolicyInfo {
            version: cur.policy.version,
            hash: cur.hash.clone(),
            policy: Some(signed_policy(&cur.record)),
        }))
    }

    async fn get(
        &self,
        _req: Request<pb::GetPolicyRequest>,
    ) -> Result<Response<pb::PolicyInfo>, Status> {
        let cur = self
            .0
            .policy
            .current()
            .ok_or_else(|| ApiError::NotFound("no policy has been pushed yet".into()))?;
        Ok(Response::new(pb::PolicyInfo {
            version: cur.policy.version,
            hash: cur.hash.clone(),
            policy: Some(signed_policy(&cur.record)),
        }))
    }
}

#[tonic::async_trait]
impl pb::certs_server::Certs for Svc {
    async fn revoke(
        &self,
        req: Request<pb::RevokeCertRequest>,
    ) -> Result<Response<pb::RevokeCertResponse>, Status> {
        let peer = admitted(&req)?;
        crate::access::check_operator(
            &self.0,
            &peer,
            Permission::RevokeCerts,
            "revoke certificates",
        )?;
        let req = req.into_inner();
        let rec = crate::revocation::revoke(
            &self.0,
            &peer,
            &req.role,
            &req.name,
            &req.serial,
            &req.reason,
        )
        .await?;
        let revoked_at = rec.revoked_at;
        let data_dir = self.0.config.data_dir.clone();
        let warning = tokio::task::spawn_blocking(move || {
            crate::revocation::unrecorded_warning(&data_dir, &rec)
        })
        .await
        .map_err(|e| ApiError::Internal(format!("checking issued.jsonl: {e}")))?;
        Ok(Response::new(pb::RevokeCertResponse {
            revoked_at,
            warning: warning.unwrap_or_default(),
        }))
    }

    async fn list_revoked(
        &self,
        req: Request<pb::ListRevokedCertsRequest>,
    ) -> Result<Response<pb::ListRevokedCertsResponse>, Status> {
        let peer = admitted(&req)?;
        crate::access::check_operator(
            &self.0,
            &peer,
            Permission::RevokeCerts,
            "list revoked certificates",
        )?;
        Ok(Response::new(pb::ListRevokedCertsResponse {
            revoked: self
                .0
                .certs
                .list()
                .into_iter()
                .map(|r| pb::RevokedCert {
                    role: r.role,
                    name: r.name,
                    serial: r.serial.unwrap_or_default(),
                    revoked_at: r.revoked_at,
                    by: r.by,
                    reason: r.reason,
                })
                .collect(),
        }))
    }
}
