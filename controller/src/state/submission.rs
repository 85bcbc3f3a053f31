//! Job submission checks: what the controller verifies of a signed job
//! before storing it (defence in depth: the agents check the same on
//! their own and decide), as a pure function of the policy, the caller,
//! the signed job and the time — no store, no network, no clock.
//!
//! Owns the order of the checks and which refusals are audited with the
//! requester's name (those of a job whose signature verified). Knows
//! nothing about targets, storage or dispatch: `Shared::submit` resolves
//! the selector against the registry, claims the short id and stores the
//! job after [`check`] accepted it.

use fleetcmd_core::authorize::Refusal;
use fleetcmd_core::ids::Identity;
use fleetcmd_core::job::{JobSpec, SignedJob};
use fleetcmd_core::policy::{CommandDef, Policy};
use fleetcmd_core::selector::Selector;
use fleetcmd_core::state::JobState;

use crate::error::ApiError;
use crate::pki::{Peer, Role};
use crate::store::JobRecord;

/// Grace after a target's timeout before a silent target is failed.
pub const RESULT_GRACE_SECS: u64 = 30;

/// A job the checks accepted.
#[derive(Debug)]
pub struct Accepted<'p> {
    pub spec: JobSpec,
    /// Its command as the policy defines it.
    pub command: &'p CommandDef,
    /// Its selector, parsed.
    pub selector: Selector,
}

/// Why a job was refused, and how the refusal is audited.
#[derive(Debug)]
pub enum Refused {
    /// Its signature or spec did not verify: audited with the caller as
    /// actor and the key id it named (the spec's names are not trusted).
    Unverified(Refusal),
    /// A verified job refused: audited with its requester, the caller,
    /// the job id, the command and `why`.
    Audited {
        spec: Box<JobSpec>,
        why: String,
        error: ApiError,
    },
    /// Refused without an audit record: the agents would refuse it the same
    /// way (unknown command, bad argument, bad selector).
    Unaudited(ApiError),
}

impl Refused {
    /// The error the caller is answered with.
    pub fn into_error(self) -> ApiError {
        match self {
            Refused::Unverified(r) => r.into(),
            Refused::Audited { error, .. } | Refused::Unaudited(error) => error,
        }
    }
}

/// Checks a signed job submitted by `peer` at `now` (Unix seconds) against
/// `policy`, in this order: signature and spec (`SignedJob::verify`); the
/// id's date; the command is in the allow-list and its arguments build an
/// argv; enough attested approvals; the requester is one the caller may
/// submit for; the selector parses; the requester's roles may run it there.
pub fn check<'p>(
    policy: &'p Policy,
    peer: &Peer,
    job: &SignedJob,
    now: u64,
) -> Result<Accepted<'p>, Refused> {
    let spec = job.verify(policy, now).map_err(Refused::Unverified)?;
    let audited = |spec: &JobSpec, why: String, error: ApiError| Refused::Audited {
        spec: Box::new(spec.clone()),
        why,
        error,
    };
    // A job id's time is when the job was made: not in the future, and
    // no longer before its not_before than a job may live (an approved
    // job is signed up to the approval window after its id was shown).
    // Otherwise an id dated 10889 or 1970 would pin a job on top of
    // `jobs` or hide it (found by an outside test).
    let made = spec.id.unix_ms() / 1000;
    let skew = fleetcmd_core::job::CLOCK_SKEW_SECS;
    if made > now.saturating_add(skew)
        || made.saturating_add(policy.max_job_lifetime.as_secs() + skew) < spec.not_before
    {
        let refusal = Refusal::Malformed(format!(
            "job id {} is dated {made}, in the future or long before its not_before {}: make a fresh id",
            spec.id.as_str(),
            spec.not_before
        ));
        return Err(audited(&spec, refusal.to_string(), refusal.into()));
    }
    let Some(command) = policy.command(&spec.command) else {
        return Err(Refused::Unaudited(
            Refusal::NotAllowed(spec.command.clone()).into(),
        ));
    };
    if let Err(e) = fleetcmd_core::argv::build_argv(command, &spec.args) {
        return Err(Refused::Unaudited(
            Refusal::BadArgument(e.to_string()).into(),
        ));
    }
    // Approvals are evidence: each must be attested by a signer that
    // vouches for its approver, over this job's digest (the agents check
    // the same on their own).
    let approvals = fleetcmd_core::approval::verify_approvals(policy, &spec);
    if approvals.got() < command.requires_approvals {
        let refusal = Refusal::missing_approvals(command.requires_approvals, &approvals);
        return Err(audited(&spec, refusal.to_string(), refusal.into()));
    }
    if let Err(e) = check_requester(peer, &spec.requester) {
        return Err(audited(&spec, e.to_string(), e));
    }
    let selector = super::parse_selector(&spec.selector).map_err(Refused::Unaudited)?;
    // The requester's roles bound what it may run, for operators as for
    // chat users (whose gateway checked the same): agents check it too.
    if let Err(d) = fleetcmd_core::rbac::check_run(
        policy,
        &spec.requester,
        &spec.channel,
        &spec.command,
        &selector,
    ) {
        let refusal = Refusal::RequesterMayNotRun(d.to_string());
        return Err(audited(&spec, refusal.to_string(), refusal.into()));
    }
    Ok(Accepted {
        spec,
        command,
        selector,
    })
}

