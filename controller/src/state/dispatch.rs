//! The dispatch driver: a running job's targets from submit to their end.
//! `advance` starts what the rollout allows (in chunks, each flushed
//! before the next goes out), aborts, expires and finishes jobs; results,
//! starts and cancels change target states only as
//! `TargetState::can_become` allows; the sweeper fails silent targets and
//! resumes running jobs after a restart.
//!
//! Owns the run cache (`job_lock`: running jobs' target states, the lock
//! that serializes every read-modify-write of job and target records) and
//! the recently finished set. Reaches agents only through the registry and
//! watchers only through the watch hub.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use fleetcmd_core::audit::{Event, EventKind};
use fleetcmd_core::rollout::Phase;
use fleetcmd_core::state::{JobState, Stop, TargetState};
use fleetcmd_proto::v1 as pb;
use prost::Message;
use tokio::sync::mpsc;

use super::{Run, Shared, convert, lock, now_ms, now_secs, submission};
use crate::error::{ApiError, ApiResult};
use crate::store::{TargetRecord, TargetWrite};

/// Targets `advance` starts per hold of the job lock (and per
/// `job_dispatched` audit record); results of the job are recorded between
/// chunks.
const DISPATCH_CHUNK: usize = 256;
/// The first chunk of a dispatch; each next one doubles up to
/// `DISPATCH_CHUNK`.
const FIRST_DISPATCH_CHUNK: usize = 32;
/// Targets a result may start on its agent stream's task (a slot it freed
/// under `--batch`); more than that go to the dispatcher.
const INLINE_DISPATCH: usize = 16;
/// Finished job ids remembered so late results skip the store.
const RECENTLY_FINISHED: usize = 4096;
/// How many recent jobs the sweeper looks at for running ones.
const SWEEP_SCAN: usize = 2_000;

impl Shared {
    /// `advance` on the blocking pool: it writes to and flushes the store.
    pub(super) async fn advance_blocking(self: &Arc<Self>, job_id: &str) -> ApiResult<()> {
        let shared = self.clone();
        let job = job_id.to_owned();
        tokio::task::spawn_blocking(move || shared.advance(&job))
            .await
            .map_err(|e| ApiError::Internal(format!("advancing job {job_id}: {e}")))?
    }

    /// Starts whatever the job's rollout allows now, aborts it when its
    /// error budget is spent or a canary failed, expires what can no longer
    /// start, and finishes it when every target is done. Idempotent: called
    /// by the dispatcher after submit, after every result, and by the sweeper
    /// (which is what resumes running jobs after a controller restart).
    ///
    /// Blocking (store writes for every target it starts): call it through
    /// `advance_blocking`, as the dispatcher and `cancel` do. It takes the job lock for at
    /// most `DISPATCH_CHUNK` targets at a time, so results of the same job
    /// are recorded between chunks.
    pub fn advance(&self, job_id: &str) -> ApiResult<()> {
        // The first chunks are small (32, 64, 128, then 256) so the first
        // results, and the first output a chat channel shows, come back
        // while the rest of a large fan-out is still going out.
        let mut chunk = FIRST_DISPATCH_CHUNK;
        let mut later = HashSet::new();
        while self.advance_some(job_id, chunk, &mut later)? {
            // Each chunk's dispatch records are made durable before the
            // next chunk goes out. Otherwise the first results' flush
            // would have to write the whole fan-out's records first (a
            // 10 000-target job: first result 0.7-0.9 s instead of 0.2 s).
            self.store.flush()?;
            chunk = (chunk * 2).min(DISPATCH_CHUNK);
        }
        Ok(())
    }

