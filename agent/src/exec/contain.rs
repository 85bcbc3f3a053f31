//! Keeping track of, and killing, everything one command started: its
//! process group, plus a per-job cgroup v2 when the host offers one, else a
//! sweep of the descendants recorded while the command ran. See the module
//! comment of `exec` for why both exist.

use std::collections::{HashMap, HashSet};
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read as _, Write as _};
use std::os::fd::{AsRawFd as _, RawFd};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// How often the process group (or cgroup) is checked for remaining members
/// while the TERM grace period runs, or after SIGKILL.
const POLL: Duration = Duration::from_millis(20);

/// How long to wait after SIGKILL for the kernel to tear everything down, so
/// nothing of the command is left running when the executor returns. Only a
/// process stuck in uninterruptible I/O (or a zombie that the host's init does
/// not reap) takes that long.
const KILL_SETTLE: Duration = Duration::from_millis(500);

/// Without a cgroup: how often the descendants of a running command are
/// recorded, so that one that is re-parented to init (its parent exited) is
/// still known when the job is killed.
pub(super) const SWEEP_INTERVAL: Duration = Duration::from_millis(200);

/// Prefix of the per-job cgroup directories (`fleetcmd-job-<agent pid>-<n>`).
const CGROUP_PREFIX: &str = "fleetcmd-job-";

/// Which mechanism contains a job.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Mode {
    /// A cgroup v2 per job when the host offers a writable one, else
    /// [`Mode::ProcessGroup`].
    Auto,
    /// Only the process group and the descendant sweep (tests use this to
    /// exercise the fallback on hosts that do have cgroups).
    #[cfg_attr(not(test), allow(dead_code))]
    ProcessGroup,
}

/// The agent's own cgroup on the cgroup v2 hierarchy, where job cgroups are
/// created; `None` when there is no cgroup2 mount or it is not writable.
/// Looked up once (the agent does not move between cgroups).
pub(super) fn cgroup_parent() -> Option<&'static Path> {
    static PARENT: OnceLock<Option<PathBuf>> = OnceLock::new();
    PARENT
        .get_or_init(|| {
            let parent = find_cgroup_parent();
            match &parent {
                Some(dir) => {
                    tracing::info!(cgroup = %dir.display(), "jobs are contained in per-job cgroups");
                    remove_stale(dir);
                }
                None => tracing::warn!(
                    "no writable cgroup v2 hierarchy: jobs are contained by process group and descendant sweep only; a double-forked daemon can escape"
                ),
            }
            parent
        })
        .as_deref()
}

fn find_cgroup_parent() -> Option<PathBuf> {
    // "0::/path" is this process's cgroup on the v2 hierarchy.
    let own = fs::read_to_string("/proc/self/cgroup").ok()?;
    let own = own.lines().find_map(|line| line.strip_prefix("0::"))?;
    let mountinfo = fs::read_to_string("/proc/self/mountinfo").ok()?;
    let (root, mount_point) = mountinfo.lines().find_map(|line| {
        // Fields: id parent dev root mount-point options [optional...] - fstype source super-options
        let (left, right) = line.split_once(" - ")?;
        if right.split_whitespace().next()? != "cgroup2" {
            return None;
        }
        let mut fields = left.split_whitespace().skip(3);
        let root = fields.next()?;
        let mount_point = fields.next()?;
        let options = fields.next()?;
        options
            .split(',')
            .any(|o| o == "rw")
            .then(|| (root.to_owned(), mount_point.to_owned()))
    })?;
    // Inside a cgroup namespace both are relative to the namespace root.
    let relative = own.strip_prefix(root.as_str()).unwrap_or(own);
    let dir = Path::new(&mount_point).join(relative.trim_start_matches('/'));
    // Writable for us means we can create (and remove) a child here.
    let probe = dir.join(format!("{CGROUP_PREFIX}{}-probe", std::process::id()));
    fs::create_dir(&probe).ok()?;
    let usable = probe.join("cgroup.procs").exists();
    let _ = fs::remove_dir(&probe);
    usable.then_some(dir)
}

