//! The conformance suite every `Store` backend must pass: plain functions
//! over `&dyn Store`, one per promise of a part, so a second backend
//! (PostgreSQL) proves itself by calling [`run_all`] with fresh, empty
//! instances of itself, the way the sled backend does in `tests` below.
//! Compiled for this crate's tests and with the `conformance` feature.

use fleetcmd_core::audit::{Chain, Event, EventKind, Record, SignedHead};
use fleetcmd_core::state::{JobState, Stop, TargetState};

use super::{
    AgentLive, AgentRecord, AuditDim, AuditIndexEntry, ExportCursor, Fence, HealthRecord,
    HealthTransition, JobClash, JobQuery, JobRecord, Lease, Order, PolicyRecord, Presence, Store,
    StoreError, TargetRecord, TargetWrite, TokenRecord, TokenRefusal,
};
use crate::revocation::CertRevocation;

fn job_id(i: usize) -> String {
    format!("0190ab12-34cd-7ef0-8123-{i:012x}")
}

fn ids(jobs: Vec<JobRecord>) -> Vec<String> {
    jobs.into_iter().map(|j| j.id).collect()
}

fn create(store: &dyn Store, rec: &JobRecord) {
    let short = &rec.id[rec.id.len() - 12..];
    store
        .create_job(short, rec, &[])
        .expect("create_job")
        .expect("no clash");
}

/// Every job state (and why a job stopped) is stored and read back as
/// written; listings are newest or oldest first and filter by requester,
/// state, finished and age in the backend, with a cursor; prefixes find ids.
pub fn jobs_are_listed_by_the_backend(store: &dyn Store) {
    let n = JobState::ALL.len();
    for (i, state) in JobState::ALL.into_iter().enumerate() {
        let mut rec = JobRecord::for_test(&job_id(i), 1000 * i as u64, state, &["web-1"]);
        if state == JobState::Canceled {
            rec.stopped = Some((Stop::Canceled, "canceled by cli:alice".into()));
        }
        if i % 2 == 1 {
            rec.requester = "irc:bob".into();
        }
        create(store, &rec);
        assert_eq!(store.get_job(&job_id(i)).expect("get_job"), Some(rec));
    }
    let q = |q: JobQuery| ids(store.list_jobs(&q).expect("list_jobs"));
    assert_eq!(
        q(JobQuery::newest(3)),
        [job_id(n - 1), job_id(n - 2), job_id(n - 3)]
    );
    let oldest = JobQuery {
        order: Order::OldestFirst,
        ..JobQuery::newest(2)
    };
    assert_eq!(q(oldest.clone()), [job_id(0), job_id(1)]);
    // The cursor continues where the last page ended.
    let next = JobQuery {
        after: Some(job_id(1)),
        ..oldest
    };
    assert_eq!(q(next), [job_id(2), job_id(3)]);
    let newest_after = JobQuery {
        after: Some(job_id(2)),
        ..JobQuery::newest(10)
    };
    assert_eq!(q(newest_after), [job_id(1), job_id(0)]);
    let bob = JobQuery {
        requester: Some("irc:bob".into()),
        ..JobQuery::newest(100)
    };
    let want: Vec<String> = (0..n).rev().filter(|i| i % 2 == 1).map(job_id).collect();
    assert_eq!(q(bob), want);
    for (i, state) in JobState::ALL.into_iter().enumerate() {
        let one = JobQuery {
            state: Some(state),
            ..JobQuery::newest(100)
        };
        assert_eq!(q(one), [job_id(i)], "{state}");
    }
    let finished = JobQuery {
        finished: Some(true),
        order: Order::OldestFirst,
        created_before_ms: Some(1000 * (n as u64 - 1)),
        limit: 100,
        ..JobQuery::default()
    };
    let want: Vec<String> = JobState::ALL
        .into_iter()
        .enumerate()
        .filter(|(i, s)| s.is_terminal() && *i < n - 1)
        .map(|(i, _)| job_id(i))
        .collect();
    assert_eq!(q(finished), want);
    assert_eq!(q(JobQuery::newest(0)), Vec::<String>::new());
    assert_eq!(
        store.job_ids_with_prefix(&job_id(3), 2).expect("prefix"),
        [job_id(3)]
    );
    assert_eq!(
        store
            .job_ids_with_prefix("0190ab12-34cd", 2)
            .expect("prefix"),
        [job_id(0), job_id(1)]
    );
    assert_eq!(
        store
            .get_job("0190ab12-0000-7000-8000-000000000000")
            .expect("get"),
        None
    );
}

/// Every target state is stored and read back with its result in one
/// record; a batch write is read like single ones; a job's targets are
/// listed by agent.
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

/// Creating a job is one transaction: a clash (its id, or its short id
/// naming another job) writes nothing, not even the initial targets; a
/// deleted job frees its records and short id.
pub fn a_job_is_created_whole_or_not_at_all(store: &dyn Store) {
    let a = "01890a5d-ac96-774b-bcce-b302099a8057";
    let b = "01890a5d-ac96-7001-8000-b302099a8057";
    let short = "b302099a8057";
    let dispatched = TargetRecord::new(TargetState::Dispatched, "");
    let rec_a = JobRecord::for_test(a, 1, JobState::Running, &["web-1"]);
    let rec_b = JobRecord::for_test(b, 2, JobState::Running, &["web-2"]);
    assert_eq!(
        store
            .create_job(short, &rec_a, &[("web-1", &dispatched)])
            .expect("create"),
        Ok(())
    );
    assert_eq!(store.job_id_by_short(short).expect("short"), Some(a.into()));
    assert_eq!(store.targets(a).expect("targets").len(), 1);
    assert_eq!(
        store.create_job(short, &rec_a, &[]).expect("create"),
        Err(JobClash::IdExists)
    );
    assert_eq!(
        store
            .create_job(short, &rec_b, &[("web-2", &dispatched)])
            .expect("create"),
        Err(JobClash::ShortIdTaken { holder: a.into() })
    );
    // Nothing of the refused job was written.
    assert_eq!(store.get_job(b).expect("get"), None);
    assert!(store.targets(b).expect("targets").is_empty());
    // Deleting an unknown job frees nothing and takes no short id.
    assert_eq!(store.delete_job(b).expect("delete"), 0);
    assert_eq!(store.job_id_by_short(short).expect("short"), Some(a.into()));
    let before = store.job_bytes().expect("bytes");
    let freed = store.delete_job(a).expect("delete");
    assert!(freed > 0);
    assert_eq!(store.job_bytes().expect("bytes"), before - freed);
    assert_eq!(store.get_job(a).expect("get"), None);
    assert!(store.targets(a).expect("targets").is_empty());
    assert_eq!(store.job_id_by_short(short).expect("short"), None);
    assert_eq!(
        store.create_job(short, &rec_b, &[]).expect("create"),
        Ok(())
    );
}

