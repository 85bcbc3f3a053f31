//! Job retention: finished jobs older than `job_retention` are deleted,
//! then the oldest finished ones while the job records take more than
//! `job_store_max_bytes`. Running jobs are never deleted. Blocking store
//! work; the caller flushes once afterwards.

use std::time::Duration;

use crate::error::ApiResult;
use crate::store::{JobQuery, Order, Store};

/// Jobs looked at per store scan.
const RETENTION_BATCH: usize = 500;

/// Deletes what retention allows at `now_ms`; returns how many jobs.
pub fn delete_old(
    store: &dyn Store,
    retention: Duration,
    max_bytes: u64,
    now_ms: u64,
) -> ApiResult<usize> {
    let cutoff_ms = now_ms.saturating_sub(retention.as_millis() as u64);
    let finished = |created_before_ms| JobQuery {
        finished: Some(true),
        created_before_ms,
        order: Order::OldestFirst,
        limit: RETENTION_BATCH,
        ..JobQuery::default()
    };
    let mut deleted = 0;
    // The backend finds the finished jobs older than the cutoff, oldest
    // first; deleted ones drop out of the next batch.
    loop {
        let batch = store.list_jobs(&finished(Some(cutoff_ms)))?;
        for j in &batch {
            store.delete_job(&j.id)?;
            deleted += 1;
        }
        if batch.len() < RETENTION_BATCH {
            break;
        }
    }
    let mut size = store.job_bytes()?;
    while size > max_bytes {
        let batch = store.list_jobs(&finished(None))?;
        if batch.is_empty() {
            break;
        }
        for j in batch {
            size = size.saturating_sub(store.delete_job(&j.id)?);
            deleted += 1;
            if size <= max_bytes {
                break;
            }
        }
    }
    Ok(deleted)
}

#[cfg(test)]
mod tests {
    use fleetcmd_core::state::JobState;

    use super::*;
    use crate::store::{JobRecord, JobStore, SledStore};

    fn ids(store: &dyn Store) -> Vec<String> {
        let mut v: Vec<String> = store
            .list_jobs(&crate::store::JobQuery::newest(100))
            .expect("list")
            .into_iter()
            .map(|j| j.id)
            .collect();
        v.sort();
        v
    }

    #[test]
    fn old_finished_jobs_go_then_the_oldest_while_over_size_and_running_ones_stay() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = SledStore::open(dir.path()).expect("open");
        // UUIDv7-like ids sort by time, as the store's keys do.
        let jobs = [
            ("01-old-done", 1_000, JobState::Succeeded),
            ("02-old-running", 2_000, JobState::Running),
            ("03-done", 50_000, JobState::Failed),
            ("04-done", 60_000, JobState::Canceled),
            ("05-young-done", 90_000, JobState::Succeeded),
        ];
        for (id, at, state) in jobs {
            store
                .put_job(&JobRecord::for_test(id, at, state, &[]))
                .expect("put");
        }
        let hour = Duration::from_secs(3600);
        // Age: only finished jobs created before the cutoff (now - 40 s =
        // 60 000 ms) go; a running one that old stays.
        let n = delete_old(&store, Duration::from_millis(40_000), u64::MAX, 100_000).expect("age");
        assert_eq!(n, 2);
        assert_eq!(ids(&store), ["02-old-running", "04-done", "05-young-done"]);
        // Size: the oldest finished ones go until the records fit.
        let size = store.job_bytes().expect("size");
        let n = delete_old(&store, hour, size - 1, 100_000).expect("size");
        assert_eq!(n, 1, "one record's worth over");
        assert_eq!(ids(&store), ["02-old-running", "05-young-done"]);
        // However small the budget, a running job stays.
        delete_old(&store, hour, 0, 100_000).expect("all");
        assert_eq!(ids(&store), ["02-old-running"]);
    }
}
