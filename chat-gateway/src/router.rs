//! The command router: parses addressed messages with the core grammar,
//! checks RBAC against the verified policy, signs and submits jobs, follows
//! them, and answers through the adapter's [`ChatSender`].
//!
//! Every command is checked against the policy: `help` lists only what the
//! asker may run here, `run` goes through `check_run`, reads (`agents`,
//! `job`, `jobs`, `policy`) need a role in this channel and show only jobs
//! the asker asked for or may run on those targets (invariant 12 in ARCHITECTURE.md).

use crate::unix_now;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use fleetcmd_core::approval::{ApprovalError, ApprovalRequest, GivenApproval, Progress};
use fleetcmd_core::argv::{bind_positional, build_argv};
use fleetcmd_core::audit::{ExportLine, Filter};
use fleetcmd_core::crypto::{PublicKey, SigningKey};
use fleetcmd_core::grammar::{self, ChatCommand, GrammarError, RunRequest};
use fleetcmd_core::ids::{IdError, JobId, JobRef, SHORT_ID_ATTEMPTS, short_form};
use fleetcmd_core::job::{JobSpec, SignedJob};
use fleetcmd_core::policy::{CommandDef, Policy};
use fleetcmd_core::policy_bundle::{PolicySignature, bundle_hash, check_rollback, verify_bundle};
use fleetcmd_core::rbac::{
    JobFacts, check_run, commands_for, in_channel, may_cancel_job, may_read_record, may_see_job,
    roles_of,
};
use fleetcmd_core::selector::Selector;
use fleetcmd_core::terminal::excerpt;
use fleetcmd_proto::v1;
use futures_util::StreamExt;

use crate::adapters::{ChatSender, Incoming, MessageRef, Reply, Section};
use crate::approvals::{Approvals, ApprovalsError, Decision, Origin};
use crate::controller::{ControllerApi, JOBS_SCAN};
use crate::owed::{OwedJob, OwedJobs, StoredJob};
use crate::registry::command::{Registered, split_verb};
use crate::registry::{
    Call, CallContext, CommandError, CommandSpec, CommandTable, Commands, RunOutcome,
};
use crate::render::{self, asked_by};

/// How long past its expiry and timeout a job is followed before the
/// gateway stops polling and says so.
pub const FOLLOW_SLACK: Duration = Duration::from_secs(60);
/// Records one chat `audit` reply shows.
pub const AUDIT_CHAT_RECORDS: usize = 20;
/// Records asked of the controller per chat `audit` (before read filtering).
const AUDIT_SEARCH_LIMIT: u32 = 200;
/// Jobs looked up per chat `audit` to decide whether their records show.
const AUDIT_JOB_LOOKUPS: usize = 50;
/// Minimum time between two progress edits of a running job's message.
pub const PROGRESS_EDIT_INTERVAL: Duration = Duration::from_secs(2);

/// What the router needs besides the controller.
#[derive(Clone, Debug)]
pub struct RouterConfig {
    pub signing_key: Arc<SigningKey>,
    /// The signer id of `signing_key` in the policy's `[[signers]]`.
    pub signer_id: String,
    pub policy_roots: Vec<PublicKey>,
    pub policy_threshold: usize,
    pub bot_name: String,
    pub job_expiry: Duration,
    pub poll_interval: Duration,
    /// How long an approval request waits (default 15 minutes).
    pub approval_window: Duration,
}

/// A policy bundle that passed `verify_bundle`, with its hash.
#[derive(Debug)]
pub struct LoadedPolicy {
    pub policy: Policy,
    /// `sha256:<hex>` of the bundle bytes, computed here (not the controller's word).
    pub hash: String,
}

/// A `run` request that passed [`Router::check_request`]: the command,
/// its arguments and the argv they make.
pub(crate) type RunChecked<'p> = (
    &'p CommandDef,
    std::collections::BTreeMap<String, String>,
    Vec<String>,
);

/// Why [`Router::check_request`] refused: the reply text, and the reason
/// to audit as `chat_denied` when it was a matter of rights.
#[derive(Debug)]
pub(crate) struct Refused {
    pub text: String,
    pub denied: Option<String>,
}

impl Refused {
    fn text(text: String) -> Refused {
        Refused { text, denied: None }
    }
}

/// Routes chat commands to the controller.
pub struct Router<C> {
    cfg: RouterConfig,
    ctl: C,
    policy: Mutex<Option<Arc<LoadedPolicy>>>,
    pub(crate) approvals: Approvals,
    /// Job results still to post, persisted (none: in memory only).
    owed: Option<OwedJobs>,
    /// Verbs integrations and plugins added to the grammar.
    commands: std::sync::RwLock<CommandTable>,
}

impl<C> std::fmt::Debug for Router<C> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Router")
            .field("cfg", &self.cfg)
            .finish_non_exhaustive()
    }
}

/// A fresh job id: a version 7 UUID (time-ordered, 74 random bits).
fn new_job_id() -> Result<JobId, IdError> {
    JobId::from_uuid_v7_bytes(*uuid::Uuid::now_v7().as_bytes())
}

/// An audit event the gateway reports (the controller records the rest).
pub(crate) fn event(
    kind: &str,
    msg: &Incoming,
    command: &str,
    job_id: &str,
    detail: String,
) -> v1::AuditReportRequest {
    v1::AuditReportRequest {
        kind: kind.to_string(),
        actor: msg.identity.as_str().to_string(),
        source: msg.channel.clone(),
        command: command.to_string(),
        detail,
        job_id: job_id.to_string(),
    }
}

impl<C: ControllerApi> Router<C> {
    pub fn new(cfg: RouterConfig, ctl: C) -> Router<C> {
        Router {
            cfg,
            ctl,
            policy: Mutex::new(None),
            approvals: Approvals::default(),
            owed: None,
            commands: std::sync::RwLock::new(CommandTable::default()),
        }
    }

    /// Keeps what the gateway owes the chat (job results to post, pending
    /// approvals) in `store`, so a restart finishes it ([`crate::resume`]).
    pub fn with_store(
        mut self,
        store: &crate::store::GatewayStore,
    ) -> Result<Router<C>, crate::store::StoreError> {
        // Sealed with the key the gateway signs jobs with: a record it did
        // not write is never acted on.
        let seal = crate::store::Seal::new(self.cfg.signing_key.clone());
        self.approvals = Approvals::persisted(store, &seal)?;
        self.owed = Some(OwedJobs::open(store, &seal)?);
        Ok(self)
    }

    /// The owed job records, when persisted.
    pub fn owed(&self) -> Option<&OwedJobs> {
        self.owed.as_ref()
    }

    /// Records `job` as owed (durably); a failure is logged and the job
    /// goes on, followed in memory only.
    pub(crate) async fn owe(&self, job: &OwedJob) {
        if let Some(o) = &self.owed
            && let Err(e) = o.owe(job).await
        {
            tracing::error!(job_id = %job.job_id, error = %e, "owed job result not persisted");
        }
    }

