//! The console adapter over in-memory pipes.

use fleetcmd_gateway::adapters::console::ConsoleAdapter;
use fleetcmd_gateway::adapters::{ChatAdapter, Reply};
use tokio::io::{AsyncReadExt, AsyncWriteExt, BufReader};

#[tokio::test]
async fn reads_lines_as_direct_messages_and_writes_replies() {
    let (mut user_in, adapter_in) = tokio::io::duplex(4096);
    let (adapter_out, mut user_out) = tokio::io::duplex(4096);
    let mut console = ConsoleAdapter::new(BufReader::new(adapter_in), adapter_out, "alice")
        .unwrap_or_else(|e| panic!("{e}"));
    user_in
        .write_all(b"!run uptime on all\n\n   \nhelp restart\n")
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    drop(user_in);

    let first = console
        .recv()
        .await
        .unwrap_or_else(|| panic!("first message"));
    assert_eq!(first.identity.as_str(), "console:alice");
    assert_eq!(
        (first.channel.as_str(), first.text.as_str()),
        ("console", "!run uptime on all")
    );
    assert!(first.direct && !first.from_bot && first.thread.is_none());
    let second = console.recv().await.map(|m| m.text);
    assert_eq!(
        second.as_deref(),
        Some("help restart"),
        "blank lines are skipped"
    );
    assert!(console.recv().await.is_none(), "end of input");

    let posted = console
        .send("console", Reply::text("hello\x1b[0m"))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    console
        .edit(&posted, Reply::text("hello again"))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    drop(console);
    let mut text = String::new();
    user_out
        .read_to_string(&mut text)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(text, "[#1] hello\u{FFFD}[0m\n[#1] (updated) hello again\n");
}

#[test]
fn console_identity_must_be_valid() {
    let (a, _b) = tokio::io::duplex(16);
    let (c, _d) = tokio::io::duplex(16);
    assert!(ConsoleAdapter::new(BufReader::new(a), c, "").is_err());
}

/// How the console shows a job result (failures first, hostile output
/// inert) and an approval request.
#[test]
fn console_rendering_snapshots() {
    use fleetcmd_gateway::render;
    let job = crate::support::failed_job(
        "uptime",
        "console:alice",
        b"load 0.5 @channel <!here>\n!run reboot on all\n\x1b[2Jred\n```",
        1,
        b"uptime: /proc/loadavg: No such file or directory",
    );
    let reply = render::job(&job);
    insta::assert_snapshot!(
        "console_job_result",
        fleetcmd_gateway::adapters::console::render("7", true, &reply)
    );
    let approval = render::approval_request(
        "b302099a8057",
        "restart",
        &[
            "/usr/bin/systemctl".into(),
            "restart".into(),
            "nginx.service".into(),
        ],
        "role=web",
        1,
        std::time::Duration::from_secs(900),
        "console:alice",
    );
    insta::assert_snapshot!(
        "console_approval_request",
        fleetcmd_gateway::adapters::console::render("8", false, &approval)
    );
}
