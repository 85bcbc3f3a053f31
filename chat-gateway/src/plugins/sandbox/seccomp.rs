//! The system calls a sandboxed plugin may not make, as a seccomp filter:
//! Landlock (up to ABI 7) does not govern `connect` to a Unix socket that
//! has a path, so a plugin could speak to every local service its user
//! may (D-Bus, systemd, a container runtime's socket, another user's
//! database) — found by the outside attack. The filter refuses Unix,
//! netlink and vsock sockets, a datagram `socketpair` (which can `sendto`
//! a named socket — found by the second attack), `io_uring` (which can
//! open sockets without `socket`) and the kernel keyrings; see
//! [`PROGRAM`]. A refused call fails with `EACCES`, as a permission
//! error.
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
    pub const SOCKETPAIR: u32 = 53;
    pub const ADD_KEY: u32 = 248;
    pub const REQUEST_KEY: u32 = 249;
    pub const KEYCTL: u32 = 250;
    pub const IO_URING_SETUP: u32 = 425;
    /// x32 calls come in with this bit set, under the same `AUDIT`.
    pub const X32_BIT: u32 = 0x4000_0000;
}
#[cfg(target_arch = "aarch64")]
mod arch {
    pub const AUDIT: u32 = 0xc000_00b7;
    pub const SOCKET: u32 = 198;
    pub const SOCKETPAIR: u32 = 199;
    pub const ADD_KEY: u32 = 217;
    pub const REQUEST_KEY: u32 = 218;
    pub const KEYCTL: u32 = 219;
    pub const IO_URING_SETUP: u32 = 425;
    pub const X32_BIT: u32 = 0;
}

const BPF_LD_W_ABS: u16 = 0x20; // BPF_LD | BPF_W | BPF_ABS
const BPF_JEQ_K: u16 = 0x15; // BPF_JMP | BPF_JEQ | BPF_K
const BPF_JSET_K: u16 = 0x45; // BPF_JMP | BPF_JSET | BPF_K
const BPF_AND_K: u16 = 0x54; // BPF_ALU | BPF_AND | BPF_K
const BPF_RET_K: u16 = 0x06; // BPF_RET | BPF_K
const RET_ALLOW: u32 = 0x7fff_0000;
const RET_ERRNO: u32 = 0x0005_0000;
const RET_KILL_PROCESS: u32 = 0x8000_0000;
/// Offsets in `struct seccomp_data`.
const NR: u32 = 0;
const ARCH: u32 = 4;
const ARG0_LOW: u32 = 16;
const ARG1_LOW: u32 = 24;
/// Address families refused to `socket`: Unix sockets (with a path they
/// reach every local service), netlink (the kernel's own configuration
/// and audit interfaces) and vsock (the hypervisor).
const AF_NETLINK: u32 = 16;
const AF_VSOCK: u32 = 40;
const SOCK_TYPE_MASK: u32 = 0xf;
const SOCK_STREAM: u32 = 1;
const SOCK_SEQPACKET: u32 = 5;

#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
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

const fn jump(code: u16, k: u32, jt: u8, jf: u8) -> Insn {
    Insn { code, jt, jf, k }
}

const DENY: u32 = RET_ERRNO | libc::EACCES as u32;

