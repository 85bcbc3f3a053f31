//! Output for people, through the real binary: times (RFC 3339 and
//! relative), `jobs` with AGE and DURATION, `job ID` as a summary, and man
//! page and completions printed without the packages.

use std::time::Duration;

use fleetcmd_cli::fleet::{Fleet, FleetOptions};

use super::{BIN, fleetcmd, text};

fn bare(args: &[&str]) -> std::process::Output {
    std::process::Command::new(BIN)
        .args(args)
        .stdin(std::process::Stdio::null())
        .output()
        .expect("fleetcmd runs")
}

#[test]
fn completions_and_the_man_page_are_printed_without_the_packages() {
    for (shell, marker) in [
        ("bash", "complete -F _fleetcmd"),
        ("zsh", "#compdef fleetcmd"),
        ("fish", "complete -c fleetcmd"),
    ] {
        let out = bare(&["completions", shell]);
        assert!(out.status.success(), "{shell}: {}", text(&out.stderr));
        let script = text(&out.stdout);
        // The script knows the subcommands, this one included.
        assert!(
            script.contains(marker) && script.contains("jobs") && script.contains("completions"),
            "{shell}: {script}"
        );
    }
    let out = bare(&["completions", "tcsh"]);
    assert_eq!(out.status.code(), Some(2), "clap's usage error");
    assert!(
        text(&out.stderr).contains("bash, zsh, fish"),
        "{}",
        text(&out.stderr)
    );

    let out = bare(&["man"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let page = text(&out.stdout);
    assert!(page.contains(".TH fleetcmd 1"), "{page}");
    assert!(
        page.contains("completions"),
        "the page lists the subcommands: {page}"
    );
    let out = bare(&["man", "run"]);
    assert!(
        text(&out.stdout).contains(".TH fleetcmd-run 1"),
        "{}",
        text(&out.stdout)
    );
    let out = bare(&["man", "runn"]);
    assert_eq!(out.status.code(), Some(64));
    assert!(
        text(&out.stderr).contains("no subcommand \"runn\"; man pages: dev, init"),
        "{}",
        text(&out.stderr)
    );
}

#[test]
fn jobs_show_age_and_duration_and_job_shows_a_summary() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let dir = tempfile::tempdir().expect("tempdir");
    let mut opts = FleetOptions::new(dir.path());
    opts.heartbeat = Duration::from_secs(1);
    let fleet = rt.block_on(Fleet::start(opts)).expect("fleet");

    let out = fleetcmd(&fleet, &["run", "echo", "hello", "--on", "role=web"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let out = fleetcmd(&fleet, &["run", "false", "--on", "all"]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stderr));
    let id = text(&out.stderr)
        .split_whitespace()
        .nth(1)
        .expect("`job ID on N agent(s)` on stderr")
        .to_owned();

    let out = fleetcmd(&fleet, &["jobs"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let table = text(&out.stdout);
    let header = table.lines().next().expect("header");
    assert!(
        header.contains(" AGE ") && header.contains(" DURATION "),
        "{table}"
    );
    let row = table
        .lines()
        .find(|l| l.starts_with(&id))
        .unwrap_or_else(|| panic!("no row for {id}: {table}"));
    // Just submitted: seconds ago (or just now); each host ran in ms.
    assert!(
        (row.contains(" s ago") || row.contains("just now")) && row.contains(" ms "),
        "{row}"
    );

    let out = fleetcmd(&fleet, &["job", &id]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let summary = text(&out.stdout);
    let lines: Vec<&str> = summary.lines().collect();
    // When, as RFC 3339 and relative; then the counts; then each host.
    assert!(
        lines[0].starts_with("created 20")
            && lines[0].contains("Z (")
            && lines[0].contains("slowest host"),
        "{summary}"
    );
    assert_eq!(lines[1], "3 failed", "{summary}");
    for host in ["dev-1", "dev-2", "dev-3"] {
        assert!(
            summary.contains(&format!("==> {host} (failed, exit 1, ")),
            "{summary}"
        );
    }
    assert!(
        summary.contains(&format!("job {id} `false` on all: failed (0/3 ok)")),
        "{summary}"
    );
    // Nothing was cut, so no pointer to the full output.
    assert!(!summary.contains("full output"), "{summary}");

    let out = fleetcmd(&fleet, &["agents"]);
    let agents = text(&out.stdout);
    assert!(
        agents.lines().next().is_some_and(|h| h.contains(" SEEN ")),
        "{agents}"
    );
    assert!(
        agents
            .lines()
            .skip(1)
            .all(|l| l.contains(" s ago") || l.contains("just now")),
        "heartbeats every second: {agents}"
    );
    rt.block_on(fleet.shutdown()).expect("shutdown");
}
