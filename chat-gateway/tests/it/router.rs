//! The router against a fake controller: RBAC on every command, argument
//! checks before submission, signed jobs, replies that name who asked.

use std::sync::atomic::Ordering;

use fleetcmd_core::job::JobSpec;
use fleetcmd_core::policy_bundle::sign_bundle;
use fleetcmd_gateway::adapters::console::ConsoleAdapter;
use fleetcmd_gateway::router::Router;
use fleetcmd_gateway::serve;
use tokio::io::{AsyncReadExt, AsyncWriteExt, BufReader};

use crate::support::{RecordingSender, Sent, ask, msg, new_key, now, world, world_with};

/// The options of `run` that help must not hide.
const RUN_OPTIONS: [&str; 5] = [
    "--batch",
    "--max-errors",
    "--canary",
    "--timeout",
    "--dry-run",
];

fn one_text(sent: &[Sent]) -> String {
    assert_eq!(sent.len(), 1, "{sent:#?}");
    sent[0].text()
}

#[tokio::test]
async fn help_lists_only_permitted_commands() {
    let w = world();
    let bob = one_text(&ask(&w, "console:bob", "!help").await);
    assert!(bob.contains("• uptime") && bob.contains("• logs"), "{bob}");
    assert!(!bob.contains("restart") && !bob.contains("reboot"), "{bob}");
    assert!(bob.contains("asked by console:bob"), "{bob}");
    assert!(bob.contains("[lines: int 1..=500, default 50]"), "{bob}");

    let alice = one_text(&ask(&w, "console:alice", "!help").await);
    assert!(
        alice.contains("• restart <unit: enum nginx.service|app.service> — Restart an app service"),
        "{alice}"
    );

    let topic = one_text(&ask(&w, "console:bob", "!help restart").await);
    assert!(topic.contains("not a command you may run"), "{topic}");
    // The rate and dry-run options of run are listed, not hidden.
    for option in RUN_OPTIONS {
        assert!(bob.contains(option), "{option}: {bob}");
    }
    // `help VERB` answers for every verb of the grammar, even for someone
    // who may run nothing.
    for verb in fleetcmd_core::grammar::VERBS {
        let text = one_text(&ask(&w, "console:mallory", &format!("!help {}", verb.verb)).await);
        assert!(
            text.starts_with(&format!("help for `{}`", verb.verb))
                && text.contains(&format!("usage: {}", verb.usage)),
            "{text}"
        );
    }
    let run = one_text(&ask(&w, "console:bob", "!help run").await);
    for option in RUN_OPTIONS {
        assert!(
            run.lines().any(|l| l.trim_start().starts_with(option)),
            "{option} not explained: {run}"
        );
    }
    let long = one_text(&ask(&w, "console:bob", &format!("!help {}", "z".repeat(100_000))).await);
    assert!(long.len() < 400 && long.contains("not a command"), "{long}");
    let nobody = one_text(&ask(&w, "console:mallory", "!help").await);
    assert!(nobody.contains("you may not run any command"), "{nobody}");
}

#[tokio::test]
async fn run_refused_by_rbac_names_the_missing_role_and_submits_nothing() {
    let w = world();
    let text = one_text(&ask(&w, "console:bob", "!run restart nginx.service on role=web").await);
    assert!(
        text.contains("`restart` needs one of roles [oncall]"),
        "{text}"
    );
    assert!(
        text.contains("you have [viewer]") && text.contains("asked by console:bob"),
        "{text}"
    );
    let text = one_text(&ask(&w, "console:mallory", "!run uptime on all").await);
    assert!(text.contains("you have no roles"), "{text}");
    assert!(w.router.controller().submitted().is_empty());
}

#[tokio::test]
async fn bad_arguments_are_rejected_before_submission() {
    let w = world();
    for (input, expected) in [
        (
            "!run restart apache.service on role=web",
            "\"apache.service\" is not one of nginx.service, app.service",
        ),
        (
            "!run restart on role=web",
            "argument `unit` of `restart` is required",
        ),
        (
            "!run restart a b on role=web",
            "takes at most 1 argument(s), got 2",
        ),
        (
            "!run logs nginx.service 900 on all",
            "900 is outside 1..=500",
        ),
        ("!run logs -f on all", "must not start with `-`"),
    ] {
        let text = one_text(&ask(&w, "console:alice", input).await);
        assert!(text.contains(expected), "{input}: {text}");
        assert!(text.contains("asked by console:alice"), "{input}: {text}");
    }
    assert!(w.router.controller().submitted().is_empty());
}