    /// One step of `advance` that starts at most `limit` targets. Returns
    /// whether the rollout allows more to start right now (call again).
    ///
    /// `later`: targets left pending in this pass (their agent is
    /// connected to another controller, or this one is settling), not
    /// proposed again until the next pass — so the others go on starting.
    pub(super) fn advance_some(
        &self,
        job_id: &str,
        limit: usize,
        later: &mut HashSet<usize>,
    ) -> ApiResult<bool> {
        let mut runs = lock(&self.job_lock);
        let Some(run) = self.run_of(&mut runs, job_id)? else {
            return Ok(false);
        };
        // Nothing can start and the job is not ending: most results of a
        // large job land here, without the O(targets) rollout decision. (An
        // error budget spent with nothing pending changes no target; the
        // last result's call below records the abort.)
        if run.pending == 0 && run.unfinished > 0 {
            return Ok(false);
        }
        let now = now_secs();
        let mut job_changed = false;
        let mut more = false;
        let mut budget = limit;
        // Another controller sharing the store claimed a target this
        // cache showed pending: the cache is read again before deciding on.
        let mut stale = false;
        let shared_store = self.bus.is_shared();
        loop {
            if run.job.stopped.is_none()
                && now > run.job.expires_at + fleetcmd_core::job::CLOCK_SKEW_SECS
                && run.pending > 0
            {
                run.job.stopped = Some((
                    Stop::Expired,
                    "the job expired before every target could start".into(),
                ));
                job_changed = true;
            }
            let decision = if run.job.stopped.is_some() {
                fleetcmd_core::rollout::Decision::default()
            } else {
                let phases: Vec<Phase> = run.states.iter().map(|t| Phase::of_state(t.0)).collect();
                fleetcmd_core::rollout::next(&phases, &run.job.rollout, run.job.needs_approval)
            };
            if let Some(why) = decision.abort {
                run.job.stopped = Some((Stop::Aborted, why));
                job_changed = true;
            }
            if let Some((kind, why)) = run.job.stopped.clone() {
                // Nothing new starts; pending targets end here.
                let end = kind.pending_become();
                let ended: Vec<usize> = (0..run.states.len())
                    .filter(|&i| run.states[i].0 == TargetState::Pending)
                    .collect();
                if !ended.is_empty() {
                    let rec = TargetRecord::new(end, &why);
                    let writes: Vec<(&str, &TargetRecord)> = ended
                        .iter()
                        .map(|&i| (run.job.targets[i].as_str(), &rec))
                        .collect();
                    let written = self.write_pending(job_id, &writes)?;
                    for i in ended {
                        if written.contains(run.job.targets[i].as_str()) {
                            run.set(i, end, 0);
                        } else {
                            stale = true;
                        }
                    }
                }
                break;
            }
            let mut proposed = decision.start.into_iter().filter(|i| !later.contains(i));
            let Some(first) = proposed.next() else {
                break;
            };
            if budget == 0 {
                more = true;
                break;
            }
            let start: Vec<usize> = std::iter::once(first)
                .chain(proposed)
                .take(budget)
                .collect();
            budget -= start.len();
            let msg = pb::ControllerMessage {
                msg: Some(pb::controller_message::Msg::Job(pb::SignedJob {
                    spec: run.job.spec.clone(),
                    signature: run.job.signature.clone(),
                    key_id: run.job.key_id.clone(),
                })),
            };
            // Right after a (re)start the agents are still reconnecting:
            // leave their targets pending rather than call them offline.
            let settling = self.registry.settling();
            let mut sent_to = Vec::new();
            let mut offline = Vec::new();
            let dispatched = TargetRecord {
                dispatched_at: now,
                ..TargetRecord::new(TargetState::Dispatched, "")
            };
            let gone = TargetRecord::new(TargetState::Offline, "agent offline when its turn came");
            if shared_store {
                // Several controllers: a target is claimed in the store
                // (pending → dispatched, one atomic step with its
                // `job_dispatched` record) before it is sent, so exactly
                // one controller sends it, and a controller killed right
                // after the claim leaves its record too (the agent gets
                // the job again from the controller it reconnects to). A
                // target whose agent is not connected here stays pending
                // for the controller it is connected to, and is left for
                // later in this pass; one whose agent is connected to no
                // controller (`presence`) ends offline.
                let here = self
                    .registry
                    .online_now(start.iter().map(|&i| run.job.targets[i].as_str()));
                let (here, elsewhere): (Vec<_>, Vec<_>) =
                    start.iter().copied().zip(here).partition(|(_, here)| *here);
                let mut mine: Vec<usize> = here.into_iter().map(|(i, _)| i).collect();
                let elsewhere: Vec<usize> = elsewhere.into_iter().map(|(i, _)| i).collect();
                // Connected to no controller (`presence`): offline now, as
                // one controller ends its own absent agents' targets.
                let mut nowhere: Vec<usize> = if settling {
                    Vec::new()
                } else {
                    elsewhere
                        .iter()
                        .copied()
                        .filter(|&i| self.presence.nowhere(&run.job.targets[i]))
                        .collect()
                };
                later.extend(elsewhere.iter().filter(|i| !nowhere.contains(i)));
                stale |= self.write_audited(
                    job_id,
                    &run.job,
                    &mut nowhere,
                    TargetState::Pending,
                    &gone,
                    EventKind::JobFinished,
                )?;
                stale |= self.write_audited(
                    job_id,
                    &run.job,
                    &mut mine,
                    TargetState::Pending,
                    &dispatched,
                    EventKind::JobDispatched,
                )?;
                let sent = self
                    .registry
                    .send_if_online(mine.iter().map(|&i| run.job.targets[i].as_str()), &msg);
                for (i, sent) in mine.into_iter().zip(sent) {
                    if sent {
                        sent_to.push(i);
                    } else {
                        offline.push(i);
                    }
                }
                // Claimed but its queue was full or it just went away.
                self.write_audited(
                    job_id,
                    &run.job,
                    &mut offline,
                    TargetState::Dispatched,
                    &gone,
                    EventKind::JobFinished,
                )?;
                offline.extend(nowhere);
            } else {
                let sent = self
                    .registry
                    .send_if_online(start.iter().map(|&i| run.job.targets[i].as_str()), &msg);
                for (i, sent) in start.into_iter().zip(sent) {
                    if sent {
                        sent_to.push(i);
                    } else if settling {
                        later.insert(i);
                    } else {
                        offline.push(i);
                    }
                }
                let writes: Vec<(&str, &TargetRecord)> = sent_to
                    .iter()
                    .map(|&i| (run.job.targets[i].as_str(), &dispatched))
                    .chain(
                        offline
                            .iter()
                            .map(|&i| (run.job.targets[i].as_str(), &gone)),
                    )
                    .collect();
                self.store.put_targets(job_id, &writes)?;
                // One audit record per chunk and outcome, listing its hosts
                // (the host index still finds each of them).
                for (hosts, rec, kind) in [
                    (&sent_to, &dispatched, EventKind::JobDispatched),
                    (&offline, &gone, EventKind::JobFinished),
                ] {
                    if !hosts.is_empty() {
                        self.security_event(targets_event(job_id, &run.job, hosts, rec, kind));
                    }
                }
            }
            for (hosts, rec) in [(&sent_to, &dispatched), (&offline, &gone)] {
                for &i in hosts {
                    self.watch.publish(
                        job_id,
                        pb::job_event::Event::Target(pb::Target::new(
                            run.job.targets[i].clone(),
                            rec.state,
                            None,
                        )),
                    );
                    run.set(i, rec.state, rec.dispatched_at);
                }
            }
            if stale {
                break; // read again below
            }
            // What was left for later is tried by the next pass (the
            // sweeper's, the bus's, a result's).
            // An offline target frees its slot at once: decide again.
        }
        if stale {
            // Read again from the store (keeping what is only in memory)
            // and decide again.
            self.reload_run(&mut runs, job_id)?;
            return Ok(true);
        }
        let finished = run.unfinished == 0;
        if finished {
            run.job.state = JobState::of_ended(
                run.job.stopped.as_ref().map(|(kind, _)| *kind),
                run.states.iter().map(|t| t.0),
            );
            tracing::info!(job_id, state = %run.job.state, "job finished");
            self.metrics.job_finished(
                run.job.state.as_str(),
                Duration::from_millis(now_ms().saturating_sub(run.job.created_at_ms)),
                run.states.iter().map(|t| t.0.as_str()),
            );
            job_changed = true;
        }
        if job_changed {
            self.store.put_job(&run.job)?;
        }
        if finished {
            runs.remove(job_id);
            {
                let mut f = lock(&self.finished);
                if f.0.insert(job_id.to_owned()) {
                    f.1.push_back(job_id.to_owned());
                }
                while f.1.len() > RECENTLY_FINISHED {
                    if let Some(old) = f.1.pop_front() {
                        f.0.remove(&old);
                    }
                }
            }
            drop(runs);
            // The last event: the whole job (read back from the store: O(targets),
            // so only when somebody watches). Then forget its watchers (they
            // still read what is buffered).
            if self.watch.is_watched(job_id)
                && let Ok(job) = self.get_job(job_id)
            {
                self.watch.publish(job_id, pb::job_event::Event::Job(job));
            }
            self.watch.forget(job_id);
            // Watchers on other controllers get the whole job too.
            self.bus.publish(crate::bus::Signal::Job(job_id.to_owned()));
        }
        Ok(more)
    }

