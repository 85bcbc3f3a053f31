//! The command executor: runs one [`AuthorizedCommand`] the way DESIGN §2.7
//! requires — argv executed directly (no shell), a cleared environment,
//! stdin from `/dev/null`, cwd `/`, its own session and process group,
//! `no_new_privs`, the `run_as` user, output capped per stream, and the whole
//! process group killed (TERM, then KILL after a grace period) on timeout or
//! cancel. Only an [`AuthorizedCommand`], which only the allow-list check can
//! build, is accepted by the public entry point [`execute`].

use std::collections::BTreeMap;
use std::ffi::CString;
use std::io;
use std::os::unix::process::ExitStatusExt as _;
use std::process::{ExitStatus, Stdio};
use std::time::{Duration, Instant};

use fleetcmd_core::authorize::AuthorizedCommand;
use tokio::io::{AsyncRead, AsyncReadExt as _};
use tokio::process::{Child, Command};
use tokio::sync::watch;

/// `PATH` given to every command; declared `env` may override it.
const CHILD_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// How long output is still read after the process group was killed. Only a
/// descendant that left the group (its own `setsid`) can keep a pipe open that
/// long; its further output is not waited for.
const DRAIN_AFTER_EXIT: Duration = Duration::from_secs(1);

/// How often the process group is checked for remaining members while the
/// TERM grace period runs, or after SIGKILL.
const GROUP_POLL: Duration = Duration::from_millis(20);

/// How long to wait after SIGKILL for the kernel to tear the group down, so
/// nothing of the command is left running when the executor returns. Only a
/// process stuck in uninterruptible I/O (or a zombie that the host's init does
/// not reap) takes that long.
const KILL_SETTLE: Duration = Duration::from_millis(500);

/// Limits applied to every execution.
#[derive(Debug, Clone)]
pub struct ExecLimits {
    /// Bytes kept per stream (stdout and stderr each); the rest is counted and dropped.
    pub max_output: usize,
    /// Time between SIGTERM and SIGKILL to the process group on timeout or cancel.
    pub kill_grace: Duration,
}

impl Default for ExecLimits {
    /// 1 MiB per stream, 5 s grace (DESIGN §2.7).
    fn default() -> Self {
        ExecLimits {
            max_output: 1024 * 1024,
            kill_grace: Duration::from_secs(5),
        }
    }
}

/// How an execution ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Termination {
    /// The process exited with this code.
    Exited(i32),
    /// The process was killed by this signal (not by the executor).
    Signaled(i32),
    /// The timeout elapsed and the process group was killed.
    TimedOut,
    /// The cancel signal arrived and the process group was killed.
    Canceled,
    /// The process could not be started (or, very rarely, not be waited
    /// for); the message says why and names the program.
    SpawnFailed(String),
}

/// Result of one execution.
#[derive(Debug, Clone)]
pub struct ExecOutcome {
    pub termination: Termination,
    /// At most [`ExecLimits::max_output`] bytes of standard output.
    pub stdout: Vec<u8>,
    /// At most [`ExecLimits::max_output`] bytes of standard error.
    pub stderr: Vec<u8>,
    /// Bytes of standard output read past the cap and dropped.
    pub stdout_dropped: u64,
    /// Bytes of standard error read past the cap and dropped.
    pub stderr_dropped: u64,
    /// Wall time from the start of the call until the group was gone.
    pub duration: Duration,
}

/// Public entry: only an AuthorizedCommand can be executed.
///
/// Resolves when the process has exited (or was killed) and its output has
/// been read. Turning `cancel` to `true` kills the process group; a dropped
/// sender never cancels. Dropping the returned future SIGKILLs the group.
#[tracing::instrument(skip_all, fields(job_id = %cmd.job_id()))]
pub async fn execute(
    cmd: &AuthorizedCommand,
    limits: &ExecLimits,
    cancel: watch::Receiver<bool>,
) -> ExecOutcome {
    run(
        Plan {
            argv: cmd.argv(),
            run_as: cmd.run_as(),
            env: cmd.env(),
            timeout: cmd.timeout(),
        },
        limits,
        cancel,
    )
    .await
}

