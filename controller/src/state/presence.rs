//! Which agents are connected to some controller, with several
//! controllers on one store (`store::PresenceStore`). Each controller
//! writes the agents connected to it every `INTERVAL` and reads every
//! fresh entry back; the dispatcher ends a target whose turn came as
//! `offline` only when its agent is connected to no controller — as one
//! controller does with its own agents — instead of leaving it pending
//! for a controller that will never have it until the job expires.
//!
//! Fail-safe: an agent counts as connected nowhere only when no snapshot
//! of the last `GRACE` names it, every tick of the last `GRACE` succeeded
//! (after a database outage or a restart the agents are still coming
//! back), the newest snapshot is fresh and no controller is settling
//! (agents reconnecting after it started: its list is not whole).
//! Otherwise targets stay pending and are tried again, as before. A
//! controller that dies keeps its entry fresh for `FRESH`, which covers its
//! agents' reconnecting to the others.

use std::collections::{HashSet, VecDeque};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use super::{Shared, lock};
use crate::error::ApiResult;
use crate::store::Presence;

/// How often each controller writes its entry and reads the others.
pub const INTERVAL: Duration = Duration::from_secs(2);
/// Entries older than this are not read (three missed writes).
const FRESH: Duration = Duration::from_secs(6);
/// How long an agent must be missing from every snapshot, and the ticks
/// must have succeeded, before it counts as connected nowhere: an agent
/// whose stream just ended (a controller stopped, a store error closed
/// it) is back within its first backoffs.
const GRACE: Duration = Duration::from_secs(10);

/// The snapshots read lately.
#[derive(Default)]
pub struct PresenceView(Mutex<View>);

#[derive(Default)]
struct View {
    /// Snapshots of the last `GRACE`, oldest first.
    history: VecDeque<Snapshot>,
    /// Since when every tick succeeded (`None`: the last one failed).
    whole_since: Option<Instant>,
}

struct Snapshot {
    read_at: Instant,
    /// Some controller was settling.
    settling: bool,
    agents: HashSet<String>,
}

impl PresenceView {
    /// Whether `agent` is connected to no controller, as far as the last
    /// `GRACE` of whole, fresh snapshots tells; `false` when that is not
    /// known.
    pub fn nowhere(&self, agent: &str) -> bool {
        let v = lock(&self.0);
        v.whole_since.is_some_and(|since| since.elapsed() >= GRACE)
            && v.history
                .back()
                .is_some_and(|s| s.read_at.elapsed() < FRESH)
            && v.history
                .iter()
                .all(|s| !s.settling && !s.agents.contains(agent))
    }

    fn set(&self, entries: Vec<Presence>) {
        let now = Instant::now();
        let mut v = lock(&self.0);
        v.history.push_back(Snapshot {
            read_at: now,
            settling: entries.iter().any(|e| e.settling),
            agents: entries.into_iter().flat_map(|e| e.agents).collect(),
        });
        while v
            .history
            .front()
            .is_some_and(|s| now.duration_since(s.read_at) > GRACE)
        {
            v.history.pop_front();
        }
        v.whole_since.get_or_insert(now);
    }

    fn failed(&self) {
        lock(&self.0).whole_since = None;
    }
}

impl Shared {
    /// Writes this controller's entry (as `me`) and reads every fresh one.
    /// Blocking (store calls).
    pub fn presence_tick(&self, me: &str) -> ApiResult<()> {
        let read = self
            .store
            .put_presence(&Presence {
                controller: me.to_owned(),
                settling: self.registry.settling(),
                agents: self.registry.online_ids(),
            })
            .and_then(|()| self.store.presence(FRESH));
        match read {
            Ok(entries) => {
                self.presence.set(entries);
                Ok(())
            }
            Err(e) => {
                self.presence.failed();
                Err(e.into())
            }
        }
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
        view.set(vec![
            entry("a", false, &["web-1"]),
            entry("b", false, &["web-2"]),
        ]);
        assert!(!view.nowhere("web-3"), "not read for a grace yet");
        age(&view, GRACE);
        view.set(vec![
            entry("a", false, &["web-1"]),
            entry("b", false, &["web-2"]),
        ]);
        assert!(!view.nowhere("web-1"));
        assert!(!view.nowhere("web-2"));
        assert!(view.nowhere("web-3"));
        // web-2's stream ended a moment ago: still somewhere for a grace.
        view.set(vec![entry("a", false, &["web-1"]), entry("b", false, &[])]);
        assert!(!view.nowhere("web-2"), "gone for less than a grace");
        age(&view, GRACE + Duration::from_secs(1));
        view.set(vec![entry("a", false, &["web-1"]), entry("b", false, &[])]);
        assert!(view.nowhere("web-2"), "gone for more than a grace");
        // A controller settling: nothing is nowhere.
        view.set(vec![entry("a", false, &["web-1"]), entry("b", true, &[])]);
        assert!(!view.nowhere("web-3"), "b is settling");
        // A failed tick (the database was away): a grace of good ones first.
        let view = PresenceView::default();
        view.set(vec![entry("a", false, &[])]);
        age(&view, GRACE);
        view.set(vec![entry("a", false, &[])]);
        assert!(view.nowhere("web-3"));
        view.failed();
        view.set(vec![entry("a", false, &[])]);
        assert!(!view.nowhere("web-3"), "just after a failure");
        // Stale: no fresh snapshot.
        age(&view, GRACE + FRESH);
        assert!(!view.nowhere("web-3"), "the snapshots are stale");
    }
}
