//! Chat `audit`: filters reach the controller's search, and each user sees
//! only the records their roles may read (invariant 12 in ARCHITECTURE.md).

use fleetcmd_core::audit::{Chain, Event, EventKind, ExportLine};

use crate::support::{ask, world_with};

fn records() -> Vec<String> {
    let mut chain = Chain::genesis();
    let mut line = |event: Event| {
        let r = chain.append(1_000, event);
        serde_json::to_string(&ExportLine::Record(r)).unwrap_or_else(|e| panic!("{e}"))
    };
    // Newest first, as the controller answers.
    vec![
        line(Event::new(EventKind::JobSubmitted, "console:bob").command("uptime")),
        line(Event::new(EventKind::JobSubmitted, "console:carol").command("reboot")),
        line(Event::new(EventKind::AgentJoined, "agent web-9")),
        line(Event::new(EventKind::ChatDenied, "console:bob").detail("no role in #ops")),
    ]
}

#[tokio::test]
async fn audit_passes_filters_and_shows_only_what_the_asker_may_read() {
    let w = world_with(|c| c.audit_records = records());
    // alice (oncall: uptime, restart, logs, reboot) sees both job records,
    // not the agent's join (no command) nor bob's own denial.
    let alice = ask(
        &w,
        "console:alice",
        "!audit by:console:bob since:2h restart kind:job_submitted",
    )
    .await;
    let text = alice[0].text();
    assert!(text.contains("2 records"), "{text}");
    assert!(
        text.contains("cmd=uptime") && text.contains("cmd=reboot"),
        "{text}"
    );
    assert!(
        !text.contains("web-9") && !text.contains("no role in"),
        "{text}"
    );
    let req = w
        .router
        .controller()
        .audit_requests
        .lock()
        .map(|r| r.last().cloned())
        .unwrap_or_default()
        .unwrap_or_else(|| panic!("no search"));
    assert_eq!(req.actor, "console:bob");
    assert_eq!(req.text, "restart");
    assert_eq!(req.kinds, ["job_submitted"]);
    assert!(req.since_ms > 0);

    // bob (viewer: uptime, logs) sees the uptime job and his own denial,
    // not carol's reboot.
    let bob = ask(&w, "console:bob", "!audit console").await;
    let text = bob[0].text();
    assert!(text.contains("2 records"), "{text}");
    assert!(
        text.contains("cmd=uptime") && text.contains("no role in"),
        "{text}"
    );
    assert!(!text.contains("reboot"), "{text}");

    // Without a role here: nothing, and the refusal is reported.
    let mallory = ask(&w, "console:mallory", "!audit anything").await;
    assert!(
        mallory[0].text().contains("no roles in this channel"),
        "{}",
        mallory[0].text()
    );

    let bad = ask(&w, "console:alice", "!audit colour:blue").await;
    assert!(
        bad[0].text().contains("unknown filter `colour:`"),
        "{}",
        bad[0].text()
    );
}