/// What to run; built only from an [`AuthorizedCommand`] (or by tests).
struct Plan<'a> {
    argv: &'a [String],
    run_as: Option<&'a str>,
    env: &'a BTreeMap<String, String>,
    timeout: Duration,
}

/// Uid and primary gid to switch to in the child.
#[derive(Debug, Clone, Copy)]
struct Credentials {
    uid: libc::uid_t,
    gid: libc::gid_t,
}

async fn run(
    plan: Plan<'_>,
    limits: &ExecLimits,
    mut cancel: watch::Receiver<bool>,
) -> ExecOutcome {
    let started = Instant::now();
    let failed = |message: String| ExecOutcome {
        termination: Termination::SpawnFailed(message),
        stdout: Vec::new(),
        stderr: Vec::new(),
        stdout_dropped: 0,
        stderr_dropped: 0,
        duration: started.elapsed(),
    };

    let Some(program) = plan.argv.first() else {
        return failed("empty argv".to_owned());
    };
    if !program.starts_with('/') {
        // Never let PATH decide what runs.
        return failed(format!("program `{program}` is not an absolute path"));
    }
    if *cancel.borrow_and_update() {
        return ExecOutcome {
            termination: Termination::Canceled,
            ..failed(String::new())
        };
    }

    let credentials = match plan.run_as {
        None => None,
        Some(user) => match switch_to(user).await {
            Ok(credentials) => credentials,
            Err(message) => return failed(message),
        },
    };

    let mut command = Command::new(program);
    command
        .args(&plan.argv[1..])
        .env_clear()
        .env("PATH", CHILD_PATH)
        .env("LANG", "C.UTF-8")
        .envs(plan.env)
        .current_dir("/")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    isolate_child(&mut command, credentials);

    let mut child = match command.spawn() {
        Ok(child) => child,
        Err(err) => {
            let who = plan
                .run_as
                .map(|u| format!(" as user `{u}`"))
                .unwrap_or_default();
            return failed(format!("spawn `{program}`{who}: {err}"));
        }
    };
    // The child called setsid(), so its pid is also its process group id.
    let Some(pgid) = child.id().and_then(|pid| libc::pid_t::try_from(pid).ok()) else {
        return failed(format!("spawn `{program}`: no process id"));
    };
    let mut group = GroupGuard { pgid, armed: true };
    tracing::debug!(program = %program, pid = pgid, "command started");

    let mut stdout = Capture::new(limits.max_output);
    let mut stderr = Capture::new(limits.max_output);
    let child_stdout = child.stdout.take();
    let child_stderr = child.stderr.take();
    let termination = {
        // Both pipes are read while the process runs, so it never blocks on a
        // full pipe; after the group is gone the rest is drained.
        let reading = async {
            tokio::join!(stdout.pump(child_stdout), stderr.pump(child_stderr));
        };
        tokio::pin!(reading);
        let supervising = supervise(
            &mut child,
            &group,
            plan.timeout,
            limits.kill_grace,
            &mut cancel,
        );
        tokio::pin!(supervising);
        let mut read_all = false;
        let termination = loop {
            tokio::select! {
                termination = &mut supervising => break termination,
                () = &mut reading, if !read_all => read_all = true,
            }
        };
        if !read_all
            && tokio::time::timeout(DRAIN_AFTER_EXIT, &mut reading)
                .await
                .is_err()
        {
            tracing::warn!(program = %program, "a process outside the group still holds the output pipes; output after exit dropped");
        }
        termination
    };
    group.armed = false;

    ExecOutcome {
        termination,
        stdout: stdout.kept,
        stderr: stderr.kept,
        stdout_dropped: stdout.dropped,
        stderr_dropped: stderr.dropped,
        duration: started.elapsed(),
    }
}

