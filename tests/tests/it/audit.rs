//! Issue 6: the audit trail records real flows, is hash-chained
//! with signed heads so that editing, removing, reordering or inserting a
//! record in the store is detected (and named), verifies offline from an
//! export with only the public key, and is searchable.

use fleetcmd_proto::v1::JobState;
use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use fleetcmd_cli::audit_cmd::{self, SearchArgs, Trail};
use fleetcmd_controller::audit::{Audit, codec};
use fleetcmd_controller::store::{SledStore, Store};
use fleetcmd_core::audit::{Event, EventKind, ExportLine, Filter, Record};
use fleetcmd_core::crypto::PublicKey;
use fleetcmd_proto::v1 as pb;
use fleetcmd_tests::*;

use crate::support::*;

async fn search(fleet: &TestFleet, args: SearchArgs) -> Vec<Record> {
    audit_cmd::search(fleet.operator().await, &args)
        .await
        .unwrap_or_else(|f| panic!("search: {:#}", f.error))
        .0
}

fn kinds(records: &[Record]) -> BTreeSet<EventKind> {
    records.iter().map(|r| r.event.kind).collect()
}

fn audit_pub(fleet: &TestFleet) -> PublicKey {
    let text = std::fs::read_to_string(fleet.dir.join("controller/audit/audit.pub"))
        .expect("audit.pub written on first start");
    PublicKey::parse(text.trim()).expect("audit public key")
}

async fn fetch(fleet: &TestFleet) -> Trail {
    audit_cmd::fetch(fleet.operator().await, 1)
        .await
        .unwrap_or_else(|f| panic!("export: {:#}", f.error))
}

