//! `fleetcmd dev --controllers 3 --postgres`, the real binary: it starts a
//! local PostgreSQL and three controllers on it, agent dev-i on controller
//! i; a job runs; one controller is `kill -9`ed → its agent comes back on
//! another controller and a job submitted there runs on it. Closing stdin
//! still ends the whole dev fleet cleanly (exit 0).
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

/// `DIR/controllers`: `URL PID` per line, once all three are listed and
/// the dev fleet is up (`DIR/env` is written after the agents are online).
fn controllers(dir: &Path) -> Option<Vec<(String, u32)>> {
    if !dir.join("env").exists() {
        return None;
    }
    let text = std::fs::read_to_string(dir.join("controllers")).ok()?;
    let list: Vec<(String, u32)> = text
        .lines()
        .filter_map(|l| {
            let (url, pid) = l.split_once(' ')?;
            Some((url.to_owned(), pid.parse().ok()?))
        })
        .collect();
    (list.len() == 3).then_some(list)
}

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
    let s = spec("uptime", &[], &format!("name={agent}"), "cli:admin");
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
            (j.job_state() != JobState::Running).then_some(j)
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
    ["dev.log", "controller-2.log", "controller-3.log"]
        .iter()
        .map(|f| {
            let text = std::fs::read_to_string(dir.join(f)).unwrap_or_default();
            let tail: Vec<&str> = text.lines().rev().take(20).collect();
            format!(
                "--- {f}\n{}",
                tail.into_iter().rev().collect::<Vec<_>>().join("\n")
            )
        })
        .collect::<Vec<_>>()
        .join("\n")
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
        ctls[1].1, ctls[2].1,
        "controllers 2 and 3 are their own processes"
    );

    // dev-i prefers controller i.
    for (i, (url, _)) in ctls.iter().enumerate() {
        let agent = format!("dev-{}", i + 1);
        assert_eventually(Duration::from_secs(20), || async {
            online(url, &op).await.contains(&agent).then_some(())
        })
        .await;
    }
    assert_ran(&run_on(&ctls[1].0, &op, &key, "dev-2").await, "dev-2");

    // kill -9 controller 2: dev-2 moves on to controller 3 (next in its list).
    let pid = ctls[1].1;
    let st = Command::new("kill")
        .args(["-9", &pid.to_string()])
        .status()
        .expect("kill");
    assert!(st.success(), "kill -9 {pid}");
    let killed = Instant::now();
    let moved = tokio::time::timeout(Duration::from_secs(15), async {
        loop {
            for (url, _) in [&ctls[0], &ctls[2]] {
                if online(url, &op).await.iter().any(|a| a == "dev-2") {
                    return url.clone();
                }
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
    .unwrap_or_else(|_| panic!("dev-2 online on another controller within 15 s\n{}", dump()));
    eprintln!(
        "dev-2 online on {moved} {:?} after kill -9",
        killed.elapsed()
    );
    assert!(
        fleetcmd_cli::dev_cluster::online_agents(&ctls[1].0, &op)
            .await
            .is_none(),
        "the killed controller no longer answers"
    );
    assert_ran(&run_on(&moved, &op, &key, "dev-2").await, "dev-2");
    // The others were not disturbed.
    assert!(online(&ctls[0].0, &op).await.contains(&"dev-1".to_owned()));
    assert_ran(&run_on(&ctls[0].0, &op, &key, "dev-1").await, "dev-1");

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
    let pid3 = ctls[2].1;
    assert_eventually(Duration::from_secs(10), || async {
        (!Path::new(&format!("/proc/{pid3}")).exists()).then_some(())
    })
    .await;
}
