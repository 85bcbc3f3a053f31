//! Host metrics for the heartbeat: CPU, load, memory, swap,
//! disks, uptime and process count. Collected with `sysinfo`, refreshing only
//! what is reported — never the process table, which is costly on busy hosts
//! (the process count comes from counting `/proc` entries instead).
//! Collecting does blocking file reads and `statvfs` calls, so it runs on the
//! blocking pool (`spawn_blocking`), never on an async worker.

use std::collections::BTreeMap;
use std::path::Path;

use sysinfo::{CpuRefreshKind, DiskRefreshKind, Disks, MemoryRefreshKind, RefreshKind, System};

/// Space on one mounted file system.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct DiskUsage {
    /// Mount point, e.g. `/` or `/var`.
    pub mount: String,
    pub total_bytes: u64,
    /// Bytes available to unprivileged users.
    pub available_bytes: u64,
}

/// One sample of the host's health figures.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct HostMetrics {
    /// Global CPU usage since the previous sample, 0–100.
    pub cpu_percent: f32,
    pub load1: f64,
    pub load5: f64,
    pub load15: f64,
    pub mem_total_bytes: u64,
    pub mem_used_bytes: u64,
    pub swap_total_bytes: u64,
    pub swap_used_bytes: u64,
    pub uptime_secs: u64,
    pub process_count: u32,
    /// Real file systems only (no proc, sysfs, tmpfs, cgroup, …), one per
    /// mount point, sorted by mount point.
    pub disks: Vec<DiskUsage>,
}

/// Keeps the state that sampling needs between calls (CPU usage is a
/// difference between two readings).
#[derive(Debug)]
pub struct Collector {
    system: System,
    disks: Disks,
}

impl Default for Collector {
    fn default() -> Self {
        Collector::new()
    }
}

impl Collector {
    /// Takes a first CPU reading (one small read of `/proc/stat`) so that the
    /// first [`Collector::collect`] reports usage over the interval since.
    pub fn new() -> Collector {
        let system = System::new_with_specifics(
            RefreshKind::nothing().with_cpu(CpuRefreshKind::nothing().with_cpu_usage()),
        );
        Collector {
            system,
            disks: Disks::new(),
        }
    }

    /// Blocking: call from spawn_blocking. Refreshes only what is reported
    /// (global CPU usage, memory, disks list' usage), never all processes.
    pub fn collect(&mut self) -> HostMetrics {
        self.system.refresh_cpu_usage();
        self.system
            .refresh_memory_specifics(MemoryRefreshKind::nothing().with_ram().with_swap());
        // Re-reads the mount table (mounts come and go) and only the space
        // figures: no I/O counters, no disk kind probing.
        self.disks
            .refresh_specifics(true, DiskRefreshKind::nothing().with_storage());
        let load = System::load_average();

        HostMetrics {
            cpu_percent: self.system.global_cpu_usage(),
            load1: load.one,
            load5: load.five,
            load15: load.fifteen,
            mem_total_bytes: self.system.total_memory(),
            mem_used_bytes: self.system.used_memory(),
            swap_total_bytes: self.system.total_swap(),
            swap_used_bytes: self.system.used_swap(),
            uptime_secs: System::uptime(),
            process_count: count_processes(Path::new("/proc")),
            disks: real_disks(self.disks.list().iter().map(|disk| {
                (
                    disk.file_system().to_string_lossy(),
                    disk.mount_point().to_string_lossy(),
                    disk.total_space(),
                    disk.available_space(),
                )
            })),
        }
    }
}

/// Space on every real file system right now (the `disk` check). Blocking:
/// call from spawn_blocking.
pub fn disk_usage() -> Vec<DiskUsage> {
    let disks = Disks::new_with_refreshed_list_specifics(DiskRefreshKind::nothing().with_storage());
    real_disks(disks.list().iter().map(|disk| {
        (
            disk.file_system().to_string_lossy(),
            disk.mount_point().to_string_lossy(),
            disk.total_space(),
            disk.available_space(),
        )
    }))
}

/// Number of all-digit entries in `proc` (one per process); 0 when it cannot
/// be read.
fn count_processes(proc: &Path) -> u32 {
    let entries = match std::fs::read_dir(proc) {
        Ok(entries) => entries,
        Err(err) => {
            tracing::warn!(path = %proc.display(), error = %err, "counting processes");
            return 0;
        }
    };
    let count = entries
        .filter_map(Result::ok)
        .filter(|entry| {
            let name = entry.file_name();
            let name = name.as_encoded_bytes();
            !name.is_empty() && name.iter().all(u8::is_ascii_digit)
        })
        .count();
    u32::try_from(count).unwrap_or(u32::MAX)
}

