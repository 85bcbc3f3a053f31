//! Services and their alerts: each `[services.NAME]` is
//! evaluated from its instances' check results on a timer; the pure rules
//! in `fleetcmd_core::health` decide what is announced; announcements go to
//! `Health.Watch` subscribers (the gateway: chat, PagerDuty, Opsgenie,
//! Statuspage) and state changes and silences into the audit trail.
//!
//! What was last announced, silences and each service's recent transitions
//! live in the store's health part (`HealthStore`), so a restart neither repeats an alert
//! nor forgets a silence.

pub mod config;
pub mod service;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use fleetcmd_core::audit::{Event, EventKind};
use fleetcmd_core::health::{Alerting, Decision, ServiceState, evaluate};
use fleetcmd_proto::v1 as pb;
use prost::Message as _;
use tokio::sync::broadcast;

use crate::store::{HealthRecord, HealthTransition, Store, StoreError};
pub use config::{RawService, ServiceConfig};

/// Transitions kept per service.
const HISTORY_KEPT: usize = 200;
/// Alert events buffered for slow watchers; one that falls further behind
/// gets a fresh snapshot instead (`service::Watch`).
const EVENTS_BUFFER: usize = 256;

struct Runtime {
    alerting: Alerting,
    persisted: HealthRecord,
    passing: u32,
    total: u32,
    instances: Vec<pb::ServiceInstance>,
}

struct HostRuntime {
    alerting: Alerting,
    persisted: HealthRecord,
    instance: pb::ServiceInstance,
    check: String,
}

/// The health of every configured service.
pub struct Health {
    services: Vec<ServiceConfig>,
    runtime: Mutex<HashMap<String, Runtime>>,
    host_alerts: Option<config::HostAlertsConfig>,
    /// `HOST/CHECK` → its alerting state, for `[host_alerts]` (created when
    /// first seen; what was announced is read back from the store then).
    hosts: Mutex<HashMap<String, HostRuntime>>,
    events: broadcast::Sender<pb::AlertEvent>,
    /// Set at shutdown: ends every `Watch` stream (the server's graceful
    /// shutdown waits for open streams; watchers reconnect to the next).
    closed: tokio::sync::watch::Sender<bool>,
    store: Arc<dyn Store>,
    /// With several controllers: announcements go through the bus to the
    /// watchers of every controller (this one's too), not only to this
    /// one's (`forward_through`).
    bus: std::sync::OnceLock<crate::bus::Bus>,
}

impl std::fmt::Debug for Health {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Health")
            .field("services", &self.services.len())
            .finish_non_exhaustive()
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Health {
    /// Loads what was announced before a restart. Services removed from
    /// the config keep their stored records until they come back.
    pub fn open(
        store: Arc<dyn Store>,
        services: Vec<ServiceConfig>,
        host_alerts: Option<config::HostAlertsConfig>,
    ) -> Result<Health, StoreError> {
        let mut runtime = HashMap::new();
        for s in &services {
            let persisted = match store.health_state(&s.name)? {
                Some(p) => p,
                None => HealthRecord {
                    state: ServiceState::Unknown.as_str().into(),
                    ..HealthRecord::default()
                },
            };
            let announced = ServiceState::parse(&persisted.state).unwrap_or(ServiceState::Unknown);
            runtime.insert(
                s.name.clone(),
                Runtime {
                    alerting: Alerting::new(announced, persisted.since_ms),
                    persisted,
                    passing: 0,
                    total: 0,
                    instances: Vec::new(),
                },
            );
        }
        Ok(Health {
            services,
            runtime: Mutex::new(runtime),
            host_alerts,
            hosts: Mutex::new(HashMap::new()),
            events: broadcast::channel(EVENTS_BUFFER).0,
            closed: tokio::sync::watch::channel(false).0,
            store,
            bus: std::sync::OnceLock::new(),
        })
    }

    pub fn is_empty(&self) -> bool {
        self.services.is_empty() && self.host_alerts.is_none()
    }

    /// A configured service, or a `HOST/CHECK` of `[host_alerts]` seen so far.
    pub fn knows(&self, name: &str) -> bool {
        self.config(name).is_some() || lock(&self.hosts).contains_key(name)
    }

    /// The selector of a service's hosts (`name=HOST` for a `[host_alerts]`
    /// HOST/CHECK), as `Health.Services` shows it.
    pub fn selector_of(&self, name: &str) -> Option<String> {
        if let Some(cfg) = self.config(name) {
            return Some(cfg.selector_text.clone());
        }
        lock(&self.hosts)
            .get(name)
            .map(|rt| format!("name={}", rt.instance.agent_id))
    }

    pub fn subscribe(&self) -> broadcast::Receiver<pb::AlertEvent> {
        self.events.subscribe()
    }

    /// Resolves when the controller shuts down.
    pub fn closed(&self) -> impl std::future::Future<Output = ()> + Send + 'static {
        let mut rx = self.closed.subscribe();
        async move {
            let _ = rx.wait_for(|c| *c).await;
        }
    }

