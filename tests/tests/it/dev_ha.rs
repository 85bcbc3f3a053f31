//! `fleetcmd dev --controllers 3 --postgres`, the real binary: it starts a
//! local PostgreSQL and three controllers on it, agent dev-i on controller
//! i; a job runs; one controller is `kill -9`ed → its agent comes back on
//! another controller and a job submitted there runs on it. Closing stdin
//! still ends the whole dev fleet cleanly (exit 0).
//!
//! Each controller's `/metrics` says which controller it is, counts only
//! the agents connected to it, and exactly one of them holds each lease.
//!
//! Jobs are submitted on the controller the agent is connected to: a job
//! reaches only the agents connected to the controller that accepted it
//! until cross-controller dispatch exists.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use fleetcmd_core::job::SignedJob;
use fleetcmd_proto::channel::ClientTls;
use fleetcmd_proto::v1 as pb;
use fleetcmd_proto::v1::{JobState, TargetState};
use fleetcmd_tests::workspace_bin as bin;
use fleetcmd_tests::*;

/// One line of `DIR/controllers`.
struct Ctl {
    url: String,
    pid: u32,
    metrics: String,
}

/// `DIR/controllers`: `URL PID METRICS_URL` per line, once all three are
/// listed and the dev fleet is up (`DIR/env` is written after the agents
/// are online).
fn controllers(dir: &Path) -> Option<Vec<Ctl>> {
    if !dir.join("env").exists() {
        return None;
    }
    let text = std::fs::read_to_string(dir.join("controllers")).ok()?;
    let list: Vec<Ctl> = text
        .lines()
        .filter_map(|l| {
            let mut w = l.split(' ');
            Some(Ctl {
                url: w.next()?.to_owned(),
                pid: w.next()?.parse().ok()?,
                metrics: w.next()?.to_owned(),
            })
        })
        .collect();
    (list.len() == 3).then_some(list)
}

/// `GET` of an `http://HOST:PORT/PATH` URL on loopback (or a test's own
/// namespace): the body of a 200 answer.
pub(crate) async fn scrape(url: &str) -> Option<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let rest = url.strip_prefix("http://")?;
    let (host, path) = rest.split_once('/')?;
    let mut s = tokio::time::timeout(Duration::from_secs(5), tokio::net::TcpStream::connect(host))
        .await
        .ok()?
        .ok()?;
    s.write_all(
        format!("GET /{path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await
    .ok()?;
    let mut out = String::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_string(&mut out))
        .await
        .ok()?
        .ok()?;
    let (head, body) = out.split_once("\r\n\r\n")?;
    head.starts_with("HTTP/1.1 200").then(|| body.to_owned())
}

/// The value of the sample `series` (name and labels exactly as rendered).
pub(crate) fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}

pub(crate) const LEASES: [&str; 4] = ["sweeper", "retention", "health", "audit-heads"];

async fn online(url: &str, op: &ClientTls) -> Vec<String> {
    fleetcmd_cli::dev_cluster::online_agents(url, op)
        .await
        .unwrap_or_default()
        .into_iter()
        .map(|a| a.agent_id)
        .collect()
}

/// Submits `uptime` for `agent` on the controller at `url`; the finished job.
async fn run_on(
    url: &str,
    op: &ClientTls,
    key: &fleetcmd_core::crypto::SigningKey,
    agent: &str,
) -> pb::Job {
    uptime_on(url, op, key, &format!("name={agent}")).await
}

/// Submits `uptime` for `selector` on the controller at `url`, signed by
/// the operator's `key`; the job once it is no longer running.
pub(crate) async fn uptime_on(
    url: &str,
    op: &ClientTls,
    key: &fleetcmd_core::crypto::SigningKey,
    selector: &str,
) -> pb::Job {
    let s = spec("uptime", &[], selector, "cli:admin");
    let job = SignedJob::sign(&s, fleetcmd_cli::fleet::OPERATOR_SIGNER, key);
    let ch = fleetcmd_proto::channel::connect(url, op)
        .await
        .expect("connect");
    let mut jobs = pb::jobs_client::JobsClient::new(ch);
    let id = jobs
        .submit(to_pb(job))
        .await
        .unwrap_or_else(|e| panic!("submitted on {url}: {e}"))
        .into_inner()
        .job_id;
    assert_eventually(Duration::from_secs(20), || {
        let mut jobs = jobs.clone();
        let id = id.clone();
        async move {
            let j = jobs
                .get(pb::GetJobRequest { job_id: id })
                .await
                .ok()?
                .into_inner();
            fleetcmd_cli::client::is_finished(&j).then_some(j)
        }
    })
    .await
}

