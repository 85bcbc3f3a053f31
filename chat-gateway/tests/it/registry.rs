//! Commands registered by integrations and plugins: the router guards them
//! by the signed policy, audits every call and every refusal, lists them in
//! `help` only to those admitted, and a job they ask for goes through
//! `run`'s own path as the caller.

use std::sync::{Arc, Mutex};

use fleetcmd_core::grammar::{RunOptions, RunRequest};
use fleetcmd_gateway::adapters::Reply;
use fleetcmd_gateway::registry::{Call, CallContext, CommandError, CommandSpec, Commands, Guard};
use futures_util::future::BoxFuture;

use crate::support::{POLICY_BODY, Sent, ask, now, world_for};

/// `deploy` (any role here) submits `run CMD on all` as the caller and
/// answers with the outcome; `secrets` needs `audit.read_all` here.
#[derive(Default)]
struct Deploy {
    calls: Mutex<Vec<(String, String, String)>>,
}

impl Commands for Deploy {
    fn commands(&self) -> Vec<CommandSpec> {
        vec![
            CommandSpec {
                verb: "deploy".into(),
                usage: "deploy <command>".into(),
                summary: "runs a command on every host, as you".into(),
                help: "the job goes through the policy like `run`".into(),
                guard: Guard::AnyRoleHere,
            },
            CommandSpec {
                verb: "secrets".into(),
                usage: "secrets".into(),
                summary: "only for auditors".into(),
                help: String::new(),
                guard: Guard::Action("audit.read_all".into()),
            },
        ]
    }

    fn call<'a>(&'a self, call: Call<'a>, ctx: &'a dyn CallContext) -> BoxFuture<'a, Reply> {
        Box::pin(async move {
            self.calls.lock().expect("not poisoned").push((
                call.msg.identity.as_str().to_string(),
                call.verb.to_string(),
                call.args.to_string(),
            ));
            if call.verb == "secrets" {
                return Reply::text("<b>the secret</b>");
            }
            let outcome = ctx
                .run_as_caller(RunRequest {
                    command: call.args.to_string(),
                    args: Vec::new(),
                    selector: "all".into(),
                    options: RunOptions::default(),
                })
                .await;
            Reply::text(format!("deploy: {outcome:?}"))
        })
    }
}

fn texts(sent: &[Sent]) -> Vec<String> {
    sent.iter().map(Sent::text).collect()
}

#[tokio::test]
async fn registered_commands_are_guarded_audited_and_listed_only_for_those_admitted() {
    let body = format!(
        "{POLICY_BODY}\n[roles.auditor]\ncommands = []\nmay = [\"audit.read_all\"]\n\n[[bindings]]\nsubjects = [\"console:erin\"]\nroles = [\"auditor\"]\n"
    );
    let w = world_for(4, &body, |_| {}, |_| {});
    let deploy = Arc::new(Deploy::default());
    w.router
        .register_commands(deploy.clone())
        .unwrap_or_else(|e| panic!("{e}"));
    // A built-in verb cannot be taken over, nor a verb registered twice.
    assert_eq!(
        w.router.register_commands(deploy.clone()),
        Err(CommandError::Duplicate("deploy".into()))
    );

    // help: `deploy` for anyone with a role here, `secrets` only for erin.
    let bob = texts(&ask(&w, "console:bob", "!help").await).join("\n");
    assert!(bob.contains("deploy <command>"), "{bob}");
    assert!(!bob.contains("secrets"), "{bob}");
    let erin = texts(&ask(&w, "console:erin", "!help").await).join("\n");
    assert!(
        erin.contains("deploy <command>") && erin.contains("secrets"),
        "{erin}"
    );
    let mallory = texts(&ask(&w, "console:mallory", "!help").await).join("\n");
    assert!(mallory.contains("you may not run any command"), "{mallory}");
    let topic = texts(&ask(&w, "console:bob", "!help deploy").await).join("\n");
    assert!(
        topic.starts_with("help for `deploy`")
            && topic.contains("usage: deploy <command>")
            && topic.contains("the job goes through the policy like `run`"),
        "{topic}"
    );
    let hidden = texts(&ask(&w, "console:bob", "!help secrets").await).join("\n");
    assert!(hidden.contains("not a command you may run"), "{hidden}");

    // Guard refusals: answered (an action's as for an unknown verb, so
    // what a role may not use stays hidden, as in help), audited as
    // chat_denied, the command not called.
    let sent = texts(&ask(&w, "console:bob", "!secrets").await);
    assert_eq!(
        sent,
        ["unknown command `secrets`; try `help` — asked by console:bob"]
    );
    let sent = texts(&ask(&w, "console:mallory", "!deploy uptime").await);
    assert_eq!(
        sent,
        ["you have no roles in this channel — asked by console:mallory"]
    );
    assert!(deploy.calls.lock().expect("not poisoned").is_empty());
    let reports = w.router.controller().reported();
    assert!(
        reports.contains(&(
            "chat_denied".into(),
            "console:bob".into(),
            "secrets".into(),
            "`secrets` needs audit.read_all in console; answered as an unknown command".into()
        )),
        "{reports:#?}"
    );
    assert!(
        reports.contains(&(
            "chat_denied".into(),
            "console:mallory".into(),
            "deploy".into(),
            "no role in console".into()
        )),
        "{reports:#?}"
    );

    // Admitted: called with the verified identity and the text after the
    // verb; the reply is an ordinary reply (adapters escape it); audited.
    let sent = texts(&ask(&w, "console:erin", "!SECRETS  now ").await);
    assert_eq!(sent, ["<b>the secret</b>"]);
    assert_eq!(
        deploy.calls.lock().expect("not poisoned").clone(),
        [("console:erin".into(), "secrets".into(), "now".into())]
    );
    let reports = w.router.controller().reported();
    assert!(
        reports.contains(&(
            "chat_command".into(),
            "console:erin".into(),
            "secrets".into(),
            "now: <b>the secret</b>".into()
        )),
        "{reports:#?}"
    );

    // A job it asks for is submitted as the caller, only when the caller
    // may run it: bob may run uptime, not restart.
    let sent = texts(&ask(&w, "console:bob", "!deploy uptime").await);
    let last = sent.last().cloned().unwrap_or_default();
    assert!(last.starts_with("deploy: Submitted"), "{sent:#?}");
    let subs = w.router.controller().submitted();
    assert_eq!(subs.len(), 1);
    let spec = subs[0]
        .verify(&w.policy, now())
        .unwrap_or_else(|e| panic!("signature: {e}"));
    assert_eq!(spec.requester.as_str(), "console:bob");
    assert_eq!(spec.command, "uptime");

    let sent = texts(&ask(&w, "console:bob", "!deploy restart").await);
    assert!(
        sent.iter()
            .any(|t| t.starts_with("refused:") && t.contains("nothing was submitted")),
        "{sent:#?}"
    );
    assert!(
        sent.last()
            .is_some_and(|t| t.starts_with("deploy: NotSubmitted")),
        "{sent:#?}"
    );
    assert_eq!(w.router.controller().submitted().len(), 1);
    let reports = w.router.controller().reported();
    assert!(
        reports
            .iter()
            .any(|(k, a, c, _)| k == "chat_denied" && a == "console:bob" && c == "restart"),
        "{reports:#?}"
    );
    assert!(
        reports.iter().any(|(k, a, c, d)| k == "chat_command"
            && a == "console:bob"
            && c == "deploy"
            && d.starts_with("restart: deploy: NotSubmitted")),
        "{reports:#?}"
    );
}
