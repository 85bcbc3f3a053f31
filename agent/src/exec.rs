//! The command executor: runs one [`AuthorizedCommand`] the way ARCHITECTURE.md invariant 7
//! requires — argv executed directly (no shell), a cleared environment,
//! stdin from `/dev/null`, cwd `/`, no file descriptor of the agent but 0, 1
//! and 2, its own session and process group, `no_new_privs`, the `run_as`
//! user with only its primary group, output capped per stream, and
//! everything the command started killed (TERM, then KILL after a grace
//! period) on timeout or cancel, and when the command exits. Only an
//! [`AuthorizedCommand`], which only the allow-list check can build, is
//! accepted by the public entry point [`execute`].
//!
//! # Containment: cgroup v2 per job, else process group and sweep
//!
//! Killing the process group is not enough: a descendant that calls
//! `setsid` (any daemonizing program, `setsid -f`, a double fork) leaves the
//! group, and a TERM/KILL to the group never reaches it. So each job gets its
//! own cgroup v2, `fleetcmd-job-<agent pid>-<n>`, created under the agent's
//! own cgroup (found through `/proc/self/cgroup` and the `cgroup2` mount in
//! `/proc/self/mountinfo`; on hybrid hosts that is `/sys/fs/cgroup/unified`).
//! Between fork and exec the child writes `0` to the job cgroup's
//! `cgroup.procs` (opened by the agent before the fork; a plain `write(2)`,
//! which is async-signal-safe), so the command is inside before it can fork
//! anything, and no descendant can leave: moving to another cgroup needs
//! write access to a common ancestor's `cgroup.procs`, which only root has.
//! TERM goes to the group and to every pid in `cgroup.procs`; KILL is a
//! write to `cgroup.kill` (Linux ≥ 5.14; older kernels: members are
//! SIGKILLed until none is left). The executor returns once `cgroup.events`
//! says `populated 0` (bounded) and removes the cgroup. Cgroups left by an
//! agent that died are removed at the next start. Under systemd, give the
//! agent unit `Delegate=yes` so systemd leaves the job cgroups alone.
//!
//! When there is no writable cgroup2 hierarchy (a container with a
//! read-only `/sys/fs/cgroup`, cgroup v1 only) the executor falls back to the
//! process group plus a sweep: while the command runs, and right before each
//! signal, `/proc` is walked for descendants of the child and of every
//! descendant recorded before (with their start times, so a reused pid is
//! never signalled), and those are signalled too. **Limitation:** a process
//! that daemonizes by double fork faster than the sweep interval (200 ms),
//! e.g. `setsid -f`, is re-parented to init before it is ever seen and
//! escapes. A warning is logged once at startup in that case. A command run
//! as root can always escape either mechanism; containment is about
//! cleaning up after well-meaning commands, the allow-list is what keeps
//! hostile ones out.
//!
//! # File descriptors
//!
//! Between fork and exec every fd ≥ 3 is marked close-on-exec with
//! `close_range(3, ~0, CLOSE_RANGE_CLOEXEC)` (Linux ≥ 5.11), falling back to
//! `fcntl(FD_CLOEXEC)` on each fd below the `RLIMIT_NOFILE` soft limit
//! (read before the fork). Marking rather than closing keeps the pipe through
//! which the standard library reports a failed `exec` working until the
//! `exec` succeeds; an fd that some library (or the agent's own parent)
//! opened without `O_CLOEXEC` never reaches the command.
//!
//! # Path arguments
//!
//! A `path` argument with `prefixes` could name a file outside its prefix
//! through a symbolic link at the leaf or in a parent directory, placed
//! there (or swapped in after any check by name) by whoever can write in
//! the directory. So the command never gets the name: between fork and
//! exec, *after* switching to the `run_as` user (so the open is subject to
//! exactly that user's permissions, never the agent's), the child opens the
//! prefix and then the rest of the path with `openat2(2)` and
//! `RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS` as an
//! `O_PATH` descriptor, and places it at a number reserved by the parent
//! before the fork; argv holds `/proc/self/fd/N` instead of the path. The
//! command's own open of that name reopens the very inode that was checked,
//! with the mode it asks for and its user's permissions. With `create =
//! true`, a missing file is created empty with `O_CREAT | O_EXCL |
//! O_NOFOLLOW` in its parent, itself resolved the same way. Any refusal
//! (a symlink: `ELOOP`; an escape: `EXDEV`; a missing file; permission) is
//! reported as a refusal naming the argument, and nothing runs. The prefix
//! itself is written by the policy's admin and may contain symlinks
//! (`/var/run` → `/run`). Needs Linux ≥ 5.6 (`openat2`); older kernels
//! refuse such jobs. Hard links are not symlinks: where unprivileged users
//! could hard-link files they cannot read into a prefix, keep the kernel's
//! `fs.protected_hardlinks = 1` (the default on common distributions).
//! These descriptors are the only ones above 2 the command inherits.
//!
//! # Memory
//!
//! Each stream is read in 64 KiB chunks into a buffer that never grows past
//! [`ExecLimits::max_output`]; the rest is counted and dropped. So a job
//! costs at most `2 × (max_output + 64 KiB)` of output memory however much
//! it writes.

mod contain;

use std::collections::BTreeMap;
use std::ffi::{CStr, CString};
use std::io;
use std::os::fd::AsRawFd as _;
use std::os::fd::RawFd;
use std::os::unix::process::ExitStatusExt as _;
use std::process::{ExitStatus, Stdio};
use std::time::{Duration, Instant};

use fleetcmd_core::argv::PathArg;
use fleetcmd_core::authorize::AuthorizedCommand;
use tokio::io::{AsyncRead, AsyncReadExt as _};
use tokio::process::{Child, Command};
use tokio::sync::watch;

/// `PATH` given to every command; declared `env` may override it.
const CHILD_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// How often the child and the rest of the job are checked while the TERM
/// grace period runs.
const TERM_POLL: Duration = Duration::from_millis(20);

/// How long output is still read after everything the command started was
/// killed. Only a descendant that escaped containment (see the module
/// comment) can keep a pipe open that long; its further output is not waited
/// for.
const DRAIN_AFTER_EXIT: Duration = Duration::from_secs(1);

/// Limits applied to every execution.
#[derive(Debug, Clone)]
pub struct ExecLimits {
    /// Bytes kept per stream (stdout and stderr each); the rest is counted and dropped.
    pub max_output: usize,
    /// Time between SIGTERM and SIGKILL to the process group on timeout or cancel.
    pub kill_grace: Duration,
    /// Where kept output also goes as it is produced (live output). Bounded;
    /// a full channel drops the chunk (counted in `LiveSink::dropped`), so a
    /// slow consumer never stalls the command.
    pub live: Option<LiveSink>,
}

/// One piece of a command's output as it was produced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LiveChunk {
    /// 1 = stdout, 2 = stderr.
    pub stream: u8,
    pub data: Vec<u8>,
}

/// The sending side of live output.
#[derive(Debug, Clone)]
pub struct LiveSink {
    pub tx: tokio::sync::mpsc::Sender<LiveChunk>,
    pub dropped: std::sync::Arc<std::sync::atomic::AtomicU64>,
}

