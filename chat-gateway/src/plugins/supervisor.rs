//! One plugin process, supervised: started on first use, `initialize`d,
//! called one command at a time, killed when a call times out or it breaks
//! the protocol, and started again after a crash only once its backoff has
//! passed (about 1 s, doubled per crash in a row, at most 60 s by default,
//! ±20 % as every reconnect in the gateway: [`crate::backoff`]). While it is
//! down, a call fails at once with "plugin NAME is not available".
//!
//! The call timeout bounds the plugin's own work: while the gateway serves
//! its `job.run` (waiting for approvals, following the job), the clock
//! stops; that wait is bounded by the approval window and the job's own
//! timeout. Every refused request and every protocol break is reported to
//! the [`JobRunner`] of the call, which audits it with the caller.

use std::time::Duration;

use serde_json::Value;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::process::{Child, ChildStdin, ChildStdout};
use tokio::sync::Mutex;
use tokio::time::Instant;

use super::config::PluginSpec;
use super::process;
use super::protocol::{
    self, Caller, CommandParams, CommandResult, InitializeParams, InitializeResult, JobRunParams,
    JobRunResult, Message, PROTOCOL_VERSION, Request, Response,
};
use crate::adapters::BoxFuture;
use crate::backoff::{Backoff, Jitter};

/// How long a plugin that broke off is waited for, to report its exit status.
const EXIT_GRACE: Duration = Duration::from_millis(500);

/// Submits a job on behalf of the caller of the command being answered;
/// `Err` when the request itself is malformed (nothing was posted).
pub trait JobRunner: Send + Sync {
    fn run_as_caller(&self, req: JobRunParams) -> BoxFuture<'_, Result<JobRunResult, String>>;
    /// Records that a request of the plugin was refused, or that it broke
    /// the protocol, during this call (`why` says what it was).
    fn refused(&self, why: String) -> BoxFuture<'_, ()>;
}

/// Why a call got no answer. The text is what the caller is told.
#[derive(thiserror::Error, Debug, Clone, PartialEq, Eq)]
pub enum PluginError {
    #[error("plugin {name} is not available ({why}); trying again in {}s", retry_in.as_secs().max(1))]
    Unavailable {
        name: String,
        why: String,
        retry_in: Duration,
    },
    #[error("plugin {name} did not answer within {}s; it was stopped and will be started again", after.as_secs())]
    TimedOut { name: String, after: Duration },
    #[error(
        "plugin {name} is busy answering another call (it may be waiting for a job's approval); nothing was asked, try again later"
    )]
    Busy { name: String },
    #[error("plugin {name} is not available ({why}); it will be started again")]
    Failed { name: String, why: String },
    #[error("plugin {name} answered with an error: {message}")]
    Answered { name: String, message: String },
}

/// A running plugin's pipes.
struct Conn {
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
    _stderr: StderrTask,
    /// Its scratch directory lives as long as the process.
    _sandbox: Option<super::sandbox::Sandbox>,
}

/// Logs the plugin's stderr, line by line (bounded); aborted with the conn.
struct StderrTask(tokio::task::JoinHandle<()>);

impl Drop for StderrTask {
    fn drop(&mut self) {
        self.0.abort();
    }
}

enum State {
    Stopped {
        failures: u32,
    },
    Running(Box<Conn>),
    Down {
        failures: u32,
        retry_at: Instant,
        why: String,
    },
}

/// One configured plugin.
pub struct Plugin {
    pub spec: PluginSpec,
    state: Mutex<State>,
}

impl std::fmt::Debug for Plugin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Plugin")
            .field("name", &self.spec.manifest.name)
            .finish_non_exhaustive()
    }
}

/// What went wrong in one exchange (the process is then stopped).
struct Broken(String);

/// Why an exchange ended without an answer.
enum Fault {
    Broken(Broken),
    /// The call's deadline passed while the plugin had the turn.
    Late,
}

impl From<Broken> for Fault {
    fn from(b: Broken) -> Fault {
        Fault::Broken(b)
    }
}

