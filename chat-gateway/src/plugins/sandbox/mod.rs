//! What a plugin process may reach of the machine, so that a hostile
//! plugin cannot take the gateway's keys, state or process, nor another
//! plugin's secrets — although it runs as the gateway's own user.
//!
//! Three layers, all unprivileged (no capability needed by the gateway):
//! - **Landlock** (the kernel's own sandbox for unprivileged processes):
//!   the plugin may read and execute only the system's programs and
//!   libraries ([`SYSTEM_READ`]), its own folder and what the operator
//!   grants in `[[plugin]] read`; write only its private scratch directory
//!   (its `HOME` and `TMPDIR`) and `[[plugin]] write`. Landlock also
//!   forbids ptrace, and with it `/proc/PID/{mem,environ,fd}`, of every
//!   process outside the plugin's own sandbox: the gateway and the other
//!   plugins (each plugin has its own). From ABI 6 (Linux 6.12) it also
//!   refuses signals and abstract Unix sockets across the boundary.
//! - **A user and PID namespace of its own**: the plugin is process 1 of a
//!   namespace that cannot see the gateway's or another plugin's process
//!   ids (no `kill`, also below ABI 6), and when it dies the kernel kills
//!   every process it started, including those that left its process
//!   group or session. Inside, it runs as the unmapped user (`nobody`)
//!   with no capabilities.
//! - **seccomp** ([`seccomp`]): no `socket(AF_UNIX)` (Landlock does not
//!   yet govern connecting to a Unix socket that has a path) and no
//!   `io_uring`.
//! - **Limits**: no new privileges, `RLIMIT_AS` per process and
//!   `RLIMIT_NPROC` processes ([`process`](super::process) sets them).
//!   The plugin's reaper dies with the gateway, and the plugin with it.
//!
//! `[[plugin]] sandbox = false` runs a plugin without the first two, with
//! every right of the gateway's user; `validate` says so.

pub mod landlock;
pub mod seccomp;

use std::io;
use std::path::{Path, PathBuf};

use landlock::{Ruleset, fs};

pub use crate::registry::Private;

/// What the system offers every plugin to read and execute: programs,
/// libraries, interpreters' own files, name resolution, certificates, time
/// zones, and the kernel's world-readable views. Not `/etc` as a whole
/// (the gateway's configuration and keys usually live there), not `/var`,
/// `/home`, `/root`, `/srv`, `/opt` or `/tmp`.
pub const SYSTEM_READ: &[&str] = &[
    "/usr",
    "/bin",
    "/sbin",
    "/lib",
    "/lib32",
    "/lib64",
    "/libx32",
    "/proc",
    "/sys",
    "/run/systemd/resolve",
    "/etc/alternatives",
    "/etc/ca-certificates",
    "/etc/ca-certificates.conf",
    "/etc/crypto-policies",
    "/etc/gai.conf",
    "/etc/group",
    "/etc/host.conf",
    "/etc/hosts",
    "/etc/ld.so.cache",
    "/etc/ld.so.conf",
    "/etc/ld.so.conf.d",
    "/etc/locale.alias",
    "/etc/localtime",
    "/etc/mime.types",
    "/etc/nsswitch.conf",
    "/etc/os-release",
    "/etc/passwd",
    "/etc/pki",
    "/etc/protocols",
    "/etc/resolv.conf",
    "/etc/services",
    "/etc/ssl",
    "/etc/timezone",
    "/dev/random",
    "/dev/urandom",
];

/// Devices every plugin may write (and read).
pub const DEVICES_RW: &[&str] = &["/dev/null", "/dev/zero", "/dev/full"];

/// What every sandboxed plugin may read (and run) on this machine: the
/// system's share, with the `/etc/python3*` entries that exist (Debian's
/// Python reads its `sitecustomize` there) and the devices. Every check of
/// what the share exposes or what a grant could change uses this one list,
/// the list Landlock is given (a write grant on `/etc/python3.11` passed a
/// check that used only [`SYSTEM_READ`] — fourth outside attack).
pub fn system_share() -> Vec<PathBuf> {
    let mut paths: Vec<PathBuf> = SYSTEM_READ.iter().map(PathBuf::from).collect();
    if let Ok(entries) = std::fs::read_dir("/etc") {
        let mut python: Vec<PathBuf> = entries
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().starts_with("python3"))
            .map(|e| e.path())
            .collect();
        python.sort();
        paths.extend(python);
    }
    paths.extend(DEVICES_RW.iter().map(PathBuf::from));
    paths
}

