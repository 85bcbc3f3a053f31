//! Local health checks from agent.toml (`[[check]]`): each runs
//! on its own interval (jittered) in its own task, bounded by its timeout;
//! the latest result of each is kept in [`Latest`], which the heartbeat reads
//! without waiting for anything (a check still running reports its previous
//! result). Blocking work (sysinfo, statvfs) runs on the blocking pool, and
//! processes (systemctl, Nagios plugins) are awaited asynchronously, so no
//! check can block an async worker or delay a heartbeat.
//!
//! One file per kind; what plugin output and thresholds mean is decided in
//! `fleetcmd_core::nagios`.

pub mod config;
mod disk;
mod http;
mod load;
mod memory;
mod nagios;
mod systemd;
mod tcp;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use fleetcmd_core::nagios::CheckState;
use fleetcmd_proto::v1 as pb;
use tokio::task::JoinSet;

pub use config::{CheckConfig, CheckKind};

/// Longest summary kept (bytes, cut at a character boundary).
const MAX_SUMMARY: usize = 512;
/// Most perfdata items kept per result, so one noisy plugin cannot bloat
/// every heartbeat.
const MAX_PERFDATA: usize = 32;
/// Beyond its own timeout, how long a run may take before the runner gives
/// up on it (a plugin gets SIGTERM at its timeout and SIGKILL 1 s later).
const OVERRUN_GRACE: Duration = Duration::from_secs(3);

/// What one run of a check found.
#[derive(Debug, Clone)]
pub(crate) struct Outcome {
    pub state: CheckState,
    pub summary: String,
    pub perfdata: Vec<pb::PerfData>,
}

impl Outcome {
    pub fn new(state: CheckState, summary: impl Into<String>) -> Outcome {
        Outcome {
            state,
            summary: summary.into(),
            perfdata: Vec::new(),
        }
    }
}

/// A perfdata item measured by a built-in check.
pub(crate) fn perf(
    label: &str,
    value: f64,
    unit: &str,
    warn: &str,
    crit: &str,
    min: Option<f64>,
    max: Option<f64>,
) -> pb::PerfData {
    pb::PerfData {
        label: label.to_owned(),
        value,
        unit: unit.to_owned(),
        warn: warn.to_owned(),
        crit: crit.to_owned(),
        min,
        max,
    }
}

pub(crate) fn to_pb_state(state: CheckState) -> pb::CheckState {
    match state {
        CheckState::Ok => pb::CheckState::Ok,
        CheckState::Warning => pb::CheckState::Warning,
        CheckState::Critical => pb::CheckState::Critical,
        CheckState::Unknown => pb::CheckState::Unknown,
    }
}

fn one_line(text: &str) -> String {
    let line = text.lines().next().unwrap_or("").trim();
    if line.len() <= MAX_SUMMARY {
        return line.to_owned();
    }
    let mut end = MAX_SUMMARY;
    while !line.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &line[..end])
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// A configured check, ready to run (an `http` check keeps its client).
#[derive(Debug)]
pub struct Check {
    config: CheckConfig,
    probe: Probe,
}

#[derive(Debug)]
enum Probe {
    Plain,
    Http(Box<Result<http::Probe, String>>),
}

impl Check {
    pub fn new(config: CheckConfig) -> Check {
        let probe = match &config.kind {
            CheckKind::Http(h) => Probe::Http(Box::new(http::Probe::new(h, config.timeout))),
            _ => Probe::Plain,
        };
        Check { config, probe }
    }

    pub fn name(&self) -> &str {
        &self.config.name
    }

