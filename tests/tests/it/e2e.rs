//! The walking skeleton end to end: enrolment, fan-out, selectors.

use fleetcmd_proto::v1::{JobState, TargetState};
use fleetcmd_tests::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_agents_enrol_and_uptime_runs_on_all() {
    let fleet = start_fleet(3).await;
    let job = fleet.run("uptime", &[], "all").await.expect("submitted");
    assert_eq!(job.job_state(), JobState::Succeeded, "{job:?}");
    assert_eq!(job.targets.len(), 3);
    for name in ["dev-1", "dev-2", "dev-3"] {
        let t = target(&job, name);
        assert_eq!(t.target_state(), TargetState::Ok);
        assert!(stdout(t).contains("load average"), "{}", stdout(t));
    }
    fleet.fleet.shutdown().await.expect("shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn selector_reaches_only_matching_agents() {
    let fleet = start_fleet(3).await;
    let job = fleet
        .run("echo", &[("text", "hi")], "role=web")
        .await
        .expect("submitted");
    assert_eq!(job.job_state(), JobState::Succeeded, "{job:?}");
    let mut names: Vec<_> = job.targets.iter().map(|t| t.agent_id.as_str()).collect();
    names.sort();
    assert_eq!(names, ["dev-1", "dev-3"]);
    assert!(job.targets.iter().all(|t| stdout(t) == "hi\n"));
    fleet.fleet.shutdown().await.expect("shutdown");
}
