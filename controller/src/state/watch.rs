//! The watch hub: live events of running jobs for `Jobs.Watch`.
//!
//! Owns one bounded broadcast channel per watched job. A watcher that
//! falls behind is told how many events it missed (`broadcast` lag) and
//! never slows agents or the controller; nothing is built for a job
//! nobody watches (`is_watched`). Knows nothing about how jobs run.

use std::collections::HashMap;
use std::sync::Mutex;

use fleetcmd_proto::v1 as pb;
use tokio::sync::broadcast;

use super::lock;

/// Live events buffered per job for its watchers.
pub const WATCH_BUFFER: usize = 1024;

#[derive(Default)]
pub struct WatchHub {
    jobs: Mutex<HashMap<String, broadcast::Sender<pb::JobEvent>>>,
}

impl WatchHub {
    /// Whether anybody watches the job (to skip building its events).
    pub fn is_watched(&self, job_id: &str) -> bool {
        lock(&self.jobs).contains_key(job_id)
    }

    /// Sends a live event to the job's watchers, if any.
    pub fn publish(&self, job_id: &str, event: pb::job_event::Event) {
        if let Some(tx) = lock(&self.jobs).get(job_id) {
            let _ = tx.send(pb::JobEvent { event: Some(event) });
        }
    }

    /// A new watcher of the job's events from now on.
    pub fn subscribe(&self, job_id: &str) -> broadcast::Receiver<pb::JobEvent> {
        lock(&self.jobs)
            .entry(job_id.to_owned())
            .or_insert_with(|| broadcast::channel(WATCH_BUFFER).0)
            .subscribe()
    }

    /// Forgets the job's channel (it ended); its watchers still read what
    /// is buffered, then see the channel closed.
    pub fn forget(&self, job_id: &str) {
        lock(&self.jobs).remove(job_id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chunk(seq: u64) -> pb::job_event::Event {
        pb::job_event::Event::Chunk(pb::OutputChunk {
            seq,
            ..Default::default()
        })
    }

    #[test]
    fn watchers_get_events_of_their_job_until_it_is_forgotten_and_a_laggard_is_told() {
        let hub = WatchHub::default();
        assert!(!hub.is_watched("j1"));
        hub.publish("j1", chunk(0)); // nobody watches: dropped
        let mut rx = hub.subscribe("j1");
        let mut other = hub.subscribe("j2");
        assert!(hub.is_watched("j1"));
        hub.publish("j1", chunk(1));
        let got = rx.try_recv().expect("an event");
        assert_eq!(got.event, Some(chunk(1)));
        assert!(other.try_recv().is_err(), "j2 saw j1's event");
        hub.forget("j1");
        assert!(!hub.is_watched("j1"));
        assert!(matches!(
            rx.try_recv(),
            Err(broadcast::error::TryRecvError::Closed)
        ));
        // Bounded: a watcher that does not read loses the oldest events
        // and is told how many.
        for seq in 0..WATCH_BUFFER as u64 + 5 {
            hub.publish("j2", chunk(seq));
        }
        assert!(matches!(
            other.try_recv(),
            Err(broadcast::error::TryRecvError::Lagged(5))
        ));
    }
}
