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
//! - **Limits**: no new privileges, `RLIMIT_AS` per process and
//!   `RLIMIT_NPROC` processes ([`process`](super::process) sets them).
//!
//! `[[plugin]] sandbox = false` runs a plugin without the first two, with
//! every right of the gateway's user; `validate` says so.

pub mod landlock;

use std::io;
use std::path::{Path, PathBuf};

use landlock::{Ruleset, fs};

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
        paths.push(self.folder.clone());
        paths.extend(self.read.iter().cloned());
        paths
    }

    /// The granted path that would expose `secret` (the gateway's own
    /// configuration directory, its state directory, a key), if any: a
    /// grant on it or on a directory above it.
    pub fn exposing(&self, secret: &Path) -> Option<PathBuf> {
        self.readable()
            .into_iter()
            .chain(self.write.iter().cloned())
            .find(|granted| secret.starts_with(granted))
    }
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
    if std::fs::read_to_string("/proc/sys/user/max_user_namespaces").is_ok_and(|v| v.trim() == "0")
    {
        return Err(
            "user namespaces are disabled (/proc/sys/user/max_user_namespaces is 0)".to_string(),
        );
    }
    if std::fs::read_to_string("/proc/sys/kernel/apparmor_restrict_unprivileged_userns")
        .is_ok_and(|v| v.trim() == "1")
    {
        return Err("AppArmor restricts unprivileged user namespaces \
             (kernel.apparmor_restrict_unprivileged_userns = 1): give fleetcmd-gateway an \
             AppArmor profile that allows `userns,`"
            .to_string());
    }
    Ok(abi)
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
    pub fn prepare(name: &str, grants: &Grants) -> io::Result<Sandbox> {
        let abi = landlock::abi()?;
        let scratch = tempfile::Builder::new()
            .prefix(&format!("fleetcmd-plugin-{name}-"))
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
#[allow(unsafe_code)]
pub fn keep_own_memory_private() -> io::Result<()> {
    // SAFETY: prctl with integer arguments only.
    let r = unsafe {
        libc::prctl(
            libc::PR_SET_DUMPABLE,
            0 as libc::c_ulong,
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

    #[test]
    fn a_grant_on_or_above_a_secret_is_found_and_named() {
        let g = Grants {
            folder: PathBuf::from("/srv/plugins/greet"),
            read: vec![PathBuf::from("/etc/fleetcmd")],
            write: vec![PathBuf::from("/var/lib")],
        };
        assert_eq!(
            g.exposing(Path::new("/etc/fleetcmd/gateway.key")),
            Some(PathBuf::from("/etc/fleetcmd"))
        );
        assert_eq!(
            g.exposing(Path::new("/var/lib/fleetcmd-gateway")),
            Some(PathBuf::from("/var/lib"))
        );
        assert_eq!(
            g.exposing(Path::new("/usr/local/etc/fleetcmd")),
            Some(PathBuf::from("/usr"))
        );
        assert_eq!(g.exposing(Path::new("/etc/other/gateway.key")), None);
        let narrow = Grants {
            folder: PathBuf::from("/etc/fleetcmd/plugins/greet"),
            ..Grants::default()
        };
        assert_eq!(narrow.exposing(Path::new("/etc/fleetcmd")), None);
        let wide = Grants {
            folder: PathBuf::from("/etc/fleetcmd"),
            ..Grants::default()
        };
        assert_eq!(
            wide.exposing(Path::new("/etc/fleetcmd/gateway.key")),
            Some(PathBuf::from("/etc/fleetcmd"))
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
            let g = Grants {
                folder: PathBuf::from("/nonexistent/plugin"),
                ..Grants::default()
            };
            assert_eq!(
                g.exposing(Path::new(kept).join("gateway.key").as_path()),
                None,
                "{kept}"
            );
        }
    }
}