/// Of concurrent creations of jobs sharing a short id exactly one wins.
pub fn concurrent_creations_of_one_short_id_have_one_winner(store: &dyn Store) {
    let recs: Vec<JobRecord> = (0..8)
        .map(|i| {
            let id = format!("01890a5d-ac96-70{i:02}-8000-b302099a8057");
            JobRecord::for_test(&id, i, JobState::Running, &["web-1"])
        })
        .collect();
    let winners = std::thread::scope(|s| {
        let handles: Vec<_> = recs
            .iter()
            .map(|rec| {
                s.spawn(move || {
                    store
                        .create_job("b302099a8057", rec, &[])
                        .expect("create")
                        .is_ok()
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("thread") as usize)
            .sum::<usize>()
    });
    assert_eq!(winners, 1);
    assert_eq!(
        store.list_jobs(&JobQuery::newest(100)).expect("list").len(),
        1
    );
}

/// A token is used at most as often as it allows, not after it expired,
/// and a single use has one winner among concurrent callers.
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
    store.put_token("t3", &token(1, 100)).expect("put");
    let hash = "ab".repeat(32);
    for _ in 0..2 {
        assert!(
            store
                .consume_token("t1", &hash, 50)
                .expect("consume")
                .is_ok()
        );
    }
    let refusal = |id: &str, hash: &str| {
        store
            .consume_token(id, hash, 50)
            .expect("consume")
            .map(|_| ())
    };
    assert_eq!(refusal("t1", &hash), Err(TokenRefusal::Used));
    assert_eq!(refusal("t2", &hash), Err(TokenRefusal::Expired));
    assert_eq!(refusal("nope", &hash), Err(TokenRefusal::Unknown));
    assert_eq!(refusal("t3", &"cd".repeat(32)), Err(TokenRefusal::Unknown));
    let winners: usize = std::thread::scope(|s| {
        let handles: Vec<_> = (0..8)
            .map(|_| {
                s.spawn(|| {
                    store
                        .consume_token("t3", &hash, 50)
                        .expect("consume")
                        .is_ok() as usize
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().expect("thread")).sum()
    });
    assert_eq!(winners, 1);
}

/// Agents are enrolled, listed by id, and revoked by a rewrite.
pub fn agents_are_enrolled_and_revoked(store: &dyn Store) {
    let agent = |id: &str| AgentRecord {
        id: id.into(),
        labels: [("role".to_string(), "web".to_string())].into(),
        revoked: false,
        joined_at: 7,
        version: "1.0".into(),
        enrolment_cert: None,
    };
    assert_eq!(store.get_agent("web-1").expect("get"), None);
    for id in ["web-2", "web-1"] {
        store.put_agent(&agent(id)).expect("put");
    }
    let mut revoked = agent("web-2");
    revoked.revoked = true;
    store.put_agent(&revoked).expect("revoke");
    assert_eq!(
        store.get_agent("web-2").expect("get"),
        Some(revoked.clone())
    );
    assert_eq!(
        store.list_agents().expect("list"),
        [agent("web-1"), revoked.clone()]
    );
    // Several at once, unknown ids left out.
    let mut some = store
        .get_agents(&["web-2", "nobody", "web-1"])
        .expect("get some");
    some.sort_by(|a, b| a.id.cmp(&b.id));
    assert_eq!(some, [agent("web-1"), revoked]);
    assert_eq!(store.get_agents(&[]).expect("get none"), []);
}

/// The policy is the last one put.
pub fn the_policy_is_the_last_one_put(store: &dyn Store) {
    assert_eq!(store.get_policy().expect("get"), None);
    let rec = |version: u64, fill: u8| PolicyRecord {
        version,
        bundle: vec![fill; 3],
        signatures: vec![("k1".into(), vec![9; 64])],
    };
    for version in [1, 2] {
        assert!(store.put_policy(&rec(version, version as u8)).expect("put"));
        assert_eq!(
            store.get_policy().expect("get"),
            Some(rec(version, version as u8))
        );
    }
    // The same version again (another bundle) and an older one: refused.
    assert!(!store.put_policy(&rec(2, 7)).expect("put"));
    assert!(!store.put_policy(&rec(1, 7)).expect("put"));
    assert_eq!(store.get_policy().expect("get"), Some(rec(2, 2)));
}

/// Of 8 threads pushing bundles of one new version at once, exactly one
/// is stored.
pub fn concurrent_pushes_of_one_version_have_one_winner(store: &dyn Store) {
    let wins = std::sync::atomic::AtomicUsize::new(0);
    std::thread::scope(|s| {
        for fill in 0..8u8 {
            let wins = &wins;
            s.spawn(move || {
                let rec = PolicyRecord {
                    version: 5,
                    bundle: vec![fill; 3],
                    signatures: vec![("k1".into(), vec![9; 64])],
                };
                if store.put_policy(&rec).expect("put") {
                    wins.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                }
            });
        }
    });
    assert_eq!(wins.into_inner(), 1);
    assert_eq!(store.get_policy().expect("get").map(|p| p.version), Some(5));
}

fn event(i: u64) -> Event {
    let mut e = Event::new(EventKind::ChatDenied, format!("cli:u{}", i % 2));
    e.hosts = vec![format!("web-{i}")];
    e
}

fn entries(r: &Record) -> Vec<AuditIndexEntry> {
    vec![
        AuditIndexEntry {
            dim: AuditDim::Actor,
            value: r.event.actor.clone(),
            time_ms: r.time_ms,
            seq: r.seq,
        },
        AuditIndexEntry {
            dim: AuditDim::Host,
            value: r.event.hosts[0].clone(),
            time_ms: r.time_ms,
            seq: r.seq,
        },
    ]
}

/// Audit records keep their order and contiguous sequence numbers (an
/// append out of sequence is refused and writes nothing), the newest is the
/// chain head, ranges read both ways, the index answers newest first
/// within its bounds, retention removes the old end, heads are kept by seq.
pub fn the_audit_log_is_one_contiguous_chain(store: &dyn Store) {
    assert_eq!(store.audit_last().expect("last"), None);
    let mut chain = Chain::genesis();
    let mut recs = Vec::new();
    for i in 1..=6 {
        let r = chain.append(1000 + i * 10, event(i));
        store.audit_append(&r, &entries(&r)).expect("append");
        recs.push(r);
    }
    assert_eq!(store.audit_last().expect("last"), recs.last().cloned());
    assert_eq!(store.audit_first_seq().expect("first"), Some(1));
    // Out of sequence: a gap, and a repeat.
    let mut ahead = chain.clone();
    ahead.append(2000, event(7));
    let gap = ahead.append(2000, event(8));
    let err = store.audit_append(&gap, &[]).expect_err("gap");
    assert!(matches!(err, StoreError::Conflict { .. }), "{err}");
    let err = store.audit_append(&recs[2], &[]).expect_err("repeat");
    assert!(matches!(err, StoreError::Conflict { .. }), "{err}");
    assert_eq!(store.audit_get(3).expect("get"), Some(recs[2].clone()));
    assert_eq!(store.audit_get(8).expect("get"), None);
    let seqs = |rs: Vec<Record>| rs.into_iter().map(|r| r.seq).collect::<Vec<_>>();
    assert_eq!(
        seqs(
            store
                .audit_records(2, 5, Order::OldestFirst, 10)
                .expect("range")
        ),
        [2, 3, 4]
    );
    assert_eq!(
        seqs(
            store
                .audit_records(0, u64::MAX, Order::NewestFirst, 2)
                .expect("range")
        ),
        [6, 5]
    );
    // Index: actor cli:u1 has seqs 1, 3, 5.
    let page = |since, before, limit| {
        store
            .audit_index_page(AuditDim::Actor, "cli:u1", since, before, limit)
            .expect("index")
    };
    assert_eq!(
        page(0, (u64::MAX, 0), 10),
        [(1050, 5), (1030, 3), (1010, 1)]
    );
    assert_eq!(page(0, (1050, 5), 1), [(1030, 3)]);
    assert_eq!(page(1020, (u64::MAX, 0), 10), [(1050, 5), (1030, 3)]);
    // Index entries written again are not doubled.
    store.audit_put_index(&entries(&recs[4])).expect("reindex");
    assert_eq!(page(0, (u64::MAX, 0), 10).len(), 3);
    // Heads.
    let head = |seq: u64| SignedHead {
        seq,
        hash: recs[seq as usize - 1].hash.clone(),
        time_ms: 5,
        key_id: "k".into(),
        signature: "00".into(),
    };
    assert_eq!(store.audit_last_head_seq().expect("head"), None);
    for seq in [2, 4, 6] {
        store.audit_put_head(&head(seq)).expect("head");
    }
    let heads = |from| {
        store
            .audit_heads_from(from)
            .expect("heads")
            .into_iter()
            .map(|h| h.seq)
            .collect::<Vec<_>>()
    };
    assert_eq!(heads(3), [4, 6]);
    assert_eq!(store.audit_last_head_seq().expect("head"), Some(6));
    // Retention: the old end goes, with its index entries and heads.
    let old: Vec<AuditIndexEntry> = recs[..3].iter().flat_map(entries).collect();
    store.audit_remove_through(3, &old).expect("remove");
    store.audit_remove_heads_before(4).expect("remove heads");
    assert_eq!(store.audit_first_seq().expect("first"), Some(4));
    assert_eq!(page(0, (u64::MAX, 0), 10), [(1050, 5)]);
    assert_eq!(heads(0), [4, 6]);
    // The chain goes on from its head.
    let r7 = chain.append(1070, event(7));
    store.audit_append(&r7, &entries(&r7)).expect("append");
    assert_eq!(store.audit_last().expect("last").map(|r| r.seq), Some(7));
    // A writer that lost a race appends at the stored tip, wherever its
    // own chain was (here: still at 6): the record follows the tip.
    let at_tip = store
        .audit_append_at_tip(2100, event(8))
        .expect("at the tip");
    assert_eq!(at_tip, Chain::after(&r7).append(2100, event(8)));
    assert_eq!(store.audit_last().expect("last"), Some(at_tip));
}

/// Alerting state per name, and each name's transitions newest first,
/// trimmed to the newest `keep`.
pub fn health_state_and_history_are_kept(store: &dyn Store) {
    assert_eq!(store.health_state("api").expect("get"), None);
    let rec = HealthRecord {
        state: "down".into(),
        since_ms: 5,
        silenced_until_ms: 9,
        silence_reason: "maintenance".into(),
        silenced_by: "irc:alice".into(),
    };
    store.put_health_state("api", &rec).expect("put");
    store
        .put_health_state("web-1/http", &HealthRecord::default())
        .expect("put");
    assert_eq!(store.health_state("api").expect("get"), Some(rec));
    for at_ms in 1..=5 {
        let t = HealthTransition {
            from: "ok".into(),
            to: "down".into(),
            at_ms,
            passing: 1,
            total: 2,
        };
        store.add_health_transition("api", &t, 3).expect("add");
    }
    let at = |name, limit| {
        store
            .health_transitions(name, limit)
            .expect("history")
            .into_iter()
            .map(|t| t.at_ms)
            .collect::<Vec<_>>()
    };
    assert_eq!(at("api", 10), [5, 4, 3]);
    assert_eq!(at("api", 2), [5, 4]);
    assert_eq!(at("ap", 10), Vec::<u64>::new(), "names are not prefixes");
}

/// Every revocation put is read back.
pub fn revocations_are_kept(store: &dyn Store) {
    assert!(store.revocations().expect("list").is_empty());
    let rev = |name: &str, serial: Option<&str>| CertRevocation {
        role: "operator".into(),
        name: name.into(),
        serial: serial.map(Into::into),
        revoked_at: 10,
        by: "cli:root".into(),
        reason: "left".into(),
    };
    let all = [
        rev("alice", None),
        rev("alice", Some("1f")),
        rev("bob", None),
    ];
    for r in &all {
        store.put_revocation(r).expect("put");
    }
    let mut got = store.revocations().expect("list");
    got.sort_by(|a, b| (&a.name, &a.serial).cmp(&(&b.name, &b.serial)));
    assert_eq!(got, all);
}

/// Long enough that a lease outlives a few calls on a busy machine.
const LEASE_TTL: std::time::Duration = std::time::Duration::from_secs(3);
/// Longer than any test takes, however loaded the machine.
const LONG_TTL: std::time::Duration = std::time::Duration::from_secs(60);
/// Short, for the expiry cases; the tests wait a little longer.
const SHORT_TTL: std::time::Duration = std::time::Duration::from_millis(300);

/// A free lease goes to the first holder at term 1; a second holder is
/// refused while it runs; the holder renews and re-acquires at the same
/// term; once it expires the other holder takes it with a higher term; a
/// release frees it at once.
pub fn a_lease_has_one_holder_and_terms_grow(store: &dyn Store) {
    assert_eq!(store.lease_holder("sweeper").expect("holder"), None);
    let a = store
        .lease_acquire("sweeper", "ctl-a", LEASE_TTL)
        .expect("acquire")
        .expect("a free lease is granted");
    assert_eq!((a.holder.as_str(), a.term), ("ctl-a", 1));
    assert_eq!(
        store
            .lease_acquire("sweeper", "ctl-b", LEASE_TTL)
            .expect("acquire"),
        None,
        "a running lease is not granted to another holder"
    );
    // Another name is another lease.
    let other = store
        .lease_acquire("retention", "ctl-b", LEASE_TTL)
        .expect("acquire")
        .expect("another name is free");
    assert_eq!(other.term, 1);
    assert!(
        store
            .lease_renew("sweeper", "ctl-a", 1, LEASE_TTL)
            .expect("renew")
    );
    let again = store
        .lease_acquire("sweeper", "ctl-a", LEASE_TTL)
        .expect("acquire")
        .expect("the holder gets its own lease");
    assert_eq!(again.term, 1, "extending a running lease keeps the term");
    assert_eq!(
        store.lease_holder("sweeper").expect("holder"),
        Some(a.clone())
    );

    // Expiry, then a takeover at a higher term.
    assert!(
        store
            .lease_renew("sweeper", "ctl-a", 1, SHORT_TTL)
            .expect("renew")
    );
    std::thread::sleep(SHORT_TTL * 2);
    assert_eq!(store.lease_holder("sweeper").expect("holder"), None);
    let b = store
        .lease_acquire("sweeper", "ctl-b", LEASE_TTL)
        .expect("acquire")
        .expect("an expired lease is granted");
    assert_eq!((b.holder.as_str(), b.term), ("ctl-b", 2));

    // A release frees it at once; the next grant has the next term.
    assert!(!store.lease_release("sweeper", "ctl-a", 1).expect("release"));
    assert!(store.lease_release("sweeper", "ctl-b", 2).expect("release"));
    assert_eq!(store.lease_holder("sweeper").expect("holder"), None);
    let a3 = store
        .lease_acquire("sweeper", "ctl-a", LEASE_TTL)
        .expect("acquire")
        .expect("a released lease is granted");
    assert_eq!(a3.term, 3);
}

/// Leases under a prefix that ended long enough ago are pruned, term and
/// all; running ones, recently ended ones and other names are kept; an
/// old holder cannot touch the next grant of a pruned name.
pub fn ended_leases_under_a_prefix_are_pruned(store: &dyn Store) {
    let grant = |name: &str, holder: &str, ttl| {
        store
            .lease_acquire(name, holder, ttl)
            .expect("acquire")
            .expect("granted")
    };
    // `gateway/old` twice, so its term is 2 before it is pruned.
    grant("gateway/old", "gw-a:1", SHORT_TTL);
    std::thread::sleep(SHORT_TTL * 2);
    assert_eq!(grant("gateway/old", "gw-a:2", SHORT_TTL).term, 2);
    grant("gateway/50%_off", "gw-b:1", SHORT_TTL);
    grant("gateway/running", "gw-b:1", LONG_TTL);
    grant("gatewayx", "gw-b:1", SHORT_TTL);
    grant("sweeper", "ctl-a", SHORT_TTL);
    std::thread::sleep(SHORT_TTL * 2);
    assert_eq!(
        store.prune_leases("gateway/", LONG_TTL).expect("prune"),
        0,
        "nothing ended that long ago"
    );
    std::thread::sleep(SHORT_TTL);
    assert_eq!(
        store
            .prune_leases("gateway/", SHORT_TTL / 2)
            .expect("prune"),
        2,
        "the two ended gateway leases, not the running one nor other names"
    );
    assert_eq!(
        store.lease_holder("gateway/running").expect("holder"),
        Some(Lease {
            holder: "gw-b:1".into(),
            term: 1
        })
    );
    assert_eq!(
        grant("sweeper", "ctl-b", LEASE_TTL).term,
        2,
        "another name keeps its term"
    );
    assert_eq!(grant("gatewayx", "gw-c:1", LEASE_TTL).term, 2);
    let fresh = grant("gateway/old", "gw-c:1", LONG_TTL);
    assert_eq!(fresh.term, 1, "a pruned name starts again");
    assert!(
        !store
            .lease_renew("gateway/old", "gw-a:1", 1, LEASE_TTL)
            .expect("renew")
            && !store
                .lease_release("gateway/old", "gw-a:1", 1)
                .expect("release"),
        "an old holder cannot renew or release the new grant"
    );
    assert_eq!(
        store.lease_holder("gateway/old").expect("holder"),
        Some(fresh)
    );
}

/// A holder whose lease expired cannot renew it, even before anyone took
/// it over, and not once it was (its old term is refused); its fenced
/// writes are refused, the new holder's go through.
pub fn a_stale_holder_is_refused(store: &dyn Store) {
    let a = store
        .lease_acquire("audit-heads", "ctl-a", LEASE_TTL)
        .expect("acquire")
        .expect("granted");
    let fence_a = Fence {
        lease: "audit-heads".into(),
        holder: "ctl-a".into(),
        term: a.term,
    };
    let head = |seq: u64| SignedHead {
        seq,
        hash: format!("{seq:064x}"),
        time_ms: seq,
        key_id: "k".into(),
        signature: "00".into(),
    };
    let head1 = head(1);
    assert!(
        store
            .audit_put_head_fenced(&fence_a, &head1)
            .expect("fenced put")
    );
    // Shortened only now: under load a call can take longer than it.
    assert!(
        store
            .lease_renew("audit-heads", "ctl-a", a.term, SHORT_TTL)
            .expect("renew")
    );
    std::thread::sleep(SHORT_TTL * 2);
    assert!(
        !store
            .lease_renew("audit-heads", "ctl-a", a.term, LEASE_TTL)
            .expect("renew"),
        "an expired lease is not renewed"
    );
    let head2 = head(2);
    assert!(
        !store
            .audit_put_head_fenced(&fence_a, &head2)
            .expect("fenced put"),
        "an expired holder's fenced write is refused"
    );
    let b = store
        .lease_acquire("audit-heads", "ctl-b", LEASE_TTL)
        .expect("acquire")
        .expect("granted");
    assert!(b.term > a.term);
    assert!(
        !store
            .lease_renew("audit-heads", "ctl-a", a.term, LEASE_TTL)
            .expect("renew"),
        "the old term is not renewed after a takeover"
    );
    assert!(
        !store
            .audit_put_head_fenced(&fence_a, &head2)
            .expect("fenced put"),
        "the old term's fenced write is refused after a takeover"
    );
    let fence_b = Fence {
        lease: "audit-heads".into(),
        holder: "ctl-b".into(),
        term: b.term,
    };
    assert!(
        store
            .audit_put_head_fenced(&fence_b, &head2)
            .expect("fenced put")
    );
    let seqs: Vec<u64> = store
        .audit_heads_from(0)
        .expect("heads")
        .iter()
        .map(|h| h.seq)
        .collect();
    assert_eq!(seqs, [1, 2], "only the fenced writes that held are stored");
}

/// Every function above, each against a fresh store from `fresh`.
/// `put_targets_if`: a pending target is claimed once (of 8 threads
/// racing for each target, exactly one wins it), a result lands only on the
/// state it was decided from.
pub fn a_pending_target_is_claimed_once(store: &dyn Store) {
    let job = "0190ab12-34cd-7ef0-8123-456789abcdee";
    let dispatched = TargetRecord {
        dispatched_at: 7,
        ..TargetRecord::new(TargetState::Dispatched, "")
    };
    let agents: Vec<String> = (0..16).map(|i| format!("host-{i:02}")).collect();
    // A legacy `pending` record counts as pending.
    store
        .put_target(job, "host-00", &TargetRecord::new(TargetState::Pending, ""))
        .expect("put");
    let wins: Vec<Vec<String>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..8)
            .map(|_| {
                s.spawn(|| {
                    let recs: Vec<(&str, &TargetRecord)> =
                        agents.iter().map(|a| (a.as_str(), &dispatched)).collect();
                    store
                        .put_targets_if(job, TargetState::Pending, &recs)
                        .expect("claim")
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("claimer"))
            .collect()
    });
    let mut all: Vec<String> = wins.into_iter().flatten().collect();
    all.sort();
    assert_eq!(all, agents, "every target claimed exactly once");
    // Claimed: a second claim writes nothing.
    assert!(
        store
            .put_targets_if(job, TargetState::Pending, &[("host-01", &dispatched)])
            .expect("claim")
            .is_empty()
    );
    // A result from `dispatched` lands once; a second one (decided from a
    // stale `dispatched`) is refused and the first stays.
    let ok = TargetRecord {
        result: Some(vec![1]),
        ..TargetRecord::new(TargetState::Ok, "")
    };
    let failed = TargetRecord::new(TargetState::Failed, "late");
    assert_eq!(
        store
            .put_targets_if(job, TargetState::Dispatched, &[("host-01", &ok)])
            .expect("result"),
        vec!["host-01".to_owned()]
    );
    assert!(
        store
            .put_targets_if(job, TargetState::Dispatched, &[("host-01", &failed)])
            .expect("stale result")
            .is_empty()
    );
    assert_eq!(store.get_target(job, "host-01").expect("get"), Some(ok));
    // No record and not pending-from: nothing is created.
    assert!(
        store
            .put_targets_if(job, TargetState::Dispatched, &[("host-99", &failed)])
            .expect("update")
            .is_empty()
    );
    assert_eq!(store.get_target(job, "host-99").expect("get"), None);
}

/// Claims: of 8 threads claiming one key exactly one wins; a held key is
/// refused, another key is free; an expired claim is taken over by the
/// next one and pruned; a key of the longest allowed length is kept whole.
pub fn a_claim_has_one_winner_until_it_expires(store: &dyn Store) {
    use crate::claims::{ClaimKey, MAX_CLAIM_KEY_BYTES};
    let key = |k: &str| ClaimKey::parse(k).expect("a valid key");
    let event = key("replay/slack/Ev0123456789");
    let wins = std::thread::scope(|s| {
        let handles: Vec<_> = (0..8)
            .map(|_| s.spawn(|| store.claim(&event, LEASE_TTL).expect("claim")))
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("claimer"))
            .filter(|won| *won)
            .count()
    });
    assert_eq!(wins, 1, "exactly one of 8 concurrent claims wins");
    assert!(!store.claim(&event, LEASE_TTL).expect("claim"), "held");
    let long = key(&"k".repeat(MAX_CLAIM_KEY_BYTES));
    let almost = key(&format!("{}j", "k".repeat(MAX_CLAIM_KEY_BYTES - 1)));
    assert!(store.claim(&long, LEASE_TTL).expect("claim"));
    assert!(
        store.claim(&almost, LEASE_TTL).expect("claim"),
        "a long key is kept whole, not cut to a prefix another key shares"
    );
    assert!(!store.claim(&long, LEASE_TTL).expect("claim"));

    // Expiry: taken over by the next claim, and pruned.
    let short = key("alert/api/ok-down/1700000000000");
    let claimed = std::time::Instant::now();
    assert!(store.claim(&short, SHORT_TTL).expect("claim"));
    let again = store.claim(&short, SHORT_TTL).expect("claim");
    // Only while it still runs: under load two calls can outlast it
    // (`event` above is the held key that must be refused).
    if claimed.elapsed() < SHORT_TTL {
        assert!(!again, "a running claim is refused");
    }
    std::thread::sleep(SHORT_TTL * 2);
    assert!(
        store.claim(&short, SHORT_TTL).expect("claim"),
        "an expired claim is taken over"
    );
    let gone = key("audit/42");
    assert!(store.claim(&gone, SHORT_TTL).expect("claim"));
    std::thread::sleep(SHORT_TTL * 2);
    assert_eq!(
        store.prune_claims().expect("prune"),
        2,
        "the two expired claims are pruned, the running ones kept"
    );
    assert!(
        !store.claim(&event, LEASE_TTL).expect("claim"),
        "still held"
    );
    assert!(
        store.claim(&gone, LEASE_TTL).expect("claim"),
        "pruned, free"
    );
}

/// `put_targets_audited`: targets (of any jobs) and their audit records
/// land together, or none of them does (one target's state moved on, or
/// the first record is not next in the chain).
pub fn targets_and_their_audit_records_are_stored_together(store: &dyn Store) {
    let job = "0190ab12-34cd-7ef0-8123-456789abcdef";
    let other = "0190ab12-34cd-7ef0-8123-456789abcde0";
    let dispatched = TargetRecord {
        dispatched_at: 7,
        ..TargetRecord::new(TargetState::Dispatched, "")
    };
    for (j, a) in [(job, "host-1"), (job, "host-2"), (other, "host-1")] {
        store.put_target(j, a, &dispatched).expect("put");
    }
    let ok = TargetRecord {
        result: Some(vec![1]),
        ..TargetRecord::new(TargetState::Ok, "")
    };
    let mut chain = Chain::genesis();
    let with_index = |r: Record| {
        let index = entries(&r);
        (r, index)
    };
    let audited = |writes: &[(&str, &str)],
                   from,
                   rec: &TargetRecord,
                   records: &[(Record, Vec<AuditIndexEntry>)]| {
        let writes: Vec<TargetWrite<'_>> = writes
            .iter()
            .map(|(job, agent)| TargetWrite { job, agent, rec })
            .collect();
        store.put_targets_audited(from, &writes, records)
    };
    let first = with_index(chain.append(1000, event(1)));
    assert_eq!(
        audited(
            &[(job, "host-1")],
            TargetState::Dispatched,
            &ok,
            std::slice::from_ref(&first)
        )
        .expect("stored"),
        Ok(())
    );
    assert_eq!(
        store.get_target(job, "host-1").expect("get"),
        Some(ok.clone())
    );
    assert_eq!(store.audit_last().expect("last"), Some(first.0.clone()));
    // The same result again (decided from a stale `dispatched`), in a
    // batch with one that is still dispatched: none, and the stale one is
    // named.
    let mut again = chain.clone();
    let second = with_index(again.append(1010, event(2)));
    let third = with_index(again.append(1010, event(3)));
    assert_eq!(
        audited(
            &[(other, "host-1"), (job, "host-1")],
            TargetState::Dispatched,
            &ok,
            &[second.clone(), third.clone()]
        )
        .expect("refused"),
        Err(vec![1])
    );
    assert_eq!(store.audit_last().expect("last"), Some(first.0.clone()));
    assert_eq!(
        store.get_target(other, "host-1").expect("get"),
        Some(dispatched.clone())
    );
    // A record out of sequence (a repeat of the first): none.
    let err = audited(
        &[(job, "host-2")],
        TargetState::Dispatched,
        &ok,
        std::slice::from_ref(&first),
    )
    .expect_err("conflict");
    assert!(matches!(err, StoreError::Conflict { .. }), "{err}");
    assert_eq!(
        store.get_target(job, "host-2").expect("get"),
        Some(dispatched.clone())
    );
    // One target twice in one step: refused, nothing written.
    assert!(
        audited(
            &[(job, "host-2"), (job, "host-2")],
            TargetState::Dispatched,
            &ok,
            std::slice::from_ref(&second)
        )
        .is_err()
    );
    assert_eq!(store.audit_last().expect("last"), Some(first.0.clone()));
    // A claim of several pending targets, one of them no longer pending
    // (another controller claimed it first): none is claimed, no record,
    // and the one that was not pending is named.
    assert_eq!(
        audited(
            &[(job, "host-3"), (job, "host-1"), (job, "host-4")],
            TargetState::Pending,
            &dispatched,
            std::slice::from_ref(&second)
        )
        .expect("refused"),
        Err(vec![1])
    );
    assert_eq!(store.get_target(job, "host-3").expect("get"), None);
    assert_eq!(store.get_target(job, "host-4").expect("get"), None);
    assert_eq!(store.audit_last().expect("last"), Some(first.0.clone()));
    // Without it: both claimed with the record.
    assert_eq!(
        audited(
            &[(job, "host-3"), (job, "host-4")],
            TargetState::Pending,
            &dispatched,
            std::slice::from_ref(&second)
        )
        .expect("claimed"),
        Ok(())
    );
    assert_eq!(store.audit_last().expect("last"), Some(second.0.clone()));
    for host in ["host-3", "host-4"] {
        assert_eq!(
            store.get_target(job, host).expect("get"),
            Some(dispatched.clone())
        );
    }
    // And a batch of results of two jobs with a record each: all, the
    // records in sequence.
    let mut tail = Chain::after(&second.0);
    let third = with_index(tail.append(1020, event(3)));
    let fourth = with_index(tail.append(1020, event(4)));
    assert_eq!(
        audited(
            &[(job, "host-2"), (other, "host-1")],
            TargetState::Dispatched,
            &ok,
            &[third.clone(), fourth.clone()]
        )
        .expect("stored"),
        Ok(())
    );
    assert_eq!(store.audit_last().expect("last"), Some(fourth.0));
    assert_eq!(store.audit_get(third.0.seq).expect("get"), Some(third.0));
    assert_eq!(
        store.get_target(job, "host-2").expect("get"),
        Some(ok.clone())
    );
    assert_eq!(
        store.get_target(other, "host-1").expect("get"),
        Some(ok.clone())
    );

    // At the tip: the records are made after whatever is stored — here
    // after the fourth, which this writer's chain (at the second) has not
    // seen — and stored with the writes.
    for host in ["host-5", "host-6"] {
        store.put_target(job, host, &dispatched).expect("put");
    }
    let at_tip = |writes: &[(&str, &str)], events: &[Event]| {
        let writes: Vec<TargetWrite<'_>> = writes
            .iter()
            .map(|(job, agent)| TargetWrite {
                job,
                agent,
                rec: &ok,
            })
            .collect();
        store.put_targets_audited_at_tip(TargetState::Dispatched, &writes, 1030, events)
    };
    let chain = at_tip(&[(job, "host-5")], &[event(5), event(6)])
        .expect("stored")
        .expect("written");
    let last = store.audit_last().expect("last").expect("a record");
    assert_eq!((chain.seq, &chain.hash), (6, &last.hash));
    assert_eq!(last.event, event(6));
    assert_eq!(
        store.audit_get(5).expect("get").map(|r| r.event),
        Some(event(5))
    );
    assert_eq!(
        store.get_target(job, "host-5").expect("get"),
        Some(ok.clone())
    );
    // A write that finds another state: nothing, and it is named.
    assert_eq!(
        at_tip(&[(job, "host-6"), (job, "host-5")], &[event(7)]).expect("refused"),
        Err(vec![1])
    );
    assert_eq!(store.audit_last().expect("last"), Some(last));
    assert_eq!(
        store.get_target(job, "host-6").expect("get"),
        Some(dispatched)
    );
}

/// Presence: each controller's entry replaces its last one; only entries
/// written within the freshness window are read.
pub fn presence_entries_replace_each_other_and_go_stale(store: &dyn Store) {
    use std::time::Duration;
    let entry = |controller: &str, settling, agents: &[&str]| Presence {
        controller: controller.to_owned(),
        settling,
        agents: agents.iter().map(|a| (*a).to_owned()).collect(),
    };
    assert_eq!(
        store.presence(Duration::from_secs(60)).expect("read"),
        vec![]
    );
    store
        .put_presence(&entry("ctl-a", true, &["web-1"]))
        .expect("put");
    store
        .put_presence(&entry("ctl-b", false, &[]))
        .expect("put");
    store
        .put_presence(&entry("ctl-a", false, &["web-1", "web-2"]))
        .expect("put");
    let mut got = store.presence(Duration::from_secs(60)).expect("read");
    got.sort_by(|x, y| x.controller.cmp(&y.controller));
    assert_eq!(
        got,
        vec![
            entry("ctl-a", false, &["web-1", "web-2"]),
            entry("ctl-b", false, &[])
        ]
    );
    std::thread::sleep(Duration::from_millis(300));
    store
        .put_presence(&entry("ctl-b", false, &["db-1"]))
        .expect("put");
    assert_eq!(
        store.presence(Duration::from_millis(200)).expect("read"),
        vec![entry("ctl-b", false, &["db-1"])],
        "ctl-a's entry is stale"
    );
    // A touch stamps an entry again, with its agents, and sets settling.
    assert!(store.touch_presence("ctl-a", true).expect("touch"));
    let mut got = store.presence(Duration::from_millis(200)).expect("read");
    got.sort_by(|x, y| x.controller.cmp(&y.controller));
    assert_eq!(
        got,
        vec![
            entry("ctl-a", true, &["web-1", "web-2"]),
            entry("ctl-b", false, &["db-1"])
        ]
    );
    assert!(
        !store.touch_presence("ctl-c", false).expect("touch"),
        "no entry to touch"
    );
    assert_eq!(
        store.presence(Duration::from_secs(60)).expect("read").len(),
        2
    );
}

/// Agents' live rows: one per agent, replaced by the next write (whoever
/// writes it), all read, or only those written lately.
pub fn agent_live_rows_are_one_per_agent_and_read_by_age(store: &dyn Store) {
    use std::time::Duration;
    let row = |agent: &str, controller: &str, data: &[u8]| AgentLive {
        agent: agent.to_owned(),
        controller: controller.to_owned(),
        data: data.to_vec(),
    };
    assert_eq!(store.agents_live(None).expect("read"), vec![]);
    store
        .put_agents_live(&[row("web-1", "ctl-a", b"one"), row("web-2", "ctl-a", b"")])
        .expect("put");
    store.put_agents_live(&[]).expect("nothing to put");
    // web-1 moved to ctl-b: its row is ctl-b's now.
    store
        .put_agents_live(&[row("web-1", "ctl-b", &[0, 255, 10])])
        .expect("put");
    let mut got = store.agents_live(None).expect("read");
    got.sort_by(|x, y| x.agent.cmp(&y.agent));
    assert_eq!(
        got,
        vec![
            row("web-1", "ctl-b", &[0, 255, 10]),
            row("web-2", "ctl-a", b"")
        ]
    );
    std::thread::sleep(Duration::from_millis(300));
    store
        .put_agents_live(&[row("db-1", "ctl-b", b"db")])
        .expect("put");
    assert_eq!(
        store
            .agents_live(Some(Duration::from_millis(200)))
            .expect("read"),
        vec![row("db-1", "ctl-b", b"db")],
        "only the row written within 200 ms"
    );
    assert_eq!(store.agents_live(None).expect("read").len(), 3);
}

/// An exporter's cursor is written only under the current grant of its
/// lease, and read back as written.
pub fn export_cursors_are_written_only_under_their_lease(store: &dyn Store) {
    let lease = "audit-export:siem";
    assert_eq!(store.export_cursor("siem").expect("read"), None);
    let a = store
        .lease_acquire(lease, "ctl-a", LEASE_TTL)
        .expect("acquire")
        .expect("granted");
    let fence_a = Fence {
        lease: lease.into(),
        holder: "ctl-a".into(),
        term: a.term,
    };
    let at = |records, heads| ExportCursor { records, heads };
    assert!(
        store
            .put_export_cursor_fenced(&fence_a, "siem", at(500, 3))
            .expect("put")
    );
    assert_eq!(store.export_cursor("siem").expect("read"), Some(at(500, 3)));
    // Another name's lease does not fence this one.
    let other = Fence {
        lease: "audit-heads".into(),
        ..fence_a.clone()
    };
    assert!(
        !store
            .put_export_cursor_fenced(&other, "siem", at(9, 9))
            .expect("put")
    );
    // Shortened only now: under load a call can take longer than it.
    assert!(
        store
            .lease_renew(lease, "ctl-a", a.term, SHORT_TTL)
            .expect("renew")
    );
    std::thread::sleep(SHORT_TTL * 2);
    assert!(
        !store
            .put_export_cursor_fenced(&fence_a, "siem", at(700, 4))
            .expect("put"),
        "an expired holder's cursor is refused"
    );
    let b = store
        .lease_acquire(lease, "ctl-b", LEASE_TTL)
        .expect("acquire")
        .expect("granted");
    let fence_b = Fence {
        lease: lease.into(),
        holder: "ctl-b".into(),
        term: b.term,
    };
    assert!(
        store
            .put_export_cursor_fenced(&fence_b, "siem", at(1000, 5))
            .expect("put")
    );
    assert!(
        !store
            .put_export_cursor_fenced(&fence_a, "siem", at(1, 1))
            .expect("put"),
        "the old term stays refused"
    );
    assert_eq!(
        store.export_cursor("siem").expect("read"),
        Some(at(1000, 5))
    );
    assert_eq!(store.export_cursor("other").expect("read"), None);
}

pub fn run_all(fresh: &mut dyn FnMut() -> Box<dyn Store>) {
    jobs_are_listed_by_the_backend(fresh().as_ref());
    targets_keep_their_states(fresh().as_ref());
    a_pending_target_is_claimed_once(fresh().as_ref());
    a_job_is_created_whole_or_not_at_all(fresh().as_ref());
    concurrent_creations_of_one_short_id_have_one_winner(fresh().as_ref());
    tokens_are_used_up_and_expire(fresh().as_ref());
    agents_are_enrolled_and_revoked(fresh().as_ref());
    the_policy_is_the_last_one_put(fresh().as_ref());
    concurrent_pushes_of_one_version_have_one_winner(fresh().as_ref());
    the_audit_log_is_one_contiguous_chain(fresh().as_ref());
    targets_and_their_audit_records_are_stored_together(fresh().as_ref());
    presence_entries_replace_each_other_and_go_stale(fresh().as_ref());
    agent_live_rows_are_one_per_agent_and_read_by_age(fresh().as_ref());
    export_cursors_are_written_only_under_their_lease(fresh().as_ref());
    health_state_and_history_are_kept(fresh().as_ref());
    revocations_are_kept(fresh().as_ref());
    a_lease_has_one_holder_and_terms_grow(fresh().as_ref());
    a_stale_holder_is_refused(fresh().as_ref());
    ended_leases_under_a_prefix_are_pruned(fresh().as_ref());
    a_claim_has_one_winner_until_it_expires(fresh().as_ref());
}

#[cfg(test)]
mod tests {
    use crate::store::{RedbStore, SledStore};

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

    #[test]
    fn the_redb_backend_passes_the_conformance_suite() {
        let mut dirs = Vec::new();
        super::run_all(&mut || {
            let dir = tempfile::tempdir().expect("tempdir");
            let store = RedbStore::open(&dir.path().join("db.redb")).expect("open");
            dirs.push(dir);
            Box::new(store)
        });
    }
}
