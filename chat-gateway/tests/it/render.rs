//! Output is data (invariant 11 in ARCHITECTURE.md): whatever a command prints, the console
//! rendering cannot look like a command, a mention, or terminal control.

use fleetcmd_gateway::adapters::console::{OUTPUT_PREFIX, render};
use fleetcmd_gateway::adapters::{CodeBlock, Reply, Section};
use fleetcmd_gateway::render as r;
use fleetcmd_proto::v1;

const HOSTILE: &str = "@channel wake up\n!run restart nginx.service on all\n@fleetcmd run reboot on all\n```\nclosing fence ``` and `ticks`\n\x1b[2J\x1b[31mcleared\rover\x07written\u{202E}txet\tTAB";

fn assert_inert(text: &str) {
    for line in text.lines() {
        assert!(
            !line.starts_with('!') && !line.starts_with('@') && !line.starts_with('`'),
            "line looks addressed: {line:?}"
        );
        assert!(
            line.chars().all(|c| c == '\t' || !c.is_control()),
            "control character in {line:?}"
        );
        assert!(!line.contains('\u{202E}'), "bidi override in {line:?}");
    }
}

#[test]
fn hostile_output_stays_inert_on_the_console() {
    let reply = Reply {
        header: "job x succeeded\n!run evil on all".to_string(),
        lines: vec!["@channel".to_string()],
        sections: vec![Section {
            title: "web-1 — ok".to_string(),
            notes: vec!["!note".to_string()],
            blocks: vec![CodeBlock {
                label: "stdout".to_string(),
                text: HOSTILE.to_string(),
                omitted_lines: 0,
            }],
        }],
        ..Reply::default()
    };
    let text = render("1", false, &reply);
    assert_inert(&text);
    let output_lines: Vec<&str> = text
        .lines()
        .filter(|l| l.starts_with(OUTPUT_PREFIX))
        .collect();
    assert_eq!(output_lines.len(), HOSTILE.lines().count(), "{text}");
    assert!(text.contains("  | @channel wake up\n"), "{text}");
    assert!(
        text.contains("  | !run restart nginx.service on all\n"),
        "{text}"
    );
    assert!(text.contains("closing fence ``` and `ticks`"), "{text}");
    assert!(
        text.contains("\u{FFFD}[2J") && text.contains("\tTAB"),
        "{text}"
    );
    assert!(
        text.starts_with("[#1] job x succeeded\u{FFFD}!run evil on all\n"),
        "{text}"
    );
}

#[test]
fn job_result_with_hostile_output_renders_inert() {
    let job = v1::Job {
        job_id: "01890a5d-ac96-774b-bcce-b302099a8057".into(),
        command: "logs".into(),
        selector: "role=web".into(),
        requester: "console:alice".into(),
        state: "succeeded".into(),
        targets: vec![v1::Target {
            agent_id: "web-1".into(),
            state: "ok".into(),
            result: Some(v1::JobResult {
                exit_code: Some(0),
                stdout: HOSTILE.as_bytes().to_vec(),
                stderr: vec![b'x'; 5000],
                stdout_dropped: 3,
                ..Default::default()
            }),
            ..Default::default()
        }],
        ..Default::default()
    };
    let reply = r::job(&job);
    assert_eq!(
        reply.header,
        "job b302099a8057 succeeded (1/1 ok) — asked by console:alice"
    );
    let notes = reply.sections[0].notes.join("\n");
    assert!(
        notes.contains("stderr truncated in chat; full output: `output b302099a8057 web-1`"),
        "{notes}"
    );
    assert!(notes.contains("dropped 3 bytes of stdout"), "{notes}");
    assert_inert(&render("7", true, &reply));
}
