//! Starting a plugin process: environment cleared except a minimal `PATH`
//! and the secrets its manifest declares, its own session, no file
//! descriptor of the gateway but stdin, stdout and stderr, no new
//! privileges, `RLIMIT_AS` for memory — and, sandboxed (the default), its
//! own user and PID namespace, a process limit and its Landlock ruleset
//! ([`super::sandbox`]).

use std::io;
use std::process::Stdio;

use tokio::process::{Child, Command};

use super::config::PluginSpec;
use super::sandbox::{Sandbox, landlock, seccomp, set_process_option};

/// The only `PATH` a plugin gets.
pub const PLUGIN_PATH: &str = "/usr/local/bin:/usr/bin:/bin";

/// Processes a sandboxed plugin may have at once, itself included
/// (`RLIMIT_NPROC`, counted in its own user namespace; not enforced by
/// the kernel when the gateway runs as root).
pub const MAX_PROCESSES: u64 = 64;

/// A started plugin: the process the gateway holds (with a sandbox, the
/// reaper whose child is the plugin: killing it kills the plugin's whole
/// PID namespace) and the sandbox, whose scratch directory lives as long.
#[derive(Debug)]
pub struct Spawned {
    pub child: Child,
    pub sandbox: Option<Sandbox>,
}

/// Starts the plugin with piped stdio (dropped child: killed).
pub fn spawn(spec: &PluginSpec) -> io::Result<Spawned> {
    let sandbox = spec
        .sandbox
        .as_ref()
        .map(|sandbox| Sandbox::prepare(&spec.manifest.name, sandbox))
        .transpose()?;
    let mut cmd = Command::new(&spec.manifest.executable);
    cmd.env_clear()
        .env("PATH", PLUGIN_PATH)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    if let Some(dir) = spec.manifest.executable.parent() {
        cmd.current_dir(dir);
    }
    if let Some(sandbox) = &sandbox {
        cmd.env("HOME", sandbox.scratch())
            .env("TMPDIR", sandbox.scratch());
    }
    for (name, value) in &spec.secrets {
        cmd.env(name, value.expose());
    }
    confine(
        &mut cmd,
        spec.limits.memory_bytes,
        sandbox.as_ref().map(Sandbox::ruleset_fd),
    );
    let child = cmd.spawn().map_err(|e| match &sandbox {
        Some(_)
            if e.raw_os_error()
                .is_some_and(|n| n == libc::EPERM || n == libc::ENOSPC || n == libc::EINVAL) =>
        {
            io::Error::new(
                e.kind(),
                format!(
                    "{e} (while entering its sandbox: are unprivileged user namespaces allowed? \
                     `sandbox = false` runs it without one)"
                ),
            )
        }
        _ => e,
    })?;
    Ok(Spawned { child, sandbox })
}

/// Between fork and exec: new session; sandboxed, a new user and PID
/// namespace whose process 1 becomes the plugin (the forked process stays
/// outside as its reaper, killed with the gateway); no new privileges, the
/// Landlock ruleset and seccomp filter, the limits, every fd ≥ 3
/// close-on-exec.
#[allow(unsafe_code)]
fn confine(cmd: &mut Command, memory_bytes: u64, ruleset: Option<std::os::fd::RawFd>) {
    let fd_limit = fd_limit();
    // SAFETY: the closure runs in the forked child before exec and calls
    // only async-signal-safe syscall wrappers (setsid, getppid, unshare,
    // fork, waitpid, signal, kill, _exit, prctl, setrlimit, syscall, fcntl); it reads errno
    // through `io::Error::last_os_error` (no allocation) and touches only
    // its captured `Copy` values.
    unsafe {
        cmd.pre_exec(move || {
            if libc::setsid() == -1 {
                return Err(io::Error::last_os_error());
            }
            if ruleset.is_some() {
                // Dies with the gateway (its forking thread), and with it
                // the plugin's namespace; a gateway gone already: stop.
                let gateway = libc::getppid();
                die_with_parent()?;
                if libc::getppid() != gateway {
                    libc::_exit(127);
                }
                enter_namespaces()?;
            }
            set_process_option(libc::PR_SET_NO_NEW_PRIVS, 1)?;
            if let Some(fd) = ruleset {
                landlock::restrict_self(fd)?;
                seccomp::install()?;
                set_limit(libc::RLIMIT_NPROC, MAX_PROCESSES)?;
            }
            set_limit(libc::RLIMIT_AS, memory_bytes)?;
            // Close-on-exec rather than closed: the standard library
            // reports a failed exec through a pipe that must stay open.
            if libc::syscall(
                libc::SYS_close_range,
                3 as libc::c_uint,
                libc::c_uint::MAX,
                libc::CLOSE_RANGE_CLOEXEC,
            ) != 0
            {
                for fd in 3..fd_limit {
                    libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC);
                }
            }
            Ok(())
        });
    }
}

