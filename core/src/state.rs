//! The states of a job and of each of its targets, defined once: their
//! stored names, which of them are final, and which moves between them are
//! allowed. The controller stores and sends these names; the CLI, the
//! gateway and the tests read them through these types.
//!
//! ```
//! use fleetcmd_core::state::{JobState, TargetState};
//! assert_eq!("timed_out".parse::<TargetState>(), Ok(TargetState::TimedOut));
//! assert!(TargetState::Dispatched.can_become(TargetState::Running));
//! assert!(!TargetState::Ok.can_become(TargetState::Failed));
//! assert!(JobState::Canceled.is_terminal());
//! ```

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// A name that is not one of the states of its kind.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown {kind} state `{got}`; one of: {known}")]
pub struct UnknownState {
    /// `job` or `target`.
    pub kind: &'static str,
    /// What was given (escaped and bounded by `terminal::excerpt`).
    pub got: String,
    /// The names that exist, comma-separated.
    pub known: String,
}

fn unknown(kind: &'static str, got: &str, all: &[&str]) -> UnknownState {
    UnknownState {
        kind,
        got: crate::terminal::excerpt(got),
        known: all.join(", "),
    }
}

/// Where a job stands. A job is `Running` until every target reached a
/// terminal state; then it ends in exactly one of the others.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum JobState {
    Running,
    /// Every target ended `ok`.
    Succeeded,
    /// Every target ended, at least one not `ok`.
    Failed,
    /// Its error budget was spent or a canary failed: pending targets skipped.
    Aborted,
    /// Canceled by someone: pending targets canceled, running ones told to stop.
    Canceled,
    /// Its signature expired before every target could start.
    Expired,
}

impl JobState {
    pub const ALL: [JobState; 6] = [
        JobState::Running,
        JobState::Succeeded,
        JobState::Failed,
        JobState::Aborted,
        JobState::Canceled,
        JobState::Expired,
    ];

    /// The name stored and shown (`succeeded`).
    pub fn as_str(self) -> &'static str {
        match self {
            JobState::Running => "running",
            JobState::Succeeded => "succeeded",
            JobState::Failed => "failed",
            JobState::Aborted => "aborted",
            JobState::Canceled => "canceled",
            JobState::Expired => "expired",
        }
    }

    /// Whether the job has ended (every state but `Running`).
    pub fn is_terminal(self) -> bool {
        self != JobState::Running
    }

    /// Whether a job in this state may move to `next`: only a running job
    /// ends, and an ended job never changes again.
    pub fn can_become(self, next: JobState) -> bool {
        self == JobState::Running && next != JobState::Running
    }

    /// The state a job ends in when every target has ended: the reason it
    /// was stopped, if it was, else `Succeeded` when all targets are `ok`.
    pub fn of_ended(stopped: Option<Stop>, targets: impl IntoIterator<Item = TargetState>) -> Self {
        match stopped {
            Some(stop) => stop.job_state(),
            None if targets.into_iter().all(|t| t == TargetState::Ok) => JobState::Succeeded,
            None => JobState::Failed,
        }
    }
}

impl fmt::Display for JobState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for JobState {
    type Err = UnknownState;
    fn from_str(s: &str) -> Result<Self, UnknownState> {
        JobState::ALL
            .into_iter()
            .find(|j| j.as_str() == s)
            .ok_or_else(|| unknown("job", s, &JobState::ALL.map(JobState::as_str)))
    }
}

/// Why a running job stopped starting targets before all had started.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Stop {
    Aborted,
    Canceled,
    Expired,
}

impl Stop {
    /// The state the job ends in.
    pub fn job_state(self) -> JobState {
        match self {
            Stop::Aborted => JobState::Aborted,
            Stop::Canceled => JobState::Canceled,
            Stop::Expired => JobState::Expired,
        }
    }

    /// What its pending targets become: `canceled` for a cancel, `skipped`
    /// otherwise.
    pub fn pending_become(self) -> TargetState {
        match self {
            Stop::Canceled => TargetState::Canceled,
            Stop::Aborted | Stop::Expired => TargetState::Skipped,
        }
    }
}

/// Where one target (one agent of a job) stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TargetState {
    /// Not sent yet (the rollout has not reached it).
    Pending,
    /// Sent to its agent's stream.
    Dispatched,
    /// Its agent reported starting it.
    Running,
    Ok,
    Failed,
    TimedOut,
    /// The agent refused it (its own checks), or it was revoked before
    /// reporting a start.
    Refused,
    /// Its agent was offline when its turn came.
    Offline,
    Canceled,
    /// Never started: the job was aborted or expired first.
    Skipped,
}

impl TargetState {
    pub const ALL: [TargetState; 10] = [
        TargetState::Pending,
        TargetState::Dispatched,
        TargetState::Running,
        TargetState::Ok,
        TargetState::Failed,
        TargetState::TimedOut,
        TargetState::Refused,
        TargetState::Offline,
        TargetState::Canceled,
        TargetState::Skipped,
    ];