    /// With several controllers: writes `rec` for the targets `hosts`
    /// (indexes into the job's targets) whose stored state is still `from`,
    /// and the audit record of them, in one step
    /// (`Store::put_targets_audited`). Targets another controller changed
    /// first drop out of `hosts` and the rest is tried again; returns
    /// whether any dropped out (the run cache is stale).
    fn write_audited(
        &self,
        job_id: &str,
        job: &crate::store::JobRecord,
        hosts: &mut Vec<usize>,
        from: TargetState,
        rec: &TargetRecord,
        kind: EventKind,
    ) -> ApiResult<bool> {
        let mut dropped = false;
        while !hosts.is_empty() {
            let writes: Vec<TargetWrite<'_>> = hosts
                .iter()
                .map(|&i| TargetWrite {
                    job: job_id,
                    agent: &job.targets[i],
                    rec,
                })
                .collect();
            let written = self.audit.record_targets(
                &[targets_event(job_id, job, hosts, rec, kind)],
                from,
                &writes,
            )?;
            let Err(lost) = written else {
                break;
            };
            dropped = true;
            if lost.is_empty() {
                hosts.clear(); // cannot happen: nothing written, nothing named
            } else {
                let lost: std::collections::HashSet<usize> =
                    lost.into_iter().map(|k| hosts[k]).collect();
                hosts.retain(|i| !lost.contains(i));
            }
        }
        Ok(dropped)
    }