/// Removes job cgroups left behind by an agent that died (its pid is gone).
fn remove_stale(parent: &Path) {
    let Ok(entries) = fs::read_dir(parent) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(rest) = name.to_str().and_then(|n| n.strip_prefix(CGROUP_PREFIX)) else {
            continue;
        };
        let owner = rest.split('-').next().unwrap_or_default();
        if owner.is_empty() || Path::new("/proc").join(owner).exists() {
            continue;
        }
        let cgroup = JobCgroup {
            dir: entry.path(),
            procs: None,
        };
        cgroup.kill();
        match cgroup.remove_blocking(Duration::from_secs(1)) {
            Ok(()) => tracing::info!(cgroup = %cgroup.dir.display(), "removed a stale job cgroup"),
            Err(err) => {
                tracing::warn!(cgroup = %cgroup.dir.display(), error = %err, "removing a stale job cgroup");
            }
        }
    }
}

/// One job's cgroup.
pub(super) struct JobCgroup {
    dir: PathBuf,
    /// `cgroup.procs`, open for writing until the child has moved itself in.
    procs: Option<File>,
}

impl JobCgroup {
    /// Creates a fresh cgroup under `parent` (blocking: call from the blocking pool).
    pub(super) fn create(parent: &Path) -> io::Result<JobCgroup> {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let dir = parent.join(format!("{CGROUP_PREFIX}{}-{n}", std::process::id()));
        fs::create_dir(&dir)?;
        match OpenOptions::new()
            .write(true)
            .open(dir.join("cgroup.procs"))
        {
            Ok(procs) => Ok(JobCgroup {
                dir,
                procs: Some(procs),
            }),
            Err(err) => {
                let _ = fs::remove_dir(&dir);
                Err(err)
            }
        }
    }

    /// The open `cgroup.procs` (close-on-exec) that the child writes `0` to
    /// between fork and exec, moving itself in before it can fork anything.
    pub(super) fn procs_fd(&self) -> Option<RawFd> {
        self.procs.as_ref().map(|f| f.as_raw_fd())
    }

    /// Closes the agent's copy of `cgroup.procs` once the child has started.
    pub(super) fn close_procs(&mut self) {
        self.procs = None;
    }

    /// Whether any process (of any descendant cgroup) is still in it.
    fn populated(&self) -> bool {
        match fs::read_to_string(self.dir.join("cgroup.events")) {
            Ok(events) => events.lines().any(|l| l == "populated 1"),
            // Gone (or unreadable): nothing left that we could wait for.
            Err(_) => false,
        }
    }

    fn members(&self) -> Vec<libc::pid_t> {
        let mut text = String::new();
        if let Ok(mut f) = File::open(self.dir.join("cgroup.procs")) {
            let _ = f.read_to_string(&mut text);
        }
        text.lines().filter_map(|l| l.trim().parse().ok()).collect()
    }

    /// SIGKILLs every process in the cgroup: atomically through `cgroup.kill`
    /// (Linux ≥ 5.14), else by signalling members until none is left.
    /// Returns whether anything was (or may have been) killed.
    fn kill(&self) -> bool {
        if !self.populated() {
            return false;
        }
        let kill_file = self.dir.join("cgroup.kill");
        if let Ok(mut f) = OpenOptions::new().write(true).open(&kill_file)
            && f.write_all(b"1").is_ok()
        {
            return true;
        }
        // Older kernel: a member may fork while we signal, so repeat.
        for _ in 0..100 {
            let members = self.members();
            if members.is_empty() {
                break;
            }
            for pid in members {
                signal_pid(pid, libc::SIGKILL);
            }
        }
        true
    }

    /// Removes the cgroup (from the blocking pool), logging a failure.
    pub(super) async fn discard(self) {
        let removed = tokio::task::spawn_blocking(move || {
            self.remove_blocking(KILL_SETTLE)
                .map_err(|err| (err, self.dir))
        })
        .await;
        match removed {
            Ok(Ok(())) => {}
            Ok(Err((err, dir))) => {
                tracing::warn!(cgroup = %dir.display(), error = %err, "removing the job cgroup");
            }
            Err(err) => tracing::warn!(error = %err, "removing the job cgroup"),
        }
    }

    /// Removes the (empty) cgroup, retrying while the kernel still counts
    /// dying tasks in it.
    fn remove_blocking(&self, patience: Duration) -> io::Result<()> {
        let deadline = std::time::Instant::now() + patience;
        loop {
            match fs::remove_dir(&self.dir) {
                Ok(()) => return Ok(()),
                Err(err) if err.kind() == io::ErrorKind::NotFound => return Ok(()),
                Err(err)
                    if err.raw_os_error() == Some(libc::EBUSY)
                        && std::time::Instant::now() < deadline =>
                {
                    std::thread::sleep(Duration::from_millis(2));
                }
                Err(err) => return Err(err),
            }
        }
    }
}

