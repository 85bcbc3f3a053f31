//! After a restart: what the gateway owed the chat when it stopped
//! (killed or not), finished. Every owed job is followed again and its
//! result posted once; a job the controller never received is submitted
//! with its signed bytes. Every pending approval ends exactly once: still
//! inside its window and still allowed by the current policy, it is asked
//! again and approvable until it expires (then the job runs as usual);
//! expired meanwhile, it is reported `approval_expired` and the requester
//! told; otherwise — the policy changed under it, its adapter is gone, its
//! record is unreadable — it is reported `approval_dropped` with the
//! reason. Nothing here crashes on a damaged record: it is logged, reported
//! and removed.

use std::sync::Arc;
use std::time::{Duration, Instant};

use fleetcmd_core::grammar::{self, ChatCommand};
use tokio::task::JoinSet;

use crate::adapters::{ChatSender, Incoming, MessageRef, Reply};
use crate::approvals::{Origin, PendingRecord};
use crate::controller::ControllerApi;
use crate::owed::OwedJob;
use crate::render::{self, asked_by};
use crate::router::{Router, event};
use crate::unix_now;
use fleetcmd_core::ids::short_form;

/// How often the policy is asked for again while the controller cannot
/// be reached after a restart.
pub const POLICY_RETRY: Duration = Duration::from_secs(1);
/// Logged once a pending approval ended after a restart, its record gone.
pub const ENDED: &str = "pending approval ended after a restart";

/// Finishes everything `router`'s store holds, posting through the sender
/// of each record's channel scheme (`slack`, `irc`, `console`, …, as in
/// `senders`). Returns when every resumed job and approval has ended.
pub async fn run<C: ControllerApi>(
    router: Arc<Router<C>>,
    senders: Vec<(String, Arc<dyn ChatSender>)>,
) {
    let jobs = match router.owed().map(|o| o.load()).transpose() {
        Ok(j) => j.unwrap_or_default(),
        Err(e) => {
            tracing::error!(error = %e, "owed job results not read; none resumed");
            Vec::new()
        }
    };
    let approvals = match router.approvals.load() {
        Ok(a) => a,
        Err(e) => {
            tracing::error!(error = %e, "pending approvals not read; none resumed");
            Vec::new()
        }
    };
    tracing::info!(
        jobs = jobs.len(),
        approvals = approvals.len(),
        "gateway state: resuming owed job results and pending approvals"
    );
    let sender_for = |channel: &str| {
        let scheme = channel.split(':').next().unwrap_or_default();
        senders
            .iter()
            .find(|(s, _)| s == scheme)
            .map(|(_, out)| out.clone())
    };
    let mut tasks = JoinSet::new();
    for job in jobs {
        match job {
            Ok(job) => match sender_for(&job.channel) {
                Some(out) => {
                    let router = router.clone();
                    tasks.spawn(async move { resume_job(&router, job, out.as_ref()).await });
                }
                None => {
                    tracing::error!(job_id = %job.job_id, channel = %job.channel, "owed job result dropped: no enabled adapter posts to this channel");
                    router.paid(&job.job_id).await;
                }
            },
            Err(bad) => {
                tracing::error!(key = %bad.key, reason = %bad.reason, "owed job result dropped: record unreadable");
                router.paid(&bad.key).await;
            }
        }
    }
    for rec in approvals {
        match rec {
            Ok(rec) => match sender_for(&rec.origin.channel) {
                Some(out) => {
                    let router = router.clone();
                    tasks.spawn(async move { resume_approval(&router, rec, out.as_ref()).await });
                }
                None => {
                    let scheme = rec.origin.channel.split(':').next().unwrap_or_default();
                    let reason = format!("no enabled adapter posts to `{scheme}:` channels");
                    let (req, origin) = rec.into_request();
                    let msg = incoming(&req.requester, &origin);
                    end_dropped(
                        &router,
                        &msg,
                        &req.command,
                        req.job_id.as_str(),
                        reason,
                        None,
                    )
                    .await;
                }
            },
            Err(bad) => {
                tracing::error!(key = %bad.key, reason = %bad.reason, "pending approval dropped: record unreadable");
                router
                    .report(fleetcmd_proto::v1::AuditReportRequest {
                        kind: "approval_dropped".into(),
                        actor: "gateway".into(),
                        source: String::new(),
                        command: String::new(),
                        detail: bad.reason.clone(),
                        job_id: bad.key.clone(),
                    })
                    .await;
                router.approvals.forget(&bad.key);
                router.approvals.flush().await;
                tracing::info!(job_id = %bad.key, "{ENDED}");
            }
        }
    }
    while let Some(done) = tasks.join_next().await {
        if let Err(e) = done {
            tracing::error!(error = %e, "resumed task failed");
        }
    }
}

