//! The agent registry: who is enrolled (with the labels their join token
//! granted — the only labels selectors and `targets` rules match), who is
//! revoked, and who is connected right now (their stream, what they report
//! about themselves, their last heartbeat).
//!
//! Owns: the directory of enrolled agents (written through to the store
//! by [`Registry::save`], label sets interned), the revoked set, the live
//! streams. Knows nothing about jobs, policy or the audit trail: the
//! callers that join, revoke or dispatch audit and flush around it.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use fleetcmd_core::selector::Selector;
use fleetcmd_proto::v1 as pb;
use tonic::Status;

use super::{AgentTx, lock, now_secs};
use crate::error::{ApiError, ApiResult};
use crate::pki::Peer;
use crate::store::{AgentRecord, Store};

/// An enrolled agent as the directory keeps it: an `AgentRecord` whose
/// labels (interned) are the only ones that grant anything: selectors and
/// `targets` rules match them, never what the agent reports about itself.
#[derive(Clone)]
pub(super) struct Enrolled {
    pub(super) labels: Arc<BTreeMap<String, String>>,
    revoked: bool,
    pub(super) joined_at: u64,
    version: String,
    enrolment_cert: Option<crate::pki::EnrolmentCert>,
}

impl Enrolled {
    fn record(&self, id: &str) -> AgentRecord {
        AgentRecord {
            id: id.to_owned(),
            labels: (*self.labels).clone(),
            revoked: self.revoked,
            joined_at: self.joined_at,
            version: self.version.clone(),
            enrolment_cert: self.enrolment_cert.clone(),
        }
    }
}

/// The enrolled agents by id. Label sets are interned: fleets repeat a
/// few sets (`role=web,env=prod`) over thousands of hosts, and a map per
/// host cost about 0.7 KiB each (BENCHMARKS.md targets's RSS budget per agent).
#[derive(Default)]
struct Directory {
    agents: BTreeMap<String, Enrolled>,
    label_sets: HashSet<Arc<BTreeMap<String, String>>>,
}

impl Directory {
    fn intern(&mut self, labels: BTreeMap<String, String>) -> Arc<BTreeMap<String, String>> {
        if let Some(shared) = self.label_sets.get(&labels) {
            return shared.clone();
        }
        let shared = Arc::new(labels);
        self.label_sets.insert(shared.clone());
        shared
    }

    fn insert(&mut self, rec: AgentRecord) {
        let labels = self.intern(rec.labels);
        self.agents.insert(
            rec.id,
            Enrolled {
                labels,
                revoked: rec.revoked,
                joined_at: rec.joined_at,
                version: rec.version,
                enrolment_cert: rec.enrolment_cert,
            },
        );
    }
}

struct Live {
    conn: u64,
    tx: AgentTx,
    /// What the host reports about itself (its `Hello`): shown, never
    /// matched by a selector. The usual empty set is shared; others are
    /// not interned, so an agent reconnecting with ever new facts cannot
    /// grow the directory's set of label sets.
    facts: Arc<BTreeMap<String, String>>,
    version: String,
    last_heartbeat: Instant,
    metrics: Option<pb::HostMetrics>,
    checks: Vec<pb::CheckResult>,
    policy_version: u64,
    clock_skew_secs: i64,
    policy_expired: bool,
}

/// The registry of enrolled and connected agents.
pub struct Registry {
    /// Every enrolled agent's record as last stored (`save` writes the
    /// store first, then this), so that resolving a job's targets,
    /// `Agents.List` and a reconnecting agent's registration do not scan
    /// or decode the store's agent records.
    directory: RwLock<Directory>,
    live: Mutex<HashMap<String, Live>>,
    revoked: RwLock<HashSet<String>>,
    next_conn: AtomicU64,
    /// When this controller started: agents reconnect during the first
    /// heartbeats, so a target is not declared offline before then.
    started: Instant,
    heartbeat_interval: Duration,
}

impl Registry {
    /// The registry of the enrolled agents `records` (from the store).
    pub fn new(records: Vec<AgentRecord>, heartbeat_interval: Duration) -> Registry {
        let mut directory = Directory::default();
        for rec in records {
            directory.insert(rec);
        }
        let revoked: HashSet<String> = directory
            .agents
            .iter()
            .filter(|(_, a)| a.revoked)
            .map(|(id, _)| id.clone())
            .collect();
        Registry {
            directory: RwLock::new(directory),
            live: Mutex::new(HashMap::new()),
            revoked: RwLock::new(revoked),
            next_conn: AtomicU64::new(1),
            started: Instant::now(),
            heartbeat_interval,
        }
    }

