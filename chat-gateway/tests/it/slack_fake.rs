//! A local Slack that speaks the documented wire formats: the Web API
//! methods the adapter calls (`POST /api/<method>`, Bearer tokens, JSON or
//! form bodies, `{"ok": …}` answers, 429 with `Retry-After`), the file
//! upload URL, and a Socket Mode WebSocket (`hello`, envelopes, acks,
//! `disconnect`).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use fleetcmd_gateway::adapters::slack::{ConfigSecret, SlackConfig, SlackMode};
use serde_json::{Value, json};
use tokio::sync::mpsc;
use tokio::time::Instant;

pub const TEAM: &str = "T0TEAM";
pub const BOT_USER: &str = "U0BOT";
pub const BOT_TOKEN: &str = "xoxb-test-bot-token";
pub const APP_TOKEN: &str = "xapp-test-app-token";
pub const FILE_ID: &str = "F0FILE";

/// One request the fake received.
#[derive(Clone, Debug)]
pub struct Call {
    pub method: String,
    pub auth: Option<String>,
    pub content_type: String,
    /// JSON bodies as they came; form bodies as an object of strings.
    pub body: Value,
    pub status: u16,
    pub at: Instant,
}

enum WsCmd {
    Send(String),
    Close,
}

#[derive(Default)]
pub struct FakeState {
    pub base: Mutex<String>,
    pub calls: Mutex<Vec<Call>>,
    /// `apps.connections.open` calls.
    pub opens: AtomicUsize,
    /// WebSocket connections accepted.
    pub connections: AtomicUsize,
    /// Text frames received on the socket (acks), with the connection number.
    pub acks: Mutex<Vec<(usize, Value)>>,
    conn: Mutex<Option<mpsc::UnboundedSender<WsCmd>>>,
    /// 429s to answer to the next chat.postMessage calls, and the Retry-After.
    pub rate_limit: AtomicUsize,
    pub retry_after: AtomicU64,
    /// `ok: false` error for the next chat.postMessage.
    pub fail_with: Mutex<Option<String>>,
    /// Bytes POSTed to the upload URL, and that request's Authorization.
    pub uploads: Mutex<Vec<(Option<String>, Vec<u8>)>>,
    next_ts: AtomicU64,
}

