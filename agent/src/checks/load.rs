//! `load`: the 1, 5 and 15 minute load averages against thresholds
//! (`warn = "8,6,4"`), optionally divided by the number of CPUs
//! (`per_cpu = true`), like `check_load -r`.

use fleetcmd_core::nagios::CheckState;
use sysinfo::{CpuRefreshKind, RefreshKind, System};

use super::config::Limits;
use super::{Outcome, perf};

pub(super) async fn run(limits: &[Limits; 3], per_cpu: bool) -> Outcome {
    let read = tokio::task::spawn_blocking(move || {
        let load = System::load_average();
        let cpus = if per_cpu {
            let system = System::new_with_specifics(
                RefreshKind::nothing().with_cpu(CpuRefreshKind::nothing()),
            );
            system.cpus().len()
        } else {
            1
        };
        ([load.one, load.five, load.fifteen], cpus)
    })
    .await;
    match read {
        Ok((load, cpus)) => judge(load, per_cpu.then_some(cpus), limits),
        Err(e) => Outcome::new(
            CheckState::Unknown,
            format!("reading the load average: {e}"),
        ),
    }
}

fn judge(load: [f64; 3], cpus: Option<usize>, limits: &[Limits; 3]) -> Outcome {
    let divisor = cpus.unwrap_or(1).max(1) as f64;
    let mut worst = CheckState::Ok;
    let mut perfdata = Vec::new();
    let mut values = Vec::new();
    for ((label, value), limit) in ["load1", "load5", "load15"]
        .into_iter()
        .zip(load)
        .zip(limits)
    {
        let value = value / divisor;
        worst = worst.max(limit.thresholds().evaluate(value));
        values.push(format!("{value:.2}"));
        perfdata.push(perf(
            label,
            (value * 1000.0).round() / 1000.0,
            "",
            limit.warn.as_ref().map(|w| w.0.as_str()).unwrap_or(""),
            limit.crit.as_ref().map(|c| c.0.as_str()).unwrap_or(""),
            Some(0.0),
            None,
        ));
    }
    let per = match cpus {
        Some(n) => format!(" (per CPU, {n} CPUs)"),
        None => String::new(),
    };
    Outcome {
        state: worst,
        summary: format!("LOAD {worst} - load average{per}: {}", values.join(", ")),
        perfdata,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use fleetcmd_core::nagios::Range;

    fn limits(warn: [&str; 3], crit: [&str; 3]) -> [Limits; 3] {
        let r = |s: &str| Range::parse(s).ok().map(|r| (s.to_owned(), r));
        [0, 1, 2].map(|i| Limits {
            warn: r(warn[i]),
            crit: r(crit[i]),
        })
    }

    #[test]
    fn any_average_over_its_threshold_counts() {
        let l = limits(["8", "6", "4"], ["16", "12", "8"]);
        for (load, cpus, state, summary) in [
            (
                [1.0, 1.0, 1.0],
                None,
                CheckState::Ok,
                "LOAD OK - load average: 1.00, 1.00, 1.00",
            ),
            (
                [1.0, 1.0, 5.0],
                None,
                CheckState::Warning,
                "LOAD WARNING - load average: 1.00, 1.00, 5.00",
            ),
            (
                [17.0, 1.0, 1.0],
                None,
                CheckState::Critical,
                "LOAD CRITICAL - load average: 17.00, 1.00, 1.00",
            ),
            (
                [40.0, 20.0, 10.0],
                Some(4),
                CheckState::Warning,
                "LOAD WARNING - load average (per CPU, 4 CPUs): 10.00, 5.00, 2.50",
            ),
        ] {
            let out = judge(load, cpus, &l);
            assert_eq!((out.state, out.summary.as_str()), (state, summary));
        }
        let out = judge([1.0, 2.0, 3.0], None, &l);
        assert_eq!(out.perfdata[2].label, "load15");
        assert_eq!(out.perfdata[2].warn, "4");
    }
}
