//! The Campfire adapter against a local fake Campfire that speaks the bot
//! API of ONCE Campfire: it sends the webhook JSON that `Webhook#payload`
//! builds (user, room with the bot-key messages path, message with html
//! and plain bodies), reads the reply from the response body, and accepts
//! bot posts on `POST /rooms/<room_id>/<bot_key>/messages` (201 with a
//! Location; a wrong bot key is redirected to the sign-in page and a room
//! the bot is not in is 404, as Campfire does).

use fleetcmd_gateway::adapters::HttpInbound;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use fleetcmd_gateway::adapters::campfire::{CampfireAdapter, CampfireConfig, render};
use fleetcmd_gateway::adapters::{AuthFailures, ChatAdapter, Reply};
use fleetcmd_gateway::secret::SecretString;
use fleetcmd_gateway::serve;
use serde_json::json;

use crate::support::{failed_job, router_with_extra, serve_http};

pub(crate) const BOT_KEY: &str = "7-kR3x9mP8qL2nZ5";
pub(crate) const TOKEN: &str = "Zq3vN8xK2mW9pL4rT7yB1cD6";
const ROOM: u64 = 12;

const BINDINGS: &str = r#"
[[bindings]]
subjects = ["campfire:acme:42", "campfire:acme:57"]
roles = ["oncall"]
"#;

pub fn client() -> reqwest::Client {
    let _ = rustls::crypto::ring::default_provider().install_default();
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap_or_else(|e| panic!("client: {e}"))
}

/// One message the fake Campfire received from the bot.
#[derive(Clone, Debug)]
pub(crate) struct Posted {
    room: String,
    content_type: String,
    pub(crate) body: String,
}

#[derive(Default)]
pub(crate) struct FakeCampfire {
    posted: Mutex<Vec<Posted>>,
    /// Requests with a wrong key (answered like Campfire: sign-in redirect).
    refused: Mutex<usize>,
}

impl FakeCampfire {
    pub(crate) fn posted(&self) -> Vec<Posted> {
        self.posted.lock().map(|p| p.clone()).unwrap_or_default()
    }
}

async fn bot_messages(
    State(fake): State<Arc<FakeCampfire>>,
    Path((room, key)): Path<(String, String)>,
    headers: HeaderMap,
    body: String,
) -> Response {
    if key != BOT_KEY {
        *fake.refused.lock().unwrap_or_else(|p| p.into_inner()) += 1;
        return (StatusCode::FOUND, [(header::LOCATION, "/session/new")]).into_response();
    }
    if room != ROOM.to_string() {
        return StatusCode::NOT_FOUND.into_response();
    }
    let mut posted = fake.posted.lock().unwrap_or_else(|p| p.into_inner());
    posted.push(Posted {
        room,
        content_type: headers
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_string(),
        body,
    });
    let location = format!("/messages/{}", 5000 + posted.len());
    (StatusCode::CREATED, [(header::LOCATION, location)]).into_response()
}

pub(crate) async fn fake_campfire() -> (Arc<FakeCampfire>, String, tokio::task::JoinHandle<()>) {
    let fake = Arc::new(FakeCampfire::default());
    let app = axum::Router::new()
        .route(
            "/rooms/{room}/{key}/messages",
            axum::routing::post(bot_messages),
        )
        .with_state(fake.clone());
    let (url, task) = serve_http(app).await;
    (fake, url, task)
}

pub(crate) fn config(url: &str, bot_key: &str) -> CampfireConfig {
    CampfireConfig {
        url: url.to_string(),
        server: "acme".to_string(),
        bot_key: Some(SecretString::new(bot_key)),
        bot_key_file: None,
        path_token: Some(SecretString::new(TOKEN)),
        path_token_file: None,
        reply_wait_ms: 3000,
        timeout_ms: 5000,
        ignore_user_ids: vec![],
    }
}

/// The JSON Campfire's `Webhook#payload` sends for a message that mentions
/// the bot (`plain` has the bot's mention removed).
/// Campfire gives every message its own id; the adapter runs each id once.
static NEXT_MESSAGE_ID: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(9001);

pub(crate) fn payload(user_id: u64, user_name: &str, plain: &str) -> serde_json::Value {
    let id = NEXT_MESSAGE_ID.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    payload_with_id(id, user_id, user_name, plain)
}