#[tokio::test]
async fn real_flows_produce_their_audit_events() {
    let mut fleet = security_fleet(2).await;
    // A job that runs and one an agent refuses on its own (forged signer).
    let job = fleet
        .run("echo", &[("text", "hello")], "all")
        .await
        .expect("job");
    assert_eq!(job.job_state(), JobState::Succeeded, "{job:?}");
    let forged = spec("uptime", &[], "all", "cli:admin");
    let forged_id = forged.id.to_string();
    let signed = fleetcmd_core::job::SignedJob::sign(&forged, "operator-dev", &stranger_key());
    inject(&fleet, signed, &forged_id, &["dev-1"]).await;
    // Authentication failures: no certificate, wrong role.
    let status = pb::jobs_client::JobsClient::new(fleet.anonymous().await)
        .list(pb::ListJobsRequest::default())
        .await
        .expect_err("no certificate");
    assert_eq!(status.code(), tonic::Code::Unauthenticated);
    let agent_ch = fleetcmd_proto::channel::connect(&fleet.url, &fleet.agent_tls("dev-2"))
        .await
        .expect("agent connects");
    pb::jobs_client::JobsClient::new(agent_ch)
        .list(pb::ListJobsRequest::default())
        .await
        .expect_err("wrong role");
    // A refused policy (rollback) and a revocation.
    let old = security_policy(&fleet, 1);
    assert!(fleet.push_policy(&old).await.is_err(), "rollback refused");
    pb::agents_client::AgentsClient::new(fleet.operator().await)
        .revoke(pb::RevokeRequest {
            agent_id: "dev-2".into(),
        })
        .await
        .expect("revoke");
    // The gateway reports what only it sees.
    pb::audit_client::AuditClient::new(fleet.gateway().await)
        .report(pb::AuditReportRequest {
            kind: "chat_denied".into(),
            actor: "console:mallory".into(),
            source: "console".into(),
            command: "restart".into(),
            detail: "missing role oncall".into(),
            job_id: String::new(),
        })
        .await
        .expect("gateway reports a chat denial");

    let all = search(
        &fleet,
        SearchArgs {
            limit: 1000,
            ..Default::default()
        },
    )
    .await;
    let seen = kinds(&all);
    for k in [
        EventKind::TokenCreated,
        EventKind::TokenUsed,
        EventKind::AgentJoined,
        EventKind::PolicyPushed,
        EventKind::PolicyRefused,
        EventKind::JobSubmitted,
        EventKind::JobDispatched,
        EventKind::JobFinished,
        EventKind::JobRefusedByAgent,
        EventKind::AuthFailed,
        EventKind::AgentRevoked,
        EventKind::ChatDenied,
    ] {
        assert!(seen.contains(&k), "no {k} event in {seen:?}");
    }
    // Newest first, numbered without gaps.
    let seqs: Vec<u64> = all.iter().map(|r| r.seq).collect();
    let mut sorted = seqs.clone();
    sorted.sort_unstable_by(|a, b| b.cmp(a));
    assert_eq!(seqs, sorted);
    assert_eq!(seqs.last(), Some(&1));

    // What a job's records say.
    let of_job = search(
        &fleet,
        SearchArgs {
            job: Some(job.job_id.clone()),
            limit: 100,
            ..Default::default()
        },
    )
    .await;
    let submitted = of_job
        .iter()
        .find(|r| r.event.kind == EventKind::JobSubmitted)
        .expect("job_submitted");
    assert_eq!(submitted.event.actor, "cli:admin");
    assert_eq!(submitted.event.source, "cli:admin");
    assert_eq!(submitted.event.command, "echo");
    assert_eq!(submitted.event.fields["args"], "text=hello");
    assert_eq!(submitted.event.fields["selector"], "all");
    assert_eq!(submitted.event.fields["target_count"], "2");
    let finished: Vec<_> = of_job
        .iter()
        .filter(|r| r.event.kind == EventKind::JobFinished)
        .collect();
    assert_eq!(finished.len(), 2, "{of_job:#?}");
    for f in finished {
        assert_eq!(f.event.fields["exit_code"], "0");
        assert_eq!(
            f.event.fields["stdout_bytes"], "6",
            "\"hello\\n\" counted, not stored"
        );
        assert!(f.event.fields.contains_key("duration_ms"));
        assert!(!serde_json::to_string(f).expect("json").contains("hello\\n"));
    }
    // Dispatch is recorded once per chunk of hosts, not once per host; the
    // host index still finds the record from each of its hosts
    // (`audit search --host`).
    let dispatched: Vec<_> = of_job
        .iter()
        .filter(|r| r.event.kind == EventKind::JobDispatched)
        .collect();
    assert_eq!(dispatched.len(), 1, "{of_job:#?}");
    assert_eq!(dispatched[0].event.fields["target_count"], "2");
    for host in ["dev-1", "dev-2"] {
        let by_host = search(
            &fleet,
            SearchArgs {
                host: Some(host.into()),
                kind: vec!["job_dispatched".into()],
                limit: 100,
                ..Default::default()
            },
        )
        .await;
        assert!(
            by_host
                .iter()
                .any(|r| r.event.job_id == job.job_id && r.event.hosts.iter().any(|h| h == host)),
            "{host}: {by_host:#?}"
        );
    }
    let refused = search(
        &fleet,
        SearchArgs {
            job: Some(forged_id),
            ..Default::default()
        },
    )
    .await;
    assert!(
        refused
            .iter()
            .any(|r| r.event.kind == EventKind::JobRefusedByAgent && !r.event.detail.is_empty()),
        "{refused:#?}"
    );
    let auth = search(
        &fleet,
        SearchArgs {
            kind: vec!["auth_failed".into()],
            ..Default::default()
        },
    )
    .await;
    assert!(auth.iter().any(|r| r.event.actor == "anonymous"));
    assert!(
        auth.iter()
            .any(|r| r.event.actor == "agent:dev-2" && r.event.detail.contains("wrong role"))
    );
    let pushed = search(
        &fleet,
        SearchArgs {
            kind: vec!["policy_pushed".into()],
            ..Default::default()
        },
    )
    .await;
    assert_eq!(pushed[0].event.fields["version"], "2");
    assert_eq!(pushed[0].event.fields["previous_version"], "1");
    assert!(
        pushed[0].event.fields["hash"].len() >= 64,
        "policy hash recorded"
    );

    // The whole trail verifies, with a head signed at shutdown.
    fleet
        .restart_controller(Duration::ZERO)
        .await
        .expect("restart");
    let trail = fetch(&fleet).await;
    assert!(!trail.heads.is_empty(), "a head is signed at shutdown");
    let v = audit_cmd::verify_trail(&trail, &audit_pub(&fleet), None).expect("intact trail");
    assert_eq!(v.records as usize, trail.records.len());
    assert_eq!(v.signed_up_to, v.last, "shutdown signed the newest record");
    fleet.fleet.shutdown().await.expect("shutdown");
}