impl Default for ExecLimits {
    /// 1 MiB per stream, 5 s grace (invariant 7 in ARCHITECTURE.md).
    fn default() -> Self {
        ExecLimits {
            live: None,
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
    /// A path argument could not be opened beneath its prefix without
    /// following a symbolic link (or as the command's user); nothing ran.
    /// The message names the argument and why.
    PathRefused(String),
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
            paths: cmd.paths(),
            run_as: cmd.run_as(),
            env: cmd.env(),
            timeout: cmd.timeout(),
            containment: contain::Mode::Auto,
        },
        limits,
        cancel,
    )
    .await
}

/// Runs a Nagios plugin of a `nagios` check (`checks::nagios`), with the
/// same containment as a job: no shell, cleared environment, own session,
/// process group and cgroup, output capped, everything killed on timeout.
///
/// Crate-private on purpose: its argv comes only from agent.toml, written by
/// the host's admin, never from the controller or a job, so it is not a
/// path around [`AuthorizedCommand`] for anything remote. It runs as the
/// agent's own user (no `run_as`).
pub(crate) async fn execute_local_plugin(
    argv: &[String],
    env: &BTreeMap<String, String>,
    timeout: Duration,
    limits: &ExecLimits,
) -> ExecOutcome {
    // Never canceled: timeout, or dropping the future, ends it.
    let (_never, cancel) = watch::channel(false);
    run(
        Plan {
            argv,
            paths: &[],
            run_as: None,
            env,
            timeout,
            containment: contain::Mode::Auto,
        },
        limits,
        cancel,
    )
    .await
}

/// What to run; built only from an [`AuthorizedCommand`] (or by tests).
struct Plan<'a> {
    argv: &'a [String],
    /// Path arguments in `argv`, opened by the child (see the module comment).
    paths: &'a [PathArg],
    run_as: Option<&'a str>,
    env: &'a BTreeMap<String, String>,
    timeout: Duration,
    containment: contain::Mode,
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

    let cgroup = match plan.containment {
        contain::Mode::ProcessGroup => None,
        contain::Mode::Auto => {
            let created = tokio::task::spawn_blocking(|| {
                contain::cgroup_parent().map(contain::JobCgroup::create)
            })
            .await;
            match created {
                Ok(None) => None,
                Ok(Some(Ok(cgroup))) => Some(cgroup),
                // Fail closed: the host has cgroups, so a job that could not
                // get one might leave processes behind.
                Ok(Some(Err(err))) => return failed(format!("creating the job cgroup: {err}")),
                Err(err) => return failed(format!("creating the job cgroup: {err}")),
            }
        }
    };

    let paths = match PreparedPaths::new(plan.argv, plan.paths) {
        Ok(p) => p,
        Err(err) => {
            if let Some(cgroup) = cgroup {
                cgroup.discard().await;
            }
            return failed(format!("preparing path arguments: {err}"));
        }
    };
    let mut command = Command::new(program);
    command
        .args(&paths.argv[1..])
        .env_clear()
        .env("PATH", CHILD_PATH)
        .env("LANG", "C.UTF-8")
        .envs(plan.env)
        .current_dir("/")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    isolate_child(
        &mut command,
        ChildSetup {
            credentials,
            cgroup_procs: cgroup.as_ref().and_then(contain::JobCgroup::procs_fd),
            fd_limit: fd_limit(),
            path_errors: paths.errors_fd(),
        },
        paths.child.clone(),
    );

    let spawned = command.spawn();
    // The child has exec'd or failed: the reserved numbers are free again.
    let path_refusal = spawned
        .as_ref()
        .err()
        .and_then(|_| paths.refusal(plan.run_as));
    // The command moved itself into the cgroup before exec (or failed).
    let mut cgroup = cgroup;
    if let Some(cgroup) = &mut cgroup {
        cgroup.close_procs();
    }
    let mut child = match spawned {
        Ok(child) => child,
        Err(err) => {
            if let Some(cgroup) = cgroup {
                cgroup.discard().await;
            }
            if let Some(refusal) = path_refusal {
                return ExecOutcome {
                    termination: Termination::PathRefused(refusal),
                    ..failed(String::new())
                };
            }
            let who = plan
                .run_as
                .map(|u| format!(" as user `{u}`"))
                .unwrap_or_default();
            return failed(format!("spawn `{program}`{who}: {err}"));
        }
    };
    // The child called setsid(), so its pid is also its process group id.
    let Some(pgid) = child.id().and_then(|pid| libc::pid_t::try_from(pid).ok()) else {
        // Only a child already reaped has no id; nothing is left to contain.
        if let Some(cgroup) = cgroup {
            cgroup.discard().await;
        }
        return failed(format!("spawn `{program}`: no process id"));
    };
    let mut jail = contain::Jail::new(pgid, cgroup);
    tracing::debug!(program = %program, pid = pgid, "command started");

    let mut stdout = Capture::new(limits.max_output);
    let mut stderr = Capture::new(limits.max_output);
    stdout.live = limits.live.clone().map(|l| (l, 1));
    stderr.live = limits.live.clone().map(|l| (l, 2));
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
            &mut jail,
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
    // Everything is dead and reaped; only the cgroup directory is left.
    jail.release().await;

    ExecOutcome {
        termination,
        stdout: stdout.kept,
        stderr: stderr.kept,
        stdout_dropped: stdout.dropped,
        stderr_dropped: stderr.dropped,
        duration: started.elapsed(),
    }
}