/// The message a record stands for: the requester, in its channel.
fn incoming(requester: &fleetcmd_core::ids::Identity, origin: &Origin) -> Incoming {
    Incoming {
        identity: requester.clone(),
        channel: origin.channel.clone(),
        text: origin.text.clone(),
        thread: origin.thread.clone(),
        direct: true,
        from_bot: false,
    }
}

/// Follows one owed job to its end and posts the result.
async fn resume_job<C: ControllerApi>(router: &Router<C>, job: OwedJob, out: &dyn ChatSender) {
    let who = job.requester.as_str().to_string();
    let msg = Incoming {
        identity: job.requester.clone(),
        channel: job.channel.clone(),
        text: String::new(),
        thread: job.thread.clone(),
        direct: true,
        from_bot: false,
    };
    let short = short_form(&job.job_id).to_string();
    let not_submitted = |why: String| {
        Reply::text(format!(
            "job {short} (`{}`) was not submitted: {why}; nothing ran{}",
            job.command,
            asked_by(&who)
        ))
    };
    // Owed but unknown to the controller: the gateway stopped between
    // recording and submitting it.
    if let Err(e) = router.controller().get_job(job.job_id.clone()).await
        && e.code == tonic::Code::NotFound
    {
        let submitted = match job.signed.signed() {
            Ok(signed) => router
                .controller()
                .submit(signed)
                .await
                .map_err(|e| e.message),
            Err(e) => Err(e),
        };
        if let Err(why) = submitted {
            tracing::warn!(job_id = %job.job_id, error = %why, "owed job not submitted after a restart");
            router.post(out, &msg, not_submitted(why)).await;
            router.paid(&job.job_id).await;
            return;
        }
        tracing::info!(job_id = %job.job_id, "owed job submitted after a restart");
    }
    let posted = match &job.message {
        Some(id) => MessageRef {
            channel: job.channel.clone(),
            id: id.clone(),
        },
        None => {
            let header = Reply::text(format!(
                "job {short} `{}`: following it again after a gateway restart{}",
                job.command,
                asked_by(&who)
            ));
            match router.post(out, &msg, header).await {
                Some(p) => p,
                None => return,
            }
        }
    };
    let left = Duration::from_secs(job.follow_until.saturating_sub(unix_now()));
    tracing::info!(job_id = %job.job_id, "following an owed job after a restart");
    router
        .follow(&msg, &job.job_id, &posted, Instant::now() + left, out)
        .await;
    router.paid(&job.job_id).await;
    tracing::info!(job_id = %job.job_id, "owed job result posted; nothing owed any more");
}