    /// Ends every `Watch` stream (shutdown).
    pub fn close(&self) {
        self.closed.send_replace(true);
    }

    pub fn config(&self, name: &str) -> Option<&ServiceConfig> {
        self.services.iter().find(|s| s.name == name)
    }

    /// Shows each service's instances as the agents report them now,
    /// without deciding or announcing anything: for the first heartbeats
    /// after a controller start, while agents reconnect and an absent one
    /// is no evidence. `health` then lists the instances known so far (not
    /// `0/0`) under the state announced before the restart.
    pub fn refresh(&self, agents: &[pb::Agent]) {
        let agents = with_labels(agents);
        let mut runtime = lock(&self.runtime);
        for cfg in &self.services {
            if let Some(rt) = runtime.get_mut(&cfg.name) {
                observe(cfg, rt, &agents, Observing::Settling);
            }
        }
    }

    /// Evaluates every service from the agents' latest check results and
    /// returns the audit events for announced state changes. Blocking
    /// (store writes): call from `spawn_blocking`.
    pub fn evaluate(&self, agents: &[pb::Agent], now_ms: u64) -> Result<Vec<Event>, StoreError> {
        let mut audit = Vec::new();
        let mut out = Vec::new();
        let agents = with_labels(agents);
        let mut runtime = lock(&self.runtime);
        for cfg in &self.services {
            let Some(rt) = runtime.get_mut(&cfg.name) else {
                continue;
            };
            let (passing, total) = observe(cfg, rt, &agents, Observing::Settled);
            let raw = evaluate(passing, total, cfg.thresholds);
            let Some(decision) = rt.alerting.observe(raw, now_ms, &cfg.damping) else {
                continue;
            };
            let silenced = rt.persisted.silenced_until_ms > now_ms;
            let (kind, from) = match decision {
                Decision::Transition { from, to } => {
                    rt.persisted.state = to.as_str().into();
                    rt.persisted.since_ms = now_ms;
                    self.store.put_health_state(&cfg.name, &rt.persisted)?;
                    let t = HealthTransition {
                        from: from.as_str().into(),
                        to: to.as_str().into(),
                        at_ms: now_ms,
                        passing,
                        total,
                    };
                    self.store
                        .add_health_transition(&cfg.name, &t, HISTORY_KEPT)?;
                    audit.push(
                        Event::new(EventKind::ServiceChanged, "controller")
                            .detail(format!(
                                "service {} {} → {} ({passing} of {total} instances pass)",
                                cfg.name, from, to
                            ))
                            .hosts(
                                rt.instances
                                    .iter()
                                    .filter(|i| !i.passes())
                                    .map(|i| i.agent_id.clone()),
                            )
                            .field("service", &cfg.name)
                            .field("from", from)
                            .field("to", to)
                            .field("passing", passing)
                            .field("total", total)
                            .field("silenced", silenced),
                    );
                    (pb::alert_event::Kind::Transition, from.as_str())
                }
                Decision::Reminder { .. } => (pb::alert_event::Kind::Reminder, ""),
                Decision::Flapping { .. } => (pb::alert_event::Kind::Flapping, ""),
            };
            let service = service_pb(cfg, rt, &[]);
            out.push(pb::AlertEvent {
                kind: kind as i32,
                summary: summary(&service, decision),
                service: Some(service),
                from: from.into(),
                silenced,
                at_ms: now_ms,
            });
        }
        drop(runtime);
        if let Some(ha) = &self.host_alerts {
            self.evaluate_hosts(ha, &agents, now_ms, &mut audit, &mut out)?;
        }
        for ev in out {
            match self.bus.get() {
                // Every controller's watchers, this one's through the bus
                // too (found by an outside test: a gateway on another
                // controller than the lease holder got no alert at all).
                Some(bus) => bus.publish(crate::bus::Signal::Alert(Box::new(forwarded(ev)))),
                None => self.announce(ev),
            }
        }
        Ok(audit)
    }