/// Everything one command started. While armed, dropping it (the `run`
/// future was dropped mid-execution) SIGKILLs all of it, not just the child
/// that `kill_on_drop` covers, and removes the cgroup in the background.
pub(super) struct Jail {
    pgid: libc::pid_t,
    cgroup: Option<JobCgroup>,
    /// Without a cgroup: descendants seen so far, with their start times
    /// (so a reused pid is never signalled).
    descendants: HashMap<libc::pid_t, u64>,
    armed: bool,
}

impl Jail {
    /// `pgid` is the child's pid (it called `setsid`, so it leads its group).
    pub(super) fn new(pgid: libc::pid_t, cgroup: Option<JobCgroup>) -> Jail {
        let mut descendants = HashMap::new();
        // The sweep starts from the child itself, identified by its start
        // time so that its pid, once reaped and reused, is never followed.
        if cgroup.is_none()
            && let Some(start) = start_time(pgid)
        {
            descendants.insert(pgid, start);
        }
        Jail {
            pgid,
            cgroup,
            descendants,
            armed: true,
        }
    }

    /// How often [`Jail::record`] should run while the command runs; `None`
    /// with a cgroup, which needs no bookkeeping.
    pub(super) fn sweep_interval(&self) -> Option<Duration> {
        self.cgroup.is_none().then_some(SWEEP_INTERVAL)
    }

    /// Without a cgroup: records the current descendants of the child and of
    /// every descendant recorded before (which may have been re-parented).
    pub(super) async fn record(&mut self) {
        if self.cgroup.is_some() {
            return;
        }
        let known = std::mem::take(&mut self.descendants);
        let fallback = known.clone();
        self.descendants = tokio::task::spawn_blocking(move || descendants(&known))
            .await
            .unwrap_or(fallback);
    }

    /// Sends `signal` to the group and to every process of the cgroup (or
    /// every recorded descendant). Returns whether any process was signalled.
    pub(super) fn signal(&self, signal: libc::c_int) -> bool {
        let mut hit = signal_group(self.pgid, signal);
        if let Some(cgroup) = &self.cgroup {
            for pid in cgroup.members() {
                hit |= signal_pid(pid, signal);
            }
        }
        for (&pid, &start) in &self.descendants {
            if start_time(pid) == Some(start) {
                hit |= signal_pid(pid, signal);
            }
        }
        hit
    }

    /// SIGKILLs everything. Returns whether any process was killed.
    pub(super) fn kill(&self) -> bool {
        let mut hit = self.signal(libc::SIGKILL);
        if let Some(cgroup) = &self.cgroup {
            hit |= cgroup.kill();
        }
        hit
    }

    /// Whether anything (zombies included) is left.
    pub(super) fn has_members(&self) -> bool {
        if let Some(cgroup) = &self.cgroup {
            return cgroup.populated() || group_alive(self.pgid);
        }
        group_alive(self.pgid)
            || self
                .descendants
                .iter()
                .any(|(&pid, &start)| start_time(pid) == Some(start))
    }

    /// After a kill: waits (bounded by [`KILL_SETTLE`]) until nothing is left.
    pub(super) async fn settle(&self) {
        let deadline = tokio::time::Instant::now() + KILL_SETTLE;
        let mut pause = Duration::from_millis(1);
        while self.has_members() {
            if tokio::time::Instant::now() >= deadline {
                tracing::warn!(
                    pgid = self.pgid,
                    "processes of the command still exist after SIGKILL"
                );
                return;
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(POLL);
        }
    }

    /// The child exited: kills whatever it left behind and waits for it to go.
    pub(super) async fn finish(&mut self) {
        // The child is reaped, so a walk only finds something below the
        // descendants recorded earlier; skip it (and its cost on every short
        // job) when there are none.
        if self.descendants.len() > 1 {
            self.record().await;
        }
        if self.kill() {
            self.settle().await;
        }
    }

    /// Everything was killed and the child reaped: removes the cgroup.
    pub(super) async fn release(mut self) {
        self.armed = false;
        if let Some(cgroup) = self.cgroup.take() {
            cgroup.discard().await;
        }
    }
}

impl Drop for Jail {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        self.kill();
        if let Some(cgroup) = self.cgroup.take() {
            // The killed processes take a moment to leave the cgroup; do not
            // block whoever dropped us while they do.
            let spawned = std::thread::Builder::new()
                .name("fleetcmd-cgroup-rm".to_owned())
                .spawn(move || {
                    if let Err(err) = cgroup.remove_blocking(Duration::from_secs(5)) {
                        tracing::warn!(cgroup = %cgroup.dir.display(), error = %err, "removing the job cgroup");
                    }
                });
            if let Err(err) = spawned {
                tracing::warn!(error = %err, "removing the job cgroup");
            }
        }
    }
}