    /// Stores an agent's record and updates the in-memory directory.
    pub fn save(&self, store: &dyn Store, rec: AgentRecord) -> ApiResult<()> {
        store.put_agent(&rec)?;
        self.directory
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert(rec);
        Ok(())
    }

    pub(super) fn enrolled(&self, agent: &str) -> Option<Enrolled> {
        self.directory
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .agents
            .get(agent)
            .cloned()
    }

    /// An enrolled agent's stored record.
    pub fn record(&self, agent: &str) -> Option<AgentRecord> {
        self.enrolled(agent).map(|e| e.record(agent))
    }

    /// Whether an agent certificate is still accepted for its name: not
    /// issued before the name's last enrolment (the name's previous holder
    /// is refused after a re-enrolment).
    pub fn agent_cert_current(&self, peer: &Peer) -> bool {
        // Asked for every message an agent sends: looked at in place, not
        // copied out of the directory (`enrolled` clones the entry).
        self.directory
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .agents
            .get(&peer.name)
            .and_then(|rec| rec.enrolment_cert.as_ref())
            .is_none_or(|cert| cert.admits(&peer.serial, peer.issued_at))
    }

    pub fn is_revoked(&self, agent: &str) -> bool {
        self.revoked
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .contains(agent)
    }

    /// Refuses the agent's certificate from now on (its record was stored
    /// revoked before this).
    pub fn mark_revoked(&self, agent: &str) {
        self.revoked
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert(agent.to_owned());
    }

    /// Agents reconnect during the first three heartbeats after a start:
    /// until then an absent agent is not evidence of anything.
    pub fn settling(&self) -> bool {
        self.started.elapsed() < self.heartbeat_interval * 3
    }

    /// An enrolled agent's labels and `joined_at` (what a token naming it
    /// would re-enrol).
    pub fn enrolment_of(&self, agent: &str) -> Option<(BTreeMap<String, String>, u64)> {
        self.enrolled(agent)
            .map(|rec| ((*rec.labels).clone(), rec.joined_at))
    }

    /// The labels an agent was granted at enrolment (its join token's).
    pub fn granted_labels(&self, agent: &str) -> ApiResult<Arc<BTreeMap<String, String>>> {
        self.enrolled(agent)
            .map(|rec| rec.labels)
            .ok_or_else(|| ApiError::PermissionDenied(format!("agent {agent} is not enrolled")))
    }

    /// Registers a connected agent with what it reports about itself
    /// (validated at the gRPC boundary); returns its connection number.
    /// Its facts are kept apart from its granted labels: a host cannot put
    /// itself into `role=db` by saying so. `first` (the current policy) is
    /// queued on its stream before anything else.
    pub fn register(
        &self,
        store: &dyn Store,
        agent: &str,
        hello: fleetcmd_core::host::HostReport,
        policy_version: u64,
        tx: AgentTx,
        first: Option<pb::ControllerMessage>,
    ) -> ApiResult<u64> {
        let rec = self
            .enrolled(agent)
            .ok_or_else(|| ApiError::PermissionDenied(format!("agent {agent} is not enrolled")))?;
        let facts = if hello.facts.is_empty() {
            self.directory
                .write()
                .unwrap_or_else(|p| p.into_inner())
                .intern(BTreeMap::new())
        } else {
            Arc::new(hello.facts)
        };
        // Stored only when it changed: a reconnect storm of 10 000 agents
        // need not rewrite 10 000 records.
        if rec.version != hello.version {
            let mut updated = rec.record(agent);
            updated.version = hello.version.clone();
            self.save(store, updated)?;
        }
        let conn = self.next_conn.fetch_add(1, Ordering::Relaxed);
        if let Some(msg) = first {
            let _ = tx.try_send(Box::new(Ok(msg)));
        }
        let old = lock(&self.live).insert(
            agent.to_owned(),
            Live {
                conn,
                tx,
                facts,
                version: hello.version,
                last_heartbeat: Instant::now(),
                metrics: None,
                checks: Vec::new(),
                policy_version,
                clock_skew_secs: 0,
                policy_expired: false,
            },
        );
        if let Some(old) = old {
            // Ended, not just forgotten: a stream left open would look
            // healthy to the agent at its other end, which would then never
            // reconnect while the controller ignores it.
            let _ = old.tx.try_send(Box::new(Err(Status::aborted(format!(
                "a newer connection of agent {agent} replaced this one"
            )))));
            tracing::info!(
                agent_id = agent,
                "agent reconnected; previous stream replaced"
            );
        }
        tracing::info!(agent_id = agent, conn, "agent connected");
        Ok(conn)
    }

