//! Which agents are connected to some controller, with several
//! controllers on one store (`store::PresenceStore`), and what their
//! controllers know of them. Each controller writes the agents connected
//! to it every `INTERVAL` and reads every entry back:
//!
//! - the dispatcher ends a target whose turn came as `offline` only when
//!   its agent is connected to no controller — as one controller does with
//!   its own agents — instead of leaving it pending for a controller that
//!   will never have it until the job expires;
//! - `Agents.List` and health evaluation (`Shared::fleet_agents`) show an
//!   agent connected to another controller as online there, with what that
//!   controller last wrote of it (`AgentLive`: its heartbeat's figures,
//!   check results and versions — written when they change, and at least
//!   every `REFRESH` for the figures that change with every heartbeat).
//!
//! Fail-safe: an agent counts as connected nowhere only when no snapshot
//! of the last `OFFLINE_GRACE` (20 s) names it, every tick of that time succeeded
//! (after a database outage or a restart the agents are still coming
//! back), the newest snapshot is fresh and no controller is settling
//! (agents reconnecting after it started: its list is not whole).
//! Otherwise targets stay pending and are tried again, as before. A
//! controller's list counts for that for `LISTED` after its last write: a
//! controller that dies keeps its agents somewhere while they reconnect to
//! the others, and one that stalls (stopped, or cut off from the database)
//! for less than `LISTED` keeps them — they are still connected to it —
//! rather than their targets ending `offline`. Online in a list, and
//! health, count only entries written within `FRESH`.

use std::collections::{HashMap, HashSet, VecDeque};
use std::hash::{Hash, Hasher};
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use fleetcmd_proto::v1 as pb;
use prost::Message;

use super::{Shared, lock};
use crate::error::ApiResult;
use crate::store::{AgentLive, Presence};

/// How often each controller writes its entry and reads the others.
pub const INTERVAL: Duration = Duration::from_secs(2);
/// Entries older than this do not make an agent online (three missed
/// writes).
const FRESH: Duration = Duration::from_secs(6);
/// Entries older than this no longer keep their agents from counting as
/// connected nowhere.
const LISTED: Duration = Duration::from_secs(60);
/// How long an agent must be missing from every snapshot, and the ticks
/// must have succeeded, before it counts as connected nowhere: an agent
/// whose stream just ended (a controller stopped, a store error closed
/// it) is back within its first backoffs, and a controller under load
/// lists the agents that connect to it a tick or more late (found under
/// load: an agent connected to a controller killed before it ever listed
/// it reconnected to another within 6 s and was listed there later still
/// — missing for more than 10 s, its target was called offline).
const OFFLINE_GRACE: Duration = Duration::from_secs(20);
/// How long a revoked agent must be in no fresh entry before its targets
/// end (`in_no_fresh_entry`): no running controller lists it, so only a
/// slow write is waited for.
const GRACE: Duration = Duration::from_secs(10);
/// An agent's live row is written again after this even when nothing but
/// its figures changed.
const REFRESH: Duration = Duration::from_secs(300);
/// Live rows are read back with this overlap (a row committed a moment
/// after a read began is read by the next one).
const LIVE_OVERLAP: Duration = Duration::from_secs(10);

/// The snapshots read lately, and the agents of other controllers.
#[derive(Default)]
pub struct PresenceView(Mutex<View>);

#[derive(Default)]
struct View {
    /// Snapshots of the last `OFFLINE_GRACE`, oldest first.
    history: VecDeque<Snapshot>,
    /// Since when every tick succeeded (`None`: the last one failed).
    whole_since: Option<Instant>,
    /// Agents in the other controllers' fresh entries of the last read,
    /// and when that read was (Unix ms).
    elsewhere: HashSet<String>,
    /// The same of the entries written within `LISTED` (health counts a
    /// stalled controller's agents with their last word for that long).
    elsewhere_listed: HashSet<String>,
    read_at_ms: u64,
    /// What the other controllers last wrote of their agents (all rows
    /// once, then those written lately).
    live: HashMap<String, pb::Agent>,
    live_read: bool,
    /// What this controller last wrote of its agents: a fingerprint
    /// without the figures, and when.
    written: HashMap<String, (u64, Instant)>,
    /// A fingerprint of this controller's last list written whole: an
    /// unchanged list is only stamped again (`touch_presence`).
    listed: Option<u64>,
}

