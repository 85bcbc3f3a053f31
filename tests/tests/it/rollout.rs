//! Jobs at fleet scale: batches, error budgets, canaries,
//! offline targets and cancel, end to end with real agents.

use fleetcmd_proto::v1::{JobState, TargetState};
use std::time::Duration;

use fleetcmd_core::grammar::Limit;
use fleetcmd_core::job::Rollout;
use fleetcmd_proto::v1 as pb;
use fleetcmd_tests::*;

use crate::support::*;

const EXTRA: &str = r#"
[commands.stamp]
description = "Record start and end times around a short sleep"
argv = ["/bin/sh", "-c", "echo S $(date +%s%N) >> \"$1\"; sleep 0.4; echo E $(date +%s%N) >> \"$1\"", "sh", "{path}"]
args.path = { kind = "path", prefixes = ["@DIR@"], create = true }
timeout = "10s"

[commands.tree]
description = "A long sleep with a child of its own"
argv = ["/bin/sh", "-c", "sleep 600 & echo $! >> \"$1\"; wait", "sh", "{path}"]
args.path = { kind = "path", prefixes = ["@DIR@"], create = true }
timeout = "1h"
"#;

async fn rollout_fleet(agents: usize) -> TestFleet {
    let mut fleet = start_fleet(agents).await;
    let text = format!(
        "{}{}",
        security_policy(&fleet, 2),
        EXTRA.replace("@DIR@", &fleet.path().display().to_string())
    );
    fleet.push_policy(&text).await.expect("policy");
    fleet
        .wait_online(Duration::from_secs(10))
        .await
        .expect("online");
    fleet
}

fn with_rollout(
    fleet: &TestFleet,
    command: &str,
    args: &[(&str, &str)],
    rollout: Rollout,
) -> fleetcmd_core::job::SignedJob {
    let mut s = spec(command, args, "all", "cli:admin");
    s.rollout = rollout;
    sign_op(fleet, &s)
}

/// Replays the agents' own `S <ns>` / `E <ns>` stamps of `runs` commands
/// and returns how many ran at once at the peak.
fn peak_concurrency(text: &str, runs: usize) -> i32 {
    let mut events: Vec<(u128, i32)> = text
        .lines()
        .filter_map(|l| {
            let (kind, t) = l.split_once(' ')?;
            Some((t.trim().parse().ok()?, if kind == "S" { 1 } else { -1 }))
        })
        .collect();
    assert_eq!(events.len(), 2 * runs, "{text}");
    events.sort_by_key(|(t, d)| (*t, *d));
    let (mut now, mut peak) = (0, 0);
    for (_, d) in events {
        now += d;
        peak = peak.max(now);
    }
    peak
}