/// Waits for the child, enforcing timeout and cancel; always leaves the
/// process group killed and the child reaped.
async fn supervise(
    child: &mut Child,
    group: &GroupGuard,
    timeout: Duration,
    kill_grace: Duration,
    cancel: &mut watch::Receiver<bool>,
) -> Termination {
    let canceled = async {
        // A dropped sender means nobody can cancel any more.
        if cancel.wait_for(|canceled| *canceled).await.is_err() {
            std::future::pending::<()>().await;
        }
    };
    let termination = tokio::select! {
        status = child.wait() => {
            // A grandchild may linger in the group after the child exits.
            if group.signal(libc::SIGKILL) {
                group.settle().await;
            }
            return match status {
                Ok(status) => exit_termination(status),
                Err(err) => Termination::SpawnFailed(format!("waiting for the process: {err}")),
            };
        }
        () = tokio::time::sleep(timeout) => Termination::TimedOut,
        () = canceled => Termination::Canceled,
    };

    group.signal(libc::SIGTERM);
    let deadline = tokio::time::Instant::now() + kill_grace;
    let mut reaped = false;
    // Give the whole group, not only the child, the grace period to exit.
    loop {
        if reaped && !group.has_members() {
            break;
        }
        let tick = tokio::time::sleep_until(deadline.min(tokio::time::Instant::now() + GROUP_POLL));
        tokio::select! {
            status = child.wait(), if !reaped => {
                if let Err(err) = status {
                    tracing::warn!(error = %err, "waiting for the process after SIGTERM");
                }
                reaped = true;
            }
            () = tick => {
                if tokio::time::Instant::now() >= deadline {
                    break;
                }
            }
        }
    }
    let hit = group.signal(libc::SIGKILL);
    if !reaped && let Err(err) = child.wait().await {
        tracing::warn!(error = %err, "waiting for the process after SIGKILL");
    }
    if hit {
        group.settle().await;
    }
    termination
}

fn exit_termination(status: ExitStatus) -> Termination {
    match (status.code(), status.signal()) {
        (Some(code), _) => Termination::Exited(code),
        (None, Some(signal)) => Termination::Signaled(signal),
        // wait(2) reports only exits and signal deaths for a reaped child.
        (None, None) => Termination::Exited(status.into_raw()),
    }
}

/// Resolves `user` (before fork: NSS lookups are not async-signal-safe, and may
/// block, so they run on the blocking pool). `None` when no switch is needed.
async fn switch_to(user: &str) -> Result<Option<Credentials>, String> {
    let name = user.to_owned();
    let looked_up = tokio::task::spawn_blocking(move || lookup_user(&name))
        .await
        .map_err(|err| format!("looking up user `{user}`: {err}"))?;
    match looked_up {
        Ok(Some(credentials)) if credentials.uid == effective_uid() => Ok(None),
        Ok(Some(credentials)) => Ok(Some(credentials)),
        Ok(None) => Err(format!("unknown user `{user}`")),
        Err(err) => Err(format!("looking up user `{user}`: {err}")),
    }
}

/// `getpwnam_r(3)`: `Ok(None)` when the user does not exist.
#[allow(unsafe_code)]
fn lookup_user(user: &str) -> io::Result<Option<Credentials>> {
    let Ok(name) = CString::new(user) else {
        return Ok(None);
    };
    let mut size = 1024;
    loop {
        let mut buffer = vec![0 as libc::c_char; size];
        // SAFETY: `passwd` is plain old data that getpwnam_r fills in; all
        // pointers passed are valid for the call, `buffer` for `size` bytes.
        // Only the numeric fields are read afterwards, so no pointer into
        // `buffer` outlives it.
        let (code, found, credentials) = unsafe {
            let mut passwd: libc::passwd = std::mem::zeroed();
            let mut result: *mut libc::passwd = std::ptr::null_mut();
            let code = libc::getpwnam_r(
                name.as_ptr(),
                &mut passwd,
                buffer.as_mut_ptr(),
                size,
                &mut result,
            );
            (
                code,
                !result.is_null(),
                Credentials {
                    uid: passwd.pw_uid,
                    gid: passwd.pw_gid,
                },
            )
        };
        match code {
            0 if found => return Ok(Some(credentials)),
            // Some NSS modules report "not found" as one of these.
            0 | libc::ENOENT | libc::ESRCH | libc::EBADF | libc::EPERM => return Ok(None),
            libc::ERANGE if size < 1024 * 1024 => size *= 4,
            code => return Err(io::Error::from_raw_os_error(code)),
        }
    }
}

