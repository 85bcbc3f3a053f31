//! The three Landlock system calls and the structures they take, as the
//! kernel's `linux/landlock.h` defines them (stable ABI, versioned by the
//! kernel: 1 in 5.13, 6 in 6.12).
//!
//! Written against the syscalls rather than a wrapper crate because the
//! last step, `landlock_restrict_self`, runs between `fork` and `exec` of a
//! multi-threaded process, where only async-signal-safe calls are allowed:
//! here the ruleset is built in the gateway, and the child only makes the
//! one syscall on its file descriptor.

use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

/// Filesystem rights (`LANDLOCK_ACCESS_FS_*`).
pub mod fs {
    pub const EXECUTE: u64 = 1 << 0;
    pub const WRITE_FILE: u64 = 1 << 1;
    pub const READ_FILE: u64 = 1 << 2;
    pub const READ_DIR: u64 = 1 << 3;
    pub const REMOVE_DIR: u64 = 1 << 4;
    pub const REMOVE_FILE: u64 = 1 << 5;
    pub const MAKE_CHAR: u64 = 1 << 6;
    pub const MAKE_DIR: u64 = 1 << 7;
    pub const MAKE_REG: u64 = 1 << 8;
    pub const MAKE_SOCK: u64 = 1 << 9;
    pub const MAKE_FIFO: u64 = 1 << 10;
    pub const MAKE_BLOCK: u64 = 1 << 11;
    pub const MAKE_SYM: u64 = 1 << 12;
    /// ABI 2.
    pub const REFER: u64 = 1 << 13;
    /// ABI 3.
    pub const TRUNCATE: u64 = 1 << 14;
    /// ABI 5.
    pub const IOCTL_DEV: u64 = 1 << 15;

    /// The rights that apply to a file (the others only to directories).
    pub const FILE: u64 = EXECUTE | WRITE_FILE | READ_FILE | TRUNCATE | IOCTL_DEV;
    pub const READ: u64 = EXECUTE | READ_FILE | READ_DIR;
    pub const WRITE: u64 = WRITE_FILE
        | REMOVE_DIR
        | REMOVE_FILE
        | MAKE_DIR
        | MAKE_REG
        | MAKE_SOCK
        | MAKE_FIFO
        | MAKE_SYM
        | REFER
        | TRUNCATE;

    /// Every right the kernel of `abi` knows: all of them are denied
    /// unless a rule grants them.
    pub fn handled(abi: u32) -> u64 {
        let mut all = (1 << 13) - 1;
        if abi >= 2 {
            all |= REFER;
        }
        if abi >= 3 {
            all |= TRUNCATE;
        }
        if abi >= 5 {
            all |= IOCTL_DEV;
        }
        all
    }
}

/// `LANDLOCK_SCOPE_*` (ABI 6): IPC the sandbox may not reach outside
/// itself.
pub mod scope {
    pub const ABSTRACT_UNIX_SOCKET: u64 = 1 << 0;
    pub const SIGNAL: u64 = 1 << 1;
}

const CREATE_RULESET_VERSION: u32 = 1 << 0;
const RULE_PATH_BENEATH: libc::c_int = 1;

#[repr(C)]
struct RulesetAttr {
    handled_access_fs: u64,
    handled_access_net: u64,
    scoped: u64,
}

#[repr(C, packed)]
struct PathBeneathAttr {
    allowed_access: u64,
    parent_fd: i32,
}

/// The Landlock ABI version of the running kernel, or why there is none.
#[allow(unsafe_code)]
pub fn abi() -> io::Result<u32> {
    // SAFETY: with the VERSION flag the kernel reads no attribute.
    let v = unsafe {
        libc::syscall(
            libc::SYS_landlock_create_ruleset,
            std::ptr::null::<RulesetAttr>(),
            0usize,
            CREATE_RULESET_VERSION,
        )
    };
    if v < 0 {
        return Err(io::Error::last_os_error());
    }
    u32::try_from(v).map_err(|_| io::Error::other("Landlock answered a negative version"))
}

/// A ruleset being built: deny everything `handled` names, then allow
/// what [`Ruleset::allow`] adds.
#[derive(Debug)]
pub struct Ruleset {
    fd: OwnedFd,
    handled_fs: u64,
}

impl Ruleset {
    #[allow(unsafe_code)]
    pub fn new(abi: u32) -> io::Result<Ruleset> {
        let handled_fs = fs::handled(abi);
        let attr = RulesetAttr {
            handled_access_fs: handled_fs,
            handled_access_net: 0,
            scoped: if abi >= 6 {
                scope::ABSTRACT_UNIX_SOCKET | scope::SIGNAL
            } else {
                0
            },
        };
        // The attribute grew with the ABI; an older kernel refuses a size
        // it does not know.
        let size = match abi {
            0..=3 => 8,
            4 | 5 => 16,
            _ => std::mem::size_of::<RulesetAttr>(),
        };
        // SAFETY: `attr` is valid for `size` bytes (a prefix of the struct).
        let fd = unsafe {
            libc::syscall(
                libc::SYS_landlock_create_ruleset,
                &attr as *const RulesetAttr,
                size,
                0u32,
            )
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        let fd = RawFd::try_from(fd).map_err(|_| io::Error::other("ruleset fd out of range"))?;
        // SAFETY: the kernel just returned this fd (close-on-exec) to us.
        Ok(Ruleset {
            fd: unsafe { OwnedFd::from_raw_fd(fd) },
            handled_fs,
        })
    }

    /// Allows `access` beneath `path` (on the file itself if it is one:
    /// only the rights that apply to files).
    #[allow(unsafe_code)]
    pub fn allow(&mut self, path: &Path, access: u64) -> io::Result<()> {
        let c = CString::new(path.as_os_str().as_bytes())
            .map_err(|_| io::Error::other("path contains a NUL byte"))?;
        // SAFETY: `c` is a valid NUL-terminated string.
        let raw = unsafe { libc::open(c.as_ptr(), libc::O_PATH | libc::O_CLOEXEC) };
        if raw < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `open` just returned this fd to us.
        let parent = unsafe { OwnedFd::from_raw_fd(raw) };
        let mut access = access & self.handled_fs;
        if !path.is_dir() {
            access &= fs::FILE;
        }
        let attr = PathBeneathAttr {
            allowed_access: access,
            parent_fd: parent.as_raw_fd(),
        };
        // SAFETY: `attr` is a valid path-beneath attribute for the call.
        let r = unsafe {
            libc::syscall(
                libc::SYS_landlock_add_rule,
                self.fd.as_raw_fd(),
                RULE_PATH_BENEATH,
                &attr as *const PathBeneathAttr,
                0u32,
            )
        };
        if r != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// The fd to hand to [`restrict_self`] in the child.
    pub fn raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

/// Puts the calling thread (a forked child about to exec) under the
/// ruleset. Async-signal-safe: one syscall. `no_new_privs` must be set.
#[allow(unsafe_code)]
pub fn restrict_self(ruleset: RawFd) -> io::Result<()> {
    // SAFETY: a plain syscall on an fd number; no memory is passed.
    if unsafe { libc::syscall(libc::SYS_landlock_restrict_self, ruleset, 0u32) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}
