//! `fleetcmd-bench`: the fleet-scale benchmark of issue 4. Runs the real
//! controller as a child process (`fleetcmd-controller run` with a config
//! file, so its `/proc` figures are its own) and N simulated agents in this
//! process's tokio runtime, over real mTLS connections on 127.0.0.1, and
//! reports connection and reconnect storms, controller RSS and idle CPU per
//! agent, fan-out latency of one job to all N, durable result-ingest rate
//! and store bytes per result, against the BENCHMARKS.md targets targets.
//!
//! Simulated agents are load generators (see `sim`): they verify nothing and
//! run nothing. Most get certificates issued directly from the fleet CA and
//! registered in the store before the controller starts (joining 10 000
//! through the RPC, with a flush each, would dominate the run); a few join
//! through `Enrollment.Join` with a token and a CSR, to time that path.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, bail};
use clap::Parser;
use fleetcmd_controller::pki::{Ca, Role};
use fleetcmd_controller::store::postgres::{PostgresOptions, PostgresStore};
use fleetcmd_controller::store::{AgentRecord, AgentStore, Embedded, SledStore, Store};
use fleetcmd_core::crypto::SigningKey;
use fleetcmd_core::ids::{Identity, JobId};
use fleetcmd_core::job::{JobSpec, Rollout, SignedJob};
use fleetcmd_core::policy_bundle::sign_bundle;
use fleetcmd_proto::channel::ClientTls;
use fleetcmd_proto::v1 as pb;
use serde_json::json;
use tokio::sync::watch;
use tonic::transport::Channel;

use fleetcmd_bench::sim::{self, AgentIdentity, Dial, Stats, wait_until};
use fleetcmd_bench::sys;

#[derive(Parser, Debug)]
#[command(about = "fleet-scale benchmark: real controller, N simulated agents over mTLS")]
struct Args {
    /// Simulated agents.
    #[arg(long, default_value_t = 1000)]
    agents: usize,
    /// Of those, how many join through Enrollment.Join (token + CSR); the
    /// rest get certificates straight from the CA.
    #[arg(long, default_value_t = 4)]
    joined: usize,
    /// The controller binary (default: next to this one).
    #[arg(long)]
    controller_bin: Option<PathBuf>,
    /// Working directory (controller data, config, log); default a fresh
    /// directory under the system temp dir, removed at the end unless --keep.
    #[arg(long)]
    work_dir: Option<PathBuf>,
    #[arg(long)]
    keep: bool,
    /// Heartbeat interval the controller announces.
    #[arg(long, default_value_t = 10)]
    heartbeat_secs: u64,
    /// Idle window for CPU and RSS.
    #[arg(long, default_value_t = 30)]
    idle_secs: u64,
    /// Results to ingest for the rate and store-size figures (the jobs go
    /// to all N agents, so this many / N jobs).
    #[arg(long, default_value_t = 100_000)]
    ingest_results: usize,
    /// Stop submitting ingest jobs after this long.
    #[arg(long, default_value_t = 120)]
    ingest_secs: u64,
    /// Longest wait for any one phase (storm, fan-out).
    #[arg(long, default_value_t = 180)]
    phase_timeout_secs: u64,
    /// RUST_LOG of the controller (its log goes to WORK_DIR/controller.log).
    #[arg(long, default_value = "info")]
    controller_log: String,
    /// Record `perf record -g` of the controller during these phases
    /// (comma-separated: storm,idle,fanout,reconnect,ingest) into WORK_DIR.
    #[arg(long, default_value = "")]
    perf: String,
    /// Also write the figures as JSON here.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Controllers sharing the fleet (more than one needs --postgres): the
    /// agents are spread over them, each knowing all addresses; jobs are
    /// submitted on the first; the reconnect storm stops the second.
    #[arg(long, default_value_t = 1)]
    controllers: usize,
    /// Store on a PostgreSQL started for the run (`pg-harness`: initdb in
    /// a temporary directory, loopback, then `fsync = on`), not sled.
    #[arg(long)]
    postgres: bool,
    /// The embedded store of the controller without --postgres: sled or
    /// redb.
    #[arg(long, default_value = "sled", value_parser = ["sled", "redb"])]
    store: String,
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// Nearest-rank percentile of sorted values.
fn pct(sorted: &[Duration], q: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}

fn summary(mut v: Vec<Duration>) -> serde_json::Value {
    v.sort();
    json!({
        "n": v.len(),
        "first_ms": ms(pct(&v, 0.0)),
        "p50_ms": ms(pct(&v, 0.50)),
        "p90_ms": ms(pct(&v, 0.90)),
        "p99_ms": ms(pct(&v, 0.99)),
        "last_ms": ms(pct(&v, 1.0)),
    })
}

fn line(what: &str, v: &serde_json::Value) {
    println!(
        "  {what:<34} n={:<6} first={:>9.1} p50={:>9.1} p90={:>9.1} p99={:>9.1} last={:>9.1} ms",
        v["n"],
        v["first_ms"].as_f64().unwrap_or(0.0),
        v["p50_ms"].as_f64().unwrap_or(0.0),
        v["p90_ms"].as_f64().unwrap_or(0.0),
        v["p99_ms"].as_f64().unwrap_or(0.0),
        v["last_ms"].as_f64().unwrap_or(0.0)
    );
}

// ------------------------------------------------------------------ controller process

struct ControllerProc {
    bin: PathBuf,
    config: PathBuf,
    log: PathBuf,
    rust_log: String,
    child: Option<Child>,
}

impl ControllerProc {
    fn spawn(&mut self) -> anyhow::Result<()> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .with_context(|| format!("opening {}", self.log.display()))?;
        let child = Command::new(&self.bin)
            .arg("--config")
            .arg(&self.config)
            .arg("run")
            .env("RUST_LOG", &self.rust_log)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting {}", self.bin.display()))?;
        self.child = Some(child);
        Ok(())
    }

    fn pid(&self) -> String {
        self.child
            .as_ref()
            .map(|c| c.id().to_string())
            .unwrap_or_default()
    }