/// `io` bounded by `deadline`.
async fn within<T>(
    deadline: Instant,
    io: impl std::future::Future<Output = Result<T, Broken>>,
) -> Result<T, Fault> {
    match tokio::time::timeout_at(deadline, io).await {
        Ok(r) => r.map_err(Fault::Broken),
        Err(_) => Err(Fault::Late),
    }
}

impl Plugin {
    pub fn new(spec: PluginSpec) -> Plugin {
        Plugin {
            spec,
            state: Mutex::new(State::Stopped { failures: 0 }),
        }
    }

    pub fn name(&self) -> &str {
        &self.spec.manifest.name
    }

    /// Calls `command` for `caller`; `jobs` serves the plugin's `job.run`
    /// requests meanwhile. Calls of one plugin are served one at a time;
    /// the timeout covers waiting for the turn too.
    pub async fn call(
        &self,
        command: &str,
        args: &[String],
        caller: &Caller,
        jobs: &dyn JobRunner,
    ) -> Result<CommandResult, PluginError> {
        let limits = self.spec.limits;
        let deadline = Instant::now() + limits.call_timeout;
        let Ok(mut state) = tokio::time::timeout_at(deadline, self.state.lock()).await else {
            return Err(PluginError::Busy {
                name: self.name().to_string(),
            });
        };
        let failures = match &*state {
            State::Running(_) => 0,
            State::Stopped { failures } => *failures,
            State::Down {
                failures,
                retry_at,
                why,
            } => {
                let now = Instant::now();
                if now < *retry_at {
                    return Err(PluginError::Unavailable {
                        name: self.name().to_string(),
                        why: why.clone(),
                        retry_in: *retry_at - now,
                    });
                }
                *failures
            }
        };
        if !matches!(*state, State::Running(_)) {
            match self.start(jobs, deadline).await {
                Ok(conn) => *state = State::Running(Box::new(conn)),
                Err(Fault::Broken(Broken(why))) => {
                    jobs.refused(format!("it could not be started: {why}"))
                        .await;
                    return Err(self.down(&mut state, failures + 1, why));
                }
                Err(Fault::Late) => return Err(self.down_timed_out(&mut state, failures + 1)),
            }
        }
        let State::Running(conn) = &mut *state else {
            unreachable!("the plugin was just started")
        };
        let params = CommandParams {
            command,
            args,
            caller,
        };
        let exchange = exchange(
            conn,
            "command",
            &params,
            Serving::Call(jobs),
            deadline,
            limits.line_bytes,
        )
        .await;
        match exchange {
            Ok(Ok(value)) => {
                serde_json::from_value::<CommandResult>(value).map_err(|e| PluginError::Answered {
                    name: self.name().to_string(),
                    message: format!("its result is not a command result: {e}"),
                })
            }
            Ok(Err(e)) => Err(PluginError::Answered {
                name: self.name().to_string(),
                message: e.message,
            }),
            Err(Fault::Broken(Broken(why))) => {
                // A plugin that closed its output has usually exited: name
                // its status (waited for briefly; a live one is killed),
                // in the audit record too.
                let why = match tokio::time::timeout(EXIT_GRACE, conn.child.wait()).await {
                    Ok(Ok(status)) => {
                        format!("{why}: {}", ended(status))
                    }
                    _ => why,
                };
                jobs.refused(format!("it was stopped: {why}")).await;
                Err(self.down(&mut state, failures + 1, why))
            }
            Err(Fault::Late) => Err(self.down_timed_out(&mut state, failures + 1)),
        }
        .inspect(|_| {
            if failures > 0 {
                tracing::info!(plugin = self.name(), "plugin answers again");
            }
        })
    }

    fn down_timed_out(&self, state: &mut State, failures: u32) -> PluginError {
        let _ = self.down(state, failures, "it did not answer in time".to_string());
        PluginError::TimedOut {
            name: self.name().to_string(),
            after: self.spec.limits.call_timeout,
        }
    }