#[tokio::test]
async fn grammar_errors_are_answered() {
    let w = world();
    let text = one_text(&ask(&w, "console:alice", "!run uptime").await);
    assert_eq!(
        text,
        "a target is required: run <command> [args] on <selector> — asked by console:alice"
    );
    let text = one_text(&ask(&w, "console:alice", "!frobnicate").await);
    assert!(
        text.starts_with("unknown command `frobnicate`; try `help`"),
        "{text}"
    );
}

#[tokio::test]
async fn unaddressed_and_bot_messages_are_ignored() {
    let w = world();
    assert!(
        ask(&w, "console:alice", "run uptime on all")
            .await
            .is_empty()
    );
    let out = RecordingSender::default();
    let mut m = msg("console:alice", "!run uptime on all");
    m.from_bot = true;
    w.router.handle(m, &out).await;
    let mut m = msg("console:alice", "uptime please");
    m.direct = true;
    w.router.handle(m, &out).await;
    assert_eq!(
        out.all().len(),
        1,
        "only the direct message is answered: {:#?}",
        out.all()
    );
    assert!(w.router.controller().submitted().is_empty());
}

#[tokio::test]
async fn rollout_options_are_signed_into_the_spec() {
    let w = world();
    ask(
        &w,
        "console:alice",
        "!run uptime on all --batch 2 --canary 1 --max-errors 10%",
    )
    .await;
    let subs = w.router.controller().submitted();
    assert_eq!(subs.len(), 1);
    let spec = subs[0]
        .verify(&w.policy, now())
        .unwrap_or_else(|e| panic!("signature: {e}"));
    use fleetcmd_core::grammar::Limit;
    assert_eq!(spec.rollout.batch, Some(Limit::Count(2)));
    assert_eq!(spec.rollout.canary, Some(1));
    assert_eq!(spec.rollout.max_errors, Some(Limit::Percent(10)));
}

#[tokio::test]
async fn run_signs_submits_and_reports_the_result() {
    let w = world_with(|c| c.running_polls.store(2, Ordering::SeqCst));
    let sent = ask(
        &w,
        "console:alice",
        "@fleetcmd run logs app.service on role=web --timeout 30s",
    )
    .await;
    let subs = w.router.controller().submitted();
    assert_eq!(subs.len(), 1);
    let spec = subs[0]
        .verify(&w.policy, now())
        .unwrap_or_else(|e| panic!("signature: {e}"));
    assert_eq!(subs[0].key_id, "gw");
    assert_eq!(spec.command, "logs");
    assert_eq!(
        spec.args.get("unit").map(String::as_str),
        Some("app.service")
    );
    assert_eq!(spec.selector, "role=web");
    assert_eq!(spec.requester.as_str(), "console:alice");
    assert_eq!(spec.channel, "console");
    assert!(spec.approvals.is_empty());
    assert_eq!(spec.timeout_secs, 30);
    assert_eq!(spec.expires_at - spec.not_before, 600);
    assert_eq!(
        JobSpec::from_bytes(&subs[0].spec).map(|s| s.id),
        Ok(spec.id.clone())
    );

    // Chat shows the short id: the UUIDv7's random tail, never its
    // timestamp (which jobs of the same moment share).
    let short = spec.id.short().to_string();
    assert_eq!(short, &spec.id.as_str()[24..]);
    let first = sent.first().map(Sent::text).unwrap_or_default();
    assert_eq!(
        first,
        format!("job {short} `logs` on role=web by console:alice: 2 targets")
    );
    let Some(Sent::Edit { id, reply }) = sent.last() else {
        panic!("expected a final edit: {sent:#?}")
    };
    assert_eq!(id, "1");
    assert_eq!(
        reply.header,
        format!("job {short} succeeded (2/2 ok) — asked by console:alice")
    );
    assert_eq!(reply.sections.len(), 2);
    assert!(
        reply.sections[0].title.starts_with("web-1 — ok, exit 0"),
        "{reply:#?}"
    );
    assert_eq!(reply.sections[0].blocks[0].text, "up 3 days, load 0.5");
    // What chat shows is what chat takes back.
    let again = ask(&w, "console:alice", &format!("!job {short}")).await;
    assert!(
        again[0]
            .text()
            .starts_with(&format!("job {short} succeeded")),
        "{again:#?}"
    );
    let output = ask(&w, "console:alice", &format!("!output {short}")).await;
    assert!(
        output[0].text().contains("up 3 days, load 0.5"),
        "{output:#?}"
    );
    let _ = w.signer;
}