    /// Runs the check once; never takes much longer than its timeout.
    pub async fn run(&self) -> pb::CheckResult {
        let started = Instant::now();
        let timeout = self.config.timeout;
        let work = async {
            match (&self.config.kind, &self.probe) {
                (CheckKind::Systemd { unit, systemctl }, _) => {
                    systemd::run(unit, systemctl, timeout).await
                }
                (CheckKind::Tcp { address }, _) => tcp::run(address, timeout).await,
                (CheckKind::Http(_), Probe::Http(probe)) => match probe.as_ref() {
                    Ok(p) => p.run(timeout).await,
                    Err(e) => Outcome::new(CheckState::Unknown, e.clone()),
                },
                (CheckKind::Http(_), Probe::Plain) => {
                    Outcome::new(CheckState::Unknown, "http client missing")
                }
                (CheckKind::Disk { mount, limits }, _) => disk::run(mount.as_deref(), limits).await,
                (CheckKind::Load { limits, per_cpu }, _) => load::run(limits, *per_cpu).await,
                (CheckKind::Memory { limits }, _) => memory::run(limits).await,
                (CheckKind::Nagios { command, env }, _) => nagios::run(command, env, timeout).await,
            }
        };
        let outcome = match tokio::time::timeout(timeout + OVERRUN_GRACE, work).await {
            Ok(outcome) => outcome,
            // Dropping the run kills what it started (kill_on_drop, the
            // plugin's process group).
            Err(_) => Outcome::new(
                CheckState::Unknown,
                format!("timed out after {}", humantime(timeout)),
            ),
        };
        let mut perfdata = outcome.perfdata;
        perfdata.truncate(MAX_PERFDATA);
        pb::CheckResult {
            name: self.config.name.clone(),
            kind: self.config.kind.name().to_owned(),
            state: to_pb_state(outcome.state) as i32,
            summary: one_line(&outcome.summary),
            duration_ms: u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX),
            checked_at_ms: now_ms(),
            perfdata,
        }
    }
}

/// `10s`, `1.5s`, `250ms`: how timeouts are named in summaries.
pub(crate) fn humantime(d: Duration) -> String {
    if d.subsec_millis() == 0 {
        format!("{}s", d.as_secs())
    } else if d < Duration::from_secs(1) {
        format!("{}ms", d.as_millis())
    } else {
        format!("{:.1}s", d.as_secs_f64())
    }
}

/// The latest result of every check, in config order; read by the
/// heartbeat. Checks that have not finished a first run are left out.
/// A first result or a change of state is also told (`changed`), so the
/// agent sends it at once rather than at the next heartbeat (found by an
/// outside test: a new agent's instances were judged "no check named …"
/// for a heartbeat interval, and alerted on).
#[derive(Debug, Clone, Default)]
pub struct Latest(
    Arc<Mutex<Vec<Option<pb::CheckResult>>>>,
    Arc<tokio::sync::Notify>,
);

impl Latest {
    fn with_len(n: usize) -> Latest {
        Latest(
            Arc::new(Mutex::new(vec![None; n])),
            Arc::new(tokio::sync::Notify::new()),
        )
    }

    /// Resolves after a check's first result or change of state (one
    /// wake-up for any number of changes since the last).
    pub async fn changed(&self) {
        self.1.notified().await;
    }

    /// Never waits on a running check: the lock is only held to copy or
    /// replace a result.
    pub fn snapshot(&self) -> Vec<pb::CheckResult> {
        lock(&self.0).iter().flatten().cloned().collect()
    }

