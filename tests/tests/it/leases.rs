//! Singletons under leases with real PostgreSQL (`pg::PgCluster`): two
//! controllers' lease keepers (`fleetcmd_controller::lease::Leases`, each
//! with its own store and connection) on one database. Exactly one holds
//! each lease; a killed holder is replaced within TTL + one renewal with a
//! higher term; a holder whose connection keeps being cut steps down before
//! anyone else leads, and its old term's writes are refused.

use std::sync::Arc;
use std::time::{Duration, Instant};

use fleetcmd_controller::lease::{LeaseTiming, Leases, Singleton};
use fleetcmd_controller::store::postgres::{PostgresOptions, PostgresStore};
use fleetcmd_controller::store::{Fence, Store};
use fleetcmd_core::audit::SignedHead;
use fleetcmd_tests::pg;

const TIMING: LeaseTiming = LeaseTiming {
    ttl: Duration::from_millis(1500),
};
/// Scheduling slack on a loaded 2-core machine.
const SLACK: Duration = Duration::from_millis(1500);

/// A fresh database and a second login role for it (a superuser, so it
/// may use the tables the first one creates): its connections can be told
/// apart in `pg_stat_activity`.
fn database() -> (&'static pg::PgCluster, pg::Database, String) {
    let cluster = pg::PgCluster::shared();
    let db = cluster.fresh_database();
    let role = format!("{}_b", db.name);
    cluster
        .psql(
            "postgres",
            &format!(
                "CREATE ROLE {role} LOGIN SUPERUSER PASSWORD '{}'",
                cluster.password()
            ),
        )
        .expect("create role");
    (cluster, db, role)
}

fn open(cluster: &pg::PgCluster, url: String) -> Arc<dyn Store> {
    Arc::new(
        PostgresStore::open(&PostgresOptions {
            url,
            password: Some(cluster.password().to_owned()),
            ca_pem: None,
        })
        .expect("open postgres store"),
    )
}

async fn open_async(cluster: &'static pg::PgCluster, url: String) -> Arc<dyn Store> {
    tokio::task::spawn_blocking(move || open(cluster, url))
        .await
        .expect("open task")
}