/// The controller refuses a job whose short id a stored job has (ABORTED):
/// the gateway signs the same request again with a new id, and chat only
/// ever shows the id that was stored.
#[tokio::test]
async fn a_taken_short_id_is_signed_again_with_a_new_id() {
    let w = world_with(|c| c.short_ids_taken.store(1, Ordering::SeqCst));
    let sent = ask(&w, "console:alice", "!run uptime on all").await;
    let ctl = w.router.controller();
    let refused = ctl
        .short_id_refused
        .lock()
        .map(|r| r.clone())
        .unwrap_or_default();
    let subs = ctl.submitted();
    assert_eq!((refused.len(), subs.len()), (1, 1));
    let first = refused[0].verify(&w.policy, now()).expect("signed");
    let second = subs[0].verify(&w.policy, now()).expect("signed again");
    assert_ne!(first.id, second.id);
    assert_ne!(first.id.short(), second.id.short());
    assert_eq!(
        (&first.command, &first.selector, &first.requester),
        (&second.command, &second.selector, &second.requester)
    );
    let text: Vec<String> = sent.iter().map(Sent::text).collect();
    let all = text.join("\n");
    assert!(
        all.contains(&format!("job {} `uptime`", second.id.short())),
        "{all}"
    );
    assert!(!all.contains(first.id.short().as_str()), "{all}");
}

/// Three taken short ids in a row: the gateway gives up and says why.
#[tokio::test]
async fn a_short_id_taken_every_time_is_reported_not_retried_forever() {
    let w = world_with(|c| c.short_ids_taken.store(10, Ordering::SeqCst));
    let sent = ask(&w, "console:alice", "!run uptime on all").await;
    let ctl = w.router.controller();
    let refused = ctl.short_id_refused.lock().map(|r| r.len()).unwrap_or(0);
    assert_eq!(refused, fleetcmd_core::ids::SHORT_ID_ATTEMPTS);
    assert!(ctl.submitted().is_empty());
    assert!(
        sent[0].text().contains("job not submitted")
            && sent[0].text().contains("already names another job"),
        "{sent:#?}"
    );
}