    /// Sends announcements through `bus` (several controllers) from now on.
    pub fn forward_through(&self, bus: crate::bus::Bus) {
        let _ = self.bus.set(bus);
    }

    /// Hands an announcement to this controller's watchers. No subscriber
    /// is fine: the state is stored and a watcher starting later gets it
    /// in its snapshot.
    pub fn announce(&self, ev: pb::AlertEvent) {
        let _ = self.events.send(ev);
    }

    /// With several controllers, the controllers that do not hold the
    /// `health` lease show what the holder stored: each service's
    /// announced state, since when and its silence, and its instances as
    /// the agents (fleet-wide) report them now. A controller that takes
    /// the lease then starts from the stored state, not from what it
    /// judged when it last held it. Blocking (store reads).
    pub fn follow_store(&self, agents: &[pb::Agent]) -> Result<(), StoreError> {
        let mut stored = Vec::with_capacity(self.services.len());
        for cfg in &self.services {
            stored.push(self.store.health_state(&cfg.name)?);
        }
        {
            let mut runtime = lock(&self.runtime);
            for (cfg, rec) in self.services.iter().zip(stored) {
                let (Some(rt), Some(rec)) = (runtime.get_mut(&cfg.name), rec) else {
                    continue;
                };
                if rec != rt.persisted {
                    let announced =
                        ServiceState::parse(&rec.state).unwrap_or(ServiceState::Unknown);
                    rt.alerting = Alerting::new(announced, rec.since_ms);
                    rt.persisted = rec;
                }
            }
        }
        self.refresh(agents);
        Ok(())
    }

