//! Three `fleetcmd-controller` processes on one PostgreSQL database, 1 000
//! simulated agents (`fleetcmd_bench::sim`, over real mTLS) spread over
//! them, each knowing all three addresses. A job fanned out to all 1 000 is
//! submitted on controller A, and A is `kill -9`ed while results are still
//! coming in. Then:
//!
//! - every agent that was on A is connected to B or C within 10 s (the
//!   agent's own backoff and controller rotation);
//! - the job ends `succeeded` with every target `ok`: exactly one stored
//!   result and one `job_finished` audit record per host, none lost to the
//!   kill and none doubled;
//! - one `job_dispatched` record per host: each host was sent the job by
//!   exactly one controller;
//! - no host ran the job twice: the simulated agent remembers the job ids
//!   it admitted as the real one does (answers a redelivery with its
//!   unacknowledged result, refuses one after the acknowledgement as
//!   `replayed`), and each ran it exactly once and refused nothing;
//! - the audit chain verifies on both survivors.
//!
//! The simulated jobs take 0–4 s (by agent index) so that the kill lands
//! with results of A's agents acknowledged, finished but unacknowledged,
//! and still running.

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use fleetcmd_bench::sim::{self, Dial, Stats, wait_until};
use fleetcmd_controller::pki::Ca;
use fleetcmd_controller::store::postgres::{PostgresOptions, PostgresStore};
use fleetcmd_controller::store::{AgentRecord, AgentStore};
use fleetcmd_core::job::SignedJob;
use fleetcmd_proto::v1 as pb;
use fleetcmd_proto::v1::{JobState, TargetState};
use fleetcmd_tests::*;
use tokio::sync::watch;

use crate::failover::{
    controller, free_port, log_tails, postgres_controller_config, share_ca_and_audit_key,
    signed_policy,
};