/// Whether a file belongs to neither root nor this process's user (who
/// could then change what a plugin runs or reads).
pub fn owned_by_another_user(m: &std::fs::Metadata) -> bool {
    // SAFETY: geteuid has no preconditions.
    #[allow(unsafe_code)]
    let me = unsafe { libc::geteuid() };
    let owner = std::os::unix::fs::MetadataExt::uid(m);
    owner != 0 && owner != me
}

/// What one plugin may reach besides the system's share.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Grants {
    /// The plugin's folder (its manifest's directory).
    pub folder: PathBuf,
    /// `[[plugin]] read`.
    pub read: Vec<PathBuf>,
    /// `[[plugin]] write` (also readable).
    pub write: Vec<PathBuf>,
}

impl Grants {
    /// Every path the plugin may read, with what exists on this machine
    /// of the system's share (`/etc/python3*` included: Debian's Python
    /// reads its `sitecustomize` there).
    pub fn readable(&self) -> Vec<PathBuf> {
        let mut paths = system_share();
        paths.push(self.folder.clone());
        paths.extend(self.read.iter().cloned());
        paths
    }

    /// The grants as the kernel will apply them — every path resolved
    /// (symlinks, `..`, relative to the working directory) — checked
    /// against what the plugin must never reach: none of `private` (the
    /// gateway's configuration file and directory, keys, certificates,
    /// state directory, secret files) may lie on or beneath a grant or the
    /// system's share, no grant may lie beneath one of them, and no read
    /// grant (or the plugin's folder) may lie beneath a write grant, where
    /// the plugin could replace it with a link to anything. Every problem
    /// is named.
    pub fn resolved(&self, private: &Private) -> Result<Grants, Vec<String>> {
        let mut problems = Vec::new();
        let mut resolve = |what: &str, p: &Path| match std::fs::canonicalize(p) {
            Ok(c) => Some(c),
            Err(e) => {
                problems.push(format!("{what} {}: {e}", p.display()));
                None
            }
        };
        let folder = resolve("plugin folder", &self.folder);
        let read: Vec<PathBuf> = self
            .read
            .iter()
            .filter_map(|p| resolve("read grant", p))
            .collect();
        let write: Vec<PathBuf> = self
            .write
            .iter()
            .filter_map(|p| resolve("write grant", p))
            .collect();
        let canonical = |p: &Path| std::fs::canonicalize(p).unwrap_or_else(|_| p.to_path_buf());
        let config_dir = canonical(&private.config_dir);
        let private: Vec<PathBuf> = std::iter::once(config_dir.clone())
            .chain(private.paths.iter().map(|p| canonical(p)))
            .collect();
        let granted = folder
            .iter()
            .map(|p| ("its folder", p))
            .chain(read.iter().map(|p| ("read grant", p)))
            .chain(write.iter().map(|p| ("write grant", p)));
        for (what, g) in granted.clone() {
            for p in &private {
                if p.starts_with(g) {
                    problems.push(format!(
                        "{what} {} would let the plugin reach {}, which is the gateway's own",
                        g.display(),
                        p.display()
                    ));
                } else if g.starts_with(p) && p.is_dir() && *p != config_dir {
                    problems.push(format!(
                        "{what} {} lies inside {}, which is the gateway's own",
                        g.display(),
                        p.display()
                    ));
                }
            }
            // Beneath a write grant the plugin could swap a path for a
            // link between this check and the kernel's open: no grant,
            // folder or other write grant may lie there.
            if let Some(w) = write
                .iter()
                .find(|w| g.starts_with(w) && (what != "write grant" || g != *w))
            {
                problems.push(format!(
                    "{what} {} lies beneath write grant {}: the plugin could replace it",
                    g.display(),
                    w.display()
                ));
            }
        }
        // Where every plugin's scratch directory is made, and what every
        // plugin reads and runs (its PATH, its interpreter): no grant on or
        // above the first, no write grant on, above or inside the second
        // (found by the third outside attack: `read = ["/tmp"]` read
        // another plugin's scratch files; `write = ["/usr/local/bin"]`
        // could plant a `python3` every Python plugin would run).
        let scratch_parent = canonical(&std::env::temp_dir());
        for (what, g) in granted.clone() {
            if scratch_parent.starts_with(g) {
                problems.push(format!(
                    "{what} {} would reach every plugin's scratch directory in {}",
                    g.display(),
                    scratch_parent.display()
                ));
            }
        }
        let share = system_share();
        for w in &write {
            if let Some(system) = share.iter().find(|s| s.starts_with(w) || w.starts_with(s)) {
                problems.push(format!(
                    "write grant {} would let the plugin change {}, which every plugin reads and runs",
                    w.display(),
                    system.display()
                ));
            }
        }
        // A second name of a key or secret file may lie anywhere, a grant
        // included, and no path check sees it (found by the second
        // outside attack: a hard link of the signing key in a read grant).
        for p in &private {
            if let Ok(m) = std::fs::symlink_metadata(p)
                && m.is_file()
                && std::os::unix::fs::MetadataExt::nlink(&m) > 1
            {
                problems.push(format!(
                    "{} has {} hard links: another name of it may lie where a plugin can read it; keep one",
                    p.display(),
                    std::os::unix::fs::MetadataExt::nlink(&m)
                ));
            }
        }
        // A grant another user owns, or any user may write, lets that
        // user change what the plugin reads or runs (fourth attack).
        for (what, g) in granted.clone().filter(|(what, _)| *what != "its folder") {
            if let Ok(m) = std::fs::metadata(g) {
                let mode = std::os::unix::fs::MetadataExt::mode(&m);
                if owned_by_another_user(&m) {
                    problems.push(format!(
                        "{what} {} belongs to user {}, neither root nor the gateway's user",
                        g.display(),
                        std::os::unix::fs::MetadataExt::uid(&m)
                    ));
                } else if mode & 0o002 != 0 {
                    problems.push(format!(
                        "{what} {} is writable by every user (mode {:o})",
                        g.display(),
                        mode & 0o7777
                    ));
                }
            }
        }
        for system in &share {
            for p in &private {
                if p.starts_with(system) {
                    problems.push(format!(
                        "{} is the gateway's own, but every sandboxed plugin may read {}: move it",
                        p.display(),
                        system.display()
                    ));
                }
            }
        }
        match (problems.is_empty(), folder) {
            (true, Some(folder)) => Ok(Grants {
                folder,
                read,
                write,
            }),
            _ => Err(problems),
        }
    }
}

