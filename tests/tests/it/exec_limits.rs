//! ARCHITECTURE.md invariant 7: a command that outlives its timeout is killed with its whole
//! process group, and output beyond the cap is dropped and counted.

use fleetcmd_proto::v1::TargetState;
use std::time::{Duration, Instant};

use fleetcmd_proto::v1 as pb;
use fleetcmd_tests::*;

use crate::support::*;

/// Whether `pid` is gone: no /proc entry, a zombie (pid 1 here may not reap),
/// or a different program under a reused pid.
fn is_dead(pid: i32, comm: &str) -> bool {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return true;
    };
    let (Some(open), Some(close)) = (stat.find('('), stat.rfind(')')) else {
        return true;
    };
    let name = &stat[open + 1..close];
    let state = stat[close + 1..].trim_start().chars().next().unwrap_or('X');
    name != comm || matches!(state, 'Z' | 'X' | 'x')
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_timed_out_command_is_killed_with_its_children() {
    let fleet = security_fleet(1).await;
    let pidfile = marker(&fleet, "tree.pid");
    let started = Instant::now();
    // sh_tree's policy timeout is 1 s; `sleep 3600` asks for an hour but the
    // signed spec caps it at 1 s.
    let (mut spec, _) = fleet.operator_job("sleep", &[("seconds", "3600")], "all");
    spec.timeout_secs = 1;
    let capped = fleet.submit_and_wait(sign_op(&fleet, &spec));
    let tree_args = [("pidfile", pidfile.to_str().expect("utf-8"))];
    let tree = fleet.run("sh_tree", &tree_args, "all");
    let (capped, tree) = tokio::join!(capped, tree);
    let (capped, tree) = (
        capped.expect("sleep submitted"),
        tree.expect("sh_tree submitted"),
    );
    assert!(
        started.elapsed() < Duration::from_secs(15),
        "took {:?}",
        started.elapsed()
    );

    for job in [&tree, &capped] {
        let t = target(job, "dev-1");
        assert_eq!(t.target_state(), TargetState::TimedOut, "{job:?}");
        let r = result_of(job, "dev-1");
        assert_eq!(r.outcome, pb::Outcome::TimedOut as i32, "{r:?}");
        assert!(r.reason.contains("timed out"), "{r:?}");
        assert_eq!(r.exit_code, None, "{r:?}");
    }

    let text = std::fs::read_to_string(&pidfile).expect("the shell wrote its child's pid");
    let pid: i32 = text.trim().parse().expect("a pid");
    assert!(pid > 1, "{pid}");
    assert!(
        is_dead(pid, "sleep"),
        "grandchild `sleep 30` (pid {pid}) survived the timeout"
    );
    fleet.fleet.shutdown().await.expect("shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn output_beyond_the_cap_is_dropped_and_counted() {
    let fleet = security_fleet(1).await;
    let job = fleet.run("flood", &[], "all").await.expect("submitted");
    let t = target(&job, "dev-1");
    assert_eq!(t.target_state(), TargetState::Ok, "{job:?}");
    let r = result_of(&job, "dev-1");
    assert_eq!(r.exit_code, Some(0));
    assert_eq!(r.stdout.len(), 1024 * 1024);
    assert!(r.stdout.iter().all(|b| *b == 0));
    assert_eq!(r.stdout_dropped, 3_000_000 - 1024 * 1024);
    assert_eq!((r.stderr.len(), r.stderr_dropped), (0, 0));
    fleet.fleet.shutdown().await.expect("shutdown");
}
