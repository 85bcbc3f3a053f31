//! Short job ids: what chat and the CLI show (the last 12 hex digits of the
//! UUIDv7, its random tail) names exactly one job, the controller keeps it
//! that way at submit, and every lookup takes it.

use fleetcmd_core::ids::JobId;
use fleetcmd_core::job::SignedJob;
use fleetcmd_proto::v1 as pb;
use fleetcmd_tests::*;

use crate::support::Cli;

/// A fresh v7 id with its last six bytes (the short id) replaced.
fn with_tail(base: &JobId, tail: [u8; 6]) -> JobId {
    let hex = base.as_str().replace('-', "");
    let mut b = [0u8; 16];
    for (i, byte) in b.iter_mut().enumerate() {
        *byte = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).expect("hex");
    }
    b[10..].copy_from_slice(&tail);
    JobId::from_uuid_v7_bytes(b).expect("still a v7 id")
}

/// `echo TEXT` on every agent as the operator, as job `id`.
fn echo_job(fleet: &TestFleet, id: &JobId, text: &str) -> SignedJob {
    let mut spec = spec("echo", &[("text", text)], "all", "cli:admin");
    spec.id = id.clone();
    SignedJob::sign(
        &spec,
        fleetcmd_cli::fleet::OPERATOR_SIGNER,
        &fleet.operator_key,
    )
}

async fn submit(fleet: &TestFleet, job: SignedJob) -> Result<pb::SubmitResponse, tonic::Status> {
    let mut c = pb::jobs_client::JobsClient::new(fleet.operator().await);
    c.submit(to_pb(job)).await.map(|r| r.into_inner())
}

async fn get(fleet: &TestFleet, id: &str) -> Result<pb::Job, tonic::Status> {
    let mut c = pb::jobs_client::JobsClient::new(fleet.operator().await);
    c.get(pb::GetJobRequest {
        job_id: id.to_owned(),
    })
    .await
    .map(|r| r.into_inner())
}

