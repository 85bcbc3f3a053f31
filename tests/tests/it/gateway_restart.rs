//! The gateway remembers: the real `fleetcmd-gateway` binary, driven
//! through its console adapter (stdin/stdout of a separate process), is
//! `kill -9`ed mid-job and mid-approval and restarted on the same
//! `state_dir`. A result owed when it died is posted once after the
//! restart; a pending approval is approvable after it and then runs; one
//! that expired while the gateway was down is recorded expired and its
//! requester told; requests the policy no longer allows and damaged records
//! are dropped with the reason — and every approval request has exactly one
//! end in the audit trail.

use fleetcmd_proto::v1::JobState;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use fleetcmd_gateway::approvals::Approvals;
use fleetcmd_gateway::owed::OwedJobs;
use fleetcmd_gateway::store::{GatewayStore, Seal};
use fleetcmd_proto::v1 as pb;
use fleetcmd_tests::*;

/// One expected line or record.
const WAIT: Duration = Duration::from_secs(30);

/// What marks the end of an approval request in the audit trail: the
/// approval that made it enough, a denial, an expiry, or a drop.
fn is_end(kind: &str, detail: &str) -> bool {
    matches!(
        kind,
        "approval_denied" | "approval_expired" | "approval_dropped"
    ) || (kind == "approval_given" && detail == "enough approvals")
}

/// A `fleetcmd-gateway run` process: its stdin, and what it printed.
pub(crate) struct Gateway {
    child: Child,
    stdin: ChildStdin,
    out: Arc<Mutex<String>>,
    err: Arc<Mutex<String>>,
}

/// Copies a child's stream into `buf`, without ANSI colour codes.
fn collect(stream: impl std::io::Read + Send + 'static, buf: Arc<Mutex<String>>) {
    std::thread::spawn(move || {
        for line in BufReader::new(stream).lines() {
            let Ok(line) = line else { break };
            let mut plain = String::new();
            let mut chars = line.chars();
            while let Some(c) = chars.next() {
                if c == '\u{1b}' {
                    // ESC [ … final letter
                    for c in chars.by_ref() {
                        if c.is_ascii_alphabetic() {
                            break;
                        }
                    }
                } else {
                    plain.push(c);
                }
            }
            let mut b = buf.lock().unwrap_or_else(|p| p.into_inner());
            b.push_str(&plain);
            b.push('\n');
        }
    });
}

impl Gateway {
    /// Starts the gateway of `config` with the console user `user`.
    pub(crate) fn start(config: &Path, user: &str) -> Gateway {
        let mut child = Command::new(workspace_bin("fleetcmd-gateway"))
            .arg("-c")
            .arg(config)
            .arg("run")
            .env("USER", user)
            .env("RUST_LOG", "info")
            .env("NO_COLOR", "1")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("fleetcmd-gateway starts");
        let out = Arc::new(Mutex::new(String::new()));
        let err = Arc::new(Mutex::new(String::new()));
        collect(child.stdout.take().expect("stdout"), out.clone());
        collect(child.stderr.take().expect("stderr"), err.clone());
        let stdin = child.stdin.take().expect("stdin");
        Gateway {
            child,
            stdin,
            out,
            err,
        }
    }

    pub(crate) fn say(&mut self, line: &str) {
        writeln!(self.stdin, "{line}").expect("gateway reads stdin");
        self.stdin.flush().expect("flush stdin");
    }