    /// Stops the process (dropping it kills it) and records the backoff.
    fn down(&self, state: &mut State, failures: u32, why: String) -> PluginError {
        let wait = Backoff {
            first: self.spec.limits.restart_min,
            factor: 2.0,
            max: self.spec.limits.restart_max,
            jitter: Jitter::PlusMinus20,
        }
        .delay(failures.saturating_sub(1));
        tracing::warn!(plugin = self.name(), failures, retry_in_ms = wait.as_millis() as u64, reason = %why, "plugin stopped");
        let old = std::mem::replace(
            state,
            State::Down {
                failures,
                retry_at: Instant::now() + wait,
                why: why.clone(),
            },
        );
        if let State::Running(mut conn) = old {
            tokio::spawn(async move { process::kill(&mut conn.child).await });
        }
        PluginError::Failed {
            name: self.name().to_string(),
            why,
        }
    }

    /// Spawns the process and runs `initialize` (a request it sends
    /// meanwhile is refused and reported to `jobs`).
    async fn start(&self, jobs: &dyn JobRunner, deadline: Instant) -> Result<Conn, Fault> {
        let name = self.name();
        let process::Spawned { mut child, sandbox } = process::spawn(&self.spec).map_err(|e| {
            Broken(format!(
                "cannot start {}: {e}",
                self.spec.manifest.executable.display()
            ))
        })?;
        let (Some(stdin), Some(stdout), Some(stderr)) =
            (child.stdin.take(), child.stdout.take(), child.stderr.take())
        else {
            return Err(Broken("its pipes were not set up".to_string()).into());
        };
        let limits = self.spec.limits;
        let line_bytes = limits.line_bytes;
        let plugin = name.to_string();
        let per_sec = limits.stderr_lines_per_sec;
        let stderr = StderrTask(tokio::spawn(log_stderr(
            BufReader::new(stderr),
            StderrLimit::new(limits.stderr_burst, per_sec, Instant::now()),
            line_bytes,
            move |l| match l {
                StderrLog::Line(line) => tracing::info!(plugin = %plugin, "stderr: {line}"),
                StderrLog::Dropped(n) => tracing::warn!(
                    plugin = %plugin,
                    dropped = n,
                    "stderr: {n} lines dropped (over {per_sec} lines/s)"
                ),
            },
        )));
        let mut conn = Conn {
            child,
            stdin,
            stdout: BufReader::new(stdout),
            _stderr: stderr,
            _sandbox: sandbox,
        };
        let params = InitializeParams {
            protocol_version: PROTOCOL_VERSION,
            plugin: name,
            gateway_version: env!("CARGO_PKG_VERSION"),
        };
        let value = exchange(
            &mut conn,
            "initialize",
            &params,
            Serving::Start(jobs),
            deadline,
            line_bytes,
        )
        .await?
        .map_err(|e| Broken(format!("initialize failed: {}", e.message)))?;
        let init: InitializeResult =
            serde_json::from_value(value).map_err(|e| Broken(format!("initialize result: {e}")))?;
        if init.protocol_version != PROTOCOL_VERSION {
            return Err(Fault::Broken(Broken(format!(
                "it speaks protocol {}, this gateway {PROTOCOL_VERSION}",
                init.protocol_version
            ))));
        }
        let mut theirs = init.commands.clone();
        theirs.sort();
        let mut ours: Vec<String> = self
            .spec
            .manifest
            .commands
            .iter()
            .map(|c| c.verb.clone())
            .collect();
        ours.sort();
        if theirs != ours {
            return Err(Fault::Broken(Broken(format!(
                "it serves commands [{}], its manifest declares [{}]",
                theirs.join(", "),
                ours.join(", ")
            ))));
        }
        tracing::info!(plugin = name, "plugin started");
        Ok(conn)
    }
}

