//! `memory`: used memory (total minus available, as `free` counts it)
//! against used-percent thresholds.

use fleetcmd_core::nagios::CheckState;
use sysinfo::{MemoryRefreshKind, RefreshKind, System};

use super::config::Limits;
use super::{Outcome, perf};

const GIB: f64 = 1024.0 * 1024.0 * 1024.0;

pub(super) async fn run(limits: &Limits) -> Outcome {
    let read = tokio::task::spawn_blocking(|| {
        let system = System::new_with_specifics(
            RefreshKind::nothing().with_memory(MemoryRefreshKind::nothing().with_ram()),
        );
        (system.total_memory(), system.used_memory())
    })
    .await;
    match read {
        Ok((total, used)) => judge(total, used, limits),
        Err(e) => Outcome::new(CheckState::Unknown, format!("reading memory: {e}")),
    }
}

fn judge(total: u64, used: u64, limits: &Limits) -> Outcome {
    if total == 0 {
        return Outcome::new(
            CheckState::Unknown,
            "MEMORY UNKNOWN - total memory reads as 0",
        );
    }
    let percent = used as f64 * 100.0 / total as f64;
    let state = limits.thresholds().evaluate(percent);
    let warn = limits.warn.as_ref().map(|w| w.0.as_str()).unwrap_or("");
    let crit = limits.crit.as_ref().map(|c| c.0.as_str()).unwrap_or("");
    let mut out = Outcome::new(
        state,
        format!(
            "MEMORY {state} - {percent:.1}% used ({:.1} GiB of {:.1} GiB)",
            used as f64 / GIB,
            total as f64 / GIB
        ),
    );
    out.perfdata = vec![
        perf(
            "used_percent",
            (percent * 100.0).round() / 100.0,
            "%",
            warn,
            crit,
            Some(0.0),
            Some(100.0),
        ),
        perf(
            "used",
            used as f64,
            "B",
            "",
            "",
            Some(0.0),
            Some(total as f64),
        ),
    ];
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use fleetcmd_core::nagios::Range;

    #[test]
    fn thresholds_on_used_percent() {
        let limits = Limits {
            warn: Some(("80".into(), Range::parse("80").expect("range"))),
            crit: Some(("90".into(), Range::parse("90").expect("range"))),
        };
        for (used, state) in [
            (500, CheckState::Ok),
            (850, CheckState::Warning),
            (950, CheckState::Critical),
        ] {
            let out = judge(1000, used, &limits);
            assert_eq!(out.state, state, "{used}");
            assert!(
                out.summary.starts_with(&format!("MEMORY {state} - ")),
                "{}",
                out.summary
            );
        }
        assert_eq!(judge(0, 0, &limits).state, CheckState::Unknown);
    }
}