/// An operator may only submit jobs in its own name; a gateway only for chat
/// identities (never posing as a CLI user).
fn check_requester(peer: &Peer, requester: &Identity) -> Result<(), ApiError> {
    let ok = match peer.role {
        Role::Operator => requester.as_str() == format!("cli:{}", peer.name),
        Role::Gateway => requester.scheme() != "cli",
        Role::Agent => false,
    };
    if ok {
        Ok(())
    } else {
        Err(ApiError::PermissionDenied(format!(
            "{} {} may not submit jobs as {requester}",
            peer.role, peer.name
        )))
    }
}

impl Accepted<'_> {
    /// Seconds a target may run: the command's timeout, or the job's own
    /// if it asked for less.
    pub fn target_timeout_secs(&self) -> u64 {
        let cmd = self.command.timeout.as_secs();
        if self.spec.timeout_secs > 0 {
            cmd.min(self.spec.timeout_secs)
        } else {
            cmd
        }
    }

    /// The job's record as stored at submit: running, every target
    /// pending (a target without a target record is pending).
    pub fn record(&self, job: &SignedJob, targets: Vec<String>, created_at_ms: u64) -> JobRecord {
        let spec = &self.spec;
        let timeout = self.target_timeout_secs();
        JobRecord {
            id: spec.id.to_string(),
            spec: job.spec.clone(),
            signature: job.signature.clone(),
            key_id: job.key_id.clone(),
            command: spec.command.clone(),
            args: spec.args.clone(),
            selector: spec.selector.clone(),
            requester: spec.requester.to_string(),
            channel: spec.channel.clone(),
            created_at_ms,
            deadline: spec.expires_at + timeout + RESULT_GRACE_SECS,
            state: JobState::Running,
            targets,
            rollout: spec.rollout,
            needs_approval: self.command.requires_approvals > 0,
            target_deadline_secs: timeout + RESULT_GRACE_SECS,
            expires_at: spec.expires_at,
            stopped: None,
        }
    }
}

