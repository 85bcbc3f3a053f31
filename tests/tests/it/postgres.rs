//! The controller on the PostgreSQL store, against a real PostgreSQL
//! (`pg::PgCluster`): a job end to end, with every record in the database.

use fleetcmd_controller::config::PostgresConfig;
use fleetcmd_proto::v1::{JobState, TargetState};
use fleetcmd_tests::*;

/// This test process's cluster and a fresh database on it (started, and
/// made, off the async workers).
pub(crate) async fn fresh_database() -> (&'static pg::PgCluster, pg::Database) {
    tokio::task::spawn_blocking(|| {
        let cluster = pg::PgCluster::shared();
        (cluster, cluster.fresh_database())
    })
    .await
    .expect("cluster")
}

/// This test process's cluster, a fresh database on it, and the
/// controller's configuration for that database.
pub(crate) async fn fresh_store() -> (&'static pg::PgCluster, pg::Database, PostgresConfig) {
    let (cluster, db) = fresh_database().await;
    let postgres = PostgresConfig {
        url: db.url.clone(),
        password_file: Some(cluster.password_file()),
        ca_file: None,
    };
    (cluster, db, postgres)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_controller_on_postgresql_runs_a_job_and_stores_it_there() {
    let (cluster, db, postgres) = fresh_store().await;
    let fleet = start_fleet_with(2, |o| o.postgres = Some(postgres)).await;
    let job = fleet.run("uptime", &[], "all").await.expect("submitted");
    assert_eq!(job.job_state(), JobState::Succeeded, "{job:?}");
    for name in ["dev-1", "dev-2"] {
        let t = target(&job, name);
        assert_eq!(t.target_state(), TargetState::Ok);
        assert!(stdout(t).contains("load average"), "{}", stdout(t));
    }
    let count = |sql: &str| {
        cluster
            .psql(&db.name, sql)
            .unwrap_or_else(|e| panic!("{sql}: {e}"))
            .trim()
            .to_owned()
    };
    // The records are in PostgreSQL, and the embedded store was not made.
    assert_eq!(count("SELECT count(*) FROM agents"), "2");
    assert_eq!(
        count(&format!(
            "SELECT count(*) FROM targets WHERE job_id = '{}' AND result IS NOT NULL",
            job.job_id
        )),
        "2"
    );
    assert_eq!(
        count(&format!(
            "SELECT record->>'state' FROM jobs WHERE id = '{}'",
            job.job_id
        )),
        "succeeded"
    );
    assert_ne!(count("SELECT count(*) FROM audit_log"), "0");
    assert_eq!(count("SELECT count(*) FROM policy"), "1");
    assert!(!fleet.controller_config.data_dir.join("db").exists());
    fleet.fleet.shutdown().await.expect("shutdown");
}
