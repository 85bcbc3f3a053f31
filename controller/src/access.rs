//! What an authenticated caller may read and do, from the current policy.
//!
//! An operator certificate acts as the identity `cli:<name>`: the policy's
//! `[[bindings]]` give it roles, and `fleetcmd_core::rbac` decides with the
//! same rules as for chat users (a job is visible to its requester and to
//! whoever could run its command on its targets; more only with a role's
//! `may` grants). Deny by default: without a policy, or without a grant,
//! an operator reads only its own jobs and manages nothing.
//!
//! A gateway certificate acts for chat users: the gateway decides per chat
//! identity and role (`chat-gateway/src/router.rs`), so reads through it are
//! not filtered here; revoking the gateway's certificate cuts it off.
//!
//! Every refusal is one `permission_denied` audit record.

use std::collections::BTreeMap;

use fleetcmd_core::audit::{Event, EventKind, Record};
use fleetcmd_core::ids::Identity;
use fleetcmd_core::policy::{Permission, Policy};
use fleetcmd_core::rbac::{self, CLI_CHANNEL, JobFacts};
use fleetcmd_proto::v1 as pb;

use crate::error::{ApiError, ApiResult};
use crate::pki::{Peer, Role};
use crate::state::Shared;

/// Whose rights a call is decided with.
enum Caller {
    /// A gateway: it filters per chat user itself.
    Gateway,
    /// An operator, as its `cli:` identity, with the current policy (none
    /// before the first push).
    Operator(Identity, Option<Policy>),
}

fn caller(shared: &Shared, peer: &Peer) -> ApiResult<Caller> {
    match peer.role {
        Role::Gateway => Ok(Caller::Gateway),
        Role::Operator => {
            let who = Identity::parse(&format!("cli:{}", peer.name)).map_err(|e| {
                ApiError::PermissionDenied(format!("operator name {:?}: {e}", peer.name))
            })?;
            Ok(Caller::Operator(
                who,
                shared.policy.current().map(|c| c.policy.clone()),
            ))
        }
        Role::Agent => Err(ApiError::PermissionDenied(
            "an agent certificate may not call this".into(),
        )),
    }
}

fn facts(job: &pb::Job) -> JobFacts<'_> {
    JobFacts {
        requester: &job.requester,
        command: &job.command,
        selector: &job.selector,
    }
}

/// Records the refusal and returns the error for the caller.
fn deny(shared: &Shared, peer: &Peer, job_id: &str, message: String) -> ApiError {
    shared.security_event(
        Event::new(EventKind::PermissionDenied, crate::audit::peer_actor(peer))
            .job(job_id)
            .detail(message.clone()),
    );
    ApiError::PermissionDenied(message)
}

/// A refusal about a job the caller may not see: neither the reply nor
/// the audit record (which the caller may read as their own action) names
/// the job's command or targets (outside tests read them from both).
fn deny_hidden(
    shared: &Shared,
    peer: &Peer,
    job: &pb::Job,
    refusal: String,
    grant: Permission,
) -> ApiError {
    let why = format!(
        "not its requester, your roles may not run its command on its targets, and none grants `{grant}`"
    );
    shared.security_event(
        Event::new(EventKind::PermissionDenied, crate::audit::peer_actor(peer))
            .job(&job.job_id)
            // The record is the caller's to read too (their own action):
            // it names the job, not its command or targets.
            .detail(format!("{refusal}: {why}")),
    );
    ApiError::PermissionDenied(format!("{refusal}: {why}"))
}

fn sees(who: &Identity, policy: Option<&Policy>, job: &pb::Job) -> bool {
    match policy {
        Some(p) => rbac::may_see_job(p, who, CLI_CHANNEL, facts(job)),
        None => job.requester == who.as_str(),
    }
}

/// `Jobs.Get`/`Watch` (and `job output`): refused, and audited, unless the
/// caller may see the job.
pub fn check_read(shared: &Shared, peer: &Peer, job: &pb::Job) -> ApiResult<()> {
    match caller(shared, peer)? {
        Caller::Gateway => Ok(()),
        Caller::Operator(who, policy) if sees(&who, policy.as_ref(), job) => Ok(()),
        Caller::Operator(who, _) => Err(deny_hidden(
            shared,
            peer,
            job,
            format!("{who} may not read that job"),
            Permission::ReadAllJobs,
        )),
    }
}

/// `Jobs.List`: the newest jobs the caller may see (others are left out,
/// not refused).
pub fn list_jobs(
    shared: &Shared,
    peer: &Peer,
    limit: u32,
    requester: &str,
    state: &str,
) -> ApiResult<Vec<pb::Job>> {
    match caller(shared, peer)? {
        Caller::Gateway => shared.list_jobs(limit, requester, state),
        Caller::Operator(who, policy) => {
            let keep = |job: JobFacts<'_>| match &policy {
                Some(p) => rbac::may_see_job(p, &who, CLI_CHANNEL, job),
                None => job.requester == who.as_str(),
            };
            shared.list_jobs_where(limit, requester, state, Some(&keep))
        }
    }
}

