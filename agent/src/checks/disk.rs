//! `disk`: used space per mount (one mount, or every real file system, as
//! the heartbeat's metrics list them) against used-percent thresholds. The
//! worst mount decides the state; perfdata has one item per mount.

use fleetcmd_core::nagios::CheckState;

use super::config::Limits;
use super::{Outcome, perf};
use crate::metrics::DiskUsage;

pub(super) async fn run(mount: Option<&str>, limits: &Limits) -> Outcome {
    // statvfs on each mount can block (a hung NFS server): blocking pool.
    let disks = match tokio::task::spawn_blocking(crate::metrics::disk_usage).await {
        Ok(d) => d,
        Err(e) => return Outcome::new(CheckState::Unknown, format!("reading disk usage: {e}")),
    };
    judge(mount, &disks, limits)
}

fn used_percent(d: &DiskUsage) -> f64 {
    if d.total_bytes == 0 {
        return 0.0;
    }
    let used = d.total_bytes.saturating_sub(d.available_bytes);
    used as f64 * 100.0 / d.total_bytes as f64
}

fn judge(mount: Option<&str>, disks: &[DiskUsage], limits: &Limits) -> Outcome {
    let selected: Vec<&DiskUsage> = match mount {
        Some(m) => disks.iter().filter(|d| d.mount == m).collect(),
        None => disks.iter().collect(),
    };
    if selected.is_empty() {
        return Outcome::new(
            CheckState::Unknown,
            match mount {
                Some(m) => format!("DISK UNKNOWN - {m} is not a mounted file system"),
                None => "DISK UNKNOWN - no file systems found".to_owned(),
            },
        );
    }
    let thresholds = limits.thresholds();
    let warn = limits.warn.as_ref().map(|w| w.0.as_str()).unwrap_or("");
    let crit = limits.crit.as_ref().map(|c| c.0.as_str()).unwrap_or("");
    let mut worst = CheckState::Ok;
    let mut alerts = Vec::new();
    let mut perfdata = Vec::new();
    for d in &selected {
        let used = used_percent(d);
        let state = thresholds.evaluate(used);
        if state != CheckState::Ok {
            alerts.push(format!("{} {used:.1}% used", d.mount));
        }
        worst = worst.max(state);
        perfdata.push(perf(
            &d.mount,
            (used * 100.0).round() / 100.0,
            "%",
            warn,
            crit,
            Some(0.0),
            Some(100.0),
        ));
    }
    let summary = if alerts.is_empty() {
        let list: Vec<String> = selected
            .iter()
            .map(|d| format!("{} {:.1}% used", d.mount, used_percent(d)))
            .collect();
        format!("DISK OK - {}", list.join(", "))
    } else {
        format!("DISK {worst} - {}", alerts.join(", "))
    };
    Outcome {
        state: worst,
        summary,
        perfdata,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use fleetcmd_core::nagios::Range;

    fn disk(mount: &str, total: u64, available: u64) -> DiskUsage {
        DiskUsage {
            mount: mount.into(),
            total_bytes: total,
            available_bytes: available,
        }
    }

    fn limits(warn: &str, crit: &str) -> Limits {
        let r = |s: &str| Range::parse(s).ok().map(|r| (s.to_owned(), r));
        Limits {
            warn: r(warn),
            crit: r(crit),
        }
    }

    #[test]
    fn worst_mount_decides() {
        let disks = [
            disk("/", 100, 50),
            disk("/var", 100, 15),
            disk("/srv", 100, 5),
        ];
        let l = limits("80", "90");
        for (mount, state, summary) in [
            (Some("/"), CheckState::Ok, "DISK OK - / 50.0% used"),
            (
                Some("/var"),
                CheckState::Warning,
                "DISK WARNING - /var 85.0% used",
            ),
            (
                Some("/srv"),
                CheckState::Critical,
                "DISK CRITICAL - /srv 95.0% used",
            ),
            (
                None,
                CheckState::Critical,
                "DISK CRITICAL - /var 85.0% used, /srv 95.0% used",
            ),
            (
                Some("/nope"),
                CheckState::Unknown,
                "DISK UNKNOWN - /nope is not a mounted file system",
            ),
        ] {
            let out = judge(mount, &disks, &l);
            assert_eq!(
                (out.state, out.summary.as_str()),
                (state, summary),
                "{mount:?}"
            );
        }
        let all = judge(None, &disks, &l);
        let labels: Vec<&str> = all.perfdata.iter().map(|p| p.label.as_str()).collect();
        assert_eq!(labels, ["/", "/var", "/srv"]);
        assert_eq!(all.perfdata[1].value, 85.0);
        assert_eq!(
            (all.perfdata[1].warn.as_str(), all.perfdata[1].crit.as_str()),
            ("80", "90")
        );
        assert_eq!(judge(None, &[], &l).state, CheckState::Unknown);
    }
}