/// Verifies the live store and returns the first bad sequence number.
fn first_bad(audit: &Audit) -> Option<u64> {
    match audit.verify(None).expect("store readable") {
        Ok(_) => None,
        Err(b) => Some(b.seq()),
    }
}

#[tokio::test]
async fn tampering_with_the_stored_trail_is_detected_and_named() {
    let fleet = start_fleet(1).await;
    let shared = fleet.controller.shared().clone();
    for i in 0..6 {
        shared.security_event(Event::new(EventKind::ChatDenied, format!("console:u{i}")));
    }
    let audit = shared.audit.clone();
    assert_eq!(first_bad(&audit), None);
    let sled: &SledStore = (shared.store.as_ref() as &dyn std::any::Any)
        .downcast_ref()
        .expect("the test fleet runs on sled");
    let tree = sled.raw_tree("audit").expect("audit tree");
    let key = |s: u64| s.to_be_bytes();
    let get = |s: u64| -> Vec<u8> { tree.get(key(s)).expect("get").expect("record").to_vec() };
    let n = audit.last_seq();
    assert!(n >= 8);

    // Edit: record 3 says someone else did it.
    let orig3 = get(3);
    let mut r3: Record = codec::decode(&orig3).expect("record");
    r3.event.actor = "cli:nobody".into();
    tree.insert(key(3), codec::encode(&r3)).expect("edit");
    assert_eq!(first_bad(&audit), Some(3), "edited");
    tree.insert(key(3), orig3.clone()).expect("restore");
    assert_eq!(first_bad(&audit), None);

    // Delete record 4.
    let orig4 = get(4);
    tree.remove(key(4)).expect("delete");
    assert_eq!(first_bad(&audit), Some(4), "deleted");
    tree.insert(key(4), orig4.clone()).expect("restore");

    // Reorder records 4 and 5 (values swapped under their keys).
    let orig5 = get(5);
    tree.insert(key(4), orig5.clone()).expect("swap");
    tree.insert(key(5), orig4.clone()).expect("swap");
    assert_eq!(first_bad(&audit), Some(4), "reordered");
    tree.insert(key(4), orig4.clone()).expect("restore");
    tree.insert(key(5), orig5.clone()).expect("restore");

    // Insert a well-formed record after 4 (linked to it), shifting the rest.
    let r4: Record = codec::decode(&orig4).expect("record");
    let mut chain = fleetcmd_core::audit::Chain::after(&r4);
    let forged = chain.append(
        r4.time_ms,
        Event::new(EventKind::PolicyPushed, "cli:mallory"),
    );
    let tail: Vec<Vec<u8>> = (5..=n).map(get).collect();
    tree.insert(key(5), codec::encode(&forged)).expect("insert");
    for (i, v) in tail.iter().enumerate() {
        let mut r: Record = codec::decode(v).expect("record");
        r.seq = 6 + i as u64;
        tree.insert(key(r.seq), codec::encode(&r)).expect("shift");
    }
    assert_eq!(
        first_bad(&audit),
        Some(6),
        "inserted: the record after the forged one breaks"
    );
    for (i, v) in tail.iter().enumerate() {
        tree.insert(key(5 + i as u64), v.clone()).expect("restore");
    }
    tree.remove(key(n + 1)).expect("restore");
    assert_eq!(first_bad(&audit), None);

    // A consistently rewritten chain is caught by the signed head; the same
    // goes for truncation (the newest records removed).
    audit.sign_head().expect("head").expect("something to sign");
    let mut chain = fleetcmd_core::audit::Chain::after(&codec::decode(&get(n - 2)).expect("r"));
    for s in n - 1..=n {
        let r = chain.append(0, Event::new(EventKind::TokenCreated, "cli:mallory"));
        assert_eq!(r.seq, s);
        tree.insert(key(s), codec::encode(&r)).expect("rewrite");
    }
    assert_eq!(
        first_bad(&audit),
        Some(n),
        "rewritten after the signed head's record"
    );
    tree.remove(key(n)).expect("truncate");
    tree.remove(key(n - 1)).expect("truncate");
    assert_eq!(first_bad(&audit), Some(n - 1), "truncated");

    // The CLI path over gRPC names the same record.
    let trail = fetch(&fleet).await;
    let err = audit_cmd::verify_trail(&trail, &audit_pub(&fleet), None).expect_err("broken");
    assert_eq!(err.seq(), n - 1, "{err}");
    fleet.fleet.shutdown().await.expect("shutdown");
}

