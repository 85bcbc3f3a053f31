//! Pending approval requests (a command's `requires_approvals`, chat
//! `approve`/`deny`). The decisions are `fleetcmd_core::approval`'s; this
//! module keeps the open requests and wakes the command task that waits on
//! each one.
//!
//! With a gateway store ([`Approvals::persisted`]) every open request is
//! also a [`PendingRecord`] in the store's `approvals` tree: written when
//! it opens and with each approval, removed when it is denied or expires,
//! and — once approved — only after the job it approved is owed
//! ([`crate::owed`]), so an approved job is never lost to a crash. After a
//! restart [`crate::resume`] reopens the records still inside their window
//! and ends the others (expired, or dropped with the reason).

use std::collections::HashMap;
use std::sync::Mutex;

use serde::{Deserialize, Serialize};

use crate::store::{GatewayStore, Records, Seal, StoreError, Unreadable};

use fleetcmd_core::approval::{ApprovalError, ApprovalRequest, GivenApproval, Progress};
use fleetcmd_core::ids::{IdError, Identity, JobId, JobRef};
use fleetcmd_core::policy::Policy;
use fleetcmd_core::terminal::excerpt;
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
    #[error("no approval request is waiting for `{}`", excerpt(.0))]
    NotFound(String),
    /// A request is waiting, but not one this person may see: told exactly
    /// what [`ApprovalsError::NotFound`] tells (audited as refused).
    #[error("no approval request is waiting for `{}`", excerpt(.0))]
    Hidden(String),
    #[error("`{}` matches several approval requests; give more of the id", excerpt(.0))]
    Ambiguous(String),
    /// Neither a full id, a short id, nor a long enough prefix.
    #[error(transparent)]
    BadId(#[from] IdError),
    #[error("{MAX_PENDING} approval requests are already waiting; try again later")]
    Full,
    #[error(transparent)]
    Refused(#[from] ApprovalError),
}

/// The sled tree of pending approval records.
pub const TREE: &str = "approvals";
/// The version of [`PendingRecord`] written now; others are reported
/// unreadable.
pub const RECORD_VERSION: u32 = 1;

/// Where a request was asked, to answer there and to run it after a
/// restart.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Origin {
    pub channel: String,
    pub thread: Option<String>,
    /// The command as addressed to the bot (`run … on …`), parsed and
    /// checked against the current policy again after a restart.
    pub text: String,
    /// The platform id of the posted request.
    pub message: Option<String>,
}

/// One pending request as stored.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct PendingRecord {
    /// [`RECORD_VERSION`].
    pub v: u32,
    pub job_id: JobId,
    pub command: String,
    pub requester: Identity,
    pub needed: u32,
    pub approvals: Vec<StoredApproval>,
    /// Unix seconds.
    pub created_at: u64,
    /// Unix seconds.
    pub expires_at: u64,
    pub origin: Origin,
}

/// A [`GivenApproval`] as stored.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct StoredApproval {
    pub approver: Identity,
    pub channel: String,
    pub approved_at: u64,
}

impl PendingRecord {
    fn of(req: &ApprovalRequest, origin: &Origin) -> PendingRecord {
        PendingRecord {
            v: RECORD_VERSION,
            job_id: req.job_id.clone(),
            command: req.command.clone(),
            requester: req.requester.clone(),
            needed: req.needed,
            approvals: req
                .approvals
                .iter()
                .map(|a| StoredApproval {
                    approver: a.approver.clone(),
                    channel: a.channel.clone(),
                    approved_at: a.approved_at,
                })
                .collect(),
            created_at: req.created_at,
            expires_at: req.expires_at,
            origin: origin.clone(),
        }
    }

    /// The request and where it was asked.
    pub fn into_request(self) -> (ApprovalRequest, Origin) {
        let req = ApprovalRequest {
            job_id: self.job_id,
            command: self.command,
            requester: self.requester,
            needed: self.needed,
            approvals: self
                .approvals
                .into_iter()
                .map(|a| GivenApproval {
                    approver: a.approver,
                    channel: a.channel,
                    approved_at: a.approved_at,
                })
                .collect(),
            created_at: self.created_at,
            expires_at: self.expires_at,
        };
        (req, self.origin)
    }
}

struct Pending {
    req: ApprovalRequest,
    origin: Origin,
    wake: Option<oneshot::Sender<Decision>>,
}

/// The open requests, by full job id.
#[derive(Default)]
pub struct Approvals {
    pending: Mutex<HashMap<String, Pending>>,
    /// Where requests are persisted (none: in memory only).
    records: Option<Records<PendingRecord>>,
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

    /// Requests kept in `store` as well as in memory.
    pub fn persisted(store: &GatewayStore, seal: &Seal) -> Result<Approvals, StoreError> {
        Ok(Approvals {
            pending: Mutex::default(),
            records: Some(store.records(TREE, seal)?),
        })
    }

