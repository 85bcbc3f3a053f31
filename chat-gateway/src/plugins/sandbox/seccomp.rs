//! The system calls a sandboxed plugin may not make, as a seccomp filter:
//! Landlock (up to ABI 7) does not govern `connect` to a Unix socket that
//! has a path, so a plugin could speak to every local service its user
//! may (D-Bus, systemd, a container runtime's socket, another user's
//! database) — found by the outside attack. The filter refuses
//! `socket(AF_UNIX, …)` (pipes and `socketpair` stay), and `io_uring`,
//! which can open sockets without that system call. A refused call fails
//! with `EACCES`, as a permission error.
//!
//! The filter is a fixed classic-BPF program; [`install`] only makes the
//! `seccomp` call, async-signal-safe, between fork and exec.

use std::io;

/// `AUDIT_ARCH_*` of the architecture this is built for, and its
/// syscall numbers.
#[cfg(target_arch = "x86_64")]
mod arch {
    pub const AUDIT: u32 = 0xc000_003e;
    pub const SOCKET: u32 = 41;
    pub const IO_URING_SETUP: u32 = 425;
    /// x32 calls come in with this bit set, under the same `AUDIT`.
    pub const X32_BIT: u32 = 0x4000_0000;
}
#[cfg(target_arch = "aarch64")]
mod arch {
    pub const AUDIT: u32 = 0xc000_00b7;
    pub const SOCKET: u32 = 198;
    pub const IO_URING_SETUP: u32 = 425;
    pub const X32_BIT: u32 = 0;
}

const BPF_LD_W_ABS: u16 = 0x20; // BPF_LD | BPF_W | BPF_ABS
const BPF_JEQ_K: u16 = 0x15; // BPF_JMP | BPF_JEQ | BPF_K
const BPF_RET_K: u16 = 0x06; // BPF_RET | BPF_K
const RET_ALLOW: u32 = 0x7fff_0000;
const RET_ERRNO: u32 = 0x0005_0000;
const RET_KILL_PROCESS: u32 = 0x8000_0000;
/// Offsets in `struct seccomp_data`.
const NR: u32 = 0;
const ARCH: u32 = 4;
const ARG0_LOW: u32 = 16;

#[repr(C)]
#[derive(Clone, Copy)]
struct Insn {
    code: u16,
    jt: u8,
    jf: u8,
    k: u32,
}

const fn stmt(code: u16, k: u32) -> Insn {
    Insn {
        code,
        jt: 0,
        jf: 0,
        k,
    }
}

const fn jeq(k: u32, jt: u8, jf: u8) -> Insn {
    Insn {
        code: BPF_JEQ_K,
        jt,
        jf,
        k,
    }
}

const DENY: u32 = RET_ERRNO | libc::EACCES as u32;

/// The program. Another architecture than the one built for (a 32-bit
/// call on a 64-bit kernel) is killed: its numbers mean other calls.
const PROGRAM: [Insn; 13] = [
    stmt(BPF_LD_W_ABS, ARCH),
    jeq(arch::AUDIT, 1, 0),
    stmt(BPF_RET_K, RET_KILL_PROCESS),
    stmt(BPF_LD_W_ABS, NR),
    jeq(arch::IO_URING_SETUP, 6, 0),
    jeq(arch::IO_URING_SETUP | arch::X32_BIT, 5, 0),
    jeq(arch::SOCKET, 2, 0),
    jeq(arch::SOCKET | arch::X32_BIT, 1, 0),
    stmt(BPF_RET_K, RET_ALLOW),
    // socket(): refuse AF_UNIX only.
    stmt(BPF_LD_W_ABS, ARG0_LOW),
    jeq(libc::AF_UNIX as u32, 0, 1),
    stmt(BPF_RET_K, DENY),
    stmt(BPF_RET_K, RET_ALLOW),
];

#[repr(C)]
struct Fprog {
    len: u16,
    filter: *const Insn,
}

/// Installs the filter on the calling thread (a forked child about to
/// exec; `no_new_privs` must be set). Async-signal-safe: one syscall on
/// static data.
#[allow(unsafe_code)]
pub fn install() -> io::Result<()> {
    let prog = Fprog {
        len: PROGRAM.len() as u16,
        filter: PROGRAM.as_ptr(),
    };
    // SAFETY: `prog` points at a static program of `len` instructions.
    let r = unsafe {
        libc::prctl(
            libc::PR_SET_SECCOMP,
            libc::SECCOMP_MODE_FILTER as libc::c_ulong,
            &prog as *const Fprog as libc::c_ulong,
            0 as libc::c_ulong,
            0 as libc::c_ulong,
        )
    };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}
