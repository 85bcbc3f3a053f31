//! `/metrics` against a real Prometheus: the test starts the controller
//! and two agents with metrics on, a `prometheus` server of its own on a
//! free loopback port that scrapes them every second, and asks Prometheus'
//! HTTP API for the fleet series, then asks again through chat (`query`).

use fleetcmd_proto::v1::JobState;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant};

use crate::support::Recorder;
use fleetcmd_core::ids::Identity;
use fleetcmd_gateway::adapters::Incoming;
use fleetcmd_gateway::controller::GrpcController;
use fleetcmd_gateway::prometheus::{PromClient, PrometheusConfig, QueryData};
use fleetcmd_gateway::router::Router;
use fleetcmd_tests::*;
use serde_json::Value;

const INSTALL: &str = "install it: apt-get install -y prometheus";
/// How long Prometheus gets to start and to show the first scrapes.
const DEADLINE: Duration = Duration::from_secs(60);

fn prometheus_binary() -> PathBuf {
    let candidates = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .unwrap_or_default()
        .into_iter()
        .chain([PathBuf::from("/usr/bin")])
        .map(|d| d.join("prometheus"));
    for c in candidates {
        if c.is_file() {
            return c;
        }
    }
    panic!(
        "the prometheus binary was not found; these tests need a real Prometheus server: {INSTALL}"
    );
}

/// A Prometheus server of the test's own; killed on drop.
struct Prometheus {
    child: tokio::process::Child,
    url: String,
    _dir: tempfile::TempDir,
}