/// What the plugin's requests are answered for during an exchange.
#[derive(Clone, Copy)]
enum Serving<'a> {
    /// Starting (`initialize`): a `job.run` is refused, and reported.
    Start(&'a dyn JobRunner),
    /// Answering a `command`: its `job.run`s run as the call's caller.
    Call(&'a dyn JobRunner),
}

/// The most the jobs a call asks for (their approvals included) may add
/// to its `call_timeout`: the default approval window.
pub const MAX_JOB_WAIT: Duration = Duration::from_secs(15 * 60);

/// How a plugin process ended, said plainly (a sandboxed plugin's status
/// is its reaper's, which dies of the signal that killed the plugin).
/// SIGSYS means its sandbox refused a system call (the second outside
/// attack found it audited only as "closed its output").
fn ended(status: std::process::ExitStatus) -> String {
    match std::os::unix::process::ExitStatusExt::signal(&status) {
        Some(libc::SIGSYS) => {
            "it was killed by SIGSYS: it made a system call its sandbox forbids".to_string()
        }
        Some(libc::SIGKILL) => "it was killed (SIGKILL; out of memory?)".to_string(),
        Some(sig) => format!("it was killed by signal {sig}"),
        None => format!("it exited with {status}"),
    }
}

/// A request id the plugin cannot guess: random, below 2⁵³ so that every
/// JSON implementation reads it exactly. A `job.run` names the call it
/// belongs to by this id, so one written before a call began cannot name
/// it (with ids counting 1, 2, 3 a plugin named the next caller's call in
/// advance and ran a job as them — found by the second outside attack).
fn request_id() -> u64 {
    let mut b = [0u8; 8];
    if ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut b).is_err() {
        // No randomness: a time-based id, still not one a plugin writes
        // ahead of time with any certainty.
        b = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(1)
            .to_le_bytes();
    }
    (u64::from_le_bytes(b) & ((1 << 53) - 1)).max(1)
}

/// Sends one request and reads until its response, serving the plugin's
/// requests in between. The plugin's own time is bounded by `deadline`;
/// the time the gateway spends on a `job.run` (approvals, the job) moves
/// it on by as much.
async fn exchange<P: serde::Serialize>(
    conn: &mut Conn,
    method: &str,
    params: &P,
    serving: Serving<'_>,
    mut deadline: Instant,
    line_bytes: usize,
) -> Result<Result<Value, protocol::RpcError>, Fault> {
    let id = request_id();
    let hard_end = deadline + MAX_JOB_WAIT;
    within(
        deadline,
        write_line(&mut conn.stdin, &Request::new(id, method, params)),
    )
    .await?;
    loop {
        let line = within(deadline, read_line(&mut conn.stdout, line_bytes))
            .await?
            .ok_or_else(|| Broken("it closed its output".to_string()))?;
        match protocol::parse_line(&line)
            .map_err(|e| Broken(format!("it broke the protocol: {e}")))?
        {
            Message::Response { id: got, outcome } => {
                if got != id {
                    return Err(Broken(format!("it answered request {got}, expected {id}")).into());
                }
                return Ok(outcome);
            }
            Message::Request {
                id: rid,
                method,
                params,
            } => {
                let (response, refused) = match (method.as_str(), serving) {
                    ("job.run", Serving::Call(jobs)) => {
                        let serving_since = Instant::now();
                        let r = job_run(jobs, id, params).await;
                        // Moved on by the gateway's own time, but a call
                        // ends at most MAX_JOB_WAIT after it began plus the
                        // plugin's own time (chained `job.run`s held a call,
                        // and its caller's rights, for good — second attack).
                        deadline = (deadline + serving_since.elapsed()).min(hard_end);
                        match r {
                            Ok(result) => (
                                Response::ok(
                                    rid,
                                    serde_json::to_value(result).unwrap_or(Value::Null),
                                ),
                                None,
                            ),
                            // A refused run was audited where it was refused.
                            Err((code, why, audited)) => {
                                let again = (!audited).then(|| format!("job.run refused: {why}"));
                                (Response::err(rid, code, why), again)
                            }
                        }
                    }
                    ("job.run", Serving::Start(_)) => {
                        let why = "job.run is only allowed while answering a command";
                        (
                            Response::err(rid, protocol::METHOD_NOT_FOUND, why),
                            Some(format!("job.run refused: {why}")),
                        )
                    }
                    (other, _) => {
                        let why = format!(
                            "unknown method {:?}",
                            fleetcmd_core::terminal::excerpt(other)
                        );
                        (
                            Response::err(rid, protocol::METHOD_NOT_FOUND, why.clone()),
                            Some(format!("request refused: {why}")),
                        )
                    }
                };
                if let Some(why) = refused {
                    let (Serving::Start(jobs) | Serving::Call(jobs)) = serving;
                    jobs.refused(why).await;
                }
                within(deadline, write_line(&mut conn.stdin, &response)).await?;
            }
        }
    }
}

