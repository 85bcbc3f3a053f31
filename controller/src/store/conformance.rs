//! The conformance suite every `Store` backend must pass: plain functions
//! over `&dyn Store`, so a second backend (PostgreSQL) proves itself by
//! running these same functions against a fresh instance of itself, the
//! way the sled backend does in `tests` below. Each function needs an
//! empty store.

use fleetcmd_core::state::{JobState, Stop, TargetState};

use super::{JobRecord, Store, TargetRecord, TokenRecord, TokenRefusal};

/// Every job state (and why a job stopped) is stored and read back as
/// written; listings are newest first and oldest first; prefixes find ids.
pub fn jobs_keep_their_states_and_order(store: &dyn Store) {
    let ids: Vec<String> = (0..JobState::ALL.len())
        .map(|i| format!("0190ab12-34cd-7ef0-8123-00000000000{i}"))
        .collect();
    for (i, state) in JobState::ALL.into_iter().enumerate() {
        let mut rec = JobRecord::for_test(&ids[i], i as u64, state, &["web-1"]);
        if state == JobState::Canceled {
            rec.stopped = Some((Stop::Canceled, "canceled by cli:alice".into()));
        }
        store.put_job(&rec).expect("put_job");
        assert_eq!(store.get_job(&ids[i]).expect("get_job"), Some(rec));
    }
    let newest: Vec<String> = store
        .list_jobs(3)
        .expect("list_jobs")
        .into_iter()
        .map(|j| j.id)
        .collect();
    assert_eq!(newest, [ids[5].clone(), ids[4].clone(), ids[3].clone()]);
    let oldest: Vec<String> = store
        .oldest_jobs(2)
        .expect("oldest_jobs")
        .into_iter()
        .map(|j| j.id)
        .collect();
    assert_eq!(oldest, [ids[0].clone(), ids[1].clone()]);
    assert_eq!(
        store
            .job_ids_with_prefix("0190ab12-34cd-7ef0-8123-000000000003", 2)
            .expect("prefix"),
        [ids[3].clone()]
    );
    assert_eq!(
        store
            .get_job("0190ab12-0000-7000-8000-000000000000")
            .expect("get"),
        None
    );
}

/// Every target state is stored and read back; a batch write is read like
/// single ones; a job's targets are listed by agent.
pub fn targets_keep_their_states(store: &dyn Store) {
    let job = "0190ab12-34cd-7ef0-8123-456789abcdef";
    for (i, state) in TargetState::ALL.into_iter().enumerate() {
        let rec = TargetRecord {
            result: (state == TargetState::Ok).then(|| vec![1, 2, 3]),
            dispatched_at: i as u64,
            ..TargetRecord::new(state, state.as_str())
        };
        store
            .put_target(job, &format!("host-{i:02}"), &rec)
            .expect("put_target");
        assert_eq!(
            store
                .get_target(job, &format!("host-{i:02}"))
                .expect("get_target"),
            Some(rec)
        );
    }
    let skipped = TargetRecord::new(TargetState::Skipped, "the job was aborted");
    store
        .put_targets(job, &[("host-00", &skipped), ("host-99", &skipped)])
        .expect("put_targets");
    let all = store.targets(job).expect("targets");
    assert_eq!(all.len(), TargetState::ALL.len() + 1);
    assert!(all.contains(&("host-99".to_string(), skipped.clone())));
    assert!(
        all.contains(&("host-00".to_string(), skipped)),
        "overwritten"
    );
    assert_eq!(store.get_target(job, "host-nope").expect("get"), None);
}

/// A short id names one job until the job is deleted with its targets.
pub fn a_short_id_names_one_job_until_it_is_deleted(store: &dyn Store) {
    let a = "01890a5d-ac96-774b-bcce-b302099a8057";
    let b = "01890a5d-ac96-7001-8000-b302099a8057";
    let short = "b302099a8057";
    store
        .put_job(&JobRecord::for_test(a, 1, JobState::Succeeded, &["web-1"]))
        .expect("put");
    store
        .put_target(a, "web-1", &TargetRecord::new(TargetState::Ok, ""))
        .expect("put target");
    assert_eq!(store.claim_short_id(short, a).expect("claim"), None);
    assert_eq!(
        store.claim_short_id(short, b).expect("claim"),
        Some(a.into())
    );
    let before = store.job_bytes().expect("bytes");
    assert!(store.delete_job(a).expect("delete") > 0);
    assert!(store.job_bytes().expect("bytes") < before);
    assert_eq!(store.get_job(a).expect("get"), None);
    assert!(store.targets(a).expect("targets").is_empty());
    assert_eq!(store.job_id_by_short(short).expect("short"), None);
    assert_eq!(store.claim_short_id(short, b).expect("claim"), None);
}

/// A token is used at most as often as it allows, and not after it expired.
pub fn tokens_are_used_up_and_expire(store: &dyn Store) {
    let token = |uses_left, expires_at| TokenRecord {
        secret_hash: "ab".repeat(32),
        expires_at,
        uses_left,
        labels: Default::default(),
        name: None,
        created_by: "alice".into(),
        replaces: None,
    };
    store.put_token("t1", &token(2, 100)).expect("put");
    store.put_token("t2", &token(1, 10)).expect("put");
    let hash = "ab".repeat(32);
    for _ in 0..2 {
        assert!(
            store
                .consume_token("t1", &hash, 50)
                .expect("consume")
                .is_ok()
        );
    }
    let used = store.consume_token("t1", &hash, 50).expect("consume");
    assert_eq!(used.map(|_| ()), Err(TokenRefusal::Used));
    let expired = store.consume_token("t2", &hash, 50).expect("consume");
    assert_eq!(expired.map(|_| ()), Err(TokenRefusal::Expired));
    let unknown = store.consume_token("t3", &hash, 50).expect("consume");
    assert_eq!(unknown.map(|_| ()), Err(TokenRefusal::Unknown));
}

/// Every function above, each against a fresh store from `fresh`.
pub fn run_all(fresh: &mut dyn FnMut() -> Box<dyn Store>) {
    jobs_keep_their_states_and_order(fresh().as_ref());
    targets_keep_their_states(fresh().as_ref());
    a_short_id_names_one_job_until_it_is_deleted(fresh().as_ref());
    tokens_are_used_up_and_expire(fresh().as_ref());
}

#[cfg(test)]
mod tests {
    use crate::store::SledStore;

    #[test]
    fn the_sled_backend_passes_the_conformance_suite() {
        let mut dirs = Vec::new();
        super::run_all(&mut || {
            let dir = tempfile::tempdir().expect("tempdir");
            let store = SledStore::open(dir.path()).expect("open");
            dirs.push(dir);
            Box::new(store)
        });
    }
}