/// The program (jump offsets count the instructions skipped; the unit
/// test runs it on every case below). Another architecture than the one
/// built for (a 32-bit call on a 64-bit kernel), and x32 calls, are
/// killed: their numbers mean other calls. Refused with `EACCES`:
/// `io_uring` (it opens sockets without `socket`), the kernel keyrings
/// (the user's keys), `socket` of the families above, and
/// a Unix `socketpair` of any type but stream and seqpacket (a datagram socket can
/// `sendto` any named Unix socket; so can a raw one, which the kernel
/// makes a datagram socket — found by the third outside attack): only
/// stream and seqpacket pairs (asyncio's self-pipe) stay, which cannot
/// be pointed anywhere else.
const PROGRAM: [Insn; 26] = [
    /* 0 */ stmt(BPF_LD_W_ABS, ARCH),
    /* 1 */ jump(BPF_JEQ_K, arch::AUDIT, 1, 0),
    /* 2 */ stmt(BPF_RET_K, RET_KILL_PROCESS),
    /* 3 */ stmt(BPF_LD_W_ABS, NR),
    /* 4 */ jump(BPF_JSET_K, arch::X32_BIT, 0, 1),
    /* 5 */ stmt(BPF_RET_K, RET_KILL_PROCESS),
    /* 6 */ jump(BPF_JEQ_K, arch::IO_URING_SETUP, 18, 0),
    /* 7 */ jump(BPF_JEQ_K, arch::ADD_KEY, 17, 0),
    /* 8 */ jump(BPF_JEQ_K, arch::REQUEST_KEY, 16, 0),
    /* 9 */ jump(BPF_JEQ_K, arch::KEYCTL, 15, 0),
    /* 10 */ jump(BPF_JEQ_K, arch::SOCKET, 2, 0),
    /* 11 */ jump(BPF_JEQ_K, arch::SOCKETPAIR, 6, 0),
    /* 12 */ stmt(BPF_RET_K, RET_ALLOW),
    // socket(family, …)
    /* 13 */ stmt(BPF_LD_W_ABS, ARG0_LOW),
    /* 14 */ jump(BPF_JEQ_K, libc::AF_UNIX as u32, 10, 0),
    /* 15 */ jump(BPF_JEQ_K, AF_NETLINK, 9, 0),
    /* 16 */ jump(BPF_JEQ_K, AF_VSOCK, 8, 0),
    /* 17 */ stmt(BPF_RET_K, RET_ALLOW),
    // socketpair(family, type, …): Unix pairs only of the connected
    // kinds (any other type — datagram, or raw, which a Unix socket turns
    // into datagram — can be pointed at a named socket).
    /* 18 */
    stmt(BPF_LD_W_ABS, ARG0_LOW),
    /* 19 */ jump(BPF_JEQ_K, libc::AF_UNIX as u32, 0, 4),
    /* 20 */ stmt(BPF_LD_W_ABS, ARG1_LOW),
    /* 21 */ stmt(BPF_AND_K, SOCK_TYPE_MASK),
    /* 22 */ jump(BPF_JEQ_K, SOCK_STREAM, 1, 0),
    /* 23 */ jump(BPF_JEQ_K, SOCK_SEQPACKET, 0, 1),
    /* 24 */ stmt(BPF_RET_K, RET_ALLOW),
    /* 25 */ stmt(BPF_RET_K, DENY),
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

#[cfg(test)]
mod tests {
    use super::*;

    const SOCK_DGRAM: u32 = 2;
    const SOCK_RAW: u32 = 3;

    /// Runs the program on one call, as the kernel would.
    fn run(arch_id: u32, nr: u32, arg0: u32, arg1: u32) -> u32 {
        let (mut acc, mut pc) = (0u32, 0usize);
        loop {
            let i = PROGRAM[pc];
            match i.code {
                BPF_LD_W_ABS => {
                    acc = match i.k {
                        NR => nr,
                        ARCH => arch_id,
                        ARG0_LOW => arg0,
                        ARG1_LOW => arg1,
                        k => panic!("load of offset {k}"),
                    }
                }
                BPF_AND_K => acc &= i.k,
                BPF_RET_K => return i.k,
                BPF_JEQ_K | BPF_JSET_K => {
                    let taken = if i.code == BPF_JEQ_K {
                        acc == i.k
                    } else {
                        acc & i.k != 0
                    };
                    pc += usize::from(if taken { i.jt } else { i.jf });
                }
                c => panic!("unexpected instruction {c:#x}"),
            }
            pc += 1;
        }
    }

    #[test]
    fn the_filter_refuses_exactly_what_it_says() {
        let call = |nr, a0, a1| run(arch::AUDIT, nr, a0, a1);
        let unix = libc::AF_UNIX as u32;
        let inet = libc::AF_INET as u32;
        let stream = libc::SOCK_STREAM as u32;
        let cloexec = libc::SOCK_CLOEXEC as u32;
        for (what, got, want) in [
            ("socket(AF_UNIX)", call(arch::SOCKET, unix, stream), DENY),
            (
                "socket(AF_NETLINK)",
                call(arch::SOCKET, AF_NETLINK, 3),
                DENY,
            ),
            (
                "socket(AF_VSOCK)",
                call(arch::SOCKET, AF_VSOCK, stream),
                DENY,
            ),
            (
                "socket(AF_INET)",
                call(arch::SOCKET, inet, stream),
                RET_ALLOW,
            ),
            (
                "socketpair(AF_UNIX, SOCK_DGRAM|SOCK_CLOEXEC)",
                call(arch::SOCKETPAIR, unix, SOCK_DGRAM | cloexec),
                DENY,
            ),
            (
                "socketpair(AF_UNIX, SOCK_RAW)",
                call(arch::SOCKETPAIR, unix, SOCK_RAW),
                DENY,
            ),
            (
                "socketpair(AF_UNIX, SOCK_SEQPACKET)",
                call(arch::SOCKETPAIR, unix, SOCK_SEQPACKET),
                RET_ALLOW,
            ),
            (
                "socketpair(AF_INET, SOCK_DGRAM)",
                call(arch::SOCKETPAIR, inet, SOCK_DGRAM),
                RET_ALLOW,
            ),
            (
                "socketpair(AF_UNIX, SOCK_STREAM|SOCK_CLOEXEC)",
                call(arch::SOCKETPAIR, unix, stream | cloexec),
                RET_ALLOW,
            ),
            ("io_uring_setup", call(arch::IO_URING_SETUP, 8, 0), DENY),
            ("keyctl", call(arch::KEYCTL, 0, 0), DENY),
            ("add_key", call(arch::ADD_KEY, 0, 0), DENY),
            ("request_key", call(arch::REQUEST_KEY, 0, 0), DENY),
            ("read", call(0, 0, 0), RET_ALLOW),
            (
                "another architecture",
                run(0x4000_0003, 41, unix, 0),
                RET_KILL_PROCESS,
            ),
        ] {
            assert_eq!(got, want, "{what}");
        }
        if arch::X32_BIT != 0 {
            assert_eq!(
                call(arch::X32_BIT | arch::SOCKET, inet, 0),
                RET_KILL_PROCESS,
                "x32"
            );
        }
    }
}