#[tokio::test]
async fn refused_chat_requests_are_reported_as_auth_failures_at_a_bounded_rate() {
    use std::time::Duration;

    use fleetcmd_gateway::Gateway;
    use fleetcmd_gateway::adapters::console::ConsoleAdapter;

    let w = crate::support::world();
    let mut gw = Gateway::new(w.router.clone());
    let (user_in, adapter_in) = tokio::io::duplex(1024);
    let (adapter_out, _user_out) = tokio::io::duplex(1 << 16);
    let console = ConsoleAdapter::new(tokio::io::BufReader::new(adapter_in), adapter_out, "alice")
        .unwrap_or_else(|e| panic!("{e}"));
    gw.add(console);
    let failures = gw.auth_failures();
    let run = tokio::spawn(gw.run(None));
    for i in 0..25 {
        failures.report("slack", "/slack/events", format!("bad signature {i}"));
    }
    failures.report("webhook:ci", "10.1.2.3", "bad HMAC");
    let reported = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            let r: Vec<_> = w
                .router
                .controller()
                .reported()
                .into_iter()
                .filter(|(k, ..)| k == "auth_failed")
                .collect();
            if r.len() >= 11 {
                return r;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .unwrap_or_else(|_| panic!("auth failures were not reported"));
    drop(user_in);
    tokio::time::timeout(Duration::from_secs(5), run)
        .await
        .unwrap_or_else(|_| panic!("gateway did not stop"))
        .unwrap_or_else(|e| panic!("{e}"))
        .unwrap_or_else(|e| panic!("{e}"));
    let from_slack = reported
        .iter()
        .filter(|(_, actor, ..)| actor == "slack /slack/events")
        .count();
    assert_eq!(from_slack, 10, "{reported:#?}");
    assert!(
        reported
            .iter()
            .any(|(_, actor, _, detail)| actor == "webhook:ci 10.1.2.3" && detail == "bad HMAC"),
        "{reported:#?}"
    );
}

/// A chat user scoped to `env=staging` is not shown, by `audit`, the
/// records of an `env=prod` job that `job` hides from them; the records of
/// a staging job they could run are shown.
#[tokio::test]
async fn audit_hides_records_of_jobs_that_job_would_hide() {
    use fleetcmd_core::ids::{Identity, JobId};
    use fleetcmd_core::job::{JobSpec, SignedJob};

    const PROD: &str = "01900000-0000-7000-8000-00000000abcd";
    const STAGING: &str = "01900000-0000-7000-8000-00000000ef01";
    let body = r#"
[commands.restart]
argv = ["/usr/bin/systemctl", "restart", "nginx"]

[roles.staging]
commands = ["restart"]
targets = "env=staging"

[roles.oncall]
commands = ["restart"]

[[bindings]]
subjects = ["console:erin"]
roles = ["staging"]

[[bindings]]
subjects = ["console:alice"]
roles = ["oncall"]
"#;
    let key = crate::support::new_key();
    let job = |id: &str, selector: &str| {
        let spec = JobSpec {
            id: JobId::parse(id).unwrap_or_else(|e| panic!("{e}")),
            command: "restart".into(),
            args: Default::default(),
            selector: selector.into(),
            requester: Identity::parse("console:alice").unwrap_or_else(|e| panic!("{e}")),
            channel: "console".into(),
            approvals: Vec::new(),
            unattested_approvers: Vec::new(),
            timeout_secs: 0,
            not_before: 0,
            expires_at: u64::MAX / 2,
            rollout: Default::default(),
        };
        SignedJob::sign(&spec, "gw", &key)
    };
    let mut chain = Chain::genesis();
    let mut line = |event: Event| {
        let r = chain.append(1_000, event);
        serde_json::to_string(&ExportLine::Record(r)).unwrap_or_else(|e| panic!("{e}"))
    };
    let records = vec![
        line(
            Event::new(EventKind::JobFinished, "agent:db-1")
                .job(PROD)
                .command("restart")
                .detail("prod secret output"),
        ),
        line(
            Event::new(EventKind::JobFinished, "agent:stg-1")
                .job(STAGING)
                .command("restart")
                .detail("staging output"),
        ),
    ];
    let w = crate::support::world_for(
        4,
        body,
        |c| {
            c.audit_records = records;
            c.submitted = std::sync::Mutex::new(vec![
                job(PROD, "env=prod"),
                job(STAGING, "env=staging,role=web"),
            ]);
        },
        |_| {},
    );
    // `job` hides the prod job from erin...
    let shown = ask(&w, "console:erin", &format!("!job {PROD}")).await;
    assert!(
        shown[0].text().contains("not visible to you"),
        "{}",
        shown[0].text()
    );
    // ...and so does `audit`, although her role includes the command.
    let erin = ask(&w, "console:erin", "!audit restart").await;
    let text = erin[0].text();
    assert!(text.contains("1 record "), "{text}");
    assert!(text.contains("staging output"), "{text}");
    assert!(!text.contains("prod secret"), "{text}");
    // The requester sees both.
    let alice = ask(&w, "console:alice", "!audit restart").await;
    assert!(alice[0].text().contains("2 records"), "{}", alice[0].text());
}