    /// SIGTERM (graceful: the controller ends the agent streams and flushes)
    /// and waits up to 30 s, then SIGKILL.
    async fn stop(&mut self) -> anyhow::Result<Duration> {
        let t = Instant::now();
        let Some(mut child) = self.child.take() else {
            return Ok(Duration::ZERO);
        };
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(child.id().to_string())
            .status();
        while t.elapsed() < Duration::from_secs(30) {
            if child.try_wait()?.is_some() {
                return Ok(t.elapsed());
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        eprintln!("controller did not stop within 30 s; killing it");
        let _ = child.kill();
        let _ = child.wait();
        Ok(t.elapsed())
    }

    fn check_alive(&mut self) -> anyhow::Result<()> {
        if let Some(c) = self.child.as_mut()
            && let Some(st) = c.try_wait()?
        {
            bail!("the controller exited ({st}); see {}", self.log.display());
        }
        Ok(())
    }
}

fn check_all(ctls: &mut [ControllerProc]) -> anyhow::Result<()> {
    ctls.iter_mut().try_for_each(ControllerProc::check_alive)
}

/// CPU seconds and VmRSS (KiB) of each controller now.
fn each_controller(ctls: &[ControllerProc]) -> Vec<(f64, u64)> {
    ctls.iter()
        .map(|c| {
            let pid = c.pid();
            (
                sys::cpu_secs(&pid).unwrap_or(0.0),
                sys::rss_kib(&pid).map_or(0, |r| r.0),
            )
        })
        .collect()
}

/// Per controller: CPU seconds used since `before`, and RSS now (MiB).
fn per_controller(ctls: &[ControllerProc], before: &[(f64, u64)]) -> serde_json::Value {
    let now = each_controller(ctls);
    // A controller stopped meanwhile reads as 0 (its process is gone).
    let cpu: Vec<f64> = now
        .iter()
        .zip(before)
        .map(|(n, b)| (n.0 - b.0).max(0.0))
        .collect();
    let rss: Vec<f64> = now.iter().map(|n| n.1 as f64 / 1024.0).collect();
    json!({"cpu_s": cpu, "rss_mib": rss})
}

fn print_per_controller(what: &str, v: &serde_json::Value) {
    let f = |key: &str| -> String {
        v[key]
            .as_array()
            .map(|a| {
                a.iter()
                    .map(|x| format!("{:.1}", x.as_f64().unwrap_or(0.0)))
                    .collect::<Vec<_>>()
                    .join(" / ")
            })
            .unwrap_or_default()
    };
    println!(
        "  per controller ({what}): CPU {} s, RSS {} MiB",
        f("cpu_s"),
        f("rss_mib")
    );
}

/// Bytes of every table of the database, with its indexes and TOAST.
fn pg_bytes(cluster: &fleetcmd_pg_harness::PgCluster, db: &str) -> anyhow::Result<u64> {
    let sql = "SELECT coalesce(sum(pg_total_relation_size(c.oid)), 0) FROM pg_class c \
               JOIN pg_namespace n ON n.oid = c.relnamespace \
               WHERE n.nspname = 'public' AND c.relkind = 'r'";
    let out = cluster
        .psql(db, sql)
        .map_err(|e| anyhow::anyhow!("table sizes: {e}"))?;
    out.trim()
        .parse()
        .with_context(|| format!("table sizes: {out:?}"))
}

/// Stops controller `victim` (SIGTERM) and times until every agent that
/// was connected to it has a `Welcome` from another; then starts it again.
async fn failover_storm(
    ctls: &mut [ControllerProc],
    victim: usize,
    stats: &Stats,
    limit: Duration,
) -> anyhow::Result<serde_json::Value> {
    let moving: Vec<usize> = stats
        .connected_to()
        .into_iter()
        .filter_map(|(agent, on)| (on == victim).then_some(agent))
        .collect();
    let before = each_controller(ctls);
    let t_stop = Instant::now();
    let stop_time = ctls[victim].stop().await?;
    let back = |stats: &Stats| {
        let now = stats.connected_to();
        moving
            .iter()
            .filter(|a| now.get(a).is_some_and(|&on| on != victim))
            .count()
    };
    let all = wait_until(limit, || back(stats) == moving.len()).await;
    let t_all = t_stop.elapsed();
    let welcomes = stats.first_welcomes_since(t_stop);
    let s = summary(
        moving
            .iter()
            .filter_map(|a| welcomes.get(a).copied())
            .collect(),
    );
    let fails = stats.failures_between(t_stop, Instant::now()).len();
    let cpu = per_controller(ctls, &before);
    println!(
        "reconnect storm (failover): controller {victim} stopped in {:.0} ms (SIGTERM, graceful); {} of its {} agents on another controller {:.2} s after the stop began; {fails} ended streams or failed attempts",
        ms(stop_time),
        back(stats),
        moving.len(),
        t_all.as_secs_f64()
    );
    line("per-agent time to Welcome from stop", &s);
    print_per_controller("during the failover", &cpu);
    let t = Instant::now();
    ctls[victim].spawn()?;
    println!(
        "  controller {victim} started again (pid {}); its agents stay where they are",
        ctls[victim].pid()
    );
    Ok(json!({
        "all_back": all, "moving": moving.len(), "back": back(stats), "stop_ms": ms(stop_time),
        "all_back_after_stop_ms": ms(t_all), "per_agent_from_stop": s, "failed_or_ended": fails,
        "per_controller": cpu, "restarted_after_ms": ms(t.elapsed()),
    }))
}

/// `perf record` of a process for one phase.
struct Perf(Option<Child>);

impl Perf {
    fn start(phases: &str, phase: &str, pid: &str, dir: &Path) -> Perf {
        if !phases.split(',').any(|p| p.trim() == phase) {
            return Perf(None);
        }
        let out = dir.join(format!("perf-{phase}.data"));
        let child = Command::new("perf")
            .args([
                "record",
                "-F",
                "199",
                "--call-graph",
                "dwarf,16384",
                "-p",
                pid,
                "-o",
            ])
            .arg(&out)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .ok();
        if child.is_some() {
            println!("  (perf recording {phase} into {})", out.display());
        }
        Perf(child)
    }

    fn stop(self) {
        if let Some(mut c) = self.0 {
            let _ = Command::new("kill")
                .arg("-INT")
                .arg(c.id().to_string())
                .status();
            let _ = c.wait();
        }
    }
}

// ------------------------------------------------------------------ setup

fn new_job_id() -> anyhow::Result<JobId> {
    JobId::from_uuid_v7_bytes(*uuid::Uuid::now_v7().as_bytes())
        .map_err(|e| anyhow::anyhow!("job id: {e}"))
}

fn random_key() -> anyhow::Result<SigningKey> {
    let doc = ring::signature::Ed25519KeyPair::generate_pkcs8(&ring::rand::SystemRandom::new())
        .map_err(|_| anyhow::anyhow!("key generation failed"))?;
    SigningKey::from_pkcs8_der(doc.as_ref()).map_err(|e| anyhow::anyhow!("key: {e}"))
}

fn labels(i: usize) -> Vec<(String, String)> {
    let role = if i % 2 == 1 { "web" } else { "db" };
    vec![("role".into(), role.into()), ("env".into(), "bench".into())]
}

async fn operator_channel(url: &str, tls: &ClientTls, limit: Duration) -> anyhow::Result<Channel> {
    let t = Instant::now();
    loop {
        match fleetcmd_proto::channel::connect(url, tls).await {
            Ok(c) => {
                // The TLS handshake succeeded; make sure the services answer.
                let mut p = pb::policy_client::PolicyClient::new(c.clone());
                match p.get(pb::GetPolicyRequest {}).await {
                    Ok(_) => return Ok(c),
                    Err(s) if s.code() == tonic::Code::NotFound => return Ok(c),
                    Err(_) => {}
                }
            }
            Err(_) if t.elapsed() < limit => {}
            Err(e) => return Err(e.into()),
        }
        if t.elapsed() > limit {
            bail!("controller not ready after {limit:?}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Joins one agent through `Enrollment.Join` with a CSR, as the real agent
/// does (without its pinning probe: the CA is known here).
async fn join_one(
    url: &str,
    ca_pem: &str,
    token: &str,
    name: &str,
) -> anyhow::Result<AgentIdentity> {
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519)?;
    let csr = rcgen::CertificateParams::new(Vec::<String>::new())?.serialize_request(&key)?;
    let ep = fleetcmd_proto::channel::endpoint(url, ca_pem, None)?;
    let ch = fleetcmd_proto::channel::open(&ep).await?;
    let resp = pb::enrollment_client::EnrollmentClient::new(ch)
        .join(pb::JoinRequest {
            token: token.to_owned(),
            csr_der: csr.der().to_vec(),
            name: name.to_owned(),
        })
        .await?
        .into_inner();
    Ok(AgentIdentity {
        name: resp.agent_id,
        cert_pem: resp.cert_pem,
        key_pem: key.serialize_pem(),
    })
}

fn job_spec(command: &str, batch_percent: Option<u8>) -> anyhow::Result<JobSpec> {
    Ok(JobSpec {
        id: new_job_id()?,
        command: command.into(),
        args: BTreeMap::new(),
        selector: "all".into(),
        requester: Identity::parse("cli:admin").map_err(|e| anyhow::anyhow!("{e}"))?,
        channel: fleetcmd_core::rbac::CLI_CHANNEL.into(),
        approvals: Vec::new(),
        unattested_approvers: Vec::new(),
        timeout_secs: 0,
        not_before: now_secs(),
        expires_at: now_secs() + 600,
        rollout: Rollout {
            batch: batch_percent.map(fleetcmd_core::grammar::Limit::Percent),
            ..Default::default()
        },
    })
}

fn signed(spec: &JobSpec, key: &SigningKey) -> pb::SignedJob {
    let j = SignedJob::sign(spec, fleetcmd_cli::fleet::OPERATOR_SIGNER, key);
    pb::SignedJob {
        spec: j.spec,
        signature: j.signature,
        key_id: j.key_id,
    }
}

async fn online_count(ch: &Channel) -> anyhow::Result<(usize, usize)> {
    let list = pb::agents_client::AgentsClient::new(ch.clone())
        .max_decoding_message_size(256 * 1024 * 1024)
        .list(pb::ListAgentsRequest {
            selector: String::new(),
        })
        .await?
        .into_inner();
    Ok((
        list.agents.iter().filter(|a| a.online).count(),
        list.agents.len(),
    ))
}

fn jobs_client(ch: &Channel) -> pb::jobs_client::JobsClient<Channel> {
    pb::jobs_client::JobsClient::new(ch.clone())
        .max_decoding_message_size(256 * 1024 * 1024)
        .max_encoding_message_size(4 * 1024 * 1024)
}

fn ratio(measured: f64, target: f64) -> f64 {
    if target == 0.0 {
        0.0
    } else {
        measured / target
    }
}

// ------------------------------------------------------------------ main

fn main() -> std::process::ExitCode {
    let args = Args::parse();
    let _ = rustls::crypto::ring::default_provider().install_default();
    let rt = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("fleetcmd-bench: runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match rt.block_on(run(args)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("fleetcmd-bench: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn run(args: Args) -> anyhow::Result<()> {
    let started = Instant::now();
    let (soft, hard) = sys::raise_nofile().context("raising RLIMIT_NOFILE")?;
    let n = args.agents;
    if n == 0 {
        bail!("--agents must be at least 1");
    }
    let joined = args.joined.min(n);
    let need_fds = n as u64 + 200;
    if soft < need_fds {
        bail!("open-files limit {soft} (hard {hard}) is below the {need_fds} this run needs");
    }
    let bin = match &args.controller_bin {
        Some(b) => b.clone(),
        None => std::env::current_exe()?
            .parent()
            .context("the bench binary has no directory")?
            .join("fleetcmd-controller"),
    };
    if !bin.exists() {
        bail!(
            "{} not found: build it with `cargo build --release -p fleetcmd-controller` (same target dir) or pass --controller-bin",
            bin.display()
        );
    }
    let work = match &args.work_dir {
        Some(d) => d.clone(),
        None => std::env::temp_dir().join(format!("fleetcmd-bench-{n}-{}", std::process::id())),
    };
    if work.exists() {
        std::fs::remove_dir_all(&work).with_context(|| format!("clearing {}", work.display()))?;
    }
    std::fs::create_dir_all(&work)?;
    let k = args.controllers;
    if k == 0 || (k > 1 && !args.postgres) {
        bail!(
            "--controllers {k}: at least 1, and more than 1 needs --postgres (one shared database)"
        );
    }
    let embedded = match args.store.as_str() {
        "redb" if args.postgres => bail!("--store redb: not with --postgres"),
        "redb" => Embedded::Redb,
        _ => Embedded::Sled,
    };
    let pg = if args.postgres {
        let t = Instant::now();
        let cluster = tokio::task::block_in_place(fleetcmd_pg_harness::PgCluster::start)
            .map_err(|e| anyhow::anyhow!("starting PostgreSQL: {e}"))?;
        // The harness runs without fsync (a test's machine does not lose
        // power); a durable result here means what it means on sled.
        for sql in [
            "ALTER SYSTEM SET fsync = on",
            "ALTER SYSTEM SET full_page_writes = on",
            "SELECT pg_reload_conf()",
        ] {
            cluster
                .psql("postgres", sql)
                .map_err(|e| anyhow::anyhow!("{sql}: {e}"))?;
        }
        let db = cluster.fresh_database();
        println!(
            "PostgreSQL: port {}, database {}, started in {:.1} s (fsync on)",
            cluster.port(),
            db.name,
            t.elapsed().as_secs_f64()
        );
        Some((cluster, db))
    } else {
        None
    };
    // Controller i keeps its files in WORK/controller (i = 0) or
    // WORK/controller-i.
    let data_of = |i: usize| {
        if i == 0 {
            work.join("controller")
        } else {
            work.join(format!("controller-{i}"))
        }
    };
    let data = data_of(0);
    let db_path = embedded.path(&data);
    let hb = Duration::from_secs(args.heartbeat_secs.max(1));
    let phase_limit = Duration::from_secs(args.phase_timeout_secs);
    let mut out = serde_json::Map::new();
    out.insert("agents".into(), json!(n));
    out.insert("joined_via_rpc".into(), json!(joined));
    out.insert(
        "cores".into(),
        json!(std::thread::available_parallelism().map_or(0, |n| n.get())),
    );
    out.insert("nofile".into(), json!([soft, hard]));
    println!(
        "fleetcmd-bench: N = {n} simulated agents ({joined} joined through Enrollment.Join), heartbeat {}s, work dir {}",
        hb.as_secs(),
        work.display()
    );

    // ---------------------------------------------------------------- setup
    let t = Instant::now();
    let admin = random_key()?;
    let gateway_key = random_key()?;
    let ca = Ca::load_or_create(&data.join("pki"))?;
    let ca_pem = ca.cert_pem().to_owned();
    let op = ca.issue_identity(
        Role::Operator,
        fleetcmd_cli::fleet::OPERATOR_NAME,
        Duration::from_secs(7 * 86400),
    )?;
    let operator_key = random_key()?;
    let operator_tls = ClientTls {
        ca_pem: ca_pem.clone(),
        cert_pem: op.cert_pem.clone(),
        key_pem: op.key_pem.expose().clone(),
    };
    let direct: Vec<String> = (1..=n - joined).map(|i| format!("bench-{i:05}")).collect();
    let mut identities = tokio::task::block_in_place(|| sim::issue_identities(&ca, &direct))?;
    let issue_time = t.elapsed();
    let t = Instant::now();
    let record = |i: usize, id: &AgentIdentity| AgentRecord {
        id: id.name.clone(),
        labels: labels(i + 1).into_iter().collect(),
        revoked: false,
        joined_at: now_secs(),
        version: String::new(),
        enrolment_cert: None,
    };
    let pg = match &pg {
        None => {
            std::fs::create_dir_all(&data)?;
            let store = embedded.open(&data, fleetcmd_controller::store::DEFAULT_CACHE_BYTES)?;
            for (i, id) in identities.iter().enumerate() {
                store.put_agent(&record(i, id))?;
            }
            store.flush()?;
            store.close();
            None
        }
        Some((cluster, db)) => {
            let store = tokio::task::block_in_place(|| {
                PostgresStore::open(&PostgresOptions {
                    url: db.url.clone(),
                    password: Some(cluster.password().to_owned()),
                    ca_pem: None,
                })
            })?;
            for (i, id) in identities.iter().enumerate() {
                tokio::task::block_in_place(|| store.put_agent(&record(i, id)))?;
            }
            Some((cluster, db))
        }
    };
    let register_time = t.elapsed();
    drop(ca);
    let mut ports = Vec::new();
    let mut ctls = Vec::new();
    for i in 0..k {
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0")?;
            l.local_addr()?.port()
        };
        let store = match &pg {
            None => format!("store = \"{}\"\n", embedded.name()),
            Some((cluster, db)) => format!(
                "store = \"postgres\"\npostgres_url = \"{}\"\npostgres_password_file = \"{}\"\n",
                db.url,
                cluster.password_file().display()
            ),
        };
        let name = if i == 0 {
            "controller".to_owned()
        } else {
            format!("controller-{i}")
        };
        let config = work.join(format!("{name}.toml"));
        std::fs::write(
            &config,
            format!(
                "listen = \"127.0.0.1:{port}\"\ndata_dir = \"{}\"\npolicy_roots = [\"{}\"]\nheartbeat_interval = \"{}s\"\nagent_cert_ttl = \"24h\"\n{store}",
                data_of(i).display(),
                admin.public_key(),
                hb.as_secs()
            ),
        )?;
        ports.push(port);
        ctls.push(ControllerProc {
            bin: bin.clone(),
            config,
            log: work.join(format!("{name}.log")),
            rust_log: args.controller_log.clone(),
            child: None,
        });
    }
    let urls: Vec<String> = ports
        .iter()
        .map(|p| format!("https://127.0.0.1:{p}"))
        .collect();
    let (port, url) = (ports[0], urls[0].clone());
    println!(
        "setup: {} certificates issued from the CA in {:.1} s, registered in the store in {:.2} s",
        direct.len(),
        issue_time.as_secs_f64(),
        register_time.as_secs_f64()
    );
    let (db_before_apparent, db_before_alloc) = sys::du(&db_path);
    let pg_before = match &pg {
        Some((cluster, db)) => pg_bytes(cluster, &db.name)?,
        None => 0,
    };

    let t = Instant::now();
    ctls[0].spawn()?;
    let mut op_ch = operator_channel(&url, &operator_tls, Duration::from_secs(60)).await?;
    let mut pid = ctls[0].pid();
    println!(
        "controller: pid {pid}, ready in {:.0} ms ({url})",
        ms(t.elapsed())
    );

    // Policy: the example policy, operator key as a signer.
    let policy = fleetcmd_cli::fleet::example_policy(
        1,
        &gateway_key.public_key(),
        &operator_key.public_key(),
    );
    let sig = sign_bundle(policy.as_bytes(), &admin);
    pb::policy_client::PolicyClient::new(op_ch.clone())
        .push(pb::SignedPolicy {
            bundle: policy.into_bytes(),
            signatures: vec![pb::PolicySignature {
                key_id: sig.key_id,
                signature: sig.signature,
            }],
        })
        .await
        .context("pushing the policy")?;
    // The others share what an operator copies: the fleet CA and the
    // audit key (the database holds the rest).
    for i in 1..k {
        fleetcmd_cli::dev_cluster::share_keys(&data, &data_of(i))?;
        ctls[i].spawn()?;
        operator_channel(&urls[i], &operator_tls, Duration::from_secs(60)).await?;
        println!("controller {i}: pid {} ({})", ctls[i].pid(), urls[i]);
    }

    // A few real joins.
    if joined > 0 {
        let tok = pb::tokens_client::TokensClient::new(op_ch.clone())
            .create(pb::CreateTokenRequest {
                labels: labels(1).into_iter().collect(),
                ttl_secs: 600,
                uses: joined as u32,
                name: String::new(),
            })
            .await
            .context("creating a join token")?
            .into_inner()
            .token;
        let mut times = Vec::new();
        for j in 1..=joined {
            let t = Instant::now();
            let id = join_one(&url, &ca_pem, &tok, &format!("bench-join-{j}"))
                .await
                .with_context(|| format!("joining bench-join-{j}"))?;
            times.push(t.elapsed());
            identities.push(id);
        }
        let s = summary(times);
        line("Enrollment.Join (token + CSR)", &s);
        out.insert("join".into(), s);
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (rss0, _) = sys::rss_kib(&pid).unwrap_or((0, 0));
    println!(
        "controller baseline: VmRSS {rss0} KiB, {} fds",
        sys::fd_count(&pid)
    );
    out.insert("baseline_rss_kib".into(), json!(rss0));

    // ---------------------------------------------------------------- connection storm
    let stats = Arc::new(Stats::default());
    let dial = Arc::new(Dial {
        urls: urls.clone(),
        ca_pem: ca_pem.clone(),
        job_time: Duration::ZERO,
    });
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut tasks = tokio::task::JoinSet::new();
    let self_pid = std::process::id().to_string();
    let gen_cpu0 = sys::cpu_secs(&self_pid).unwrap_or(0.0);
    let perf = Perf::start(&args.perf, "storm", &pid, &work);
    let storm_cpu0 = sys::cpu_secs(&pid).unwrap_or(0.0);
    let pc_storm = each_controller(&ctls);
    let t_storm = Instant::now();
    for (i, id) in identities.into_iter().enumerate() {
        tasks.spawn(sim::run_agent(
            i,
            Arc::new(id),
            dial.clone(),
            stats.clone(),
            stop_rx.clone(),
        ));
    }
    let all = wait_until(phase_limit, || {
        stats.first_welcomes_since(t_storm).len() >= n
    })
    .await;
    let storm_wall = t_storm.elapsed();
    let storm_cpu = sys::cpu_secs(&pid).unwrap_or(0.0) - storm_cpu0;
    let storm_gen = sys::cpu_secs(&self_pid).unwrap_or(0.0) - gen_cpu0;
    perf.stop();
    check_all(&mut ctls)?;
    let w = stats.first_welcomes_since(t_storm);
    let fails = stats.failures_between(t_storm, Instant::now());
    let s = summary(w.values().copied().collect());
    println!(
        "connection storm: {} of {n} connected (Welcome received, i.e. registered) in {:.2} s; {} failed attempts (retried with backoff)",
        w.len(),
        storm_wall.as_secs_f64(),
        fails.len()
    );
    line("per-agent time to Welcome", &s);
    println!(
        "  CPU during the storm: controller {storm_cpu:.1} s ({:.2} ms per connection), load generator {storm_gen:.1} s (client TLS, same 2 cores)",
        storm_cpu * 1000.0 / n as f64
    );
    if !fails.is_empty() {
        println!(
            "  first failures: {:?}",
            fails.iter().take(3).collect::<Vec<_>>()
        );
    }
    let (online, total) = online_count(&op_ch).await?;
    println!("  controller's Agents.List: {online} online of {total}");
    out.insert(
        "storm".into(),
        json!({
            "all_connected": all, "connected": w.len(), "wall_ms": ms(storm_wall),
            "failed_attempts": fails.len(), "per_agent": s, "controller_online": online,
            "controller_cpu_s": storm_cpu, "loadgen_cpu_s": storm_gen,
        }),
    );
    {
        let v = per_controller(&ctls, &pc_storm);
        if k > 1 {
            print_per_controller("storm", &v);
        }
        out.insert("storm_per_controller".into(), v);
    }

    // ---------------------------------------------------------------- idle
    // One full heartbeat round first, so every agent has sent metrics.
    tokio::time::sleep(hb + Duration::from_secs(1)).await;
    let perf = Perf::start(&args.perf, "idle", &pid, &work);
    let (rss1, _) = sys::rss_kib(&pid).unwrap_or((0, 0));
    let c0 = sys::cpu_secs(&pid).unwrap_or(0.0);
    let g0 = sys::cpu_secs(&self_pid).unwrap_or(0.0);
    let hb0 = stats.heartbeats.load(Ordering::Relaxed);
    let pc_idle = each_controller(&ctls);
    let t_idle = Instant::now();
    tokio::time::sleep(Duration::from_secs(args.idle_secs)).await;
    let idle_wall = t_idle.elapsed().as_secs_f64();
    let c1 = sys::cpu_secs(&pid).unwrap_or(0.0);
    let g1 = sys::cpu_secs(&self_pid).unwrap_or(0.0);
    let (rss2, hwm2) = sys::rss_kib(&pid).unwrap_or((0, 0));
    let hbs = stats.heartbeats.load(Ordering::Relaxed) - hb0;
    perf.stop();
    check_all(&mut ctls)?;
    let cpu_pct = (c1 - c0) / idle_wall * 100.0;
    let gen_pct = (g1 - g0) / idle_wall * 100.0;
    let rss_delta = rss2.saturating_sub(rss0);
    println!(
        "idle ({:.0} s, {hbs} heartbeats): controller CPU {cpu_pct:.2} % of a core ({:.5} % per agent); load generator {gen_pct:.2} %",
        idle_wall,
        cpu_pct / n as f64
    );
    println!(
        "controller RSS: {rss2} KiB ({:.1} MiB) = baseline {rss0} + {rss_delta} KiB ({:.1} KiB per agent); after the storm {rss1} KiB; VmHWM {hwm2} KiB; {} fds",
        rss2 as f64 / 1024.0,
        rss_delta as f64 / n as f64,
        sys::fd_count(&pid)
    );
    out.insert("idle".into(), json!({
        "secs": idle_wall, "heartbeats": hbs, "controller_cpu_pct": cpu_pct,
        "cpu_pct_per_agent": cpu_pct / n as f64, "loadgen_cpu_pct": gen_pct,
        "rss_kib": rss2, "rss_delta_kib": rss_delta, "rss_per_agent_kib": rss_delta as f64 / n as f64,
        "hwm_kib": hwm2, "fds": sys::fd_count(&pid),
    }));
    {
        let v = per_controller(&ctls, &pc_idle);
        if k > 1 {
            print_per_controller("idle", &v);
        }
        out.insert("idle_per_controller".into(), v);
    }

    // ---------------------------------------------------------------- fan-out
    let perf = Perf::start(&args.perf, "fanout", &pid, &work);
    let spec = job_spec("uptime", Some(100))?;
    let job_id = spec.id.to_string();
    let sj = signed(&spec, &operator_key);
    let c0 = sys::cpu_secs(&pid).unwrap_or(0.0);
    let pc_fanout = each_controller(&ctls);
    let t_submit = Instant::now();
    let sub = jobs_client(&op_ch)
        .submit(sj)
        .await
        .context("submitting the fan-out job")?
        .into_inner();
    let submit_rpc = t_submit.elapsed();
    let targets = sub.targets.len();
    let done = wait_until(phase_limit, || stats.job(&job_id).1.len() >= targets).await;
    let t_acked = t_submit.elapsed();
    let fan_cpu = sys::cpu_secs(&pid).unwrap_or(0.0) - c0;
    perf.stop();
    // Cross-check through the API: the job's own state and per-target results.
    let mut get_state = String::new();
    let mut get_ok = 0;
    let t_get = Instant::now();
    while t_get.elapsed() < phase_limit {
        let j = jobs_client(&op_ch)
            .get(pb::GetJobRequest {
                job_id: job_id.clone(),
            })
            .await?
            .into_inner();
        get_ok = j
            .targets
            .iter()
            .filter(|t| t.target_state() == pb::TargetState::Ok)
            .count();
        let running = j.job_state() == pb::JobState::Running;
        get_state = j.state;
        if !running {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let t_get_done = t_submit.elapsed();
    let (recv, acked) = stats.job(&job_id);
    let recv_s = summary(recv.iter().map(|t| *t - t_submit).collect());
    let ack_s = summary(acked.iter().map(|t| *t - t_submit).collect());
    let first_recv = recv.iter().min().copied().unwrap_or(t_submit);
    let last_ack = acked.iter().max().copied().unwrap_or(t_submit);
    let fan_rate = acked.len() as f64 / (last_ack - first_recv).as_secs_f64().max(1e-9);
    println!(
        "fan-out of `uptime` (batch 100%) to {targets} targets: Submit RPC {:.0} ms; all acked: {done} ({:.2} s); Jobs.Get: {get_state}, {get_ok} ok (seen at {:.2} s); controller CPU {:.1} s",
        ms(submit_rpc),
        t_acked.as_secs_f64(),
        t_get_done.as_secs_f64(),
        fan_cpu
    );
    line("job received by agent (dispatch)", &recv_s);
    line("result acked (durable) [fan-out]", &ack_s);
    println!("  results ingested during fan-out: {fan_rate:.0} results/s");
    out.insert(
        "fanout".into(),
        json!({
            "targets": targets, "submit_rpc_ms": ms(submit_rpc), "all_acked": done,
            "dispatch": recv_s, "result_acked": ack_s, "jobs_get_state": get_state,
            "jobs_get_ok": get_ok, "jobs_get_seen_ms": ms(t_get_done), "results_per_s": fan_rate,
            "controller_cpu_s": fan_cpu,
        }),
    );
    {
        let v = per_controller(&ctls, &pc_fanout);
        if k > 1 {
            print_per_controller("fanout", &v);
        }
        out.insert("fanout_per_controller".into(), v);
    }
    check_all(&mut ctls)?;

    // ---------------------------------------------------------------- reconnect storm
    // One controller: stopped and started again, every agent comes back to
    // it. Several: the second is stopped, its agents move to the others
    // (timed), then it is started again (no agent moves back).
    if k > 1 {
        let storm = failover_storm(&mut ctls, 1, &stats, phase_limit).await?;
        out.insert("reconnect".into(), storm);
    } else {
        let t_stop = Instant::now();
        let stop_time = ctls[0].stop().await?;
        let t_spawn = Instant::now();
        ctls[0].spawn()?;
        pid = ctls[0].pid();
        let perf = Perf::start(&args.perf, "reconnect", &pid, &work);
        // Listening: a plain TCP connect succeeds (cheap, and not queued behind
        // the agents' TLS handshakes as an operator call is).
        let addr: std::net::SocketAddr = format!("127.0.0.1:{port}").parse()?;
        while t_spawn.elapsed() < Duration::from_secs(60)
            && std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(100)).is_err()
        {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let t_listen = Instant::now();
        let rc_cpu0 = sys::cpu_secs(&pid).unwrap_or(0.0);
        op_ch = operator_channel(&url, &operator_tls, Duration::from_secs(60)).await?;
        let t_ready = Instant::now();
        let all = wait_until(phase_limit, || {
            stats.first_welcomes_since(t_spawn).len() >= n
        })
        .await;
        let t_all = Instant::now();
        perf.stop();
        let rc_cpu = sys::cpu_secs(&pid).unwrap_or(0.0) - rc_cpu0;
        let w_spawn = stats.first_welcomes_since(t_spawn);
        let fails_down = stats.failures_between(t_stop, t_listen).len();
        let fails_up = stats.failures_between(t_listen, t_all);
        let s = summary(w_spawn.values().copied().collect());
        println!(
            "reconnect storm: controller stopped in {:.0} ms (SIGTERM, graceful), restarted: listening {:.0} ms after spawn, an operator call answered {:.0} ms after spawn; {} of {n} back {:.2} s after spawn ({:.2} s after the stop began); controller CPU {rc_cpu:.1} s",
            ms(stop_time),
            ms(t_listen - t_spawn),
            ms(t_ready - t_spawn),
            w_spawn.len(),
            (t_all - t_spawn).as_secs_f64(),
            (t_all - t_stop).as_secs_f64()
        );
        line("per-agent time to Welcome from spawn", &s);
        println!(
            "  failed attempts while it was down: {fails_down} (expected); after it listened: {}",
            fails_up.len()
        );
        if !fails_up.is_empty() {
            println!("  first: {:?}", fails_up.iter().take(3).collect::<Vec<_>>());
        }
        let (online, _) = online_count(&op_ch).await?;
        println!("  controller's Agents.List: {online} online");
        out.insert("reconnect".into(), json!({
            "all_back": all, "back": w_spawn.len(), "stop_ms": ms(stop_time),
            "listening_after_spawn_ms": ms(t_listen - t_spawn), "controller_cpu_s": rc_cpu,
            "ready_after_spawn_ms": ms(t_ready - t_spawn), "all_back_after_spawn_ms": ms(t_all - t_spawn),
            "all_back_after_stop_ms": ms(t_all - t_stop), "per_agent_from_spawn": s,
            "failed_while_down": fails_down, "failed_after_ready": fails_up.len(),
            "controller_online": online,
        }));
    }

    // ---------------------------------------------------------------- ingest
    let perf = Perf::start(&args.perf, "ingest", &pid, &work);
    let target_results = args.ingest_results.max(n);
    let ingest_limit = Duration::from_secs(args.ingest_secs);
    let mut ids: Vec<String> = Vec::new();
    let mut submit_times = Vec::new();
    let c0 = sys::cpu_secs(&pid).unwrap_or(0.0);
    let g0 = sys::cpu_secs(&self_pid).unwrap_or(0.0);
    let pc_ingest = each_controller(&ctls);
    let t_ing = Instant::now();
    let mut jc = jobs_client(&op_ch);
    // Bounded by `ingest_limit`: keeps about two jobs' worth of results in
    // flight so the controller always has work.
    while t_ing.elapsed() < ingest_limit && ids.len() * n < target_results {
        let acked = stats.acked_total(&ids);
        if ids.len() * n - acked < 2 * n {
            let spec = job_spec("uptime", Some(100))?;
            let id = spec.id.to_string();
            let t = Instant::now();
            match jc.submit(signed(&spec, &operator_key)).await {
                Ok(_) => {
                    submit_times.push(t.elapsed());
                    ids.push(id);
                }
                Err(s) => {
                    println!("  ingest submit failed: {:?} {}", s.code(), s.message());
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }
        } else {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        check_all(&mut ctls)?;
    }
    let expected = ids.len() * n;
    let drained = wait_until(Duration::from_secs(90), || {
        stats.acked_total(&ids) >= expected
    })
    .await;
    let ing_wall = t_ing.elapsed();
    let ing_cpu = sys::cpu_secs(&pid).unwrap_or(0.0) - c0;
    let ing_gen = sys::cpu_secs(&self_pid).unwrap_or(0.0) - g0;
    let (rss3, hwm3) = sys::rss_kib(&pid).unwrap_or((0, 0));
    perf.stop();
    let acked = stats.acked_total(&ids);
    let mut first = None::<Instant>;
    let mut last = None::<Instant>;
    for id in &ids {
        let (r, a) = stats.job(id);
        if let Some(m) = r.iter().min() {
            first = Some(first.map_or(*m, |f: Instant| f.min(*m)));
        }
        if let Some(m) = a.iter().max() {
            last = Some(last.map_or(*m, |l: Instant| l.max(*m)));
        }
    }
    let window = match (first, last) {
        (Some(f), Some(l)) if l > f => (l - f).as_secs_f64(),
        _ => ing_wall.as_secs_f64(),
    };
    let rate = acked as f64 / window;
    let sub_s = summary(submit_times);
    println!(
        "durable ingest: {} jobs × {n} targets, {acked}/{expected} results acked{} in {:.1} s → {rate:.0} results/s; controller CPU {:.0} % of a core, load generator {:.0} %",
        ids.len(),
        if drained { "" } else { " (NOT all)" },
        window,
        ing_cpu / ing_wall.as_secs_f64() * 100.0,
        ing_gen / ing_wall.as_secs_f64() * 100.0
    );
    line("Submit RPC (N targets each)", &sub_s);
    println!("  controller RSS now {rss3} KiB, VmHWM {hwm3} KiB");
    out.insert(
        "ingest".into(),
        json!({
            "jobs": ids.len(), "results_acked": acked, "expected": expected, "drained": drained,
            "window_s": window, "results_per_s": rate, "submit_rpc": sub_s,
            "controller_cpu_pct": ing_cpu / ing_wall.as_secs_f64() * 100.0,
            "loadgen_cpu_pct": ing_gen / ing_wall.as_secs_f64() * 100.0,
            "rss_kib": rss3, "hwm_kib": hwm3,
        }),
    );
    {
        let v = per_controller(&ctls, &pc_ingest);
        if k > 1 {
            print_per_controller("ingest", &v);
        }
        out.insert("ingest_per_controller".into(), v);
    }

    // ---------------------------------------------------------------- stop, store size
    let _ = stop_tx.send(true);
    let t = Instant::now();
    while !tasks.is_empty() && t.elapsed() < Duration::from_secs(15) {
        let _ = tokio::time::timeout(Duration::from_millis(200), tasks.join_next()).await;
    }
    tasks.abort_all();
    let mut stop_time = Duration::ZERO;
    for c in ctls.iter_mut().rev() {
        stop_time = stop_time.max(c.stop().await?);
    }
    let gen_cpu = sys::cpu_secs(&self_pid).unwrap_or(0.0) - gen_cpu0;
    let results_total = acked + stats.job(&job_id).1.len();
    let result_logical = stats.result_bytes.load(Ordering::Relaxed) as f64
        / stats.results_sent.load(Ordering::Relaxed).max(1) as f64;
    if let Some((cluster, db)) = &pg {
        let after = pg_bytes(cluster, &db.name)?;
        let grown = after.saturating_sub(pg_before);
        let per_result = grown as f64 / results_total.max(1) as f64;
        println!(
            "store (PostgreSQL): controllers stopped in {:.0} ms; tables {:.1} MiB with indexes and TOAST, +{:.1} MiB for {results_total} results = {per_result:.0} bytes/result; a result is {result_logical:.0} bytes encoded → {:.1}× its logical size",
            ms(stop_time),
            after as f64 / 1048576.0,
            grown as f64 / 1048576.0,
            per_result / result_logical
        );
        println!(
            "  load generator CPU over the run {gen_cpu:.1} s; run took {:.0} s",
            started.elapsed().as_secs_f64()
        );
        out.insert("store".into(), json!({
            "backend": "postgres", "results": results_total, "tables_bytes": after,
            "tables_before_bytes": pg_before, "bytes_per_result": per_result,
            "result_logical_bytes": result_logical, "ratio_to_logical": per_result / result_logical,
        }));
    } else {
        let (db_apparent, db_alloc) = sys::du(&db_path);
        let (audit_apparent, _) = sys::du(&data.join("audit"));
        // What the database holds, tree by tree (sled's).
        let mut trees = serde_json::Map::new();
        if embedded == Embedded::Sled {
            let store = tokio::task::spawn_blocking({
                let p = data.join("db");
                move || SledStore::open(&p)
            })
            .await??;
            for name in [
                "targets",
                "jobs",
                "agents",
                "audit",
                "audit_index",
                "audit_heads",
            ] {
                let tree = store.raw_tree(name)?;
                let (mut count, mut bytes) = (0u64, 0u64);
                for kv in tree.iter() {
                    let (k, v) = kv.map_err(|e| anyhow::anyhow!("reading {name}: {e}"))?;
                    count += 1;
                    bytes += (k.len() + v.len()) as u64;
                }
                trees.insert(
                    name.into(),
                    json!({"entries": count, "key_value_bytes": bytes}),
                );
            }
            store.close();
        }
        let grown = db_alloc.saturating_sub(db_before_alloc);
        let grown_apparent = db_apparent.saturating_sub(db_before_apparent);
        let per_result = grown as f64 / results_total.max(1) as f64;
        println!(
            "store: controller stopped in {:.0} ms; db {:.1} MiB allocated ({:.1} MiB apparent), +{:.1} MiB for {results_total} results = {per_result:.0} bytes/result allocated ({:.0} apparent); a result is {result_logical:.0} bytes encoded → {:.1}× its logical size; 1 M results ≈ {:.2} GiB",
            ms(stop_time),
            db_alloc as f64 / 1048576.0,
            db_apparent as f64 / 1048576.0,
            grown as f64 / 1048576.0,
            grown_apparent as f64 / results_total.max(1) as f64,
            per_result / result_logical,
            per_result * 1e6 / 1073741824.0
        );
        println!("  trees: {}", serde_json::Value::Object(trees.clone()));
        println!(
            "  audit dir {audit_apparent} bytes; load generator CPU over the run {gen_cpu:.1} s; run took {:.0} s",
            started.elapsed().as_secs_f64()
        );
        out.insert("store".into(), json!({
            "results": results_total, "db_allocated_bytes": db_alloc, "db_apparent_bytes": db_apparent,
            "db_before_allocated_bytes": db_before_alloc, "bytes_per_result_allocated": per_result,
            "bytes_per_result_apparent": grown_apparent as f64 / results_total.max(1) as f64,
            "result_logical_bytes": result_logical, "ratio_to_logical": per_result / result_logical,
            "trees": trees,
        }));
    }
    out.insert("loadgen_cpu_s".into(), json!(gen_cpu));
    out.insert("run_s".into(), json!(started.elapsed().as_secs_f64()));

    // ---------------------------------------------------------------- against §10
    let o = serde_json::Value::Object(out.clone());
    println!(
        "against BENCHMARKS.md targets (ratio = measured / target; ≤ 1 meets it, except ingest: ≥ 1):"
    );
    let rows = [
        (
            "controller RSS with N agents (MiB) < 400",
            o["idle"]["rss_kib"].as_f64().unwrap_or(0.0) / 1024.0,
            400.0,
        ),
        (
            "controller idle CPU (% of a core) < 2",
            o["idle"]["controller_cpu_pct"].as_f64().unwrap_or(0.0),
            2.0,
        ),
        (
            "reconnect: all back (s) < 5",
            // One controller: after its restart; several: after the stop
            // of the one whose agents moved.
            o["reconnect"]["all_back_after_spawn_ms"]
                .as_f64()
                .or(o["reconnect"]["all_back_after_stop_ms"].as_f64())
                .unwrap_or(0.0)
                / 1000.0,
            5.0,
        ),
        (
            "fan-out first result (ms) < 100",
            o["fanout"]["result_acked"]["first_ms"]
                .as_f64()
                .unwrap_or(0.0),
            100.0,
        ),
        (
            "fan-out p50 (ms) < 1000",
            o["fanout"]["result_acked"]["p50_ms"]
                .as_f64()
                .unwrap_or(0.0),
            1000.0,
        ),
        (
            "fan-out p99 (ms) < 2000",
            o["fanout"]["result_acked"]["p99_ms"]
                .as_f64()
                .unwrap_or(0.0),
            2000.0,
        ),
        (
            "durable ingest (results/s) ≥ 20000 [ratio ≥ 1]",
            o["ingest"]["results_per_s"].as_f64().unwrap_or(0.0),
            20000.0,
        ),
        (
            "store / logical size ≤ 2",
            o["store"]["ratio_to_logical"].as_f64().unwrap_or(0.0),
            2.0,
        ),
    ];
    let mut ratios = serde_json::Map::new();
    for (what, m, t) in rows {
        let r = ratio(m, t);
        println!("  {what:<46} {m:>10.2} vs {t:>8.0}  ratio {r:.2}");
        ratios.insert(what.into(), json!(r));
    }
    out.insert("ratios".into(), serde_json::Value::Object(ratios));
    if let Some(p) = &args.json {
        std::fs::write(
            p,
            serde_json::to_string_pretty(&serde_json::Value::Object(out))?,
        )?;
    }
    if !args.keep && args.work_dir.is_none() {
        let _ = std::fs::remove_dir_all(&work);
    }
    Ok(())
}