#[tokio::test]
async fn an_export_verifies_offline_with_only_the_public_key() {
    let fleet = start_fleet(1).await;
    fleet.run("uptime", &[], "all").await.expect("job");
    fleet.controller.shared().audit.sign_head().expect("head");
    let trail = fetch(&fleet).await;
    let mut text = String::new();
    for h in &trail.heads {
        text.push_str(
            &serde_json::to_string(&ExportLine::Head {
                signed_head: h.clone(),
            })
            .expect("json"),
        );
        text.push('\n');
    }
    for r in &trail.records {
        text.push_str(&serde_json::to_string(&ExportLine::Record(r.clone())).expect("json"));
        text.push('\n');
    }
    let key = audit_pub(&fleet);
    let dir = fleet.path();
    fleet.fleet.shutdown().await.expect("shutdown");

    let file = dir.join("audit.jsonl");
    std::fs::write(&file, &text).expect("write export");
    let parsed = audit_cmd::parse_lines(&text).expect("parses");
    let v = audit_cmd::verify_trail(&parsed, &key, None).expect("intact export");
    assert_eq!(v.records as usize, trail.records.len());
    assert!(v.heads >= 1);
    // --from starts in the middle.
    let from = audit_cmd::verify_trail(&parsed, &key, Some(3)).expect("from 3");
    assert_eq!(from.first, 3);
    // Another key does not verify the heads.
    let other = stranger_key().public_key();
    assert!(audit_cmd::verify_trail(&parsed, &other, None).is_err());
    // An edited line is named.
    let edited = text.replacen("cli:admin", "cli:nobody", 1);
    let parsed = audit_cmd::parse_lines(&edited).expect("parses");
    let err = audit_cmd::verify_trail(&parsed, &key, None).expect_err("edited export");
    assert!(err.seq() >= 1, "{err}");
    let lines: Vec<&str> = text.lines().collect();
    let last_record = lines.len() - 1;
    let truncated = lines[..last_record].join("\n");
    let err = audit_cmd::verify_trail(
        &audit_cmd::parse_lines(&truncated).expect("parses"),
        &key,
        None,
    )
    .expect_err("truncated export");
    assert!(
        matches!(err, fleetcmd_core::audit::Broken::Truncated { .. }),
        "{err}"
    );
    assert!(file.exists());
}

#[test]
fn search_filters_return_exactly_the_expected_records() {
    let dir = tempfile::tempdir().expect("tmp");
    let store: Arc<dyn Store> = Arc::new(SledStore::open(&dir.path().join("db")).expect("open"));
    let audit = Audit::open(store, &dir.path().join("audit")).expect("audit");
    // 300 records, one per second: actors a0..a2, hosts h0..h4, commands
    // uptime/restart, jobs j-<i/10>.
    for i in 0..300u64 {
        let kind = if i % 7 == 0 {
            EventKind::AuthFailed
        } else {
            EventKind::JobFinished
        };
        let e = Event::new(kind, format!("cli:a{}", i % 3))
            .host(format!("h{}", i % 5))
            .command(if i % 2 == 0 { "uptime" } else { "restart" })
            .job(format!("0190aaaa-0000-7000-8000-{:012}", i / 10))
            .detail(format!("event number {i}"));
        audit.append_at(1_000_000 + i * 1000, e).expect("append");
    }
    let t = |i: u64| 1_000_000 + i * 1000;
    let expect = |pred: &dyn Fn(u64) -> bool| -> Vec<u64> {
        (0..300).rev().filter(|i| pred(*i)).map(|i| i + 1).collect()
    };
    let run = |f: Filter| -> Vec<u64> {
        let mut out = Vec::new();
        let mut before = None;
        loop {
            let page = audit.search(&f, 7, before).expect("search");
            out.extend(page.records.iter().map(|r| r.seq));
            match page.next_before {
                Some(b) => before = Some(b),
                None => return out,
            }
        }
    };
    let f = |g: &dyn Fn(&mut Filter)| {
        let mut x = Filter::default();
        g(&mut x);
        x
    };
    // Actor + time range (the benchmarked query), paged by 7.
    assert_eq!(
        run(f(&|x| {
            x.actor = Some("cli:a1".into());
            x.since_ms = Some(t(100));
            x.until_ms = Some(t(200));
        })),
        expect(&|i| i % 3 == 1 && (100..200).contains(&i))
    );
    assert_eq!(
        run(f(&|x| x.host = Some("h3".into()))),
        expect(&|i| i % 5 == 3)
    );
    assert_eq!(
        run(f(&|x| x.command = Some("restart".into()))),
        expect(&|i| i % 2 == 1)
    );
    assert_eq!(
        run(f(&|x| x.job_id = fleetcmd_core::ids::JobRef::parse(
            "0190aaaa-0000-7000-8000-000000000012"
        )
        .ok())),
        expect(&|i| i / 10 == 12)
    );
    assert_eq!(
        run(f(&|x| x.kinds = vec![EventKind::AuthFailed])),
        expect(&|i| i % 7 == 0)
    );
    assert_eq!(run(f(&|x| x.text = Some("NUMBER 42".into()))), vec![43]);
    assert_eq!(
        run(f(&|x| {
            x.since_ms = Some(t(290));
        })),
        expect(&|i| i >= 290)
    );
    assert_eq!(
        run(f(&|x| {
            x.until_ms = Some(t(5));
        })),
        expect(&|i| i < 5)
    );
    assert_eq!(
        run(f(&|x| {
            x.actor = Some("cli:a2".into());
            x.host = Some("h0".into());
            x.command = Some("uptime".into());
        })),
        expect(&|i| i % 3 == 2 && i % 5 == 0 && i % 2 == 0)
    );
    assert_eq!(
        run(f(&|x| x.actor = Some("cli:nobody".into()))),
        Vec::<u64>::new()
    );
    // The first page is the newest.
    let page = audit.search(&Filter::default(), 3, None).expect("search");
    assert_eq!(
        page.records.iter().map(|r| r.seq).collect::<Vec<_>>(),
        vec![300, 299, 298]
    );
    assert_eq!(page.next_before, Some(298));
}