    /// Nothing more is owed for `job_id`.
    pub(crate) async fn paid(&self, job_id: &str) {
        if let Some(o) = &self.owed
            && let Err(e) = o.paid(job_id).await
        {
            tracing::error!(job_id, error = %e, "posted job result not recorded");
        }
    }

    /// Adds the verbs of `commands` to the chat grammar (all of them, or
    /// none when one is a built-in verb or already registered).
    pub fn register_commands(&self, commands: Arc<dyn Commands>) -> Result<(), CommandError> {
        self.commands
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .add(commands)
    }

    fn registered(&self, verb: &str) -> Option<Registered> {
        self.commands
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(verb)
            .cloned()
    }

    /// Whether `text` calls a registered command (which may follow a job,
    /// so it is limited like `run`).
    pub fn is_registered_command(&self, text: &str) -> bool {
        self.registered(split_verb(text).0).is_some()
    }

    /// The controller client.
    pub fn controller(&self) -> &C {
        &self.ctl
    }

    /// Approval requests waiting now.
    pub fn pending_approvals(&self) -> usize {
        self.approvals.len()
    }

    /// Records a request an adapter refused (bad signature, HMAC, token).
    pub async fn report_auth_failure(&self, f: &crate::adapters::AuthFailure, suppressed: u64) {
        let mut detail = f.detail.clone();
        if suppressed > 0 {
            detail.push_str(&format!(
                " ({suppressed} similar failures not recorded before this one)"
            ));
        }
        self.report(v1::AuditReportRequest {
            kind: "auth_failed".into(),
            actor: format!("{} {}", f.adapter, f.source),
            source: f.adapter.clone(),
            command: String::new(),
            detail,
            job_id: String::new(),
        })
        .await;
    }

    /// Records `event` in the audit trail; a failure is logged, never shown
    /// to the user (the reply has already been decided).
    pub(crate) async fn report(&self, event: v1::AuditReportRequest) {
        let kind = event.kind.clone();
        if let Err(e) = self.ctl.report(event).await {
            tracing::warn!(kind, error = %e, "audit report failed");
        }
    }