#[allow(unsafe_code)]
fn signal_group(pgid: libc::pid_t, signal: libc::c_int) -> bool {
    // SAFETY: kill has no memory-safety preconditions; the negative pid
    // addresses the group whose leader is our (not yet reaped, or just
    // reaped) child.
    if unsafe { libc::kill(-pgid, signal) } == 0 {
        return true;
    }
    let err = io::Error::last_os_error();
    if err.raw_os_error() != Some(libc::ESRCH) {
        tracing::warn!(pgid, signal, error = %err, "signalling the process group");
    }
    false
}

#[allow(unsafe_code)]
fn signal_pid(pid: libc::pid_t, signal: libc::c_int) -> bool {
    if pid <= 1 {
        return false;
    }
    // SAFETY: kill has no memory-safety preconditions.
    unsafe { libc::kill(pid, signal) == 0 }
}

#[allow(unsafe_code)]
fn group_alive(pgid: libc::pid_t) -> bool {
    // SAFETY: signal 0 only checks for existence and permission.
    let alive = unsafe { libc::kill(-pgid, 0) } == 0;
    alive || io::Error::last_os_error().raw_os_error() != Some(libc::ESRCH)
}

/// `(ppid, start time, state)` of a process from `/proc/<pid>/stat`.
fn stat(pid: libc::pid_t) -> Option<(libc::pid_t, u64, char)> {
    let text = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may contain spaces and parentheses: split at the last ')'.
    let fields: Vec<&str> = text.rsplit_once(')')?.1.split_whitespace().collect();
    let state = fields.first()?.chars().next()?;
    let ppid = fields.get(1)?.parse().ok()?;
    // Field 22 of the whole line is the 20th after the name.
    let start = fields.get(19)?.parse().ok()?;
    Some((ppid, start, state))
}

/// Start time of a live (not zombie) process.
fn start_time(pid: libc::pid_t) -> Option<u64> {
    stat(pid).and_then(|(_, start, state)| (!matches!(state, 'Z' | 'X')).then_some(start))
}

/// The still-running processes of `known` and all their descendants
/// (blocking: walks `/proc`).
fn descendants(known: &HashMap<libc::pid_t, u64>) -> HashMap<libc::pid_t, u64> {
    let mut children: HashMap<libc::pid_t, Vec<(libc::pid_t, u64)>> = HashMap::new();
    let mut alive: HashMap<libc::pid_t, u64> = HashMap::new();
    if let Ok(entries) = fs::read_dir("/proc") {
        for entry in entries.flatten() {
            let Some(pid) = entry
                .file_name()
                .to_str()
                .and_then(|n| n.parse::<libc::pid_t>().ok())
            else {
                continue;
            };
            if let Some((ppid, start, state)) = stat(pid)
                && !matches!(state, 'Z' | 'X')
            {
                children.entry(ppid).or_default().push((pid, start));
                alive.insert(pid, start);
            }
        }
    }
    let mut found = HashMap::new();
    let mut queue: Vec<libc::pid_t> = known
        .iter()
        .filter(|(pid, start)| alive.get(pid) == Some(start))
        .map(|(&pid, _)| pid)
        .collect();
    let mut seen = HashSet::new();
    while let Some(pid) = queue.pop() {
        if !seen.insert(pid) {
            continue;
        }
        if let Some(&start) = alive.get(&pid) {
            found.insert(pid, start);
        }
        if let Some(kids) = children.get(&pid) {
            queue.extend(kids.iter().map(|&(kid, _)| kid));
        }
    }
    found
}