fn assert_ran(job: &pb::Job, agent: &str) {
    assert_eq!(job.job_state(), JobState::Succeeded, "{job:?}");
    let t = target(job, agent);
    assert_eq!(t.target_state(), TargetState::Ok, "{job:?}");
    assert!(stdout(t).contains("load average"), "{}", stdout(t));
}

fn logs(dir: &Path) -> String {
    crate::failover::log_tails(
        dir,
        &["dev.log", "controller-2.log", "controller-3.log"],
        20,
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn dev_with_three_controllers_on_postgres_survives_a_kill_9_of_one() {
    init();
    let tmp = tempfile::tempdir().expect("tempdir");
    let data = tmp.path().join("dev");
    let log = std::fs::File::create(tmp.path().join("dev.log")).expect("log");
    let mut dev = Command::new(bin("fleetcmd"))
        .args(["dev", "--postgres", "--controllers", "3", "--agents", "3"])
        .args(["--listen", "127.0.0.1:0", "--data"])
        .arg(&data)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("fleetcmd dev starts");
    let d = tmp.path().to_owned();
    let dump = || {
        // The dev log sits beside the data directory.
        let mut s = logs(&data);
        s.push_str(&logs(&d));
        s
    };
    let start = Instant::now();
    let ctls = loop {
        if let Some(c) = controllers(&data) {
            break c;
        }
        if let Ok(Some(st)) = dev.try_wait() {
            panic!("fleetcmd dev exited ({st})\n{}", dump());
        }
        assert!(
            start.elapsed() < Duration::from_secs(90),
            "fleetcmd dev up within 90 s\n{}",
            dump()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let read = |f: &str| std::fs::read_to_string(data.join(f)).expect("dev file");
    let op = ClientTls {
        ca_pem: read("ca.crt"),
        cert_pem: read("operator.crt"),
        key_pem: read("operator.key"),
    };
    let key = fleetcmd_core::crypto::SigningKey::from_pkcs8_pem(&read("operator.sign.key"))
        .expect("operator signing key");
    assert_ne!(
        ctls[1].pid, ctls[2].pid,
        "controllers 2 and 3 are their own processes"
    );
    // Every controller has the services: whichever takes the health lease
    // judges them (found by an outside test: only the first had them).
    for k in [2, 3] {
        let cfg = read(&format!("controller-{k}.toml"));
        for service in ["[services.fleet-disk]", "[services.web]"] {
            assert!(cfg.contains(service), "controller-{k}.toml: {cfg}");
        }
    }

    // dev-i prefers controller i.
    for (i, c) in ctls.iter().enumerate() {
        let agent = format!("dev-{}", i + 1);
        assert_eventually(Duration::from_secs(20), || async {
            online(&c.url, &op).await.contains(&agent).then_some(())
        })
        .await;
    }

    // Per-controller metrics: each says who it is, counts its own agent,
    // and each lease is held by exactly one of them.
    let mut ids = Vec::new();
    let mut held = [0u32; 4];
    for c in &ctls {
        let text = scrape(&c.metrics)
            .await
            .unwrap_or_else(|| panic!("{} answers", c.metrics));
        let addr = c.url.trim_start_matches("https://");
        let info = text
            .lines()
            .find(|l| l.starts_with("fleetcmd_controller_info{"))
            .unwrap_or_else(|| panic!("no controller info in:\n{text}"));
        assert!(info.contains(&format!("address=\"{addr}\"")), "{info}");
        assert!(info.contains("store=\"postgres\""), "{info}");
        ids.push(info.split('"').nth(1).expect("controller id").to_owned());
        assert_eq!(
            sample(&text, "fleetcmd_agents_online"),
            Some(1.0),
            "{}: {text}",
            c.url
        );
        assert_eq!(sample(&text, "fleetcmd_agents_known"), Some(3.0), "{text}");
        assert_eq!(sample(&text, "fleetcmd_store_up"), Some(1.0), "{text}");
        for (n, lease) in LEASES.iter().enumerate() {
            let v = sample(&text, &format!("fleetcmd_lease_held{{lease=\"{lease}\"}}"))
                .unwrap_or_else(|| panic!("no lease {lease} in:\n{text}"));
            let term = sample(&text, &format!("fleetcmd_lease_term{{lease=\"{lease}\"}}"))
                .expect("lease term");
            assert_eq!(v == 1.0, term > 0.0, "{lease}: held {v}, term {term}");
            held[n] += u32::from(v == 1.0);
        }
    }
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), 3, "three distinct controller ids: {ids:?}");
    assert_eq!(held, [1; 4], "each lease held by exactly one controller");

    assert_ran(&run_on(&ctls[1].url, &op, &key, "dev-2").await, "dev-2");

    // kill -9 controller 2: dev-2 moves on to controller 3 (next in its list).
    let pid = ctls[1].pid;
    let st = Command::new("kill")
        .args(["-9", &pid.to_string()])
        .status()
        .expect("kill");
    assert!(st.success(), "kill -9 {pid}");
    let killed = Instant::now();
    let moved = tokio::time::timeout(Duration::from_secs(15), async {
        loop {
            for c in [&ctls[0], &ctls[2]] {
                if online(&c.url, &op).await.iter().any(|a| a == "dev-2") {
                    return c;
                }
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
    .unwrap_or_else(|_| panic!("dev-2 online on another controller within 15 s\n{}", dump()));
    eprintln!(
        "dev-2 online on {} {:?} after kill -9",
        moved.url,
        killed.elapsed()
    );
    assert!(
        fleetcmd_cli::dev_cluster::online_agents(&ctls[1].url, &op)
            .await
            .is_none(),
        "the killed controller no longer answers"
    );
    assert_ran(&run_on(&moved.url, &op, &key, "dev-2").await, "dev-2");
    // Its metrics count the newcomer too.
    let text = scrape(&moved.metrics).await.expect("metrics");
    assert_eq!(sample(&text, "fleetcmd_agents_online"), Some(2.0), "{text}");
    // The others were not disturbed.
    assert!(
        online(&ctls[0].url, &op)
            .await
            .contains(&"dev-1".to_owned())
    );
    assert_ran(&run_on(&ctls[0].url, &op, &key, "dev-1").await, "dev-1");
    // `fleetcmd dev` reaps the killed controller and says so on stderr (it
    // stayed a zombie until dev ended: found by an outside test).
    let reaped = tokio::time::timeout(Duration::from_secs(10), async {
        while Path::new(&format!("/proc/{pid}")).exists() {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await;
    assert!(reaped.is_ok(), "controller {pid} not reaped\n{}", dump());
    let said = std::fs::read_to_string(tmp.path().join("dev.log")).unwrap_or_default();
    assert!(said.contains(&format!("(pid {pid}) exited")), "{said}");

    // End of input ends the dev fleet, with the controllers it started.
    drop(dev.stdin.take());
    let deadline = Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Some(st) = dev.try_wait().expect("wait") {
            break st;
        }
        if Instant::now() > deadline {
            let _ = dev.kill();
            panic!(
                "fleetcmd dev did not exit within 60 s of end of input\n{}",
                dump()
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(status.success(), "fleetcmd dev exit: {status}\n{}", dump());
    let pid3 = ctls[2].pid;
    assert_eventually(Duration::from_secs(10), || async {
        (!Path::new(&format!("/proc/{pid3}")).exists()).then_some(())
    })
    .await;
}

#[test]
fn several_controllers_without_postgres_or_out_of_range_are_refused_with_the_reason() {
    for (args, want) in [
        (
            &["--controllers", "2"][..],
            "--controllers 2 needs --postgres: controllers share their state through PostgreSQL only",
        ),
        (
            &["--controllers", "0", "--postgres"][..],
            "--controllers must be between 1 and 9, got 0",
        ),
    ] {
        let out = Command::new(bin("fleetcmd"))
            .arg("dev")
            .args(args)
            .stdin(Stdio::null())
            .output()
            .expect("fleetcmd dev runs");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(64), "{args:?}: {stderr}");
        assert!(stderr.contains(want), "{args:?}: {stderr}");
    }
}
