//! One fleet across two `fleetcmd-controller` processes on one PostgreSQL
//! database (`pg::PgCluster`), joined by the bus (`LISTEN`/`NOTIFY`):
//! agent `a-1` streams to controller A only, `b-1` to controller B only.
//! A job submitted on A runs on `b-1` and its live output and result are
//! seen through A; every target is dispatched once; a revocation and a
//! policy pushed on A reach B's agent; two controllers appending to the
//! audit trail at once keep one chain that verifies.
//!
//! The controllers share what an operator copies (see `failover`): the
//! fleet CA, the audit key and the policy roots.

use std::process::Command;
use std::time::{Duration, Instant};

use fleetcmd_core::crypto::SigningKey;
use fleetcmd_core::job::SignedJob;
use fleetcmd_proto::channel::ClientTls;
use fleetcmd_proto::v1 as pb;
use fleetcmd_proto::v1::{JobState, TargetState};
use fleetcmd_tests::workspace_bin as bin;
use fleetcmd_tests::*;
use pb::job_event::Event;
use tonic::transport::Channel;

use crate::crash::Proc;
use crate::failover::{
    controller, free_port, join_agent, join_token, log_tails, online_agents,
    postgres_controller_config, share_ca_and_audit_key, signed_policy, spawn,
};

/// Service `up` over every agent (its check `ok`), in both controllers'
/// config.
const SERVICE: &str = "\n[services.up]\nselector = \"all\"\ncheck = \"ok\"\nconfirm = \"1s\"\n";
/// Check `ok` of an agent: passes every second unless the file `down`
/// exists (then CRITICAL).
fn check(down: &std::path::Path) -> String {
    format!(
        "\n[[check]]\nname = \"ok\"\nkind = \"nagios\"\ncommand = [\"/bin/sh\", \"-c\", \"test ! -e {} || exit 2\"]\ninterval = \"1s\"\n",
        down.display()
    )
}

struct TwoControllers {
    dir: tempfile::TempDir,
    cluster: &'static pg::PgCluster,
    db: pg::Database,
    url_a: String,
    url_b: String,
    op: ClientTls,
    op_key: SigningKey,
    admin: SigningKey,
    _procs: Vec<Proc>,
}

impl TwoControllers {
    async fn channel(&self, url: &str) -> Channel {
        let (url, op) = (url.to_owned(), self.op.clone());
        assert_eventually(Duration::from_secs(20), || {
            let (url, op) = (url.clone(), op.clone());
            async move { fleetcmd_proto::channel::connect(&url, &op).await.ok() }
        })
        .await
    }

    fn policy(&self, version: u64) -> pb::SignedPolicy {
        let text = format!(
            "{}{}",
            fleetcmd_cli::fleet::example_policy(
                version,
                &self.op_key.public_key(),
                &self.op_key.public_key()
            ),
            // `ticks`: output over time, for live output through the bus.
            crate::live::EXTRA
        );
        signed_policy(&text, &self.admin)
    }

    fn job(&self, command: &str, selector: &str) -> pb::SignedJob {
        let s = spec(command, &[], selector, "cli:admin");
        to_pb(SignedJob::sign(
            &s,
            fleetcmd_cli::fleet::OPERATOR_SIGNER,
            &self.op_key,
        ))
    }

    /// The agent named `name` on its `online` listing of `url`, if online.
    async fn online(&self, url: &str, name: &str) -> Option<pb::Agent> {
        online_agents(url, &self.op)
            .await?
            .into_iter()
            .find(|a| a.agent_id == name)
    }

    fn logs(&self) -> String {
        log_tails(
            self.dir.path(),
            &["ctl-a.log", "ctl-b.log", "a-1.log", "b-1.log"],
            30,
        )
    }

    /// Whether b-1's log has a `job starting` line for job `id`.
    fn b1_started(&self, id: &str) -> bool {
        std::fs::read_to_string(self.dir.path().join("b-1.log"))
            .unwrap_or_default()
            .lines()
            .any(|l| l.contains("job starting") && l.contains(id))
    }