/// Serves one `job.run` of call `call`: `Err` is the error code, the
/// message, and whether the runner already audited the refusal.
async fn job_run(
    jobs: &dyn JobRunner,
    call: u64,
    params: Value,
) -> Result<JobRunResult, (i64, String, bool)> {
    let p = serde_json::from_value::<JobRunParams>(params).map_err(|e| {
        (
            protocol::INVALID_PARAMS,
            format!("job.run params: {e}"),
            false,
        )
    })?;
    if p.call != call {
        return Err((
            protocol::INVALID_PARAMS,
            format!(
                "job.run names call {}, but the command being answered is call {call}: nothing run",
                p.call
            ),
            false,
        ));
    }
    jobs.run_as_caller(p)
        .await
        .map_err(|why| (protocol::INVALID_PARAMS, why, true))
}

/// What of a plugin's stderr reaches the gateway log.
#[derive(Debug, PartialEq, Eq)]
enum StderrLog {
    /// One line, cut and escaped.
    Line(String),
    /// Lines not logged since the last one that was (over the limit).
    Dropped(u64),
}

/// A plugin's stderr into the gateway log, line by line: each line cut
/// and escaped, at most what `limit` lets through, the rest dropped and
/// counted (found by an outside test: 46 MB of log in 6 s).
async fn log_stderr<R: tokio::io::AsyncBufRead + Unpin>(
    mut r: R,
    mut limit: StderrLimit,
    line_bytes: usize,
    mut log: impl FnMut(StderrLog),
) {
    let mut dropped = 0u64;
    loop {
        let line = match read_line(&mut r, line_bytes).await {
            Ok(Some(line)) => line,
            Ok(None) | Err(_) => break,
        };
        if !limit.take(Instant::now()) {
            dropped += 1;
            continue;
        }
        if dropped > 0 {
            log(StderrLog::Dropped(dropped));
            dropped = 0;
        }
        log(StderrLog::Line(fleetcmd_core::terminal::excerpt(&line)));
    }
    if dropped > 0 {
        log(StderrLog::Dropped(dropped));
    }
}

/// How many stderr lines of a plugin are logged: `burst` at once, then
/// `per_sec` per second (a token bucket that drops rather than waits: a
/// plugin must not slow down, nor flood the log).
#[derive(Debug)]
struct StderrLimit {
    tokens: f64,
    burst: f64,
    per_sec: u32,
    last: Instant,
}

impl StderrLimit {
    fn new(burst: u32, per_sec: u32, now: Instant) -> StderrLimit {
        StderrLimit {
            tokens: f64::from(burst),
            burst: f64::from(burst),
            per_sec,
            last: now,
        }
    }

