//! The gateway's view of the controller: a [`ControllerApi`] trait in front
//! of the mTLS gRPC clients, so the router is tested with a fake.

use std::future::Future;
use std::pin::Pin;

use futures_util::{Stream, StreamExt};

use fleetcmd_core::job::SignedJob;
use fleetcmd_proto::channel::{ChannelError, ClientTls, endpoint};
use fleetcmd_proto::v1;
use fleetcmd_proto::v1::agents_client::AgentsClient;
use fleetcmd_proto::v1::audit_client::AuditClient;
use fleetcmd_proto::v1::claims_client::ClaimsClient;
use fleetcmd_proto::v1::health_client::HealthClient;
use fleetcmd_proto::v1::jobs_client::JobsClient;
use fleetcmd_proto::v1::policy_client::PolicyClient;
use tonic::transport::Channel;

/// How many of the newest jobs `jobs` looks through: every page of it
/// (`grammar::MAX_JOBS_PAGE` pages of `grammar::JOBS_PAGE`), and one more
/// to know whether there is an older page.
pub const JOBS_SCAN: u32 =
    fleetcmd_core::grammar::MAX_JOBS_PAGE * fleetcmd_core::grammar::JOBS_PAGE + 1;

/// A controller call that failed; the message is the gRPC status message,
/// which is what chat users see.
#[derive(thiserror::Error, Debug, Clone, PartialEq, Eq)]
#[error("controller: {message} ({code:?})")]
pub struct ControllerError {
    pub code: tonic::Code,
    pub message: String,
}

impl From<tonic::Status> for ControllerError {
    fn from(s: tonic::Status) -> ControllerError {
        let message = if s.message().is_empty() {
            s.code().description().to_string()
        } else {
            s.message().to_string()
        };
        ControllerError {
            code: s.code(),
            message,
        }
    }
}

/// A job's live events ([`ControllerApi::watch`]).
pub type JobEvents = Pin<Box<dyn Stream<Item = Result<v1::JobEvent, ControllerError>> + Send>>;

/// Service alert events ([`ControllerApi::health_watch`]).
pub type AlertEvents = Pin<Box<dyn Stream<Item = Result<v1::AlertEvent, ControllerError>> + Send>>;

/// The controller calls the gateway makes.
pub trait ControllerApi: Send + Sync + 'static {
    fn submit(
        &self,
        job: SignedJob,
    ) -> impl Future<Output = Result<v1::SubmitResponse, ControllerError>> + Send;
    /// `id` may be a unique prefix.
    fn get_job(&self, id: String) -> impl Future<Output = Result<v1::Job, ControllerError>> + Send;
    /// Recent jobs, newest first; `requester` narrows to one identity.
    fn list_jobs(
        &self,
        limit: u32,
        requester: Option<String>,
    ) -> impl Future<Output = Result<Vec<v1::Job>, ControllerError>> + Send;
    /// An empty selector means all agents.
    fn list_agents(
        &self,
        selector: String,
    ) -> impl Future<Output = Result<Vec<v1::Agent>, ControllerError>> + Send;
    fn get_policy(&self) -> impl Future<Output = Result<v1::PolicyInfo, ControllerError>> + Send;
    /// Cancels a job on behalf of `requested_by` (already authorized here).
    fn cancel(
        &self,
        id: String,
        requested_by: String,
    ) -> impl Future<Output = Result<v1::Job, ControllerError>> + Send;
    /// Live events of a job (state changes, results, output chunks); the
    /// router uses them to know when to re-read and edit its message.
    fn watch(&self, id: String) -> impl Future<Output = Result<JobEvents, ControllerError>> + Send;
    /// Records what only the gateway sees (chat denials, approvals) in the
    /// controller's audit trail.
    fn report(
        &self,
        event: v1::AuditReportRequest,
    ) -> impl Future<Output = Result<u64, ControllerError>> + Send;
    /// Verifies the stored audit chain (the controller's check).
    fn audit_verify(
        &self,
    ) -> impl Future<Output = Result<v1::AuditVerifyResponse, ControllerError>> + Send;
    /// Audit records, newest first, each a JSON line.
    fn audit_search(
        &self,
        req: v1::AuditSearchRequest,
    ) -> impl Future<Output = Result<v1::AuditSearchResponse, ControllerError>> + Send;
    /// Services, worst first (`name` empty = all), with up to `history`
    /// recent transitions each.
    fn health_services(
        &self,
        name: String,
        history: u32,
    ) -> impl Future<Output = Result<Vec<v1::Service>, ControllerError>> + Send;
    /// Alert events: a snapshot of every service, then announcements.
    fn health_watch(&self) -> impl Future<Output = Result<AlertEvents, ControllerError>> + Send;
    /// Silences a service's alerts on behalf of a chat user (already
    /// authorized here); returns until when.
    fn silence(
        &self,
        req: v1::SilenceRequest,
    ) -> impl Future<Output = Result<u64, ControllerError>> + Send;
    /// Claims `key` for `ttl_secs` among every gateway of the controller
    /// (`crate::claims`); `true`: this gateway acts, `false`: another one
    /// claimed it first.
    fn claim(
        &self,
        key: String,
        ttl_secs: u32,
    ) -> impl Future<Output = Result<bool, ControllerError>> + Send;
}