    /// `[host_alerts]`: each (online host, named check) on its own.
    fn evaluate_hosts(
        &self,
        ha: &config::HostAlertsConfig,
        agents: &[(&pb::Agent, std::collections::BTreeMap<String, String>)],
        now_ms: u64,
        audit: &mut Vec<Event>,
        out: &mut Vec<pb::AlertEvent>,
    ) -> Result<(), StoreError> {
        let mut hosts = lock(&self.hosts);
        // An offline agent or a check it does not have says nothing about
        // the check: its last announced state stands (offline agents are
        // visible in `status`, and in the services they belong to).
        for (a, labels) in agents.iter().filter(|(a, _)| a.online) {
            if !ha.selector.matches(&a.agent_id, labels) {
                continue;
            }
            for c in a.checks.iter().filter(|c| ha.checks.contains(&c.name)) {
                let key = format!("{}/{}", a.agent_id, c.name);
                let rt = match hosts.entry(key.clone()) {
                    std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
                    std::collections::hash_map::Entry::Vacant(v) => {
                        let persisted = match self.store.health_state(&key)? {
                            Some(p) => p,
                            None => HealthRecord {
                                state: ServiceState::Unknown.as_str().into(),
                                ..HealthRecord::default()
                            },
                        };
                        let announced =
                            ServiceState::parse(&persisted.state).unwrap_or(ServiceState::Unknown);
                        v.insert(HostRuntime {
                            alerting: Alerting::new(announced, persisted.since_ms),
                            persisted,
                            instance: pb::ServiceInstance::default(),
                            check: c.name.clone(),
                        })
                    }
                };
                rt.instance = pb::ServiceInstance {
                    agent_id: a.agent_id.clone(),
                    online: true,
                    state: c.state,
                    summary: c.summary.clone(),
                    checked_at_ms: c.checked_at_ms,
                };
                let raw = match pb::CheckState::try_from(c.state) {
                    Ok(pb::CheckState::Ok) => ServiceState::Ok,
                    Ok(pb::CheckState::Warning) => ServiceState::Degraded,
                    Ok(pb::CheckState::Critical) => ServiceState::Down,
                    _ => ServiceState::Unknown,
                };
                let Some(decision) = rt.alerting.observe(raw, now_ms, &ha.damping) else {
                    continue;
                };
                let silenced = rt.persisted.silenced_until_ms > now_ms;
                let line = c.summary.lines().next().unwrap_or_default();
                let (kind, from, summary) = match decision {
                    Decision::Transition { from, to } => {
                        rt.persisted.state = to.as_str().into();
                        rt.persisted.since_ms = now_ms;
                        self.store.put_health_state(&key, &rt.persisted)?;
                        audit.push(
                            Event::new(EventKind::ServiceChanged, "controller")
                                .detail(format!("host check {key} {from} → {to}: {line}"))
                                .host(a.agent_id.clone())
                                .field("host_check", &key)
                                .field("from", from)
                                .field("to", to)
                                .field("silenced", silenced),
                        );
                        let summary = if to == ServiceState::Ok {
                            format!("{key} recovered (was {from}): {line}")
                        } else {
                            format!("{key} is {to}: {line}")
                        };
                        (pb::alert_event::Kind::Transition, from.as_str(), summary)
                    }
                    Decision::Reminder { state } => (
                        pb::alert_event::Kind::Reminder,
                        "",
                        format!("{key} is still {state}: {line}"),
                    ),
                    Decision::Flapping { changes } => (
                        pb::alert_event::Kind::Flapping,
                        "",
                        format!(
                            "{key} is flapping ({changes} changes recently): alerts held until it settles"
                        ),
                    ),
                };
                out.push(pb::AlertEvent {
                    kind: kind as i32,
                    service: Some(host_pb(&key, rt, &ha.channels)),
                    from: from.into(),
                    silenced,
                    at_ms: now_ms,
                    summary,
                });
            }
        }
        Ok(())
    }

    /// Every service (or the one named) with its recent transitions, worst
    /// first. Blocking (store reads).
    pub fn services(&self, name: &str, history: u32) -> Result<Vec<pb::Service>, StoreError> {
        if self.config(name).is_none()
            && let (Some(ha), Some(rt)) = (&self.host_alerts, lock(&self.hosts).get(name))
        {
            // A `[host_alerts]` HOST/CHECK, asked for by name.
            return Ok(vec![host_pb(name, rt, &ha.channels)]);
        }
        let runtime = lock(&self.runtime);
        let mut out = Vec::new();
        for cfg in self
            .services
            .iter()
            .filter(|s| name.is_empty() || s.name == name)
        {
            let Some(rt) = runtime.get(&cfg.name) else {
                continue;
            };
            let hist: Vec<pb::ServiceTransition> = self
                .store
                .health_transitions(&cfg.name, history as usize)?
                .into_iter()
                .map(|t| pb::ServiceTransition {
                    from: t.from,
                    to: t.to,
                    at_ms: t.at_ms,
                    passing: t.passing,
                    total: t.total,
                })
                .collect();
            out.push(service_pb(cfg, rt, &hist));
        }
        out.sort_by(|a, b| {
            let sev = |s: &pb::Service| ServiceState::parse(&s.state).map_or(1, |s| s.severity());
            sev(b).cmp(&sev(a)).then_with(|| a.name.cmp(&b.name))
        });
        Ok(out)
    }

    /// One snapshot event per service, for a watcher that starts (or fell
    /// behind).
    pub fn snapshot(&self, now_ms: u64) -> Vec<pb::AlertEvent> {
        let mut events = self.service_snapshot(now_ms);
        if let Some(ha) = &self.host_alerts {
            for (key, rt) in lock(&self.hosts).iter() {
                let service = host_pb(key, rt, &ha.channels);
                events.push(pb::AlertEvent {
                    kind: pb::alert_event::Kind::Snapshot as i32,
                    summary: format!("{key} is {}", service.state),
                    silenced: rt.persisted.silenced_until_ms > now_ms,
                    service: Some(service),
                    from: String::new(),
                    at_ms: now_ms,
                });
            }
        }
        events
    }

