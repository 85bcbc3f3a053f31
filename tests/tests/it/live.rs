//! Live output: chunks stream to watchers while the command
//! runs, and a watcher that stops reading stalls nobody.

use fleetcmd_proto::v1::JobState;
use std::time::{Duration, Instant};

use fleetcmd_proto::v1 as pb;
use fleetcmd_tests::*;
use pb::job_event::Event;

use crate::support::*;

pub(crate) const EXTRA: &str = r#"
[commands.ticks]
description = "Three lines, 300 ms apart"
argv = ["/bin/sh", "-c", "for i in 1 2 3; do echo tick $i; sleep 0.3; done"]
timeout = "10s"
"#;

async fn live_fleet(agents: usize) -> TestFleet {
    let mut fleet = start_fleet(agents).await;
    let text = format!("{}{}", security_policy(&fleet, 2), EXTRA);
    fleet.push_policy(&text).await.expect("policy");
    fleet
        .wait_online(Duration::from_secs(10))
        .await
        .expect("online");
    fleet
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn output_arrives_while_the_command_runs() {
    let fleet = live_fleet(2).await;
    let (_, job) = fleet.operator_job("ticks", &[], "all");
    let mut c = pb::jobs_client::JobsClient::new(fleet.operator().await);
    let id = c
        .submit(to_pb(job))
        .await
        .expect("submit")
        .into_inner()
        .job_id;
    let started = Instant::now();
    let mut stream = c
        .watch(pb::WatchJobRequest { job_id: id.clone() })
        .await
        .expect("watch")
        .into_inner();
    let mut first_tick = None;
    let mut ticks: Vec<(String, u64, String)> = Vec::new();
    let mut ended = None;
    while let Some(ev) = stream.message().await.expect("event") {
        match ev.event {
            Some(Event::Chunk(c)) => {
                first_tick.get_or_insert(started.elapsed());
                ticks.push((
                    c.agent_id,
                    c.seq,
                    String::from_utf8_lossy(&c.data).into_owned(),
                ));
            }
            Some(Event::Job(j)) if j.job_state() != JobState::Running => {
                ended = Some((j, started.elapsed()))
            }
            _ => {}
        }
    }
    let (job, at_end) = ended.expect("the stream ends with the finished job");
    assert_eq!(job.job_state(), JobState::Succeeded, "{job:?}");
    let first = first_tick.expect("chunks arrived");
    assert!(
        first + Duration::from_millis(400) < at_end,
        "first output {first:?} came well before the end {at_end:?}"
    );
    for agent in ["dev-1", "dev-2"] {
        let mine: Vec<_> = ticks.iter().filter(|(a, _, _)| a == agent).collect();
        let text: String = mine.iter().map(|(_, _, t)| t.as_str()).collect();
        assert_eq!(text, "tick 1\ntick 2\ntick 3\n", "{agent}: {mine:?}");
        let seqs: Vec<u64> = mine.iter().map(|(_, s, _)| *s).collect();
        assert_eq!(
            seqs,
            (1..=seqs.len() as u64).collect::<Vec<_>>(),
            "numbered from 1 without gaps"
        );
    }
    fleet.fleet.shutdown().await.expect("shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_watcher_that_stops_reading_stalls_no_one() {
    let fleet = live_fleet(2).await;
    let (_, job) = fleet.operator_job("flood", &[], "all");
    let mut c = pb::jobs_client::JobsClient::new(fleet.operator().await);
    let id = c
        .submit(to_pb(job))
        .await
        .expect("submit")
        .into_inner()
        .job_id;
    // One watcher reads nothing at all.
    let stuck = c
        .watch(pb::WatchJobRequest { job_id: id.clone() })
        .await
        .expect("watch")
        .into_inner();
    // Another reads everything and sees the job end.
    let mut c2 = pb::jobs_client::JobsClient::new(fleet.operator().await);
    let mut reader = c2
        .watch(pb::WatchJobRequest { job_id: id.clone() })
        .await
        .expect("watch")
        .into_inner();
    let done = tokio::time::timeout(Duration::from_secs(30), async {
        let mut missed = 0;
        while let Some(ev) = reader.message().await.expect("event") {
            match ev.event {
                Some(Event::Missed(n)) => missed += n,
                Some(Event::Job(j)) if j.job_state() != JobState::Running => return (j, missed),
                _ => {}
            }
        }
        panic!("stream ended without the final job")
    })
    .await
    .expect("the reading watcher is not held up by the stuck one");
    assert_eq!(
        done.0.job_state(),
        JobState::Succeeded,
        "{:?}",
        done.0.state
    );
    eprintln!(
        "flood job seen finished by the reading watcher; missed {} events",
        done.1
    );
    // Agents and the controller carry on: the next job runs normally.
    let next = fleet
        .run("echo", &[("text", "after")], "all")
        .await
        .expect("job");
    assert_eq!(next.job_state(), JobState::Succeeded);
    drop(stuck);
    fleet.fleet.shutdown().await.expect("shutdown");
}