#[allow(unsafe_code)]
fn effective_uid() -> libc::uid_t {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() }
}

/// Sets up the child between fork and exec: new session and process group,
/// `no_new_privs`, then (if asked) groups, gid and uid, in that order.
#[allow(unsafe_code)]
fn isolate_child(command: &mut Command, credentials: Option<Credentials>) {
    // SAFETY: the closure runs in the forked child before exec, where only
    // async-signal-safe functions may be called. It calls only the raw
    // syscall wrappers setsid, prctl, setgroups, setgid and setuid, reads
    // errno through `io::Error::last_os_error` (no allocation), and touches
    // no memory but its captured `Copy` credentials (the user was looked up
    // before fork).
    unsafe {
        command.pre_exec(move || {
            if libc::setsid() == -1 {
                return Err(io::Error::last_os_error());
            }
            if libc::prctl(
                libc::PR_SET_NO_NEW_PRIVS,
                1 as libc::c_ulong,
                0 as libc::c_ulong,
                0 as libc::c_ulong,
                0 as libc::c_ulong,
            ) != 0
            {
                return Err(io::Error::last_os_error());
            }
            if let Some(Credentials { uid, gid }) = credentials {
                // Only the primary group: no supplementary group of the agent leaks.
                if libc::setgroups(1, &gid) != 0 || libc::setgid(gid) != 0 || libc::setuid(uid) != 0
                {
                    return Err(io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
}

/// The child's process group. While armed, dropping it (the `run` future was
/// dropped mid-execution) SIGKILLs the whole group, not just the child that
/// `kill_on_drop` covers.
struct GroupGuard {
    pgid: libc::pid_t,
    armed: bool,
}

impl GroupGuard {
    /// Sends `signal` to every member; a group that is already gone is fine.
    /// Returns whether any process was signalled.
    #[allow(unsafe_code)]
    fn signal(&self, signal: libc::c_int) -> bool {
        // SAFETY: kill has no memory-safety preconditions; the negative pid
        // addresses the group whose leader is our (not yet reaped, or just
        // reaped) child.
        if unsafe { libc::kill(-self.pgid, signal) } == 0 {
            return true;
        }
        let err = io::Error::last_os_error();
        if err.raw_os_error() != Some(libc::ESRCH) {
            tracing::warn!(pgid = self.pgid, signal, error = %err, "signalling the process group");
        }
        false
    }

    /// After SIGKILL: waits (bounded by [`KILL_SETTLE`]) until the group is gone.
    async fn settle(&self) {
        let deadline = tokio::time::Instant::now() + KILL_SETTLE;
        while self.has_members() {
            if tokio::time::Instant::now() >= deadline {
                tracing::warn!(
                    pgid = self.pgid,
                    "process group still has members after SIGKILL"
                );
                return;
            }
            tokio::time::sleep(GROUP_POLL).await;
        }
    }

    /// Whether any process (zombies included) is still in the group.
    #[allow(unsafe_code)]
    fn has_members(&self) -> bool {
        // SAFETY: signal 0 only checks for existence and permission.
        let alive = unsafe { libc::kill(-self.pgid, 0) } == 0;
        alive || io::Error::last_os_error().raw_os_error() != Some(libc::ESRCH)
    }
}

impl Drop for GroupGuard {
    fn drop(&mut self) {
        if self.armed {
            self.signal(libc::SIGKILL);
        }
    }
}

/// One output stream: the first `cap` bytes kept, the rest counted.
struct Capture {
    cap: usize,
    kept: Vec<u8>,
    dropped: u64,
}

impl Capture {
    fn new(cap: usize) -> Capture {
        Capture {
            cap,
            kept: Vec::new(),
            dropped: 0,
        }
    }

    /// Reads `stream` to its end, keeping reading past the cap so the writer
    /// never blocks on a full pipe.
    async fn pump(&mut self, stream: Option<impl AsyncRead + Unpin>) {
        let Some(mut stream) = stream else { return };
        let mut chunk = vec![0u8; 64 * 1024];
        loop {
            match stream.read(&mut chunk).await {
                Ok(0) => return,
                Ok(n) => self.push(&chunk[..n]),
                Err(err) if err.kind() == io::ErrorKind::Interrupted => {}
                Err(err) => {
                    tracing::warn!(error = %err, "reading command output");
                    return;
                }
            }
        }
    }

    fn push(&mut self, bytes: &[u8]) {
        let room = self.cap.saturating_sub(self.kept.len()).min(bytes.len());
        self.kept.extend_from_slice(&bytes[..room]);
        self.dropped += (bytes.len() - room) as u64;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn argv(args: &[&str]) -> Vec<String> {
        args.iter().map(|a| (*a).to_owned()).collect()
    }

    struct Run<'a> {
        argv: Vec<String>,
        run_as: Option<&'a str>,
        env: BTreeMap<String, String>,
        timeout: Duration,
        limits: ExecLimits,
    }

    impl<'a> Run<'a> {
        fn new(args: &[&str]) -> Run<'a> {
            Run {
                argv: argv(args),
                run_as: None,
                env: BTreeMap::new(),
                timeout: Duration::from_secs(20),
                limits: ExecLimits::default(),
            }
        }

        async fn with_cancel(&self, cancel: watch::Receiver<bool>) -> ExecOutcome {
            let plan = Plan {
                argv: &self.argv,
                run_as: self.run_as,
                env: &self.env,
                timeout: self.timeout,
            };
            run(plan, &self.limits, cancel).await
        }

        async fn go(&self) -> ExecOutcome {
            let (_tx, rx) = watch::channel(false);
            self.with_cancel(rx).await
        }
    }

    fn text(bytes: &[u8]) -> &str {
        std::str::from_utf8(bytes).expect("test output is UTF-8")
    }

    /// A pid is gone when /proc no longer lists it or it is a zombie waiting
    /// for a reaper that is not ours (pid 1 of a container may never reap).
    fn alive(pid: u32) -> bool {
        match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
            Err(_) => false,
            Ok(stat) => {
                let state = stat
                    .rsplit_once(')')
                    .and_then(|(_, rest)| rest.trim_start().chars().next());
                !matches!(state, Some('Z' | 'X'))
            }
        }
    }

    fn read_pid(file: &Path) -> u32 {
        // The shell writes the pid before the command can time out.
        let pid = std::fs::read_to_string(file).expect("pid file written by the test command");
        pid.trim().parse().expect("pid file holds a pid")
    }

    #[tokio::test]
    async fn metacharacters_are_passed_literally() {
        let dir = tempfile::tempdir().expect("tempdir");
        let marker = dir.path().join("X");
        let arg = format!(
            "$(touch {0}); `touch {0}` | touch {0} && touch {0} > {0}",
            marker.display()
        );
        let out = Run::new(&["/bin/echo", &arg]).go().await;
        assert_eq!(out.termination, Termination::Exited(0));
        assert_eq!(text(&out.stdout), format!("{arg}\n"));
        assert!(!marker.exists(), "a shell interpreted the argument");
    }

    #[tokio::test]
    async fn environment_is_cleared_then_set() {
        assert!(
            std::env::vars_os().next().is_some(),
            "test needs a non-empty environment to be meaningful"
        );
        let mut run = Run::new(&["/usr/bin/env"]);
        run.env
            .insert("FLEETCMD_DECLARED".to_owned(), "a b $HOME".to_owned());
        let out = run.go().await;
        assert_eq!(out.termination, Termination::Exited(0));
        let mut lines: Vec<&str> = text(&out.stdout).lines().collect();
        lines.sort_unstable();
        assert_eq!(
            lines,
            [
                "FLEETCMD_DECLARED=a b $HOME",
                "LANG=C.UTF-8",
                &format!("PATH={CHILD_PATH}"),
            ]
        );
    }

    #[tokio::test]
    async fn declared_env_overrides_defaults() {
        let mut run = Run::new(&["/usr/bin/env"]);
        run.env.insert("LANG".to_owned(), "de_DE.UTF-8".to_owned());
        let out = run.go().await;
        assert!(
            text(&out.stdout).lines().any(|l| l == "LANG=de_DE.UTF-8"),
            "{}",
            text(&out.stdout)
        );
    }

    #[tokio::test]
    async fn cwd_is_root() {
        let out = Run::new(&["/bin/pwd"]).go().await;
        assert_eq!(out.termination, Termination::Exited(0));
        assert_eq!(text(&out.stdout), "/\n");
    }

    #[tokio::test]
    async fn stdin_is_empty() {
        let mut run = Run::new(&["/bin/cat"]);
        run.timeout = Duration::from_secs(5);
        let out = run.go().await;
        assert_eq!(out.termination, Termination::Exited(0));
        assert!(out.stdout.is_empty());
    }

    #[tokio::test]
    async fn exit_code_is_reported() {
        let out = Run::new(&["/bin/false"]).go().await;
        assert_eq!(out.termination, Termination::Exited(1));
        let out = Run::new(&["/bin/sh", "-c", "exit 42"]).go().await;
        assert_eq!(out.termination, Termination::Exited(42));
    }

    #[tokio::test]
    async fn signal_death_is_reported() {
        let out = Run::new(&["/bin/sh", "-c", "kill -KILL $$"]).go().await;
        assert_eq!(out.termination, Termination::Signaled(libc::SIGKILL));
    }

    #[tokio::test]
    async fn timeout_kills_the_whole_group() {
        let dir = tempfile::tempdir().expect("tempdir");
        let pidfile = dir.path().join("pid");
        let script = format!("sleep 30 & echo $! > {}; wait", pidfile.display());
        let mut run = Run::new(&["/bin/sh", "-c", &script]);
        run.timeout = Duration::from_millis(300);
        run.limits.kill_grace = Duration::from_millis(200);
        let out = run.go().await;
        assert_eq!(out.termination, Termination::TimedOut);
        assert!(out.duration >= Duration::from_millis(300));
        assert!(out.duration < Duration::from_secs(10), "{:?}", out.duration);
        let grandchild = read_pid(&pidfile);
        assert!(
            !alive(grandchild),
            "grandchild {grandchild} survived the timeout"
        );
    }

    #[tokio::test]
    async fn term_ignoring_group_is_killed_after_grace() {
        let dir = tempfile::tempdir().expect("tempdir");
        let pidfile = dir.path().join("pid");
        // Ignored signals stay ignored across fork and exec, so the sleep
        // ignores TERM too.
        let script = format!(
            "trap '' TERM; sleep 30 & echo $! > {}; wait",
            pidfile.display()
        );
        let mut run = Run::new(&["/bin/sh", "-c", &script]);
        run.timeout = Duration::from_millis(300);
        run.limits.kill_grace = Duration::from_millis(200);
        let out = run.go().await;
        assert_eq!(out.termination, Termination::TimedOut);
        assert!(
            out.duration >= Duration::from_millis(500),
            "grace not waited: {:?}",
            out.duration
        );
        assert!(out.duration < Duration::from_secs(10), "{:?}", out.duration);
        let grandchild = read_pid(&pidfile);
        assert!(
            !alive(grandchild),
            "grandchild {grandchild} survived SIGKILL"
        );
    }

    #[tokio::test]
    async fn lingering_grandchild_is_killed_after_normal_exit() {
        let dir = tempfile::tempdir().expect("tempdir");
        let pidfile = dir.path().join("pid");
        // The grandchild does not hold the output pipes, so only the final
        // SIGKILL of the group ends it.
        let script = format!("sleep 30 >/dev/null 2>&1 & echo $! > {}", pidfile.display());
        let out = Run::new(&["/bin/sh", "-c", &script]).go().await;
        assert_eq!(out.termination, Termination::Exited(0));
        let grandchild = read_pid(&pidfile);
        assert!(
            !alive(grandchild),
            "grandchild {grandchild} outlived its parent"
        );
    }

    #[tokio::test]
    async fn cancel_kills_the_group() {
        let (tx, rx) = watch::channel(false);
        let mut run = Run::new(&["/bin/sleep", "30"]);
        run.limits.kill_grace = Duration::from_millis(200);
        let cancel = async {
            tokio::time::sleep(Duration::from_millis(100)).await;
            tx.send(true).expect("receiver alive");
        };
        let (out, ()) = tokio::join!(run.with_cancel(rx), cancel);
        assert_eq!(out.termination, Termination::Canceled);
        assert!(out.duration < Duration::from_secs(10), "{:?}", out.duration);
    }

    #[tokio::test]
    async fn already_canceled_does_not_spawn() {
        let (_tx, rx) = watch::channel(true);
        let dir = tempfile::tempdir().expect("tempdir");
        let marker = dir.path().join("ran");
        let out = Run::new(&["/usr/bin/touch", &marker.display().to_string()])
            .with_cancel(rx)
            .await;
        assert_eq!(out.termination, Termination::Canceled);
        assert!(!marker.exists());
    }

    #[tokio::test]
    async fn dropped_cancel_sender_does_not_cancel() {
        let (tx, rx) = watch::channel(false);
        drop(tx);
        let out = Run::new(&["/bin/sh", "-c", "sleep 0.2; echo ok"])
            .with_cancel(rx)
            .await;
        assert_eq!(out.termination, Termination::Exited(0));
        assert_eq!(text(&out.stdout), "ok\n");
    }

    #[tokio::test]
    async fn output_over_the_cap_is_counted_and_dropped() {
        let out = Run::new(&["/usr/bin/head", "-c", "3000000", "/dev/zero"])
            .go()
            .await;
        assert_eq!(out.termination, Termination::Exited(0));
        assert_eq!(out.stdout.len(), 1024 * 1024);
        assert_eq!(out.stdout_dropped, 3_000_000 - 1024 * 1024);
        assert!(out.stderr.is_empty());
        assert_eq!(out.stderr_dropped, 0);
    }

    #[tokio::test]
    async fn both_streams_are_read_concurrently() {
        // If stderr were not read while waiting for stdout, the child would
        // block on a full stderr pipe and time out.
        let mut run = Run::new(&["/bin/sh", "-c", "head -c 500000 /dev/zero >&2; echo done"]);
        run.timeout = Duration::from_secs(10);
        run.limits.max_output = 1000;
        let out = run.go().await;
        assert_eq!(out.termination, Termination::Exited(0));
        assert_eq!(text(&out.stdout), "done\n");
        assert_eq!(out.stderr.len(), 1000);
        assert_eq!(out.stderr_dropped, 499_000);
    }

    #[tokio::test]
    async fn no_new_privs_is_set() {
        let out = Run::new(&["/bin/grep", "NoNewPrivs", "/proc/self/status"])
            .go()
            .await;
        assert_eq!(out.termination, Termination::Exited(0));
        assert_eq!(
            text(&out.stdout).split_whitespace().collect::<Vec<_>>(),
            ["NoNewPrivs:", "1"]
        );
    }

    #[tokio::test]
    async fn own_session_and_process_group() {
        // Fields 6 and 7 of /proc/self/stat (after the command name) are pgrp and session.
        let out = Run::new(&["/bin/sh", "-c", "echo $$; cat /proc/$$/stat"])
            .go()
            .await;
        let stdout = text(&out.stdout);
        let (pid, stat) = stdout.split_once('\n').expect("two lines");
        let fields: Vec<&str> = stat
            .rsplit_once(')')
            .expect("stat format")
            .1
            .split_whitespace()
            .collect();
        assert_eq!(fields[2], pid, "process group");
        assert_eq!(fields[3], pid, "session");
    }

    #[tokio::test]
    async fn run_as_switches_user_and_groups() {
        if effective_uid() != 0 {
            println!("note: not root, run_as switch not checked");
            return;
        }
        let mut run = Run::new(&["/usr/bin/id"]);
        run.run_as = Some("nobody");
        let out = run.go().await;
        assert_eq!(
            out.termination,
            Termination::Exited(0),
            "{}",
            text(&out.stderr)
        );
        let id = text(&out.stdout);
        assert!(id.starts_with("uid=65534(nobody) gid=65534"), "{id}");
        // Only the primary group: none of root's groups leaked.
        let groups = id.split_once("groups=").expect("groups listed").1.trim();
        assert!(
            groups.starts_with("65534(") && !groups.contains(','),
            "{groups}"
        );

        let mut run = Run::new(&["/usr/bin/id", "-u"]);
        run.run_as = Some("nobody");
        assert_eq!(text(&run.go().await.stdout), "65534\n");
    }

    #[tokio::test]
    async fn run_as_current_user_needs_no_switch() {
        let Ok(Some(me)) = lookup_user("root") else {
            return;
        };
        if me.uid != effective_uid() {
            return;
        }
        let mut run = Run::new(&["/usr/bin/id", "-u"]);
        run.run_as = Some("root");
        let out = run.go().await;
        assert_eq!(out.termination, Termination::Exited(0));
        assert_eq!(text(&out.stdout), "0\n");
    }

    #[tokio::test]
    async fn unknown_user_fails_to_spawn() {
        let mut run = Run::new(&["/usr/bin/id"]);
        run.run_as = Some("no-such-user-fleetcmd");
        let out = run.go().await;
        assert_eq!(
            out.termination,
            Termination::SpawnFailed("unknown user `no-such-user-fleetcmd`".to_owned())
        );
        let mut run = Run::new(&["/usr/bin/id"]);
        run.run_as = Some("bad\0name");
        assert!(
            matches!(run.go().await.termination, Termination::SpawnFailed(m) if m.starts_with("unknown user"))
        );
    }

    #[tokio::test]
    async fn missing_binary_fails_to_spawn_naming_it() {
        let out = Run::new(&["/nonexistent/fleetcmd-missing", "x"]).go().await;
        match out.termination {
            Termination::SpawnFailed(message) => assert!(
                message.contains("/nonexistent/fleetcmd-missing"),
                "{message}"
            ),
            other => panic!("expected SpawnFailed, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn relative_or_empty_argv_is_refused() {
        let out = Run::new(&["echo", "hi"]).go().await;
        assert_eq!(
            out.termination,
            Termination::SpawnFailed("program `echo` is not an absolute path".to_owned())
        );
        let out = Run::new(&[]).go().await;
        assert_eq!(
            out.termination,
            Termination::SpawnFailed("empty argv".to_owned())
        );
    }

    #[test]
    fn capture_keeps_up_to_the_cap() {
        let check = |cap: usize, chunks: &[usize], kept: usize, dropped: u64| {
            let mut capture = Capture::new(cap);
            for &n in chunks {
                capture.push(&vec![7; n]);
            }
            assert_eq!(
                (capture.kept.len(), capture.dropped),
                (kept, dropped),
                "cap {cap} chunks {chunks:?}"
            );
        };
        check(10, &[], 0, 0);
        check(10, &[4, 4], 8, 0);
        check(10, &[4, 6], 10, 0);
        check(10, &[4, 7], 10, 1);
        check(10, &[11, 5], 10, 6);
        check(0, &[3], 0, 3);
    }

    #[test]
    fn defaults_match_the_design() {
        let limits = ExecLimits::default();
        assert_eq!(limits.max_output, 1 << 20);
        assert_eq!(limits.kill_grace, Duration::from_secs(5));
    }
}
