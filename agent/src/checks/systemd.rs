//! `systemd`: is a unit active? Asks `systemctl show` for the unit's
//! `LoadState`, `ActiveState` and `SubState` (no shell, cleared environment,
//! killed on timeout).

use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use fleetcmd_core::nagios::CheckState;

use super::{Outcome, humantime};

/// What systemctl printed, read.
#[derive(Debug, Default, PartialEq)]
struct UnitState {
    load: String,
    active: String,
    sub: String,
}

fn parse_show(text: &str) -> UnitState {
    let mut state = UnitState::default();
    for line in text.lines() {
        match line.split_once('=') {
            Some(("LoadState", v)) => state.load = v.trim().to_owned(),
            Some(("ActiveState", v)) => state.active = v.trim().to_owned(),
            Some(("SubState", v)) => state.sub = v.trim().to_owned(),
            _ => {}
        }
    }
    state
}

/// active → OK; activating, reloading, deactivating → WARNING (passing
/// through); failed, inactive, or a unit that does not exist → CRITICAL;
/// anything else (an empty answer, a state this code does not know) →
/// UNKNOWN.
fn judge(unit: &str, s: &UnitState) -> Outcome {
    let sub = if s.sub.is_empty() {
        String::new()
    } else {
        format!(" ({})", s.sub)
    };
    if s.load == "not-found" {
        return Outcome::new(CheckState::Critical, format!("{unit}: unit not found"));
    }
    let state = match s.active.as_str() {
        "active" => CheckState::Ok,
        "activating" | "reloading" | "deactivating" => CheckState::Warning,
        "failed" | "inactive" => CheckState::Critical,
        _ => CheckState::Unknown,
    };
    if s.active.is_empty() {
        return Outcome::new(state, format!("{unit}: systemctl reported no ActiveState"));
    }
    Outcome::new(state, format!("{unit} {}{sub}", s.active))
}

pub(super) async fn run(unit: &str, systemctl: &Path, timeout: Duration) -> Outcome {
    let mut command = tokio::process::Command::new(systemctl);
    command
        .args([
            "show",
            "--property=LoadState,ActiveState,SubState",
            "--",
            unit,
        ])
        .env_clear()
        .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
        .env("LANG", "C.UTF-8")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let output = match tokio::time::timeout(timeout, command.output()).await {
        Err(_) => {
            return Outcome::new(
                CheckState::Unknown,
                format!(
                    "{} show {unit}: timed out after {}",
                    systemctl.display(),
                    humantime(timeout)
                ),
            );
        }
        Ok(Err(e)) => {
            return Outcome::new(CheckState::Unknown, format!("{}: {e}", systemctl.display()));
        }
        Ok(Ok(output)) => output,
    };
    if !output.status.success() {
        let stderr = String::from_utf8_lossy(&output.stderr);
        return Outcome::new(
            CheckState::Unknown,
            format!(
                "{} show {unit}: {} {}",
                systemctl.display(),
                output.status,
                stderr.lines().next().unwrap_or("").trim()
            ),
        );
    }
    judge(unit, &parse_show(&String::from_utf8_lossy(&output.stdout)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(show: &str, state: CheckState, summary: &str) {
        let out = judge("nginx.service", &parse_show(show));
        assert_eq!(
            (out.state, out.summary.as_str()),
            (state, summary),
            "{show:?}"
        );
    }

    #[test]
    fn states() {
        check(
            "LoadState=loaded\nActiveState=active\nSubState=running\n",
            CheckState::Ok,
            "nginx.service active (running)",
        );
        check(
            "ActiveState=activating\nSubState=start\n",
            CheckState::Warning,
            "nginx.service activating (start)",
        );
        check(
            "ActiveState=reloading\n",
            CheckState::Warning,
            "nginx.service reloading",
        );
        check(
            "ActiveState=deactivating\nSubState=stop-sigterm",
            CheckState::Warning,
            "nginx.service deactivating (stop-sigterm)",
        );
        check(
            "ActiveState=failed\nSubState=failed\n",
            CheckState::Critical,
            "nginx.service failed (failed)",
        );
        check(
            "ActiveState=inactive\nSubState=dead\n",
            CheckState::Critical,
            "nginx.service inactive (dead)",
        );
        check(
            "LoadState=not-found\nActiveState=inactive\nSubState=dead\n",
            CheckState::Critical,
            "nginx.service: unit not found",
        );
        check(
            "ActiveState=maintenance\n",
            CheckState::Unknown,
            "nginx.service maintenance",
        );
        check(
            "",
            CheckState::Unknown,
            "nginx.service: systemctl reported no ActiveState",
        );
        check(
            "garbage",
            CheckState::Unknown,
            "nginx.service: systemctl reported no ActiveState",
        );
    }
}