/// In the forked child: a new user namespace (so that no capability is
/// needed) and a new PID namespace, then one more fork. The new process
/// is process 1 of the namespace and returns to become the plugin; it dies
/// with its parent (`PDEATHSIG`), and with it every process of the
/// namespace. The parent never returns: it closes every fd (the plugin's
/// pipes and the standard library's exec-error pipe are the plugin's
/// alone) and exits as the plugin did, of the same signal if one killed it.
///
/// # Safety
/// Only between fork and exec, in a single-threaded child.
#[allow(unsafe_code)]
unsafe fn enter_namespaces() -> io::Result<()> {
    // SAFETY: plain syscalls; see the function's contract.
    unsafe {
        if libc::unshare(libc::CLONE_NEWUSER | libc::CLONE_NEWPID) != 0 {
            return Err(io::Error::last_os_error());
        }
        let pid = libc::fork();
        if pid < 0 {
            return Err(io::Error::last_os_error());
        }
        if pid == 0 {
            die_with_parent()?;
            return Ok(());
        }
        libc::syscall(
            libc::SYS_close_range,
            0 as libc::c_uint,
            libc::c_uint::MAX,
            0 as libc::c_uint,
        );
        let mut status: libc::c_int = 0;
        loop {
            if libc::waitpid(pid, &mut status, 0) == pid {
                break;
            }
            if *libc::__errno_location() != libc::EINTR {
                libc::_exit(127);
            }
        }
        if libc::WIFEXITED(status) {
            libc::_exit(libc::WEXITSTATUS(status));
        }
        // Dies of the same signal, so the gateway tells a signal from an
        // exit code (a plugin's `_exit(159)` was reported as SIGSYS —
        // third outside attack). A signal that killed the plugin has a
        // default action that kills.
        let sig = libc::WTERMSIG(status);
        libc::signal(sig, libc::SIG_DFL);
        libc::kill(libc::getpid(), sig);
        libc::_exit(128 + sig);
    }
}

/// SIGKILL when the parent (thread) dies. Async-signal-safe.
fn die_with_parent() -> io::Result<()> {
    set_process_option(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong)
}

/// Sets both the soft and hard limit. Async-signal-safe.
#[allow(unsafe_code)]
fn set_limit(resource: libc::__rlimit_resource_t, value: u64) -> io::Result<()> {
    let limit = libc::rlimit {
        rlim_cur: value as libc::rlim_t,
        rlim_max: value as libc::rlim_t,
    };
    // SAFETY: setrlimit reads the valid struct passed.
    if unsafe { libc::setrlimit(resource, &limit) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// The soft `RLIMIT_NOFILE`, read before the fork.
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

/// Kills the plugin's process group (sandboxed: the reaper, and with it
/// the plugin's PID namespace, every process it started), then reaps it.
#[allow(unsafe_code)]
pub async fn kill(child: &mut Child) {
    if let Some(pid) = child.id().and_then(|p| libc::pid_t::try_from(p).ok()) {
        // SAFETY: kill has no memory preconditions; the group id is the
        // plugin's own pid (setsid above), not yet reaped.
        unsafe {
            libc::kill(-pid, libc::SIGKILL);
        }
    }
    let _ = child.kill().await;
}
