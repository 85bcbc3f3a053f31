//! A `path` argument never reaches a file outside its prefix through a
//! symbolic link: the agent opens it beneath the prefix without following
//! any (`openat2` with `RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS`) and hands
//! the command that descriptor. Attacks by someone who can write in the
//! prefix directory (a log directory): a symlink at the leaf, one in a
//! parent, and a separate process swapping a symlink in and out while jobs
//! run. Each is refused (and audited) or reads only the checked file.

use std::path::{Path, PathBuf};
use std::time::Duration;

use fleetcmd_tests::*;

use crate::support::*;

const AGENT: &str = "dev-1";

const READ: &str = r#"
[commands.read_log]
description = "Print a log file"
argv = ["/bin/cat", "{file}"]
args.file = { kind = "path", prefixes = ["@DIR@/logs"] }
timeout = "10s"
"#;

/// The fleet's directory holds `logs/` (the prefix, with `app.log`) and,
/// outside it, `secret`.
async fn fleet_with_logs() -> (TestFleet, PathBuf, PathBuf) {
    let mut fleet = security_fleet(1).await;
    let dir = fleet.path();
    let logs = dir.join("logs");
    std::fs::create_dir_all(logs.join("app")).expect("logs dir");
    std::fs::write(logs.join("app").join("app.log"), "log line\n").expect("log");
    let secret = dir.join("secret");
    std::fs::write(&secret, "SECRET\n").expect("secret");
    let version = fleet.policy_version + 1;
    let text = format!(
        "{}{}",
        security_policy(&fleet, version),
        READ.replace("@DIR@", &dir.display().to_string())
    );
    fleet.push_policy(&text).await.expect("policy pushed");
    let shared = fleet.controller.shared().clone();
    assert_eventually(Duration::from_secs(15), || {
        let shared = shared.clone();
        async move {
            let list = shared.registry.list_agents("").ok()?;
            list.iter()
                .find(|a| a.agent_id == AGENT && a.policy_version == version)
                .map(|_| ())
        }
    })
    .await;
    (fleet, logs, secret)
}

async fn read(fleet: &TestFleet, path: &Path) -> fleetcmd_proto::v1::Job {
    fleet
        .run(
            "read_log",
            &[("file", path.to_str().expect("utf-8"))],
            "all",
        )
        .await
        .expect("the controller accepts it: the path is lexically fine")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn symlinks_under_a_path_prefix_are_refused_by_the_agent() {
    let (fleet, logs, secret) = fleet_with_logs().await;
    // Control: the real file is read.
    let ok = read(&fleet, &logs.join("app/app.log")).await;
    assert_eq!(stdout(target(&ok, AGENT)), "log line\n", "{ok:?}");

    std::os::unix::fs::symlink(&secret, logs.join("leaf.log")).expect("leaf symlink");
    std::os::unix::fs::symlink(fleet.path(), logs.join("up")).expect("parent symlink");
    for (label, path) in [
        ("leaf", logs.join("leaf.log")),
        ("parent", logs.join("up/secret")),
    ] {
        let job = read(&fleet, &path).await;
        assert_refused(&job, AGENT, "path_refused");
        let r = result_of(&job, AGENT);
        assert!(r.reason.contains("symbolic link"), "{label}: {r:?}");
        assert!(
            !String::from_utf8_lossy(&r.stdout).contains("SECRET"),
            "{label}"
        );
        let mut audit = fleetcmd_proto::v1::audit_client::AuditClient::new(fleet.operator().await);
        let records = audit
            .search(fleetcmd_proto::v1::AuditSearchRequest {
                job_id: job.job_id.clone(),
                limit: 50,
                ..Default::default()
            })
            .await
            .expect("audit search")
            .into_inner()
            .records;
        assert!(
            records
                .iter()
                .any(|r| r.contains("job_refused_by_agent") && r.contains("path_refused")),
            "{label}: refusal not audited: {records:#?}"
        );
    }
    fleet.fleet.shutdown().await.expect("shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_symlink_swapped_in_and_out_by_another_process_never_leaks_the_target() {
    let (fleet, logs, secret) = fleet_with_logs().await;
    let target_file = logs.join("app/race.log");
    std::fs::write(&target_file, "log line\n").expect("race log");
    // The attacker, a separate process with write access to the log
    // directory, flips app/race.log between a regular file and a symlink to
    // the secret as fast as it can (each step an atomic rename).
    let script = r#"
        cd "$1" || exit 1
        printf 'log line\n' > real.tmp
        while :; do
            ln -sfn "$2" link.tmp && mv -fT link.tmp race.log
            cp real.tmp file.tmp && mv -fT file.tmp race.log
        done"#;
    let mut attacker = std::process::Command::new("/bin/sh")
        .args(["-c", script, "sh"])
        .arg(logs.join("app"))
        .arg(&secret)
        .spawn()
        .expect("attacker starts");
    let (mut read_ok, mut refused) = (0, 0);
    for _ in 0..30 {
        let job = read(&fleet, &target_file).await;
        let t = target(&job, AGENT);
        let out = stdout(t);
        assert!(
            !out.contains("SECRET"),
            "the symlink's target leaked: {job:?}"
        );
        match t.state.as_str() {
            "ok" => {
                assert_eq!(out, "log line\n", "{job:?}");
                read_ok += 1;
            }
            "refused" => {
                assert_refused(&job, AGENT, "path_refused");
                refused += 1;
            }
            // cat may find the name gone mid-rename only if it opened the
            // name; it opens the descriptor, so any other end is a failure.
            other => panic!("unexpected {other}: {job:?}"),
        }
    }
    let _ = attacker.kill();
    let _ = attacker.wait();
    assert_eq!(read_ok + refused, 30);
    fleet.fleet.shutdown().await.expect("shutdown");
}