/// Retention: the oldest records go, a signed checkpoint for the last one
/// removed keeps the rest verifiable (in the store and offline from an
/// export), the chain continues after a restart, and removing or forging
/// the checkpoint is detected.
/// An agent's own results (`agent:NAME` about host NAME) are indexed under
/// the host only; a search by that actor still finds them, merged in time
/// order with the agent's other records, across pages and with a time range.
#[test]
fn an_agents_results_are_found_by_actor_and_by_host() {
    let dir = tempfile::tempdir().expect("tmp");
    let store: Arc<dyn Store> = Arc::new(SledStore::open(&dir.path().join("db")).expect("open"));
    let audit = Audit::open(store, &dir.path().join("audit")).expect("audit");
    for i in 0..60u64 {
        let agent = format!("web-{}", i % 3);
        let e = match i % 4 {
            // about another host: indexed under the actor
            0 => Event::new(EventKind::AuthFailed, format!("agent:{agent}")).host("other"),
            // about no host: indexed under the actor
            1 => Event::new(EventKind::AgentRenewed, format!("agent:{agent}")),
            // the agent's own result: indexed under the host only
            _ => Event::new(EventKind::JobFinished, format!("agent:{agent}"))
                .job(format!("0190aaaa-0000-7000-8000-{i:012}"))
                .host(&agent),
        };
        audit.append_at(1_000_000 + i * 1000, e).expect("append");
    }
    let run = |f: Filter| -> Vec<u64> {
        let mut out = Vec::new();
        let mut before = None;
        loop {
            let page = audit.search(&f, 4, before).expect("search");
            out.extend(page.records.iter().map(|r| r.seq));
            match page.next_before {
                Some(b) => before = Some(b),
                None => return out,
            }
        }
    };
    let by_actor = |a: &str, since: Option<u64>| Filter {
        actor: Some(a.into()),
        since_ms: since,
        ..Default::default()
    };
    let expect = |pred: &dyn Fn(u64) -> bool| -> Vec<u64> {
        (0..60).rev().filter(|i| pred(*i)).map(|i| i + 1).collect()
    };
    assert_eq!(run(by_actor("agent:web-1", None)), expect(&|i| i % 3 == 1));
    assert_eq!(
        run(by_actor("agent:web-2", Some(1_030_000))),
        expect(&|i| i % 3 == 2 && i >= 30)
    );
    assert_eq!(
        run(Filter {
            host: Some("web-0".into()),
            ..Default::default()
        }),
        expect(&|i| i % 3 == 0 && i % 4 >= 2)
    );
}