    /// The command text when `msg` is for this bot and not from a bot.
    pub fn command_text<'m>(&self, msg: &'m Incoming) -> Option<&'m str> {
        if msg.from_bot {
            return None;
        }
        grammar::addressed(&msg.text, &self.cfg.bot_name, msg.direct)
    }

    fn cached_policy(&self) -> Option<Arc<LoadedPolicy>> {
        self.policy
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// The current policy: fetched from the controller and verified against
    /// the configured roots. A bundle that fails verification or rolls back
    /// the version is refused and the last good one is kept.
    pub async fn current_policy(&self) -> Result<Arc<LoadedPolicy>, String> {
        let cached = self.cached_policy();
        let info = match self.ctl.get_policy().await {
            Ok(info) => info,
            Err(e) => {
                return match cached {
                    Some(p) => {
                        tracing::warn!(error = %e, "policy fetch failed; using the last verified policy");
                        Ok(p)
                    }
                    None => Err(format!(
                        "could not fetch the policy from the controller: {}",
                        e.message
                    )),
                };
            }
        };
        let Some(signed) = info.policy else {
            return cached.ok_or_else(|| "the controller has no policy yet".to_string());
        };
        let hash = bundle_hash(&signed.bundle);
        if let Some(c) = cached.as_ref().filter(|c| c.hash == hash) {
            return Ok(c.clone());
        }
        let sigs: Vec<PolicySignature> = signed
            .signatures
            .iter()
            .map(|s| PolicySignature {
                key_id: s.key_id.clone(),
                signature: s.signature.clone(),
            })
            .collect();
        let verified = verify_bundle(
            &signed.bundle,
            &sigs,
            &self.cfg.policy_roots,
            self.cfg.policy_threshold,
        )
        .and_then(|p| check_rollback(cached.as_ref().map(|c| c.policy.version), &p).map(|()| p));
        match verified {
            Ok(policy) => {
                tracing::info!(version = policy.version, %hash, "policy verified");
                let loaded = Arc::new(LoadedPolicy { policy, hash });
                *self.policy.lock().unwrap_or_else(|p| p.into_inner()) = Some(loaded.clone());
                Ok(loaded)
            }
            Err(e) => {
                tracing::warn!(error = %e, %hash, "policy from the controller refused");
                cached.ok_or_else(|| format!("the controller's policy was refused: {e}"))
            }
        }
    }

    pub(crate) async fn post(
        &self,
        out: &dyn ChatSender,
        msg: &Incoming,
        mut reply: Reply,
    ) -> Option<MessageRef> {
        reply.thread = msg.thread.clone();
        match out.send(&msg.channel, reply).await {
            Ok(r) => Some(r),
            Err(e) => {
                tracing::warn!(error = %e, channel = %msg.channel, "reply not sent");
                None
            }
        }
    }

    /// Handles one message; replies go through `out`. Messages not for the
    /// bot are ignored.
    pub async fn handle(&self, msg: Incoming, out: &dyn ChatSender) {
        let Some(text) = self.command_text(&msg) else {
            return;
        };
        let who = msg.identity.as_str().to_string();
        let cmd = match grammar::parse(text) {
            Ok(c) => c,
            Err(GrammarError::UnknownCommand(_))
                if let Some(r) = self.registered(split_verb(text).0) =>
            {
                let reply = self.call_registered(&msg, &r, out).await;
                self.post(out, &msg, reply).await;
                return;
            }
            Err(e) => {
                self.post(out, &msg, Reply::text(format!("{e}{}", asked_by(&who))))
                    .await;
                return;
            }
        };
        let reply = match cmd {
            ChatCommand::Run(req) => {
                self.run(&msg, req, out).await;
                return;
            }
            ChatCommand::Help(topic) => self.help(&msg, topic.as_deref()).await,
            ChatCommand::Whoami => self.whoami(&msg).await,
            ChatCommand::Policy => self.policy_info(&msg).await,
            ChatCommand::Agents(sel) | ChatCommand::Status(sel) => self.agents(&msg, sel).await,
            ChatCommand::Job(id) => self.job(&msg, id).await,
            ChatCommand::Jobs { mine, page } => self.jobs(&msg, mine, page).await,
            ChatCommand::Output { id, host } => self.output(&msg, id, host).await,
            ChatCommand::Cancel(id) => self.cancel(&msg, id).await,
            ChatCommand::Approve(id) => self.approve(&msg, &id).await,
            ChatCommand::Deny { id, reason } => {
                self.deny(&msg, &id, reason.as_deref().unwrap_or("")).await
            }
            ChatCommand::Health(name) => self.health(&msg, name).await,
            ChatCommand::Silence {
                service,
                for_,
                reason,
            } => self.silence(&msg, service, for_, reason).await,
            ChatCommand::Audit(query) => self.audit(&msg, &query).await,
        };
        self.post(out, &msg, reply).await;
    }

    async fn help(&self, msg: &Incoming, topic: Option<&str>) -> Reply {
        let who = msg.identity.as_str();
        match self.current_policy().await {
            Ok(p) => {
                // Registered verbs only for those their guard admits here.
                let table = self
                    .commands
                    .read()
                    .unwrap_or_else(|p| p.into_inner())
                    .clone();
                let extra: Vec<&CommandSpec> = table
                    .specs()
                    .filter(|s| s.guard.admits(&p.policy, &msg.identity, &msg.channel))
                    .collect();
                render::help(
                    who,
                    &commands_for(&p.policy, &msg.identity, &msg.channel),
                    &extra,
                    topic,
                )
            }
            Err(e) => Reply::text(format!("{e}{}", asked_by(who))),
        }
    }

    /// One call of a registered command: its guard checked against the
    /// verified policy (a refusal answered and audited as `chat_denied`),
    /// then the call, audited as `chat_command` with its outcome.
    async fn call_registered(&self, msg: &Incoming, r: &Registered, out: &dyn ChatSender) -> Reply {
        let who = msg.identity.as_str();
        let verb = r.spec.verb.as_str();
        let p = match self.current_policy().await {
            Ok(p) => p,
            Err(e) => return Reply::text(format!("{e}{}", asked_by(who))),
        };
        if !r.spec.guard.admits(&p.policy, &msg.identity, &msg.channel) {
            let (text, denied) = r.spec.guard.refusal(verb, &msg.channel);
            tracing::info!(identity = who, channel = %msg.channel, verb, "registered command denied");
            self.report(event("chat_denied", msg, verb, "", denied))
                .await;
            return Reply::text(format!("{text}{}", asked_by(who)));
        }
        let (_, args) = split_verb(self.command_text(msg).unwrap_or_default());
        let ctx = CallerRun {
            router: self,
            msg,
            out,
        };
        let call = Call { msg, verb, args };
        let reply = r.by.call(call, &ctx).await;
        let outcome = if reply.header.is_empty() {
            reply.lines.first().cloned().unwrap_or_default()
        } else {
            reply.header.clone()
        };
        self.report(event(
            "chat_command",
            msg,
            verb,
            "",
            format!("{}: {}", excerpt(args), excerpt(&outcome)),
        ))
        .await;
        reply
    }

    async fn whoami(&self, msg: &Incoming) -> Reply {
        let who = msg.identity.as_str();
        match self.current_policy().await {
            Ok(p) => {
                let roles = roles_of(&p.policy, &msg.identity);
                let here: Vec<&str> = roles
                    .iter()
                    .filter(|r| in_channel(r, &msg.channel))
                    .map(|r| r.name.as_str())
                    .collect();
                let all: Vec<&str> = roles.iter().map(|r| r.name.as_str()).collect();
                let mut reply = Reply::text(format!("you are {who}"));
                reply.lines.push(format!(
                    "roles: {}",
                    if all.is_empty() {
                        "none".to_string()
                    } else {
                        all.join(", ")
                    }
                ));
                if here.len() != all.len() {
                    reply.lines.push(format!(
                        "usable in {}: {}",
                        msg.channel,
                        if here.is_empty() {
                            "none".to_string()
                        } else {
                            here.join(", ")
                        }
                    ));
                }
                reply
            }
            Err(e) => Reply::text(format!("you are {who}; roles unknown: {e}")),
        }
    }

    /// The policy, or the reply to send when the asker has no role here.
    async fn policy_for_reads(&self, msg: &Incoming) -> Result<Arc<LoadedPolicy>, Reply> {
        let who = msg.identity.as_str();
        let p = self
            .current_policy()
            .await
            .map_err(|e| Reply::text(format!("{e}{}", asked_by(who))))?;
        let has_role = roles_of(&p.policy, &msg.identity)
            .iter()
            .any(|r| in_channel(r, &msg.channel));
        if !has_role {
            tracing::info!(identity = who, channel = %msg.channel, "read denied: no role in channel");
            self.report(event(
                "chat_denied",
                msg,
                "",
                "",
                format!("no role in {}", msg.channel),
            ))
            .await;
            return Err(Reply::text(format!(
                "you have no roles in this channel{}",
                asked_by(who)
            )));
        }
        Ok(p)
    }

    /// `audit QUERY`: the newest matching records the asker may read —
    /// their own, those about jobs `job` would show them, those about no
    /// job naming a command their roles here include, or all of them with
    /// `audit.read_all`.
    async fn audit(&self, msg: &Incoming, query: &str) -> Reply {
        let who = msg.identity.as_str();
        let p = match self.policy_for_reads(msg).await {
            Ok(p) => p,
            Err(r) => return r,
        };
        if query.trim() == "verify" {
            return match self.ctl.audit_verify().await {
                Ok(v) if v.ok => Reply::text(format!(
                    "audit trail ok: records {}..{} ({}), {} signed heads, signed up to {}{}",
                    v.first,
                    v.last,
                    v.records,
                    v.heads,
                    v.signed_up_to,
                    asked_by(who)
                )),
                Ok(v) => Reply::text(format!(
                    "audit trail BROKEN at record {}: {}{}",
                    v.broken_seq,
                    v.reason,
                    asked_by(who)
                )),
                Err(e) => Reply::text(format!(
                    "audit verify failed: {}{}",
                    e.message,
                    asked_by(who)
                )),
            };
        }
        let now_ms = unix_now().saturating_mul(1000);
        let filter = match Filter::parse_query(query, now_ms) {
            Ok(f) => f,
            Err(e) => return Reply::text(format!("audit: {e}{}", asked_by(who))),
        };
        let req = v1::AuditSearchRequest {
            text: filter.text.clone().unwrap_or_default(),
            actor: filter.actor.clone().unwrap_or_default(),
            command: filter.command.clone().unwrap_or_default(),
            host: filter.host.clone().unwrap_or_default(),
            job_id: filter
                .job_id
                .as_ref()
                .map(|j| j.to_string())
                .unwrap_or_default(),
            kinds: filter
                .kinds
                .iter()
                .map(|k| k.as_str().to_string())
                .collect(),
            since_ms: filter.since_ms.unwrap_or(0),
            until_ms: filter.until_ms.unwrap_or(0),
            limit: AUDIT_SEARCH_LIMIT,
            before_seq: 0,
        };
        let resp = match self.ctl.audit_search(req).await {
            Ok(r) => r,
            Err(e) => {
                return Reply::text(format!(
                    "audit search failed: {}{}",
                    e.message,
                    asked_by(who)
                ));
            }
        };
        // A record about a job is shown exactly when `job` would show that
        // job (`rbac::may_read_record`), so its job is looked up; records
        // about jobs past the lookup budget, or unknown, stay hidden.
        let mut jobs: std::collections::HashMap<String, Option<v1::Job>> = Default::default();
        let mut lines: Vec<String> = Vec::new();
        let records =
            resp.records
                .iter()
                .filter_map(|l| match serde_json::from_str::<ExportLine>(l) {
                    Ok(ExportLine::Record(r)) => Some(r),
                    _ => None,
                });
        for r in records {
            if lines.len() >= AUDIT_CHAT_RECORDS {
                break;
            }
            let id = &r.event.job_id;
            if !id.is_empty() && !jobs.contains_key(id) && jobs.len() < AUDIT_JOB_LOOKUPS {
                let job = self.ctl.get_job(id.clone()).await.ok();
                jobs.insert(id.clone(), job);
            }
            let facts = jobs.get(id).and_then(Option::as_ref).map(|j| JobFacts {
                requester: &j.requester,
                command: &j.command,
                selector: &j.selector,
            });
            if may_read_record(&p.policy, &msg.identity, &msg.channel, &r.event, facts) {
                lines.push(r.line());
            }
        }
        let mut reply = Reply::text(format!(
            "audit: {} record{} for `{}`, newest first{}",
            lines.len(),
            if lines.len() == 1 { "" } else { "s" },
            excerpt(query),
            asked_by(who)
        ));
        if lines.len() == AUDIT_CHAT_RECORDS {
            reply.lines.push(format!(
                "showing the newest {AUDIT_CHAT_RECORDS}; narrow with since:, until:, actor:, command:, host:, job: or kind:"
            ));
        }
        if !lines.is_empty() {
            reply.sections.push(Section {
                blocks: vec![crate::adapters::CodeBlock {
                    label: String::new(),
                    text: lines.join("\n"),
                    omitted_lines: 0,
                }],
                ..Section::default()
            });
        }
        reply
    }

    async fn policy_info(&self, msg: &Incoming) -> Reply {
        let who = msg.identity.as_str();
        match self.policy_for_reads(msg).await {
            Ok(p) => {
                let mut reply = Reply::text(format!(
                    "policy version {} {}{}",
                    p.policy.version,
                    p.hash,
                    asked_by(who)
                ));
                if let Some(exp) = p.policy.expires {
                    reply.lines.push(format!("expires at unix time {exp}"));
                }
                reply.lines.push(format!(
                    "{} commands, {} roles, verified against {} root key(s), threshold {}",
                    p.policy.commands.len(),
                    p.policy.roles.len(),
                    self.cfg.policy_roots.len(),
                    self.cfg.policy_threshold.max(1)
                ));
                reply
            }
            Err(r) => r,
        }
    }

    async fn agents(&self, msg: &Incoming, selector: Option<String>) -> Reply {
        let who = msg.identity.as_str();
        if let Err(r) = self.policy_for_reads(msg).await {
            return r;
        }
        match self
            .ctl
            .list_agents(selector.clone().unwrap_or_default())
            .await
        {
            Ok(agents) => render::agents(&agents, selector.as_deref(), who),
            Err(e) => Reply::text(format!(
                "could not list agents: {}{}",
                e.message,
                asked_by(who)
            )),
        }
    }

    /// `health [service]`: every service worst first, or one in detail.
    async fn health(&self, msg: &Incoming, name: Option<String>) -> Reply {
        let who = msg.identity.as_str();
        if let Err(r) = self.policy_for_reads(msg).await {
            return r;
        }
        let one = name.is_some();
        match self
            .ctl
            .health_services(name.clone().unwrap_or_default(), if one { 10 } else { 0 })
            .await
        {
            Ok(services) if one && services.is_empty() => Reply::text(format!(
                "no service named {}{}",
                name.unwrap_or_default(),
                asked_by(who)
            )),
            Ok(services) => render::health(&services, one, unix_now() * 1000, who),
            Err(e) => Reply::text(format!("health: {}{}", e.message, asked_by(who))),
        }
    }

    /// `silence SERVICE DURATION [reason]` / `silence SERVICE off`: allowed
    /// to whoever may run some command on the service's hosts from this
    /// channel (the people who would act on its alerts). Audited by the
    /// controller with the chat identity.
    async fn silence(
        &self,
        msg: &Incoming,
        service: String,
        for_: Option<std::time::Duration>,
        reason: Option<String>,
    ) -> Reply {
        let who = msg.identity.as_str();
        let p = match self.policy_for_reads(msg).await {
            Ok(p) => p,
            Err(r) => return r,
        };
        let svc = match self.ctl.health_services(service.clone(), 0).await {
            Ok(s) => match s.into_iter().next() {
                Some(s) => s,
                None => {
                    return Reply::text(format!(
                        "no service named {}{}",
                        excerpt(&service),
                        asked_by(who)
                    ));
                }
            },
            Err(e) => return Reply::text(format!("silence: {}{}", e.message, asked_by(who))),
        };
        let allowed = fleetcmd_core::rbac::check_silence(
            &p.policy,
            &msg.identity,
            &msg.channel,
            &svc.selector,
        )
        .is_ok();
        if !allowed {
            self.report(event(
                "chat_denied",
                msg,
                "silence",
                "",
                format!("silence {service}: may not act on {}", svc.selector),
            ))
            .await;
            return Reply::text(format!(
                "you may not silence {service}: that needs a role that may run a command on `{}` in this channel{}",
                svc.selector,
                asked_by(who)
            ));
        }
        let req = v1::SilenceRequest {
            service: service.clone(),
            duration_secs: for_.map_or(0, |d| d.as_secs()),
            reason: reason.clone().unwrap_or_default(),
            actor: who.to_string(),
            channel: msg.channel.clone(),
        };
        match (self.ctl.silence(req).await, for_) {
            (Ok(_), None) => Reply::text(format!(
                "alerts of {service} are no longer silenced{}",
                asked_by(who)
            )),
            (Ok(_), Some(d)) => Reply::text(format!(
                "alerts of {service} silenced for {}{}{}",
                fleetcmd_core::duration::format_duration(d),
                reason
                    .map(|r| format!(": {}", excerpt(&r)))
                    .unwrap_or_default(),
                asked_by(who)
            )),
            (Err(e), _) => Reply::text(format!(
                "silence {}: {}{}",
                excerpt(&service),
                e.message,
                asked_by(who)
            )),
        }
    }

    fn facts(job: &v1::Job) -> JobFacts<'_> {
        JobFacts {
            requester: &job.requester,
            command: &job.command,
            selector: &job.selector,
        }
    }

    /// The same rule as the controller's for operators (`rbac::may_see_job`).
    fn may_see(policy: &Policy, msg: &Incoming, job: &v1::Job) -> bool {
        may_see_job(policy, &msg.identity, &msg.channel, Self::facts(job))
    }

    /// The job `id` names, with the policy to judge it by; or the reply
    /// when the asker has no role here, `id` cannot name a job, or the
    /// controller has none. Replies quote a bounded excerpt of `id`.
    async fn find_job(
        &self,
        msg: &Incoming,
        id: &str,
    ) -> Result<(Arc<LoadedPolicy>, v1::Job), Reply> {
        let who = msg.identity.as_str();
        let p = self.policy_for_reads(msg).await?;
        // A reference that cannot name a job is refused here, and the
        // controller is not asked.
        if let Err(e) = JobRef::parse(id) {
            return Err(Reply::text(format!("{e}{}", asked_by(who))));
        }
        match self.ctl.get_job(id.to_string()).await {
            Ok(job) => Ok((p, job)),
            Err(e) => Err(Reply::text(format!(
                "job {}: {}{}",
                excerpt(id),
                e.message,
                asked_by(who)
            ))),
        }
    }

    /// [`Self::find_job`], for a job the asker may see.
    async fn visible_job(&self, msg: &Incoming, id: &str) -> Result<v1::Job, Reply> {
        let (p, job) = self.find_job(msg, id).await?;
        if Self::may_see(&p.policy, msg, &job) {
            Ok(job)
        } else {
            Err(Reply::text(format!(
                "job {} is not visible to you{}",
                excerpt(id),
                asked_by(msg.identity.as_str())
            )))
        }
    }

    async fn job(&self, msg: &Incoming, id: String) -> Reply {
        match self.visible_job(msg, &id).await {
            Ok(job) => render::job_for(&job, msg.identity.as_str()),
            Err(r) => r,
        }
    }

    /// `cancel ID`: the requester, or anyone who could run that command on
    /// those targets in this channel, may cancel.
    async fn cancel(&self, msg: &Incoming, id: String) -> Reply {
        let who = msg.identity.as_str();
        let (p, job) = match self.find_job(msg, &id).await {
            Ok(found) => found,
            Err(r) => return r,
        };
        if !may_cancel_job(&p.policy, &msg.identity, &msg.channel, Self::facts(&job)) {
            // A refusal of rights is a security event like a refused run:
            // audited as `chat_denied`, with the job it was about.
            tracing::info!(identity = who, channel = %msg.channel, job_id = %job.job_id, "cancel denied");
            self.report(event(
                "chat_denied",
                msg,
                &job.command,
                &job.job_id,
                format!(
                    "cancel {}: not its requester, and may not run `{}` on {} here",
                    short_form(&job.job_id),
                    job.command,
                    job.selector
                ),
            ))
            .await;
            return Reply::text(format!(
                "job {} may only be canceled by its requester or by someone who may run its command on its targets here{}",
                excerpt(&id),
                asked_by(who)
            ));
        }
        match self.ctl.cancel(job.job_id.clone(), who.to_string()).await {
            Ok(job) => render::job_for(&job, who),
            Err(e) => Reply::text(format!(
                "job {}: {}{}",
                excerpt(&id),
                e.message,
                asked_by(who)
            )),
        }
    }

    /// `output ID [HOST]`: the stored output, as data.
    async fn output(&self, msg: &Incoming, id: String, host: Option<String>) -> Reply {
        match self.visible_job(msg, &id).await {
            Ok(job) => render::output_for(&job, host.as_deref(), msg.identity.as_str()),
            Err(r) => r,
        }
    }

    /// `jobs [mine] [page N]`: page N of the jobs the asker may see,
    /// newest first (`mine`: those they requested).
    async fn jobs(&self, msg: &Incoming, mine: bool, page: u32) -> Reply {
        let who = msg.identity.as_str();
        let p = match self.policy_for_reads(msg).await {
            Ok(p) => p,
            Err(r) => return r,
        };
        let per_page = grammar::JOBS_PAGE as usize;
        // Someone's own jobs are filtered by the controller, so asking for
        // the pages up to this one (and one more job) is enough; the others
        // are filtered here, by what the asker may see.
        let limit = if mine {
            page * grammar::JOBS_PAGE + 1
        } else {
            JOBS_SCAN
        };
        match self
            .ctl
            .list_jobs(limit, mine.then(|| who.to_string()))
            .await
        {
            Ok(jobs) => {
                let visible: Vec<v1::Job> = jobs
                    .into_iter()
                    .filter(|j| (!mine || j.requester == who) && Self::may_see(&p.policy, msg, j))
                    .collect();
                let skip = (page as usize - 1) * per_page;
                let more = visible.len() > skip + per_page;
                let shown: Vec<v1::Job> = visible.into_iter().skip(skip).take(per_page).collect();
                render::jobs(
                    &shown,
                    who,
                    render::JobsPage {
                        mine,
                        page,
                        first: skip + 1,
                        more,
                    },
                )
            }
            Err(e) => Reply::text(format!(
                "could not list jobs: {}{}",
                e.message,
                asked_by(who)
            )),
        }
    }

    /// What `run` checks before anything is submitted or an approval is
    /// asked for (and, after a restart, before a pending approval is
    /// reopened): the selector, the asker's right to run the command here,
    /// the arguments. `Ok` is the command, its arguments and the argv.
    pub(crate) fn check_request<'p>(
        &self,
        policy: &'p Policy,
        msg: &Incoming,
        req: &RunRequest,
    ) -> Result<RunChecked<'p>, Refused> {
        let who = msg.identity.as_str();
        let selector = Selector::parse(&req.selector).map_err(|e| Refused::text(e.to_string()))?;
        if let Err(denied) = check_run(policy, &msg.identity, &msg.channel, &req.command, &selector)
        {
            tracing::info!(identity = who, channel = %msg.channel, command = %req.command, reason = %denied, "run denied");
            return Err(Refused {
                text: format!("refused: {denied}; nothing was submitted"),
                denied: Some(format!("run on {}: {denied}", req.selector)),
            });
        }
        // check_run already refused unknown commands; kept for safety.
        let def = policy
            .command(&req.command)
            .ok_or_else(|| Refused::text(format!("unknown command `{}`", excerpt(&req.command))))?;
        let args = bind_positional(def, &req.args).map_err(|e| {
            Refused::text(format!(
                "{e}; usage: run {} on <selector>",
                render::usage(def)
            ))
        })?;
        let argv = build_argv(def, &args)
            .map_err(|e| Refused::text(format!("{e}; nothing was submitted")))?;
        Ok((def, args, argv))
    }

    async fn run(&self, msg: &Incoming, req: RunRequest, out: &dyn ChatSender) -> RunOutcome {
        let who = msg.identity.as_str();
        let refuse = |text: String| Reply::text(format!("{text}{}", asked_by(who)));
        let not = |reason: &str| RunOutcome::NotSubmitted {
            reason: reason.to_string(),
        };
        let p = match self.current_policy().await {
            Ok(p) => p,
            Err(e) => {
                self.post(out, msg, refuse(e.clone())).await;
                return not(&e);
            }
        };
        let (def, args, argv) = match self.check_request(&p.policy, msg, &req) {
            Ok(checked) => checked,
            Err(refusal) => {
                self.post(out, msg, refuse(refusal.text.clone())).await;
                if let Some(denied) = refusal.denied {
                    self.report(event("chat_denied", msg, &req.command, "", denied))
                        .await;
                }
                return not(&refusal.text);
            }
        };
        if req.options.dry_run {
            let reply = self.dry_run(msg, &req, def.targets.as_ref(), &argv).await;
            self.post(out, msg, reply).await;
            return RunOutcome::DryRun;
        }

        let id = match new_job_id() {
            Ok(id) => id,
            Err(e) => {
                tracing::error!(error = %e, "uuid v7 rejected as job id");
                self.post(
                    out,
                    msg,
                    refuse("internal error creating a job id".to_string()),
                )
                .await;
                return not("internal error creating a job id");
            }
        };
        let approvers = if def.requires_approvals > 0 {
            match self.await_approval(msg, &req, def, &id, &argv, out).await {
                Some(a) => a,
                None => return not("not approved"),
            }
        } else {
            Vec::new()
        };
        match self
            .submit_and_follow(msg, &req, def, args, id, approvers, out)
            .await
        {
            Ok(job_id) => RunOutcome::Submitted { job_id },
            Err(reason) => RunOutcome::NotSubmitted { reason },
        }
    }

    /// Opens an approval request, posts it with approve/deny buttons and
    /// waits for the decision. `Some(approvers)` once enough distinct
    /// allowed approvers said yes; `None` (after saying so in the channel)
    /// when denied, expired or refused.
    pub(crate) async fn await_approval(
        &self,
        msg: &Incoming,
        req: &RunRequest,
        def: &CommandDef,
        id: &JobId,
        argv: &[String],
        out: &dyn ChatSender,
    ) -> Option<Vec<GivenApproval>> {
        let who = msg.identity.as_str();
        let window = self.cfg.approval_window;
        let request = ApprovalRequest::new(
            id.clone(),
            &def.name,
            msg.identity.clone(),
            def.requires_approvals,
            unix_now(),
            window.as_secs(),
        );
        let origin = Origin {
            channel: msg.channel.clone(),
            thread: msg.thread.clone(),
            text: self.command_text(msg).unwrap_or(&msg.text).to_string(),
            message: None,
        };
        let decided = match self.approvals.open(request, origin) {
            Ok(rx) => rx,
            Err(e) => {
                self.post(
                    out,
                    msg,
                    Reply::text(format!("{e}; nothing was submitted{}", asked_by(who))),
                )
                .await;
                return None;
            }
        };
        // Durable before anyone is asked: a restart from here on finds it.
        self.approvals.flush().await;
        let short = short_form(id.as_str()).to_string();
        self.report(event(
            "approval_requested",
            msg,
            &def.name,
            id.as_str(),
            format!(
                "argv {argv:?} on {}; needs {}",
                req.selector, def.requires_approvals
            ),
        ))
        .await;
        let request_reply = render::approval_request(
            &short,
            &def.name,
            argv,
            &req.selector,
            def.requires_approvals,
            window,
            who,
        );
        let posted = self.post(out, msg, request_reply.clone()).await;
        self.approvals
            .posted(id.as_str(), posted.as_ref().map(|p| p.id.clone()));
        self.approvals.flush().await;
        self.settle_approval(
            msg,
            &def.name,
            id,
            (request_reply, posted),
            window,
            window,
            decided,
            out,
        )
        .await
    }

    /// Waits up to `wait` for the decision on the request for `id` (posted
    /// as `request`), says how it ended and reports an expiry. `window` is
    /// the request's whole lifetime, for the expiry text.
    #[allow(clippy::too_many_arguments)]
    pub(crate) async fn settle_approval(
        &self,
        msg: &Incoming,
        command: &str,
        id: &JobId,
        request: (Reply, Option<MessageRef>),
        wait: Duration,
        window: Duration,
        mut decided: tokio::sync::oneshot::Receiver<Decision>,
        out: &dyn ChatSender,
    ) -> Option<Vec<GivenApproval>> {
        let (request_reply, posted) = request;
        let settle = |text: String| {
            let mut reply = request_reply.clone();
            reply.actions.clear();
            reply.lines.push(text);
            reply.thread = msg.thread.clone();
            reply
        };
        let decision = match tokio::time::timeout(wait, &mut decided).await {
            Ok(Ok(d)) => Some(d),
            Ok(Err(_)) => None,
            // An approval may land just as the window closes.
            Err(_) => decided.try_recv().ok(),
        };
        let (text, approvers) = match decision {
            Some(Decision::Approved(approvers)) => {
                let names: Vec<&str> = approvers.iter().map(|a| a.approver.as_str()).collect();
                (
                    format!("approved by {}; submitting", names.join(", ")),
                    Some(approvers),
                )
            }
            Some(Decision::Denied { by, reason }) => {
                let why = if reason.is_empty() {
                    String::new()
                } else {
                    format!(": {}", excerpt(&reason))
                };
                (format!("denied by {}{why}; nothing ran", by.as_str()), None)
            }
            None => {
                if !self.approvals.close(id.as_str()) {
                    return None;
                }
                self.approvals.flush().await;
                self.report(event(
                    "approval_expired",
                    msg,
                    command,
                    id.as_str(),
                    format!("no decision within {} s", window.as_secs()),
                ))
                .await;
                (
                    format!(
                        "the approval request expired after {}; nothing ran",
                        render::format_duration(window)
                    ),
                    None,
                )
            }
        };
        let reply = settle(text);
        match &posted {
            Some(p) if out.can_edit() => {
                if out.edit(p, reply.clone()).await.is_err() {
                    self.post(out, msg, reply).await;
                }
            }
            _ => {
                self.post(
                    out,
                    msg,
                    Reply::text(reply.lines.last().cloned().unwrap_or_default()),
                )
                .await;
            }
        }
        approvers
    }

    /// `approve ID`: records the asker's approval of a waiting request.
    async fn approve(&self, msg: &Incoming, id: &str) -> Reply {
        let who = msg.identity.as_str();
        let p = match self.current_policy().await {
            Ok(p) => p,
            Err(e) => return Reply::text(format!("{e}{}", asked_by(who))),
        };
        // The agents count an approval only if this gateway's signer may
        // vouch for the approver: say so now rather than after the job.
        let vouched = p
            .policy
            .signer(&self.cfg.signer_id)
            .is_some_and(|s| s.vouches_for(&msg.identity));
        let taken = if vouched {
            self.approvals
                .approve(id, &p.policy, &msg.identity, &msg.channel, unix_now())
        } else {
            Err(ApprovalsError::Refused(ApprovalError::NotVouched))
        };
        match taken {
            Ok(o) => {
                self.approvals.flush().await;
                let (detail, text) = match o.progress {
                    Progress::Approved => (
                        "enough approvals".to_string(),
                        format!(
                            "job {} (`{}` for {}) approved; submitting{}",
                            short_form(&o.job_id),
                            o.command,
                            o.requester.as_str(),
                            asked_by(who)
                        ),
                    ),
                    Progress::Waiting { got, needed } => (
                        format!("{got} of {needed}"),
                        format!(
                            "approval {got}/{needed} for job {} recorded{}",
                            short_form(&o.job_id),
                            asked_by(who)
                        ),
                    ),
                };
                self.report(event("approval_given", msg, &o.command, &o.job_id, detail))
                    .await;
                Reply::text(text)
            }
            Err(e) => {
                let why = match &e {
                    ApprovalsError::Refused(why) => Some(why.to_string()),
                    ApprovalsError::Hidden(_) => {
                        Some("a request this user may not see".to_string())
                    }
                    _ => None,
                };
                if let Some(why) = why {
                    self.report(event(
                        "chat_denied",
                        msg,
                        "",
                        "",
                        format!("approve {}: {why}", excerpt(id)),
                    ))
                    .await;
                }
                Reply::text(format!("{e}{}", asked_by(who)))
            }
        }
    }

    /// `deny ID [reason]`: an approver denies, or the requester withdraws.
    async fn deny(&self, msg: &Incoming, id: &str, reason: &str) -> Reply {
        let who = msg.identity.as_str();
        let p = match self.current_policy().await {
            Ok(p) => p,
            Err(e) => return Reply::text(format!("{e}{}", asked_by(who))),
        };
        match self
            .approvals
            .deny(id, &p.policy, &msg.identity, &msg.channel, reason)
        {
            Ok(o) => {
                self.approvals.flush().await;
                self.report(event(
                    "approval_denied",
                    msg,
                    &o.command,
                    &o.job_id,
                    reason.to_string(),
                ))
                .await;
                Reply::text(format!(
                    "job {} (`{}` for {}) denied{}",
                    short_form(&o.job_id),
                    o.command,
                    o.requester.as_str(),
                    asked_by(who)
                ))
            }
            Err(e) => {
                let why = match &e {
                    ApprovalsError::Refused(why) => Some(why.to_string()),
                    ApprovalsError::Hidden(_) => {
                        Some("a request this user may not see".to_string())
                    }
                    _ => None,
                };
                if let Some(why) = why {
                    self.report(event(
                        "chat_denied",
                        msg,
                        "",
                        "",
                        format!("deny {}: {why}", excerpt(id)),
                    ))
                    .await;
                }
                Reply::text(format!("{e}{}", asked_by(who)))
            }
        }
    }

    /// Signs the job (with the approvals this gateway attests), submits it
    /// and follows it.
    #[allow(clippy::too_many_arguments)]
    pub(crate) async fn submit_and_follow(
        &self,
        msg: &Incoming,
        req: &RunRequest,
        def: &CommandDef,
        args: std::collections::BTreeMap<String, String>,
        id: JobId,
        approvals: Vec<GivenApproval>,
        out: &dyn ChatSender,
    ) -> Result<String, String> {
        let who = msg.identity.as_str();
        let refuse = |text: String| Reply::text(format!("{text}{}", asked_by(who)));
        let timeout = req.options.timeout.unwrap_or(Duration::ZERO);
        let effective = if timeout.is_zero() {
            def.timeout
        } else {
            timeout
        };
        let follow_for = self.cfg.job_expiry + effective + FOLLOW_SLACK;
        let deadline = Instant::now() + follow_for;
        let mut id = id;
        let mut attempt = 1;
        let (submitted, mut owed) = loop {
            let now = unix_now();
            let mut spec = JobSpec {
                id: id.clone(),
                command: def.name.clone(),
                args: args.clone(),
                selector: req.selector.clone(),
                requester: msg.identity.clone(),
                channel: msg.channel.clone(),
                approvals: Vec::new(),
                unattested_approvers: Vec::new(),
                timeout_secs: timeout.as_secs(),
                not_before: now,
                expires_at: now + self.cfg.job_expiry.as_secs(),
                rollout: fleetcmd_core::job::Rollout {
                    batch: req.options.batch,
                    max_errors: req.options.max_errors,
                    canary: req.options.canary,
                },
            };
            // The approvals were given to this request; they are attested
            // again for each id it is submitted with.
            spec.approvals = approvals
                .iter()
                .map(|a| a.attest(&spec, &self.cfg.signer_id, &self.cfg.signing_key))
                .collect();
            let signed = SignedJob::sign(&spec, &self.cfg.signer_id, &self.cfg.signing_key);
            // Owed before it is submitted: a restart in between submits it then.
            let owed = OwedJob {
                v: crate::owed::RECORD_VERSION,
                job_id: id.as_str().to_string(),
                command: def.name.clone(),
                requester: msg.identity.clone(),
                channel: msg.channel.clone(),
                thread: msg.thread.clone(),
                message: None,
                follow_until: now + follow_for.as_secs(),
                signed: StoredJob::of(&signed),
            };
            self.owe(&owed).await;
            // The approval's end is its job, owed now.
            self.approvals.forget(id.as_str());
            self.approvals.flush().await;
            let e = match self.ctl.submit(signed).await {
                Ok(s) => break (s, owed),
                Err(e) => e,
            };
            self.paid(id.as_str()).await;
            // ABORTED: this id's short id names a stored job already; a
            // fresh id makes a fresh short id. Nothing else is retried.
            let fresh = (e.code == tonic::Code::Aborted && attempt < SHORT_ID_ATTEMPTS)
                .then(new_job_id)
                .and_then(Result::ok);
            if let Some(fresh) = fresh {
                tracing::info!(job_id = id.as_str(), new_job_id = fresh.as_str(), error = %e, "short id taken; signing again with a new id");
                id = fresh;
                attempt += 1;
                continue;
            }
            tracing::warn!(job_id = id.as_str(), error = %e, "submit failed");
            let reason = format!("job not submitted: {}", e.message);
            self.post(out, msg, refuse(reason.clone())).await;
            return Err(reason);
        };
        tracing::info!(job_id = id.as_str(), identity = who, command = %def.name, targets = submitted.targets.len(), "job submitted");
        let job_id = if submitted.job_id.is_empty() {
            id.as_str().to_string()
        } else {
            submitted.job_id.clone()
        };
        let n = submitted.targets.len();
        if n > 0
            && let Some(job) = self.result_within(&job_id, out.ack_grace()).await
        {
            self.post(out, msg, render::job(&job)).await;
            self.paid(id.as_str()).await;
            return Ok(job_id);
        }
        let header = format!(
            "job {} `{}` on {} by {who}: {n} target{}",
            short_form(&job_id),
            def.name,
            req.selector,
            if n == 1 { "" } else { "s" }
        );
        let Some(posted) = self.post(out, msg, Reply::text(header)).await else {
            self.paid(id.as_str()).await;
            return Ok(job_id);
        };
        if n == 0 {
            self.paid(id.as_str()).await;
            return Ok(job_id);
        }
        owed.message = Some(posted.id.clone());
        self.owe(&owed).await;
        self.follow(msg, &job_id, &posted, deadline, out).await;
        self.paid(id.as_str()).await;
        Ok(job_id)
    }

    async fn dry_run(
        &self,
        msg: &Incoming,
        req: &RunRequest,
        targets: Option<&Selector>,
        argv: &[String],
    ) -> Reply {
        let who = msg.identity.as_str();
        let agents = match self.ctl.list_agents(req.selector.clone()).await {
            Ok(a) => a,
            Err(e) => {
                return Reply::text(format!(
                    "dry run: could not list agents: {}{}",
                    e.message,
                    asked_by(who)
                ));
            }
        };
        let mut lines = vec!["would run (argv, no shell): ".to_string() + &format!("{argv:?}")];
        let mut table = String::new();
        let mut would = 0usize;
        for a in &agents {
            let labels: std::collections::BTreeMap<String, String> = a
                .labels
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect();
            let note = if a.revoked {
                "skipped: revoked"
            } else if targets.is_some_and(|t| !t.matches(&a.agent_id, &labels)) {
                "skipped: outside the command's targets"
            } else if !a.online {
                would += 1;
                "offline"
            } else {
                would += 1;
                "would run"
            };
            table.push_str(&format!("{:<24} {note}\n", a.agent_id));
        }
        if let Some(t) = targets {
            lines.push(format!("the command may only run on `{t}`"));
        }
        let mut reply = Reply {
            header: format!(
                "dry run of `{}` on {}: {would} of {} matching agents; nothing was submitted{}",
                req.command,
                req.selector,
                agents.len(),
                asked_by(who)
            ),
            lines,
            ..Reply::default()
        };
        if !table.is_empty() {
            reply.sections.push(Section {
                blocks: vec![crate::adapters::CodeBlock {
                    label: String::new(),
                    text: table.trim_end().to_string(),
                    omitted_lines: 0,
                }],
                ..Section::default()
            });
        }
        reply
    }

    /// The job once final, if it is within `grace` (from the controller's
    /// `Watch`, whose first event is the job as it stands); `None` when it
    /// is still running then, or cannot be watched.
    async fn result_within(&self, job_id: &str, grace: Duration) -> Option<v1::Job> {
        if grace.is_zero() {
            return None;
        }
        let until = tokio::time::Instant::now() + grace;
        let mut events = self.ctl.watch(job_id.to_string()).await.ok()?;
        loop {
            match tokio::time::timeout_at(until, events.next()).await {
                Ok(Some(Ok(v1::JobEvent {
                    event: Some(v1::job_event::Event::Job(job)),
                    ..
                }))) if render::is_terminal(&job.state) => return Some(job),
                Ok(Some(Ok(_))) => {}
                Ok(Some(Err(_)) | None) | Err(_) => return None,
            }
        }
    }

    /// Follows the job until it is final (or the deadline passes) and edits
    /// the posted message with progress and then the result. Changes come
    /// from the controller's `Watch` stream; when it is unavailable or ends
    /// early the router polls `Get` every `poll_interval` instead.
    pub(crate) async fn follow(
        &self,
        msg: &Incoming,
        job_id: &str,
        posted: &MessageRef,
        deadline: Instant,
        out: &dyn ChatSender,
    ) {
        let mut events = match self.ctl.watch(job_id.to_string()).await {
            Ok(stream) => Some(stream),
            Err(e) => {
                tracing::debug!(job_id, error = %e, "watch unavailable; polling");
                None
            }
        };
        let mut last_done = 0usize;
        let mut last_edit = Instant::now();
        let mut last_fetch: Option<Instant> = None;
        let mut last_error: Option<String>;
        loop {
            // Wait for a reason to look at the job again.
            let mut final_job = None;
            match events.as_mut() {
                Some(stream) => {
                    match tokio::time::timeout(PROGRESS_EDIT_INTERVAL, stream.next()).await {
                        Ok(Some(Ok(ev))) => match ev.event {
                            Some(v1::job_event::Event::Job(job))
                                if render::is_terminal(&job.state) =>
                            {
                                final_job = Some(job);
                            }
                            // Output chunks and target changes: re-read at
                            // most once per progress interval.
                            _ if last_fetch
                                .is_some_and(|t| t.elapsed() < PROGRESS_EDIT_INTERVAL) =>
                            {
                                continue;
                            }
                            _ => {}
                        },
                        Ok(Some(Err(e))) => {
                            tracing::debug!(job_id, error = %e, "watch failed; polling");
                            events = None;
                        }
                        Ok(None) => events = None,
                        Err(_) => {}
                    }
                }
                None => tokio::time::sleep(self.cfg.poll_interval).await,
            }
            let fetched = match final_job {
                Some(job) => Ok(job),
                None => {
                    last_fetch = Some(Instant::now());
                    self.ctl.get_job(job_id.to_string()).await
                }
            };
            match fetched {
                Ok(job) if render::is_terminal(&job.state) => {
                    let mut reply = render::job(&job);
                    reply.thread = msg.thread.clone();
                    let edited = out.can_edit() && out.edit(posted, reply.clone()).await.is_ok();
                    if !edited {
                        self.post(out, msg, reply).await;
                    }
                    return;
                }
                Ok(job) => {
                    last_error = None;
                    let done = job.targets.iter().filter(|t| t.result.is_some()).count();
                    if out.can_edit()
                        && done != last_done
                        && last_edit.elapsed() >= PROGRESS_EDIT_INTERVAL
                    {
                        last_done = done;
                        last_edit = Instant::now();
                        let mut reply = render::job(&job);
                        reply.thread = msg.thread.clone();
                        let _ = out.edit(posted, reply).await;
                    }
                }
                Err(e) => {
                    tracing::debug!(job_id, error = %e, "reading job failed");
                    last_error = Some(e.message);
                }
            }
            if Instant::now() >= deadline {
                let why = last_error
                    .map(|e| format!(" (last error: {e})"))
                    .unwrap_or_default();
                let text = format!(
                    "stopped following job {}; it has not finished{why}. Ask with `job {}`{}",
                    short_form(job_id),
                    short_form(job_id),
                    asked_by(msg.identity.as_str())
                );
                self.post(out, msg, Reply::text(text)).await;
                return;
            }
        }
    }
}

/// What a registered command may ask of the router during one call: a job
/// submitted as the caller, through `run`'s own path.
struct CallerRun<'a, C> {
    router: &'a Router<C>,
    msg: &'a Incoming,
    out: &'a dyn ChatSender,
}

impl<C: ControllerApi> CallContext for CallerRun<'_, C> {
    fn run_as_caller<'a>(
        &'a self,
        run: RunRequest,
    ) -> futures_util::future::BoxFuture<'a, RunOutcome> {
        Box::pin(self.router.run(self.msg, run, self.out))
    }

    fn audit<'a>(
        &'a self,
        kind: crate::registry::AuditKind,
        command: &'a str,
        job_id: &'a str,
        detail: String,
    ) -> futures_util::future::BoxFuture<'a, ()> {
        Box::pin(
            self.router
                .report(event(kind.as_str(), self.msg, command, job_id, detail)),
        )
    }
}
