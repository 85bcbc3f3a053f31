//! Agents' results with several controllers on one database: stored in
//! batches, each batch with its audit records in one transaction
//! (`Store::put_targets_audited`).
//!
//! Every result is one write of its target and one audit record, and the
//! audit records of all controllers form one chain (appends take turns
//! under a database lock). One transaction per result made ingest a
//! sequence of round trips under that lock (158 results/s at 10 000
//! agents, BENCHMARKS.md); the results that arrive while a batch is
//! stored are the next batch, so the round trips are paid once per batch.
//! Agent streams queue their result (`Ingest`) and wait for its answer
//! before acknowledging it, as they waited for their own transaction
//! before. One controller on sled writes each result itself
//! (`update_target`): its writes are in memory and one flush makes many
//! durable (`Shared::flush`); a store whose every write is a transaction
//! (redb: `Store::batches_results`) gets batches with one controller too.

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use fleetcmd_core::audit::{Event, EventKind};
use fleetcmd_core::state::TargetState;
use tokio::sync::{mpsc, oneshot};

use super::{Shared, lock};
use crate::error::{ApiError, ApiResult};
use crate::store::{TargetRecord, TargetWrite};

/// Results stored per transaction at most.
const BATCH: usize = 512;
/// Results queued for the ingester at most; an agent stream with a result
/// waits for room (and so does not read its next message).
pub(super) const QUEUE: usize = 4096;
/// Tries of a batch whose targets another controller changed meanwhile
/// (each drops those targets and tries the rest again).
const TRIES: usize = 3;

/// A result to store: job, agent, the target's record, its audit record.
type Item = (String, String, TargetRecord, Event);

/// What is stored instead of a revoked agent's result: its target failed.
/// The agent ran the job (it sent a result), but nothing a revoked agent
/// says is taken as true, nor audited as its word.
pub(super) fn revoked_result(job: &str, agent: &str) -> (TargetRecord, Event) {
    const WHY: &str =
        "agent revoked before its result was stored; a revoked agent's result is not accepted";
    (
        TargetRecord::new(TargetState::Failed, WHY),
        Event::new(EventKind::JobFinished, "controller")
            .job(job)
            .host(agent)
            .field("outcome", TargetState::Failed.as_str())
            .detail(WHY),
    )
}

/// One agent's result for its target, waiting to be stored.
pub struct Ingest {
    job: String,
    agent: String,
    rec: TargetRecord,
    event: Event,
    /// Whether it was stored (`false`: the target had ended: ignored).
    reply: oneshot::Sender<Result<bool, String>>,
}

impl Shared {
    /// Stores `rec` (an agent's result) and its audit `event` with the
    /// other results queued meanwhile, when the ingester runs (`ingester`;
    /// several controllers, or a store that batches results), else on its
    /// own (`update_target`). Returns whether it was stored.
    pub(super) async fn store_result(
        &self,
        job: &str,
        agent: &str,
        rec: TargetRecord,
        event: Event,
    ) -> ApiResult<bool> {
        let (rec, event) = if self.registry.is_revoked(agent) {
            revoked_result(job, agent)
        } else {
            (rec, event)
        };
        let batched = self.bus.is_shared() || self.store.batches_results();
        if !batched || !self.ingesting.load(Ordering::Acquire) {
            return self.update_target(job, agent, rec, Some(event));
        }
        let (reply, answer) = oneshot::channel();
        let item = Ingest {
            job: job.to_owned(),
            agent: agent.to_owned(),
            rec,
            event,
            reply,
        };
        let gone = || ApiError::Internal("the result ingester stopped".into());
        self.results_tx.send(item).await.map_err(|_| gone())?;
        answer
            .await
            .map_err(|_| gone())?
            .map_err(|e| ApiError::Internal(format!("storing the result: {e}")))
    }

    /// The ingester's queue, for the server to run `ingester` on; `None`
    /// once taken. Until it is, results are stored one by one.
    pub fn take_result_queue(&self) -> Option<mpsc::Receiver<Ingest>> {
        let rx = lock(&self.results_rx).take()?;
        self.ingesting.store(true, Ordering::Release);
        Some(rx)
    }

