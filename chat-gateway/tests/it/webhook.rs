//! Generic webhooks against local servers. Signatures are computed and
//! checked here with `ring` directly from the documented scheme
//! (`v1=hex(HMAC-SHA256(secret, "v1:" + ts + ":" + body))`), not with the
//! adapter's own code, so a change of scheme on one side fails the test.

use fleetcmd_gateway::adapters::HttpInbound;
use fleetcmd_gateway::secret::SecretString;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use fleetcmd_gateway::adapters::webhook::{
    Envelope, IncomingHookConfig, OutgoingHookConfig, WebhookAdapter, WebhookConfig,
};
use fleetcmd_gateway::adapters::{AuthFailures, ChatAdapter, Reply};
use fleetcmd_gateway::serve;
use serde_json::{Value, json};

use crate::campfire::{approval_request, client, job_result, visible};
use crate::support::{router_with_extra, serve_http};

pub(crate) const SECRET: &str = "s3cret-0123456789-abcdef";
const OUT_SECRET: &str = "out-s3cret-0123456789";

pub(crate) fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The documented signature, computed independently of the adapter.
fn signature(secret: &str, ts: u64, body: &[u8]) -> String {
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, secret.as_bytes());
    let mut msg = format!("v1:{ts}:").into_bytes();
    msg.extend_from_slice(body);
    format!("v1={}", hex(ring::hmac::sign(&key, &msg).as_ref()))
}

/// Whether a request we received carries a valid, fresh signature.
fn verified(secret: &str, headers: &HeaderMap, body: &[u8]) -> bool {
    let get = |n: &str| headers.get(n).and_then(|v| v.to_str().ok());
    let (Some(ts), Some(sig)) = (get("x-fleetcmd-timestamp"), get("x-fleetcmd-signature")) else {
        return false;
    };
    let Ok(ts) = ts.parse::<u64>() else {
        return false;
    };
    ts.abs_diff(now()) <= 300 && sig == signature(secret, ts, body)
}

const BINDINGS: &str = r#"
[[bindings]]
subjects = ["webhook:ops:alice"]
roles = ["oncall"]
"#;

pub(crate) fn hook(reply_url: Option<String>, reply_wait_ms: u64) -> IncomingHookConfig {
    IncomingHookConfig {
        name: "ops".into(),
        secret: Some(SecretString::new(SECRET)),
        secret_file: None,
        reply_wait_ms,
        reply_url,
        timeout_ms: 2000,
        max_attempts: 3,
    }
}

pub(crate) struct Sent {
    pub(crate) status: StatusCode,
    pub(crate) body: String,
}

async fn post(url: &str, headers: &[(&str, String)], body: Vec<u8>) -> Sent {
    let mut req = client()
        .post(url)
        .header(header::CONTENT_TYPE, "application/json");
    for (k, v) in headers {
        req = req.header(*k, v);
    }
    let res = req
        .body(body)
        .send()
        .await
        .unwrap_or_else(|e| panic!("post: {e}"));
    Sent {
        status: res.status(),
        body: res.text().await.unwrap_or_default(),
    }
}

pub(crate) async fn post_signed(url: &str, secret: &str, ts: u64, body: Vec<u8>) -> Sent {
    let sig = signature(secret, ts, &body);
    post(
        url,
        &[
            ("X-Fleetcmd-Timestamp", ts.to_string()),
            ("X-Fleetcmd-Signature", sig),
        ],
        body,
    )
    .await
}

pub(crate) fn line(user: &str, channel: &str, text: &str) -> Vec<u8> {
    serde_json::to_vec(&json!({"user": user, "channel": channel, "text": text})).unwrap_or_default()
}

pub(crate) fn parse(body: &str) -> Value {
    serde_json::from_str(body).unwrap_or_else(|e| panic!("{e}: {body}"))
}