impl Prometheus {
    /// Starts Prometheus scraping `jobs` (job name → targets) every second,
    /// on a free loopback port (another one when that port was taken in
    /// between), and waits until its API answers.
    async fn start(jobs: &[(&str, Vec<SocketAddr>)]) -> Prometheus {
        let bin = prometheus_binary();
        let dir = tempfile::tempdir().expect("temp dir");
        let mut config = String::from(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nscrape_configs:\n",
        );
        for (name, targets) in jobs {
            let list: Vec<String> = targets.iter().map(|t| format!("\"{t}\"")).collect();
            config.push_str(&format!(
                "  - job_name: {name}\n    scrape_interval: 1s\n    scrape_timeout: 1s\n    static_configs:\n      - targets: [{}]\n",
                list.join(", ")
            ));
        }
        let config_file = dir.path().join("prometheus.yml");
        std::fs::write(&config_file, config).expect("write prometheus.yml");
        for attempt in 0..5 {
            let port = free_port();
            let data = dir.path().join(format!("data-{attempt}"));
            let log = dir.path().join(format!("prometheus-{attempt}.log"));
            let mut child = tokio::process::Command::new(&bin)
                .arg(format!("--config.file={}", config_file.display()))
                .arg(format!("--storage.tsdb.path={}", data.display()))
                .arg(format!("--web.listen-address=127.0.0.1:{port}"))
                .stdout(Stdio::null())
                .stderr(std::fs::File::create(&log).expect("log file"))
                .kill_on_drop(true)
                .spawn()
                .unwrap_or_else(|e| panic!("starting {}: {e}; {INSTALL}", bin.display()));
            let url = format!("http://127.0.0.1:{port}");
            let client = client(&url);
            let started = Instant::now();
            loop {
                if let Some(status) = child.try_wait().expect("wait") {
                    let text = std::fs::read_to_string(&log).unwrap_or_default();
                    if text.contains("address already in use") {
                        break; // the port was taken: another one
                    }
                    panic!("prometheus exited ({status}):\n{text}");
                }
                // Ready when an instant query gets an answer.
                if client.query("1").await.is_ok() {
                    return Prometheus {
                        child,
                        url,
                        _dir: dir,
                    };
                }
                assert!(
                    started.elapsed() < DEADLINE,
                    "prometheus did not answer within {DEADLINE:?}:\n{}",
                    std::fs::read_to_string(&log).unwrap_or_default()
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
        panic!("no free port for prometheus after 5 attempts");
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.start_kill();
    }
}

/// A port that was free a moment ago (bind port 0, read it, release it).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("bind 127.0.0.1:0")
        .port()
}

fn client(url: &str) -> PromClient {
    PromClient::new(&PrometheusConfig {
        url: url.into(),
        bearer_token: None,
        timeout: "5s".into(),
    })
    .expect("prometheus client")
}

/// (labels, value) of a vector answer.
fn vector(data: &QueryData) -> Vec<(serde_json::Map<String, Value>, String)> {
    assert_eq!(data.result_type, "vector", "{data:?}");
    data.result
        .as_array()
        .into_iter()
        .flatten()
        .map(|s| {
            (
                s.get("metric")
                    .and_then(Value::as_object)
                    .cloned()
                    .unwrap_or_default(),
                s.get("value")
                    .and_then(|v| v.get(1))
                    .and_then(Value::as_str)
                    .unwrap_or("")
                    .to_string(),
            )
        })
        .collect()
}

/// Polls `query` until `check` accepts the answer (or panics at the deadline
/// with the last answer).
async fn wait_for<T>(
    prom: &PromClient,
    query: &str,
    mut check: impl FnMut(&[(serde_json::Map<String, Value>, String)]) -> Option<T>,
) -> T {
    let started = Instant::now();
    loop {
        let last = prom.query(query).await.map(|d| vector(&d));
        if let Ok(rows) = &last
            && let Some(v) = check(rows)
        {
            return v;
        }
        assert!(
            started.elapsed() < DEADLINE,
            "{query}: not as expected within {DEADLINE:?}; last answer: {last:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn hosts(rows: &[(serde_json::Map<String, Value>, String)]) -> Vec<String> {
    let mut h: Vec<String> = rows
        .iter()
        .filter_map(|(m, _)| m.get("host").and_then(Value::as_str).map(str::to_string))
        .collect();
    h.sort();
    h
}

fn said(who: &str, channel: &str, text: &str) -> Incoming {
    Incoming {
        identity: Identity::parse(who).expect("identity"),
        channel: channel.into(),
        text: text.into(),
        thread: None,
        direct: true,
        from_bot: false,
    }
}

/// What the router answers to `text` from `who` in `channel`.
async fn ask(router: &Router<GrpcController>, who: &str, channel: &str, text: &str) -> String {
    let rec = Recorder::default();
    router.handle(said(who, channel, text), &rec).await;
    let replies = rec.texts();
    assert_eq!(replies.len(), 1, "{replies:?}");
    replies.into_iter().next().unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_real_prometheus_scrapes_fleet_metrics_and_chat_queries_it() {
    let fleet = start_fleet_with(2, |o| {
        o.controller_metrics = Some("127.0.0.1:0".parse().expect("addr"));
        o.agent_metrics = true;
    })
    .await;
    // One job, so that the job counters have a sample.
    let job = fleet
        .run("echo", &[("text", "hi")], "all")
        .await
        .expect("job");
    assert_eq!(job.job_state(), JobState::Succeeded);
    let controller = fleet.controller.metrics_addr().expect("controller metrics");
    let agents: Vec<SocketAddr> = fleet
        .agents
        .iter()
        .map(|a| a.metrics_addr.expect("agent metrics"))
        .collect();
    assert!(agents.iter().all(|a| a.ip().is_loopback()), "{agents:?}");
    let server = Prometheus::start(&[("fleet", vec![controller]), ("agents", agents)]).await;
    let prom = client(&server.url);

    wait_for(&prom, "fleetcmd_agents_online", |rows| {
        (rows.len() == 1 && rows[0].1 == "2").then_some(())
    })
    .await;
    // One series per host, labelled with the agent id.
    wait_for(&prom, "fleetcmd_host_load1", |rows| {
        (hosts(rows) == ["dev-1", "dev-2"]).then_some(())
    })
    .await;
    wait_for(&prom, "fleetcmd_host_up == 1", |rows| {
        (hosts(rows) == ["dev-1", "dev-2"]).then_some(())
    })
    .await;
    wait_for(&prom, "fleetcmd_jobs_finished_total", |rows| {
        rows.iter()
            .any(|(m, v)| m.get("state").and_then(Value::as_str) == Some("succeeded") && v == "1")
            .then_some(())
    })
    .await;
    // The gRPC layer saw the job's Submit.
    wait_for(
        &prom,
        "fleetcmd_grpc_requests_total{service=\"fleetcmd.v1.Jobs\",method=\"Submit\",code=\"Ok\"}",
        |rows| (rows.len() == 1).then_some(()),
    )
    .await;
    // Each agent's own endpoint, scraped on loopback.
    wait_for(&prom, "fleetcmd_agent_connected == 1", |rows| {
        (rows.len() == 2).then_some(())
    })
    .await;

    // The same through chat: `query` answers with a table of the series.
    let ctl = GrpcController::from_channel(fleet.gateway().await);
    let router = Router::new(fleet.gateway_options().router_config(), ctl);
    router
        .register_commands(std::sync::Arc::new(client(&server.url)))
        .unwrap_or_else(|e| panic!("{e}"));
    let reply = ask(
        &router,
        "console:alice",
        "console",
        "query fleetcmd_agents_online",
    )
    .await;
    assert!(
        reply.starts_with("query fleetcmd_agents_online: 1 series — asked by console:alice"),
        "{reply}"
    );
    assert!(
        reply
            .lines()
            .any(|l| l.starts_with("fleetcmd_agents_online{") && l.trim_end().ends_with(" 2")),
        "{reply}"
    );
    let reply = ask(
        &router,
        "console:alice",
        "console",
        "query sort(fleetcmd_host_load1)",
    )
    .await;
    for host in ["dev-1", "dev-2"] {
        assert!(
            reply.contains(&format!("host=\"{host}\"")),
            "{host} missing:\n{reply}"
        );
    }
    // Prometheus' own error, shown as it is.
    let reply = ask(&router, "console:alice", "console", "query sum(").await;
    assert!(
        reply.contains("Prometheus refused it (bad_data)") && reply.contains("parse error"),
        "{reply}"
    );
    // Reads need a role in the channel.
    let reply = ask(
        &router,
        "slack:T0001:U0STRANGER",
        "slack:T0001:C0OPS",
        "query up",
    )
    .await;
    assert!(
        reply.contains("you have no roles in this channel"),
        "{reply}"
    );
    drop(server);
    fleet.fleet.shutdown().await.expect("shutdown");
}