impl View {
    /// Whether `holds` for every snapshot of the last `grace`, when the
    /// snapshots have been whole for that long and the newest is fresh;
    /// `false` when that is not known.
    fn throughout(&self, grace: Duration, holds: impl Fn(&Snapshot) -> bool) -> bool {
        self.whole_since
            .is_some_and(|since| since.elapsed() >= grace)
            && self
                .history
                .back()
                .is_some_and(|s| s.read_at.elapsed() < FRESH)
            && self
                .history
                .iter()
                .filter(|s| s.read_at.elapsed() <= grace)
                .all(holds)
    }
}

struct Snapshot {
    read_at: Instant,
    /// Some controller with a fresh entry was settling.
    settling: bool,
    /// The agents of every entry written within `LISTED`.
    agents: HashSet<String>,
    /// The agents of the entries written within `FRESH`.
    fresh: HashSet<String>,
}

/// One tick's reading of the store.
struct Read {
    me: String,
    fresh: Vec<Presence>,
    listed: Vec<Presence>,
    live: Vec<AgentLive>,
}

impl PresenceView {
    /// Whether `agent` is connected to no controller, as far as the last
    /// `OFFLINE_GRACE` of whole, fresh snapshots tells; `false` when that is not
    /// known.
    pub fn nowhere(&self, agent: &str) -> bool {
        lock(&self.0).throughout(OFFLINE_GRACE, |s| !s.settling && !s.agents.contains(agent))
    }

    /// Whether `agent` was in no fresh entry for the last `GRACE` of
    /// whole, fresh snapshots; `false` when that is not known. What
    /// counts for a revoked agent: every running controller refuses it and
    /// ends its stream, so only a stopped or dead controller can list it,
    /// and that one's list does not keep it somewhere for `LISTED` (found
    /// by an outside test: a revoked agent's targets waited out `LISTED`,
    /// or their deadline, after its controller was killed). The grace
    /// keeps a controller that is only slow to write (a loaded machine)
    /// from losing its agents' targets to this rule.
    pub fn in_no_fresh_entry(&self, agent: &str) -> bool {
        lock(&self.0).throughout(GRACE, |s| !s.fresh.contains(agent))
    }

    /// Shows each agent of `agents` that is not online here but connected
    /// to another controller (its fresh entry names it; with `listed`, an
    /// entry of the last `LISTED`) as online, with what that controller
    /// last wrote of it.
    pub fn fill_elsewhere(&self, agents: &mut [pb::Agent], listed: bool) {
        let v = lock(&self.0);
        let fresh = v
            .history
            .back()
            .is_some_and(|s| s.read_at.elapsed() < FRESH);
        if !fresh {
            return;
        }
        let elsewhere = if listed {
            &v.elsewhere_listed
        } else {
            &v.elsewhere
        };
        for a in agents.iter_mut() {
            if a.online || a.revoked || !elsewhere.contains(&a.agent_id) {
                continue;
            }
            if let Some(l) = v.live.get(&a.agent_id) {
                a.version.clone_from(&l.version);
                a.metrics.clone_from(&l.metrics);
                a.policy_version = l.policy_version;
                a.clock_skew_secs = l.clock_skew_secs;
                a.policy_expired = l.policy_expired;
                a.problems.clone_from(&l.problems);
                a.checks.clone_from(&l.checks);
                a.facts.clone_from(&l.facts);
            }
            a.online = true;
            // Listed as connected within `FRESH` of the last read.
            a.last_seen_ms = v.read_at_ms;
        }
    }

    /// Of this controller's online agents, those whose live row must be
    /// written (changed, or not written for `REFRESH`); forgets the ones
    /// no longer here.
    fn to_write(&self, me: &str, here: &[pb::Agent]) -> Vec<(AgentLive, u64)> {
        let mut v = lock(&self.0);
        let ids: HashSet<&str> = here.iter().map(|a| a.agent_id.as_str()).collect();
        v.written.retain(|id, _| ids.contains(id.as_str()));
        here.iter()
            .filter_map(|a| {
                let fp = fingerprint(a);
                let due = v
                    .written
                    .get(&a.agent_id)
                    .is_none_or(|(was, at)| *was != fp || at.elapsed() >= REFRESH);
                due.then(|| {
                    let mut row = a.clone();
                    row.labels.clear();
                    (
                        AgentLive {
                            agent: a.agent_id.clone(),
                            controller: me.to_owned(),
                            data: row.encode_to_vec(),
                        },
                        fp,
                    )
                })
            })
            .collect()
    }