pub struct Fake {
    pub state: Arc<FakeState>,
    pub base: String,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Fake {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Polls `cond` every 10 ms for up to 10 s.
pub async fn eventually(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

impl Fake {
    pub async fn start() -> Fake {
        let state = Arc::new(FakeState::default());
        state.retry_after.store(1, Ordering::SeqCst);
        let app = axum::Router::new()
            .route("/api/{method}", post(api))
            .route("/link", get(link))
            .route("/upload/{id}", post(upload))
            .with_state(state.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .unwrap_or_else(|e| panic!("bind: {e}"));
        let addr: SocketAddr = listener
            .local_addr()
            .unwrap_or_else(|e| panic!("local_addr: {e}"));
        let base = format!("http://{addr}");
        *lock(&state.base) = base.clone();
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Fake { state, base, task }
    }

    fn config(&self, mode: SlackMode) -> SlackConfig {
        SlackConfig {
            mode,
            bot_token: Some(ConfigSecret::new(BOT_TOKEN)),
            app_token: Some(ConfigSecret::new(APP_TOKEN)),
            api_base: format!("{}/api", self.base),
            ..SlackConfig::default()
        }
    }

    pub fn socket_config(&self) -> SlackConfig {
        self.config(SlackMode::Socket)
    }

    pub fn events_config(&self, signing_secret: &str) -> SlackConfig {
        SlackConfig {
            signing_secret: Some(ConfigSecret::new(signing_secret)),
            app_token: None,
            ..self.config(SlackMode::Events)
        }
    }

    pub fn calls(&self, method: &str) -> Vec<Call> {
        lock(&self.state.calls)
            .iter()
            .filter(|c| c.method == method)
            .cloned()
            .collect()
    }

    pub fn acks(&self) -> Vec<(usize, Value)> {
        lock(&self.state.acks).clone()
    }

    pub fn opens(&self) -> usize {
        self.state.opens.load(Ordering::SeqCst)
    }

    pub fn connections(&self) -> usize {
        self.state.connections.load(Ordering::SeqCst)
    }

    /// Sends a frame on the current Socket Mode connection.
    pub fn push(&self, frame: impl Into<String>) {
        let conn = lock(&self.state.conn);
        let sent = conn
            .as_ref()
            .map(|c| c.send(WsCmd::Send(frame.into())).is_ok());
        assert_eq!(sent, Some(true), "no Socket Mode connection to push to");
    }

    /// Closes the current connection without a `disconnect` message.
    pub fn drop_socket(&self) {
        if let Some(c) = lock(&self.state.conn).take() {
            let _ = c.send(WsCmd::Close);
        }
    }
}

fn form_to_json(body: &[u8]) -> Value {
    let mut map = serde_json::Map::new();
    for (k, v) in url_pairs(body) {
        map.insert(k, Value::String(v));
    }
    Value::Object(map)
}

/// A separate decoder from the adapter's, so the test checks the format
/// rather than echoing the implementation.
fn url_pairs(body: &[u8]) -> Vec<(String, String)> {
    let text = String::from_utf8_lossy(body).replace('+', " ");
    text.split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            (decode(k), decode(v))
        })
        .collect()
}

fn decode(s: &str) -> String {
    let mut out = Vec::new();
    let b = s.as_bytes();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%'
            && let Some(v) = s
                .get(i + 1..i + 3)
                .and_then(|h| u8::from_str_radix(h, 16).ok())
        {
            out.push(v);
            i += 3;
            continue;
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn ok(v: Value) -> Response {
    let mut v = v;
    v["ok"] = Value::Bool(true);
    axum::Json(v).into_response()
}

fn not_ok(error: &str) -> Response {
    axum::Json(json!({ "ok": false, "error": error })).into_response()
}

async fn api(
    State(s): State<Arc<FakeState>>,
    Path(method): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let header = |n: &str| {
        headers
            .get(n)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
    };
    let content_type = header("content-type").unwrap_or_default();
    let parsed = if content_type.starts_with("application/json") {
        serde_json::from_slice(&body).unwrap_or(Value::Null)
    } else {
        form_to_json(&body)
    };
    let auth = header("authorization");
    let mut status = 200;
    let rate_limited = method == "chat.postMessage"
        && s.rate_limit
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok();
    if rate_limited {
        status = 429;
    }
    lock(&s.calls).push(Call {
        method: method.clone(),
        auth: auth.clone(),
        content_type,
        body: parsed.clone(),
        status,
        at: Instant::now(),
    });
    if rate_limited {
        let wait = s.retry_after.load(Ordering::SeqCst).to_string();
        return (
            StatusCode::TOO_MANY_REQUESTS,
            [("retry-after", wait)],
            "rate limited",
        )
            .into_response();
    }
    let want = if method == "apps.connections.open" {
        APP_TOKEN
    } else {
        BOT_TOKEN
    };
    if auth.as_deref() != Some(&format!("Bearer {want}")) {
        return not_ok("invalid_auth");
    }
    let base = lock(&s.base).clone();
    match method.as_str() {
        "auth.test" => ok(json!({
            "url": "https://acme.slack.com/",
            "team": "Acme",
            "user": "fleetcmd",
            "team_id": TEAM,
            "user_id": BOT_USER,
            "bot_id": "B0BOT",
        })),
        "apps.connections.open" => {
            let n = s.opens.fetch_add(1, Ordering::SeqCst) + 1;
            let ws = base.replacen("http://", "ws://", 1);
            ok(json!({ "url": format!("{ws}/link?ticket=t{n}") }))
        }
        "chat.postMessage" => {
            if let Some(e) = lock(&s.fail_with).take() {
                return not_ok(&e);
            }
            if !parsed.get("channel").is_some_and(Value::is_string) {
                return not_ok("channel_not_found");
            }
            let n = s.next_ts.fetch_add(1, Ordering::SeqCst) + 1;
            ok(json!({
                "channel": parsed["channel"],
                "ts": format!("1700000000.{n:06}"),
                "message": { "type": "message", "text": parsed["text"] },
            }))
        }
        "chat.update" => ok(json!({
            "channel": parsed["channel"],
            "ts": parsed["ts"],
            "text": parsed["text"],
        })),
        "files.getUploadURLExternal" => ok(json!({
            "upload_url": format!("{base}/upload/{FILE_ID}"),
            "file_id": FILE_ID,
        })),
        "files.completeUploadExternal" => ok(json!({
            "files": [{ "id": FILE_ID, "title": "full reply" }],
        })),
        _ => not_ok("unknown_method"),
    }
}

async fn upload(
    State(s): State<Arc<FakeState>>,
    Path(_id): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let auth = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    lock(&s.uploads).push((auth, body.to_vec()));
    (StatusCode::OK, format!("OK - {}", body.len())).into_response()
}

async fn link(State(s): State<Arc<FakeState>>, ws: WebSocketUpgrade) -> Response {
    ws.on_upgrade(move |socket| session(s, socket))
}

async fn session(s: Arc<FakeState>, mut socket: WebSocket) {
    let n = s.connections.fetch_add(1, Ordering::SeqCst) + 1;
    let (tx, mut rx) = mpsc::unbounded_channel();
    let hello = json!({
        "type": "hello",
        "num_connections": 1,
        "debug_info": { "host": "fake-slack", "approximate_connection_time": 18060 },
        "connection_info": { "app_id": "A0APP" },
    });
    if socket
        .send(Message::Text(hello.to_string().into()))
        .await
        .is_err()
    {
        return;
    }
    *lock(&s.conn) = Some(tx);
    loop {
        tokio::select! {
            cmd = rx.recv() => match cmd {
                Some(WsCmd::Send(text)) => {
                    if socket.send(Message::Text(text.into())).await.is_err() {
                        return;
                    }
                }
                Some(WsCmd::Close) | None => {
                    let _ = socket.send(Message::Close(None)).await;
                    return;
                }
            },
            frame = socket.recv() => match frame {
                Some(Ok(Message::Text(t))) => {
                    let v = serde_json::from_str(t.as_str()).unwrap_or(Value::String(t.to_string()));
                    lock(&s.acks).push((n, v));
                }
                Some(Ok(Message::Close(_))) | None | Some(Err(_)) => return,
                Some(Ok(_)) => {}
            }
        }
    }
}