    /// Stores the queued results in batches (`store_results` on the
    /// blocking pool: its store calls wait for the database), answering
    /// each. Runs until the task is dropped (the server owns it).
    pub async fn ingester(self: Arc<Self>, mut queue: mpsc::Receiver<Ingest>) {
        let mut batch = Vec::with_capacity(BATCH);
        while queue.recv_many(&mut batch, BATCH).await > 0 {
            let (items, replies): (Vec<_>, Vec<_>) = batch
                .drain(..)
                .map(|i| ((i.job, i.agent, i.rec, i.event), i.reply))
                .unzip();
            let shared = self.clone();
            let stored = tokio::task::spawn_blocking(move || {
                let items = shared.screen_revoked(items)?;
                shared.store_results(items)
            })
            .await
            .unwrap_or_else(|e| Err(ApiError::Internal(format!("result batch: {e}"))));
            self.metrics.result_batch(replies.len());
            match stored {
                Ok(written) => {
                    for (reply, w) in replies.into_iter().zip(written) {
                        let _ = reply.send(Ok(w));
                    }
                }
                Err(e) => {
                    tracing::error!(error = %e, results = replies.len(), "storing a batch of results");
                    let e = e.to_string();
                    for reply in replies {
                        let _ = reply.send(Err(e.clone()));
                    }
                }
            }
        }
    }

    /// The batch with every result of an agent the store says is revoked
    /// replaced by its target's failure (`revoked_result`): one read for
    /// the batch. This controller's own view of revocations can be behind
    /// the store — it learns of one on the bus, and a controller that was
    /// stopped reads the results waiting in its sockets before the bus
    /// (found by an outside test: a controller resumed after a revocation
    /// stored a revoked agent's results as `ok`, audited as the agent's).
    /// Blocking.
    fn screen_revoked(&self, mut items: Vec<Item>) -> ApiResult<Vec<Item>> {
        let mut agents: Vec<&str> = items.iter().map(|i| i.1.as_str()).collect();
        agents.sort_unstable();
        agents.dedup();
        let revoked: HashSet<String> = self
            .store
            .get_agents(&agents)?
            .into_iter()
            .filter(|a| a.revoked)
            .map(|a| a.id)
            .collect();
        for (job, agent, rec, event) in &mut items {
            if revoked.contains(agent.as_str()) {
                (*rec, *event) = revoked_result(job, agent);
            }
        }
        Ok(items)
    }

    /// Stores each result whose target is still active (dispatched or
    /// running), all of them and their audit records in one transaction;
    /// results of targets that ended (another controller stored one first)
    /// are left out. Returns, per result, whether it was stored. Blocking.
    pub(super) fn store_results(&self, mut items: Vec<Item>) -> ApiResult<Vec<bool>> {
        let mut runs = lock(&self.job_lock);
        let mut written = vec![false; items.len()];
        // Which results to write: one per target (a second one in the same
        // batch is a copy: the agent sent it again), of an active target,
        // the cache read again once if it disagrees (another controller).
        let mut once = HashSet::new();
        let mut todo = Vec::new();
        for (i, (job, agent, rec, _)) in items.iter_mut().enumerate() {
            if !once.insert((job.clone(), agent.clone())) {
                continue;
            }
            let mut active = self.active_since(&mut runs, job, agent)?;
            if active.is_none() {
                self.reload_run(&mut runs, job)?;
                active = self.active_since(&mut runs, job, agent)?;
            }
            if let Some(at) = active.filter(|_| TargetState::Dispatched.can_become(rec.state)) {
                rec.dispatched_at = at;
                todo.push(i);
            }
        }
        for _ in 0..TRIES {
            if todo.is_empty() {
                break;
            }
            let writes: Vec<TargetWrite<'_>> = todo
                .iter()
                .map(|&i| TargetWrite {
                    job: &items[i].0,
                    agent: &items[i].1,
                    rec: &items[i].2,
                })
                .collect();
            let events: Vec<Event> = todo.iter().map(|&i| items[i].3.clone()).collect();
            // `running` is stored as `dispatched`: each is written only
            // over it, so a result another controller stored first is
            // never overwritten.
            let stored = self
                .audit
                .record_targets(&events, TargetState::Dispatched, &writes)?;
            let Err(lost) = stored else {
                for &i in &todo {
                    written[i] = true;
                    let (job, agent, rec, _) = &items[i];
                    if let Some(run) = runs.get_mut(job)
                        && let Some(&t) = run.index.get(agent)
                    {
                        run.set(t, rec.state, rec.dispatched_at);
                    }
                }
                break;
            };
            // Targets another controller ended first: their jobs are read
            // again and the rest is tried again.
            let lost: HashSet<usize> = lost.into_iter().map(|k| todo[k]).collect();
            for &i in &lost {
                self.reload_run(&mut runs, &items[i].0)?;
            }
            todo.retain(|i| !lost.contains(i));
        }
        Ok(written)
    }

    /// When the target is dispatched or running (in the run cache, else
    /// the store): when it was dispatched.
    fn active_since(
        &self,
        runs: &mut std::collections::HashMap<String, super::Run>,
        job: &str,
        agent: &str,
    ) -> ApiResult<Option<u64>> {
        let state = self.target_state(runs, job, agent)?;
        Ok(state
            .filter(|(s, _)| matches!(s, TargetState::Dispatched | TargetState::Running))
            .map(|(_, at)| at))
    }
}