    fn written(&self, rows: &[(AgentLive, u64)]) {
        let mut v = lock(&self.0);
        let now = Instant::now();
        for (row, fp) in rows {
            v.written.insert(row.agent.clone(), (*fp, now));
        }
    }

    /// Writes this controller's list, whole when it changed since the last
    /// write (or was never written), else only stamps it.
    fn put_list(
        &self,
        store: &dyn crate::store::Store,
        me: &str,
        settling: bool,
        agents: Vec<String>,
    ) -> Result<(), crate::store::StoreError> {
        let mut h = std::collections::hash_map::DefaultHasher::new();
        agents.hash(&mut h);
        let fp = h.finish();
        let same = lock(&self.0).listed == Some(fp);
        if same && store.touch_presence(me, settling)? {
            return Ok(());
        }
        // Forgotten first: a failed write is written whole next time.
        lock(&self.0).listed = None;
        store.put_presence(&Presence {
            controller: me.to_owned(),
            settling,
            agents,
        })?;
        lock(&self.0).listed = Some(fp);
        Ok(())
    }

    fn live_read(&self) -> bool {
        lock(&self.0).live_read
    }

    fn set(&self, read: Read) {
        let now = Instant::now();
        let mut v = lock(&self.0);
        // A gap in the readings (this controller was stopped, or its ticks
        // could not run) is as good as a failure: its old snapshots say
        // nothing of now (found by an outside test: right after a
        // 10-minute stop, agents that had just joined elsewhere were
        // called offline on the first reading).
        if v.history
            .back()
            .is_some_and(|s| now.duration_since(s.read_at) > FRESH)
        {
            v.whole_since = None;
        }
        v.elsewhere_listed = read
            .listed
            .iter()
            .filter(|e| e.controller != read.me)
            .flat_map(|e| e.agents.iter().cloned())
            .collect();
        v.history.push_back(Snapshot {
            read_at: now,
            settling: read.fresh.iter().any(|e| e.settling),
            agents: read.listed.into_iter().flat_map(|e| e.agents).collect(),
            fresh: read
                .fresh
                .iter()
                .flat_map(|e| e.agents.iter().cloned())
                .collect(),
        });
        while v
            .history
            .front()
            .is_some_and(|s| now.duration_since(s.read_at) > OFFLINE_GRACE)
        {
            v.history.pop_front();
        }
        v.whole_since.get_or_insert(now);
        v.elsewhere = read
            .fresh
            .into_iter()
            .filter(|e| e.controller != read.me)
            .flat_map(|e| e.agents)
            .collect();
        v.read_at_ms = now_ms();
        for row in read.live {
            if row.controller == read.me {
                continue;
            }
            match pb::Agent::decode(row.data.as_slice()) {
                Ok(a) => {
                    v.live.insert(row.agent, a);
                }
                Err(e) => {
                    tracing::warn!(agent = %row.agent, controller = %row.controller, error = %e, "an agent's live row does not decode; ignored");
                }
            }
        }
        v.live_read = true;
    }

    fn failed(&self) {
        lock(&self.0).whole_since = None;
    }
}

