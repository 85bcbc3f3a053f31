//! Continuous audit export: sinks that fail, time out and
//! recover, and a controller restart in the middle — every record arrives
//! exactly once and in order (sequence numbers checked at the sink), with
//! the signed heads alongside. Elasticsearch `_bulk` and Splunk HEC are
//! local servers speaking their documented formats and errors.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::routing::post;
use fleetcmd_controller::audit::export::{ExportConfig, SinkConfig};
use fleetcmd_controller::{ControllerConfig, RunningController};
use fleetcmd_core::audit::{Event, EventKind, ExportLine};
use fleetcmd_tests::*;

fn config(data: &Path, exports: Vec<ExportConfig>) -> ControllerConfig {
    ControllerConfig {
        audit_export: exports,
        audit_retention: None,
        store_cache_bytes: fleetcmd_controller::store::DEFAULT_CACHE_BYTES,
        postgres: None,
        embedded: Default::default(),
        services: Vec::new(),
        host_alerts: None,
        metrics_listen: None,
        listen: "127.0.0.1:0".parse().expect("addr"),
        data_dir: data.to_path_buf(),
        tls_names: Vec::new(),
        policy_roots: vec![stranger_key().public_key()],
        policy_threshold: 1,
        agent_cert_ttl: Duration::from_secs(3600),
        operator_cert_ttl: Duration::from_secs(7 * 86400),
        gateway_cert_ttl: Duration::from_secs(30 * 86400),
        heartbeat_interval: Duration::from_secs(10),
        job_retention: Duration::from_secs(86400),
        job_store_max_bytes: 1 << 30,
    }
}

fn export(name: &str, sink: SinkConfig) -> ExportConfig {
    ExportConfig {
        name: name.into(),
        sink,
        batch: 7,
        timeout: Duration::from_millis(500),
        retry_initial: Duration::from_millis(50),
        retry_max: Duration::from_millis(200),
    }
}

async fn start(cfg: ControllerConfig) -> RunningController {
    init();
    fleetcmd_controller::start(cfg)
        .await
        .expect("controller starts")
}

/// Appends `n` records and returns the last sequence number.
fn append(c: &RunningController, n: usize, tag: &str) -> u64 {
    let mut last = 0;
    for i in 0..n {
        last = c
            .shared()
            .audit
            .record(
                Event::new(EventKind::ChatDenied, "console:tester").detail(format!("{tag} {i}")),
            )
            .expect("recorded");
    }
    last
}

/// Record sequence numbers and head count in JSON lines.
fn seqs(lines: &[String]) -> (Vec<u64>, usize) {
    let mut records = Vec::new();
    let mut heads = 0;
    for l in lines {
        match serde_json::from_str::<ExportLine>(l).expect("an export line") {
            ExportLine::Record(r) => records.push(r.seq),
            ExportLine::Head { .. } => heads += 1,
        }
    }
    (records, heads)
}

fn assert_exactly(records: &[u64], last: u64) {
    let want: Vec<u64> = (1..=last).collect();
    assert_eq!(records, want.as_slice(), "every record once, in order");
}