    /// The name stored and shown (`timed_out`).
    pub fn as_str(self) -> &'static str {
        match self {
            TargetState::Pending => "pending",
            TargetState::Dispatched => "dispatched",
            TargetState::Running => "running",
            TargetState::Ok => "ok",
            TargetState::Failed => "failed",
            TargetState::TimedOut => "timed_out",
            TargetState::Refused => "refused",
            TargetState::Offline => "offline",
            TargetState::Canceled => "canceled",
            TargetState::Skipped => "skipped",
        }
    }

    /// Whether the target has ended; a job has ended when all its targets have.
    pub fn is_terminal(self) -> bool {
        !matches!(
            self,
            TargetState::Pending | TargetState::Dispatched | TargetState::Running
        )
    }

    /// Sent and not ended: the only state in which its agent's output and
    /// result for the job count.
    pub fn is_active(self) -> bool {
        matches!(self, TargetState::Dispatched | TargetState::Running)
    }

    /// Whether a target in this state may move to `next`:
    /// - pending → dispatched, or ended without starting (offline,
    ///   skipped, canceled);
    /// - dispatched → running, or any end but skipped (a result, the
    ///   deadline, a revocation, an offline agent);
    /// - running → any end a started target can have;
    /// - an ended target never changes (at most one result per target).
    pub fn can_become(self, next: TargetState) -> bool {
        use TargetState::*;
        match self {
            Pending => matches!(next, Dispatched | Offline | Skipped | Canceled),
            Dispatched => next == Running || (next.is_terminal() && next != Skipped),
            Running => matches!(next, Ok | Failed | TimedOut | Refused | Canceled),
            _ => false,
        }
    }
}

impl fmt::Display for TargetState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for TargetState {
    type Err = UnknownState;
    fn from_str(s: &str) -> Result<Self, UnknownState> {
        TargetState::ALL
            .into_iter()
            .find(|t| t.as_str() == s)
            .ok_or_else(|| unknown("target", s, &TargetState::ALL.map(TargetState::as_str)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_unknown_ones_are_named_in_the_error() {
        for j in JobState::ALL {
            assert_eq!(j.as_str().parse::<JobState>(), Ok(j));
            assert_eq!(
                serde_json::to_string(&j).expect("a state serializes"),
                format!("\"{j}\"")
            );
        }
        for t in TargetState::ALL {
            assert_eq!(t.as_str().parse::<TargetState>(), Ok(t));
            assert_eq!(
                serde_json::to_string(&t).expect("a state serializes"),
                format!("\"{t}\"")
            );
        }
        let e = "cancelled".parse::<JobState>().expect_err("not a state");
        assert_eq!(
            e.to_string(),
            "unknown job state `cancelled`; one of: running, succeeded, failed, aborted, canceled, expired"
        );
        let e = "".parse::<TargetState>().expect_err("not a state");
        assert!(
            e.to_string()
                .starts_with("unknown target state ``; one of: pending,"),
            "{e}"
        );
    }

    #[test]
    fn terminal_states() {
        let ended: Vec<_> = TargetState::ALL
            .into_iter()
            .filter(|t| t.is_terminal())
            .collect();
        use TargetState::*;
        assert_eq!(
            ended,
            [Ok, Failed, TimedOut, Refused, Offline, Canceled, Skipped]
        );
        let active: Vec<_> = TargetState::ALL
            .into_iter()
            .filter(|t| t.is_active())
            .collect();
        assert_eq!(active, [Dispatched, Running]);
        assert_eq!(
            JobState::ALL
                .into_iter()
                .filter(|j| !j.is_terminal())
                .collect::<Vec<_>>(),
            [JobState::Running]
        );
    }

    fn check(from: TargetState, allowed: &[TargetState]) {
        for to in TargetState::ALL {
            assert_eq!(from.can_become(to), allowed.contains(&to), "{from} -> {to}");
        }
    }

    #[test]
    fn target_transitions() {
        use TargetState::*;
        check(Pending, &[Dispatched, Offline, Skipped, Canceled]);
        check(
            Dispatched,
            &[Running, Ok, Failed, TimedOut, Refused, Offline, Canceled],
        );
        check(Running, &[Ok, Failed, TimedOut, Refused, Canceled]);
        for end in [Ok, Failed, TimedOut, Refused, Offline, Canceled, Skipped] {
            check(end, &[]);
        }
    }

    #[test]
    fn job_transitions_and_final_state() {
        for from in JobState::ALL {
            for to in JobState::ALL {
                let allowed = from == JobState::Running && to != JobState::Running;
                assert_eq!(from.can_become(to), allowed, "{from} -> {to}");
            }
        }
        use TargetState::*;
        assert_eq!(JobState::of_ended(None, [Ok, Ok]), JobState::Succeeded);
        assert_eq!(JobState::of_ended(None, [Ok, Offline]), JobState::Failed);
        assert_eq!(
            JobState::of_ended(Some(Stop::Aborted), [Ok]),
            JobState::Aborted
        );
        assert_eq!(
            JobState::of_ended(Some(Stop::Expired), [Skipped]),
            JobState::Expired
        );
        assert_eq!(
            JobState::of_ended(Some(Stop::Canceled), [Ok]),
            JobState::Canceled
        );
        assert_eq!(Stop::Canceled.pending_become(), Canceled);
        assert_eq!(Stop::Aborted.pending_become(), Skipped);
        assert_eq!(Stop::Expired.pending_become(), Skipped);
    }
}
