//! Two-person approval (DESIGN §3, §4): which approvals count, and the state
//! of one pending request. Pure: the gateway holds the requests and the
//! clock; agents and the controller use [`counted_approvers`] on the signed
//! job, so a gateway bug cannot make an unapproved job run.

use std::collections::BTreeSet;

use crate::ids::{Identity, JobId};
use crate::policy::Policy;
use crate::rbac::may_approve;

/// How long an approval request waits before it expires (15 minutes).
pub const DEFAULT_APPROVAL_WINDOW_SECS: u64 = 15 * 60;

/// The approvers of a job that count: distinct, never the requester, and
/// each allowed to approve `command` by the policy (`[approvers]`, or any
/// role that lists the command).
pub fn counted_approvers<'a>(
    policy: &Policy,
    command: &str,
    requester: &Identity,
    approvers: &'a [Identity],
) -> BTreeSet<&'a Identity> {
    approvers
        .iter()
        .filter(|a| *a != requester && may_approve(policy, a, command))
        .collect()
}

/// Why an approval (or a denial) was not taken. The messages name what is
/// wrong without revealing who else may approve.
#[derive(thiserror::Error, Debug, Clone, PartialEq, Eq)]
pub enum ApprovalError {
    #[error("you asked for job {0}; someone else must approve it")]
    OwnRequest(String),
    #[error("you already approved job {0}")]
    AlreadyApproved(String),
    #[error("the approval request for job {0} has expired")]
    Expired(String),
    #[error("you may not approve `{command}` jobs")]
    NotAnApprover { command: String },
    #[error("only the requester or an allowed approver may deny job {0}")]
    MayNotDeny(String),
}

/// Where a request stands after an approval.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Progress {
    /// More approvals are needed.
    Waiting { got: u32, needed: u32 },
    /// Enough distinct approvers: the job may be signed and submitted.
    Approved,
}

/// One job waiting for approval.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApprovalRequest {
    pub job_id: JobId,
    pub command: String,
    pub requester: Identity,
    pub needed: u32,
    /// In the order given; each counted once.
    pub approvers: Vec<Identity>,
    /// Unix seconds.
    pub created_at: u64,
    /// Unix seconds; no approval is taken after it.
    pub expires_at: u64,
}

impl ApprovalRequest {
    pub fn new(
        job_id: JobId,
        command: &str,
        requester: Identity,
        needed: u32,
        now: u64,
        window_secs: u64,
    ) -> ApprovalRequest {
        ApprovalRequest {
            job_id,
            command: command.to_string(),
            requester,
            needed,
            approvers: Vec::new(),
            created_at: now,
            expires_at: now.saturating_add(window_secs),
        }
    }

    pub fn expired(&self, now: u64) -> bool {
        now >= self.expires_at
    }

    /// Records `who`'s approval, checked against the current policy.
    pub fn approve(
        &mut self,
        policy: &Policy,
        who: &Identity,
        now: u64,
    ) -> Result<Progress, ApprovalError> {
        let id = self.job_id.as_str().to_string();
        if self.expired(now) {
            return Err(ApprovalError::Expired(id));
        }
        if *who == self.requester {
            return Err(ApprovalError::OwnRequest(id));
        }
        if self.approvers.contains(who) {
            return Err(ApprovalError::AlreadyApproved(id));
        }
        if !may_approve(policy, who, &self.command) {
            return Err(ApprovalError::NotAnApprover {
                command: self.command.clone(),
            });
        }
        self.approvers.push(who.clone());
        let got = self.got(policy);
        if got >= self.needed {
            Ok(Progress::Approved)
        } else {
            Ok(Progress::Waiting {
                got,
                needed: self.needed,
            })
        }
    }

    /// Approvals that count under `policy` (a policy change between two
    /// approvals can take an approver's right away).
    pub fn got(&self, policy: &Policy) -> u32 {
        let n = counted_approvers(policy, &self.command, &self.requester, &self.approvers).len();
        u32::try_from(n).unwrap_or(u32::MAX)
    }

