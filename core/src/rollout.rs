//! Which targets of a job start next: batches, an error budget
//! and canaries, decided from the targets' current phases alone, so the
//! controller can re-run it after every result — and after a restart.

use crate::job::Rollout;
use crate::state::TargetState;

/// Where one target stands, as far as rollout is concerned.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    /// Not started yet.
    Pending,
    /// Dispatched or running.
    Active,
    Ok,
    /// failed, timed out, refused or offline: counts against the error budget.
    Failed,
    /// canceled or skipped.
    Stopped,
}

impl Phase {
    /// The phase of a target in `state`.
    pub fn of_state(state: TargetState) -> Phase {
        match state {
            TargetState::Pending => Phase::Pending,
            TargetState::Dispatched | TargetState::Running => Phase::Active,
            TargetState::Ok => Phase::Ok,
            TargetState::Canceled | TargetState::Skipped => Phase::Stopped,
            TargetState::Failed
            | TargetState::TimedOut
            | TargetState::Refused
            | TargetState::Offline => Phase::Failed,
        }
    }
}

/// What to do now.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct Decision {
    /// Indices of pending targets to start, in order.
    pub start: Vec<usize>,
    /// Stop starting targets: the error budget is spent or a canary failed.
    /// The caller marks the remaining pending targets `skipped`.
    pub abort: Option<String>,
}

/// Decides which pending targets start, given every target's phase (in the
/// job's target order), the job's rollout and whether its command needs
/// approval (which makes the default error budget 0).
///
/// ```
/// use fleetcmd_core::job::Rollout;
/// use fleetcmd_core::rollout::{next, Phase::*};
/// let r = Rollout { batch: Some(fleetcmd_core::grammar::Limit::Count(2)), ..Default::default() };
/// assert_eq!(next(&[Pending, Pending, Pending], &r, false).start, vec![0, 1]);
/// assert_eq!(next(&[Ok, Active, Pending], &r, false).start, vec![2]);
/// ```
pub fn next(phases: &[Phase], rollout: &Rollout, needs_approval: bool) -> Decision {
    let total = phases.len() as u32;
    let count = |p: Phase| phases.iter().filter(|x| **x == p).count() as u32;
    let failed = count(Phase::Failed);
    if let Some(budget) = rollout.max_errors_of(total, needs_approval)
        && failed > budget
    {
        return Decision {
            start: Vec::new(),
            abort: Some(format!(
                "{failed} target(s) failed, more than the {budget} allowed (--max-errors)"
            )),
        };
    }
    // Canaries are the first N targets; the rest wait until all succeeded.
    let mut eligible = phases.len();
    if let Some(c) = rollout.canary {
        let c = (c as usize).min(phases.len());
        let canaries = &phases[..c];
        if canaries
            .iter()
            .any(|p| matches!(p, Phase::Pending | Phase::Active))
        {
            eligible = c;
        } else if let Some(bad) = canaries.iter().position(|p| *p != Phase::Ok) {
            return Decision {
                start: Vec::new(),
                abort: Some(format!("canary target #{} did not succeed", bad + 1)),
            };
        }
    }
    let batch = rollout.batch_of(total);
    let free = batch.saturating_sub(count(Phase::Active)) as usize;
    let start = phases[..eligible]
        .iter()
        .enumerate()
        .filter(|(_, p)| **p == Phase::Pending)
        .map(|(i, _)| i)
        .take(free)
        .collect();
    Decision { start, abort: None }
}

#[cfg(test)]
mod tests {
    use super::Phase::*;
    use super::*;
    use crate::grammar::Limit;

    fn r(batch: Option<Limit>, max_errors: Option<Limit>, canary: Option<u32>) -> Rollout {
        Rollout {
            batch,
            max_errors,
            canary,
        }
    }

    #[test]
    fn decisions() {
        let check =
            |phases: &[Phase], ro: Rollout, approval: bool, start: &[usize], abort: bool| {
                let d = next(phases, &ro, approval);
                assert_eq!(d.start, start, "{phases:?} {ro:?}");
                assert_eq!(d.abort.is_some(), abort, "{phases:?} {ro:?}: {:?}", d.abort);
            };
        let one = Some(Limit::Count(1));
        // Default batch is 50, no error budget without approval.
        check(&[Pending; 3], Rollout::default(), false, &[0, 1, 2], false);
        check(
            &[Failed, Failed, Pending],
            Rollout::default(),
            false,
            &[2],
            false,
        );
        // Commands needing approval default to --max-errors 0.
        check(&[Failed, Pending], Rollout::default(), true, &[], true);
        // --batch 1 --max-errors 0 with `false` on 3 agents runs exactly one.
        check(
            &[Pending; 3],
            r(one, Some(Limit::Count(0)), None),
            false,
            &[0],
            false,
        );
        check(
            &[Active, Pending, Pending],
            r(one, Some(Limit::Count(0)), None),
            false,
            &[],
            false,
        );
        check(
            &[Failed, Pending, Pending],
            r(one, Some(Limit::Count(0)), None),
            false,
            &[],
            true,
        );
        // Percentages: batch 50% of 4 = 2; max-errors 25% of 4 = 1.
        check(
            &[Pending; 4],
            r(Some(Limit::Percent(50)), None, None),
            false,
            &[0, 1],
            false,
        );
        check(
            &[Failed, Ok, Pending, Pending],
            r(None, Some(Limit::Percent(25)), None),
            false,
            &[2, 3],
            false,
        );
        check(
            &[Failed, Failed, Pending, Pending],
            r(None, Some(Limit::Percent(25)), None),
            false,
            &[],
            true,
        );
        // Canaries first, the rest only after they all succeeded.
        check(&[Pending; 4], r(None, None, Some(1)), false, &[0], false);
        check(
            &[Active, Pending, Pending],
            r(None, None, Some(1)),
            false,
            &[],
            false,
        );
        check(
            &[Ok, Pending, Pending],
            r(None, None, Some(1)),
            false,
            &[1, 2],
            false,
        );
        check(
            &[Failed, Pending, Pending],
            r(None, None, Some(1)),
            false,
            &[],
            true,
        );
        check(
            &[Ok, Ok, Pending],
            r(one, None, Some(5)),
            false,
            &[2],
            false,
        );
        // Nothing left to start.
        check(
            &[Ok, Failed, Stopped],
            Rollout::default(),
            false,
            &[],
            false,
        );
    }
}
