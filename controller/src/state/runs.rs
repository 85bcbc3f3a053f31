//! The rollout state of a running job as the dispatch driver keeps it in
//! memory: the job record and each target's state, with counts kept up to
//! date by `set`, so a result that neither frees a pending target nor ends
//! the job costs no pass over all targets.

use std::collections::HashMap;

use fleetcmd_core::state::TargetState;

use crate::store::JobRecord;

/// A running job as `advance` sees it.
pub(super) struct Run {
    pub(super) job: JobRecord,
    /// (state, dispatched_at) per target, in `job.targets` order.
    pub(super) states: Vec<(TargetState, u64)>,
    pub(super) index: HashMap<String, usize>,
    /// Targets still `pending`, and not yet in a terminal state: kept by
    /// `set` so that a result which neither frees a pending target nor ends
    /// the job costs no pass over all targets.
    pub(super) pending: usize,
    pub(super) unfinished: usize,
}

impl Run {
    pub(super) fn new(
        job: JobRecord,
        states: Vec<(TargetState, u64)>,
        index: HashMap<String, usize>,
    ) -> Run {
        let pending = states
            .iter()
            .filter(|t| t.0 == TargetState::Pending)
            .count();
        let unfinished = states.iter().filter(|t| !t.0.is_terminal()).count();
        Run {
            job,
            states,
            index,
            pending,
            unfinished,
        }
    }

    pub(super) fn set(&mut self, i: usize, state: TargetState, at: u64) {
        let old = self.states[i].0;
        self.pending -= usize::from(old == TargetState::Pending);
        self.unfinished -= usize::from(!old.is_terminal());
        self.pending += usize::from(state == TargetState::Pending);
        self.unfinished += usize::from(!state.is_terminal());
        self.states[i] = (state, at);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_follow_every_state_change() {
        use TargetState::*;
        let job = JobRecord::for_test(
            "j",
            0,
            fleetcmd_core::state::JobState::Running,
            &["a", "b", "c"],
        );
        let index = HashMap::from([("a".into(), 0), ("b".into(), 1), ("c".into(), 2)]);
        let mut run = Run::new(job, vec![(Pending, 0), (Dispatched, 5), (Ok, 5)], index);
        let counts = |r: &Run| (r.pending, r.unfinished);
        assert_eq!(counts(&run), (1, 2));
        run.set(0, Dispatched, 9);
        assert_eq!(counts(&run), (0, 2));
        assert_eq!(run.states[0], (Dispatched, 9));
        run.set(0, Running, 9);
        run.set(1, Failed, 5);
        assert_eq!(counts(&run), (0, 1));
        run.set(0, Ok, 9);
        assert_eq!(counts(&run), (0, 0), "every target ended");
    }
}