/// Waits until `check` holds, or fails with `what` after `within`.
async fn until(within: Duration, what: &str, mut check: impl FnMut() -> bool) -> Duration {
    let start = Instant::now();
    while !check() {
        assert!(start.elapsed() < within, "{what} within {within:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    start.elapsed()
}

fn terms(l: &Leases) -> Vec<Option<u64>> {
    Singleton::ALL
        .iter()
        .map(|s| l.of(*s).fence().map(|f| f.term))
        .collect()
}

fn leads_all(l: &Leases) -> bool {
    terms(l).iter().all(Option::is_some)
}

fn leads_none(l: &Leases) -> bool {
    terms(l).iter().all(Option::is_none)
}

fn head(seq: u64) -> SignedHead {
    SignedHead {
        seq,
        hash: format!("{seq:064x}"),
        time_ms: seq,
        key_id: "k".into(),
        signature: "00".into(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_killed_lease_holder_is_replaced_within_the_ttl_at_a_higher_term() {
    let (cluster, db, _) = tokio::task::spawn_blocking(database)
        .await
        .expect("database");
    let store_a = open_async(cluster, db.url.clone()).await;
    let store_b = open_async(cluster, db.url.clone()).await;
    let a = Leases::start(store_a.clone(), "ctl-a".into(), TIMING);
    until(SLACK, "the first controller leads every singleton", || {
        leads_all(&a)
    })
    .await;
    let mut b = Leases::start(store_b.clone(), "ctl-b".into(), TIMING);
    // Several renewal rounds: the second controller never leads anything.
    let watch_until = Instant::now() + TIMING.ttl * 2;
    while Instant::now() < watch_until {
        assert!(leads_all(&a) && leads_none(&b), "one holder per lease");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let old: Vec<u64> = terms(&a).into_iter().flatten().collect();
    for s in Singleton::ALL {
        let holder = store_b.lease_holder(s.lease_name()).expect("holder");
        assert_eq!(holder.map(|l| l.holder), Some("ctl-a".to_owned()));
    }
    // Killed: its keepers stop without releasing anything.
    drop(a);
    let took = until(
        TIMING.ttl + TIMING.renew_every() + SLACK,
        "the second controller takes over every lease",
        || leads_all(&b),
    )
    .await;
    let new: Vec<u64> = terms(&b).into_iter().flatten().collect();
    for (o, n) in old.iter().zip(&new) {
        assert!(n > o, "a takeover has a higher term: {old:?} then {new:?}");
    }
    // A clean stop releases: no waiting for the expiry.
    b.stop().await;
    for s in Singleton::ALL {
        assert_eq!(store_a.lease_holder(s.lease_name()).expect("holder"), None);
    }
    eprintln!("takeover after a kill: {took:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_holder_cut_off_from_the_database_steps_down_and_its_old_term_is_refused() {
    let (cluster, db, role_b) = tokio::task::spawn_blocking(database)
        .await
        .expect("database");
    let url_b = format!(
        "postgres://{role_b}@127.0.0.1:{}/{}",
        cluster.port(),
        db.name
    );
    // Controller B (the one that will be cut off) connects as its own role.
    let store_b = open_async(cluster, url_b).await;
    let store_a = open_async(cluster, db.url.clone()).await;
    let b = Leases::start(store_b.clone(), "ctl-b".into(), TIMING);
    until(SLACK, "controller b leads every singleton", || {
        leads_all(&b)
    })
    .await;
    let a = Leases::start(store_a.clone(), "ctl-a".into(), TIMING);
    let stale: Vec<Fence> = Singleton::ALL
        .iter()
        .map(|s| b.of(*s).fence().expect("b leads"))
        .collect();

    // Cut b off for twice the TTL: its role may not log in, and its
    // backends are terminated (again, in case one was starting).
    let name = db.name.clone();
    let role = role_b.clone();
    let cut_for = TIMING.ttl * 2;
    let cutter = tokio::task::spawn_blocking(move || {
        let start = Instant::now();
        cluster
            .psql(&name, &format!("ALTER ROLE {role} NOLOGIN"))
            .expect("nologin");
        while start.elapsed() < cut_for {
            cluster
                .psql(
                    &name,
                    &format!(
                        "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE usename = '{role}'"
                    ),
                )
                .expect("terminate b's backends");
            std::thread::sleep(Duration::from_millis(100));
        }
        cluster
            .psql(&name, &format!("ALTER ROLE {role} LOGIN"))
            .expect("login");
    });
    let cut_at = Instant::now();
    // While cut off: never two leaders of one lease; b steps down, then a
    // leads.
    let mut b_down_after = None;
    while !leads_all(&a) {
        for s in Singleton::ALL {
            assert!(
                !(a.of(s).is_leader() && b.of(s).is_leader()),
                "two leaders of {}",
                s.lease_name()
            );
        }
        if b_down_after.is_none() && leads_none(&b) {
            b_down_after = Some(cut_at.elapsed());
        }
        assert!(
            cut_at.elapsed() < TIMING.ttl + TIMING.renew_every() + SLACK,
            "controller a takes over from a cut-off b in time (a: {:?}, b: {:?})",
            terms(&a),
            terms(&b)
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let b_down_after = b_down_after.expect("b stepped down before a led everything");
    assert!(
        b_down_after < TIMING.ttl,
        "b stepped down before its lease expired ({b_down_after:?})"
    );
    cutter.await.expect("cutter");

    // b's connection works again: its old terms are refused, a keeps
    // every lease, and b does not lead again.
    for (s, fence) in Singleton::ALL.iter().zip(&stale) {
        let new = a.of(*s).fence().expect("a leads");
        assert!(new.term > fence.term, "{new:?} after {fence:?}");
        let (st, f) = (store_b.clone(), fence.clone());
        let (renewed, wrote) = tokio::task::spawn_blocking(move || {
            // The first call after the cut may still meet a terminated
            // connection; the store connects again on the next.
            let _ = st.lease_holder(&f.lease);
            (
                st.lease_renew(&f.lease, &f.holder, f.term, TIMING.ttl)
                    .expect("renew"),
                st.audit_put_head_fenced(&f, &head(f.term))
                    .expect("fenced write"),
            )
        })
        .await
        .expect("stale writes");
        assert!(
            !renewed,
            "b's old term of {} is not renewed",
            s.lease_name()
        );
        assert!(!wrote, "b's old term of {} cannot write", s.lease_name());
    }
    tokio::time::sleep(TIMING.ttl).await;
    assert!(leads_all(&a) && leads_none(&b), "a keeps the leases");
    let heads = store_a.audit_heads_from(0).expect("heads");
    assert!(heads.is_empty(), "no stale write was stored: {heads:?}");
}

/// A controller stopped before its keeper's next round (one started a
/// moment ago) still signs the audit head at shutdown: `fence_now` takes a
/// lease nobody holds at once, never one another controller holds, and
/// `stop` releases what it took.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn fence_now_takes_a_free_lease_at_once_and_never_a_held_one() {
    let (cluster, db, _) = tokio::task::spawn_blocking(database)
        .await
        .expect("database");
    let store_a = open_async(cluster, db.url.clone()).await;
    let store_b = open_async(cluster, db.url.clone()).await;
    let mut a = Leases::start(store_a.clone(), "ctl-a".into(), TIMING);
    until(SLACK, "the first controller leads every singleton", || {
        leads_all(&a)
    })
    .await;
    // B's keepers try once at start, then only every 20 s.
    let slow = LeaseTiming {
        ttl: Duration::from_secs(60),
    };
    let mut b = Leases::start(store_b.clone(), "ctl-b".into(), slow);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(leads_none(&b), "a leads everything");
    assert_eq!(b.fence_now(Singleton::AuditHeads).await, None);
    let held = a.fence_now(Singleton::AuditHeads).await.expect("a leads");
    assert_eq!(Some(&held), a.of(Singleton::AuditHeads).fence().as_ref());

    a.stop().await;
    let fence = tokio::time::timeout(Duration::from_secs(5), b.fence_now(Singleton::AuditHeads))
        .await
        .expect("at once, not at the keeper's next round")
        .expect("a free lease is taken");
    assert!(fence.term > held.term, "{fence:?} after {held:?}");
    assert!(
        store_b
            .audit_put_head_fenced(&fence, &head(1))
            .expect("put head"),
        "the fence taken is the current grant"
    );
    assert_eq!(b.of(Singleton::AuditHeads).fence(), Some(fence));
    b.stop().await;
    assert_eq!(
        store_a
            .lease_holder(Singleton::AuditHeads.lease_name())
            .expect("holder"),
        None,
        "released at stop"
    );
}
