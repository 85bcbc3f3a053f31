//! `nagios`: runs a Nagios-compatible plugin from its argv in agent.toml
//! (no shell) with the executor's containment, and reads its exit status
//! and output with `fleetcmd_core::nagios`. The plugin runs as the agent's
//! user; only the host's admin configures it (agent.toml), the controller
//! cannot, so this is not a remote execution path.

use std::collections::BTreeMap;
use std::time::Duration;

use fleetcmd_core::nagios::{CheckState, parse_output, state_from_exit};

use super::{Outcome, humantime};
use crate::exec::{ExecLimits, Termination, execute_local_plugin};

/// Plugin output kept per stream; the rest is read and dropped.
pub(crate) const MAX_PLUGIN_OUTPUT: usize = 64 * 1024;
/// SIGTERM at the timeout, SIGKILL this much later.
const KILL_GRACE: Duration = Duration::from_secs(1);

pub(super) async fn run(
    command: &[String],
    env: &BTreeMap<String, String>,
    timeout: Duration,
) -> Outcome {
    let limits = ExecLimits {
        max_output: MAX_PLUGIN_OUTPUT,
        kill_grace: KILL_GRACE,
        live: None,
    };
    let out = execute_local_plugin(command, env, timeout, &limits).await;
    let program = command.first().map(String::as_str).unwrap_or("");
    if out.stdout_dropped > 0 {
        tracing::debug!(
            program,
            dropped = out.stdout_dropped,
            "plugin output beyond 64 KiB dropped"
        );
    }
    let parsed = parse_output(&String::from_utf8_lossy(&out.stdout));
    for e in &parsed.errors {
        tracing::debug!(program, error = %e, "plugin perfdata skipped");
    }
    let stderr = String::from_utf8_lossy(&out.stderr);
    let first_stderr = stderr
        .lines()
        .map(str::trim)
        .find(|l| !l.is_empty())
        .unwrap_or("");
    let (state, summary) = match out.termination {
        Termination::Exited(code) => {
            let state = state_from_exit(Some(code));
            let summary = if !parsed.summary.is_empty() {
                parsed.summary.clone()
            } else if !first_stderr.is_empty() {
                first_stderr.to_owned()
            } else {
                format!("{program}: no output, exit status {code}")
            };
            let summary = if (0..=3).contains(&code) {
                summary
            } else {
                format!("exit status {code}: {summary}")
            };
            (state, summary)
        }
        Termination::Signaled(sig) => (
            state_from_exit(None),
            format!("{program}: killed by signal {sig}"),
        ),
        Termination::TimedOut => (
            CheckState::Unknown,
            format!("timed out after {}", humantime(timeout)),
        ),
        Termination::Canceled => (CheckState::Unknown, "canceled".to_owned()),
        Termination::SpawnFailed(e) | Termination::PathRefused(e) => (CheckState::Unknown, e),
    };
    Outcome {
        state,
        summary,
        perfdata: parsed
            .perfdata
            .into_iter()
            .map(|p| fleetcmd_proto::v1::PerfData {
                label: p.label,
                value: p.value,
                unit: p.unit,
                warn: p.warn,
                crit: p.crit,
                min: p.min,
                max: p.max,
            })
            .collect(),
    }
}
