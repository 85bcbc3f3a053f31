//! Chat `audit`: filters reach the controller's search, and each user sees
//! only the records their roles may read (DESIGN §2.12).

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