    /// Waits (up to 15 s) until b-1 has started job `id`.
    async fn b1_starts(&self, id: &str) {
        let started = tokio::time::timeout(Duration::from_secs(15), async {
            while !self.b1_started(id) {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
        .await;
        assert!(started.is_ok(), "b-1 started {id}\n{}", self.logs());
    }

    /// SIGSTOP (`-STOP`) or SIGCONT (`-CONT`) to controller B.
    fn signal_b(&self, sig: &str) {
        let b = self._procs[1].0.id().to_string();
        let ok = Command::new("kill")
            .args([sig, &b])
            .status()
            .is_ok_and(|s| s.success());
        assert!(ok, "kill {sig} {b}");
    }

    /// Service `up` as controller `url` shows it.
    async fn service_up(&self, url: String) -> Option<pb::Service> {
        crate::health::service_named(self.channel(&url).await, "up", 0).await
    }

    /// `SELECT` one value from the database.
    fn sql(&self, sql: &str) -> String {
        self.cluster
            .psql(&self.db.name, sql)
            .unwrap_or_else(|e| panic!("{sql}: {e}"))
            .trim()
            .to_owned()
    }
}

/// Controllers A and B on one fresh database, policy 1 pushed on A before
/// B starts, `a-1` joined and streaming to A only, `b-1` to B only.
async fn two_controllers() -> TwoControllers {
    two_controllers_with(false, "").await
}

/// As `two_controllers`; with `b_fails_over`, `b-1` knows both controllers
/// (B first) and has one job slot; `controller_toml` is added to both
/// controllers' config.
async fn two_controllers_with(b_fails_over: bool, controller_toml: &str) -> TwoControllers {
    init();
    let (cluster, db) = crate::postgres::fresh_database().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path().to_owned();
    let admin = fleetcmd_cli::policy_cmd::keygen(&d.join("admin.key"))
        .map_err(|f| f.error)
        .expect("admin key");
    let (port_a, port_b) = (free_port(), free_port());
    let cfg_a = postgres_controller_config(&d, "ctl-a", port_a, &admin, cluster, &db);
    let cfg_b = postgres_controller_config(&d, "ctl-b", port_b, &admin, cluster, &db);
    // One service over both agents, the same on both controllers (whichever
    // holds the health lease judges it): check `ok` of every agent.
    for cfg in [&cfg_a, &cfg_b] {
        let mut text = std::fs::read_to_string(cfg).expect("controller config");
        text.push_str(SERVICE);
        text.push_str(controller_toml);
        std::fs::write(cfg, text).expect("controller config");
    }
    let mut procs = vec![controller(&cfg_a, &d.join("ctl-a.log"))];
    let ca = d.join("ctl-a/pki/ca.crt");
    assert_eventually(Duration::from_secs(20), || async {
        ca.exists().then_some(())
    })
    .await;
    let (op, op_key) = crate::crash::issue_operator(&cfg_a, &d.join("op"));
    let mut fleet = TwoControllers {
        dir,
        cluster,
        db,
        url_a: format!("https://127.0.0.1:{port_a}"),
        url_b: format!("https://127.0.0.1:{port_b}"),
        op,
        op_key,
        admin,
        _procs: Vec::new(),
    };
    pb::policy_client::PolicyClient::new(fleet.channel(&fleet.url_a).await)
        .push(fleet.policy(1))
        .await
        .expect("policy pushed on A");
    share_ca_and_audit_key(&d.join("ctl-a"), &d.join("ctl-b"));
    procs.push(controller(&cfg_b, &d.join("ctl-b.log")));
    for (name, url) in [("a-1", fleet.url_a.clone()), ("b-1", fleet.url_b.clone())] {
        // Tokens made on A; b-1 uses its token on B (the store is shared).
        let token = join_token(fleet.channel(&fleet.url_a).await, name).await;
        let cfg = d.join(format!("{name}.toml"));
        let dial = if b_fails_over && name == "b-1" {
            format!(
                "controllers = [\"{url}\", \"{}\"]\nmax_concurrent_jobs = 1\n",
                fleet.url_a
            )
        } else {
            format!("controller = \"{url}\"\n")
        };
        std::fs::write(
            &cfg,
            format!(
                "{dial}state_dir = \"{}\"\n{}",
                d.join(name).display(),
                check(&d.join(format!("{name}.down")))
            ),
        )
        .expect("agent config");
        let _ = fleet.channel(&url).await;
        assert!(join_agent(&cfg, &token), "{name} joins through {url}");
        let mut agent = Command::new(bin("fleetcmd-agent"));
        agent.arg("-c").arg(&cfg).arg("run");
        procs.push(spawn(&mut agent, &d.join(format!("{name}.log"))));
    }
    fleet._procs = procs;
    for (name, url) in [("a-1", &fleet.url_a), ("b-1", &fleet.url_b)] {
        let up = tokio::time::timeout(Duration::from_secs(20), async {
            loop {
                if fleet
                    .online(url, name)
                    .await
                    .is_some_and(|a| a.policy_version == 1)
                {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
        .await;
        assert!(
            up.is_ok(),
            "{name} online on {url} with policy 1\n{}",
            fleet.logs()
        );
    }
    // Each enrolment reached the other controller: both list both agents.
    let joined = Instant::now();
    let both = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            let mut ok = true;
            for url in [&fleet.url_a, &fleet.url_b] {
                let ch = fleet.channel(url).await;
                let names: Vec<String> = pb::agents_client::AgentsClient::new(ch)
                    .list(pb::ListAgentsRequest::default())
                    .await
                    .map(|r| r.into_inner().agents)
                    .unwrap_or_default()
                    .into_iter()
                    .map(|a| a.agent_id)
                    .collect();
                ok &= names == ["a-1", "b-1"];
            }
            if ok {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    assert!(
        both.is_ok(),
        "both controllers list both enrolments\n{}",
        fleet.logs()
    );
    eprintln!(
        "enrolments on both controllers after {:?}",
        joined.elapsed()
    );
    fleet
}

/// Job `id` as `jobs` shows it once `done` holds of it (asked every
/// 50 ms); `None` when it does not within `limit`.
async fn job_when(
    jobs: &mut pb::jobs_client::JobsClient<Channel>,
    id: &str,
    limit: Duration,
    done: impl Fn(&pb::Job) -> bool,
) -> Option<pb::Job> {
    tokio::time::timeout(limit, async {
        loop {
            let j = jobs
                .get(pb::GetJobRequest {
                    job_id: id.to_owned(),
                })
                .await
                .expect("get")
                .into_inner();
            if done(&j) {
                return j;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
    .ok()
}

fn has_ended(j: &pb::Job) -> bool {
    j.job_state() != JobState::Running
}

/// Through A, b-1's only slot (`two_controllers_with(true, ..)`) held by
/// `sleep hold_secs` and an `echo text` queued behind it, both sent to
/// b-1: their job ids.
async fn hold_and_queue(
    fleet: &TwoControllers,
    jobs: &mut pb::jobs_client::JobsClient<Channel>,
    hold_secs: &str,
    text: &str,
) -> (String, String) {
    let mut ids = Vec::new();
    for (command, args) in [("sleep", ("seconds", hold_secs)), ("echo", ("text", text))] {
        let s = spec(command, &[args], "name=b-1", "cli:admin");
        let job = to_pb(SignedJob::sign(
            &s,
            fleetcmd_cli::fleet::OPERATOR_SIGNER,
            &fleet.op_key,
        ));
        let id = jobs
            .submit(job)
            .await
            .expect("submitted")
            .into_inner()
            .job_id;
        let sent = job_when(jobs, &id, Duration::from_secs(15), |j| {
            j.targets
                .iter()
                .all(|t| t.target_state() != TargetState::Pending)
        })
        .await;
        assert!(sent.is_some(), "{id} sent to b-1\n{}", fleet.logs());
        ids.push(id);
    }
    let queued = ids.pop().expect("queued");
    (ids.pop().expect("hold"), queued)
}

/// Submits on `url` and follows the job there: its live output by agent,
/// and the finished job.
async fn run_and_watch(
    fleet: &TwoControllers,
    url: &str,
    job: pb::SignedJob,
) -> (pb::Job, Vec<(String, String)>) {
    let mut jobs = pb::jobs_client::JobsClient::new(fleet.channel(url).await);
    let id = jobs
        .submit(job)
        .await
        .expect("submitted")
        .into_inner()
        .job_id;
    let mut stream = jobs
        .watch(pb::WatchJobRequest { job_id: id.clone() })
        .await
        .expect("watch")
        .into_inner();
    let mut chunks = Vec::new();
    let done = tokio::time::timeout(Duration::from_secs(30), async {
        while let Some(ev) = stream.message().await.expect("event") {
            match ev.event {
                Some(Event::Chunk(c)) => {
                    chunks.push((c.agent_id, String::from_utf8_lossy(&c.data).into_owned()))
                }
                Some(Event::Job(j)) if j.job_state() != JobState::Running => return Some(j),
                _ => {}
            }
        }
        None
    })
    .await;
    let job = match done {
        Ok(Some(j)) => j,
        _ => panic!("job {id} did not end on {url}\n{}", fleet.logs()),
    };
    (job, chunks)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_job_submitted_on_one_controller_runs_on_the_other_controllers_agent_once() {
    let fleet = two_controllers().await;
    // Submitted and watched on A; b-1 is connected to B only.
    let (job, chunks) = run_and_watch(&fleet, &fleet.url_a, fleet.job("ticks", "all")).await;
    assert_eq!(job.job_state(), JobState::Succeeded, "{job:?}");
    for name in ["a-1", "b-1"] {
        let t = target(&job, name);
        assert_eq!(t.target_state(), TargetState::Ok, "{job:?}");
        assert!(stdout(t).contains("tick 3"), "{name}: {}", stdout(t));
    }
    // B's agent's live output reached the watcher on A.
    let from_b: String = chunks
        .iter()
        .filter(|(agent, _)| agent == "b-1")
        .map(|(_, text)| text.as_str())
        .collect();
    assert!(
        from_b.contains("tick 1"),
        "live output of b-1 seen on A: {chunks:?}"
    );
    // The same job read on B.
    let on_b = pb::jobs_client::JobsClient::new(fleet.channel(&fleet.url_b).await)
        .get(pb::GetJobRequest {
            job_id: job.job_id.clone(),
        })
        .await
        .expect("get on B")
        .into_inner();
    assert_eq!(on_b.job_state(), JobState::Succeeded);

    // Many jobs, submitted on both, each for both agents: every target is
    // dispatched by exactly one controller, once, and has one result.
    let mut ids = vec![job.job_id.clone()];
    let mut clients = [
        pb::jobs_client::JobsClient::new(fleet.channel(&fleet.url_a).await),
        pb::jobs_client::JobsClient::new(fleet.channel(&fleet.url_b).await),
    ];
    for i in 0..20 {
        let id = clients[i % 2]
            .submit(fleet.job("uptime", "all"))
            .await
            .expect("submitted")
            .into_inner()
            .job_id;
        ids.push(id);
    }
    for id in &ids {
        let done = job_when(&mut clients[0], id, Duration::from_secs(30), has_ended)
            .await
            .unwrap_or_else(|| panic!("job {id} did not end\n{}", fleet.logs()));
        assert_eq!(done.job_state(), JobState::Succeeded, "{done:?}");
        // One `job_dispatched` record per host and job, whichever
        // controller wrote it.
        let dispatches = fleet.sql(&format!(
            "SELECT string_agg(h, ',' ORDER BY h) FROM audit_log, \
             jsonb_array_elements_text(record->'event'->'hosts') AS h \
             WHERE record->'event'->>'kind' = 'job_dispatched' \
             AND record->'event'->>'job_id' = '{id}'"
        ));
        assert_eq!(dispatches, "a-1,b-1", "job {id} dispatched once per host");
        assert_eq!(
            fleet.sql(&format!(
                "SELECT count(*) FROM targets WHERE job_id = '{id}' AND result IS NOT NULL"
            )),
            "2"
        );
    }
    // Neither agent refused a job as replayed (it was never sent twice).
    for name in ["a-1", "b-1"] {
        let log = std::fs::read_to_string(fleet.dir.path().join(format!("{name}.log")))
            .unwrap_or_default();
        assert!(!log.contains("replay"), "{name} saw a replay:\n{log}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_revocation_and_a_policy_pushed_on_one_controller_reach_the_others_agents() {
    let fleet = two_controllers().await;
    // Policy 2 pushed on A: b-1, connected to B, runs it.
    pb::policy_client::PolicyClient::new(fleet.channel(&fleet.url_a).await)
        .push(fleet.policy(2))
        .await
        .expect("policy 2 pushed on A");
    let pushed = Instant::now();
    let got = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            if fleet
                .online(&fleet.url_b, "b-1")
                .await
                .is_some_and(|a| a.policy_version == 2)
            {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    assert!(got.is_ok(), "b-1 on B runs policy 2\n{}", fleet.logs());
    eprintln!(
        "policy on B's agent {:?} after the push on A",
        pushed.elapsed()
    );

    // b-1 revoked on A: B ends its stream and refuses it from then on.
    pb::agents_client::AgentsClient::new(fleet.channel(&fleet.url_a).await)
        .revoke(pb::RevokeRequest {
            agent_id: "b-1".into(),
        })
        .await
        .expect("revoked on A");
    let revoked = Instant::now();
    let listed_revoked = |agents: Option<Vec<pb::Agent>>| {
        agents.is_some_and(|all| all.iter().all(|a| a.agent_id != "b-1"))
    };
    let cut = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            let ch = fleet.channel(&fleet.url_b).await;
            let all = pb::agents_client::AgentsClient::new(ch)
                .list(pb::ListAgentsRequest::default())
                .await
                .ok()
                .map(|r| r.into_inner().agents);
            if let Some(all) = &all
                && all
                    .iter()
                    .any(|a| a.agent_id == "b-1" && a.revoked && !a.online)
                && listed_revoked(online_agents(&fleet.url_b, &fleet.op).await)
            {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    assert!(
        cut.is_ok(),
        "b-1 cut off by B within 5 s of its revocation on A\n{}",
        fleet.logs()
    );
    eprintln!(
        "b-1 cut off on B {:?} after the revocation on A",
        revoked.elapsed()
    );
    // Still out a moment later (its reconnects are refused by B).
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(listed_revoked(online_agents(&fleet.url_b, &fleet.op).await));
    // Policy 2 is also what B itself serves and checks jobs against.
    let (job, _) = run_and_watch(&fleet, &fleet.url_b, fleet.job("uptime", "all")).await;
    assert_eq!(job.job_state(), JobState::Succeeded, "{job:?}");
    assert_eq!(
        job.targets.len(),
        1,
        "a revoked agent is no target: {job:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_controllers_appending_at_once_keep_one_audit_chain() {
    let fleet = two_controllers().await;
    // Token creations on both at once: each is audited durably before it
    // is answered.
    let mut tasks = tokio::task::JoinSet::new();
    for url in [&fleet.url_a, &fleet.url_b] {
        for _ in 0..4 {
            let mut tokens = pb::tokens_client::TokensClient::new(fleet.channel(url).await);
            tasks.spawn(async move {
                for _ in 0..25 {
                    tokens
                        .create(pb::CreateTokenRequest {
                            ttl_secs: 60,
                            uses: 1,
                            ..Default::default()
                        })
                        .await
                        .expect("token");
                }
            });
        }
    }
    // Meanwhile jobs on both agents, submitted on each controller in turn:
    // each controller stores its agent's dispatch and result with their
    // records in one step (`Audit::record_targets`), racing the tokens.
    let jobs = async {
        let mut ids = Vec::new();
        for url in [&fleet.url_a, &fleet.url_b].repeat(4) {
            let (job, _) = run_and_watch(&fleet, url, fleet.job("uptime", "all")).await;
            assert_eq!(job.job_state(), JobState::Succeeded, "{job:?}");
            ids.push(job.job_id);
        }
        ids
    };
    let writers = async {
        while let Some(r) = tasks.join_next().await {
            r.unwrap_or_else(|e| panic!("writer: {e}\n{}", fleet.logs()));
        }
    };
    let (ids, ()) = tokio::join!(jobs, writers);
    for id in ids {
        for kind in ["job_dispatched", "job_finished"] {
            let hosts = fleet.sql(&format!(
                "SELECT string_agg(h, ',' ORDER BY h) FROM audit_log, \
                 jsonb_array_elements_text(record->'event'->'hosts') AS h \
                 WHERE record->'event'->>'kind' = '{kind}' AND record->'event'->>'job_id' = '{id}'"
            ));
            assert_eq!(hosts, "a-1,b-1", "one {kind} per host of {id}");
        }
    }
    let count: u64 = fleet
        .sql("SELECT count(*) FROM audit_log WHERE record->'event'->>'kind' = 'token_created'")
        .parse()
        .expect("count");
    assert_eq!(count, 2 + 200, "every token audited once");
    let (first, last, n) = (
        fleet.sql("SELECT min(seq) FROM audit_log"),
        fleet.sql("SELECT max(seq) FROM audit_log"),
        fleet.sql("SELECT count(*) FROM audit_log"),
    );
    let span = last.parse::<u64>().expect("max") - first.parse::<u64>().expect("min") + 1;
    assert_eq!(span.to_string(), n, "contiguous sequence numbers");
    // The whole chain verifies, asked of either controller.
    for url in [&fleet.url_a, &fleet.url_b] {
        let v = pb::audit_client::AuditClient::new(fleet.channel(url).await)
            .verify(pb::AuditVerifyRequest { from_seq: 0 })
            .await
            .expect("verify")
            .into_inner();
        assert!(v.ok, "the chain verifies on {url}: {v:?}");
        assert_eq!(v.records.to_string(), n, "{v:?}");
    }
}

/// Submit → result seen by a watcher, for a job on `b-1` only: submitted
/// and watched on A (the job crosses to B and its result back) against
/// submitted and watched on B (BENCHMARKS.md, "Controller bus").
/// Run: `cargo nextest run -p fleetcmd-tests bus::cross_controller_latency
/// --run-ignored all --no-capture`.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "benchmark (issue 19): prints numbers, asserts only that jobs succeed"]
async fn cross_controller_latency() {
    let fleet = two_controllers().await;
    for (label, url) in [
        ("on B (local)", &fleet.url_b),
        ("on A (via bus)", &fleet.url_a),
    ] {
        let mut jobs = pb::jobs_client::JobsClient::new(fleet.channel(url).await);
        let mut lat = Vec::new();
        for _ in 0..200 {
            let job = fleet.job("uptime", "name=b-1");
            let t = Instant::now();
            let id = jobs.submit(job).await.expect("submit").into_inner().job_id;
            let mut stream = jobs
                .watch(pb::WatchJobRequest { job_id: id })
                .await
                .expect("watch")
                .into_inner();
            let mut done = None;
            while let Some(ev) = stream.message().await.expect("event") {
                match ev.event {
                    Some(Event::Target(t)) if t.result.is_some() => {
                        done.get_or_insert(t.target_state());
                    }
                    Some(Event::Job(j)) if j.job_state() != JobState::Running => {
                        done.get_or_insert(target(&j, "b-1").target_state());
                        break;
                    }
                    _ => {}
                }
            }
            assert_eq!(done, Some(TargetState::Ok));
            lat.push(t.elapsed());
        }
        lat.sort();
        let pct = |p: usize| lat[(lat.len() * p / 100).min(lat.len() - 1)];
        eprintln!(
            "submit and watch {label}: 200 jobs, submit → result p50 {:?} p99 {:?}",
            pct(50),
            pct(99)
        );
    }
}

/// An agent connected to no controller: its target ends `offline` when its
/// turn comes, as with one controller, and the job ends — not pending
/// until the job expires because some other controller might have it.
/// Each controller writes which agents it has to the presence table
/// (`state::presence`), so A knows `b-1` is on neither A nor B.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_target_whose_agent_is_connected_to_no_controller_ends_offline() {
    let mut fleet = two_controllers().await;
    // b-1 stops (its process is the last one started).
    fleet._procs.pop().expect("b-1").kill9();
    let gone = tokio::time::timeout(Duration::from_secs(15), async {
        while fleet.online(&fleet.url_b, "b-1").await.is_some() {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await;
    assert!(gone.is_ok(), "b-1 offline on B\n{}", fleet.logs());
    let started = Instant::now();
    let (job, _) = run_and_watch(&fleet, &fleet.url_a, fleet.job("uptime", "all")).await;
    let took = started.elapsed();
    let state = |name: &str| {
        job.targets
            .iter()
            .find(|t| t.agent_id == name)
            .map(|t| t.target_state())
    };
    assert_eq!(state("a-1"), Some(TargetState::Ok), "{job:?}");
    assert_eq!(state("b-1"), Some(TargetState::Offline), "{job:?}");
    // The job may live 10 minutes; b-1 counts as connected nowhere once
    // it was missing from every controller's list for 20 s.
    assert!(
        took < Duration::from_secs(40),
        "the job ended {took:?} after its submission\n{}",
        fleet.logs()
    );
    // Exactly one `job_finished` record for b-1's target.
    assert_eq!(
        fleet.sql(&format!(
            "SELECT count(*) FROM audit_log, jsonb_array_elements_text(record->'event'->'hosts') AS h \
             WHERE record->'event'->>'kind' = 'job_finished' AND record->'event'->>'job_id' = '{}' \
             AND h = 'b-1'",
            job.job_id
        )),
        "1"
    );
    eprintln!("job with an agent connected nowhere ended in {took:?}");
}

/// Two bundles of one version pushed at once, one through each
/// controller: one push wins, the other is refused (and audited), and both
/// controllers serve the winner (found by an outside test: both were
/// accepted, and the controllers — and their agents — stayed split between
/// two bundles of one version until a newer one was pushed).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_bundles_of_one_version_pushed_at_once_have_one_winner() {
    let fleet = two_controllers().await;
    let bundle = |tag: &str| {
        let mut p = fleet.policy(2);
        // Another bundle of the same version: a comment changes its bytes
        // (and its hash), signed again.
        let text = format!("{}\n# {tag}\n", String::from_utf8_lossy(&p.bundle));
        p = signed_policy(&text, &fleet.admin);
        p
    };
    let (pa, pb_) = (bundle("pushed on A"), bundle("pushed on B"));
    let mut ca = pb::policy_client::PolicyClient::new(fleet.channel(&fleet.url_a).await);
    let mut cb = pb::policy_client::PolicyClient::new(fleet.channel(&fleet.url_b).await);
    let (ra, rb) = tokio::join!(ca.push(pa), cb.push(pb_));
    let won: Vec<String> = [&ra, &rb]
        .iter()
        .filter_map(|r| r.as_ref().ok().map(|i| i.get_ref().hash.clone()))
        .collect();
    assert_eq!(won.len(), 1, "one push wins: {ra:?} {rb:?}");
    let refused = [ra, rb]
        .into_iter()
        .find_map(Result::err)
        .expect("one refused");
    assert_eq!(
        refused.code(),
        tonic::Code::FailedPrecondition,
        "{refused:?}"
    );
    assert!(refused.message().contains("not newer"), "{refused:?}");
    // Both controllers serve the winner.
    let served = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            let a = ca
                .get(pb::GetPolicyRequest {})
                .await
                .map(|r| r.into_inner().hash);
            let b = cb
                .get(pb::GetPolicyRequest {})
                .await
                .map(|r| r.into_inner().hash);
            if matches!((&a, &b), (Ok(a), Ok(b)) if *a == won[0] && *b == won[0]) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await;
    assert!(
        served.is_ok(),
        "both controllers serve {}\n{}",
        won[0],
        fleet.logs()
    );
    assert_eq!(
        fleet.sql("SELECT count(*) FROM audit_log WHERE record->'event'->>'kind' = 'policy_pushed' AND record->'event'->'fields'->>'version' = '2'"),
        "1",
        "one policy_pushed record for version 2"
    );
}

/// A job canceled through one controller stops on every agent, also those
/// connected to the other (found by an outside test: only the canceling
/// controller's agents were told; the others ran to their end).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_job_canceled_on_one_controller_stops_on_the_others_agents() {
    let fleet = two_controllers().await;
    let s = spec("sleep", &[("seconds", "30")], "all", "cli:admin");
    let job = to_pb(SignedJob::sign(
        &s,
        fleetcmd_cli::fleet::OPERATOR_SIGNER,
        &fleet.op_key,
    ));
    let mut jobs = pb::jobs_client::JobsClient::new(fleet.channel(&fleet.url_a).await);
    let id = jobs
        .submit(job)
        .await
        .expect("submitted")
        .into_inner()
        .job_id;
    // Both sent (b-1 through B: A sees it `dispatched`; `running` is known
    // only where it was dispatched), then started.
    let sent = job_when(&mut jobs, &id, Duration::from_secs(15), |j| {
        j.targets.iter().all(|t| {
            matches!(
                t.target_state(),
                TargetState::Dispatched | TargetState::Running
            )
        })
    })
    .await;
    assert!(sent.is_some(), "both targets sent\n{}", fleet.logs());
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let started = Instant::now();
    jobs.cancel(pb::CancelJobRequest {
        job_id: id.clone(),
        requested_by: String::new(),
    })
    .await
    .expect("cancel on A");
    let ended = job_when(&mut jobs, &id, Duration::from_secs(10), has_ended)
        .await
        .unwrap_or_else(|| {
            panic!(
                "the job did not end within 10 s of its cancel\n{}",
                fleet.logs()
            )
        });
    for t in &ended.targets {
        assert_eq!(t.target_state(), TargetState::Canceled, "{ended:?}");
    }
    eprintln!(
        "both targets canceled {:?} after the cancel",
        started.elapsed()
    );
}

/// A job waiting on an agent for its slot when the controller that sent
/// it is killed runs once the agent is welcomed by another controller —
/// it is not refused (found by an outside test: every such job was refused
/// `stream_ended` and stored as the target's result, so one controller
/// crash failed the jobs it had just dispatched).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_job_queued_on_an_agent_whose_controller_is_killed_runs_after_it_fails_over() {
    let mut fleet = two_controllers_with(true, "").await;
    let mut jobs = pb::jobs_client::JobsClient::new(fleet.channel(&fleet.url_a).await);
    // b-1's only slot is held by a 4 s sleep; the second job waits for it.
    let (hold, queued) = hold_and_queue(&fleet, &mut jobs, "4", "after the failover").await;
    // The copy is on the agent (sent on B's stream), waiting for the slot.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let killed = Instant::now();
    fleet._procs.remove(1).kill9(); // controller B
    for id in [&hold, &queued] {
        let ended = job_when(&mut jobs, id, Duration::from_secs(30), has_ended)
            .await
            .unwrap_or_else(|| panic!("{id} did not end on A\n{}", fleet.logs()));
        let t = &ended.targets[0];
        assert_eq!(
            t.target_state(),
            TargetState::Ok,
            "{id}: {t:?}\n{}",
            fleet.logs()
        );
    }
    eprintln!(
        "both jobs ended ok {:?} after B was killed",
        killed.elapsed()
    );
    // Once: one `job_finished` record each, and the echo ran once.
    for id in [&hold, &queued] {
        assert_eq!(
            fleet.sql(&format!(
                "SELECT count(*) FROM audit_log WHERE record->'event'->>'kind' = 'job_finished' \
                 AND record->'event'->>'job_id' = '{id}'"
            )),
            "1",
            "{id}"
        );
    }
    let got = jobs
        .get(pb::GetJobRequest {
            job_id: queued.clone(),
        })
        .await
        .expect("get")
        .into_inner();
    assert_eq!(
        String::from_utf8_lossy(&got.targets[0].result.as_ref().expect("result").stdout).trim(),
        "after the failover"
    );
}

/// With agents on different controllers, each controller lists the other's
/// agent online with what its controller knows of it (version, policy,
/// check results), and the health lease holder judges a service over both
/// from both agents' checks (found by an outside test: each controller
/// listed the other's agents offline, and the health lease holder judged
/// them failing — "down" alerts for a fleet that was fine).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn agents_and_health_are_fleet_wide_across_controllers() {
    let fleet = two_controllers().await;
    // Each controller lists both agents online, with policy 1 and the
    // other's check result.
    let listed = tokio::time::timeout(Duration::from_secs(20), async {
        loop {
            let mut ok = true;
            for url in [&fleet.url_a, &fleet.url_b] {
                for name in ["a-1", "b-1"] {
                    ok &= fleet.online(url, name).await.is_some_and(|a| {
                        a.policy_version == 1
                            && !a.version.is_empty()
                            && a.checks.iter().any(|c| c.name == "ok")
                    });
                }
            }
            if ok {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await;
    assert!(
        listed.is_ok(),
        "both agents online with their checks on both controllers\n{}",
        fleet.logs()
    );
    // The health lease holder judges `up` from both: 2 of 2 pass.
    let service = |url: String| fleet.service_up(url);
    let judged = tokio::time::timeout(Duration::from_secs(20), async {
        loop {
            for url in [&fleet.url_a, &fleet.url_b] {
                if let Some(s) = service(url.clone()).await
                    && s.total == 2
                    && s.state != "unknown"
                {
                    return s;
                }
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await
    .unwrap_or_else(|_| {
        panic!(
            "no controller judged `up` over both agents\n{}",
            fleet.logs()
        )
    });
    assert_eq!(
        (judged.state.as_str(), judged.passing),
        ("ok", 2),
        "{judged:?}\n{}",
        fleet.logs()
    );
    // And it never was judged otherwise.
    assert_eq!(
        fleet.sql(
            "SELECT count(*) FROM health_transitions WHERE name = 'up' \
             AND record->>'to' NOT IN ('ok', 'unknown')"
        ),
        "0",
        "{}",
        fleet.sql("SELECT string_agg(record::text, ' ') FROM health_transitions")
    );
}

/// A controller stopped (SIGSTOP) for longer than its presence entry
/// stays fresh keeps its agents: a job submitted on the other controller
/// meanwhile waits for them and runs once it resumes (found by an outside
/// test: their targets ended `offline` ~16 s after the stop, though the
/// agents never left it).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_stalled_controllers_agents_are_not_called_offline() {
    let fleet = two_controllers().await;
    // B has written that b-1 is connected to it (every 2 s).
    let listed = tokio::time::timeout(Duration::from_secs(10), async {
        while fleet.sql("SELECT count(*) FROM presence WHERE 'b-1' = ANY(agents)") != "1" {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await;
    assert!(listed.is_ok(), "B lists b-1\n{}", fleet.logs());
    fleet.signal_b("-STOP");
    let mut jobs = pb::jobs_client::JobsClient::new(fleet.channel(&fleet.url_a).await);
    let id = jobs
        .submit(fleet.job("uptime", "all"))
        .await
        .expect("submitted on A")
        .into_inner()
        .job_id;
    // Past FRESH (6 s) + GRACE (10 s), when b-1 used to count as connected
    // nowhere.
    tokio::time::sleep(Duration::from_secs(20)).await;
    let during = jobs
        .get(pb::GetJobRequest { job_id: id.clone() })
        .await
        .expect("get")
        .into_inner();
    fleet.signal_b("-CONT");
    let b1 = |j: &pb::Job| {
        j.targets
            .iter()
            .find(|t| t.agent_id == "b-1")
            .map(|t| t.target_state())
    };
    assert_eq!(
        b1(&during),
        Some(TargetState::Pending),
        "{during:?}\n{}",
        fleet.logs()
    );
    let ended = job_when(&mut jobs, &id, Duration::from_secs(30), has_ended)
        .await
        .unwrap_or_else(|| panic!("the job did not end after B resumed\n{}", fleet.logs()));
    for t in &ended.targets {
        assert_eq!(
            t.target_state(),
            TargetState::Ok,
            "{ended:?}\n{}",
            fleet.logs()
        );
    }
}

/// One `[[audit_export]]` configured alike on both controllers: one exports
/// at a time (the holder of its lease), and when it is killed the other
/// takes the lease and resumes from the stored cursor — the file holds
/// every record once, in order, through the failover.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_audit_export_fails_over_to_the_other_controller_without_gap_or_duplicate() {
    let trail = tempfile::tempdir().expect("tempdir");
    let path = trail.path().join("trail.jsonl");
    let mut fleet = two_controllers_with(
        false,
        &format!(
            "\n[[audit_export]]\nname = \"trail\"\nkind = \"file\"\npath = \"{}\"\n",
            path.display()
        ),
    )
    .await;
    let records = |fleet: &TwoControllers| -> Vec<u64> {
        std::fs::read_to_string(&path)
            .unwrap_or_default()
            .lines()
            .filter_map(
                |l| match serde_json::from_str::<fleetcmd_core::audit::ExportLine>(l) {
                    Ok(fleetcmd_core::audit::ExportLine::Record(r)) => Some(r.seq),
                    Ok(_) => None,
                    Err(e) => panic!("{l}: {e}\n{}", fleet.logs()),
                },
            )
            .collect()
    };
    let exported_all = |fleet: &TwoControllers| {
        let last: u64 = fleet
            .sql("SELECT coalesce(max(seq), 0) FROM audit_log")
            .parse()
            .expect("seq");
        let got = records(fleet);
        (got.last() == Some(&last)).then_some(got)
    };
    run_and_watch(&fleet, &fleet.url_a, fleet.job("uptime", "all")).await;
    let before = tokio::time::timeout(Duration::from_secs(20), async {
        loop {
            if let Some(got) = exported_all(&fleet) {
                return got;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await
    .unwrap_or_else(|_| panic!("exported before the kill\n{}", fleet.logs()));
    // Kill the exporting controller (its lease holder is `ctl-PID-…`).
    let holder = fleet.sql("SELECT holder FROM leases WHERE name = 'audit-export:trail'");
    let pid = |i: usize| fleet._procs[i].0.id();
    let (killed, survivor) = if holder.starts_with(&format!("ctl-{}-", pid(0))) {
        (0, fleet.url_b.clone())
    } else {
        assert!(
            holder.starts_with(&format!("ctl-{}-", pid(1))),
            "holder {holder}"
        );
        (1, fleet.url_a.clone())
    };
    fleet._procs.remove(killed).kill9();
    let killed_at = Instant::now();
    // More records on the survivor meanwhile, from a job on its own agent:
    // the killed controller's agent knows no other controller, and its
    // target would wait out the dead one's list (`LISTED`, 60 s) — found
    // under load, when that list was written after the agent connected.
    let own = ["b-1", "a-1"][killed];
    run_and_watch(
        &fleet,
        &survivor,
        fleet.job("uptime", &format!("name={own}")),
    )
    .await;
    // The survivor takes the lease (TTL 15 s) and exports the rest.
    let after = tokio::time::timeout(Duration::from_secs(40), async {
        loop {
            if let Some(got) = exported_all(&fleet)
                && got.len() > before.len()
            {
                return got;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    })
    .await
    .unwrap_or_else(|_| panic!("exported after the kill\n{}", fleet.logs()));
    let want: Vec<u64> = (1..=*after.last().expect("records")).collect();
    assert_eq!(after, want, "every record once, in order");
    let cursor = fleet.sql("SELECT records FROM export_cursors WHERE name = 'trail'");
    assert_eq!(cursor, after.last().expect("records").to_string());
    eprintln!(
        "export resumed on the survivor {:?} after the kill ({} records before, {} after)",
        killed_at.elapsed(),
        before.len(),
        after.len()
    );
}

/// A job queued on an agent (its only slot busy) that is canceled while
/// the agent is away — its controller killed, the agent not yet on the
/// other — never starts: once welcomed again, the agent starts a job it
/// held only when that controller sends it again, which it does only for
/// targets still active.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_job_canceled_while_its_agent_fails_over_never_starts() {
    let mut fleet = two_controllers_with(true, "").await;
    let mut jobs = pb::jobs_client::JobsClient::new(fleet.channel(&fleet.url_a).await);
    let (hold, queued) = hold_and_queue(&fleet, &mut jobs, "4", "must not run").await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    fleet._procs.remove(1).kill9(); // controller B
    jobs.cancel(pb::CancelJobRequest {
        job_id: queued.clone(),
        requested_by: String::new(),
    })
    .await
    .expect("cancel on A");
    assert!(
        fleet.online(&fleet.url_a, "b-1").await.is_none(),
        "the cancel came before b-1 reached A (the case under test)"
    );
    let held = job_when(&mut jobs, &hold, Duration::from_secs(30), has_ended)
        .await
        .unwrap_or_else(|| panic!("the hold job did not end on A\n{}", fleet.logs()));
    assert_eq!(held.targets[0].target_state(), TargetState::Ok, "{held:?}");
    // The slot is free now; give the queued job every chance to start.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let log = std::fs::read_to_string(fleet.dir.path().join("b-1.log")).expect("b-1.log");
    let started = |id: &str| {
        log.lines()
            .any(|l| l.contains("job starting") && l.contains(id))
    };
    assert!(started(&hold), "the hold job's start is logged\n{log}");
    assert!(!started(&queued), "the canceled job started\n{log}");
    let got = jobs
        .get(pb::GetJobRequest {
            job_id: queued.clone(),
        })
        .await
        .expect("get")
        .into_inner();
    assert_eq!(
        got.targets[0].target_state(),
        TargetState::Canceled,
        "{got:?}"
    );
}

/// A service alert judged by the `health` lease holder reaches the alert
/// watchers of both controllers, and both show the stored state (found by
/// an outside test: a gateway on the other controller got no alert, and
/// each controller answered `health` with its own view).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_service_alert_reaches_the_watchers_of_every_controller() {
    let fleet = two_controllers().await;
    let service = |url: String| fleet.service_up(url);
    // Judged ok on both, from both agents.
    let ok = tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            let mut both = true;
            for url in [&fleet.url_a, &fleet.url_b] {
                both &= service(url.clone())
                    .await
                    .is_some_and(|s| s.state == "ok" && s.passing == 2);
            }
            if both {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await;
    assert!(
        ok.is_ok(),
        "`up` ok 2/2 on both controllers\n{}",
        fleet.logs()
    );
    let mut watches = Vec::new();
    for url in [&fleet.url_a, &fleet.url_b] {
        let stream = pb::health_client::HealthClient::new(fleet.channel(url).await)
            .watch(pb::HealthWatchRequest {})
            .await
            .expect("watch")
            .into_inner();
        watches.push((url.clone(), stream));
    }
    // b-1's check fails.
    std::fs::write(fleet.dir.path().join("b-1.down"), "").expect("down file");
    for (url, mut stream) in watches {
        let got = tokio::time::timeout(Duration::from_secs(20), async {
            while let Some(ev) = stream.message().await.expect("alert event") {
                if ev.kind() == pb::alert_event::Kind::Transition
                    && ev
                        .service
                        .as_ref()
                        .is_some_and(|s| s.name == "up" && s.state != "ok")
                {
                    return Some(ev);
                }
            }
            None
        })
        .await;
        let ev = match got {
            Ok(Some(ev)) => ev,
            _ => panic!("no `up` transition on {url}\n{}", fleet.logs()),
        };
        let s = ev.service.expect("service");
        assert_eq!((s.passing, s.total), (1, 2), "{s:?}");
        // The failing instance comes with it; the passing one not.
        let ids: Vec<&str> = s.instances.iter().map(|i| i.agent_id.as_str()).collect();
        assert_eq!(ids, ["b-1"], "{s:?}");
    }
    // Both answer `health` with the stored state.
    let same = tokio::time::timeout(Duration::from_secs(15), async {
        loop {
            let (a, b) = (
                service(fleet.url_a.clone()).await,
                service(fleet.url_b.clone()).await,
            );
            if let (Some(a), Some(b)) = (a, b)
                && a.state != "ok"
                && a.state == b.state
                && a.since_ms == b.since_ms
                && (a.passing, b.passing) == (1, 1)
            {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await;
    assert!(
        same.is_ok(),
        "both controllers show the stored state\n{}",
        fleet.logs()
    );
}

/// An agent revoked through a controller it is not connected to: the
/// controller it is connected to closes its stream and records what it
/// knows — the queued job refused (never started), the running one failed
/// as "revoked while the job ran" — not the revoking controller, which
/// does not know which had started (found by an outside test: a target
/// that ran was recorded refused, "before it reported starting").
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_revoked_agents_targets_are_recorded_by_the_controller_that_knows_them() {
    let fleet = two_controllers_with(true, "").await;
    let mut jobs = pb::jobs_client::JobsClient::new(fleet.channel(&fleet.url_a).await);
    let (running, queued) = hold_and_queue(&fleet, &mut jobs, "8", "never").await;
    // The sleep has started on b-1 (its log says so), the echo waits.
    fleet.b1_starts(&running).await;
    // A has read both targets back as dispatched (its catch-up scan).
    tokio::time::sleep(Duration::from_secs(3)).await;
    // B, which holds b-1's stream, is stopped while A revokes b-1: A does
    // not know which target started, and records neither.
    fleet.signal_b("-STOP");
    let revoked = pb::agents_client::AgentsClient::new(fleet.channel(&fleet.url_a).await)
        .revoke(pb::RevokeRequest {
            agent_id: "b-1".into(),
        })
        .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let mut still = Vec::new();
    for id in [&running, &queued] {
        still.push(
            jobs.get(pb::GetJobRequest { job_id: id.clone() })
                .await
                .expect("get")
                .into_inner(),
        );
    }
    fleet.signal_b("-CONT");
    revoked.expect("revoked on A");
    for j in &still {
        assert!(
            matches!(
                j.targets[0].target_state(),
                TargetState::Dispatched | TargetState::Running
            ),
            "A recorded a target of an agent connected to B: {j:?}"
        );
    }
    let state_of = |j: &pb::Job| {
        let t = &j.targets[0];
        (
            t.target_state(),
            t.result
                .as_ref()
                .map(|r| r.reason.clone())
                .unwrap_or_default(),
        )
    };
    for (id, want, reason) in [
        (&running, TargetState::Failed, "revoked while the job ran"),
        (&queued, TargetState::Refused, "before it reported starting"),
    ] {
        let ended = job_when(&mut jobs, id, Duration::from_secs(15), has_ended)
            .await
            .unwrap_or_else(|| panic!("{id} did not end\n{}", fleet.logs()));
        let (state, why) = state_of(&ended);
        assert_eq!(state, want, "{ended:?}\n{}", fleet.logs());
        assert!(why.contains(reason), "{why}");
    }
    assert!(
        !fleet.b1_started(&queued),
        "the queued job started\n{}",
        fleet.logs()
    );
}

/// While an agent's controller is stopped it cannot pass anything on, so
/// before a job that waited for a slot starts, the agent asks that
/// controller (`StartCheck`); with no answer within 5 s it leaves it for
/// the next, which refuses a revoked agent or sends a canceled job's
/// cancel (found by an outside test: a revoked agent started its queued
/// job 19 s after the revocation, and a canceled one ran to `ok`). When
/// the stopped controller resumes, it does not take the revoked agent's
/// result that waited in its socket as `ok`, and the revoked agent's
/// queued target ends once it is connected nowhere (a third outside test).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_queued_job_does_not_start_on_a_stalled_controllers_word() {
    for revoke in [true, false] {
        let fleet = two_controllers_with(true, "").await;
        let mut jobs = pb::jobs_client::JobsClient::new(fleet.channel(&fleet.url_a).await);
        let (hold, queued) = hold_and_queue(&fleet, &mut jobs, "3", "must not run").await;
        fleet.b1_starts(&hold).await;
        fleet.signal_b("-STOP");
        if revoke {
            pb::agents_client::AgentsClient::new(fleet.channel(&fleet.url_a).await)
                .revoke(pb::RevokeRequest {
                    agent_id: "b-1".into(),
                })
                .await
                .expect("revoked on A");
        } else {
            jobs.cancel(pb::CancelJobRequest {
                job_id: queued.clone(),
                requested_by: String::new(),
            })
            .await
            .expect("canceled on A");
        }
        // The hold ends 3 s after it started; then the start check goes
        // unanswered for 5 s and b-1 moves to A.
        tokio::time::sleep(Duration::from_secs(12)).await;
        let started = fleet.b1_started(&queued);
        fleet.signal_b("-CONT");
        assert!(
            !started,
            "revoke {revoke}: the queued job started on a stalled controller's word\n{}",
            fleet.logs()
        );
        let log = std::fs::read_to_string(fleet.dir.path().join("b-1.log")).expect("log");
        assert!(
            log.contains("did not answer a start check"),
            "revoke {revoke}: {log}"
        );
        if revoke {
            // The hold's result waited in B's socket while B was stopped:
            // B must not store a revoked agent's word as `ok` when it
            // resumes. b-1, refused everywhere, is connected to no
            // controller: its queued target ends within seconds of that,
            // not at its deadline (an hour). Found by an outside test.
            for id in [&hold, &queued] {
                let ended = job_when(&mut jobs, id, Duration::from_secs(45), has_ended)
                    .await
                    .unwrap_or_else(|| panic!("{id} did not end\n{}", fleet.logs()));
                let t = &ended.targets[0];
                let why = t.result.as_ref().map(|r| r.reason.as_str()).unwrap_or("");
                assert!(
                    matches!(t.target_state(), TargetState::Failed | TargetState::Refused)
                        && why.contains("revoked"),
                    "{id}: {ended:?}\n{}",
                    fleet.logs()
                );
            }
            assert!(!fleet.b1_started(&queued));
        } else {
            // On A now: the cancel came with it, and the job never started.
            let ended = job_when(&mut jobs, &queued, Duration::from_secs(15), has_ended)
                .await
                .unwrap_or_else(|| panic!("{queued} did not end\n{}", fleet.logs()));
            assert_eq!(
                ended.targets[0].target_state(),
                TargetState::Canceled,
                "{ended:?}"
            );
            assert!(!fleet.b1_started(&queued));
        }
    }
}