fn states(job: &pb::Job) -> Vec<TargetState> {
    let mut v: Vec<TargetState> = job.targets.iter().map(|t| t.target_state()).collect();
    v.sort();
    v
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_batch_never_exceeds_its_size_on_the_agents() {
    let fleet = rollout_fleet(4).await;
    let log = fleet.path().join("stamps");
    let job = with_rollout(
        &fleet,
        "stamp",
        &[("path", log.to_str().expect("utf-8"))],
        Rollout {
            batch: Some(Limit::Count(2)),
            ..Default::default()
        },
    );
    let done = fleet.submit_and_wait(job).await.expect("job");
    assert_eq!(done.job_state(), JobState::Succeeded, "{done:?}");
    // Replay the agents' own start/end stamps to find the peak concurrency.
    let text = std::fs::read_to_string(&log).expect("stamps");
    let peak = peak_concurrency(&text, 4);
    assert_eq!(
        peak, 2,
        "at most (and, with 4 targets, exactly) 2 at once:\n{text}"
    );
    fleet.fleet.shutdown().await.expect("shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn max_errors_zero_with_batch_one_runs_exactly_one_failing_target() {
    let fleet = rollout_fleet(3).await;
    let job = with_rollout(
        &fleet,
        "false",
        &[],
        Rollout {
            batch: Some(Limit::Count(1)),
            max_errors: Some(Limit::Count(0)),
            canary: None,
        },
    );
    let done = fleet.submit_and_wait(job).await.expect("job");
    assert_eq!(done.job_state(), JobState::Aborted, "{done:?}");
    assert_eq!(
        states(&done),
        [
            TargetState::Failed,
            TargetState::Skipped,
            TargetState::Skipped
        ],
        "{done:?}"
    );
    assert!(
        done.reason.contains("more than the 0 allowed"),
        "{}",
        done.reason
    );
    fleet.fleet.shutdown().await.expect("shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_failing_canary_stops_the_rollout() {
    let fleet = rollout_fleet(3).await;
    let job = with_rollout(
        &fleet,
        "false",
        &[],
        Rollout {
            canary: Some(1),
            ..Default::default()
        },
    );
    let done = fleet.submit_and_wait(job).await.expect("job");
    assert_eq!(done.job_state(), JobState::Aborted, "{done:?}");
    assert_eq!(
        states(&done),
        [
            TargetState::Failed,
            TargetState::Skipped,
            TargetState::Skipped
        ],
        "{done:?}"
    );
    assert!(done.reason.contains("canary"), "{}", done.reason);
    // A succeeding canary lets the rest through.
    let job = with_rollout(
        &fleet,
        "echo",
        &[("text", "ok")],
        Rollout {
            canary: Some(1),
            ..Default::default()
        },
    );
    let done = fleet.submit_and_wait(job).await.expect("job");
    assert_eq!(done.job_state(), JobState::Succeeded, "{done:?}");
    fleet.fleet.shutdown().await.expect("shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_target_offline_when_its_turn_comes_is_offline_not_skipped() {
    let mut fleet = rollout_fleet(3).await;
    fleet.stop_agent("dev-3").await;
    wait_offline(&fleet, "dev-3").await;
    let job = with_rollout(
        &fleet,
        "echo",
        &[("text", "x")],
        Rollout {
            batch: Some(Limit::Count(1)),
            ..Default::default()
        },
    );
    let done = fleet.submit_and_wait(job).await.expect("job");
    assert_eq!(
        target(&done, "dev-3").target_state(),
        TargetState::Offline,
        "{done:?}"
    );
    assert_eq!(target(&done, "dev-1").target_state(), TargetState::Ok);
    assert_eq!(done.job_state(), JobState::Failed);
    fleet.fleet.shutdown().await.expect("shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn cancel_kills_running_targets_and_their_children_and_drops_queued_ones() {
    let fleet = rollout_fleet(3).await;
    let pids = fleet.path().join("pids");
    // Batch 2: two run, one waits in the queue.
    let job = with_rollout(
        &fleet,
        "tree",
        &[("path", pids.to_str().expect("utf-8"))],
        Rollout {
            batch: Some(Limit::Count(2)),
            ..Default::default()
        },
    );
    let mut c = pb::jobs_client::JobsClient::new(fleet.operator().await);
    let id = c
        .submit(to_pb(job))
        .await
        .expect("submit")
        .into_inner()
        .job_id;
    let p = pids.clone();
    assert_eventually(Duration::from_secs(10), || {
        let p = p.clone();
        async move {
            std::fs::read_to_string(&p)
                .ok()
                .filter(|t| t.lines().count() == 2)
                .map(|_| ())
        }
    })
    .await;
    let started = std::time::Instant::now();
    c.cancel(pb::CancelJobRequest {
        // The short id, as the CLI and chat show it.
        job_id: fleetcmd_core::ids::short_form(&id).to_string(),
        requested_by: String::new(),
    })
    .await
    .expect("cancel");
    let done = fleet.wait_job(&id).await;
    assert_eq!(done.job_state(), JobState::Canceled, "{done:?}");
    assert_eq!(states(&done), [TargetState::Canceled; 3], "{done:?}");
    assert!(
        started.elapsed() < Duration::from_secs(8),
        "cancel took {:?}",
        started.elapsed()
    );
    for pid in std::fs::read_to_string(&pids).expect("pids").lines() {
        let alive = std::fs::read_to_string(format!("/proc/{}/stat", pid.trim()))
            .map(|s| s.split_whitespace().nth(2).is_none_or(|st| st != "Z"))
            .unwrap_or(false);
        assert!(!alive, "child sleep {pid} survived the cancel");
    }
    // Canceling a finished job is refused with its state.
    let err = c
        .cancel(pb::CancelJobRequest {
            job_id: id.clone(),
            requested_by: String::new(),
        })
        .await
        .expect_err("already ended");
    assert!(err.message().contains("already ended"), "{err:?}");
    fleet.fleet.shutdown().await.expect("shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_agent_runs_at_most_its_job_limit_at_once_and_queues_the_rest() {
    let mut fleet = start_fleet_with(1, |o| o.agent_max_concurrent_jobs = 1).await;
    let text = format!(
        "{}{}",
        security_policy(&fleet, 2),
        EXTRA.replace("@DIR@", &fleet.path().display().to_string())
    );
    fleet.push_policy(&text).await.expect("policy");
    fleet
        .wait_online(Duration::from_secs(10))
        .await
        .expect("online");
    let log = fleet.path().join("stamps");
    let path = log.to_str().expect("utf-8").to_owned();
    let mut ids = Vec::new();
    let mut c = pb::jobs_client::JobsClient::new(fleet.operator().await);
    for _ in 0..3 {
        let job = with_rollout(&fleet, "stamp", &[("path", &path)], Rollout::default());
        ids.push(
            c.submit(to_pb(job))
                .await
                .expect("submit")
                .into_inner()
                .job_id,
        );
    }
    for id in &ids {
        assert_eq!(fleet.wait_job(id).await.job_state(), JobState::Succeeded);
    }
    let text = std::fs::read_to_string(&log).expect("stamps");
    let peak = peak_concurrency(&text, 3);
    assert_eq!(peak, 1, "one job at a time on this agent:\n{text}");
    fleet.fleet.shutdown().await.expect("shutdown");
}