/// `Jobs.Cancel`: its requester, whoever could run it, or `jobs.cancel_any`.
pub fn check_cancel(shared: &Shared, peer: &Peer, job: &pb::Job) -> ApiResult<()> {
    match caller(shared, peer)? {
        Caller::Gateway => Ok(()),
        Caller::Operator(who, policy) => {
            let ok = match &policy {
                Some(p) => rbac::may_cancel_job(p, &who, CLI_CHANNEL, facts(job)),
                None => job.requester == who.as_str(),
            };
            if ok {
                Ok(())
            } else {
                Err(deny_hidden(
                    shared,
                    peer,
                    job,
                    format!("{who} may not cancel that job"),
                    Permission::CancelAnyJob,
                ))
            }
        }
    }
}

/// An operator-only action that needs `perm` (`what` names it in the
/// refusal). A gateway certificate is refused.
pub fn check_operator(shared: &Shared, peer: &Peer, perm: Permission, what: &str) -> ApiResult<()> {
    let granted = match caller(shared, peer)? {
        Caller::Gateway => {
            return Err(deny(
                shared,
                peer,
                "",
                format!("a gateway certificate may not {what}"),
            ));
        }
        Caller::Operator(who, policy) => policy
            .as_ref()
            .is_some_and(|p| rbac::may(p, &who, CLI_CHANNEL, perm)),
    };
    if granted {
        Ok(())
    } else {
        Err(deny(
            shared,
            peer,
            "",
            format!(
                "cli:{} may not {what}: none of its roles grants `{perm}`",
                peer.name
            ),
        ))
    }
}

/// `Tokens.Create`: `tokens.create`, for labels the role's `token_labels`
/// selects; a token naming an enrolled agent re-enrols it, so the role
/// must also select that agent's current enrolment labels (`enrolled`).
pub fn check_token(
    shared: &Shared,
    peer: &Peer,
    name: &str,
    labels: &BTreeMap<String, String>,
    enrolled: Option<&BTreeMap<String, String>>,
) -> ApiResult<()> {
    check_operator(shared, peer, Permission::CreateTokens, "create join tokens")?;
    let Caller::Operator(who, Some(policy)) = caller(shared, peer)? else {
        return Err(ApiError::PermissionDenied("no policy".into()));
    };
    rbac::check_token(&policy, &who, CLI_CHANNEL, name, labels, enrolled)
        .map_err(|e| deny(shared, peer, "", format!("{who}: {e}")))
}

/// `Health.Silence` from an operator: a role that may run some command on
/// the service's hosts (`selector`), the rule chat's `silence` applies per
/// chat user. A gateway has checked its chat user itself.
pub fn check_silence(shared: &Shared, peer: &Peer, service: &str, selector: &str) -> ApiResult<()> {
    let (who, policy) = match caller(shared, peer)? {
        Caller::Gateway => return Ok(()),
        Caller::Operator(who, policy) => (who, policy),
    };
    let result = match &policy {
        Some(p) => rbac::check_silence(p, &who, CLI_CHANNEL, selector),
        None => Err(rbac::Denied::Silence(selector.to_string())),
    };
    result.map_err(|e| {
        deny(
            shared,
            peer,
            "",
            format!("{who} may not silence {service}: {e}"),
        )
    })
}

/// `Audit.Search`: `None` when the caller reads every record; otherwise a
/// filter keeping the records the caller may read (those about a job only
/// when it may see that job).
pub fn audit_reader(
    shared: &Shared,
    peer: &Peer,
) -> ApiResult<Option<impl FnMut(&Record) -> bool + Send + use<>>> {
    let (who, policy) = match caller(shared, peer)? {
        Caller::Gateway => return Ok(None),
        Caller::Operator(who, policy) => (who, policy),
    };
    if let Some(p) = &policy
        && rbac::may(p, &who, CLI_CHANNEL, Permission::ReadAllAudit)
    {
        return Ok(None);
    }
    let store = shared.store.clone();
    // A page touches few jobs: each is read once.
    let mut jobs: std::collections::HashMap<String, Option<crate::store::JobRecord>> =
        std::collections::HashMap::new();
    Ok(Some(move |r: &Record| {
        let job = if r.event.job_id.is_empty() {
            None
        } else {
            jobs.entry(r.event.job_id.clone())
                .or_insert_with(|| store.get_job(&r.event.job_id).ok().flatten())
                .as_ref()
        };
        let facts = job.map(|j| JobFacts {
            requester: &j.requester,
            command: &j.command,
            selector: &j.selector,
        });
        match &policy {
            Some(p) => rbac::may_read_record(p, &who, CLI_CHANNEL, &r.event, facts),
            None => {
                r.event.actor == who.as_str() || facts.is_some_and(|f| f.requester == who.as_str())
            }
        }
    }))
}