#[tokio::test]
async fn dry_run_lists_agents_and_argv_without_submitting() {
    let w = world();
    let text = one_text(
        &ask(
            &w,
            "console:alice",
            "!run restart app.service on role=web --dry-run",
        )
        .await,
    );
    assert!(
        text.contains(
            "dry run of `restart` on role=web: 2 of 2 matching agents; nothing was submitted"
        ),
        "{text}"
    );
    assert!(
        text.contains(r#"["/usr/bin/systemctl", "restart", "app.service"]"#),
        "{text}"
    );
    assert!(
        text.contains("web-1") && text.contains("would run"),
        "{text}"
    );
    assert!(w.router.controller().submitted().is_empty());
}

#[tokio::test]
async fn controller_errors_are_reported() {
    let w = world_with(|c| c.unreachable = true);
    let text = one_text(&ask(&w, "console:alice", "!run uptime on all").await);
    assert!(
        text.contains("could not fetch the policy from the controller: connection refused"),
        "{text}"
    );
    let text = one_text(&ask(&w, "console:alice", "!whoami").await);
    assert!(
        text.contains("you are console:alice; roles unknown"),
        "{text}"
    );
}

#[tokio::test]
async fn policy_signed_by_an_unknown_root_is_refused() {
    let w = world_with(|c| {
        let Some(p) = c.policy.policy.as_mut() else {
            return;
        };
        let sig = sign_bundle(&p.bundle, &new_key());
        p.signatures = vec![fleetcmd_proto::v1::PolicySignature {
            key_id: sig.key_id,
            signature: sig.signature,
        }];
    });
    let text = one_text(&ask(&w, "console:alice", "!run uptime on all").await);
    assert!(
        text.contains("the controller's policy was refused"),
        "{text}"
    );
    assert!(w.router.controller().submitted().is_empty());
    let _ = &w.root;
}

/// `jobs` pages through older jobs, ten a page, newest first; the next
/// page is named while there is one (IRC shows no more than a page).
#[tokio::test]
async fn jobs_pages_through_older_jobs() {
    let w = world();
    for i in 0..23 {
        let sent = ask(
            &w,
            "console:alice",
            &format!("!run logs app.service {} on web-1", i + 1),
        )
        .await;
        assert!(!sent.is_empty(), "job {i}");
    }
    let ids: Vec<String> = w
        .router
        .controller()
        .submitted()
        .iter()
        .filter_map(|j| JobSpec::from_bytes(&j.spec).ok())
        .map(|s| fleetcmd_core::ids::short_form(s.id.as_str()).to_string())
        .collect();
    assert_eq!(ids.len(), 23);
    let page = |text: &str| -> Vec<String> {
        ids.iter()
            .filter(|id| text.contains(id.as_str()))
            .cloned()
            .collect()
    };
    let first = one_text(&ask(&w, "console:alice", "!jobs mine").await);
    assert!(first.contains("your recent jobs page 1: 1-10"), "{first}");
    assert!(first.contains("older: `jobs mine page 2`"), "{first}");
    assert_eq!(page(&first), ids[13..].to_vec(), "the newest ten: {first}");
    let second = one_text(&ask(&w, "console:alice", "!jobs mine page 2").await);
    assert!(
        second.contains("page 2: 11-20") && second.contains("`jobs mine page 3`"),
        "{second}"
    );
    assert_eq!(page(&second), ids[3..13].to_vec(), "{second}");
    let last = one_text(&ask(&w, "console:alice", "!jobs page 3").await);
    assert!(last.contains("recent jobs page 3: 21-23"), "{last}");
    assert!(!last.contains("older"), "{last}");
    assert_eq!(page(&last), ids[..3].to_vec(), "{last}");
    let beyond = one_text(&ask(&w, "console:alice", "!jobs mine page 4").await);
    assert!(beyond.contains("page 4: none"), "{beyond}");
    // Pages are of what the asker may see.
    let bob = one_text(&ask(&w, "console:bob", "!jobs page 2").await);
    assert!(
        bob.contains("page 2: none") || bob.contains("page 2: 11-"),
        "{bob}"
    );
    let bad = one_text(&ask(&w, "console:alice", "!jobs mine page 51").await);
    assert!(bad.contains("a number from 1 to 50"), "{bad}");
}

#[tokio::test]
async fn reads_need_a_role_and_show_visible_jobs() {
    let w = world();
    let text = one_text(&ask(&w, "console:alice", "!whoami").await);
    assert!(
        text.contains("you are console:alice") && text.contains("roles: oncall"),
        "{text}"
    );
    let text = one_text(&ask(&w, "console:alice", "!policy").await);
    assert!(text.contains("policy version 4 sha256:"), "{text}");
    let text = one_text(&ask(&w, "console:mallory", "!agents").await);
    assert!(text.contains("you have no roles in this channel"), "{text}");
    let text = one_text(&ask(&w, "console:bob", "!status role=web").await);
    assert!(
        text.contains("agents matching role=web: 2 (2 online)"),
        "{text}"
    );
    assert!(
        text.contains("web-1")
            && text.contains("online")
            && text.contains("0.50")
            && text.contains("25"),
        "{text}"
    );

    ask(&w, "console:alice", "!run restart app.service on role=web").await;
    let text = one_text(&ask(&w, "console:bob", "!jobs").await);
    assert!(
        text.contains("recent jobs (0)"),
        "bob may not run restart: {text}"
    );
    let text = one_text(&ask(&w, "console:alice", "!jobs mine").await);
    assert!(
        text.contains("your recent jobs (1)") && text.contains("restart"),
        "{text}"
    );
    let id = w
        .router
        .controller()
        .submitted()
        .first()
        .and_then(|j| JobSpec::from_bytes(&j.spec).ok())
        .map(|s| s.id);
    let id = id.map(|i| i.as_str()[..13].to_string()).unwrap_or_default();
    let text = one_text(&ask(&w, "console:bob", &format!("!job {id}")).await);
    assert!(text.contains("not visible to you"), "{text}");
    let text = one_text(&ask(&w, "console:alice", &format!("!job {id}")).await);
    assert!(text.contains("succeeded (2/2 ok)"), "{text}");
    // Output and cancel follow the same visibility rule as `job`.
    let text = one_text(&ask(&w, "console:bob", &format!("!output {id}")).await);
    assert!(text.contains("not visible to you"), "{text}");
    let text = one_text(&ask(&w, "console:alice", &format!("!output {id} web-1")).await);
    assert!(
        text.contains("output of job") && text.contains("up 3 days"),
        "{text}"
    );
    let text = one_text(&ask(&w, "console:bob", &format!("!cancel {id}")).await);
    assert!(text.contains("may only be canceled"), "{text}");
    // The refused cancel is in the audit trail, like any refusal of rights.
    let denied: Vec<_> = w
        .router
        .controller()
        .reported()
        .into_iter()
        .filter(|(kind, actor, ..)| kind == "chat_denied" && actor == "console:bob")
        .collect();
    assert_eq!(denied.len(), 1, "{denied:?}");
    assert_eq!(denied[0].2, "restart", "{denied:?}");
    assert!(
        denied[0].3.starts_with("cancel ") && denied[0].3.contains("may not run `restart`"),
        "{denied:?}"
    );
    assert!(
        w.router
            .controller()
            .canceled
            .lock()
            .map(|c| c.is_empty())
            .unwrap_or(false)
    );
    let text = one_text(&ask(&w, "console:alice", &format!("!cancel {id}")).await);
    assert!(text.contains("canceled"), "{text}");
    let canceled = w
        .router
        .controller()
        .canceled
        .lock()
        .map(|c| c.clone())
        .unwrap_or_default();
    assert_eq!(canceled.len(), 1);
    assert_eq!(canceled[0].1, "console:alice");
}

#[tokio::test]
async fn serve_answers_concurrently_and_waits_for_running_jobs() {
    let w = world_with(|c| c.running_polls.store(20, Ordering::SeqCst));
    let router: std::sync::Arc<Router<_>> = w.router.clone();
    let (mut user_in, adapter_in) = tokio::io::duplex(4096);
    let (adapter_out, mut user_out) = tokio::io::duplex(1 << 20);
    let console = ConsoleAdapter::new(BufReader::new(adapter_in), adapter_out, "alice")
        .unwrap_or_else(|e| panic!("{e}"));
    user_in
        .write_all(b"run uptime on all\n!whoami\nrun uptime\n")
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    drop(user_in);
    let reader = tokio::spawn(async move {
        let mut text = String::new();
        let _ = user_out.read_to_string(&mut text).await;
        text
    });
    serve(router, console).await;
    let text = reader.await.unwrap_or_else(|e| panic!("{e}"));
    let whoami = text.find("you are console:alice").unwrap_or(usize::MAX);
    let done = text
        .find("succeeded (2/2 ok)")
        .unwrap_or_else(|| panic!("job result missing:\n{text}"));
    assert!(
        whoami < done,
        "whoami is answered while the job runs:\n{text}"
    );
    assert!(text.contains("a target is required"), "{text}");
    assert!(text.contains("  | up 3 days, load 0.5\n"), "{text}");
}

fn service(name: &str, state: &str, passing: u32, total: u32) -> fleetcmd_proto::v1::Service {
    use fleetcmd_proto::v1;
    v1::Service {
        name: name.into(),
        state: state.into(),
        selector: "role=web".into(),
        check: "http".into(),
        passing,
        total,
        instances: (1..=total)
            .map(|i| v1::ServiceInstance {
                agent_id: format!("web-{i}"),
                online: true,
                state: if i <= passing {
                    v1::CheckState::Ok as i32
                } else {
                    v1::CheckState::Critical as i32
                },
                summary: if i <= passing {
                    "HTTP OK".into()
                } else {
                    "connection refused".into()
                },
                checked_at_ms: 0,
            })
            .collect(),
        ..Default::default()
    }
}

#[tokio::test]
async fn health_shows_services_and_silence_is_limited_and_reported_with_the_chat_identity() {
    // The controller lists services worst first; the router keeps its order.
    let w = world_with(|f| {
        f.services = vec![service("api", "degraded", 1, 2), service("web", "ok", 2, 2)]
    });
    let text = one_text(&ask(&w, "console:bob", "!health").await);
    assert!(text.contains("services: 2 (1 not ok)"), "{text}");
    let api = text.find("api").expect("api listed");
    let web = text.rfind("web ").expect("web listed");
    assert!(api < web, "worst first: {text}");
    assert!(text.contains("1/2") && text.contains("degraded"), "{text}");

    let text = one_text(&ask(&w, "console:bob", "!health api").await);
    assert!(
        text.contains("api is degraded (1 of 2 instances pass; check \"http\" on role=web)"),
        "{text}"
    );
    // The failing instance first.
    assert!(
        text.find("web-2").expect("web-2") < text.find("web-1").expect("web-1")
            && text.contains("connection refused"),
        "{text}"
    );
    let text = one_text(&ask(&w, "console:bob", "!health nope").await);
    assert!(text.contains("no service named nope"), "{text}");

    // No role here: refused, reported, nothing silenced.
    let text = one_text(&ask(&w, "console:mallory", "!silence api 1h").await);
    assert!(text.contains("you have no roles in this channel"), "{text}");
    assert!(w.router.controller().silences().is_empty());

    let text = one_text(&ask(&w, "console:bob", "!silence api 2h deploying v2").await);
    assert!(
        text.contains("alerts of api silenced for 2h: deploying v2")
            && text.contains("asked by console:bob"),
        "{text}"
    );
    let text = one_text(&ask(&w, "console:bob", "!silence api off").await);
    assert!(text.contains("no longer silenced"), "{text}");
    let s = w.router.controller().silences();
    assert_eq!(s.len(), 2, "{s:?}");
    assert_eq!(
        (
            s[0].service.as_str(),
            s[0].duration_secs,
            s[0].reason.as_str(),
            s[0].actor.as_str()
        ),
        ("api", 7200, "deploying v2", "console:bob")
    );
    assert_eq!(s[1].duration_secs, 0);
    let text = one_text(&ask(&w, "console:bob", "!silence nope 1h").await);
    assert!(text.contains("no service named nope"), "{text}");
    assert_eq!(w.router.controller().silences().len(), 2);
}

#[tokio::test]
async fn replies_quote_at_most_a_bounded_excerpt_of_the_input() {
    let w = world();
    let huge = "q".repeat(100_000);
    for input in [
        format!("!{huge}"),
        format!("!run {huge} on all"),
        format!("!run uptime on role={huge}"),
        format!("!run uptime on all --batch {huge}"),
        format!("!run logs {huge} on all"),
        format!("!job {huge}"),
        format!("!output {huge}"),
        format!("!cancel {huge}"),
        format!("!approve {huge}"),
        format!("!deny {huge} {huge}"),
        format!("!help {huge}"),
        format!("!silence {huge} 1h"),
        format!("!audit {huge}"),
    ] {
        let sent = ask(&w, "console:alice", &input).await;
        for reply in sent {
            let text = reply.text();
            assert!(
                text.len() < 1000,
                "{} replied with {} bytes: {}…",
                &input[..20],
                text.len(),
                &text[..300]
            );
        }
    }
    // Escaped as well as bounded: no raw control characters come back.
    let text = one_text(&ask(&w, "console:alice", "!run \u{1b}[2Jx on all").await);
    assert!(
        !text.contains('\u{1b}') && text.contains("\\x1b[2Jx"),
        "{text}"
    );
    assert!(w.router.controller().submitted().is_empty());
}
