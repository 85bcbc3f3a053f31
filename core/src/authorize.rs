//! The agent's decision (invariant 5 in ARCHITECTURE.md): every check between a signed job
//! arriving and a command being executed. The only way to obtain an
//! [`AuthorizedCommand`], the one value the executor accepts, is [`authorize`].

use std::collections::BTreeMap;
use std::time::Duration;

use crate::approval::verify_approvals;
use crate::argv::PathArg;
use crate::ids::JobId;
use crate::job::{JobSpec, SignedJob};
use crate::policy::Policy;
use crate::selector::Selector;

/// What the agent knows about itself.
#[derive(Clone, Copy, Debug)]
pub struct AgentContext<'a> {
    pub policy: &'a Policy,
    pub name: &'a str,
    pub labels: &'a BTreeMap<String, String>,
    /// The host's own narrowing of the allow-list (`allow = [..]` in agent.toml).
    pub allow: Option<&'a [String]>,
}

/// Why an agent refused a job. Reported with [`Refusal::code`] and audited.
#[derive(thiserror::Error, Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    #[error(
        "job spec of {size} bytes exceeds the limit of {} bytes",
        crate::job::MAX_SPEC_BYTES
    )]
    Oversized { size: usize },
    #[error("job signed by unknown signer \"{0}\"")]
    UnknownSigner(String),
    #[error("signature does not verify")]
    BadSignature,
    #[error("signer \"{signer}\" may not sign command \"{command}\"")]
    SignerMayNotSign { signer: String, command: String },
    #[error("signer \"{signer}\" may not sign for {requester}")]
    SignerMayNotVouch { signer: String, requester: String },
    #[error("the requester may not run this: {0}")]
    RequesterMayNotRun(String),
    #[error("malformed job spec: {0}")]
    Malformed(String),
    #[error("job is not yet valid")]
    NotYetValid,
    #[error("job expired")]
    Expired,
    #[error(
        "job is valid for {lifetime}s (expires_at - not_before), longer than the policy's max_job_lifetime of {max}s"
    )]
    LifetimeTooLong { lifetime: u64, max: u64 },
    #[error("policy has expired; refusing every job until a newer policy arrives")]
    PolicyExpired,
    #[error("job id already seen (replay)")]
    Replayed,
    #[error("command \"{0}\" is not in the allow-list")]
    NotAllowed(String),
    #[error("command \"{0}\" is not allowed on this host")]
    NarrowedByHost(String),
    #[error("{0}")]
    BadArgument(String),
    #[error("this agent is not matched by the job's selector")]
    NotTargeted,
    #[error("the command's `targets` do not include this host")]
    CommandNotForThisHost,
    #[error(
        "needs {needed} approval(s), got {got}{}",
        not_counted_note(not_counted)
    )]
    MissingApprovals {
        needed: u32,
        got: u32,
        /// Why the approvals that did not count were refused.
        not_counted: Vec<String>,
    },
    #[error("invalid target selector: {0}")]
    BadSelector(String),
    #[error("the stream that delivered the job ended before it could start ({0})")]
    StreamEnded(String),
    #[error("the controller refused this agent (revoked) before the job could start ({0})")]
    AgentRevoked(String),
}

fn not_counted_note(not_counted: &[String]) -> String {
    if not_counted.is_empty() {
        String::new()
    } else {
        format!(" (not counted: {})", not_counted.join("; "))
    }
}

impl Refusal {
    /// Approvals short of `needed`, with why the others did not count.
    pub fn missing_approvals(needed: u32, v: &crate::approval::Verified<'_>) -> Refusal {
        Refusal::MissingApprovals {
            needed,
            got: v.got(),
            not_counted: v.rejected.iter().map(ToString::to_string).collect(),
        }
    }

