//! What one client may hold, tried as an attacker would: idle and
//! trickling connections against the HTTP listener (from a client that
//! never authenticates), and one chat user flooding long commands.

use fleetcmd_gateway::adapters::HttpInbound;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use axum::http::StatusCode;
use fleetcmd_core::job::JobSpec;
use fleetcmd_gateway::adapters::webhook::{WebhookAdapter, WebhookConfig};
use fleetcmd_gateway::adapters::{ChatAdapter, ChatSender, Incoming};
use fleetcmd_gateway::http::{Limits, serve_with};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::mpsc;

use crate::campfire::client;
use crate::support::{RecordingSender, msg, world_with};
use crate::webhook::{SECRET, hook, line, now, post_signed};

/// The webhook adapter on the listener with `limits`; returns its address
/// and the adapter (kept alive so the hook is served).
async fn listener(limits: Limits) -> (SocketAddr, WebhookAdapter) {
    let adapter = WebhookAdapter::new(&WebhookConfig {
        incoming: vec![hook(None, 100)],
        outgoing: vec![],
    })
    .unwrap_or_else(|e| panic!("{e}"));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .unwrap_or_else(|e| panic!("bind: {e}"));
    let addr = listener.local_addr().unwrap_or_else(|e| panic!("{e}"));
    tokio::spawn(serve_with(
        listener,
        adapter.routes(),
        limits,
        std::future::pending(),
    ));
    (addr, adapter)
}

/// Reads until the server closes the connection, at most `within`;
/// `None` when it was still open then.
async fn closed_within(stream: &mut TcpStream, within: Duration) -> Option<Vec<u8>> {
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    let deadline = tokio::time::Instant::now() + within;
    loop {
        match tokio::time::timeout_at(deadline, stream.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return Some(got),
            Ok(Ok(n)) => got.extend_from_slice(&buf[..n]),
            Err(_) => return None,
        }
    }
}

#[tokio::test]
async fn five_hundred_idle_connections_leave_signed_webhooks_and_healthz_answering() {
    let (addr, _adapter) = listener(Limits::DEFAULT).await;
    // The attacker: 500 connections that never send a byte.
    let mut idle = Vec::new();
    for i in 0..500 {
        let c = tokio::time::timeout(Duration::from_secs(5), TcpStream::connect(addr))
            .await
            .unwrap_or_else(|_| panic!("connect {i} timed out"))
            .unwrap_or_else(|e| panic!("connect {i}: {e}"));
        idle.push(c);
    }
    let started = Instant::now();
    let health = tokio::time::timeout(
        Duration::from_secs(5),
        client().get(format!("http://{addr}/healthz")).send(),
    )
    .await
    .unwrap_or_else(|_| panic!("/healthz did not answer within 5 s"))
    .unwrap_or_else(|e| panic!("/healthz: {e}"));
    assert_eq!(health.status(), StatusCode::OK);
    let signed = tokio::time::timeout(
        Duration::from_secs(5),
        post_signed(
            &format!("http://{addr}/webhook/ops"),
            SECRET,
            now(),
            line("alice", "", "whoami"),
        ),
    )
    .await
    .unwrap_or_else(|_| panic!("the signed webhook did not answer within 5 s"));
    // Accepted (no reply within the hook's 100 ms: 202).
    assert_eq!(signed.status, StatusCode::ACCEPTED, "{}", signed.body);
    assert!(started.elapsed() < Duration::from_secs(5));
    drop(idle);
}

#[tokio::test]
async fn a_slowloris_and_an_idle_keep_alive_connection_are_cut_after_the_header_timeout() {
    let limits = Limits {
        header_read_timeout: Duration::from_millis(500),
        ..Limits::DEFAULT
    };
    let (addr, _adapter) = listener(limits).await;

    // Headers trickled one line every 100 ms, never finished.
    let mut slow = TcpStream::connect(addr)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let started = Instant::now();
    slow.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let mut cut = false;
    for i in 0..50 {
        // Paced by waiting for the server to hang up (100 ms at most).
        if closed_within(&mut slow, Duration::from_millis(100))
            .await
            .is_some()
        {
            cut = true;
            break;
        }
        if slow
            .write_all(format!("X-Trickle-{i}: a\r\n").as_bytes())
            .await
            .is_err()
        {
            cut = true;
            break;
        }
    }
    assert!(cut, "a trickling client was never cut");
    let after = started.elapsed();
    assert!(
        after >= Duration::from_millis(400) && after < Duration::from_secs(3),
        "cut after {after:?}"
    );

    // One request answered, then the connection idles: closed too.
    let mut keep = TcpStream::connect(addr)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    keep.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let got = closed_within(&mut keep, Duration::from_secs(3))
        .await
        .unwrap_or_else(|| panic!("an idle keep-alive connection stayed open"));
    let text = String::from_utf8_lossy(&got);
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    assert!(text.ends_with("ok\n"), "{text}");
}