/// File system types that hold no user data; sysinfo drops most of them
/// already, this keeps the report stable if its list changes.
const PSEUDO_FILE_SYSTEMS: &[&str] = &[
    "autofs",
    "binfmt_misc",
    "bpf",
    "cgroup",
    "cgroup2",
    "configfs",
    "debugfs",
    "devpts",
    "devtmpfs",
    "efivarfs",
    "fusectl",
    "hugetlbfs",
    "mqueue",
    "nsfs",
    "proc",
    "pstore",
    "ramfs",
    "rootfs",
    "rpc_pipefs",
    "securityfs",
    "selinuxfs",
    "squashfs",
    "sysfs",
    "tmpfs",
    "tracefs",
];

/// Mount points under which only kernel or runtime state lives.
const PSEUDO_MOUNT_ROOTS: &[&str] = &["/proc", "/sys", "/dev", "/run"];

fn is_pseudo(file_system: &str, mount: &str) -> bool {
    PSEUDO_FILE_SYSTEMS.contains(&file_system)
        || PSEUDO_MOUNT_ROOTS.iter().any(|root| {
            mount == *root
                || mount
                    .strip_prefix(root)
                    .is_some_and(|rest| rest.starts_with('/'))
        })
}

/// Keeps real file systems with a size, one per mount point (the last
/// mounted wins, as it hides the others), sorted by mount point.
fn real_disks<F, M>(disks: impl IntoIterator<Item = (F, M, u64, u64)>) -> Vec<DiskUsage>
where
    F: AsRef<str>,
    M: AsRef<str>,
{
    let mut by_mount = BTreeMap::new();
    for (file_system, mount, total_bytes, available_bytes) in disks {
        let (file_system, mount) = (file_system.as_ref(), mount.as_ref());
        if total_bytes == 0 || is_pseudo(file_system, mount) {
            continue;
        }
        by_mount.insert(
            mount.to_owned(),
            DiskUsage {
                mount: mount.to_owned(),
                total_bytes,
                available_bytes,
            },
        );
    }
    by_mount.into_values().collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn collected_values_are_plausible() {
        let mut collector = Collector::new();
        for _ in 0..2 {
            let m = collector.collect();
            assert!(m.mem_total_bytes > 0, "{m:?}");
            assert!(m.mem_used_bytes <= m.mem_total_bytes, "{m:?}");
            assert!(m.swap_used_bytes <= m.swap_total_bytes, "{m:?}");
            assert!(m.uptime_secs > 0, "{m:?}");
            assert!(m.process_count > 0, "{m:?}");
            assert!((0.0..=100.0).contains(&m.cpu_percent), "{m:?}");
            assert!(m.load1 >= 0.0 && m.load5 >= 0.0 && m.load15 >= 0.0, "{m:?}");
            assert!(!m.disks.is_empty(), "{m:?}");
            for disk in &m.disks {
                assert!(disk.total_bytes >= disk.available_bytes, "{disk:?}");
                assert!(!is_pseudo("", &disk.mount), "{disk:?}");
            }
            let mut mounts: Vec<&str> = m.disks.iter().map(|d| d.mount.as_str()).collect();
            mounts.dedup();
            assert_eq!(mounts.len(), m.disks.len(), "duplicate mounts: {m:?}");
        }
    }

    #[test]
    fn counts_only_numeric_proc_entries() {
        let dir = tempfile::tempdir().expect("tempdir");
        for name in ["1", "42", "self", "7a", "cpuinfo"] {
            std::fs::create_dir(dir.path().join(name)).expect("mkdir");
        }
        assert_eq!(count_processes(dir.path()), 2);
        assert_eq!(count_processes(&dir.path().join("missing")), 0);
        assert!(count_processes(Path::new("/proc")) > 0);
    }

    #[test]
    fn pseudo_file_systems_are_recognized() {
        let check = |fs: &str, mount: &str, expected: bool| {
            assert_eq!(is_pseudo(fs, mount), expected, "{fs} on {mount}");
        };
        check("ext4", "/", false);
        check("xfs", "/var", false);
        check("overlay", "/", false);
        check("ext4", "/srv/run", false);
        check("ext4", "/device", false);
        check("tmpfs", "/tmp", true);
        check("proc", "/proc", true);
        check("cgroup2", "/sys/fs/cgroup", true);
        check("ext4", "/run/user/1000", true);
        check("ext4", "/dev/shm", true);
    }

    #[test]
    fn disks_are_filtered_and_deduplicated() {
        let disks = real_disks([
            ("ext4", "/var", 100, 10),
            ("ext4", "/", 1000, 500),
            ("tmpfs", "/tmp", 50, 50),
            ("ext4", "/empty", 0, 0),
            ("xfs", "/var", 200, 20),
        ]);
        assert_eq!(
            disks,
            [
                DiskUsage {
                    mount: "/".to_owned(),
                    total_bytes: 1000,
                    available_bytes: 500
                },
                DiskUsage {
                    mount: "/var".to_owned(),
                    total_bytes: 200,
                    available_bytes: 20
                },
            ]
        );
    }
}