/// What identifies an agent's state apart from the figures that change
/// with every heartbeat (load, memory, a check's measured summary and
/// timing): a change of it is written at once.
fn fingerprint(a: &pb::Agent) -> u64 {
    let mut a = a.clone();
    a.labels.clear();
    a.last_seen_ms = 0;
    a.metrics = None;
    for c in &mut a.checks {
        c.summary.clear();
        c.duration_ms = 0;
        c.checked_at_ms = 0;
        c.perfdata.clear();
    }
    let mut h = std::collections::hash_map::DefaultHasher::new();
    a.encode_to_vec().hash(&mut h);
    h.finish()
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

impl Shared {
    /// Writes this controller's entry (as `me`) and the live rows due, and
    /// reads every entry and the live rows written since the last read.
    /// Blocking (store calls).
    pub fn presence_tick(&self, me: &str) -> ApiResult<()> {
        let read = (|| {
            let here: Vec<pb::Agent> = self
                .registry
                .list_agents("")?
                .into_iter()
                .filter(|a| a.online)
                .collect();
            // Rows first: a controller that reads an agent in this entry
            // finds what this one knows of it.
            let rows = self.presence.to_write(me, &here);
            let live: Vec<AgentLive> = rows.iter().map(|(r, _)| r.clone()).collect();
            self.store.put_agents_live(&live)?;
            self.presence.written(&rows);
            let mut agents: Vec<String> = here.into_iter().map(|a| a.agent_id).collect();
            agents.sort_unstable();
            let settling = self.registry.settling();
            self.presence
                .put_list(self.store.as_ref(), me, settling, agents)?;
            let since = self.presence.live_read().then_some(LIVE_OVERLAP);
            Ok::<_, crate::error::ApiError>(Read {
                me: me.to_owned(),
                fresh: self.store.presence(FRESH)?,
                listed: self.store.presence(LISTED)?,
                live: self.store.agents_live(since)?,
            })
        })();
        match read {
            Ok(read) => {
                self.presence.set(read);
                Ok(())
            }
            Err(e) => {
                self.presence.failed();
                Err(e)
            }
        }
    }

    /// The agents `selector` matches, as `Agents.List` shows them: online
    /// here, or (with several controllers) online on another controller,
    /// with what that one last wrote of them.
    pub fn fleet_agents(&self, selector: &str) -> ApiResult<Vec<pb::Agent>> {
        self.fleet_agents_as(selector, false)
    }

    /// The agents as health judges them: as `fleet_agents`, but an agent of
    /// a controller that stopped writing less than `LISTED` ago counts with
    /// its last word (a controller's pause is not its agents' failure; the
    /// same rule keeps their targets pending).
    pub fn health_agents(&self) -> ApiResult<Vec<pb::Agent>> {
        self.fleet_agents_as("", true)
    }

    fn fleet_agents_as(&self, selector: &str, listed: bool) -> ApiResult<Vec<pb::Agent>> {
        let mut agents = self.registry.list_agents(selector)?;
        if self.bus.is_shared() {
            self.presence.fill_elsewhere(&mut agents, listed);
        }
        Ok(agents)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(controller: &str, settling: bool, agents: &[&str]) -> Presence {
        Presence {
            controller: controller.into(),
            settling,
            agents: agents.iter().map(|a| (*a).to_owned()).collect(),
        }
    }

    fn read(entries: Vec<Presence>) -> Read {
        Read {
            me: "me".into(),
            fresh: entries.clone(),
            listed: entries,
            live: Vec::new(),
        }
    }

    /// `over` of regular readings (every `INTERVAL`) of `entries`.
    fn readings(view: &PresenceView, over: Duration, entries: Vec<Presence>) {
        let mut passed = Duration::ZERO;
        while passed < over {
            age(view, INTERVAL);
            view.set(read(entries.clone()));
            passed += INTERVAL;
        }
    }

    /// Makes every snapshot read (and the run of good ticks) `ago` older.
    fn age(view: &PresenceView, ago: Duration) {
        let mut v = lock(&view.0);
        for s in &mut v.history {
            s.read_at -= ago;
        }
        if let Some(since) = v.whole_since.as_mut() {
            *since -= ago;
        }
    }

    #[test]
    fn an_agent_is_nowhere_only_after_a_grace_of_whole_fresh_snapshots() {
        let view = PresenceView::default();
        assert!(!view.nowhere("web-3"), "nothing read yet");
        view.set(read(vec![
            entry("a", false, &["web-1"]),
            entry("b", false, &["web-2"]),
        ]));
        assert!(!view.nowhere("web-3"), "not read for a grace yet");
        readings(
            &view,
            OFFLINE_GRACE,
            vec![entry("a", false, &["web-1"]), entry("b", false, &["web-2"])],
        );
        assert!(!view.nowhere("web-1"));
        assert!(!view.nowhere("web-2"));
        assert!(view.nowhere("web-3"));
        // web-2's stream ended a moment ago: still somewhere for a grace.
        view.set(read(vec![
            entry("a", false, &["web-1"]),
            entry("b", false, &[]),
        ]));
        assert!(!view.nowhere("web-2"), "gone for less than a grace");
        readings(
            &view,
            OFFLINE_GRACE + Duration::from_secs(1),
            vec![entry("a", false, &["web-1"]), entry("b", false, &[])],
        );
        assert!(view.nowhere("web-2"), "gone for more than a grace");
        // A controller settling: nothing is nowhere.
        view.set(read(vec![
            entry("a", false, &["web-1"]),
            entry("b", true, &[]),
        ]));
        assert!(!view.nowhere("web-3"), "b is settling");
        // A failed tick (the database was away): a grace of good ones first.
        let view = PresenceView::default();
        view.set(read(vec![entry("a", false, &[])]));
        readings(&view, OFFLINE_GRACE, vec![entry("a", false, &[])]);
        assert!(view.nowhere("web-3"));
        view.failed();
        view.set(read(vec![entry("a", false, &[])]));
        assert!(!view.nowhere("web-3"), "just after a failure");
        // Stale: no fresh snapshot.
        age(&view, OFFLINE_GRACE + FRESH);
        assert!(!view.nowhere("web-3"), "the snapshots are stale");
        // Read again after that gap: a grace of regular readings first.
        view.set(read(vec![entry("a", false, &[])]));
        assert!(!view.nowhere("web-3"), "just after a gap in the readings");
        readings(
            &view,
            OFFLINE_GRACE - INTERVAL,
            vec![entry("a", false, &[])],
        );
        assert!(!view.nowhere("web-3"), "less than a grace of readings");
        readings(&view, INTERVAL, vec![entry("a", false, &[])]);
        assert!(view.nowhere("web-3"), "a grace of regular readings");
        // A stop of the readings longer than FRESH (this controller was
        // stopped) starts the grace again.
        age(&view, FRESH + Duration::from_secs(1));
        view.set(read(vec![entry("a", false, &[])]));
        assert!(!view.nowhere("web-3"), "just after a stop of the readings");
    }

    #[test]
    fn only_fresh_entries_keep_an_agent_in_a_fresh_entry() {
        let view = PresenceView::default();
        assert!(!view.in_no_fresh_entry("web-1"), "nothing read yet");
        // B stopped writing a while ago: listed, not fresh.
        let stale_b = || Read {
            me: "a".into(),
            fresh: vec![entry("c", false, &["web-2"])],
            listed: vec![entry("b", false, &["web-1"]), entry("c", false, &["web-2"])],
            live: Vec::new(),
        };
        view.set(stale_b());
        assert!(!view.in_no_fresh_entry("web-1"), "not for a grace yet");
        let mut passed = Duration::ZERO;
        while passed < GRACE {
            age(&view, INTERVAL);
            view.set(stale_b());
            passed += INTERVAL;
        }
        assert!(view.in_no_fresh_entry("web-1"));
        assert!(!view.in_no_fresh_entry("web-2"));
        assert!(!view.nowhere("web-1"), "still listed for the offline rule");
        // B writes once more: in a fresh entry again within the grace.
        view.set(read(vec![entry("b", false, &["web-1"])]));
        assert!(!view.in_no_fresh_entry("web-1"));
        age(&view, FRESH);
        assert!(!view.in_no_fresh_entry("web-3"), "the reading is stale");
    }

    #[test]
    fn a_stalled_controllers_agents_stay_somewhere_while_its_entry_is_listed() {
        let view = PresenceView::default();
        let stalled = |v: &PresenceView| {
            v.set(Read {
                me: "a".into(),
                // b stopped writing: not fresh, still listed.
                fresh: vec![entry("a", false, &["web-1"])],
                listed: vec![entry("a", false, &["web-1"]), entry("b", false, &["web-2"])],
                live: Vec::new(),
            })
        };
        for _ in 0..=OFFLINE_GRACE.as_secs() / INTERVAL.as_secs() {
            age(&view, INTERVAL);
            stalled(&view);
        }
        assert!(
            !view.nowhere("web-2"),
            "b's agents are still connected to it"
        );
        assert!(view.nowhere("web-3"));
        // Not online in listings, though: b has not said so lately; health
        // counts it with its last word.
        let mut agents = vec![offline("web-2")];
        view.fill_elsewhere(&mut agents, false);
        assert!(!agents[0].online);
        view.fill_elsewhere(&mut agents, true);
        assert!(agents[0].online);
    }

    fn offline(id: &str) -> pb::Agent {
        pb::Agent {
            agent_id: id.into(),
            ..pb::Agent::default()
        }
    }

    fn checked(id: &str, state: pb::CheckState, summary: &str, cpu: f32) -> pb::Agent {
        pb::Agent {
            agent_id: id.into(),
            online: true,
            version: "1.2.3".into(),
            policy_version: 4,
            metrics: Some(pb::HostMetrics {
                cpu_percent: cpu,
                ..pb::HostMetrics::default()
            }),
            checks: vec![pb::CheckResult {
                name: "disk".into(),
                state: state as i32,
                summary: summary.into(),
                ..pb::CheckResult::default()
            }],
            labels: [("role".to_owned(), "web".to_owned())].into(),
            ..pb::Agent::default()
        }
    }

    #[test]
    fn agents_on_other_controllers_are_online_with_what_their_controller_wrote() {
        // What b wrote of web-2.
        let b = PresenceView::default();
        let rows = b.to_write(
            "b",
            &[checked("web-2", pb::CheckState::Ok, "40% used", 3.0)],
        );
        assert_eq!(rows.len(), 1);
        let view = PresenceView::default();
        view.set(Read {
            me: "a".into(),
            fresh: vec![
                entry("a", false, &["web-1", "web-9"]),
                entry("b", false, &["web-2", "web-3", "gone"]),
            ],
            listed: Vec::new(),
            live: vec![rows[0].0.clone()],
        });
        let mut agents = vec![
            checked("web-1", pb::CheckState::Ok, "here", 1.0),
            offline("web-2"),
            // On b, no row read yet: online, nothing more known.
            offline("web-3"),
            // Listed by this controller itself a moment ago, gone since.
            offline("web-9"),
            pb::Agent {
                revoked: true,
                ..offline("gone")
            },
            offline("web-4"),
        ];
        view.fill_elsewhere(&mut agents, false);
        let online: Vec<bool> = agents.iter().map(|a| a.online).collect();
        assert_eq!(online, [true, true, true, false, false, false]);
        assert_eq!(agents[0].checks[0].summary, "here", "this controller's own");
        let w2 = &agents[1];
        assert_eq!((w2.version.as_str(), w2.policy_version), ("1.2.3", 4));
        assert_eq!(w2.checks[0].summary, "40% used");
        assert!(
            w2.labels.is_empty(),
            "labels are the directory's, not the row's"
        );
        assert!(w2.last_seen_ms > 0);
        assert!(agents[2].checks.is_empty());
        // Stale snapshots: nobody is online elsewhere.
        age(&view, FRESH);
        let mut again = vec![offline("web-2")];
        view.fill_elsewhere(&mut again, false);
        assert!(!again[0].online);
    }

    #[test]
    fn a_live_row_is_written_when_its_state_changes_not_its_figures() {
        let view = PresenceView::default();
        let here = |state, summary, cpu| vec![checked("web-1", state, summary, cpu)];
        let due = |rows: Vec<(AgentLive, u64)>| {
            let n = rows.len();
            view.written(&rows);
            n
        };
        assert_eq!(
            due(view.to_write("a", &here(pb::CheckState::Ok, "40%", 1.0))),
            1
        );
        assert_eq!(
            due(view.to_write("a", &here(pb::CheckState::Ok, "41%", 7.0))),
            0,
            "only figures changed"
        );
        assert_eq!(
            due(view.to_write("a", &here(pb::CheckState::Critical, "99%", 7.0))),
            1,
            "the check's state changed"
        );
        // Figures are written too once `REFRESH` has passed.
        for (_, at) in lock(&view.0).written.values_mut() {
            *at -= REFRESH;
        }
        assert_eq!(
            due(view.to_write("a", &here(pb::CheckState::Critical, "98%", 2.0))),
            1
        );
        // An agent that left and came back is written again at once.
        assert_eq!(due(view.to_write("a", &[])), 0);
        assert_eq!(
            due(view.to_write("a", &here(pb::CheckState::Critical, "98%", 2.0))),
            1
        );
    }
}
