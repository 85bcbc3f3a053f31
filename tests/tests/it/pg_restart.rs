//! PostgreSQL restarted under a running controller (`pg::PgCluster`, a real
//! server): a controller on it with three real agents keeps submitting
//! jobs while the server is stopped (fast shutdown: every connection cut)
//! and started again. The controller is not restarted.
//!
//! `…recovers_…`: every job the controller acknowledged is in the
//! database; once the server is back, new jobs run on every agent and
//! their results are stored. `…every_acknowledged_job_finishes…`: jobs
//! whose dispatch or results fell into the outage finish too, with every
//! result stored — a result the store refused closes the agent's stream,
//! so the agent reconnects and sends it again (it had stayed `running`
//! for good), and the store-wide rescan dispatches what a failed chunk
//! left `pending`.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use fleetcmd_proto::v1 as pb;
use fleetcmd_proto::v1::{JobState, TargetState};
use fleetcmd_tests::*;

const AGENTS: [&str; 3] = ["dev-1", "dev-2", "dev-3"];

struct Outcome {
    fleet: TestFleet,
    cluster: &'static pg::PgCluster,
    db: pg::Database,
    /// Acknowledged jobs: submitted before the restart completed.
    before: Vec<String>,
    /// Acknowledged jobs submitted after the server was back.
    after: Vec<String>,
}

/// Three agents on PostgreSQL; a job every 100 ms for 6 s; the server is
/// down from 0.5 s to about 3 s (plus a 2 s job running across it).
async fn restart_under_load() -> Outcome {
    let (cluster, db, postgres) = crate::postgres::fresh_store().await;
    let fleet = start_fleet_with(3, |o| o.postgres = Some(postgres)).await;
    let mut jobs = pb::jobs_client::JobsClient::new(fleet.operator().await);
    let (_, long) = fleet.operator_job("sleep", &[("seconds", "2")], "all");
    let mut before = vec![
        jobs.submit(to_pb(long))
            .await
            .expect("long job accepted")
            .into_inner()
            .job_id,
    ];
    let mut after = Vec::new();
    let back = Arc::new(AtomicBool::new(false));
    let flag = back.clone();
    let stopper = tokio::task::spawn_blocking(move || {
        std::thread::sleep(Duration::from_millis(500));
        cluster.stop().expect("stop PostgreSQL");
        let down = Instant::now();
        std::thread::sleep(Duration::from_millis(2500));
        cluster.start_again().expect("start PostgreSQL again");
        flag.store(true, Ordering::SeqCst);
        down.elapsed()
    });
    let mut refused = 0;
    let until = Instant::now() + Duration::from_secs(6);
    let mut n = 0;
    while Instant::now() < until {
        n += 1;
        let was_back = back.load(Ordering::SeqCst);
        let (_, job) = fleet.operator_job("echo", &[("text", &format!("job {n}"))], "all");
        match tokio::time::timeout(Duration::from_secs(10), jobs.submit(to_pb(job))).await {
            Ok(Ok(r)) if was_back => after.push(r.into_inner().job_id),
            Ok(Ok(r)) => before.push(r.into_inner().job_id),
            Ok(Err(_)) | Err(_) => refused += 1,
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let downtime = stopper.await.expect("stopper");
    eprintln!(
        "PostgreSQL down {downtime:?}: {} jobs acknowledged before it was back, {} after, {refused} refused",
        before.len(),
        after.len()
    );
    assert!(refused > 0, "some submissions met the stopped server");
    assert!(!after.is_empty(), "jobs submitted after the restart");
    Outcome {
        fleet,
        cluster,
        db,
        before,
        after,
    }
}

impl Outcome {
    fn query(&self, sql: &str) -> String {
        self.cluster
            .psql(&self.db.name, sql)
            .unwrap_or_else(|e| panic!("{sql}: {e}"))
            .trim()
            .to_owned()
    }

    /// Waits for `ids` to finish; each succeeded on every agent, and its
    /// state and three results are in the database (read there, not
    /// through the controller).
    async fn all_finished_and_stored(&self, ids: &[String]) {
        let shared = self.fleet.controller.shared().clone();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let open: Vec<String> = ids
                .iter()
                .filter_map(|id| match shared.get_job(id) {
                    Ok(j) if fleetcmd_cli::client::is_finished(&j) => None,
                    Ok(j) => Some(format!(
                        "{id}: {:?} {:?}",
                        j.job_state(),
                        j.targets
                            .iter()
                            .map(|t| (t.agent_id.clone(), t.target_state()))
                            .collect::<Vec<_>>()
                    )),
                    Err(e) => Some(format!("{id}: {e}")),
                })
                .collect();
            if open.is_empty() {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "acknowledged jobs unfinished 30 s after the restart:\n{}",
                open.join("\n")
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        for id in ids {
            let job = shared.get_job(id).expect("job");
            assert_eq!(job.job_state(), JobState::Succeeded, "{job:?}");
            for a in AGENTS {
                assert_eq!(target(&job, a).target_state(), TargetState::Ok, "{job:?}");
            }
            assert_eq!(
                self.query(&format!(
                    "SELECT record->>'state' FROM jobs WHERE id = '{id}'"
                )),
                "succeeded",
                "job {id}"
            );
            assert_eq!(
                self.query(&format!(
                    "SELECT count(*) FROM targets WHERE job_id = '{id}' AND result IS NOT NULL"
                )),
                "3",
                "results of job {id}"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_controller_recovers_from_a_postgresql_restart_without_being_restarted() {
    let o = restart_under_load().await;
    // Every acknowledged job is stored.
    let all: Vec<String> = o.before.iter().chain(&o.after).cloned().collect();
    let list = all
        .iter()
        .map(|id| format!("'{id}'"))
        .collect::<Vec<_>>()
        .join(",");
    assert_eq!(
        o.query(&format!("SELECT count(*) FROM jobs WHERE id IN ({list})")),
        all.len().to_string(),
        "every acknowledged job is in the database"
    );
    // What was submitted once the server was back runs and is stored.
    o.all_finished_and_stored(&o.after).await;
    let job = o.fleet.run("uptime", &[], "all").await.expect("submitted");
    assert_eq!(job.job_state(), JobState::Succeeded, "{job:?}");
    o.fleet.fleet.shutdown().await.expect("shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_acknowledged_job_finishes_with_all_results_after_a_postgresql_restart() {
    let o = restart_under_load().await;
    o.all_finished_and_stored(&o.before).await;
    o.all_finished_and_stored(&o.after).await;
    o.fleet.fleet.shutdown().await.expect("shutdown");
}
