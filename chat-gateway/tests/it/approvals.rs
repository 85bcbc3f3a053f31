//! Two-person approval from chat, attacked: the requester approving their
//! own job, a user without the right, the same person twice, a denial and an
//! expiry — and the signed job carrying its approvers.

use std::sync::Arc;
use std::time::Duration;

use fleetcmd_core::job::JobSpec;
use fleetcmd_gateway::router::Router;

use crate::support::{
    FakeController, RecordingSender, Sent, World, ask, msg, now, world, world_with_config,
};

/// Starts `run reboot on all` for alice in its own task (it waits for the
/// decision) and returns the task, its sender and the short id posted.
async fn request_reboot(w: &World) -> (tokio::task::JoinHandle<()>, Arc<RecordingSender>, String) {
    let out = Arc::new(RecordingSender::default());
    let router: Arc<Router<FakeController>> = w.router.clone();
    let task = {
        let out = out.clone();
        tokio::spawn(async move {
            router
                .handle(msg("console:alice", "!run reboot on all"), out.as_ref())
                .await;
        })
    };
    let short = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            if let Some(Sent::Send { reply, .. }) = out.all().first() {
                return reply.header.split_whitespace().nth(1).map(str::to_string);
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
    .unwrap_or_else(|_| panic!("no approval request posted"))
    .unwrap_or_else(|| panic!("approval request without an id"));
    (task, out, short)
}

fn submitted_approvers(w: &World) -> Vec<Vec<String>> {
    w.router
        .controller()
        .submitted()
        .iter()
        .map(|j| {
            JobSpec::from_bytes(&j.spec)
                .unwrap_or_else(|e| panic!("{e}"))
                .approvals
                .iter()
                .map(|a| {
                    // Attested by this gateway's signer, in the approver's channel.
                    assert_eq!(a.key_id, "gw");
                    a.approver.as_str().to_string()
                })
                .collect()
        })
        .collect()
}

fn kinds(w: &World) -> Vec<String> {
    w.router
        .controller()
        .reported()
        .into_iter()
        .map(|(k, ..)| k)
        .collect()
}

async fn finish(task: tokio::task::JoinHandle<()>) {
    tokio::time::timeout(Duration::from_secs(10), task)
        .await
        .unwrap_or_else(|_| panic!("run task did not finish"))
        .unwrap_or_else(|e| panic!("{e}"));
}

#[tokio::test]
async fn a_command_needing_approval_waits_and_runs_after_another_approver_says_yes() {
    let w = world();
    let (task, out, short) = request_reboot(&w).await;
    let request = out.all()[0].clone();
    let Sent::Send { reply, .. } = &request else {
        panic!("expected a posted request")
    };
    assert!(
        reply.header.contains("needs 1 approval"),
        "{}",
        reply.header
    );
    assert_eq!(
        reply
            .actions
            .iter()
            .map(|a| a.command.as_str())
            .collect::<Vec<_>>(),
        [format!("approve {short}"), format!("deny {short}")]
    );
    assert!(
        w.router.controller().submitted().is_empty(),
        "ran before approval"
    );
    assert_eq!(w.router.pending_approvals(), 1);

    let approved = ask(&w, "console:carol", &format!("!approve {short}")).await;
    assert!(
        approved[0].text().contains("approved; submitting"),
        "{}",
        approved[0].text()
    );
    finish(task).await;
    assert_eq!(submitted_approvers(&w), [vec!["console:carol".to_string()]]);
    let texts: Vec<String> = out.all().iter().map(Sent::text).collect();
    assert!(
        texts
            .iter()
            .any(|t| t.contains("approved by console:carol")),
        "{texts:#?}"
    );
    assert!(
        texts.iter().any(|t| t.contains("succeeded")),
        "the job was followed to its end: {texts:#?}"
    );
    assert_eq!(kinds(&w), ["approval_requested", "approval_given"]);
    assert_eq!(w.router.pending_approvals(), 0);
}

#[tokio::test]
async fn the_requester_cannot_approve_their_own_job_nor_can_someone_without_the_right() {
    let w = world();
    let (task, _out, short) = request_reboot(&w).await;
    let own = ask(&w, "console:alice", &format!("!approve {short}")).await;
    assert!(
        own[0].text().contains("someone else must approve"),
        "{}",
        own[0].text()
    );
    // bob is a viewer: reboot is not among his role's commands. He is
    // told what an id that names nothing tells: not the command, not the
    // full id (found by an outside test), for approve and deny alike.
    let stranger = ask(&w, "console:bob", &format!("!approve {short}")).await;
    assert!(
        stranger[0]
            .text()
            .contains("no approval request is waiting"),
        "{}",
        stranger[0].text()
    );
    let stranger_deny = ask(&w, "console:bob", &format!("!deny {short} no")).await;
    assert!(
        stranger_deny[0]
            .text()
            .contains("no approval request is waiting")
            && !stranger_deny[0].text().contains("reboot"),
        "{}",
        stranger_deny[0].text()
    );
    // Nobody known to the policy at all.
    let nobody = ask(&w, "console:mallory", &format!("!approve {short}")).await;
    assert!(
        nobody[0].text().contains("no approval request is waiting"),
        "{}",
        nobody[0].text()
    );
    assert!(w.router.controller().submitted().is_empty());
    assert_eq!(w.router.pending_approvals(), 1);
    let reported = w.router.controller().reported();
    assert_eq!(
        reported
            .iter()
            .filter(|(k, ..)| k == "chat_denied")
            .map(|(_, actor, ..)| actor.as_str())
            .collect::<Vec<_>>(),
        [
            "console:alice",
            "console:bob",
            "console:bob",
            "console:mallory"
        ]
    );
    // A second approval by the same person never counts twice: with one
    // approval needed, carol's first completes it and her second finds
    // nothing waiting.
    ask(&w, "console:carol", &format!("!approve {short}")).await;
    let again = ask(&w, "console:carol", &format!("!approve {short}")).await;
    assert!(
        again[0].text().contains("no approval request is waiting"),
        "{}",
        again[0].text()
    );
    finish(task).await;
    assert_eq!(submitted_approvers(&w), [vec!["console:carol".to_string()]]);
}

#[tokio::test]
async fn a_denied_request_never_runs_and_says_who_denied_and_why() {
    let w = world();
    let (task, out, short) = request_reboot(&w).await;
    let denied = ask(
        &w,
        "console:dave",
        &format!("!deny {short} not during the sale"),
    )
    .await;
    assert!(denied[0].text().contains("denied"), "{}", denied[0].text());
    finish(task).await;
    assert!(w.router.controller().submitted().is_empty());
    let texts: Vec<String> = out.all().iter().map(Sent::text).collect();
    assert!(
        texts
            .iter()
            .any(|t| t.contains("denied by console:dave: not during the sale; nothing ran")),
        "{texts:#?}"
    );
    assert_eq!(kinds(&w), ["approval_requested", "approval_denied"]);
    // bob may neither approve nor deny: to him no such request waits.
    let (task, _out, short) = request_reboot(&w).await;
    let bob = ask(&w, "console:bob", &format!("!deny {short}")).await;
    assert!(
        bob[0].text().contains("no approval request is waiting"),
        "{}",
        bob[0].text()
    );
    // The requester may withdraw.
    let own = ask(&w, "console:alice", &format!("!deny {short} wrong host")).await;
    assert!(own[0].text().contains("denied"), "{}", own[0].text());
    finish(task).await;
    assert!(w.router.controller().submitted().is_empty());
    // A reason of 100 KB is quoted back as a bounded excerpt.
    let (task, out, short) = request_reboot(&w).await;
    let long = "r".repeat(100_000);
    ask(&w, "console:dave", &format!("!deny {short} {long}")).await;
    finish(task).await;
    let told = out
        .all()
        .iter()
        .map(Sent::text)
        .find(|t| t.contains("denied by console:dave"))
        .unwrap_or_default();
    assert!(
        told.len() < 1000 && told.contains(&format!("{}…; nothing ran", "r".repeat(100))),
        "{} bytes: {}",
        told.len(),
        &told[..told.len().min(300)]
    );
}

#[tokio::test]
async fn an_expired_request_runs_nothing_and_takes_no_late_approval() {
    let w = world_with_config(
        |_| {},
        |cfg| cfg.approval_window = Duration::from_millis(300),
    );
    let (task, out, short) = request_reboot(&w).await;
    finish(task).await;
    let texts: Vec<String> = out.all().iter().map(Sent::text).collect();
    assert!(
        texts
            .iter()
            .any(|t| t.contains("expired") && t.contains("nothing ran")),
        "{texts:#?}"
    );
    let late = ask(&w, "console:carol", &format!("!approve {short}")).await;
    assert!(
        late[0].text().contains("no approval request is waiting"),
        "{}",
        late[0].text()
    );
    assert!(w.router.controller().submitted().is_empty());
    assert_eq!(kinds(&w), ["approval_requested", "approval_expired"]);
}

#[tokio::test]
async fn dry_run_of_an_approval_command_needs_no_approval_and_runs_nothing() {
    let w = world();
    let sent = ask(&w, "console:alice", "!run reboot on all --dry-run").await;
    assert!(sent[0].text().contains("dry run"), "{}", sent[0].text());
    assert_eq!(w.router.pending_approvals(), 0);
    assert!(w.router.controller().submitted().is_empty());
}

#[tokio::test]
async fn a_refused_run_is_reported_to_the_audit_trail() {
    let w = world();
    let sent = ask(&w, "console:bob", "!run reboot on all").await;
    assert!(sent[0].text().contains("refused"), "{}", sent[0].text());
    let reported = w.router.controller().reported();
    assert_eq!(reported.len(), 1, "{reported:?}");
    let (kind, actor, command, detail) = &reported[0];
    assert_eq!(
        (kind.as_str(), actor.as_str(), command.as_str()),
        ("chat_denied", "console:bob", "reboot")
    );
    assert!(detail.contains("needs one of roles [oncall]"), "{detail}");
}

/// `approve 0` used to approve whatever single request was waiting: an
/// approval names the job by its short id (what the request shows), its
/// full id, or at least 8 characters of the full id.
#[tokio::test]
async fn approve_and_deny_need_a_long_enough_unambiguous_id() {
    let w = world();
    let (task, _out, short) = request_reboot(&w).await;
    assert_eq!(short.len(), 12, "the request shows the short id: {short}");
    for typed in [&short[..1], &short[..4], &short[..7]] {
        for verb in ["approve", "deny"] {
            let r = ask(&w, "console:carol", &format!("!{verb} {typed}")).await;
            assert!(
                r[0].text().contains("give the 12-digit short id"),
                "{verb} {typed}: {}",
                r[0].text()
            );
        }
    }
    // Part of the short id is neither it nor the start of the full id.
    let r = ask(&w, "console:carol", &format!("!approve {}", &short[..9])).await;
    assert!(
        r[0].text().contains("neither a short id"),
        "{}",
        r[0].text()
    );
    assert_eq!(w.router.pending_approvals(), 1);
    assert!(w.router.controller().submitted().is_empty());
    let r = ask(&w, "console:carol", &format!("!approve {short}")).await;
    assert!(r[0].text().contains("approved"), "{}", r[0].text());
    finish(task).await;
    assert_eq!(submitted_approvers(&w), [vec!["console:carol".to_string()]]);
    let subs = w.router.controller().submitted();
    let spec = subs[0].verify(&w.policy, now()).expect("signed");
    assert_eq!(spec.id.short().as_str(), short);
}

/// An approved job whose short id turns out to be taken at submit is signed
/// again with a new id, and its approvals are attested again for that id:
/// they still count (the controller and agents check them over the job).
#[tokio::test]
async fn approvals_are_attested_again_when_the_id_changes_at_submit() {
    let w = world();
    w.router
        .controller()
        .short_ids_taken
        .store(1, std::sync::atomic::Ordering::SeqCst);
    let (task, _out, short) = request_reboot(&w).await;
    let r = ask(&w, "console:carol", &format!("!approve {short}")).await;
    assert!(r[0].text().contains("approved"), "{}", r[0].text());
    finish(task).await;
    let subs = w.router.controller().submitted();
    assert_eq!(subs.len(), 1);
    let spec = subs[0].verify(&w.policy, now()).expect("signed");
    assert_ne!(spec.id.short().as_str(), short);
    let counted = fleetcmd_core::approval::verify_approvals(&w.policy, &spec);
    assert_eq!(counted.got(), 1, "{counted:?}");
}

/// An approver whose role is scoped to one channel approves from there
/// only: not from another channel, and not in a private message.
#[tokio::test]
async fn an_approver_scoped_to_a_channel_approves_from_that_channel_only() {
    let body = crate::support::POLICY_BODY.replace(
        "[roles.viewer]",
        "[roles.ops-lead]\ncommands = [\"reboot\"]\nchannels = [\"console:#ops\"]\n\n\
         [[bindings]]\nsubjects = [\"console:erin\"]\nroles = [\"ops-lead\"]\n\n[roles.viewer]",
    );
    let w = crate::support::world_for(4, &body, |_| {}, |_| {});
    let (task, _out, short) = request_reboot(&w).await;
    let from = |channel: &str, direct: bool| {
        let mut m = msg("console:erin", &format!("!approve {short}"));
        m.channel = channel.to_string();
        m.direct = direct;
        m
    };
    for (channel, direct) in [
        ("console", false),
        ("console:#random", false),
        ("console:erin", true),
    ] {
        let out = RecordingSender::default();
        w.router.handle(from(channel, direct), &out).await;
        let text = out.all()[0].text();
        assert!(
            text.contains("may not approve `reboot` jobs in this channel"),
            "{channel}: {text}"
        );
    }
    assert_eq!(w.router.pending_approvals(), 1);
    // Each refused approval is in the audit trail.
    let denied = w
        .router
        .controller()
        .reported()
        .iter()
        .filter(|(k, actor, ..)| k == "chat_denied" && actor == "console:erin")
        .count();
    assert_eq!(denied, 3);
    let out = RecordingSender::default();
    w.router.handle(from("console:#ops", false), &out).await;
    assert!(
        out.all()[0].text().contains("approved"),
        "{}",
        out.all()[0].text()
    );
    finish(task).await;
    assert_eq!(submitted_approvers(&w).len(), 1);
}