    /// A stable snake_case code for metrics, audit records and the wire.
    pub fn code(&self) -> &'static str {
        match self {
            Refusal::Oversized { .. } => "oversized",
            Refusal::UnknownSigner(_) => "unknown_signer",
            Refusal::BadSignature => "bad_signature",
            Refusal::SignerMayNotSign { .. } => "signer_may_not_sign",
            Refusal::SignerMayNotVouch { .. } => "signer_may_not_vouch",
            Refusal::RequesterMayNotRun(_) => "requester_may_not_run",
            Refusal::Malformed(_) => "malformed",
            Refusal::NotYetValid => "not_yet_valid",
            Refusal::Expired => "expired",
            Refusal::LifetimeTooLong { .. } => "lifetime_too_long",
            Refusal::PolicyExpired => "policy_expired",
            Refusal::Replayed => "replayed",
            Refusal::NotAllowed(_) => "not_allowed",
            Refusal::NarrowedByHost(_) => "narrowed_by_host",
            Refusal::BadArgument(_) => "bad_argument",
            Refusal::NotTargeted => "not_targeted",
            Refusal::CommandNotForThisHost => "command_not_for_this_host",
            Refusal::MissingApprovals { .. } => "missing_approvals",
            Refusal::BadSelector(_) => "bad_selector",
            Refusal::StreamEnded(_) => "stream_ended",
            Refusal::AgentRevoked(_) => "agent_revoked",
        }
    }
}

/// A command that passed every check, with its argv ready to execute.
#[derive(Clone, Debug)]
pub struct AuthorizedCommand {
    /// Kept to check everything again at the moment of use ([`recheck`]).
    job: SignedJob,
    spec: JobSpec,
    argv: Vec<String>,
    paths: Vec<PathArg>,
    run_as: Option<String>,
    timeout: Duration,
    env: BTreeMap<String, String>,
}

impl AuthorizedCommand {
    pub fn job_id(&self) -> &JobId {
        &self.spec.id
    }
    pub fn spec(&self) -> &JobSpec {
        &self.spec
    }
    /// argv[0] is the absolute program path; never pass this to a shell.
    pub fn argv(&self) -> &[String] {
        &self.argv
    }
    /// The `path` arguments (with prefixes) in argv, which the executor
    /// opens beneath their prefix without following symbolic links.
    pub fn paths(&self) -> &[PathArg] {
        &self.paths
    }
    pub fn run_as(&self) -> Option<&str> {
        self.run_as.as_deref()
    }
    /// `min(spec.timeout_secs (when > 0), the command's timeout)`.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }
    /// The command's declared environment.
    pub fn env(&self) -> &BTreeMap<String, String> {
        &self.env
    }
    /// Unix seconds; the seen-set must keep the job id until then (plus skew).
    pub fn expires_at(&self) -> u64 {
        self.spec.expires_at
    }
}