    /// Whether one more line may be logged at `now`.
    fn take(&mut self, now: Instant) -> bool {
        let dt = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = now;
        self.tokens = (self.tokens + dt * f64::from(self.per_sec)).min(self.burst);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

async fn write_line<T: serde::Serialize>(stdin: &mut ChildStdin, msg: &T) -> Result<(), Broken> {
    let mut line =
        serde_json::to_vec(msg).map_err(|e| Broken(format!("encoding a request: {e}")))?;
    line.push(b'\n');
    stdin
        .write_all(&line)
        .await
        .map_err(|e| Broken(format!("writing to it: {e}")))?;
    stdin
        .flush()
        .await
        .map_err(|e| Broken(format!("writing to it: {e}")))
}

/// One `\n`-terminated UTF-8 line of at most `max` bytes; `None` at the
/// end. A longer line is an error (the rest is not read).
async fn read_line<R: tokio::io::AsyncBufRead + Unpin>(
    r: &mut R,
    max: usize,
) -> Result<Option<String>, Broken> {
    let mut line = Vec::new();
    loop {
        let buf = r
            .fill_buf()
            .await
            .map_err(|e| Broken(format!("reading from it: {e}")))?;
        if buf.is_empty() {
            if line.is_empty() {
                return Ok(None);
            }
            break;
        }
        let (take, done) = match buf.iter().position(|b| *b == b'\n') {
            Some(i) => (i + 1, true),
            None => (buf.len(), false),
        };
        if line.len() + take > max + 1 {
            return Err(Broken(format!("it wrote a line over {max} bytes")));
        }
        line.extend_from_slice(&buf[..take]);
        r.consume(take);
        if done {
            break;
        }
    }
    if line.last() == Some(&b'\n') {
        line.pop();
    }
    String::from_utf8(line)
        .map(Some)
        .map_err(|_| Broken("it wrote a line that is not UTF-8".to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stderr_lines_are_a_burst_then_a_rate() {
        let t0 = Instant::now();
        let mut l = StderrLimit::new(3, 2, t0);
        let got: Vec<bool> = (0..5).map(|_| l.take(t0)).collect();
        assert_eq!(got, [true, true, true, false, false]);
        // Half a second later: one more (2 per second), not two.
        let t1 = t0 + Duration::from_millis(500);
        assert!(l.take(t1));
        assert!(!l.take(t1));
        // Idle for long: never more than the burst.
        let t2 = t1 + Duration::from_secs(60);
        assert_eq!((0..10).filter(|_| l.take(t2)).count(), 3);
    }

    /// The flood of the outside test, in small: 10,000 lines at once reach
    /// the log as the burst and one count of the rest.
    #[tokio::test]
    async fn a_stderr_flood_is_logged_as_its_burst_and_a_count() {
        let flood = "E\x1b[2J\n".repeat(10_000);
        let mut logged = Vec::new();
        log_stderr(
            flood.as_bytes(),
            StderrLimit::new(100, 20, Instant::now()),
            1024,
            |l| logged.push(l),
        )
        .await;
        let lines = logged
            .iter()
            .filter(|l| matches!(l, StderrLog::Line(_)))
            .count();
        assert!((100..=110).contains(&lines), "{lines} lines logged");
        let dropped: u64 = logged
            .iter()
            .map(|l| match l {
                StderrLog::Dropped(n) => *n,
                StderrLog::Line(_) => 0,
            })
            .sum();
        assert_eq!(dropped + lines as u64, 10_000);
        assert_eq!(logged.first(), Some(&StderrLog::Line("E\\x1b[2J".into())));
    }

    #[tokio::test]
    async fn lines_are_bounded_and_utf8() {
        let mut r: &[u8] = b"short\nexactly10\n";
        assert_eq!(
            read_line(&mut r, 10).await.ok().flatten().as_deref(),
            Some("short")
        );
        assert_eq!(
            read_line(&mut r, 10).await.ok().flatten().as_deref(),
            Some("exactly10")
        );
        assert!(matches!(read_line(&mut r, 10).await, Ok(None)));
        let mut r: &[u8] = b"this line is longer than ten\n";
        assert!(
            matches!(read_line(&mut r, 10).await, Err(Broken(e)) if e.contains("over 10 bytes"))
        );
        let mut r: &[u8] = b"\xff\n";
        assert!(matches!(read_line(&mut r, 10).await, Err(Broken(e)) if e.contains("not UTF-8")));
    }
}