    fn service_snapshot(&self, now_ms: u64) -> Vec<pb::AlertEvent> {
        let runtime = lock(&self.runtime);
        self.services
            .iter()
            .filter_map(|cfg| {
                let rt = runtime.get(&cfg.name)?;
                let service = service_pb(cfg, rt, &[]);
                Some(pb::AlertEvent {
                    kind: pb::alert_event::Kind::Snapshot as i32,
                    summary: format!(
                        "{} is {} ({} of {} instances pass)",
                        cfg.name, service.state, rt.passing, rt.total
                    ),
                    silenced: rt.persisted.silenced_until_ms > now_ms,
                    service: Some(service),
                    from: String::new(),
                    at_ms: now_ms,
                })
            })
            .collect()
    }

    /// Silences (or, with `until_ms == 0`, un-silences) a service's alerts.
    /// Blocking (store write); the caller audits and flushes.
    pub fn silence(
        &self,
        name: &str,
        until_ms: u64,
        reason: &str,
        by: &str,
    ) -> Result<bool, StoreError> {
        let mut runtime = lock(&self.runtime);
        let mut hosts = lock(&self.hosts);
        let persisted = match runtime.get_mut(name) {
            Some(rt) => &mut rt.persisted,
            None => match hosts.get_mut(name) {
                Some(rt) => &mut rt.persisted,
                None => return Ok(false),
            },
        };
        persisted.silenced_until_ms = until_ms;
        persisted.silence_reason = reason.into();
        persisted.silenced_by = by.into();
        self.store.put_health_state(name, persisted)?;
        Ok(true)
    }

    pub fn names(&self) -> Vec<&str> {
        self.services.iter().map(|s| s.name.as_str()).collect()
    }
}

/// The agents that count (not revoked), with their labels in the
/// selector's form once per agent, not per service.
fn with_labels(
    agents: &[pb::Agent],
) -> Vec<(&pb::Agent, std::collections::BTreeMap<String, String>)> {
    agents
        .iter()
        .filter(|a| !a.revoked)
        .map(|a| (a, a.labels.clone().into_iter().collect()))
        .collect()
}

/// Whether the controller has seen every agent's heartbeat since it
/// started: before, an online agent without check results has simply not
/// reported yet.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Observing {
    Settling,
    Settled,
}

/// Sets a service's instances from the agents matching its selector and
/// returns (passing, total).
fn observe(
    cfg: &ServiceConfig,
    rt: &mut Runtime,
    agents: &[(&pb::Agent, std::collections::BTreeMap<String, String>)],
    when: Observing,
) -> (u32, u32) {
    let mut instances = Vec::new();
    for (a, labels) in agents {
        if !cfg.selector.matches(&a.agent_id, labels) {
            continue;
        }
        let check = a.checks.iter().find(|c| c.name == cfg.check);
        instances.push(pb::ServiceInstance {
            agent_id: a.agent_id.clone(),
            online: a.online,
            state: match (a.online, check) {
                (true, Some(c)) => c.state,
                _ => pb::CheckState::Unknown as i32,
            },
            summary: match (a.online, check) {
                (false, _) if when == Observing::Settling => {
                    "not reconnected yet since the controller started".into()
                }
                (false, _) => "agent offline".into(),
                (true, None) if when == Observing::Settling => {
                    "waiting for its first heartbeat since the controller started".into()
                }
                (true, None) => format!("no check named {:?} on this agent", cfg.check),
                (true, Some(c)) => c.summary.clone(),
            },
            checked_at_ms: check.map(|c| c.checked_at_ms).unwrap_or(0),
        });
    }
    instances.sort_by(|a, b| a.agent_id.cmp(&b.agent_id));
    let total = instances.len() as u32;
    let passing = instances.iter().filter(|i| i.passes()).count() as u32;
    rt.passing = passing;
    rt.total = total;
    rt.instances = instances;
    (passing, total)
}