pub(crate) fn payload_with_id(
    message_id: u64,
    user_id: u64,
    user_name: &str,
    plain: &str,
) -> serde_json::Value {
    json!({
        "user": {"id": user_id, "name": user_name},
        "room": {"id": ROOM, "name": "Ops", "path": format!("/rooms/{ROOM}/{BOT_KEY}/messages")},
        "message": {
            "id": message_id,
            "body": {
                "html": format!("<div><action-text-attachment sgid=\"x\" content-type=\"application/vnd.campfire.mention\"></action-text-attachment> {plain}</div>"),
                "plain": plain
            },
            "path": format!("/rooms/{ROOM}/@{message_id}")
        }
    })
}

pub(crate) struct Answer {
    pub(crate) status: StatusCode,
    content_type: Option<String>,
    pub(crate) body: String,
}

/// What Campfire does: POST the payload to the webhook URL, read the answer.
pub(crate) async fn deliver(gateway: &str, token: &str, body: Vec<u8>) -> Answer {
    let res = client()
        .post(format!("{gateway}/campfire/{token}"))
        .header(header::CONTENT_TYPE, "application/json")
        .body(body)
        .send()
        .await
        .unwrap_or_else(|e| panic!("webhook: {e}"));
    Answer {
        status: res.status(),
        content_type: res
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string),
        body: res.text().await.unwrap_or_default(),
    }
}

pub(crate) fn bytes(v: &serde_json::Value) -> Vec<u8> {
    serde_json::to_vec(v).unwrap_or_default()
}