/// Waits for the child, enforcing timeout and cancel; always leaves
/// everything the command started killed and the child reaped.
async fn supervise(
    child: &mut Child,
    jail: &mut contain::Jail,
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
    tokio::pin!(canceled);
    let expired = tokio::time::sleep(timeout);
    tokio::pin!(expired);
    let termination = loop {
        let sweep = jail.sweep_interval();
        tokio::select! {
            status = child.wait() => {
                // Whatever the child started may still run: kill it too.
                jail.finish().await;
                return match status {
                    Ok(status) => exit_termination(status),
                    Err(err) => Termination::SpawnFailed(format!("waiting for the process: {err}")),
                };
            }
            () = &mut expired => break Termination::TimedOut,
            () = &mut canceled => break Termination::Canceled,
            () = sleep_or_forever(sweep) => jail.record().await,
        }
    };

    jail.record().await;
    jail.signal(libc::SIGTERM);
    let deadline = tokio::time::Instant::now() + kill_grace;
    let mut reaped = false;
    // Give everything, not only the child, the grace period to exit.
    loop {
        if reaped && !jail.has_members() {
            break;
        }
        let tick = tokio::time::sleep_until(deadline.min(tokio::time::Instant::now() + TERM_POLL));
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
    jail.record().await;
    let hit = jail.kill();
    if !reaped && let Err(err) = child.wait().await {
        tracing::warn!(error = %err, "waiting for the process after SIGKILL");
    }
    if hit {
        jail.settle().await;
    }
    termination
}

/// Sleeps for `period`, or forever when there is none.
async fn sleep_or_forever(period: Option<Duration>) {
    match period {
        Some(period) => tokio::time::sleep(period).await,
        None => std::future::pending().await,
    }
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

/// One path argument as the child opens it (see the module comment);
/// every string prepared before the fork.
#[derive(Debug)]
struct ChildPath {
    /// The number the command receives it as (reserved by the parent).
    target: RawFd,
    prefix: CString,
    /// Below the prefix; empty for the prefix itself.
    beneath: CString,
    /// With `create`: the parent directory below the prefix (empty: the
    /// prefix) and the leaf name.
    create: Option<(CString, CString)>,
}

/// The path arguments of one execution: argv with `/proc/self/fd/N` in
/// their places, the numbers reserved (held open on `/dev/null` until the
/// child has exec'd, so nothing else takes them), and the pipe on which the
/// child reports which one it could not open.
struct PreparedPaths<'a> {
    argv: std::borrow::Cow<'a, [String]>,
    paths: &'a [PathArg],
    child: std::sync::Arc<[ChildPath]>,
    _reserved: Vec<std::fs::File>,
    errors: Option<(std::io::PipeReader, std::io::PipeWriter)>,
}

/// The size of one report on the path error pipe: the path's index and
/// the errno, both little-endian `i32`.
const PATH_ERROR_LEN: usize = 8;

impl<'a> PreparedPaths<'a> {
    fn new(argv: &'a [String], paths: &'a [PathArg]) -> io::Result<PreparedPaths<'a>> {
        if paths.is_empty() {
            return Ok(PreparedPaths {
                argv: std::borrow::Cow::Borrowed(argv),
                paths,
                child: std::sync::Arc::from(Vec::new()),
                _reserved: Vec::new(),
                errors: None,
            });
        }
        let cstring = |s: &str| {
            CString::new(s)
                .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "NUL in a path"))
        };
        let mut owned = argv.to_vec();
        let mut reserved = Vec::with_capacity(paths.len());
        let mut child = Vec::with_capacity(paths.len());
        for p in paths {
            // Opened close-on-exec; the child puts the checked path here.
            let slot = std::fs::File::open("/dev/null")?;
            let target = slot.as_raw_fd();
            reserved.push(slot);
            let elem = owned.get_mut(p.index).ok_or_else(|| {
                io::Error::new(io::ErrorKind::InvalidInput, "path index beyond argv")
            })?;
            *elem = format!("/proc/self/fd/{target}");
            let create = if p.create {
                let (parent, leaf) = p.beneath.rsplit_once('/').unwrap_or(("", &p.beneath));
                Some((cstring(parent)?, cstring(leaf)?))
            } else {
                None
            };
            child.push(ChildPath {
                target,
                prefix: cstring(&p.prefix)?,
                beneath: cstring(&p.beneath)?,
                create,
            });
        }
        Ok(PreparedPaths {
            argv: std::borrow::Cow::Owned(owned),
            paths,
            child: std::sync::Arc::from(child),
            _reserved: reserved,
            errors: Some(io::pipe()?),
        })
    }

    fn errors_fd(&self) -> Option<RawFd> {
        self.errors.as_ref().map(|(_, w)| w.as_raw_fd())
    }

    /// After a failed spawn: which path argument the child refused, and why.
    fn refusal(self, run_as: Option<&str>) -> Option<String> {
        use std::io::Read as _;
        let (mut reader, writer) = self.errors?;
        // Our copy closed, so the read ends (the child's copy is gone with it).
        drop(writer);
        let mut report = [0u8; PATH_ERROR_LEN];
        reader.read_exact(&mut report).ok()?;
        let index = i32::from_le_bytes([report[0], report[1], report[2], report[3]]);
        let errno = i32::from_le_bytes([report[4], report[5], report[6], report[7]]);
        let p = self.paths.get(usize::try_from(index).ok()?)?;
        Some(path_refusal(p, errno, run_as))
    }
}

/// Why path argument `p` was refused, from the child's errno.
fn path_refusal(p: &PathArg, errno: i32, run_as: Option<&str>) -> String {
    let path = if p.beneath.is_empty() {
        p.prefix.clone()
    } else {
        format!("{}/{}", p.prefix.trim_end_matches('/'), p.beneath)
    };
    let why = match errno {
        libc::ELOOP => format!(
            "{path} is, or passes through, a symbolic link below {}",
            p.prefix
        ),
        libc::EXDEV => format!("{path} resolves outside {}", p.prefix),
        libc::ENOENT if p.create => format!("a directory of {path} does not exist"),
        libc::ENOENT => format!("{path} does not exist (the argument does not set `create`)"),
        libc::ENOTDIR => format!("a parent of {path} is not a directory"),
        libc::EACCES | libc::EPERM => format!(
            "user `{}` may not open {path}",
            run_as.unwrap_or("of the agent")
        ),
        libc::ENOSYS => {
            "this kernel lacks openat2 (Linux 5.6 or later is needed for path arguments)".to_owned()
        }
        other => format!("{path}: {}", io::Error::from_raw_os_error(other)),
    };
    format!("argument `{}`: {why}", p.arg)
}

/// `struct open_how` of `openat2(2)`.
#[repr(C)]
struct OpenHow {
    flags: u64,
    mode: u64,
    resolve: u64,
}

/// The errno of the last failed call (no allocation: fine after fork).
fn errno() -> libc::c_int {
    io::Error::last_os_error()
        .raw_os_error()
        .unwrap_or(libc::EIO)
}

/// `openat2(dir, path, flags | O_CLOEXEC)` never through a symbolic link
/// (not even a magic one) and never out of `dir`. Async-signal-safe.
#[allow(unsafe_code)]
fn open_beneath(dir: libc::c_int, path: &CStr, flags: libc::c_int) -> libc::c_int {
    let how = OpenHow {
        flags: u64::try_from(flags | libc::O_CLOEXEC).unwrap_or(0),
        mode: 0,
        resolve: libc::RESOLVE_BENEATH | libc::RESOLVE_NO_SYMLINKS | libc::RESOLVE_NO_MAGICLINKS,
    };
    // SAFETY: `path` is NUL-terminated and `how` a valid `open_how` of the
    // size passed; openat2 only reads them.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_openat2,
            dir,
            path.as_ptr(),
            &how as *const OpenHow,
            std::mem::size_of::<OpenHow>(),
        )
    };
    libc::c_int::try_from(fd).unwrap_or(-1)
}

/// Opens one path argument in the child, as the command's user: the
/// prefix, then the rest beneath it (created with `create`). `Err(errno)`.
/// Async-signal-safe: only raw system calls on prepared strings.
#[allow(unsafe_code)]
fn open_path_arg(p: &ChildPath) -> Result<libc::c_int, libc::c_int> {
    // SAFETY: a NUL-terminated path; open has no other precondition.
    let dir = unsafe {
        libc::open(
            p.prefix.as_ptr(),
            libc::O_PATH | libc::O_DIRECTORY | libc::O_CLOEXEC,
        )
    };
    if dir < 0 {
        return Err(errno());
    }
    if p.beneath.is_empty() {
        return Ok(dir);
    }
    let result = open_below(dir, p);
    // SAFETY: `dir` is an fd this function opened.
    unsafe { libc::close(dir) };
    result
}