/// The real controller over mTLS gRPC.
#[derive(Clone, Debug)]
pub struct GrpcController {
    channel: Channel,
}

impl GrpcController {
    /// A controller client that connects on first use and reconnects after
    /// failures, so a controller that is down at start does not stop the
    /// gateway (calls fail with a clear message meanwhile).
    pub fn connect_lazy(url: &str, tls: &ClientTls) -> Result<GrpcController, ChannelError> {
        let ep = endpoint(url, &tls.ca_pem, Some((&tls.cert_pem, &tls.key_pem)))?;
        Ok(GrpcController {
            channel: ep.connect_lazy(),
        })
    }

    /// A client over an existing channel.
    pub fn from_channel(channel: Channel) -> GrpcController {
        GrpcController { channel }
    }

    /// Takes, renews or releases a connection chat's lease
    /// (`Claims.Hold`, `crate::standby`).
    pub async fn hold(&self, req: v1::HoldRequest) -> Result<v1::HoldResponse, ControllerError> {
        Ok(ClaimsClient::new(self.channel.clone())
            .hold(req)
            .await?
            .into_inner())
    }
}

impl ControllerApi for GrpcController {
    async fn submit(&self, job: SignedJob) -> Result<v1::SubmitResponse, ControllerError> {
        let req = v1::SignedJob {
            spec: job.spec,
            signature: job.signature,
            key_id: job.key_id,
        };
        Ok(JobsClient::new(self.channel.clone())
            .submit(req)
            .await?
            .into_inner())
    }

    async fn get_job(&self, id: String) -> Result<v1::Job, ControllerError> {
        Ok(JobsClient::new(self.channel.clone())
            .get(v1::GetJobRequest { job_id: id })
            .await?
            .into_inner())
    }

    async fn list_jobs(
        &self,
        limit: u32,
        requester: Option<String>,
    ) -> Result<Vec<v1::Job>, ControllerError> {
        let req = v1::ListJobsRequest {
            limit,
            requester: requester.unwrap_or_default(),
            state: String::new(),
        };
        Ok(JobsClient::new(self.channel.clone())
            .list(req)
            .await?
            .into_inner()
            .jobs)
    }

    async fn list_agents(&self, selector: String) -> Result<Vec<v1::Agent>, ControllerError> {
        let req = v1::ListAgentsRequest { selector };
        Ok(AgentsClient::new(self.channel.clone())
            .list(req)
            .await?
            .into_inner()
            .agents)
    }

    async fn cancel(&self, id: String, requested_by: String) -> Result<v1::Job, ControllerError> {
        Ok(JobsClient::new(self.channel.clone())
            .cancel(v1::CancelJobRequest {
                job_id: id,
                requested_by,
            })
            .await?
            .into_inner())
    }

    async fn watch(&self, id: String) -> Result<JobEvents, ControllerError> {
        let stream = JobsClient::new(self.channel.clone())
            .watch(v1::WatchJobRequest { job_id: id })
            .await?
            .into_inner();
        Ok(Box::pin(stream.map(|e| e.map_err(ControllerError::from))))
    }

    async fn report(&self, event: v1::AuditReportRequest) -> Result<u64, ControllerError> {
        Ok(AuditClient::new(self.channel.clone())
            .report(event)
            .await?
            .into_inner()
            .seq)
    }

    async fn audit_search(
        &self,
        req: v1::AuditSearchRequest,
    ) -> Result<v1::AuditSearchResponse, ControllerError> {
        Ok(AuditClient::new(self.channel.clone())
            .search(req)
            .await?
            .into_inner())
    }

    async fn audit_verify(&self) -> Result<v1::AuditVerifyResponse, ControllerError> {
        Ok(AuditClient::new(self.channel.clone())
            .verify(v1::AuditVerifyRequest { from_seq: 0 })
            .await?
            .into_inner())
    }

    async fn health_services(
        &self,
        name: String,
        history: u32,
    ) -> Result<Vec<v1::Service>, ControllerError> {
        Ok(HealthClient::new(self.channel.clone())
            .services(v1::ServicesRequest { name, history })
            .await?
            .into_inner()
            .services)
    }

    async fn health_watch(&self) -> Result<AlertEvents, ControllerError> {
        let stream = HealthClient::new(self.channel.clone())
            .watch(v1::HealthWatchRequest {})
            .await?
            .into_inner();
        Ok(Box::pin(stream.map(|r| r.map_err(ControllerError::from))))
    }

    async fn silence(&self, req: v1::SilenceRequest) -> Result<u64, ControllerError> {
        Ok(HealthClient::new(self.channel.clone())
            .silence(req)
            .await?
            .into_inner()
            .until_ms)
    }

    async fn claim(&self, key: String, ttl_secs: u32) -> Result<bool, ControllerError> {
        Ok(ClaimsClient::new(self.channel.clone())
            .claim(v1::ClaimRequest { key, ttl_secs })
            .await?
            .into_inner()
            .won)
    }

    async fn get_policy(&self) -> Result<v1::PolicyInfo, ControllerError> {
        Ok(PolicyClient::new(self.channel.clone())
            .get(v1::GetPolicyRequest {})
            .await?
            .into_inner())
    }
}