/// A reply_url / outgoing receiver: records (signature valid, JSON body).
#[derive(Default)]
struct Receiver {
    got: Mutex<Vec<(bool, Value)>>,
    /// Statuses to answer, in order; 200 once they run out.
    script: Mutex<Vec<(u16, Option<&'static str>, Duration)>>,
    hits: AtomicUsize,
    secret: &'static str,
}

impl Receiver {
    fn got(&self) -> Vec<(bool, Value)> {
        self.got.lock().map(|g| g.clone()).unwrap_or_default()
    }
}

async fn receive(State(r): State<Arc<Receiver>>, headers: HeaderMap, body: String) -> Response {
    r.hits.fetch_add(1, Ordering::SeqCst);
    let next = {
        let mut s = r.script.lock().unwrap_or_else(|p| p.into_inner());
        (!s.is_empty()).then(|| s.remove(0))
    };
    if let Some((code, retry_after, delay)) = next {
        tokio::time::sleep(delay).await;
        let status = StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        return match retry_after {
            Some(ra) => (status, [(header::RETRY_AFTER, ra)]).into_response(),
            None => status.into_response(),
        };
    }
    let ok = verified(r.secret, &headers, body.as_bytes());
    let value = serde_json::from_str(&body).unwrap_or(Value::Null);
    r.got
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .push((ok, value));
    StatusCode::NO_CONTENT.into_response()
}

async fn receiver(
    secret: &'static str,
    script: Vec<(u16, Option<&'static str>, Duration)>,
) -> (Arc<Receiver>, String, tokio::task::JoinHandle<()>) {
    let r = Arc::new(Receiver {
        secret,
        script: Mutex::new(script),
        ..Receiver::default()
    });
    let app = axum::Router::new()
        .route("/hook", axum::routing::post(receive))
        .with_state(r.clone());
    let (url, task) = serve_http(app).await;
    (r, format!("{url}/hook"), task)
}

#[tokio::test]
async fn signed_line_is_routed_end_to_end_and_the_result_goes_signed_to_reply_url() {
    let (rx, reply_url, _r) = receiver(SECRET, vec![]).await;
    let router = router_with_extra(BINDINGS, |c| c.running_polls.store(3, Ordering::SeqCst));
    let adapter = WebhookAdapter::new(&WebhookConfig {
        incoming: vec![hook(Some(reply_url), 3000)],
        outgoing: vec![],
    })
    .unwrap_or_else(|e| panic!("{e}"));
    let closer = adapter.closer();
    let (gw, _g) = serve_http(adapter.routes()).await;
    let gateway = tokio::spawn(serve(router.clone(), adapter));

    let answer = post_signed(
        &format!("{gw}/webhook/ops"),
        SECRET,
        now(),
        line("alice", "#ops", "run uptime on all"),
    )
    .await;
    assert_eq!(answer.status, StatusCode::OK, "{}", answer.body);
    let first = parse(&answer.body);
    let header = first["reply"]["header"].as_str().unwrap_or_default();
    assert!(
        header.starts_with("job ")
            && header.ends_with(" `uptime` on all by webhook:ops:alice: 2 targets"),
        "{first}"
    );
    assert_eq!(first["text"].as_str(), Some(header));
    assert!(first.get("channel").is_none(), "{first}");

    let mut got = Vec::new();
    for _ in 0..1000 {
        got = rx.got();
        if !got.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(got.len(), 1, "one final result: {got:?}");
    let (sig_ok, body) = &got[0];
    assert!(sig_ok, "reply_url receives a valid signature");
    assert_eq!(body["channel"], "webhook:ops:#ops");
    let final_header = body["reply"]["header"].as_str().unwrap_or_default();
    assert!(
        final_header.contains("succeeded (2/2 ok) — asked by webhook:ops:alice"),
        "{body}"
    );
    assert_eq!(
        body["reply"]["sections"][0]["blocks"][0]["text"],
        "up 3 days, load 0.5"
    );
    assert!(
        body["text"]
            .as_str()
            .unwrap_or_default()
            .contains("\n  | up 3 days, load 0.5"),
        "{body}"
    );
    let subs = router.controller().submitted();
    assert_eq!(subs.len(), 1);
    let spec =
        fleetcmd_core::job::JobSpec::from_bytes(&subs[0].spec).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(spec.requester.as_str(), "webhook:ops:alice");
    assert_eq!(spec.channel, "webhook:ops:#ops");

    // Another user of the same hook has no binding: refused, nothing submitted.
    let bob = post_signed(
        &format!("{gw}/webhook/ops"),
        SECRET,
        now(),
        line("bob", "#ops", "run uptime on all"),
    )
    .await;
    let bob = parse(&bob.body);
    assert!(
        bob["text"]
            .as_str()
            .unwrap_or_default()
            .contains("refused:"),
        "{bob}"
    );
    assert_eq!(router.controller().submitted().len(), 1);

    closer.close();
    tokio::time::timeout(Duration::from_secs(10), gateway)
        .await
        .unwrap_or_else(|_| panic!("gateway did not stop"))
        .unwrap_or_else(|e| panic!("{e}"));
}

#[tokio::test]
async fn bad_requests_are_refused_and_never_routed() {
    let mut adapter = WebhookAdapter::new(&WebhookConfig {
        incoming: vec![hook(None, 3000)],
        outgoing: vec![],
    })
    .unwrap_or_else(|e| panic!("{e}"));
    let (reporter, mut reports) = AuthFailures::channel(32);
    adapter.report_auth_failures(reporter);
    let (gw, _g) = serve_http(adapter.routes()).await;
    let url = format!("{gw}/webhook/ops");
    let body = line("alice", "#ops", "!run uptime on all");
    let ts = now();

    let cases: Vec<(&str, Sent)> = vec![
        (
            "wrong secret",
            post_signed(&url, "another-secret-0123456789", ts, body.clone()).await,
        ),
        (
            "stale timestamp",
            post_signed(&url, SECRET, ts - 400, body.clone()).await,
        ),
        (
            "future timestamp",
            post_signed(&url, SECRET, ts + 400, body.clone()).await,
        ),
        ("no headers", post(&url, &[], body.clone()).await),
        (
            "no signature",
            post(
                &url,
                &[("X-Fleetcmd-Timestamp", ts.to_string())],
                body.clone(),
            )
            .await,
        ),
        (
            "no timestamp",
            post(
                &url,
                &[("X-Fleetcmd-Signature", signature(SECRET, ts, &body))],
                body.clone(),
            )
            .await,
        ),
        (
            "signature of another body",
            post(
                &url,
                &[
                    ("X-Fleetcmd-Timestamp", ts.to_string()),
                    (
                        "X-Fleetcmd-Signature",
                        signature(SECRET, ts, &line("alice", "#ops", "whoami")),
                    ),
                ],
                body.clone(),
            )
            .await,
        ),
    ];
    for (what, sent) in &cases {
        assert_eq!(
            sent.status,
            StatusCode::UNAUTHORIZED,
            "{what}: {}",
            sent.body
        );
    }
    let unknown = post_signed(&format!("{gw}/webhook/nope"), SECRET, ts, body.clone()).await;
    assert_eq!(unknown.status, StatusCode::NOT_FOUND);
    let mut big = br#"{"user":"alice","text":""#.to_vec();
    big.extend(std::iter::repeat_n(b'x', 70 * 1024));
    big.extend_from_slice(br#""}"#);
    let too_large = post_signed(&url, SECRET, ts, big).await;
    assert_eq!(too_large.status, StatusCode::PAYLOAD_TOO_LARGE);
    for (what, bad) in [
        ("malformed", b"{\"user\": \"alice\"".to_vec()),
        ("no text", br#"{"user":"alice"}"#.to_vec()),
        ("user with a colon", line("alice:admin", "#ops", "whoami")),
        ("user with a space", line("alice bob", "#ops", "whoami")),
        ("channel with a colon", line("alice", "ops:x", "whoami")),
    ] {
        let sent = post_signed(&url, SECRET, ts, bad).await;
        assert_eq!(
            sent.status,
            StatusCode::BAD_REQUEST,
            "{what}: {}",
            sent.body
        );
    }

    // The first message the router sees is this genuine one.
    let genuine_body = line("alice", "", "whoami");
    let genuine_ts = now();
    let (url2, body2) = (url.clone(), genuine_body.clone());
    let genuine = tokio::spawn(async move { post_signed(&url2, SECRET, genuine_ts, body2).await });
    let msg = tokio::time::timeout(Duration::from_secs(5), adapter.recv())
        .await
        .unwrap_or_else(|_| panic!("nothing routed"))
        .unwrap_or_else(|| panic!("closed"));
    assert_eq!(msg.identity.as_str(), "webhook:ops:alice");
    assert_eq!(msg.channel, "webhook:ops", "no channel given");
    assert_eq!(msg.text, "whoami");
    assert!(msg.direct && !msg.from_bot);
    let mut reply = Reply::text("you are webhook:ops:alice @channel");
    reply.lines.push("!run reboot".into());
    reply.thread = msg.thread.clone();
    adapter
        .send(&msg.channel, reply)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let answer = genuine.await.unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(answer.status, StatusCode::OK);
    assert_eq!(
        parse(&answer.body),
        json!({
            "text": "you are webhook:ops:alice @\u{2060}channel\n  \u{200B}!run reboot",
            "reply": {
                "header": "you are webhook:ops:alice @channel",
                "lines": ["!run reboot"],
                "sections": [],
                "actions": []
            }
        })
    );
    // The same signed request again, inside the window: a replay.
    let replay = post_signed(&url, SECRET, genuine_ts, genuine_body).await;
    assert_eq!(replay.status, StatusCode::CONFLICT, "{}", replay.body);

    // Every refusal above except the body-size and body-content ones was
    // reported to the gateway's audit reporter, never with a signature.
    let mut got = Vec::new();
    while let Ok(f) = reports.try_recv() {
        assert!(!f.detail.contains("v1="), "{f:?}");
        got.push(format!("{} {} {}", f.adapter, f.source, f.detail));
    }
    assert_eq!(
        got,
        [
            "webhook:ops /webhook/ops signature does not match (401)",
            "webhook:ops /webhook/ops timestamp outside the 5-minute window (401)",
            "webhook:ops /webhook/ops timestamp outside the 5-minute window (401)",
            "webhook:ops /webhook/ops missing signature headers (401)",
            "webhook:ops /webhook/ops missing signature headers (401)",
            "webhook:ops /webhook/ops missing signature headers (401)",
            "webhook:ops /webhook/ops signature does not match (401)",
            "webhook:nope /webhook/nope unknown hook (404)",
            "webhook:ops /webhook/ops replayed request (409)",
        ]
    );
}

#[tokio::test]
async fn no_reply_in_time_is_202_and_without_reply_url_later_replies_fail() {
    let mut adapter = WebhookAdapter::new(&WebhookConfig {
        incoming: vec![hook(None, 50)],
        outgoing: vec![],
    })
    .unwrap_or_else(|e| panic!("{e}"));
    let (gw, _g) = serve_http(adapter.routes()).await;
    let answer = post_signed(
        &format!("{gw}/webhook/ops"),
        SECRET,
        now(),
        line("alice", "#ops", "whoami"),
    )
    .await;
    assert_eq!(answer.status, StatusCode::ACCEPTED);
    assert_eq!(parse(&answer.body), json!({"text": null, "reply": null}));
    let msg = adapter.recv().await.unwrap_or_else(|| panic!("routed"));
    let mut reply = Reply::text("late");
    reply.thread = msg.thread.clone();
    let err = adapter
        .send(&msg.channel, reply)
        .await
        .err()
        .unwrap_or_else(|| panic!("no reply_url: error"));
    assert!(err.to_string().contains("no reply_url"), "{err}");
    assert!(!adapter.sender().can_edit());
}

fn outgoing(name: &str, url: &str) -> OutgoingHookConfig {
    OutgoingHookConfig {
        name: name.into(),
        url: url.into(),
        secret: Some(SecretString::new(OUT_SECRET)),
        secret_file: None,
        timeout_ms: 300,
        max_attempts: 4,
    }
}

#[tokio::test]
async fn outgoing_notifications_retry_5xx_429_and_timeouts_but_not_4xx() {
    let none = Duration::ZERO;
    let (flaky, flaky_url, _a) =
        receiver(OUT_SECRET, vec![(500, None, none), (429, Some("1"), none)]).await;
    let (bad, bad_url, _b) = receiver(OUT_SECRET, vec![(400, None, none)]).await;
    let (slow, slow_url, _c) =
        receiver(OUT_SECRET, vec![(200, None, Duration::from_secs(2))]).await;
    let (down, down_url, _d) = receiver(
        OUT_SECRET,
        vec![
            (503, None, none),
            (503, None, none),
            (503, None, none),
            (503, None, none),
        ],
    )
    .await;
    let adapter = WebhookAdapter::new(&WebhookConfig {
        incoming: vec![],
        outgoing: vec![
            outgoing("flaky", &flaky_url),
            outgoing("bad", &bad_url),
            outgoing("slow", &slow_url),
            outgoing("down", &down_url),
        ],
    })
    .unwrap_or_else(|e| panic!("{e}"));

    let started = std::time::Instant::now();
    adapter
        .notify("flaky", Reply::text("deploy finished @here"))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(
        started.elapsed() >= Duration::from_secs(1),
        "Retry-After was honoured"
    );
    assert_eq!(flaky.hits.load(Ordering::SeqCst), 3, "500, 429, then 200");
    let got = flaky.got();
    assert_eq!(got.len(), 1);
    assert!(got[0].0, "signed");
    assert_eq!(got[0].1["channel"], "webhook-out:flaky");
    assert_eq!(got[0].1["text"], "deploy finished @\u{2060}here");
    assert_eq!(got[0].1["reply"]["header"], "deploy finished @here");

    let err = adapter
        .notify("bad", Reply::text("x"))
        .await
        .err()
        .unwrap_or_else(|| panic!("400 is an error"));
    assert!(err.to_string().contains("HTTP 400"), "{err}");
    assert_eq!(bad.hits.load(Ordering::SeqCst), 1, "4xx is never retried");

    // The first attempt times out (300 ms), the second succeeds.
    adapter
        .sender()
        .send("webhook-out:slow", Reply::text("x"))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(slow.hits.load(Ordering::SeqCst), 2);
    assert_eq!(slow.got().len(), 1);

    let err = adapter
        .notify("down", Reply::text("x"))
        .await
        .err()
        .unwrap_or_else(|| panic!("always 503 is an error"));
    assert!(
        err.to_string().contains("HTTP 503 (attempt 4 of 4)"),
        "{err}"
    );
    assert_eq!(down.hits.load(Ordering::SeqCst), 4, "bounded attempts");

    assert!(adapter.notify("nope", Reply::text("x")).await.is_err());
}

#[tokio::test]
async fn secret_files_are_read_and_named_when_missing() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let path = dir.path().join("ops.secret");
    std::fs::write(&path, format!("{SECRET}\n")).unwrap_or_else(|e| panic!("{e}"));
    let mut h = hook(None, 3000);
    h.secret = None;
    h.secret_file = Some("ops.secret".into());
    let mut cfg = WebhookConfig {
        incoming: vec![h],
        outgoing: vec![],
    };
    cfg.resolve_paths(dir.path());
    let mut adapter = WebhookAdapter::new(&cfg).unwrap_or_else(|e| panic!("{e}"));
    let (gw, _g) = serve_http(adapter.routes()).await;
    let url = format!("{gw}/webhook/ops");
    let pending =
        tokio::spawn(
            async move { post_signed(&url, SECRET, now(), line("alice", "", "help")).await },
        );
    let msg = tokio::time::timeout(Duration::from_secs(5), adapter.recv())
        .await
        .unwrap_or_else(|_| panic!("the secret from the file verifies"));
    assert_eq!(msg.map(|m| m.text).as_deref(), Some("help"));
    pending.abort();

    cfg.incoming[0].secret_file = Some(dir.path().join("missing.secret"));
    let err = WebhookAdapter::new(&cfg)
        .err()
        .unwrap_or_else(|| panic!("missing file"));
    assert!(err.to_string().contains("missing.secret"), "{err}");
}

#[test]
fn config_parses_from_toml() {
    let cfg: WebhookConfig = toml::from_str(
        r#"
[[incoming]]
name = "ops"
secret = "s3cret-0123456789-abcdef"
reply_url = "https://ops.example.com/replies"

[[outgoing]]
name = "pager"
url = "https://pager.example.com/hook"
secret_file = "/etc/fleetcmd/pager.secret"
"#,
    )
    .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(cfg.validate(), vec![]);
    assert_eq!(cfg.incoming[0].reply_wait_ms, 5000);
    assert_eq!(cfg.outgoing[0].max_attempts, 4);
    assert!(!format!("{cfg:?}").contains("s3cret"));
    let unknown = toml::from_str::<WebhookConfig>(
        "[[incoming]]\nname = \"x\"\nsecret = \"0123456789abcdef\"\nsecrt = 1\n",
    );
    assert!(unknown.is_err());
}

#[test]
fn snapshot_job_result() {
    let env = Envelope::of(Some("webhook-out:pager"), &job_result());
    let json = serde_json::to_string_pretty(&env).unwrap_or_default();
    assert!(
        json.contains("\"text\": \"@channel <!here> wake up\\n!run restart"),
        "raw in reply"
    );
    insta::assert_snapshot!(visible(&json));
}

#[test]
fn snapshot_approval_request() {
    let env = Envelope::of(Some("webhook:ops:#ops"), &approval_request());
    insta::assert_snapshot!(visible(
        &serde_json::to_string_pretty(&env).unwrap_or_default()
    ));
}