    fn stdout(&self) -> String {
        self.out.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    pub(crate) fn stderr(&self) -> String {
        self.err.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Waits for a stdout line for which `pick` returns something.
    pub(crate) async fn line<T>(&self, what: &str, pick: impl Fn(&str) -> Option<T>) -> T {
        let start = Instant::now();
        loop {
            if let Some(v) = self.stdout().lines().find_map(&pick) {
                return v;
            }
            assert!(
                start.elapsed() < WAIT,
                "no {what} within {WAIT:?}; stdout:\n{}\nstderr:\n{}",
                self.stdout(),
                self.stderr()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Waits until the gateway logged `n` lines containing `needle`; the
    /// last of them.
    pub(crate) async fn logged(&self, needle: &str, n: usize) -> String {
        let start = Instant::now();
        loop {
            let log = self.stderr();
            let lines: Vec<&str> = log.lines().filter(|l| l.contains(needle)).collect();
            if lines.len() >= n {
                return lines[n - 1].to_string();
            }
            assert!(
                start.elapsed() < WAIT,
                "{n} × `{needle}` not logged within {WAIT:?}; stderr:\n{log}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// What the gateway resumed after its start.
    async fn resumed(&self) -> String {
        self.logged("gateway state: resuming", 1).await
    }

    pub(crate) fn pid(&self) -> u32 {
        self.child.id()
    }

    /// SIGKILL: no shutdown, nothing flushed that was not already.
    pub(crate) fn kill9(mut self) -> String {
        let _ = self.child.kill();
        let _ = self.child.wait();
        self.stdout()
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The top of a gateway.toml for `fleet`: the controller, the gateway's
/// certificate and signing key, the policy root, and `state_dir`.
pub(crate) fn gateway_toml_head(fleet: &TestFleet, state_dir: &Path) -> String {
    let dir = &fleet.dir;
    format!(
        r#"controller = "{url}"
ca = "{ca}"
cert = "{cert}"
key = "{key}"
signing_key = "{sign}"
signer_id = "{signer}"
policy_roots = ["{root}"]
state_dir = "{state}"
"#,
        url = fleet.url,
        ca = dir.join("ca.crt").display(),
        cert = dir.join("gateway.crt").display(),
        key = dir.join("gateway.key").display(),
        sign = dir.join("gateway-sign.key").display(),
        signer = fleetcmd_cli::fleet::GATEWAY_SIGNER,
        root = fleet.admin_key.public_key(),
        state = state_dir.display(),
    )
}

/// Writes a gateway.toml for `fleet` with the console enabled and its
/// state in `state_dir`; approval requests wait `approval_timeout`.
pub(crate) fn gateway_config(
    fleet: &TestFleet,
    state_dir: &Path,
    approval_timeout: &str,
) -> PathBuf {
    let text = format!(
        "{}approval_timeout = \"{approval_timeout}\"\n\n[console]\nenabled = true\n",
        gateway_toml_head(fleet, state_dir)
    );
    let path = fleet.path().join("gateway.toml");
    std::fs::write(&path, text).expect("gateway.toml written");
    path
}

/// The dev policy plus `reboot-demo`, which needs `approvals` approvals by
/// carol or bob.
async fn push_policy(fleet: &mut TestFleet, approvals: u32) {
    crate::approvals::push_reboot_demo_policy(fleet, approvals, &["console:carol", "console:bob"])
        .await;
}

/// alice asks for `reboot-demo` on a gateway that is then killed with
/// SIGKILL: the gateway.toml, the state dir and the id shown.
async fn asked_then_killed(
    fleet: &TestFleet,
    approval_timeout: &str,
) -> (PathBuf, PathBuf, String) {
    let state = fleet.path().join("gateway-state");
    let config = gateway_config(fleet, &state, approval_timeout);
    let mut asked = Gateway::start(&config, "alice");
    asked.say("run reboot-demo on all");
    let id = asked.line("the approval request", approve_id).await;
    asked.kill9();
    (config, state, id)
}

/// A seal with a key of its own: enough to read raw records and plant
/// damaged ones (what it writes, the gateway does not trust).
fn any_seal() -> Seal {
    Seal::new(Arc::new(stranger_key()))
}

/// The job id shown in a `job ID `COMMAND`` header line.
fn shown_id(line: &str, command: &str) -> Option<String> {
    let rest = line.split("job ").nth(1)?;
    let (id, after) = rest.split_once(' ')?;
    after
        .starts_with(&format!("`{command}`"))
        .then(|| id.to_string())
}

/// The id an approval request tells approvers to type.
fn approve_id(line: &str) -> Option<String> {
    let rest = line.split("`approve ").nth(1)?;
    rest.split('`').next().map(str::to_string)
}

/// Audit records about approvals of the job chat showed as `shown` (its
/// short id, or a prefix of its full id), as
/// (kind, detail).
async fn approval_records(fleet: &TestFleet, shown: &str) -> Vec<(String, String)> {
    let mut audit = pb::audit_client::AuditClient::new(fleet.operator().await);
    let records = audit
        .search(pb::AuditSearchRequest {
            kinds: [
                "approval_requested",
                "approval_given",
                "approval_denied",
                "approval_expired",
                "approval_dropped",
            ]
            .map(String::from)
            .to_vec(),
            limit: 200,
            ..Default::default()
        })
        .await
        .expect("audit search")
        .into_inner()
        .records;
    let mut out: Vec<(String, String)> = records
        .iter()
        .filter_map(|r| serde_json::from_str::<serde_json::Value>(r).ok())
        .filter(|v| {
            v["event"]["job_id"].as_str().is_some_and(|id| {
                fleetcmd_core::ids::short_form(id) == shown || id.starts_with(shown)
            })
        })
        .map(|v| {
            (
                v["event"]["kind"].as_str().unwrap_or_default().to_string(),
                v["event"]["detail"]
                    .as_str()
                    .unwrap_or_default()
                    .to_string(),
            )
        })
        .collect();
    out.reverse(); // oldest first
    out
}

/// Waits until the approval request `shown` has an end record, then
/// checks it has exactly one, of `kind`, and returns every record.
async fn one_end(fleet: &TestFleet, shown: &str, kind: &str) -> Vec<(String, String)> {
    let records = assert_eventually(WAIT, || async {
        let r = approval_records(fleet, shown).await;
        r.iter().any(|(k, d)| is_end(k, d)).then_some(r)
    })
    .await;
    let ends: Vec<_> = records.iter().filter(|(k, d)| is_end(k, d)).collect();
    assert_eq!(ends.len(), 1, "one end of {shown}: {records:?}");
    assert_eq!(ends[0].0, kind, "{records:?}");
    assert_eq!(
        records
            .iter()
            .filter(|(k, _)| k == "approval_requested")
            .count(),
        1,
        "{records:?}"
    );
    records
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_result_owed_when_the_gateway_was_killed_is_posted_once_after_a_restart() {
    let fleet = start_fleet(1).await;
    let state = fleet.path().join("gateway-state");
    let config = gateway_config(&fleet, &state, "15m");

    let mut first = Gateway::start(&config, "alice");
    first.say("run sleep 2 on all");
    let shown = first
        .line("the job's header", |l| shown_id(l, "sleep"))
        .await;
    let before = first.kill9();
    assert!(
        !before.contains("(1/1 ok)"),
        "killed before the result: {before}"
    );
    let job = fleet.wait_job(&shown).await;
    assert_eq!(job.job_state(), JobState::Succeeded, "{job:?}");

    let second = Gateway::start(&config, "alice");
    let resumed = second.resumed().await;
    assert!(resumed.contains("jobs=1"), "{resumed}");
    let result = second
        .line("the result", |l| {
            (l.contains(&format!("job {shown} ")) && l.contains("(1/1 ok)")).then(|| l.to_string())
        })
        .await;
    assert!(result.contains("console:alice"), "{result}");
    second.logged("nothing owed any more", 1).await;
    let after = second.kill9();

    // Posted: nothing is owed any more, so a third start posts nothing.
    let third = Gateway::start(&config, "alice");
    let resumed = third.resumed().await;
    assert!(
        resumed.contains("jobs=0") && resumed.contains("approvals=0"),
        "{resumed}"
    );
    let results = |s: &str| {
        s.lines()
            .filter(|l| l.contains(&format!("job {shown} ")) && l.contains("(1/1 ok)"))
            .count()
    };
    drop(third);
    assert_eq!(results(&before) + results(&after), 1, "{before}\n{after}");
    fleet.fleet.shutdown().await.expect("shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_approval_pending_when_the_gateway_was_killed_is_approved_after_a_restart_and_runs() {
    let mut fleet = start_fleet(1).await;
    push_policy(&mut fleet, 1).await;
    let (config, _, id) = asked_then_killed(&fleet, "15m").await;

    // carol's console, on the same state dir: the request is still there.
    let mut carol = Gateway::start(&config, "carol");
    carol
        .line("the request asked again", |l| {
            l.contains("still waiting: the gateway restarted")
                .then_some(())
        })
        .await;
    carol.say(&format!("approve {id}"));
    let result = carol
        .line("the approved job's result", |l| {
            (l.contains(&format!("job {id}")) && l.contains("(1/1 ok)")).then(|| l.to_string())
        })
        .await;
    assert!(result.contains("console:alice"), "{result}");
    let job = fleet.wait_job(&id).await;
    assert_eq!(job.requester, "console:alice");
    assert_eq!(job.job_state(), JobState::Succeeded, "{job:?}");
    let records = one_end(&fleet, &id, "approval_given").await;
    assert!(
        records
            .iter()
            .any(|(k, d)| k == "approval_given" && d == "enough approvals"),
        "{records:?}"
    );
    drop(carol);
    fleet.fleet.shutdown().await.expect("shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_approval_that_expired_while_the_gateway_was_down_is_recorded_expired_and_the_requester_told()
 {
    let mut fleet = start_fleet(1).await;
    push_policy(&mut fleet, 1).await;
    // The shortest window gateway.toml accepts.
    let window = Duration::from_secs(10);
    let (config, _, id) = asked_then_killed(&fleet, "10s").await;
    // Seen after the request was made, so no earlier than its expiry.
    let expires = Instant::now() + window;
    // The gateway stays down until the request's window has passed.
    tokio::time::sleep_until((expires + Duration::from_millis(500)).into()).await;

    let mut bob = Gateway::start(&config, "bob");
    let told = bob
        .line("the expiry", |l| {
            (l.contains("console:alice:") && l.contains(&id) && l.contains("expired"))
                .then(|| l.to_string())
        })
        .await;
    assert!(told.contains("nothing ran"), "{told}");
    one_end(&fleet, &id, "approval_expired").await;
    // Nothing is waiting any more.
    bob.say(&format!("approve {id}"));
    bob.line("the refusal", |l| {
        l.contains("no approval request is waiting").then_some(())
    })
    .await;
    let mut jobs = pb::jobs_client::JobsClient::new(fleet.operator().await);
    let found = jobs.get(pb::GetJobRequest { job_id: id.clone() }).await;
    assert!(found.is_err(), "nothing was submitted: {found:?}");
    drop(bob);
    fleet.fleet.shutdown().await.expect("shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn requests_the_policy_no_longer_allows_and_damaged_records_are_dropped_with_the_reason() {
    let mut fleet = start_fleet(1).await;
    push_policy(&mut fleet, 1).await;
    let (config, state, id) = asked_then_killed(&fleet, "15m").await;

    // While the gateway is down: the command stops needing approval, and
    // two records are damaged on disk.
    push_policy(&mut fleet, 0).await;
    const DAMAGED: &str = "0190aaaa-0000-7000-8000-000000000000";
    {
        let store = GatewayStore::open(&state).expect("state dir opens");
        let seal = any_seal();
        Approvals::persisted(&store, &seal)
            .expect("approvals")
            .records()
            .expect("persisted")
            .put_raw(DAMAGED, b"{\"v\": 1, \"job_id\": ")
            .expect("damaged approval written");
        OwedJobs::open(&store, &seal)
            .expect("owed")
            .records()
            .put_raw("0190bbbb-0000-7000-8000-000000000000", b"\xff\xfe")
            .expect("damaged owed job written");
    }

    let bob = Gateway::start(&config, "bob");
    let told = bob
        .line("the drop", |l| {
            (l.contains("console:alice:") && l.contains(&id) && l.contains("dropped"))
                .then(|| l.to_string())
        })
        .await;
    assert!(
        told.contains("no longer needs approval") && told.contains("nothing ran"),
        "{told}"
    );
    let records = one_end(&fleet, &id, "approval_dropped").await;
    assert!(
        records
            .iter()
            .any(|(k, d)| k == "approval_dropped" && d.contains("the policy changed")),
        "{records:?}"
    );
    let damaged = assert_eventually(WAIT, || async {
        let r = approval_records(&fleet, DAMAGED).await;
        (!r.is_empty()).then_some(r)
    })
    .await;
    assert_eq!(damaged.len(), 1, "{damaged:?}");
    assert_eq!(damaged[0].0, "approval_dropped");
    assert!(
        damaged[0].1.contains("unreadable approvals record"),
        "{damaged:?}"
    );
    let log = bob.stderr();
    assert!(
        log.contains("owed job result dropped: record unreadable")
            && log.contains("pending approval dropped: record unreadable"),
        "{log}"
    );
    // Removed once ended: the next start has nothing to resume.
    bob.logged(fleetcmd_gateway::resume::ENDED, 2).await;
    drop(bob);
    let again = Gateway::start(&config, "bob");
    let resumed = again.resumed().await;
    assert!(
        resumed.contains("jobs=0") && resumed.contains("approvals=0"),
        "{resumed}"
    );
    drop(again);
    fleet.fleet.shutdown().await.expect("shutdown");
}

/// Stored approvals are evidence the gateway attests after a restart: a
/// name added to a pending request while the gateway is down (by whoever
/// can write `state_dir` but does not hold the signing key) is never
/// attested; the request ends `approval_dropped`, nothing runs (found by an
/// outside test: the job ran "approved by" someone who never approved).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_approval_added_to_the_state_while_the_gateway_is_down_is_never_attested() {
    let mut fleet = start_fleet(1).await;
    push_policy(&mut fleet, 1).await;
    let (config, state, id) = asked_then_killed(&fleet, "15m").await;
    {
        let store = GatewayStore::open(&state).expect("state dir opens");
        let records = Approvals::persisted(&store, &any_seal()).expect("approvals");
        let records = records.records().expect("persisted");
        // Every record reads as unreadable under another seal: its key is
        // all that is needed.
        let key = records
            .all()
            .expect("records")
            .into_iter()
            .filter_map(Result::err)
            .map(|u| u.key)
            .find(|k| k.ends_with(&id))
            .expect("the pending request's record");
        let raw = records.get_raw(&key).expect("read").expect("stored");
        let text = String::from_utf8(raw).expect("json");
        let forged = text.replacen(
            "\\\"approvals\\\":[]",
            &format!(
                "\\\"approvals\\\":[{{\\\"approver\\\":\\\"console:bob\\\",\\\"channel\\\":\\\"console\\\",\\\"approved_at\\\":{}}}]",
                now()
            ),
            1,
        );
        assert_ne!(forged, text, "the record lists no approval yet: {text}");
        records.put_raw(&key, forged.as_bytes()).expect("forged");
    }
    let bob = Gateway::start(&config, "bob");
    let records = one_end(&fleet, &id, "approval_dropped").await;
    assert!(
        records
            .iter()
            .any(|(k, d)| k == "approval_dropped" && d.contains("seal does not verify")),
        "{records:?}"
    );
    assert!(
        !records.iter().any(|(k, _)| k == "approval_given"),
        "{records:?}"
    );
    let mut jobs = pb::jobs_client::JobsClient::new(fleet.operator().await);
    let found = jobs.get(pb::GetJobRequest { job_id: id.clone() }).await;
    assert!(found.is_err(), "nothing was submitted: {found:?}");
    drop(bob);
    fleet.fleet.shutdown().await.expect("shutdown");
}

/// `validate`, the documented pre-flight check, refuses the `state_dir`
/// that `run` would refuse; and a store that cannot be read stops the
/// gateway with what to do, not sled's bare text.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn validate_checks_the_state_dir_and_a_broken_store_says_how_to_recover() {
    use std::os::unix::fs::PermissionsExt as _;
    let fleet = start_fleet(1).await;
    let state = fleet.path().join("gateway-state");
    let config = gateway_config(&fleet, &state, "15m");
    let validate = || {
        Command::new(workspace_bin("fleetcmd-gateway"))
            .arg("-c")
            .arg(&config)
            .arg("validate")
            .output()
            .expect("validate runs")
    };
    assert!(
        validate().status.success(),
        "a missing state_dir is created at start"
    );
    std::fs::create_dir(&state).expect("state dir");
    std::fs::set_permissions(&state, std::fs::Permissions::from_mode(0o777)).expect("chmod");
    let out = validate();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(err.contains("writable by group or others"), "{err}");
    std::fs::set_permissions(&state, std::fs::Permissions::from_mode(0o700)).expect("chmod");
    assert!(validate().status.success());

    // A store whose files were damaged.
    {
        let store = GatewayStore::open(&state).expect("store created");
        let records = OwedJobs::open(&store, &any_seal()).expect("owed");
        for i in 0..50 {
            records
                .records()
                .put_raw(&format!("k{i}"), &[b'x'; 200])
                .expect("written");
        }
    }
    let mode = std::fs::metadata(state.join("state.sled"))
        .expect("store dir")
        .permissions()
        .mode();
    assert_eq!(mode & 0o077, 0, "the store is private: {mode:o}");
    let conf = state.join("state.sled").join("conf");
    std::fs::write(&conf, b"segment_size: 1\nnot sled's configuration\n").expect("damaged");
    let out = Command::new(workspace_bin("fleetcmd-gateway"))
        .arg("-c")
        .arg(&config)
        .arg("run")
        .stdin(Stdio::null())
        .output()
        .expect("run");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(
        err.contains("cannot be read") && err.contains("move it aside"),
        "{err}"
    );
    fleet.fleet.shutdown().await.expect("shutdown");
}