/// Failing instances an announcement carries through the bus at most (its
/// payload is bounded); `passing` and `total` stay whole.
const FORWARDED_INSTANCES: usize = 20;

/// `ev` as the bus carries it: the service's failing instances only (the
/// first that fit, each summary one short line), no history.
fn forwarded(mut ev: pb::AlertEvent) -> pb::AlertEvent {
    let fits = |ev: &pb::AlertEvent| {
        // base64 of the encoding, plus the kind prefix.
        ev.encoded_len() * 4 / 3 + 8 < crate::bus::MAX_PAYLOAD
    };
    if let Some(s) = ev.service.as_mut() {
        s.history.clear();
        s.instances.retain(|i| {
            let passes = i.online
                && matches!(
                    pb::CheckState::try_from(i.state),
                    Ok(pb::CheckState::Ok | pb::CheckState::Warning)
                );
            !passes
        });
        s.instances.truncate(FORWARDED_INSTANCES);
        for i in &mut s.instances {
            if let Some(line) = i.summary.lines().next() {
                i.summary = line.chars().take(160).collect();
            }
        }
    }
    while !fits(&ev) {
        match ev.service.as_mut() {
            Some(s) if !s.instances.is_empty() => {
                let keep = s.instances.len() / 2;
                s.instances.truncate(keep);
            }
            _ => {
                ev.summary = ev.summary.chars().take(500).collect();
                break;
            }
        }
    }
    ev
}

fn service_pb(cfg: &ServiceConfig, rt: &Runtime, history: &[pb::ServiceTransition]) -> pb::Service {
    // Until the first evaluation after a start (agents reconnect during
    // the first heartbeats), the state is the one stored before the restart;
    // the instances are those known so far (`Health::refresh`).
    pb::Service {
        name: cfg.name.clone(),
        state: rt.alerting.announced().as_str().into(),
        since_ms: rt.alerting.announced_at_ms(),
        selector: cfg.selector_text.clone(),
        check: cfg.check.clone(),
        passing: rt.passing,
        total: rt.total,
        instances: rt.instances.clone(),
        channels: cfg.channels.clone(),
        silenced_until_ms: rt.persisted.silenced_until_ms,
        silence_reason: rt.persisted.silence_reason.clone(),
        silenced_by: rt.persisted.silenced_by.clone(),
        history: history.to_vec(),
        flapping: rt.alerting.flapping(),
        pagerduty: cfg.pagerduty.clone(),
        opsgenie: cfg.opsgenie.clone(),
        statuspage_component: cfg.statuspage_component.clone(),
    }
}

/// A `[host_alerts]` HOST/CHECK as a one-instance service: its selector is
/// the host (`name=HOST`), so chat's `silence` checks rights on that host.
fn host_pb(key: &str, rt: &HostRuntime, channels: &[String]) -> pb::Service {
    let ok = rt.alerting.announced() == ServiceState::Ok;
    pb::Service {
        name: key.into(),
        state: rt.alerting.announced().as_str().into(),
        since_ms: rt.alerting.announced_at_ms(),
        selector: format!("name={}", rt.instance.agent_id),
        check: rt.check.clone(),
        passing: u32::from(ok),
        total: 1,
        instances: vec![rt.instance.clone()],
        channels: channels.to_vec(),
        silenced_until_ms: rt.persisted.silenced_until_ms,
        silence_reason: rt.persisted.silence_reason.clone(),
        silenced_by: rt.persisted.silenced_by.clone(),
        flapping: rt.alerting.flapping(),
        ..Default::default()
    }
}

