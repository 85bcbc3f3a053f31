//! One plugin process, supervised: started on first use, `initialize`d,
//! called one command at a time, killed when a call times out or it breaks
//! the protocol, and started again after a crash only once its backoff has
//! passed (about 1 s, doubled per crash in a row, at most 60 s by default,
//! ±20 % as every reconnect in the gateway: [`crate::backoff`]). While it is
//! down, a call fails at once with "plugin NAME is not available".

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
    next_id: u64,
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
        let timed_out = || PluginError::TimedOut {
            name: self.name().to_string(),
            after: limits.call_timeout,
        };
        let Ok(mut state) = tokio::time::timeout_at(deadline, self.state.lock()).await else {
            return Err(timed_out());
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
            match tokio::time::timeout_at(deadline, self.start()).await {
                Ok(Ok(conn)) => *state = State::Running(Box::new(conn)),
                Ok(Err(Broken(why))) => return Err(self.down(&mut state, failures + 1, why)),
                Err(_) => return Err(self.down_timed_out(&mut state, failures + 1)),
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
        let exchange = tokio::time::timeout_at(
            deadline,
            exchange(conn, "command", &params, Some(jobs), limits.line_bytes),
        )
        .await;
        match exchange {
            Ok(Ok(Ok(value))) => {
                serde_json::from_value::<CommandResult>(value).map_err(|e| PluginError::Answered {
                    name: self.name().to_string(),
                    message: format!("its result is not a command result: {e}"),
                })
            }
            Ok(Ok(Err(e))) => Err(PluginError::Answered {
                name: self.name().to_string(),
                message: e.message,
            }),
            Ok(Err(Broken(why))) => {
                // A plugin that closed its output has usually exited: name
                // its status (waited for briefly; a live one is killed).
                let why = match tokio::time::timeout(EXIT_GRACE, conn.child.wait()).await {
                    Ok(Ok(status)) => format!("{why}: it exited with {status}"),
                    _ => why,
                };
                Err(self.down(&mut state, failures + 1, why))
            }
            Err(_) => Err(self.down_timed_out(&mut state, failures + 1)),
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

    /// Spawns the process and runs `initialize`.
    async fn start(&self) -> Result<Conn, Broken> {
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
            return Err(Broken("its pipes were not set up".to_string()));
        };
        let stderr_name = name.to_string();
        let line_bytes = self.spec.limits.line_bytes;
        let stderr = StderrTask(tokio::spawn(async move {
            let mut r = BufReader::new(stderr);
            while let Ok(Some(line)) = read_line(&mut r, line_bytes).await {
                tracing::info!(plugin = %stderr_name, "stderr: {}", fleetcmd_core::terminal::excerpt(&line));
            }
        }));
        let mut conn = Conn {
            child,
            stdin,
            stdout: BufReader::new(stdout),
            next_id: 1,
            _stderr: stderr,
            _sandbox: sandbox,
        };
        let params = InitializeParams {
            protocol_version: PROTOCOL_VERSION,
            plugin: name,
            gateway_version: env!("CARGO_PKG_VERSION"),
        };
        let value = exchange(&mut conn, "initialize", &params, None, line_bytes)
            .await?
            .map_err(|e| Broken(format!("initialize failed: {}", e.message)))?;
        let init: InitializeResult =
            serde_json::from_value(value).map_err(|e| Broken(format!("initialize result: {e}")))?;
        if init.protocol_version != PROTOCOL_VERSION {
            return Err(Broken(format!(
                "it speaks protocol {}, this gateway {PROTOCOL_VERSION}",
                init.protocol_version
            )));
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
            return Err(Broken(format!(
                "it serves commands [{}], its manifest declares [{}]",
                theirs.join(", "),
                ours.join(", ")
            )));
        }
        tracing::info!(plugin = name, "plugin started");
        Ok(conn)
    }
}

/// Sends one request and reads until its response, serving `job.run`
/// requests in between (when `jobs` is given).
async fn exchange<P: serde::Serialize>(
    conn: &mut Conn,
    method: &str,
    params: &P,
    jobs: Option<&dyn JobRunner>,
    line_bytes: usize,
) -> Result<Result<Value, protocol::RpcError>, Broken> {
    let id = conn.next_id;
    conn.next_id += 1;
    write_line(&mut conn.stdin, &Request::new(id, method, params)).await?;
    loop {
        let line = read_line(&mut conn.stdout, line_bytes)
            .await?
            .ok_or_else(|| Broken("it closed its output".to_string()))?;
        match protocol::parse_line(&line)
            .map_err(|e| Broken(format!("it broke the protocol: {e}")))?
        {
            Message::Response { id: got, outcome } => {
                if got != id {
                    return Err(Broken(format!("it answered request {got}, expected {id}")));
                }
                return Ok(outcome);
            }
            Message::Request {
                id: rid,
                method,
                params,
            } => {
                let response = match (method.as_str(), jobs) {
                    ("job.run", Some(jobs)) => match serde_json::from_value::<JobRunParams>(params)
                    {
                        Err(e) => Response::err(
                            rid,
                            protocol::INVALID_PARAMS,
                            format!("job.run params: {e}"),
                        ),
                        Ok(p) if p.call != id => Response::err(
                            rid,
                            protocol::INVALID_PARAMS,
                            format!(
                                "job.run names call {}, but the command being answered is call {id}: nothing run",
                                p.call
                            ),
                        ),
                        Ok(p) => match jobs.run_as_caller(p).await {
                            Ok(r) => {
                                Response::ok(rid, serde_json::to_value(r).unwrap_or(Value::Null))
                            }
                            Err(why) => Response::err(rid, protocol::INVALID_PARAMS, why),
                        },
                    },
                    ("job.run", None) => Response::err(
                        rid,
                        protocol::METHOD_NOT_FOUND,
                        "job.run is only allowed while answering a command",
                    ),
                    (other, _) => Response::err(
                        rid,
                        protocol::METHOD_NOT_FOUND,
                        format!("unknown method {other:?}"),
                    ),
                };
                write_line(&mut conn.stdin, &response).await?;
            }
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