async fn wait_posts(fake: &FakeCampfire, n: usize) -> Vec<Posted> {
    for _ in 0..1000 {
        let p = fake.posted();
        if p.len() >= n {
            return p;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!(
        "the fake Campfire got {:?}, wanted {n} posts",
        fake.posted()
    );
}

#[tokio::test]
async fn run_is_answered_in_the_response_and_the_result_posted_to_the_room() {
    let (fake, campfire_url, _c) = fake_campfire().await;
    let router = router_with_extra(BINDINGS, |c| c.running_polls.store(3, Ordering::SeqCst));
    let adapter =
        CampfireAdapter::new(&config(&campfire_url, BOT_KEY)).unwrap_or_else(|e| panic!("{e}"));
    let closer = adapter.closer();
    let (gw, _g) = serve_http(adapter.routes()).await;
    let gateway = tokio::spawn(serve(router.clone(), adapter));

    let answer = deliver(
        &gw,
        TOKEN,
        bytes(&payload(42, "Alice", "run uptime on all")),
    )
    .await;
    assert_eq!(answer.status, StatusCode::OK, "{}", answer.body);
    assert_eq!(
        answer.content_type.as_deref(),
        Some("text/html; charset=utf-8")
    );
    assert!(
        answer.body.starts_with("<div><strong>job ")
            && answer
                .body
                .ends_with(" `uptime` on all by campfire:acme:42: 2 targets</strong></div>"),
        "{}",
        answer.body
    );
    let posted = wait_posts(&fake, 1).await;
    assert_eq!(posted.len(), 1, "one final message, no progress posts");
    assert_eq!(posted[0].room, ROOM.to_string());
    assert_eq!(posted[0].content_type, "text/html; charset=utf-8");
    let final_html = &posted[0].body;
    assert!(
        final_html.contains("succeeded (2/2 ok) — asked by campfire:acme:42</strong>"),
        "{final_html}"
    );
    assert!(
        final_html.contains("<pre>up 3 days, load 0.5</pre>"),
        "{final_html}"
    );
    let subs = router.controller().submitted();
    assert_eq!(subs.len(), 1);
    let spec =
        fleetcmd_core::job::JobSpec::from_bytes(&subs[0].spec).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(spec.requester.as_str(), "campfire:acme:42");
    assert_eq!(spec.channel, "campfire:acme:12");

    closer.close();
    tokio::time::timeout(Duration::from_secs(10), gateway)
        .await
        .unwrap_or_else(|_| panic!("gateway did not stop"))
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(*fake.refused.lock().unwrap_or_else(|p| p.into_inner()), 0);
}

#[tokio::test]
async fn approval_by_another_user_runs_the_job() {
    let (fake, campfire_url, _c) = fake_campfire().await;
    let router = router_with_extra(BINDINGS, |_| {});
    let adapter =
        CampfireAdapter::new(&config(&campfire_url, BOT_KEY)).unwrap_or_else(|e| panic!("{e}"));
    let (gw, _g) = serve_http(adapter.routes()).await;
    let _gateway = tokio::spawn(serve(router.clone(), adapter));

    let asked = deliver(
        &gw,
        TOKEN,
        bytes(&payload(42, "Alice", "run reboot on all")),
    )
    .await;
    assert!(
        asked.body.contains(" needs 1 approval within "),
        "{}",
        asked.body
    );
    let short = asked
        .body
        .split("job ")
        .nth(1)
        .and_then(|r| r.split(' ').next())
        .unwrap_or_default()
        .to_string();
    assert!(
        asked.body.contains(&format!(
            "<div>Approve: mention the bot with <code>approve {short}</code></div>"
        )),
        "{}",
        asked.body
    );
    assert!(
        router.controller().submitted().is_empty(),
        "waits for approval"
    );
    // The requester cannot approve their own request.
    let own = deliver(
        &gw,
        TOKEN,
        bytes(&payload(42, "Alice", &format!("approve {short}"))),
    )
    .await;
    assert!(
        own.body.contains("someone else must approve it"),
        "{}",
        own.body
    );
    assert!(router.controller().submitted().is_empty());

    let approved = deliver(
        &gw,
        TOKEN,
        bytes(&payload(57, "Bob", &format!("approve {short}"))),
    )
    .await;
    assert_eq!(approved.status, StatusCode::OK, "{}", approved.body);
    let mut posted = Vec::new();
    for _ in 0..1000 {
        posted = fake.posted();
        if posted.iter().any(|p| p.body.contains("succeeded (2/2 ok)")) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let all: Vec<&str> = posted.iter().map(|p| p.body.as_str()).collect();
    assert!(
        all.iter()
            .any(|b| b.contains("approved by campfire:acme:57; submitting")),
        "{all:#?}"
    );
    assert!(
        all.iter().any(|b| b.contains("succeeded (2/2 ok)")),
        "{all:#?}"
    );
    let subs = router.controller().submitted();
    assert_eq!(subs.len(), 1);
    let spec =
        fleetcmd_core::job::JobSpec::from_bytes(&subs[0].spec).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(spec.requester.as_str(), "campfire:acme:42");
    let approvers: Vec<&str> = spec.approvals.iter().map(|a| a.approver.as_str()).collect();
    assert_eq!(approvers, ["campfire:acme:57"]);
    assert_eq!(spec.approvals[0].key_id, "gw");
}

#[tokio::test]
async fn a_display_name_grants_nothing() {
    let (fake, campfire_url, _c) = fake_campfire().await;
    let router = router_with_extra(BINDINGS, |_| {});
    let adapter =
        CampfireAdapter::new(&config(&campfire_url, BOT_KEY)).unwrap_or_else(|e| panic!("{e}"));
    let (gw, _g) = serve_http(adapter.routes()).await;
    let _gateway = tokio::spawn(serve(router.clone(), adapter));

    // User 43 calls itself "Alice", like user 42 who has the oncall role.
    let answer = deliver(
        &gw,
        TOKEN,
        bytes(&payload(43, "Alice", "run uptime on all")),
    )
    .await;
    assert_eq!(answer.status, StatusCode::OK);
    assert!(
        answer.body.contains("refused:")
            && answer.body.contains("asked by campfire:acme:43")
            && answer.body.contains("nothing was submitted"),
        "{}",
        answer.body
    );
    assert!(router.controller().submitted().is_empty());
    let whoami = deliver(&gw, TOKEN, bytes(&payload(43, "Alice", "whoami"))).await;
    assert!(
        whoami.body.contains("campfire:acme:43") && !whoami.body.contains("campfire:acme:42"),
        "{}",
        whoami.body
    );
    assert!(fake.posted().is_empty());
}

#[tokio::test]
async fn forged_or_malformed_webhooks_are_refused_and_never_routed() {
    let (_fake, campfire_url, _c) = fake_campfire().await;
    let mut adapter =
        CampfireAdapter::new(&config(&campfire_url, BOT_KEY)).unwrap_or_else(|e| panic!("{e}"));
    let (reporter, mut reports) = AuthFailures::channel(16);
    adapter.report_auth_failures(reporter);
    let (gw, _g) = serve_http(adapter.routes()).await;

    let good = bytes(&payload(42, "Alice", "whoami"));
    let wrong_token = deliver(&gw, "Zq3vN8xK2mW9pL4rT7yB1cD7", good.clone()).await;
    assert_eq!(wrong_token.status, StatusCode::NOT_FOUND);
    let no_token = client()
        .post(format!("{gw}/campfire/"))
        .body(good.clone())
        .send()
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(no_token.status(), StatusCode::NOT_FOUND);

    let malformed = deliver(&gw, TOKEN, b"{\"user\": {\"id\": 42".to_vec()).await;
    assert_eq!(malformed.status, StatusCode::BAD_REQUEST);
    let mut missing = payload(42, "Alice", "whoami");
    missing["message"]["body"] = json!({});
    assert_eq!(
        deliver(&gw, TOKEN, bytes(&missing)).await.status,
        StatusCode::BAD_REQUEST
    );
    let mut bad_id = payload(42, "Alice", "whoami");
    bad_id["user"]["id"] = json!("42 or 1=1");
    assert_eq!(
        deliver(&gw, TOKEN, bytes(&bad_id)).await.status,
        StatusCode::BAD_REQUEST
    );

    // Knowing the URL is not enough: the room path must carry the bot key.
    let mut forged = payload(42, "Alice", "whoami");
    forged["room"]["path"] = json!(format!("/rooms/{ROOM}/7-guessed/messages"));
    assert_eq!(
        deliver(&gw, TOKEN, bytes(&forged)).await.status,
        StatusCode::UNAUTHORIZED
    );
    let mut other_room = payload(42, "Alice", "whoami");
    other_room["room"]["id"] = json!(13);
    assert_eq!(
        deliver(&gw, TOKEN, bytes(&other_room)).await.status,
        StatusCode::UNAUTHORIZED
    );

    let huge = vec![b' '; 300 * 1024];
    assert_eq!(
        deliver(&gw, TOKEN, huge).await.status,
        StatusCode::PAYLOAD_TOO_LARGE
    );

    // Authentication failures go to the gateway's audit reporter, without
    // the token or key; malformed bodies are not authentication failures.
    let mut got = Vec::new();
    while let Ok(f) = reports.try_recv() {
        got.push((f.adapter, f.source, f.detail));
    }
    let expected = [
        ("campfire", "webhook route", "wrong path token (404)"),
        (
            "campfire",
            "user 42 in room 12",
            "room path without this bot's key (401)",
        ),
        (
            "campfire",
            "user 42 in room 13",
            "room path without this bot's key (401)",
        ),
    ];
    let got_refs: Vec<(&str, &str, &str)> = got
        .iter()
        .map(|(a, s, d)| (a.as_str(), s.as_str(), d.as_str()))
        .collect();
    assert_eq!(got_refs, expected);

    // The first message the router sees is the genuine one sent now.
    let gw2 = gw.clone();
    let genuine = tokio::spawn(async move { deliver(&gw2, TOKEN, good).await });
    let msg = tokio::time::timeout(Duration::from_secs(5), adapter.recv())
        .await
        .unwrap_or_else(|_| panic!("nothing routed"))
        .unwrap_or_else(|| panic!("adapter closed"));
    assert_eq!(msg.identity.as_str(), "campfire:acme:42");
    assert_eq!(msg.channel, "campfire:acme:12");
    assert_eq!(msg.text, "whoami");
    assert!(msg.direct && !msg.from_bot);
    // Answer it through the sender: it becomes the webhook's response body.
    let mut reply = Reply::text("you are <campfire:acme:42>");
    reply.thread = msg.thread.clone();
    adapter
        .send(&msg.channel, reply)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let answer = genuine.await.unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(answer.status, StatusCode::OK);
    assert_eq!(
        answer.body,
        "<div><strong>you are &lt;campfire:acme:42&gt;</strong></div>"
    );
}

#[tokio::test]
async fn no_reply_in_time_is_an_empty_200_and_the_reply_is_posted_later() {
    let (fake, campfire_url, _c) = fake_campfire().await;
    let mut cfg = config(&campfire_url, BOT_KEY);
    cfg.reply_wait_ms = 50;
    let mut adapter = CampfireAdapter::new(&cfg).unwrap_or_else(|e| panic!("{e}"));
    let (gw, _g) = serve_http(adapter.routes()).await;
    let answer = deliver(&gw, TOKEN, bytes(&payload(42, "Alice", "whoami"))).await;
    assert_eq!(answer.status, StatusCode::OK);
    assert_eq!(
        answer.content_type, None,
        "no content type: Campfire posts nothing"
    );
    assert_eq!(answer.body, "");
    let msg = adapter.recv().await.unwrap_or_else(|| panic!("routed"));
    let mut reply = Reply::text("late answer");
    reply.thread = msg.thread.clone();
    let posted_ref = adapter
        .send(&msg.channel, reply)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(posted_ref.id, "5001", "id from the Location header");
    let posted = wait_posts(&fake, 1).await;
    assert_eq!(posted[0].body, "<div><strong>late answer</strong></div>");
    assert!(!adapter.sender().can_edit());
    assert!(adapter.edit(&posted_ref, Reply::text("x")).await.is_err());
}

#[tokio::test]
async fn other_bots_are_marked_and_answered_at_once() {
    let (_fake, campfire_url, _c) = fake_campfire().await;
    let mut cfg = config(&campfire_url, BOT_KEY);
    cfg.ignore_user_ids = vec!["99".to_string()];
    let mut adapter = CampfireAdapter::new(&cfg).unwrap_or_else(|e| panic!("{e}"));
    let (gw, _g) = serve_http(adapter.routes()).await;
    let started = std::time::Instant::now();
    let answer = deliver(
        &gw,
        TOKEN,
        bytes(&payload(99, "Deploy Bot", "run uptime on all")),
    )
    .await;
    assert_eq!((answer.status, answer.body.as_str()), (StatusCode::OK, ""));
    assert!(
        started.elapsed() < Duration::from_millis(2500),
        "not held for reply_wait_ms"
    );
    let msg = adapter.recv().await.unwrap_or_else(|| panic!("delivered"));
    assert!(msg.from_bot, "the router ignores it");
    assert_eq!(msg.identity.as_str(), "campfire:acme:99");
}

#[tokio::test]
async fn a_wrong_bot_key_or_room_is_an_error_not_a_silent_success() {
    let (fake, campfire_url, _c) = fake_campfire().await;
    let wrong = CampfireAdapter::new(&config(&campfire_url, "7-stale0key"))
        .unwrap_or_else(|e| panic!("{e}"));
    let err = wrong
        .send("campfire:acme:12", Reply::text("hello"))
        .await
        .err()
        .unwrap_or_else(|| panic!("a wrong key must fail"));
    let text = err.to_string();
    assert!(text.contains("bot key was refused"), "{text}");
    assert!(!text.contains("stale0key"), "the key never shows: {text}");
    assert_eq!(*fake.refused.lock().unwrap_or_else(|p| p.into_inner()), 1);

    let right =
        CampfireAdapter::new(&config(&campfire_url, BOT_KEY)).unwrap_or_else(|e| panic!("{e}"));
    let err = right
        .send("campfire:acme:99", Reply::text("hello"))
        .await
        .err()
        .unwrap_or_else(|| panic!("a room the bot is not in must fail"));
    assert!(err.to_string().contains("room not found"), "{err}");
    let err = right
        .send("campfire:other:12", Reply::text("hello"))
        .await
        .err()
        .unwrap_or_else(|| panic!("another server's channel must fail"));
    assert!(err.to_string().contains("campfire:acme:<room_id>"), "{err}");
    assert!(fake.posted().is_empty());
}

pub const HOSTILE: &str = "@channel <!here> wake up\n!run restart nginx.service on all\n```\n<b>bold</b><action-text-attachment sgid=\"BAh7\" content-type=\"application/vnd.campfire.mention\"></action-text-attachment>\n<script>alert(1)</script> & `ticks`";

#[tokio::test]
async fn hostile_output_is_inert_in_the_room() {
    let (fake, campfire_url, _c) = fake_campfire().await;
    let router = router_with_extra(BINDINGS, |c| c.output = HOSTILE.as_bytes().to_vec());
    let adapter =
        CampfireAdapter::new(&config(&campfire_url, BOT_KEY)).unwrap_or_else(|e| panic!("{e}"));
    let (gw, _g) = serve_http(adapter.routes()).await;
    let _gateway = tokio::spawn(serve(router, adapter));
    let answer = deliver(
        &gw,
        TOKEN,
        bytes(&payload(42, "Alice", "run uptime on all")),
    )
    .await;
    assert_eq!(answer.status, StatusCode::OK);
    let html = wait_posts(&fake, 1).await.remove(0).body;
    for bad in [
        "<b>",
        "<script",
        "<action-text-attachment",
        "@channel",
        "\n!run",
    ] {
        assert!(!html.contains(bad), "{bad:?} in {html}");
    }
    assert!(
        html.contains("@\u{2060}channel &lt;!here&gt; wake up"),
        "{html}"
    );
    assert!(html.contains("\n\u{200B}!run restart"), "{html}");
    assert!(
        html.contains("&lt;b&gt;bold&lt;/b&gt;&lt;action-text-attachment sgid=&quot;BAh7&quot;"),
        "{html}"
    );
    assert!(
        html.contains("&lt;script&gt;alert(1)&lt;/script&gt; &amp; `ticks`"),
        "{html}"
    );
    // Every tag in the message is one the adapter wrote.
    let mut rest = html.as_str();
    while let Some(i) = rest.find('<') {
        rest = &rest[i + 1..];
        let tag: String = rest.chars().take_while(|c| *c != '>').collect();
        assert!(
            [
                "div", "/div", "strong", "/strong", "em", "/em", "pre", "/pre", "code", "/code"
            ]
            .contains(&tag.as_str()),
            "unexpected tag <{tag}> in {html}"
        );
    }
}

pub fn visible(html: &str) -> String {
    html.replace('\u{2060}', "{WJ}")
        .replace('\u{200B}', "{ZWSP}")
        .replace("</div>", "</div>\n")
        .replace("</pre>", "</pre>\n")
}

pub fn job_result() -> Reply {
    fleetcmd_gateway::render::job(&failed_job(
        "logs",
        "campfire:acme:42",
        HOSTILE.as_bytes(),
        1,
        b"journalctl: unit <nginx> not found\n@here help",
    ))
}

#[test]
fn snapshot_job_result() {
    insta::assert_snapshot!(visible(&render(&job_result())));
}

/// The router's approval request, as it is posted.
pub fn approval_request() -> Reply {
    fleetcmd_gateway::render::approval_request(
        "b302099a8057",
        "reboot",
        &["/usr/sbin/reboot".to_string()],
        "role=web",
        1,
        Duration::from_secs(900),
        "campfire:acme:42",
    )
}

#[test]
fn snapshot_approval_request() {
    insta::assert_snapshot!(visible(&render(&approval_request())));
}

#[tokio::test]
async fn the_same_message_id_delivered_twice_runs_once_and_is_reported() {
    let (_fake, campfire_url, _c) = fake_campfire().await;
    let router = router_with_extra(BINDINGS, |_| {});
    let adapter =
        CampfireAdapter::new(&config(&campfire_url, BOT_KEY)).unwrap_or_else(|e| panic!("{e}"));
    let (failures, mut reports) = AuthFailures::channel(16);
    adapter.report_auth_failures(failures);
    let (gw, _g) = serve_http(adapter.routes()).await;
    let _gateway = tokio::spawn(serve(router.clone(), adapter));

    let message = bytes(&payload_with_id(70_001, 42, "Alice", "run uptime on all"));
    let first = deliver(&gw, TOKEN, message.clone()).await;
    assert_eq!(first.status, StatusCode::OK, "{}", first.body);
    // Campfire (or anyone with the path token) sends it again.
    let again = deliver(&gw, TOKEN, message).await;
    assert_eq!(again.status, StatusCode::OK);
    assert!(again.body.is_empty(), "{}", again.body);
    let mut submitted = 0;
    for _ in 0..500 {
        submitted = router.controller().submitted().len();
        if submitted > 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(submitted, 1);
    let f = reports
        .try_recv()
        .unwrap_or_else(|e| panic!("not reported: {e}"));
    assert_eq!(
        (f.adapter.as_str(), f.source.as_str(), f.detail.as_str()),
        (
            "campfire",
            "user 42 in room 12",
            "message 70001 delivered again; not run twice"
        )
    );
    // A new message id from the same user runs.
    let other = deliver(&gw, TOKEN, bytes(&payload(42, "Alice", "whoami"))).await;
    assert!(other.body.contains("campfire:acme:42"), "{}", other.body);
    assert_eq!(router.controller().submitted().len(), 1);
}
