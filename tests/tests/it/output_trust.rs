//! What agents send is data, and only counts where it belongs: live output
//! and results are taken only from the agents a job was dispatched to; an
//! agent's `Hello` is checked and bounded before the controller keeps any
//! of it; and the `fleetcmd` binary escapes what the fleet sends before it
//! reaches a terminal (`--raw` passes bytes through, to pipes only).

use fleetcmd_proto::v1::{JobState, TargetState};
use std::time::Duration;

use fleetcmd_core::grammar::Limit;
use fleetcmd_core::job::Rollout;
use fleetcmd_proto::v1 as pb;
use fleetcmd_tests::*;
use pb::agent_message::Msg;
use pb::job_event::Event;

use crate::support::*;

fn hello(version: &str) -> pb::Hello {
    pb::Hello {
        version: version.into(),
        ..Default::default()
    }
}

fn forged_result(job_id: &str, agent: &str) -> Msg {
    Msg::Result(pb::JobResult {
        job_id: job_id.into(),
        outcome: pb::Outcome::Ok as i32,
        exit_code: Some(0),
        stdout: format!("forged by {agent}\n").into_bytes(),
        ..Default::default()
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_agent_that_is_not_a_target_cannot_write_into_a_jobs_output() {
    let fleet = security_fleet(2).await;
    // A job on dev-2 alone, watched by an operator.
    let (s, job) = fleet.operator_job("sleep", &[("seconds", "3")], "name=dev-2");
    let id = s.id.to_string();
    let mut c = pb::jobs_client::JobsClient::new(fleet.operator().await);
    c.submit(to_pb(job)).await.expect("submit");
    let mut watch = c
        .watch(pb::WatchJobRequest { job_id: id.clone() })
        .await
        .expect("watch")
        .into_inner();

    // dev-1 (a real, enrolled agent, but no target of this job) sends
    // output lines and a result for it, then a result for a job that does
    // not exist; the acknowledgement of the last one shows the controller
    // handled everything before it.
    let mut rogue = fleet.raw_agent("dev-1", hello("rogue")).await;
    rogue
        .send(Msg::Chunk(pb::OutputChunk {
            job_id: id.clone(),
            stream: 1,
            seq: 1,
            data: b"all good, nothing to see\n".to_vec(),
            agent_id: "dev-2".into(),
        }))
        .await;
    rogue.send(forged_result(&id, "dev-1")).await;
    let marker = new_job_id().to_string();
    rogue.send(forged_result(&marker, "dev-1")).await;
    rogue.acked(&marker).await;
    let now = fleet.controller.shared().get_job(&id).expect("job");
    assert_eq!(
        now.job_state(),
        JobState::Running,
        "the forgeries must arrive while the job runs, or the test shows nothing"
    );

    let mut chunks = Vec::new();
    let end = tokio::time::timeout(Duration::from_secs(30), async {
        while let Some(ev) = watch.message().await.expect("watch stream") {
            match ev.event {
                Some(Event::Chunk(c)) => chunks.push(c),
                Some(Event::Job(j)) if j.job_state() != JobState::Running => return j,
                _ => {}
            }
        }
        panic!("the watch ended before the job")
    })
    .await
    .expect("the job ends");
    assert!(
        chunks.is_empty(),
        "forged live output reached the watcher: {chunks:?}"
    );
    let targets: Vec<&str> = end.targets.iter().map(|t| t.agent_id.as_str()).collect();
    assert_eq!(targets, ["dev-2"], "{end:?}");
    assert_eq!(end.job_state(), JobState::Succeeded, "{end:?}");
    assert!(!stdout(target(&end, "dev-2")).contains("forged"), "{end:?}");
    assert!(fleet.controller.shared().get_job(&marker).is_err());
    fleet.fleet.shutdown().await.expect("shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_result_for_a_target_not_yet_dispatched_is_not_recorded() {
    let fleet = security_fleet(2).await;
    // One host at a time: dev-1 sleeps while dev-2 waits its turn.
    let (mut s, _) = fleet.operator_job("sleep", &[("seconds", "3")], "all");
    s.rollout = Rollout {
        batch: Some(Limit::Count(1)),
        ..Default::default()
    };
    let id = s.id.to_string();
    let mut c = pb::jobs_client::JobsClient::new(fleet.operator().await);
    c.submit(to_pb(sign_op(&fleet, &s))).await.expect("submit");
    // The dispatcher starts the first host off the request path.
    let shared = fleet.controller.shared().clone();
    let (first, waiting) = assert_eventually(Duration::from_secs(10), || {
        let job = shared.get_job(&id).ok();
        async move {
            let job = job?;
            let (pending, started): (Vec<&pb::Target>, Vec<&pb::Target>) = job
                .targets
                .iter()
                .partition(|t| t.target_state() == TargetState::Pending);
            (started.len() == 1 && pending.len() == 1)
                .then(|| (started[0].agent_id.clone(), pending[0].agent_id.clone()))
        }
    })
    .await;

    // The waiting host reports success before it was ever sent the job.
    let mut rogue = fleet.raw_agent(&waiting, hello("rogue")).await;
    rogue.send(forged_result(&id, &waiting)).await;
    rogue.acked(&id).await;
    let now = fleet.controller.shared().get_job(&id).expect("job");
    assert_eq!(now.job_state(), JobState::Running, "{now:?}");
    let t = target(&now, &waiting);
    assert_eq!(
        t.target_state(),
        TargetState::Pending,
        "a forged result was recorded: {t:?}"
    );
    assert!(t.result.is_none(), "{t:?}");

    // When its turn comes the target ends on what its real agent does (or
    // `offline` if the real agent is still reconnecting after the rogue
    // took its stream), never on the forgery.
    drop(rogue);
    let end = fleet.wait_job(&id).await;
    assert!(
        !stdout(target(&end, &waiting)).contains("forged"),
        "{end:?}"
    );
    assert_eq!(
        target(&end, &first).target_state(),
        TargetState::Ok,
        "{end:?}"
    );
    fleet.fleet.shutdown().await.expect("shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn oversized_and_hostile_hellos_are_refused() {
    let fleet = start_fleet(1).await;
    let huge = "9".repeat(5 * 1024 * 1024);
    let many: std::collections::HashMap<String, String> = (0..40_000)
        .map(|i| (format!("fact-{i}"), "x".repeat(60)))
        .collect();
    let cases = [
        ("a 5 MB version", hello(&huge)),
        (
            "3 MB of facts",
            pb::Hello {
                facts: many,
                ..hello("1.0")
            },
        ),
        (
            "a version that clears the screen",
            hello("1.0\x1b[2J\x1b[H"),
        ),
        (
            "a host name with a bidi override",
            pb::Hello {
                hostname: "web\u{202e}1".into(),
                ..hello("1.0")
            },
        ),
        (
            "a fact with an OSC sequence",
            pb::Hello {
                facts: [("os".to_string(), "x\x1b]0;pwned\x07".to_string())].into(),
                ..hello("1.0")
            },
        ),
        (
            "a forged allow list",
            pb::Hello {
                allow: vec!["rm -rf /".into()],
                ..hello("1.0")
            },
        ),
    ];
    for (what, h) in cases {
        let mut rogue = fleet.raw_agent("dev-1", h).await;
        // Refused either at once or as the first thing on the stream.
        let refused = match &mut rogue.inbound {
            Err(s) => s.clone(),
            Ok(stream) => match stream.message().await {
                Err(s) => s,
                Ok(m) => panic!("{what}: accepted: {m:?}"),
            },
        };
        assert!(
            matches!(
                refused.code(),
                tonic::Code::InvalidArgument
                    | tonic::Code::OutOfRange
                    | tonic::Code::ResourceExhausted
            ),
            "{what}: {refused:?}"
        );
        let a = agent_info(&fleet, "dev-1");
        assert!(
            !a.version.contains("1.0\x1b") && a.version.len() < 100,
            "{what}: {a:?}"
        );
        assert!(
            a.facts.keys().all(|k| !k.starts_with("fact-")),
            "{what}: {a:?}"
        );
    }
    // The reason names the field.
    let rogue = fleet.raw_agent("dev-1", hello("1.0\x1b[2J")).await;
    let reason = match rogue.inbound {
        Err(s) => s.message().to_owned(),
        Ok(mut s) => s.message().await.expect_err("refused").message().to_owned(),
    };
    assert!(reason.contains("hello version"), "{reason}");
    fleet.fleet.shutdown().await.expect("shutdown");
}

const HOSTILE_OUTPUT: &str = r#"
[commands.hostile]
description = "Output that tries to drive the terminal"
argv = ["/usr/bin/printf", 'fine\033]0;pwned\007\033]52;c;cHduZWQ=\007\033[2J\033[1A\rdev-9: spoofed\302\233H \342\200\256desrever\n']
timeout = "10s"
"#;

fn assert_inert(what: &str, bytes: &[u8]) {
    let text = String::from_utf8_lossy(bytes);
    for (bad, name) in [
        (&b"\x1b"[..], "ESC"),
        (b"\x07", "BEL"),
        (b"\r", "CR"),
        (b"\xc2\x9b", "C1 CSI"),
        (b"\xe2\x80\xae", "RLO"),
    ] {
        assert!(
            !bytes.windows(bad.len()).any(|w| w == bad),
            "{what}: raw {name} in {text:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_cli_escapes_what_the_fleet_sends_and_passes_it_raw_only_to_a_pipe() {
    let mut fleet = start_fleet(1).await;
    let text = format!(
        "{}{HOSTILE_OUTPUT}",
        security_policy(&fleet, fleet.policy_version + 1)
    );
    fleet.push_policy(&text).await.expect("policy");
    fleet
        .wait_online(Duration::from_secs(10))
        .await
        .expect("online");
    let cli = Cli::new(&fleet);

    let run = cli.run(&["run", "hostile", "--on", "all"]).await;
    assert!(run.status.success(), "{run:?}");
    assert_inert("fleetcmd run", &run.stdout);
    assert_inert("fleetcmd run (stderr)", &run.stderr);
    let shown = String::from_utf8_lossy(&run.stdout);
    assert!(
        shown.contains(r"dev-1: fine\x1b]0;pwned\x07\x1b]52;c;cHduZWQ=\x07\x1b[2J\x1b[1A\rdev-9: spoofed\x9bH \u{202e}desrever"),
        "{shown}"
    );
    let stderr = String::from_utf8_lossy(&run.stderr);
    let id = stderr
        .split_whitespace()
        .nth(1)
        .expect("`job ID on N agent(s)` on stderr")
        .to_owned();

    for args in [
        vec!["job", "output", id.as_str()],
        vec!["job", id.as_str()],
        vec!["jobs"],
        vec!["agents"],
        vec!["audit", "search", "--job", id.as_str()],
        vec!["audit", "search", "--json", "--job", id.as_str()],
    ] {
        let out = cli.run(&args).await;
        assert!(out.status.success(), "{args:?}: {out:?}");
        assert_inert(&format!("fleetcmd {args:?}"), &out.stdout);
        assert_inert(&format!("fleetcmd {args:?} (stderr)"), &out.stderr);
    }

    // --raw to a pipe: the bytes as the command wrote them.
    let raw = cli.run(&["--raw", "job", "output", &id, "dev-1"]).await;
    assert!(raw.status.success(), "{raw:?}");
    let want: &[u8] =
        b"fine\x1b]0;pwned\x07\x1b]52;c;cHduZWQ=\x07\x1b[2J\x1b[1A\rdev-9: spoofed\xc2\x9bH \xe2\x80\xaedesrever\n";
    assert_eq!(raw.stdout, want, "{}", String::from_utf8_lossy(&raw.stdout));
    fleet.fleet.shutdown().await.expect("shutdown");
}

/// Heartbeats are bounded like the hello: a check summary of megabytes (it
/// became service records no audit search, export or listing could carry)
/// or a check name that draws a fake table row closes the rogue's stream,
/// and nothing of it is kept. A plain heartbeat on the same terms is kept.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn oversized_and_hostile_heartbeats_close_the_stream_and_keep_nothing() {
    let fleet = security_fleet(2).await;
    let beat = |name: &str, summary: String| {
        Msg::Heartbeat(pb::Heartbeat {
            checks: vec![pb::CheckResult {
                name: name.into(),
                kind: "nagios".into(),
                state: pb::CheckState::Critical as i32,
                summary,
                ..Default::default()
            }],
            ..Default::default()
        })
    };
    let huge = "S".repeat(2_200_000);
    let fake_row = format!(
        "zz:OK              0.1.0      env=prod,role=db{}",
        " ".repeat(90)
    );
    for (what, msg) in [
        ("a 2.2 MB summary", beat("disk", huge)),
        ("a name drawing a table row", beat(&fake_row, "ok".into())),
    ] {
        let mut rogue = fleet.raw_agent("dev-1", hello("1.0")).await;
        rogue.send(msg).await;
        let inbound = rogue.inbound.as_mut().expect("hello accepted");
        let ended = tokio::time::timeout(Duration::from_secs(20), async {
            loop {
                match inbound.message().await {
                    Ok(Some(_)) => continue,
                    Ok(None) => return "closed".to_string(),
                    Err(s) => return s.to_string(),
                }
            }
        })
        .await;
        assert!(ended.is_ok(), "{what}: the stream stayed open");
        let a = agent_info(&fleet, "dev-1");
        assert!(
            a.checks
                .iter()
                .all(|c| c.summary.len() <= 1024 && !c.name.contains("role=db")),
            "{what}: kept {:?}",
            a.checks
                .iter()
                .map(|c| (&c.name, c.summary.len()))
                .collect::<Vec<_>>()
        );
    }
    // Control: a plain heartbeat is kept.
    let rogue = fleet.raw_agent("dev-1", hello("1.0")).await;
    rogue
        .send(beat("disk", "DISK CRITICAL - 99% used".into()))
        .await;
    assert_eventually(Duration::from_secs(10), || async {
        agent_info(&fleet, "dev-1")
            .checks
            .iter()
            .any(|c| c.summary == "DISK CRITICAL - 99% used")
            .then_some(())
    })
    .await;
    drop(rogue);
    fleet.fleet.shutdown().await.expect("shutdown");
}