    /// Drops every live agent stream (controller shutdown).
    pub fn disconnect_all(&self) {
        for (_, live) in lock(&self.live).drain() {
            // An error item ends the response stream with this status.
            let _ = live.tx.try_send(Box::new(Err(Status::unavailable(
                "controller shutting down",
            ))));
        }
    }

    /// Ends an agent's stream with `status` (revoked, enrolled again).
    pub fn end_stream(&self, agent: &str, status: Status) {
        if let Some(live) = lock(&self.live).remove(agent) {
            let _ = live.tx.try_send(Box::new(Err(status)));
        }
    }

    pub fn unregister(&self, agent: &str, conn: u64) {
        let mut agents = lock(&self.live);
        if agents.get(agent).is_some_and(|l| l.conn == conn) {
            agents.remove(agent);
            tracing::info!(agent_id = agent, conn, "agent disconnected");
        }
    }

    pub fn heartbeat(&self, agent: &str, conn: u64, hb: pb::Heartbeat) {
        if let Some(live) = lock(&self.live).get_mut(agent).filter(|l| l.conn == conn) {
            live.last_heartbeat = Instant::now();
            live.policy_version = hb.policy_version;
            live.metrics = hb.metrics;
            live.checks = hb.checks;
            live.policy_expired = hb.policy_expired;
            live.clock_skew_secs = if hb.agent_time == 0 {
                0
            } else {
                hb.agent_time as i64 - now_secs() as i64
            };
        }
    }

    fn online(&self, live: &Live) -> bool {
        live.last_heartbeat.elapsed() < self.heartbeat_interval * 3 && !live.tx.is_closed()
    }

    /// Queues `msg` on a connected agent's stream; whether it was queued.
    pub fn send(&self, agent: &str, msg: pb::ControllerMessage) -> bool {
        lock(&self.live)
            .get(agent)
            .is_some_and(|l| l.tx.try_send(Box::new(Ok(msg))).is_ok())
    }

    /// Queues `msg` on every connected agent's stream.
    pub fn send_all(&self, msg: &pb::ControllerMessage) {
        for live in lock(&self.live).values() {
            let _ = live.tx.try_send(Box::new(Ok(msg.clone())));
        }
    }