    /// Stores `result`; returns the previous state of the check.
    fn store(&self, index: usize, result: pb::CheckResult) -> Option<i32> {
        let mut all = lock(&self.0);
        let slot = all.get_mut(index)?;
        let previous = slot.as_ref().map(|r| r.state);
        let state = result.state;
        *slot = Some(result);
        drop(all);
        if previous != Some(state) {
            self.1.notify_one();
        }
        previous
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Owns the check tasks; dropping it (or [`CheckRunner::shutdown`]) aborts
/// them, and with them whatever they had started.
#[derive(Debug)]
pub struct CheckRunner {
    tasks: JoinSet<()>,
    latest: Latest,
}

impl CheckRunner {
    /// Starts one task per check on the current runtime. The first run of
    /// each comes after a random part of the first few seconds, so checks
    /// of many agents (and of one agent) do not all start at once.
    pub fn start(checks: Vec<CheckConfig>) -> CheckRunner {
        let latest = Latest::with_len(checks.len());
        let mut tasks = JoinSet::new();
        for (index, config) in checks.into_iter().enumerate() {
            let latest = latest.clone();
            tasks.spawn(run_loop(index, Check::new(config), latest));
        }
        CheckRunner { tasks, latest }
    }

    pub fn latest(&self) -> Latest {
        self.latest.clone()
    }

    pub async fn shutdown(mut self) {
        self.tasks.abort_all();
        while self.tasks.join_next().await.is_some() {}
    }
}

async fn run_loop(index: usize, check: Check, latest: Latest) {
    let interval = check.config.interval;
    let first = interval
        .min(Duration::from_secs(5))
        .mul_f64(crate::conn::jitter_factor() - 0.8);
    let mut next = tokio::time::Instant::now() + first;
    loop {
        tokio::time::sleep_until(next).await;
        let started = tokio::time::Instant::now();
        let result = check.run().await;
        log_change(&check, &result, latest.store(index, result.clone()));
        // ±20 % around the interval, measured from the start of the run.
        next = (started + interval.mul_f64(crate::conn::jitter_factor()))
            .max(tokio::time::Instant::now());
    }
}

/// Logs the first result and every change of state, once.
fn log_change(check: &Check, result: &pb::CheckResult, previous: Option<i32>) {
    if previous == Some(result.state) {
        return;
    }
    let state = pb::CheckState::try_from(result.state).unwrap_or(pb::CheckState::Unknown);
    let from = previous
        .and_then(|p| pb::CheckState::try_from(p).ok())
        .map(|p| p.as_str_name().trim_start_matches("CHECK_STATE_"))
        .unwrap_or("none");
    let to = state.as_str_name().trim_start_matches("CHECK_STATE_");
    if state == pb::CheckState::Ok {
        tracing::info!(check = %check.name(), kind = %result.kind, from, to, summary = %result.summary, "check state changed");
    } else {
        tracing::warn!(check = %check.name(), kind = %result.kind, from, to, summary = %result.summary, "check state changed");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn summaries_are_one_bounded_line() {
        assert_eq!(one_line("  OK - fine \nsecond"), "OK - fine");
        assert_eq!(one_line(""), "");
        let long = "é".repeat(MAX_SUMMARY);
        let cut = one_line(&long);
        assert!(cut.len() <= MAX_SUMMARY + '…'.len_utf8(), "{}", cut.len());
        assert!(cut.ends_with('…'));
    }

    #[test]
    fn durations_read_like_config() {
        assert_eq!(humantime(Duration::from_secs(10)), "10s");
        assert_eq!(humantime(Duration::from_millis(250)), "250ms");
        assert_eq!(humantime(Duration::from_millis(1500)), "1.5s");
    }

    #[test]
    fn latest_keeps_config_order_and_skips_checks_without_a_result() {
        let latest = Latest::with_len(3);
        let result = |name: &str, state: pb::CheckState| pb::CheckResult {
            name: name.into(),
            state: state as i32,
            ..Default::default()
        };
        assert_eq!(latest.store(2, result("c", pb::CheckState::Ok)), None);
        assert_eq!(latest.store(0, result("a", pb::CheckState::Critical)), None);
        assert_eq!(
            latest.store(0, result("a", pb::CheckState::Ok)),
            Some(pb::CheckState::Critical as i32)
        );
        let names: Vec<String> = latest.snapshot().into_iter().map(|r| r.name).collect();
        assert_eq!(names, ["a", "c"]);
        assert_eq!(latest.store(7, result("x", pb::CheckState::Ok)), None);
    }

    #[tokio::test]
    async fn a_first_result_and_a_change_of_state_are_told_a_repeat_is_not() {
        let latest = Latest::with_len(1);
        let result = |state: pb::CheckState| pb::CheckResult {
            name: "disk".into(),
            state: state as i32,
            ..Default::default()
        };
        let told = |latest: &Latest| {
            let latest = latest.clone();
            async move {
                tokio::time::timeout(Duration::from_millis(50), latest.changed())
                    .await
                    .is_ok()
            }
        };
        assert!(!told(&latest).await, "nothing yet");
        latest.store(0, result(pb::CheckState::Ok));
        assert!(told(&latest).await, "a first result");
        latest.store(0, result(pb::CheckState::Ok));
        assert!(!told(&latest).await, "the same state again");
        latest.store(0, result(pb::CheckState::Critical));
        latest.store(0, result(pb::CheckState::Ok));
        assert!(told(&latest).await, "changes");
        assert!(!told(&latest).await, "one wake-up for both");
    }
}