#[allow(unsafe_code)]
fn open_below(dir: libc::c_int, p: &ChildPath) -> Result<libc::c_int, libc::c_int> {
    let fd = open_beneath(dir, &p.beneath, libc::O_PATH);
    if fd >= 0 {
        return Ok(fd);
    }
    let err = errno();
    let (Some((parent, leaf)), libc::ENOENT) = (&p.create, err) else {
        return Err(err);
    };
    let parent_fd = if parent.is_empty() {
        dir
    } else {
        open_beneath(dir, parent, libc::O_PATH | libc::O_DIRECTORY)
    };
    if parent_fd < 0 {
        return Err(errno());
    }
    // O_EXCL never follows a symlink at the leaf: one that appeared
    // meanwhile makes it fail with EEXIST, and the leaf is then resolved
    // (and refused) like any existing one.
    // SAFETY: a NUL-terminated name relative to an fd opened above.
    let created = unsafe {
        libc::openat(
            parent_fd,
            leaf.as_ptr(),
            libc::O_CREAT | libc::O_EXCL | libc::O_WRONLY | libc::O_NOFOLLOW | libc::O_CLOEXEC,
            0o666 as libc::c_uint,
        )
    };
    let result = if created >= 0 {
        Ok(created)
    } else if errno() == libc::EEXIST {
        let fd = open_beneath(dir, &p.beneath, libc::O_PATH);
        if fd >= 0 { Ok(fd) } else { Err(errno()) }
    } else {
        Err(errno())
    };
    if parent_fd != dir {
        // SAFETY: an fd opened above.
        unsafe { libc::close(parent_fd) };
    }
    result
}

/// Opens every path argument at its reserved number (without close-on-exec,
/// so the command inherits it); on failure reports `(index, errno)` on
/// `errors`. Runs in the child after the switch to the command's user.
#[allow(unsafe_code)]
fn place_path_args(paths: &[ChildPath], errors: Option<RawFd>) -> io::Result<()> {
    for (i, p) in paths.iter().enumerate() {
        let fd = match open_path_arg(p) {
            Ok(fd) => fd,
            Err(err) => {
                let mut report = [0u8; PATH_ERROR_LEN];
                report[..4].copy_from_slice(&i32::try_from(i).unwrap_or(i32::MAX).to_le_bytes());
                report[4..].copy_from_slice(&err.to_le_bytes());
                if let Some(w) = errors {
                    // SAFETY: writes a stack buffer to the pipe opened before the fork.
                    unsafe { libc::write(w, report.as_ptr().cast(), PATH_ERROR_LEN) };
                }
                return Err(io::Error::from_raw_os_error(err));
            }
        };
        // SAFETY: both fds are open in this process; dup2 clears
        // close-on-exec on the target, which is what is inherited.
        let placed = unsafe { libc::dup2(fd, p.target) };
        let err = errno();
        // SAFETY: an fd opened above.
        unsafe { libc::close(fd) };
        if placed < 0 {
            return Err(io::Error::from_raw_os_error(err));
        }
    }
    Ok(())
}

/// Everything the child needs between fork and exec, prepared before the
/// fork (nothing there may allocate, take a lock or look anything up).
#[derive(Debug, Clone, Copy)]
struct ChildSetup {
    credentials: Option<Credentials>,
    /// The job cgroup's `cgroup.procs`, open for writing (close-on-exec).
    cgroup_procs: Option<RawFd>,
    /// Fds below this are marked close-on-exec when `close_range` is missing.
    fd_limit: libc::c_int,
    /// Where the child reports a path argument it could not open.
    path_errors: Option<RawFd>,
}

/// The soft `RLIMIT_NOFILE`: no fd of this process is at or above it
/// (unless the limit was lowered after opening, which the agent never does).
#[allow(unsafe_code)]
fn fd_limit() -> libc::c_int {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the valid struct passed.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        return 1 << 20;
    }
    libc::c_int::try_from(limit.rlim_cur).unwrap_or(libc::c_int::MAX)
}

/// Sets up the child between fork and exec: into the job cgroup, new
/// session and process group, `no_new_privs`, every fd ≥ 3 close-on-exec,
/// then (if asked) groups, gid and uid, in that order; then, as that user,
/// the path arguments at their reserved numbers.
#[allow(unsafe_code)]
fn isolate_child(command: &mut Command, setup: ChildSetup, paths: std::sync::Arc<[ChildPath]>) {
    // SAFETY: the closure runs in the forked child before exec, where only
    // async-signal-safe functions may be called. It calls only the raw
    // syscall wrappers write, setsid, prctl, syscall(close_range), fcntl,
    // setgroups, setgid and setuid, reads errno through
    // `io::Error::last_os_error` (no allocation), and touches no memory but
    // its captured `Copy` setup (the user was looked up, the cgroup file
    // opened and the fd limit read before fork).
    unsafe {
        command.pre_exec(move || {
            if let Some(procs) = setup.cgroup_procs {
                // "0" moves the writing process. First, so that everything
                // the command ever does happens inside the cgroup.
                if libc::write(procs, b"0".as_ptr().cast(), 1) != 1 {
                    return Err(io::Error::last_os_error());
                }
            }
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
            // Close-on-exec rather than closed: the standard library reports
            // a failed exec through a pipe that must stay open until then.
            if libc::syscall(
                libc::SYS_close_range,
                3 as libc::c_uint,
                libc::c_uint::MAX,
                libc::CLOSE_RANGE_CLOEXEC,
            ) != 0
            {
                // Before Linux 5.11. EBADF (not open) is the common case.
                for fd in 3..setup.fd_limit {
                    libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC);
                }
            }
            if let Some(Credentials { uid, gid }) = setup.credentials {
                // Only the primary group: no supplementary group of the agent leaks.
                if libc::setgroups(1, &gid) != 0 || libc::setgid(gid) != 0 || libc::setuid(uid) != 0
                {
                    return Err(io::Error::last_os_error());
                }
            }
            // After the switch: opened with the command's user's rights.
            place_path_args(&paths, setup.path_errors)
        });
    }
}

/// One output stream: the first `cap` bytes kept, the rest counted.
struct Capture {
    cap: usize,
    kept: Vec<u8>,
    dropped: u64,
    live: Option<(LiveSink, u8)>,
}

