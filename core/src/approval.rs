//! Two-person approval: which approvals count, and the state of one pending
//! request. Pure: the gateway holds the requests and the clock.
//!
//! Approvals are evidence, not a list. Each [`Approval`] in a signed job is
//! itself signed by a policy signer over the job's [`JobSpec::approval_digest`]
//! (everything the job asks, without its approvals), the approver, the
//! channel it was given in and when. It counts only if that signer may vouch
//! for the approver (`vouches_for` in `[[signers]]`: a gateway for the chat
//! identities it verifies, an operator's key only for that operator), the
//! approver is not the requester, and the policy lets the approver approve
//! the command from that channel. Agents and the controller both run
//! [`verify_approvals`] on the signed job, so neither a gateway bug nor a
//! signer listing approvers it made up can make an unapproved job run.

use std::collections::BTreeSet;

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use serde::{Deserialize, Serialize};

use crate::crypto::{SigningKey, verify};
use crate::ids::{Identity, JobId};
use crate::job::JobSpec;
use crate::policy::Policy;
use crate::rbac::may_approve;

/// How long an approval request waits before it expires (15 minutes).
pub const DEFAULT_APPROVAL_WINDOW_SECS: u64 = 15 * 60;

/// One approval as it travels in a signed job: given by `approver` in
/// `channel` at `approved_at`, attested by the policy signer `key_id`.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Approval {
    pub approver: Identity,
    pub channel: String,
    /// Unix seconds.
    pub approved_at: u64,
    pub key_id: String,
    /// Ed25519 by `key_id` over [`approval_message`], base64.
    pub signature: String,
}

/// An approval a gateway (or an operator) has taken and not yet attested.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GivenApproval {
    pub approver: Identity,
    pub channel: String,
    /// Unix seconds.
    pub approved_at: u64,
}

/// The bytes an approval's signature covers. The domain prefix keeps them
/// from ever being mistaken for a job spec or a policy.
pub fn approval_message(
    job_id: &JobId,
    digest: &[u8; 32],
    approver: &Identity,
    channel: &str,
    approved_at: u64,
) -> Vec<u8> {
    format!(
        "fleetcmd-approval-v1\n{}\n{}\n{}\n{}\n{}",
        job_id.as_str(),
        crate::crypto::hex(digest),
        approver.as_str(),
        channel.escape_default(),
        approved_at
    )
    .into_bytes()
}

impl GivenApproval {
    /// Signs this approval of `spec` as signer `key_id`.
    pub fn attest(&self, spec: &JobSpec, key_id: &str, key: &SigningKey) -> Approval {
        let msg = approval_message(
            &spec.id,
            &spec.approval_digest(),
            &self.approver,
            &self.channel,
            self.approved_at,
        );
        Approval {
            approver: self.approver.clone(),
            channel: self.channel.clone(),
            approved_at: self.approved_at,
            key_id: key_id.to_string(),
            signature: STANDARD.encode(key.sign(&msg)),
        }
    }
}

/// Why an approval in a signed job does not count.
#[derive(thiserror::Error, Debug, Clone, PartialEq, Eq)]
pub enum NotCounted {
    #[error("attested by unknown signer \"{0}\"")]
    UnknownSigner(String),
    #[error("signer \"{signer}\" may not vouch for {approver}")]
    NotVouched { signer: String, approver: String },
    #[error("signature of {0}'s approval does not verify")]
    BadSignature(String),
    #[error("{0} requested the job")]
    Requester(String),
    #[error("{0} approved twice")]
    Duplicate(String),
    #[error("{approver} may not approve `{command}` from {channel}")]
    NotAnApprover {
        approver: String,
        command: String,
        channel: String,
    },
}

/// The approvals of a signed job, sorted into those that count and those
/// that do not (with the reason).
#[derive(Debug, Default)]
pub struct Verified<'a> {
    pub counted: BTreeSet<&'a Identity>,
    pub rejected: Vec<NotCounted>,
    /// The persons counted ([`Identity::person`]): one approval each.
    persons: BTreeSet<String>,
}