    /// Writes (in memory until [`flush`](Self::flush)) or removes a record;
    /// a failure is logged: the request goes on in memory.
    fn keep(&self, p: Option<&Pending>, job_id: &str) {
        let Some(records) = &self.records else {
            return;
        };
        let done = match p {
            Some(p) => records.put(job_id, &PendingRecord::of(&p.req, &p.origin)),
            None => records.remove(job_id).map(|_| ()),
        };
        if let Err(e) = done {
            tracing::error!(job_id, error = %e, "approval request not persisted");
        }
    }

    /// Makes the records written so far durable.
    pub async fn flush(&self) {
        if let Some(records) = &self.records
            && let Err(e) = records.flush().await
        {
            tracing::error!(error = %e, "approval requests not persisted");
        }
    }

    /// Opens `req`, asked as `origin`; the receiver gets the decision
    /// (dropped on expiry). Also how a persisted request is reopened after
    /// a restart.
    pub fn open(
        &self,
        req: ApprovalRequest,
        origin: Origin,
    ) -> Result<oneshot::Receiver<Decision>, ApprovalsError> {
        let mut pending = self.lock();
        if pending.len() >= MAX_PENDING {
            return Err(ApprovalsError::Full);
        }
        let (tx, rx) = oneshot::channel();
        let id = req.job_id.as_str().to_string();
        let p = Pending {
            req,
            origin,
            wake: Some(tx),
        };
        self.keep(Some(&p), &id);
        pending.insert(id, p);
        Ok(rx)
    }

    /// Remembers the platform id of the posted request.
    pub fn posted(&self, job_id: &str, message: Option<String>) {
        let mut pending = self.lock();
        if let Some(p) = pending.get_mut(job_id) {
            p.origin.message = message;
            self.keep(Some(p), job_id);
        }
    }

    /// Removes a request (expired, or its task ended) and its record; true
    /// if it was open.
    pub fn close(&self, job_id: &str) -> bool {
        let was = self.lock().remove(job_id).is_some();
        self.keep(None, job_id);
        was
    }

    /// Removes the record of a request that has ended: approved (once its
    /// job is owed), or ended after a restart.
    pub fn forget(&self, job_id: &str) {
        self.keep(None, job_id);
    }

    /// Every persisted record; unreadable ones (damaged, or of an unknown
    /// version) with the reason.
    pub fn load(&self) -> Result<Vec<Result<PendingRecord, Unreadable>>, StoreError> {
        let Some(records) = &self.records else {
            return Ok(Vec::new());
        };
        Ok(records
            .all()?
            .into_iter()
            .map(|r| match r {
                Ok((_, rec)) if rec.v == RECORD_VERSION => Ok(rec),
                Ok((key, rec)) => Err(Unreadable {
                    key,
                    reason: format!(
                        "approval record version {} (this gateway reads {RECORD_VERSION})",
                        rec.v
                    ),
                }),
                Err(u) => Err(u),
            })
            .collect())
    }

    /// The raw tree, for tests that plant damaged records.
    pub fn records(&self) -> Option<&Records<PendingRecord>> {
        self.records.as_ref()
    }

    /// The request `prefix` names among those `who` may see: their own, or
    /// ones for a command they could approve somewhere. The rest are
    /// "not waiting" to them, and count for no ambiguity.
    fn find<'m>(
        pending: &'m mut HashMap<String, Pending>,
        prefix: &str,
        policy: &Policy,
        who: &Identity,
    ) -> Result<&'m mut Pending, ApprovalsError> {
        let named = JobRef::parse(prefix)?;
        let sees = |p: &Pending| {
            who.same_person(&p.req.requester)
                || fleetcmd_core::rbac::may_see_approval(policy, who, &p.req.command)
        };
        let mut hits = pending
            .iter()
            .filter(|(k, p)| named.matches(k) && sees(p))
            .map(|(k, _)| k);
        let key = match (hits.next(), hits.next()) {
            (Some(k), None) => k.clone(),
            (Some(_), Some(_)) => return Err(ApprovalsError::Ambiguous(prefix.to_string())),
            _ if pending.keys().any(|k| named.matches(k)) => {
                return Err(ApprovalsError::Hidden(prefix.to_string()));
            }
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
        let p = Self::find(&mut pending, prefix, policy, who)?;
        let progress = p.req.approve(policy, who, channel, now)?;
        let outcome = Outcome {
            job_id: p.req.job_id.as_str().to_string(),
            command: p.req.command.clone(),
            requester: p.req.requester.clone(),
            progress,
        };
        // Kept until the approved job is owed (see `forget`).
        self.keep(Some(p), &outcome.job_id);
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
        let p = Self::find(&mut pending, prefix, policy, who)?;
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
        self.keep(None, &outcome.job_id);
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