/// One line for chat and pages: what happened and which instances fail.
fn summary(s: &pb::Service, d: Decision) -> String {
    let failing: Vec<String> = s
        .instances
        .iter()
        .filter(|i| !i.passes())
        .take(5)
        .map(|i| {
            if i.online {
                format!(
                    "{}: {} {}",
                    i.agent_id,
                    pb::CheckState::label(i.state),
                    i.summary
                )
            } else {
                format!("{}: offline", i.agent_id)
            }
        })
        .collect();
    let more = s
        .instances
        .len()
        .saturating_sub(s.passing as usize + failing.len());
    let mut detail = failing.join("; ");
    if more > 0 {
        detail.push_str(&format!("; {more} more"));
    }
    let count = format!("{} of {} instances pass", s.passing, s.total);
    match d {
        Decision::Transition {
            from,
            to: ServiceState::Ok,
        } => {
            format!("{} recovered (was {from}): {count}", s.name)
        }
        Decision::Transition { to, .. } | Decision::Reminder { state: to } => {
            let still = if matches!(d, Decision::Reminder { .. }) {
                "still "
            } else {
                ""
            };
            if detail.is_empty() {
                format!("{} is {still}{to}: {count}", s.name)
            } else {
                format!("{} is {still}{to}: {count} ({detail})", s.name)
            }
        }
        Decision::Flapping { changes } => format!(
            "{} is flapping ({changes} changes recently): alerts held until it settles; now {count}",
            s.name
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn agent(id: &str, role: &str, online: bool, check: Option<pb::CheckState>) -> pb::Agent {
        pb::Agent {
            agent_id: id.into(),
            labels: [("role".to_string(), role.to_string())].into(),
            online,
            checks: check
                .map(|s| pb::CheckResult {
                    name: "http".into(),
                    kind: "http".into(),
                    state: s as i32,
                    summary: format!("{s:?}"),
                    ..Default::default()
                })
                .into_iter()
                .collect(),
            ..Default::default()
        }
    }

    fn health(dir: &std::path::Path) -> Health {
        let raw: std::collections::BTreeMap<String, RawService> = toml::from_str(
            "[api]\nselector = \"role=api\"\ncheck = \"http\"\nconfirm = \"0s\"\nchannels = [\"irc:#ops\"]\n",
        )
        .expect("toml");
        let services = config::validate(&raw).expect("valid");
        let store: Arc<dyn Store> =
            Arc::new(crate::store::SledStore::open(&dir.join("db")).expect("store"));
        let hosts: config::RawHostAlerts = toml::from_str(
            "checks = [\"http\"]\nselector = \"role=web\"\nconfirm = \"0s\"\nchannels = [\"irc:#ops\"]\n",
        )
        .expect("toml");
        let hosts = config::validate_host_alerts(&hosts).expect("valid");
        Health::open(store, services, Some(hosts)).expect("health")
    }

    #[test]
    fn host_alerts_follow_each_hosts_check_and_can_be_silenced() {
        use pb::CheckState::{Critical, Ok, Warning};
        let dir = tempfile::tempdir().expect("tmp");
        let h = health(dir.path());
        let mut rx = h.subscribe();
        let web = |s| {
            [
                agent("web-1", "web", true, Some(s)),
                agent("api-1", "api", true, Some(s)),
            ]
        };
        h.evaluate(&web(Ok), 1).expect("eval");
        // unknown → ok for web-1 (the gateway does not post that), and the
        // api service's own change; api-1 is not role=web.
        let evs: Vec<String> = std::iter::from_fn(|| rx.try_recv().ok())
            .map(|e| e.summary)
            .collect();
        assert!(
            evs.contains(&"web-1/http recovered (was unknown): Ok".to_string()),
            "{evs:?}"
        );
        assert!(!evs.iter().any(|e| e.starts_with("api-1/")), "{evs:?}");

        let audit = h.evaluate(&web(Warning), 2).expect("eval");
        assert_eq!(audit[0].fields["host_check"], "web-1/http");
        let ev = rx.try_recv().expect("event");
        assert_eq!(ev.summary, "web-1/http is degraded: Warning");
        let s = ev.service.expect("service");
        assert_eq!(
            (s.selector.as_str(), s.total, s.channels.as_slice()),
            ("name=web-1", 1, &["irc:#ops".to_string()][..])
        );
        // Asked for by name; not in the service list.
        assert_eq!(
            h.services("web-1/http", 0).expect("one")[0].state,
            "degraded"
        );
        assert!(
            h.services("", 0)
                .expect("all")
                .iter()
                .all(|s| s.name == "api")
        );

        assert!(h.knows("web-1/http"));
        assert!(
            h.silence("web-1/http", 10_000, "disk swap", "irc:alice")
                .expect("silence")
        );
        h.evaluate(&web(Critical), 3).expect("eval");
        let ev = std::iter::from_fn(|| rx.try_recv().ok())
            .find(|e| e.summary.starts_with("web-1/"))
            .expect("event");
        assert!(
            ev.silenced && ev.summary == "web-1/http is down: Critical",
            "{ev:?}"
        );
        // An offline host says nothing new about its checks.
        let offline = [agent("web-1", "web", false, Some(Ok))];
        assert!(
            h.evaluate(&offline, 4)
                .expect("eval")
                .iter()
                .all(|e| !e.fields.contains_key("host_check"))
        );
        assert_eq!(
            h.snapshot(5)
                .iter()
                .filter(|e| e.service.as_ref().is_some_and(|s| s.name == "web-1/http"))
                .count(),
            1
        );
    }

    #[test]
    fn instances_offline_or_without_the_check_fail_and_changes_are_audited_once() {
        use pb::CheckState::{Critical, Ok, Warning};
        let dir = tempfile::tempdir().expect("tmp");
        let h = health(dir.path());
        let mut rx = h.subscribe();
        let state = |h: &Health| h.services("api", 10).expect("services")[0].clone();

        // Nothing matches yet: unknown, nothing announced.
        assert!(
            h.evaluate(&[agent("db-1", "db", true, Some(Ok))], 1)
                .expect("eval")
                .is_empty()
        );
        assert_eq!(state(&h).state, "unknown");

        // OK and WARNING pass: ok.
        let fleet = [
            agent("api-1", "api", true, Some(Ok)),
            agent("api-2", "api", true, Some(Warning)),
        ];
        let audit = h.evaluate(&fleet, 2).expect("eval");
        assert_eq!(audit.len(), 1);
        assert_eq!(audit[0].fields["to"], "ok");
        assert_eq!(
            rx.try_recv().expect("event").summary,
            "api recovered (was unknown): 2 of 2 instances pass"
        );

        // Offline, critical and missing-check instances all fail.
        let fleet = [
            agent("api-1", "api", true, Some(Ok)),
            agent("api-2", "api", false, Some(Ok)),
            agent("api-3", "api", true, Some(Critical)),
            agent("api-4", "api", true, None),
        ];
        let audit = h.evaluate(&fleet, 3).expect("eval");
        assert_eq!(audit.len(), 1);
        assert_eq!(audit[0].hosts, ["api-2", "api-3", "api-4"]);
        let ev = rx.try_recv().expect("event");
        assert_eq!(
            ev.summary,
            "api is down: 1 of 4 instances pass (api-2: offline; api-3: CRITICAL Critical; \
             api-4: UNKNOWN no check named \"http\" on this agent)"
        );
        // The same state again: nothing new.
        assert!(h.evaluate(&fleet, 4).expect("eval").is_empty());
        assert!(rx.try_recv().is_err());
        let s = state(&h);
        assert_eq!((s.state.as_str(), s.passing, s.total), ("down", 1, 4));
        assert_eq!(s.history.len(), 2);
        assert_eq!(
            (s.history[0].from.as_str(), s.history[0].to.as_str()),
            ("ok", "down")
        );

        // A silence is stored and marks the events, and survives a reopen.
        assert!(
            h.silence("api", 10_000, "maintenance", "irc:alice")
                .expect("silence")
        );
        assert!(!h.silence("nope", 10_000, "", "irc:alice").expect("silence"));
        let fleet_ok = [agent("api-1", "api", true, Some(Ok))];
        h.evaluate(&fleet_ok, 5).expect("eval");
        assert!(rx.try_recv().expect("event").silenced);
        drop(h);
        let h = health(dir.path());
        let s = state(&h);
        assert_eq!(
            (s.state.as_str(), s.silenced_by.as_str()),
            ("ok", "irc:alice")
        );
        // Restored: the announced state is not announced again.
        assert!(h.evaluate(&fleet_ok, 6).expect("eval").is_empty());
    }
}
