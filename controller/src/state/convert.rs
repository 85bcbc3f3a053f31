//! Conversions at the service boundary: a stored job and its target
//! records into the `Job` the API shows, the audit event of one result,
//! the policy as agents receive it. Pure: no store, no locks.

use std::collections::HashMap;

use fleetcmd_core::audit::{Event, EventKind};
use fleetcmd_core::state::{JobState, TargetState};
use fleetcmd_proto::v1 as pb;
use prost::Message;

use crate::store::{JobRecord, PolicyRecord, TargetRecord};

use super::CurrentPolicy;

/// The API's view of a job: its targets in the job's order, a target
/// without a record `pending` (submit stores none), a `dispatched` one
/// shown `running` when `started(agent)` says its agent reported the start
/// (kept in memory only), and a reason without a result shown as a result
/// carrying that reason.
pub fn job(
    rec: JobRecord,
    mut by_agent: HashMap<String, TargetRecord>,
    started: impl Fn(&str) -> bool,
) -> pb::Job {
    // In the job's target order; a target without a record is pending
    // (`store_submission`).
    let mut stored: Vec<(String, TargetRecord)> = rec
        .targets
        .iter()
        .map(|a| {
            let t = by_agent
                .remove(a)
                .unwrap_or_else(|| TargetRecord::new(TargetState::Pending, ""));
            (a.clone(), t)
        })
        .collect();
    if rec.state == JobState::Running {
        for (agent, t) in stored.iter_mut() {
            if t.state == TargetState::Dispatched && started(agent) {
                t.state = TargetState::Running;
            }
        }
    }
    let targets = stored
        .into_iter()
        .map(|(agent, t)| {
            let mut result = t
                .result
                .as_deref()
                .and_then(|b| pb::JobResult::decode(b).ok());
            if result.is_none() && !t.reason.is_empty() {
                result = Some(pb::JobResult {
                    job_id: rec.id.clone(),
                    reason: t.reason.clone(),
                    ..Default::default()
                });
            }
            pb::Target::new(agent, t.state, result)
        })
        .collect();
    let mut job = pb::Job {
        job_id: rec.id,
        command: rec.command,
        args: rec.args.into_iter().collect(),
        selector: rec.selector,
        requester: rec.requester,
        channel: rec.channel,
        created_at_ms: rec.created_at_ms,
        targets,
        reason: rec.stopped.map(|(_, why)| why).unwrap_or_default(),
        ..Default::default()
    };
    job.set_state(rec.state);
    job
}

/// The audit event for one host's result: what happened, never the output.
pub fn result_event(agent: &str, r: &pb::JobResult, state: TargetState) -> Event {
    let kind = if state == TargetState::Refused {
        EventKind::JobRefusedByAgent
    } else {
        EventKind::JobFinished
    };
    let mut e = Event::new(kind, format!("agent:{agent}"))
        .job(&r.job_id)
        .host(agent)
        .field("outcome", state.as_str())
        .field("duration_ms", r.duration_ms)
        .field("stdout_bytes", r.stdout.len() as u64 + r.stdout_dropped)
        .field("stderr_bytes", r.stderr.len() as u64 + r.stderr_dropped)
        .detail(&r.reason);
    if let Some(c) = r.exit_code {
        e = e.field("exit_code", c);
    }
    if let Some(s) = r.signal {
        e = e.field("signal", s);
    }
    if !r.reason_code.is_empty() {
        e = e.field("reason_code", &r.reason_code);
    }
    e
}

pub fn policy_message(cur: &CurrentPolicy) -> pb::ControllerMessage {
    pb::ControllerMessage {
        msg: Some(pb::controller_message::Msg::Policy(signed_policy(
            &cur.record,
        ))),
    }
}

pub fn signed_policy(rec: &PolicyRecord) -> pb::SignedPolicy {
    pb::SignedPolicy {
        bundle: rec.bundle.clone(),
        signatures: rec
            .signatures
            .iter()
            .map(|(key_id, signature)| pb::PolicySignature {
                key_id: key_id.clone(),
                signature: signature.clone(),
            })
            .collect(),
    }
}

#[cfg(test)]
mod tests {
    use fleetcmd_core::state::Stop;

    use super::*;

    fn record(state: JobState, targets: &[&str]) -> JobRecord {
        JobRecord::for_test("0190ab12-34cd-7ef0-8123-456789abcdef", 1, state, targets)
    }

    fn states(job: &pb::Job) -> Vec<(String, TargetState)> {
        job.targets
            .iter()
            .map(|t| (t.agent_id.clone(), t.current_state().expect("a state")))
            .collect()
    }

    #[test]
    fn a_job_shows_its_targets_in_order_with_pending_and_running_filled_in() {
        let result = pb::JobResult {
            exit_code: Some(0),
            stdout: b"up".to_vec(),
            ..Default::default()
        };
        let stored = HashMap::from([
            (
                "c".to_string(),
                TargetRecord {
                    result: Some(result.encode_to_vec()),
                    ..TargetRecord::new(TargetState::Ok, "")
                },
            ),
            (
                "b".to_string(),
                TargetRecord::new(TargetState::Dispatched, ""),
            ),
            (
                "d".to_string(),
                TargetRecord::new(TargetState::Dispatched, ""),
            ),
            (
                "e".to_string(),
                TargetRecord::new(TargetState::Offline, "agent offline when its turn came"),
            ),
        ]);
        let job = job(
            record(JobState::Running, &["a", "b", "c", "d", "e"]),
            stored.clone(),
            |agent| agent == "b",
        );
        use TargetState::*;
        assert_eq!(
            states(&job),
            [
                ("a".into(), Pending),
                ("b".into(), Running),
                ("c".into(), Ok),
                ("d".into(), Dispatched),
                ("e".into(), Offline),
            ]
        );
        assert_eq!(
            (job.job_state(), job.state.as_str()),
            (pb::JobState::Running, "running")
        );
        assert_eq!(job.targets[2].result.as_ref(), Some(&result));
        let offline = job.targets[4]
            .result
            .as_ref()
            .expect("the reason as a result");
        assert_eq!(offline.reason, "agent offline when its turn came");
        assert!(job.targets[0].result.is_none());

        // An ended job shows what was stored: no target is `running`, and
        // why it stopped.
        let mut ended = record(JobState::Canceled, &["b"]);
        ended.stopped = Some((Stop::Canceled, "canceled by cli:alice".into()));
        let job = super::job(ended, stored, |_| true);
        assert_eq!(states(&job), [("b".into(), Dispatched)]);
        assert_eq!(job.current_state(), Some(JobState::Canceled));
        assert_eq!(job.reason, "canceled by cli:alice");
    }
}