fn text(out: &std::process::Output) -> String {
    format!(
        "status {:?}\nstdout:\n{}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Two jobs whose ids end alike (different moments, same random tail): the
/// second is refused at submit as ABORTED, naming the clash, and nothing of
/// it is stored; the short id still names the first.
#[tokio::test]
async fn a_job_whose_short_id_is_taken_is_refused_at_submit() {
    let fleet = start_fleet(1).await;
    let tail = [0x5e, 0xed, 0x00, 0xc0, 0xff, 0xee];
    let first = with_tail(&new_job_id(), tail);
    submit(&fleet, echo_job(&fleet, &first, "one"))
        .await
        .expect("first job accepted");
    let second = with_tail(&new_job_id(), tail);
    assert_ne!(first, second);
    assert_eq!(first.short(), second.short());

    let refused = submit(&fleet, echo_job(&fleet, &second, "two"))
        .await
        .expect_err("a taken short id is refused");
    assert_eq!(refused.code(), tonic::Code::Aborted, "{refused:?}");
    let why = refused.message();
    assert!(
        why.contains(second.as_str())
            && why.contains("short id 5eed00c0ffee already names another job")
            && why.contains("submit it again with a new job id"),
        "{why}"
    );
    // The other job is not named: the submitter may not be allowed to see it.
    assert!(!why.contains(first.as_str()), "{why}");

    let named = get(&fleet, "5eed00c0ffee")
        .await
        .expect("short id resolves");
    assert_eq!(named.job_id, first.as_str());
    let missing = get(&fleet, second.as_str()).await.expect_err("not stored");
    assert_eq!(missing.code(), tonic::Code::NotFound, "{missing:?}");
    // Submitting the first again is a replay, not a short id clash.
    let replay = submit(&fleet, echo_job(&fleet, &first, "one"))
        .await
        .expect_err("replay refused");
    assert_eq!(replay.code(), tonic::Code::AlreadyExists, "{replay:?}");
    fleet.fleet.shutdown().await.expect("shutdown");
}

/// Two jobs submitted in the same millisecond: their ids share the first 24
/// characters (what chat used to show was 18 of them), yet `fleetcmd jobs`
/// shows two different short ids, and the real `fleetcmd` binary finds each
/// job by its own (`job`, `job output`, `audit search --job`, `cancel` of
/// an ended job). What both ids start with is refused as ambiguous.
#[tokio::test]
async fn jobs_of_one_millisecond_have_distinct_short_ids_that_the_cli_resolves() {
    let fleet = start_fleet(1).await;
    let base = new_job_id();
    let a = with_tail(&base, [0xa1, 0xa1, 0xa1, 0xa1, 0xa1, 0xa1]);
    let b = with_tail(&base, [0xb2, 0xb2, 0xb2, 0xb2, 0xb2, 0xb2]);
    assert_eq!(a.unix_ms(), b.unix_ms());
    assert_eq!(a.as_str()[..24], b.as_str()[..24]);
    let (sa, sb) = (a.short().to_string(), b.short().to_string());
    assert_ne!(sa, sb);
    let (ja, jb) = (
        echo_job(&fleet, &a, "from-a"),
        echo_job(&fleet, &b, "from-b"),
    );
    let (ra, rb) = tokio::join!(submit(&fleet, ja), submit(&fleet, jb));
    ra.expect("a accepted");
    rb.expect("b accepted");
    fleet.wait_job(a.as_str()).await;
    fleet.wait_job(b.as_str()).await;

    let cli = Cli::new(&fleet);
    let jobs = cli.run(&["jobs"]).await;
    let listing = text(&jobs);
    assert!(jobs.status.success(), "{listing}");
    let rows: Vec<String> = String::from_utf8_lossy(&jobs.stdout)
        .lines()
        .map(|l| l.split_whitespace().next().unwrap_or("").to_owned())
        .collect();
    assert_eq!(rows.first().map(String::as_str), Some("JOB"), "{listing}");
    assert!(rows.contains(&sa) && rows.contains(&sb), "{listing}");
    // The short ids are the whole id column: no full id is shown.
    assert!(
        !listing.contains(a.as_str()) && !listing.contains(b.as_str()),
        "{listing}"
    );

    for (short, mine, other) in [(&sa, "from-a", "from-b"), (&sb, "from-b", "from-a")] {
        let shown = cli.run(&["job", short]).await;
        let t = text(&shown);
        assert!(shown.status.success(), "{t}");
        assert!(
            t.contains(&format!("job {short} `echo` on all: succeeded")),
            "{t}"
        );
        assert!(t.contains(mine) && !t.contains(other), "{t}");

        let output = cli.run(&["job", "output", short]).await;
        let t = text(&output);
        assert!(output.status.success(), "{t}");
        assert!(t.contains(mine) && !t.contains(other), "{t}");

        let audit = cli.run(&["audit", "search", "--job", short]).await;
        let t = text(&audit);
        assert!(audit.status.success(), "{t}");
        assert!(t.contains(&format!("job={short}")), "{t}");
        let foreign = if short == &sa { &sb } else { &sa };
        assert!(!t.contains(foreign.as_str()), "{t}");

        let cancel = cli.run(&["cancel", short]).await;
        let t = text(&cancel);
        assert!(!cancel.status.success(), "{t}");
        assert!(t.contains("already ended"), "{t}");
    }

    // Upper case, as people sometimes type it, is the same id.
    let upper = cli.run(&["job", &sa.to_uppercase()]).await;
    assert!(upper.status.success(), "{}", text(&upper));

    // What both ids start with names neither.
    let shared = &a.as_str()[..18];
    let ambiguous = cli.run(&["job", shared]).await;
    let t = text(&ambiguous);
    assert!(!ambiguous.status.success(), "{t}");
    assert!(
        t.contains("several jobs") && t.contains("12-digit short id"),
        "{t}"
    );
    // Part of a short id is neither a short id nor the start of a full id.
    let partial = cli.run(&["job", &sa[3..]]).await;
    let t = text(&partial);
    assert!(!partial.status.success(), "{t}");
    assert!(t.contains("neither a short id"), "{t}");
    // The first 8 digits of a short id read as the start of a full id (as
    // an old README taught): the refusal says which end is which.
    let start_of_short = cli.run(&["job", &sa[..8]]).await;
    let t = text(&start_of_short);
    assert!(!start_of_short.status.success(), "{t}");
    assert!(
        t.contains("start of the full id") && t.contains("last 12 hex digits"),
        "{t}"
    );
    fleet.fleet.shutdown().await.expect("shutdown");
}

/// The CLI's submit: when the controller says the short id is taken it
/// signs the same job again with the next id, and stops at the first
/// other refusal.
#[tokio::test]
async fn the_cli_signs_again_with_a_new_id_when_the_short_id_is_taken() {
    let fleet = start_fleet(1).await;
    let tail = [0x7a, 0x4e, 0x00, 0x00, 0x00, 0x01];
    let held = with_tail(&new_job_id(), tail);
    submit(&fleet, echo_job(&fleet, &held, "held"))
        .await
        .expect("held accepted");
    let clash = with_tail(&new_job_id(), tail);
    let fresh = new_job_id();
    let mut jobs = pb::jobs_client::JobsClient::new(fleet.operator().await);
    let signed = std::sync::Mutex::new(Vec::new());
    let sub = fleetcmd_cli::client::submit_fresh(&mut jobs, [clash.clone(), fresh.clone()], |id| {
        signed.lock().expect("lock").push(id.clone());
        Ok(echo_job(&fleet, &id, "again"))
    })
    .await
    .unwrap_or_else(|f| panic!("{:#}", f.error));
    assert_eq!(sub.job_id, fresh.as_str());
    assert_eq!(*signed.lock().expect("lock"), [clash, fresh.clone()]);
    assert_eq!(
        get(&fleet, held.short().as_str())
            .await
            .expect("held")
            .job_id,
        held.as_str()
    );

    // Every id taken: the last refusal is returned, after SHORT_ID_ATTEMPTS.
    let taken: Vec<JobId> = (0..5).map(|_| with_tail(&new_job_id(), tail)).collect();
    let tried = std::sync::atomic::AtomicUsize::new(0);
    let err = fleetcmd_cli::client::submit_fresh(&mut jobs, taken, |id| {
        tried.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        Ok(echo_job(&fleet, &id, "again"))
    })
    .await
    .expect_err("every short id taken");
    assert_eq!(
        tried.load(std::sync::atomic::Ordering::SeqCst),
        fleetcmd_core::ids::SHORT_ID_ATTEMPTS
    );
    assert!(format!("{:#}", err.error).contains("already names another job"));

    // A replay is never retried with another id: the job may be stored.
    let tried = std::sync::atomic::AtomicUsize::new(0);
    let err = fleetcmd_cli::client::submit_fresh(&mut jobs, [fresh.clone(), new_job_id()], |id| {
        tried.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        Ok(echo_job(&fleet, &id, "again"))
    })
    .await
    .expect_err("replay");
    assert_eq!(tried.load(std::sync::atomic::Ordering::SeqCst), 1);
    assert!(
        format!("{:#}", err.error).contains("already submitted"),
        "{:#}",
        err.error
    );
    fleet.fleet.shutdown().await.expect("shutdown");
}
