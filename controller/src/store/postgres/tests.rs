//! The PostgreSQL backend against a real PostgreSQL (the test harness's
//! cluster, a fresh database per store).

use fleetcmd_pg_harness::PgCluster;

use super::migrate::{MIGRATIONS, Migration};
use super::{PostgresOptions, PostgresStore};
use crate::store::{AgentStore, JobStore, Store, StoreError, conformance};

fn options(cluster: &PgCluster, url: &str) -> PostgresOptions {
    PostgresOptions {
        url: url.to_owned(),
        password: Some(cluster.password().to_owned()),
        ca_pem: None,
    }
}

fn fresh() -> PostgresStore {
    let cluster = PgCluster::shared();
    let db = cluster.fresh_database();
    PostgresStore::open(&options(cluster, &db.url)).expect("open postgres store")
}

#[test]
fn the_postgres_backend_passes_the_conformance_suite() {
    conformance::run_all(&mut || Box::new(fresh()));
}

#[test]
fn id_prefixes_are_literal_and_limits_are_kept() {
    let store = fresh();
    let ids = [
        "0190ab12-34cd-7ef0-8123-000000000001",
        "0190ab12-34cd-7ef0-8123-000000000002",
        "0190ab13-34cd-7ef0-8123-000000000003",
    ];
    for (i, id) in ids.iter().enumerate() {
        let rec = crate::store::JobRecord::for_test(
            id,
            i as u64,
            fleetcmd_core::state::JobState::Running,
            &[],
        );
        store.put_job(&rec).expect("put");
    }
    assert_eq!(
        store.job_ids_with_prefix("0190ab12", 10).expect("prefix"),
        ids[..2]
    );
    assert_eq!(
        store.job_ids_with_prefix("0190ab12", 1).expect("prefix"),
        ids[..1]
    );
    // `_` and `%` are characters here, not LIKE wildcards.
    assert!(
        store
            .job_ids_with_prefix("0190ab1_", 10)
            .expect("_")
            .is_empty()
    );
    assert!(store.job_ids_with_prefix("%", 10).expect("%").is_empty());
    assert_eq!(store.job_ids_with_prefix("", 10).expect("all").len(), 3);
}

fn migration_versions(cluster: &PgCluster, db: &str) -> String {
    cluster
        .psql(
            db,
            "SELECT string_agg(version::text, ',' ORDER BY version) FROM schema_migrations",
        )
        .expect("psql")
}

#[test]
fn migrations_apply_once_and_a_newer_schema_is_refused() {
    let cluster = PgCluster::shared();
    let db = cluster.fresh_database();
    let opts = options(cluster, &db.url);
    drop(PostgresStore::open(&opts).expect("first open"));
    drop(PostgresStore::open(&opts).expect("second open"));
    let all: Vec<String> = MIGRATIONS.iter().map(|m| m.version.to_string()).collect();
    assert_eq!(migration_versions(cluster, &db.name).trim(), all.join(","));

    cluster
        .psql(
            &db.name,
            "INSERT INTO schema_migrations (version, name) VALUES (999, 'from the future')",
        )
        .expect("psql");
    let err = PostgresStore::open(&opts).expect_err("newer schema");
    let text = err.to_string();
    assert!(
        text.contains("schema is at version 999, newer than this controller knows"),
        "{text}"
    );
    assert!(
        text.contains(&format!("127.0.0.1:{}/{}", cluster.port(), db.name)),
        "{text}"
    );
}

#[test]
fn a_failing_migration_leaves_nothing_behind() {
    static BROKEN: &[Migration] = &[
        MIGRATIONS[0],
        Migration {
            version: 2,
            name: "broken",
            sql: "CREATE TABLE half (id int); CREATE TABLE (;",
        },
    ];
    let cluster = PgCluster::shared();
    let db = cluster.fresh_database();
    let err =
        PostgresStore::open_with(&options(cluster, &db.url), BROKEN).expect_err("broken migration");
    assert!(
        err.to_string()
            .contains("schema migration 2 (broken): 42601"),
        "{err}"
    );
    // Migration 1 was rolled back with it: no tables at all.
    assert_eq!(
        cluster
            .psql(
                &db.name,
                "SELECT count(*) FROM pg_tables WHERE schemaname = 'public'"
            )
            .expect("psql")
            .trim(),
        "0"
    );
    // And the real list still applies.
    PostgresStore::open(&options(cluster, &db.url)).expect("open");
}

#[test]
fn bad_url_and_wrong_password_are_clear_errors() {
    let cluster = PgCluster::shared();
    let db = cluster.fresh_database();
    let err = PostgresStore::open(&PostgresOptions {
        url: "postgres://fleetcmd@127.0.0.1:notaport/x".into(),
        password: None,
        ca_pem: None,
    })
    .expect_err("bad url");
    assert!(
        matches!(&err, StoreError::Connect { target, .. } if target == "postgres_url"),
        "{err}"
    );
    let err = PostgresStore::open(&PostgresOptions {
        password: Some("wrong".into()),
        ..options(cluster, &db.url)
    })
    .expect_err("wrong password");
    let text = err.to_string();
    assert!(text.contains("28P01"), "invalid_password: {text}");
    assert!(!text.contains("wrong"), "no password in messages: {text}");
}

#[test]
fn the_store_reconnects_after_postgresql_restarts_and_keeps_what_it_wrote() {
    // A cluster of its own: it is stopped in the middle.
    let cluster = PgCluster::start().expect("cluster");
    let db = cluster.fresh_database();
    let store = PostgresStore::open(&options(&cluster, &db.url)).expect("open");
    let job = crate::store::JobRecord::for_test(
        "0190ab12-34cd-7ef0-8123-456789abcdef",
        1,
        fleetcmd_core::state::JobState::Running,
        &["web-1"],
    );
    store.put_job(&job).expect("put");

    cluster.stop().expect("stop");
    let err = store.get_job(&job.id).expect_err("server is down");
    assert!(
        err.to_string()
            .contains(&format!("127.0.0.1:{}/{}", cluster.port(), db.name)),
        "{err}"
    );

    cluster.start_again().expect("start");
    assert_eq!(
        store.get_job(&job.id).expect("get after restart"),
        Some(job)
    );
    store
        .put_agent(&crate::store::AgentRecord {
            id: "web-1".into(),
            labels: Default::default(),
            revoked: false,
            joined_at: 5,
            version: "0.1.0".into(),
            enrolment_cert: None,
        })
        .expect("write after restart");
    assert_eq!(store.list_agents().expect("agents").len(), 1);
}

#[test]
fn a_closed_store_refuses_calls() {
    let store = fresh();
    store.close();
    let err = store.list_agents().expect_err("closed");
    assert!(err.to_string().contains("closed"), "{err}");
}