    /// Whether `who` may deny: the requester (withdrawing) or an approver.
    pub fn check_deny(&self, policy: &Policy, who: &Identity) -> Result<(), ApprovalError> {
        if *who == self.requester || may_approve(policy, who, &self.command) {
            Ok(())
        } else {
            Err(ApprovalError::MayNotDeny(self.job_id.as_str().to_string()))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(s: &str) -> Identity {
        Identity::parse(s).unwrap_or_else(|e| panic!("{e}"))
    }

    fn policy() -> Policy {
        Policy::parse(
            r#"
version = 1

[commands.restart]
argv = ["/usr/bin/systemctl", "restart", "nginx.service"]
requires_approvals = 2

[commands.uptime]
argv = ["/usr/bin/uptime"]
requires_approvals = 1

[roles.oncall]
commands = ["restart", "uptime"]

[roles.viewer]
commands = ["uptime"]

[[bindings]]
subjects = ["irc:net:*"]
roles = ["oncall"]

[[bindings]]
subjects = ["slack:T1:*"]
roles = ["viewer"]

[approvers]
restart = ["irc:net:lead*"]
"#,
        )
        .unwrap_or_else(|e| panic!("{e}"))
    }

    const JOB: &str = "01890a5d-ac96-774b-bcce-b302099a8057";

    fn request(command: &str, needed: u32) -> ApprovalRequest {
        ApprovalRequest::new(
            JobId::parse(JOB).unwrap_or_else(|e| panic!("{e}")),
            command,
            id("irc:net:lead0"),
            needed,
            1000,
            60,
        )
    }

    #[test]
    fn two_distinct_allowed_approvers_are_needed() {
        let p = policy();
        let mut r = request("restart", 2);
        assert_eq!(
            r.approve(&p, &id("irc:net:lead1"), 1001),
            Ok(Progress::Waiting { got: 1, needed: 2 })
        );
        assert_eq!(
            r.approve(&p, &id("irc:net:lead1"), 1002),
            Err(ApprovalError::AlreadyApproved(JOB.into()))
        );
        assert_eq!(
            r.approve(&p, &id("irc:net:lead2"), 1003),
            Ok(Progress::Approved)
        );
    }

    #[test]
    fn the_requester_never_approves() {
        let p = policy();
        let mut r = request("restart", 1);
        assert_eq!(
            r.approve(&p, &id("irc:net:lead0"), 1001),
            Err(ApprovalError::OwnRequest(JOB.into()))
        );
        assert!(r.approvers.is_empty());
    }

    #[test]
    fn only_listed_approvers_or_roles_with_the_command_approve() {
        let p = policy();
        // `[approvers]` lists restart: oncall members not matching lead* may not.
        let mut r = request("restart", 1);
        assert_eq!(
            r.approve(&p, &id("irc:net:bob"), 1001),
            Err(ApprovalError::NotAnApprover {
                command: "restart".into()
            })
        );
        // No `[approvers]` entry for uptime: anyone whose roles list it.
        let mut r = request("uptime", 1);
        assert_eq!(
            r.approve(&p, &id("slack:T1:U9"), 1001),
            Ok(Progress::Approved)
        );
        let mut r = request("uptime", 1);
        assert_eq!(
            r.approve(&p, &id("mattermost:mm:u1"), 1001),
            Err(ApprovalError::NotAnApprover {
                command: "uptime".into()
            })
        );
    }

    #[test]
    fn nothing_is_taken_after_expiry() {
        let p = policy();
        let mut r = request("restart", 1);
        assert_eq!(
            r.approve(&p, &id("irc:net:lead1"), 1060),
            Err(ApprovalError::Expired(JOB.into()))
        );
    }

    #[test]
    fn deny_by_requester_or_approver_only() {
        let p = policy();
        let r = request("restart", 1);
        assert_eq!(r.check_deny(&p, &id("irc:net:lead0")), Ok(()));
        assert_eq!(r.check_deny(&p, &id("irc:net:lead7")), Ok(()));
        assert_eq!(
            r.check_deny(&p, &id("slack:T1:U9")),
            Err(ApprovalError::MayNotDeny(JOB.into()))
        );
    }

    #[test]
    fn counted_approvers_drop_requester_duplicates_and_strangers() {
        let p = policy();
        let approvers = [
            id("irc:net:lead0"),
            id("irc:net:lead1"),
            id("irc:net:lead1"),
            id("irc:net:bob"),
            id("irc:net:lead2"),
        ];
        let got = counted_approvers(&p, "restart", &id("irc:net:lead0"), &approvers);
        let names: Vec<&str> = got.iter().map(|i| i.as_str()).collect();
        assert_eq!(names, ["irc:net:lead1", "irc:net:lead2"]);
    }
}