/// A plugin's sandbox as configured: what it is granted, and what is the
/// gateway's own (checked at `validate` and again at every start).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Spec {
    pub grants: Grants,
    pub private: Private,
}

/// Why a plugin cannot be sandboxed on this machine, or `Ok` with the
/// Landlock ABI version.
pub fn available() -> Result<u32, String> {
    let abi = landlock::abi().map_err(|e| {
        format!(
            "this kernel offers no Landlock sandbox ({e}; it needs Linux 5.13 or later with \
             landlock in the lsm= boot list)"
        )
    })?;
    static PROBE: std::sync::OnceLock<Result<(), String>> = std::sync::OnceLock::new();
    PROBE.get_or_init(probe_namespaces).clone()?;
    Ok(abi)
}

/// Whether a process can really enter a new user and PID namespace here
/// (sysctls, AppArmor, a container's seccomp profile or a missing kernel
/// option can each forbid it): one tried with `/bin/sh -c :`, the reason
/// named when it cannot.
#[allow(unsafe_code)]
fn probe_namespaces() -> Result<(), String> {
    use std::os::unix::process::CommandExt;
    let mut cmd = std::process::Command::new("/bin/sh");
    cmd.args(["-c", ":"])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null());
    // SAFETY: the closure makes one async-signal-safe syscall.
    unsafe {
        cmd.pre_exec(|| {
            if libc::unshare(libc::CLONE_NEWUSER | libc::CLONE_NEWPID) != 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let hint = || {
        let read = |p: &str| std::fs::read_to_string(p).map(|v| v.trim().to_string());
        if read("/proc/sys/user/max_user_namespaces").is_ok_and(|v| v == "0") {
            " (/proc/sys/user/max_user_namespaces is 0)"
        } else if read("/proc/sys/kernel/apparmor_restrict_unprivileged_userns")
            .is_ok_and(|v| v == "1")
        {
            " (kernel.apparmor_restrict_unprivileged_userns = 1: give fleetcmd-gateway an \
             AppArmor profile that allows `userns,`)"
        } else {
            ""
        }
    };
    match cmd.status() {
        Ok(s) if s.success() => Ok(()),
        Ok(s) => Err(format!(
            "a probe in a new user namespace ended with {s}{}",
            hint()
        )),
        Err(e) => Err(format!(
            "this process may not create user and PID namespaces: {e}{}",
            hint()
        )),
    }
}

/// Scratch directories are `TMPDIR/fleetcmd-plugin-GATEWAYPID-NAME-…`.
const SCRATCH_PREFIX: &str = "fleetcmd-plugin-";

/// Removes the scratch directories that gateways no longer running left
/// behind (killed, so nothing removed them): only this user's, only of a
/// gateway process id that no longer exists.
pub fn remove_stale_scratch() {
    let Ok(entries) = std::fs::read_dir(std::env::temp_dir()) else {
        return;
    };
    // SAFETY: geteuid has no preconditions.
    #[allow(unsafe_code)]
    let me = unsafe { libc::geteuid() };
    for e in entries.flatten() {
        let name = e.file_name();
        let Some(pid) = name
            .to_str()
            .and_then(|n| n.strip_prefix(SCRATCH_PREFIX))
            .and_then(|rest| rest.split('-').next())
            .and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        let mine = std::os::unix::fs::MetadataExt::uid(&match e.path().symlink_metadata() {
            Ok(m) if m.is_dir() => m,
            _ => continue,
        }) == me;
        if mine && !std::path::Path::new(&format!("/proc/{pid}")).exists() {
            let _ = std::fs::remove_dir_all(e.path());
        }
    }
}

/// A plugin's sandbox, made before its process starts: the Landlock
/// ruleset (handed to the child as an fd) and the scratch directory,
/// removed when this is dropped.
#[derive(Debug)]
pub struct Sandbox {
    ruleset: Ruleset,
    scratch: tempfile::TempDir,
}

impl Sandbox {
    /// Builds the ruleset for `grants` and a fresh private scratch
    /// directory. Paths of the system's share that this machine lacks
    /// are skipped; a missing `read`/`write` grant is an error.
    pub fn prepare(name: &str, spec: &Spec) -> io::Result<Sandbox> {
        // Resolved again at every start: a link the plugin made since
        // (where it may write) must not widen what it reaches.
        let grants = &spec.grants.resolved(&spec.private).map_err(|problems| {
            io::Error::new(io::ErrorKind::PermissionDenied, problems.join("; "))
        })?;
        let abi = landlock::abi()?;
        let scratch = tempfile::Builder::new()
            .prefix(&format!("{SCRATCH_PREFIX}{}-{name}-", std::process::id()))
            .permissions(std::os::unix::fs::PermissionsExt::from_mode(0o700))
            .tempdir()?;
        let mut ruleset = Ruleset::new(abi)?;
        for path in grants.readable() {
            let operator = grants.read.contains(&path) || path == grants.folder;
            match ruleset.allow(&path, fs::READ) {
                Ok(()) => {}
                Err(e) if !operator && e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(named(&path, e)),
            }
        }
        for dev in DEVICES_RW {
            match ruleset.allow(Path::new(dev), fs::READ | fs::WRITE_FILE) {
                Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(named(dev, e)),
                _ => {}
            }
        }
        for path in grants
            .write
            .iter()
            .map(PathBuf::as_path)
            .chain([scratch.path()])
        {
            ruleset
                .allow(path, fs::READ | fs::WRITE)
                .map_err(|e| named(path, e))?;
        }
        Ok(Sandbox { ruleset, scratch })
    }

    /// The plugin's `HOME` and `TMPDIR`: private to it, empty at each
    /// start, removed when it stops.
    pub fn scratch(&self) -> &Path {
        self.scratch.path()
    }

    /// The ruleset's fd, for [`landlock::restrict_self`] in the child.
    pub fn ruleset_fd(&self) -> std::os::fd::RawFd {
        self.ruleset.raw_fd()
    }
}

/// Makes the calling process (the gateway) non-dumpable: processes of
/// the same user — a plugin run with `sandbox = false`, or anything else
/// running as the gateway's user — can no longer ptrace it or read its
/// `/proc/PID/{mem,environ,fd}`, where its keys and secrets are. Only
/// root keeps that. Also means no core dump with keys in it.
pub fn keep_own_memory_private() -> io::Result<()> {
    set_process_option(libc::PR_SET_DUMPABLE, 0)
}

/// `prctl(option, value)` for the options that take one integer, its error
/// named. Async-signal-safe: one syscall (also used between fork and exec).
#[allow(unsafe_code)]
pub fn set_process_option(option: libc::c_int, value: libc::c_ulong) -> io::Result<()> {
    // SAFETY: prctl with integer arguments only.
    let r = unsafe {
        libc::prctl(
            option,
            value,
            0 as libc::c_ulong,
            0 as libc::c_ulong,
            0 as libc::c_ulong,
        )
    };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

fn named(path: impl AsRef<Path>, e: io::Error) -> io::Error {
    io::Error::new(
        e.kind(),
        format!("cannot grant {}: {e}", path.as_ref().display()),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every way the outside attack named a grant that reached the
    /// gateway's keys: through a symlink, `..`, a grant below the
    /// configuration directory holding the keys, the state directory, a
    /// read grant beneath a write grant (replaceable by a link).
    #[test]
    fn grants_are_resolved_and_none_reaches_what_is_the_gateways() {
        let t = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let root = std::fs::canonicalize(t.path()).unwrap_or_else(|e| panic!("{e}"));
        let dir = |p: &str| {
            let d = root.join(p);
            std::fs::create_dir_all(&d).unwrap_or_else(|e| panic!("{e}"));
            d
        };
        let config = dir("etc/fleetcmd");
        let keys = dir("etc/fleetcmd/gateway");
        std::fs::write(keys.join("sign.key"), "k").unwrap_or_else(|e| panic!("{e}"));
        let state = dir("var/lib/fleetcmd");
        let plugin = dir("etc/fleetcmd/plugins/greet");
        let data = dir("var/lib/greet/data");
        std::os::unix::fs::symlink(&config, root.join("link")).unwrap_or_else(|e| panic!("{e}"));
        let private = Private {
            config_dir: config.clone(),
            paths: vec![
                config.join("gateway.toml"),
                keys.join("sign.key"),
                state.clone(),
            ],
        };
        let with = |read: Vec<PathBuf>, write: Vec<PathBuf>| Grants {
            folder: plugin.clone(),
            read,
            write,
        };
        // Fine: a plugin folder below the configuration directory, grants
        // elsewhere.
        let ok = with(vec![data.clone()], vec![root.join("var/lib/greet")]);
        assert!(
            with(vec![data.clone()], vec![]).resolved(&private).is_ok(),
            "{:?}",
            with(vec![data.clone()], vec![]).resolved(&private)
        );
        let refused = |g: Grants, says: &str| {
            let problems = g.resolved(&private).expect_err("must be refused");
            assert!(
                problems.iter().any(|p| p.contains(says)),
                "{problems:?} should say {says}"
            );
        };
        refused(ok, "lies beneath write grant");
        refused(
            with(vec![], vec![root.join("var/lib/greet"), data.clone()]),
            "data lies beneath write grant",
        );
        refused(with(vec![root.join("link")], vec![]), "sign.key");
        refused(with(vec![plugin.join("../../gateway")], vec![]), "sign.key");
        refused(with(vec![keys.clone()], vec![]), "sign.key");
        refused(with(vec![], vec![state.clone()]), "var/lib/fleetcmd");
        refused(with(vec![state.join("..")], vec![]), "var/lib/fleetcmd");
        refused(with(vec![root.join("nonexistent")], vec![]), "nonexistent");
        refused(
            with(vec![std::env::temp_dir()], vec![]),
            "scratch directory",
        );
        refused(
            with(vec![], vec![PathBuf::from("/usr/local/bin")]),
            "every plugin reads and runs",
        );
        if let Some(python) = system_share()
            .into_iter()
            .find(|p| p.starts_with("/etc/python3"))
        {
            refused(with(vec![], vec![python]), "every plugin reads and runs");
        }
        // A grant any user may write.
        let open = dir("var/open");
        std::fs::set_permissions(&open, std::os::unix::fs::PermissionsExt::from_mode(0o777))
            .unwrap_or_else(|e| panic!("{e}"));
        refused(with(vec![open], vec![]), "writable by every user");
        refused(
            Grants {
                folder: keys.clone(),
                ..Grants::default()
            },
            "sign.key",
        );
    }

    #[test]
    fn the_system_share_holds_no_directory_where_keys_are_kept() {
        for kept in [
            "/etc",
            "/etc/fleetcmd",
            "/var/lib/fleetcmd-gateway",
            "/home",
            "/root",
            "/tmp",
            "/opt",
            "/srv",
        ] {
            let key = Path::new(kept).join("gateway.key");
            assert!(!SYSTEM_READ.iter().any(|s| key.starts_with(s)), "{kept}");
        }
    }
}