#[test]
fn retention_prunes_behind_a_signed_checkpoint_and_the_rest_still_verifies() {
    let dir = tempfile::tempdir().expect("tmp");
    let db = dir.path().join("db");
    let audit_dir = dir.path().join("audit");
    let t = |i: u64| 1_000_000 + i * 1000;
    let checkpoint_seq;
    {
        let store: Arc<dyn Store> = Arc::new(SledStore::open(&db).expect("open"));
        let audit = Audit::open(store.clone(), &audit_dir).expect("audit");
        for i in 0..100u64 {
            audit
                .append_at(
                    t(i),
                    Event::new(EventKind::ChatDenied, format!("cli:a{}", i % 3)).command("uptime"),
                )
                .expect("append");
            if i == 49 {
                audit.sign_head().expect("head");
            }
        }
        audit.sign_head().expect("head");
        // Older than record 60's time, but exporters have only sent up to 40.
        assert_eq!(audit.prune(t(60), 40, 1000).expect("prune"), 40);
        // Then they catch up: up to 60 (time-bound), in batches of 7.
        let mut removed = 0;
        while let n @ 1.. = audit.prune(t(60), u64::MAX, 7).expect("prune") {
            removed += n;
        }
        assert_eq!(removed, 20);
        checkpoint_seq = 60;
        assert_eq!(audit.first_seq().expect("first"), Some(61));
        let v = audit
            .verify(None)
            .expect("read")
            .expect("verifies after pruning");
        assert_eq!((v.first, v.last), (61, 100));
        // Pruned records are gone from search too (indexes included).
        let page = audit
            .search(
                &Filter {
                    actor: Some("cli:a0".into()),
                    ..Default::default()
                },
                1000,
                None,
            )
            .expect("search");
        assert!(
            page.records.iter().all(|r| r.seq > 60),
            "{:?}",
            page.records.len()
        );
        assert_eq!(
            page.records.len(),
            (61..=100).filter(|s| (s - 1) % 3 == 0).count()
        );

        // Offline: an export (records + heads) verifies with only the key.
        let trail = Trail {
            records: audit.records_from(1, 10_000).expect("records"),
            heads: audit.heads_from(0).expect("heads"),
            controller_key: String::new(),
        };
        let v = audit_cmd::verify_trail(&trail, &audit.public_key(), None).expect("offline");
        assert_eq!((v.first, v.last), (61, 100));
        // Without the checkpoint the gap is named; with a forged one too.
        let mut no_checkpoint = Trail {
            heads: trail
                .heads
                .iter()
                .filter(|h| h.seq != checkpoint_seq)
                .cloned()
                .collect(),
            ..trail.clone()
        };
        let err = audit_cmd::verify_trail(&no_checkpoint, &audit.public_key(), None)
            .expect_err("no checkpoint");
        assert!(
            err.to_string().contains("no signed retention checkpoint"),
            "{err}"
        );
        let mut forged = trail
            .heads
            .iter()
            .find(|h| h.seq == checkpoint_seq)
            .cloned()
            .expect("checkpoint head");
        forged.hash = "00".repeat(32);
        no_checkpoint.heads.push(forged);
        let err = audit_cmd::verify_trail(&no_checkpoint, &audit.public_key(), None)
            .expect_err("forged checkpoint");
        assert!(err.to_string().contains("retention checkpoint"), "{err}");
        // An edited first record after the checkpoint is caught.
        let mut edited = trail.clone();
        edited.records[0].event.actor = "cli:someone-else".into();
        let err = audit_cmd::verify_trail(&edited, &audit.public_key(), None).expect_err("edited");
        assert_eq!(err.seq(), 61, "{err}");
        store.flush().expect("flush");
        store.close();
    }
    // After a restart the chain continues where it was.
    let store: Arc<dyn Store> = Arc::new(SledStore::open(&db).expect("reopen"));
    let audit = Audit::open(store, &audit_dir).expect("audit");
    let seq = audit
        .append_at(t(200), Event::new(EventKind::ChatDenied, "cli:a9"))
        .expect("append");
    assert_eq!(seq, 101);
    let v = audit
        .verify(None)
        .expect("read")
        .expect("verifies after restart");
    assert_eq!((v.first, v.last), (61, 101));
}
