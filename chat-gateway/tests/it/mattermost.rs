//! The Mattermost adapter against a local fake server speaking Mattermost's
//! documented wire formats: REST API v4 (`users/me`, `posts`, `posts/{id}/patch`,
//! `files`, error JSON, 429 with `Retry-After` / `X-Ratelimit-Reset`), the
//! WebSocket event stream (`authentication_challenge`, `hello`, `posted`
//! with `data.post` as a JSON string, sequence numbers, resume), slash
//! command requests (form-encoded, `token`) and interactive button clicks
//! (`PostActionIntegrationRequest`). End to end through the router with a
//! policy that binds Mattermost identities.

use fleetcmd_gateway::adapters::HttpInbound;
use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Json;
use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::extract::{Multipart, Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use fleetcmd_gateway::adapters::mattermost::buttons::ButtonSigner;
use fleetcmd_gateway::adapters::mattermost::render::{MAX_POST_CHARS, post_body};
use fleetcmd_gateway::adapters::mattermost::{EDIT_INTERVAL, MattermostAdapter, MattermostConfig};
use fleetcmd_gateway::adapters::{
    Action, AdapterError, ChatAdapter, CodeBlock, Incoming, Reply, Section,
};
use fleetcmd_gateway::router::Router;
use fleetcmd_proto::v1;
use serde_json::{Value, json};
use tokio::sync::broadcast;
use tokio::time::{Instant, sleep, timeout};

use crate::support::{FakeController, now, router_for, serve_http};

const TOKEN: &str = "bottoken0123456789abcdefgh";
const SLASH: &str = "slashtoken0123456789abcdef";
const SECRET: &str = "action-secret-0123456789abcdef";
const BOT: &str = "bot000000000000000000000id";
pub(crate) const ALICE: &str = "alice0000000000000000000id";
const BOB: &str = "bob00000000000000000000xid";
const MALLORY: &str = "mallory00000000000000000id";
const OTHER_BOT: &str = "otherbot0000000000000000id";
pub(crate) const CHANNEL: &str = "chan0000000000000000000ops";
const DM: &str = "dm000000000000000000000000";
const FORBIDDEN: &str = "forbidden00000000000000000";
const TEAM: &str = "team00000000000000000000id";

// ---------------------------------------------------------------- fake server

#[derive(Clone, Debug)]
pub(crate) struct Req {
    at: Instant,
    method: &'static str,
    path: String,
    auth: String,
    pub(crate) body: Value,
}

#[derive(Clone, Debug)]
enum WsCmd {
    Event(Value),
    Raw(String),
    Drop,
}

#[derive(Clone, Debug)]
struct WsConnect {
    query: HashMap<String, String>,
    challenge: Value,
}

pub(crate) struct Fake {
    requests: Mutex<Vec<Req>>,
    next_id: AtomicUsize,
    /// Headers of the next 429 answers to `POST /posts`, in order.
    limits: Mutex<VecDeque<Vec<(&'static str, &'static str)>>>,
    connects: Mutex<Vec<WsConnect>>,
    /// Sockets that have sent `hello` (and so receive events).
    live: AtomicUsize,
    seq: AtomicI64,
    events: broadcast::Sender<WsCmd>,
    /// Broadcast each created post back as a `posted` event, as Mattermost does.
    echo: AtomicBool,
}

impl Fake {
    fn new() -> Arc<Fake> {
        Arc::new(Fake {
            requests: Mutex::new(Vec::new()),
            next_id: AtomicUsize::new(1),
            limits: Mutex::new(VecDeque::new()),
            connects: Mutex::new(Vec::new()),
            live: AtomicUsize::new(0),
            seq: AtomicI64::new(0),
            events: broadcast::channel(64).0,
            echo: AtomicBool::new(true),
        })
    }

    fn record(&self, method: &'static str, path: &str, headers: &HeaderMap, body: Value) {
        let auth = headers
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_string();
        self.requests
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(Req {
                at: Instant::now(),
                method,
                path: path.to_string(),
                auth,
                body,
            });
    }

    fn requests(&self) -> Vec<Req> {
        self.requests
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    pub(crate) fn posts(&self) -> Vec<Req> {
        self.requests()
            .into_iter()
            .filter(|r| r.method == "POST" && r.path == "/api/v4/posts")
            .collect()
    }

    pub(crate) fn patches(&self) -> Vec<Req> {
        self.requests()
            .into_iter()
            .filter(|r| r.method == "PUT")
            .collect()
    }

    fn connects(&self) -> Vec<WsConnect> {
        self.connects
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    fn id(&self, kind: &str) -> String {
        let n = self.next_id.fetch_add(1, Ordering::SeqCst);
        format!("{kind}{n:0>width$}", width = 26 - kind.len())
    }

    fn push(&self, cmd: WsCmd) {
        let _ = self.events.send(cmd);
    }
}

fn api_error(status: StatusCode, id: &str, message: &str) -> Response {
    (
        status,
        Json(json!({
            "id": id,
            "message": message,
            "detailed_error": "",
            "request_id": "req1",
            "status_code": status.as_u16(),
        })),
    )
        .into_response()
}

fn authorized(headers: &HeaderMap) -> bool {
    headers.get("authorization").and_then(|v| v.to_str().ok()) == Some(&format!("Bearer {TOKEN}"))
}

fn unauthorized() -> Response {
    api_error(
        StatusCode::UNAUTHORIZED,
        "api.context.session_expired.app_error",
        "Invalid or expired session, please login again.",
    )
}

/// A post as Mattermost serialises it.
fn post_json(
    id: &str,
    user: &str,
    channel: &str,
    root: &str,
    message: &str,
    kind: &str,
    props: Value,
) -> Value {
    json!({
        "id": id, "create_at": 1_700_000_000_000u64, "update_at": 1_700_000_000_000u64,
        "edit_at": 0, "delete_at": 0, "is_pinned": false, "user_id": user,
        "channel_id": channel, "root_id": root, "original_id": "", "message": message,
        "type": kind, "props": props, "hashtags": "", "pending_post_id": "",
        "reply_count": 0, "metadata": {},
    })
}

/// A `posted` WebSocket event (`data.post` is a JSON string).
fn posted_event(post: &Value, channel_type: &str, sender_name: &str) -> Value {
    json!({
        "event": "posted",
        "data": {
            "channel_display_name": "Ops",
            "channel_name": "ops",
            "channel_type": channel_type,
            "post": post.to_string(),
            "sender_name": sender_name,
            "set_online": true,
            "team_id": TEAM,
        },
        "broadcast": { "omit_users": null, "user_id": "", "channel_id": post["channel_id"], "team_id": "" },
        "seq": 0,
    })
}

async fn users_me(State(f): State<Arc<Fake>>, headers: HeaderMap) -> Response {
    f.record("GET", "/api/v4/users/me", &headers, Value::Null);
    if !authorized(&headers) {
        return unauthorized();
    }
    Json(json!({ "id": BOT, "username": "fleetbot", "is_bot": true, "roles": "system_user" }))
        .into_response()
}

async fn team_by_name(Path(name): Path<String>, headers: HeaderMap) -> Response {
    if !authorized(&headers) {
        return unauthorized();
    }
    if name == "ops" {
        Json(json!({ "id": TEAM, "name": "ops" })).into_response()
    } else {
        api_error(
            StatusCode::NOT_FOUND,
            "app.team.get_by_name.missing.app_error",
            "Unable to find the existing team.",
        )
    }
}

async fn create_post(
    State(f): State<Arc<Fake>>,
    headers: HeaderMap,
    Json(body): Json<Value>,
) -> Response {
    f.record("POST", "/api/v4/posts", &headers, body.clone());
    if !authorized(&headers) {
        return unauthorized();
    }
    let limit = f
        .limits
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .pop_front();
    if let Some(h) = limit {
        let mut resp = api_error(
            StatusCode::TOO_MANY_REQUESTS,
            "api.context.rate_limit.app_error",
            "Too many requests",
        );
        for (k, v) in h {
            resp.headers_mut()
                .insert(k, v.parse().unwrap_or_else(|e| panic!("{e}")));
        }
        return resp;
    }
    let channel = body["channel_id"].as_str().unwrap_or("");
    if channel == FORBIDDEN {
        return api_error(
            StatusCode::FORBIDDEN,
            "api.context.permissions.app_error",
            "You do not have the appropriate permissions.",
        );
    }
    let id = f.id("post");
    let mut props = body.get("props").cloned().unwrap_or(json!({}));
    props["from_bot"] = json!("true");
    let created = post_json(
        &id,
        BOT,
        channel,
        body["root_id"].as_str().unwrap_or(""),
        body["message"].as_str().unwrap_or(""),
        "",
        props,
    );
    if f.echo.load(Ordering::SeqCst) {
        f.push(WsCmd::Event(posted_event(&created, "O", "@fleetbot")));
    }
    (StatusCode::CREATED, Json(created)).into_response()
}

async fn patch_post(
    State(f): State<Arc<Fake>>,
    Path(id): Path<String>,
    headers: HeaderMap,
    Json(body): Json<Value>,
) -> Response {
    f.record(
        "PUT",
        &format!("/api/v4/posts/{id}/patch"),
        &headers,
        body.clone(),
    );
    if !authorized(&headers) {
        return unauthorized();
    }
    Json(post_json(
        &id,
        BOT,
        CHANNEL,
        "",
        body["message"].as_str().unwrap_or(""),
        "",
        json!({}),
    ))
    .into_response()
}

async fn upload(State(f): State<Arc<Fake>>, headers: HeaderMap, mut mp: Multipart) -> Response {
    let mut fields = serde_json::Map::new();
    while let Ok(Some(field)) = mp.next_field().await {
        let name = field.name().unwrap_or("").to_string();
        if let Some(file) = field.file_name() {
            fields.insert("filename".into(), json!(file));
        }
        let text = field.text().await.unwrap_or_default();
        fields.insert(name, json!(text));
    }
    f.record("POST", "/api/v4/files", &headers, Value::Object(fields));
    if !authorized(&headers) {
        return unauthorized();
    }
    let id = f.id("file");
    (
        StatusCode::CREATED,
        Json(
            json!({ "file_infos": [{ "id": id, "name": "fleetcmd-reply.txt" }], "client_ids": [] }),
        ),
    )
        .into_response()
}

async fn websocket(
    State(f): State<Arc<Fake>>,
    Query(q): Query<HashMap<String, String>>,
    up: WebSocketUpgrade,
) -> Response {
    up.on_upgrade(move |socket| ws_session(f, q, socket))
}

async fn ws_send(socket: &mut WebSocket, v: &Value) -> bool {
    socket
        .send(Message::Text(v.to_string().into()))
        .await
        .is_ok()
}

async fn ws_session(f: Arc<Fake>, query: HashMap<String, String>, mut socket: WebSocket) {
    let Ok(Some(Ok(Message::Text(first)))) = timeout(Duration::from_secs(5), socket.recv()).await
    else {
        return;
    };
    let challenge: Value = serde_json::from_str(first.as_str()).unwrap_or(Value::Null);
    f.connects
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .push(WsConnect {
            query: query.clone(),
            challenge: challenge.clone(),
        });
    if challenge["action"] != "authentication_challenge" || challenge["data"]["token"] != TOKEN {
        let _ = ws_send(&mut socket, &json!({
            "status": "FAIL", "seq_reply": challenge["seq"],
            "error": { "id": "api.web_socket_router.not_authenticated.app_error", "message": "not authenticated" },
        }))
        .await;
        return;
    }
    if !ws_send(
        &mut socket,
        &json!({ "status": "OK", "seq_reply": challenge["seq"] }),
    )
    .await
    {
        return;
    }
    if query.get("connection_id").map(String::as_str) != Some("conn1") {
        f.seq.store(0, Ordering::SeqCst);
    }
    let mut rx = f.events.subscribe();
    let hello = json!({
        "event": "hello",
        "data": { "connection_id": "conn1", "server_version": "10.5.0", "server_hostname": "mm1" },
        "broadcast": { "omit_users": null, "user_id": BOT, "channel_id": "", "team_id": "" },
        "seq": f.seq.fetch_add(1, Ordering::SeqCst),
    });
    if !ws_send(&mut socket, &hello).await {
        return;
    }
    f.live.fetch_add(1, Ordering::SeqCst);
    loop {
        tokio::select! {
            cmd = rx.recv() => match cmd {
                Ok(WsCmd::Event(mut v)) => {
                    v["seq"] = json!(f.seq.fetch_add(1, Ordering::SeqCst));
                    if !ws_send(&mut socket, &v).await { break; }
                }
                Ok(WsCmd::Raw(s)) => {
                    if socket.send(Message::Text(s.into())).await.is_err() { break; }
                }
                Ok(WsCmd::Drop) | Err(_) => break, // dropped without a close frame
            },
            m = socket.recv() => match m {
                None | Some(Err(_)) | Some(Ok(Message::Close(_))) => break,
                Some(Ok(_)) => {}
            },
        }
    }
    f.live.fetch_sub(1, Ordering::SeqCst);
}

pub(crate) async fn start_fake() -> (Arc<Fake>, String) {
    let f = Fake::new();
    let app = axum::Router::new()
        .route("/api/v4/users/me", get(users_me))
        .route("/api/v4/teams/name/{name}", get(team_by_name))
        .route("/api/v4/posts", post(create_post))
        .route("/api/v4/posts/{id}/patch", put(patch_post))
        .route("/api/v4/files", post(upload))
        .route("/api/v4/websocket", get(websocket))
        .with_state(f.clone());
    let (base, _) = serve_http(app).await;
    (f, base)
}

// ---------------------------------------------------------------- helpers

pub(crate) fn config(base: &str, callback: &str, extra: &str) -> MattermostConfig {
    toml::from_str(&format!(
        r#"
url = "{base}"
server = "test"
token = "{TOKEN}"
slash_tokens = ["another-token-for-a-second-command", "{SLASH}"]
action_secret = "{SECRET}"
callback_url = "{callback}"
{extra}
"#
    ))
    .unwrap_or_else(|e| panic!("config: {e}"))
}

/// The fake server, a connected adapter and the adapter's HTTP routes.
struct Harness {
    fake: Arc<Fake>,
    adapter: MattermostAdapter,
    /// Base URL of the adapter's routes.
    gw: String,
}

async fn harness(extra: &str) -> Harness {
    let (fake, base) = start_fake().await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .unwrap_or_else(|e| panic!("bind: {e}"));
    let gw = format!(
        "http://{}",
        listener.local_addr().unwrap_or_else(|e| panic!("{e}"))
    );
    let cfg = config(&base, &format!("{gw}/mattermost/actions"), extra);
    let adapter = timeout(Duration::from_secs(10), MattermostAdapter::connect(&cfg))
        .await
        .unwrap_or_else(|_| panic!("connect timed out"))
        .unwrap_or_else(|e| panic!("connect: {e}"));
    let routes = adapter.routes();
    tokio::spawn(async move {
        let _ = axum::serve(listener, routes).await;
    });
    Harness { fake, adapter, gw }
}

/// Polls `f` (bounded) until it returns something.
async fn eventually<T>(what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        sleep(Duration::from_millis(10)).await;
    }
}

pub(crate) async fn live(f: &Fake, n: usize) {
    eventually("websocket connection", || {
        (f.live.load(Ordering::SeqCst) >= n).then_some(())
    })
    .await;
}

async fn next(adapter: &mut MattermostAdapter) -> Incoming {
    timeout(Duration::from_secs(5), adapter.recv())
        .await
        .unwrap_or_else(|_| panic!("no message within 5 s"))
        .unwrap_or_else(|| panic!("adapter ended"))
}

fn client() -> reqwest::Client {
    let _ = rustls::crypto::ring::default_provider().install_default();
    reqwest::Client::new()
}

fn chan(id: &str) -> String {
    format!("mattermost:test:{id}")
}

fn ok<T, E: std::fmt::Display>(r: Result<T, E>) -> T {
    r.unwrap_or_else(|e| panic!("{e}"))
}

// ---------------------------------------------------------------- REST

#[tokio::test]
async fn posts_edits_and_long_replies_use_rest_v4_with_bearer() {
    let h = harness("").await;
    let f = &h.fake;
    let who = f.requests();
    assert_eq!(who[0].path, "/api/v4/users/me");
    assert_eq!(who[0].auth, format!("Bearer {TOKEN}"));
    assert_eq!(h.adapter.bot_user_id(), BOT);

    let reply = Reply {
        thread: Some("root0000000000000000000000".into()),
        ..Reply::text("hello")
    };
    let posted = ok(h.adapter.send(&chan(CHANNEL), reply).await);
    assert_eq!(posted.channel, chan(CHANNEL));
    let p = f.posts();
    assert_eq!(p.len(), 1);
    assert_eq!(p[0].auth, format!("Bearer {TOKEN}"));
    assert_eq!(
        p[0].body,
        json!({ "channel_id": CHANNEL, "message": "**hello**", "root_id": "root0000000000000000000000" })
    );

    // Edits: PUT …/patch, at most one per second per post.
    let first_edit = Instant::now();
    ok(h.adapter.edit(&posted, Reply::text("second")).await);
    ok(h.adapter.edit(&posted, Reply::text("third")).await);
    let e = f.patches();
    assert_eq!(e.len(), 2);
    assert_eq!(e[0].path, format!("/api/v4/posts/{}/patch", posted.id));
    assert_eq!(e[0].auth, format!("Bearer {TOKEN}"));
    assert_eq!(e[0].body, json!({ "message": "**second**" }));
    assert_eq!(e[1].body, json!({ "message": "**third**" }));
    let gap = e[1].at - first_edit;
    assert!(
        gap >= EDIT_INTERVAL,
        "second edit {gap:?} after the first was asked"
    );

    // A reply over the post limit: cut, then the full text as a file in the thread.
    let long: String = (0..2500).map(|i| format!("output line {i:05}\n")).collect();
    let big = Reply {
        sections: vec![Section {
            title: "web-1".into(),
            blocks: vec![CodeBlock {
                label: "stdout".into(),
                text: long.clone(),
                omitted_lines: 0,
            }],
            ..Section::default()
        }],
        ..Reply::text("big")
    };
    let big_ref = ok(h.adapter.send(&chan(CHANNEL), big).await);
    let p = f.posts();
    assert_eq!(p.len(), 3, "{p:#?}");
    let cut = p[1].body["message"].as_str().unwrap_or_default();
    assert!(cut.chars().count() <= MAX_POST_CHARS);
    assert!(cut.contains("output line 00000") && !cut.contains("output line 02499"));
    assert!(
        cut.ends_with("the full reply is in the file below_"),
        "{}",
        &cut[cut.len() - 200..]
    );
    assert_eq!(
        cut.lines().filter(|l| *l == "```").count() % 2,
        0,
        "fences balanced"
    );
    let files: Vec<Req> = f
        .requests()
        .into_iter()
        .filter(|r| r.path == "/api/v4/files")
        .collect();
    assert_eq!(files.len(), 1);
    assert_eq!(files[0].auth, format!("Bearer {TOKEN}"));
    assert_eq!(files[0].body["channel_id"], CHANNEL);
    assert_eq!(files[0].body["filename"], "fleetcmd-reply.txt");
    let content = files[0].body["files"].as_str().unwrap_or_default();
    assert!(
        content.starts_with("big\nweb-1\nstdout\noutput line 00000\n")
            && content.contains("output line 02499")
    );
    assert_eq!(
        p[2].body["root_id"],
        json!(big_ref.id),
        "file posted in the reply's thread"
    );
    assert_eq!(p[2].body["channel_id"], CHANNEL);
    assert_eq!(p[2].body["file_ids"].as_array().map(Vec::len), Some(1));

    // Channels of other servers or adapters are refused before any request.
    let before = f.requests().len();
    assert!(
        h.adapter
            .send("mattermost:other:abc", Reply::text("x"))
            .await
            .is_err()
    );
    assert!(
        h.adapter
            .send("slack:T1:C1", Reply::text("x"))
            .await
            .is_err()
    );
    assert_eq!(f.requests().len(), before);
}

#[tokio::test]
async fn api_errors_are_clear_and_rate_limits_are_waited_out() {
    let h = harness("").await;
    let f = &h.fake;

    let err = h.adapter.send(&chan(FORBIDDEN), Reply::text("x")).await;
    let Err(AdapterError::Platform { what, message }) = err else {
        panic!("expected a platform error, got {err:?}");
    };
    assert_eq!(what, "POST /api/v4/posts");
    assert_eq!(
        message,
        "HTTP 403: api.context.permissions.app_error: You do not have the appropriate permissions."
    );
    assert_eq!(f.posts().len(), 1, "an error other than 429 is not retried");

    // 429 with Retry-After, then 429 with only X-Ratelimit-Reset, then success.
    f.limits.lock().unwrap_or_else(|p| p.into_inner()).extend([
        vec![
            ("retry-after", "1"),
            ("x-ratelimit-limit", "10"),
            ("x-ratelimit-remaining", "0"),
            ("x-ratelimit-reset", "1"),
        ],
        vec![
            ("x-ratelimit-limit", "10"),
            ("x-ratelimit-remaining", "0"),
            ("x-ratelimit-reset", "1"),
        ],
    ]);
    let started = Instant::now();
    ok(h.adapter
        .send(&chan(CHANNEL), Reply::text("after the limit"))
        .await);
    let p = f.posts();
    assert_eq!(p.len(), 4, "two refused attempts and the accepted one");
    assert!(
        p[2].at - p[1].at >= Duration::from_millis(950),
        "waited Retry-After"
    );
    assert!(
        p[3].at - p[2].at >= Duration::from_millis(950),
        "waited X-Ratelimit-Reset"
    );
    assert_eq!(p[3].body, p[1].body, "the same post was retried");
    assert!(started.elapsed() < Duration::from_secs(8));

    // Bounded: after 3 retries the request fails.
    f.limits
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .extend((0..4).map(|_| vec![("retry-after", "0")]));
    let err = h.adapter.send(&chan(CHANNEL), Reply::text("never")).await;
    let message = match err {
        Err(AdapterError::Platform { message, .. }) => message,
        other => panic!("{other:?}"),
    };
    assert!(message.contains("rate limited (429)"), "{message}");
    assert_eq!(f.posts().len(), 8, "1 + 3 retries");
    // Errors never carry the token.
    assert!(!message.contains(TOKEN));
}

#[tokio::test]
async fn a_bad_token_or_server_fails_connect_clearly() {
    let (_f, base) = start_fake().await;
    let mut cfg = config(&base, "http://127.0.0.1:1/mattermost/actions", "");
    cfg.token = Some(fleetcmd_core::crypto::Secret::new("wrong".into()));
    let err = ok(timeout(Duration::from_secs(10), MattermostAdapter::connect(&cfg)).await)
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    assert_eq!(
        err,
        "GET /api/v4/users/me: HTTP 401: api.context.session_expired.app_error: Invalid or expired session, please login again."
    );
    let cfg = config(
        &base,
        "http://127.0.0.1:1/mattermost/actions",
        r#"team = "nosuchteam""#,
    );
    let err = ok(timeout(Duration::from_secs(10), MattermostAdapter::connect(&cfg)).await)
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    assert!(
        err.contains("app.team.get_by_name.missing.app_error"),
        "{err}"
    );
}

// ---------------------------------------------------------------- WebSocket

#[tokio::test]
async fn websocket_events_become_messages_and_survive_a_dropped_socket() {
    let mut h = harness(r#"team = "ops""#).await;
    let f = h.fake.clone();
    f.echo.store(false, Ordering::SeqCst);
    live(&f, 1).await;
    let c = f.connects();
    assert_eq!(
        c[0].challenge,
        json!({ "seq": 1, "action": "authentication_challenge", "data": { "token": TOKEN } })
    );
    assert!(
        c[0].query.is_empty(),
        "first connection is fresh: {:?}",
        c[0].query
    );

    let ev = |id: &str,
              user: &str,
              channel: &str,
              ctype: &str,
              root: &str,
              text: &str,
              kind: &str,
              props: Value| {
        posted_event(
            &post_json(id, user, channel, root, text, kind, props),
            ctype,
            "@someone",
        )
    };
    // A channel message; a direct message in a thread; posts by bots,
    // webhooks and this bot; a system message; malformed input.
    f.push(WsCmd::Event(ev(
        "p1",
        ALICE,
        CHANNEL,
        "O",
        "",
        "!whoami",
        "",
        json!({}),
    )));
    f.push(WsCmd::Raw("this is not json".into()));
    f.push(WsCmd::Event(
        json!({ "event": "posted", "data": { "post": "{broken" }, "seq": 0 }),
    ));
    f.push(WsCmd::Event(
        json!({ "event": "typing", "data": { "parent_id": "" }, "seq": 0 }),
    ));
    f.push(WsCmd::Event(ev(
        "p2",
        ALICE,
        DM,
        "D",
        "root0000000000000000000000",
        "whoami",
        "",
        json!({}),
    )));
    f.push(WsCmd::Event(ev(
        "p3",
        OTHER_BOT,
        CHANNEL,
        "O",
        "",
        "!run reboot on all",
        "",
        json!({ "from_bot": "true" }),
    )));
    f.push(WsCmd::Event(ev(
        "p4",
        ALICE,
        CHANNEL,
        "O",
        "",
        "!run reboot on all",
        "",
        json!({ "from_webhook": "true", "override_username": "alice" }),
    )));
    f.push(WsCmd::Event(ev(
        "p5",
        BOT,
        CHANNEL,
        "O",
        "",
        "!whoami",
        "",
        json!({}),
    )));
    f.push(WsCmd::Event(ev(
        "p6",
        ALICE,
        CHANNEL,
        "O",
        "",
        "alice joined the channel",
        "system_join_channel",
        json!({}),
    )));
    f.push(WsCmd::Event(ev(
        "p7",
        ALICE,
        CHANNEL,
        "O",
        "",
        "@FleetBot: whoami",
        "",
        json!({}),
    )));

    let m = next(&mut h.adapter).await;
    assert_eq!(
        m,
        Incoming {
            identity: ok(fleetcmd_core::ids::Identity::parse(&format!(
                "mattermost:test:{ALICE}"
            ))),
            channel: chan(CHANNEL),
            text: "!whoami".into(),
            thread: None,
            direct: false,
            from_bot: false,
        }
    );
    let m = next(&mut h.adapter).await;
    assert_eq!(
        (m.channel.as_str(), m.text.as_str(), m.direct, m.from_bot),
        (chan(DM).as_str(), "whoami", true, false)
    );
    assert_eq!(m.thread.as_deref(), Some("root0000000000000000000000"));
    for who in [OTHER_BOT, ALICE, BOT] {
        let m = next(&mut h.adapter).await;
        assert!(m.from_bot, "{m:?}");
        assert_eq!(m.identity.as_str(), format!("mattermost:test:{who}"));
    }
    let m = next(&mut h.adapter).await;
    assert_eq!(
        (m.text.as_str(), m.direct, m.from_bot),
        ("whoami", true, false),
        "system message skipped, mention stripped"
    );

    // The server drops the socket: the adapter reconnects, resuming.
    let seq_before = f.seq.load(Ordering::SeqCst);
    f.push(WsCmd::Drop);
    eventually("a second connection", || {
        (f.connects().len() >= 2).then_some(())
    })
    .await;
    live(&f, 1).await;
    let c = f.connects();
    assert_eq!(
        c[1].query.get("connection_id").map(String::as_str),
        Some("conn1")
    );
    assert_eq!(
        c[1].query.get("sequence_number"),
        Some(&seq_before.to_string())
    );
    assert_eq!(c[1].challenge["data"]["token"], TOKEN);

    // A replayed post is not delivered twice; another team's post is ignored.
    f.push(WsCmd::Event(ev(
        "p1",
        ALICE,
        CHANNEL,
        "O",
        "",
        "!whoami",
        "",
        json!({}),
    )));
    let mut other_team = ev("p8", ALICE, CHANNEL, "O", "", "!other team", "", json!({}));
    other_team["data"]["team_id"] = json!("someotherteam0000000000000");
    f.push(WsCmd::Event(other_team));
    f.push(WsCmd::Event(ev(
        "p9",
        BOB,
        CHANNEL,
        "O",
        "",
        "!after reconnect",
        "",
        json!({}),
    )));
    let m = next(&mut h.adapter).await;
    assert_eq!(
        (m.identity.as_str(), m.text.as_str()),
        (
            format!("mattermost:test:{BOB}").as_str(),
            "!after reconnect"
        )
    );
}

// ---------------------------------------------------------------- end to end

/// A router over the fake controller with a policy binding Mattermost users.
fn mm_router(output: &[u8]) -> Arc<Router<FakeController>> {
    let policy = format!(
        r#"
[commands.uptime]
description = "Load average and uptime"
argv = ["/usr/bin/uptime"]

[roles.oncall]
commands = ["uptime"]
channels = ["mattermost:test:{CHANNEL}"]

[[bindings]]
subjects = ["mattermost:test:{ALICE}", "mattermost:test:{BOB}"]
roles = ["oncall"]
"#
    );
    router_for(4, &policy, |c| c.output = output.to_vec())
}

/// The harness with the gateway loop running on it.
async fn gateway(
    output: &[u8],
) -> (
    Arc<Fake>,
    String,
    Arc<Router<FakeController>>,
    tokio::task::JoinHandle<()>,
) {
    let h = harness("").await;
    let router = mm_router(output);
    live(&h.fake, 1).await;
    let task = tokio::spawn(fleetcmd_gateway::serve(router.clone(), h.adapter));
    (h.fake, h.gw, router, task)
}

pub(crate) fn say(f: &Fake, id: &str, user: &str, text: &str, props: Value) {
    f.push(WsCmd::Event(posted_event(
        &post_json(id, user, CHANNEL, "", text, "", props),
        "O",
        "@admin",
    )));
}

pub(crate) async fn post_containing(f: &Fake, needle: &str) -> Req {
    eventually(needle, || {
        f.posts().into_iter().find(|p| {
            p.body["message"]
                .as_str()
                .is_some_and(|m| m.contains(needle))
        })
    })
    .await
}

#[tokio::test]
async fn a_channel_message_gets_a_reply_the_result_is_edited_in_and_a_dropped_socket_heals() {
    let (f, _gw, router, task) = gateway(b"up 3 days, load 0.5").await;
    say(&f, "u1", ALICE, "!run uptime on all", json!({}));
    let first = post_containing(&f, "2 targets").await;
    assert_eq!(first.body["channel_id"], CHANNEL);
    let msg = first.body["message"].as_str().unwrap_or_default();
    assert!(
        msg.contains(&format!("by mattermost:test:{ALICE}")),
        "{msg}"
    );
    let patch = eventually("the result edit", || f.patches().into_iter().next()).await;
    let text = patch.body["message"].as_str().unwrap_or_default();
    assert!(
        text.contains("succeeded (2/2 ok)") && text.contains("up 3 days, load 0.5"),
        "{text}"
    );
    let submitted = router.controller().submitted();
    assert_eq!(submitted.len(), 1);
    let spec = ok(fleetcmd_core::job::JobSpec::from_bytes(&submitted[0].spec));
    assert_eq!(spec.requester.as_str(), format!("mattermost:test:{ALICE}"));
    assert_eq!(spec.channel, chan(CHANNEL));
    // The bot's own posts came back as `posted` events and were ignored:
    // exactly one post (the job header) was made.
    assert_eq!(f.posts().len(), 1, "{:#?}", f.posts());

    // The server drops the socket; the gateway reconnects and still answers.
    f.push(WsCmd::Drop);
    eventually("the reconnect", || (f.connects().len() >= 2).then_some(())).await;
    live(&f, 1).await;
    say(&f, "u2", BOB, "@fleetbot whoami", json!({}));
    let again = post_containing(&f, "you are").await;
    let text = again.body["message"].as_str().unwrap_or_default();
    assert!(
        text.contains(&format!("you are mattermost:test:{BOB}")),
        "{text}"
    );
    task.abort();
}

#[tokio::test]
async fn a_display_name_that_looks_like_an_admin_grants_nothing() {
    let (f, _gw, router, task) = gateway(b"x").await;
    // Mallory calls herself "admin" (sender_name, override_username); only
    // her user id counts.
    say(
        &f,
        "s1",
        MALLORY,
        "!run uptime on all",
        json!({ "override_username": "admin", "override_icon_url": "" }),
    );
    let reply = post_containing(&f, "no roles").await;
    let text = reply.body["message"].as_str().unwrap_or_default();
    assert!(
        text.contains(&format!("mattermost:test:{MALLORY}")),
        "{text}"
    );
    assert!(router.controller().submitted().is_empty());
    task.abort();
}

#[tokio::test]
async fn slash_commands_need_a_configured_token() {
    let (f, gw, router, task) = gateway(b"x").await;
    let http = client();
    let form = |token: &str, user: &str, text: &str| {
        vec![
            ("channel_id", CHANNEL.to_string()),
            ("channel_name", "ops".into()),
            ("command", "/fleet".into()),
            ("response_url", "http://127.0.0.1:1/hooks/commands/x".into()),
            ("team_domain", "ops".into()),
            ("team_id", TEAM.into()),
            ("text", text.into()),
            ("token", token.into()),
            ("trigger_id", "trig".into()),
            ("user_id", user.into()),
            ("user_name", "admin".into()),
        ]
    };
    for bad in ["wrong", "", &SLASH[..SLASH.len() - 1], &format!("{SLASH}x")] {
        let resp = ok(http
            .post(format!("{gw}/mattermost/command"))
            .form(&form(bad, MALLORY, "run uptime on all"))
            .send()
            .await);
        assert_eq!(resp.status(), 401, "token {bad:?}");
    }
    let resp = ok(http
        .post(format!("{gw}/mattermost/command"))
        .form(&form(SLASH, BOB, "whoami"))
        .send()
        .await);
    assert_eq!(resp.status(), 200);
    assert_eq!(
        resp.headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok()),
        Some("application/json")
    );
    let body: Value = ok(resp.json().await);
    assert_eq!(
        body,
        json!({ "response_type": "ephemeral", "text": "running: whoami" })
    );
    let reply = post_containing(&f, "you are").await;
    let text = reply.body["message"].as_str().unwrap_or_default();
    assert!(
        text.contains(&format!("you are mattermost:test:{BOB}")),
        "{text}"
    );
    assert_eq!(reply.body["channel_id"], CHANNEL);
    // Only the good command was routed.
    assert_eq!(f.posts().len(), 1, "{:#?}", f.posts());
    assert!(router.controller().submitted().is_empty());
    task.abort();
}

#[tokio::test]
async fn forged_button_clicks_are_refused_and_a_good_one_runs_as_the_clicker() {
    let h = harness("").await;
    let f = h.fake.clone();
    let gw = h.gw.clone();
    let router = mm_router(b"x");
    live(&f, 1).await;
    // A post with a button, as the router would send for an approval.
    let reply = Reply {
        actions: vec![Action {
            label: "Who am I".into(),
            command: "whoami".into(),
            danger: false,
        }],
        ..Reply::text("press the button")
    };
    ok(h.adapter.send(&chan(CHANNEL), reply).await);
    let task = tokio::spawn(fleetcmd_gateway::serve(router.clone(), h.adapter));
    let button = f.posts()[0].body["props"]["attachments"][0]["actions"][0].clone();
    assert_eq!(
        button["integration"]["url"],
        format!("{gw}/mattermost/actions")
    );
    let context = button["integration"]["context"].clone();
    assert_eq!(context["command"], "whoami");

    let http = client();
    let click = |user: &str, channel: &str, context: &Value| {
        json!({
            "user_id": user, "user_name": "admin", "channel_id": channel, "channel_name": "ops",
            "team_id": TEAM, "team_domain": "ops", "post_id": "post00000000000000000000001",
            "trigger_id": "trig", "type": "button", "data_source": "", "context": context,
        })
    };
    let signer = ButtonSigner::new(SECRET.as_bytes(), "x", Duration::from_secs(900));
    let mut bad_mac = context.clone();
    bad_mac["mac"] = json!("00".repeat(32));
    let mut tampered = context.clone();
    tampered["command"] = json!("run uptime on all");
    let expired = signer.context(CHANNEL, "whoami", now() - 16 * 60);
    let other_key = ButtonSigner::new(
        b"not the configured secret!!",
        "x",
        Duration::from_secs(900),
    )
    .context(CHANNEL, "run uptime on all", now());
    let mut no_mac = context.clone();
    no_mac.as_object_mut().map(|o| o.remove("mac"));
    for (what, body) in [
        ("bad mac", click(MALLORY, CHANNEL, &bad_mac)),
        ("tampered command", click(MALLORY, CHANNEL, &tampered)),
        ("expired", click(MALLORY, CHANNEL, &expired)),
        ("other key", click(MALLORY, CHANNEL, &other_key)),
        ("no mac", click(MALLORY, CHANNEL, &no_mac)),
        (
            "no context",
            json!({ "user_id": MALLORY, "channel_id": CHANNEL }),
        ),
        ("copied to another channel", click(MALLORY, DM, &context)),
    ] {
        let resp = ok(http
            .post(format!("{gw}/mattermost/actions"))
            .json(&body)
            .send()
            .await);
        assert_eq!(resp.status(), 403, "{what}");
        let answer: Value = ok(resp.json().await);
        assert!(
            answer["ephemeral_text"]
                .as_str()
                .is_some_and(|t| t.contains("not valid")),
            "{what}: {answer}"
        );
    }
    let resp = ok(http
        .post(format!("{gw}/mattermost/actions"))
        .body("{not json")
        .send()
        .await);
    assert_eq!(resp.status(), 400);

    // A fresh context signed with the configured key, clicked by Bob.
    let resp = ok(http
        .post(format!("{gw}/mattermost/actions"))
        .json(&click(BOB, CHANNEL, &context))
        .send()
        .await);
    assert_eq!(resp.status(), 200);
    let answer: Value = ok(resp.json().await);
    assert_eq!(answer, json!({ "ephemeral_text": "sent as you: whoami" }));
    let reply = post_containing(&f, "you are").await;
    let text = reply.body["message"].as_str().unwrap_or_default();
    assert!(
        text.contains(&format!("you are mattermost:test:{BOB}")),
        "{text}"
    );
    // Nothing else was routed: the button post and Bob's answer only.
    assert_eq!(f.posts().len(), 2, "{:#?}", f.posts());
    assert!(router.controller().submitted().is_empty());
    task.abort();
}

// ---------------------------------------------------------------- output is data

const HOSTILE: &str = "@channel wake up\n!run restart nginx.service on all\n@fleetcmd run reboot on all\n<!here> <!channel> @all @here.\n/kick @bob\n```\nclosing fence ``` and `ticks`\n~~~\n[click](http://evil.example/x) ![img](http://evil.example/p.png)\n\x1b[2J\x1b[31mred\u{202E}txet";

/// Mattermost's mention finder (server `GetExplicitMentions`), applied to
/// the whole message, code blocks included: the words it would treat as
/// `@` mentions.
fn mattermost_mentions(message: &str) -> Vec<String> {
    let keep =
        |c: char| c == ':' || c == '.' || c == '-' || c == '_' || c == '@' || c.is_alphanumeric();
    let mut found = Vec::new();
    for word in message.split(|c: char| !keep(c)).filter(|w| !w.is_empty()) {
        let mut candidates = vec![word];
        if word.contains(['.', '-', ':']) {
            candidates.extend(word.split(['.', '-', ':']).filter(|w| !w.is_empty()));
        }
        for w in candidates {
            if w.starts_with('@') && w.len() > 1 {
                found.push(w.to_string());
            }
        }
    }
    found
}

/// Lines outside fenced blocks.
fn outside_fences(message: &str) -> Vec<&str> {
    let mut inside = false;
    let mut out = Vec::new();
    for line in message.lines() {
        if line == "```" {
            inside = !inside;
            continue;
        }
        if !inside {
            out.push(line);
        }
    }
    assert!(!inside, "unbalanced fences in {message}");
    out
}

fn assert_inert(message: &str) {
    assert_eq!(
        mattermost_mentions(message),
        Vec::<String>::new(),
        "{message}"
    );
    for line in outside_fences(message) {
        assert!(
            !line.starts_with(['!', '/', '@', '#', '>', '|']),
            "line looks addressed or formatted: {line:?}"
        );
        assert!(
            !line.contains("](") || line.contains("\\]("),
            "link in {line:?}"
        );
    }
    assert!(
        message
            .chars()
            .all(|c| c == '\n' || c == '\t' || !c.is_control()),
        "control character"
    );
    assert!(!message.contains('\u{202E}'), "bidi override");
}

#[tokio::test]
async fn hostile_output_is_inert_in_the_posted_result() {
    let (f, _gw, _router, task) = gateway(HOSTILE.as_bytes()).await;
    say(&f, "h1", ALICE, "!run uptime on all", json!({}));
    let patch = eventually("the result edit", || f.patches().into_iter().next()).await;
    let text = patch.body["message"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert_inert(&text);
    // The output is still there, verbatim apart from the invisible breaks.
    let visible = text.replace(['\u{200D}', '\u{200B}'], "");
    assert!(
        visible.contains("\n!run restart nginx.service on all\n"),
        "{text}"
    );
    assert!(
        visible.contains("\nclosing fence ``` and `ticks`\n"),
        "{text}"
    );
    assert!(visible.contains("\n@channel wake up\n"), "{text}");
    // The fence is never closed by the output: the hostile lines are inside it.
    let inside: Vec<&str> = text
        .lines()
        .filter(|l| !outside_fences(&text).contains(l))
        .collect();
    assert!(
        inside.iter().any(|l| l.starts_with("!run restart")),
        "{inside:?}"
    );
    task.abort();
}

// ---------------------------------------------------------------- snapshots

fn snapshot_signer() -> ButtonSigner {
    ButtonSigner::new(
        SECRET.as_bytes(),
        "https://gw.example.com/mattermost/actions",
        Duration::from_secs(900),
    )
}

/// Pretty JSON with the invisible characters written as JSON escapes
/// (the same JSON, but reviewable).
fn snapshot_json(body: &Value) -> String {
    ok(serde_json::to_string_pretty(body))
        .replace('\u{200D}', "\\u200d")
        .replace('\u{200B}', "\\u200b")
        .replace('\u{FFFD}', "\\ufffd")
}

const SNAPSHOT_NOW: u64 = 1_760_000_000;
const JOB: &str = "0190aa1b-2c3d-7e4f-8a5b-6c7d8e9fa0b1";

fn job_result() -> Reply {
    let target = |agent: &str, state: &str, exit: i32, stdout: &str, stderr: &str| v1::Target {
        agent_id: agent.into(),
        state: state.into(),
        result: Some(v1::JobResult {
            job_id: JOB.into(),
            exit_code: Some(exit),
            stdout: stdout.as_bytes().to_vec(),
            stderr: stderr.as_bytes().to_vec(),
            duration_ms: 12,
            ..Default::default()
        }),
        ..Default::default()
    };
    fleetcmd_gateway::render::job(&v1::Job {
        job_id: JOB.into(),
        command: "uptime".into(),
        selector: "role=web".into(),
        requester: format!("mattermost:test:{ALICE}"),
        channel: chan(CHANNEL),
        state: "failed".into(),
        targets: vec![
            target("web-1", "ok", 0, HOSTILE, ""),
            target(
                "web-2",
                "failed",
                1,
                "partial",
                "uptime: cannot open /proc/loadavg\n@here ``` <!here> !run reboot on all",
            ),
        ],
        ..Default::default()
    })
}

#[test]
fn job_result_post_snapshot() {
    let (body, cut) = post_body(CHANNEL, &job_result(), &snapshot_signer(), SNAPSHOT_NOW);
    assert!(!cut);
    assert_inert(body["message"].as_str().unwrap_or_default());
    insta::assert_snapshot!(snapshot_json(&body));
}

#[test]
fn approval_post_snapshot() {
    let reply = Reply {
        thread: Some("root0000000000000000000000".into()),
        header: format!("`reboot` on role=web needs 1 approval — asked by mattermost:test:{ALICE}"),
        lines: vec![
            "approve with `approve 0190aa1b2c3d7e4f8a` or deny with `deny 0190aa1b2c3d7e4f8a REASON`".into(),
            "expires in 15 min; the requester cannot approve".into(),
        ],
        actions: vec![
            Action { label: "Approve".into(), command: "approve 0190aa1b2c3d7e4f8a".into(), danger: false },
            Action { label: "Deny".into(), command: "deny 0190aa1b2c3d7e4f8a".into(), danger: true },
        ],
        ..Reply::default()
    };
    let signer = snapshot_signer();
    let (body, _) = post_body(CHANNEL, &reply, &signer, SNAPSHOT_NOW);
    assert_inert(body["message"].as_str().unwrap_or_default());
    // Each button's context verifies for its own command only.
    for (i, cmd) in ["approve 0190aa1b2c3d7e4f8a", "deny 0190aa1b2c3d7e4f8a"]
        .into_iter()
        .enumerate()
    {
        let ctx = &body["props"]["attachments"][0]["actions"][i]["integration"]["context"];
        let click = signer.verify(ctx, Some(CHANNEL), SNAPSHOT_NOW + 60);
        assert_eq!(click.map(|c| c.command), Ok(cmd.to_string()));
    }
    insta::assert_snapshot!(snapshot_json(&body));
}

// ---------------------------------------------------------------- config

#[test]
fn config_problems_name_their_keys() {
    let cfg: MattermostConfig = ok(toml::from_str(
        r#"
url = "chat.example.com"
server = "has space"
token = "t"
token_file = "/nonexistent/token"
slash_tokens_file = "/nonexistent/slash"
action_secret = "short"
callback_url = "ftp://gw/mattermost/actions"
button_max_age = "10s"
"#,
    ));
    let keys: Vec<String> = cfg.validate().into_iter().map(|(k, _)| k).collect();
    assert_eq!(
        keys,
        [
            "url",
            "callback_url",
            "server",
            "button_max_age",
            "token",
            "action_secret",
            "slash_tokens_file"
        ]
    );
    let problems = cfg.validate();
    let msg = |key: &str| {
        problems
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, m)| m.clone())
            .unwrap_or_default()
    };
    assert!(
        msg("slash_tokens_file").starts_with("/nonexistent/slash: cannot read"),
        "{problems:?}"
    );
    assert_eq!(
        msg("token"),
        "give either `token` or `token_file`, not both"
    );

    // Secrets from files; Debug never shows them.
    let dir = ok(tempfile::tempdir());
    let token_file = dir.path().join("token");
    let slash_file = dir.path().join("slash");
    let secret_file = dir.path().join("secret");
    crate::support::write_private(&token_file, format!("{TOKEN}\n"));
    crate::support::write_private(&slash_file, format!("{SLASH}\n\nsecond-slash-token\n"));
    crate::support::write_private(&secret_file, format!("{SECRET}\n"));
    let cfg: MattermostConfig = ok(toml::from_str(&format!(
        r#"
url = "https://chat.example.com"
server = "chat"
token_file = "{}"
slash_tokens_file = "{}"
action_secret_file = "{}"
callback_url = "https://gw.example.com/mattermost/actions"
team = "ops"
"#,
        token_file.display(),
        slash_file.display(),
        secret_file.display()
    )));
    assert_eq!(cfg.validate(), Vec::<(String, String)>::new());
    assert_eq!(cfg.button_max_age(), Ok(Duration::from_secs(900)));
    let inline = config(
        "https://chat.example.com",
        "https://gw/mattermost/actions",
        "",
    );
    let shown = format!("{inline:?}");
    assert!(
        !shown.contains(TOKEN) && !shown.contains(SLASH) && !shown.contains(SECRET),
        "{shown}"
    );
    assert!(
        toml::from_str::<MattermostConfig>("url = \"x\"\nbogus = 1").is_err(),
        "unknown keys refused"
    );
    crate::support::write_private(&token_file, "\n");
    let problems = cfg.validate();
    assert_eq!(problems.len(), 1, "{problems:?}");
    assert_eq!(problems[0].0, "token_file");
    assert!(problems[0].1.ends_with(": empty"), "{problems:?}");
}

#[tokio::test]
async fn a_slash_command_delivered_twice_with_its_trigger_id_runs_once_and_is_reported() {
    let h = harness("").await;
    let router = mm_router(b"x");
    live(&h.fake, 1).await;
    let (failures, mut reports) = fleetcmd_gateway::adapters::AuthFailures::channel(16);
    h.adapter.report_auth_failures(failures);
    let task = tokio::spawn(fleetcmd_gateway::serve(router.clone(), h.adapter));
    let http = client();
    let form = |trigger: &str| {
        vec![
            ("channel_id", CHANNEL.to_string()),
            ("command", "/fleet".into()),
            ("team_id", TEAM.into()),
            ("text", "run uptime on all".into()),
            ("token", SLASH.into()),
            ("trigger_id", trigger.into()),
            ("user_id", ALICE.into()),
            ("user_name", "alice".into()),
        ]
    };
    let send = |trigger: &'static str| {
        let http = http.clone();
        let gw = h.gw.clone();
        let body = form(trigger);
        async move {
            ok(http
                .post(format!("{gw}/mattermost/command"))
                .form(&body)
                .send()
                .await)
            .status()
        }
    };
    assert_eq!(send("trig-dup").await, 200);
    // Mattermost (or anyone holding the slash token) sends it again.
    assert_eq!(send("trig-dup").await, 409);
    eventually("the command ran", || {
        (!router.controller().submitted().is_empty()).then_some(())
    })
    .await;
    let f = ok(reports.try_recv());
    assert_eq!(
        (f.adapter.as_str(), f.source.as_str(), f.detail.as_str()),
        (
            "mattermost",
            format!("user_id {ALICE}").as_str(),
            "request delivered again (same trigger_id); not run twice"
        )
    );
    // Another request (its own trigger id) runs.
    assert_eq!(send("trig-other").await, 200);
    eventually("the second command ran", || {
        (router.controller().submitted().len() == 2).then_some(())
    })
    .await;
    task.abort();
}