fn file_lines(path: &Path, keep: u32) -> Vec<String> {
    // Oldest rotated file first.
    let mut files: Vec<PathBuf> = (1..=keep)
        .rev()
        .map(|n| PathBuf::from(format!("{}.{n}", path.display())))
        .collect();
    files.push(path.to_path_buf());
    files
        .iter()
        .filter_map(|f| std::fs::read_to_string(f).ok())
        .flat_map(|t| t.lines().map(str::to_string).collect::<Vec<_>>())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn file_and_syslog_exports_survive_a_restart_with_no_gap_and_no_duplicate() {
    let tmp = tempfile::tempdir().expect("tmp");
    let data = tmp.path().join("controller");
    let out = tmp.path().join("audit.jsonl");
    let sock_path = tmp.path().join("log.sock");
    let sock = tokio::net::UnixDatagram::bind(&sock_path).expect("syslog socket");
    // Read the syslog socket from the start, as syslogd would: a reader that
    // stalls makes the sink time out and retry the batch (at least once).
    let (dgram_tx, mut dgrams) = tokio::sync::mpsc::unbounded_channel::<String>();
    tokio::spawn(async move {
        let mut buf = vec![0u8; 65536];
        while let Ok(n) = sock.recv(&mut buf).await {
            if dgram_tx
                .send(String::from_utf8_lossy(&buf[..n]).to_string())
                .is_err()
            {
                break;
            }
        }
    });
    let exports = vec![
        export(
            "file",
            SinkConfig::File {
                path: out.clone(),
                max_bytes: 4096,
                keep: 50,
            },
        ),
        export(
            "syslog",
            SinkConfig::Syslog {
                socket: sock_path.clone(),
            },
        ),
    ];
    let mut c = start(config(&data, exports.clone())).await;
    append(&c, 40, "before");
    c.stop().await.expect("stop");
    // While the controller is down nothing is exported; after the restart
    // the exporters resume from their cursors.
    let c = start(config(&data, exports)).await;
    let last = append(&c, 40, "after");
    let lines = assert_eventually(Duration::from_secs(20), || {
        let out = out.clone();
        async move {
            let lines = file_lines(&out, 50);
            let (records, _) = seqs(&lines);
            (records.last() == Some(&last)).then_some(lines)
        }
    })
    .await;
    let (records, heads) = seqs(&lines);
    assert_exactly(&records, last);
    assert!(heads >= 1, "the signed head at shutdown was exported too");
    assert!(
        PathBuf::from(format!("{}.1", out.display())).exists(),
        "the file was rotated at 4 KiB"
    );

    // Syslog: one RFC 5424 datagram per line, authpriv.info.
    let mut got = Vec::new();
    while got.len() < last as usize {
        let msg = tokio::time::timeout(Duration::from_secs(10), dgrams.recv())
            .await
            .expect("syslog datagrams keep coming")
            .expect("the reader is running");
        assert!(msg.starts_with("<86>1 "), "{msg}");
        let json = msg
            .splitn(8, ' ')
            .nth(7)
            .expect("RFC 5424 message part")
            .to_string();
        if let ExportLine::Record(r) = serde_json::from_str(&json).expect("json") {
            got.push(r.seq);
        }
    }
    assert_exactly(&got, last);
    c.shutdown().await.expect("shutdown");
}

/// An Elasticsearch `_bulk` endpoint: `create` semantics (409 for an
/// existing `_id`), with scripted failures.
#[derive(Default)]
struct FakeEs {
    docs: Mutex<BTreeMap<String, serde_json::Value>>,
    created: Mutex<BTreeMap<String, usize>>,
    fail_next: AtomicUsize,
    stall_next: AtomicUsize,
    reject_item_next: AtomicUsize,
    requests: AtomicUsize,
}

async fn es_bulk(
    State(es): State<Arc<FakeEs>>,
    headers: HeaderMap,
    body: String,
) -> (StatusCode, String) {
    es.requests.fetch_add(1, Ordering::SeqCst);
    if headers.get("content-type").and_then(|v| v.to_str().ok()) != Some("application/x-ndjson") {
        return (
            StatusCode::NOT_ACCEPTABLE,
            r#"{"error":"Content-Type header [] is not supported","status":406}"#.into(),
        );
    }
    if es
        .fail_next
        .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
        .is_ok()
    {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            r#"{"error":{"root_cause":[],"type":"cluster_block_exception","reason":"blocked by: [SERVICE_UNAVAILABLE/1/state not recovered]"},"status":503}"#.into(),
        );
    }
    // Stalled: the documents are indexed, but only after the client gave
    // up — its retry must not create them twice.
    if es
        .stall_next
        .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
        .is_ok()
    {
        tokio::time::sleep(Duration::from_millis(1500)).await;
    }
    let reject_one = es
        .reject_item_next
        .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
        .is_ok();
    let lines: Vec<&str> = body.lines().collect();
    let mut items = Vec::new();
    let mut errors = false;
    for (i, pair) in lines.chunks(2).enumerate() {
        let action: serde_json::Value = serde_json::from_str(pair[0]).unwrap_or_default();
        let id = action["create"]["_id"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        let doc: serde_json::Value =
            serde_json::from_str(pair.get(1).unwrap_or(&"")).unwrap_or_default();
        let (status, error) = if reject_one && i == 0 {
            (
                429,
                serde_json::json!({"type": "es_rejected_execution_exception", "reason": "rejected execution"}),
            )
        } else {
            let mut docs = es.docs.lock().unwrap_or_else(|p| p.into_inner());
            if docs.contains_key(&id) {
                (
                    409,
                    serde_json::json!({"type": "version_conflict_engine_exception", "reason": format!("[{id}]: version conflict, document already exists")}),
                )
            } else {
                docs.insert(id.clone(), doc);
                *es.created
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .entry(id.clone())
                    .or_default() += 1;
                (201, serde_json::Value::Null)
            }
        };
        if status != 201 {
            errors = true;
        }
        let mut item = serde_json::json!({"_index": "fleetcmd-audit", "_id": id, "status": status});
        if !error.is_null() {
            item["error"] = error;
        }
        items.push(serde_json::json!({ "create": item }));
    }
    (
        StatusCode::OK,
        serde_json::json!({"took": 3, "errors": errors, "items": items}).to_string(),
    )
}

/// A Splunk HTTP Event Collector: checks the token, scripted busy replies.
#[derive(Default)]
struct FakeHec {
    events: Mutex<Vec<serde_json::Value>>,
    busy_next: AtomicUsize,
    bad_auth: AtomicUsize,
}

async fn hec_event(
    State(hec): State<Arc<FakeHec>>,
    headers: HeaderMap,
    body: String,
) -> (StatusCode, String) {
    if headers.get("authorization").and_then(|v| v.to_str().ok())
        != Some("Splunk 11111111-2222-3333-4444-555555555555")
    {
        hec.bad_auth.fetch_add(1, Ordering::SeqCst);
        return (
            StatusCode::FORBIDDEN,
            r#"{"text":"Invalid token","code":4}"#.into(),
        );
    }
    if hec
        .busy_next
        .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
        .is_ok()
    {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            r#"{"text":"Server is busy","code":9}"#.into(),
        );
    }
    let mut parsed = Vec::new();
    for v in serde_json::Deserializer::from_str(&body).into_iter::<serde_json::Value>() {
        match v {
            Ok(v) if v.get("event").is_some() => parsed.push(v),
            _ => {
                return (
                    StatusCode::BAD_REQUEST,
                    r#"{"text":"Invalid data format","code":6,"invalid-event-number":0}"#.into(),
                );
            }
        }
    }
    hec.events
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .extend(parsed);
    (StatusCode::OK, r#"{"text":"Success","code":0}"#.into())
}

async fn serve(app: axum::Router) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn elasticsearch_and_splunk_exports_retry_failures_and_timeouts_without_loss_or_duplicates() {
    let tmp = tempfile::tempdir().expect("tmp");
    let data = tmp.path().join("controller");
    let es = Arc::new(FakeEs::default());
    es.fail_next.store(2, Ordering::SeqCst);
    es.stall_next.store(1, Ordering::SeqCst);
    es.reject_item_next.store(1, Ordering::SeqCst);
    let es_addr = serve(
        axum::Router::new()
            .route("/_bulk", post(es_bulk))
            .with_state(es.clone()),
    )
    .await;
    let hec = Arc::new(FakeHec::default());
    hec.busy_next.store(3, Ordering::SeqCst);
    let hec_addr = serve(
        axum::Router::new()
            .route("/services/collector/event", post(hec_event))
            .with_state(hec.clone()),
    )
    .await;
    let token = tmp.path().join("hec.token");
    std::fs::write(&token, "11111111-2222-3333-4444-555555555555\n").expect("token");
    let exports = vec![
        export(
            "es",
            SinkConfig::Elasticsearch {
                url: format!("http://{es_addr}"),
                index: "fleetcmd-audit".into(),
                username: None,
                password_file: None,
                api_key_file: None,
            },
        ),
        export(
            "splunk",
            SinkConfig::Splunk {
                url: format!("http://{hec_addr}"),
                token_file: token.clone(),
                sourcetype: "fleetcmd:audit".into(),
            },
        ),
    ];
    let mut c = start(config(&data, exports.clone())).await;
    append(&c, 30, "before");
    // Let the sinks fail, stall and recover before the restart.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    c.stop().await.expect("stop");
    let c = start(config(&data, exports)).await;
    let last = append(&c, 30, "after");

    let es_done = es.clone();
    assert_eventually(Duration::from_secs(30), || {
        let es = es_done.clone();
        async move {
            let docs = es.docs.lock().ok()?;
            docs.contains_key(&last.to_string()).then_some(())
        }
    })
    .await;
    let created = es.created.lock().map(|c| c.clone()).unwrap_or_default();
    let mut record_ids: Vec<u64> = created.keys().filter_map(|k| k.parse().ok()).collect();
    record_ids.sort();
    assert_exactly(&record_ids, last);
    assert!(created.values().all(|n| *n == 1));
    assert!(
        created.keys().any(|k| k.starts_with("head-")),
        "signed heads are exported too: {:?}",
        created
            .keys()
            .filter(|k| k.starts_with('h'))
            .collect::<Vec<_>>()
    );
    assert!(
        es.requests.load(Ordering::SeqCst) > 3,
        "the failures were retried"
    );

    let hec_done = hec.clone();
    let events = assert_eventually(Duration::from_secs(30), || {
        let hec = hec_done.clone();
        async move {
            let events = hec.events.lock().ok()?.clone();
            let seqs: Vec<u64> = events
                .iter()
                .filter_map(|e| e["event"]["seq"].as_u64())
                .collect();
            seqs.contains(&last).then_some(events)
        }
    })
    .await;
    let seqs: Vec<u64> = events
        .iter()
        .filter_map(|e| e["event"]["seq"].as_u64())
        .collect();
    assert_exactly(&seqs, last);
    for e in &events {
        assert_eq!(e["sourcetype"], "fleetcmd:audit");
        assert_eq!(e["source"], "fleetcmd-controller");
        assert!(e["time"].as_f64().is_some_and(|t| t > 1.0e9), "{e}");
    }
    assert_eq!(hec.bad_auth.load(Ordering::SeqCst), 0);
    c.shutdown().await.expect("shutdown");
}

#[test]
fn bad_export_entries_are_named_in_the_config_error() {
    let text = r#"
policy_roots = ["ed25519:MCowBQYDK2VwAyEAGb9ECWmEzf6FQbrBZ9w7lshQhqowtrbLDFw4rXAxZuE="]
audit_retention = "5m"

[[audit_export]]
name = "es"
kind = "elasticsearch"
url = "ftp://x"
index = "Fleet Audit"

[[audit_export]]
name = "es"
kind = "splunk"
url = "https://hec.example.com:8088"
token_file = "/nonexistent/token"

[[audit_export]]
name = "f"
kind = "file"
url = "http://x"

[[audit_export]]
name = "q"
kind = "kafka"
"#;
    let raw: fleetcmd_controller::config::RawConfig = toml::from_str(text).expect("parses");
    let err = raw.validate("controller.toml").expect_err("invalid");
    let msg = err.to_string();
    for want in [
        "audit_retention: \"5m\" must be 0 (forever) or at least 1h",
        "audit_export[0].url: expected http(s)://host:port",
        "audit_export[0].index: must be a lowercase index name",
        "audit_export[1].name: \"es\" is used twice",
        "audit_export[1]: token_file: /nonexistent/token",
        "audit_export[2].path: required for kind = \"file\"",
        "audit_export[2].url: does not apply to kind = \"file\"",
        "audit_export[3].kind: \"kafka\" is not one of file, stdout, syslog, elasticsearch, splunk",
    ] {
        assert!(msg.contains(want), "{want} missing from:\n{msg}");
    }
}