impl Verified<'_> {
    pub fn got(&self) -> u32 {
        u32::try_from(self.counted.len()).unwrap_or(u32::MAX)
    }
}

/// Checks every approval of `spec` against `policy`: attested by a signer
/// that vouches for the approver, signature valid over this job's digest,
/// not the requester, counted once, and the approver may approve the
/// command from the channel it was given in.
pub fn verify_approvals<'a>(policy: &Policy, spec: &'a JobSpec) -> Verified<'a> {
    let mut out = Verified::default();
    if spec.approvals.is_empty() {
        return out;
    }
    let digest = spec.approval_digest();
    for a in &spec.approvals {
        let who = a.approver.as_str().to_string();
        let Some(signer) = policy.signer(&a.key_id) else {
            out.rejected.push(NotCounted::UnknownSigner(
                a.key_id.chars().take(100).collect(),
            ));
            continue;
        };
        if !signer.vouches_for(&a.approver) {
            out.rejected.push(NotCounted::NotVouched {
                signer: signer.id.clone(),
                approver: who,
            });
            continue;
        }
        let msg = approval_message(&spec.id, &digest, &a.approver, &a.channel, a.approved_at);
        let sig_ok = STANDARD
            .decode(&a.signature)
            .is_ok_and(|sig| verify(&signer.public_key, &msg, &sig));
        if !sig_ok {
            out.rejected.push(NotCounted::BadSignature(who));
            continue;
        }
        if a.approver.same_person(&spec.requester) {
            out.rejected.push(NotCounted::Requester(who));
            continue;
        }
        if !may_approve(policy, &a.approver, &spec.command, &a.channel) {
            out.rejected.push(NotCounted::NotAnApprover {
                approver: who,
                command: spec.command.clone(),
                channel: a.channel.clone(),
            });
            continue;
        }
        if !out.persons.insert(a.approver.person()) {
            out.rejected.push(NotCounted::Duplicate(who));
            continue;
        }
        out.counted.insert(&a.approver);
    }
    out
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
    #[error("you may not approve `{command}` jobs in this channel")]
    NotAnApprover { command: String },
    #[error("this gateway's signer may not vouch for your approval")]
    NotVouched,
    #[error("only the requester or an allowed approver may deny job {}", crate::ids::short_form(.0))]
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
    /// In the order given; each approver counted once.
    pub approvals: Vec<GivenApproval>,
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
            approvals: Vec::new(),
            created_at: now,
            expires_at: now.saturating_add(window_secs),
        }
    }

    pub fn expired(&self, now: u64) -> bool {
        now >= self.expires_at
    }

    /// Records `who`'s approval, given in `channel`, checked against the
    /// current policy.
    pub fn approve(
        &mut self,
        policy: &Policy,
        who: &Identity,
        channel: &str,
        now: u64,
    ) -> Result<Progress, ApprovalError> {
        // As chat shows it: the short id.
        let id = crate::ids::short_form(self.job_id.as_str()).to_string();
        if self.expired(now) {
            return Err(ApprovalError::Expired(id));
        }
        if who.same_person(&self.requester) {
            return Err(ApprovalError::OwnRequest(id));
        }
        if self.approvals.iter().any(|a| a.approver.same_person(who)) {
            return Err(ApprovalError::AlreadyApproved(id));
        }
        if !may_approve(policy, who, &self.command, channel) {
            return Err(ApprovalError::NotAnApprover {
                command: self.command.clone(),
            });
        }
        self.approvals.push(GivenApproval {
            approver: who.clone(),
            channel: channel.to_string(),
            approved_at: now,
        });
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
        let mut persons = BTreeSet::new();
        let n = self
            .approvals
            .iter()
            .filter(|a| {
                !a.approver.same_person(&self.requester)
                    && may_approve(policy, &a.approver, &self.command, &a.channel)
                    && persons.insert(a.approver.person())
            })
            .count();
        u32::try_from(n).unwrap_or(u32::MAX)
    }

    /// Whether `who` may deny from `channel`: the requester (withdrawing)
    /// or an approver.
    pub fn check_deny(
        &self,
        policy: &Policy,
        who: &Identity,
        channel: &str,
    ) -> Result<(), ApprovalError> {
        if who.same_person(&self.requester) || may_approve(policy, who, &self.command, channel) {
            Ok(())
        } else {
            Err(ApprovalError::MayNotDeny(
                crate::ids::short_form(self.job_id.as_str()).to_string(),
            ))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crypto::test_keys::key;

    fn id(s: &str) -> Identity {
        Identity::parse(s).unwrap_or_else(|e| panic!("{e}"))
    }

    const CH: &str = "irc:net:#ops";

    fn policy_with_signers(signers: &str) -> Policy {
        Policy::parse(&format!(
            r#"
version = 1
{signers}
[commands.restart]
argv = ["/usr/bin/systemctl", "restart", "nginx.service"]
requires_approvals = 2

[commands.uptime]
argv = ["/usr/bin/uptime"]
requires_approvals = 1

[roles.oncall]
commands = ["restart", "uptime"]
channels = ["irc:net:#ops"]

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
"#
        ))
        .unwrap_or_else(|e| panic!("{e}"))
    }

    fn policy() -> Policy {
        policy_with_signers("")
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
            r.approve(&p, &id("irc:net:lead1"), CH, 1001),
            Ok(Progress::Waiting { got: 1, needed: 2 })
        );
        assert_eq!(
            r.approve(&p, &id("irc:net:lead1"), CH, 1002),
            Err(ApprovalError::AlreadyApproved(
                crate::ids::short_form(JOB).into()
            ))
        );
        assert_eq!(
            r.approve(&p, &id("irc:net:lead2"), CH, 1003),
            Ok(Progress::Approved)
        );
        assert_eq!(r.approvals[1].channel, CH);
        assert_eq!(r.approvals[1].approved_at, 1003);
    }

    #[test]
    fn one_person_under_another_irc_user_name_is_still_one_person() {
        let p = policy();
        // The requester reconnects as lead0!other@elsewhere: still lead0.
        let mut r = request("restart", 1);
        assert_eq!(
            r.approve(&p, &id("irc:net:LEAD0!~x@elsewhere"), CH, 1001),
            Err(ApprovalError::OwnRequest(
                crate::ids::short_form(JOB).into()
            ))
        );
        // One approver twice under two user names counts once.
        let mut r = request("restart", 2);
        assert_eq!(
            r.approve(&p, &id("irc:net:lead1!~a@h"), CH, 1001),
            Ok(Progress::Waiting { got: 1, needed: 2 })
        );
        assert_eq!(
            r.approve(&p, &id("irc:net:lead1!~b@h"), CH, 1002),
            Err(ApprovalError::AlreadyApproved(
                crate::ids::short_form(JOB).into()
            ))
        );
    }

    #[test]
    fn the_requester_never_approves() {
        let p = policy();
        let mut r = request("restart", 1);
        assert_eq!(
            r.approve(&p, &id("irc:net:lead0"), CH, 1001),
            Err(ApprovalError::OwnRequest(
                crate::ids::short_form(JOB).into()
            ))
        );
        assert!(r.approvals.is_empty());
    }

    #[test]
    fn only_listed_approvers_or_roles_with_the_command_approve() {
        let p = policy();
        // `[approvers]` lists restart: oncall members not matching lead* may not.
        let mut r = request("restart", 1);
        assert_eq!(
            r.approve(&p, &id("irc:net:bob"), CH, 1001),
            Err(ApprovalError::NotAnApprover {
                command: "restart".into()
            })
        );
        // No `[approvers]` entry for uptime: anyone whose roles include it.
        let mut r = request("uptime", 1);
        assert_eq!(
            r.approve(&p, &id("slack:T1:U9"), "slack:T1:C1", 1001),
            Ok(Progress::Approved)
        );
        let mut r = request("uptime", 1);
        assert_eq!(
            r.approve(&p, &id("mattermost:mm:u1"), "mattermost:mm:c1", 1001),
            Err(ApprovalError::NotAnApprover {
                command: "uptime".into()
            })
        );
    }

    #[test]
    fn approvals_from_outside_the_approvers_channels_are_refused() {
        let p = policy();
        // The lead's only role is scoped to #ops: not from #random, not in private.
        for channel in ["irc:net:#random", "irc:net:lead1", "slack:T1:C1"] {
            let mut r = request("restart", 1);
            assert_eq!(
                r.approve(&p, &id("irc:net:lead1"), channel, 1001),
                Err(ApprovalError::NotAnApprover {
                    command: "restart".into()
                }),
                "{channel}"
            );
            assert_eq!(
                r.check_deny(&p, &id("irc:net:lead1"), channel),
                Err(ApprovalError::MayNotDeny(
                    crate::ids::short_form(JOB).into()
                ))
            );
        }
    }

    #[test]
    fn nothing_is_taken_after_expiry() {
        let p = policy();
        let mut r = request("restart", 1);
        assert_eq!(
            r.approve(&p, &id("irc:net:lead1"), CH, 1060),
            Err(ApprovalError::Expired(crate::ids::short_form(JOB).into()))
        );
    }

    #[test]
    fn deny_by_requester_or_approver_only() {
        let p = policy();
        let r = request("restart", 1);
        assert_eq!(r.check_deny(&p, &id("irc:net:lead0"), CH), Ok(()));
        assert_eq!(r.check_deny(&p, &id("irc:net:lead7"), CH), Ok(()));
        assert_eq!(
            r.check_deny(&p, &id("slack:T1:U9"), "slack:T1:C1"),
            Err(ApprovalError::MayNotDeny(
                crate::ids::short_form(JOB).into()
            ))
        );
    }

    /// `gw` (key 1) vouches for irc:net identities; `mallory` (key 2) is an
    /// operator who may sign every command but vouches only for herself.
    fn signed_policy() -> Policy {
        policy_with_signers(&format!(
            r#"
[[signers]]
id = "gw"
public_key = "{}"
may_sign = ["*"]
vouches_for = ["irc:net:*"]

[[signers]]
id = "mallory"
public_key = "{}"
may_sign = ["*"]
vouches_for = ["cli:mallory"]
"#,
            key(1).public_key(),
            key(2).public_key()
        ))
    }

    fn restart_spec() -> JobSpec {
        let mut s = crate::job::tests::spec("restart");
        s.requester = id("irc:net:lead0");
        s.channel = CH.into();
        s
    }

    fn given(who: &str, channel: &str) -> GivenApproval {
        GivenApproval {
            approver: id(who),
            channel: channel.into(),
            approved_at: 1000,
        }
    }

    fn counted(p: &Policy, spec: &JobSpec) -> (Vec<String>, Vec<NotCounted>) {
        let v = verify_approvals(p, spec);
        (
            v.counted.iter().map(|i| i.as_str().to_string()).collect(),
            v.rejected,
        )
    }

    #[test]
    fn attested_approvals_count() {
        let p = signed_policy();
        let mut s = restart_spec();
        let a1 = given("irc:net:lead1", CH).attest(&s, "gw", &key(1));
        let a2 = given("irc:net:lead2", CH).attest(&s, "gw", &key(1));
        s.approvals = vec![a1, a2];
        let (ok, rejected) = counted(&p, &s);
        assert_eq!(ok, ["irc:net:lead1", "irc:net:lead2"]);
        assert!(rejected.is_empty(), "{rejected:?}");
    }

    #[test]
    fn a_signer_cannot_attest_approvals_for_identities_it_does_not_own() {
        let p = signed_policy();
        let mut s = restart_spec();
        s.requester = id("cli:mallory");
        // Mallory's key may sign every command, but not vouch for the leads.
        s.approvals = vec![
            given("irc:net:lead1", CH).attest(&s, "mallory", &key(2)),
            given("irc:net:lead2", CH).attest(&s, "mallory", &key(2)),
        ];
        let (ok, rejected) = counted(&p, &s);
        assert!(ok.is_empty());
        assert_eq!(
            rejected[0],
            NotCounted::NotVouched {
                signer: "mallory".into(),
                approver: "irc:net:lead1".into()
            }
        );
    }

    #[test]
    fn forged_moved_or_misplaced_approvals_do_not_count() {
        let p = signed_policy();
        let base = restart_spec();
        let good = given("irc:net:lead1", CH).attest(&base, "gw", &key(1));
        let check = |mutate: &dyn Fn(&mut JobSpec), expected: NotCounted| {
            let mut s = base.clone();
            s.approvals = vec![good.clone()];
            mutate(&mut s);
            let (ok, rejected) = counted(&p, &s);
            assert!(ok.is_empty(), "{expected:?}");
            assert_eq!(rejected, [expected]);
        };
        let bad_sig = NotCounted::BadSignature("irc:net:lead1".into());
        // The approval was for other arguments, another selector, another job.
        check(
            &|s| {
                s.args.insert("unit".into(), "app.service".into());
            },
            bad_sig.clone(),
        );
        check(&|s| s.selector = "role=db".into(), bad_sig.clone());
        check(&|s| s.expires_at += 1, bad_sig.clone());
        // Its channel or time rewritten after signing.
        check(
            &|s| s.approvals[0].channel = "irc:net:#x".into(),
            bad_sig.clone(),
        );
        check(&|s| s.approvals[0].approved_at += 1, bad_sig.clone());
        // Another approver's name on this signature.
        check(
            &|s| s.approvals[0].approver = id("irc:net:lead2"),
            NotCounted::BadSignature("irc:net:lead2".into()),
        );
        check(
            &|s| s.approvals[0].signature = "not base64!".into(),
            bad_sig.clone(),
        );
        // Signed by a key that is not the named signer's.
        let mut wrong = base.clone();
        wrong.approvals = vec![given("irc:net:lead1", CH).attest(&base, "gw", &key(2))];
        assert_eq!(counted(&p, &wrong).1, [bad_sig]);
        check(
            &|s| s.approvals[0].key_id = "nobody".into(),
            NotCounted::UnknownSigner("nobody".into()),
        );
    }

    #[test]
    fn requester_duplicates_and_channel_scope_are_enforced_on_the_evidence() {
        let p = signed_policy();
        let mut s = restart_spec();
        s.approvals = vec![
            given("irc:net:lead0", CH).attest(&s, "gw", &key(1)),
            given("irc:net:lead1", CH).attest(&s, "gw", &key(1)),
            given("irc:net:lead1", CH).attest(&s, "gw", &key(1)),
            given("irc:net:bob", CH).attest(&s, "gw", &key(1)),
            given("irc:net:lead2", "irc:net:lead2").attest(&s, "gw", &key(1)),
        ];
        let (ok, rejected) = counted(&p, &s);
        assert_eq!(ok, ["irc:net:lead1"]);
        assert_eq!(
            rejected,
            [
                NotCounted::Requester("irc:net:lead0".into()),
                NotCounted::Duplicate("irc:net:lead1".into()),
                NotCounted::NotAnApprover {
                    approver: "irc:net:bob".into(),
                    command: "restart".into(),
                    channel: CH.into()
                },
                NotCounted::NotAnApprover {
                    approver: "irc:net:lead2".into(),
                    command: "restart".into(),
                    channel: "irc:net:lead2".into()
                },
            ]
        );
    }
}
