//! What the agent knows, across connections, about whether the controllers
//! still accept it — what a job waiting for a slot follows.
//!
//! The agent learns that it was revoked only from a controller refusing it
//! (permission denied or unauthenticated on its stream). A lost connection
//! (a controller killed, the network) says nothing either way, so a job
//! admitted before the loss neither starts nor is refused while the agent
//! dials again: it starts once a controller welcomes the agent again (the
//! same or another of its list; the welcome proves the agent is still
//! accepted), and is refused if a controller refuses the agent first, if
//! the agent stops, or if it is still not welcomed when the job expires.
//!
//! Refusals are counted, not only shown: a job compares the count with the
//! one at its admission, so a refusal followed at once by another lost
//! connection is never missed (a watch shows only the newest value).
//!
//! A welcome is not the whole answer: the job may have been canceled, or
//! its target ended, while the agent was away. So a job delivered on an
//! earlier stream starts only once the controller of the current one sends
//! it again (it sends every job whose target is still active to an agent
//! that connects: `Shared::redeliver`); `crate::conn` waits for that copy.

use std::time::Duration;

use fleetcmd_core::authorize::Stream;
use tokio::sync::watch;

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Link {
    /// A controller welcomed the agent and its stream is still up.
    pub up: bool,
    /// Welcomes since the agent started: which stream is up.
    pub generation: u64,
    /// Why the last stream ended (shown in a refusal).
    pub last_end: String,
    /// Refusals by a controller since the agent started, and the last one's
    /// reason.
    pub refusals: u64,
    pub refusal: String,
    /// The agent is stopping.
    pub stopping: bool,
}

/// The sending side, owned by the connection loop.
#[derive(Debug)]
pub struct LinkTx(watch::Sender<Link>);

/// A copy for each job.
pub type LinkRx = watch::Receiver<Link>;

impl LinkTx {
    pub fn new() -> (LinkTx, LinkRx) {
        let (tx, rx) = watch::channel(Link {
            last_end: "not connected yet".into(),
            ..Link::default()
        });
        (LinkTx(tx), rx)
    }

    /// A controller welcomed the agent.
    pub fn welcomed(&self) {
        self.0.send_modify(|l| {
            l.up = true;
            l.generation += 1;
        });
    }

    /// The stream ended; `refused` when the controller refused the agent.
    pub fn ended(&self, refused: bool, why: &str) {
        self.0.send_modify(|l| {
            l.up = false;
            l.last_end = why.to_owned();
            if refused {
                l.refusals += 1;
                l.refusal = why.to_owned();
            }
        });
    }

    pub fn stopping(&self) {
        self.0.send_modify(|l| {
            l.up = false;
            l.stopping = true;
        });
    }
}

/// Where a job stands against the link, given the refusals counted when it
/// was admitted. `None`: not decided yet (the link is lost, the agent is
/// dialling).
fn decided(l: &Link, refusals_at_admission: u64) -> Option<Stream> {
    if l.refusals != refusals_at_admission {
        Some(Stream::Refused(l.refusal.clone()))
    } else if l.stopping {
        Some(Stream::Ended("the agent is stopping".into()))
    } else if l.up {
        Some(Stream::Up)
    } else {
        None
    }
}

/// The refusal count now (taken when a job is admitted).
pub fn refusals(rx: &LinkRx) -> u64 {
    rx.borrow().refusals
}

/// The stream up now (its generation).
pub fn generation(rx: &LinkRx) -> u64 {
    rx.borrow().generation
}

/// Resolves when the job must not start whatever happens next: a refusal
/// since its admission, or the agent stopping. (A lost link is not such a
/// reason: the job waits for the next welcome.)
pub async fn doomed(rx: &mut LinkRx, refusals_at_admission: u64) {
    let _ = rx
        .wait_for(|l| l.refusals != refusals_at_admission || l.stopping)
        .await;
}

/// What the job may start under, waiting while the link is lost — at most
/// `limit` (until the job expires), after which it ends with the reason
/// the last stream ended.
pub async fn settle(rx: &mut LinkRx, refusals_at_admission: u64, limit: Duration) -> Stream {
    let waited = tokio::time::timeout(limit, async {
        rx.wait_for(|l| decided(l, refusals_at_admission).is_some())
            .await
            .is_ok()
    })
    .await;
    if waited == Ok(false) {
        // The connection loop is gone: the agent is stopping.
        return Stream::Ended("the agent is stopping".into());
    }
    let l = rx.borrow().clone();
    decided(&l, refusals_at_admission).unwrap_or_else(|| {
        Stream::Ended(format!(
            "no controller accepted the agent again before the job expired (the stream that delivered it ended: {})",
            l.last_end
        ))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const LONG: Duration = Duration::from_secs(30);

    #[tokio::test]
    async fn a_job_waits_through_a_lost_link_and_starts_on_the_next_welcome() {
        let (tx, mut rx) = LinkTx::new();
        tx.welcomed();
        let at = refusals(&rx);
        tx.ended(false, "h2 protocol error");
        let mut waiting = {
            let mut rx = rx.clone();
            tokio::spawn(async move { settle(&mut rx, at, LONG).await })
        };
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(
            futures_poll(&mut waiting).await.is_none(),
            "undecided while lost"
        );
        tx.welcomed();
        assert_eq!(waiting.await.expect("task"), Stream::Up);
        assert_eq!(settle(&mut rx, at, LONG).await, Stream::Up);
    }

    #[tokio::test]
    async fn a_refusal_is_never_missed_even_when_another_loss_follows_at_once() {
        let (tx, mut rx) = LinkTx::new();
        tx.welcomed();
        let at = refusals(&rx);
        tx.ended(true, "permission denied: agent a-1 was revoked");
        tx.ended(false, "connection refused");
        tx.welcomed();
        // Even welcomed again afterwards, a job admitted before the refusal
        // never starts.
        assert_eq!(
            settle(&mut rx, at, LONG).await,
            Stream::Refused("permission denied: agent a-1 was revoked".into())
        );
        let mut doomed_rx = rx.clone();
        tokio::time::timeout(Duration::from_secs(1), doomed(&mut doomed_rx, at))
            .await
            .expect("doomed at once");
        // A job admitted after the refusal is not affected by it.
        let now = refusals(&rx);
        assert_eq!(settle(&mut rx, now, LONG).await, Stream::Up);
    }

    #[tokio::test]
    async fn a_job_not_welcomed_again_in_time_or_on_a_stopping_agent_is_refused() {
        let (tx, mut rx) = LinkTx::new();
        tx.welcomed();
        let at = refusals(&rx);
        tx.ended(false, "unavailable: controller gone");
        match settle(&mut rx, at, Duration::from_millis(50)).await {
            Stream::Ended(why) => assert!(why.contains("controller gone"), "{why}"),
            s => panic!("{s:?}"),
        }
        tx.stopping();
        assert_eq!(
            settle(&mut rx, at, LONG).await,
            Stream::Ended("the agent is stopping".into())
        );
        drop(tx);
        let (tx2, mut rx2) = LinkTx::new();
        drop(tx2);
        assert_eq!(
            settle(&mut rx2, 0, LONG).await,
            Stream::Ended("the agent is stopping".into())
        );
    }

    /// The task's output if it has finished.
    async fn futures_poll<T>(h: &mut tokio::task::JoinHandle<T>) -> Option<T> {
        tokio::time::timeout(Duration::from_millis(1), h)
            .await
            .ok()
            .map(|r| r.expect("task"))
    }
}