    /// Queues `msg` for each of `agents` that is online; returns, per
    /// agent in order, whether it was queued (a full queue or an offline
    /// agent is `false`).
    pub fn send_if_online<'a>(
        &self,
        agents: impl IntoIterator<Item = &'a str>,
        msg: &pb::ControllerMessage,
    ) -> Vec<bool> {
        let live = lock(&self.live);
        agents
            .into_iter()
            .map(|a| match live.get(a) {
                Some(l) if self.online(l) => l.tx.try_send(Box::new(Ok(msg.clone()))).is_ok(),
                _ => false,
            })
            .collect()
    }

    /// Whether each of `agents` is online here now.
    pub fn online_now<'a>(&self, agents: impl IntoIterator<Item = &'a str>) -> Vec<bool> {
        let live = lock(&self.live);
        agents
            .into_iter()
            .map(|a| live.get(a).is_some_and(|l| self.online(l)))
            .collect()
    }

    /// The agents online here now (for the presence table).
    pub fn online_ids(&self) -> Vec<String> {
        let live = lock(&self.live);
        live.iter()
            .filter(|(_, l)| self.online(l))
            .map(|(a, _)| a.clone())
            .collect()
    }

    /// Takes an agent's record as another controller stored it (a join,
    /// a revocation): the directory is updated, a revoked agent is refused
    /// from now on, and a stream of a revoked or re-enrolled agent is ended.
    pub fn adopt(&self, rec: AgentRecord) {
        let id = rec.id.clone();
        let before = self.enrolled(&id);
        let revoked = rec.revoked;
        let joined_at = rec.joined_at;
        self.directory
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert(rec);
        if revoked {
            self.mark_revoked(&id);
            self.end_stream(
                &id,
                Status::permission_denied(format!("agent {id} was revoked")),
            );
        } else if before.is_some_and(|b| b.joined_at != joined_at) {
            self.end_stream(
                &id,
                Status::permission_denied(format!(
                    "agent {id} was enrolled again; this certificate is no longer accepted"
                )),
            );
        }
    }

    /// The enrolled, unrevoked agents whose granted labels `selector`
    /// and `narrow` (a command's `targets` rule) both match, in id order,
    /// each with whether it is online now.
    pub fn matching(&self, selector: &Selector, narrow: Option<&Selector>) -> Vec<(String, bool)> {
        let directory = self.directory.read().unwrap_or_else(|p| p.into_inner());
        let agents = lock(&self.live);
        let mut out = Vec::new();
        for (id, rec) in directory.agents.iter() {
            if rec.revoked {
                continue;
            }
            let labels = &*rec.labels;
            let for_host = narrow.is_none_or(|t| t.matches(id, labels));
            if selector.matches(id, labels) && for_host {
                out.push((id.clone(), agents.get(id).is_some_and(|l| self.online(l))));
            }
        }
        out
    }

    pub fn list_agents(&self, selector: &str) -> ApiResult<Vec<pb::Agent>> {
        let sel = if selector.trim().is_empty() {
            Selector::all()
        } else {
            super::parse_selector(selector)?
        };
        let directory = self.directory.read().unwrap_or_else(|p| p.into_inner());
        let agents = lock(&self.live);
        let mut out = Vec::new();
        for (id, rec) in directory.agents.iter() {
            let live = agents.get(id);
            if !sel.matches(id, &rec.labels) {
                continue;
            }
            out.push(pb::Agent {
                agent_id: id.clone(),
                labels: rec
                    .labels
                    .iter()
                    .map(|(k, v)| (k.clone(), v.clone()))
                    .collect(),
                facts: live
                    .map(|l| {
                        l.facts
                            .iter()
                            .map(|(k, v)| (k.clone(), v.clone()))
                            .collect()
                    })
                    .unwrap_or_default(),
                online: live.is_some_and(|l| self.online(l)) && !rec.revoked,
                revoked: rec.revoked,
                version: live.map_or_else(|| rec.version.clone(), |l| l.version.clone()),
                last_seen_ms: live
                    .map(|l| now_ms().saturating_sub(l.last_heartbeat.elapsed().as_millis() as u64))
                    .unwrap_or(0),
                metrics: live.and_then(|l| l.metrics.clone()),
                policy_version: live.map(|l| l.policy_version).unwrap_or(0),
                clock_skew_secs: live.map(|l| l.clock_skew_secs).unwrap_or(0),
                policy_expired: live.is_some_and(|l| l.policy_expired),
                problems: live.map(health_problems).unwrap_or_default(),
                checks: live.map(|l| l.checks.clone()).unwrap_or_default(),
            });
        }
        Ok(out)
    }
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// What an operator should know about a connected agent's health.
fn health_problems(live: &Live) -> Vec<String> {
    let mut out = Vec::new();
    let skew = live.clock_skew_secs;
    if skew.unsigned_abs() > fleetcmd_core::job::CLOCK_SKEW_SECS {
        out.push(format!(
            "clock off by {skew:+}s (allowance {}s): jobs will be refused as expired or not yet valid",
            fleetcmd_core::job::CLOCK_SKEW_SECS
        ));
    }
    if live.policy_expired {
        out.push(
            "policy expired: the agent refuses every job until a newer policy is pushed".into(),
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(id: &str, labels: &[(&str, &str)]) -> AgentRecord {
        AgentRecord {
            id: id.into(),
            labels: labels
                .iter()
                .map(|(k, v)| ((*k).into(), (*v).into()))
                .collect(),
            revoked: false,
            joined_at: 1,
            version: "0.1.0".into(),
            enrolment_cert: None,
        }
    }

    #[test]
    fn the_directory_shares_equal_label_sets_and_round_trips_records() {
        let mut dir = Directory::default();
        dir.insert(record("web-1", &[("role", "web"), ("env", "prod")]));
        dir.insert(record("web-2", &[("env", "prod"), ("role", "web")]));
        dir.insert(record("db-1", &[("role", "db"), ("env", "prod")]));
        let (w1, w2, d1) = (
            dir.agents["web-1"].labels.clone(),
            dir.agents["web-2"].labels.clone(),
            dir.agents["db-1"].labels.clone(),
        );
        assert!(Arc::ptr_eq(&w1, &w2));
        assert!(!Arc::ptr_eq(&w1, &d1));
        assert_eq!(dir.label_sets.len(), 2);
        let again = record("db-1", &[("role", "db"), ("env", "prod")]);
        assert_eq!(dir.agents["db-1"].record("db-1"), again);
        // A changed record replaces the old one; its labels are interned too.
        dir.insert(AgentRecord {
            revoked: true,
            ..record("db-1", &[("role", "web"), ("env", "prod")])
        });
        assert!(dir.agents["db-1"].revoked);
        assert!(Arc::ptr_eq(&dir.agents["db-1"].labels, &w1));
    }
}
