//! The figures that tell several controllers apart at a scrape: which
//! controller this is (`fleetcmd_controller_info`: its lease holder id,
//! its gRPC address and its store backend), which singleton leases it
//! holds and under which fencing term, and whether its store answered the
//! scrape's probe. Agent gauges (`fleetcmd_agents_online`, …) are already
//! this controller's own: an agent is online on the controller whose
//! stream it holds.

use prometheus_client::collector::Collector;
use prometheus_client::encoding::DescriptorEncoder;

use crate::metrics::gauge;

/// One singleton lease as this controller sees it at the scrape.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaseState {
    /// `sweeper`, `retention`, `health`, `audit-heads`.
    pub name: &'static str,
    /// The fencing term while this controller leads it; `None` otherwise.
    pub term: Option<u64>,
}

/// Plain data copied out of the controller for one scrape.
#[derive(Debug, Clone, Default)]
pub struct ControllerSnapshot {
    /// The lease holder id (`ctl-PID-RANDOM`), unique per process; empty:
    /// no `fleetcmd_controller_info` series (unit tests of other figures).
    pub id: String,
    /// The gRPC address it listens on.
    pub address: String,
    /// `sled` or `postgres`.
    pub store: &'static str,
    pub leases: Vec<LeaseState>,
    /// Whether the store answered this scrape's probe.
    pub store_up: bool,
}

#[derive(Debug)]
pub(crate) struct ControllerCollector(pub(crate) ControllerSnapshot);

impl Collector for ControllerCollector {
    fn encode(&self, mut enc: DescriptorEncoder) -> std::fmt::Result {
        let c = &self.0;
        if c.id.is_empty() {
            return Ok(());
        }
        gauge(
            &mut enc,
            "fleetcmd_controller_info",
            "Always 1: this controller's id (its lease holder id, unique per process), address and store backend",
            [(
                [
                    ("controller", c.id.as_str()),
                    ("address", c.address.as_str()),
                    ("store", c.store),
                ],
                1.0,
            )],
        )?;
        gauge(
            &mut enc,
            "fleetcmd_lease_held",
            "1 while this controller leads the singleton (its lease is held and was renewed recently enough), else 0",
            c.leases
                .iter()
                .map(|l| ([("lease", l.name)], f64::from(u8::from(l.term.is_some())))),
        )?;
        gauge(
            &mut enc,
            "fleetcmd_lease_term",
            "Fencing term of the lease while this controller leads it (grows at every change of holder), else 0",
            c.leases
                .iter()
                .map(|l| ([("lease", l.name)], l.term.unwrap_or(0) as f64)),
        )?;
        let none: [(&str, &str); 0] = [];
        gauge(
            &mut enc,
            "fleetcmd_store_up",
            "1 when the store answered this scrape's probe (one lease read), 0 when it failed",
            [(none, f64::from(u8::from(c.store_up)))],
        )?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::{FleetSnapshot, Metrics};

    #[test]
    fn a_controller_says_who_it_is_which_leases_it_holds_and_whether_its_store_answers() {
        let m = Metrics::new();
        m.store_probe(Ok(std::time::Duration::from_millis(3)));
        m.store_probe(Err(()));
        let text = m.render(FleetSnapshot {
            controller: ControllerSnapshot {
                id: "ctl-7-00ff".into(),
                address: "127.0.0.1:7443".into(),
                store: "postgres",
                leases: vec![
                    LeaseState {
                        name: "sweeper",
                        term: Some(4),
                    },
                    LeaseState {
                        name: "health",
                        term: None,
                    },
                ],
                store_up: false,
            },
            fleet_unread: true,
            ..Default::default()
        });
        // An unread store leaves out the fleet gauges: zero agents would
        // read as every agent gone.
        assert!(!text.contains("fleetcmd_agents_known"), "{text}");
        for line in [
            "fleetcmd_controller_info{controller=\"ctl-7-00ff\",address=\"127.0.0.1:7443\",store=\"postgres\"} 1.0",
            "fleetcmd_lease_held{lease=\"sweeper\"} 1.0",
            "fleetcmd_lease_term{lease=\"sweeper\"} 4.0",
            "fleetcmd_lease_held{lease=\"health\"} 0.0",
            "fleetcmd_lease_term{lease=\"health\"} 0.0",
            "fleetcmd_store_up 0.0",
            "fleetcmd_store_probe_errors_total 1",
            "fleetcmd_store_probe_duration_seconds_count 1",
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "{line} missing from:\n{text}"
            );
        }
    }

    #[test]
    fn without_an_id_there_is_no_controller_series() {
        let text = Metrics::new().render(FleetSnapshot::default());
        assert!(!text.contains("fleetcmd_controller_info"), "{text}");
        assert!(!text.contains("fleetcmd_lease_held"), "{text}");
        assert!(text.contains("fleetcmd_agents_known 0"), "{text}");
    }
}
