//! Starting a plugin process: environment cleared except a minimal `PATH`
//! and the secrets its manifest declares, its own session (so a timeout
//! kills it and its children), `RLIMIT_AS` for memory, no file descriptor
//! of the gateway but stdin, stdout and stderr, and no new privileges.

use std::io;
use std::process::Stdio;

use tokio::process::{Child, Command};

use super::config::PluginSpec;

/// The only `PATH` a plugin gets.
pub const PLUGIN_PATH: &str = "/usr/local/bin:/usr/bin:/bin";

/// Starts the plugin with piped stdio (dropped child: killed).
pub fn spawn(spec: &PluginSpec) -> io::Result<Child> {
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
    for (name, value) in &spec.secrets {
        cmd.env(name, value.expose());
    }
    confine(&mut cmd, spec.limits.memory_bytes);
    cmd.spawn()
}

/// Between fork and exec: new session, no new privileges, the memory
/// limit, every fd ≥ 3 close-on-exec.
#[allow(unsafe_code)]
fn confine(cmd: &mut Command, memory_bytes: u64) {
    let fd_limit = fd_limit();
    // SAFETY: the closure runs in the forked child before exec and calls
    // only the async-signal-safe syscall wrappers setsid, prctl,
    // setrlimit, syscall(close_range) and fcntl; it reads errno through
    // `io::Error::last_os_error` (no allocation) and touches only its
    // captured `Copy` values.
    unsafe {
        cmd.pre_exec(move || {
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
            let limit = libc::rlimit {
                rlim_cur: memory_bytes as libc::rlim_t,
                rlim_max: memory_bytes as libc::rlim_t,
            };
            if libc::setrlimit(libc::RLIMIT_AS, &limit) != 0 {
                return Err(io::Error::last_os_error());
            }
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

/// Kills the plugin's whole session (its process group), then reaps it.
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