/// Runs every check of ARCHITECTURE.md invariant 5 in order: [`SignedJob::verify`]
/// (signature, signer trust, may_sign, time); the policy's own expiry;
/// replay (`seen`); the allow-list and the host's narrowing; argument
/// validation; the job's selector and the command's `targets` against this
/// agent; approvals (distinct, never the requester, each allowed to
/// approve the command by the policy).
pub fn authorize(
    job: &SignedJob,
    ctx: &AgentContext,
    now: u64,
    seen: &dyn Fn(&JobId) -> bool,
) -> Result<AuthorizedCommand, Refusal> {
    let policy = ctx.policy;
    let spec = job.verify(policy, now)?;
    if policy.expires.is_some_and(|exp| now > exp) {
        return Err(Refusal::PolicyExpired);
    }
    if seen(&spec.id) {
        return Err(Refusal::Replayed);
    }
    let def = policy
        .command(&spec.command)
        .ok_or_else(|| Refusal::NotAllowed(spec.command.clone()))?;
    if let Some(allow) = ctx.allow
        && !allow.contains(&spec.command)
    {
        return Err(Refusal::NarrowedByHost(spec.command.clone()));
    }
    let built =
        crate::argv::build(def, &spec.args).map_err(|e| Refusal::BadArgument(e.to_string()))?;
    let selector =
        Selector::parse(&spec.selector).map_err(|e| Refusal::BadSelector(e.to_string()))?;
    if !selector.matches(ctx.name, ctx.labels) {
        return Err(Refusal::NotTargeted);
    }
    if def
        .targets
        .as_ref()
        .is_some_and(|t| !t.matches(ctx.name, ctx.labels))
    {
        return Err(Refusal::CommandNotForThisHost);
    }
    // The requester's own roles: the command, from this channel, on targets
    // within the role's — the same rule the gateway and controller apply
    // before signing, checked again here so no signer can ask beyond them.
    crate::rbac::check_run(
        policy,
        &spec.requester,
        &spec.channel,
        &spec.command,
        &selector,
    )
    .map_err(|d| Refusal::RequesterMayNotRun(d.to_string()))?;
    let approvals = verify_approvals(policy, &spec);
    if approvals.got() < def.requires_approvals {
        return Err(Refusal::missing_approvals(
            def.requires_approvals,
            &approvals,
        ));
    }
    let timeout = match spec.timeout_secs {
        0 => def.timeout,
        secs => def.timeout.min(Duration::from_secs(secs)),
    };
    Ok(AuthorizedCommand {
        job: job.clone(),
        argv: built.argv,
        paths: built.paths,
        run_as: def.run_as.clone(),
        timeout,
        env: def.env.clone(),
        spec,
    })
}

/// What the agent knows, at the moment of use, about the stream that
/// delivered a job. The agent learns that the controller no longer accepts
/// it (revocation) only from that stream ending, so a job may start only
/// while the stream that delivered it is still up.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Stream {
    /// Still connected.
    Up,
    /// Ended; the controller refused the agent (permission denied or
    /// unauthenticated: what it answers a revoked agent).
    Refused(String),
    /// Ended for another reason (network, controller restart, shutdown).
    Ended(String),
}