impl Capture {
    fn new(cap: usize) -> Capture {
        Capture {
            cap,
            kept: Vec::new(),
            dropped: 0,
            live: None,
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
        let needed = self.kept.len() + room;
        if needed > self.kept.capacity() {
            // Grow by doubling, but never past the cap: `Vec`'s own growth
            // could reserve up to twice the cap.
            let target = needed.max(self.kept.capacity() * 2).min(self.cap);
            self.kept.reserve_exact(target - self.kept.len());
        }
        self.kept.extend_from_slice(&bytes[..room]);
        self.dropped += (bytes.len() - room) as u64;
        if room > 0
            && let Some((sink, stream)) = &self.live
        {
            let chunk = LiveChunk {
                stream: *stream,
                data: bytes[..room].to_vec(),
            };
            if sink.tx.try_send(chunk).is_err() {
                sink.dropped
                    .fetch_add(room as u64, std::sync::atomic::Ordering::Relaxed);
            }
        }
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
        paths: Vec<PathArg>,
        run_as: Option<&'a str>,
        env: BTreeMap<String, String>,
        timeout: Duration,
        limits: ExecLimits,
        containment: contain::Mode,
    }

    impl<'a> Run<'a> {
        fn new(args: &[&str]) -> Run<'a> {
            Run {
                argv: argv(args),
                paths: Vec::new(),
                run_as: None,
                env: BTreeMap::new(),
                timeout: Duration::from_secs(20),
                limits: ExecLimits::default(),
                containment: contain::Mode::Auto,
            }
        }

        async fn with_cancel(&self, cancel: watch::Receiver<bool>) -> ExecOutcome {
            let plan = Plan {
                argv: &self.argv,
                paths: &self.paths,
                run_as: self.run_as,
                env: &self.env,
                timeout: self.timeout,
                containment: self.containment,
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

    // ---- Process-wide checks, each run alone in a fresh copy of this test
    // binary (concurrent tests would disturb the environment, the fd table,
    // the set of children and the peak memory they look at).

    /// Set in the fresh process to the name of the one test it runs.
    const ISOLATED: &str = "FLEETCMD_EXEC_ISOLATED";

    /// True in the fresh process; in the normal test run, runs `test` there
    /// (with `env` added to its environment), asserts it passed, and returns
    /// false.
    fn isolated(test: &str, env: &[(&str, &str)]) -> bool {
        if std::env::var(ISOLATED).is_ok_and(|t| t == test) {
            return true;
        }
        let module = module_path!()
            .split_once("::")
            .expect("module path has a crate prefix")
            .1;
        let name = format!("{module}::{test}");
        let out = std::process::Command::new(std::env::current_exe().expect("test binary path"))
            .args([name.as_str(), "--exact", "--nocapture", "--test-threads=1"])
            .env(ISOLATED, test)
            .envs(env.iter().copied())
            .output()
            .expect("run the test binary again");
        let stdout = String::from_utf8_lossy(&out.stdout);
        let stderr = String::from_utf8_lossy(&out.stderr);
        println!("--- isolated {name} ---\n{stdout}{stderr}");
        assert!(out.status.success(), "isolated {name} failed");
        assert!(
            stdout.contains("1 passed"),
            "isolated run ran no test `{name}`"
        );
        false
    }

    fn assert_root() {
        assert_eq!(
            effective_uid(),
            0,
            "this test checks privilege dropping and needs root (CI runs tests as root)"
        );
    }

    /// Children of this process that are zombies.
    fn zombie_children() -> usize {
        let me = std::process::id().to_string();
        std::fs::read_dir("/proc")
            .expect("/proc")
            .flatten()
            .filter_map(|e| std::fs::read_to_string(e.path().join("stat")).ok())
            .filter(|stat| {
                let fields: Vec<&str> = stat
                    .rsplit_once(')')
                    .map(|(_, rest)| rest.split_whitespace().collect())
                    .unwrap_or_default();
                fields.first() == Some(&"Z") && fields.get(1) == Some(&me.as_str())
            })
            .count()
    }

    fn open_fds() -> usize {
        std::fs::read_dir("/proc/self/fd")
            .expect("/proc/self/fd")
            .count()
    }

    /// Peak resident memory of this process, in KiB.
    fn vm_hwm_kib() -> u64 {
        let status = std::fs::read_to_string("/proc/self/status").expect("/proc/self/status");
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmHWM:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .expect("VmHWM in /proc/self/status")
    }

    /// Job cgroups of this process that still exist.
    fn leftover_cgroups() -> Vec<String> {
        let Some(parent) = contain::cgroup_parent() else {
            return Vec::new();
        };
        let mine = format!("fleetcmd-job-{}-", std::process::id());
        std::fs::read_dir(parent)
            .expect("cgroup parent")
            .flatten()
            .filter_map(|e| e.file_name().into_string().ok())
            .filter(|n| n.starts_with(&mine))
            .collect()
    }

    /// Waits (bounded) until `pid` is gone.
    async fn assert_gone_eventually(pid: u32, what: &str) {
        let deadline = Instant::now() + Duration::from_secs(5);
        while alive(pid) {
            assert!(Instant::now() < deadline, "{what} {pid} is still alive");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    async fn wait_for_file(file: &Path) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !file.exists() {
            assert!(
                Instant::now() < deadline,
                "{} never appeared",
                file.display()
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    #[tokio::test]
    async fn agent_environment_never_reaches_the_child() {
        let poison = [
            ("LD_PRELOAD", "/nonexistent/fleetcmd-evil.so"),
            ("BASH_ENV", "/nonexistent/fleetcmd-evil.sh"),
            ("PATH", "/evil"),
            ("FLEETCMD_SECRET", "hunter2"),
        ];
        if !isolated("agent_environment_never_reaches_the_child", &poison) {
            return;
        }
        for (key, value) in poison {
            assert_eq!(std::env::var(key).as_deref(), Ok(value), "test setup");
        }
        let mut run = Run::new(&["/usr/bin/env"]);
        run.env
            .insert("FLEETCMD_DECLARED".to_owned(), "yes".to_owned());
        let out = run.go().await;
        assert_eq!(out.termination, Termination::Exited(0));
        // A preloaded library that does not exist would make ld.so complain here.
        assert!(out.stderr.is_empty(), "{}", text(&out.stderr));
        let mut lines: Vec<&str> = text(&out.stdout).lines().collect();
        lines.sort_unstable();
        assert_eq!(
            lines,
            [
                "FLEETCMD_DECLARED=yes",
                "LANG=C.UTF-8",
                &format!("PATH={CHILD_PATH}"),
            ]
        );
    }

    #[tokio::test]
    #[allow(unsafe_code)]
    async fn only_standard_fds_are_inherited() {
        if !isolated("only_standard_fds_are_inherited", &[]) {
            return;
        }
        // An fd opened the way a C library might: without O_CLOEXEC, once low
        // and once high (a copy at 900; dup2 never sets close-on-exec).
        // SAFETY: plain syscalls on a valid NUL-terminated path and on fds we own.
        let (low, high) = unsafe {
            let low = libc::open(c"/dev/null".as_ptr(), libc::O_RDONLY);
            assert!(low >= 3, "open: {}", io::Error::last_os_error());
            let high = libc::dup2(low, 900);
            assert_eq!(high, 900, "dup2: {}", io::Error::last_os_error());
            for fd in [low, high] {
                assert_eq!(libc::fcntl(fd, libc::F_GETFD) & libc::FD_CLOEXEC, 0);
            }
            (low, high)
        };
        let out = Run::new(&["/usr/bin/ls", "/proc/self/fd"]).go().await;
        assert_eq!(out.termination, Termination::Exited(0));
        // 3 is the directory ls itself opened to list /proc/self/fd.
        assert_eq!(
            text(&out.stdout).lines().collect::<Vec<_>>(),
            ["0", "1", "2", "3"]
        );
        // Also as another user (a different pre_exec path).
        assert_root();
        let mut run = Run::new(&["/usr/bin/ls", "/proc/self/fd"]);
        run.run_as = Some("nobody");
        let out = run.go().await;
        assert_eq!(
            text(&out.stdout).lines().collect::<Vec<_>>(),
            ["0", "1", "2", "3"]
        );
        // SAFETY: closing fds this test opened.
        unsafe {
            libc::close(low);
            libc::close(high);
        }
    }

    #[tokio::test]
    #[allow(unsafe_code)]
    async fn run_as_drops_the_agents_supplementary_groups() {
        if !isolated("run_as_drops_the_agents_supplementary_groups", &[]) {
            return;
        }
        assert_root();
        // Give the "agent" supplementary groups that must not leak.
        let groups: [libc::gid_t; 3] = [0, 4, 27];
        // SAFETY: setgroups reads `groups.len()` gids from a valid array; glibc
        // applies it to every thread of this (isolated) process.
        let set = unsafe { libc::setgroups(groups.len(), groups.as_ptr()) };
        assert_eq!(set, 0, "setgroups: {}", io::Error::last_os_error());
        let out = Run::new(&["/usr/bin/id", "-G"]).go().await;
        assert_eq!(
            text(&out.stdout),
            "0 4 27\n",
            "test setup: root keeps its groups"
        );

        let mut run = Run::new(&["/usr/bin/id", "-G"]);
        run.run_as = Some("nobody");
        let out = run.go().await;
        assert_eq!(
            out.termination,
            Termination::Exited(0),
            "{}",
            text(&out.stderr)
        );
        let primary = lookup_user("nobody")
            .expect("look up nobody")
            .expect("user nobody exists")
            .gid;
        assert_eq!(text(&out.stdout), format!("{primary}\n"));
    }

    #[tokio::test]
    async fn agent_key_is_unreadable_to_run_as_user() {
        assert_root();
        use std::os::unix::fs::PermissionsExt as _;
        // Like the agent's state dir: traversable, but the key is 0600 root.
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755))
            .expect("chmod dir");
        let key = dir.path().join("agent.key");
        std::fs::write(&key, "PRIVATE KEY").expect("write key");
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).expect("chmod key");
        let path = key.display().to_string();

        let out = Run::new(&["/usr/bin/cat", &path]).go().await;
        assert_eq!(
            text(&out.stdout),
            "PRIVATE KEY",
            "test setup: root can read it"
        );

        let mut run = Run::new(&["/usr/bin/cat", &path]);
        run.run_as = Some("nobody");
        let out = run.go().await;
        assert_eq!(out.termination, Termination::Exited(1));
        assert!(out.stdout.is_empty());
        assert!(
            text(&out.stderr).contains("Permission denied"),
            "{}",
            text(&out.stderr)
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn ten_thousand_short_jobs_leave_nothing_behind() {
        if !isolated("ten_thousand_short_jobs_leave_nothing_behind", &[]) {
            return;
        }
        const JOBS: usize = 10_000;
        const CONCURRENCY: usize = 32;
        // Warm up lazily initialized state (cgroup detection, tokio's
        // process driver) so it is not counted as a leak.
        assert_eq!(
            Run::new(&["/usr/bin/true"]).go().await.termination,
            Termination::Exited(0)
        );
        let fds_before = open_fds();
        let zombies_before = zombie_children();

        let started = Instant::now();
        let all = async {
            let mut set = tokio::task::JoinSet::new();
            let mut spawned = 0;
            let mut done = 0;
            while done < JOBS {
                while spawned < JOBS && set.len() < CONCURRENCY {
                    set.spawn(async { Run::new(&["/usr/bin/true"]).go().await });
                    spawned += 1;
                }
                let out = set
                    .join_next()
                    .await
                    .expect("jobs in flight")
                    .expect("job task panicked");
                assert_eq!(out.termination, Termination::Exited(0));
                done += 1;
            }
        };
        tokio::time::timeout(Duration::from_secs(300), all)
            .await
            .expect("10 000 jobs finish within 300 s");
        let elapsed = started.elapsed();
        println!(
            "{JOBS} jobs, {CONCURRENCY} at a time: {elapsed:?}, {:.0} jobs/s (cgroup: {})",
            JOBS as f64 / elapsed.as_secs_f64(),
            contain::cgroup_parent().is_some()
        );

        assert_eq!(zombie_children(), zombies_before, "zombies left");
        assert_eq!(zombies_before, 0);
        let fds_after = open_fds();
        assert!(
            fds_after.abs_diff(fds_before) <= 2,
            "fds before {fds_before}, after {fds_after}"
        );
        assert_eq!(leftover_cgroups(), Vec::<String>::new());
    }

    /// A shell that starts a daemon the way `daemon(3)` does (fork, setsid,
    /// parent exits: re-parented to init, outside the process group), waits
    /// until the daemon wrote its pid, then sleeps.
    fn daemonizing(pidfile: &Path) -> Vec<String> {
        let pid = pidfile.display();
        let script = format!(
            "/usr/bin/setsid -f /bin/sh -c 'echo $$ > {pid}.tmp; mv {pid}.tmp {pid}; exec sleep 300'; \
             while [ ! -e {pid} ]; do sleep 0.01; done; sleep 30"
        );
        argv(&["/bin/sh", "-c", &script])
    }

    fn assert_cgroups_available() {
        assert!(
            contain::cgroup_parent().is_some(),
            "no writable cgroup v2 hierarchy: daemonized processes cannot be contained here \
             (run with a writable cgroup2 mount, e.g. a privileged container)"
        );
    }

    #[tokio::test]
    async fn timeout_kills_a_daemonized_grandchild() {
        assert_cgroups_available();
        let dir = tempfile::tempdir().expect("tempdir");
        let pidfile = dir.path().join("pid");
        let mut run = Run::new(&[]);
        run.argv = daemonizing(&pidfile);
        run.timeout = Duration::from_secs(1);
        run.limits.kill_grace = Duration::from_millis(200);
        let out = run.go().await;
        assert_eq!(
            out.termination,
            Termination::TimedOut,
            "{}",
            text(&out.stderr)
        );
        assert!(out.duration < Duration::from_secs(10), "{:?}", out.duration);
        let daemon = read_pid(&pidfile);
        // Killed and gone by the time the executor returned.
        assert!(
            !alive(daemon),
            "daemonized grandchild {daemon} survived the timeout"
        );
        assert_eq!(leftover_cgroups(), Vec::<String>::new());
    }

    #[tokio::test]
    async fn cancel_kills_a_daemonized_grandchild() {
        assert_cgroups_available();
        let dir = tempfile::tempdir().expect("tempdir");
        let pidfile = dir.path().join("pid");
        let (tx, rx) = watch::channel(false);
        let mut run = Run::new(&[]);
        run.argv = daemonizing(&pidfile);
        run.limits.kill_grace = Duration::from_millis(200);
        let cancel = async {
            wait_for_file(&pidfile).await;
            tx.send(true).expect("receiver alive");
        };
        let (out, ()) = tokio::join!(run.with_cancel(rx), cancel);
        assert_eq!(out.termination, Termination::Canceled);
        let daemon = read_pid(&pidfile);
        assert!(
            !alive(daemon),
            "daemonized grandchild {daemon} survived the cancel"
        );
    }

    #[tokio::test]
    async fn daemonized_grandchild_is_killed_after_normal_exit() {
        assert_cgroups_available();
        let dir = tempfile::tempdir().expect("tempdir");
        let pidfile = dir.path().join("pid");
        let pid = pidfile.display();
        let script = format!(
            "/usr/bin/setsid -f /bin/sh -c 'echo $$ > {pid}.tmp; mv {pid}.tmp {pid}; exec sleep 300' >/dev/null 2>&1; \
             while [ ! -e {pid} ]; do sleep 0.01; done"
        );
        let out = Run::new(&["/bin/sh", "-c", &script]).go().await;
        assert_eq!(out.termination, Termination::Exited(0));
        let daemon = read_pid(&pidfile);
        assert!(
            !alive(daemon),
            "daemonized grandchild {daemon} outlived the job"
        );
    }

    #[tokio::test]
    async fn dropping_the_execution_kills_a_daemonized_grandchild() {
        assert_cgroups_available();
        let dir = tempfile::tempdir().expect("tempdir");
        let pidfile = dir.path().join("pid");
        let mut run = Run::new(&[]);
        run.argv = daemonizing(&pidfile);
        let (_tx, rx) = watch::channel(false);
        tokio::select! {
            _ = run.with_cancel(rx) => panic!("the command should still be running"),
            () = wait_for_file(&pidfile) => {}
        }
        let daemon = read_pid(&pidfile);
        assert_gone_eventually(daemon, "daemonized grandchild").await;
    }

    #[tokio::test]
    async fn commands_run_in_their_own_cgroup() {
        assert_cgroups_available();
        let out = Run::new(&["/usr/bin/cat", "/proc/self/cgroup"]).go().await;
        let own = text(&out.stdout)
            .lines()
            .find_map(|l| l.strip_prefix("0::"))
            .expect("a cgroup v2 line");
        let leaf = own.rsplit('/').next().unwrap_or_default();
        assert!(
            leaf.starts_with(&format!("fleetcmd-job-{}-", std::process::id())),
            "{own}"
        );
        let dir = contain::cgroup_parent().expect("checked above").join(leaf);
        assert!(!dir.exists(), "{} was not removed", dir.display());
    }

    #[tokio::test]
    async fn process_group_fallback_sweeps_setsid_descendants() {
        // Without cgroups a process that left the group by `setsid` is still
        // found while its parent lives (a double fork, as in `daemonizing`,
        // is the documented limitation).
        let dir = tempfile::tempdir().expect("tempdir");
        let pidfile = dir.path().join("pid");
        let script = format!(
            "/usr/bin/setsid /usr/bin/sleep 300 & echo $! > {}; sleep 30",
            pidfile.display()
        );
        let mut run = Run::new(&["/bin/sh", "-c", &script]);
        run.containment = contain::Mode::ProcessGroup;
        run.timeout = Duration::from_millis(500);
        run.limits.kill_grace = Duration::from_millis(200);
        let out = run.go().await;
        assert_eq!(out.termination, Termination::TimedOut);
        let escaped = read_pid(&pidfile);
        assert!(
            !alive(escaped),
            "setsid descendant {escaped} survived the timeout"
        );
    }

    #[tokio::test]
    async fn binary_flood_stays_within_the_cap() {
        let out = Run::new(&["/usr/bin/head", "-c", "5000000", "/dev/urandom"])
            .go()
            .await;
        assert_eq!(out.termination, Termination::Exited(0));
        let cap = ExecLimits::default().max_output;
        assert_eq!(out.stdout.len(), cap);
        assert_eq!(out.stdout_dropped, 5_000_000 - cap as u64);
        assert!(out.stdout.capacity() <= cap, "{}", out.stdout.capacity());
    }

    #[tokio::test]
    async fn invalid_utf8_is_kept_byte_for_byte() {
        let mut run = Run::new(&["/usr/bin/printf", r"\377\376ok\200\300"]);
        run.limits.max_output = 4;
        let out = run.go().await;
        assert_eq!(out.termination, Termination::Exited(0));
        assert_eq!(out.stdout, b"\xff\xfeok");
        assert_eq!(out.stdout_dropped, 2);
    }

    #[tokio::test]
    async fn flood_does_not_grow_memory() {
        if !isolated("flood_does_not_grow_memory", &[]) {
            return;
        }
        let before = vm_hwm_kib();
        let mut run = Run::new(&["/usr/bin/head", "-c", "200000000", "/dev/zero"]);
        run.limits.max_output = 1024 * 1024;
        run.timeout = Duration::from_secs(120);
        let out = run.go().await;
        let after = vm_hwm_kib();
        assert_eq!(out.termination, Termination::Exited(0));
        assert_eq!(out.stdout.len(), 1024 * 1024);
        assert_eq!(out.stdout_dropped, 200_000_000 - 1024 * 1024);
        println!("VmHWM before {before} KiB, after {after} KiB");
        assert!(
            after.saturating_sub(before) < 32 * 1024,
            "peak memory grew from {before} KiB to {after} KiB"
        );
    }

    #[test]
    fn capture_never_reserves_past_the_cap() {
        for cap in [0, 1, 1000, 65_536, 1_000_000, 1 << 20] {
            let mut capture = Capture::new(cap);
            for _ in 0..40 {
                capture.push(&[1; 65_536]);
                assert!(capture.kept.capacity() <= cap, "cap {cap}");
            }
            assert_eq!(capture.kept.len(), cap);
        }
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

    /// A prefix directory (world-traversable, for `run_as` tests) with a
    /// secret file outside it and the attacker's symlinks inside it.
    struct PathScene {
        _tmp: tempfile::TempDir,
        prefix: std::path::PathBuf,
        secret: std::path::PathBuf,
    }

    fn path_scene() -> PathScene {
        use std::os::unix::fs::{PermissionsExt as _, symlink};
        let tmp = tempfile::tempdir().expect("tempdir");
        std::fs::set_permissions(tmp.path(), std::fs::Permissions::from_mode(0o755))
            .expect("chmod");
        let prefix = tmp.path().join("logs");
        std::fs::create_dir(&prefix).expect("prefix");
        std::fs::create_dir(prefix.join("app")).expect("app");
        std::fs::write(prefix.join("app").join("app.log"), "log line\n").expect("log");
        let secret = tmp.path().join("secret");
        std::fs::write(&secret, "SECRET\n").expect("secret");
        symlink(&secret, prefix.join("leaf-link")).expect("leaf symlink");
        symlink(tmp.path(), prefix.join("parent-link")).expect("parent symlink");
        for dir in [&prefix, &prefix.join("app")] {
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o777)).expect("chmod");
        }
        PathScene {
            _tmp: tmp,
            prefix,
            secret,
        }
    }

    impl PathScene {
        /// A run of `args` whose element 1 is the path argument `beneath`.
        fn run(&self, args: &[&str], beneath: &str, create: bool) -> Run<'static> {
            let mut run = Run::new(args);
            run.argv[1] = self.prefix.join(beneath).display().to_string();
            run.paths = vec![PathArg {
                index: 1,
                arg: "file".into(),
                prefix: self.prefix.display().to_string(),
                beneath: beneath.into(),
                create,
            }];
            run
        }
    }

    fn refused(out: &ExecOutcome) -> String {
        match &out.termination {
            Termination::PathRefused(why) => why.clone(),
            other => panic!(
                "expected a path refusal, got {other:?}: {}",
                text(&out.stdout)
            ),
        }
    }

    #[tokio::test]
    async fn a_path_argument_is_handed_over_as_the_descriptor_checked() {
        let scene = path_scene();
        let out = scene
            .run(&["/bin/cat", "x"], "app/app.log", false)
            .go()
            .await;
        assert_eq!(out.termination, Termination::Exited(0), "{out:?}");
        assert_eq!(text(&out.stdout), "log line\n");
        // The command sees a descriptor, not the name.
        let out = scene
            .run(&["/bin/echo", "x"], "app/app.log", false)
            .go()
            .await;
        assert!(text(&out.stdout).starts_with("/proc/self/fd/"), "{out:?}");
        // The prefix itself.
        let out = scene.run(&["/usr/bin/ls", "x"], "", false).go().await;
        assert!(text(&out.stdout).contains("app"), "{out:?}");
    }

    #[tokio::test]
    async fn symlinks_at_the_leaf_or_in_a_parent_are_refused() {
        let scene = path_scene();
        let why = refused(&scene.run(&["/bin/cat", "x"], "leaf-link", false).go().await);
        assert!(
            why.starts_with("argument `file`: ") && why.contains("symbolic link"),
            "{why}"
        );
        let why = refused(
            &scene
                .run(&["/bin/cat", "x"], "parent-link/secret", false)
                .go()
                .await,
        );
        assert!(why.contains("symbolic link"), "{why}");
        // Also when the command may create the file: never through a link.
        let why = refused(&scene.run(&["/bin/cat", "x"], "leaf-link", true).go().await);
        assert!(why.contains("symbolic link"), "{why}");
        let why = refused(
            &scene
                .run(&["/usr/bin/touch", "x"], "parent-link/new", true)
                .go()
                .await,
        );
        assert!(why.contains("symbolic link"), "{why}");
        assert!(
            !scene
                .prefix
                .parent()
                .map(|p| p.join("new").exists())
                .unwrap_or(true)
        );
        assert_eq!(
            std::fs::read_to_string(&scene.secret).ok().as_deref(),
            Some("SECRET\n")
        );
    }

    #[tokio::test]
    async fn a_symlink_swapped_in_after_the_check_is_harmless() {
        let scene = path_scene();
        // The command itself replaces the file by a symlink to the secret
        // once the agent has opened it, then reads "the file": it reads
        // what was checked, never the secret.
        let real = scene.prefix.join("app/app.log").display().to_string();
        let secret = scene.secret.display().to_string();
        let mut run = scene.run(
            &[
                "/bin/sh",
                "x",
                "-c",
                "mv \"$2\" \"$2.old\" && ln -s \"$3\" \"$2\" && cat \"$1\"",
                "sh",
            ],
            "app/app.log",
            false,
        );
        // sh -c SCRIPT sh PATH REAL SECRET: the path argument is $1.
        run.argv = vec![
            "/bin/sh".into(),
            "-c".into(),
            "mv \"$2\" \"$2.old\" && ln -s \"$3\" \"$2\" && cat \"$1\"".into(),
            "sh".into(),
            real.clone(),
            real,
            secret,
        ];
        run.paths[0].index = 4;
        let out = run.go().await;
        assert_eq!(out.termination, Termination::Exited(0), "{out:?}");
        assert_eq!(text(&out.stdout), "log line\n");
    }

    #[tokio::test]
    async fn missing_files_are_created_only_with_create() {
        let scene = path_scene();
        let why = refused(
            &scene
                .run(&["/usr/bin/touch", "x"], "app/new.log", false)
                .go()
                .await,
        );
        assert!(why.contains("does not exist"), "{why}");
        assert!(!scene.prefix.join("app/new.log").exists());
        let mut run = scene.run(&["/bin/sh", "x"], "app/new.log", true);
        run.argv = vec![
            "/bin/sh".into(),
            "-c".into(),
            "echo hi >> \"$1\"".into(),
            "sh".into(),
            String::new(),
        ];
        run.paths[0].index = 4;
        let out = run.go().await;
        assert_eq!(out.termination, Termination::Exited(0), "{out:?}");
        assert_eq!(
            std::fs::read_to_string(scene.prefix.join("app/new.log"))
                .ok()
                .as_deref(),
            Some("hi\n")
        );
        let why = refused(
            &scene
                .run(&["/usr/bin/touch", "x"], "nodir/new.log", true)
                .go()
                .await,
        );
        assert!(why.contains("does not exist"), "{why}");
    }

    #[tokio::test]
    async fn path_arguments_are_opened_with_the_run_as_users_rights() {
        use std::os::unix::fs::PermissionsExt as _;
        assert_root();
        let scene = path_scene();
        let private = scene.prefix.join("private");
        std::fs::create_dir(&private).expect("private dir");
        std::fs::write(private.join("key"), "KEY\n").expect("key");
        std::fs::set_permissions(&private, std::fs::Permissions::from_mode(0o700)).expect("chmod");
        let mut run = scene.run(&["/bin/cat", "x"], "private/key", false);
        run.run_as = Some("nobody");
        let why = refused(&run.go().await);
        assert!(why.contains("user `nobody` may not open"), "{why}");
        // A file the user may not read: the descriptor gives no more right.
        std::fs::set_permissions(&private, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        std::fs::set_permissions(private.join("key"), std::fs::Permissions::from_mode(0o600))
            .expect("chmod");
        let mut run = scene.run(&["/bin/cat", "x"], "private/key", false);
        run.run_as = Some("nobody");
        let out = run.go().await;
        assert_eq!(out.termination, Termination::Exited(1), "{out:?}");
        assert!(!text(&out.stdout).contains("KEY"));
        // Only 0-2 and the path argument are inherited.
        let mut run = scene.run(&["/usr/bin/ls", "x", "/proc/self/fd"], "app/app.log", false);
        run.run_as = Some("nobody");
        let out = run.go().await;
        let fd = text(&out.stdout)
            .lines()
            .next()
            .unwrap_or_default()
            .rsplit('/')
            .next()
            .unwrap_or_default()
            .to_owned();
        let listed: Vec<&str> = text(&out.stdout)
            .lines()
            .skip(1)
            .filter(|l| !l.is_empty() && !l.ends_with(':'))
            .collect();
        assert!(listed.contains(&fd.as_str()), "{out:?}");
        assert!(listed.len() <= 5, "{listed:?}");
    }
}
