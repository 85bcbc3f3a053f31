//! What a controller does with the bus's signals (`crate::bus`): another
//! controller sharing the store changed something, and this one reads it
//! again — a job to dispatch to the agents connected here or to show to
//! the watchers here, an agent enrolled or revoked, a policy, a
//! certificate revocation. The store is the truth; a signal only says
//! where to look, so following one twice changes nothing.
//!
//! Also the catch-up for lost signals: [`Shared::catch_up`] reads every
//! running job again (on every [`crate::bus::SCAN_EVERY`], and on
//! `Resync`, with agents, policy and revocations).

use std::sync::Arc;

use fleetcmd_core::state::{JobState, Stop, TargetState};
use fleetcmd_proto::v1 as pb;
use prost::Message as _;
use tokio::sync::mpsc;

use super::{Shared, lock, policy_message};
use crate::bus::Signal;
use crate::error::ApiResult;

/// Running jobs the catch-up reads at most per pass.
const CATCH_UP_SCAN: usize = 2_000;

impl Shared {
    /// Follows the bus until its inbox closes (the bus stopped), and scans
    /// the store every `SCAN_EVERY` for what a lost signal announced.
    pub async fn follow(self: Arc<Self>, mut inbox: mpsc::Receiver<Signal>) {
        let mut scan = tokio::time::interval(crate::bus::SCAN_EVERY);
        scan.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let result = tokio::select! {
                signal = inbox.recv() => match signal {
                    Some(s) => self.apply(s).await,
                    None => return,
                },
                _ = scan.tick() => self.catch_up().await,
            };
            if let Err(e) = result {
                tracing::warn!(error = %e, "following another controller's change");
            }
        }
    }

    /// Acts on one signal.
    pub async fn apply(self: &Arc<Self>, signal: Signal) -> ApiResult<()> {
        match signal {
            Signal::Job(id) => self.job_changed(&id, None).await,
            Signal::Target { job, agent } => self.job_changed(&job, Some(&agent)).await,
            Signal::Agent(id) => {
                let this = self.clone();
                let agent = id.clone();
                let revoked_here = tokio::task::spawn_blocking(move || this.agent_changed(&agent))
                    .await
                    .map_err(|e| crate::error::ApiError::Internal(format!("agent task: {e}")))??;
                // Revoked on another controller while connected here: this
                // one closed its stream and knows what it had started.
                if revoked_here {
                    self.refuse_queued_on_revoked(&id, true).await?;
                }
                Ok(())
            }
            Signal::Policy => {
                let this = self.clone();
                tokio::task::spawn_blocking(move || this.policy_changed())
                    .await
                    .map_err(|e| crate::error::ApiError::Internal(format!("policy task: {e}")))?
            }
            Signal::CertRevoked => {
                let this = self.clone();
                tokio::task::spawn_blocking(move || this.certs.reload(this.store.as_ref()))
                    .await
                    .map_err(|e| {
                        crate::error::ApiError::Internal(format!("revocations task: {e}"))
                    })?
            }
            Signal::Alert(ev) => {
                self.health.announce(*ev);
                Ok(())
            }
            Signal::Output(chunk) => {
                let job = chunk.job_id.clone();
                self.watch.publish(&job, pb::job_event::Event::Chunk(chunk));
                Ok(())
            }
            Signal::Resync => {
                let this = self.clone();
                tokio::task::spawn_blocking(move || -> ApiResult<()> {
                    for rec in this.store.list_agents()? {
                        this.registry.adopt(rec);
                    }
                    this.policy_changed()?;
                    this.certs.reload(this.store.as_ref())
                })
                .await
                .map_err(|e| crate::error::ApiError::Internal(format!("resync task: {e}")))??;
                self.catch_up().await
            }
        }
    }

    /// Reads a job again (its cached run too), dispatches what is for the
    /// agents here, and tells the watchers here what changed.
    async fn job_changed(self: &Arc<Self>, id: &str, target: Option<&str>) -> ApiResult<()> {
        let this = self.clone();
        let (id, target) = (id.to_owned(), target.map(str::to_owned));
        tokio::task::spawn_blocking(move || -> ApiResult<()> {
            let changed = match &target {
                // A job created, canceled or finished: read all of it.
                None => {
                    let mut runs = lock(&this.job_lock);
                    let canceled: Vec<String> = match this.reload_run(&mut runs, &id)? {
                        Some(run) if matches!(run.job.stopped, Some((Stop::Canceled, _))) => run
                            .job
                            .targets
                            .iter()
                            .zip(&run.states)
                            .filter(|(_, s)| s.0.is_active())
                            .map(|(a, _)| a.clone())
                            .collect(),
                        _ => Vec::new(),
                    };
                    drop(runs);
                    // Canceled through another controller: the running
                    // targets of agents connected here are told to stop
                    // (found by an outside test: they ran to their end).
                    let msg = pb::ControllerMessage {
                        msg: Some(pb::controller_message::Msg::Cancel(pb::CancelJob {
                            job_id: id.clone(),
                        })),
                    };
                    for agent in &canceled {
                        this.registry.send(agent, msg.clone());
                    }
                    None
                }
                // One result: read that target alone (a signal per result
                // of a 10 000-target job must not read the job's 10 000
                // targets each time).
                Some(agent) => {
                    let rec = this.store.get_target(&id, agent)?;
                    let mut runs = lock(&this.job_lock);
                    if let Some(rec) = &rec
                        && let Some(run) = this.run_of(&mut runs, &id)?
                        && let Some(&i) = run.index.get(agent.as_str())
                    {
                        let (cached, _) = run.states[i];
                        // The store is the truth, but `running` is known
                        // only here and is stored as `dispatched`.
                        let only_here =
                            cached == TargetState::Running && rec.state == TargetState::Dispatched;
                        if cached != rec.state && !cached.is_terminal() && !only_here {
                            run.set(i, rec.state, rec.dispatched_at);
                        }
                    }
                    rec.map(|rec| (agent.clone(), rec))
                }
            };
            if let Some((agent, rec)) = changed
                && this.watch.is_watched(&id)
            {
                this.watch.publish(
                    &id,
                    pb::job_event::Event::Target(pb::Target::new(
                        agent,
                        rec.state,
                        rec.result
                            .as_deref()
                            .and_then(|b| pb::JobResult::decode(b).ok()),
                    )),
                );
            }
            this.advance(&id)?;
            // Finished on another controller: the watchers here get the
            // whole job, as the finishing controller's did.
            if this.watch.is_watched(&id)
                && let Some(job) = this.store.get_job(&id)?
                && job.state != JobState::Running
            {
                let job = this.get_job(&id)?;
                this.watch.publish(&id, pb::job_event::Event::Job(job));
                this.watch.forget(&id);
            }
            Ok(())
        })
        .await
        .map_err(|e| crate::error::ApiError::Internal(format!("job task: {e}")))?
    }

    /// Takes an agent's record as stored (enrolled, enrolled again or
    /// revoked elsewhere).
    /// Whether the agent was revoked while connected here (its stream is
    /// closed now).
    fn agent_changed(&self, id: &str) -> ApiResult<bool> {
        let Some(rec) = self.store.get_agent(id)? else {
            return Ok(false);
        };
        let newly_revoked = rec.revoked && self.registry.online_now([id]).first() == Some(&true);
        self.registry.adopt(rec);
        Ok(newly_revoked)
    }

    /// Takes the stored policy when it is newer than the one here:
    /// verified again (the database is not trusted with policy), then
    /// forwarded to the agents connected here.
    fn policy_changed(&self) -> ApiResult<()> {
        let Some(rec) = self.store.get_policy()? else {
            return Ok(());
        };
        let current = self.policy.current().map_or(0, |p| p.policy.version);
        if rec.version <= current {
            return Ok(());
        }
        let cur = Arc::new(self.policy.verify(rec)?);
        if cur.policy.version <= current {
            return Ok(());
        }
        tracing::info!(version = cur.policy.version, hash = %cur.hash, "policy pushed on another controller");
        self.policy.set(cur.clone());
        self.registry.send_all(&policy_message(&cur));
        Ok(())
    }

    /// Reads every running job again and advances it: what signals lost
    /// on the way would have started.
    pub async fn catch_up(self: &Arc<Self>) -> ApiResult<()> {
        let this = self.clone();
        tokio::task::spawn_blocking(move || -> ApiResult<()> {
            let running = this.store.list_jobs(&crate::store::JobQuery {
                state: Some(JobState::Running),
                ..crate::store::JobQuery::newest(CATCH_UP_SCAN)
            })?;
            for job in running {
                {
                    let mut runs = lock(&this.job_lock);
                    this.reload_run(&mut runs, &job.id)?;
                }
                this.advance(&job.id)?;
            }
            Ok(())
        })
        .await
        .map_err(|e| crate::error::ApiError::Internal(format!("catch-up task: {e}")))?
    }
}