#[tokio::test]
async fn a_body_that_never_finishes_is_refused_after_the_body_timeout() {
    let limits = Limits {
        body_read_timeout: Duration::from_millis(300),
        ..Limits::DEFAULT
    };
    let (addr, _adapter) = listener(limits).await;
    let mut slow = TcpStream::connect(addr)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    slow.write_all(
        b"POST /webhook/ops HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"user\"",
    )
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    let started = Instant::now();
    let got = closed_within(&mut slow, Duration::from_secs(3))
        .await
        .unwrap_or_else(|| panic!("a body that never finishes held the connection"));
    let text = String::from_utf8_lossy(&got);
    assert!(text.starts_with("HTTP/1.1 4"), "{text}");
    assert!(started.elapsed() < Duration::from_secs(3));
}

/// A chat adapter fed by the test.
struct Fed {
    rx: mpsc::Receiver<Incoming>,
    out: Arc<RecordingSender>,
}

impl ChatAdapter for Fed {
    async fn recv(&mut self) -> Option<Incoming> {
        self.rx.recv().await
    }
    fn sender(&self) -> Arc<dyn ChatSender> {
        self.out.clone()
    }
}

fn job_ids_of(specs: &[JobSpec], who: &str) -> Vec<String> {
    specs
        .iter()
        .filter(|s| s.requester.as_str() == who)
        .map(|s| s.id.as_str().to_string())
        .collect()
}

#[tokio::test]
async fn one_user_flooding_long_commands_stalls_neither_others_nor_their_own_cancel() {
    // Jobs that never finish.
    let w = world_with(|c| c.running_polls.store(usize::MAX / 2, Ordering::SeqCst));
    let (tx, rx) = mpsc::channel(256);
    let out = Arc::new(RecordingSender::default());
    let gateway = tokio::spawn(fleetcmd_gateway::serve(
        w.router.clone(),
        Fed {
            rx,
            out: out.clone(),
        },
    ));
    let flood = fleetcmd_gateway::MAX_IN_FLIGHT + 10;
    for _ in 0..flood {
        tx.send(msg("console:alice", "!run uptime on all"))
            .await
            .unwrap_or_else(|e| panic!("{e}"));
    }
    tx.send(msg("console:carol", "!run uptime on all"))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let specs = || -> Vec<JobSpec> {
        w.router
            .controller()
            .submitted()
            .iter()
            .filter_map(|j| JobSpec::from_bytes(&j.spec).ok())
            .collect()
    };
    let mut ok = false;
    for _ in 0..500 {
        if job_ids_of(&specs(), "console:carol").len() == 1 {
            ok = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(ok, "carol's command did not run while alice flooded");
    let alices = job_ids_of(&specs(), "console:alice");
    assert_eq!(alices.len(), fleetcmd_gateway::MAX_RUNS_PER_USER);
    let told = out
        .all()
        .iter()
        .filter(|s| {
            s.text().contains(&format!(
                "you have {} commands running",
                fleetcmd_gateway::MAX_RUNS_PER_USER
            ))
        })
        .count();
    // Told at once, not queued; in a burst the replies themselves are
    // bounded (the rest are dropped and counted in the log).
    assert!(
        (1..=flood - fleetcmd_gateway::MAX_RUNS_PER_USER).contains(&told),
        "told {told} times"
    );

    // Alice can still cancel one of hers, and ask about it.
    tx.send(msg("console:alice", &format!("!cancel {}", alices[0])))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let mut canceled = Vec::new();
    for _ in 0..500 {
        canceled = w
            .router
            .controller()
            .canceled
            .lock()
            .map(|c| c.clone())
            .unwrap_or_default();
        if !canceled.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(
        canceled,
        [(alices[0].clone(), "console:alice".to_string())],
        "alice's cancel was not handled"
    );
    gateway.abort();
}