/// Ends or reopens one pending approval.
async fn resume_approval<C: ControllerApi>(
    router: &Router<C>,
    rec: PendingRecord,
    out: &dyn ChatSender,
) {
    let (req, origin) = rec.into_request();
    let msg = incoming(&req.requester, &origin);
    let id = req.job_id.clone();
    let window = Duration::from_secs(req.expires_at.saturating_sub(req.created_at));
    // The policy decides whether the request may still run; the controller
    // may be starting too, so wait for it within the window.
    let policy = loop {
        if req.expired(unix_now()) {
            return end_expired(router, &msg, &req.command, id.as_str(), window, out).await;
        }
        match router.current_policy().await {
            Ok(p) => break p,
            Err(e) => {
                tracing::warn!(job_id = id.as_str(), error = %e, "pending approval waits for the policy");
                tokio::time::sleep(POLICY_RETRY).await;
            }
        }
    };
    let command = req.command.clone();
    let dropped =
        |reason: String| end_dropped(router, &msg, &command, id.as_str(), reason, Some(out));
    let run = match grammar::parse(&origin.text) {
        Ok(ChatCommand::Run(run)) if run.command == req.command => run,
        _ => return dropped("its stored command no longer reads as that `run`".into()).await,
    };
    let (def, args, argv) = match router.check_request(&policy.policy, &msg, &run) {
        Ok(checked) => checked,
        Err(refused) => return dropped(format!("the policy changed: {}", refused.text)).await,
    };
    if def.requires_approvals == 0 {
        return dropped(format!(
            "the policy changed: `{}` no longer needs approval; ask again",
            def.name
        ))
        .await;
    }
    let approvers = if req.got(&policy.policy) >= req.needed {
        // Approved just before the restart: its job was never owed.
        req.approvals.clone()
    } else {
        let left = Duration::from_secs(req.expires_at.saturating_sub(unix_now()));
        let decided = match router.approvals.open(req, origin) {
            Ok(rx) => rx,
            Err(e) => return dropped(e.to_string()).await,
        };
        router.approvals.flush().await;
        let who = msg.identity.as_str();
        let mut reply = render::approval_request(
            short_form(id.as_str()),
            &command,
            &argv,
            &run.selector,
            def.requires_approvals,
            left,
            who,
        );
        reply
            .lines
            .push("still waiting: the gateway restarted since it was asked".into());
        let posted = router.post(out, &msg, reply.clone()).await;
        router
            .approvals
            .posted(id.as_str(), posted.as_ref().map(|p| p.id.clone()));
        router.approvals.flush().await;
        tracing::info!(
            job_id = id.as_str(),
            "pending approval reopened after a restart"
        );
        match router
            .settle_approval(
                &msg,
                &command,
                &id,
                (reply, posted),
                left,
                window,
                decided,
                out,
            )
            .await
        {
            Some(a) => a,
            None => return,
        }
    };
    // Submitted or not, the channel has been told.
    let _ = router
        .submit_and_follow(&msg, &run, def, args, id, approvers, out)
        .await;
}

/// The request expired while the gateway was down: audited, the requester
/// told, the record removed.
async fn end_expired<C: ControllerApi>(
    router: &Router<C>,
    msg: &Incoming,
    command: &str,
    job_id: &str,
    window: Duration,
    out: &dyn ChatSender,
) {
    router
        .report(event(
            "approval_expired",
            msg,
            command,
            job_id,
            format!(
                "no decision within {} s (expired while the gateway was down)",
                window.as_secs()
            ),
        ))
        .await;
    let who = msg.identity.as_str();
    let text = format!(
        "{who}: the approval request for job {} (`{command}`) expired after {} while the gateway was down; nothing ran",
        short_form(job_id),
        render::format_duration(window),
    );
    finish(router, msg, job_id, Some((out, text))).await;
}

/// Tells the requester `told` (where its adapter is there) and removes the
/// ended request's record.
async fn finish<C: ControllerApi>(
    router: &Router<C>,
    msg: &Incoming,
    job_id: &str,
    told: Option<(&dyn ChatSender, String)>,
) {
    if let Some((out, text)) = told {
        router.post(out, msg, Reply::text(text)).await;
    }
    router.approvals.forget(job_id);
    router.approvals.flush().await;
    tracing::info!(job_id, "{ENDED}");
}

/// The request can no longer run: audited with `reason`, the requester
/// told (when its adapter is there), the record removed.
async fn end_dropped<C: ControllerApi>(
    router: &Router<C>,
    msg: &Incoming,
    command: &str,
    job_id: &str,
    reason: String,
    out: Option<&dyn ChatSender>,
) {
    tracing::warn!(job_id, reason, "pending approval dropped after a restart");
    router
        .report(event(
            "approval_dropped",
            msg,
            command,
            job_id,
            reason.clone(),
        ))
        .await;
    let who = msg.identity.as_str();
    let told = out.map(|out| {
        let text = format!(
            "{who}: the approval request for job {} (`{command}`) was dropped: {reason}; nothing ran",
            short_form(job_id),
        );
        (out, text)
    });
    finish(router, msg, job_id, told).await;
}