/// Decides claims as the controller does (the first claim of a key wins),
/// except `both`: a key every asker wins, the marker that each WebSocket
/// got past the post before it.
struct Referee {
    both: String,
    claimed: Mutex<std::collections::HashSet<String>>,
}

impl fleetcmd_gateway::claims::Arbiter for Referee {
    fn claim(
        &self,
        key: String,
        _ttl: Duration,
    ) -> fleetcmd_gateway::adapters::BoxFuture<
        '_,
        Result<bool, fleetcmd_gateway::controller::ControllerError>,
    > {
        let won =
            key == self.both || ok(self.claimed.lock().map_err(|e| e.to_string())).insert(key);
        Box::pin(async move { Ok(won) })
    }
}

/// Every gateway's WebSocket gets every post of its team: of two gateways
/// (two adapters, each with its own replay records) on one Mattermost,
/// the one that claims a post routes it and the other drops it.
#[tokio::test]
async fn two_gateways_on_one_team_route_each_websocket_post_once() {
    let (f, base) = start_fake().await;
    f.echo.store(false, Ordering::SeqCst);
    let referee = Arc::new(Referee {
        both: fleetcmd_gateway::claims::key("replay", &["mattermost-post", "m2"]),
        claimed: Mutex::default(),
    });
    let mut adapters = Vec::new();
    for _ in 0..2 {
        let cfg = config(&base, "http://127.0.0.1:9/mattermost/actions", "");
        let adapter = ok(
            timeout(Duration::from_secs(10), MattermostAdapter::connect(&cfg))
                .await
                .map_err(|_| "connect timed out"),
        );
        let adapter = ok(adapter);
        let guard = ok(fleetcmd_gateway::store::GatewayStore::temporary().and_then(|s| s.replay()));
        adapter.use_replay_guard(guard.with_arbiter(referee.clone()));
        adapters.push(adapter);
    }
    live(&f, 2).await;
    say(&f, "m1", ALICE, "!whoami", json!({}));
    say(&f, "m2", ALICE, "!help", json!({}));
    // Each socket delivers in order: the adapter that routed m1 gets the
    // marker m2 after it; the other gets m2 first, having dropped m1.
    let mut firsts = Vec::new();
    for a in &mut adapters {
        firsts.push(next(a).await.text);
    }
    let winner = match firsts.iter().map(String::as_str).collect::<Vec<_>>()[..] {
        ["!whoami", "!help"] => 0,
        ["!help", "!whoami"] => 1,
        _ => panic!("m1 must reach exactly one adapter: {firsts:?}"),
    };
    assert_eq!(next(&mut adapters[winner]).await.text, "!help");
}