/// Every check of [`authorize`] again, immediately before the process
/// starts, against what the agent knows *now*: the current policy (a newer
/// version may have removed the command or the signer, changed its
/// arguments, `targets` or approvers, or expired), the clock (the job or
/// the policy may have expired while the job waited for a slot), the
/// agent's labels and allow-list, and the stream that delivered the job
/// (see [`Stream`]). The job id is not checked against the seen-set again:
/// it was recorded there when the job was first authorized. Returns the
/// command built from the current policy, which is what runs.
pub fn recheck(
    cmd: &AuthorizedCommand,
    ctx: &AgentContext,
    now: u64,
    stream: &Stream,
) -> Result<AuthorizedCommand, Refusal> {
    match stream {
        Stream::Up => {}
        Stream::Refused(why) => return Err(Refusal::AgentRevoked(why.clone())),
        Stream::Ended(why) => return Err(Refusal::StreamEnded(why.clone())),
    }
    authorize(&cmd.job, ctx, now, &|_| false)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crypto::test_keys::key;
    use crate::ids::Identity;
    use crate::job::tests::{JOB_ID, NOW, policy, spec};

    fn id(s: &str) -> Identity {
        Identity::parse(s).unwrap_or_else(|e| panic!("{e}"))
    }

    fn restart(approvers: &[&str]) -> JobSpec {
        let mut s = spec("restart");
        s.args.insert("unit".into(), "nginx.service".into());
        s.selector = "role=web".into();
        approved(s, approvers)
    }

    /// `s` with approvals by `approvers`, attested by the gateway `gw`.
    fn approved(mut s: JobSpec, approvers: &[&str]) -> JobSpec {
        let approvals: Vec<_> = approvers
            .iter()
            .map(|a| {
                crate::approval::GivenApproval {
                    approver: id(a),
                    channel: "slack:T0001:C1".into(),
                    approved_at: NOW,
                }
                .attest(&s, "gw", &key(1))
            })
            .collect();
        s.approvals = approvals;
        s
    }

    struct Case {
        spec: JobSpec,
        name: &'static str,
        labels: &'static str,
        allow: Option<Vec<String>>,
        seen: bool,
        expected: Result<(), Refusal>,
    }

    fn case(spec: JobSpec, expected: Result<(), Refusal>) -> Case {
        Case {
            spec,
            name: "web-1",
            labels: "role=web,env=prod",
            allow: None,
            seen: false,
            expected,
        }
    }

    fn check(c: Case) {
        let p = policy();
        let labels = crate::selector::parse_labels(c.labels).unwrap_or_else(|e| panic!("{e}"));
        let ctx = AgentContext {
            policy: &p,
            name: c.name,
            labels: &labels,
            allow: c.allow.as_deref(),
        };
        let job = SignedJob::sign(&c.spec, "gw", &key(1));
        let got = authorize(&job, &ctx, NOW, &|_| c.seen);
        assert_eq!(got.map(|_| ()), c.expected, "{:?}", c.spec);
    }

    #[test]
    fn decision_table() {
        let two = ["slack:T0001:U2", "slack:T0001:U3"];
        check(case(spec("uptime"), Ok(())));
        check(case(restart(&two), Ok(())));
        check(Case {
            seen: true,
            ..case(spec("uptime"), Err(Refusal::Replayed))
        });
        check(case(spec("rm"), Err(Refusal::NotAllowed("rm".into()))));
        check(Case {
            allow: Some(vec!["restart".into()]),
            ..case(
                spec("uptime"),
                Err(Refusal::NarrowedByHost("uptime".into())),
            )
        });
        check(Case {
            allow: Some(vec!["uptime".into()]),
            ..case(spec("uptime"), Ok(()))
        });
        check(Case {
            name: "db-1",
            labels: "role=db",
            ..case(restart(&two), Err(Refusal::NotTargeted))
        });
        let mut any = restart(&two);
        any.selector = "all".into();
        check(Case {
            name: "db-1",
            labels: "role=db",
            ..case(any, Err(Refusal::CommandNotForThisHost))
        });
        let mut bad_sel = spec("uptime");
        bad_sel.selector = "role in (".into();
        assert!(matches!(
            authorize_one(bad_sel),
            Err(Refusal::BadSelector(_))
        ));
        let mut bad_arg = restart(&two);
        bad_arg.args.insert("unit".into(), "sshd.service".into());
        assert!(
            matches!(authorize_one(bad_arg), Err(Refusal::BadArgument(m)) if m.contains("not one of"))
        );
        let mut dash = restart(&two);
        dash.args.insert("unit".into(), "--help".into());
        assert!(
            matches!(authorize_one(dash), Err(Refusal::BadArgument(m)) if m.contains("must not start with `-`"))
        );
    }

    fn authorize_one(s: JobSpec) -> Result<AuthorizedCommand, Refusal> {
        let p = policy();
        let labels = crate::selector::parse_labels("role=web").unwrap_or_default();
        let ctx = AgentContext {
            policy: &p,
            name: "web-1",
            labels: &labels,
            allow: None,
        };
        authorize(&SignedJob::sign(&s, "gw", &key(1)), &ctx, NOW, &|_| false)
    }

    /// `s` authorized under the test policy as changed by `edit`.
    fn authorize_under(s: JobSpec, edit: impl FnOnce(&mut Policy)) -> Result<(), Refusal> {
        let mut p = policy();
        edit(&mut p);
        let labels = crate::selector::parse_labels("role=web").unwrap_or_default();
        let ctx = AgentContext {
            policy: &p,
            name: "web-1",
            labels: &labels,
            allow: None,
        };
        authorize(&SignedJob::sign(&s, "gw", &key(1)), &ctx, NOW, &|_| false).map(|_| ())
    }

    #[test]
    fn the_requester_needs_a_role_for_the_command_its_channel_and_targets() {
        assert_eq!(authorize_under(spec("uptime"), |_| {}), Ok(()));
        // No role at all: a signer that may sign everything asks for nobody.
        assert_eq!(
            authorize_under(spec("uptime"), |p| p.bindings.clear()),
            Err(Refusal::RequesterMayNotRun("you have no roles".into()))
        );
        // The role is for another channel.
        let r = authorize_under(spec("uptime"), |p| {
            if let Some(r) = p.roles.get_mut("ops") {
                r.channels = vec!["slack:T0001:COTHER".into()];
            }
        });
        assert!(
            matches!(&r, Err(Refusal::RequesterMayNotRun(m)) if m.contains("in this channel")),
            "{r:?}"
        );
        // The role's targets do not contain the job's selector.
        let mut on_all = restart(&[]);
        on_all.selector = "all".into();
        let on_all = approved(on_all, &["slack:T0001:U2", "slack:T0001:U3"]);
        let r = authorize_under(on_all, |p| {
            if let Some(r) = p.roles.get_mut("ops") {
                r.targets = crate::selector::Selector::parse("role=web").ok();
            }
        });
        assert!(
            matches!(&r, Err(Refusal::RequesterMayNotRun(m)) if m.contains("may only target")),
            "{r:?}"
        );
    }

    #[test]
    fn approvals() {
        let missing = |got, not_counted: &[&str]| {
            Err(Refusal::MissingApprovals {
                needed: 2,
                got,
                not_counted: not_counted.iter().map(|s| s.to_string()).collect(),
            })
        };
        check(case(restart(&[]), missing(0, &[])));
        check(case(restart(&["slack:T0001:U2"]), missing(1, &[])));
        // The requester (slack:T0001:U1) cannot approve their own job.
        check(case(
            restart(&["slack:T0001:U1", "slack:T0001:U2"]),
            missing(1, &["slack:T0001:U1 requested the job"]),
        ));
        // Duplicates count once.
        check(case(
            restart(&["slack:T0001:U2", "slack:T0001:U2"]),
            missing(1, &["slack:T0001:U2 approved twice"]),
        ));
        // A bare list of approvers, as signers wrote before approvals were
        // evidence, counts for nothing.
        let mut listed = restart(&[]);
        listed.unattested_approvers = vec![id("slack:T0001:U2"), id("slack:T0001:U3")];
        check(case(listed, missing(0, &[])));
        check(case(
            restart(&["slack:T0001:U2", "slack:T0001:U3", "slack:T0001:U2"]),
            Ok(()),
        ));
        // Someone the policy does not allow to approve `restart` is not counted.
        check(case(
            restart(&["slack:T0001:U2", "slack:T0001:U9"]),
            missing(
                1,
                &["slack:T0001:U9 may not approve `restart` from slack:T0001:C1"],
            ),
        ));
    }

    #[test]
    fn signature_and_time_checks_come_first() {
        let p = policy();
        let labels = BTreeMap::new();
        let ctx = AgentContext {
            policy: &p,
            name: "web-1",
            labels: &labels,
            allow: None,
        };
        let forged = SignedJob::sign(&spec("uptime"), "gw", &key(9));
        // A forged job is refused as such even when its id was seen.
        assert_eq!(
            authorize(&forged, &ctx, NOW, &|_| true).err(),
            Some(Refusal::BadSignature)
        );
        let good = SignedJob::sign(&spec("uptime"), "gw", &key(1));
        assert_eq!(
            authorize(&good, &ctx, NOW + 100_000, &|_| true).err(),
            Some(Refusal::Expired)
        );
    }

    #[test]
    fn expired_policy_refuses_everything() {
        let mut p = policy();
        p.expires = Some(NOW - 1);
        let labels = BTreeMap::new();
        let ctx = AgentContext {
            policy: &p,
            name: "web-1",
            labels: &labels,
            allow: None,
        };
        let good = SignedJob::sign(&spec("uptime"), "gw", &key(1));
        assert_eq!(
            authorize(&good, &ctx, NOW, &|_| false).err(),
            Some(Refusal::PolicyExpired)
        );
        p.expires = Some(NOW);
        let ctx = AgentContext {
            policy: &p,
            name: "web-1",
            labels: &labels,
            allow: None,
        };
        assert!(authorize(&good, &ctx, NOW, &|_| false).is_ok());
    }

    #[test]
    fn authorized_command_contents() {
        let mut s = restart(&[]);
        s.timeout_secs = 30;
        let s = approved(s, &["slack:T0001:U2", "slack:T0001:U3"]);
        let cmd = authorize_one(s.clone()).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            cmd.argv(),
            ["/usr/bin/systemctl", "restart", "nginx.service"]
        );
        assert_eq!(cmd.timeout(), Duration::from_secs(30));
        assert_eq!(cmd.job_id().as_str(), JOB_ID);
        assert_eq!(cmd.expires_at(), s.expires_at);
        assert_eq!(cmd.run_as(), None);
        assert!(cmd.env().is_empty());
        assert_eq!(cmd.spec(), &s);
        for (secs, expected) in [(0, 120), (100_000, 120)] {
            let mut t = restart(&[]);
            t.timeout_secs = secs;
            let t = approved(t, &["slack:T0001:U2", "slack:T0001:U3"]);
            assert_eq!(
                authorize_one(t).map(|c| c.timeout()),
                Ok(Duration::from_secs(expected))
            );
        }
    }

    /// A job authorized at `NOW` under the test policy, then checked again
    /// at `now` against `policy` (edited from the test policy), `labels`
    /// and `stream`.
    fn recheck_with(
        edit: impl Fn(&mut Policy),
        labels: &str,
        now: u64,
        stream: Stream,
    ) -> Result<(), Refusal> {
        let p = policy();
        let web = crate::selector::parse_labels("role=web").unwrap_or_default();
        let ctx = AgentContext {
            policy: &p,
            name: "web-1",
            labels: &web,
            allow: None,
        };
        let job = SignedJob::sign(
            &restart(&["slack:T0001:U2", "slack:T0001:U3"]),
            "gw",
            &key(1),
        );
        let admitted = authorize(&job, &ctx, NOW, &|_| false).unwrap_or_else(|e| panic!("{e}"));
        let mut newer = policy();
        newer.version += 1;
        edit(&mut newer);
        let labels = crate::selector::parse_labels(labels).unwrap_or_default();
        let ctx = AgentContext {
            policy: &newer,
            name: "web-1",
            labels: &labels,
            allow: None,
        };
        recheck(&admitted, &ctx, now, &stream).map(|_| ())
    }

    #[test]
    fn everything_is_checked_again_at_the_moment_of_use() {
        let up = || Stream::Up;
        let same = |_: &mut Policy| {};
        // Nothing changed: it still runs (the seen-set is not consulted again).
        assert_eq!(recheck_with(same, "role=web", NOW + 5, up()), Ok(()));
        let last_second = NOW + crate::job::DEFAULT_EXPIRY_SECS + crate::job::CLOCK_SKEW_SECS;
        assert_eq!(recheck_with(same, "role=web", last_second, up()), Ok(()));
        // It waited for a slot past its expiry (plus skew).
        assert_eq!(
            recheck_with(same, "role=web", last_second + 1, up()),
            Err(Refusal::Expired)
        );
        // A newer policy removed the command, the signer, or narrowed it.
        assert_eq!(
            recheck_with(
                |p| {
                    p.commands.remove("restart");
                },
                "role=web",
                NOW,
                up()
            ),
            Err(Refusal::NotAllowed("restart".into()))
        );
        assert_eq!(
            recheck_with(|p| p.signers.clear(), "role=web", NOW, up()),
            Err(Refusal::UnknownSigner("gw".into()))
        );
        assert_eq!(
            recheck_with(
                |p| p.signers[0].may_sign = vec!["uptime".into()],
                "role=web",
                NOW,
                up()
            ),
            Err(Refusal::SignerMayNotSign {
                signer: "gw".into(),
                command: "restart".into()
            })
        );
        let narrowed = |p: &mut Policy| {
            if let Some(c) = p.commands.get_mut("restart")
                && let Some(a) = c.args.get_mut("unit")
            {
                a.kind = crate::policy::ArgKind::Enum {
                    values: vec!["app.service".into()],
                };
            }
        };
        assert!(matches!(
            recheck_with(narrowed, "role=web", NOW, up()),
            Err(Refusal::BadArgument(m)) if m.contains("not one of app.service")
        ));
        let targets = |p: &mut Policy| {
            if let Some(c) = p.commands.get_mut("restart") {
                c.targets = crate::selector::Selector::parse("role=api").ok();
            }
        };
        assert_eq!(
            recheck_with(targets, "role=web", NOW, up()),
            Err(Refusal::CommandNotForThisHost)
        );
        let approvals = |p: &mut Policy| {
            if let Some(c) = p.commands.get_mut("restart") {
                c.requires_approvals = 3;
            }
        };
        assert!(matches!(
            recheck_with(approvals, "role=web", NOW, up()),
            Err(Refusal::MissingApprovals { needed: 3, .. })
        ));
        assert_eq!(
            recheck_with(|p| p.expires = Some(NOW), "role=web", NOW + 1, up()),
            Err(Refusal::PolicyExpired)
        );
        // The agent's labels changed.
        assert_eq!(
            recheck_with(same, "role=db", NOW, up()),
            Err(Refusal::NotTargeted)
        );
        // The stream that delivered it ended: revoked, or gone.
        let why = "permission denied: agent web-1 was revoked";
        assert_eq!(
            recheck_with(same, "role=web", NOW, Stream::Refused(why.into())),
            Err(Refusal::AgentRevoked(why.into()))
        );
        assert_eq!(
            recheck_with(same, "role=web", NOW, Stream::Ended("unavailable".into())),
            Err(Refusal::StreamEnded("unavailable".into()))
        );
    }

    #[test]
    fn refusal_messages_and_codes() {
        for (r, msg, code) in [
            (
                Refusal::UnknownSigner("x".into()),
                "job signed by unknown signer \"x\"",
                "unknown_signer",
            ),
            (
                Refusal::BadSignature,
                "signature does not verify",
                "bad_signature",
            ),
            (Refusal::Expired, "job expired", "expired"),
            (
                Refusal::Replayed,
                "job id already seen (replay)",
                "replayed",
            ),
            (
                Refusal::NotAllowed("rm".into()),
                "command \"rm\" is not in the allow-list",
                "not_allowed",
            ),
            (
                Refusal::MissingApprovals {
                    needed: 2,
                    got: 1,
                    not_counted: vec!["x approved twice".into()],
                },
                "needs 2 approval(s), got 1 (not counted: x approved twice)",
                "missing_approvals",
            ),
            (
                Refusal::AgentRevoked("permission denied: agent a was revoked".into()),
                "the controller refused this agent (revoked) before the job could start (permission denied: agent a was revoked)",
                "agent_revoked",
            ),
            (
                Refusal::StreamEnded("unavailable".into()),
                "the stream that delivered the job ended before it could start (unavailable)",
                "stream_ended",
            ),
            (
                Refusal::LifetimeTooLong {
                    lifetime: 315_360_000,
                    max: 86_400,
                },
                "job is valid for 315360000s (expires_at - not_before), longer than the policy's max_job_lifetime of 86400s",
                "lifetime_too_long",
            ),
            (
                Refusal::Oversized { size: 70000 },
                "job spec of 70000 bytes exceeds the limit of 65536 bytes",
                "oversized",
            ),
        ] {
            assert_eq!(r.to_string(), msg);
            assert_eq!(r.code(), code);
        }
    }
}
