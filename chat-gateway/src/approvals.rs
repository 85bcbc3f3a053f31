//! Pending approval requests (a command's `requires_approvals`, chat
//! `approve`/`deny`). The decisions are `fleetcmd_core::approval`'s; this
//! module keeps the open requests and wakes the command task that waits on
//! each one. Requests live in memory: a gateway restart drops them (nothing
//! was submitted, so nothing runs) and the requester asks again.

use std::collections::HashMap;
use std::sync::Mutex;

use fleetcmd_core::approval::{ApprovalError, ApprovalRequest, GivenApproval, Progress};
use fleetcmd_core::ids::{IdError, Identity, JobRef};
use fleetcmd_core::policy::Policy;
use tokio::sync::oneshot;

/// Requests waiting at once; beyond it `run` of an approval command is
/// refused with a clear message (each waiting request holds a task).
pub const MAX_PENDING: usize = 32;

/// How a request ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Enough approvals: the gateway attests these in the signed job.
    Approved(Vec<GivenApproval>),
    Denied {
        by: Identity,
        reason: String,
    },
}

/// What `approve` / `deny` did, for the reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome {
    pub job_id: String,
    pub command: String,
    pub requester: Identity,
    pub progress: Progress,
}

/// Why `approve` / `deny` did nothing.
#[derive(thiserror::Error, Debug, Clone, PartialEq, Eq)]
pub enum ApprovalsError {
    #[error("no approval request is waiting for `{0}`")]
    NotFound(String),
    #[error("`{0}` matches several approval requests; give more of the id")]
    Ambiguous(String),
    /// Neither a full id, a short id, nor a long enough prefix.
    #[error(transparent)]
    BadId(#[from] IdError),
    #[error("{MAX_PENDING} approval requests are already waiting; try again later")]
    Full,
    #[error(transparent)]
    Refused(#[from] ApprovalError),
}

struct Pending {
    req: ApprovalRequest,
    wake: Option<oneshot::Sender<Decision>>,
}

/// The open requests, by full job id.
#[derive(Default)]
pub struct Approvals {
    pending: Mutex<HashMap<String, Pending>>,
}

impl std::fmt::Debug for Approvals {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Approvals")
            .field("pending", &self.lock().len())
            .finish()
    }
}

impl Approvals {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Pending>> {
        self.pending.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Opens `req`; the receiver gets the decision (dropped on expiry).
    pub fn open(
        &self,
        req: ApprovalRequest,
    ) -> Result<oneshot::Receiver<Decision>, ApprovalsError> {
        let mut pending = self.lock();
        if pending.len() >= MAX_PENDING {
            return Err(ApprovalsError::Full);
        }
        let (tx, rx) = oneshot::channel();
        pending.insert(
            req.job_id.as_str().to_string(),
            Pending {
                req,
                wake: Some(tx),
            },
        );
        Ok(rx)
    }

    /// Removes a request (expired, or its task ended); true if it was open.
    pub fn close(&self, job_id: &str) -> bool {
        self.lock().remove(job_id).is_some()
    }

    fn find<'m>(
        pending: &'m mut HashMap<String, Pending>,
        prefix: &str,
    ) -> Result<&'m mut Pending, ApprovalsError> {
        let named = JobRef::parse(prefix)?;
        let mut hits = pending.keys().filter(|k| named.matches(k));
        let key = match (hits.next(), hits.next()) {
            (Some(k), None) => k.clone(),
            (Some(_), Some(_)) => return Err(ApprovalsError::Ambiguous(prefix.to_string())),
            _ => return Err(ApprovalsError::NotFound(prefix.to_string())),
        };
        pending
            .get_mut(&key)
            .ok_or_else(|| ApprovalsError::NotFound(prefix.to_string()))
    }

    /// `who` approves the request `prefix` names (its short id, full id or
    /// a prefix of it: `JobRef`). When that makes enough approvals the
    /// waiting task is woken to submit.
    pub fn approve(
        &self,
        prefix: &str,
        policy: &Policy,
        who: &Identity,
        channel: &str,
        now: u64,
    ) -> Result<Outcome, ApprovalsError> {
        let mut pending = self.lock();
        let p = Self::find(&mut pending, prefix)?;
        let progress = p.req.approve(policy, who, channel, now)?;
        let outcome = Outcome {
            job_id: p.req.job_id.as_str().to_string(),
            command: p.req.command.clone(),
            requester: p.req.requester.clone(),
            progress,
        };
        if progress == Progress::Approved {
            let approvers = p.req.approvals.clone();
            if let Some(done) = pending.remove(&outcome.job_id)
                && let Some(wake) = done.wake
            {
                let _ = wake.send(Decision::Approved(approvers));
            }
        }
        Ok(outcome)
    }

    /// `who` denies (or, as the requester, withdraws) the request.
    pub fn deny(
        &self,
        prefix: &str,
        policy: &Policy,
        who: &Identity,
        channel: &str,
        reason: &str,
    ) -> Result<Outcome, ApprovalsError> {
        let mut pending = self.lock();
        let p = Self::find(&mut pending, prefix)?;
        p.req.check_deny(policy, who, channel)?;
        let outcome = Outcome {
            job_id: p.req.job_id.as_str().to_string(),
            command: p.req.command.clone(),
            requester: p.req.requester.clone(),
            progress: Progress::Waiting {
                got: p.req.got(policy),
                needed: p.req.needed,
            },
        };
        if let Some(done) = pending.remove(&outcome.job_id)
            && let Some(wake) = done.wake
        {
            let _ = wake.send(Decision::Denied {
                by: who.clone(),
                reason: reason.to_string(),
            });
        }
        Ok(outcome)
    }

    /// Open requests.
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}