const AGENTS: usize = 1000;
const NAMES: [&str; 3] = ["ctl-a", "ctl-b", "ctl-c"];

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn killing_one_of_three_controllers_mid_fan_out_loses_doubles_and_reruns_nothing() {
    init();
    let started = Instant::now();
    fleetcmd_bench::sys::raise_nofile().expect("raising the open-files limit");
    let (cluster, db) = crate::postgres::fresh_database().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let logs: Vec<String> = NAMES.iter().map(|n| format!("{n}.log")).collect();
    let logs: Vec<&str> = logs.iter().map(String::as_str).collect();
    let admin = fleetcmd_cli::policy_cmd::keygen(&d.join("admin.key"))
        .map_err(|f| f.error)
        .expect("admin key");
    let ports: Vec<u16> = NAMES.iter().map(|_| free_port()).collect();
    let urls: Vec<String> = ports
        .iter()
        .map(|p| format!("https://127.0.0.1:{p}"))
        .collect();
    let cfgs: Vec<_> = NAMES
        .iter()
        .zip(&ports)
        .map(|(name, port)| postgres_controller_config(d, name, *port, &admin, cluster, &db))
        .collect();

    // The fleet CA is made before any controller starts (A loads it) and
    // the agents' certificates are issued from it and registered in the
    // database directly: 1 000 joins through the RPC would be most of the
    // test's time.
    let names: Vec<String> = (1..=AGENTS).map(|i| format!("host-{i:04}")).collect();
    let (ca_pem, identities) = tokio::task::spawn_blocking({
        let (pki, names) = (d.join("ctl-a/pki"), names.clone());
        move || {
            let ca = Ca::load_or_create(&pki).expect("fleet CA");
            let ids = sim::issue_identities(&ca, &names).expect("agent certificates");
            (ca.cert_pem().to_owned(), ids)
        }
    })
    .await
    .expect("issuing");
    tokio::task::spawn_blocking({
        let opts = PostgresOptions {
            url: db.url.clone(),
            password: Some(cluster.password().to_owned()),
            ca_pem: None,
        };
        let names = names.clone();
        move || {
            let store = PostgresStore::open(&opts).expect("the database");
            for name in &names {
                store
                    .put_agent(&AgentRecord {
                        id: name.clone(),
                        labels: BTreeMap::from([("env".to_owned(), "test".to_owned())]),
                        revoked: false,
                        joined_at: 0,
                        // As enrolled: the version is filled in by the
                        // first controller each agent connects to.
                        version: String::new(),
                        enrolment_cert: None,
                    })
                    .expect("agent registered");
            }
        }
    })
    .await
    .expect("registering");
    eprintln!(
        "{AGENTS} agents issued and registered in {:?}",
        started.elapsed()
    );

    // A first (it makes the audit key the others share), the policy, then
    // B and C.
    let mut procs = vec![controller(&cfgs[0], &d.join(logs[0]))];
    let audit_key = d.join("ctl-a/audit/audit.key");
    assert_eventually(Duration::from_secs(20), || async {
        audit_key.exists().then_some(())
    })
    .await;
    let (op, op_key) = crate::crash::issue_operator(&cfgs[0], &d.join("op"));
    let channel = |url: String| {
        let op = op.clone();
        async move {
            assert_eventually(Duration::from_secs(30), || async {
                fleetcmd_proto::channel::connect(&url, &op).await.ok()
            })
            .await
        }
    };
    let policy = fleetcmd_cli::fleet::example_policy(1, &op_key.public_key(), &op_key.public_key());
    pb::policy_client::PolicyClient::new(channel(urls[0].clone()).await)
        .push(signed_policy(&policy, &admin))
        .await
        .expect("policy pushed on A");
    for i in 1..3 {
        share_ca_and_audit_key(&d.join(NAMES[0]), &d.join(NAMES[i]));
        procs.push(controller(&cfgs[i], &d.join(logs[i])));
    }
    for url in &urls[1..] {
        channel(url.clone()).await;
    }

    // The agents: agent i dials urls[i mod 3] first.
    let stats = Arc::new(Stats::default());
    let dial = Arc::new(Dial {
        urls: urls.clone(),
        ca_pem,
        job_time: Duration::from_secs(4),
    });
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut agents = tokio::task::JoinSet::new();
    for (i, id) in identities.into_iter().enumerate() {
        agents.spawn(sim::run_agent(
            i,
            Arc::new(id),
            dial.clone(),
            stats.clone(),
            stop_rx.clone(),
        ));
    }
    let t = Instant::now();
    let all_on = wait_until(Duration::from_secs(60), || {
        stats.connected_to().len() == AGENTS
    })
    .await;
    assert!(
        all_on,
        "{} of {AGENTS} agents connected\n{}",
        stats.connected_to().len(),
        log_tails(d, &logs, 30)
    );
    let on_a: HashSet<usize> = stats
        .connected_to()
        .into_iter()
        .filter_map(|(agent, ctl)| (ctl == 0).then_some(agent))
        .collect();
    eprintln!(
        "{AGENTS} agents connected in {:?}, {} of them to A",
        t.elapsed(),
        on_a.len()
    );
    assert!(on_a.len() > AGENTS / 4, "A has its share: {}", on_a.len());

    // The fan-out, submitted on A, all at once (batch 100 %).
    let mut s = spec("uptime", &[], "all", "cli:admin");
    s.rollout.batch = Some(fleetcmd_core::grammar::Limit::Percent(100));
    let job = to_pb(SignedJob::sign(
        &s,
        fleetcmd_cli::fleet::OPERATOR_SIGNER,
        &op_key,
    ));
    let submitted = pb::jobs_client::JobsClient::new(channel(urls[0].clone()).await)
        .submit(job)
        .await
        .expect("submitted on A")
        .into_inner();
    let job_id = submitted.job_id;
    assert_eq!(submitted.targets.len(), AGENTS, "every agent is a target");
    let ids = [job_id.clone()];

    // Killed in the middle: some results stored, most not.
    let quarter = wait_until(Duration::from_secs(30), || {
        stats.acked_total(&ids) >= AGENTS / 4
    })
    .await;
    assert!(
        quarter,
        "a quarter of the results acknowledged before the kill: {}\n{}",
        stats.acked_total(&ids),
        log_tails(d, &logs, 30)
    );
    let acked_at_kill = stats.acked_total(&ids);
    let killed = Instant::now();
    procs.remove(0).kill9();
    eprintln!("A killed with {acked_at_kill} of {AGENTS} results acknowledged");

    // A's agents on B or C within 10 s.
    let moved = wait_until(Duration::from_secs(10), || {
        let now = stats.connected_to();
        on_a.iter().all(|a| now.get(a).is_some_and(|&c| c != 0))
    })
    .await;
    let mut back: Vec<Duration> = stats
        .first_welcomes_since(killed)
        .into_iter()
        .filter(|(a, _)| on_a.contains(a))
        .map(|(_, t)| t)
        .collect();
    back.sort();
    let mut why: BTreeMap<String, usize> = BTreeMap::new();
    for f in stats.failures_between(killed, Instant::now()) {
        *why.entry(f.chars().take(60).collect()).or_default() += 1;
    }
    eprintln!(
        "A's {} agents on B or C {:?} after the kill: first {:?}, median {:?}, last {:?}; ended or failed connections since: {why:?}",
        on_a.len(),
        killed.elapsed(),
        back.first(),
        back.get(back.len() / 2),
        back.last(),
    );

    let now = stats.connected_to();
    let stranded: Vec<&usize> = on_a
        .iter()
        .filter(|a| now.get(a).is_none_or(|&c| c == 0))
        .collect();
    assert!(
        moved,
        "{} of A's {} agents not on B or C 10 s after the kill (e.g. {:?})\n{}",
        stranded.len(),
        on_a.len(),
        stranded.iter().take(5).collect::<Vec<_>>(),
        log_tails(d, &logs, 30)
    );
    // Spread over B and C (each agent tries the others in an order of its
    // own), not all on the one listed after A.
    let on_b = on_a.iter().filter(|a| now.get(a) == Some(&1)).count();
    eprintln!("of A's agents {on_b} went to B, {} to C", on_a.len() - on_b);
    assert!(
        (on_a.len() / 4..=on_a.len() * 3 / 4).contains(&on_b),
        "A's {} agents spread over B and C: {on_b} on B",
        on_a.len()
    );
    // The job ends on the survivors, every target ok.
    let mut jobs = pb::jobs_client::JobsClient::new(channel(urls[1].clone()).await);
    let done = tokio::time::timeout(Duration::from_secs(45), async {
        loop {
            if let Ok(j) = jobs
                .get(pb::GetJobRequest {
                    job_id: job_id.clone(),
                })
                .await
                && j.get_ref().job_state() != JobState::Running
            {
                return j.into_inner();
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    })
    .await
    .unwrap_or_else(|_| {
        panic!(
            "the job did not end within 45 s of the kill ({} results acknowledged)\n{}",
            stats.acked_total(&ids),
            log_tails(d, &logs, 30)
        )
    });
    eprintln!("job ended {:?} after the kill", killed.elapsed());
    let not_ok: Vec<String> = done
        .targets
        .iter()
        .filter(|t| t.target_state() != TargetState::Ok)
        .map(|t| {
            let why = t.result.as_ref().map_or("", |r| r.reason.as_str());
            format!("{}: {:?} {why}", t.agent_id, t.target_state())
        })
        .take(10)
        .collect();
    assert!(not_ok.is_empty(), "targets not ok: {not_ok:?}");
    assert_eq!(done.job_state(), JobState::Succeeded);
    assert_eq!(done.targets.len(), AGENTS);

    // The database: one result, one finish and one dispatch per host.
    let sql = |q: String| {
        cluster
            .psql(&db.name, &q)
            .unwrap_or_else(|e| panic!("{q}: {e}"))
            .trim()
            .to_owned()
    };
    assert_eq!(
        sql(format!(
            "SELECT count(*) FROM targets WHERE job_id = '{job_id}' AND result IS NOT NULL"
        )),
        AGENTS.to_string(),
        "one stored result per target"
    );
    for kind in ["job_finished", "job_dispatched"] {
        let per_host = sql(format!(
            "SELECT count(*) || ' ' || count(DISTINCT h) FROM audit_log, \
             jsonb_array_elements_text(record->'event'->'hosts') AS h \
             WHERE record->'event'->>'kind' = '{kind}' \
             AND record->'event'->>'job_id' = '{job_id}'"
        ));
        assert_eq!(
            per_host,
            format!("{AGENTS} {AGENTS}"),
            "{kind}: one audit record per host (records, distinct hosts)"
        );
    }
    // The agents: each ran it once and was never sent it after its result
    // was stored.
    assert_eq!(
        stats.executions.load(Ordering::Relaxed),
        AGENTS as u64,
        "jobs run"
    );
    assert_eq!(
        stats.replays_refused.load(Ordering::Relaxed),
        0,
        "a finished target sent again"
    );
    let (received, acked) = stats.job(&job_id);
    assert_eq!(received.len(), AGENTS, "each agent admitted the job once");
    assert!(
        wait_until(Duration::from_secs(10), || stats.acked_total(&ids)
            == AGENTS)
        .await,
        "every result acknowledged once: {} of {AGENTS}",
        acked.len()
    );
    eprintln!(
        "{} redeliveries answered with the stored result or ignored while running",
        stats.redelivered.load(Ordering::Relaxed)
    );

    // One audit chain across the three writers, asked of both survivors.
    for url in &urls[1..] {
        let v = pb::audit_client::AuditClient::new(channel(url.clone()).await)
            .verify(pb::AuditVerifyRequest { from_seq: 0 })
            .await
            .expect("verify")
            .into_inner();
        assert!(v.ok, "the audit chain verifies on {url}: {v:?}");
    }

    let _ = stop_tx.send(true);
    while tokio::time::timeout(Duration::from_secs(10), agents.join_next())
        .await
        .ok()
        .flatten()
        .is_some()
    {}
    agents.abort_all();
    drop(procs);
    eprintln!("test took {:?}", started.elapsed());
}