    /// Writes records of pending targets: with several controllers only
    /// those still pending in the store (`put_targets_if`), else all.
    /// Returns the agents written.
    fn write_pending(
        &self,
        job_id: &str,
        writes: &[(&str, &TargetRecord)],
    ) -> ApiResult<std::collections::HashSet<String>> {
        if writes.is_empty() {
            return Ok(Default::default());
        }
        if self.bus.is_shared() {
            Ok(self
                .store
                .put_targets_if(job_id, TargetState::Pending, writes)?
                .into_iter()
                .collect())
        } else {
            self.store.put_targets(job_id, writes)?;
            Ok(writes.iter().map(|(a, _)| (*a).to_owned()).collect())
        }
    }

    /// Reads a cached running job again from the store (another controller
    /// changed it), keeping `running` (known only here) for targets the
    /// store still shows dispatched. `None` when it is no longer running.
    pub(super) fn reload_run<'a>(
        &self,
        runs: &'a mut HashMap<String, Run>,
        job_id: &str,
    ) -> ApiResult<Option<&'a mut Run>> {
        let old = runs.remove(job_id);
        let Some(run) = self.run_of(runs, job_id)? else {
            return Ok(None);
        };
        if let Some(old) = old {
            for (agent, &i) in &old.index {
                if old.states[i].0 == TargetState::Running
                    && let Some(&j) = run.index.get(agent)
                    && run.states[j].0 == TargetState::Dispatched
                {
                    let at = run.states[j].1;
                    run.set(j, TargetState::Running, at);
                }
            }
        }
        Ok(Some(run))
    }

    /// Sends `agent`, which just connected here, every running job it is
    /// an active target of in the store (dispatched or running). With
    /// several controllers the one that claimed the target may have died
    /// before the job reached the agent (found by the kill test: targets a
    /// controller claimed just before its `kill -9` failed at their
    /// deadline). And the copy is the agent's word that the target is
    /// still active: a job the agent held, waiting for a slot, when its
    /// stream was lost starts only once the controller it reconnected to
    /// sends it again — not if it was canceled or ended meanwhile
    /// (`agent::conn::settle_delivered`). The agent runs a job once: one it
    /// already has is ignored, or answered with its result again.
    pub(super) fn redeliver(&self, agent: &str) -> ApiResult<()> {
        let candidates: Vec<(String, pb::ControllerMessage)> = {
            let runs = lock(&self.job_lock);
            runs.iter()
                .filter(|(_, run)| run.index.contains_key(agent))
                .map(|(id, run)| {
                    // A canceled job's active target is told to stop
                    // instead: the agent may hold the job, waiting, from
                    // before it connected here.
                    let msg = if matches!(run.job.stopped, Some((Stop::Canceled, _))) {
                        pb::controller_message::Msg::Cancel(pb::CancelJob { job_id: id.clone() })
                    } else {
                        pb::controller_message::Msg::Job(pb::SignedJob {
                            spec: run.job.spec.clone(),
                            signature: run.job.signature.clone(),
                            key_id: run.job.key_id.clone(),
                        })
                    };
                    (id.clone(), pb::ControllerMessage { msg: Some(msg) })
                })
                .collect()
        };
        for (job, msg) in candidates {
            if self
                .store
                .get_target(&job, agent)?
                .is_some_and(|t| t.state.is_active())
            {
                tracing::info!(job_id = %job, agent_id = agent, "sending an active target's job (or its cancel) again to its agent, connected here now");
                self.registry.send_if_online([agent], &msg);
            }
        }
        Ok(())
    }

    /// Queues a job for the dispatcher (`dispatcher`), which advances it off
    /// the caller's task. When the queue is full the job still advances:
    /// the sweeper queues every running job each second.
    pub(super) fn kick(&self, job_id: &str) {
        if self.dispatch_tx.try_send(job_id.to_owned()).is_err() {
            tracing::debug!(job_id, "dispatch queue full; the sweeper retries");
        }
    }

    /// Advances the jobs queued by `kick`, each in `spawn_blocking` (its
    /// store writes must not hold up an async worker). Runs until the task
    /// is dropped (the server owns it and ends it on shutdown).
    pub async fn dispatcher(self: Arc<Self>, mut queue: mpsc::Receiver<String>) {
        while let Some(first) = queue.recv().await {
            let mut ids = vec![first];
            while let Ok(more) = queue.try_recv() {
                if !ids.contains(&more) {
                    ids.push(more);
                }
            }
            for id in ids {
                if let Err(e) = self.advance_blocking(&id).await {
                    tracing::error!(job_id = %id, error = %e, "advancing job");
                }
            }
        }
    }

    /// The receiving end of the dispatch queue, for `dispatcher` (once).
    pub fn take_dispatch_queue(&self) -> Option<mpsc::Receiver<String>> {
        lock(&self.dispatch_rx).take()
    }

    /// The cached rollout state of a running job, loaded on first use
    /// (after a restart); `None` once the job has ended.
    pub(super) fn run_of<'a>(
        &self,
        runs: &'a mut HashMap<String, Run>,
        job_id: &str,
    ) -> ApiResult<Option<&'a mut Run>> {
        if !runs.contains_key(job_id) {
            if lock(&self.finished).0.contains(job_id) {
                return Ok(None);
            }
            let Some(job) = self.store.get_job(job_id)? else {
                return Ok(None);
            };
            if job.state != JobState::Running {
                return Ok(None);
            }
            let mut states = Vec::with_capacity(job.targets.len());
            let mut index = HashMap::with_capacity(job.targets.len());
            // One read of every record (a round trip per target would be
            // 10 000 of them on a network database).
            let stored: HashMap<String, (TargetState, u64)> = self
                .store
                .targets(job_id)?
                .into_iter()
                .map(|(a, t)| (a, (t.state, t.dispatched_at)))
                .collect();
            for (i, agent) in job.targets.iter().enumerate() {
                // No record: not dispatched yet (`store_submission`).
                let (state, at) = stored
                    .get(agent)
                    .copied()
                    .unwrap_or((TargetState::Pending, 0));
                states.push((state, at));
                index.insert(agent.clone(), i);
            }
            runs.insert(job_id.to_owned(), Run::new(job, states, index));
        }
        Ok(runs.get_mut(job_id))
    }

    /// Cancels a job: pending targets end `canceled`, running ones are told
    /// to stop (their agents kill the process group and report `canceled`).
    pub async fn cancel(self: &Arc<Self>, id: &str, by: &str) -> ApiResult<pb::Job> {
        let id = self.resolve_job_id(id)?;
        let running: Vec<String> = {
            let mut runs = lock(&self.job_lock);
            let Some(run) = self.run_of(&mut runs, &id)? else {
                let state = self
                    .store
                    .get_job(&id)?
                    .map_or("deleted", |j| j.state.as_str());
                return Err(ApiError::FailedPrecondition(format!(
                    "job {id} already ended: {state}"
                )));
            };
            if run.job.stopped.is_none() {
                run.job.stopped = Some((Stop::Canceled, format!("canceled by {by}")));
                self.store.put_job(&run.job)?;
            }
            run.job
                .targets
                .iter()
                .zip(&run.states)
                .filter(|(_, s)| s.0.is_active())
                .map(|(a, _)| a.clone())
                .collect()
        };
        self.audit_durable(
            Event::new(EventKind::JobCanceled, by)
                .job(&id)
                .hosts(running.iter().cloned()),
        )?;
        self.flush().await?;
        self.bus.publish(crate::bus::Signal::Job(id.clone()));
        tracing::info!(job_id = %id, by, "job canceled");
        let msg = pb::ControllerMessage {
            msg: Some(pb::controller_message::Msg::Cancel(pb::CancelJob {
                job_id: id.clone(),
            })),
        };
        for agent in &running {
            self.registry.send(agent, msg.clone());
        }
        // Queued targets become `canceled` here.
        self.advance_blocking(&id).await?;
        self.get_job(&id)
    }

    /// Writes a target's state if its current one may become it
    /// (`TargetState::can_become`: an ended target never changes, so at
    /// most one result per job and agent). Returns whether it was written.
    /// `audit`: the record of this change, written with it (with several
    /// controllers in one transaction: a controller killed in between
    /// leaves neither, and the agent's copy of the result is then stored
    /// by the controller it moves to).
    pub(super) fn update_target(
        &self,
        job: &str,
        agent: &str,
        mut rec: TargetRecord,
        audit: Option<Event>,
    ) -> ApiResult<bool> {
        let shared = self.bus.is_shared();
        if shared && let Some(event) = audit {
            let written =
                self.store_results(vec![(job.to_owned(), agent.to_owned(), rec, event)])?;
            return Ok(written.first().copied().unwrap_or(false));
        }
        let mut runs = lock(&self.job_lock);
        // With several controllers the cache may be behind the store: one
        // more try after reading it again.
        let mut tries = if shared { 2 } else { 1 };
        loop {
            tries -= 1;
            let (state, dispatched_at) = match self.target_state(&mut runs, job, agent)? {
                Some((state, at)) if state.can_become(rec.state) => (state, at),
                _ if tries > 0 => {
                    self.reload_run(&mut runs, job)?;
                    continue;
                }
                _ => return Ok(false),
            };
            rec.dispatched_at = dispatched_at;
            if !shared {
                self.store.put_target(job, agent, &rec)?;
                break;
            }
            // Written only over the state this was decided from (`running`
            // is stored as `dispatched`): a result another controller
            // stored first is never overwritten.
            let from = if state == TargetState::Running {
                TargetState::Dispatched
            } else {
                state
            };
            if !self
                .store
                .put_targets_if(job, from, &[(agent, &rec)])?
                .is_empty()
            {
                break;
            }
            self.reload_run(&mut runs, job)?;
            if tries == 0 {
                return Ok(false);
            }
        }
        if let Some(run) = runs.get_mut(job)
            && let Some(&i) = run.index.get(agent)
        {
            run.set(i, rec.state, rec.dispatched_at);
        }
        drop(runs);
        // One controller: the audit record after the job lock is let go.
        // Its append and index entries cost more than the rest of storing
        // a result, and under the lock every other result of the job and
        // its dispatch waited for them. Nothing is acknowledged before the
        // caller's flush, which makes both durable.
        if !shared && let Some(event) = audit {
            self.audit_durable(event)?;
        }
        // With several controllers the watchers (here too) hear it
        // from the bus: the caller publishes `Signal::Target`.
        if !shared && self.watch.is_watched(job) {
            self.watch.publish(
                job,
                pb::job_event::Event::Target(pb::Target::new(
                    agent.to_owned(),
                    rec.state,
                    rec.result
                        .as_deref()
                        .and_then(|b| pb::JobResult::decode(b).ok()),
                )),
            );
        }
        Ok(true)
    }

    /// A target's state and when it was dispatched. A running job's target
    /// states are cached (and kept equal to the store's, but for
    /// `running`): no store read and decode per result. A running job that
    /// is not cached yet (a result right after a restart) is loaded first:
    /// its pending targets have no record. `None`: no such target, or its
    /// job ended and the store has no record of it.
    pub(super) fn target_state(
        &self,
        runs: &mut HashMap<String, Run>,
        job: &str,
        agent: &str,
    ) -> ApiResult<Option<(TargetState, u64)>> {
        let cached = self
            .run_of(runs, job)?
            .and_then(|run| run.index.get(agent).map(|&i| run.states[i]));
        Ok(match cached {
            Some(c) => Some(c),
            None => self
                .store
                .get_target(job, agent)?
                .map(|t| (t.state, t.dispatched_at)),
        })
    }

    /// Notes that an agent started a dispatched target. In memory only (the
    /// run cache, shown by `Jobs.Get` and `Watch`): `running` and
    /// `dispatched` are the same to everything the controller decides (both
    /// active, same deadline) and nothing is acknowledged on it, so it is
    /// not worth a store write per target. After a restart such a target
    /// shows `dispatched` until its result arrives.
    pub fn record_started(&self, agent: &str, job: &str) -> ApiResult<()> {
        {
            let mut runs = lock(&self.job_lock);
            let Some(run) = runs.get_mut(job) else {
                return Ok(());
            };
            let Some(&i) = run.index.get(agent) else {
                return Ok(());
            };
            if run.states[i].0 != TargetState::Dispatched {
                return Ok(()); // its result came first, or it ended
            }
            let at = run.states[i].1;
            run.set(i, TargetState::Running, at);
        }
        self.watch.publish(
            job,
            pb::job_event::Event::Target(pb::Target::new(
                agent.to_owned(),
                TargetState::Running,
                None,
            )),
        );
        Ok(())
    }

    /// The answer to an agent's `StartCheck` (a job it held, waiting for a
    /// slot, is about to start): go while its target is active and the job
    /// not canceled; for a canceled one, the cancel first, then no. The
    /// store is read again (the target may have been changed through
    /// another controller). Blocking.
    pub fn start_answer(&self, agent: &str, job_id: String) -> Vec<pb::ControllerMessage> {
        let no = |job_id: String, why: &str| pb::ControllerMessage {
            msg: Some(pb::controller_message::Msg::StartAnswer(pb::StartAnswer {
                job_id,
                go: false,
                reason: why.to_owned(),
            })),
        };
        if self.registry.record(agent).is_none_or(|r| r.revoked) {
            return vec![no(job_id, "the agent is revoked")];
        }
        let stored = self
            .store
            .get_job(&job_id)
            .and_then(|j| Ok((j, self.store.get_target(&job_id, agent)?)));
        match stored {
            Ok((Some(job), _)) if matches!(job.stopped, Some((Stop::Canceled, _))) => vec![
                pb::ControllerMessage {
                    msg: Some(pb::controller_message::Msg::Cancel(pb::CancelJob {
                        job_id: job_id.clone(),
                    })),
                },
                no(job_id, "the job was canceled"),
            ],
            Ok((Some(_), Some(t))) if t.state.is_active() => vec![pb::ControllerMessage {
                msg: Some(pb::controller_message::Msg::StartAnswer(pb::StartAnswer {
                    job_id,
                    go: true,
                    reason: String::new(),
                })),
            }],
            Ok((Some(_), Some(t))) => vec![no(
                job_id,
                &format!("its target is {} here", t.state.as_str()),
            )],
            Ok(_) => vec![no(job_id, "no such job or target here")],
            // Not known now: no answer; the agent asks the next controller.
            Err(e) => {
                tracing::warn!(agent_id = agent, %job_id, error = %e, "answering a start check");
                Vec::new()
            }
        }
    }

    /// Whether `agent` is a target of `job` that was dispatched and has not
    /// finished: the only agent whose output and result for it count.
    pub(super) fn is_active_target(&self, job: &str, agent: &str) -> ApiResult<bool> {
        let mut runs = lock(&self.job_lock);
        let state = match self.run_of(&mut runs, job)? {
            Some(run) => run.index.get(agent).map(|&i| run.states[i].0),
            None => None,
        };
        if state == Some(TargetState::Pending) && self.bus.is_shared() {
            // Pending here, maybe dispatched by another controller (an
            // agent that moved here with its output or result).
            let state = self
                .reload_run(&mut runs, job)?
                .and_then(|run| run.index.get(agent).map(|&i| run.states[i].0));
            return Ok(state.is_some_and(TargetState::is_active));
        }
        Ok(state.is_some_and(TargetState::is_active))
    }

    /// Stores a result durably; the caller acknowledges it only after this
    /// returns. A result from an agent the job was never dispatched to (not
    /// a target, or a target still pending) is logged and dropped: an agent
    /// cannot write another host's result, nor one for a job it never got.
    pub async fn record_result(&self, agent: &str, result: pb::JobResult) -> ApiResult<()> {
        let job = result.job_id.clone();
        let state = outcome_state(result.outcome);
        if !self.is_active_target(&job, agent)? {
            let known = self
                .store
                .get_target(&job, agent)?
                .is_some_and(|t| t.state != TargetState::Pending);
            if known {
                tracing::debug!(job_id = %job, agent_id = agent, "result for a finished target ignored");
            } else {
                tracing::warn!(
                    job_id = ?job.chars().take(36).collect::<String>(),
                    agent_id = agent,
                    "result for a job never dispatched to this agent ignored"
                );
            }
            return Ok(());
        }
        // The agent refusing a job it has already seen is not this
        // target's result: it got the job twice (sent again to an agent
        // that connected while it was being sent — `redeliver`), and the
        // result of the copy it runs follows; if that never comes, the
        // deadline ends the target. Stored, it ended an `ok` target as
        // `refused` (found by the PostgreSQL-restart test in a fresh CI
        // clone).
        // Only where jobs are sent again (a shared store); on one
        // controller a replay refusal is evidence and is kept.
        if self.bus.is_shared() && state == TargetState::Refused && result.reason_code == "replayed"
        {
            tracing::info!(job_id = %job, agent_id = agent, "the agent already has this job; its result follows");
            return Ok(());
        }
        let rec = TargetRecord {
            result: Some(result.encode_to_vec()),
            ..TargetRecord::new(state, &result.reason)
        };
        let event = convert::result_event(agent, &result, state);
        if !self.store_result(&job, agent, rec, event).await? {
            tracing::debug!(job_id = %job, agent_id = agent, "result for an unknown or finished target ignored");
            return Ok(());
        }
        self.flush().await?;
        self.bus.publish(crate::bus::Signal::Target {
            job: job.clone(),
            agent: agent.to_owned(),
        });
        if self.advance_some(&job, INLINE_DISPATCH, &mut HashSet::new())? {
            self.kick(&job);
        }
        Ok(())
    }

    /// Fails targets that never reported in time, expires jobs that can no
    /// longer start, and advances every running job (after a restart this
    /// is what resumes them).
    pub async fn sweep(&self) -> ApiResult<()> {
        use std::sync::atomic::Ordering::AcqRel;
        if !self.runs_loaded.swap(true, AcqRel) {
            // First sweep after start: pick up the jobs a previous run left.
            let running: Vec<String> = self
                .store
                .list_jobs(&crate::store::JobQuery {
                    state: Some(JobState::Running),
                    ..crate::store::JobQuery::newest(SWEEP_SCAN)
                })?
                .into_iter()
                .map(|j| j.id)
                .collect();
            let mut runs = lock(&self.job_lock);
            for id in running {
                self.run_of(&mut runs, &id)?;
            }
        }
        let now = now_secs();
        let (ids, overdue, revoked) = {
            let runs = lock(&self.job_lock);
            let mut overdue = Vec::new();
            let mut revoked = HashSet::new();
            for (id, run) in runs.iter() {
                let limit = run
                    .job
                    .target_deadline_secs
                    .max(submission::RESULT_GRACE_SECS);
                for (agent, (state, at)) in run.job.targets.iter().zip(&run.states) {
                    if state.is_active() {
                        let since = if *at > 0 {
                            *at
                        } else {
                            run.job.created_at_ms / 1000
                        };
                        if now > since + limit {
                            overdue.push((id.clone(), agent.clone()));
                        }
                        if self.registry.is_revoked(agent) {
                            revoked.insert(agent.clone());
                        }
                    }
                }
            }
            let ids: Vec<String> = runs.keys().cloned().collect();
            (ids, overdue, revoked)
        };
        // A revoked agent connected to no running controller: none is
        // left to record its active targets (the one that held its stream
        // records them when the revocation reaches it;
        // `refuse_queued_on_revoked`), and none will take its result, so
        // they end now rather than at their deadline (found by an outside
        // test: they showed `running` for up to an hour). Only fresh
        // entries count: a stopped or dead controller's list keeps no
        // revoked agent anywhere (`PresenceView::in_no_fresh_entry`).
        let settling = self.registry.settling();
        let shared = self.bus.is_shared();
        let stranded: Vec<String> = revoked
            .into_iter()
            .filter(|a| {
                !settling
                    && self.registry.online_now([a.as_str()]).first() != Some(&true)
                    && (!shared || self.presence.in_no_fresh_entry(a))
            })
            .collect();
        for agent in stranded {
            // One controller knows which targets started: its agents
            // report it and it stores it. With several, a target that
            // started on another controller is still `dispatched` here.
            self.refuse_queued_on_revoked(&agent, !shared).await?;
        }
        let mut changed = false;
        for (job, agent) in overdue {
            let rec = TargetRecord::new(
                TargetState::Failed,
                "no result from the agent before the target's deadline",
            );
            if self.update_target(&job, &agent, rec, None)? {
                changed = true;
                self.bus.publish(crate::bus::Signal::Target {
                    job: job.clone(),
                    agent: agent.clone(),
                });
                self.security_event(
                    Event::new(EventKind::JobFinished, "controller")
                        .job(&job)
                        .host(&agent)
                        .field("outcome", TargetState::Failed.as_str())
                        .detail("no result from the agent before the target's deadline"),
                );
            }
        }
        for id in ids {
            self.kick(&id);
        }
        if changed {
            self.flush().await?;
        }
        Ok(())
    }
}

/// The state a target ends in for an agent's reported outcome.
fn outcome_state(o: i32) -> TargetState {
    match pb::Outcome::try_from(o) {
        Ok(pb::Outcome::Ok) => TargetState::Ok,
        Ok(pb::Outcome::TimedOut) => TargetState::TimedOut,
        Ok(pb::Outcome::Refused) => TargetState::Refused,
        Ok(pb::Outcome::Canceled) => TargetState::Canceled,
        _ => TargetState::Failed,
    }
}

/// The audit record of a dispatch chunk's targets that became `rec`: one
/// per chunk and outcome, listing its hosts (the host index still finds
/// each of them).
fn targets_event(
    job_id: &str,
    job: &crate::store::JobRecord,
    hosts: &[usize],
    rec: &TargetRecord,
    kind: EventKind,
) -> Event {
    Event::new(kind, "controller")
        .job(job_id)
        .command(&job.command)
        .hosts(hosts.iter().map(|&i| job.targets[i].clone()))
        .field("state", rec.state.as_str())
        .field("target_count", hosts.len())
        .detail(&rec.reason)
}