/// The approvals a submitted job carries, for its audit record: who, in
/// which channel, attested by which signer (only counted ones get here).
pub fn approved_by(spec: &JobSpec) -> String {
    spec.approvals
        .iter()
        .map(|a| format!("{} in {} via {}", a.approver, a.channel, a.key_id))
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use fleetcmd_core::crypto::SigningKey;
    use fleetcmd_core::ids::JobId;
    use fleetcmd_core::job::Rollout;

    use super::*;

    const NOW: u64 = 1_800_000_000;

    fn key() -> SigningKey {
        let rng = ring::rand::SystemRandom::new();
        let der = ring::signature::Ed25519KeyPair::generate_pkcs8(&rng).expect("a random key");
        SigningKey::from_pkcs8_der(der.as_ref()).expect("a fresh key parses")
    }

    struct World {
        policy: Policy,
        alice: SigningKey,
        gw: SigningKey,
    }

    fn world() -> World {
        let (alice, gw) = (key(), key());
        let text = format!(
            r#"
version = 1

[[signers]]
id = "alice"
public_key = "{}"
may_sign = ["*"]
vouches_for = ["cli:alice"]

[[signers]]
id = "gw"
public_key = "{}"
may_sign = ["*"]
vouches_for = ["slack:T0001:*"]

[commands.uptime]
argv = ["/usr/bin/uptime"]
timeout = "1m"

[commands.restart]
argv = ["/usr/bin/systemctl", "restart", "{{unit}}"]
args.unit = {{ kind = "enum", values = ["nginx.service"] }}
requires_approvals = 1

[roles.ops]
commands = ["*"]

[[bindings]]
subjects = ["cli:alice", "slack:T0001:U1"]
roles = ["ops"]

[approvers]
restart = ["slack:T0001:U1"]
"#,
            alice.public_key(),
            gw.public_key()
        );
        let policy = Policy::parse(&text).unwrap_or_else(|e| panic!("{e}"));
        World { policy, alice, gw }
    }

    /// A job made at `made` (Unix seconds: its id's date), valid from NOW.
    fn spec(command: &str, requester: &str, made: u64) -> JobSpec {
        let ms = made * 1000;
        let id = format!(
            "{:08x}-{:04x}-7abc-8def-0123456789ab",
            ms >> 16,
            ms & 0xffff
        );
        JobSpec {
            id: JobId::parse(&id).unwrap_or_else(|e| panic!("{id}: {e}")),
            command: command.into(),
            args: BTreeMap::new(),
            selector: "role=web".into(),
            requester: Identity::parse(requester).unwrap_or_else(|e| panic!("{e}")),
            // A CLI job's channel is `cli`; a chat job's its room.
            channel: if requester.starts_with("cli:") {
                fleetcmd_core::rbac::CLI_CHANNEL.into()
            } else {
                "slack:T0001:C1".into()
            },
            approvals: Vec::new(),
            unattested_approvers: Vec::new(),
            timeout_secs: 0,
            not_before: NOW,
            expires_at: NOW + 300,
            rollout: Rollout::default(),
        }
    }

    fn peer(role: Role, name: &str) -> Peer {
        Peer {
            role,
            name: name.into(),
            serial: String::new(),
            issued_at: 0,
        }
    }

    /// What `check` says, as one line: `ok`, or how it is refused and why.
    fn outcome(w: &World, by: &Peer, spec: &JobSpec, key_id: &str) -> String {
        let key = if key_id == "gw" { &w.gw } else { &w.alice };
        let job = SignedJob::sign(spec, key_id, key);
        match check(&w.policy, by, &job, NOW) {
            Ok(a) => format!("ok {}", a.selector),
            Err(Refused::Unverified(r)) => format!("unverified: {r}"),
            Err(Refused::Audited { why, .. }) => format!("audited: {why}"),
            Err(Refused::Unaudited(e)) => format!("unaudited: {e}"),
        }
    }

    #[test]
    fn who_may_submit_what() {
        let w = world();
        let alice = peer(Role::Operator, "alice");
        let bob = peer(Role::Operator, "bob");
        let gateway = peer(Role::Gateway, "gw");
        let cases: &[(&Peer, JobSpec, &str, &str)] = &[
            (
                &alice,
                spec("uptime", "cli:alice", NOW),
                "alice",
                "ok role=web",
            ),
            (
                &gateway,
                spec("uptime", "slack:T0001:U1", NOW),
                "gw",
                "ok role=web",
            ),
            // Another operator cannot submit alice's signed job as hers.
            (
                &bob,
                spec("uptime", "cli:alice", NOW),
                "alice",
                "audited: operator bob may not submit jobs as cli:alice",
            ),
            // A gateway never poses as a CLI user.
            (
                &gateway,
                spec("uptime", "cli:alice", NOW),
                "alice",
                "audited: gateway gw may not submit jobs as cli:alice",
            ),
            // A key speaks only for the identities it vouches for.
            (
                &alice,
                spec("uptime", "slack:T0001:U1", NOW),
                "alice",
                "unverified: ",
            ),
        ];
        for (by, spec, key_id, expected) in cases {
            let got = outcome(&w, by, spec, key_id);
            assert!(
                got.starts_with(expected),
                "{by:?} {}: {got}",
                spec.requester
            );
        }
    }

    #[test]
    fn refusals_and_whether_they_are_audited() {
        let w = world();
        let alice = peer(Role::Operator, "alice");
        let gateway = peer(Role::Gateway, "gw");
        let check = |by: &Peer, spec: JobSpec, key_id: &str, starts: &str, has: &str| {
            let got = outcome(&w, by, &spec, key_id);
            assert!(got.starts_with(starts), "{got}");
            assert!(got.contains(has), "{got} lacks {has:?}");
        };
        // Not in the allow-list, or arguments that build no argv: the
        // agents would refuse it the same way; nothing to audit.
        check(
            &alice,
            spec("reboot", "cli:alice", NOW),
            "alice",
            "unaudited: ",
            "reboot",
        );
        let mut bad_arg = spec("restart", "cli:alice", NOW);
        bad_arg.args.insert("unit".into(), "sshd.service".into());
        check(&alice, bad_arg, "alice", "unaudited: ", "unit");
        let mut bad_selector = spec("uptime", "cli:alice", NOW);
        bad_selector.selector = "role=(".into();
        check(
            &alice,
            bad_selector,
            "alice",
            "unaudited: selector `role=(`",
            "",
        );
        // Verified but refused: audited with the requester.
        let mut approved = spec("restart", "cli:alice", NOW);
        approved.args.insert("unit".into(), "nginx.service".into());
        check(&alice, approved, "alice", "audited: ", "approval");
        check(
            &alice,
            spec("uptime", "cli:alice", NOW + 3600),
            "alice",
            "audited: ",
            "in the future or long before its not_before",
        );
        check(
            &alice,
            spec("uptime", "cli:alice", 1_000),
            "alice",
            "audited: ",
            "dated 1000",
        );
        // A chat user without a role that grants the command.
        check(
            &gateway,
            spec("uptime", "slack:T0001:U2", NOW),
            "gw",
            "audited: ",
            "you have no roles",
        );
        // A signature that does not match its bytes.
        let mut job = SignedJob::sign(&spec("uptime", "cli:alice", NOW), "alice", &w.alice);
        job.spec.push(b' ');
        assert!(
            matches!(
                check_job(&w, &alice, &job),
                Err(Refused::Unverified(Refusal::BadSignature))
            ),
            "a tampered spec verified"
        );
    }

    fn check_job<'p>(w: &'p World, by: &Peer, job: &SignedJob) -> Result<Accepted<'p>, Refused> {
        check(&w.policy, by, job, NOW)
    }

    #[test]
    fn the_record_of_an_accepted_job_carries_its_deadlines() {
        let w = world();
        let alice = peer(Role::Operator, "alice");
        let mut s = spec("uptime", "cli:alice", NOW);
        let job = SignedJob::sign(&s, "alice", &w.alice);
        let a = check_job(&w, &alice, &job).expect("accepted");
        assert_eq!(a.target_timeout_secs(), 60, "the command's timeout");
        let rec = a.record(&job, vec!["web-1".into()], 7);
        assert_eq!(rec.state, JobState::Running);
        assert_eq!(rec.target_deadline_secs, 60 + RESULT_GRACE_SECS);
        assert_eq!(rec.deadline, NOW + 300 + 60 + RESULT_GRACE_SECS);
        assert_eq!((rec.created_at_ms, rec.targets.len()), (7, 1));
        assert!(!rec.needs_approval);
        assert_eq!(rec.spec, job.spec, "the signed bytes, unchanged");
        // A job may ask for less time than its command allows, not more.
        s.timeout_secs = 5;
        let job = SignedJob::sign(&s, "alice", &w.alice);
        let a = check_job(&w, &alice, &job).expect("accepted");
        assert_eq!(a.target_timeout_secs(), 5);
        s.timeout_secs = 600;
        let job = SignedJob::sign(&s, "alice", &w.alice);
        let a = check_job(&w, &alice, &job).expect("accepted");
        assert_eq!(a.target_timeout_secs(), 60);
    }
}
