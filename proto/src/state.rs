//! The wire form of job and target states (`fleetcmd_core::state`, where
//! they are defined): the enum fields and, for clients of earlier versions,
//! the same state's name in the `state` string fields. Messages are built
//! with both through [`v1::Target::new`] and [`v1::Job::set_state`], so the
//! two cannot disagree.

use fleetcmd_core::state::{JobState, TargetState};

use crate::v1;

impl From<JobState> for v1::JobState {
    fn from(s: JobState) -> Self {
        match s {
            JobState::Running => v1::JobState::Running,
            JobState::Succeeded => v1::JobState::Succeeded,
            JobState::Failed => v1::JobState::Failed,
            JobState::Aborted => v1::JobState::Aborted,
            JobState::Canceled => v1::JobState::Canceled,
            JobState::Expired => v1::JobState::Expired,
        }
    }
}

impl From<TargetState> for v1::TargetState {
    fn from(s: TargetState) -> Self {
        match s {
            TargetState::Pending => v1::TargetState::Pending,
            TargetState::Dispatched => v1::TargetState::Dispatched,
            TargetState::Running => v1::TargetState::Running,
            TargetState::Ok => v1::TargetState::Ok,
            TargetState::Failed => v1::TargetState::Failed,
            TargetState::TimedOut => v1::TargetState::TimedOut,
            TargetState::Refused => v1::TargetState::Refused,
            TargetState::Offline => v1::TargetState::Offline,
            TargetState::Canceled => v1::TargetState::Canceled,
            TargetState::Skipped => v1::TargetState::Skipped,
        }
    }
}

impl v1::Job {
    /// The job's state: `job_state`, or the `state` name from a controller
    /// of an earlier version, which sends only that; `None` if neither
    /// names a state.
    pub fn current_state(&self) -> Option<JobState> {
        JobState::ALL
            .into_iter()
            .find(|s| v1::JobState::from(*s) == self.job_state())
            .or_else(|| self.state.parse().ok())
    }

    /// Sets the state, in both fields.
    pub fn set_state(&mut self, s: JobState) {
        self.set_job_state(s.into());
        self.state = s.as_str().to_owned();
    }
}

impl v1::Target {
    /// A target in `state`, set in both fields.
    pub fn new(agent_id: String, state: TargetState, result: Option<v1::JobResult>) -> Self {
        v1::Target {
            agent_id,
            state: state.as_str().to_owned(),
            result,
            target_state: v1::TargetState::from(state).into(),
        }
    }

    /// The target's state: `target_state`, or the `state` name from a
    /// controller of an earlier version; `None` if neither names a state.
    pub fn current_state(&self) -> Option<TargetState> {
        TargetState::ALL
            .into_iter()
            .find(|s| v1::TargetState::from(*s) == self.target_state())
            .or_else(|| self.state.parse().ok())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_fields_carry_one_state_and_old_messages_are_read_by_name() {
        for s in JobState::ALL {
            let mut job = v1::Job::default();
            job.set_state(s);
            assert_eq!(job.state, s.as_str());
            assert_eq!(job.current_state(), Some(s));
            // A controller of an earlier version sets the name only.
            let old = v1::Job {
                state: s.as_str().into(),
                ..Default::default()
            };
            assert_eq!(old.current_state(), Some(s));
        }
        for s in TargetState::ALL {
            let t = v1::Target::new("web-1".into(), s, None);
            assert_eq!(t.state, s.as_str());
            assert_eq!(t.current_state(), Some(s));
            let old = v1::Target {
                state: s.as_str().into(),
                ..Default::default()
            };
            assert_eq!(old.current_state(), Some(s));
        }
        assert_eq!(v1::Job::default().current_state(), None);
        // Every core state has its own wire value.
        let wire: std::collections::HashSet<_> = TargetState::ALL
            .map(v1::TargetState::from)
            .into_iter()
            .collect();
        assert_eq!(wire.len(), TargetState::ALL.len());
        let wire: std::collections::HashSet<_> =
            JobState::ALL.map(v1::JobState::from).into_iter().collect();
        assert_eq!(wire.len(), JobState::ALL.len());
    }
}
